"""Compact rows on bqemulator: what users query is the same as before, whatever the layout.

* A new deployment: rows land packed in ``decisions_compact``; the view ``decisions`` gives back
  every record exactly as :func:`~analyzers.schema.to_row` made it (real records of two
  agents: the read-heavy one, and one that peeks ahead and places orders), and
  ``decision_reads`` one row per read with every column.
* A deployment made before compact rows (a ``decisions`` table) keeps its layout and its rows;
  new rows are added in that layout, nothing else is created.
* Its migration as docs/bigquery.md describes it (rename, start, copy with
  :func:`~analyzers.sinks.bigquery.compact.copy_query`) keeps every old row, the same through the
  view.

The same-run comparison with the DuckDB store, query by query, is tests/integration/test_sql.py
(its BigQuery run now writes compact rows).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from analyzers.schema import bigquery_schema, to_row
from analyzers.sinks.bigquery.compact import compact_table_id, copy_query
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.bigquery.sink import BigQuerySink
from tests.bq_agents import real_records
from tests.bq_read_heavy import read_heavy_records
from tests.bqemu_harness import BigQueryEmulator, unique_dataset

pytestmark = pytest.mark.slow

READ_COLUMNS = (
    "decision_id",
    "session_id",
    "agent_id",
    "decision_point",
    "bar_time",
    "stage",
    "action",
    "symbol",
    "seq",
    "field",
    "index",
    "size",
    "bar_index",
    "data_hash",
    "value",
    "text_value",
    "lookahead",
)


def sink_for(emu: BigQueryEmulator, dataset: str) -> BigQuerySink:
    cfg = BigQuerySinkConfig(
        project=emu.project, dataset=dataset, api_endpoint=emu.endpoint, timeout_s=20.0
    )
    return BigQuerySink(cfg)


def as_json(value: Any) -> Any:
    """A query result as JSON values (timestamps as the ISO text to_row writes)."""
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_json(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat().replace("+00:00", "Z")
    return value


def expected_reads(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    out = []
    for r in rows:
        for da in r["data_accessed"]:
            for ap in da["access_patterns"]:
                # bar_time is the decision's (the view's column), data_hash the read's.
                flat = {**r, "symbol": da["symbol"], **ap, "bar_time": r["bar_time"]}
                out.append(tuple(flat[c] for c in READ_COLUMNS))
    return sorted(out, key=repr)


def stored_reads(emu: BigQueryEmulator, dataset: str) -> list[tuple[Any, ...]]:
    cols = ", ".join(f"`{c}`" for c in READ_COLUMNS)
    got = emu.query(f"SELECT {cols} FROM `{emu.project}.{dataset}.decision_reads`")
    return sorted((tuple(as_json(g[c]) for c in READ_COLUMNS) for g in got), key=repr)


def stored_rows(emu: BigQueryEmulator, table_id: str) -> dict[str, dict[str, Any]]:
    got = emu.query(f"SELECT * FROM `{table_id}`")
    return {g["decision_id"]: as_json(dict(g)) for g in got}


def full(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` as JSON values (what a query gives back)."""
    out: dict[str, Any] = json.loads(json.dumps(row))
    return out


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    """Real records of two agents, as to_row rows: read-heavy (six feeds, ~130 reads) and
    look-ahead with orders (two feeds)."""
    heavy = read_heavy_records("compact-heavy", start="2016-01-01", end="2016-03-31")
    peek = real_records("compact-peek", start="2010-01-01", end="2010-06-30")
    return [to_row(r) for r in [*heavy, *peek]]


def test_a_new_table_stores_compact_rows_and_the_views_give_them_back(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    dataset = unique_dataset("compact")
    sink = sink_for(bq_emulator, dataset)
    try:
        assert sink.write(rows) == []
        assert sink.compact
        assert sink.insert_id == compact_table_id(sink.table_id)
        assert sink.stats.rows_sent == len(rows)  # each row sent once
    finally:
        sink.close()
    assert any(r["lookahead_reads"] for r in rows) and any(r["actions"] for r in rows)
    assert any(r["reads"] >= 120 for r in rows)
    got = stored_rows(bq_emulator, sink.table_id)
    assert got == {r["decision_id"]: full(r) for r in rows}
    assert stored_reads(bq_emulator, dataset) == expected_reads([full(r) for r in rows])


def test_a_table_made_before_compact_rows_keeps_its_layout(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    dataset = unique_dataset("legacy")
    old, new = rows[:40], rows[40:80]
    table_id = f"{bq_emulator.project}.{dataset}.decisions"
    client = bq_emulator.client()
    try:
        client.create_dataset(f"{bq_emulator.project}.{dataset}")
        client.create_table(bigquery.Table(table_id, schema=bigquery_schema()))
        assert client.insert_rows_json(table_id, old, row_ids=[r["decision_id"] for r in old]) == []
    finally:
        client.close()
    caplog.set_level(logging.WARNING, logger="analyzers.sinks.bigquery.schema")
    sink = sink_for(bq_emulator, dataset)
    try:
        assert sink.write(new) == []
        assert not sink.compact and sink.insert_id == table_id
    finally:
        sink.close()
    assert "one element per read" in caplog.text and "Compact rows" in caplog.text
    client = bq_emulator.client()
    try:
        assert client.get_table(table_id).table_type == "TABLE"
        with pytest.raises(gexc.NotFound):
            client.get_table(compact_table_id(table_id))
    finally:
        client.close()
    assert stored_rows(bq_emulator, table_id) == {r["decision_id"]: full(r) for r in old + new}
    assert stored_reads(bq_emulator, dataset) == expected_reads([full(r) for r in old + new])


def test_the_documented_migration_keeps_every_old_row(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    from google.cloud import bigquery

    dataset = unique_dataset("migrate")
    old, new = rows[:60], rows[60:90]
    project = bq_emulator.project
    table_id = f"{project}.{dataset}.decisions"
    v2_id = f"{project}.{dataset}.decisions_v2"
    client = bq_emulator.client()
    try:
        client.create_dataset(f"{project}.{dataset}")
        # The old table, as it is after the rename step (ALTER TABLE ... RENAME TO decisions_v2).
        client.create_table(bigquery.Table(v2_id, schema=bigquery_schema()))
        assert client.insert_rows_json(v2_id, old, row_ids=[r["decision_id"] for r in old]) == []
    finally:
        client.close()
    sink = sink_for(bq_emulator, dataset)  # the runner starting again: compact table + views
    try:
        assert sink.write(new) == []
        assert sink.compact
    finally:
        sink.close()
    # Seq increases along each symbol's reads in these rows, so ordering by seq is exact (the
    # emulator cannot run the WITH OFFSET variant that BigQuery runs).
    for r in old:
        for da in r["data_accessed"]:
            seqs = [ap["seq"] for ap in da["access_patterns"]]
            assert seqs == sorted(set(seqs))
    assert "WITH OFFSET AS o" in copy_query(v2_id, compact_table_id(table_id))
    bq_emulator.query(copy_query(v2_id, compact_table_id(table_id), keep_positions=False))
    assert stored_rows(bq_emulator, table_id) == {r["decision_id"]: full(r) for r in old + new}
    assert stored_reads(bq_emulator, dataset) == expected_reads([full(r) for r in old + new])
