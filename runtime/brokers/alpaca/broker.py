"""The backtrader broker that trades an Alpaca account: :class:`AlpacaPaperTradingBroker`.

Agents trade through the ordinary backtrader calls (``buy``/``sell``/``close``/``cancel``/
``buy_bracket``/``sell_bracket``, ``valid=``, ``oco=``); this broker turns them into Alpaca
orders and Alpaca's answers back into backtrader notifications.

The path of an order, all on the main (backtrader) thread except the HTTP:

1. ``buy``/``sell`` -> :meth:`~AlpacaPaperTradingBroker._send`: risk guard, request
   (:func:`~runtime.brokers.alpaca.orders.to_order_request`), ``Submitted``, a
   :class:`~runtime.brokers.alpaca.events.SubmitOrder` for the worker's ``alpaca-orders`` thread
   (:mod:`runtime.brokers.alpaca.worker`).
2. The worker threads put every Alpaca order snapshot (submit answer, stream, poll, lookup) on
   the event queue as an :class:`~runtime.brokers.alpaca.events.AlpacaOrderUpdate`.
3. ``next()`` -> :meth:`~AlpacaPaperTradingBroker._drain` ->
   :meth:`~AlpacaPaperTradingBroker._apply_alpaca_order`: each new fill becomes ``notify_order``
   in :meth:`~AlpacaPaperTradingBroker._notify_fill` (cash and the position move together in
   the :class:`~.state.Ledger`), each new status in
   :meth:`~AlpacaPaperTradingBroker._notify_status`.

Correctness rules (the bugs users hit with the deprecated bridges and with Alpaca itself):

* ``client_order_id = "<session>-<order ref>"``: a retried submit can never create a second
  order; a retry answered with any 4xx looks the order up before calling it rejected.
* Fills are increments of Alpaca's cumulative ``filled_qty`` in ``Decimal``
  (:func:`~runtime.brokers.alpaca.orders.fill_increment`): partial fills sum exactly, repeated
  or stale snapshots add nothing. Crypto fills book Alpaca's fee in the coin received as
  commission (:func:`~runtime.brokers.alpaca.orders.crypto_fee`).
* Bracket legs are followed by id, including the order that replaces a triggered stop leg (the
  same backtrader order goes on as the replacement) and a take profit replaced by its own stop
  leg (it ends Canceled, the stop leg fills).
* An order sent on a symbol right after cancels on that symbol waits until they settle (Alpaca
  keeps the shares of ``pending_cancel`` orders reserved), so the kill switch's flatten works on
  bracketed positions. An order meant to reduce the position (a flatten order, an order held
  behind cancels that only reduced the position, any reducing order once the kill switch
  tripped, a crypto close) is sized against Alpaca's position when it is sent, and not sent
  (Canceled, with the reason) when the position is already flat or reversed
  (:meth:`~.worker.AlpacaWorker._fit_to_position`).
* Statuses map one to one (:data:`~runtime.brokers.alpaca.orders.STATUS_MAP`): ``canceled`` is
  Canceled, never Rejected (Expired when this broker expired it for ``valid=``).
* An order sent while an opposite-side market order works on its symbol waits for it to fill
  (Alpaca refuses it as a potential wash trade otherwise); one that would cross an opposite
  resting limit is sent, and Alpaca's refusal is the agent's Rejected.
* An order that takes a position through zero (``sell(size=2 * pos)``, ``order_target_size``
  from long to short) is one backtrader order and two Alpaca orders, because Alpaca refuses it
  as one (Alpaca-API #90): the closing order is sent first, the opening order (same type,
  prices and time in force, ``client_order_id`` ``<coid>-open``) once the close has filled. The
  agent sees ``Partial`` for the close and ``Completed`` when the opening order fills; if the
  close ends unfilled or the opening order is refused, the order ends (Canceled/Rejected) with
  what filled, the reason in ``info["reason"]``.
* Cash, positions and value change together (the ledger), so each decision record is one
  consistent account; an account read replaces them only when no fill happened during it.
* Notifications created at stop (final cancels and fills) still reach ``notify_order`` and the
  analyzers: the final sync runs just before cerebro stops the strategies.
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
from alpaca.trading.models import Order as AlpacaOrder

from core.bars import feed_symbol
from core.errors import BrokerError, OrderRejectedError, RetryInterruptedError, TransientError
from runtime.brokers.alpaca import http
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.events import (
    CancelOrder,
    Event,
    SubmitOrder,
)
from runtime.brokers.alpaca.fills import FillsMixin
from runtime.brokers.alpaca.http import AlpacaApi, AlpacaCaller, CallHook
from runtime.brokers.alpaca.orders import (
    FractionalCommInfo,
    child_role,
    client_order_id,
    is_crypto,
    is_fractional,
    position_key,
    quantity,
    split_reversal,
    to_order_request,
    validity,
)
from runtime.brokers.alpaca.reconcile import read_start_state
from runtime.brokers.alpaca.state import (
    BrokerReport,
    FlightBook,
    Ledger,
    OrderBook,
    TrackedOrder,
)
from runtime.brokers.alpaca.worker import AlpacaWorker
from runtime.brokers.risk import RiskConfig, RiskGuard

logger = logging.getLogger(__name__)

_EPS = Decimal("0.000000001")
OPEN_SUFFIX = "-open"  # client_order_id suffix of the opening order of a split reversal


class AlpacaPaperTradingBroker(FillsMixin, bt.BrokerBase):  # type: ignore[misc]
    """A backtrader broker trading an Alpaca account (paper by default), through the Trading
    API or, with ``config.account_id``, the Broker API.

    Args:
        config: endpoint, keys, polling, policies (:class:`AlpacaBrokerConfig`).
        session_id: this run's id; prefix of every ``client_order_id``.
        risk: pre-trade limits and kill switch (:mod:`runtime.brokers.risk`); ``None`` = none.
        api_factory: builds the account's calls (tests); default from ``config``. One per
            thread.
        on_retry: ``(operation, error)`` before each retried Alpaca call (metrics).
        on_error: ``(operation, error)`` for each Alpaca call that failed for good (metrics).
            Both hooks run on the calling thread (main, orders, monitor or stream): keep them
            thread-safe and quick.

    Attributes:
        report: the :class:`BrokerReport`, set by :meth:`stop`.
        guard: the risk guard, if any.
        ledger: cash, positions and marks as the agent sees them.

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
        api_factory: Callable[[], AlpacaApi] | None = None,
        on_retry: CallHook | None = None,
        on_error: CallHook | None = None,
    ) -> None:
        super().__init__()
        if not session_id:
            raise ValueError("session_id must not be empty")
        # fails now if the session id is too long (the opening order of a split reversal adds
        # OPEN_SUFFIX to its order's id)
        client_order_id(session_id + OPEN_SUFFIX, 10**12)
        self.config = config
        self.session_id = session_id
        self.endpoint = config.endpoint
        self.live = config.points_at_live
        self._api_factory = api_factory or functools.partial(http.make_api, config)
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
        self.ledger = Ledger()
        self._events: queue.Queue[Event] = queue.Queue()
        self._worker = AlpacaWorker(
            config,
            session_id=session_id,
            caller=self.caller,
            make_api=self._api_factory,
            flights=self.flights,
            events=self._events,
        )
        self._api: AlpacaApi | None = None
        self._connected = False
        self._started = False
        self._finished = False
        self._stopped = False
        self._fatal: BaseException | None = None
        self._datas: dict[str, Any] = {}  # position key -> feed
        self._to_adopt: list[AlpacaOrder] = []
        self._orphans: set[str] = set()
        self._canceling: dict[str, str] = {}  # family coid -> position key, cancel requested
        self._oco_groups: dict[int, list[int]] = {}  # client-side oco: leader ref -> refs
        self._strategies: list[Any] | None = None
        self._hooked = False
        self.startingcash = 0.0
        self._commission_usd = Decimal(0)
        self._counts = dict.fromkeys(("submitted", "filled", "canceled", "rejected", "expired"), 0)

    def __repr__(self) -> str:
        return (
            f"AlpacaPaperTradingBroker(endpoint={self.endpoint!r}, live={self.live}, "
            f"api={'broker' if self.config.broker_api else 'trading'}, "
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
        api = f"Broker API account {self.config.account_id}" if self.config.broker_api else ""
        return f"alpaca {kind} at {self.endpoint}" + (f" ({api})" if api else "")

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
            # feeds of one symbol (a daily feed, its resample): the first one reports the position
            self._datas.setdefault(position_key(feed_symbol(data)), data)
            name = getattr(data, "_name", None)
            if is_crypto(feed_symbol(data)) and name not in self.comminfo:
                # fractional sizes for order_target_* and sizers (docs/alpaca.md)
                self.addcommissioninfo(FractionalCommInfo(), name=name)
        self._api = self._api_factory()
        start = read_start_state(self.caller, self._api, self.config, self._datas.keys())
        self.ledger.cash_usd = start.cash_usd
        for key, (qty, avg) in start.positions.items():
            self.ledger.set_position(key, qty, avg)
        self.ledger.marks.update(start.marks)
        self.startingcash = float(start.cash_usd)
        self._to_adopt = start.to_adopt
        self._worker.clock = start.clock
        self._connected = True

    def interrupt_connect(self) -> None:
        """End :meth:`connect` now (a stop before the run started): no start-up read begins
        after it, and the wait for one in flight ends at once (that request is left on its
        daemon thread, :func:`~runtime.brokers.alpaca.reconcile.start_call`), so
        ``connect()`` raises :class:`~core.errors.RetryInterruptedError` within ~0.05 s.
        No-op once connected. Any thread (sets an event)."""
        if not self._connected:
            self.caller.stop.set()

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
        self._strategies = getattr(getattr(self, "cerebro", None), "runningstrats", None)
        self._worker.start()

    def finish(self) -> None:
        """The final sync: stop and join the worker threads, cancel open orders when asked
        (waiting out pending cancels), poll once more and read the account, all within
        ``stop_timeout_s``. Idempotent. Its notifications are queued like any other; the hook
        installed on the first strategy delivers them before cerebro stops the strategies."""
        if self._finished or not self._started:
            return
        self._finished = True
        # one budget for the threads' stop and the final sync
        deadline = time.monotonic() + self.config.stop_timeout_s
        self._worker.stop(deadline)
        self._drain()
        api = self._api
        assert api is not None  # started implies connected
        worker = self._worker
        try:
            if self.config.cancel_on_stop:
                worker.cancel_all(api, deadline)
            while True:
                worker.poll_once(api, final=True, deadline=deadline)
                self._drain()
                waiting = self.config.cancel_on_stop and any(
                    fl.live() for fl in self.flights.snapshot().flights.values()
                )
                if not waiting or time.monotonic() >= deadline:
                    break
                time.sleep(min(0.1, self.config.poll_interval_s))  # pending_cancel settles
            keys = frozenset(self.ledger.qty) | frozenset(self._datas)
            worker.refresh_account(api, final=True, checked_keys=keys, deadline=deadline)
        except (TransientError, BrokerError) as e:
            logger.error("final sync with Alpaca failed: %s", e)
        except RetryInterruptedError as e:  # the stop budget ran out
            logger.error("final sync with Alpaca ended early: %s", e)
        self._drain()
        left = [
            f"{fl.coid} ({fl.symbol}: {', '.join(f'{m.id} {m.status}' for m in fl.live())})"
            for fl in self.flights.snapshot().flights.values()
            if fl.live()
        ]
        if left:
            logger.warning(
                "%d order famil(ies) still open at Alpaca after stop: %s%s",
                len(left),
                "; ".join(left[:10]),
                " ..." if len(left) > 10 else "",
            )

    def stop(self) -> None:
        """Final sync (:meth:`finish`, if the stop hook has not run it yet) and report.

        Idempotent. Orders still waiting to be sent are not sent (Canceled, reason
        ``"not sent: broker stopped"``).
        """
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self.finish()
        self.report = r = self._make_report()
        logger.info(
            "Alpaca broker stopped: cash %.2f USD, value %.2f USD, positions %s, "
            "orders submitted %d filled %d canceled %d rejected %d expired %d, %d open "
            "left, %d requests (%d retries), commission %.2f USD",
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
            r.commission_usd,
        )

    def _make_report(self) -> BrokerReport:
        open_left = sum(1 for fl in self.flights.snapshot().flights.values() if fl.live())
        return BrokerReport(
            endpoint=self.endpoint,
            live=self.live,
            api="broker" if self.config.broker_api else "trading",
            cash_usd=float(self.ledger.cash_usd),
            value_usd=self.ledger.value_usd(),
            positions={k: float(v) for k, v in sorted(self.ledger.qty.items()) if v != 0},
            orders_submitted=self._counts["submitted"],
            orders_filled=self._counts["filled"],
            orders_canceled=self._counts["canceled"],
            orders_rejected=self._counts["rejected"],
            orders_expired=self._counts["expired"],
            open_orders_left=open_left,
            requests=self.caller.calls,
            retries=self.caller.retries,
            commission_usd=float(self._commission_usd),
        )

    def _install_stop_hook(self) -> None:
        """Run the final sync just before cerebro stops the strategies.

        Cerebro calls every strategy's ``_stop()`` (the agent's ``stop()``, then each
        analyzer's ``stop()``: FMEL's last record) *before* ``broker.stop()``
        (``Cerebro.runstrategies``), so notifications made at the broker's stop would reach
        no one. The first strategy's ``_stop`` is wrapped to :meth:`finish` first and deliver
        its notifications the way ``Cerebro._brokernotify`` does.
        """
        strategies = self._strategies
        if self._hooked or not strategies:
            return
        self._hooked = True
        first = strategies[0]
        original = first._stop

        def _stop() -> None:
            try:
                self.finish()
                self._deliver(strategies)
            except Exception:
                logger.exception("final sync at stop failed")
            original()

        first._stop = _stop

    def _deliver(self, strategies: list[Any]) -> None:
        """Hand queued notifications to their strategies (``Cerebro._brokernotify``'s rule)."""
        cerebro = getattr(self, "cerebro", None)
        quick = bool(getattr(getattr(cerebro, "p", None), "quicknotify", False))
        while (order := self.get_notification()) is not None:
            owner = order.owner if order.owner is not None else strategies[0]
            owner._addnotification(order, quicknotify=quick)
        if not quick:
            for strategy in strategies:
                strategy._notify()

    # -- backtrader broker API (main thread) --------------------------------------------------

    def getcash(self) -> float:
        """Cash, USD: the last consistent account read plus this run's fills since."""
        return float(self.ledger.cash_usd)

    get_cash = getcash

    def getvalue(self, datas: Iterable[Any] | None = None) -> float:
        """Cash plus every position at its last price, USD (consistent with
        :meth:`getcash` and the positions); with ``datas``: those positions at the feeds' last
        close."""
        if datas is None:
            return self.ledger.value_usd()
        total = 0.0
        for data in datas:
            pos = self.getposition(data)
            if pos.size and len(data):
                total += float(pos.size) * float(data.close[0])
        return total

    get_value = getvalue

    def getposition(self, data: Any) -> bt.Position:
        """The position of ``data``'s symbol (the same object between calls)."""
        return self.ledger.position(position_key(feed_symbol(data)))

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
        return self._transmit(order, kwargs, oco)

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
        return self._transmit(order, kwargs, oco)

    def submit(self, order: Any) -> Any:
        """Send an order built elsewhere (backtrader's generic broker API)."""
        return self._transmit(order, {}, None)

    def cancel(self, order: Any) -> bool:
        """Ask Alpaca to cancel ``order`` (any order of a bracket or OCO cancels the group).
        The ``Canceled`` notification comes when Alpaca confirms; returns False when the order
        is not alive."""
        if not order.alive():
            return False
        for pref, family in list(self.book.held.items()):
            if any(o.ref == order.ref for o in family):  # group not transmitted yet
                del self.book.held[pref]
                for o in family:
                    o.cancel()
                    self.notify(o)
                return True
        tr = self.book.by_ref.get(order.ref)
        if tr is None:
            return False
        self._request_cancel(tr)
        return True

    def _request_cancel(self, tr: TrackedOrder) -> None:
        """Cancel the family of ``tr`` at Alpaca: through its root while the root works, else
        the order itself (Alpaca cancels a leg's siblings with it)."""
        root = tr.root or tr
        flight = tr.flight
        if flight is not None:
            self._canceling[flight] = tr.key
        if root.order.alive() and root.coid is not None and root.coid == flight:
            self._worker.cancel(CancelOrder(flight, None))
        else:
            self._worker.cancel(CancelOrder(flight, tr.alpaca_id))

    def next(self) -> None:
        """Apply what the worker threads reported (main thread; called by cerebro every loop).

        Raises:
            BrokerError: a worker thread failed for good (e.g. Alpaca unreachable for many
                poll cycles).
        """
        if not self._hooked:
            self._install_stop_hook()
        if self._to_adopt:
            self._adopt()
        self._drain()
        self._mark_from_feeds()  # after the fills and account reads: the bar's close values
        self._check_expiries()
        if self._fatal is not None:
            raise BrokerError(f"Alpaca broker failed: {self._fatal}") from self._fatal
        if self.guard is not None and self._started and not self._finished:
            self.guard.after_bar(self)

    def _mark_from_feeds(self) -> None:
        """Each feed's last close is its position's price (as backtrader's own broker values
        positions)."""
        marks = self.ledger.marks
        for key, data in self._datas.items():
            if len(data):
                marks[key] = float(data.close[0])

    # -- sending (main thread) ----------------------------------------------------------------

    def _transmit(self, order: Any, info: dict[str, Any], oco: Any) -> Any:
        """Send ``order``, or hold it until its group is complete (``transmit=False``): a
        bracket (children with ``parent=``), or a take-profit/stop pair (``oco=``) that Alpaca
        takes as one ``oco`` order."""
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
        if oco is not None:
            partner = held.get(oco.ref)
            if partner is not None and len(partner) == 1:
                del held[oco.ref]
                pair = self._oco_pair(partner[0], order)
                if pair is not None:
                    self._send(list(pair), oco=True)
                    return order
                self._send(partner)
            self._send([order])
            self._join_oco(oco, order)
            return order
        self._send([order])
        return order

    @staticmethod
    def _oco_pair(first: Any, second: Any) -> tuple[Any, Any] | None:
        """``(take profit, stop)`` when the two orders make one Alpaca OCO exit (a limit and a
        stop or stop-limit on the same side, size and feed, not crypto)."""
        if first.data is not second.data or is_crypto(feed_symbol(first.data)):
            return None
        stops = (bt.Order.Stop, bt.Order.StopLimit)
        if first.exectype == bt.Order.Limit and second.exectype in stops:
            return first, second
        if second.exectype == bt.Order.Limit and first.exectype in stops:
            return second, first
        return None

    def _join_oco(self, leader: Any, order: Any) -> None:
        """A backtrader ``oco=`` group Alpaca could not take as one order: when one of them
        fills or ends, this broker cancels the others (two requests apart: both may fill)."""
        group = next((g for g in self._oco_groups.values() if leader.ref in g), None)
        if group is None:
            group = self._oco_groups.setdefault(leader.ref, [leader.ref])
        group.append(order.ref)
        for ref in group:
            tr = self.book.by_ref.get(ref)
            if tr is not None:
                tr.oco = [r for r in group if r != ref]

    def _reject_local(self, family: Sequence[Any], reason: str) -> None:
        for o in family:
            o.addinfo(reason=reason)
            o.reject(self)
            self.notify(o)
        self._counts["rejected"] += 1

    def _send(self, family: list[Any], oco: bool = False) -> None:
        """Risk check, build the request, notify ``Submitted``, hand it to the orders thread.

        Args:
            family: the order, a bracket (entry then exits), or with ``oco`` an OCO pair
                (take profit, stop).
        """
        root = family[0]
        symbol = feed_symbol(root.data)
        if self.guard is not None:
            reason = self.guard.check(root, self)
            if reason is not None:
                self._reject_local(family, reason)
                return
        coid = client_order_id(self.session_id, root.ref)
        bar_num = (
            float(root.data.datetime[0])
            if len(root.data)
            else float(bt.date2num(datetime.now(UTC).replace(tzinfo=None)))
        )
        tif, expires = validity(root, symbol, bar_num)
        info = root.info
        key = position_key(symbol)
        total = quantity(root.created.size)
        closing, opening = (total, Decimal(0))
        if len(family) == 1 and not is_crypto(symbol):
            closing, opening = split_reversal(
                self.ledger.qty.get(key, Decimal(0)), root.isbuy(), total
            )
        if not root.isbuy() and not is_crypto(symbol):
            held = self.ledger.qty.get(key, Decimal(0))
            shorts = total - max(held, Decimal(0))
            if shorts > 0 and is_fractional(shorts):
                # Alpaca: "fractional orders are not allowed to short" (alpaca-trade-api-python
                # #405): refused here, before anything is sent or half done
                self._reject_local(
                    family,
                    f"alpaca: the order would sell {shorts} {symbol} short; Alpaca does not "
                    "sell fractional quantities short",
                )
                return
        tif_sent = info.get("time_in_force") or tif or self.config.time_in_force
        try:
            request = to_order_request(
                root,
                symbol,
                client_order_id=coid,
                time_in_force=tif_sent,
                children=() if oco else family[1:],
                oco_stop=family[1] if oco else None,
                qty=closing,
            )
        except OrderRejectedError as e:
            self._reject_local(family, f"alpaca: {e}")
            return
        if opening:
            logger.info(
                "order %s (%s) reverses the position: %s to close, then %s to open (Alpaca "
                "takes them as two orders)",
                coid,
                symbol,
                closing,
                opening,
            )
        tr = TrackedOrder(
            order=root,
            symbol=symbol,
            key=key,
            qty=total,
            coid=coid,
            flight=coid,
            expires_num=expires,
            rest=opening,
            tif=tif_sent,
        )
        for child in family[1:]:
            tr.legs.append(
                TrackedOrder(
                    order=child,
                    symbol=symbol,
                    key=key,
                    qty=tr.qty,
                    role=child_role(child),
                    kind="oco_leg" if oco else "bracket_leg",
                    root=tr,
                    flight=coid,
                )
            )
        for t in tr.family():
            self.book.track(t)
            t.order.submit(self)
            self.notify(t.order)
        self._counts["submitted"] += 1
        self._datas.setdefault(key, root.data)
        after = frozenset(c for c, k in self._canceling.items() if k == key)
        after |= self._opposite_market_flights(key, root.isbuy(), coid)
        held_qty = self.ledger.qty.get(key, Decimal(0))
        # a crypto close: sized against Alpaca's position when sent, so the fee estimate
        # leaves no dust below the minimum order size (docs/alpaca.md "Crypto")
        closes = (
            is_crypto(symbol)
            and len(family) == 1
            and held_qty != 0
            and total == abs(held_qty)
            and root.isbuy() == (held_qty < 0)
        )
        self.flights.add_sent(coid, symbol, key)
        self._worker.submit(
            SubmitOrder(
                coid,
                request,
                symbol,
                extended_hours=bool(info.get("extended_hours")),
                after=after,
                reduce_only=self._reduce_only(family, key, after) or closes,
                closes=closes,
            )
        )

    def _reduce_only(self, family: Sequence[Any], key: str, after: frozenset[str]) -> bool:
        """Whether the orders thread sizes this order against Alpaca's position right before
        sending it (:meth:`~.worker.AlpacaWorker._fit_to_position`): a single order that only
        reduces the position as this run knows it, and that either is a flatten order, waits
        for cancels (a stop of the position may fill meanwhile) or passed the risk guard only
        because it reduces (judged again when it is sent)."""
        if len(family) != 1:
            return False
        root = family[0]
        held = self.ledger.qty.get(key, Decimal(0))
        size = quantity(root.created.size)
        after_qty = held + (size if root.isbuy() else -size)
        if held == 0 or abs(after_qty) > abs(held) or after_qty * held < 0:
            return False
        flatten = str(root.info.get("reason") or "").startswith("risk: flatten")
        tripped = self.guard is not None and self.guard.tripped is not None
        return flatten or tripped or bool(after)

    def cancel_requested(self, order: Any) -> bool:
        """True when this broker asked Alpaca to cancel ``order``'s family (the risk guard
        leaves such orders out of the exposure still to come)."""
        tr = self.book.by_ref.get(order.ref)
        return tr is not None and tr.flight is not None and tr.flight in self._canceling

    def _opposite_market_flights(self, key: str, buy: bool, coid: str) -> frozenset[str]:
        """Families with a working opposite-side market order on ``key``: an order sent while
        one works would be refused as a potential wash trade (403, docs "User Protection":
        a buy and a sell that could fill against each other), so it waits for them to fill,
        which market orders do at once (at most the settle wait, then Alpaca decides).
        Opposite resting limits are not waited for: they may rest for days, and Alpaca's
        refusal reaches the agent as Rejected."""
        return frozenset(
            t.flight
            for t in self.book.by_ref.values()
            if t.key == key
            and t.flight is not None
            and t.flight != coid
            and t.order.alive()
            and t.order.exectype == bt.Order.Market
            and t.order.isbuy() != buy
        )

    def _send_rest(self, tr: TrackedOrder) -> None:
        """The closing order of a split reversal filled: send the opening order (same type,
        prices and time in force) as the same backtrader order (main thread). Once the broker
        is stopping nothing new is sent: the order ends Canceled with what filled."""
        opening, tr.rest = tr.rest, Decimal(0)
        if self._finished:
            tr.order.addinfo(
                reason=f"not sent: broker stopped (the closing order filled {tr.cum}; the "
                f"opening order of {opening} was not sent)"
            )
            tr.order.cancel()
            self.notify(tr.order)
            self._counts["canceled"] += 1
            self._forget(tr.flight)
            return
        old = tr.coid
        assert old is not None
        coid = f"{old}{OPEN_SUFFIX}"
        try:
            request = to_order_request(
                tr.order, tr.symbol, client_order_id=coid, time_in_force=tr.tif, qty=opening
            )
        except OrderRejectedError as e:  # the same order passed before; kept for safety
            tr.order.addinfo(reason=f"alpaca: opening order not sent: {e}")
            tr.order.reject(self)
            self.notify(tr.order)
            self._counts["rejected"] += 1
            return
        if tr.alpaca_id is not None:
            tr.retired.add(tr.alpaca_id)
        tr.alpaca_id = None
        tr.base_cum, tr.base_value, tr.updated_at = tr.cum, tr.value, None
        tr.qty = tr.cum + opening
        tr.coid = tr.flight = coid
        self.book.by_coid[coid] = tr
        self.flights.remove(old)
        self._canceling.pop(old, None)
        after = frozenset(c for c, k in self._canceling.items() if k == tr.key)
        self.flights.add_sent(coid, tr.symbol, tr.key)
        logger.info(
            "order %s (%s): closed; sending %s to open as %s", old, tr.symbol, opening, coid
        )
        self._worker.submit(
            SubmitOrder(
                coid,
                request,
                tr.symbol,
                extended_hours=bool(tr.order.info.get("extended_hours")),
                after=after,
            )
        )

    def _check_expiries(self) -> None:
        """Expire orders whose ``valid=`` passed (Alpaca has no good-till-date): cancel at
        Alpaca; its ``canceled`` then notifies Expired (backtrader's rule: bar time > valid)."""
        for tr in list(self.book.by_ref.values()):
            if tr.expires_num is None or tr.expiring or not tr.order.alive():
                continue
            data = tr.order.data
            if len(data) and float(data.datetime[0]) > tr.expires_num:
                tr.expiring = True
                for leg in tr.legs:
                    leg.expiring = True
                logger.info("order %s (%s) expired (valid=); cancelling it", tr.coid, tr.symbol)
                self._request_cancel(tr)

    # -- applying the worker's events (main thread) ---------------------------------------------
