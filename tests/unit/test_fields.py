"""The shared field model: names, flattening, validation, data hash, hash history."""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.bars import (
    BarHashes,
    bar_hash,
    canonical_bar,
    check_bar,
    check_bars,
    field_name,
    flatten,
)


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("Close", "close"),
        ("Adj Close", "adj_close"),
        ("latest_news.sentiment", "latest_news_sentiment"),
        ("  RSI-14 ", "rsi_14"),
        ("1d_return", "f_1d_return"),
    ],
)
def test_field_names(raw: str, name: str) -> None:
    assert field_name(raw) == name


def test_field_name_needs_a_letter_or_digit() -> None:
    with pytest.raises(ValueError, match="no letters or digits"):
        field_name("--")


def test_flatten_nested_and_lists() -> None:
    assert flatten(
        {
            "rsi": 55.1,
            "latest_news": {"sentiment": 0.3, "meta": {"Relevance": 1}},
            "tags": ["a", "b"],
        }
    ) == {
        "rsi": 55.1,
        "latest_news_sentiment": 0.3,
        "latest_news_meta_relevance": 1,
        "tags": '["a","b"]',
    }


@pytest.mark.parametrize(
    ("bar", "reason"),
    [
        ((1.0, 2.0, 0.5, 1.5, 10.0), None),
        ((1.0, 0.9, 1.1, 1.0, 10.0), "high 0.9 < low 1.1"),
        ((float("nan"), 2.0, 0.5, 1.5, 10.0), "open is missing or NaN"),
        ((1.0, 2.0, 0.0, 1.5, 10.0), "low 0.0 is not positive"),
        ((1.0, 2.0, 0.5, 1.5, -1.0), "volume -1.0 is negative"),
    ],
)
def test_check_bar(bar: tuple[float, float, float, float, float], reason: str | None) -> None:
    assert check_bar(*bar) == reason


def test_hash_depends_on_content_only() -> None:
    ts = datetime(2004, 8, 19, tzinfo=UTC)
    a = bar_hash("GOOG", ts, {"open": 100, "close": 100.34, "rsi": None})
    # same instant in another zone, ints vs floats, missing vs None, key order: same hash
    ts_ny = ts.astimezone(timezone(timedelta(hours=-4)))
    b = bar_hash("GOOG", ts_ny, {"close": 100.34, "open": 100.0})
    assert a == b and len(a) == 32
    assert bar_hash("GOOG", ts, {"open": 100, "close": 100.35}) != a
    assert bar_hash("GOOGL", ts, {"open": 100, "close": 100.34}) != a
    assert bar_hash("GOOG", ts + timedelta(days=1), {"open": 100, "close": 100.34}) != a
    assert canonical_bar("GOOG", ts, {"open": 100, "note": "x"}) == (
        b'{"note":"x","open":100.0,"symbol":"GOOG","timestamp":"2004-08-19T00:00:00Z"}'
    )


def test_bar_hashes_bounded() -> None:
    h = BarHashes(maxlen=3)
    for i in range(5):
        h.append(f"h{i}")
    assert len(h) == 5
    assert [h.at(i) for i in range(6)] == [None, None, "h2", "h3", "h4", None]
    unbounded = BarHashes()
    unbounded.extend(["a", "b"])
    assert unbounded.at(1) == "b" and unbounded.at(-1) is None


_any_float = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0.0, -0.0, 1.0, 100.0, 99.5, 100.5, 1e-300, 1e300]
)


@settings(max_examples=400, deadline=None)
@given(_any_float, _any_float, _any_float, _any_float, _any_float)
def test_the_scalar_and_the_vector_bar_rule_agree(
    o: float, h: float, low: float, c: float, v: float
) -> None:
    arrays = [np.array([x], dtype=np.float64) for x in (o, h, low, c, v)]
    assert check_bar(o, h, low, c, v) == check_bars(*arrays).get(0)


@settings(max_examples=200, deadline=None)
@given(
    maxlen=st.integers(1, 6),
    digests=st.lists(
        st.binary(min_size=16, max_size=16).map(bytes.hex)
        | st.sampled_from(["", "x", "ABCDEF0123456789ABCDEF0123456789", "0" * 31, "0" * 34]),
        max_size=20,
    ),
)
def test_bounded_bar_hashes_answer_as_a_deque_of_the_newest_would(
    maxlen: int, digests: list[str]
) -> None:
    """The bounded ring (16 bytes a hash) answers exactly what a deque of the newest
    ``maxlen`` strings would, also for text that is not bar_hash's form (kept as given)."""
    h = BarHashes(maxlen=maxlen)
    ref: deque[str] = deque(maxlen=maxlen)
    for d in digests:
        h.append(d)
        ref.append(d)
        n = len(h)
        for i in range(-1, n + 1):
            k = i - (n - len(ref))
            want = ref[k] if 0 <= k < len(ref) and 0 <= i < n else None
            assert h.at(i) == want
    assert h.bounded and not BarHashes().bounded
