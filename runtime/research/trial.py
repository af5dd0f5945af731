"""One trial: one backtest of the agent with one set of params over one fold, scored.

A worker process (or Ray actor) holds a :class:`Backtester` built once from the study's
:class:`StudyJob` and the bars of every feed (read once per worker); each :meth:`Backtester.run`
slices the fold's window out of those bars (numpy views, no copy), composes the run from the
same building blocks as the Runner (:mod:`runtime.assembly`: engine flags, simulated broker,
FMEL), and returns a :class:`TrialResult` holding only numbers: the equity curve is reduced to
in-sample and out-of-sample statistics (:mod:`runtime.stats`) inside the worker and dropped.

One backtest covers ``[train_start, test_end)``: in-sample statistics come from the part of the
equity curve before ``train_end``, out-of-sample ones from the rest, its first return measured
from the last in-sample value. The selection (:mod:`runtime.research.study`) sees only the
in-sample objective; the test window continues the same run (indicators warm, any open position
carried), as the agent would have traded had it been running since ``train_start``.

Thread context: :meth:`Backtester.run` runs on the worker's main thread (backtrader's rule);
with FMEL on, the decision writer's thread is started and joined inside the call.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import backtrader as bt
import numpy as np
import pandas as pd

from analyzers.fmel import FMELAnalyzer
from core import bar_hash_cache
from core.errors import DataError
from core.time import BT_EPOCH_DAYS, SECONDS_PER_DAY
from feeds.csv import CSVBars, CSVFeedConfig, RowHashes, make_csv_feed
from runtime.assembly import (
    add_fmel,
    load_agent,
    make_cerebro,
    make_sink,
    make_writer,
    setup_sim_broker,
)
from runtime.report import EquityCurve
from runtime.research.config import Metric
from runtime.research.folds import Fold
from runtime.research.space import Params, TrialState
from runtime.stats import NOISE_DRAWDOWN, PerformanceStats, performance_stats

if TYPE_CHECKING:
    from analyzers.config import FMELConfig
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig
    from runtime.brokers.risk import RiskConfig

logger = logging.getLogger(__name__)

#: Checkpoints of a pruned search: the in-sample window is cut in this many steps.
PRUNE_STEPS = 10
_MAX_ERROR_CHARS = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class StudyJob:
    """Everything a worker needs to run trials; picklable, sent once per worker.

    Attributes:
        study_id: session id of the optimisation run.
        agent: ``module:Class``.
        base_params: ``AGENT_PARAMS``; each trial's params override them.
        agent_id: ``AGENT_ID`` of recorded decisions (``None``: the class name).
        feeds: one CSV feed config per symbol (``DATA_DIR`` / ``SYMBOLS`` / ``CSV_*``).
        cash_usd, commission: the simulated broker.
        risk: ``RISK_*`` limits (``None``: none).
        metric: the objective.
        periods_per_year: annualisation of every statistic (:func:`runtime.stats.
            periods_per_year` over the whole span, so all folds are on one scale).
        fmel: decision recording settings (recorded trials).
        bigquery: the BigQuery sink (``FMEL_SINK=bigquery``), else ``None``.
        parts_dir: with the local sink, a recorded trial in a worker writes its own DuckDB file
            here (``<session>.duckdb``), merged into ``FMEL_LOCAL_PATH`` by the driver (DuckDB
            has one writing process per file). ``None``: write to the configured sink.
        writer_timeout_s: longest the decision writer may take to flush at the end, seconds.
        log_level: the workers' log level.
    """

    study_id: str
    agent: str
    base_params: Mapping[str, Any] = field(default_factory=dict)
    agent_id: str | None = None
    feeds: tuple[CSVFeedConfig, ...]
    cash_usd: float = 100_000.0
    commission: float = 0.001
    risk: RiskConfig | None = None
    metric: Metric = "sharpe"
    periods_per_year: float = 252.0
    fmel: FMELConfig
    bigquery: BigQuerySinkConfig | None = None
    parts_dir: Path | None = None
    writer_timeout_s: float = 30.0
    log_level: str = "INFO"


@dataclass(frozen=True, slots=True)
class PruneSnapshot:
    """What a worker needs to decide on pruning: the completed trials of the fold so far.

    Attributes:
        completed: ``(objective, intermediate values)`` per completed trial; an intermediate
            value is ``None`` where the running objective was undefined at that step.
    """

    completed: tuple[tuple[float, tuple[float | None, ...]], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialTask:
    """One backtest to run.

    Attributes:
        fold: the windows.
        number: trial number within the fold.
        params: the agent params under test.
        session_id: the trial's session id (its decisions carry it when recorded).
        record: run with FMEL on.
        prune: pruning snapshot (``None``: never prune).
    """

    fold: Fold
    number: int
    params: Params
    session_id: str
    record: bool = False
    prune: PruneSnapshot | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialResult:
    """What came back from one trial: numbers only.

    Attributes:
        fold, number, params, session_id, record: as in the task.
        status: ``complete``, ``failed`` (the agent or the data raised; see ``error``) or
            ``pruned`` (stopped early; statistics cover the bars run).
        objective: the in-sample objective, higher is better (``max_drawdown`` negated);
            ``None`` when undefined (e.g. a flat curve has no Sharpe) or not complete.
        in_sample, out_of_sample: statistics of each window (``None``: none run / no test).
        intermediate: running in-sample objective at each pruning checkpoint.
        decisions: decision records written (recorded trials).
        error: ``Type: message`` of a failed trial (truncated).
        elapsed_s: wall time of the trial, seconds.
        worker: ``host:pid`` that ran it.
        peak_rss_mb: that worker's peak resident memory so far, MiB.
    """

    fold: int
    number: int
    params: Params
    session_id: str
    record: bool
    status: TrialState
    objective: float | None
    in_sample: PerformanceStats | None
    out_of_sample: PerformanceStats | None
    intermediate: tuple[float | None, ...] = ()
    decisions: int = 0
    error: str | None = None
    elapsed_s: float = 0.0
    worker: str = ""
    peak_rss_mb: float = 0.0


def objective_of(stats: PerformanceStats | None, metric: Metric) -> float | None:
    """The objective from window statistics, oriented so that higher is better."""
    if stats is None:
        return None
    value = {
        "sharpe": stats.sharpe,
        "sortino": stats.sortino,
        "calmar": stats.calmar,
        "return": stats.total_return_pct,
        "max_drawdown": None if stats.max_drawdown_pct is None else -stats.max_drawdown_pct,
    }[metric]
    if value is None and metric in ("sortino", "calmar") and _dominant(stats):
        # no losing bar / no drawdown and a gain: the ratio divides by zero risk, +inf,
        # which must rank best, not undefined (docs/research.md, "Objective").
        return math.inf
    return value if value is not None and not math.isnan(value) else None


def _dominant(stats: PerformanceStats) -> bool:
    """A gain without any drawdown (max drawdown 0 %, or rounding noise: at most
    :data:`runtime.stats.NOISE_DRAWDOWN`, where :func:`performance_stats` leaves Calmar
    undefined; total return > 0 %): Sortino (no downside) and Calmar (no drawdown) are +inf.
    helper-74: this took 1e-10 % (1e-12 of equity) while the stats took 1e-9 of equity, so a
    gain with a drawdown between the two scored None and lost to a worse trial."""
    return (
        stats.max_drawdown_pct is not None
        and stats.max_drawdown_pct <= NOISE_DRAWDOWN * 100.0
        and stats.total_return_pct is not None
        and stats.total_return_pct > 0
    )


def _naive_ns(t: datetime) -> np.datetime64:
    return np.datetime64(t.replace(tzinfo=None), "ns")


def slice_bars(bars: CSVBars, start: datetime, end: datetime) -> CSVBars:
    """The bars with ``start <= time < end`` (aware UTC bounds), sharing ``bars``' arrays.

    Raises:
        DataError: when no bar of ``bars.symbol`` falls in the window.
    """
    i, j = np.searchsorted(bars.times, [_naive_ns(start), _naive_ns(end)], side="left")
    if j <= i:
        raise DataError(f"{bars.symbol}: no bars in [{start:%Y-%m-%d %H:%M}, {end:%Y-%m-%d %H:%M})")
    return dataclasses.replace(
        bars,
        times=bars.times[i:j],
        numeric={k: v[i:j] for k, v in bars.numeric.items()},
        text={k: v[i:j] for k, v in bars.text.items()},
        hashes=bars.hashes[i:j],
        skipped=[],
        lines=None if bars.lines is None else bars.lines[i:j],
    )


def split_curve(equity: pd.Series, fold: Fold) -> tuple[pd.Series, pd.Series | None]:
    """``(in-sample, out-of-sample)`` parts of a fold's equity curve (aware UTC index).

    The out-of-sample part starts with the last in-sample point, so its first return is the
    first test bar's; ``None`` for a fold without a test window.
    """
    boundary = pd.Timestamp(fold.train_end)
    in_sample = equity[equity.index < boundary]
    if fold.test_end is None:
        return in_sample, None
    out = equity[equity.index >= boundary]
    if len(in_sample) and len(out):
        out = pd.concat([in_sample.iloc[-1:], out])
    return in_sample, out


class _Checkpoints(bt.Analyzer):  # type: ignore[misc]
    """Calls ``on_step(step, curve_so_far)`` when the bar time passes each checkpoint; a True
    answer stops the run (``cerebro.runstop()``: the trial is pruned).

    Params:
        times (tuple[float]): checkpoint times as backtrader day numbers, ascending.
        on_step (callable): ``(step, pd.Series) -> bool``.
    """

    params = (("times", ()), ("on_step", None))

    def start(self) -> None:
        self._values: list[float] = []
        self._stamps: list[float] = []
        self._step = 0
        self.pruned = False

    def _point(self) -> None:
        now = self.strategy.datetime[0]
        self._stamps.append(now)
        self._values.append(float(self.strategy.broker.getvalue()))
        times = self.p.times
        while self._step < len(times) and now >= times[self._step]:
            posix_ms = (np.asarray(self._stamps) - BT_EPOCH_DAYS) * SECONDS_PER_DAY * 1000.0
            curve = pd.Series(
                self._values, index=pd.to_datetime(np.round(posix_ms), unit="ms", utc=True)
            )
            if self.p.on_step(self._step, curve):
                self.pruned = True
                self.strategy.env.runstop()
                return
            self._step += 1

    def prenext(self) -> None:
        self._point()

    def nextstart(self) -> None:
        self._point()

    def next(self) -> None:
        self._point()


#: What the pruner is told for an infinite objective (a gain without drawdown: Sortino and
#: Calmar are +inf, docs/research.md): the median of values holding +inf was NaN (inf - inf),
#: and nothing trails NaN, so nothing was pruned once a trial led with +inf (helper-74).
_PRUNER_BOUND = 1e300


def _for_pruner(value: float) -> float:
    """``value`` clipped to +-:data:`_PRUNER_BOUND` (same order, every value finite)."""
    return max(-_PRUNER_BOUND, min(_PRUNER_BOUND, value))


class _LocalPruner:
    """Optuna's ``MedianPruner`` judging one running trial against a snapshot of the fold's
    completed trials (built in the worker; the driver's study stays in the driver)."""

    def __init__(self, snapshot: PruneSnapshot, metric: Metric, periods_per_year: float) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Warm-up: no verdict on the first steps, where indicators have barely started.
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2)
        self.study = optuna.create_study(direction="maximize", pruner=pruner)
        self.study.add_trials(
            [
                optuna.trial.create_trial(
                    value=_for_pruner(value),
                    intermediate_values={
                        step: _for_pruner(v) for step, v in enumerate(steps) if v is not None
                    },
                )
                for value, steps in snapshot.completed
            ]
        )
        self.trial = self.study.ask()
        self.metric = metric
        self.periods_per_year = periods_per_year
        self.values: list[float | None] = []

    def __call__(self, step: int, curve: pd.Series) -> bool:
        value = objective_of(
            performance_stats(curve, periods_per_year=self.periods_per_year), self.metric
        )
        self.values.append(value)
        if value is None:  # undefined so far (e.g. no trade yet): no verdict
            return False
        self.trial.report(_for_pruner(value), step)
        return bool(self.trial.should_prune())


class _WatchedCurve(EquityCurve):
    """:class:`EquityCurve` that puts itself in ``watch`` (a list) at ``start``, so the curve
    and the bar being run can be read after the agent raised out of ``cerebro.run()``."""

    params = (("watch", None),)

    def start(self) -> None:
        super().start()
        if self.p.watch is not None:
            self.p.watch.append(self)


def _in_sample_of_failed(
    watch: list[Any], fold: Fold, periods_per_year: float
) -> PerformanceStats | None:
    """The in-sample statistics of a trial that failed on a bar of its test window (its train
    window ran whole), else None. helper-74: a trial that raised only out of sample was left
    out of the in-sample choice, so the choice knew the test window (hindsight)."""
    if fold.test_end is None or not watch:
        return None
    curve = watch[0]
    try:
        failed_at = bt.num2date(curve.strategy.datetime[0]).replace(tzinfo=UTC)
    except (IndexError, ValueError, AttributeError):
        return None  # failed before the first bar
    if failed_at < fold.train_end:
        return None
    in_curve, _ = split_curve(curve.series(), fold)
    if in_curve.empty:
        return None
    return performance_stats(in_curve, periods_per_year=periods_per_year)


class Backtester:
    """Runs trials over bars held in memory. One per worker process; not thread-safe.

    Args:
        job: the study.
        bars: symbol -> all of that symbol's bars (read once per worker).

    Raises:
        ConfigError: the agent cannot be loaded.
    """

    def __init__(self, job: StudyJob, bars: Mapping[str, CSVBars]) -> None:
        self.job = job
        self.bars = dict(bars)
        # recorded trials need their windows' data hashes: a file hashed by an earlier run
        # gives every window its hashes (RowHashes slices), without hashing or a file each
        bar_hash_cache.configure(job.fmel.hash_cache_dir)
        for b in self.bars.values():
            if isinstance(b.hashes, RowHashes):
                b.hashes.from_disk()
        self.agent_cls = load_agent(job.agent, dict(job.base_params))
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.written = 0  # decisions the last trial's writer stored (also when it failed)

    def run(self, task: TrialTask) -> TrialResult:
        """Run one trial. Errors of the agent or the data make a ``failed`` result (the study
        goes on); nothing is raised except ``KeyboardInterrupt``/``SystemExit``."""
        t0 = time.perf_counter()
        self.written = 0

        def result(status: TrialState, **kw: Any) -> TrialResult:
            return TrialResult(
                fold=task.fold.index,
                number=task.number,
                params=task.params,
                session_id=task.session_id,
                record=task.record,
                status=status,
                worker=self.worker,
                elapsed_s=time.perf_counter() - t0,
                peak_rss_mb=peak_rss_mb(),
                **kw,
            )

        watch: list[Any] = []  # the run's EquityCurve, to read after a failure
        try:
            equity, pruner, pruned, decisions = self._backtest(task, watch)
            in_curve, out_curve = split_curve(equity, task.fold)
            ppy = self.job.periods_per_year
            in_stats = performance_stats(in_curve, periods_per_year=ppy)
            out_stats = (
                performance_stats(out_curve, periods_per_year=ppy)
                if out_curve is not None and not pruned
                else None
            )
            if out_stats is not None and out_curve is not None and len(in_curve) and len(out_curve):
                # the curve starts at the last in-sample value (its first return is the first
                # test bar's): that point is not a test bar (helper-74: oos_bars was one more)
                out_stats = dataclasses.replace(out_stats, bars=out_stats.bars - 1)
        except BaseException as e:
            # The agent is user code: whatever it raises (a rejected combination such as
            # fast >= slow, a bug, even sys.exit() or KeyboardInterrupt, which would otherwise
            # end a pool worker and with it the study) makes this trial failed, stored with its
            # error; the study goes on. A study whose every trial failed ends with exit code 1.
            # A real Ctrl-C never lands here: the study's signal handler takes SIGINT in the
            # parent (no exception), pool workers ignore it, a second signal calls os._exit.
            logger.debug("trial %s failed", task.session_id, exc_info=True)
            error = f"{type(e).__name__}: {e}"
            if isinstance(e, IndexError):
                # backtrader's own words when an indicator's period is longer than the data
                # (a fresh-context attack: "array assignment index out of range" alone)
                error += (
                    " (backtrader raises this when an indicator's period is longer than the "
                    "trial's window: fewer bars than a param asks for?)"
                )
            failed_in = _in_sample_of_failed(watch, task.fold, self.job.periods_per_year)
            return result(
                "failed",
                objective=objective_of(failed_in, self.job.metric) if failed_in else None,
                in_sample=failed_in,
                out_of_sample=None,
                error=error[:_MAX_ERROR_CHARS],
                decisions=self.written,
            )
        return result(
            "pruned" if pruned else "complete",
            objective=objective_of(in_stats, self.job.metric) if not pruned else None,
            in_sample=in_stats,
            out_of_sample=out_stats,
            intermediate=tuple(pruner.values) if pruner is not None else (),
            decisions=decisions,
        )

    def _backtest(
        self, task: TrialTask, watch: list[Any]
    ) -> tuple[pd.Series, _LocalPruner | None, bool, int]:
        job, fold = self.job, task.fold
        cerebro = make_cerebro(live=False)
        for fc in job.feeds:
            window = slice_bars(self.bars[fc.symbol], fold.train_start, fold.end)
            cerebro.adddata(make_csv_feed(fc, window), name=fc.symbol)
        setup_sim_broker(cerebro, cash_usd=job.cash_usd, commission=job.commission, risk=job.risk)
        cerebro.addanalyzer(_WatchedCurve, _name="equity", watch=watch)
        pruner = None
        if task.prune is not None:
            pruner = _LocalPruner(task.prune, job.metric, job.periods_per_year)
            span = fold.train_end - fold.train_start
            marks = [fold.train_start + span * (k / PRUNE_STEPS) for k in range(1, PRUNE_STEPS)]
            cerebro.addanalyzer(
                _Checkpoints,
                _name="checkpoints",
                times=tuple(bt.date2num(m.replace(tzinfo=None)) for m in marks),
                on_step=pruner,
            )
        params = {**dict(job.base_params), **task.params}
        writer = None
        if task.record:
            writer = self._writer(task.session_id)
            add_fmel(
                cerebro,
                self.agent_cls,
                agent_params=params,
                writer=writer,
                session_id=task.session_id,
                agent_id=job.agent_id,
                mode="optimize",
                strict_lookahead=job.fmel.strict_lookahead,
            )
        elif job.fmel.strict_lookahead:
            # FMEL_STRICT_LOOKAHEAD: every trial's reads are checked, recorded or not, so a
            # trial that reads ahead fails (helper-74: unrecorded trials ran unchecked, and a
            # look-ahead agent won the search, +197 % out of sample)
            cerebro.addanalyzer(
                FMELAnalyzer, _name="fmel", strict_lookahead=True, keep_records=False
            )
        cerebro.addstrategy(self.agent_cls, **params)
        decisions = self.written = 0
        if writer is not None:
            writer.start()
        try:
            strategy = cerebro.run()[0]
        finally:
            if writer is not None:
                # also when the agent raised: a failed trial's row counts what it recorded
                decisions = self.written = writer.stop(timeout_s=job.writer_timeout_s).written
        pruned = bool(pruner is not None and strategy.analyzers.checkpoints.pruned)
        return strategy.analyzers.equity.series(), pruner, pruned, decisions

    def _writer(self, session_id: str) -> Any:
        job = self.job
        if job.parts_dir is not None and job.fmel.sink == "local":
            from analyzers.sinks.duckdb import LocalDuckDBSink

            sink: Any = LocalDuckDBSink(part_path(job.parts_dir, session_id))
            spill = job.parts_dir / f"{session_id}.spill"
        else:
            sink = make_sink(job.fmel, job.bigquery)
            spill = None
        return make_writer(job.fmel, sink, spill_dir=spill)


def part_path(parts_dir: Path, session_id: str) -> Path:
    """The DuckDB file a worker writes a recorded trial's decisions to."""
    return parts_dir / f"{session_id}.duckdb"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
