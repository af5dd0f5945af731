"""The ``decision_reads`` view (one row per read, for BI tools), defined once per dialect.

The definitions are the files users run by hand, ``sql/duckdb/decision_reads_view.sql`` and
``sql/bigquery/decision_reads_view.sql``; both sinks create the view from them at start
(:class:`~analyzers.sinks.duckdb.LocalDuckDBSink` next to ``decisions``,
:class:`~analyzers.sinks.bigquery.sink.BigQuerySink` next to its table). The BigQuery file names
the default table ``fmel.decisions``; :func:`bigquery_view_query` puts the sink's table there.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal

from core.errors import SinkError

SQL_DIR = Path(__file__).resolve().parents[2] / "sql"
VIEW_NAME = "decision_reads"
Dialect = Literal["duckdb", "bigquery"]

_CREATE_RE = re.compile(r"CREATE OR REPLACE VIEW \S+ AS\s+(SELECT\b.*)", re.S | re.I)


@functools.cache
def read_sql(dialect: Dialect, name: str) -> str:
    """The text of ``sql/<dialect>/<name>.sql``.

    Raises:
        SinkError: the file is missing (an install without the ``sql/`` folder).
    """
    path = SQL_DIR / dialect / f"{name}.sql"
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise SinkError(f"{path} is missing: the sql/ folder ships with the code") from e


def _statement(text: str) -> str:
    """The SQL without its ``--`` comment lines, stripped."""
    lines = [ln.rstrip() for ln in text.splitlines() if not ln.lstrip().startswith("--")]
    return "\n".join(lines).strip()


def duckdb_view_sql() -> str:
    """``CREATE OR REPLACE VIEW decision_reads AS ...`` over the ``decisions`` table."""
    return _statement(read_sql("duckdb", "decision_reads_view"))


def bigquery_view_query(table_id: str) -> str:
    """The view's query (its ``SELECT``) over the table ``table_id`` (``project.dataset.table``).

    Raises:
        SinkError: the file does not hold a ``CREATE OR REPLACE VIEW ... AS SELECT``.
    """
    match = _CREATE_RE.fullmatch(_statement(read_sql("bigquery", "decision_reads_view")))
    if match is None:
        raise SinkError(
            "sql/bigquery/decision_reads_view.sql must be one CREATE OR REPLACE VIEW ... AS SELECT"
        )
    return re.sub(r"\bfmel\.decisions\b", f"`{table_id}`", match.group(1))
