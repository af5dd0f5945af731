"""The message contract of live bars: decode, validate and hash one Pub/Sub message (pure).

One JSON object per message with ``symbol``, ``timestamp`` (ISO-8601; UTC when it has no offset),
``open``, ``high``, ``low``, ``close``, optional ``volume``, any extra fields (numbers, booleans,
text, nested objects flattened with the CSV rule of :func:`core.bars.flatten`, lists kept as JSON
text) and an optional publisher ``data_hash`` that must equal :func:`core.bars.bar_hash` of the
content. Attribute ``symbol`` on every message; an ordering key is optional and ignored (the
feed's subscription has no message ordering; the hub puts each symbol's bars in time order).

:func:`decode_message` never raises anything but :class:`MalformedMessageError`: any bytes and any
JSON either become a :class:`LiveBar` or are refused with one of :data:`REFUSAL_REASONS` and a
detail of bounded length (values are cut to :data:`EXCERPT_CHARS` characters).

The clock: a bar stamped more than ``max_future_s`` ahead of ``clock_s`` is refused as
``future_timestamp``. The caller passes :func:`message_clock`: the wall clock, or, for messages
of a paced replay, the replay's own clock (``python -m runtime.replay --speed N`` sets the
attribute ``replay_clock``: its "now" in POSIX seconds, the first bar's time plus N times the
elapsed time), so a replay that plays bars faster than real time is checked against the time
it plays, not the wall clock.

Pure: no I/O, no threads; :func:`decode_message` runs on the subscriber's pull thread.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from core.bars import (
    OHLCV,
    OPEN_INTEREST,
    PRICE_FIELDS,
    bar_hash,
    check_bar,
    field_name,
    flatten,
)
from core.errors import DataError
from core.settings import unique_keys
from core.time import as_utc, utc_to_bt_num
from feeds.fields import reserved_reason
from feeds.pubsub.config import FEED_ATTRIBUTES, MAX_MESSAGE_BYTES, FieldSet

__all__ = [
    "EXCERPT_CHARS",
    "MAX_DEPTH",
    "MAX_FIELDS",
    "META_KEYS",
    "REFUSAL_REASONS",
    "REPLAY_CLOCK_ATTRIBUTE",
    "LiveBar",
    "MalformedMessageError",
    "bar_fields",
    "decode_message",
    "excerpt",
    "message_clock",
    "parse_timestamp",
]

# Body keys that describe the message rather than the bar.
META_KEYS = frozenset({"symbol", "timestamp", "data_hash"})
# Attribute a paced replay sets: its own clock, POSIX seconds as decimal text.
REPLAY_CLOCK_ATTRIBUTE = "replay_clock"
# Bounds that keep one message's cost (and its log line) small whatever it holds.
EXCERPT_CHARS = 120
MAX_DEPTH = 16  # nesting of objects and arrays in the body
MAX_FIELDS = 512  # leaves of the body after flattening
MAX_NAME_CHARS = 200  # length of a (flattened) field name
MAX_SYMBOL_CHARS = 64
MIN_YEAR = 1000  # ISO years below 1000 do not round-trip through strftime("%Y")

# Every reason a message can be refused for, in the order of the checks.
REFUSAL_REASONS: tuple[str, ...] = (
    "oversized",
    "bad_json",
    "missing_symbol",
    "symbol_mismatch",
    "unknown_symbol",
    "bad_timestamp",
    "future_timestamp",
    "bad_field",
    "reserved_field",
    "missing_price",
    "non_numeric_price",
    "non_numeric_volume",
    "invalid_bar",
    "hash_mismatch",
    "stale_timestamp",
    "late_bar",
    "undecodable",
    "internal_error",
)


class LiveBar(NamedTuple):
    """One validated bar.

    Attributes:
        symbol: from the ``symbol`` attribute.
        ts: bar time, aware UTC.
        dt_num: the same time as backtrader's float date number (naive UTC).
        values: OHLCV as floats (volume NaN when absent) and flattened extras (float, str or
            None for JSON null).
        data_hash: :func:`core.bars.bar_hash` of the content.
        message_id: Pub/Sub message id (None for backfill bars).
        publish_time_s: Pub/Sub publish time, epoch seconds (None when unknown).
        received_s: epoch seconds when the pull thread decoded it.
        live: False for CSV backfill bars.
        verified: the publisher sent a ``data_hash`` and it matched.
        token: what acknowledges the message once the decision on the bar is on disk (the
            Pub/Sub message; None for backfill bars or when it was acknowledged on receipt).
    """

    symbol: str
    ts: datetime
    dt_num: float
    values: dict[str, Any]
    data_hash: str
    message_id: str | None = None
    publish_time_s: float | None = None
    received_s: float = 0.0
    live: bool = True
    verified: bool = False
    token: Any = None


class MalformedMessageError(DataError):
    """A message that breaks the contract.

    Attributes:
        reason: a short key of :data:`REFUSAL_REASONS`, used for counting.
        detail: what was wrong, at most a few hundred characters (values are excerpted).
    """

    def __init__(self, reason: str, detail: str) -> None:
        detail = detail if len(detail) <= 4 * EXCERPT_CHARS else detail[: 4 * EXCERPT_CHARS] + "…"
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """``repr`` of ``value`` cut to ``limit`` characters (``…(+N chars)`` says how much was cut).

    Bytes and long strings are cut before ``repr`` so the cost does not grow with the value.
    """
    if isinstance(value, (str, bytes)) and len(value) > limit:
        text = repr(value[:limit]) + f"…(+{len(value) - limit} chars)"
    else:
        text = repr(value)
    return text if len(text) <= limit + 40 else text[:limit] + "…"


def message_clock(attributes: Mapping[str, str], wall_s: float) -> float:
    """The clock a message's bar time is checked against, POSIX seconds: the replay's clock
    (attribute :data:`REPLAY_CLOCK_ATTRIBUTE`) when the message has one and it is behind the
    wall clock, else ``wall_s``. A replay's clock can only make the check stricter: any
    publisher can set the attribute, so a clock ahead of the wall clock is not believed (a bar
    stamped in 2096 with a matching ``replay_clock`` is still ``future_timestamp``). An
    attribute that is not a finite number is ignored."""
    raw = attributes.get(REPLAY_CLOCK_ATTRIBUTE)
    if raw is None:
        return wall_s
    try:
        replay_s = float(raw)
    except (TypeError, ValueError, OverflowError):
        return wall_s
    return min(replay_s, wall_s) if math.isfinite(replay_s) else wall_s


def parse_timestamp(raw: Any) -> datetime:
    """ISO-8601 text -> aware UTC datetime (no offset = UTC).

    Raises:
        MalformedMessageError: ``bad_timestamp`` (not text, unparsable, or out of range once
            converted to UTC, e.g. year 1 with a positive offset).
    """
    if not isinstance(raw, str):
        raise MalformedMessageError(
            "bad_timestamp", f"timestamp must be ISO-8601 text, got {excerpt(raw)}"
        )
    try:
        ts = as_utc(datetime.fromisoformat(raw.strip()))
    except (ValueError, OverflowError) as e:
        raise MalformedMessageError(
            "bad_timestamp", f"unparsable or out-of-range timestamp {excerpt(raw)}"
        ) from e
    if ts.year < MIN_YEAR:
        raise MalformedMessageError(
            "bad_timestamp", f"timestamp {excerpt(raw)} is before year 1000"
        )
    return ts


_FRACTION = re.compile(r"[.,](\d+)")


def _finer_than_ms(text: str) -> bool:
    """A fraction of a second in ``text`` (of the time or of an offset) with a non-zero digit
    past the third: ``datetime.fromisoformat`` drops digits past the sixth, so
    ``00.0000001`` parsed as a whole millisecond and two bars 100 ns apart became one (a
    fresh-context attack)."""
    return any(m.group(1)[3:].strip("0") for m in _FRACTION.finditer(text))


# The fields that must be numbers, and the reason a message is refused when one is not.
_NUMBER_REASONS = {
    **dict.fromkeys(PRICE_FIELDS, "non_numeric_price"),
    "volume": "non_numeric_volume",
    OPEN_INTEREST: "bad_field",
}


def _number(name: str, value: Any, reason: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MalformedMessageError(reason, f"{name} {excerpt(value)} is not a number")
    if isinstance(value, str) and ("_" in value or not value.isascii()):
        # Python's float() reads "1_06" as 106 (a typo must not become a price) and "١٫٥"
        # or "１" as numbers; the CSV reader refuses both (found by attacks, helper-65/66)
        raise MalformedMessageError(reason, f"{name} {excerpt(value)} is not a number")
    try:
        number = float(value)
    except ValueError as e:  # text such as "abc", or "[1]": a list, kept as its JSON text
        raise MalformedMessageError(reason, f"{name} {excerpt(value)} is not a number") from e
    except OverflowError as e:  # an integer beyond float64
        raise MalformedMessageError(reason, f"{name} {excerpt(value)} is out of float range") from e
    if math.isnan(number):
        # "nan" text: JSON has no such number, and a volume of "nan" was taken for a missing
        # one (a fresh-context attack; "inf" is refused by the bar's checks)
        raise MalformedMessageError(reason, f"{name} {excerpt(value)} is not a number")
    return number


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _check_shape(doc: Mapping[str, Any]) -> None:
    """Depth and size limits, iteratively (a recursive walk could itself overflow).

    Raises:
        MalformedMessageError: ``bad_json`` (too deep) or ``bad_field`` (too many fields).
    """
    stack: list[tuple[Any, int]] = [(doc, 1)]
    leaves = 0
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise MalformedMessageError(
                "bad_json", f"objects or arrays nested deeper than {MAX_DEPTH} levels"
            )
        if isinstance(node, dict):
            for child in node.values():
                if isinstance(child, dict):
                    stack.append((child, depth + 1))
                    continue
                leaves += 1  # a scalar or a list (kept as JSON text) is one field
                if isinstance(child, list):
                    stack.append((child, depth + 1))
            if leaves > MAX_FIELDS:
                raise MalformedMessageError("bad_field", f"more than {MAX_FIELDS} fields")
        else:
            stack.extend((child, depth + 1) for child in node if isinstance(child, (dict, list)))


_name_cache: dict[str, str] = {}


def _cached_field_name(raw: str) -> str:
    """:func:`core.bars.field_name` with a bounded cache (flat bodies repeat their keys)."""
    name = _name_cache.get(raw)
    if name is None:
        name = field_name(raw)
        if len(_name_cache) < 65_536:
            _name_cache[raw] = name
    return name


def _flatten(body: dict[str, Any]) -> dict[str, Any]:
    """:func:`core.bars.flatten` (the CSV rule), with a fast path for flat bodies."""
    for value in body.values():
        if isinstance(value, (dict, list)):
            return flatten(body)
    return {_cached_field_name(k): v for k, v in body.items()}


def _leaves(obj: Mapping[str, Any]) -> int:
    return sum(_leaves(v) if isinstance(v, dict) else 1 for v in obj.values())


def decode_message(
    data: bytes,
    attributes: Mapping[str, str],
    *,
    message_id: str | None = None,
    publish_time_s: float | None = None,
    received_s: float | None = None,
    clock_s: float | None = None,
    max_future_s: float = math.inf,
    max_bytes: int = MAX_MESSAGE_BYTES,
    token: Any = None,
) -> LiveBar:
    """Decode and validate one message against the contract, and hash the bar.

    Args:
        data: the message body (UTF-8 JSON object).
        attributes: message attributes; ``symbol`` is required.
        message_id, publish_time_s, received_s, token: carried into the result.
        clock_s: "now" for the future check, POSIX seconds (:func:`message_clock`); None skips
            the check.
        max_future_s: tolerance of the future check, seconds.
        max_bytes: a longer body is refused as ``oversized`` without being parsed.

    Returns:
        The :class:`LiveBar`.

    Raises:
        MalformedMessageError: with the reason key (:data:`REFUSAL_REASONS`) and a bounded
            detail. Nothing else: an unexpected failure is refused as ``undecodable``.
    """
    try:
        return _decode(
            data,
            attributes,
            message_id,
            publish_time_s,
            received_s,
            clock_s,
            max_future_s,
            max_bytes,
            token,
        )
    except MalformedMessageError:
        raise
    except Exception as e:
        raise MalformedMessageError("undecodable", f"{type(e).__name__}: {excerpt(str(e))}") from e


def _decode(
    data: bytes,
    attributes: Mapping[str, str],
    message_id: str | None,
    publish_time_s: float | None,
    received_s: float | None,
    clock_s: float | None,
    max_future_s: float,
    max_bytes: int,
    token: Any,
) -> LiveBar:
    if len(data) > max_bytes:
        raise MalformedMessageError(
            "oversized", f"body of {len(data)} bytes exceeds the {max_bytes}-byte limit"
        )
    symbol = attributes.get("symbol")
    if not symbol or not isinstance(symbol, str):
        raise MalformedMessageError("missing_symbol", "no 'symbol' attribute")
    if len(symbol) > MAX_SYMBOL_CHARS:
        raise MalformedMessageError(
            "missing_symbol", f"'symbol' attribute {excerpt(symbol)} is longer than 64 characters"
        )
    try:
        doc = json.loads(data, parse_constant=_reject_constant, object_pairs_hook=unique_keys)
    except RecursionError as e:
        raise MalformedMessageError("bad_json", "body nested too deeply to parse") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedMessageError("bad_json", f"body is not JSON ({excerpt(str(e))})") from e
    if not isinstance(doc, dict):
        raise MalformedMessageError(
            "bad_json", f"body must be a JSON object, got {type(doc).__name__}"
        )
    body_symbol = doc.get("symbol")
    if body_symbol is not None and body_symbol != symbol:
        raise MalformedMessageError(
            "symbol_mismatch",
            f"attribute symbol {excerpt(symbol)} != body symbol {excerpt(body_symbol)}",
        )
    ts = parse_timestamp(doc.get("timestamp"))
    if ts.microsecond % 1000 or _finer_than_ms(doc["timestamp"]):
        # Bar times are kept to the millisecond (the record's bar_time and a live run's
        # decision ids; backtrader's float dates hold about 10 us): two bars under a
        # millisecond apart shared a decision id, and the store kept one of them without a
        # word (a fresh-context attack). Refused, not rounded: rounding would make two bars one.
        raise MalformedMessageError(
            "bad_timestamp",
            f"timestamp {excerpt(doc.get('timestamp'))} is not on a whole millisecond (bar "
            "times are kept to the millisecond)",
        )
    if clock_s is not None and ts.timestamp() > clock_s + max_future_s:
        raise MalformedMessageError(
            "future_timestamp",
            f"bar time {ts.isoformat()} is {ts.timestamp() - clock_s:.1f} s ahead of the clock "
            f"(PUBSUB_MAX_FUTURE_S={max_future_s:g})",
        )
    published_hash = doc.get("data_hash")
    body = {k: v for k, v in doc.items() if k not in META_KEYS}
    _check_shape(body)
    for key, value in body.items():
        if isinstance(value, dict):
            # flattening would make {"close": {"v": 1}} a field close_v and the bar "no
            # close" (found by an attack, helper-66: volume {"a": 1} became NaN silently)
            try:
                name = _cached_field_name(key)
            except ValueError:
                continue  # refused by name below
            if name in _NUMBER_REASONS:
                raise MalformedMessageError(
                    _NUMBER_REASONS[name], f"{name} {excerpt(value)} is an object, not a number"
                )
    try:
        flat = _flatten(body)
    except ValueError as e:
        raise MalformedMessageError("bad_field", excerpt(str(e), 2 * EXCERPT_CHARS)) from e
    if len(flat) != _leaves(body):
        raise MalformedMessageError(
            "bad_field", "two keys normalise to the same field name (e.g. 'Close' and 'close')"
        )
    values: dict[str, Any] = {}
    for name in PRICE_FIELDS:
        raw = flat.pop(name, None)
        if raw is None:
            raise MalformedMessageError("missing_price", f"no {name}")
        values[name] = _number(name, raw, "non_numeric_price")
    raw_volume = flat.pop("volume", None)
    values["volume"] = (
        math.nan if raw_volume is None else _number("volume", raw_volume, "non_numeric_volume")
    )
    raw_open_interest = flat.pop(OPEN_INTEREST, None)
    if raw_open_interest is not None:  # backtrader's own line (futures); absent: NaN
        open_interest = _number(OPEN_INTEREST, raw_open_interest, "bad_field")
        if not math.isfinite(open_interest) or open_interest < 0:
            raise MalformedMessageError(
                "bad_field",
                f"{OPEN_INTEREST} {excerpt(raw_open_interest)} is not a finite number >= 0",
            )
        values[OPEN_INTEREST] = open_interest
    problem = check_bar(
        values["open"],
        values["high"],
        values["low"],
        values["close"],
        values["volume"] if raw_volume is not None else 0.0,
    )
    if problem:
        raise MalformedMessageError("invalid_bar", problem)
    for name, value in flat.items():
        if len(name) > MAX_NAME_CHARS:
            raise MalformedMessageError(
                "bad_field", f"field name {excerpt(name)} is longer than {MAX_NAME_CHARS}"
            )
        why = reserved_reason(name) or (
            "an attribute of the live feed" if name in FEED_ATTRIBUTES else None
        )
        if why is not None:
            # A field named like an attribute of the feed would replace it (a publisher's
            # "start" or "text_fields" crashed or hung the runner): refused, never renamed.
            raise MalformedMessageError(
                "reserved_field", f"field {excerpt(name)} may not be used: {why}"
            )
        if isinstance(value, bool):
            value = 1.0 if value else 0.0
        elif isinstance(value, int):
            try:
                value = float(value)
            except OverflowError as e:
                raise MalformedMessageError(
                    "bad_field", f"field {excerpt(name)}: {excerpt(value)} is out of float range"
                ) from e
        elif isinstance(value, float) and not math.isfinite(value):
            raise MalformedMessageError(
                "bad_field", f"field {excerpt(name)}: {value!r} is not a finite number"
            )
        values[name] = value
    try:
        digest = bar_hash(symbol, ts, values)
    except UnicodeEncodeError as e:
        raise MalformedMessageError(
            "bad_field", "text is not valid Unicode (a lone surrogate escape)"
        ) from e
    if published_hash is not None and (
        not isinstance(published_hash, str) or published_hash.lower() != digest
    ):
        raise MalformedMessageError(
            "hash_mismatch",
            f"publisher data_hash {excerpt(published_hash)} != content hash {digest}",
        )
    return LiveBar(
        symbol=symbol,
        ts=ts,
        dt_num=utc_to_bt_num(ts),
        values=values,
        data_hash=digest,
        message_id=message_id,
        publish_time_s=publish_time_s,
        received_s=time.time() if received_s is None else received_s,
        verified=published_hash is not None,
        token=token,
    )


def bar_fields(bar: LiveBar) -> FieldSet:
    """The extra fields of one bar and their kinds (null values count as numbers)."""
    own = (*OHLCV, OPEN_INTEREST)  # backtrader's lines, not extra fields
    numeric = tuple(k for k, v in bar.values.items() if k not in own and not isinstance(v, str))
    text = tuple(k for k, v in bar.values.items() if k not in own and isinstance(v, str))
    return FieldSet(numeric, text)
