"""Query the local decision store from the shell.

``python -m analyzers.query [--db fmel.duckdb] "SELECT ..."`` opens the DuckDB file read-only
(so it works while nothing else writes it) and prints the result as a table. With no SQL it
prints a per-session summary. DuckDB gets ``--memory-limit-mb`` MiB (default
``FMEL_LOCAL_MEMORY_LIMIT_MB``, else 512), as the store has while a run writes it: with DuckDB's
own limit (80 % of the machine's memory) a query over wide decisions could take tens of GB
before it spills (docs/benchmarks.md, ninth pass).
"""

from __future__ import annotations

import argparse
import os
import sys

from analyzers.sinks.duckdb import MAX_MEMORY_LIMIT_MB, MEMORY_LIMIT_MB, MIN_MEMORY_LIMIT_MB
from core.errors import ConfigError
from core.settings import parse

MEMORY_ENV = "FMEL_LOCAL_MEMORY_LIMIT_MB"

SUMMARY_SQL = """
SELECT session_id, agent_id, mode, count(*) AS decisions,
       count(*) FILTER (WHERE action <> 'HOLD') AS actions,
       min(bar_time) AS first_bar, max(bar_time) AS last_bar,
       sum(reads) AS reads, sum(lookahead_reads) AS lookahead_reads
FROM decisions GROUP BY ALL ORDER BY first_bar
"""


def main(argv: list[str] | None = None) -> int:
    """Run one query; exit code 0, or 2 when the file or the SQL is bad."""
    import duckdb

    parser = argparse.ArgumentParser(prog="python -m analyzers.query", description=__doc__)
    parser.add_argument("sql", nargs="?", default=SUMMARY_SQL, help="SQL over `decisions`")
    parser.add_argument("--db", default="fmel.duckdb", help="DuckDB file (FMEL_LOCAL_PATH)")
    parser.add_argument("--max-rows", type=int, default=50, help="rows to show")
    parser.add_argument(
        "--memory-limit-mb",
        default=None,
        help=f"DuckDB memory for the query, MiB (default {MEMORY_ENV}, else {MEMORY_LIMIT_MB})",
    )
    args = parser.parse_args(argv)
    named, text = "--memory-limit-mb", args.memory_limit_mb
    if text is None:
        named, text = MEMORY_ENV, os.environ.get(MEMORY_ENV, "")
    try:  # read as the runner reads the variable (core.settings), range as its store's
        limit = parse(named, text, int) if text.strip() else MEMORY_LIMIT_MB
        if not MIN_MEMORY_LIMIT_MB <= limit <= MAX_MEMORY_LIMIT_MB:
            raise ConfigError(f"{named}={limit}: expected a whole number of MiB")
    except ConfigError as e:
        sys.stderr.write(
            f"{str(e)[:200]} (from {MIN_MEMORY_LIMIT_MB} to {MAX_MEMORY_LIMIT_MB} MiB)\n"
        )
        return 2
    try:
        con = duckdb.connect(args.db, read_only=True, config={"memory_limit": f"{limit}MiB"})
        rel = con.sql(args.sql)
        if rel is None:
            return 0
        rel.show(max_rows=args.max_rows, max_width=200)
    except duckdb.Error as e:
        sys.stderr.write(f"{type(e).__name__}: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
