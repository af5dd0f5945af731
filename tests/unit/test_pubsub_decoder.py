"""The live message decoder and the callback's handler against hostile input (no server).

The contract: any bytes and any JSON become a bar or are refused with one of
``REFUSAL_REASONS`` and a bounded detail; the handler never raises, counts every message once,
logs each reason once with a bounded excerpt. Hypothesis generates the input; the cases the
issue found (deep nesting, a 400-digit price, year 1 with an offset, ``Infinity``, a 1 MB price,
bars from the future) are pinned as examples.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from core.bars import bar_hash
from feeds.pubsub import BarHub, MessageHandler, StreamSettings, decode_message
from feeds.pubsub.handler import DELIVERED, DUPLICATE, MALFORMED
from feeds.pubsub.messages import (
    EXCERPT_CHARS,
    REFUSAL_REASONS,
    REPLAY_CLOCK_ATTRIBUTE,
    MalformedMessageError,
    message_clock,
)

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
NOW_S = T0.timestamp() + 3600.0  # the handler's wall clock in these tests
DETAIL_LIMIT = 4 * EXCERPT_CHARS + 1


def body(minute: int = 0, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "symbol": "AAA",
        "timestamp": (T0 + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
        "open": 10.0,
        "high": 11.0,
        "low": 9.5,
        "close": 10.5,
        "volume": 1000,
    }
    doc.update(over)
    return doc


def encode(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()


def check_refusal_or_bar(data: bytes, attributes: dict[str, str]) -> str | None:
    """Decode; the reason of a refusal (asserting the contract), or None for a bar."""
    try:
        bar = decode_message(data, attributes, clock_s=NOW_S, max_future_s=5.0)
    except MalformedMessageError as e:
        assert e.reason in REFUSAL_REASONS
        assert len(e.detail) <= DETAIL_LIMIT
        return e.reason
    # A bar is internally consistent: finite OHLC inside [low, high], hash of its content.
    v = bar.values
    assert all(math.isfinite(v[k]) for k in ("open", "high", "low", "close"))
    assert v["low"] <= min(v["open"], v["close"]) <= max(v["open"], v["close"]) <= v["high"]
    assert bar.data_hash == bar_hash(bar.symbol, bar.ts, v)
    assert bar.ts.timestamp() <= NOW_S + 5.0
    return None


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=40,
)
attributes = st.one_of(
    st.just({"symbol": "AAA"}),
    st.dictionaries(st.sampled_from(["symbol", REPLAY_CLOCK_ATTRIBUTE, "x"]), st.text(max_size=80)),
)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), attrs=attributes)
@example(data=b"[" * 100_000, attrs={"symbol": "AAA"})
@example(data=b'{"a":' * 5_000, attrs={"symbol": "AAA"})
@example(data=b"\xff\xfe\x00", attrs={"symbol": "AAA"})
def test_any_bytes_are_a_bar_or_refused_with_a_reason(data: bytes, attrs: dict[str, str]) -> None:
    check_refusal_or_bar(data, attrs)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=json_value)
def test_any_json_is_a_bar_or_refused_with_a_reason(doc: Any) -> None:
    check_refusal_or_bar(encode(doc), {"symbol": "AAA"})


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    key=st.sampled_from(["timestamp", "open", "high", "low", "close", "volume", "extra", "symbol"]),
    value=json_value,
)
def test_a_valid_bar_with_any_field_replaced_is_a_bar_or_refused(key: str, value: Any) -> None:
    check_refusal_or_bar(encode(body(**{key: value})), {"symbol": "AAA"})


@settings(max_examples=300, deadline=None)
@given(
    low=st.floats(min_value=0.01, max_value=1e9),
    spread=st.floats(min_value=0, max_value=1e6),
    o=st.floats(min_value=0, max_value=1),
    c=st.floats(min_value=0, max_value=1),
    volume=st.one_of(st.none(), st.integers(min_value=0, max_value=10**12)),
    extra=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9]{0,8}", fullmatch=True),
        st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30)),
        max_size=5,
    ),
)
def test_valid_bars_decode_to_their_values(
    low: float, spread: float, o: float, c: float, volume: int | None, extra: dict[str, Any]
) -> None:
    high = low + spread
    opn, close = low + o * (high - low), low + c * (high - low)
    assume(low <= opn <= high and low <= close <= high)
    extra = {k: v for k, v in extra.items() if k not in body() and k not in ("datetime", "p")}
    doc = body(open=opn, high=high, low=low, close=close, volume=volume, **extra)
    if volume is None:
        del doc["volume"]
    try:
        bar = decode_message(encode(doc), {"symbol": "AAA"}, clock_s=NOW_S, max_future_s=5)
    except MalformedMessageError as e:
        assert e.reason == "reserved_field", e  # a generated name backtrader reserves
        return
    assert (bar.values["open"], bar.values["close"]) == (opn, close)
    assert (
        (bar.values["volume"] == volume) if volume is not None else math.isnan(bar.values["volume"])
    )
    for k, v in extra.items():
        assert bar.values[k] == v


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (body(close=int("9" * 400)), "non_numeric_price"),  # 400 digits: beyond float
        (body(timestamp="0001-01-01T00:30:00+01:00"), "bad_timestamp"),  # year 0 in UTC
        (body(timestamp="9999-12-31T23:30:00-01:00"), "bad_timestamp"),  # year 10000 in UTC
        (body(timestamp="0900-01-01T00:00:00Z"), "bad_timestamp"),
        # under a millisecond: two such bars shared a paper run's decision id (attack finding)
        (body(timestamp="2024-01-02T15:30:00.0001Z"), "bad_timestamp"),
        (body(timestamp="2024-01-02T15:30:00.001001+00:00"), "bad_timestamp"),
        # helper-75: Python drops digits past the sixth, so these parsed as whole milliseconds
        # and two bars 100 ns apart became one
        (body(timestamp="2024-01-02T15:30:00.0000001Z"), "bad_timestamp"),
        (body(timestamp="2024-01-02T15:30:00.0010009Z"), "bad_timestamp"),
        (body(timestamp="2024-01-02T15:30:00+00:00:00.000500"), "bad_timestamp"),
        (body(timestamp="2024-01-02T15:30:00.001000000Z"), None),  # zeros: a whole ms
        # helper-75: "nan" text became a missing volume
        (body(volume="nan"), "non_numeric_volume"),
        (body(volume="NaN"), "non_numeric_volume"),
        (body(close="x" * 1_000_000), "non_numeric_price"),
        (body(close=99.0), "invalid_bar"),  # close above high
        (body(open=9.0), "invalid_bar"),  # open below low
        (body(close="1e999"), "invalid_bar"),  # infinite
        (body(extra=1e308 * 10), "bad_json"),  # json.dumps writes Infinity
        (body(extra=int("9" * 400)), "bad_field"),
        (body(nested={"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}), None),
        (body(**{f"f{i}": i for i in range(600)}), "bad_field"),
        (body(**{"x" * 300: 1}), "bad_field"),
        (body(text="\ud800"), "bad_field"),  # lone surrogate cannot be hashed as UTF-8
        (body(timestamp=(T0 + timedelta(days=365 * 75)).isoformat()), "future_timestamp"),
    ],
)
def test_the_cases_the_issue_found_are_refused_with_their_reason(
    doc: dict[str, Any], reason: str | None
) -> None:
    assert check_refusal_or_bar(encode(doc), {"symbol": "AAA"}) == reason


def test_infinity_anywhere_and_deep_nesting_are_bad_json() -> None:
    assert check_refusal_or_bar(b'{"x": Infinity}', {"symbol": "AAA"}) == "bad_json"
    assert check_refusal_or_bar(b'{"x": NaN}', {"symbol": "AAA"}) == "bad_json"
    deep: Any = []
    for _ in range(50):
        deep = [deep]
    assert check_refusal_or_bar(encode(body(x=deep)), {"symbol": "AAA"}) == "bad_json"
    # A number literal beyond float range parses as inf: refused as a field, not the body.
    huge = encode(body(extra=0)).replace(b'"extra": 0', b'"extra": 1e400')
    assert check_refusal_or_bar(huge, {"symbol": "AAA"}) == "bad_field"


def test_oversized_messages_are_refused_before_parsing() -> None:
    data = encode(body(headline="x" * 2000))
    with pytest.raises(MalformedMessageError) as e:
        decode_message(data, {"symbol": "AAA"}, max_bytes=1000)
    assert e.value.reason == "oversized" and str(len(data)) in e.value.detail


def test_future_check_uses_the_replay_clock_when_the_message_has_one() -> None:
    ten_min = body(timestamp=(T0 + timedelta(minutes=10)).isoformat())
    # Live: against the wall clock.
    assert message_clock({}, T0.timestamp()) == T0.timestamp()
    with pytest.raises(MalformedMessageError) as e:
        decode_message(encode(ten_min), {"symbol": "AAA"}, clock_s=T0.timestamp(), max_future_s=5)
    assert e.value.reason == "future_timestamp"
    # A paced replay of historical bars: its own clock, not the wall clock.
    replay = {"symbol": "AAA", REPLAY_CLOCK_ATTRIBUTE: f"{T0.timestamp() + 600:.3f}"}
    clock = message_clock(replay, wall_s=time.time())
    assert clock == T0.timestamp() + 600
    assert decode_message(encode(ten_min), replay, clock_s=clock, max_future_s=5).ts > T0
    replay[REPLAY_CLOCK_ATTRIBUTE] = f"{T0.timestamp():.3f}"
    with pytest.raises(MalformedMessageError):
        decode_message(encode(ten_min), replay, clock_s=message_clock(replay, 0), max_future_s=5)
    assert message_clock({REPLAY_CLOCK_ATTRIBUTE: "soon"}, 7.0) == 7.0
    # Any publisher can set the attribute: a clock ahead of the wall clock is not believed, so
    # a bar stamped in 2096 with a matching replay clock is still refused (found by an attack:
    # one such bar blocked its symbol for the rest of the run).
    far = datetime(2096, 1, 1, tzinfo=UTC)
    poisoned = {"symbol": "AAA", REPLAY_CLOCK_ATTRIBUTE: f"{far.timestamp():.3f}"}
    assert message_clock(poisoned, wall_s=T0.timestamp()) == T0.timestamp()
    with pytest.raises(MalformedMessageError) as e:
        decode_message(
            encode(body(timestamp=far.isoformat())),
            poisoned,
            clock_s=message_clock(poisoned, wall_s=T0.timestamp()),
            max_future_s=5,
        )
    assert e.value.reason == "future_timestamp"


# -- the handler --------------------------------------------------------------------------------


def handler(symbols: tuple[str, ...] = ("AAA",), now_s: float = NOW_S) -> MessageHandler:
    return MessageHandler(
        BarHub(symbols, align_wait_s=0),
        settings=StreamSettings(),
        max_future_s=5.0,
        wall_clock=lambda: now_s,
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(
        st.tuples(
            st.one_of(st.binary(max_size=80), json_value.map(encode), st.just(encode(body()))),
            attributes,
            st.one_of(st.none(), st.sampled_from(["1", "2", "3"])),
        ),
        max_size=12,
    )
)
def test_the_handler_never_raises_and_counts_every_message_once(
    messages: list[tuple[bytes, dict[str, str], str | None]],
) -> None:
    h = handler()
    outcomes = Counter(
        h.handle(data, attrs, message_id=mid, publish_time_s=None) for data, attrs, mid in messages
    )
    assert set(outcomes) <= {DELIVERED, DUPLICATE, MALFORMED}
    st_ = h.stats
    assert st_.received == len(messages)
    assert outcomes[DELIVERED] == st_.delivered
    assert outcomes[DUPLICATE] == st_.duplicates
    assert outcomes[MALFORMED] == sum(st_.malformed.values())
    assert set(st_.malformed) <= set(REFUSAL_REASONS)


def test_refusals_are_logged_once_per_reason_with_a_bounded_excerpt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    h = handler()
    caplog.set_level(logging.WARNING, logger="feeds.pubsub")
    huge = encode(body(close="9" * 1_000_000 + "x"))
    for i in range(3):
        assert h.handle(huge, {"symbol": "AAA"}, message_id=f"m{i}") == MALFORMED
    deep = b"[" * 100_000
    assert h.handle(deep, {"symbol": "AAA"}, message_id="d") == MALFORMED
    records = [r.getMessage() for r in caplog.records]
    assert sum("non_numeric_price" in r for r in records) == 1
    assert sum("bad_json" in r for r in records) == 1
    assert all(len(r) < 2_000 for r in records)
    assert h.stats.malformed == {"non_numeric_price": 3, "bad_json": 1}


def test_a_future_bar_is_refused_and_the_symbol_lives_on() -> None:
    h = handler(now_s=(T0 + timedelta(minutes=5)).timestamp())
    ok = [encode(body(minute=m)) for m in range(4)]
    assert h.handle(ok[0], {"symbol": "AAA"}, message_id="0") == DELIVERED
    for ts in ((T0 + timedelta(minutes=15)).isoformat(), "2099-01-01T00:00:00Z"):
        assert h.handle(encode(body(timestamp=ts)), {"symbol": "AAA"}, message_id=ts) == MALFORMED
    for i, data in enumerate(ok[1:], start=1):
        assert h.handle(data, {"symbol": "AAA"}, message_id=str(i)) == DELIVERED
    assert h.stats.malformed == {"future_timestamp": 2} and h.stats.delivered == 4


def test_an_observer_that_raises_changes_nothing(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def on_bar(self, symbol: str, age_s: float | None) -> None:
            raise RuntimeError("metrics down")

        on_malformed = on_duplicate = on_gap = on_bar  # type: ignore[assignment]

    h = MessageHandler(BarHub(["AAA"], align_wait_s=0), events=Broken())  # type: ignore[arg-type]
    assert h.handle(encode(body()), {"symbol": "AAA"}, message_id="1") == DELIVERED
    assert h.handle(encode(body(minute=1)), {"symbol": "AAA"}, message_id="2") == DELIVERED
    assert h.stats.delivered == 2 and h.hub.depth("AAA") == 2


@pytest.mark.parametrize(
    "name",
    [
        "start",
        "reset",
        "forward",
        "stop",
        "next",
        "text_fields",
        "missed_step",
        "tick_close",
        "line0",
        "datetime",
        "lines",
    ],
)
def test_a_field_named_like_a_feed_attribute_is_refused(name: str) -> None:
    """Found by an attack: a publisher's ``text_fields`` hung the runner (SIGTERM ignored),
    ``start`` and ``missed_step`` crashed it, and each restart crashed again."""
    with pytest.raises(MalformedMessageError) as e:
        decode_message(encode(body(**{name: 1.5})), {"symbol": "AAA"})
    assert e.value.reason == "reserved_field" and name in e.value.detail


def test_feed_attributes_list_every_attribute_the_live_feed_adds() -> None:
    from feeds.fields import attribute_names, reserved_reason
    from feeds.pubsub.config import FEED_ATTRIBUTES
    from feeds.pubsub.feed import PubSubMarketDataFeed

    added = {n for n in attribute_names(PubSubMarketDataFeed) if reserved_reason(n) is None}
    assert added <= FEED_ATTRIBUTES, sorted(added - FEED_ATTRIBUTES)


def test_duplicate_keys_and_underscored_numbers_are_refused_not_guessed() -> None:
    """Found by an attack: ``{"close":1,"close":112.5}`` kept the last value and ``"1_06"``
    became 106, silently."""
    dup = b'{"timestamp":"2024-03-01T14:30:00Z","open":1,"high":2,"low":0.5,"close":1,"close":1.5}'
    with pytest.raises(MalformedMessageError) as e:
        decode_message(dup, {"symbol": "AAA"})
    assert e.value.reason == "bad_json" and "duplicate key 'close'" in e.value.detail
    with pytest.raises(MalformedMessageError) as e:
        decode_message(encode(body(open="1_06")), {"symbol": "AAA"})
    assert e.value.reason == "non_numeric_price"


@pytest.mark.parametrize(
    ("field", "value", "said"),
    [
        # found by an attack (helper-65): a list said "not a number in float range"
        ("openinterest", [1], "openinterest '[1]' is not a number"),
        ("close", "abc", "close 'abc' is not a number"),
        ("close", int("9" * 400), "is out of float range"),
    ],
)
def test_a_field_that_is_not_a_number_says_which_and_why(field: str, value: Any, said: str) -> None:
    with pytest.raises(MalformedMessageError) as e:
        decode_message(encode(body(**{field: value})), {"symbol": "AAA"})
    assert said in str(e.value) and ("float range" in str(e.value)) == ("range" in said)


@pytest.mark.parametrize(
    ("field", "value", "reason", "said"),
    [
        # found by an attack (helper-66): volume {"a": 1} became NaN and a field volume_a;
        # close {"v": 1.5} was refused as "no close"
        ("volume", {"a": 1}, "non_numeric_volume", "volume {'a': 1} is an object"),
        ("Close", {"v": 1.5}, "non_numeric_price", "close {'v': 1.5} is an object"),
        ("openinterest", {"n": 3}, "bad_field", "openinterest {'n': 3} is an object"),
        # Arabic-Indic and full-width digits: float() reads them, the CSV reader does not
        ("close", "١٫٥", "non_numeric_price", "is not a number"),
        ("volume", "１０", "non_numeric_volume", "is not a number"),
    ],
)
def test_a_number_field_given_as_an_object_or_other_digits_is_refused(
    field: str, value: Any, reason: str, said: str
) -> None:
    doc = body()
    doc.pop(field.lower(), None)
    doc[field] = value
    with pytest.raises(MalformedMessageError) as e:
        decode_message(encode(doc), {"symbol": "AAA"})
    assert e.value.reason == reason and said in str(e.value)
