"""Query the local decision store from the shell.

``python -m analyzers.query [--db fmel.duckdb] "SELECT ..."`` opens the DuckDB file read-only
(so it works while nothing else writes it) and prints the result as a table. With no SQL it
prints a per-session summary.
"""

from __future__ import annotations

import argparse
import sys

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
    args = parser.parse_args(argv)
    try:
        con = duckdb.connect(args.db, read_only=True)
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
