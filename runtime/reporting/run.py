"""After a run: store the bars the run saw next to its decisions, then write the HTML report
from the store (the same path ``python -m runtime.reporting`` takes later). After an
optimisation: the study's page from its ``trials`` and ``folds`` tables
(:func:`write_study_report`).

The report is a by-product: a failure here is logged and the run still ends normally (its
decisions are already stored).

Thread context: main thread, after the engine stopped and the decision writer was flushed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.config import AppConfig
from runtime.reporting.bars import write_bars_bigquery, write_bars_duckdb

if TYPE_CHECKING:
    from runtime.reporting.store import ReportStore

logger = logging.getLogger(__name__)


def report_path(config: AppConfig, session_id: str) -> Path:
    """``report-<session>.html`` next to the local store file (``FMEL_LOCAL_PATH``'s folder;
    with the BigQuery sink the same folder, by default the working directory)."""
    return Path(config.fmel.local_path).parent / f"report-{session_id}.html"


def _store_for(config: AppConfig) -> tuple[ReportStore, Callable[[], None]] | None:
    """A read-only store for the configured sink, and how to close it."""
    from runtime.reporting.store import BigQueryStore, DuckDBStore

    if config.fmel.sink == "local":
        store = DuckDBStore(Path(config.fmel.local_path))
        return store, store.close
    if config.fmel.sink == "bigquery" and config.bigquery is not None:
        from analyzers.sinks.bigquery.client import make_client

        bq = config.bigquery
        client = make_client(bq)
        bq_store = BigQueryStore(
            client, bq.project, bq.dataset, decisions_table=bq.table, timeout_s=bq.timeout_s
        )
        return bq_store, client.close
    return None


def write_study_report(config: AppConfig, study_id: str) -> Path | None:
    """Write ``report-<study_id>.html`` (next to the local store) from the study's ``trials``
    and ``folds`` rows; for the ``MODE=optimize`` driver, once the study ended.

    Returns:
        the page's path, or ``None`` when there is nothing to show or it failed (logged).
    """
    from runtime.reporting.html import render_study
    from runtime.reporting.store import load_study

    try:
        found = _store_for(config)
        if found is None:
            return None
        store, close = found
        try:
            trials, folds = load_study(store, study_id)
        finally:
            close()
        if not len(trials):
            logger.warning("html report of study %s: no trials stored", study_id)
            return None
        out = report_path(config, study_id)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_study(trials, folds, study_id=study_id), encoding="utf-8")
    except Exception:  # the trials are stored; the page is a by-product
        logger.exception("html report of study %s not written", study_id)
        return None
    logger.info("html report: %s", out)
    return out.resolve()


def write_run_report(
    config: AppConfig, session_id: str, strategy: Any, *, deadline: float | None = None
) -> Path | None:
    """Write the run's bars to the store (``session_bars``) and its HTML report.

    Args:
        config: the run's configuration (which sink, where).
        session_id: the run.
        strategy: the strategy that ran, with a :class:`~runtime.reporting.bars.BarRecorder`
            analyzer named ``bars``.
        deadline: ``time.monotonic()`` time by which a stopping run must be done (its
            shutdown budget): BigQuery requests are cut to it, and the page is left out
            (logged) once it passed. None: each request has ``FMEL_BQ_TIMEOUT_S``.

    Returns:
        the report's path, or ``None`` when it could not be written (logged).
    """
    from runtime.reporting.html import render_run
    from runtime.reporting.store import BigQueryStore, DuckDBStore, load_run

    try:
        bars = strategy.analyzers.bars.frame(session_id)
        out = report_path(config, session_id)
        store: ReportStore
        if config.fmel.sink == "local":
            from analyzers.sinks.duckdb import close_store, open_store

            # as the sink opened it: a plain connection would merge the small row groups
            con = open_store(
                Path(config.fmel.local_path),
                memory_limit_mb=config.fmel.local_memory_limit_mb,
            )
            try:
                write_bars_duckdb(con, bars)
                store = DuckDBStore(Path(config.fmel.local_path), con=con)
                page = render_run(load_run(store, session_id))
            finally:
                close_store(con)
        elif config.fmel.sink == "bigquery" and config.bigquery is not None:
            from analyzers.sinks.bigquery.client import make_client

            bq = config.bigquery
            client = make_client(bq)
            try:
                bq_store = BigQueryStore(
                    client,
                    bq.project,
                    bq.dataset,
                    decisions_table=bq.table,
                    timeout_s=bq.timeout_s,
                    deadline=deadline,
                )
                write_bars_bigquery(
                    client, f"{bq.project}.{bq.dataset}", bars, timeout_s=bq_store.request_timeout()
                )
                store = bq_store
                page = render_run(load_run(store, session_id))
            finally:
                client.close()
        else:
            return None
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except Exception:  # the run's results are stored; the page is a by-product
        logger.exception("html report of session %s not written", session_id)
        return None
    logger.info("html report: %s (%.1f MB)", out, out.stat().st_size / 1e6)
    return out.resolve()
