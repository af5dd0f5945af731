"""Where Alpaca's answers become backtrader's: order updates (polled or streamed) applied to the
tracked orders, each fill booked (cash, position, commission) and handed to ``notify_order``, the
account read merged, and orders found at start adopted.

Runs on the main thread only, from :meth:`AlpacaPaperTradingBroker.next` (through ``_drain``) and at
stop: the worker threads only put events on the broker's queue. A mixin of
:class:`~runtime.brokers.alpaca.broker.AlpacaPaperTradingBroker`, kept apart because it is the
broker's largest concept.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import backtrader as bt
from alpaca.trading.models import Order as AlpacaOrder

from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.events import (
    AccountState,
    AlpacaOrderUpdate,
    CancelOrder,
    Event,
    NotSent,
    ReplacementLost,
    SubmitRejected,
    WorkerFailed,
)
from runtime.brokers.alpaca.orders import (
    STATUS_MAP,
    TERMINAL,
    ZERO,
    FillIncrement,
    adopted_order,
    alpaca_status,
    bt_time,
    crypto_fee,
    fill_increment,
    is_crypto,
    leg_role,
    position_key,
    to_decimal,
)
from runtime.brokers.alpaca.reconcile import family_live, live
from runtime.brokers.alpaca.state import (
    FlightBook,
    Ledger,
    OrderBook,
    TrackedOrder,
)
from runtime.brokers.alpaca.worker import AlpacaWorker

logger = logging.getLogger(__name__)


logger = logging.getLogger(__name__)

_EPS = Decimal("0.000000001")


class FillsMixin:
    """Applies Alpaca's order, fill and account state to the broker (main thread).

    The attributes below are the broker's (set in ``AlpacaPaperTradingBroker.__init__``).
    """

    config: AlpacaBrokerConfig
    session_id: str
    flights: FlightBook
    book: OrderBook
    ledger: Ledger
    _events: queue.Queue[Event]
    _worker: AlpacaWorker
    _fatal: BaseException | None
    _datas: dict[str, Any]
    _to_adopt: list[AlpacaOrder]
    _orphans: set[str]
    _canceling: dict[str, str]
    _commission_usd: Decimal
    _counts: dict[str, int]

    # methods of bt.BrokerBase and of the broker (declared, not defined: a definition here would
    # come before bt.BrokerBase's in the MRO)
    notify: Callable[[Any], None]
    getcommissioninfo: Callable[[Any], Any]
    _request_cancel: Callable[[TrackedOrder], None]
    _send_rest: Callable[[TrackedOrder], None]

    def _drain(self) -> None:
        """Apply every event the worker threads queued, in order."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if isinstance(event, AlpacaOrderUpdate):
                fill = None
                if event.fill_qty is not None and event.fill_price_usd is not None:
                    fill = (event.fill_qty, event.fill_price_usd)
                self._apply_alpaca_order(event.order, fill)
            elif isinstance(event, SubmitRejected):
                self._apply_submit_rejected(event.coid, event.reason)
            elif isinstance(event, NotSent):
                self._apply_not_sent(event.coid, event.reason)
            elif isinstance(event, ReplacementLost):
                self._apply_replacement_lost(event)
            elif isinstance(event, AccountState):
                self._apply_account(event)
            elif isinstance(event, WorkerFailed):
                self._fatal = event.error

    def _forget(self, flight: str | None) -> None:
        if flight is None:
            return
        members = [t for t in self.book.by_ref.values() if t.flight == flight]
        if members and any(t.order.alive() for t in members):
            return
        self.flights.remove(flight)
        self._canceling.pop(flight, None)

    def _apply_submit_rejected(self, coid: str, reason: str) -> None:
        tr = self.book.by_coid.get(coid)
        if tr is None or not tr.order.alive():
            return
        if tr.cum:  # the opening order of a split reversal, after its closing order filled
            reason = f"{reason} (the closing order filled {tr.cum}; the opening order was refused)"
        for o in [t.order for t in tr.family() if t.order.alive()]:
            o.addinfo(reason=reason)
            o.reject(self)
            self.notify(o)
        self._counts["rejected"] += 1
        logger.warning("order %s rejected: %s", coid, reason)
        # an oco= partner goes with it (backtrader's rule: one order of the group ending
        # cancels the others), e.g. the second stop of a breakout straddle that Alpaca refuses
        # as a potential wash trade
        self._oco_check(tr)
        self._forget(coid)

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
        self._forget(coid)

    def _apply_replacement_lost(self, event: ReplacementLost) -> None:
        tr = self.book.by_id.get(event.alpaca_id)
        if tr is None or not tr.order.alive():
            return
        tr.order.addinfo(
            reason=f"alpaca: order {event.alpaca_id} was replaced and its replacement could not "
            "be found; the position comes from the account"
        )
        tr.order.cancel()
        self.notify(tr.order)
        self._counts["canceled"] += 1
        self._forget(tr.flight)

    def _apply_alpaca_order(
        self, snap: AlpacaOrder, fill: tuple[Decimal, Decimal] | None = None
    ) -> None:
        """Apply an Alpaca snapshot to the backtrader order it is about and to its legs.

        Args:
            fill: ``(qty, price USD)`` of the execution a stream event reported for ``snap``.
        """
        tr = self.book.find(snap)
        touched: list[TrackedOrder] = []
        if tr is not None:
            if tr.alpaca_id is None and str(snap.id) not in tr.retired:
                self.book.link(tr, str(snap.id))
            self._apply_order_state(tr, snap, fill)
            touched.append(tr)
        elif not snap.legs:
            self._cancel_orphan(snap)
            return
        for leg_snap in snap.legs or ():
            leg = self.book.by_id.get(str(leg_snap.id))
            if leg is None and tr is not None:
                role = leg_role(leg_snap.type or leg_snap.order_type)
                leg = next((t for t in tr.legs if t.alpaca_id is None and t.role == role), None)
                if leg is None:
                    continue
                self.book.link(leg, str(leg_snap.id))
            if leg is not None:
                self._apply_order_state(leg, leg_snap)
                touched.append(leg)
        for t in touched:
            self._oco_check(t)
            self._forget(t.flight)

    def _apply_order_state(
        self,
        tr: TrackedOrder,
        snap: AlpacaOrder,
        execution: tuple[Decimal, Decimal] | None = None,
    ) -> None:
        """New fills, then a new status, of one order; stale snapshots change nothing. A new
        fill of exactly ``execution``'s quantity (a stream fill event) takes that execution's
        own price; otherwise the price comes from the cumulative averages."""
        order = tr.order
        status = alpaca_status(snap)
        sid = str(snap.id)
        if (tr.alpaca_id is not None and sid != tr.alpaca_id) or sid in tr.retired:
            return  # an order this one replaced: only its successor counts now
        filled = to_decimal(snap.filled_qty)
        cum = tr.base_cum + filled
        if snap.qty is not None:
            tr.qty = tr.base_cum + to_decimal(snap.qty) + tr.rest
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
                fill = fill_increment(
                    applied_cum=tr.cum,
                    applied_value_usd=tr.value,
                    base_cum=tr.base_cum,
                    base_value_usd=tr.base_value,
                    filled_qty=filled,
                    filled_avg_price=to_decimal(snap.filled_avg_price),
                )
                if fill is not None:
                    self._book_fill(tr, fill)
                    tr.cum, tr.value = fill.cum, fill.value_usd
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
            if execution is not None and execution[0] == fill.size:
                exec_price = execution[1]
                fill = FillIncrement(
                    fill.size, float(exec_price), fill.cum, tr.value + fill.size * exec_price
                )
            if order.status == bt.Order.Submitted:
                order.accept(self)
                self.notify(order)
            tr.cum, tr.value = fill.cum, fill.value_usd
            done = (status == "filled" and not tr.rest) or fill.cum >= tr.qty
            self._notify_fill(tr, fill, snap.filled_at or snap.updated_at, done)
            if done:
                self._counts["filled"] += 1
                for leg in tr.legs:  # a bracket's exits go live once the entry is filled
                    if leg.kind == "bracket_leg":
                        leg.order.activate()
        if status == "replaced":
            succ = str(snap.replaced_by) if snap.replaced_by is not None else None
            other = self.book.by_id.get(succ) if succ is not None else None
            if other is not None and other is not tr:
                # the take profit was replaced by its own stop leg (alpaca-py #198): the stop
                # leg goes on under its own backtrader order; this one ends
                order.addinfo(reason="alpaca: replaced by its stop-loss leg, which executes")
                order.cancel()
                self.notify(order)
                self._counts["canceled"] += 1
            elif succ is not None:
                self.book.follow(tr, succ)
            return  # no successor named yet: the worker searches for it
        if status == "filled" and tr.rest:
            if tr.expiring or (tr.flight is not None and tr.flight in self._canceling):
                # cancelled (by the agent, the risk guard's flatten or valid=) while its
                # closing order filled: Alpaca answers the cancel 422 (the order is filled),
                # and backtrader's cancel of a partly executed order keeps what executed and
                # ends the rest, so the opening order is not sent (fresh-context attack:
                # it was, and the agent's cancelled order opened a short)
                what = "expired (valid=)" if tr.expiring else "cancelled"
                order.addinfo(
                    reason=f"alpaca: {what} while its closing order filled ({tr.cum}); the "
                    f"opening order ({tr.rest}) was not sent"
                )
                tr.rest = Decimal(0)
                self._notify_status(tr, snap, "canceled")  # Expired when expiring
                tr.status = status
                self._forget(tr.flight)
                return
            # the closing order of a split reversal: the opening order goes now
            self._send_rest(tr)
            return
        if tr.rest and status in ("canceled", "expired", "rejected") and tr.cum:
            order.addinfo(
                reason=f"alpaca: the closing order ended {status} after {tr.cum} filled; the "
                f"opening order ({tr.rest}) was not sent"
            )
        self._notify_status(tr, snap, status)
        tr.status = status

    def _book_fill(self, tr: TrackedOrder, fill: FillIncrement) -> tuple[Decimal, Decimal]:
        """Move the ledger by one fill: position and cash together; crypto fees in the coin
        received (a buy's fee leaves the position, a sell's leaves the cash).

        Returns:
            ``(signed quantity, commission USD)``.
        """
        buy = tr.order.isbuy()
        signed = fill.size if buy else -fill.size
        price = Decimal(repr(fill.price_usd))
        fee_coin = fee_usd = ZERO
        if is_crypto(tr.symbol):
            fee_coin, fee_usd = crypto_fee(
                buy, fill.size, fill.price_usd, self.config.crypto_fee_bps
            )
        ledger = self.ledger
        ledger.position(tr.key)
        ledger.qty[tr.key] = ledger.qty.get(tr.key, ZERO) + signed - fee_coin
        ledger.cash_usd -= signed * price
        if not buy:
            ledger.cash_usd -= fee_usd
        ledger.marks[tr.key] = fill.price_usd
        if fee_coin:
            ledger.fee_slack[tr.key] = ledger.fee_slack.get(tr.key, ZERO) + fee_coin
        self._commission_usd += fee_usd
        ledger.pos[tr.key].size = float(ledger.qty[tr.key])
        return signed, fee_usd

    def _notify_fill(
        self,
        tr: TrackedOrder,
        fill: FillIncrement,
        when: datetime | None,
        done: bool,
    ) -> None:
        """An Alpaca fill becomes a backtrader execution: the ledger moves by the exact
        increment (fees included), the order is executed (``Partial`` or ``Completed``, the fee
        as its commission in USD) and notified.

        A crypto buy's executed size is net of the fee Alpaca takes in the coin (what the
        position gains), so executed sizes sum to the position and backtrader closes the
        trade when the position is closed; the coins kept as fee are its commission (coins x
        fill price, USD)."""
        order = tr.order
        data = order.data
        price = fill.price_usd
        pos = self.ledger.position(tr.key)
        old_price = pos.price
        buy = order.isbuy()
        fee_coin = ZERO
        if buy and is_crypto(tr.symbol):
            fee_coin, _ = crypto_fee(True, fill.size, fill.price_usd, self.config.crypto_fee_bps)
        gained = fill.size - fee_coin if buy else -fill.size
        _, pprice, opened, closed = pos.update(float(gained), price)
        _, fee_usd = self._book_fill(tr, fill)
        signed = gained
        comminfo = self.getcommissioninfo(data)
        closed_value = comminfo.getoperationcost(closed, old_price)
        opened_value = comminfo.getoperationcost(opened, price)
        pnl = comminfo.profitandloss(-closed, old_price, price)
        comm = float(fee_usd)
        share = abs(closed) / (abs(closed) + abs(opened)) if (closed or opened) else 0.0
        order.execute(
            bt_time(when, datetime.now(UTC)),
            float(signed),
            price,
            closed,
            closed_value,
            comm * share,
            opened,
            opened_value,
            comm * (1.0 - share),
            0.0,
            pnl,
            pos.size,
            pprice,
        )
        remaining = tr.qty - tr.cum
        order.executed.remsize = float(remaining if buy else -remaining)
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
        if mapped == bt.Order.Canceled and tr.expiring:
            mapped = bt.Order.Expired
        ended = (bt.Order.Canceled, bt.Order.Expired, bt.Order.Rejected)
        if mapped in ended and order.status == bt.Order.Submitted:
            # Alpaca had the order (it has an id, then it ended): it was accepted, though a
            # stream's later status may arrive before the submit's answer
            order.accept(self)
            self.notify(order)
        if mapped == bt.Order.Accepted and order.status == bt.Order.Submitted:
            order.accept(self)
            self.notify(order)
        elif mapped == bt.Order.Completed and order.alive():
            order.completed()
            self.notify(order)
            self._counts["filled"] += 1
        elif mapped == bt.Order.Canceled and order.alive():
            order.cancel()
            self.notify(order)
            self._counts["canceled"] += 1
        elif mapped == bt.Order.Expired and order.alive():
            order.status = bt.Order.Expired
            order.executed.dt = bt_time(snap.expired_at or snap.updated_at, datetime.now(UTC))
            self.notify(order)
            self._counts["expired"] += 1
        elif mapped == bt.Order.Rejected and order.alive():
            order.addinfo(
                reason=f"alpaca: order rejected by Alpaca (status rejected, "
                f"failed_at {snap.failed_at})"
            )
            order.reject(self)
            self.notify(order)
            self._counts["rejected"] += 1

    def _oco_check(self, tr: TrackedOrder) -> None:
        """Client-side ``oco=``: a fill or end of one order cancels the rest of its group."""
        if not tr.oco or (tr.order.alive() and tr.cum == 0):
            return
        group, tr.oco = tr.oco, []
        for ref in group:
            other = self.book.by_ref.get(ref)
            if other is not None and other.order.alive():
                other.oco = []
                self._request_cancel(other)

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
        """Take cash, positions and prices from an account read, all together, when the read
        straddled no fill (``consistent``). A position that differs on a symbol with working
        orders may be a fill not seen yet: the worker looks those families up and reads again
        first, unless the difference is within the crypto fees booked since the last read."""
        ledger = self.ledger
        if not acct.consistent:
            return
        busy = self.book.busy_keys()
        blocking = set()
        for key in set(acct.positions) | {k for k, v in ledger.qty.items() if v}:
            theirs = acct.positions.get(key, (ZERO, 0.0))[0]
            ours = ledger.qty.get(key, ZERO)
            if theirs == ours or key not in busy or key in acct.checked_keys:
                continue
            if abs(theirs - ours) <= ledger.fee_slack.get(key, ZERO) + _EPS:
                continue
            blocking.add(key)
        if blocking:
            self._worker.check(blocking)
            return
        slack = dict(ledger.fee_slack)
        for key, (ours, theirs) in ledger.sync(acct.cash_usd, acct.positions, acct.marks).items():
            if abs(theirs - ours) <= slack.get(key, ZERO) + _EPS:
                logger.info(
                    "position %s: Alpaca's crypto fee left %s (booked estimate: %s)",
                    key,
                    theirs,
                    ours,
                )
            else:
                logger.warning(
                    "position %s: Alpaca has %s, this run had %s; taking Alpaca's "
                    "(trades outside this run?)",
                    key,
                    theirs,
                    ours,
                )

    # -- adoption of the open orders found at start (main thread) ------------------------------

    def _adopt(self) -> None:
        """Follow the open order families found at start once their feed has a bar."""
        waiting = []
        for snap in self._to_adopt:
            data = self._datas.get(position_key(str(snap.symbol)))
            if data is None or not len(data):
                waiting.append(snap)
                continue
            coid = snap.client_order_id
            legs = [leg for leg in snap.legs or () if family_live(leg)]
            if live(snap):
                root = self._adopt_one(snap, data, None, coid, "order")
                for leg_snap in snap.legs or ():
                    self._adopt_one(leg_snap, data, root, coid, "bracket_leg")
            else:  # a filled entry: its working legs are exits of one OCO group
                for leg_snap in legs:
                    self._adopt_one(leg_snap, data, None, coid, "order")
            symbol = str(snap.symbol)
            self.flights.add_adopted(coid, symbol, position_key(symbol), [snap, *(snap.legs or ())])
        self._to_adopt = waiting

    def _adopt_one(
        self,
        snap: AlpacaOrder,
        data: Any,
        root: TrackedOrder | None,
        flight: str,
        kind: str,
    ) -> TrackedOrder:
        order = adopted_order(snap, data, root.order if root else None)
        order.addcomminfo(self.getcommissioninfo(data))
        symbol = str(snap.symbol)
        cum = to_decimal(snap.filled_qty)
        tr = TrackedOrder(
            order=order,
            symbol=symbol,
            key=position_key(symbol),
            qty=to_decimal(snap.qty),
            coid=snap.client_order_id if root is None and snap.client_order_id == flight else None,
            alpaca_id=str(snap.id),
            role=leg_role(snap.type) if root else None,
            kind=kind,
            root=root,
            cum=cum,
            value=cum * to_decimal(snap.filled_avg_price),
            status=alpaca_status(snap),
            updated_at=snap.updated_at,
            flight=flight,
        )
        if root is not None:
            root.legs.append(tr)
        self.book.track(tr)
        order.submit(self)
        order.accept(self)
        if root is None or (root.order.status == bt.Order.Completed):
            order.activate()
        self.notify(order)
        return tr
