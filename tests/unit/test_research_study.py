"""runtime.research.study: the driver loop with a hand-written engine (results computed from the
params, returned out of order) and the real DuckDB trials store in a temp folder.

What is checked: every finished trial lands in ``trials`` as it arrives, each fold's choice is
the best in-sample objective (lowest trial number on ties) whatever the arrival order, a stop
stores what was running and marks unfinished folds incomplete, and the best is re-run with
recording under its own session id.
"""

from __future__ import annotations

from collections import deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from analyzers.config import FMELConfig
from core.errors import SinkError
from runtime.research.config import OptimizeConfig
from runtime.research.folds import Fold
from runtime.research.progress import Progress
from runtime.research.store import DuckDBTrialStore
from runtime.research.study import Study, trial_session_id
from runtime.research.trial import StudyJob, TrialResult, TrialTask
from runtime.stats import performance_stats

FOLDS = [
    Fold(
        0,
        datetime(2001, 1, 1, tzinfo=UTC),
        datetime(2003, 1, 1, tzinfo=UTC),
        datetime(2003, 7, 1, tzinfo=UTC),
    ),
    Fold(
        1,
        datetime(2001, 7, 1, tzinfo=UTC),
        datetime(2003, 7, 1, tzinfo=UTC),
        datetime(2004, 1, 1, tzinfo=UTC),
    ),
]


def score(params: dict[str, Any], fold: int) -> float | None:
    """A made-up objective: fold 0 likes fast=10, fold 1 fast=20; slow=90 is undefined."""
    if params["slow"] == 90:
        return None
    return -abs(params["fast"] - (10 if fold == 0 else 20)) + 0.0 * params["slow"]


def result_of(task: TrialTask) -> TrialResult:
    if task.params["fast"] == 7:
        return TrialResult(
            fold=task.fold.index,
            number=task.number,
            params=task.params,
            session_id=task.session_id,
            record=task.record,
            status="failed",
            objective=None,
            in_sample=None,
            out_of_sample=None,
            error="ValueError: made up",
            worker="fake:1",
        )
    objective = score(task.params, task.fold.index)
    curve = pd.Series(
        [100.0, 150.0 + (objective or 0)], index=pd.date_range("2001-01-01", periods=2, tz="UTC")
    )
    stats = performance_stats(curve, periods_per_year=252)
    return TrialResult(
        fold=task.fold.index,
        number=task.number,
        params=task.params,
        session_id=task.session_id,
        record=task.record,
        status="complete",
        objective=objective,
        in_sample=stats,
        out_of_sample=stats,
        decisions=11 if task.record else 0,
        worker=f"fake:{task.number % 2}",
        peak_rss_mb=100.0 + task.number,
    )


class FakeEngine:
    """Runs tasks in memory; returns them two at a time, the later one first (out of order).
    ``stop_after``: after that many results, call ``on_stop`` (a signal arriving)."""

    def __init__(self, capacity: int = 3, stop_after: int | None = None) -> None:
        self.workers = capacity
        self.capacity = capacity
        self.description = "fake engine"
        self.queue: deque[TrialTask] = deque()
        self.returned = 0
        self.stop_after = stop_after
        self.on_stop: Any = None
        self.submitted = 0

    def submit(self, task: TrialTask) -> None:
        self.queue.append(task)
        self.submitted += 1

    def in_flight(self) -> int:
        return len(self.queue)

    def wait(self, timeout_s: float) -> list[TrialResult]:
        batch = [self.queue.popleft() for _ in range(min(2, len(self.queue)))]
        out = [result_of(t) for t in reversed(batch)]
        self.returned += len(out)
        if self.stop_after is not None and self.returned >= self.stop_after:
            self.on_stop()
        return out

    def drain(self) -> list[TrialResult]:
        running = [self.queue.popleft()] if self.queue else []  # one was running
        self.queue.clear()  # the rest had not started
        self.returned += len(running)
        return [result_of(t) for t in running]

    def close(self) -> None:
        self.queue.clear()


class FakeRecorder:
    def __init__(self) -> None:
        self.tasks: list[TrialTask] = []

    def run(self, task: TrialTask) -> TrialResult:
        self.tasks.append(task)
        return result_of(task)


def make_study(
    tmp_path: Path, engine: FakeEngine, record: str, recorder: Any = None
) -> tuple[Study, DuckDBTrialStore]:
    settings = OptimizeConfig(
        space={"fast": [5, 7, 10, 20], "slow": [30, 90]},
        record=record,  # type: ignore[arg-type]
    )
    job = StudyJob(
        study_id="S",
        agent="agents.sma_cross:SmaCrossAgent",
        feeds=(),
        fmel=FMELConfig(local_path=tmp_path / "fmel.duckdb"),
    )
    store = DuckDBTrialStore(tmp_path / "fmel.duckdb")
    store.open()
    study = Study(
        job=job,
        folds=FOLDS,
        settings=settings,
        engine=engine,
        store=store,
        progress=Progress(16, folds=2, metric="sharpe", mode="off"),
        recorder=recorder,
        symbols=("A", "B"),
    )
    engine.on_stop = study.request_stop
    return study, store


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_every_trial_is_stored_and_each_fold_keeps_its_best(tmp_path: Path) -> None:
    recorder = FakeRecorder()
    study, store = make_study(tmp_path, FakeEngine(), "best", recorder)
    summary = study.run()
    store.close()
    assert (summary.trials, summary.failed, summary.planned) == (16, 4, 16)
    assert not summary.interrupted and summary.error is None
    db = tmp_path / "fmel.duckdb"
    assert rows(db, "SELECT count(*), count(DISTINCT session_id) FROM trials") == [(16, 16)]
    assert rows(
        db, "SELECT count(*) FROM trials WHERE status = 'failed' AND error LIKE 'ValueError%'"
    ) == [(4,)]
    folds = rows(
        db,
        "SELECT fold, complete, best_trial, best_params, recorded, decisions, trials, failed "
        "FROM folds ORDER BY fold",
    )
    # grid order: (5,30) (5,90) (7,30) (7,90) (10,30) (10,90) (20,30) (20,90)
    assert folds == [
        (0, True, 4, '{"fast": 10, "slow": 30}', True, 11, 8, 2),
        (1, True, 6, '{"fast": 20, "slow": 30}', True, 11, 8, 2),
    ]
    # the best of each fold re-run once with recording, under the trial's own session id
    assert [(t.fold.index, t.number, t.record, t.session_id) for t in recorder.tasks] == [
        (0, 4, True, trial_session_id("S", 0, 4)),
        (1, 6, True, trial_session_id("S", 1, 6)),
    ]
    assert summary.peak_rss_mb == {"fake:0": 106.0, "fake:1": 107.0}


def test_a_stop_stores_what_was_running_and_marks_open_folds_incomplete(tmp_path: Path) -> None:
    engine = FakeEngine(capacity=4, stop_after=4)
    study, store = make_study(tmp_path, engine, "best", FakeRecorder())
    summary = study.run()
    store.close()
    assert summary.interrupted
    # 4 returned before the stop, then the one running; the queued one was dropped
    assert summary.trials == engine.returned == 5 < engine.submitted
    db = tmp_path / "fmel.duckdb"
    assert rows(db, "SELECT count(*) FROM trials") == [(5,)]
    assert rows(db, "SELECT fold, complete, recorded FROM folds") == [(0, False, False)]


def test_ties_and_undefined_objectives_do_not_win(tmp_path: Path) -> None:
    study, store = make_study(tmp_path, FakeEngine(capacity=8), "none")
    summary = study.run()
    store.close()
    for outcome in summary.folds:
        assert outcome.best is not None and outcome.best.params["slow"] == 30  # 90: undefined
        assert not outcome.recorded
    assert rows(
        tmp_path / "fmel.duckdb", "SELECT count(*) FROM trials WHERE objective IS NULL"
    ) == [(10,)]  # slow=90 (8) and the failed fast=7 slow=30 (2)


def test_record_all_marks_every_trial_recorded(tmp_path: Path) -> None:
    study, store = make_study(tmp_path, FakeEngine(), "all")
    summary = study.run()
    store.close()
    assert all(o.recorded and o.decisions == 11 for o in summary.folds)
    db = tmp_path / "fmel.duckdb"
    assert rows(db, "SELECT bool_and(recorded) FROM trials") == [(True,)]


def test_a_worker_part_under_a_path_with_an_apostrophe_is_merged(tmp_path: Path) -> None:
    """attack15 quote/: ATTACH binds the path, so ``O'Brien`` neither breaks nor injects SQL."""
    from analyzers.sinks.duckdb import LocalDuckDBSink

    home = tmp_path / "o'brien"
    home.mkdir()
    part = home / "part'; DROP TABLE decisions; --.duckdb"
    sink = LocalDuckDBSink(part)  # an empty worker part with the decisions schema
    sink.open()
    sink.close()
    store = DuckDBTrialStore(home / "fmel.duckdb")
    store.open()
    try:
        assert store.merge_part(part) == 0
        assert store._con.execute("SELECT count(*) FROM decisions").fetchone() == (0,)
    finally:
        store.close()
    assert not part.exists()


@pytest.mark.parametrize(
    ("table", "ddl"),
    [
        ("trials", "CREATE TABLE trials (x INTEGER, note VARCHAR)"),
        ("folds", "CREATE TABLE folds (x INTEGER)"),
        ("trials", None),  # a study table with one column of another type
    ],
)
def test_a_table_of_another_shape_is_refused_when_the_store_opens(
    tmp_path: Path, table: str, ddl: str | None
) -> None:
    """helper-74: a ``trials`` or ``folds`` table made by something else passed ``CREATE TABLE
    IF NOT EXISTS`` and failed the study at its first insert (BinderException, exit 1)."""
    path = tmp_path / "fmel.duckdb"
    if ddl is None:
        made = DuckDBTrialStore(path)  # a real study's tables, then one column changed
        made.open()
        made.close()
        con = duckdb.connect(str(path))
        con.execute("ALTER TABLE trials ALTER objective TYPE VARCHAR")
    else:
        con = duckdb.connect(str(path))
        con.execute(ddl)
    con.close()
    store = DuckDBTrialStore(path)
    with pytest.raises(SinkError, match=f"table {table!r} is not a study table") as raised:
        store.open()
    store.close()
    if ddl is None:
        assert "objective DOUBLE (is VARCHAR)" in str(raised.value)
    again = DuckDBTrialStore(tmp_path / "fresh.duckdb")
    again.open()  # a study's own tables pass
    again.close()
