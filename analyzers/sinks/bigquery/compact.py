"""Compact decision rows: the reads of a record grouped per bar, with short keys and defaults
left out, stored in ``<table>_compact``; the table name users query is a view in the old shape.

Why: a read-heavy record (~130 reads) is ~25 kB as a row-per-read JSON row, ~190 bytes a read,
half of it key names and values that repeat (``"size":1``, ``"lookahead":false``, the field
name, the bar's hash and time for every read of that bar). insertAll bytes, the 10 MB request
limit and the spill file all scale with that.

Layout of ``<table>_compact`` (:data:`COMPACT_SCHEMA`): every column of
:data:`~analyzers.schema.DECISION_SCHEMA` in its order, except that ``data_accessed`` is::

    data_accessed[]  symbol, data_hash, fields_accessed[],
      bars[]         one per distinct bar read, in order of first read:
                     i = bar_index, h = data_hash, t = bar_time (POSIX seconds),
                     tu = microseconds after t (absent when 0)
        r[]          the reads of that bar: s = seq, f = field, x = index (absent: 0),
                     n = size (absent: 1), v = value, tv = text_value, la = lookahead
                     (absent: false), o = position of the read in the symbol's list (only
                     when seq does not increase along it)

The field is kept by name, not as an offset into ``fields_accessed``: bqemulator reads
``array[SAFE_OFFSET(column)]`` one-based (a literal offset is right), so the view could not be
tested.

The view ``<table>`` (:func:`decisions_view_query`) rebuilds ``access_patterns`` from that, in
the original order (``ORDER BY COALESCE(o, s)``: unique within a symbol), so ``SELECT *``, the
``decision_reads`` view and every query of ``sql/bigquery/`` give the same columns and rows as
over a row-per-read table. :func:`pack_row` and :func:`unpack_row` are the same mapping in
Python (the tests check one against the other and against the emulator's view);
:func:`pack_reads` packs a record's reads without the row-per-read dicts (fresh records).
:func:`copy_query` moves an older row-per-read table's rows in (docs/bigquery.md).

Thread context: pure functions, called on the writer thread and its request threads.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from analyzers.schema import DECISION_SCHEMA, DataAccess, FieldSpec
from analyzers.sinks.bigquery.rows import timestamp_from_text

COMPACT_SUFFIX = "_compact"

F = FieldSpec

READ_FIELDS = (
    F("s", "INT64", description="seq: order of the read within the decision"),
    F("f", "STRING", description="field: the line read (close, sma, ...)"),
    F("x", "INT64", description="index (backtrader; null means 0)"),
    F("n", "INT64", description="size: bars read at once (null means 1)"),
    F("v", "FLOAT64", description="value"),
    F("tv", "STRING", description="text_value"),
    F("la", "BOOL", description="lookahead (null means false)"),
    F("o", "INT64", description="position in the symbol's reads when seq does not order them"),
)

BAR_FIELDS = (
    F("i", "INT64", description="bar_index of the bar read"),
    F("h", "STRING", description="data_hash of the bar read"),
    F("t", "INT64", description="bar_time of the bar read, POSIX seconds (UTC)"),
    F("tu", "INT64", description="microseconds to add to t (null means 0)"),
    F("r", "RECORD", "REPEATED", READ_FIELDS),
)

COMPACT_DATA_ACCESS_FIELDS = (
    F("symbol", "STRING"),
    F("data_hash", "STRING", description="hash of the symbol's current bar at decision time"),
    F("fields_accessed", "STRING", "REPEATED"),
    F("bars", "RECORD", "REPEATED", BAR_FIELDS, "reads grouped by the bar they reached"),
)

COMPACT_SCHEMA: tuple[FieldSpec, ...] = tuple(
    F(f.name, f.type, f.mode, COMPACT_DATA_ACCESS_FIELDS, f.description)
    if f.name == "data_accessed"
    else f
    for f in DECISION_SCHEMA
)

# The view column expressions for the reads, in ACCESS_FIELDS order (analyzers/schema.py).
_READ_COLUMNS = (
    "r.s AS seq",
    "r.f AS field",
    "COALESCE(r.x, 0) AS `index`",
    "COALESCE(r.n, 1) AS size",
    "b.i AS bar_index",
    "b.h AS data_hash",
    "r.v AS value",
    "r.tv AS text_value",
    "COALESCE(r.la, FALSE) AS lookahead",
    "TIMESTAMP_MICROS(b.t * 1000000 + COALESCE(b.tu, 0)) AS bar_time",
)


def compact_table_id(table_id: str) -> str:
    """``project.dataset.table`` -> ``project.dataset.table_compact`` (where rows are stored)."""
    return table_id + COMPACT_SUFFIX


def decisions_view_query(compact_id: str) -> str:
    """The query of the view named like the table: the rows of ``compact_id`` in the shape of
    :data:`~analyzers.schema.DECISION_SCHEMA` (same columns, same order, reads one per
    ``access_patterns`` element in their original order).

    Args:
        compact_id: ``project.dataset.table_compact``.
    """
    access = (
        "ARRAY(SELECT AS STRUCT " + ", ".join(_READ_COLUMNS) + " "
        "FROM UNNEST(da.bars) AS b, UNNEST(b.r) AS r ORDER BY COALESCE(r.o, r.s))"
    )
    data_accessed = (
        "ARRAY(SELECT AS STRUCT da.symbol, da.data_hash, da.fields_accessed, "
        f"{access} AS access_patterns "
        "FROM UNNEST(d.data_accessed) AS da WITH OFFSET AS dao ORDER BY dao) AS data_accessed"
    )
    cols = [data_accessed if f.name == "data_accessed" else f"d.`{f.name}`" for f in COMPACT_SCHEMA]
    return "SELECT " + ", ".join(cols) + f" FROM `{compact_id}` AS d"


@functools.lru_cache(maxsize=65_536)
def _micros(text: str) -> int:
    """TIMESTAMP text (``2015-02-04T00:00:00Z``, any form :func:`.rows.timestamp_from_text`
    reads) -> POSIX microseconds (exact). Cached: a bar's time comes back in every read of it,
    over many consecutive decisions."""
    delta = timestamp_from_text(text) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _iso(micros: int) -> str:
    s, us = divmod(micros, 1_000_000)
    dt = datetime.fromtimestamp(s, UTC).replace(microsecond=us)
    return dt.isoformat().replace("+00:00", "Z")


def _new_bar(bar_index: int | None, data_hash: str | None, micros: int | None) -> dict[str, Any]:
    """A bar of a compact row, its reads list empty; absent keys for nulls."""
    bar: dict[str, Any] = {"r": []}
    if bar_index is not None:
        bar["i"] = bar_index
    if data_hash is not None:
        bar["h"] = data_hash
    if micros is not None:
        t, tu = divmod(micros, 1_000_000)
        bar["t"] = t
        if tu:
            bar["tu"] = tu
    return bar


def _pack_symbol(da: Mapping[str, Any]) -> dict[str, Any]:
    fields = list(da.get("fields_accessed") or ())
    patterns: Sequence[Mapping[str, Any]] = da.get("access_patterns") or ()
    seqs = [p.get("seq") for p in patterns]
    ints = [s for s in seqs if isinstance(s, int)]
    by_seq = len(ints) == len(seqs) and all(a < b for a, b in itertools.pairwise(ints))
    bars: list[dict[str, Any]] = []
    where: dict[tuple[Any, ...], dict[str, Any]] = {}
    for pos, p in enumerate(patterns):
        bar_time = p.get("bar_time")
        micros = None if bar_time is None else _micros(str(bar_time))
        key = (p.get("bar_index"), p.get("data_hash"), micros)
        bar = where.get(key)
        if bar is None:
            bar = where[key] = _new_bar(p.get("bar_index"), p.get("data_hash"), micros)
            bars.append(bar)
        read: dict[str, Any] = {"s": p.get("seq"), "f": p.get("field")}
        if p.get("index"):
            read["x"] = p["index"]
        if p.get("size") != 1:
            read["n"] = p.get("size")
        read["v"] = p.get("value")
        read["tv"] = p.get("text_value")
        if p.get("lookahead"):
            read["la"] = True
        if not by_seq:
            read["o"] = pos
        bar["r"].append({k: v for k, v in read.items() if v is not None})
    out = {
        "symbol": da.get("symbol"),
        "data_hash": da.get("data_hash"),
        "fields_accessed": fields,
        "bars": bars,
    }
    return {k: v for k, v in out.items() if v is not None}


def pack_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A decision row (:func:`~analyzers.schema.to_row` shape) as a row of
    :data:`COMPACT_SCHEMA`; every other column is passed through unchanged.

    A read whose bar has no time (``bar_time`` null, no bar returned) keeps ``t`` absent, so
    the view gives NULL. Values are not checked here (the sink validates the full row first).
    """
    out = dict(row)
    das = row.get("data_accessed")
    if das is not None:
        out["data_accessed"] = [_pack_symbol(da) for da in das]
    return out


@functools.lru_cache(maxsize=65_536)
def _bar_micros(posix_s: float) -> int:
    """A read's bar time (POSIX seconds, float) as microseconds, rounded as
    :func:`~analyzers.schema.to_row` renders it (``datetime.fromtimestamp``)."""
    dt = datetime.fromtimestamp(posix_s, UTC)
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _finite(x: float | None) -> float | None:
    # As to_row: JSON has no NaN/inf; BigQuery takes null.
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return x


def pack_reads(data_accessed: Sequence[DataAccess]) -> list[dict[str, Any]]:
    """``pack_row(compact_row(to_row(rec)))["data_accessed"]`` straight from the record's
    reads, without building a dict per read first (the sink's path for fresh records: about
    half the CPU; the tests check both give the same)."""
    out: list[dict[str, Any]] = []
    for da in data_accessed:
        patterns = da.access_patterns
        by_seq = all(a.seq < b.seq for a, b in itertools.pairwise(patterns))
        bars: list[dict[str, Any]] = []
        where: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for pos, p in enumerate(patterns):
            micros = None if p.bar_time is None else _bar_micros(p.bar_time)
            key = (p.bar_index, p.data_hash, micros)
            reads = where.get(key)
            if reads is None:
                bar = _new_bar(p.bar_index, p.data_hash, micros)
                reads = where[key] = bar["r"]
                bars.append(bar)
            read: dict[str, Any] = {"s": p.seq, "f": p.field}
            if p.index:
                read["x"] = p.index
            if p.size != 1:
                read["n"] = p.size
            value = _finite(p.value)
            if value is not None:
                read["v"] = value
            if p.text_value is not None:
                read["tv"] = p.text_value
            if p.lookahead:
                read["la"] = True
            if not by_seq:
                read["o"] = pos
            reads.append(read)
        packed: dict[str, Any] = {"symbol": da.symbol}
        if da.data_hash is not None:
            packed["data_hash"] = da.data_hash
        packed["fields_accessed"] = list(da.fields_accessed)
        packed["bars"] = bars
        out.append(packed)
    return out


def unpack_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`pack_row`, as the view computes it (for tests and tools): the row
    in the :func:`~analyzers.schema.to_row` shape, every read with all its keys."""
    out = dict(row)
    das = row.get("data_accessed")
    if das is None:
        return out
    unpacked = []
    for da in das:
        fields = list(da.get("fields_accessed") or ())
        reads: list[tuple[tuple[int, int, int], dict[str, Any]]] = []
        for bo, bar in enumerate(da.get("bars") or ()):
            t = bar.get("t")
            bar_time = None if t is None else _iso(t * 1_000_000 + (bar.get("tu") or 0))
            for ro, r in enumerate(bar.get("r") or ()):
                order = r.get("o")
                reads.append(
                    (
                        (r["s"] if order is None else order, bo, ro),
                        {
                            "seq": r.get("s"),
                            "field": r.get("f"),
                            "index": r.get("x") or 0,
                            "size": 1 if r.get("n") is None else r["n"],
                            "bar_index": bar.get("i"),
                            "data_hash": bar.get("h"),
                            "value": r.get("v"),
                            "text_value": r.get("tv"),
                            "lookahead": bool(r.get("la")),
                            "bar_time": bar_time,
                        },
                    )
                )
        reads.sort(key=lambda item: item[0])
        unpacked.append(
            {
                "symbol": da.get("symbol"),
                "data_hash": da.get("data_hash"),
                "fields_accessed": fields,
                "access_patterns": [r for _, r in reads],
            }
        )
    out["data_accessed"] = unpacked
    return out


def view_ddl(table_id: str) -> str:
    """``CREATE OR REPLACE VIEW`` of ``table_id`` over ``<table_id>_compact`` (what the sink
    does at start; for a role that may not create views, run by an administrator)."""
    return (
        f"CREATE OR REPLACE VIEW `{table_id}` AS\n"
        f"{decisions_view_query(compact_table_id(table_id))}"
    )


def copy_query(old_id: str, compact_id: str, *, keep_positions: bool = True) -> str:
    """``INSERT INTO compact_id ... SELECT`` of every row of a row-per-read table ``old_id``
    (the migration of a deployment made before compact rows, docs/bigquery.md).

    Each read becomes a bar of its own: valid compact rows, the same through the view, not
    grouped as tightly as the sink's (which only costs bytes).

    Args:
        keep_positions: order each symbol's reads by their position in the old row (``o``, from
            ``WITH OFFSET``). False orders them by ``seq``, which is the same for rows this
            tracker made (seq increases along a symbol's reads); bqemulator cannot run a
            nested ``WITH OFFSET``, so that is the variant its tests run.
    """
    position = "o" if keep_positions else "CAST(NULL AS INT64)"
    read = (
        "[STRUCT(ap.seq AS s, ap.field AS f, NULLIF(ap.`index`, 0) AS x, NULLIF(ap.size, 1) AS n, "
        f"ap.value AS v, ap.text_value AS tv, IF(ap.lookahead, TRUE, NULL) AS la, {position} AS o)]"
    )
    bars = (
        "ARRAY(SELECT AS STRUCT ap.bar_index AS i, ap.data_hash AS h, "
        "DIV(UNIX_MICROS(ap.bar_time), 1000000) AS t, "
        "NULLIF(MOD(UNIX_MICROS(ap.bar_time), 1000000), 0) AS tu, "
        f"{read} AS r FROM UNNEST(da.access_patterns) AS ap"
        + (" WITH OFFSET AS o)" if keep_positions else ")")
    )
    data_accessed = (
        "ARRAY(SELECT AS STRUCT da.symbol, da.data_hash, da.fields_accessed, "
        f"{bars} AS bars FROM UNNEST(d.data_accessed) AS da WITH OFFSET AS k ORDER BY k)"
    )
    names = ", ".join(f"`{f.name}`" for f in COMPACT_SCHEMA)
    cols = ", ".join(
        data_accessed if f.name == "data_accessed" else f"d.`{f.name}`" for f in COMPACT_SCHEMA
    )
    return f"INSERT INTO `{compact_id}` ({names})\nSELECT {cols}\nFROM `{old_id}` AS d"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analyzers.sinks.bigquery.compact PROJECT.DATASET.TABLE [--copy-from OLD]``:
    print the view's DDL, or the copy of an old row-per-read table into the compact one."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("table_id", help="project.dataset.table (the name users query)")
    parser.add_argument("--copy-from", help="project.dataset.table of row-per-read rows")
    args = parser.parse_args(argv)
    if args.copy_from:
        sys.stdout.write(copy_query(args.copy_from, compact_table_id(args.table_id)) + "\n")
    else:
        sys.stdout.write(view_ddl(args.table_id) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
