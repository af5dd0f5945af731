"""``core.bars.bar_hashes`` (many bars at once) equals ``bar_hash`` bar for bar, and the CSV
feed's lazy hashes (computed in blocks with it) equal the one-bar rule."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.bars import bar_hash, bar_hashes
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
