"""Decision records as one Arrow table per write: the local store's fast path.

:func:`records_table` turns a batch of records into a ``pyarrow.Table`` with the columns and
nested types of :data:`~analyzers.schema.DECISION_SCHEMA` (``REPEATED RECORD`` as a list of
structs, ``TIMESTAMP`` as microseconds UTC), which DuckDB scans without Python per row and
without the GIL. The reads of deferred bars (:mod:`analyzers.deferred`) are resolved here for the
whole batch at once (:func:`~analyzers.deferred.settle_batch`) and go into the nested
``data_accessed`` column as flat arrays with list offsets; Python runs per record and per
distinct bar, not per read. Records resolved otherwise (live runs, strict mode, a record
something read first) are converted from their tuples.

The rows equal :func:`~analyzers.schema.to_row` of the same records once stored (NaN and
infinities as null, timestamps rounded as ``to_row`` rounds them); ``tests/unit/
test_fmel_columns.py`` stores the idiom corpus both ways and compares.

Thread context: the decision writer's thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from analyzers.deferred import PendingReads, settle_batch
from analyzers.schema import (
    DATA_ACCESS_FIELDS,
    DECISION_SCHEMA,
    SCHEMA_VERSION,
    Action,
    DecisionRecord,
    FieldSpec,
    Position,
    _num,
    accessed_rows,
    action_rows,
    position_rows,
)
from analyzers.tracking.columns import Columns, posix_us, posix_us_array

_ARROW_TYPES: dict[str, pa.DataType] = {
    "STRING": pa.string(),
    "INT64": pa.int64(),
    "FLOAT64": pa.float64(),
    "BOOL": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}


POOL: pa.MemoryPool = pa.system_memory_pool()
"""The memory pool of every Arrow buffer this module allocates: the C library's ``malloc``,
not pyarrow's default (mimalloc in the Linux wheels). The decision writer builds its tables on
its own thread beside the bar loop, and there pyarrow's default took about twice the writer
thread's CPU for the same table: SMA-cross 52-62 ms a run against 28-32 ms, read-heavy 81-125
against 50-55 ms (thread CPU of :func:`records_table` in the benchmark's run;
docs/benchmarks.md, thirty-fifth pass), which the bar loop waits for while the writer holds
the GIL. Passed to each call rather than set as pyarrow's default: the process's other Arrow
users keep theirs. ``tests/unit/test_fmel_columns.py`` checks nothing here allocates from the
default pool."""


def _array(obj: Any, typ: pa.DataType | None = None, mask: Any = None) -> pa.Array:
    """``pa.array`` from :data:`POOL`."""
    return pa.array(obj, typ, mask=mask, memory_pool=POOL)


def _take(values: pa.Array, indices: pa.Array) -> pa.Array:
    """``pyarrow.compute.take`` into :data:`POOL`."""
    return pc.take(values, indices, memory_pool=POOL)


def arrow_type(spec: FieldSpec) -> pa.DataType:
    """The Arrow type of one column of the schema (``REPEATED`` -> list, ``RECORD`` -> struct)."""
    if spec.type == "RECORD":
        base: pa.DataType = pa.struct([pa.field(f.name, arrow_type(f)) for f in spec.fields])
    else:
        base = _ARROW_TYPES[spec.type]
    return pa.list_(base) if spec.mode == "REPEATED" else base


ARROW_SCHEMA = pa.schema([pa.field(f.name, arrow_type(f)) for f in DECISION_SCHEMA])
_DATA_ACCESSED_T = ARROW_SCHEMA.field("data_accessed").type
_DATA_ACCESS_T = _DATA_ACCESSED_T.value_type
_FIELDS_T = _DATA_ACCESS_T.field("fields_accessed").type
_PATTERNS_T = _DATA_ACCESS_T.field("access_patterns").type
_ACCESS_T = _PATTERNS_T.value_type
_TS_T = _ARROW_TYPES["TIMESTAMP"]
_POSITIONS_T = ARROW_SCHEMA.field("positions").type
_ACTIONS_T = ARROW_SCHEMA.field("actions").type
_ACTION_T = _ACTIONS_T.value_type
_N_ACTION = len(Action._fields)
assert [f.name for f in _ACTION_T] == list(Action._fields)
# the numbers of an event, converted by _num (NaN and infinities stored as null)
_ACTION_NUMBERS = frozenset(("size", "price", "exec_size", "exec_price", "commission"))
assert [f.name for f in DATA_ACCESS_FIELDS] == [f.name for f in _DATA_ACCESS_T]


def _list_array(offsets: Any, values: pa.Array, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32(), memory_pool=POOL), values, type=typ, pool=POOL
    )


def _columns_array(cols: Columns) -> pa.Array:
    """``data_accessed`` of every bar of ``cols`` (one list entry per bar in ``cols.done``)."""
    n = len(cols.seq)
    value = cols.value
    hash_code = cols.hash_code
    hashes = _array(cols.hashes, pa.string())
    names = _array(cols.field_names, pa.string())
    access = pa.StructArray.from_arrays(
        [
            _array(cols.seq, pa.int64()),
            _take(names, _array(cols.field_code)),
            _array(cols.index, pa.int64()),
            _array(np.ones(n, dtype=np.int64)),
            _array(cols.bar_index, pa.int64()),
            _take(hashes, _array(hash_code, mask=hash_code < 0)),
            _array(value, pa.float64(), mask=~np.isfinite(value)),
            pa.nulls(n, pa.string(), memory_pool=POOL),
            _array(np.zeros(n, dtype=bool)),
            _array(cols.bar_time_us, _TS_T),
        ],
        fields=list(_ACCESS_T),
        memory_pool=POOL,
    )
    digest = cols.digest_code
    group = pa.StructArray.from_arrays(
        [
            _take(_array(cols.symbols, pa.string()), _array(cols.symbol_code)),
            _take(hashes, _array(digest, mask=digest < 0)),
            _list_array(cols.fields_offsets, _take(names, _array(cols.fields)), _FIELDS_T),
            _list_array(cols.access_offsets, access, _PATTERNS_T),
        ],
        fields=list(_DATA_ACCESS_T),
        memory_pool=POOL,
    )
    return _list_array(cols.group_offsets, group, _DATA_ACCESSED_T)


def _positions(positions: Sequence[tuple[Position, ...]]) -> pa.Array:
    """The ``positions`` column. Records of bars without a fill share one tuple object (the
    analyzer keeps it until the next order event): each distinct object is converted once,
    found by its ``id`` with numpy (no Python per record)."""
    ids = np.fromiter(map(id, positions), dtype=np.uint64, count=len(positions))
    _, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    uniq = [positions[i] for i in first.tolist()]  # (in the order of their ids)
    rows = _array([position_rows(p) if p else [] for p in uniq], _POSITIONS_T)
    return _take(rows, _array(inverse.reshape(-1)))


def _actions(actions: Sequence[tuple[Action, ...]]) -> pa.Array:
    """The ``actions`` column. Most bars have no order event: the empty ones are list offsets
    that do not move, and the events are converted field by field (no dict per event), the
    numbers through :func:`~analyzers.schema._num` as :func:`~analyzers.schema.action_rows`
    converts them. Only for tuples of :class:`~analyzers.schema.Action`; anything else, and any
    batch this refuses, is converted per record as before (so a refusal raises what that
    raises: helper-96 found other exception types when converting by field)."""

    def per_record() -> pa.Array:
        return _array([action_rows(a) if a else [] for a in actions], _ACTIONS_T)

    if set(map(type, actions)) - {tuple}:
        return per_record()
    events = [e for a in actions for e in a]
    if set(map(type, events)) - {Action} or set(map(len, events)) - {_N_ACTION}:
        return per_record()
    try:
        offsets = np.zeros(len(actions) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, actions), np.int64, len(actions)), out=offsets[1:])
        columns = list(zip(*events, strict=True)) or [()] * _N_ACTION
        arrays = [
            (_numbers(col) if name in _ACTION_NUMBERS else _array(col, f.type))
            for name, col, f in zip(Action._fields, columns, _ACTION_T, strict=True)
        ]
        values = pa.StructArray.from_arrays(arrays, fields=list(_ACTION_T), memory_pool=POOL)
    except Exception:  # noqa: BLE001 - refused: as the per-record conversion refuses it
        return per_record()
    return _list_array(offsets, values, _ACTIONS_T)


def _numbers(values: Sequence[Any]) -> pa.Array:
    """A FLOAT64 column converted as :func:`~analyzers.schema._num` converts each value: floats
    and None at once with numpy (:func:`_floats`); anything else (ints, numpy scalars,
    ``Decimal``) value by value, so it converts or fails as it did."""
    if set(map(type, values)) <= _FLOAT_OR_NONE:
        return _floats(values)
    return _array([_num(x) for x in values], pa.float64())


_FLOAT_OR_NONE = frozenset((float, type(None)))


def _floats(values: Sequence[float | None]) -> pa.Array:
    """FLOAT64 column; None, NaN and infinities as null (JSON has no NaN: as ``to_row``)."""
    arr = np.array(values, dtype=np.float64)  # None -> NaN
    return _array(arr, pa.float64(), mask=~np.isfinite(arr))


def _data_accessed(records: Sequence[DecisionRecord], accessed: Sequence[Any]) -> pa.ChunkedArray:
    """The ``data_accessed`` column: slices of each batch's columns where the reads were
    resolved in columns, records converted from their tuples in between; in record order.
    ``accessed``: each record's own ``data_accessed`` element (its tuple's, not the
    attribute): a settled :class:`~analyzers.deferred.PendingReads` or the resolved tuple.

    The pieces are kept as the chunks of one ``ChunkedArray`` (DuckDB scans them in turn),
    not concatenated: ``pa.concat_arrays`` of sliced nested lists copies them element by
    element (46 ms for a read-heavy batch of 2,048 records in five pieces, against 3 ms for
    the same arrays unsliced; docs/benchmarks.md, fourteenth pass)."""
    pieces: list[pa.Array] = []
    built: dict[int, pa.Array] = {}
    run_cols: Columns | None = None
    run_lo = run_hi = 0
    run_rows: list[list[dict[str, Any]]] = []

    def flush() -> None:
        nonlocal run_cols
        if run_cols is not None:
            whole = built.get(id(run_cols))
            if whole is None:
                whole = built[id(run_cols)] = _columns_array(run_cols)
            if run_lo or run_hi < len(whole):
                whole = whole.slice(run_lo, run_hi - run_lo)
            pieces.append(whole)
            run_cols = None
        if run_rows:
            pieces.append(_array(run_rows, _DATA_ACCESSED_T))
            run_rows.clear()

    for rec, raw in zip(records, accessed, strict=True):
        at = raw.columns() if type(raw) is PendingReads else None
        if at is not None:
            c, b = at
            if run_cols is c and b == run_hi:
                run_hi += 1
                continue
            flush()
            run_cols, run_lo, run_hi = c, b, b + 1
        else:
            if run_cols is not None:
                flush()
            run_rows.append(accessed_rows(rec.data_accessed, posix_us))
    flush()
    if not pieces:
        pieces.append(_array([[] for _ in records], _DATA_ACCESSED_T))
    return pa.chunked_array(pieces, _DATA_ACCESSED_T)


def records_table(records: Sequence[DecisionRecord]) -> pa.Table:
    """One Arrow table (schema :data:`ARROW_SCHEMA`) with a row per record, in order.

    Resolves the batch's deferred reads first (:func:`~analyzers.deferred.settle_batch`);
    builds every column at once: Python per record only to find each record's reads among
    the batch's columns and its look-ahead count; per order event and per distinct positions
    tuple (the decision ids joined in Arrow).
    """
    if not records:
        return pa.Table.from_arrays([_array([], f.type) for f in ARROW_SCHEMA], schema=ARROW_SCHEMA)
    # the tuples' own elements (a DeferredRecord's data_accessed and lookahead_reads elements
    # are its PendingReads: read here without the attributes, which resolve one at a time)
    (runs, dps, tss, bar_times, stages, action, actions, accessed, reads, lookaheads, pvs, cashes,
     positions, reasonings, confidences, notes) = zip(*records, strict=True)  # fmt: skip
    settle_batch([p for p in accessed if type(p) is PendingReads])
    string, int64 = pa.string(), pa.int64()
    n = len(records)
    run0 = runs[0]
    one_run = runs.count(run0) == n  # the usual batch: one session's records

    def per_run(name: str) -> pa.Array:
        if one_run:  # one value: repeated in C, not converted n times
            return pa.repeat(
                pa.scalar(getattr(run0, name), string, memory_pool=POOL), n, memory_pool=POOL
            )
        return _array([getattr(run, name) for run in runs], string)

    decision_id: pa.Array | None = None
    if any(run.decision_scope for run in ((run0,) if one_run else runs)):
        decision_id = _array([r.decision_id for r in records], string)
    elif one_run:  # <session_id>:<decision_point>
        if set(map(type, dps)) == {int}:  # joined in Arrow: str() of an int is its cast
            with contextlib.suppress(pa.ArrowException, OverflowError):
                decision_id = pc.binary_join_element_wise(
                    pa.scalar(f"{run0.session_id}:", string, memory_pool=POOL),
                    pc.cast(_array(dps, int64), string, memory_pool=POOL),
                    pa.scalar("", string, memory_pool=POOL), memory_pool=POOL,
                )  # fmt: skip
        if decision_id is None:  # (a number past int64: its text, as before)
            decision_id = _array([f"{run0.session_id}:{dp}" for dp in dps], string)
    else:
        decision_id = _array([f"{run.session_id}:{dp}" for run, dp in zip(runs, dps)], string)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "decision_id": decision_id,
        "session_id": per_run("session_id"),
        "agent_id": per_run("agent_id"),
        "mode": per_run("mode"),
        "decision_point": _array(dps, int64),
        "ts": _array(posix_us_array(np.array(tss, dtype=np.float64)), _TS_T),
        "bar_time": _array(posix_us_array(np.array(bar_times, dtype=np.float64)), _TS_T),
        "stage": _array(stages, string),
        "action": _array(action, string),
        "actions": _actions(actions),
        "data_accessed": _data_accessed(records, accessed),
        "reads": _array(reads, int64),
        "lookahead_reads": _array(
            [p.lookaheads() if type(p) is PendingReads else p for p in lookaheads], int64
        ),
        "portfolio_value": _floats(pvs),
        "portfolio_cash": _floats(cashes),
        "positions": _positions(positions),
        "reasoning": _array(reasonings, string),
        "confidence": _floats(confidences),
        "notes": _array(notes, string),
        "agent_class": per_run("agent_class"),
        "agent_params": per_run("agent_params"),
        "agent_source_hash": per_run("agent_source_hash"),
        "schema_version": _array(np.full(n, SCHEMA_VERSION, dtype=np.int64)),
        "tracking_gaps": per_run("tracking_gaps"),
    }
    return pa.Table.from_arrays([columns[f.name] for f in ARROW_SCHEMA], schema=ARROW_SCHEMA)
