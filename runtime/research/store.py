"""The ``trials`` and ``folds`` tables: every trial streamed to the store as it finishes.

Nothing accumulates in the driver: a trial's row is written when its result arrives (DuckDB) or
within ``flush_interval_s`` (BigQuery, batched streaming inserts), and a fold's row when the
fold is decided. Rows are appended, never updated (BigQuery's streaming buffer cannot be
updated), so a fold's choice lives in ``folds``, not in a flag on ``trials``.

``trials``: one row per trial.

=====================  ============================================================================
column                 meaning
=====================  ============================================================================
study_id               session id of the ``MODE=optimize`` run
fold, trial            fold index, trial number within the fold
session_id             the trial's session id: its decisions in ``decisions`` carry it when
                       recorded (``OPTIMIZE_RECORD=all``, or ``best`` for each fold's best trial)
status                 ``complete``, ``failed`` or ``pruned``
params                 JSON object of the params tried
metric, objective      the objective and its in-sample value (higher is better: ``max_drawdown``
                       is negated); NULL when undefined
train_start, train_end, test_end   the fold's windows (UTC; test_end NULL without walk-forward)
is_*, oos_*            in-sample and out-of-sample statistics (:mod:`runtime.stats`): bars,
                       total_return_pct, cagr_pct, volatility_pct, sharpe, sortino, calmar,
                       max_drawdown_pct, end_value_usd
recorded, decisions    run with FMEL on; decision records written
error                  ``Type: message`` of a failed trial
elapsed_s, worker, peak_rss_mb     wall time, ``host:pid`` of the worker, its peak memory (MiB)
finished_at            when the result reached the driver (UTC)
=====================  ============================================================================

``folds``: one row per fold: the windows, ``complete`` (false when the run was stopped before the
fold's search ended), counts (trials, failed, pruned), the chosen trial (``best_trial``,
``best_params``, ``best_session_id``), whether its decisions were recorded, and its ``is_*`` and
``oos_*`` statistics side by side.

With the local sink both tables live in ``FMEL_LOCAL_PATH`` beside ``decisions``; with the
BigQuery sink, in ``FMEL_DATASET``.

Thread context: main thread only.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from core.errors import SinkError
from runtime.research.folds import Fold
from runtime.research.trial import TrialResult
from runtime.stats import PerformanceStats

if TYPE_CHECKING:
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig

logger = logging.getLogger(__name__)

TRIALS_TABLE = "trials"
FOLDS_TABLE = "folds"


@dataclass(frozen=True, slots=True)
class Column:
    """One column: name, DuckDB type, BigQuery type."""

    name: str
    duckdb: str
    bigquery: str


def _c(name: str, kind: str) -> Column:
    types = {
        "str": ("VARCHAR", "STRING"),
        "int": ("BIGINT", "INT64"),
        "float": ("DOUBLE", "FLOAT64"),
        "bool": ("BOOLEAN", "BOOL"),
        "time": ("TIMESTAMPTZ", "TIMESTAMP"),
    }[kind]
    return Column(name, *types)


# PerformanceStats fields stored per window, in this order.
STAT_FIELDS: tuple[tuple[str, str], ...] = (
    ("bars", "int"),
    ("total_return_pct", "float"),
    ("cagr_pct", "float"),
    ("volatility_pct", "float"),
    ("sharpe", "float"),
    ("sortino", "float"),
    ("calmar", "float"),
    ("max_drawdown_pct", "float"),
    ("end_value_usd", "float"),
)


def _stat_columns() -> tuple[Column, ...]:
    return tuple(_c(f"{w}_{name}", kind) for w in ("is", "oos") for name, kind in STAT_FIELDS)


_WINDOWS = (_c("train_start", "time"), _c("train_end", "time"), _c("test_end", "time"))

TRIAL_COLUMNS: tuple[Column, ...] = (
    _c("study_id", "str"),
    _c("fold", "int"),
    _c("trial", "int"),
    _c("session_id", "str"),
    _c("status", "str"),
    _c("params", "str"),
    _c("metric", "str"),
    _c("objective", "float"),
    *_WINDOWS,
    *_stat_columns(),
    _c("recorded", "bool"),
    _c("decisions", "int"),
    _c("error", "str"),
    _c("elapsed_s", "float"),
    _c("worker", "str"),
    _c("peak_rss_mb", "float"),
    _c("finished_at", "time"),
)

FOLD_COLUMNS: tuple[Column, ...] = (
    _c("study_id", "str"),
    _c("fold", "int"),
    *_WINDOWS,
    _c("metric", "str"),
    _c("sampler", "str"),
    _c("agent", "str"),
    _c("symbols", "str"),
    _c("complete", "bool"),
    _c("trials", "int"),
    _c("failed", "int"),
    _c("pruned", "int"),
    _c("best_trial", "int"),
    _c("best_params", "str"),
    _c("best_session_id", "str"),
    _c("objective", "float"),
    *_stat_columns(),
    _c("recorded", "bool"),
    _c("decisions", "int"),
    _c("finished_at", "time"),
)


def _stats(prefix: str, stats: PerformanceStats | None) -> dict[str, Any]:
    return {
        f"{prefix}_{name}": (getattr(stats, name) if stats is not None else None)
        for name, _ in STAT_FIELDS
    }


def _windows(fold: Fold) -> dict[str, Any]:
    return {
        "train_start": fold.train_start,
        "train_end": fold.train_end,
        "test_end": fold.test_end,
    }


def params_json(params: Mapping[str, Any]) -> str:
    """Params as JSON object text, keys in search-space order."""
    return json.dumps(dict(params), default=str)


def trial_row(result: TrialResult, *, study_id: str, fold: Fold, metric: str) -> dict[str, Any]:
    """The ``trials`` row of one result."""
    return {
        "study_id": study_id,
        "fold": result.fold,
        "trial": result.number,
        "session_id": result.session_id,
        "status": result.status,
        "params": params_json(result.params),
        "metric": metric,
        "objective": result.objective,
        **_windows(fold),
        **_stats("is", result.in_sample),
        **_stats("oos", result.out_of_sample),
        "recorded": result.record,
        "decisions": result.decisions,
        "error": result.error,
        "elapsed_s": result.elapsed_s,
        "worker": result.worker,
        "peak_rss_mb": result.peak_rss_mb,
        "finished_at": datetime.now(UTC),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class FoldOutcome:
    """A decided fold.

    Attributes:
        fold: the windows.
        complete: the search of this fold ran to its end.
        trials, failed, pruned: counts of finished trials.
        best: the chosen trial (highest in-sample objective, lowest trial number on ties), or
            ``None`` when no trial had a defined objective.
        recorded: the chosen params' decisions were recorded (``best_session_id``).
        decisions: decision records written by the recorded run.
    """

    fold: Fold
    complete: bool
    trials: int
    failed: int
    pruned: int
    best: TrialResult | None
    recorded: bool = False
    decisions: int = 0


def fold_row(
    outcome: FoldOutcome,
    *,
    study_id: str,
    metric: str,
    sampler: str,
    agent: str,
    symbols: Sequence[str],
) -> dict[str, Any]:
    """The ``folds`` row of one decided fold."""
    best = outcome.best
    return {
        "study_id": study_id,
        "fold": outcome.fold.index,
        **_windows(outcome.fold),
        "metric": metric,
        "sampler": sampler,
        "agent": agent,
        "symbols": ",".join(symbols),
        "complete": outcome.complete,
        "trials": outcome.trials,
        "failed": outcome.failed,
        "pruned": outcome.pruned,
        "best_trial": best.number if best else None,
        "best_params": params_json(best.params) if best else None,
        "best_session_id": best.session_id if best else None,
        "objective": best.objective if best else None,
        **_stats("is", best.in_sample if best else None),
        **_stats("oos", best.out_of_sample if best else None),
        "recorded": outcome.recorded,
        "decisions": outcome.decisions,
        "finished_at": datetime.now(UTC),
    }


class TrialStore(Protocol):
    """Where trial and fold rows go. Main thread only."""

    def open(self) -> None: ...

    def add_trial(self, row: Mapping[str, Any]) -> None: ...

    def add_fold(self, row: Mapping[str, Any]) -> None: ...

    def flush(self) -> None:
        """Write whatever is buffered."""
        ...

    def close(self) -> None:
        """Flush and release (idempotent)."""
        ...

    def describe(self) -> str: ...

    def example_query(self, study_id: str) -> str: ...


def _ddl(table: str, columns: Sequence[Column], kind: str) -> str:
    cols = ", ".join(f'"{c.name}" {getattr(c, kind)}' for c in columns)
    return f'CREATE TABLE IF NOT EXISTS "{table}" ({cols})'


class DuckDBTrialStore:
    """Both tables in the local decision store's DuckDB file; each row written at once.

    The driver also merges decision files written by workers (``OPTIMIZE_RECORD=all`` with the
    local sink) into ``decisions`` here: one process writes the file.

    Args:
        path: ``FMEL_LOCAL_PATH``.
        memory_limit_mb: DuckDB's memory for the file, MiB (``FMEL_LOCAL_MEMORY_LIMIT_MB``).
    """

    def __init__(self, path: Path, memory_limit_mb: int | None = None) -> None:
        from analyzers.sinks.duckdb import MEMORY_LIMIT_MB

        self.path = Path(path)
        self.memory_limit_mb = MEMORY_LIMIT_MB if memory_limit_mb is None else memory_limit_mb
        self._con: Any = None
        names = [c.name for c in TRIAL_COLUMNS]
        self._trial_sql = (
            f'INSERT INTO "{TRIALS_TABLE}" ({", ".join(names)}) VALUES '
            f"({', '.join('?' for _ in names)})"
        )
        names = [c.name for c in FOLD_COLUMNS]
        self._fold_sql = (
            f'INSERT INTO "{FOLDS_TABLE}" ({", ".join(names)}) VALUES '
            f"({', '.join('?' for _ in names)})"
        )

    def open(self) -> None:
        from analyzers.sinks.duckdb import LocalDuckDBSink, open_store

        # The decisions table and its view exist even before the first recorded run, so the
        # report and merges find them; the sink creates them as a backtest would.
        sink = LocalDuckDBSink(self.path, memory_limit_mb=self.memory_limit_mb)
        try:
            sink.open()
        finally:
            sink.close()
        # shared with a recorder's sink in this process
        self._con = open_store(self.path, memory_limit_mb=self.memory_limit_mb)
        self._con.execute(_ddl(TRIALS_TABLE, TRIAL_COLUMNS, "duckdb"))
        self._con.execute(_ddl(FOLDS_TABLE, FOLD_COLUMNS, "duckdb"))
        for table, columns in ((TRIALS_TABLE, TRIAL_COLUMNS), (FOLDS_TABLE, FOLD_COLUMNS)):
            self._check_shape(table, columns)

    def _check_shape(self, table: str, columns: Sequence[Column]) -> None:
        """A table of that name made by something else (or an older layout) is refused now,
        not at the first insert (helper-74: a BinderException after the first trial).

        Raises:
            SinkError: naming the table and its missing or differently typed columns.
        """
        have = dict(
            self._con.execute(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = ?",
                [table],
            ).fetchall()
        )
        aliases = {"TIMESTAMPTZ": "TIMESTAMP WITH TIME ZONE"}
        wrong = [
            f"{c.name} {c.duckdb}" + (f" (is {have[c.name]})" if c.name in have else "")
            for c in columns
            if have.get(c.name) not in (c.duckdb, aliases.get(c.duckdb))
        ]
        if wrong:
            raise SinkError(
                f"{self.path}: its table {table!r} is not a study table: missing or other-typed "
                f"column(s) {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}"
            )

    def add_trial(self, row: Mapping[str, Any]) -> None:
        self._con.execute(self._trial_sql, [row[c.name] for c in TRIAL_COLUMNS])

    def add_fold(self, row: Mapping[str, Any]) -> None:
        self._con.execute(self._fold_sql, [row[c.name] for c in FOLD_COLUMNS])

    def merge_part(self, part: Path) -> int:
        """Append the decisions of a worker's DuckDB file to ``decisions``; delete the file.

        The rows go in as committed runs of whole decisions, at most
        :data:`analyzers.sinks.duckdb.READS_PER_MB` stored reads per MiB of the database's
        memory limit, as the decision sink cuts a write (weights: :meth:`_plan_sql`): one
        ``INSERT`` of a part of wide decisions needs all of them in DuckDB's pool at once (30
        decisions of 10,000 reads run out of 64 MiB); a run that runs out of memory all the same
        is halved and retried. Rows whose ``decision_id`` the store already holds (in the
        part's sessions) are skipped, so a merge that failed part-way (the file is kept) can be
        run again without duplicates, and an id the part repeats goes in once.

        Returns:
            rows merged (not counting rows skipped as already stored).

        Raises:
            duckdb.Error: the part cannot be read or a run cannot be written (the part file is
            kept; the runs before it stay committed).
        """
        from analyzers.sinks.duckdb import READS_PER_MB, cut_runs, in_halves, memory_limit_of

        if not part.exists():
            return 0
        # a bound parameter, not text in the SQL: a path may hold an apostrophe
        self._con.execute("ATTACH ? AS part (READ_ONLY)", [str(part)])
        merged = 0
        try:
            rows = self._con.execute(self._plan_sql()).fetchall()
            most = max(1, int(READS_PER_MB * memory_limit_of(self._con, self.memory_limit_mb)))
            kept = [(rowid, int(w)) for rowid, w, skip in rows if not skip]
            skipped = sorted(rowid for rowid, _, skip in rows if skip)
            for run in cut_runs([w for _, w in kept], most):
                ids = [rowid for rowid, _ in kept[run.start : run.stop]]
                # out of memory all the same (a weight understated its run): halved
                merged += in_halves(ids, lambda rows: self._merge_run(rows, skipped))
        finally:
            self._con.execute("DETACH part")
        part.unlink()
        return merged

    def keep_unmerged(self, part: Path) -> Path:
        """Move a part file that could not be merged beside the store
        (``<store>.unmerged/<name>``), out of the parts folder the study removes; its new
        path. Attach it with ``ATTACH '<path>' AS t (READ_ONLY)`` to read its decisions."""
        with contextlib.suppress(Exception):
            self._con.execute("DETACH part")
        kept = self.path.parent / f"{self.path.name}.unmerged" / part.name
        kept.parent.mkdir(parents=True, exist_ok=True)
        part.replace(kept)
        return kept

    def _plan_sql(self) -> str:
        """Per row of the attached part, in rowid order: ``(rowid, weight, skip)``. The weight
        is the reads the bar loop counted, twice (a symbol group holds at least one read; a
        read of an indicator over several feeds is stored under each), plus its texts: the
        lengths of the stored lists would read the nested column, which runs out of memory
        itself. Skipped: a ``decision_id`` the store holds (looked up in the part's sessions
        only: an anti-join over a store of millions of decisions ran out of 64 MiB) or one
        the part repeats (its first copy goes in). Columns an older part lacks weigh 0."""
        from analyzers.sinks.duckdb import TEXT_BYTES_PER_READ

        cols = {
            str(name)
            for (name,) in self._con.execute(
                "SELECT column_name FROM duckdb_columns()"
                " WHERE database_name = 'part' AND table_name = 'decisions'"
            ).fetchall()
        }
        weight = "1"
        if "reads" in cols:
            weight += " + 2 * coalesce(TRY_CAST(p.reads AS BIGINT), 0)"
        texts = [
            f"coalesce(strlen(CAST(p.{c} AS VARCHAR)), 0)"
            for c in ("reasoning", "notes", "agent_params")
            if c in cols
        ]
        if texts:
            weight += f" + ({' + '.join(texts)}) // {TEXT_BYTES_PER_READ}"
        return (
            f"SELECT p.rowid, {weight},"
            " row_number() OVER (PARTITION BY p.decision_id ORDER BY p.rowid) > 1"
            " OR p.decision_id IN (SELECT d.decision_id FROM decisions d WHERE d.session_id IN"
            " (SELECT DISTINCT session_id FROM part.decisions))"
            " FROM part.decisions p ORDER BY p.rowid"
        )

    def _merge_run(self, rowids: Sequence[int], skipped: list[int]) -> int:
        """One committed ``INSERT`` of the part's rows ``rowids`` (ascending; ``skipped``: the
        rows between them that do not go in). A failed statement is rolled back."""
        lo, hi = rowids[0], rowids[-1]
        inside = [r for r in skipped[bisect.bisect_left(skipped, lo) :] if r <= hi]
        got = self._con.execute(
            "INSERT INTO decisions BY NAME SELECT * FROM part.decisions p"
            " WHERE p.rowid BETWEEN ? AND ? AND NOT list_contains(?::BIGINT[], p.rowid)",
            [lo, hi, inside],
        ).fetchone()
        return int(got[0]) if got else 0

    def flush(self) -> None:
        """Rows are written as they come."""

    def close(self) -> None:
        if self._con is not None:
            from analyzers.sinks.duckdb import close_store

            close_store(self._con)
            self._con = None

    def describe(self) -> str:
        return f"DuckDB {self.path} (tables {TRIALS_TABLE}, {FOLDS_TABLE})"

    def example_query(self, study_id: str) -> str:
        return (
            f'duckdb {self.path} "SELECT fold, best_params, is_sharpe, oos_sharpe FROM '
            f"{FOLDS_TABLE} WHERE study_id = '{study_id}' ORDER BY fold\""
        )


class BigQueryTrialStore:
    """Both tables in the BigQuery dataset of the decision sink, by streaming inserts.

    Rows are batched (``batch_size`` rows or ``flush_interval_s`` seconds, checked as rows
    arrive, and at every fold) and inserted with row ids (``study:fold:trial``) so that a retried
    insert is de-duplicated by BigQuery. Failed inserts are retried with the project's policy
    (:class:`core.retry.RetryPolicy`); after that the study stops with
    :class:`~core.errors.SinkError`.

    Args:
        config: the BigQuery sink's config (project, dataset, location, endpoint, timeout).
        client: an existing ``google.cloud.bigquery.Client`` (tests); default one from config.
    """

    def __init__(
        self,
        config: BigQuerySinkConfig,
        *,
        client: Any = None,
        batch_size: int = 50,
        flush_interval_s: float = 5.0,
    ) -> None:
        self.config = config
        self._client = client
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self._buf: dict[str, list[tuple[str, dict[str, Any]]]] = {
            TRIALS_TABLE: [],
            FOLDS_TABLE: [],
        }
        self._last_flush = time.monotonic()

    def _table_id(self, table: str) -> str:
        c = self.config
        return f"{c.project}.{c.dataset}.{table}"

    def open(self) -> None:
        from google.cloud import bigquery

        from analyzers.sinks.bigquery.client import make_client

        if self._client is None:
            self._client = make_client(self.config)
        c = self.config
        dataset = bigquery.Dataset(f"{c.project}.{c.dataset}")
        if c.location:
            dataset.location = c.location
        self._client.create_dataset(dataset, exists_ok=True, timeout=c.timeout_s, retry=None)
        for table, columns in ((TRIALS_TABLE, TRIAL_COLUMNS), (FOLDS_TABLE, FOLD_COLUMNS)):
            schema = [bigquery.SchemaField(col.name, col.bigquery) for col in columns]
            t = bigquery.Table(self._table_id(table), schema=schema)
            t.clustering_fields = ["study_id"]
            self._client.create_table(t, exists_ok=True, timeout=c.timeout_s, retry=None)

    @staticmethod
    def _json(row: Mapping[str, Any]) -> dict[str, Any]:
        # JSON has no infinity: the BigQuery client sends a non-finite FLOAT64 as its Python
        # text ("inf"), which the streaming API accepts (googleapis/python-bigquery#728,
        # _helpers._float_to_json); the objective of a dominant trial is +inf.
        return {
            k: (
                v.isoformat()
                if isinstance(v, datetime)
                else str(v)
                if isinstance(v, float) and not math.isfinite(v)
                else v
            )
            for k, v in row.items()
            if v is not None
        }

    def add_trial(self, row: Mapping[str, Any]) -> None:
        row_id = f"{row['study_id']}:{row['fold']}:{row['trial']}"
        self._buf[TRIALS_TABLE].append((row_id, self._json(row)))
        self._maybe_flush()

    def add_fold(self, row: Mapping[str, Any]) -> None:
        row_id = f"{row['study_id']}:{row['fold']}"
        self._buf[FOLDS_TABLE].append((row_id, self._json(row)))
        self.flush()

    def _maybe_flush(self) -> None:
        due = time.monotonic() - self._last_flush >= self.flush_interval_s
        if due or len(self._buf[TRIALS_TABLE]) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        from analyzers.sinks.bigquery.errors import is_transient
        from core.retry import RetryPolicy

        for table, items in self._buf.items():
            if not items:
                continue
            errors = RetryPolicy().call(
                f"insert {len(items)} {table} rows",
                self._client.insert_rows_json,
                self._table_id(table),
                [r for _, r in items],
                row_ids=[i for i, _ in items],
                timeout=self.config.timeout_s,
                retry=None,  # retried here, with backoff, on transient errors only
                retry_on=is_transient,
            )
            if errors:
                raise SinkError(f"BigQuery refused {table} rows: {describe_errors(errors)}")
            items.clear()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if self._client is not None:
            self.flush()

    def describe(self) -> str:
        c = self.config
        return f"BigQuery {c.project}.{c.dataset} (tables {TRIALS_TABLE}, {FOLDS_TABLE})"

    def example_query(self, study_id: str) -> str:
        return (
            f'bq query --use_legacy_sql=false "SELECT fold, best_params, is_sharpe, oos_sharpe '
            f"FROM \\`{self._table_id(FOLDS_TABLE)}\\` WHERE study_id = '{study_id}' ORDER BY "
            'fold"'
        )


def describe_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """First few per-row errors of an ``insert_rows_json`` answer, as text."""
    parts = []
    for e in errors[:3]:
        reasons = "; ".join(str(x.get("message") or x.get("reason")) for x in e.get("errors", []))
        parts.append(f"row {e.get('index')}: {reasons}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return ", ".join(parts) + more


def make_store(
    *,
    sink: str,
    local_path: Path,
    bigquery: BigQuerySinkConfig | None,
    memory_limit_mb: int | None = None,
) -> DuckDBTrialStore | BigQueryTrialStore:
    """The trials store beside the decision store ``FMEL_SINK`` names (``memory_limit_mb``:
    ``FMEL_LOCAL_MEMORY_LIMIT_MB``, for the local one)."""
    if sink == "bigquery" and bigquery is not None:
        return BigQueryTrialStore(bigquery)
    return DuckDBTrialStore(local_path, memory_limit_mb)
