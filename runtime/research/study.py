"""The driver of a study: hands trials to an engine, streams results to the store, decides folds.

Loop (main thread)::

    while tasks remain and no stop was asked:
        fill the engine up to its capacity: the earliest fold whose search still proposes
        wait up to 0.25 s for results; for each:
            store its row -> tell the fold's search -> update the fold's best and the progress
            a fold whose search is exhausted and whose trials are all back is decided:
                best = highest in-sample objective (lowest trial number on ties)
                OPTIMIZE_RECORD=best: re-run it here with FMEL on (same session id)
                store the fold's row
    on a stop: the engine drops what has not started and returns what was running; those
    results are stored like the others; unfinished folds are stored with complete = false.

Only counters, the best result of each fold and (for pruning) each completed trial's objective
and checkpoint values stay in memory.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from runtime.research.config import OptimizeConfig
from runtime.research.engine import Engine, EngineError
from runtime.research.folds import Fold
from runtime.research.progress import Progress
from runtime.research.space import Search, make_search
from runtime.research.store import (
    DuckDBTrialStore,
    FoldOutcome,
    TrialStore,
    fold_row,
    trial_row,
)
from runtime.research.trial import (
    Backtester,
    PruneSnapshot,
    StudyJob,
    TrialResult,
    TrialTask,
    part_path,
)

logger = logging.getLogger(__name__)

_WAIT_S = 0.25  # how often the loop looks at the stop flag while trials run


def trial_session_id(study_id: str, fold: int, number: int) -> str:
    """``<study>-f002-t00017``: the session id of trial 17 of fold 2."""
    return f"{study_id}-f{fold:03d}-t{number:05d}"


@dataclass(slots=True)
class _FoldState:
    fold: Fold
    search: Search
    outstanding: int = 0
    exhausted: bool = False
    started: bool = False
    decided: bool = False
    trials: int = 0
    failed: int = 0
    pruned: int = 0
    best: TrialResult | None = None
    # (objective, checkpoint values) of completed trials: the pruning snapshot.
    completed: list[tuple[float, tuple[float | None, ...]]] = field(default_factory=list)


@dataclass(frozen=True, slots=True, kw_only=True)
class StudySummary:
    """How a study went (the folds' rows are in the store too).

    Attributes:
        folds: decided folds, in order.
        trials, failed, pruned: finished trials over all folds.
        planned: trials the searches planned.
        interrupted: stopped by a signal before the end.
        error: why the study stopped early (a worker died, the store failed), else ``None``.
        elapsed_s: wall time, seconds.
        engine: where the trials ran.
        peak_rss_mb: worker -> its peak resident memory, MiB.
    """

    study_id: str
    folds: tuple[FoldOutcome, ...]
    trials: int
    failed: int
    pruned: int
    planned: int
    interrupted: bool
    error: str | None
    elapsed_s: float
    engine: str
    peak_rss_mb: dict[str, float]


def better(a: TrialResult, b: TrialResult | None) -> bool:
    """``a`` beats ``b``: a higher objective, or the same and a lower trial number (so the
    choice does not depend on the order results arrive in)."""
    if a.objective is None:
        return False
    if b is None or b.objective is None:
        return True
    return (a.objective, -a.number) > (b.objective, -b.number)


class Study:
    """One optimisation run over its folds.

    Args:
        job: what the workers run.
        folds: the walk-forward folds.
        settings: ``OPTIMIZE_*``.
        engine: where trials run.
        store: where rows go.
        progress: the progress display.
        recorder: runs each fold's best again with FMEL on (``OPTIMIZE_RECORD=best``), in this
            process; ``None`` otherwise.
        symbols: the universe (stored with each fold).
    """

    def __init__(
        self,
        *,
        job: StudyJob,
        folds: Sequence[Fold],
        settings: OptimizeConfig,
        engine: Engine,
        store: TrialStore,
        progress: Progress,
        recorder: Backtester | None,
        symbols: Sequence[str],
    ) -> None:
        self.job = job
        self.settings = settings
        self.engine = engine
        self.store = store
        self.progress = progress
        self.recorder = recorder
        self.symbols = tuple(symbols)
        space = settings.parameters
        self._states = [
            _FoldState(
                fold,
                make_search(
                    space,
                    sampler=settings.sampler,
                    trials=settings.trials,
                    seed=settings.seed + fold.index,
                ),
            )
            for fold in folds
        ]
        self.planned = sum(s.search.total for s in self._states)
        self._outcomes: list[FoldOutcome] = []
        self._stopping = False
        self._rss: dict[str, float] = {}
        self._prune = settings.pruner == "median" and settings.sampler != "grid"

    def request_stop(self) -> None:
        """Stop handing out trials; running ones finish and are stored. Signal-handler safe
        (sets a flag the loop reads)."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> StudySummary:
        """Run to the end or to a stop.

        Raises:
            SinkError: the store refused rows (what was stored stays).
        """
        t0 = time.perf_counter()
        error = None
        try:
            while True:
                if not self._stopping:
                    self._fill()
                if self.engine.in_flight() == 0:
                    break
                results = self.engine.drain() if self._stopping else self.engine.wait(_WAIT_S)
                for result in results:
                    self._handle(result)
        except EngineError as e:
            logger.error("%s", e)
            error = str(e)
            self._stopping = True
        for state in self._states:  # stopped: what was started is stored, marked incomplete
            if state.started and not state.decided:
                self._decide(state, complete=False)
        self.store.flush()
        return StudySummary(
            study_id=self.job.study_id,
            folds=tuple(self._outcomes),
            trials=sum(s.trials for s in self._states),
            failed=sum(s.failed for s in self._states),
            pruned=sum(s.pruned for s in self._states),
            planned=self.planned,
            interrupted=self._stopping and error is None,
            error=error,
            elapsed_s=time.perf_counter() - t0,
            engine=self.engine.description,
            peak_rss_mb=dict(self._rss),
        )

    def _fill(self) -> None:
        while self.engine.in_flight() < self.engine.capacity:
            task = self._next_task()
            if task is None:
                return
            self.engine.submit(task)

    def _next_task(self) -> TrialTask | None:
        for state in self._states:
            if state.exhausted:
                continue
            proposal = state.search.ask()
            if proposal is None:
                state.exhausted = True
                if state.outstanding == 0 and not state.decided:
                    self._decide(state, complete=True)
                continue
            state.started = True
            state.outstanding += 1
            fold = state.fold
            return TrialTask(
                fold=fold,
                number=proposal.number,
                params=proposal.params,
                session_id=trial_session_id(self.job.study_id, fold.index, proposal.number),
                record=self.settings.record == "all",
                prune=PruneSnapshot(tuple(state.completed)) if self._prune else None,
            )
        return None

    def _handle(self, result: TrialResult) -> None:
        state = self._states[result.fold]
        state.outstanding -= 1
        state.trials += 1
        self._rss[result.worker] = max(self._rss.get(result.worker, 0.0), result.peak_rss_mb)
        parts = self.job.parts_dir
        if result.record and parts is not None and isinstance(self.store, DuckDBTrialStore):
            part = part_path(parts, result.session_id)
            try:
                self.store.merge_part(part)
            except Exception as e:
                import duckdb

                if not isinstance(e, duckdb.Error):
                    raise
                # helper-74: a trial whose notes outgrew the memory limit ended the study with
                # an uncaught OutOfMemoryException, and its decision file went with the parts
                kept = self.store.keep_unmerged(part)
                raise EngineError(
                    f"merging trial {result.session_id}'s decisions into {self.store.path} "
                    f"failed ({type(e).__name__}: {str(e)[:200]}); its decision file is kept "
                    f"at {kept} (DuckDB reads 2,048 decisions at a time: long notes need a "
                    "larger FMEL_LOCAL_MEMORY_LIMIT_MB)"
                ) from e
        self.store.add_trial(
            trial_row(result, study_id=self.job.study_id, fold=state.fold, metric=self.job.metric)
        )
        logger.debug(
            "trial %s stored: %s, objective %s", result.session_id, result.status, result.objective
        )
        state.search.tell(result.number, result.objective, result.status)
        if result.status == "failed":
            state.failed += 1
            logger.debug("trial %s failed: %s", result.session_id, result.error)
        elif result.status == "pruned":
            state.pruned += 1
        elif result.objective is not None:
            state.completed.append((result.objective, result.intermediate))
        # Chosen on the in-sample objective only: a trial that failed in its test window
        # (after its train window ran whole) keeps its in-sample objective and may be chosen;
        # leaving it out let the test window decide (helper-74).
        if result.status != "pruned" and better(result, state.best):
            state.best = result
        self.progress.update(fold=result.fold, objective=result.objective)
        if state.exhausted and state.outstanding == 0 and not state.decided:
            self._decide(state, complete=True)

    def _decide(self, state: _FoldState, *, complete: bool) -> None:
        state.decided = True
        best = state.best
        recorded, decisions = False, 0
        if best is not None and self.settings.record == "all":
            recorded, decisions = True, best.decisions
        elif best is not None and complete and self.recorder is not None and not self._stopping:
            recorded, decisions = self._record(best, state.fold)
        outcome = FoldOutcome(
            fold=state.fold,
            complete=complete,
            trials=state.trials,
            failed=state.failed,
            pruned=state.pruned,
            best=best,
            recorded=recorded,
            decisions=decisions,
        )
        self.store.add_fold(
            fold_row(
                outcome,
                study_id=self.job.study_id,
                metric=self.job.metric,
                sampler=self.settings.sampler,
                agent=self.job.agent,
                symbols=self.symbols,
            )
        )
        self._outcomes.append(outcome)
        logger.info(
            "fold %d %s: %s (%d trials, %d failed)",
            state.fold.index,
            state.fold.describe(),
            f"best {best.params} in-sample {self.job.metric} {_fmt(best.objective)}"
            if best
            else "no trial with a defined objective",
            state.trials,
            state.failed,
        )

    def _record(self, best: TrialResult, fold: Fold) -> tuple[bool, int]:
        """Re-run ``best`` with FMEL on, under its session id. Returns (recorded, decisions)."""
        assert self.recorder is not None
        result = self.recorder.run(
            TrialTask(
                fold=fold,
                number=best.number,
                params=best.params,
                session_id=best.session_id,
                record=True,
            )
        )
        if result.status != "complete":
            logger.error("recording fold %d's best failed: %s", fold.index, result.error)
            return False, result.decisions
        if not _same(result.objective, best.objective):
            # Tracking must change no result (docs/architecture.md): say so loudly.
            logger.error(
                "fold %d: the recorded run scored %s, the trial %s: FMEL changed the result",
                fold.index,
                result.objective,
                best.objective,
            )
        return True, result.decisions


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
