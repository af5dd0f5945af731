"""``python -m runtime.reporting``: write a run's or an optimisation's HTML report later, from
the store alone.

Examples::

    python -m runtime.reporting --db fmel.duckdb --list
    python -m runtime.reporting --db fmel.duckdb --session 20261121T051502Z-3f9a1c2e --out r.html
    python -m runtime.reporting --bigquery-project my-proj --bigquery-dataset fmel \\
        --session 20261121T051502Z-3f9a1c2e --out r.html
    python -m runtime.reporting --db fmel.duckdb --study <study id> --out study.html

``--session`` that names an optimisation (a ``study_id`` of the ``trials`` table) and no run
writes the optimisation page. BigQuery is read with the real client and Application Default
Credentials, or anonymously from an emulator given with ``--bigquery-endpoint``.

Exit codes: 0 written (the path is printed), 2 bad arguments, unknown session or unreadable
store.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from core.errors import AppError
from runtime.reporting.store import ReportStore

logger = logging.getLogger("runtime.reporting")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.reporting",
        description="Write the HTML report of a run or an optimisation from the decision store.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--db", type=Path, help="local DuckDB store (FMEL_LOCAL_PATH)")
    src.add_argument("--bigquery-project", help="GCP project of the BigQuery dataset")
    p.add_argument("--bigquery-dataset", default="fmel", help="BigQuery dataset (FMEL_DATASET)")
    p.add_argument("--bigquery-table", default="decisions", help="decision table (FMEL_TABLE)")
    p.add_argument(
        "--bigquery-endpoint", help="emulator endpoint with scheme, e.g. http://127.0.0.1:9050"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--session", help="session id of a run (or of an optimisation)")
    what.add_argument("--study", help="study id of an optimisation (trials.study_id)")
    what.add_argument("--list", action="store_true", help="list the sessions in the store")
    p.add_argument("--out", type=Path, help="output file (default report-<id>.html)")
    return p


def _store(args: argparse.Namespace) -> ReportStore:
    from runtime.reporting.store import BigQueryStore, DuckDBStore

    if args.db is not None:
        return DuckDBStore(args.db)
    from analyzers.sinks.bigquery.client import make_client
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig

    cfg = BigQuerySinkConfig(
        project=args.bigquery_project,
        dataset=args.bigquery_dataset,
        table=args.bigquery_table,
        api_endpoint=args.bigquery_endpoint,
    )
    return BigQueryStore(
        make_client(cfg),
        cfg.project,
        cfg.dataset,
        decisions_table=cfg.table,
        timeout_s=cfg.timeout_s,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    from runtime.reporting.html import render_run, render_study
    from runtime.reporting.store import load_run, load_study, session_exists, sessions

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        store = _store(args)
        if args.list:
            for s in sessions(store):
                sys.stdout.write(s + "\n")
            return 0
        ident = args.session or args.study
        if args.session and session_exists(store, ident):
            page = render_run(load_run(store, ident))
        else:
            trials, folds = load_study(store, ident)
            if not len(trials):
                kind = "run or optimisation" if args.session else "optimisation"
                logger.error("%s: no %s %r", store.describe(), kind, ident)
                return 2
            page = render_study(trials, folds, study_id=ident)
        out = args.out or Path(f"report-{ident}.html")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except (AppError, OSError, ValueError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    sys.stdout.write(f"{out.resolve()}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
