"""The decision record: defined once, used by every sink.

:data:`DECISION_SCHEMA` is the single definition of a decision row, in BigQuery's terms (type,
mode, nested fields). :func:`bigquery_schema` turns it into ``google.cloud.bigquery.SchemaField``
objects and :func:`duckdb_ddl` into a DuckDB ``CREATE TABLE`` with the same nested shape
(``STRUCT(...)[]`` for ``REPEATED RECORD``), so the same SQL questions work on a laptop and in
BigQuery.

Records are immutable ``NamedTuple`` values built on the main thread; :func:`to_row` turns one
into a JSON-ready ``dict`` on the sink's writer thread (timestamps as ISO-8601 UTC strings).
"""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

SCHEMA_VERSION = 2  # 2: access_patterns.bar_time, tracking_gaps


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One column: BigQuery type (STRING, INT64, FLOAT64, BOOL, TIMESTAMP, RECORD), mode
    (NULLABLE, REQUIRED, REPEATED), sub-fields for RECORD, and its meaning."""

    name: str
    type: str
    mode: str = "NULLABLE"
    fields: tuple[FieldSpec, ...] = ()
    description: str = ""


F = FieldSpec

ACTION_FIELDS = (
    F("seq", "INT64", description="order of the event within the decision"),
    F(
        "event",
        "STRING",
        description="CREATED, SUBMITTED, ACCEPTED, PARTIAL, COMPLETED, "
        "CANCELED, EXPIRED, MARGIN, REJECTED",
    ),
    F("side", "STRING", description="BUY or SELL"),
    F("symbol", "STRING"),
    F("order_ref", "INT64", description="backtrader order ref (links events across decisions)"),
    F("order_type", "STRING", description="Market, Limit, Stop, StopLimit, StopTrail, ..."),
    F("size", "FLOAT64", description="ordered size, shares/units (positive)"),
    F("price", "FLOAT64", description="limit/stop price, USD (null for market)"),
    F("exec_size", "FLOAT64", description="size filled by this event, shares/units"),
    F("exec_price", "FLOAT64", description="average price of this fill, USD"),
    F("commission", "FLOAT64", description="commission of this fill, USD"),
    F("reason", "STRING", description="why rejected/canceled, when known"),
)

ACCESS_FIELDS = (
    F("seq", "INT64", description="order of the read within the decision"),
    F("field", "STRING", description="line read: close, rsi, len, sma, macd.signal, ..."),
    F("index", "INT64", description="backtrader index (0 current bar, -1 previous, >0 future)"),
    F("size", "INT64", description="bars read at once (get(size=N)); 1 for an index read"),
    F(
        "bar_index",
        "INT64",
        description="absolute position in this symbol's feed of the (newest) bar the value came "
        "from (for an indicator: the newest source bar); negative when no bar was returned",
    ),
    F("data_hash", "STRING", description="data hash of that bar (null when none)"),
    F("value", "FLOAT64", description="number returned (the newest one for windows)"),
    F("text_value", "STRING", description="text returned, for text fields"),
    F(
        "lookahead",
        "BOOL",
        description="true when that bar is not in the past of the symbol's current bar: a "
        "future index, a wrapped-around index, a feed not started yet, a forward-shifted line",
    ),
    F("bar_time", "TIMESTAMP", description="time of that bar, UTC (null when none)"),
)

DATA_ACCESS_FIELDS = (
    F("symbol", "STRING"),
    F("data_hash", "STRING", description="hash of the symbol's current bar at decision time"),
    F("fields_accessed", "STRING", "REPEATED"),
    F("access_patterns", "RECORD", "REPEATED", ACCESS_FIELDS),
)

POSITION_FIELDS = (
    F("symbol", "STRING"),
    F("size", "FLOAT64", description="shares/units, negative for short"),
    F("price", "FLOAT64", description="average entry price, USD"),
)

DECISION_SCHEMA: tuple[FieldSpec, ...] = (
    F(
        "decision_id",
        "STRING",
        "REQUIRED",
        description="<session_id>:<decision_point>; paper runs: <deployment>:<bar_time>",
    ),
    F("session_id", "STRING", "REQUIRED"),
    F("agent_id", "STRING", "REQUIRED"),
    F("mode", "STRING", "REQUIRED", description="backtest or paper"),
    F("decision_point", "INT64", "REQUIRED", description="0-based agent bar count"),
    F("ts", "TIMESTAMP", "REQUIRED", description="wall-clock time the record was made, UTC"),
    F("bar_time", "TIMESTAMP", "REQUIRED", description="time of the bar decided on, UTC"),
    F("stage", "STRING", "REQUIRED", description="PRENEXT, NEXTSTART or NEXT"),
    F("action", "STRING", "REQUIRED", description="HOLD, BUY, SELL, BUY+SELL, CANCEL"),
    F("actions", "RECORD", "REPEATED", ACTION_FIELDS),
    F("data_accessed", "RECORD", "REPEATED", DATA_ACCESS_FIELDS),
    F(
        "reads",
        "INT64",
        description="number of reads recorded (a read of an indicator over several feeds is "
        "one read, listed under each feed with the same seq)",
    ),
    F("lookahead_reads", "INT64", description="reads flagged lookahead"),
    F("portfolio_value", "FLOAT64", description="USD"),
    F("portfolio_cash", "FLOAT64", description="USD"),
    F("positions", "RECORD", "REPEATED", POSITION_FIELDS),
    F("reasoning", "STRING", description="agent note"),
    F("confidence", "FLOAT64", description="agent note"),
    F("notes", "STRING", description="other agent notes, JSON object text"),
    F("agent_class", "STRING", description="module.Class of the agent"),
    F("agent_params", "STRING", description="the agent's params, JSON object text"),
    F("agent_source_hash", "STRING", description="BLAKE2b-128 of the agent's source file"),
    F("schema_version", "INT64"),
    F(
        "tracking_gaps",
        "STRING",
        description="what FMEL could not track in this run, JSON list of sentences (null: none)",
    ),
)


class Action(NamedTuple):
    seq: int
    event: str
    side: str | None
    symbol: str | None
    order_ref: int | None
    order_type: str | None
    size: float | None
    price: float | None
    exec_size: float | None = None
    exec_price: float | None = None
    commission: float | None = None
    reason: str | None = None


class Access(NamedTuple):
    seq: int
    field: str
    index: int  # type: ignore[assignment]  # the column's name; shadows tuple.index on purpose
    size: int
    bar_index: int
    data_hash: str | None
    value: float | None
    text_value: str | None
    lookahead: bool
    bar_time: float | None = None  # POSIX seconds, UTC


class DataAccess(NamedTuple):
    symbol: str
    data_hash: str | None
    fields_accessed: tuple[str, ...]
    access_patterns: tuple[Access, ...]


class Position(NamedTuple):
    symbol: str
    size: float
    price: float


def new_session_id() -> str:
    """``20261121T051502Z-3f9a1c2e``: the UTC start time (sortable) and 32 random bits, unique
    per run (``secrets.token_hex``: two runs started in the same second collide with
    probability 2**-32)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


class RunInfo(NamedTuple):
    """What is the same for every record of a run."""

    session_id: str
    agent_id: str
    mode: str
    agent_class: str
    agent_params: str
    agent_source_hash: str | None
    tracking_gaps: str | None = None  # JSON list of sentences
    # Paper runs: decision ids are "<scope>:<bar time>" (the deployment's subscription), the
    # same for a bar decided again after a restart, so stores keep one row per bar time.
    decision_scope: str | None = None


class DecisionRecord(NamedTuple):
    """One agent bar. Immutable; built on the main thread, serialised by the sink's writer.

    Times are POSIX seconds (UTC) as floats so building a record costs no datetime objects;
    :func:`to_row` renders them as ISO-8601 UTC. ``bar_time`` has millisecond resolution
    (backtrader keeps bar times as float day numbers, good to ~15 microseconds).
    """

    run: RunInfo
    decision_point: int
    ts: float
    bar_time: float
    stage: str
    action: str
    actions: tuple[Action, ...]
    data_accessed: tuple[DataAccess, ...]
    reads: int
    lookahead_reads: int
    portfolio_value: float | None
    portfolio_cash: float | None
    positions: tuple[Position, ...]
    reasoning: str | None
    confidence: float | None
    notes: str | None

    @property
    def decision_id(self) -> str:
        """``<session_id>:<decision_point>``; with a ``decision_scope`` (paper runs)
        ``<scope>:<bar time ISO-8601 UTC>``, stable across restarts (the STOP record, order
        events after the last bar, adds ``:STOP``: it shares that bar's time)."""
        scope = self.run.decision_scope
        if scope:
            suffix = ":STOP" if self.stage == "STOP" else ""
            return f"{scope}:{_ts(self.bar_time)}{suffix}"
        return f"{self.run.session_id}:{self.decision_point}"


def _ts(posix_s: float) -> str:
    """POSIX seconds -> ISO-8601 UTC text (``...Z``). Floats go through a bounded cache: a
    read-heavy record's reads name the same bar times record after record (a 30-bar window
    moves one bar a step), and this conversion was ~45 % of :func:`to_row` for them (a spill
    of 5,031 read-heavy records at a stop, cProfile). Other types are converted each time, so
    they convert, or fail, exactly as ``datetime.fromtimestamp`` makes them."""
    if type(posix_s) is float:
        return _ts_of_float(posix_s)
    return _iso_utc(posix_s)


def _iso_utc(posix_s: float) -> str:
    dt = datetime.fromtimestamp(posix_s, UTC)
    return dt.isoformat().replace("+00:00", "Z")


# keyed by the float itself: equal floats (0.0 and -0.0 too) give the same text; a NaN, which
# equals nothing, is never found and raises each time, as uncached
_ts_of_float = functools.lru_cache(maxsize=1 << 16)(_iso_utc)


def utc_datetime(posix_s: float) -> datetime:
    """POSIX seconds -> aware UTC datetime."""
    return datetime.fromtimestamp(posix_s, UTC)


def _num(x: float | None) -> float | None:
    # JSON has no NaN/inf; BigQuery and DuckDB both take null.
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return x


def action_rows(actions: tuple[Action, ...]) -> list[dict[str, Any]]:
    """The ``actions`` column of :func:`to_row`."""
    return [
        {
            "seq": a.seq,
            "event": a.event,
            "side": a.side,
            "symbol": a.symbol,
            "order_ref": a.order_ref,
            "order_type": a.order_type,
            "size": _num(a.size),
            "price": _num(a.price),
            "exec_size": _num(a.exec_size),
            "exec_price": _num(a.exec_price),
            "commission": _num(a.commission),
            "reason": a.reason,
        }
        for a in actions
    ]


def accessed_rows(
    data_accessed: tuple[DataAccess, ...], time: Callable[[float], Any] = _ts
) -> list[dict[str, Any]]:
    """The ``data_accessed`` column of :func:`to_row`; bar times through ``time`` (default:
    ISO-8601 UTC text)."""
    return [
        {
            "symbol": d.symbol,
            "data_hash": d.data_hash,
            "fields_accessed": list(d.fields_accessed),
            "access_patterns": [
                {
                    "seq": p.seq,
                    "field": p.field,
                    "index": p.index,
                    "size": p.size,
                    "bar_index": p.bar_index,
                    "data_hash": p.data_hash,
                    "value": _num(p.value),
                    "text_value": p.text_value,
                    "lookahead": p.lookahead,
                    "bar_time": None if p.bar_time is None else time(p.bar_time),
                }
                for p in d.access_patterns
            ],
        }
        for d in data_accessed
    ]


def position_rows(positions: tuple[Position, ...]) -> list[dict[str, Any]]:
    """The ``positions`` column of :func:`to_row`."""
    return [{"symbol": p.symbol, "size": p.size, "price": _num(p.price)} for p in positions]


def to_row(rec: DecisionRecord) -> dict[str, Any]:
    """A JSON-ready row (``insert_rows_json`` shape) for one record."""
    run = rec.run
    return {
        "decision_id": rec.decision_id,
        "session_id": run.session_id,
        "agent_id": run.agent_id,
        "mode": run.mode,
        "decision_point": rec.decision_point,
        "ts": _ts(rec.ts),
        "bar_time": _ts(rec.bar_time),
        "stage": rec.stage,
        "action": rec.action,
        "actions": action_rows(rec.actions),
        "data_accessed": accessed_rows(rec.data_accessed),
        "reads": rec.reads,
        "lookahead_reads": rec.lookahead_reads,
        "portfolio_value": _num(rec.portfolio_value),
        "portfolio_cash": _num(rec.portfolio_cash),
        "positions": position_rows(rec.positions),
        "reasoning": rec.reasoning,
        "confidence": _num(rec.confidence),
        "notes": rec.notes,
        "agent_class": run.agent_class,
        "agent_params": run.agent_params,
        "agent_source_hash": run.agent_source_hash,
        "schema_version": SCHEMA_VERSION,
        "tracking_gaps": run.tracking_gaps,
    }


_str = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_INF = float("inf")


def _js(x: str | None) -> str:
    return "null" if x is None else _str(x)


def _jf(x: float | None) -> str:
    if x is None or x != x or x == _INF or x == -_INF:
        return "null"
    return repr(float(x))


def _ji(x: int | None) -> str:
    return "null" if x is None else str(int(x))


def row_json(rec: DecisionRecord) -> str:
    """:func:`to_row` as compact JSON text, written directly (about 4x faster than building the
    dict and dumping it; this runs once per decision on the writer thread). Equal to
    ``json.dumps(to_row(rec))`` once parsed (checked by the tests)."""
    run = rec.run
    parts = [
        '{"decision_id":',
        _str(rec.decision_id),
        ',"session_id":',
        _str(run.session_id),
        ',"agent_id":',
        _str(run.agent_id),
        ',"mode":',
        _str(run.mode),
        ',"decision_point":',
        str(rec.decision_point),
        ',"ts":"',
        _ts(rec.ts),
        '","bar_time":"',
        _ts(rec.bar_time),
        '","stage":"',
        rec.stage,
        '","action":"',
        rec.action,
        '","actions":[',
    ]
    parts.append(
        ",".join(
            f'{{"seq":{a.seq},"event":{_js(a.event)},"side":{_js(a.side)},'
            f'"symbol":{_js(a.symbol)},"order_ref":{_ji(a.order_ref)},'
            f'"order_type":{_js(a.order_type)},"size":{_jf(a.size)},"price":{_jf(a.price)},'
            f'"exec_size":{_jf(a.exec_size)},"exec_price":{_jf(a.exec_price)},'
            f'"commission":{_jf(a.commission)},"reason":{_js(a.reason)}}}'
            for a in rec.actions
        )
    )
    parts.append('],"data_accessed":[')
    parts.append(
        ",".join(
            f'{{"symbol":{_str(d.symbol)},"data_hash":{_js(d.data_hash)},'
            f'"fields_accessed":[{",".join(_str(f) for f in d.fields_accessed)}],'
            '"access_patterns":['
            + ",".join(
                f'{{"seq":{p.seq},"field":{_str(p.field)},"index":{p.index},"size":{p.size},'
                f'"bar_index":{p.bar_index},"data_hash":{_js(p.data_hash)},'
                f'"value":{_jf(p.value)},"text_value":{_js(p.text_value)},'
                f'"lookahead":{"true" if p.lookahead else "false"},'
                f'"bar_time":{"null" if p.bar_time is None else _str(_ts(p.bar_time))}}}'
                for p in d.access_patterns
            )
            + "]}"
            for d in rec.data_accessed
        )
    )
    parts += [
        '],"reads":',
        str(rec.reads),
        ',"lookahead_reads":',
        str(rec.lookahead_reads),
        ',"portfolio_value":',
        _jf(rec.portfolio_value),
        ',"portfolio_cash":',
        _jf(rec.portfolio_cash),
        ',"positions":[',
        ",".join(
            f'{{"symbol":{_str(q.symbol)},"size":{_jf(q.size)},"price":{_jf(q.price)}}}'
            for q in rec.positions
        ),
        '],"reasoning":',
        _js(rec.reasoning),
        ',"confidence":',
        _jf(rec.confidence),
        ',"notes":',
        _js(rec.notes),
        ',"agent_class":',
        _str(run.agent_class),
        ',"agent_params":',
        _str(run.agent_params),
        ',"agent_source_hash":',
        _js(run.agent_source_hash),
        ',"schema_version":',
        str(SCHEMA_VERSION),
        ',"tracking_gaps":',
        _js(run.tracking_gaps),
        "}",
    ]
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Schema translations
# ---------------------------------------------------------------------------------------------

_DUCK_TYPES = {
    "STRING": "VARCHAR",
    "INT64": "BIGINT",
    "FLOAT64": "DOUBLE",
    "BOOL": "BOOLEAN",
    "TIMESTAMP": "TIMESTAMPTZ",
}


def _duck_type(spec: FieldSpec) -> str:
    if spec.type == "RECORD":
        inner = ", ".join(f'"{f.name}" {_duck_type(f)}' for f in spec.fields)
        base = f"STRUCT({inner})"
    else:
        base = _DUCK_TYPES[spec.type]
    return f"{base}[]" if spec.mode == "REPEATED" else base


def duckdb_columns(schema: tuple[FieldSpec, ...] = DECISION_SCHEMA) -> list[tuple[str, str]]:
    """``[(column, duckdb_type), ...]`` in schema order."""
    return [(f.name, _duck_type(f)) for f in schema]


def duckdb_ddl(table: str = "decisions", schema: tuple[FieldSpec, ...] = DECISION_SCHEMA) -> str:
    """``CREATE TABLE IF NOT EXISTS`` for DuckDB with the nested schema."""
    cols = ",\n  ".join(
        f'"{name}" {typ}' + (" NOT NULL" if spec.mode == "REQUIRED" else "")
        for (name, typ), spec in zip(duckdb_columns(schema), schema, strict=True)
    )
    return f'CREATE TABLE IF NOT EXISTS "{table}" (\n  {cols}\n)'


def duckdb_struct_type(schema: tuple[FieldSpec, ...] = DECISION_SCHEMA) -> str:
    """The whole row as one DuckDB STRUCT type (used to cast JSON rows in one statement)."""
    inner = ", ".join(f'"{name}" {typ}' for name, typ in duckdb_columns(schema))
    return f"STRUCT({inner})"


def bigquery_schema(schema: tuple[FieldSpec, ...] = DECISION_SCHEMA) -> list[Any]:
    """``google.cloud.bigquery.SchemaField`` list (imported lazily: backtests need no GCP)."""
    from google.cloud import bigquery

    def conv(spec: FieldSpec) -> Any:
        return bigquery.SchemaField(
            spec.name,
            spec.type,
            mode=spec.mode,
            description=spec.description,
            fields=[conv(f) for f in spec.fields],
        )

    return [conv(f) for f in schema]
