"""``core.bars.bar_hashes`` (many bars at once) equals ``bar_hash`` bar for bar, and the CSV
feed's lazy hashes (computed in blocks with it) equal the one-bar rule."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.bars import BarHashes, bar_hash, bar_hashes
from feeds.csv.reader import RowHashes

_EPOCH = datetime(1970, 1, 1)
# microseconds since 1970 from year 1 to 9999 (strftime and numpy differ below year 1000: the
# one-bar rule decides there)
_US = st.integers(min_value=-62_135_596_800 * 10**6, max_value=253_402_300_799 * 10**6)
_NUM = st.one_of(
    st.floats(allow_nan=True, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e16, 1e-7, 123.456, float("nan")]),
)
_TEXT = st.one_of(st.none(), st.text(max_size=8))
_NAMES = st.sampled_from(["open", "high", "low", "close", "volume", "adj_close", "Zeta", "é"])


def _one(symbol: str, us: int, values: dict[str, object]) -> str:
    return bar_hash(symbol, _EPOCH + timedelta(microseconds=us), values)


@settings(max_examples=200, deadline=None)
@given(
    symbol=st.text(min_size=1, max_size=6),
    times=st.lists(_US, min_size=1, max_size=6),
    num_names=st.lists(_NAMES, unique=True, max_size=4),
    text_names=st.lists(st.sampled_from(["news", "Note", "ü"]), unique=True, max_size=2),
    data=st.data(),
)
def test_many_bars_hash_as_each_bar_does(
    symbol: str,
    times: list[int],
    num_names: list[str],
    text_names: list[str],
    data: st.DataObject,
) -> None:
    n = len(times)
    numeric = {k: np.array(data.draw(st.lists(_NUM, min_size=n, max_size=n))) for k in num_names}
    text = {k: data.draw(st.lists(_TEXT, min_size=n, max_size=n)) for k in text_names}
    got = bar_hashes(symbol, np.array(times, dtype=np.int64), numeric, text)
    want = [
        _one(
            symbol,
            t,
            {**{k: float(v[i]) for k, v in numeric.items()}, **{k: v[i] for k, v in text.items()}},
        )
        for i, t in enumerate(times)
    ]
    assert got == want


def test_an_infinite_number_is_refused_as_by_the_one_bar_rule() -> None:
    with pytest.raises(ValueError):
        _one("X", 0, {"close": float("inf")})
    with pytest.raises(ValueError):
        bar_hashes("X", np.array([0, 1]), {"close": np.array([1.0, float("inf")])})


def test_a_field_named_like_a_document_key_hashes_as_the_one_bar_rule() -> None:
    got = bar_hashes("X", np.array([0]), {"symbol": np.array([1.0])})
    assert got == [_one("X", 0, {"symbol": 1.0})]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=1, max_value=700), picks=st.lists(st.integers(0, 10**6)))
def test_the_csv_feeds_lazy_hashes_equal_the_one_bar_rule(n: int, picks: list[int]) -> None:
    rng = np.random.default_rng(n)
    times = (np.arange(n, dtype=np.int64) * 86_400 * 10**9 + 10**18).astype("datetime64[ns]")
    close = rng.uniform(1, 100, n)
    close[::7] = np.nan
    news: list[str | None] = [None if i % 3 else f"n{i}" for i in range(n)]
    hashes = RowHashes("GOOG", times, {"close": close}, {"news": news})
    for i in [p % n for p in picks] + [0, n - 1]:
        us = int(times[i].astype(np.int64)) // 1000
        values: dict[str, object] = {"close": float(close[i])}
        if news[i] is not None:
            values["news"] = news[i]
        assert hashes[i] == _one("GOOG", us, values)


def _row_hashes(n: int) -> RowHashes:
    times = (np.arange(n, dtype=np.int64) * 60 * 10**9 + 10**18).astype("datetime64[ns]")
    return RowHashes("AAA", times, {"close": np.linspace(1.0, 2.0, n)}, {})


@given(
    n=st.integers(min_value=1, max_value=600),
    asked=st.lists(st.integers(-700, 700), max_size=40),
    warm=st.lists(st.integers(0, 599), max_size=5),
)
def test_the_csv_feeds_take_equals_one_at_a_time(n: int, asked: list[int], warm: list[int]) -> None:
    """``RowHashes.take`` (the writer's bulk lookup) answers as ``[hashes[i] ...]``: the same
    hashes, cached or not, and the same IndexError for an index out of range."""
    bulk, one = _row_hashes(n), _row_hashes(n)
    for i in warm:  # some blocks already computed
        if i < n:
            bulk[i]
    try:
        expected: list[str] | None = [one[i] for i in asked]
    except IndexError:
        expected = None
    if expected is None:
        with pytest.raises(IndexError):
            bulk.take(asked)
    else:
        assert bulk.take(asked) == expected


@given(
    maxlen=st.sampled_from([None, 3, 7]),
    source=st.sampled_from(["none", "rows", "plain list"]),
    n=st.integers(min_value=0, max_value=20),
    asked=st.lists(st.integers(-3, 25), max_size=30),
)
def test_bar_hashes_take_equals_at(
    maxlen: int | None, source: str, n: int, asked: list[int]
) -> None:
    """``BarHashes.take`` is ``[at(i) ...]`` whatever holds the hashes: a bounded ring (evicted
    and odd hashes), the unbounded list, a source with its own ``take`` (a CSV file's), a source
    without one; indexes out of range or evicted answer None."""
    rows = _row_hashes(25)
    if source == "none":
        hashes = BarHashes(maxlen)
        for i in range(n):
            hashes.append(rows[i] if i % 4 else f"Odd-{i}")
    else:
        hashes = BarHashes(source=rows if source == "rows" else list(rows))
        for _ in range(n):
            hashes.advance()
    assert hashes.take(asked) == [hashes.at(i) for i in asked]
