"""The reference table of tests that compare stored decisions with records kept in memory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analyzers.schema import DecisionRecord, duckdb_ddl, duckdb_struct_type, row_json


def create_expected(con: Any, table: str = "expected") -> None:
    """Creates ``table`` in DuckDB connection ``con`` with the ``decisions`` table's schema."""
    con.execute(duckdb_ddl(table))


def insert_expected(con: Any, records: Sequence[DecisionRecord], table: str = "expected") -> None:
    """Inserts ``records`` into ``table`` as the store would hold them: each record's JSON row
    (:func:`~analyzers.schema.row_json`, what a spill or BigQuery takes) cast to the schema's
    struct by DuckDB, independent of the writer's columnar path."""
    con.execute(
        f"INSERT INTO {table} SELECT unnest(CAST(j::JSON AS {duckdb_struct_type()})) "
        "FROM (SELECT unnest($1::VARCHAR[]) AS j)",
        [[row_json(r) for r in records]],
    )


def expected_table(con: Any, records: Sequence[DecisionRecord], table: str = "expected") -> None:
    """:func:`create_expected`, then :func:`insert_expected` of ``records``."""
    create_expected(con, table)
    insert_expected(con, records, table)
