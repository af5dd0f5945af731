"""The Alpaca broker's worker threads: every HTTP request after start, and the trade-updates
stream.

Threads (started by :meth:`AlpacaWorker.start`, stopped and joined by :meth:`AlpacaWorker.stop`;
daemons so a crashed run never hangs the interpreter, but always joined):

* ``alpaca-orders``: sends submits and cancels (commands from the main thread). It holds an
  equity order while the Alpaca clock says the market is closed (not an extended-hours one, not
  crypto) and an order that must wait for cancels on its symbol to settle (Alpaca keeps the
  shares of a ``pending_cancel`` order reserved), and retries a refusal for "insufficient qty
  available" a few times after such cancels.
* ``alpaca-monitor``: polls, and refreshes the account. A poll is one
  ``GET /orders?status=open&nested=false`` (every listed open order of the account), plus a
  lookup of a family only when one of its orders left the list (it filled or ended), when a
  replaced order's successor is unknown, or, for families whose live orders are all ``held``
  (Alpaca lists none of them), once per ``refresh_interval_s``. So the cost of a poll does not
  grow with the number of open brackets. Polls come every ``poll_interval_s``, or every
  ``stream_poll_interval_s`` while the stream is connected.
* ``alpaca-stream`` (``use_stream``): trade updates, the default source of order events: the
  Trading API's websocket (alpaca-py ``TradingStream``) or the Broker API's trade events SSE
  (``/v1/events/trades``, resumed with ``since_id`` after a reconnect). A reconnect triggers a
  poll (events may have been missed).

No thread touches a backtrader object: each puts :mod:`~runtime.brokers.alpaca.events` on the
event queue and the broker applies them on the main thread. Every Alpaca snapshot goes through
:meth:`AlpacaWorker.observe`, which updates the shared :class:`~.state.FlightBook` and queues
the event under one lock.

Alpaca behaviour relied on (sources in ``tests/alpaca_server.py``): held legs are not listed
as open; a triggered stop leg is replaced by a new order that fills; the trade-updates stream
does not report a held leg's cancel when its sibling fills (alpaca-py #198), so a leg's fill
makes the monitor look its family up; cancels pass through ``pending_cancel``; 200 requests per
minute per account.

Failures: a submit answered 4xx is a :class:`~.events.SubmitRejected` unless an earlier attempt
may have landed (then the order is looked up by its ``client_order_id``); a clock that cannot
be read sends the order (Alpaca queues orders placed while closed) unless the last read still
proves the market closed; a cancel that cannot get through is retried; ten failed polls in a
row, or any unexpected error, end the thread with a :class:`~.events.WorkerFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import requests
import sseclient
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import TradeUpdate
from alpaca.trading.stream import TradingStream

from core.errors import BrokerError, RetryInterruptedError, TransientError
from runtime.brokers.alpaca import http
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.events import (
    SHUTDOWN,
    AccountState,
    AlpacaOrderUpdate,
    CancelOrder,
    Command,
    Event,
    NotSent,
    ReplacementLost,
    SubmitOrder,
    SubmitRejected,
    WorkerFailed,
)
from runtime.brokers.alpaca.http import AlpacaApi, AlpacaAPIError, AlpacaCaller, BrokerApi
from runtime.brokers.alpaca.orders import ZERO, is_crypto, position_key, positions_of, to_decimal
from runtime.brokers.alpaca.state import Flight, FlightBook, MarketClock

logger = logging.getLogger(__name__)

MAX_POLL_FAILURES = 10  # polls failed in a row before the monitor gives up
MAX_SUCCESSOR_MISSES = 5  # searches for an unnamed successor before giving up on it
INSUFFICIENT_QTY_RETRIES = 5  # retries of a submit refused while what it waited for settles
CANCEL_RETRIES = 5  # retries of a cancel that could not get through
CLOSE_ALL_SLACK = Decimal("1.01")  # a crypto close takes Alpaca's position up to 1% larger
SNAPSHOT_READS = 3  # account/positions/account reads before an account read is given up
SETTLE_POLLS = 15  # an order waits for cancels on its symbol at most this many poll intervals
SSE_READ_TIMEOUT_S = 60.0  # no byte (event or heartbeat comment) for this long: reconnect
# The longest a stop waits for the trade-updates stream's thread, seconds. What the stream would
# still bring, the stop's final poll reads; a stream waiting for an answer (a connect, a close
# handshake with a frozen peer) is left behind rather than spending the budget the final sync
# needs (fresh-context attack, helper-96: a connect answered after 5 s held a 3 s budget).
STREAM_STOP_S = 1.0
EVENTS_PATH = "/v1/events/trades"  # alpaca-py 0.44's BrokerClient.get_trade_events path


@dataclass
class _Parked:
    """A command the orders thread holds back: until ``next_s`` (``time.monotonic()``), the
    open, or the cancels it follows."""

    cmd: SubmitOrder | CancelOrder
    why: str
    next_s: float = 0.0
    retries_left: int = 0
    attempt: int = 0
    since_s: float = 0.0


class AlpacaWorker:
    """Owns the orders, monitor and stream threads of one broker.

    Args:
        config: intervals, stream, market-hours policy.
        session_id: prefix of this run's ``client_order_id``s (orders of the session that no
            flight follows are still reported, so the broker can cancel them).
        caller: runs every request (shared with the broker; its stop event is :attr:`stop_event`).
        make_api: the account's calls; each thread builds its own.
        flights: the families in flight (shared with the broker).
        events: where answers go, for the main thread.

    Thread context: :meth:`start`, :meth:`stop`, :meth:`submit`, :meth:`cancel`, :meth:`check`
    on the main thread; :meth:`poll_once`, :meth:`refresh_account`, :meth:`cancel_all` on the
    monitor thread, or on the main thread once the threads are joined (the final sync).
    """

    def __init__(
        self,
        config: AlpacaBrokerConfig,
        *,
        session_id: str,
        caller: AlpacaCaller,
        make_api: Callable[[], AlpacaApi],
        flights: FlightBook,
        events: queue.Queue[Event],
    ) -> None:
        self.config = config
        self.session_id = session_id
        self.caller = caller
        self.stop_event = caller.stop
        self.flights = flights
        self.clock: MarketClock | None = None  # set by the broker from the read at start
        self._make_api = make_api
        self._events = events
        self._commands: queue.Queue[Command] = queue.Queue()
        self._wake = threading.Event()
        self._refresh_soon = threading.Event()  # a fill was seen: refresh the account soon
        self._poll_due = threading.Event()  # poll orders now (after a cancel, a reconnect)
        self._check_lock = threading.Lock()
        self._check_keys: set[str] = set()
        self._threads: list[threading.Thread] = []
        self._stream: Any = None
        self._sse: requests.Response | None = None
        self.stream_connected = threading.Event()
        self.stream_connects = 0  # times the stream (re)connected (written by its thread only)
        self.failures = 0  # polls failed in a row (read by any thread: health)
        # set while the monitor thread waits between passes (a poll made due and then found
        # cleared with this set has finished: tests wait for the catch-up poll of a connect)
        self.monitor_idle = threading.Event()

    @property
    def healthy(self) -> bool:
        """False while the monitor's polls fail, and while Alpaca does not answer: a request
        in flight, or requests failing without an answer, for more than one request's timeout
        and a second (:meth:`AlpacaCaller.reachable`). A stalled Alpaca is retried for minutes
        before a poll counts as failed, and readiness said "reachable" all that time
        (helper-82), also during the start-up reads (helper-86 F7). Any thread."""
        return self.failures == 0 and self.caller.reachable(self.config.request_timeout_s + 1.0)

    def interval_s(self) -> float:
        """The poll period now: slower while the stream brings the events."""
        cfg = self.config
        return cfg.stream_poll_interval_s if self.stream_connected.is_set() else cfg.poll_interval_s

    # -- lifecycle (main thread) ---------------------------------------------------------------

    def start(self) -> None:
        """Start the threads (the stream only with ``use_stream``)."""
        self._spawn("alpaca-orders", self._orders_loop)
        self._spawn("alpaca-monitor", self._monitor_loop)
        if self.config.use_stream:
            target = self._sse_loop if self.config.broker_api else self._stream_loop
            self._spawn("alpaca-stream", target)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, deadline: float | None = None) -> None:
        """Stop every thread and join them all until ``deadline`` (``time.monotonic()``
        seconds; default ``request_timeout_s + 5`` s from now), one deadline for all: a thread
        still in a request then is left (a daemon) and named in an error. The trade-updates
        stream's thread gets at most :data:`STREAM_STOP_S` of it (left behind with a warning:
        the final poll reads what it would have brought). Idempotent.

        Submits still queued or waiting are reported :class:`NotSent`; cancels still queued are
        sent once.
        """
        self.stop_event.set()
        self._commands.put(SHUTDOWN)
        self._wake.set()
        if deadline is None:
            deadline = time.monotonic() + self.config.request_timeout_s + 5.0
        stream_until = min(deadline, time.monotonic() + STREAM_STOP_S)
        self._stop_stream(stream_until)
        # the stream's thread last: the others' joins are time it has to end as well
        for t in sorted(self._threads, key=lambda t: t.name == "alpaca-stream"):
            stream = t.name == "alpaca-stream"
            # before: request_timeout_s + 5 s for each thread in turn, so a stalled Alpaca
            # held a SIGTERM 24 s past SHUTDOWN_TIMEOUT_S=3 (a fresh-context attack)
            t.join(timeout=max(0.0, (stream_until if stream else deadline) - time.monotonic()))
            if not t.is_alive():
                continue
            if stream:
                logger.warning(
                    "the trade-updates stream still waits for Alpaca's answer after %.1f s; "
                    "left behind (a daemon), the final poll reads the orders instead",
                    STREAM_STOP_S,
                )
            else:
                logger.error(
                    "thread %s did not stop within ALPACA_STOP_TIMEOUT_S (a request in "
                    "flight); left behind",
                    t.name,
                )
        self._threads.clear()

    def submit(self, command: SubmitOrder) -> None:
        """Queue a submit for the orders thread."""
        self._commands.put(command)

    def cancel(self, command: CancelOrder) -> None:
        """Queue a cancel for the orders thread."""
        if command.coid is not None:
            self.flights.request_cancel(command.coid)
        self._commands.put(command)

    def check(self, keys: set[str]) -> None:
        """Look up every family on these position keys, then read the account (the main thread
        saw Alpaca's position differ from its own there)."""
        with self._check_lock:
            self._check_keys |= keys
        self._wake.set()

    def _put(self, event: Event) -> None:
        self._events.put(event)

    def observe(
        self,
        snap: AlpacaOrder,
        source: str,
        fill: tuple[Decimal, Decimal] | None = None,
    ) -> str | None:
        """Take an Alpaca snapshot into the flight book and queue it for the main thread (if
        it is about a followed family or an order of this session). Any thread.

        Args:
            fill: ``(qty, price USD)`` of the execution a stream fill event reports.
        """
        prefix = f"{self.session_id}-"
        qty, price = fill if fill is not None else (None, None)

        def emit(coid: str | None) -> None:
            if coid is not None or snap.client_order_id.startswith(prefix):
                self._events.put(
                    AlpacaOrderUpdate(snap, source, qty, price)  # type: ignore[arg-type]
                )

        return self.flights.observe(snap, emit)

    # -- alpaca-orders thread ------------------------------------------------------------------

    def _orders_loop(self) -> None:
        api = self._make_api()
        parked: list[_Parked] = []
        while True:
            timeout = None
            if parked:
                timeout = max(0.0, min(p.next_s for p in parked) - time.monotonic())
            try:
                cmd: Command | None = self._commands.get(timeout=timeout)
            except queue.Empty:
                cmd = None
            try:
                if cmd is SHUTDOWN:
                    self._drain_commands(api, parked)
                    return
                if isinstance(cmd, SubmitOrder):
                    self._try_submit(api, _Parked(cmd, "new"), parked)
                elif isinstance(cmd, CancelOrder):
                    waiting = [p for p in parked if isinstance(p.cmd, SubmitOrder)]
                    hit = [p for p in waiting if cmd.coid is not None and p.cmd.coid == cmd.coid]
                    if hit:
                        assert isinstance(hit[0].cmd, SubmitOrder)
                        parked.remove(hit[0])
                        self.flights.mark_sent(cmd.coid or "")
                        self._put(
                            NotSent(hit[0].cmd.coid, f"canceled before it was sent ({hit[0].why})")
                        )
                    else:
                        self._cancel(
                            api, _Parked(cmd, "cancel", retries_left=CANCEL_RETRIES), parked
                        )
                self._run_parked(api, parked)
            except RetryInterruptedError:
                continue
            except Exception as e:
                logger.exception("alpaca-orders thread error")
                self._put(WorkerFailed(e))

    def _run_parked(self, api: AlpacaApi, parked: list[_Parked]) -> None:
        now = time.monotonic()
        ready = [p for p in parked if p.next_s <= now]
        for p in ready:
            parked.remove(p)
            if isinstance(p.cmd, SubmitOrder):
                self._try_submit(api, p, parked)
            else:
                self._cancel(api, p, parked)

    def _drain_commands(self, api: AlpacaApi, parked: list[_Parked]) -> None:
        cancels = [p for p in parked if isinstance(p.cmd, CancelOrder)]
        for p in parked:
            if isinstance(p.cmd, SubmitOrder):
                self.flights.mark_sent(p.cmd.coid)
                self._put(NotSent(p.cmd.coid, "not sent: broker stopped"))
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, SubmitOrder):
                self.flights.mark_sent(cmd.coid)
                self._put(NotSent(cmd.coid, "not sent: broker stopped"))
            elif isinstance(cmd, CancelOrder):
                cancels.append(_Parked(cmd, "cancel"))
        for p in cancels:  # one more try each; the final sync cancels again if asked to
            with contextlib.suppress(TransientError, BrokerError, RetryInterruptedError):
                self._cancel(api, dataclasses.replace(p, retries_left=0), [])

    def _try_submit(self, api: AlpacaApi, p: _Parked, parked: list[_Parked]) -> None:
        cmd = p.cmd
        assert isinstance(cmd, SubmitOrder)
        now = time.monotonic()
        if p.why == "new":
            p.since_s = now
            if cmd.after:
                p.retries_left = INSUFFICIENT_QTY_RETRIES
        if (
            cmd.after
            and now - p.since_s < SETTLE_POLLS * self.config.poll_interval_s
            and not self.flights.settled(cmd.after)
        ):
            # the shares stay reserved until those cancels settle: wait for the monitor to see
            # them end; pending_cancel can last minutes outside market hours, so after
            # SETTLE_POLLS intervals the order goes anyway and a refusal is retried
            p.why, p.next_s = (
                "waiting for cancels to settle",
                now + min(0.25, self.config.poll_interval_s),
            )
            self._poll_due.set()
            self._wake.set()
            parked.append(p)
            return
        if self._must_wait(api, cmd):
            if p.why != "market closed":
                logger.info("%s: market closed, order %s waits for the open", cmd.symbol, cmd.coid)
            p.why, p.next_s = "market closed", time.monotonic() + self.config.poll_interval_s
            parked.append(p)
            return
        if cmd.reduce_only:
            fitted = self._fit_to_position(api, cmd)
            if fitted is None:
                return
            p.cmd = fitted
        self._submit(api, p, parked)

    def _fit_to_position(self, api: AlpacaApi, cmd: SubmitOrder) -> SubmitOrder | None:
        """A reduce-only order sized against Alpaca's position now (one ``GET /positions``):
        at most the position in the reducing direction, or None (reported :class:`NotSent`)
        when the position is flat or on the other side already, e.g. because a stop leg
        filled while the order waited for cancels to settle. Sending it at its old size would
        open a position the other way."""
        request = cmd.request
        if request.qty is None:
            return cmd
        buy = str(getattr(request.side, "value", request.side)) == "buy"
        want = to_decimal(request.qty)
        try:
            rows = self.caller.call("positions", api.positions, what=f"position for {cmd.coid}")
        except RetryInterruptedError:
            self.flights.mark_sent(cmd.coid)
            self._put(NotSent(cmd.coid, "not sent: broker stopped"))
            return None
        except (TransientError, AlpacaAPIError) as e:
            self.flights.mark_sent(cmd.coid)
            self._put(
                NotSent(
                    cmd.coid,
                    f"not sent: this order only reduces {cmd.symbol} and Alpaca's position "
                    f"could not be read to size it ({e})",
                )
            )
            return None
        held = positions_of(rows).get(position_key(cmd.symbol), (ZERO, 0.0))[0]
        room = max(-held if buy else held, ZERO)
        if room <= 0:
            where = "flat" if held == 0 else f"{held} (the other side)"
            logger.warning(
                "order %s (%s) meant to reduce the position, which is %s at Alpaca now: not sent",
                cmd.coid,
                cmd.symbol,
                where,
            )
            self.flights.mark_sent(cmd.coid)
            self._put(
                NotSent(
                    cmd.coid,
                    f"not sent: this order only reduces {cmd.symbol}, whose position at Alpaca "
                    f"is {where} now (an order of the position filled meanwhile); sending it "
                    "would open a position the other way",
                )
            )
            return None
        if cmd.closes and want < room <= want * CLOSE_ALL_SLACK:
            logger.info(
                "order %s (%s): closing Alpaca's whole position %s (this run had %s; the fee in "
                "the coin differed from the estimate)",
                cmd.coid,
                cmd.symbol,
                room,
                want,
            )
            return dataclasses.replace(cmd, request=request.model_copy(update={"qty": float(room)}))
        if room >= want:
            return cmd
        logger.warning(
            "order %s (%s): resized from %s to %s, the position left at Alpaca",
            cmd.coid,
            cmd.symbol,
            want,
            room,
        )
        return dataclasses.replace(cmd, request=request.model_copy(update={"qty": float(room)}))

    def _must_wait(self, api: AlpacaApi, cmd: SubmitOrder) -> bool:
        """True when ``cmd`` is an equity order for the regular session (not an ``opg``/``cls``
        auction order) and the Alpaca clock says the market is closed. An unreadable clock
        holds the order only while the last read still proves the market closed; otherwise the
        order goes (Alpaca queues orders placed while the market is closed, docs "Orders")."""
        if is_crypto(cmd.symbol) or cmd.extended_hours or not self.config.wait_for_market_open:
            return False
        tif = str(getattr(cmd.request.time_in_force, "value", cmd.request.time_in_force))
        if tif in ("opg", "cls"):
            # auction orders: an opg order must reach Alpaca before 9:28 ET and is rejected
            # from then until 19:00, so held until the open it could never run (docs "Orders
            # at Alpaca", time in force; a fresh-context attack); cls orders are taken while
            # closed for the next closing auction
            return False
        clock = self.clock
        now = datetime.now(UTC)
        if clock is None or clock.stale(now, time.monotonic(), self.config.poll_interval_s):
            try:
                read = self.caller.call("clock", api.clock, attempts=1)  # best effort
            except (TransientError, AlpacaAPIError) as e:
                if clock is not None and clock.surely_closed(now):
                    return True
                logger.warning(
                    "Alpaca clock unreadable (%s): sending %s now (Alpaca queues orders placed "
                    "while the market is closed)",
                    e,
                    cmd.coid,
                )
                return False
            clock = self.clock = MarketClock.of(read, time.monotonic())
        return not clock.is_open

    def _submit(self, api: AlpacaApi, p: _Parked, parked: list[_Parked]) -> None:
        cmd = p.cmd
        assert isinstance(cmd, SubmitOrder)
        coid = cmd.coid
        snap: AlpacaOrder | None = None
        done = True
        p.attempt += 1
        try:
            snap = self.caller.call("submit", api.submit, cmd.request, what=f"submit {coid}")
        except AlpacaAPIError as e:
            if e.attempt > 1:
                # an earlier attempt may have created the order (its answer was lost): whatever
                # this retry was told, Alpaca's record of the client_order_id decides
                snap = self._lookup(api, coid, refusal=e)
            elif (
                e.status == 403
                and ("insufficient qty" in e.message or "wash trade" in e.message)
                and cmd.after
                and p.retries_left > 0
            ):
                # a cancel we waited for may still hold the shares (pending_cancel), or an
                # opposite market order we waited for may still work (a potential wash trade,
                # docs "User Protection"): both pass once that order ends
                p.retries_left -= 1
                p.why = "shares still reserved" if "qty" in e.message else "opposite order working"
                p.next_s = time.monotonic() + self.caller.policy.delay_s(p.attempt)
                parked.append(p)
                done = False
                logger.info("submit %s: %s; retrying after the cancels settle", coid, e.message)
            elif "client_order_id" in e.message and "unique" in e.message:
                self._reject(
                    coid,
                    f"alpaca: {e.message}: client_order_id {coid} "
                    "already used on this account (session id reused?)",
                )
            else:
                self._reject(coid, f"alpaca: {e.message} (HTTP {e.status}, code {e.code})")
        except RetryInterruptedError:
            logger.warning("submit %s interrupted by stop; resolved at the final sync", coid)
        except TransientError as e:
            logger.warning("submit %s: %s; looking the order up", coid, e)
            try:
                snap = self._lookup(api, coid)
            except (TransientError, BrokerError) as e2:
                logger.warning("lookup %s: %s; the monitor will resolve it", coid, e2)
        finally:
            if done:
                if snap is not None:  # observed before the submit counts as done
                    self.observe(snap, "submit")
                self.flights.mark_sent(coid)

    def _lookup(
        self,
        api: AlpacaApi,
        coid: str,
        interruptible: bool = True,
        refusal: AlpacaAPIError | None = None,
        deadline: float | None = None,
    ) -> AlpacaOrder | None:
        """The order with ``coid``, or None after queuing a rejection when Alpaca has none
        (with ``refusal``'s message when a retried submit was refused)."""
        try:
            return self.caller.call(
                "lookup",
                api.order_by_coid,
                coid,
                what=f"lookup {coid}",
                interruptible=interruptible,
                deadline=deadline,
            )
        except AlpacaAPIError as e:
            if e.status == 404:
                reason = (
                    f"alpaca: {refusal.message} (HTTP {refusal.status}, code {refusal.code}; "
                    "no order with this client_order_id)"
                    if refusal is not None
                    else "alpaca: order not accepted (Alpaca was unreachable "
                    "and has no order with this client_order_id)"
                )
                self._reject(coid, reason)
                return None
            raise

    def _reject(self, coid: str, reason: str) -> None:
        self.flights.remove(coid)
        self._put(SubmitRejected(coid, reason))

    def _cancel(self, api: AlpacaApi, p: _Parked, parked: list[_Parked]) -> None:
        cmd = p.cmd
        assert isinstance(cmd, CancelOrder)
        coid = cmd.coid
        targets: list[str] = [cmd.alpaca_id] if cmd.alpaca_id else []
        if not targets and coid is not None:
            targets = self.flights.cancel_targets(coid)
            if not targets and self.flights.alpaca_id(coid) is None:
                snap = self._lookup(api, coid)
                if snap is None:
                    return
                self.observe(snap, "lookup")
                targets = self.flights.cancel_targets(coid)
        for aid in targets:
            what = f"cancel {coid or aid}"
            try:
                self.caller.call("cancel", api.cancel, aid, what=what)
            except AlpacaAPIError as e:
                # 422: it already ended, or is pending_cancel; the monitor reports what happened
                logger.info("%s: %s", what, e.message)
            except TransientError as e:
                if p.retries_left <= 0:
                    logger.error("%s: %s; giving up, the order may still be open", what, e)
                    continue
                logger.warning("%s: %s; retrying", what, e)
                parked.append(
                    _Parked(
                        CancelOrder(coid, aid),
                        "cancel retry",
                        next_s=time.monotonic()
                        + self.caller.policy.delay_s(CANCEL_RETRIES - p.retries_left + 1),
                        retries_left=p.retries_left - 1,
                    )
                )
        self._poll_due.set()
        self._wake.set()

    # -- alpaca-monitor thread -----------------------------------------------------------------

    def _monitor_loop(self) -> None:
        api = self._make_api()
        cfg = self.config
        next_poll = time.monotonic() + self.interval_s()
        next_refresh = time.monotonic() + cfg.refresh_interval_s
        while not self.stop_event.is_set():
            self.monitor_idle.set()
            self._wake.wait(max(0.0, min(next_poll, next_refresh) - time.monotonic()))
            self.monitor_idle.clear()
            self._wake.clear()
            if self.stop_event.is_set():
                return
            try:
                with self._check_lock:
                    keys, self._check_keys = self._check_keys, set()
                if keys:
                    self.flights.due(keys=keys)
                now = time.monotonic()
                if self._refresh_soon.is_set():
                    self._refresh_soon.clear()
                    next_refresh = min(next_refresh, now + cfg.poll_interval_s)
                if keys or now >= next_poll or self._poll_due.is_set():
                    self._poll_due.clear()
                    if self.poll_once(api):
                        next_refresh = min(next_refresh, time.monotonic() + cfg.poll_interval_s)
                    next_poll = time.monotonic() + self.interval_s()
                if keys or time.monotonic() >= next_refresh:
                    self.refresh_account(api, checked_keys=frozenset(keys))
                    next_refresh = time.monotonic() + cfg.refresh_interval_s
                    next_poll = time.monotonic() + self.interval_s()
                self.failures = 0
            except RetryInterruptedError:
                return
            except (TransientError, BrokerError) as e:
                self.failures += 1
                logger.warning("Alpaca poll failed (%d in a row): %s", self.failures, e)
                if self.failures >= MAX_POLL_FAILURES:
                    self._put(WorkerFailed(e))
                    return
            except Exception as e:
                logger.exception("alpaca-monitor thread error")
                self._put(WorkerFailed(e))
                return

    def poll_once(self, api: AlpacaApi, final: bool = False, deadline: float | None = None) -> bool:
        """One poll: the open-orders list, then a lookup of each family that needs one (see the
        module docstring); every snapshot goes on the event queue.

        Args:
            final: at stop: runs to the end (not interruptible), also looks up families whose
                submit never finished and every family with held orders.
            deadline: the final sync's budget (``time.monotonic()``).

        Returns:
            True when a fill of a followed order was seen.
        """
        if not len(self.flights):
            return False
        before = self.flights.marker()
        kw: dict[str, Any] = {"interruptible": not final, "deadline": deadline}
        rows = self.caller.call("open_orders", http.open_orders, api, **kw)
        for row in rows:
            self.observe(row, "poll")
        listed = {str(r.id) for r in rows}
        for fl in self.flights.snapshot().flights.values():
            if not fl.submit_done and not final:
                continue  # the orders thread is still sending it
            if fl.done:
                continue  # the main thread forgets it once it applied the end
            live = fl.live()
            held = any(m.status == "held" for m in live)
            left_list = any(
                m.id not in listed and m.status not in ("held", "replaced") for m in live
            )
            # A family whose only working orders are held shows nothing in the listing: a
            # triggered stop leg filling there is seen through the position instead (the
            # account read differs, the main thread asks for a check), or at the final poll.
            if (
                fl.root_id is None
                or fl.check_due
                or fl.unresolved()
                or left_list
                or (final and held)
            ):
                self.lookup_family(api, fl, **kw)
        return bool(self.flights.marker()[2] != before[2])

    def lookup_family(
        self, api: AlpacaApi, fl: Flight, interruptible: bool = True, deadline: float | None = None
    ) -> None:
        """Read a family from Alpaca: its root with legs, any member the root does not show
        (successors), and the successor of every replaced member (by ``replaced_by``, else by
        searching the symbol's recent orders for one that ``replaces`` it)."""
        kw: dict[str, Any] = {"interruptible": interruptible, "deadline": deadline}
        coid = fl.coid
        if fl.root_id is None:
            snap = self._lookup(api, coid, interruptible=interruptible, deadline=deadline)
            if snap is None:
                self.flights.mark_checked(coid)
                self.flights.remove(coid)
                return
            self.observe(snap, "lookup")
        else:
            snap = self.caller.call("order", api.order, fl.root_id, what=f"order {coid}", **kw)
            self.observe(snap, "lookup")
        shown = {str(snap.id), *(str(leg.id) for leg in snap.legs or ())}
        current = self.flights.snapshot().flights.get(coid)
        if current is None:
            return
        for m in current.live():
            if m.id not in shown and m.status != "replaced":
                self.observe(
                    self.caller.call("order", api.order, m.id, what=f"order {coid}", **kw), "lookup"
                )
        for _ in range(4):  # a successor may itself have been replaced
            current = self.flights.snapshot().flights.get(coid)
            pending = current.unresolved() if current is not None else []
            progressed = False
            for m in pending:
                if m.replaced_by is not None:
                    succ: AlpacaOrder | None = self.caller.call(
                        "order", api.order, m.replaced_by, what=f"order {coid}", **kw
                    )
                else:
                    replaced = self.caller.call(
                        "order", api.order, m.id, what=f"order {coid}", **kw
                    )
                    succ = self.caller.call(
                        "successor",
                        http.successor_of,
                        api,
                        replaced,
                        what=f"successor {coid}",
                        **kw,
                    )
                if succ is not None:
                    self.observe(succ, "lookup")
                    progressed = True
                    continue
                misses = self.flights.missed(coid, m.id)
                if misses >= MAX_SUCCESSOR_MISSES:
                    logger.error(
                        "order %s (%s) was replaced but no order replacing it can be found after "
                        "%d searches; ending it here (the account read sets the position)",
                        m.id,
                        fl.symbol,
                        misses,
                    )
                    self.flights.lost_successor(coid, m.id)
                    self._put(ReplacementLost(coid, m.id))
            if not progressed:
                break
        self.flights.mark_checked(coid)

    def refresh_account(
        self,
        api: AlpacaApi,
        final: bool = False,
        checked_keys: frozenset[str] = frozenset(),
        deadline: float | None = None,
    ) -> None:
        """Read the account and positions, poll once more, and queue an :class:`AccountState`
        that says whether the read straddled a fill (``consistent``).

        Args:
            final: the read at stop (runs to the end; otherwise stopping interrupts it).
            checked_keys: position keys whose families were all looked up just before.
            deadline: the final sync's budget.
        """
        kw: dict[str, Any] = {"interruptible": not final, "deadline": deadline}
        first = self.flights.marker()
        account, positions, steady = self._account_snapshot(api, kw)
        self.poll_once(api, final=final, deadline=deadline)
        marks = {}
        for p in positions:
            key = str(p.symbol).replace("/", "").upper()
            if p.current_price is not None:
                marks[key] = float(to_decimal(p.current_price))
        with self.flights.locked():
            consistent = steady and self.flights.marker_unlocked() == first and bool(first[3])
            self._put(
                AccountState(
                    cash_usd=to_decimal(account.cash),
                    equity_usd=float(to_decimal(account.equity)),
                    positions=positions_of(positions),
                    marks=marks,
                    consistent=consistent,
                    checked_keys=checked_keys,
                )
            )

    def _account_snapshot(self, api: AlpacaApi, kw: dict[str, Any]) -> tuple[Any, Any, bool]:
        """``(account, positions, steady)``: Alpaca has no atomic read of both, so the account
        is read before and after the positions and the three reads are retried (at most
        :data:`SNAPSHOT_READS` times) while the cash moved between the two account reads: a
        fill of an order this run does not follow (placed by hand, another process) landing
        between them would pair a new position with the old cash. Cash, not equity, is
        compared: equity moves with every price. ``steady`` is False when it never held still
        (the read is then not applied)."""
        for _ in range(SNAPSHOT_READS):
            before = self.caller.call("account", api.account, **kw)
            positions = self.caller.call("positions", api.positions, **kw)
            account = self.caller.call("account", api.account, **kw)
            if to_decimal(before.cash) == to_decimal(account.cash):
                return account, positions, True
            logger.info("account cash moved while positions were read; reading again")
        return account, positions, False

    def cancel_all(self, api: AlpacaApi, deadline: float) -> list[str]:
        """Cancel every working order of every family (at stop; the threads are joined): the
        root while it works, else the working legs and successors
        (:meth:`~.state.FlightBook.cancel_targets`). Waits out 429s until ``deadline``.

        Returns:
            Families whose cancel could not be sent before ``deadline``.
        """
        failed = []
        for coid in list(self.flights.snapshot().flights):
            for target in self.flights.cancel_targets(coid):
                try:
                    self.caller.call(
                        "cancel",
                        api.cancel,
                        target,
                        what=f"cancel at stop {coid}",
                        interruptible=False,
                        deadline=deadline,
                    )
                except AlpacaAPIError as e:  # 422: it ended, or its cancel is pending
                    logger.info("cancel at stop of %s: %s", coid, e.message)
                except (TransientError, RetryInterruptedError) as e:
                    logger.error("cancel at stop of %s failed: %s", coid, e)
                    failed.append(coid)
        return failed

    # -- alpaca-stream thread ------------------------------------------------------------------

    def _connected(self) -> None:
        if not self.stream_connected.is_set():
            logger.info(
                "trade-updates stream connected; polling every %g s",
                self.config.stream_poll_interval_s,
            )
        self.stream_connects += 1
        # the catch-up is due before anyone can see the stream connected (tests wait for it)
        self._poll_due.set()  # catch up on what happened while it was down
        self.stream_connected.set()
        self._wake.set()

    def _disconnected(self) -> None:
        if self.stream_connected.is_set():
            logger.warning(
                "trade-updates stream disconnected; polling every %g s",
                self.config.poll_interval_s,
            )
        self.stream_connected.clear()
        self._wake.set()

    def _stream_loop(self) -> None:
        cfg = self.config
        stream = _TradeStream(
            cfg.api_key.reveal(),
            cfg.secret_key.reveal(),
            paper=not cfg.live_trading,
            url_override=cfg.stream_endpoint,
            worker=self,
        )
        stream.subscribe_trade_updates(self._on_trade_update_async)
        self._stream = stream
        if self.stop_event.is_set():  # stop() came before the stream was set: it stopped none
            return
        try:
            stream.run()
        except Exception:
            logger.exception("trade-updates stream ended; polling continues")
        finally:
            self._disconnected()

    async def _on_trade_update_async(self, update: TradeUpdate) -> None:
        self.on_trade_update(update)

    def on_trade_update(self, update: TradeUpdate) -> None:
        """One trade update from either stream (stream thread)."""
        event = str(getattr(update.event, "value", update.event))
        fill = None
        if event in ("fill", "partial_fill") and update.qty and update.price is not None:
            # the execution's own price: filled_avg_price is rounded, so prices derived from
            # averages drift (issue 13, finding 8)
            fill = (to_decimal(repr(update.qty)), to_decimal(repr(update.price)))
        coid = self.observe(update.order, "stream", fill)
        if coid is None:
            return
        if event in ("fill", "partial_fill"):
            self._refresh_soon.set()
            order_class = str(getattr(update.order.order_class, "value", update.order.order_class))
            if order_class in ("bracket", "oto", "oco") and update.order.client_order_id != coid:
                # a leg filled: Alpaca cancels its held sibling without a stream event
                # (alpaca-py #198); look the family up to see it
                self.flights.due(coids=[coid])
                self._poll_due.set()
        elif event == "replaced":
            self.flights.due(coids=[coid])
            self._poll_due.set()
        self._wake.set()

    def _sse_loop(self) -> None:
        """The Broker API's trade events (SSE), resumed from the last event id."""
        api = self._make_api()
        assert isinstance(api, BrokerApi)
        url = self.config.stream_endpoint.rstrip("/") + EVENTS_PATH
        session = requests.Session()
        last_id: int | None = None
        failures = 0
        while not self.stop_event.is_set():
            params = {"since_id": last_id} if last_id is not None else {}
            try:
                self.caller.count_request()
                resp = session.get(
                    url,
                    params=params,
                    headers=api.sse_headers(),
                    stream=True,
                    timeout=(self.config.request_timeout_s, SSE_READ_TIMEOUT_S),
                )
                self._sse = resp
                if self.stop_event.is_set():
                    # stop() ran while this connected and found no response to interrupt: it
                    # set the event before looking, this looks after setting _sse, so one of
                    # the two sees the other (else the read waits for an event or for
                    # SSE_READ_TIMEOUT_S, past the stop's budget; a CI run of 2026-12-06)
                    resp.close()
                    return
                if resp.status_code in (401, 403, 404):
                    logger.error(
                        "trade events stream refused (HTTP %d); polling only", resp.status_code
                    )
                    resp.close()
                    return
                resp.raise_for_status()
                self._connected()
                failures = 0
                source = iter(functools.partial(resp.raw.read1, 65536), b"")
                for msg in sseclient.SSEClient(source).events():
                    if self.stop_event.is_set():
                        break
                    if not msg.data:
                        continue
                    data = json.loads(msg.data)
                    event_id = int(data.get("event_id", 0))
                    if last_id is not None and event_id <= last_id:
                        continue  # replayed
                    last_id = event_id
                    if data.get("account_id") != self.config.account_id:
                        continue
                    self.on_trade_update(TradeUpdate(**data))
            except (requests.RequestException, OSError, ValueError) as e:
                if not self.stop_event.is_set():
                    failures += 1
                    logger.warning("trade events stream broke (%s); reconnecting", e)
            finally:
                self._sse = None
                self._disconnected()
            if self.stop_event.wait(self.caller.policy.delay_s(max(1, failures))):
                return

    def _stop_stream(self, until: float) -> None:
        """Interrupt the SSE response, or stop the websocket on its loop, waiting until
        ``until`` (``time.monotonic()`` seconds) at most."""
        resp = self._sse
        if resp is not None:
            _interrupt(resp)
        stream = self._stream
        if stream is None:
            return
        while getattr(stream, "_loop", None) is None and time.monotonic() < until:
            if not any(t.name == "alpaca-stream" and t.is_alive() for t in self._threads):
                return
            time.sleep(0.01)  # the stream thread has not started its loop yet
        loop = getattr(stream, "_loop", None)
        if loop is None or not loop.is_running():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stream.stop_ws(), loop).result(
                timeout=max(0.0, until - time.monotonic())
            )
            # closing the socket ends its 5 s receive wait at once
            asyncio.run_coroutine_threadsafe(stream.close(), loop).result(
                timeout=max(0.0, until - time.monotonic())
            )


class _TradeStream(TradingStream):  # type: ignore[misc]
    """alpaca-py's ``TradingStream`` that tells the worker when it (re)connects and closes,
    so polling can slow down while it runs and catch up after a gap."""

    def __init__(self, *args: Any, worker: AlpacaWorker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._worker = worker

    async def _start_ws(self) -> None:
        await super()._start_ws()
        self._worker._connected()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._worker._disconnected()


def _interrupt(resp: requests.Response) -> None:
    """End a blocking read on a streamed response from another thread (closing the socket's
    file alone does not wake a ``recv`` on Linux; ``shutdown`` does)."""
    with contextlib.suppress(Exception):
        sock = resp.raw.connection.sock  # type: ignore[union-attr]
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()
