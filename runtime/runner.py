"""The Runner: builds and owns every client of one run, handles signals and shutdown, reports.

``python runner.py`` calls :func:`main`, which reads the configuration (only from the
environment, through :mod:`runtime.config`), runs one agent and prints the portfolio report.

Shutdown order (docs/architecture.md, "Shutdown order"): stop feeds, drain broker events,
close the subscriber (acks what is on disk; the subscription stays), flush FMEL, print the
report. The first SIGINT/SIGTERM asks backtrader to stop after the current bar
(``cerebro.runstop()``) and the run then finishes normally: what was recorded is flushed and
the report still prints. A second signal forces the exit.

Thread context: :meth:`Runner.run` runs on the main thread; a signal's stop runs on a relay
thread (:class:`core.signals.StopSignals`: a handler taking a lock could wait for itself).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import backtrader as bt
import numpy as np
import pyarrow as pa

from analyzers.missed_step import MissedStepNote
from analyzers.sinks.base import DecisionSink
from analyzers.sinks.spill import SpillDirClaim
from analyzers.sinks.writer import DecisionWriter, WriterStats
from core import bar_hash_cache
from core.errors import (
    AppError,
    ConfigError,
    DataError,
    RetryInterruptedError,
    SinkError,
    StopRequestedError,
)
from core.signals import StopSignals
from runtime.assembly import (  # load_agent, new_session_id: re-exported, their old home
    add_fmel,
    claim_spill_dir,
    load_agent,
    make_cerebro,
    make_sink,
    make_writer,
    new_session_id,
    setup_sim_broker,
)
from runtime.config import AppConfig, load_process_config, process_log_format
from runtime.health import HealthServer
from runtime.logs import LogSetup
from runtime.metrics import MetricsAnalyzer, RunMetrics
from runtime.report import EquityCurve, ProgressAnalyzer, RunReport, open_orders, trade_counts
from runtime.reporting.bars import BarRecorder
from runtime.stats import finest_bar_size, performance_stats, periods_per_year

logger = logging.getLogger(__name__)

# Exit code of a run stopped because its decision records could not be kept safe (docs:
# deployment.md, "Exit codes"); the report has printed.
EXIT_DECISIONS_FAILED = 3


class StoppedBeforeStartError(Exception):
    """A stop (SIGTERM, SIGINT) came while a part of the run was still connecting (Alpaca's
    account read): nothing ran, nothing is reported; ``main`` exits 0."""


class Runner:
    """One run of one agent.

    Args:
        config: the whole configuration.
        session_id: defaults to a new one.

    Attributes:
        cerebro: the backtrader engine (built by :meth:`build`).
        writer: the decision writer (owns the sink's thread).
    """

    def __init__(self, config: AppConfig, *, session_id: str | None = None) -> None:
        self.config = config
        self.session_id = session_id or new_session_id()
        self.cerebro: Any = None
        self.writer: DecisionWriter | None = None
        self.sink: DecisionSink | None = None
        self.agent_cls: type | None = None
        self.feeds: list[Any] = []
        self.skipped_rows: dict[str, int] = {}
        self.total_bars = 0
        self._agent_phase: list[str] = ["building"]  # -> "warming" -> "running" (_AgentPhase)
        self.broker_note = "simulated (backtrader BackBroker)"
        self._stop_requested = False
        self._stop_deadline: float | None = None  # monotonic end of the shutdown budget
        self._signal_relay: StopSignals | None = None
        self._closers: list[tuple[str, Callable[[], None]]] = []
        self._spill_claim: SpillDirClaim | None = None  # FMEL_SPILL_DIR, held for the run
        # Operations: one metrics registry per run; the endpoint runs when HEALTH_PORT > 0.
        self.metrics = RunMetrics()
        self.health: HealthServer | None = None
        self._running = False
        self._started_s: float | None = None  # monotonic seconds the bar loop started
        self._finished = False  # the run and its report are over (a signal then only logs)
        self._interrupted = False  # a stop was asked for before cerebro.run() returned
        # the Alpaca broker while its connect() reads the account (a stop interrupts it)
        self._connecting: Any = None
        # MODE=paper: the Pub/Sub subscriber (a signal stops it in any phase: backfill,
        # discovery, reconnect waits, the bar loop).
        self.live_input: Any = None

    # -- building ---------------------------------------------------------------------------

    def build(self) -> None:
        """Create the engine, feeds, broker, sink and analyzers.

        Raises:
            ConfigError / DataError: bad settings or input, before anything runs.
        """
        cfg = self.config
        self.agent_cls = load_agent(cfg.run.agent, dict(cfg.run.agent_params))
        agent_params = dict(cfg.run.agent_params)
        if getattr(self.agent_cls, "requires_model", False) and "model" not in agent_params:
            # CHRONOS_MODEL, loaded once per process (runtime.models cache) and shared by every
            # strategy instance; first, so a missing checkpoint fails before anything is built.
            from runtime.models.chronos import get_model

            agent_params["model"] = get_model(cfg.chronos)
        live = cfg.run.mode == "paper"
        # quicknotify: a live broker's fills reach notify_order without waiting for a bar
        self.cerebro = make_cerebro(live=live, quicknotify=live and cfg.run.broker == "alpaca")
        self._build_feeds()
        self._build_broker()
        self._build_sink()
        self._add_analyzers()
        self._add_ops()
        self.cerebro.addstrategy(self.agent_cls, **agent_params)

    def _build_feeds(self) -> None:
        cfg = self.config
        # CSV bars' data hashes kept between runs (FMEL_HASH_CACHE_DIR; backfill too)
        where = bar_hash_cache.configure(cfg.fmel.hash_cache_dir)
        logger.info("bar hash cache: %s", where if where is not None else "off")
        if cfg.run.mode == "backtest":
            from feeds.csv import make_csv_feed, read_csv_bars

            stamps = []
            for fc in cfg.csv_feeds:
                logger.info("reading %s (%.1f MB)", fc.path.name, fc.path.stat().st_size / 1e6)
                try:
                    bars = read_csv_bars(fc)
                except pa.ArrowCancelled as e:
                    # pyarrow's CSV reader checks for signals while it reads: it cancels the
                    # read and hands the signal (e.signum) on to the handler, which asks for
                    # the stop; the run then does not start.
                    if not (self._stop_pending or e.signum is not None):
                        raise
                    logger.info("reading %s cancelled by the stop request", fc.path.name)
                    return
                self.skipped_rows[fc.path.name] = len(bars.skipped)
                feed = make_csv_feed(fc, bars)
                self.cerebro.adddata(feed, name=fc.symbol)
                self.feeds.append(feed)
                self.metrics.bars_received.labels(feed=fc.symbol).inc(len(bars))
                stamps.append(bars.times)
                logger.info(
                    "feed %s: %d bars from %s, extra fields %s",
                    fc.symbol,
                    len(bars),
                    fc.path.name,
                    list(bars.extra_fields) + list(bars.text) or "none",
                )
            self.total_bars = len(np.unique(np.concatenate(stamps))) if stamps else 0
            return
        if cfg.run.mode == "paper":
            from runtime.live import add_live_feeds, metrics_events, start_live_input

            # live_input is set before the backfill and discovery, so a signal stops them.
            live = start_live_input(
                cfg,
                events=metrics_events(self.metrics),
                on_created=lambda sub: setattr(self, "live_input", sub),
            )
            self.add_closer("pubsub", live.close)  # acks what is on disk, returns the rest
            # Feeds, bounded memory, and the note of symbols that missed a step (before FMEL).
            self.feeds.extend(add_live_feeds(self.cerebro, live))
            return
        raise ConfigError(f"MODE={cfg.run.mode}: live feeds are not wired into this build")

    def _build_broker(self) -> None:
        cfg = self.config
        if cfg.run.broker == "sim":
            run = cfg.run
            setup_sim_broker(
                self.cerebro, cash_usd=run.cash_usd, commission=run.commission, risk=cfg.risk
            )
            return
        if cfg.run.broker == "alpaca" and cfg.alpaca is not None:
            from runtime.brokers.alpaca.broker import AlpacaPaperTradingBroker

            m = self.metrics  # hooks run on the broker's threads; prometheus counters are safe
            alpaca = AlpacaPaperTradingBroker(
                cfg.alpaca,
                session_id=self.session_id,
                risk=cfg.risk,
                on_retry=lambda op, _err: m.broker_retries.labels(operation=op).inc(),
                on_error=lambda op, _err: m.broker_errors.labels(operation=op).inc(),
            )
            self.cerebro.setbroker(alpaca)
            self.broker_note = alpaca.describe()
            self.add_closer("alpaca", alpaca.stop)  # idempotent; cerebro also stops it
            # reconcile now: a bad key fails before the run starts. A stop meanwhile ends the
            # account read's retries (helper-84 F6: SIGTERM with Alpaca stalled took 49-60 s)
            self._connecting = alpaca
            try:
                if self._stop_pending:
                    alpaca.interrupt_connect()
                alpaca.connect()
            except RetryInterruptedError as e:
                if self._stop_pending:
                    raise StoppedBeforeStartError(
                        f"stopped while connecting to Alpaca ({e})"
                    ) from e
                raise
            finally:
                self._connecting = None
            return
        raise ConfigError(f"BROKER={cfg.run.broker}: not wired into this build")

    def _build_sink(self) -> None:
        cfg = self.config
        if self._spill_claim is None:  # None again when the folder cannot be written
            self._spill_claim = claim_spill_dir(cfg.fmel.spill_dir)
        self.sink = make_sink(cfg.fmel, cfg.bigquery)
        live = self.live_input
        self.writer = make_writer(cfg.fmel, self.sink, journal=live is not None)
        # The journal or spill folder cannot be written (a full disk): stop deciding bars.
        self.writer.add_failure_listener(
            lambda why: self.request_stop(f"decision records not safe on disk: {why}")
        )
        if live is not None:
            from runtime.live import connect_durable_acks

            connect_durable_acks(self.writer, live)  # a bar is acked once its decision is on disk

    def _start_writer(self) -> None:
        """Open the decision store and start its writer.

        Raises:
            ConfigError: the local store cannot be created or opened at ``FMEL_LOCAL_PATH`` (a
                folder that cannot be made, no permission, a file in the way, locked by another
                process): the message names the variable and the path.
        """
        assert self.writer is not None
        fmel = self.config.fmel
        try:
            self.writer.start()
        except (OSError, SinkError) as e:
            if fmel.sink != "local":
                raise
            raise ConfigError(
                f"FMEL_LOCAL_PATH={fmel.local_path}: cannot create or open the decision store "
                f"there ({type(e).__name__}: {e}); choose a writable path"
            ) from e

    def _add_analyzers(self) -> None:
        cfg = self.config
        assert self.agent_cls is not None and self.writer is not None
        if cfg.run.mode == "backtest":
            # Feeds that missed a step, noted as paper runs do (runtime.live adds it there),
            # before FMEL so the note reaches the step's record.
            self.cerebro.addanalyzer(MissedStepNote, _name="missed_step")
        add_fmel(
            self.cerebro,
            self.agent_cls,
            agent_params=dict(cfg.run.agent_params),
            writer=self.writer,
            session_id=self.session_id,
            agent_id=cfg.run.agent_id,
            mode=cfg.run.mode,
            strict_lookahead=cfg.fmel.strict_lookahead,
            decision_scope=self._decision_scope(),
        )
        # Which phase the agent is in, to explain a failure while building/warming it.
        self.cerebro.addanalyzer(
            _AgentPhase, _name="agent_phase", phase=self._agent_phase, on_start=self._on_run_start
        )
        # Statistics: runtime.stats over the equity curve (annualised from the bar size).
        self.cerebro.addanalyzer(EquityCurve, _name="equity")
        self.cerebro.addanalyzer(bt.analyzers.TradeAnalyzer, _name="trades")
        # The bars the run saw, stored next to its decisions for the HTML report.
        self.cerebro.addanalyzer(BarRecorder, _name="bars")
        progress = cfg.run.progress
        if progress != "off" and cfg.run.mode == "backtest":
            bar = progress == "on" or (progress == "auto" and sys.stderr.isatty())
            self.cerebro.addanalyzer(
                ProgressAnalyzer, _name="progress", total=self.total_bars, bar=bar
            )

    def _decision_scope(self) -> str | None:
        """Paper runs: decision ids ``<deployment>:<bar time>``, the same after a restart."""
        if self.live_input is None:
            return None
        from runtime.live import decision_scope

        return decision_scope(self.config)

    def add_closer(self, name: str, fn: Callable[[], None]) -> None:
        """Register a shutdown step; steps run in registration order, each at most once, after
        the engine stopped and before FMEL is flushed (feeds, then broker)."""
        self._closers.append((name, fn))

    # -- operations: metrics and the health endpoint ----------------------------------------

    def _add_ops(self) -> None:
        """Metrics from the bar loop (analyzer added last, so its timing covers FMEL) and the
        decision writer's counters."""
        cfg = self.config
        agent = cfg.run.agent_id or cfg.run.agent.rpartition(":")[2]
        self.metrics.set_info(session=self.session_id, agent=agent, mode=cfg.run.mode)
        if self.writer is not None:
            self.metrics.watch_writer(self.writer)
        self.cerebro.addanalyzer(MetricsAnalyzer, _name="metrics", metrics=self.metrics)

    def _start_health(self) -> None:
        """Serve /healthz, /readyz, /metrics when HEALTH_PORT > 0 (before the build, so a slow
        model load still answers the liveness probe)."""
        port = self.config.ops.health_port
        if port <= 0 or self.health is not None:
            return
        host = self.config.ops.health_host
        health = HealthServer(port=port, host=host, metrics=self.metrics)
        health.add_check(
            "running",
            lambda: (self._running, "bar loop running" if self._running else "not running"),
        )
        health.add_check("feeds", self._feeds_ready)
        health.add_check("bar_loop", self._bar_loop_alive, liveness=True)
        health.add_check("broker", self._broker_ready)
        health.add_check(
            "sink",
            lambda: (
                self.writer is not None and self.writer.healthy,
                "writing"
                if self.writer is not None and self.writer.healthy
                else "spilling or not started",
            ),
        )
        try:
            health.start()
        except OSError as e:
            raise ConfigError(
                f"HEALTH_HOST={host}, HEALTH_PORT={port}: cannot serve the health endpoint ({e})"
            ) from e
        self.health = health

    def _stop_health(self) -> None:
        if self.health is not None:
            self.health.stop()
            self.health = None

    def _feeds_ready(self) -> tuple[bool, str]:
        """Every live feed reports LIVE (CSV feeds are always ready). Request thread: reads
        backtrader's ``_laststatus`` int only."""
        if not self.feeds:
            return False, "no feeds yet"
        waiting = []
        for f in self.feeds:
            # _laststatus is set by backtrader's feed start: before it, not started
            status = getattr(f, "_laststatus", None)
            if f.islive() and status != f.LIVE:
                shown = "not started" if status is None else f._getstatusname(status)
                waiting.append(f"{f._name}={shown}")
        return (not waiting, ", ".join(waiting) or "all live")

    def _bar_loop_alive(self) -> tuple[bool, str]:
        """Liveness: the bar loop finished a step, or asked a live feed for a bar, within
        ``HEALTH_STALL_S`` (a fresh-context attack: an agent stuck in its ``next()`` kept
        /healthz and /readyz at 200, and its pod was never restarted). Waiting for bars that do
        not come (a closed market) is alive: the loop asks again every ``PUBSUB_QCHECK_S``.
        Request thread: reads two floats."""
        stall = self.config.ops.health_stall_s
        if stall <= 0 or not self._running or self._started_s is None:
            return True, "not watched" if stall <= 0 else "not running yet"
        beats = [self._started_s, self.metrics.last_step_s]
        hub = getattr(self.live_input, "hub", None)
        if hub is not None:
            if hub.consumer_waiting:  # in take(), for up to PUBSUB_QCHECK_S (helper-84)
                return True, "waiting for bars"
            beats.append(hub.last_take_s)
        since = time.monotonic() - max(b for b in beats if b is not None)
        if since < stall:
            return True, "bar loop alive"
        return False, f"no step and no bar asked for in {since:.0f} s (HEALTH_STALL_S={stall:g})"

    def _broker_ready(self) -> tuple[bool, str]:
        """A broker exposing ``healthy`` (the Alpaca broker: last API call succeeded) decides;
        the simulated broker is always reachable."""
        if self.cerebro is None:
            return False, "not built"
        healthy = getattr(self.cerebro.getbroker(), "healthy", True)
        return bool(healthy), "reachable" if healthy else "unreachable"

    # -- signals ----------------------------------------------------------------------------

    def request_stop(self, reason: str = "requested") -> None:
        """Ask the run to end after the current bar. Any thread (the signal relay's, the
        writer's); it takes locks (the Pub/Sub hub's), so not from a signal handler. After the
        run ended (the report printing, the process exiting) it only says so."""
        if self._finished:
            logger.info("%s after the run ended: exiting as planned", reason)
            return
        if not self._stop_requested:
            logger.warning("stopping: %s; finishing the current bar, flushing decisions", reason)
            self._stop_deadline = time.monotonic() + self.config.ops.shutdown_timeout_s
        self._stop_requested = True
        connecting = self._connecting
        if connecting is not None:
            connecting.interrupt_connect()
        if self.health is not None:
            self.health.set_draining()
        if self.live_input is not None:
            # Stop pulling; the feeds drain what was delivered, then the run ends normally.
            self.live_input.request_stop()
        elif self.cerebro is not None:
            self.cerebro.runstop()

    def _force_exit(self, name: str) -> None:
        """A second signal: exit at once (in the signal handler; takes no lock but the logging
        handlers' reentrant ones)."""
        logger.error("second %s: forcing exit without flushing", name)
        # Immediately: a SystemExit would still run every finally (flush, joins) first.
        # Spill files already on disk are fsynced and replayed at the next start.
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(128 + signal.Signals[name].value)

    def _on_run_start(self) -> None:
        """``cerebro.run()`` has begun (its analyzers start): it cleared any ``runstop()``
        made before, so a stop asked for since the check in :meth:`_run` is made again."""
        if self._stop_pending:
            self.cerebro.runstop()

    @property
    def _stop_pending(self) -> bool:
        """A stop was asked for, or a signal came whose relay has not run yet."""
        return self._stop_requested or (
            self._signal_relay is not None and self._signal_relay.first is not None
        )

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop cleanly (:meth:`request_stop`, run on a relay thread: the
        handler itself takes no lock, see :mod:`core.signals`); a second one forces exit.
        Main thread only."""
        if self._signal_relay is None:
            self._signal_relay = StopSignals(
                self.request_stop, self._force_exit, at_once=self._runstop_now
            )
        self._signal_relay.install()

    def _runstop_now(self, name: str) -> None:
        """In the signal handler: a backtest's ``cerebro.runstop()`` (one attribute set, no
        lock), so no bar starts after the signal; the relay does the rest. Paper runs stop
        through their input (bars buffered go back to Pub/Sub), on the relay."""
        if self.live_input is None and self.cerebro is not None:
            self.cerebro.runstop()

    def restore_signal_handlers(self) -> None:
        if self._signal_relay is not None:
            self._signal_relay.restore()

    # -- running ----------------------------------------------------------------------------

    def run(self) -> RunReport:
        """Build (if needed), run to the end or until stopped, shut down, return the report.

        Raises:
            ConfigError, DataError: before the run starts.
            Exception: whatever the agent raised; decisions recorded so far are flushed first.
        """
        self._start_health()
        try:
            return self._run()
        finally:
            self._stop_health()
            claim, self._spill_claim = self._spill_claim, None
            if claim is not None:
                claim.release()

    def _run(self) -> RunReport:
        try:
            if self.cerebro is None:
                self.build()
            assert self.writer is not None and self.sink is not None
            self._start_writer()
        except BaseException:
            # a half-built run still owns what it started (subscriber, broker threads)
            self._close_components()
            raise
        cfg = self.config
        start_value = float(self.cerebro.getbroker().getvalue())
        logger.info(
            "session %s: agent %s on %s (%s), decisions -> %s",
            self.session_id,
            cfg.run.agent,
            ",".join(cfg.run.symbols),
            cfg.run.mode,
            self.sink.describe(),
        )
        t0 = time.perf_counter()
        strategy = None
        self._started_s = time.monotonic()
        self._running = True
        try:
            # cerebro.run() clears a runstop() made before it: honour a signal that came
            # during the build (model load, backfill) here.
            if self._stop_pending:
                logger.warning("stop requested before the first bar: not starting the run")
            else:
                try:
                    strategy = self.cerebro.run()[0]
                except AppError:
                    raise
                except Exception as e:
                    if self._agent_phase[0] == "running":
                        raise  # the agent's own code failed on a bar: its traceback matters
                    raise self._agent_failure(e) from e
        finally:
            self._running = False
            # a signal from here on (flush, report) came after the last bar: not an interruption
            self._interrupted = self._stop_pending
            elapsed = time.perf_counter() - t0
            self._close_components()
            stats = self._flush()
        try:
            return self._report(strategy, start_value, elapsed, stats)
        finally:
            self._finished = True

    def _agent_failure(self, e: Exception) -> AppError:
        """A one-line error for an exception raised while the agent was built (its
        ``__init__``: parameter checks, indicators) or its indicators warmed up over the
        preloaded data, before the first bar reached it: the usual causes are a parameter
        value (``maperiod=0``, ``slow=0``) or data shorter than an indicator's period.

        Returns:
            :class:`ConfigError` naming ``AGENT_PARAMS`` when parameters were given,
            :class:`DataError` naming the data length when the defaults failed while warming
            up, else :class:`AppError` (exit 1) naming the agent. The traceback is logged at
            DEBUG only.
        """
        cfg = self.config
        agent = cfg.run.agent
        params = dict(cfg.run.agent_params)
        phase = self._agent_phase[0]
        logger.debug("agent %s failed while %s", agent, phase, exc_info=e)
        what = f"{type(e).__name__}: {e}"
        when = "building" if phase == "building" else "warming up its indicators on the data"
        data = f"{self.total_bars} bars of {','.join(cfg.run.symbols)}"
        if params:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
            return ConfigError(
                f"AGENT_PARAMS ({shown}): agent {agent} failed while {when} ({what}); "
                f"check each value (a period must be at least 1 and shorter than the data: "
                f"{data})"
            )
        if phase == "warming":
            return DataError(
                f"agent {agent} failed while warming up its indicators ({what}): the data has "
                f"{data}, likely fewer than an indicator's period; give more bars or smaller "
                "periods with AGENT_PARAMS"
            )
        return AppError(
            f"agent {agent} failed while building ({what}); LOG_LEVEL=DEBUG shows where"
        )

    def _close_components(self) -> None:
        for name, fn in self._closers:
            try:
                fn()
            except Exception:
                logger.exception("shutdown step %s failed", name)
        self._closers.clear()

    def _flush(self) -> WriterStats:
        assert self.writer is not None
        stats = self.writer.stop(timeout_s=self.config.ops.shutdown_timeout_s)
        logger.info(
            "decisions: %d written, %d spilled, %d rejected; %d of earlier runs replayed, %d "
            "left in the spill",
            stats.written,
            stats.spilled,
            stats.rejected,
            stats.replayed,
            stats.earlier_left,
        )
        return stats

    def _report(
        self, strategy: Any, start_value: float, elapsed: float, stats: WriterStats
    ) -> RunReport:
        assert self.sink is not None
        cfg = self.config
        end_value = float(self.cerebro.getbroker().getvalue())
        perf = None
        trades = won = decisions = lookahead = bars = 0
        if strategy is not None:
            trades, won = trade_counts(strategy)
            equity = strategy.analyzers.equity.series()
            if len(equity):
                timeframe, compression = finest_bar_size(
                    [(f._timeframe, f._compression) for f in self.feeds]
                )
                try:
                    perf = performance_stats(
                        equity,
                        periods_per_year=periods_per_year(equity.index, timeframe, compression),
                    )
                except DataError as e:  # the report still prints, without statistics
                    logger.error("performance statistics: %s", e)
            fmel = strategy.analyzers.fmel
            decisions, lookahead = fmel.decisions, fmel.lookahead_total
            bars = len(strategy)
        html = None
        if strategy is not None and decisions:
            from runtime.reporting.run import write_run_report

            # Stopping: the page's BigQuery requests end with the shutdown budget.
            html = write_run_report(cfg, self.session_id, strategy, deadline=self._stop_deadline)
        return RunReport(
            session_id=self.session_id,
            agent=cfg.run.agent,
            mode=cfg.run.mode,
            symbols=cfg.run.symbols,
            start_value_usd=start_value,
            end_value_usd=end_value,
            stats=perf,
            trades=trades,
            trades_won=won,
            bars=bars,
            decisions=decisions,
            lookahead_reads=lookahead,
            stored_at=self.sink.describe(),
            example_query=self.sink.example_query(),
            records_written=stats.written,
            records_spilled=stats.spilled,
            records_rejected=stats.rejected,
            records_replayed=stats.replayed,
            spill_left=stats.in_spill,
            spill_earlier_left=stats.earlier_left,
            spill_path=str(self.writer.spill_path) if self.writer is not None else "",
            records_lost=stats.lost,
            spill_unsure=stats.unsure_in_spill,
            decisions_failure=(self.writer.failure or "") if self.writer is not None else "",
            skipped_rows=dict(self.skipped_rows),
            feed_counters=self.live_input.feed_counters() if self.live_input else {},
            broker_note=self.broker_note,
            interrupted=self._interrupted,
            elapsed_s=elapsed,
            html_report=str(html) if html else None,
            open_orders=open_orders(self.cerebro.getbroker()),
        )


class _AgentPhase(bt.Analyzer):  # type: ignore[misc]
    """Marks the agent's phase in ``phase[0]``: created after the agent's ``__init__`` ran
    ("warming": indicators are computed over preloaded data next), then "running" from the
    first bar the strategy sees (``prenext`` included)."""

    params = (("phase", None), ("on_start", None))

    def __init__(self) -> None:
        self.p.phase[0] = "warming"

    def start(self) -> None:
        if self.p.on_start is not None:
            self.p.on_start()

    def prenext(self) -> None:
        self.p.phase[0] = "running"

    def next(self) -> None:
        self.p.phase[0] = "running"


def setup_logging(level: str, fmt: str = "auto") -> LogSetup:
    """Logs on stderr: JSON lines off a terminal, text on one (see :mod:`runtime.logs`)."""
    from runtime.logs import setup_logging as setup

    return setup(level, fmt)  # type: ignore[arg-type]


def main() -> int:
    """Entry point of ``python runner.py``. Returns the process exit code: 0 done, 2 bad
    configuration or input, 1 a failure during the run, 3 the run was stopped because its
    decision records could not be kept safe (``FMEL_SPILL_DIR`` unwritable, e.g. a full disk,
    or the decision writer died; the report still prints), 128+N after a forced signal exit."""
    try:
        config = load_process_config()
    except StopRequestedError as e:  # a SIGTERM while secrets were read: nothing ran
        setup_logging("INFO", process_log_format())
        logger.warning("%s: exiting", e)
        return 0
    except ConfigError as e:
        setup_logging("INFO", process_log_format())
        logger.error("configuration error: %s", e)
        return 2
    logs = setup_logging(config.ops.log_level, config.ops.log_format)
    runner = Runner(config)
    from runtime.secrets import secrets_in

    logs.add_secrets(secrets_in(config))
    logger.debug("configuration: %r", config)  # secrets print as ****
    logs.bind(
        session=runner.session_id, agent=config.run.agent_id or config.run.agent.rpartition(":")[2]
    )
    if config.run.mode == "optimize":  # a parameter search: runtime.research composes it
        from runtime.research.cli import run_optimize

        code = run_optimize(config, session_id=runner.session_id)
        if code == 0:  # the study's page: parameter surface, in- vs out-of-sample per fold
            from runtime.reporting.run import write_study_report

            page = write_study_report(config, runner.session_id)
            if page is not None:
                sys.stdout.write(f"html report    {page}\n")
        return code
    # Kept until the process ends, not restored: a signal while the report prints or the
    # interpreter exits would otherwise kill it with 128 + N after a clean run (an attack's
    # finding); a first one then only logs, a second still forces the exit.
    runner.install_signal_handlers()
    try:
        report = runner.run()
    except StoppedBeforeStartError as e:
        logger.warning("%s: the run did not start", e)
        return 0
    except (ConfigError, DataError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    except AppError as e:
        logger.error("run failed: %s: %s", type(e).__name__, e)
        return 1
    finally:
        runner._finished = True
    sys.stdout.write(report.render())
    sys.stdout.flush()
    return EXIT_DECISIONS_FAILED if report.decisions_failure or report.records_lost else 0
