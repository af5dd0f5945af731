"""The backtrader broker that trades an Alpaca account: :class:`AlpacaPaperTradingBroker`.

Agents trade through the ordinary backtrader calls (``buy``/``sell``/``close``/``cancel``/
``buy_bracket``/``sell_bracket``); this broker turns them into Alpaca orders and Alpaca's answers
back into backtrader notifications.

The path of an order, all on the main (backtrader) thread except the HTTP:

1. ``buy``/``sell`` -> :meth:`~AlpacaPaperTradingBroker._send`: risk guard, request
   (:func:`~runtime.brokers.alpaca.orders.to_order_request`), ``Submitted``, a
   :class:`~runtime.brokers.alpaca.events.SubmitOrder` for the worker's ``alpaca-orders`` thread
   (:mod:`runtime.brokers.alpaca.worker`).
2. The worker threads put every Alpaca order snapshot (submit answer, poll, stream) on the event
   queue as an :class:`~runtime.brokers.alpaca.events.AlpacaOrderUpdate`.
3. ``next()`` -> :meth:`~AlpacaPaperTradingBroker._drain` ->
   :meth:`~AlpacaPaperTradingBroker._apply_alpaca_order`: each new fill becomes ``notify_order``
   in :meth:`~AlpacaPaperTradingBroker._notify_fill`, each new status in
   :meth:`~AlpacaPaperTradingBroker._notify_status`.

Correctness rules (the bugs users hit with the deprecated bridges):

* ``client_order_id = "<session>-<order ref>"``: a retried submit can never create a second
  order; a retry answered ``client_order_id must be unique`` adopts the order that did land.
* Fills are increments of Alpaca's cumulative ``filled_qty`` in ``Decimal``
  (:func:`~runtime.brokers.alpaca.orders.fill_increment`): partial fills sum exactly, repeated
  or stale snapshots add nothing.
* Statuses map one to one (:data:`~runtime.brokers.alpaca.orders.STATUS_MAP`): ``canceled`` is
  Canceled, never Rejected; ``expired`` is Expired; ``replaced`` follows the replacing order;
  bracket legs are ``held`` (Accepted, inactive) until the parent fills.
* Every notification is queued on the main thread, in order, exactly once
  (``get_notification``).
* 429, 5xx, timeouts and connection errors are retried (:mod:`runtime.brokers.alpaca.http`); a
  4xx on submit is a Rejected order whose ``info["reason"]`` carries Alpaca's message (FMEL
  records it); a failure to read the account raises :class:`~core.errors.BrokerError`.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import backtrader as bt
from alpaca.trading.client import TradingClient
from alpaca.trading.models import Order as AlpacaOrder

from core.bars import feed_symbol
from core.errors import BrokerError, OrderRejectedError, TransientError
from runtime.brokers.alpaca import http
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.events import (
    AccountState,
    AlpacaOrderUpdate,
    CancelOrder,
    Event,
    NotSent,
    SubmitOrder,
    SubmitRejected,
    WorkerFailed,
)
from runtime.brokers.alpaca.http import AlpacaAPIError, AlpacaCaller, CallHook
from runtime.brokers.alpaca.orders import (
    STATUS_MAP,
    TERMINAL,
    ZERO,
    FillIncrement,
    adopted_order,
    alpaca_status,
    bt_time,
    child_role,
    client_order_id,
    fill_increment,
    leg_role,
    position_key,
    quantity,
    to_decimal,
    to_order_request,
)
from runtime.brokers.alpaca.reconcile import read_start_state
from runtime.brokers.alpaca.state import BrokerReport, FlightBook, OrderBook, TrackedOrder
from runtime.brokers.alpaca.worker import AlpacaWorker
from runtime.brokers.risk import RiskConfig, RiskGuard

logger = logging.getLogger(__name__)


class AlpacaPaperTradingBroker(bt.BrokerBase):  # type: ignore[misc]
    """A backtrader broker trading an Alpaca account (paper by default).

    Args:
        config: endpoint, keys, polling, policies (:class:`AlpacaBrokerConfig`).
        session_id: this run's id; prefix of every ``client_order_id``.
        risk: pre-trade limits and kill switch (:mod:`runtime.brokers.risk`); ``None`` = none.
        client_factory: builds a ``TradingClient`` (tests); default from ``config``. One client
            per thread.
        on_retry: ``(operation, error)`` before each retried Alpaca call (metrics).
        on_error: ``(operation, error)`` for each Alpaca call that failed for good (metrics).
            Both hooks run on the calling thread (main, orders or monitor): keep them
            thread-safe and quick.

    Attributes:
        report: the :class:`BrokerReport`, set by :meth:`stop`.
        guard: the risk guard, if any.

    Raises (from :meth:`connect` / :meth:`start`):
        BrokerError: the account cannot be read or cannot trade, open orders found with policy
            ``halt``, or an open order to adopt is for a symbol no feed trades.

    Thread context: every public method runs on the main (backtrader) thread; ``healthy`` may be
    read from any thread.
    """

    params = ()

    def __init__(
        self,
        config: AlpacaBrokerConfig,
        *,
        session_id: str,
        risk: RiskConfig | None = None,
        client_factory: Callable[[], TradingClient] | None = None,
        on_retry: CallHook | None = None,
        on_error: CallHook | None = None,
    ) -> None:
        super().__init__()
        if not session_id:
            raise ValueError("session_id must not be empty")
        client_order_id(session_id, 10**12)  # fails now if the session id is too long
        self.config = config
        self.session_id = session_id
        self.endpoint = config.endpoint
        self.live = config.points_at_live
        self._client_factory = client_factory or functools.partial(http.make_client, config)
        self.guard: RiskGuard | None = (
            RiskGuard(risk) if risk is not None and risk.enabled else None
        )
        self.report: BrokerReport | None = None
        self.notifs: deque[Any] = deque()
        self.caller = AlpacaCaller(
            config.retry_policy, stop=threading.Event(), on_retry=on_retry, on_error=on_error
        )
        self.flights = FlightBook()
        self.book = OrderBook(self.flights)
        self._events: queue.Queue[Event] = queue.Queue()
        self._worker = AlpacaWorker(
            config,
            session_id=session_id,
            caller=self.caller,
            make_client=self._make_client,
            flights=self.flights,
            events=self._events,
        )
        self._client: TradingClient | None = None
        self._connected = False
        self._started = False
        self._stopped = False
        self._fatal: BaseException | None = None
        self._qty: dict[str, Decimal] = {}  # position key -> exact signed quantity
        self._pos: dict[str, bt.Position] = {}
        self._datas: dict[str, Any] = {}  # position key -> feed
        self._to_adopt: list[AlpacaOrder] = []
        self._orphans: set[str] = set()
        self._cash = 0.0
        self._value = 0.0
        self.startingcash = 0.0
        self._counts = dict.fromkeys(("submitted", "filled", "canceled", "rejected", "expired"), 0)

    def __repr__(self) -> str:
        return (
            f"AlpacaPaperTradingBroker(endpoint={self.endpoint!r}, live={self.live}, "
            f"session_id={self.session_id!r})"
        )

    @property
    def healthy(self) -> bool:
        """False once the monitor's polls fail in a row or a worker failed (any thread may
        read it: the health endpoint does)."""
        return self._worker.healthy and self._fatal is None

    def describe(self) -> str:
        """One line for logs and the run report (never the keys)."""
        kind = "LIVE (real money)" if self.live else "paper"
        return f"alpaca {kind} at {self.endpoint}"

    def _make_client(self) -> TradingClient:
        return http.prepare_client(self._client_factory(), self.config.request_timeout_s)

    # -- lifecycle ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Read and reconcile the account (cash, positions, open orders by policy, clock)
        without starting any thread. Idempotent; :meth:`start` calls it. The runner calls it
        while building, so a bad key or account fails before the run and the start value is
        real.

        Raises:
            BrokerError: see the class docstring.
        """
        if self._connected:
            return
        if self.live:
            logger.warning(
                "ALPACA LIVE TRADING: orders go to %s and use REAL MONEY "
                "(ALPACA_LIVE_TRADING=true)",
                self.endpoint,
            )
        else:
            logger.info("Alpaca paper trading endpoint: %s", self.endpoint)
        cerebro = getattr(self, "cerebro", None)
        for data in getattr(cerebro, "datas", ()) or ():
            self._datas[position_key(feed_symbol(data))] = data
        self._client = self._make_client()
        start = read_start_state(self.caller, self._client, self.config, self._datas.keys())
        for key, (qty, avg) in start.positions.items():
            self._qty[key] = qty
            self._pos[key] = bt.Position(float(qty), avg)
        self._cash = start.cash_usd
        self._value = start.equity_usd
        self.startingcash = self._cash
        self._to_adopt = start.to_adopt
        self._worker.clock = start.clock
        self._connected = True

    def start(self) -> None:
        """Connect (see :meth:`connect`) and start the worker threads. Called by cerebro.

        Raises:
            BrokerError: see the class docstring. Nothing is left running when it raises.
        """
        super().start()
        if self._started or self._stopped:
            return
        self.connect()
        self._started = True
        self._worker.start()

    def stop(self) -> None:
        """Stop the worker threads (joined), optionally cancel open orders, final sync, report.

        Idempotent. Orders still waiting to be sent are not sent (Canceled, reason
        ``"not sent: broker stopped"``).
        """
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._worker.stop()
        self._drain()
        self._final_sync()
        self._drain()
        self.report = r = self._make_report()
        logger.info(
            "Alpaca broker stopped: cash %.2f USD, value %.2f USD, positions %s, "
            "orders submitted %d filled %d canceled %d rejected %d expired %d, %d open "
            "left, %d requests (%d retries)",
            r.cash_usd,
            r.value_usd,
            r.positions,
            r.orders_submitted,
            r.orders_filled,
            r.orders_canceled,
            r.orders_rejected,
            r.orders_expired,
            r.open_orders_left,
            r.requests,
            r.retries,
        )

    def _final_sync(self) -> None:
        """After the threads are joined: cancel open orders when asked, then poll (a few rounds
        when cancelling: a cancel may show as ``pending_cancel`` for a moment) and read the
        account once more."""
        client = self._client
        assert client is not None  # started implies connected
        if self.config.cancel_on_stop:
            for fl in self.flights.snapshot().flights.values():
                if fl.alpaca_id is None:
                    continue
                try:
                    self.caller.call(
                        "cancel",
                        http.cancel_order,
                        client,
                        fl.alpaca_id,
                        what="cancel at stop",
                        interruptible=False,
                    )
                except (AlpacaAPIError, TransientError) as e:
                    logger.warning("cancel at stop of %s: %s", fl.coid, e)
        try:
            for _ in range(5 if self.config.cancel_on_stop else 1):
                self._worker.poll_once(client, final=True)
                self._drain()
                if not len(self.flights):
                    break
                time.sleep(min(0.2, self.config.poll_interval_s))
            self._worker.refresh_account(client, final=True)
        except (TransientError, BrokerError) as e:
            logger.error("final sync with Alpaca failed: %s", e)

    def _make_report(self) -> BrokerReport:
        return BrokerReport(
            endpoint=self.endpoint,
            live=self.live,
            cash_usd=self._cash,
            value_usd=self._value,
            positions={k: float(v) for k, v in sorted(self._qty.items()) if v != 0},
            orders_submitted=self._counts["submitted"],
            orders_filled=self._counts["filled"],
            orders_canceled=self._counts["canceled"],
            orders_rejected=self._counts["rejected"],
            orders_expired=self._counts["expired"],
            open_orders_left=len(self.flights),
            requests=self.caller.calls,
            retries=self.caller.retries,
        )

    # -- backtrader broker API (main thread) --------------------------------------------------

    def getcash(self) -> float:
        """Account cash, USD, as of the last refresh (after fills and every
        ``refresh_interval_s``)."""
        return self._cash

    get_cash = getcash

    def getvalue(self, datas: Iterable[Any] | None = None) -> float:
        """Account equity, USD (last refresh); with ``datas``: the value of those positions at
        the feeds' last close."""
        if datas is None:
            return self._value
        total = 0.0
        for data in datas:
            pos = self.getposition(data)
            if pos.size and len(data):
                total += float(pos.size) * float(data.close[0])
        return total

    get_value = getvalue

    def getposition(self, data: Any) -> bt.Position:
        """The position of ``data``'s symbol (the same object between calls)."""
        key = position_key(feed_symbol(data))
        pos = self._pos.get(key)
        if pos is None:
            pos = self._pos[key] = bt.Position()
            self._qty.setdefault(key, ZERO)
        return pos

    @property
    def positions(self) -> dict[Any, bt.Position]:
        """Feed -> position, for the feeds of this run (what FMEL and the risk guard read)."""
        return {data: self.getposition(data) for data in self._datas.values()}

    def get_orders_open(self, safe: bool = False) -> list[Any]:
        """Backtrader orders still alive (sent or waiting to be sent)."""
        out = self.book.alive_orders()
        return [o.clone() for o in out] if safe else out

    def orderstatus(self, order: Any) -> int:
        return int(order.status)

    def get_notification(self) -> Any:
        try:
            return self.notifs.popleft()
        except IndexError:
            return None

    def notify(self, order: Any) -> None:
        self.notifs.append(order.clone())

    def buy(
        self,
        owner: Any,
        data: Any,
        size: float,
        price: float | None = None,
        plimit: float | None = None,
        exectype: int | None = None,
        valid: Any = None,
        tradeid: int = 0,
        oco: Any = None,
        trailamount: float | None = None,
        trailpercent: float | None = None,
        parent: Any = None,
        transmit: bool = True,
        **kwargs: Any,
    ) -> Any:
        order = bt.BuyOrder(
            owner=owner,
            data=data,
            size=size,
            price=price,
            pricelimit=plimit,
            exectype=exectype,
            valid=valid,
            tradeid=tradeid,
            trailamount=trailamount,
            trailpercent=trailpercent,
            parent=parent,
            transmit=transmit,
        )
        return self._transmit(order, kwargs)

    def sell(
        self,
        owner: Any,
        data: Any,
        size: float,
        price: float | None = None,
        plimit: float | None = None,
        exectype: int | None = None,
        valid: Any = None,
        tradeid: int = 0,
        oco: Any = None,
        trailamount: float | None = None,
        trailpercent: float | None = None,
        parent: Any = None,
        transmit: bool = True,
        **kwargs: Any,
    ) -> Any:
        order = bt.SellOrder(
            owner=owner,
            data=data,
            size=size,
            price=price,
            pricelimit=plimit,
            exectype=exectype,
            valid=valid,
            tradeid=tradeid,
            trailamount=trailamount,
            trailpercent=trailpercent,
            parent=parent,
            transmit=transmit,
        )
        return self._transmit(order, kwargs)

    def submit(self, order: Any) -> Any:
        """Send an order built elsewhere (backtrader's generic broker API)."""
        return self._transmit(order, {})

    def cancel(self, order: Any) -> bool:
        """Ask Alpaca to cancel ``order`` (any order of a bracket cancels the bracket). The
        ``Canceled`` notification comes when Alpaca confirms; returns False when the order is
        not alive."""
        if not order.alive():
            return False
        for pref, family in list(self.book.held.items()):
            if any(o.ref == order.ref for o in family):  # bracket not transmitted yet
                del self.book.held[pref]
                for o in family:
                    o.cancel()
                    self.notify(o)
                return True
        tr = self.book.by_ref.get(order.ref)
        if tr is None:
            return False
        root = tr.root or tr
        target = root if root.order.alive() else tr
        self._worker.cancel(CancelOrder(root.coid, target.alpaca_id))
        return True

    def next(self) -> None:
        """Apply what the worker threads reported (main thread; called by cerebro every loop).

        Raises:
            BrokerError: a worker thread failed for good (e.g. Alpaca unreachable for many
                poll cycles).
        """
        if self._to_adopt:
            self._adopt()
        self._drain()
        if self._fatal is not None:
            raise BrokerError(f"Alpaca broker failed: {self._fatal}") from self._fatal
        if self.guard is not None and self._started:
            self.guard.after_bar(self)

    # -- sending (main thread) ----------------------------------------------------------------

    def _transmit(self, order: Any, info: dict[str, Any]) -> Any:
        """Send ``order``, or hold it until its bracket is complete (``transmit=False``)."""
        order.addinfo(**info)
        order.addcomminfo(self.getcommissioninfo(order.data))
        parent = order.parent
        held = self.book.held
        if parent is None and not order.transmit:
            held[order.ref] = [order]
            return order
        if parent is not None:
            family = held.pop(parent.ref, None)
            if family is None:
                reason = parent.info.get("reason") or "parent order was not transmitted"
                self._reject_local([order], f"{reason} (parent order {parent.ref})")
                return order
            family.append(order)
            if not order.transmit:
                held[parent.ref] = family
                return order
            self._send(family)
            return order
        self._send([order])
        return order

    def _reject_local(self, family: Sequence[Any], reason: str) -> None:
        for o in family:
            o.addinfo(reason=reason)
            o.reject(self)
            self.notify(o)
        self._counts["rejected"] += 1

    def _send(self, family: list[Any]) -> None:
        """Risk check, build the request, notify ``Submitted``, hand it to the orders thread."""
        root = family[0]
        symbol = feed_symbol(root.data)
        if self.guard is not None:
            reason = self.guard.check(root, self)
            if reason is not None:
                self._reject_local(family, reason)
                return
        coid = client_order_id(self.session_id, root.ref)
        try:
            request = to_order_request(
                root,
                symbol,
                client_order_id=coid,
                time_in_force=self.config.time_in_force,
                children=family[1:],
            )
        except OrderRejectedError as e:
            self._reject_local(family, f"alpaca: {e}")
            return
        key = position_key(symbol)
        tr = TrackedOrder(
            order=root, symbol=symbol, key=key, qty=quantity(root.created.size), coid=coid
        )
        for child in family[1:]:
            tr.legs.append(
                TrackedOrder(
                    order=child,
                    symbol=symbol,
                    key=key,
                    qty=tr.qty,
                    role=child_role(child),
                    root=tr,
                )
            )
        for t in tr.family():
            self.book.track(t)
            t.order.submit(self)
            self.notify(t.order)
        self._counts["submitted"] += 1
        self._datas.setdefault(key, root.data)
        self.flights.add_sent(coid, symbol, key)
        self._worker.submit(SubmitOrder(coid, request, symbol))

    # -- applying the worker's events (main thread) ---------------------------------------------

    def _drain(self) -> None:
        """Apply every event the worker threads queued, in order."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, AlpacaOrderUpdate):
                self._apply_alpaca_order(event.order)
            elif isinstance(event, SubmitRejected):
                self._apply_submit_rejected(event.coid, event.reason)
            elif isinstance(event, NotSent):
                self._apply_not_sent(event.coid, event.reason)
            elif isinstance(event, AccountState):
                self._apply_account(event)
            elif isinstance(event, WorkerFailed):
                self._fatal = event.error

    def _apply_submit_rejected(self, coid: str, reason: str) -> None:
        tr = self.book.by_coid.get(coid)
        if tr is None or not tr.order.alive():
            return
        for o in [t.order for t in tr.family() if t.order.alive()]:
            o.addinfo(reason=reason)
            o.reject(self)
            self.notify(o)
        self._counts["rejected"] += 1
        logger.warning("order %s rejected: %s", coid, reason)
        self.book.forget_if_done(tr)

    def _apply_not_sent(self, coid: str, reason: str) -> None:
        tr = self.book.by_coid.get(coid)
        if tr is None:
            return
        for t in tr.family():
            if t.order.alive():
                t.order.addinfo(reason=reason)
                t.order.cancel()
                self.notify(t.order)
        self._counts["canceled"] += 1
        self.book.forget_if_done(tr)

    def _apply_alpaca_order(self, snap: AlpacaOrder) -> None:
        """Apply an Alpaca snapshot to the backtrader order it is about and to its legs."""
        tr = self.book.find(snap)
        if tr is None:
            self._cancel_orphan(snap)
            return
        if tr.alpaca_id is None:
            self.book.link(tr, str(snap.id))
        self._apply_order_state(tr, snap)
        for leg_snap in snap.legs or ():
            leg = self.book.by_id.get(str(leg_snap.id))
            if leg is None:
                role = leg_role(leg_snap.type or leg_snap.order_type)
                leg = next((t for t in tr.legs if t.alpaca_id is None and t.role == role), None)
                if leg is None:
                    continue
                leg.coid = leg_snap.client_order_id
                self.book.link(leg, str(leg_snap.id))
            self._apply_order_state(leg, leg_snap)
        self.book.forget_if_done(tr.root or tr)

    def _apply_order_state(self, tr: TrackedOrder, snap: AlpacaOrder) -> None:
        """New fills, then a new status, of one order; stale snapshots change nothing."""
        order = tr.order
        status = alpaca_status(snap)
        if tr.alpaca_id is not None and str(snap.id) != tr.alpaca_id:
            return  # a snapshot of an order that was replaced: only its successor counts
        filled = to_decimal(snap.filled_qty)
        cum = tr.base_cum + filled
        if snap.qty is not None:
            tr.qty = tr.base_cum + to_decimal(snap.qty)
        if cum < tr.cum:
            return  # an older snapshot than one already applied
        if cum == tr.cum and tr.updated_at is not None and snap.updated_at < tr.updated_at:
            return
        tr.updated_at = snap.updated_at
        if not order.alive():
            if cum > tr.cum:  # fills after the order ended for backtrader: keep positions true
                logger.error(
                    "order %s (%s) filled %s after it ended as %s here; position updated",
                    snap.id,
                    tr.symbol,
                    cum - tr.cum,
                    order.getstatusname(),
                )
                self._adjust_position(tr, cum - tr.cum)
                tr.cum = cum
            return
        if cum > tr.cum:
            fill = fill_increment(
                applied_cum=tr.cum,
                applied_value_usd=tr.value,
                base_cum=tr.base_cum,
                base_value_usd=tr.base_value,
                filled_qty=filled,
                filled_avg_price=to_decimal(snap.filled_avg_price),
            )
            assert fill is not None  # cum > tr.cum
            if order.status == bt.Order.Submitted:
                order.accept(self)
                self.notify(order)
            tr.cum, tr.value = fill.cum, fill.value_usd
            done = status == "filled" or fill.cum >= tr.qty
            self._notify_fill(tr, fill, snap.filled_at or snap.updated_at, done)
            if done:
                self._counts["filled"] += 1
                for leg in tr.legs:  # a bracket's exits go live once the entry is filled
                    leg.order.activate()
        if status == "replaced":
            if snap.replaced_by is not None:
                self.book.follow(tr, str(snap.replaced_by))
            return
        self._notify_status(tr, snap, status)
        tr.status = status

    def _notify_fill(
        self, tr: TrackedOrder, fill: FillIncrement, when: datetime | None, done: bool
    ) -> None:
        """An Alpaca fill becomes a backtrader execution: the position moves by the exact
        increment, the order is executed (``Partial`` or ``Completed``) and notified."""
        order = tr.order
        data = order.data
        signed = fill.size if order.isbuy() else -fill.size
        price = fill.price_usd
        pos = self._pos.setdefault(tr.key, bt.Position())
        old_price = pos.price
        _, pprice, opened, closed = pos.update(float(signed), price)
        self._qty[tr.key] = self._qty.get(tr.key, ZERO) + signed
        pos.size = float(self._qty[tr.key])  # exact sum of the increments, no float drift
        comminfo = self.getcommissioninfo(data)
        closed_value = comminfo.getoperationcost(closed, old_price)
        opened_value = comminfo.getoperationcost(opened, price)
        pnl = comminfo.profitandloss(-closed, old_price, price)
        order.execute(
            bt_time(when, datetime.now(UTC)),
            float(signed),
            price,
            closed,
            closed_value,
            0.0,
            opened,
            opened_value,
            0.0,
            0.0,
            pnl,
            pos.size,
            pprice,
        )
        remaining = tr.qty - tr.cum
        order.executed.remsize = float(remaining if order.isbuy() else -remaining)
        if done:
            order.completed()
        else:
            order.partial()
        self.notify(order)

    def _notify_status(self, tr: TrackedOrder, snap: AlpacaOrder, status: str) -> None:
        """A new Alpaca status becomes the backtrader status (:data:`STATUS_MAP`) and a
        notification; statuses that map to ``None`` change nothing."""
        order = tr.order
        mapped = STATUS_MAP.get(status)
        if mapped == bt.Order.Accepted and order.status == bt.Order.Submitted:
            order.accept(self)
            self.notify(order)
        elif mapped == bt.Order.Completed and order.alive():
            order.completed()
            self.notify(order)
            self._counts["filled"] += 1
        elif mapped == bt.Order.Canceled:
            order.cancel()
            self.notify(order)
            self._counts["canceled"] += 1
        elif mapped == bt.Order.Expired:
            order.status = bt.Order.Expired
            order.executed.dt = bt_time(snap.expired_at or snap.updated_at, datetime.now(UTC))
            self.notify(order)
            self._counts["expired"] += 1
        elif mapped == bt.Order.Rejected:
            order.addinfo(
                reason=f"alpaca: order rejected by Alpaca (status rejected, "
                f"failed_at {snap.failed_at})"
            )
            order.reject(self)
            self.notify(order)
            self._counts["rejected"] += 1

    def _adjust_position(self, tr: TrackedOrder, increment: Decimal) -> None:
        signed = increment if tr.order.isbuy() else -increment
        self._qty[tr.key] = self._qty.get(tr.key, ZERO) + signed
        pos = self._pos.setdefault(tr.key, bt.Position())
        pos.size = float(self._qty[tr.key])

    def _cancel_orphan(self, snap: AlpacaOrder) -> None:
        """An order of this session that no backtrader order follows (its submit was judged
        failed): cancel it so nothing trades behind the agent's back."""
        if not snap.client_order_id.startswith(f"{self.session_id}-"):
            return
        oid = str(snap.id)
        if alpaca_status(snap) in TERMINAL or oid in self._orphans:
            return
        self._orphans.add(oid)
        logger.error(
            "order %s (%s) is open on Alpaca but no agent order follows it; cancelling it",
            snap.client_order_id,
            snap.symbol,
        )
        self._worker.cancel(CancelOrder(None, oid))

    def _apply_account(self, acct: AccountState) -> None:
        """Take cash and equity; take each position from Alpaca when no order of ours is in
        flight on its symbol (a difference means trades outside this run)."""
        self._cash, self._value = acct.cash_usd, acct.equity_usd
        generations = self.flights.generations()
        busy = {t.key for t in self.book.by_ref.values() if t.order.alive()}
        for fam in self.book.held.values():
            busy.update(position_key(feed_symbol(o.data)) for o in fam)
        for key in set(acct.positions) | {k for k, v in self._qty.items() if v != 0}:
            if key in busy or generations.get(key, 0) != acct.generations.get(key, 0):
                continue  # orders in flight on this symbol: the snapshot may be mid-way
            qty, avg = acct.positions.get(key, (ZERO, 0.0))
            if qty != self._qty.get(key, ZERO):
                logger.warning(
                    "position %s: Alpaca has %s, this run had %s; taking Alpaca's "
                    "(trades outside this run?)",
                    key,
                    qty,
                    self._qty.get(key, ZERO),
                )
                self._qty[key] = qty
                pos = self._pos.setdefault(key, bt.Position())
                pos.set(float(qty), avg if qty else 0.0)

    # -- adoption of the open orders found at start (main thread) ------------------------------

    def _adopt(self) -> None:
        """Follow the open orders found at start once their feed has a bar."""
        waiting = []
        for snap in self._to_adopt:
            data = self._datas.get(position_key(str(snap.symbol)))
            if data is None or not len(data):
                waiting.append(snap)
                continue
            root = self._adopt_one(snap, data, None)
            for leg_snap in snap.legs or ():
                self._adopt_one(leg_snap, data, root)
        self._to_adopt = waiting

    def _adopt_one(self, snap: AlpacaOrder, data: Any, root: TrackedOrder | None) -> TrackedOrder:
        order = adopted_order(snap, data, root.order if root else None)
        order.addcomminfo(self.getcommissioninfo(data))
        symbol = str(snap.symbol)
        cum = to_decimal(snap.filled_qty)
        tr = TrackedOrder(
            order=order,
            symbol=symbol,
            key=position_key(symbol),
            qty=to_decimal(snap.qty),
            coid=snap.client_order_id,
            alpaca_id=str(snap.id),
            role=leg_role(snap.type) if root else None,
            root=root,
            cum=cum,
            value=cum * to_decimal(snap.filled_avg_price),
            status=alpaca_status(snap),
            updated_at=snap.updated_at,
        )
        if root is not None:
            root.legs.append(tr)
        else:
            self.flights.add_adopted(snap.client_order_id, symbol, str(snap.id))
        self.book.track(tr)
        order.submit(self)
        order.accept(self)
        if root is None or (root.order.status == bt.Order.Completed):
            order.activate()
        self.notify(order)
        return tr
