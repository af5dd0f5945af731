"""The Alpaca broker's worker threads: every HTTP request after start, and the websocket.

Threads (started by :meth:`AlpacaWorker.start`, stopped and joined by :meth:`AlpacaWorker.stop`;
daemons so a crashed run never hangs the interpreter, but always joined):

* ``alpaca-orders``: sends submits and cancels (commands from the main thread), holds equity
  orders until the market is open (Alpaca clock), puts the answers on the event queue.
* ``alpaca-monitor``: every ``poll_interval_s`` one ``GET /v2/orders?status=open&nested=true``
  for all open orders (Alpaca allows ~200 requests/min), one lookup per order that left the open
  list, and an account + positions refresh after fills and every ``refresh_interval_s``.
* ``alpaca-stream`` (``use_stream``): the trade-updates websocket; polling stays the fallback.

No thread touches a backtrader object: each puts :mod:`~runtime.brokers.alpaca.events` on the
event queue and the broker applies them on the main thread.

Failures: a submit answered 4xx is a :class:`~runtime.brokers.alpaca.events.SubmitRejected`; a
submit whose answer was lost is looked up by its ``client_order_id`` (a retry answered
``client_order_id must be unique`` adopts the order that did land); ten failed polls in a row,
or any unexpected error, end the thread with a
:class:`~runtime.brokers.alpaca.events.WorkerFailed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from alpaca.trading.client import TradingClient
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import TradeUpdate

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
    SubmitOrder,
    SubmitRejected,
    WorkerFailed,
)
from runtime.brokers.alpaca.http import AlpacaAPIError, AlpacaCaller
from runtime.brokers.alpaca.orders import (
    ZERO,
    alpaca_status,
    family_done,
    is_crypto,
    positions_of,
    to_decimal,
)
from runtime.brokers.alpaca.state import FlightBook, MarketClock

logger = logging.getLogger(__name__)

MAX_POLL_FAILURES = 10  # polls failed in a row before the monitor gives up


class AlpacaWorker:
    """Owns the orders, monitor and stream threads of one broker.

    Args:
        config: intervals, stream, market-hours policy.
        session_id: prefix of this run's ``client_order_id``s (orders of the session that no
            flight follows are still reported, so the broker can cancel them).
        caller: runs every request (shared with the broker; its stop event is :attr:`stop_event`).
        make_client: a prepared ``TradingClient``; each thread builds its own.
        flights: the families in flight (shared with the broker).
        events: where answers go, for the main thread.

    Thread context: :meth:`start`, :meth:`stop`, :meth:`submit`, :meth:`cancel` on the main
    thread; :meth:`poll_once` and :meth:`refresh_account` on the monitor thread, or on the main
    thread once the threads are joined (the final sync).
    """

    def __init__(
        self,
        config: AlpacaBrokerConfig,
        *,
        session_id: str,
        caller: AlpacaCaller,
        make_client: Callable[[], TradingClient],
        flights: FlightBook,
        events: queue.Queue[Event],
    ) -> None:
        self.config = config
        self.session_id = session_id
        self.caller = caller
        self.stop_event = caller.stop
        self.flights = flights
        self.clock: MarketClock | None = None  # set by the broker from the read at start
        self._make_client = make_client
        self._events = events
        self._commands: queue.Queue[Command] = queue.Queue()
        self._wake = threading.Event()
        self._refresh_due = threading.Event()  # a fill was seen: refresh the account soon
        self._poll_due = threading.Event()  # poll orders now (after a cancel)
        self._threads: list[threading.Thread] = []
        self._stream: Any = None
        # monitor-thread state
        self._seen_cum: dict[str, Decimal] = {}  # Alpaca id -> filled_qty last seen
        self._done: set[str] = set()  # coids whose family ended
        self._poll_generations: dict[str, int] = {}
        self.failures = 0  # polls failed in a row (read by any thread: health)

    @property
    def healthy(self) -> bool:
        """False while the monitor's polls fail."""
        return self.failures == 0

    # -- lifecycle (main thread) ---------------------------------------------------------------

    def start(self) -> None:
        """Start the threads (the stream only with ``use_stream``)."""
        self._spawn("alpaca-orders", self._orders_loop)
        self._spawn("alpaca-monitor", self._monitor_loop)
        if self.config.use_stream:
            self._spawn("alpaca-stream", self._stream_loop)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        """Stop every thread and join it (``request_timeout_s + 5`` s each). Idempotent.

        Submits still queued or waiting for the open are reported :class:`NotSent`; cancels
        still queued are sent once.
        """
        self.stop_event.set()
        self._commands.put(SHUTDOWN)
        self._wake.set()
        self._stop_stream()
        join_s = self.config.request_timeout_s + 5.0
        for t in self._threads:
            t.join(timeout=join_s)
            if t.is_alive():
                logger.error("thread %s did not stop within %.1f s", t.name, join_s)
        self._threads.clear()

    def submit(self, command: SubmitOrder) -> None:
        """Queue a submit for the orders thread."""
        self._commands.put(command)

    def cancel(self, command: CancelOrder) -> None:
        """Queue a cancel for the orders thread."""
        self._commands.put(command)

    def _put(self, event: Event) -> None:
        self._events.put(event)

    # -- alpaca-orders thread ------------------------------------------------------------------

    def _orders_loop(self) -> None:
        client = self._make_client()
        parked: list[SubmitOrder] = []  # equity orders waiting for the open
        while True:
            try:
                cmd: Command | None = self._commands.get(
                    timeout=self.config.poll_interval_s if parked else None
                )
            except queue.Empty:
                cmd = None
            try:
                if cmd is SHUTDOWN:
                    self._drain_commands(client, parked)
                    return
                if isinstance(cmd, SubmitOrder):
                    if self._must_wait(cmd.symbol, client):
                        logger.info(
                            "%s: market closed, order %s waits for the open", cmd.symbol, cmd.coid
                        )
                        parked.append(cmd)
                    else:
                        self._submit(client, cmd)
                elif isinstance(cmd, CancelOrder):
                    hit = [p for p in parked if cmd.coid is not None and p.coid == cmd.coid]
                    if hit:
                        parked.remove(hit[0])
                        self._put(
                            NotSent(hit[0].coid, "canceled before it was sent (market closed)")
                        )
                    else:
                        self._cancel(client, cmd)
                if parked and not self._must_wait(parked[0].symbol, client):
                    for p in parked:
                        self._submit(client, p)
                    parked.clear()
            except RetryInterruptedError:
                continue
            except Exception as e:
                logger.exception("alpaca-orders thread error")
                self._put(WorkerFailed(e))

    def _drain_commands(self, client: TradingClient, parked: list[SubmitOrder]) -> None:
        for p in parked:
            self._put(NotSent(p.coid, "not sent: broker stopped"))
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, SubmitOrder):
                self._put(NotSent(cmd.coid, "not sent: broker stopped"))
            elif isinstance(cmd, CancelOrder):
                with contextlib.suppress(TransientError, BrokerError):
                    self._cancel(client, cmd)

    def _must_wait(self, symbol: str, client: TradingClient) -> bool:
        """True when ``symbol`` is an equity and the Alpaca clock says the market is closed
        (the clock is read again when its answer may have changed)."""
        if is_crypto(symbol) or not self.config.wait_for_market_open:
            return False
        clock = self.clock
        if clock is None or clock.stale(
            datetime.now(UTC), time.monotonic(), self.config.poll_interval_s
        ):
            clock = MarketClock.of(
                self.caller.call("clock", http.get_clock, client), time.monotonic()
            )
            self.clock = clock
        return not clock.is_open

    def _submit(self, client: TradingClient, cmd: SubmitOrder) -> None:
        coid = cmd.coid
        snap: AlpacaOrder | None = None
        try:
            snap = self.caller.call(
                "submit", http.submit_order, client, cmd.request, what=f"submit {coid}"
            )
        except AlpacaAPIError as e:
            duplicate = "client_order_id" in e.message and "unique" in e.message
            if duplicate and e.attempt > 1:
                # an earlier attempt landed (its answer was lost): follow that order
                snap = self._lookup(client, coid)
            elif duplicate:
                self._put(
                    SubmitRejected(
                        coid,
                        f"alpaca: {e.message}: client_order_id {coid} "
                        "already used on this account (session id reused?)",
                    )
                )
            else:
                self._put(
                    SubmitRejected(coid, f"alpaca: {e.message} (HTTP {e.status}, code {e.code})")
                )
        except RetryInterruptedError:
            logger.warning("submit %s interrupted by stop; resolved at the final sync", coid)
        except TransientError as e:
            logger.warning("submit %s: %s; looking the order up", coid, e)
            try:
                snap = self._lookup(client, coid)
            except (TransientError, BrokerError) as e2:
                logger.warning("lookup %s: %s; the monitor will resolve it", coid, e2)
        finally:
            if snap is not None:  # queued before the submit counts as done
                self._put(AlpacaOrderUpdate(snap, "submit"))
            self.flights.mark_sent(coid, str(snap.id) if snap is not None else None)

    def _lookup(
        self, client: TradingClient, coid: str, interruptible: bool = True
    ) -> AlpacaOrder | None:
        """The order with ``coid``, or None after queuing a rejection when Alpaca has none."""
        try:
            return self.caller.call(
                "lookup",
                http.get_order_by_coid,
                client,
                coid,
                what=f"lookup {coid}",
                interruptible=interruptible,
            )
        except AlpacaAPIError as e:
            if e.status == 404:
                self._put(
                    SubmitRejected(
                        coid,
                        "alpaca: order not accepted (Alpaca was unreachable "
                        "and has no order with this client_order_id)",
                    )
                )
                return None
            raise

    def _cancel(self, client: TradingClient, cmd: CancelOrder) -> None:
        coid, alpaca_id = cmd.coid, cmd.alpaca_id
        if alpaca_id is None and coid is not None:
            alpaca_id = self.flights.alpaca_id(coid)
            if alpaca_id is None:
                snap = self._lookup(client, coid)
                if snap is None:
                    return
                alpaca_id = str(snap.id)
        if alpaca_id is None:
            return
        what = f"cancel {coid or alpaca_id}"
        try:
            self.caller.call("cancel", http.cancel_order, client, alpaca_id, what=what)
        except AlpacaAPIError as e:
            # 422 not cancelable: it already filled/ended; the monitor reports what happened
            logger.info("%s: %s", what, e.message)
        self._poll_due.set()
        self._wake.set()

    # -- alpaca-monitor thread -----------------------------------------------------------------

    def _monitor_loop(self) -> None:
        client = self._make_client()
        cfg = self.config
        next_poll = time.monotonic() + cfg.poll_interval_s
        next_refresh = time.monotonic() + cfg.refresh_interval_s
        while not self.stop_event.is_set():
            self._wake.wait(max(0.0, min(next_poll, next_refresh) - time.monotonic()))
            self._wake.clear()
            if self.stop_event.is_set():
                return
            try:
                filled = False
                if time.monotonic() >= next_poll or self._poll_due.is_set():
                    self._poll_due.clear()
                    filled = self.poll_once(client)
                    next_poll = time.monotonic() + cfg.poll_interval_s
                if filled or self._refresh_due.is_set() or time.monotonic() >= next_refresh:
                    self._refresh_due.clear()
                    self.refresh_account(client)
                    next_refresh = time.monotonic() + cfg.refresh_interval_s
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

    def poll_once(self, client: TradingClient, final: bool = False) -> bool:
        """One poll: one list call for every open order, a lookup for each followed order that
        left the list; every snapshot goes on the event queue.

        Args:
            final: the last poll at stop: runs to the end (not interruptible) and also looks up
                orders whose submit never finished.

        Returns:
            True when a fill was seen (the account is then refreshed).
        """
        view = self.flights.snapshot()
        flights = view.flights
        self._poll_generations = view.generations
        self._done &= set(flights)
        if not flights:
            return False
        interruptible = not final
        rows = self.caller.call(
            "open_orders", http.get_open_orders, client, interruptible=interruptible
        )
        ids = {f.alpaca_id for f in flights.values() if f.alpaca_id}
        prefix = f"{self.session_id}-"
        seen: set[str] = set()
        filled = False
        for o in rows:
            if (
                o.client_order_id in flights
                or str(o.id) in ids
                or o.client_order_id.startswith(prefix)
            ):
                seen.add(o.client_order_id)
                seen.add(str(o.id))
                filled |= self._note_fills(o)
                self._put(AlpacaOrderUpdate(o, "poll"))
        for coid, fl in flights.items():
            aid = fl.alpaca_id
            if coid in seen or (aid and aid in seen) or coid in self._done:
                continue
            if not fl.submit_done and not final:
                continue  # the orders thread is still sending it
            snap: AlpacaOrder | None
            if aid:
                snap = self.caller.call(
                    "order",
                    http.get_order,
                    client,
                    aid,
                    what=f"order {coid}",
                    interruptible=interruptible,
                )
            else:
                snap = self._lookup(client, coid, interruptible)
                if snap is None:
                    self._done.add(coid)
                    continue
            filled |= self._note_fills(snap)
            if family_done(snap):
                self._done.add(coid)
            elif alpaca_status(snap) == "replaced" and snap.replaced_by is not None:
                # look the successor up next time
                self.flights.follow_replacement(coid, aid, str(snap.replaced_by))
            self._put(AlpacaOrderUpdate(snap, "lookup"))
        return filled

    def _note_fills(self, o: AlpacaOrder) -> bool:
        changed = False
        for x in (o, *(o.legs or ())):
            cum = to_decimal(x.filled_qty)
            if cum != self._seen_cum.get(str(x.id), ZERO):
                self._seen_cum[str(x.id)] = cum
                changed = True
        return changed

    def refresh_account(self, client: TradingClient, final: bool = False) -> None:
        """Read the account and positions and queue an :class:`AccountState`.

        Args:
            final: the read at stop (runs to the end; otherwise stopping interrupts it).
        """
        generations = self._poll_generations
        account = self.caller.call("account", http.get_account, client, interruptible=not final)
        positions = self.caller.call(
            "positions", http.get_positions, client, interruptible=not final
        )
        self._put(
            AccountState(
                cash_usd=float(to_decimal(account.cash)),
                equity_usd=float(to_decimal(account.equity)),
                positions=positions_of(positions),
                generations=generations,
            )
        )

    # -- alpaca-stream thread ------------------------------------------------------------------

    def _stream_loop(self) -> None:
        from alpaca.trading.stream import TradingStream

        cfg = self.config
        stream = TradingStream(
            cfg.api_key.reveal(),
            cfg.secret_key.reveal(),
            paper=not cfg.live_trading,
            url_override=cfg.stream_endpoint,
        )
        stream.subscribe_trade_updates(self._on_trade_update)
        self._stream = stream
        try:
            stream.run()
        except Exception:
            logger.exception("trade-updates stream ended; polling continues")

    async def _on_trade_update(self, update: TradeUpdate) -> None:
        self._put(AlpacaOrderUpdate(update.order, "stream"))
        event = str(getattr(update.event, "value", update.event))
        if event in ("fill", "partial_fill"):
            self._refresh_due.set()
            self._wake.set()

    def _stop_stream(self) -> None:
        stream = self._stream
        if stream is None:
            return
        deadline = time.monotonic() + 5.0
        while getattr(stream, "_loop", None) is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the stream thread has not started its loop yet
        loop = getattr(stream, "_loop", None)
        if loop is None or not loop.is_running():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stream.stop_ws(), loop).result(timeout=5)
            # closing the socket ends its 5 s receive wait at once
            asyncio.run_coroutine_threadsafe(stream.close(), loop).result(timeout=5)
