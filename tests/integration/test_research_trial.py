"""Trials on the bundled real data: recording changes no result, pruning stops a trial that
trails the fold's completed trials (Optuna's MedianPruner), the process pool gives the sequential
results, and a failing combination is a failed trial, not a failed study."""

from __future__ import annotations

import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from agents.sma_cross import SmaCrossAgent
from analyzers.config import FMELConfig
from feeds.csv import CSVFeedConfig, read_csv_bars
from runtime.research.engine import InlineEngine, PoolEngine
from runtime.research.folds import Fold
from runtime.research.trial import Backtester, PruneSnapshot, StudyJob, TrialTask
from tests.conftest import DATA

FOLD = Fold(
    0,
    datetime(2004, 8, 19, tzinfo=UTC),
    datetime(2007, 8, 19, tzinfo=UTC),
    datetime(2008, 8, 19, tzinfo=UTC),
)


def job(tmp_path: Path) -> StudyJob:
    feeds = tuple(
        CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s) for s in ("GOOG", "SP500", "NASDAQ")
    )
    return StudyJob(
        study_id="T",
        agent="agents.sma_cross:SmaCrossAgent",
        feeds=feeds,
        fmel=FMELConfig(local_path=tmp_path / "fmel.duckdb", spill_dir=tmp_path / "spill"),
        periods_per_year=252.0,
    )


@pytest.fixture(scope="module")
def bars() -> dict[str, object]:
    return {
        s: read_csv_bars(CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s))
        for s in ("GOOG", "SP500", "NASDAQ")
    }


def task(number: int, fast: int, slow: int, **kw: object) -> TrialTask:
    return TrialTask(
        fold=FOLD,
        number=number,
        params={"fast": fast, "slow": slow},
        session_id=f"T-{number}",
        **kw,  # type: ignore[arg-type]
    )


def test_recording_a_trial_changes_none_of_its_numbers(tmp_path: Path, bars: dict) -> None:
    bt = Backtester(job(tmp_path), bars)
    plain = bt.run(task(0, 10, 30))
    recorded = bt.run(task(0, 10, 30, record=True))
    assert plain.status == recorded.status == "complete"
    assert recorded.in_sample == plain.in_sample
    assert recorded.out_of_sample == plain.out_of_sample
    assert plain.decisions == 0
    with duckdb.connect(str(tmp_path / "fmel.duckdb"), read_only=True) as con:
        n, mode, last = con.execute(
            "SELECT count(*), any_value(mode), arg_max(portfolio_value, decision_point) "
            "FROM decisions WHERE session_id = 'T-0'"
        ).fetchone()
    # one decision per bar of the fold (train + test), the last value is the curve's last
    assert n == recorded.decisions == plain.in_sample.bars + plain.out_of_sample.bars
    assert mode == "optimize"
    assert last == pytest.approx(plain.out_of_sample.end_value_usd, rel=1e-12)


def test_a_rejected_combination_is_a_failed_trial(tmp_path: Path, bars: dict) -> None:
    result = Backtester(job(tmp_path), bars).run(task(1, 40, 30))
    assert result.status == "failed" and result.objective is None
    assert result.error == "ValueError: need 0 < fast < slow, got fast=40 slow=30"


class FailsAtBar6(SmaCrossAgent):
    """Raises at its sixth ``next()``."""

    def next(self) -> None:
        if len(self) - self.p.slow + 1 >= 6:
            raise RuntimeError("boom at bar 6")
        super().next()


def test_a_recorded_trial_that_fails_counts_the_decisions_it_stored(
    tmp_path: Path, bars: dict
) -> None:
    """A fresh-context attack: the failed trial's row said ``decisions = 0`` while the store
    held its decisions."""
    bt = Backtester(replace(job(tmp_path), agent=f"{__name__}:FailsAtBar6"), bars)
    result = bt.run(task(2, 10, 30, record=True))
    assert result.status == "failed" and result.error == "RuntimeError: boom at bar 6"
    with duckdb.connect(str(tmp_path / "fmel.duckdb"), read_only=True) as con:
        (n,) = con.execute("SELECT count(*) FROM decisions WHERE session_id = 'T-2'").fetchone()
    assert n > 0 and result.decisions == n
    # the next trial of the same worker starts from zero
    assert bt.run(task(3, 40, 30, record=True)).decisions == 0


def test_an_index_error_of_a_period_longer_than_the_window_says_so(
    tmp_path: Path, bars: dict
) -> None:
    result = Backtester(job(tmp_path), bars).run(task(4, 10, 3000))
    assert result.status == "failed"
    assert result.error is not None and result.error.startswith("IndexError")
    assert "period is longer than the trial's window" in result.error


def test_median_pruning_stops_a_trial_that_trails_the_completed_ones(
    tmp_path: Path, bars: dict
) -> None:
    bt = Backtester(job(tmp_path), bars)
    full = bt.run(task(2, 10, 30))
    strong = PruneSnapshot(tuple((9.0, (9.0,) * 9) for _ in range(5)))  # 5 finished, far better
    pruned = bt.run(task(2, 10, 30, prune=strong))
    assert pruned.status == "pruned" and pruned.objective is None
    assert pruned.out_of_sample is None
    # stopped at the first checkpoint past the warm-up (3 of 10 steps) instead of the end
    assert pruned.in_sample.bars < full.in_sample.bars * 0.5
    weak = PruneSnapshot(tuple((-9.0, (-9.0,) * 9) for _ in range(5)))
    kept = bt.run(task(2, 10, 30, prune=weak))
    assert kept.status == "complete" and kept.in_sample == full.in_sample
    assert len(kept.intermediate) == 9


def test_the_process_pool_gives_the_sequential_results(tmp_path: Path, bars: dict) -> None:
    tasks = [
        task(i, fast, slow)
        for i, (fast, slow) in enumerate([(5, 30), (10, 30), (10, 60), (20, 60)])
    ]
    inline = InlineEngine(job(tmp_path), bars)
    pool = PoolEngine(job(tmp_path), 2)
    try:
        got = {}
        for t in tasks:
            pool.submit(t)
        while pool.in_flight():
            for r in pool.wait(5.0):
                got[r.number] = r
        want = {}
        for t in tasks:
            inline.submit(t)
            (r,) = inline.wait(0)
            want[r.number] = r
    finally:
        pool.close()
        inline.close()
    assert {n: (r.objective, r.in_sample, r.out_of_sample) for n, r in got.items()} == {
        n: (r.objective, r.in_sample, r.out_of_sample) for n, r in want.items()
    }
    assert len({r.worker for r in got.values()}) == 2  # both workers ran trials


class Exiter(SmaCrossAgent):
    """``fast == 3``: ``sys.exit(3)``; ``fast == 4``: ``KeyboardInterrupt``; else SmaCross."""

    def __init__(self) -> None:
        if self.p.fast == 3:
            sys.exit(3)
        if self.p.fast == 4:
            raise KeyboardInterrupt
        super().__init__()


def test_sys_exit_or_keyboard_interrupt_in_an_agent_fails_only_its_trial(
    tmp_path: Path, bars: dict
) -> None:
    """attack15 exit_3_w2 / exit_4_w2: the pool worker survives and runs the next trial."""
    j = replace(job(tmp_path), agent=f"{__name__}:Exiter")
    pool = PoolEngine(j, 1)
    try:
        for i, fast in enumerate((3, 4, 10)):
            pool.submit(task(i, fast, 30))
        got = {}
        while pool.in_flight():
            for r in pool.wait(5.0):
                got[r.number] = r
    finally:
        pool.close()
    assert got[0].status == "failed" and got[0].error == "SystemExit: 3"
    assert got[1].status == "failed" and got[1].error == "KeyboardInterrupt: "
    assert got[2].status == "complete" and got[2].worker == got[0].worker
