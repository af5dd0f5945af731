"""The ingestor: Alpaca's stream -> bars (enriched) -> Pub/Sub, with no gap and no duplicate.

Threads (each owned and joined by :class:`Ingestor`)::

    stream thread   alpaca-py's event loop (``DataStream.run``): handlers only put the raw
                    message and its arrival time on a bounded queue (back-pressure: the loop
                    waits when the queue is full)
    worker thread   everything else, in arrival order: catch-up from history after each
                    (re)connection, gap checks, trade windows, enrichment, message building,
                    publishing, confirmations, the state file

No gap, no duplicate:

* Each bar has a deterministic key (``SYMBOL|timestamp``, attribute ``bar_key``). A bar is
  published only when its time is after the last one published for its symbol (the state file
  keeps the confirmed one across restarts; Pub/Sub's ordering key keeps a symbol in order).
* After every (re)connection -- and at start -- the bars missed since the last published one are
  fetched from Alpaca's historical bars API and published in time order *before* any live bar of
  that connection (the worker handles the connection event before the bars that follow it). The
  first live bar of each symbol on the connection fetches once more what lies between the
  catch-up and itself.
* A gap that cannot be filled (history failing after the retries, or longer than
  ``INGEST_MAX_BACKFILL_S``) is counted, logged at ERROR, kept in the state file and reported;
  live bars then go on (a stuck ingestor would lose more).

Trades for the risk metrics: a live bar takes its trades from the trade stream when the
connection had already delivered a trade of that symbol *before* the bar's minute began (so none
of its trades can have been missed); otherwise, and for backfilled bars, from the historical
trades API.
Either way the window is taken by time and ordered as history orders it (``ordered_trades``:
by time then trade id, each id once, odd lots and other off-price conditions left out), so a
live bar and the same bar backfilled carry the same fields and ``data_hash``.

Bar times are checked (:meth:`Ingestor._bad_time`): off the minute or too far in the future is
refused; history is cut at the last minute complete by the local clock and by Alpaca's own
(``Date`` header), so a partial bar is never backfilled.

Thread context: :meth:`start`, :meth:`stop`, :meth:`report` from the owning (main) thread;
:attr:`ready`, :attr:`stats` are safe to read from any thread (health checks, metrics).
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from core.errors import ConfigError, DataError, RetryInterruptedError, TransientError
from core.time import iso_utc
from feeds.ingest.alpaca import (
    AUTH_FATAL,
    CONNECTION_LIMIT,
    SYMBOL_LIMIT_CODE,
    AlpacaBar,
    History,
    StreamHooks,
    TradeTick,
    make_stream,
    ordered_trades,
    stream_bar,
    stream_trade,
)
from feeds.ingest.config import IngestConfig, IngestTuning
from feeds.ingest.enrich import BarView, Enricher, Trades, load_factory
from feeds.ingest.messages import Source, build_message
from feeds.ingest.publisher import BarPublisher
from feeds.ingest.state import Gap, IngestState, StateLock
from feeds.pubsub.messages import MIN_YEAR, excerpt

__all__ = ["IngestEvents", "IngestStats", "Ingestor"]

logger = logging.getLogger(__name__)


class IngestEvents(Protocol):
    """Observer of the ingestor (metrics). Called on the worker thread, except
    :meth:`on_published` (Pub/Sub client threads); must be thread-safe and cheap."""

    def on_published(self, symbol: str, source: str, latency_s: float) -> None: ...

    def on_duplicate(self, symbol: str) -> None: ...

    def on_invalid(self, symbol: str) -> None: ...

    def on_gap(self, symbol: str) -> None: ...

    def on_connection(self, event: str) -> None: ...


@dataclass(slots=True)
class IngestStats:
    """Counters of one ingestor run (written by the worker thread).

    Attributes:
        live, backfilled: bars handed to the publisher from the stream / from history.
        confirmed: bars Pub/Sub confirmed.
        duplicates: live or history bars skipped because their time was already published.
        invalid: Alpaca bars refused by the OHLCV rule.
        connections: successful (re)connections; ``reconnects`` = connections after the first.
        auth_errors: refused authentications by message (``connection limit exceeded``: 3).
        catch_ups: catch-ups from history finished (one per connection, bars or not).
        history_calls, history_retries: historical requests and retried attempts.
        trades_from_history: live bars whose trades came from the history API.
        gaps: unfilled gaps of this run.
        left_queued: stream messages a stop left unread (its budget was half spent, or the
            queue was full); not published, so the next start fetches them from history.
    """

    live: int = 0
    backfilled: int = 0
    confirmed: int = 0
    duplicates: int = 0
    invalid: int = 0
    connections: int = 0
    catch_ups: int = 0
    auth_errors: dict[str, int] = field(default_factory=dict)
    history_calls: int = 0
    history_retries: int = 0
    trades_from_history: int = 0
    gaps: list[Gap] = field(default_factory=list)
    left_queued: int = 0

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)


class _Null:
    def on_published(self, symbol: str, source: str, latency_s: float) -> None:
        pass

    def on_duplicate(self, symbol: str) -> None:
        pass

    def on_invalid(self, symbol: str) -> None:
        pass

    def on_gap(self, symbol: str) -> None:
        pass

    def on_connection(self, event: str) -> None:
        pass


_CONNECTED, _DISCONNECTED, _AUTH_ERROR, _BAR, _TRADE, _CANCEL, _CORRECT, _STREAM_ERROR = range(8)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_RECENT = 1024  # bar times remembered per symbol (about 17 hours of minutes)


def _ns(ts: datetime) -> int:
    """Nanoseconds since the epoch of an aware datetime (exact, integer arithmetic)."""
    return (ts - _EPOCH) // timedelta(microseconds=1) * 1_000


def _floor(ts: datetime, step_s: float) -> datetime:
    epoch = ts.timestamp()
    return datetime.fromtimestamp(epoch - epoch % step_s, UTC)


class _Backfilled(NamedTuple):
    """What :meth:`Ingestor._backfill` did.

    Attributes:
        done: every bar asked for was published (False: history failed, or a stop cut the
            publishing short). A tuple is always true: test this, not the result.
        newest: the newest bar time history returned for any symbol (after the cut at the last
            minute complete by Alpaca's clock); None when it returned none or was not asked.
    """

    done: bool
    newest: datetime | None


class _StoppedBeforeTradesError(Exception):
    """The history request for a live bar's trades was refused because the ingestor stops."""


def _drop_future_checked(path: Path, state: IngestState, horizon: datetime) -> None:
    """Drop ``checked`` times dated after ``horizon`` (the local clock plus its tolerance),
    with a warning: not taken now, such a time was kept and taken once the clock passed it,
    hiding the span before it from a later gap (helper-117 F3: a hand edit's typo hid 9
    days)."""
    future = {s: iso_utc(t) for s, t in state.checked.items() if t > horizon}
    if future:
        logger.warning(
            "INGEST_STATE_PATH=%s: history answers (checked) dated after the local clock %s "
            "(a clock ahead where they were written, or a hand edit) are dropped",
            path,
            future,
        )
        for s in future:
            state.forget_checked(s)


def _warn_future_starts(path: Path, start: dict[str, datetime], horizon: datetime) -> None:
    """Warn of start points dated after ``horizon`` (the local clock plus its tolerance): a
    clock ahead where they were written, or a hand edit. They are kept, not refused (another
    pod's clock on a shared file; helper-110: refusing made a standby exit 2 at every start)."""
    future = {s: iso_utc(t) for s, t in start.items() if t > horizon}
    if future:
        logger.warning(
            "INGEST_STATE_PATH=%s: start points dated after the local clock %s (a clock "
            "ahead where they were written, or a hand edit): bars of those symbols before "
            "them are not fetched",
            path,
            future,
        )


# Symbols with nothing published for longer than this share of INGEST_MAX_BACKFILL_S are asked
# about from history (Ingestor._check_idle) at most once every IDLE_CHECK_EVERY of it (7 days by
# default: after 3.5 days, every 1.75 days), so what an empty answer keeps in the state file is
# never older than 3/4 of the limit while connected.
IDLE_AFTER = 0.5
IDLE_CHECK_EVERY = 0.25
# Below this INGEST_MAX_BACKFILL_S (s) there are no idle checks: what an empty answer proves
# lags HISTORY_SETTLE_S behind, so with a limit of a few minutes every check of a symbol that
# does not trade found its position past the limit and counted a gap (helper-117 F2: one a
# minute with a limit of 1 s), one history request a minute besides.
IDLE_MIN_BACKFILL_S = 3600.0
# An empty history answer proves no bar only for minutes at least this old (s): Alpaca's
# historical bars may lag the stream (a minute missing for a few seconds, helper-104), and
# querying SIP data of the last 15 minutes needs the Algo Trader Plus subscription
# (docs.alpaca.markets/docs/market-data-faq, "Why am I getting HTTP 403").
HISTORY_SETTLE_S = 900.0
# connections whose streamed span (Ingestor._coverage) is kept for later gap checks
_COVERAGE_KEPT = 64


class Ingestor:
    """Alpaca bars of ``config.symbols`` to ``config.topic``.

    Args:
        config: the ingestor's configuration.
        publisher_client: a ``PublisherClient`` with message ordering (owned by the caller).
        topic_path: ``projects/<p>/topics/<t>`` (must exist).
        events: metrics observer.
        tuning: periods (tests shorten them).
        clock: wall clock (catch-up end, backfill limit); tests pass the fake market's.
        stream_factory: builds the alpaca-py stream (tests and benchmarks may wrap it).

    Raises:
        ConfigError: an indicator cannot be loaded or declares bad field names; the state file
            cannot be written.
        DataError: the state file is unreadable.
    """

    def __init__(
        self,
        config: IngestConfig,
        publisher_client: Any,
        topic_path: str,
        *,
        events: IngestEvents | None = None,
        tuning: IngestTuning | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        stream_factory: Callable[[IngestConfig, StreamHooks], Any] = make_stream,
    ) -> None:
        self.config = config
        self.tuning = tuning or IngestTuning()
        self.events: IngestEvents = events or _Null()
        self.clock = clock
        self.stats = IngestStats()
        self.state = IngestState.load(config.state_path)
        self.state.check_writable()
        self._lock = StateLock(config.state_path)  # held while connected (StateLock)
        horizon = clock() + timedelta(seconds=config.future_tolerance_s)
        future = {s: iso_utc(t) for s, t in self.state.last_bar.items() if t > horizon}
        if future:
            raise DataError(
                f"INGEST_STATE_PATH={config.state_path}: last published bars dated after the "
                f"local clock {future}: every later bar would be skipped as a duplicate; fix the "
                "clock or the file"
            )
        # Start points come from an ingestor's local clock, not from bars: told, not refused
        _warn_future_starts(config.state_path, self.state.start, horizon)
        _drop_future_checked(config.state_path, self.state, horizon)
        self._first_start = not config.state_path.exists()
        self.enricher = Enricher(
            risk="risk" in config.enrich,
            factories=[(spec, load_factory(spec)) for spec in config.indicators],
        )
        self._symbols = set(config.symbols)
        self._malformed_logged: set[str] = set()  # reasons of malformed bars logged so far
        self._needs_trades = self.enricher.needs_trades(config.symbols[0])
        self._bar_ns = int(self.tuning.bar_s * 1e9)
        self._stop = threading.Event()
        self._stream_stopped = threading.Event()
        self._queue: queue.Queue[tuple[int, Any, int]] = queue.Queue(maxsize=config.queue_size)
        self.history = History(config, stop=self._stop)
        self.publisher = BarPublisher(
            publisher_client,
            topic_path,
            attempts=self.tuning.publish_attempts,
            on_done=lambda bar, lat: self.events.on_published(
                bar.symbol, bar.attributes["source"], lat
            ),
        )
        self._stream = stream_factory(
            config,
            StreamHooks(
                on_connected=lambda: self._put((_CONNECTED, None, time.perf_counter_ns())),
                on_disconnected=lambda: self._put((_DISCONNECTED, None, 0)),
                on_auth_error=self._on_auth_error,
                on_error=lambda code, msg: self._put((_STREAM_ERROR, (code, msg), 0)),
            ),
        )
        self._stream.subscribe_bars(self._on_bar, *config.symbols)
        if self._needs_trades:
            self._stream.subscribe_trades(self._on_trade, *config.symbols)
            # Trade cancels/errors ("T":"x") and corrections ("T":"c") come with a trades
            # subscription (docs.alpaca.markets/docs/real-time-stock-pricing-data, "Trade
            # cancels/errors", "Trade corrections"); alpaca-py hands them to these handlers.
            if hasattr(self._stream, "register_trade_cancels"):
                self._stream.register_trade_cancels(self._on_cancel)
                self._stream.register_trade_corrections(self._on_correct)
        # worker state
        self._sent: dict[str, datetime] = dict(self.state.last_bar)
        self._verify: set[str] = set()
        # Bar times published lately per symbol: a repeat of one is a duplicate; an older bar
        # not among them arrived after a later one (a gap, not a duplicate).
        self._recent: dict[str, deque[datetime]] = {}
        self._first_trade_ns: dict[str, int] = {}
        self._trades: dict[str, list[TradeTick]] = {s: [] for s in config.symbols}
        self._last_flush = time.monotonic()
        # the next idle check (_check_idle); the connection's catch-up checks every symbol
        self._next_idle_check = time.monotonic() + config.max_backfill_s * IDLE_CHECK_EVERY
        # [first, end) minutes each connection's stream delivered, oldest first (_covered)
        self._coverage: list[list[datetime | None]] = []
        # shared flags
        self.connected = False
        self.fatal: BaseException | None = None
        self.exit_code = 0
        self._deadline: float | None = None
        self._take_until: float | None = None  # a stop's last moment to take queued messages
        # Set on the stream thread once a stop drops a message (queue full): every later one
        # is dropped too, so no later bar of a symbol gets out ahead of a dropped one.
        self._queue_closed = False
        self._dropped = 0  # messages dropped so (stream thread; in the report's left_queued)
        self._dropped_bars: list[Any] = []  # their bars, for the state file (stop())
        # the first bar sent of each symbol that had no state file entry then (stop())
        self._first_sent: dict[str, datetime] = {}
        # Symbols with nothing published (a first start without INGEST_START_LOOKBACK_S, a
        # symbol new in SYMBOLS): their start point (_start_point, the state file's "start");
        # a reconnect's catch-up fetches their bars after it, as for published symbols
        self._live_from: dict[str, datetime] = {
            s: ts
            for s, ts in self.state.start.items()
            if s in self._symbols and s not in self._sent
        }
        # Set by stop() when the worker outlived its budget: it hands nothing more to the
        # publisher (the process flushes the client at exit; the state file would not know).
        self._abandoned = False
        self._stream_thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None

    # -- stream thread -----------------------------------------------------------------------

    def _put(self, item: tuple[int, Any, int]) -> None:
        while not self._queue_closed:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                if self._stop.is_set():
                    self._queue_closed = True
                    self._drop(item)
                    return
        self._drop(item)

    def _drop(self, item: tuple[int, Any, int]) -> None:
        self._dropped += 1
        if item[0] == _BAR:
            self._dropped_bars.append(item[1])

    async def _on_bar(self, raw: Any) -> None:
        self._put((_BAR, raw, time.perf_counter_ns()))

    async def _on_trade(self, raw: Any) -> None:
        self._put((_TRADE, raw, 0))

    async def _on_cancel(self, raw: Any) -> None:
        self._put((_CANCEL, raw, 0))

    async def _on_correct(self, raw: Any) -> None:
        self._put((_CORRECT, raw, 0))

    def _on_auth_error(self, message: str) -> None:
        self._put((_AUTH_ERROR, message, 0))

    def _run_stream(self) -> None:
        try:
            if self._stop.is_set():  # a stop before this thread ran: no connection at all
                return
            self._stream.run()
        except BaseException as e:
            if not self._stop.is_set():
                logger.exception("market-data stream failed")
                self.fatal = self.fatal or e
        finally:
            self._stream_stopped.set()

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the stream and worker threads (the stream connects on its own thread)."""
        if self._worker is not None:
            return
        self._worker = threading.Thread(target=self._work, name="ingest-worker", daemon=True)
        self._worker.start()
        self._stream_thread = threading.Thread(
            target=self._run_stream, name="alpaca-stream", daemon=True
        )
        self._stream_thread.start()
        logger.info(
            "ingesting %s (%s%s) to %s; state %s",
            ",".join(self.config.symbols),
            self.config.asset_class,
            f"/{self.config.feed}" if self.config.asset_class == "stock" else "",
            self.publisher.topic_path,
            self.config.state_path,
        )

    @property
    def ready(self) -> bool:
        """Connected and authenticated, the state file's lock held (no other ingestor still
        publishing to it), worker alive, not stopping."""
        w = self._worker
        return (
            self.connected
            and self._lock.held
            and w is not None
            and w.is_alive()
            and not self._stop.is_set()
        )

    @property
    def queue_depth(self) -> int:
        """Stream messages waiting for the worker (approximate; any thread)."""
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        """The worker thread runs (liveness)."""
        w = self._worker
        return w is not None and w.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until the ingestor stops by itself (fatal error, connection limit) or
        ``timeout_s`` passes. Returns True when it stopped."""
        w = self._worker
        if w is None:
            return True
        w.join(timeout_s)
        return not w.is_alive()

    def request_stop(self) -> None:
        """Ask every thread to stop (safe from a signal handler: sets a flag only)."""
        self._stop.set()

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the stream, publish what was received, wait for the confirmations, save the
        state, join the threads. Idempotent.

        Args:
            timeout_s: the whole budget, seconds (half of the pod's grace period or less).

        Returns:
            True when every sent bar was confirmed and the state saved in time.
        """
        deadline = time.monotonic() + timeout_s
        self._deadline = deadline
        # Half the budget takes queued messages, half is kept for their confirmations: what
        # is still queued then is left to the next start's catch-up, not published past a
        # state file that could no longer record it (helper-79 F3: a burst of 20,000 bars
        # at SIGTERM published 35 bars twice).
        self._take_until = time.monotonic() + timeout_s / 2
        self._stop.set()
        self._stop_stream(min(2.0, timeout_s / 4))
        if self._stream_thread is not None:
            self._stream_thread.join(max(0.0, min(2.0, deadline - time.monotonic())))
        w = self._worker
        if w is not None:
            w.join(max(0.0, deadline - time.monotonic()))
        busy = w is not None and w.is_alive()
        if busy:
            self._abandoned = True  # it sends nothing more
            self.stats.left_queued += self._queue.qsize()
        if self._start_unsent_at_left_bars():
            self._save_state(force=True)
        # the state file has this stop's last confirmations: a standby may read it now
        self._lock.close()
        self.history.close()
        clean = not busy and self.publisher.pending == 0
        if busy:
            logger.error(
                "stop: the worker did not finish within %.1f s (%d messages still queued); %d "
                "bars sent and not confirmed; the state file may end before them, and a "
                "restart publishes them again",
                timeout_s,
                self._queue.qsize(),
                self.publisher.pending,
            )
        elif not clean:
            logger.error(
                "stop: %d bars not confirmed within %.1f s; the state file ends before them, "
                "a restart publishes them again",
                self.publisher.pending,
                timeout_s,
            )
        return clean

    def _stop_stream(self, timeout_s: float) -> None:
        stream = self._stream
        loop = self._stream_loop(timeout_s)
        if loop is None:
            # Never started, or already ended: alpaca-py's run loop checks this queue.
            stream._stop_stream_queue.put_nowait({"should_stop": True})
            stream._should_run = False
            return
        import asyncio

        async def halt() -> None:
            # stop_ws() alone waits for the next message or alpaca-py's 5 s receive timeout;
            # closing the socket ends the receive at once.
            await stream.stop_ws()
            await stream.close()

        try:
            asyncio.run_coroutine_threadsafe(halt(), loop).result(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - the thread is daemon; stop() goes on
            logger.warning("market-data stream did not stop within %.1f s", timeout_s)

    def _stream_loop(self, timeout_s: float) -> Any:
        """alpaca-py's event loop once it runs, waiting up to ``timeout_s`` for a stream
        thread that has started and not reached it yet; None when the thread is not alive.

        A stop in that window cannot be left in alpaca-py's stop queue: ``_run_forever``
        sets ``_should_run = True`` and empties the queue before it connects (alpaca-py
        0.44.0, ``alpaca/data/live/websocket.py``), so the stream would connect and run on
        past the stop (helper-100 F5: 8 stops of 16 right after ``start()``). Its body up to
        the first ``await`` runs before any coroutine sent to the loop, so a stop sent once
        the loop runs is seen."""
        thread, stream = self._stream_thread, self._stream
        end = time.monotonic() + timeout_s
        while True:
            loop = getattr(stream, "_loop", None)
            if loop is not None and loop.is_running():
                return loop
            alive = thread is not None and thread.is_alive()
            if not alive or thread is threading.current_thread() or time.monotonic() >= end:
                return None
            time.sleep(0.005)

    # -- worker ------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._loop()
        except BaseException as e:
            logger.exception("ingestor stopped on an error")
            self.fatal = self.fatal or e
            self.exit_code = self.exit_code or (2 if isinstance(e, ConfigError) else 1)
            self._stop.set()
        finally:
            try:
                self._drain_publisher()
            finally:
                self._save_state(force=True)

    def _loop(self) -> None:
        poll = self.tuning.poll_s
        while True:
            cut = self._take_until
            if cut is not None and time.monotonic() >= cut and not self._queue.empty():
                left = self._queue.qsize()
                self.stats.left_queued += left
                logger.warning(
                    "stop: %d stream messages left unread (half of SHUTDOWN_TIMEOUT_S spent); "
                    "not published: the next start fetches their bars from history",
                    left,
                )
                return
            try:
                kind, payload, t_ns = self._queue.get(timeout=poll)
            except queue.Empty:
                if self._stop.is_set() and (self._stream_stopped.is_set() or self.fatal):
                    return
                self._confirm()
                self._hand_over()
                self._check_idle()
                continue
            if kind == _BAR:
                if self._lock.held:  # else another ingestor publishes (or the next start)
                    self._live_bar(payload, t_ns)
            elif kind == _TRADE:
                self._trade(payload)
            elif kind == _CONNECTED:
                self._connected(t_ns)
            elif kind == _DISCONNECTED:
                if self.connected:
                    if self._stop.is_set():
                        logger.info("market-data stream closed")
                    else:
                        logger.warning("market-data stream disconnected; alpaca-py reconnects")
                    self.events.on_connection("disconnected")
                self.connected = False
                if not self._stop.is_set():
                    self._drain_on_disconnect()
                    self._hand_over()
            elif kind in (_CANCEL, _CORRECT):
                self._cancel_or_correct(kind, payload)
            elif kind == _STREAM_ERROR:
                self._stream_error(*payload)
            elif kind == _AUTH_ERROR:
                self._auth_error(str(payload))
            self._confirm()

    def _check_idle(self) -> None:
        """Ask history about the symbols nothing was published of for longer than
        :data:`IDLE_AFTER` of ``INGEST_MAX_BACKFILL_S`` (a halted stock, a symbol that seldom
        trades), at most once every :data:`IDLE_CHECK_EVERY` of it, while connected and
        holding the state file: as a gap check, their bars since are published if history has
        any, and an empty answer is kept (:attr:`IngestState.checked`). Without it, such a
        symbol's position in the state file aged while the stream, connected, sent nothing of
        it, and a restart more than ``INGEST_MAX_BACKFILL_S`` after it counted the whole time
        as a gap (one of ERROR level a restart and symbol, pushing real gaps out of the file's
        1,000). A failed answer is logged by the request and asked again at the next check.
        Worker thread, between messages."""
        now_m = time.monotonic()
        if now_m < self._next_idle_check:
            return
        self._next_idle_check = now_m + self.config.max_backfill_s * IDLE_CHECK_EVERY
        if self.config.max_backfill_s < IDLE_MIN_BACKFILL_S:
            return
        if not self.connected or not self._lock.held or self._stop.is_set():
            return
        end = self._last_complete_minute()
        stale = end - timedelta(seconds=self.config.max_backfill_s * IDLE_AFTER)
        since: dict[str, datetime] = {}
        for s in self.config.symbols:
            after = self._sent.get(s, self._live_from.get(s))
            if after is None:
                continue
            seen = self.state.checked.get(s)
            if max(after, seen or after) < stale:
                since[s] = after
        if since:
            logger.info("idle check: asking history about %d symbols", len(since))
            self._backfill(since, end, reason="idle check")

    def _start_unsent_at_left_bars(self) -> bool:
        """A stop leaves bars unpublished (queued past the stop's first half, or dropped from a
        full queue): a symbol never published (a first start without INGEST_START_LOOKBACK_S, a
        symbol new in SYMBOLS) has no state entry, so the next start would go live from its
        next live bar and never fetch the bars left here. The state file starts such a symbol
        at its first left bar, as a lookback start does (2026-12-07: 31 of 300 symbols lost 20
        bars each when a SIGTERM came in a burst's first minute). Returns True when it started
        one.

        The same for a symbol whose bars were sent and none confirmed (no state entry): it
        starts at its first sent bar (helper-100: 49 symbols lost 2 bars each when the stop's
        budget ran out before their first confirmations).

        Stopping thread, once the worker has ended or was abandoned (it sends nothing more);
        reads (and so empties) the queue."""
        first: dict[str, datetime] = {}
        known = self.state.last_bar
        for s, ts in list(self._first_sent.items()):
            if s not in known:
                first[s] = ts
        left: list[Any] = list(self._dropped_bars)
        while True:
            try:
                kind, raw, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            if kind == _BAR:
                left.append(raw)
        for raw in left:
            try:
                bar = stream_bar(raw)
            except (KeyError, TypeError, ValueError):
                continue  # malformed: never published either way
            s = bar.symbol
            if s not in self._symbols or s in known or self._bad_time(bar.ts):
                continue
            if s not in first or bar.ts < first[s]:
                first[s] = bar.ts
        for s, ts in first.items():
            self._start_unpublished_at(s, ts - timedelta(seconds=self.tuning.bar_s))
        return bool(first)

    def _start_unpublished_at(self, symbol: str, before: datetime) -> None:
        """Start ``symbol`` (nothing confirmed) after ``before`` at the latest: the earlier of
        it and the start point it has, in memory and in the state file. Not as a confirmed
        bar: that erased an earlier start point and lost the minutes between (helper-106: a
        stop with a live bar queued behind a cut catch-up lost 2-3 minutes, no gap)."""
        at = min(
            t for t in (before, self._live_from.get(symbol), self.state.start.get(symbol)) if t
        )
        self._live_from[symbol] = at
        self.state.set_start(symbol, at)

    def _confirm(self) -> None:
        for bar in self.publisher.reap():
            self.state.confirm(bar.symbol, bar.ts)
            self.stats.confirmed += 1
        self._save_state()

    def _hand_over(self) -> None:
        """Disconnected, every sent bar confirmed: save the state file and give back its lock,
        so that a standby that got the key's connection reads it and goes on (helper-103:
        holding the lock while disconnected, the first ingestor kept a standby with the
        connection waiting, then got 406 itself, and neither published again)."""
        if self.connected or self._stop.is_set() or self.publisher.pending or not self._lock.held:
            return
        self._save_state(force=True)
        self._lock.release()

    def _save_state(self, force: bool = False) -> None:
        if not self._lock.held:  # another ingestor's file now (helper-103: a rollback)
            return
        now = time.monotonic()
        if force or now - self._last_flush >= self.tuning.state_flush_s:
            self.state.save()
            self._last_flush = now

    def _drain_publisher(self) -> None:
        """The worker is ending: wait once for the sent bars' confirmations and record them,
        within what is left of stop()'s budget, or ``INGEST_REQUEST_TIMEOUT_S`` when stop() set
        none (a fatal error, a stop by the flag only)."""
        deadline = self._deadline
        if deadline is not None:
            self._flush_publisher(self._stop_budget_s(deadline))
        else:
            self._flush_publisher(self.config.request_timeout_s)

    def _drain_on_disconnect(self) -> None:
        """Disconnected: wait up to ``INGEST_REQUEST_TIMEOUT_S`` for the sent bars'
        confirmations and record them, in 0.1 s slices so that a stop cuts the wait
        (helper-104: it waited on INGEST_REQUEST_TIMEOUT_S, past the stop's budget). A slice
        begun once stop() has set its deadline (it does so just before the stop flag) waits
        within the stop's budget instead."""
        end = time.monotonic() + self.config.request_timeout_s
        while True:
            deadline = self._deadline
            if deadline is not None:
                self._flush_publisher(self._stop_budget_s(deadline))
            else:
                self._flush_publisher(min(end - time.monotonic(), 0.1))
            if not self.publisher.pending or time.monotonic() >= end or self._stop.is_set():
                return

    @staticmethod
    def _stop_budget_s(deadline: float) -> float:
        """What is left of a stop's budget (``deadline``, ``time.monotonic()``) for
        confirmations, a little kept for the state file and the joins; at least 0.1 s."""
        return max(0.1, deadline - time.monotonic() - 0.25)

    def _flush_publisher(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the sent bars' confirmations; record those that came."""
        for bar in self.publisher.flush(timeout_s=timeout_s):
            self.state.confirm(bar.symbol, bar.ts)
            self.stats.confirmed += 1

    def _stream_error(self, code: int, message: str) -> None:
        """An error answer after authentication. 405 (symbol limit exceeded) refuses the whole
        subscription, so no bar would ever come: stop with exit code 2 naming the settings."""
        self.events.on_connection("stream_error")
        if code != SYMBOL_LIMIT_CODE:
            logger.warning("Alpaca market-data stream error %d: %s", code, message)
            return
        channels = "bars and trades" if self._needs_trades else "bars"
        logger.error(
            "Alpaca refused the subscription: %s (405): %d SYMBOLS on %s for %s exceed this "
            "plan's limit (the Basic plan's IEX stream allows 30 symbols for trades). Set fewer "
            "SYMBOLS, or INGEST_ENRICH=none without trade-based INGEST_INDICATORS (bars only), "
            "or a plan/feed without the limit (INGEST_FEED=sip); stopping",
            message,
            len(self.config.symbols),
            self.config.feed,
            channels,
        )
        self.exit_code = 2
        self._stop.set()
        self._stop_stream(2.0)

    def _auth_error(self, message: str) -> None:
        self.stats.auth_errors[message] = self.stats.auth_errors.get(message, 0) + 1
        self.events.on_connection("auth_error")
        if CONNECTION_LIMIT in message:
            if self.config.on_connection_limit == "exit":
                logger.error(
                    "Alpaca refused the connection: %s (406). Another ingestor (or any "
                    "market-data client) holds this key's only connection; stopping "
                    "(INGEST_ON_CONNECTION_LIMIT=exit). Set INGEST_ON_CONNECTION_LIMIT=wait to "
                    "stay as a standby.",
                    message,
                )
                self.exit_code = 3
                self._stop.set()
                self._stop_stream(2.0)
            else:
                logger.warning(
                    "Alpaca refused the connection: %s (406); standing by, alpaca-py retries "
                    "with backoff (attempt %d)",
                    message,
                    self.stats.auth_errors[message],
                )
        elif any(text in message for text in AUTH_FATAL):
            logger.error("Alpaca refused the authentication: %s; stopping", message)
            self.exit_code = 2
            self._stop.set()
            self._stop_stream(2.0)
        else:
            logger.warning("Alpaca authentication failed: %s; alpaca-py retries", message)

    # -- connection: catch up from history ---------------------------------------------------

    def _connected(self, connected_ns: int) -> None:
        self.stats.connections += 1
        self.connected = True
        self.events.on_connection("connected")
        logger.info(
            "market-data stream connected (%s)",
            "first connection" if self.stats.connections == 1 else "reconnected",
        )
        self._first_trade_ns.clear()
        for buf in self._trades.values():
            buf.clear()
        self._verify = set(self.config.symbols)
        # What this connection's stream delivers, from its bars (Alpaca's times): the span
        # [the minute after the first bar it sends, the newest bar it sent). Not the connect's
        # local time: the subscription may take effect minutes later (helper-121: alpaca-py's
        # on_connected comes before it subscribes, and a full queue blocks that), and the
        # local clock may be behind Alpaca's. The first minute's burst may have begun before
        # the subscription, so that minute is not taken.
        self._coverage.append([None, None])
        del self._coverage[:-_COVERAGE_KEPT]
        if self._stop.is_set() or not self._lock.acquire(self._stop):
            return
        self._adopt_saved_state()
        end = self._last_complete_minute()
        since: dict[str, datetime] = {}
        for s in self.config.symbols:
            if s in self._sent:
                since[s] = self._sent[s]
            elif self._first_start and self.config.start_lookback_s > 0:
                since[s] = end - timedelta(seconds=self.config.start_lookback_s)
                self._sent[s] = since[s]  # nothing before the lookback
                # and in the state file: a stop before its catch-up's bars are confirmed must
                # leave the next start (no longer a first start) this start point (helper-100)
                self.state.confirm(s, since[s])
        unstarted = [s for s in self.config.symbols if s not in since]
        new = [s for s in unstarted if s not in self._live_from]
        if new:
            at = self._start_point(connected_ns)
            for s in new:
                self._live_from[s] = at
                self.state.set_start(s, at)
                # its first live bar is checked against history from the start point, as a
                # reconnect's (helper-117 P2: connected within INGEST_HISTORY_LAG_S of a
                # minute's end, the start point is the minute before; that minute's bar,
                # streamed before the subscription, was neither caught up nor gap-checked)
            self._save_state(force=True)  # a standby taking over, or a restart, starts there
        for s in unstarted:
            if s not in new:
                since[s] = self._live_from[s]
        got = self._backfill(since, end, reason="catch-up") if since else None
        if got is not None and got.done and got.newest:
            # Symbols still with nothing published: none up to the newest bar history had for
            # any symbol (proof that history has that minute: helper-104, a minute missing
            # from history for a few seconds was skipped for good). A failure is left to their
            # first live bar's gap check, as for the published symbols.
            # and not past what an empty answer proves (HISTORY_SETTLE_S; helper-119: another
            # symbol's bar of a minute whose own bar history had a few seconds later moved the
            # start past it, lost with no gap)
            upto = min(end - timedelta(seconds=HISTORY_SETTLE_S), got.newest)
            for s in unstarted:
                if s in since and s not in self._sent and upto > since[s]:
                    self._live_from[s] = upto
                    self.state.set_start(s, upto)
        self.stats.catch_ups += 1

    def _start_point(self, connected_ns: int) -> datetime:
        """The start point of symbols with nothing published and none saved (a first start
        without INGEST_START_LOOKBACK_S, a symbol new in SYMBOLS): the last minute complete by
        the local clock when the stream connected (``connected_ns``,
        ``time.perf_counter_ns()``). A reconnect's catch-up and the first live bar's gap check
        then fetch their bars after it, as for published symbols (helper-100 F1: a disconnect
        before such a symbol's first bar lost its missed minutes, with no gap counted). No
        history request is made for Alpaca's clock (helper-102: it delayed a bars-only first
        start by 8-22 s when history was failing); a local clock ahead of Alpaca's by more
        than ``INGEST_HISTORY_LAG_S`` starts them late (NTP keeps a host within milliseconds)."""
        ago = timedelta(seconds=(time.perf_counter_ns() - connected_ns) / 1e9)
        return self._last_complete_minute(self.clock() - ago)

    def _last_complete_minute(self, now: datetime | None = None) -> datetime:
        """Start of the newest bar whose minute ended ``history_lag_s`` before ``now`` (default:
        the local clock): history is never asked for a minute still being built (inclusive
        ``end`` of a history request)."""
        now = (now or self.clock()) - timedelta(seconds=self.config.history_lag_s)
        return _floor(now, self.tuning.bar_s) - timedelta(seconds=self.tuning.bar_s)

    def _adopt_saved_state(self) -> None:
        """Take over what another ingestor on the same state file published while this one
        waited (a standby, ``INGEST_ON_CONNECTION_LIMIT=wait``): its confirmed bars count as
        published."""
        try:
            saved = IngestState.load(self.config.state_path)
        except DataError as e:
            logger.warning("state file not re-read: %s", e)
            return
        horizon = self.clock() + timedelta(seconds=self.config.future_tolerance_s)
        # the other file's checked times after the local clock go before the merge: kept as the
        # later ones, they replaced this ingestor's own and were then dropped (helper-119)
        _drop_future_checked(self.config.state_path, saved, horizon)
        self.state.merge(saved)  # every symbol's entries and the gaps, not only this one's
        # A last bar after the local clock would make every later bar of its symbol a duplicate:
        # refused at start (exit 2), and not taken as this one's position here either
        # (helper-109's note). It stays in the file (helper-115: dropping it before the merge
        # erased another ingestor's entry, or rolled it back), so the next start names it.
        future = {s: iso_utc(t) for s, t in saved.last_bar.items() if t > horizon}
        if future:
            logger.error(
                "INGEST_STATE_PATH=%s: the other ingestor's last bars dated after the local "
                "clock %s are kept in the file but not taken as published (one of the two "
                "clocks is wrong; the next start refuses the file)",
                self.config.state_path,
                future,
            )
        for s, ts in saved.last_bar.items():
            mine = self._sent.get(s)
            if s in future:
                continue
            if s in self._symbols and (mine is None or ts > mine):
                self._sent[s] = ts
                self._live_from.pop(s, None)
        # as at start (helper-115: taken over without a word)
        _warn_future_starts(self.config.state_path, saved.start, horizon)
        for s, ts in saved.start.items():
            mine = self._live_from.get(s)
            if s in self._symbols and s not in self._sent and (mine is None or ts < mine):
                self._live_from[s] = ts

    def _backfill(
        self,
        since: dict[str, datetime],
        end: datetime,
        *,
        reason: str,
        complete_until: datetime | None = None,
    ) -> _Backfilled:
        """Publish the bars of each symbol after ``since[s]`` up to ``end`` (inclusive), in time
        order. Returns, with the newest bar time history returned, ``done`` False when history
        failed (a gap is then recorded by the caller, or the next live bar tries again) or a
        stop cut the publishing short (the next start fetches the rest: helper-105, a gap check
        cut by a stop was taken as filled and the live bar after the hole published, losing the
        hole for good).

        ``complete_until``: minutes up to it are complete whatever Alpaca's ``Date`` header
        says (a gap check: the live bar after them came from the stream, which sends a minute's
        bar once the minute has ended; helper-117 P1: a ``Date`` header 70 s behind cut the
        hole's bars, the check counted as done, and the live bar was published past them)"""
        # the oldest bar fetched starts at or after this (a bar of the minute ``limit`` falls
        # in is fetched whole: comparing with ``limit`` itself counted an empty gap)
        limit = _floor(
            self.clock() - timedelta(seconds=self.config.max_backfill_s), self.tuning.bar_s
        )
        start_by: dict[str, datetime] = {}
        step = timedelta(seconds=self.tuning.bar_s)
        for s, after in since.items():
            first = after + step
            if first < limit:
                # Not the minutes an earlier history answer covered with nothing of the
                # symbol: a symbol that did not trade for longer than the limit was counted a
                # gap at every restart, of the time between the two.
                missing = self._unproven_from(s, first)
                if missing < limit:
                    self._gap(s, missing, limit, "longer than INGEST_MAX_BACKFILL_S")
                skip_to = limit - timedelta(seconds=self.tuning.bar_s)
                self._sent[s] = skip_to
                # and in the state file, or every restart (or a standby) counts it again
                # (helper-105: 2 -> 4 -> 6 gaps); nothing before ``limit`` is ever published
                if s in self.state.last_bar:
                    self.state.confirm(s, skip_to)
                else:
                    self.state.set_start(s, skip_to)
                    # and in memory: a stop's left bars take the earlier start point, which
                    # would be the old one again (helper-107: the gap counted twice)
                    self._live_from[s] = skip_to
                first = limit
            if first <= end:
                start_by[s] = first
        if not start_by:
            return _Backfilled(True, None)
        symbols = sorted(start_by)
        start = min(start_by.values())
        newest: datetime | None = None
        try:
            bars = self._history(lambda: self.history.bars(symbols, start, end))
            # The local clock may be ahead of Alpaca's: a bar of a minute that has not ended by
            # Alpaca's own clock (its Date header) is partial; it comes live, or from the next
            # gap check, once complete.
            alpaca_now = self.history.server_now()
            if alpaca_now is not None:
                cut = self._last_complete_minute(alpaca_now)
                if complete_until is not None:
                    cut = max(cut, complete_until)
                bars = {s: [b for b in bs if b.ts <= cut] for s, bs in bars.items()}
            newest = max((bs[-1].ts for bs in bars.values() if bs), default=None)
            answered = end if alpaca_now is None else min(end, cut)
            # What an empty answer proves: no bar in minutes older than HISTORY_SETTLE_S
            # (helper-117 F1: history late with one symbol's newest minute, answered empty,
            # had that minute kept as checked, and a later gap skipped it; another symbol's bar
            # of the same minute in the answer did not prove it)
            proven = answered - timedelta(seconds=HISTORY_SETTLE_S)
            fresh = {
                s: [
                    b
                    for b in bars.get(s, [])
                    if b.ts > self._sent.get(s, datetime.min.replace(tzinfo=UTC))
                ]
                for s in symbols
            }
            trades = self._backfill_trades(fresh)
        except (TransientError, ConfigError) as e:
            if isinstance(e, RetryInterruptedError):
                return _Backfilled(False, newest)
            if isinstance(e, ConfigError):
                raise
            logger.error("%s from history failed for %s: %s", reason, ",".join(symbols), e)
            return _Backfilled(False, newest)
        n = 0
        for bar in heapq.merge(*fresh.values(), key=lambda b: (b.ts, b.symbol)):
            cut_at = self._take_until
            if cut_at is not None and time.monotonic() >= cut_at:
                # the stop's first half is spent: the rest is left to the next start, which
                # fetches it again (helper-100: a catch-up went on publishing past the budget,
                # nothing confirmed, and the next start published those bars twice)
                logger.warning(
                    "stop: %s cut after %d of %d bars; the next start fetches the rest",
                    reason,
                    n,
                    sum(len(b) for b in fresh.values()),
                )
                return _Backfilled(False, newest)
            if n and n % 256 == 0:
                self._confirm()  # confirmations recorded as they come
            window = trades.get(bar.symbol)
            self._emit(
                bar,
                _window(window, bar.ts, self._bar_ns) if window is not None else None,
                "backfill",
                0,
            )
            n += 1
        if n:
            logger.info(
                "%s: published %d bars from history for %s (%s .. %s)",
                reason,
                n,
                ",".join(s for s in symbols if fresh[s]),
                iso_utc(start),
                iso_utc(end),
            )
        for s in symbols:
            # History had nothing of it up to ``proven``: kept (IngestState.checked) only when
            # the file's position is the one this request started after (nothing of it sent
            # and unconfirmed, which a kill would lose: that must stay a possible gap)
            position = self.state.last_bar.get(s, self.state.start.get(s))
            if not fresh[s] and position is not None and position + step >= start_by[s]:
                self.state.mark_checked(s, proven)
        return _Backfilled(True, newest)

    def _backfill_trades(self, bars: dict[str, list[AlpacaBar]]) -> dict[str, deque[TradeTick]]:
        if not self._needs_trades:
            return {}
        first = {s: b[0].ts for s, b in bars.items() if b}
        if not first:
            return {}
        last = max(b[-1].ts for b in bars.values() if b) + timedelta(seconds=self.tuning.bar_s)
        # At most trades_backfill_max_s of trades, the most recent bars' (cost bound).
        horizon = last - timedelta(seconds=self.config.trades_backfill_max_s)
        start = max(min(first.values()), horizon)
        stop = last - timedelta(microseconds=1)
        if start > stop:
            return {}
        got = self._history(lambda: self.history.trades(sorted(first), start, stop))
        # Bars before the horizon get no trades (None); the window helper sees an empty deque
        # only for bars inside the fetched span.
        out: dict[str, deque[TradeTick]] = {}
        for s, ticks in got.items():
            out[s] = _Span(ticks, start)
        return out

    def _history(self, fn: Callable[[], Any]) -> Any:
        before_calls, before_retries = self.history.calls, self.history.retries
        try:
            return fn()
        finally:
            self.stats.history_calls += self.history.calls - before_calls
            self.stats.history_retries += self.history.retries - before_retries

    def _covered(self, ts: datetime) -> None:
        """A live bar of ``ts`` came on this connection: what its stream delivers grows."""
        if not self._coverage:
            return
        span = self._coverage[-1]
        if span[0] is None:
            span[0] = ts + timedelta(seconds=self.tuning.bar_s)
        if span[1] is None or ts > span[1]:
            span[1] = ts

    def _unproven_from(self, symbol: str, first: datetime) -> datetime:
        """The first minute at or after ``first`` that an empty history answer did not prove
        free of bars of ``symbol`` (:attr:`IngestState.checked`; a time after the local clock,
        another clock's or a hand edit's, is not taken)."""
        seen = self.state.checked.get(symbol)
        if seen is None or seen > self.clock():
            return first
        return max(first, _floor(seen, self.tuning.bar_s) + timedelta(seconds=self.tuning.bar_s))

    def _gap_before(self, symbol: str, after: datetime, ts: datetime) -> None:
        """A live bar's gap check failed: the minutes after ``after`` before the live bar at
        ``ts`` are possible gaps, less what an earlier empty history answer proved
        (``checked``) and what this process's connections' streams delivered (helper-119: a
        thin symbol's first bar two hours after the start, history failing then, was a
        two-hour gap; helper-121: after a reconnect, the previous connection's hours)."""
        start = self._unproven_from(symbol, after + timedelta(seconds=self.tuning.bar_s))
        # a connection that sent one bar (or none) proves nothing: its span is empty
        spans = sorted(
            (a, b) for a, b in self._coverage if a is not None and b is not None and b > a
        )
        for first, end in spans:
            if start >= ts:
                break
            if first > start:
                self._gap(symbol, start, min(first, ts), "history failed")
            start = max(start, end)
        if start < ts:
            self._gap(symbol, start, ts, "history failed")

    def _gap(self, symbol: str, start: datetime, end: datetime, reason: str) -> None:
        gap = Gap(symbol, iso_utc(start), iso_utc(end), reason)
        self.stats.gaps.append(gap)
        self.state.add_gap(gap)
        self.events.on_gap(symbol)
        logger.error(
            "unfilled gap %s [%s, %s): %s; live bars go on", symbol, gap.start, gap.end, reason
        )

    # -- live messages -----------------------------------------------------------------------

    def _trade(self, raw: Any) -> None:
        try:
            tick = stream_trade(raw)
            symbol = str(raw["S"])
        except (KeyError, TypeError, ValueError):
            return
        buf = self._trades.get(symbol)
        if buf is None:
            return
        self._first_trade_ns.setdefault(symbol, tick.ns)
        buf.append(tick)

    def _cancel_or_correct(self, kind: int, raw: Any) -> None:
        """A trade cancel/error (``{"T":"x","S","i",...}``) drops trade ``i`` from the bar not
        yet published; a correction (``{"T":"c","S","oi","ci","cp","cs","cc","t"}``) replaces
        trade ``oi`` with ``ci``. A bar already published keeps what it had (its hash is
        final); Alpaca's historical trades hold the corrected tape."""
        try:
            symbol = str(raw["S"])
            old_id = int(raw["i"] if kind == _CANCEL else raw["oi"])
        except (KeyError, TypeError, ValueError):
            return
        buf = self._trades.get(symbol)
        if buf is None:
            return
        for n, t in enumerate(buf):
            if t.id != old_id:
                continue
            if kind == _CANCEL:
                del buf[n]
            else:
                try:
                    cc = raw.get("cc") or ()
                    buf[n] = TradeTick(
                        t.ns,
                        float(raw["cp"]),
                        float(raw["cs"]),
                        int(raw["ci"]),
                        (cc,) if isinstance(cc, str) else tuple(str(c) for c in cc),
                    )
                except (KeyError, TypeError, ValueError):
                    del buf[n]
            return

    def _live_bar(self, raw: Any, received_ns: int) -> None:
        try:
            bar = stream_bar(raw)
        except (KeyError, TypeError, ValueError) as e:
            self.stats.invalid += 1
            symbol = raw.get("S") if isinstance(raw, dict) else None
            if isinstance(symbol, str) and symbol in self._symbols:
                self.events.on_invalid(symbol)  # ingest_invalid_bars_total, as refused bars
            reason = type(e).__name__
            if reason not in self._malformed_logged:  # once per reason: a feed fault repeats
                self._malformed_logged.add(reason)
                logger.warning(
                    "malformed bar message refused, not published (%s: %s; later ones with "
                    "this reason are counted in invalid_bars, not logged): %s",
                    reason,
                    excerpt(str(e)),
                    excerpt(raw),
                )
            return
        s = bar.symbol
        if s not in self._symbols:
            return
        problem = self._bad_time(bar.ts)
        if problem:
            self.stats.invalid += 1
            self.events.on_invalid(s)
            logger.warning("bar %s|%s refused, not published: %s", s, iso_utc(bar.ts), problem)
            return
        self._covered(bar.ts)
        last = self._sent.get(s)
        if last is not None and bar.ts <= last:
            recent = self._recent.get(s)
            # Only a time inside what this run published is known for sure to be missing.
            if not recent or bar.ts < recent[0] or bar.ts in recent:
                self.stats.duplicates += 1
                self.events.on_duplicate(s)
                return
            # Older than the last published bar and not one of the recent published ones: a
            # minute that arrived after a later one (publishing it now would break the
            # symbol's order). Not a duplicate: an unfilled gap, counted and logged.
            self._gap(
                s,
                bar.ts,
                bar.ts + timedelta(seconds=self.tuning.bar_s),
                "bar arrived after a later bar was published",
            )
            return
        if s in self._verify:
            self._verify.discard(s)
            # nothing published: from its start point (a reconnect's catch-up may end a minute
            # or two before the first live bar; helper-102)
            after = last if last is not None else self._live_from.get(s)
            if after is not None and (bar.ts - after).total_seconds() > self.tuning.bar_s:
                end = bar.ts - timedelta(seconds=1)
                filled = (
                    not self._stop.is_set()
                    and self._backfill({s: after}, end, reason="gap check", complete_until=end).done
                )
                if not filled:
                    if self._stop.is_set():
                        # Stopping before the gap was filled: publishing this bar would move
                        # the state file past the missing ones; the next start fetches both.
                        self._verify.add(s)
                        return
                    self._gap_before(s, after, bar.ts)
        try:
            trades = self._live_trades(bar) if self._needs_trades else None
        except _StoppedBeforeTradesError:
            # Stopping refused the history request for this bar's trades: published now, its
            # risk metrics would be null for good (and its hash unlike the same bar from
            # history; a fresh-context attack: SIGTERM in a connection's first minute). It is
            # left unpublished, as are this symbol's later bars (the gap check), and the next
            # start fetches them from history with their trades.
            self._verify.add(s)
            if self._sent.get(s) is None:  # read again: the gap check may have sent bars
                # Never published (a first start without INGEST_START_LOOKBACK_S, a symbol new
                # in SYMBOLS): the state file starts it at this bar at the latest, so the next
                # start fetches this bar and what follows (helper-83: without it the later
                # bars went out and the next start had no reason to fetch this one)
                self._start_unpublished_at(s, bar.ts - timedelta(seconds=self.tuning.bar_s))
            logger.info(
                "stopping: bar %s|%s not published (its trades could not be fetched); the "
                "next start fetches it from history",
                s,
                iso_utc(bar.ts),
            )
            return
        self._emit(bar, trades, "live", received_ns)

    def _bad_time(self, ts: datetime) -> str | None:
        """Why a bar time cannot be right, or None: not on a bar boundary (a bar at hh:mm:30
        would be published and the real hh:mm bar dropped), dated after the local clock by
        more than ``future_tolerance_s`` (it would make every later bar a duplicate), or before
        ``MIN_YEAR`` (helper-110: published, then saved as ``500-01-01T...``, a state file
        the next start refused, exit 2 at every start; runners refuse such a message too)."""
        if ts.year < MIN_YEAR:
            return f"dated before year {MIN_YEAR}"
        if _ns(ts) % self._bar_ns:
            return f"time not on a {self.tuning.bar_s:g} s boundary"
        ahead = (ts - self.clock()).total_seconds()
        if ahead > self.config.future_tolerance_s:
            return f"dated {ahead:.0f} s after the local clock (INGEST_FUTURE_TOLERANCE_S)"
        return None

    def _live_trades(self, bar: AlpacaBar) -> Trades | None:
        """The trades of ``bar``'s minute: from the stream, or from history when the
        connection may have missed some. None when history failed (the bar is published with
        null risk metrics, logged). Raises :class:`_StoppedBeforeTradesError` when history was
        refused because the ingestor is stopping."""
        s = bar.symbol
        start_ns = _ns(bar.ts)
        end_ns = start_ns + self._bar_ns
        buf = self._trades[s]
        # Trades arrive in any order (and after a reconnect maybe twice): take the bar's
        # window by time, then order it as history does (ordered_trades), so a live bar and the
        # same bar backfilled hash alike.
        mine = [t for t in buf if start_ns <= t.ns < end_ns]
        self._trades[s] = [t for t in buf if t.ns >= end_ns]
        first = self._first_trade_ns.get(s)
        if first is not None and first < start_ns:
            return Trades.of([(t.price, t.size) for t in ordered_trades(mine)])
        # The connection may have missed some of this minute's trades: ask history.
        self.stats.trades_from_history += 1
        try:
            got = self._history(
                lambda: self.history.trades(
                    [s], bar.ts, bar.ts + timedelta(microseconds=self._bar_ns // 1000 - 1)
                )
            )
        except TransientError as e:
            if self._stop.is_set():
                raise _StoppedBeforeTradesError from e
            logger.warning("trades of %s %s from history failed: %s", s, iso_utc(bar.ts), e)
            return None
        return Trades.of([(t.price, t.size) for t in got.get(s, []) if t.ns < end_ns])

    def _emit(
        self, bar: AlpacaBar, trades: Trades | None, source: Source, received_ns: int
    ) -> None:
        view = BarView(
            bar.symbol,
            bar.ts,
            bar.open,
            bar.high,
            bar.low,
            bar.close,
            bar.volume,
            bar.trade_count,
            bar.vwap,
        )
        try:
            extras = self.enricher.enrich(view, trades)
            out = build_message(
                bar.symbol,
                bar.ts,
                {
                    "open": bar.open,
                    "high": bar.high,
                    "low": bar.low,
                    "close": bar.close,
                    "volume": bar.volume,
                },
                extras,
                source=source,
                received_ns=received_ns,
            )
        except (DataError, ValueError) as e:
            self.stats.invalid += 1
            self.events.on_invalid(bar.symbol)
            logger.warning("bar refused, not published: %s", e)
            return
        if self._abandoned:
            return  # stop() gave up on this thread: not sent, the next start fetches it
        self.publisher.publish(out)
        if bar.symbol not in self._first_sent and bar.symbol not in self.state.last_bar:
            self._first_sent[bar.symbol] = bar.ts
        self._sent[bar.symbol] = bar.ts
        self._recent.setdefault(bar.symbol, deque(maxlen=_RECENT)).append(bar.ts)
        if source == "live":
            self.stats.live += 1
        else:
            self.stats.backfilled += 1

    # -- report ------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """What this run did, for the final JSON line and the logs."""
        st = self.stats
        lat = sorted(self.publisher.stats.latencies_ns)
        return {
            "topic": self.publisher.topic_path,
            "symbols": list(self.config.symbols),
            "bars_live": st.live,
            "bars_backfilled": st.backfilled,
            "bars_confirmed": st.confirmed,
            "duplicates_skipped": st.duplicates,
            "invalid_bars": st.invalid,
            "connections": st.connections,
            "reconnects": st.reconnects,
            "auth_errors": dict(st.auth_errors),
            "history_calls": st.history_calls,
            "history_retries": st.history_retries,
            "trades_from_history": st.trades_from_history,
            "republished": self.publisher.stats.republished,
            "unconfirmed": self.publisher.pending,
            "left_queued": st.left_queued + self._dropped,
            "gaps_unfilled": len(st.gaps),
            "gaps": [asdict(g) for g in st.gaps],
            "last_bar": {s: iso_utc(t) for s, t in sorted(self.state.last_bar.items())},
            "publish_latency_ms_p50": _pct(lat, 0.5),
            "publish_latency_ms_p99": _pct(lat, 0.99),
            "exit_code": self.exit_code,
        }


def _pct(sorted_ns: list[int], q: float) -> float | None:
    if not sorted_ns:
        return None
    return round(sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1e6, 3)


class _Span(deque[TradeTick]):
    """Historical trades fetched from ``start`` on: bars before ``start`` have unknown trades."""

    def __init__(self, ticks: Iterable[TradeTick], start: datetime) -> None:
        super().__init__(ticks)
        self.start = start


def _window(ticks: deque[TradeTick], ts: datetime, bar_ns: int) -> Trades | None:
    """The trades of the bar starting at ``ts`` (consumed from the front of ``ticks``)."""
    if isinstance(ticks, _Span) and ts < ticks.start:
        return None
    start_ns = _ns(ts)
    end_ns = start_ns + bar_ns
    while ticks and ticks[0].ns < start_ns:
        ticks.popleft()
    rows = []
    while ticks and ticks[0].ns < end_ns:
        t = ticks.popleft()
        rows.append((t.price, t.size))
    return Trades.of(rows)
