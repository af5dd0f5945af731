"""``MODE=optimize python runner.py``: compose a study from the configuration, run it, report.

:func:`run_optimize` is called by ``runtime.runner.main`` with the loaded configuration. It
checks everything it can before the first trial (the space against the agent's params, the
windows against the data, the engine against the sink), reads the CSV files once for the driver,
runs the :class:`~runtime.research.study.Study` and prints the folds side by side.

Signals: the first SIGINT/SIGTERM stops handing out trials; running trials finish and are
stored, unfinished folds are stored as incomplete, the report prints (marked INTERRUPTED) and
the exit code is 0. A second signal ends the workers and exits at once (128 + signal); every
trial row written before it stays in the store.

This package does not import ``runtime.config`` (that module imports these settings):
:class:`OptimizeAppConfig` names the parts of ``AppConfig`` read here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

import numpy as np
import pandas as pd

from core.errors import AppError, ConfigError, DataError, SinkError
from core.signals import take_held
from feeds.csv import CSVBars, CSVFeedConfig, read_csv_bars
from runtime.assembly import agent_param_names, json_kind, load_agent, param_type_problem
from runtime.research.config import MAX_SEED, OptimizeConfig
from runtime.research.engine import PoolEngine, make_engine
from runtime.research.folds import Fold, make_folds
from runtime.research.progress import Progress
from runtime.research.space import Choice, grid_size
from runtime.research.store import FoldOutcome, make_store
from runtime.research.study import Study, StudySummary
from runtime.research.trial import Backtester, StudyJob, objective_of
from runtime.stats import finest_bar_size, periods_per_year

if TYPE_CHECKING:
    from analyzers.config import FMELConfig
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig
    from runtime.brokers.risk import RiskConfig

logger = logging.getLogger(__name__)


class OptimizeAppConfig(Protocol):
    """What an optimisation reads of ``runtime.config.AppConfig``."""

    @property
    def run(self) -> Any: ...  # RunConfig: agent, agent_params, agent_id, symbols, cash...

    @property
    def csv_feeds(self) -> tuple[CSVFeedConfig, ...]: ...

    @property
    def fmel(self) -> FMELConfig: ...

    @property
    def bigquery(self) -> BigQuerySinkConfig | None: ...

    @property
    def risk(self) -> RiskConfig: ...

    @property
    def ops(self) -> Any: ...  # OpsConfig: log_level, shutdown_timeout_s

    @property
    def optimize(self) -> OptimizeConfig: ...


def common_span(bars: Mapping[str, CSVBars]) -> tuple[pd.Timestamp, pd.Timestamp]:
    """First and last bar time (naive UTC) that every symbol covers.

    Raises:
        DataError: the symbols' spans do not overlap.
    """
    first = max(pd.Timestamp(b.times[0]) for b in bars.values())
    last = min(pd.Timestamp(b.times[-1]) for b in bars.values())
    if first > last:
        spans = ", ".join(
            f"{s} {pd.Timestamp(b.times[0]):%Y-%m-%d}..{pd.Timestamp(b.times[-1]):%Y-%m-%d}"
            for s, b in bars.items()
        )
        raise DataError(f"SYMBOLS: the symbols' data do not overlap ({spans})")
    return first, last


def annualisation(bars: Mapping[str, CSVBars], first: pd.Timestamp, last: pd.Timestamp) -> float:
    """Periods per year of the study's equity curves: :func:`runtime.stats.periods_per_year`
    over every bar time of the common span, at the finest bar size (the run's clock)."""
    times = np.unique(np.concatenate([b.times for b in bars.values()]))
    times = times[(times >= first.to_datetime64()) & (times <= last.to_datetime64())]
    timeframe, compression = finest_bar_size([(b.timeframe, b.compression) for b in bars.values()])
    return periods_per_year(pd.DatetimeIndex(times), timeframe, compression)


def check_space(opt: OptimizeConfig, agent_cls: type) -> None:
    """The space names params the agent has.

    Raises:
        ConfigError: naming OPTIMIZE_SPACE.
    """
    if not opt.space:
        raise ConfigError(
            'OPTIMIZE_SPACE is required in MODE=optimize, e.g. {"fast": [5, 10, 20], '
            '"slow": {"low": 30, "high": 120, "step": 10}}'
        )
    known = agent_param_names(agent_cls)
    unknown = [p.name for p in opt.parameters if p.name not in known]
    if unknown:
        raise ConfigError(
            f"OPTIMIZE_SPACE: {agent_cls.__name__} has no param(s) {', '.join(unknown)}; "
            f"expected some of: {', '.join(known) or '(none)'}"
        )
    # each value as AGENT_PARAMS checks its own (a fresh-context attack: true ran as SMA(1) and
    # won; a range of floats for a whole-number param failed every trial after the study)
    defaults = dict(agent_cls.params._getitems())  # type: ignore[attr-defined]
    for p in opt.parameters:
        default = defaults.get(p.name)
        if isinstance(p, Choice):
            for value in p.values:
                problem = param_type_problem(default, value)
                if problem:
                    raise ConfigError(
                        f"OPTIMIZE_SPACE: param {p.name!r} of {agent_cls.__name__} {problem}, "
                        f"got {value!r} ({json_kind(value)})"
                    )
            if isinstance(default, float) and not isinstance(default, bool):
                # 1 and 1.0 are one value of a float param (helper-74: both ran as trials)
                seen = [float(v) for v in p.values if isinstance(v, int | float)]
                if len(set(seen)) < len(seen):
                    twice = next(v for v in seen if seen.count(v) > 1)
                    raise ConfigError(
                        f"OPTIMIZE_SPACE: param {p.name!r} of {agent_cls.__name__} is a number; "
                        f"{twice!r} is given twice (as a whole number and a decimal?)"
                    )
        else:
            # a range proposes numbers: whole ones when low, high and step are written whole
            # (helper-73: {"low": 1, "high": 2} for a string param passed, every trial failed)
            problem = param_type_problem(default, 1 if p.integer else 0.5)
            if problem:
                hint = (
                    ""
                    if p.integer or param_type_problem(default, 1) is not None
                    else " (whole numbers need low, high and step all written whole, e.g. 10 "
                    "not 10.0)"
                )
                kind = "whole numbers" if p.integer else "numbers"
                raise ConfigError(
                    f"OPTIMIZE_SPACE: param {p.name!r} of {agent_cls.__name__} {problem}, got a "
                    f"range of {kind}{hint}"
                )
    if getattr(agent_cls, "requires_model", False):
        raise ConfigError(
            f"MODE=optimize: {agent_cls.__name__} needs a model; optimising model agents is not "
            "supported (each worker would load its own copy)"
        )


def parts_root(local_path: Path) -> Path:
    """Folder of the per-trial decision files of ``OPTIMIZE_RECORD=all`` studies (one
    subfolder per study, removed at its end)."""
    return local_path.parent / f".{local_path.name}.parts"


def progress_mode(setting: str) -> Literal["bar", "log", "off"]:
    """``PROGRESS``: ``on`` -> bar, ``off`` -> off, ``auto`` -> bar on a terminal, else log."""
    if setting == "off":
        return "off"
    if setting == "on" or sys.stderr.isatty():
        return "bar"
    return "log"


def prepare(
    config: OptimizeAppConfig, *, study_id: str
) -> tuple[StudyJob, dict[str, CSVBars], list[Fold]]:
    """Check the configuration and the data, read the bars; nothing runs yet.

    Raises:
        ConfigError, DataError: naming the variable or the file.
    """
    opt, run = config.optimize, config.run
    agent_cls = load_agent(run.agent, dict(run.agent_params))
    check_space(opt, agent_cls)
    local = config.fmel.sink == "local"
    if opt.ray_address and opt.record == "all" and local:
        raise ConfigError(
            "OPTIMIZE_RECORD=all with RAY_ADDRESS needs FMEL_SINK=bigquery: Ray workers on "
            "other nodes cannot write this machine's DuckDB file (or use OPTIMIZE_RECORD=best)"
        )
    bars = {fc.symbol: read_csv_bars(fc) for fc in config.csv_feeds}
    first, last = common_span(bars)
    # calendar windows in the files' zone (one CSV_TIMEZONE for all: else UTC)
    zones = {fc.timezone for fc in config.csv_feeds}
    zone = zones.pop() if len(zones) == 1 else "UTC"
    folds = make_folds(first.to_pydatetime(), last.to_pydatetime(), opt.windows, zone)
    if opt.sampler != "grid" and opt.seed + len(folds) - 1 > MAX_SEED:
        raise ConfigError(
            f"OPTIMIZE_SEED={opt.seed}: fold k uses seed + k, and {len(folds)} folds reach "
            f"{opt.seed + len(folds) - 1}; expected at most {MAX_SEED - len(folds) + 1}"
        )
    parts_dir = None
    if opt.record == "all" and local:
        parts_dir = parts_root(config.fmel.local_path) / study_id
    job = StudyJob(
        study_id=study_id,
        agent=run.agent,
        base_params=dict(run.agent_params),
        agent_id=run.agent_id,
        feeds=tuple(config.csv_feeds),
        cash_usd=run.cash_usd,
        commission=run.commission,
        risk=config.risk if config.risk.enabled else None,
        metric=opt.metric,
        periods_per_year=annualisation(bars, first, last),
        fmel=config.fmel,
        bigquery=config.bigquery,
        parts_dir=parts_dir,
        writer_timeout_s=float(config.ops.shutdown_timeout_s),
        log_level=str(config.ops.log_level),
    )
    return job, bars, folds


class _Signals:
    """First SIGINT/SIGTERM: stop the study cleanly; second: end the workers, exit now."""

    def __init__(self, study: Study, engine: Any) -> None:
        self.study = study
        self.engine = engine
        self.count = 0
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.count > 1:
            logger.error("second %s: ending the workers and exiting now", name)
            if isinstance(self.engine, PoolEngine):
                self.engine.kill()
            for handler in logging.getLogger().handlers:
                with contextlib.suppress(Exception):
                    handler.flush()
            os._exit(128 + signum)
        logger.warning("%s: finishing the running trials, storing them, then reporting", name)
        self.study.request_stop()


class _StartInterrupted(BaseException):
    """SIGINT/SIGTERM before the study runs (workers or a Ray node starting): stop now.

    A BaseException like KeyboardInterrupt, so no ``except Exception`` on the way swallows it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StartSignals:
    """Signal handling from before the engine is built until the study's own handler takes
    over: a signal then raises :class:`_StartInterrupted` in the main thread, and the start-up
    unwinds (the engine, Ray included, is shut down on the way out)."""

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}
        self.signum: int | None = None  # the signal that interrupted the start-up

    def install(self) -> None:
        """Raises :class:`_StartInterrupted` at once for a signal :func:`core.signals.hold_early`
        held while the process started."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)
        held = take_held()
        if held:
            self.signum = held[0]
            raise _StartInterrupted(held[0])

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        raise _StartInterrupted(signum)


@dataclass(frozen=True, slots=True)
class OptimizeOutcome:
    """The end of ``MODE=optimize``: the exit code, the study's summary (``None`` when it never
    started) and the text report."""

    exit_code: int
    summary: StudySummary | None
    report: str


def run_optimize(config: OptimizeAppConfig, *, session_id: str, out: TextIO | None = None) -> int:
    """Run ``MODE=optimize`` and print its report. Main thread only (installs signal handlers).

    Args:
        config: the loaded configuration.
        session_id: the study id (the runner's session id).
        out: where the report goes (stdout).

    Returns:
        the exit code: 0 done (or stopped by a signal), 2 bad configuration or data, 1 the
        study failed (a worker died, the store failed, or every trial failed), 128 + the
        signal number (130 SIGINT, 143 SIGTERM) for a signal during start-up, before any
        trial ran.
    """
    outcome = optimize(config, session_id=session_id)
    out = out or sys.stdout
    out.write(outcome.report)
    out.flush()
    return outcome.exit_code


def optimize(config: OptimizeAppConfig, *, session_id: str) -> OptimizeOutcome:
    """Check, run and report a study (see :func:`run_optimize`)."""
    try:
        job, bars, folds = prepare(config, study_id=session_id)
    except (ConfigError, DataError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return OptimizeOutcome(2, None, "")
    # as a backtest's report says them (helper-74: only a log line said them here)
    skipped = {
        fc.path.name: len(bars[fc.symbol].skipped)
        for fc in config.csv_feeds
        if fc.symbol in bars and bars[fc.symbol].skipped
    }
    opt = config.optimize
    store = make_store(
        sink=config.fmel.sink,
        local_path=config.fmel.local_path,
        bigquery=config.bigquery,
        memory_limit_mb=config.fmel.local_memory_limit_mb,
    )
    engine = None
    signals = None
    progress = None
    start_signals = _StartSignals()
    try:
        start_signals.install()
        # the engine first: a cluster that cannot be reached leaves no store behind
        engine = make_engine(job, bars, workers=opt.workers, ray_address=opt.ray_address)
        try:
            store.open()
        except Exception as e:
            if config.fmel.sink != "local":
                # the study's tables cannot wait for BigQuery as a backtest's spilled decisions
                # do (helper-74: a refused connection ended in a traceback, exit 1)
                bq = config.bigquery
                where = f" in {bq.project}.{bq.dataset}" if bq is not None else ""
                raise ConfigError(
                    f"FMEL_SINK=bigquery: cannot create or open the study tables{where} "
                    f"({type(e).__name__}: {str(e)[:300]}); check "
                    "BIGQUERY_EMULATOR_HOST or the credentials (GOOGLE_CLOUD_PROJECT, "
                    "FMEL_DATASET) and that BigQuery can be reached"
                ) from e
            if not isinstance(e, (OSError, SinkError)):
                raise
            raise ConfigError(  # as the runner says it of a backtest's store
                f"FMEL_LOCAL_PATH={config.fmel.local_path}: cannot create or open the "
                f"decision store there ({type(e).__name__}: {e}); choose a writable path"
            ) from e
        recorder = Backtester(replace(job, parts_dir=None), bars) if opt.record == "best" else None
        if recorder is None:
            bars.clear()  # the driver keeps no data it does not use
        planned = len(folds) * (grid_size(opt.parameters) if opt.sampler == "grid" else opt.trials)
        progress = Progress(
            planned,
            folds=len(folds),
            metric=opt.metric,
            mode=progress_mode(config.run.progress),
        )
        study = Study(
            job=job,
            folds=folds,
            settings=opt,
            engine=engine,
            store=store,
            progress=progress,
            recorder=recorder,
            symbols=config.run.symbols,
        )
        logger.info(
            "study %s: %s search of %s over %d fold(s), %d trials planned, on %s",
            session_id,
            opt.sampler,
            ", ".join(p.name for p in opt.parameters),
            len(folds),
            study.planned,
            engine.description,
        )
        signals = _Signals(study, engine)
        signals.install()
        summary = study.run()
    except _StartInterrupted as e:
        logger.warning("%s during start-up: stopped before any trial ran", e)
        return OptimizeOutcome(128 + e.signum, None, "")
    except (ConfigError, DataError) as e:
        # before the generic clause below, which re-raises (RAY_ADDRESS with nothing
        # listening left a traceback and exit 1: a fresh-context attack)
        logger.error("%s: %s", type(e).__name__, e)
        return OptimizeOutcome(2, None, "")
    except AppError as e:
        logger.error("study failed: %s: %s", type(e).__name__, e)
        return OptimizeOutcome(1, None, "")
    except Exception as e:
        # A library that checks for signals turns the raised _StartInterrupted into its own
        # error (DuckDB: "RuntimeError: Query interrupted", an attack's finding)
        if start_signals.signum is None or signals is not None:
            raise
        name = signal.Signals(start_signals.signum).name
        logger.warning("%s during start-up (%s): stopped before any trial ran", name, e)
        return OptimizeOutcome(128 + start_signals.signum, None, "")
    finally:
        if progress is not None:
            progress.close()
        if engine is not None:
            engine.close()
        with contextlib.suppress(Exception):
            store.close()
        if signals is not None:
            signals.restore()
        start_signals.restore()
        if job.parts_dir is not None:
            shutil.rmtree(job.parts_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                job.parts_dir.parent.rmdir()  # only when no other study uses it
    report = render(
        summary, config, store.describe(), store.example_query(session_id), skipped_rows=skipped
    )
    code = 0
    if summary.error is not None:
        code = 1
    elif summary.trials and summary.failed == summary.trials:
        logger.error("every trial failed; their errors are in the trials table")
        code = 1
    return OptimizeOutcome(code, summary, report)


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def _metric_of(stats: Any, metric: str) -> float | None:
    if stats is None:
        return None
    if objective_of(stats, metric) == math.inf:  # type: ignore[arg-type]
        return math.inf  # a gain without drawdown: Sortino/Calmar +inf, printed "inf"
    name = {"return": "total_return_pct", "max_drawdown": "max_drawdown_pct"}.get(metric, metric)
    value = getattr(stats, name)
    return float(value) if value is not None else None


def fold_table(folds: tuple[FoldOutcome, ...], metric: str) -> list[str]:
    """The folds side by side: windows, chosen params, in-sample vs out-of-sample."""
    label = {"return": "ret %", "max_drawdown": "maxDD %"}.get(metric, metric)
    rows = [
        (
            "fold",
            "train",
            "test",
            "best params",
            f"IS {label}",
            f"OOS {label}",
            "IS ret %",
            "OOS ret %",
            "OOS maxDD %",
            "trials",
            "decisions",
        )
    ]
    for o in folds:
        b = o.best
        f = o.fold
        train = f"{f.train_start:%Y-%m-%d}..{f.train_end:%Y-%m-%d}"
        test = f"{f.train_end:%Y-%m-%d}..{f.test_end:%Y-%m-%d}" if f.test_end else "-"
        oos = b.out_of_sample if b else None
        rows.append(
            (
                str(f.index) + ("" if o.complete else "*"),
                train,
                test,
                _params(b.params) if b else "(none)",
                _num(_metric_of(b.in_sample if b else None, metric)),
                _num(_metric_of(oos, metric)),
                _num(b.in_sample.total_return_pct if b and b.in_sample else None, "+.2f"),
                _num(oos.total_return_pct if oos else None, "+.2f"),
                _num(oos.max_drawdown_pct if oos else None, ".2f"),
                f"{o.trials - o.failed - o.pruned}/{o.trials}",
                str(o.decisions) if o.recorded else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    left = {1, 2, 3}
    return [
        "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
        )
        for r in rows
    ]


def render(
    summary: StudySummary,
    config: OptimizeAppConfig,
    stored_at: str,
    query: str,
    *,
    skipped_rows: Mapping[str, int] | None = None,
) -> str:
    """The text report of a study; ``skipped_rows``: file name -> CSV rows skipped
    (``CSV_ON_BAD_ROWS=skip``)."""
    opt = config.optimize
    wf = opt.windows
    rate = summary.trials / summary.elapsed_s * 60 if summary.elapsed_s > 0 else 0.0
    rss = sorted(summary.peak_rss_mb.values())
    lines = [
        "",
        "=" * 96,
        f"Optimisation report  study {summary.study_id}"
        + ("  (INTERRUPTED)" if summary.interrupted else "")
        + ("  (FAILED)" if summary.error else ""),
        "=" * 96,
        f"agent          {config.run.agent} on {', '.join(config.run.symbols)}",
        f"search         {opt.sampler} over {', '.join(p.name for p in opt.parameters)}; "
        f"objective: in-sample {opt.metric}"
        + (" (minimised)" if opt.metric == "max_drawdown" else ""),
        "walk-forward   "
        + (
            f"train {wf.train}, test {wf.test}, step {wf.step}"
            + (" (anchored)" if wf.anchored else "")
            + f": {len(summary.folds)} fold(s)"
            if wf
            else "none: one in-sample fold over the common span"
        ),
        f"trials         {summary.trials} of {summary.planned} run ({summary.failed} failed, "
        f"{summary.pruned} pruned) in {summary.elapsed_s:.1f} s, {rate:.0f} trials/min, on "
        f"{summary.engine}",
    ]
    if rss:
        lines.append(f"worker memory  peak RSS {rss[0]:.0f}..{rss[-1]:.0f} MiB per worker")
    for name, count in (skipped_rows or {}).items():
        lines.append(f"skipped rows   {name}: {count} (CSV_ON_BAD_ROWS=skip)")
    if summary.error:
        lines.append(f"stopped        {summary.error}")
    lines += ["", *fold_table(summary.folds, opt.metric)]
    if any(not o.complete for o in summary.folds):
        lines.append("* search of this fold was stopped before its end")
    done = [o for o in summary.folds if o.best is not None and o.best.out_of_sample is not None]
    if wf and done and wf.step == wf.test:
        growth = 1.0
        for o in done:
            ret = o.best.out_of_sample.total_return_pct if o.best and o.best.out_of_sample else 0
            growth *= 1 + (ret or 0.0) / 100
        lines += [
            "",
            f"out-of-sample  {len(done)} test windows chained: {(growth - 1) * 100:+.2f} % "
            "(each window traded with the params chosen on the train window before it)",
        ]
    broke = [
        o.fold.index
        for o in summary.folds
        if o.best is not None and o.best.status == "failed" and o.fold.test_end is not None
    ]
    if broke:
        lines.append(
            f"failed OOS     fold(s) {', '.join(map(str, broke))}: the params chosen in-sample "
            "failed in the test window (trials.error); not in the chain above"
        )
    recorded = [o for o in summary.folds if o.recorded and o.best is not None]
    lines += [
        "",
        f"stored at      {stored_at}",
        f"look at them   {query}",
    ]
    if recorded and opt.record == "all":
        # every trial is a session of its own (helper-74: this counted the folds' bests)
        lines.append(
            f"decisions      recorded for each of the {sum(o.trials for o in summary.folds)} "
            "trial(s), one session each (OPTIMIZE_RECORD=all), e.g. fold "
            f"{recorded[0].fold.index}'s best: session_id = "
            f"'{recorded[0].best.session_id}'"  # type: ignore[union-attr]
        )
    elif recorded:
        lines.append(
            f"decisions      recorded for {len(recorded)} session(s) (OPTIMIZE_RECORD="
            f"{opt.record}), e.g. session_id = '{recorded[0].best.session_id}'"  # type: ignore[union-attr]
        )
    lines += ["=" * 96, ""]
    return "\n".join(lines)
