"""Rows on their way to BigQuery: validation with BigQuery's rules, sizes, request chunks.

:func:`validate_row` checks one JSON row against the table's schema (BigQuery's type rules for
JSON rows, "Streaming data into BigQuery" / "Loading JSON data": INT64 as a JSON number or a
decimal string; TIMESTAMP as a date-time string or epoch seconds, of which this sink sends and
accepts only the former), so a refused row is named with its field path
(``actions[0].size``) before anything is sent. :func:`compact_row` leaves out what BigQuery
reads as absent anyway (null values), and :func:`chunks` splits what is left into
requests sized by bytes under the streaming API's limits ("Quotas and limits", streaming
inserts: HTTP request size 10 MB, at most 50,000 rows per request).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from analyzers.schema import FieldSpec
from analyzers.sinks.base import Row

# Streaming API limits ("Quotas and limits", streaming inserts: HTTP request size 10 MB, maximum
# rows per request 50,000). The request envelope ({"rows": [{"insertId": ..., "json": ...}]})
# adds a few dozen bytes per row; keep a margin under the 10 MB hard limit. Requests are sized
# by bytes: the row cap only bounds a request of very small rows.
MAX_REQUEST_BYTES = 9_000_000
MAX_ROWS_PER_REQUEST = 50_000
# A write is split into at least this many bytes per request when it is spread over several
# requests in flight (smaller requests cost more per row than they gain in parallelism).
MIN_SPLIT_BYTES = 1_000_000
# What an insertAll body holds besides its rows (request_body): '{"rows":[' and
# '],"skipInvalidRows":false}', 35 bytes; the rest is margin. Requests are packed so that their
# rows' sizes add up to at most the byte budget minus this.
REQUEST_ENVELOPE_BYTES = 128

# ASCII digits only: ``\d`` also matches other scripts' digits (helper-112: "١٢" passed)
_INT_RE = re.compile(r"[+-]?[0-9]+")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Pending = tuple[int, Row, int, bytes]
"""A row to send: its position in the caller's batch, the row, the bytes it adds to a request
(:func:`entry_size`) and its encoded entry (:func:`encode_entry`)."""


def compact_row(value: Any) -> Any:
    """``value`` without its null members, recursively (nested objects are copied as dicts,
    lists and tuples as lists; scalars are shared).

    A NULLABLE field absent from a streamed JSON row is stored as NULL, as when it is sent as
    ``null`` (only a REQUIRED one must be present: "Missing required field"), so the stored row
    is the same; checked on the emulator by the tests. A read-heavy decision record has a null
    ``text_value`` in each of its reads: that alone is about a tenth of its size.
    """
    # Exact types first (set lookups), isinstance only for others: Mapping is an ABC, and its
    # check for every value was half of the sink's Python per row (docs/benchmarks.md,
    # thirty-second pass). Same result for every value (a subclass takes the isinstance path).
    kind = type(value)
    if kind is dict or (kind is not list and isinstance(value, Mapping)):
        return {
            k: v if type(v) in _SCALARS else compact_row(v) if _nested(v) else v
            for k, v in value.items()
            if v is not None
        }
    if kind is list or isinstance(value, list | tuple):
        # a tuple too (JSON writes it as an array): helper-112, a mapping that is not a dict
        # inside a tuple was left for the encoder, which refused the row naming no field
        return [v if type(v) in _SCALARS else compact_row(v) if _nested(v) else v for v in value]
    return value


_SCALARS = frozenset({str, int, float, bool})


def _nested(v: Any) -> bool:
    return type(v) in _CONTAINERS or isinstance(v, Mapping | list | tuple)


_CONTAINERS = frozenset({dict, list, tuple})


def split_bytes(total_bytes: int, in_flight: int, max_bytes: int, largest: int = 0) -> int:
    """Bytes per request for a write of ``total_bytes`` spread over up to ``in_flight``
    concurrent requests: an even share (at least :data:`MIN_SPLIT_BYTES`) plus ``largest`` (the
    largest row), so that packing rows in order never leaves a small last request; at most
    ``max_bytes``."""
    requests = max(-(-total_bytes // max_bytes), min(in_flight, total_bytes // MIN_SPLIT_BYTES))
    share = -(-total_bytes // max(1, requests))
    return max(1, min(max_bytes, share + largest))


def encode_entry(row: Row) -> bytes:
    """The element of an insertAll request's ``rows`` list for ``row``:
    ``{"json": row, "insertId": decision_id}`` as compact JSON, the shape
    ``Client.insert_rows_json`` (google-cloud-bigquery) builds ("Method: tabledata.insertAll",
    request body: ``rows[].insertId``, ``rows[].json``). Encoded once, here: its length sizes
    the request and the bytes are its body (:func:`request_body`).

    The same JSON as ``json.dumps(..., allow_nan=False)`` once parsed, or the same refusal.
    orjson encodes it (about 12x faster for a read-heavy row, on the writer thread where it
    holds the GIL; docs/benchmarks.md, thirty-third pass), with subclasses, datetimes and
    dataclasses passed to ``json.dumps`` instead of converted. orjson writes NaN and infinities
    as ``null`` where ``json.dumps`` refuses them, so a ``null`` anywhere in its output (after
    :func:`compact_row` there is none, but for such a float, a null in a list, or the word in
    a text) takes ``json.dumps`` instead (helper-112: NaN in a read's index went as null).
    Left to orjson's own conversion: a plain ``enum.Enum`` or ``uuid.UUID`` value in a column
    this sink does not check (a record's reads; :func:`validate_row` refuses them elsewhere).

    Raises:
        ValueError: a NaN or infinity (the message names its path in the row) or a circular
            structure.
        TypeError: a value JSON has no form for.
    """
    info = {"json": row, "insertId": str(row.get("decision_id"))}
    try:
        entry = orjson.dumps(info, option=_ORJSON_OPTIONS)
        if b"null" not in entry or not _has_null_token(entry):
            return entry
    except orjson.JSONEncodeError:
        pass
    try:
        return json.dumps(info, allow_nan=False, separators=(",", ":")).encode()
    except ValueError as e:
        found = _non_finite(row, "")
        if found is None:
            raise
        raise ValueError(
            f"{found[0]}: {found[1]!r} has no JSON form (JSON has no NaN or infinity)"
        ) from e


_ORJSON_OPTIONS = (
    orjson.OPT_PASSTHROUGH_SUBCLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
)


def _has_null_token(entry: bytes) -> bool:
    """Whether orjson's compact output has a ``null`` outside its strings (``"null"`` inside a
    text, as in an agent's parameters written as JSON, is not one: helper-113 found every row of
    such an agent on the slow path, 12 -> 85 us a row)."""
    return any(m.group(1) for m in _STRING_OR_NULL.finditer(entry))


# A JSON string (escapes included; orjson writes no raw control characters) or a bare null
_STRING_OR_NULL = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|(null)')


def _non_finite(value: Any, path: str) -> tuple[str, float] | None:
    """The path (``data_accessed[0].access_patterns[2].index``) and value of the first NaN or
    infinity in ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, value)
    if isinstance(value, Mapping):
        for k, v in value.items():
            found = _non_finite(v, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def entry_size(entry: bytes) -> int:
    """Bytes ``entry`` (:func:`encode_entry`) adds to a request body: itself and the comma
    before the next one. Add :data:`REQUEST_ENVELOPE_BYTES` once per request."""
    return len(entry) + 1


def request_body(entries: Sequence[bytes]) -> bytes:
    """An insertAll request body of ``entries`` (:func:`encode_entry`), as
    ``insert_rows_json(..., skip_invalid_rows=False)`` sends it: a request with an invalid row
    stores none of its rows and answers the others ``stopped`` ("Method: tabledata.insertAll",
    ``skipInvalidRows``)."""
    return b'{"rows":[' + b",".join(entries) + b'],"skipInvalidRows":false}'


def chunks(pending: Iterable[Pending], max_bytes: int, max_rows: int) -> Iterable[list[Pending]]:
    """Consecutive requests of at most ``max_rows`` rows and ``max_bytes`` bytes (a single
    row larger than ``max_bytes`` goes alone; callers reject those first)."""
    chunk: list[Pending] = []
    size = 0
    for item in pending:
        if chunk and (size + item[2] > max_bytes or len(chunk) >= max_rows):
            yield chunk
            chunk, size = [], 0
        chunk.append(item)
        size += item[2]
    if chunk:
        yield chunk


def _type_problem(value: Any, spec: FieldSpec) -> str | None:
    """Why ``value`` is not a valid JSON value for a scalar column (None when it is)."""
    t = spec.type
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or infinity (json.dumps with allow_nan=False refuses them; orjson
        # would write null, a silent change). to_row writes them as null; a row given as such
        # is refused here, named.
        return f"expected {t}, got {value!r} (JSON has no NaN or infinity)"
    if t == "STRING":
        ok = isinstance(value, str) or (
            isinstance(value, int | float) and not isinstance(value, bool)
        )
    elif t == "INT64":
        if isinstance(value, bool):
            ok = False
        elif isinstance(value, int):
            ok = _INT64_MIN <= value <= _INT64_MAX
        elif isinstance(value, float):
            ok = value.is_integer() and _INT64_MIN <= value <= _INT64_MAX
        else:
            text = value.strip() if isinstance(value, str) else ""
            ok = bool(_INT_RE.fullmatch(text)) and _INT64_MIN <= int(text) <= _INT64_MAX
    elif t == "FLOAT64":
        if isinstance(value, bool):
            ok = False
        elif isinstance(value, int | float):
            ok = True
        elif isinstance(value, str):
            # ASCII without "_": Python's float() also reads "1_000" and other scripts' digits
            # (helper-112); "NaN" and "Infinity" as text are BigQuery's own spelling, kept
            try:
                float(value)
                ok = value.isascii() and "_" not in value
            except ValueError:
                ok = False
        else:
            ok = False
    elif t == "BOOL":
        ok = isinstance(value, bool) or (
            isinstance(value, str) and value.lower() in ("true", "false")
        )
    elif t == "TIMESTAMP":
        # Strings only: BigQuery also takes epoch seconds as a number, but the emulator reads a
        # number as microseconds and stores a wrong time without an error; rows made by
        # ``to_row`` always carry ISO-8601 text.
        try:
            timestamp_from_text(value)
            ok = True
        except (ValueError, TypeError):
            ok = False
    else:  # a type this sink never writes: let BigQuery judge
        ok = True
    if ok:
        return None
    return f"expected {t}, got {type(value).__name__} {_short(value)}"


def timestamp_from_text(text: Any) -> datetime:
    """A TIMESTAMP column's text as an aware UTC datetime, in BigQuery's canonical form
    (``YYYY-[M]M-[D]D[( |T)[H]H:[M]M[:[S]S[.F]]][time zone]``, "Timestamp type", GoogleSQL
    data types): up to six fraction digits, and a zone of ``Z``, `` UTC`` or
    ``(+|-)H[H][:M[M]]`` (hours to 23, minutes to 59), or none (UTC). The one reading of
    such text in this sink: the check (:func:`validate_row`), the compact rows' bar times and
    the look-up of unsure rows (helper-112: ``... UTC`` or no zone, taken by the check, raised
    in the other two).
    Python's ``fromisoformat`` reads more (week dates, any separator, seconds in offsets,
    ``...Z UTC`` once `` UTC`` was cut: helper-113), which BigQuery refuses or reads otherwise:
    refused here.

    Raises:
        TypeError: not text.
        ValueError: not such a time, or out of range once converted to UTC.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected TIMESTAMP text, got {type(text).__name__}")
    m = _TIMESTAMP_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not a BigQuery TIMESTAMP: {_short(text)}")
    year, month, day, hour, minute, second, fraction, zone = m.groups()
    try:
        dt = datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "").ljust(6, "0")),
            tzinfo=UTC,
        )
        if zone and zone not in ("Z", " UTC"):
            hours, _, minutes = zone[1:].partition(":")
            if int(hours) > 23 or int(minutes or 0) > 59:  # helper-114: +05:75 read as 6:15
                raise ValueError(f"time zone offset out of range: {zone}")
            offset = timedelta(hours=int(hours), minutes=int(minutes or 0))
            dt -= -offset if zone[0] == "-" else offset
    except OverflowError as e:
        raise ValueError(f"out of range: {_short(text)}") from e
    return dt


_TIMESTAMP_RE = re.compile(
    r"([0-9]{4})-([0-9]{1,2})-([0-9]{1,2})"
    r"(?:[T ]([0-9]{1,2}):([0-9]{1,2})(?::([0-9]{1,2})(?:\.([0-9]{1,6}))?)?)?"
    r"(Z| UTC|[+-][0-9]{1,2}(?::[0-9]{1,2})?)?"
)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_row(
    row: Mapping[str, Any], schema: Sequence[FieldSpec], prefix: str = ""
) -> list[str]:
    """Check one JSON row against a schema with BigQuery's rules.

    Returns:
        Problems as ``"<field path>: <reason>"`` (``actions[2].size: expected FLOAT64, got str
        'abc'``); empty when the row is valid. Unknown fields, missing REQUIRED fields, wrong
        scalar types and out-of-range INT64 values are reported.
    """
    problems: list[str] = []
    known = {f.name: f for f in schema}
    for key in row:
        if key not in known:
            problems.append(f"{prefix}{key}: no such field in the table")
    for spec in schema:
        path = prefix + spec.name
        value = row.get(spec.name)
        if value is None:
            if spec.mode == "REQUIRED":
                problems.append(f"{path}: REQUIRED field is missing or null")
            continue
        if spec.mode == "REPEATED":
            if not isinstance(value, list | tuple):
                problems.append(f"{path}: expected a list (REPEATED), got {type(value).__name__}")
                continue
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(path, value)]
        for item_path, item in items:
            if item is None:
                if spec.mode == "REPEATED":
                    problems.append(f"{item_path}: null element in a REPEATED field")
                continue
            if spec.type == "RECORD":
                if type(item) is not dict and not isinstance(item, Mapping):
                    problems.append(
                        f"{item_path}: expected an object (RECORD), got {type(item).__name__}"
                    )
                else:
                    problems += validate_row(item, spec.fields, item_path + ".")
            else:
                why = _type_problem(item, spec)
                if why:
                    problems.append(f"{item_path}: {why}")
    return problems
