"""Bookkeeping of the Alpaca broker: which backtrader order is which Alpaca order, and the
account as the bar loop sees it.

* :class:`FlightBook`: the order families in flight, as the worker threads know them from
  Alpaca's answers (every Alpaca order of a family by id, with its last status and fill), shared
  by the main thread and the worker threads (one lock, every access through its methods).
* :class:`TrackedOrder` and :class:`OrderBook`: the main thread's link from each backtrader order
  to its Alpaca orders (the original and any that replaced it) and the fills applied to it.
* :class:`Ledger`: cash, positions and prices, changed together on the main thread so every bar
  sees one consistent account.
* :class:`MarketClock`: the last Alpaca clock read. :class:`BrokerReport`: what the broker did.

Alpaca behaviour modelled (sources in ``tests/alpaca_server.py``): a bracket's stop-loss leg
stays ``held`` after its entry fills and is left out of the open-orders listing; a triggered
stop leg is ``replaced`` by a new order that fills (alpaca-backtrader-api #80), or the take
profit is replaced by the stop leg (alpaca-py #198); ``replaced_by`` may be empty, the successor
then only names the order it ``replaces``.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import backtrader as bt
from alpaca.trading.models import Clock
from alpaca.trading.models import Order as AlpacaOrder

from core.bars import feed_symbol
from runtime.brokers.alpaca.orders import ZERO, alpaca_status, position_key, to_decimal

logger = logging.getLogger(__name__)

DONE = frozenset({"filled", "canceled", "expired", "rejected"})
"""Alpaca statuses after which nothing more happens to an order (``replaced`` lives on in its
successor)."""


# -- shared with the worker threads ------------------------------------------------------------


@dataclass
class Member:
    """One Alpaca order of a family as the worker threads last saw it.

    Attributes:
        id: Alpaca's order id.
        status: Alpaca's status text.
        filled_qty: cumulative filled quantity.
        replaced_by: the successor's id when Alpaca named it.
        replaced_at: when it was replaced (to search for an unnamed successor).
        updated_at: Alpaca's ``updated_at`` of the snapshot.
    """

    id: str
    status: str
    filled_qty: Decimal
    replaced_by: str | None = None
    replaced_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(eq=False)
class Flight:
    """What the worker threads know about one order family (an order, a bracket, an OCO).

    Attributes:
        coid: the family's ``client_order_id`` (its root's).
        symbol: Alpaca symbol. key: position key.
        root_id: Alpaca's id of the root order once known.
        submit_done: the submit was answered or judged failed (until then the monitor leaves
            the family alone).
        members: every Alpaca order of the family seen so far, by id (root, legs, successors).
        lost: replaced members whose successor could not be found (ended for the broker).
        misses: successor searches that found nothing, per replaced member.
        check_due: look the family up at the next poll.
        checked_s: ``time.monotonic()`` of the last family lookup.
        cancel_requested: a cancel of this family was sent.
    """

    coid: str
    symbol: str
    key: str
    root_id: str | None = None
    submit_done: bool = False
    members: dict[str, Member] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)
    misses: dict[str, int] = field(default_factory=dict)
    check_due: bool = False
    checked_s: float = 0.0
    cancel_requested: bool = False

    def member_done(self, m: Member) -> bool:
        """Nothing more can happen to ``m`` here: a final status, or replaced by a known
        successor (or by one that could not be found)."""
        if m.status in DONE or m.id in self.lost:
            return True
        return (
            m.status == "replaced" and m.replaced_by is not None and m.replaced_by in self.members
        )

    def live(self) -> list[Member]:
        """Members that may still change."""
        return [m for m in self.members.values() if not self.member_done(m)]

    @property
    def done(self) -> bool:
        """Every Alpaca order of the family is over (after the submit was answered)."""
        return self.submit_done and bool(self.members) and not self.live()

    def unresolved(self) -> list[Member]:
        """Replaced members whose successor is not known yet."""
        return [
            m
            for m in self.members.values()
            if m.status == "replaced"
            and m.id not in self.lost
            and (m.replaced_by is None or m.replaced_by not in self.members)
        ]


class FlightBook:
    """The order families the worker threads follow, per-symbol order generations, and the
    fill marker that tells whether an account read straddled a fill.

    A generation counts the orders sent on a symbol: an account read that started before the
    latest one may predate its fills.

    Thread context: any thread; every method takes the lock; what it returns are copies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self._by_id: dict[str, str] = {}  # Alpaca id -> family coid
        self._generation: dict[str, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)

    def add_sent(self, coid: str, symbol: str, key: str) -> None:
        """A family about to be sent (main thread); bumps the generation of ``key``."""
        with self._lock:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._flights[coid] = Flight(coid=coid, symbol=symbol, key=key)

    def add_adopted(self, coid: str, symbol: str, key: str, snaps: list[AlpacaOrder]) -> None:
        """A family found open at start and adopted: ``snaps`` are its root and legs (the root
        may be a filled entry whose legs are still live)."""
        with self._lock:
            fl = Flight(coid=coid, symbol=symbol, key=key, submit_done=True)
            fl.root_id = str(snaps[0].id)
            self._flights[coid] = fl
            for snap in snaps:
                self._update(fl, snap)

    def mark_sent(self, coid: str) -> None:
        """The submit of ``coid`` is over (orders thread), landed or not."""
        with self._lock:
            fl = self._flights.get(coid)
            if fl is not None:
                fl.submit_done = True

    def request_cancel(self, coid: str) -> None:
        with self._lock:
            fl = self._flights.get(coid)
            if fl is not None:
                fl.cancel_requested = True

    def observe(self, snap: AlpacaOrder, emit: Callable[[str | None], None]) -> str | None:
        """Take a snapshot (with its legs) into the family it belongs to and, under the same
        lock, ``emit(coid)`` it (so events from all threads are queued in the order they were
        taken in).

        A snapshot belongs to a family by its id, by its ``client_order_id`` (the root), or as
        the successor of a member it ``replaces``.

        Returns:
            The family's ``coid``, or None for an order no family knows.
        """
        with self._lock:
            coid = self._family_of(snap)
            fl = self._flights.get(coid) if coid is not None else None
            if fl is not None:
                if fl.root_id is None and snap.client_order_id == fl.coid:
                    fl.root_id = str(snap.id)
                self._update(fl, snap)
                for leg in snap.legs or ():
                    self._update(fl, leg)
            emit(coid)
            return coid

    def _family_of(self, snap: AlpacaOrder) -> str | None:
        coid = self._by_id.get(str(snap.id))
        if coid is None and snap.client_order_id in self._flights:
            coid = snap.client_order_id
        if coid is None and snap.replaces is not None:
            coid = self._by_id.get(str(snap.replaces))
        return coid

    def _update(self, fl: Flight, snap: AlpacaOrder) -> None:
        oid = str(snap.id)
        m = fl.members.get(oid)
        if m is None:
            m = fl.members[oid] = Member(oid, alpaca_status(snap), to_decimal(snap.filled_qty))
            self._by_id[oid] = fl.coid
        filled = to_decimal(snap.filled_qty)
        if filled < m.filled_qty or (
            m.updated_at is not None and snap.updated_at < m.updated_at and filled == m.filled_qty
        ):
            return  # an older snapshot than one already seen
        m.status = alpaca_status(snap)
        m.filled_qty = filled
        m.updated_at = snap.updated_at
        m.replaced_at = snap.replaced_at or m.replaced_at
        if snap.replaced_by is not None:
            m.replaced_by = str(snap.replaced_by)
        if snap.replaces is not None:
            prev = fl.members.get(str(snap.replaces))
            if prev is not None and prev.replaced_by is None:
                prev.replaced_by = oid  # the successor names what it replaced

    def lost_successor(self, coid: str, member_id: str) -> None:
        """Give up on finding what replaced ``member_id`` (its family then may end)."""
        with self._lock:
            fl = self._flights.get(coid)
            if fl is not None:
                fl.lost.add(member_id)

    def missed(self, coid: str, member_id: str) -> int:
        """Count one successor search that found nothing; returns the count."""
        with self._lock:
            fl = self._flights.get(coid)
            if fl is None:
                return 0
            fl.misses[member_id] = fl.misses.get(member_id, 0) + 1
            return fl.misses[member_id]

    def mark_checked(self, coid: str) -> None:
        with self._lock:
            fl = self._flights.get(coid)
            if fl is not None:
                fl.check_due = False
                fl.checked_s = time.monotonic()

    def due(self, coids: list[str] | None = None, keys: set[str] | None = None) -> None:
        """Look these families (or every family on these position keys) up at the next poll."""
        with self._lock:
            for fl in self._flights.values():
                if (coids and fl.coid in coids) or (keys and fl.key in keys):
                    fl.check_due = True

    def alpaca_id(self, coid: str) -> str | None:
        """The root's Alpaca id of family ``coid``."""
        with self._lock:
            fl = self._flights.get(coid)
            return fl.root_id if fl is not None else None

    def cancel_targets(self, coid: str) -> list[str]:
        """What to ``DELETE`` to cancel a family: its root while the root works (Alpaca cancels
        the legs with it); else its working orders, held legs only when nothing else works
        (cancelling a leg cancels its siblings)."""
        with self._lock:
            fl = self._flights.get(coid)
            if fl is None:
                return []
            live = [m for m in fl.live() if m.status not in ("pending_cancel", "replaced")]
            root = next((m for m in live if m.id == fl.root_id), None)
            if root is not None:
                return [root.id]
            working = [m.id for m in live if m.status != "held"]
            return working or [m.id for m in live]

    def settled(self, coids: frozenset[str]) -> bool:
        """True when none of these families has a working Alpaca order left."""
        with self._lock:
            for coid in coids:
                fl = self._flights.get(coid)
                if fl is not None and not fl.done and (fl.live() or not fl.submit_done):
                    return False
            return True

    def remove(self, coid: str) -> None:
        """Stop following ``coid`` (its whole family is done)."""
        with self._lock:
            fl = self._flights.pop(coid, None)
            if fl is not None:
                for oid in fl.members:
                    self._by_id.pop(oid, None)

    def snapshot(self) -> FlightsSnapshot:
        """Deep copies of every flight and of the generations, taken together."""
        with self._lock:
            return FlightsSnapshot(
                flights={
                    c: dataclasses.replace(
                        f,
                        members={k: dataclasses.replace(m) for k, m in f.members.items()},
                        lost=set(f.lost),
                        misses=dict(f.misses),
                    )
                    for c, f in self._flights.items()
                },
                generations=dict(self._generation),
            )

    def marker(self) -> tuple[Any, ...]:
        """What changes whenever a fill of a followed order or a new order is seen: equal
        markers before and after an account read mean the read straddled no known fill."""
        with self._lock:
            return self.marker_unlocked()

    def locked(self) -> threading.Lock:
        """The lock, for a caller that must queue an event atomically with a marker read."""
        return self._lock

    def marker_unlocked(self) -> tuple[Any, ...]:
        """:meth:`marker` for a caller already holding :meth:`locked`."""
        return (
            tuple(sorted(self._generation.items())),
            tuple(sorted(self._flights)),
            tuple(
                sorted(
                    (m.id, m.filled_qty) for f in self._flights.values() for m in f.members.values()
                )
            ),
            all(f.submit_done for f in self._flights.values()),
        )


@dataclass(frozen=True, slots=True)
class FlightsSnapshot:
    """What :meth:`FlightBook.snapshot` returns: flights by ``coid``, generations by position
    key."""

    flights: dict[str, Flight]
    generations: dict[str, int]


# -- main thread -----------------------------------------------------------------------------


@dataclass(eq=False)
class TrackedOrder:
    """Main-thread state of one backtrader order and the Alpaca orders standing for it (the
    original, then any order that replaced it).

    Quantities are ``Decimal`` shares or coins, values USD.

    Attributes:
        role: ``None`` for a root, ``"take_profit"``/``"stop_loss"`` for bracket legs and for
            an OCO's stop leg.
        kind: ``"order"``, ``"bracket_leg"`` or ``"oco_leg"``.
        expires_num: backtrader day number after which this broker expires the order itself
            (Alpaca has no good-till-date).
        expiring: a cancel was sent because the order expired; Alpaca's ``canceled`` is then
            backtrader's Expired.
        oco: refs of orders canceled when this one fills or ends (backtrader ``oco=`` groups
            Alpaca could not take as one order).
        flight: ``client_order_id`` of the Alpaca family this order belongs to.
        rest: quantity still to send as a second Alpaca order once the current one filled
            (a reversal split into a closing and an opening order, see
            :func:`~runtime.brokers.alpaca.orders.split_reversal`).
        tif: the time in force sent (the opening order of a split reversal uses it too).
        retired: Alpaca ids that stood for this order and no longer count (the filled closing
            order of a split reversal): their late snapshots are ignored.
    """

    order: Any
    symbol: str
    key: str
    qty: Decimal
    coid: str | None = None
    alpaca_id: str | None = None
    role: str | None = None
    kind: str = "order"
    root: TrackedOrder | None = None
    legs: list[TrackedOrder] = field(default_factory=list)
    cum: Decimal = ZERO  # cumulative filled quantity applied
    value: Decimal = ZERO  # cum * filled_avg_price applied, USD
    base_cum: Decimal = ZERO  # filled by orders this one replaced (Alpaca restarts at 0)
    base_value: Decimal = ZERO
    status: str | None = None  # last Alpaca status applied
    updated_at: datetime | None = None
    expires_num: float | None = None
    expiring: bool = False
    oco: list[int] = field(default_factory=list)
    flight: str | None = None  # the family's coid in the FlightBook
    rest: Decimal = ZERO
    tif: str | None = None
    retired: set[str] = field(default_factory=set)

    def family(self) -> list[TrackedOrder]:
        return [self, *self.legs]


class OrderBook:
    """Index of the backtrader orders the broker follows: by backtrader ref, by
    ``client_order_id`` (family roots), by every Alpaca id that stood for them, plus the orders
    not transmitted yet (``held``: brackets and OCO pairs being built, first ref -> orders).

    Args:
        flights: the shared :class:`FlightBook`, kept in step when a family is done.

    Thread context: main (backtrader) thread only.
    """

    def __init__(self, flights: FlightBook) -> None:
        self.flights = flights
        self.by_ref: dict[int, TrackedOrder] = {}
        self.by_coid: dict[str, TrackedOrder] = {}
        self.by_id: dict[str, TrackedOrder] = {}
        self.held: dict[int, list[Any]] = {}

    def track(self, tr: TrackedOrder) -> None:
        """Index ``tr`` (a root by its ``client_order_id``, any order by its Alpaca id)."""
        self.by_ref[tr.order.ref] = tr
        if tr.root is None and tr.coid is not None:
            self.by_coid[tr.coid] = tr
        if tr.alpaca_id is not None:
            self.by_id[tr.alpaca_id] = tr

    def find(self, snap: AlpacaOrder) -> TrackedOrder | None:
        """The tracked order an Alpaca snapshot is about: by id, by ``client_order_id``, or as
        the successor of the order it ``replaces`` (then followed to it)."""
        tr = self.by_id.get(str(snap.id))
        if tr is None:
            tr = self.by_coid.get(snap.client_order_id)
        if tr is None and snap.replaces is not None:
            tr = self.by_id.get(str(snap.replaces))
            if tr is not None:
                self.follow(tr, str(snap.id))
        return tr

    def link(self, tr: TrackedOrder, alpaca_id: str) -> None:
        """``tr`` is Alpaca order ``alpaca_id`` from now on."""
        tr.alpaca_id = alpaca_id
        self.by_id[alpaca_id] = tr

    def follow(self, tr: TrackedOrder, new_id: str) -> None:
        """The Alpaca order of ``tr`` was replaced (a triggered stop leg, a ``PATCH``): the
        same backtrader order continues as ``new_id``, whose ``filled_qty`` starts again at 0."""
        if tr.alpaca_id == new_id:
            return
        logger.info(
            "order %s (%s) was replaced by %s; following the replacement",
            tr.alpaca_id,
            tr.symbol,
            new_id,
        )
        tr.base_cum, tr.base_value, tr.updated_at = tr.cum, tr.value, None
        self.link(tr, new_id)

    def alive_orders(self) -> list[Any]:
        """Backtrader orders still alive: sent, or held until their group is transmitted."""
        out = [t.order for t in self.by_ref.values() if t.order.alive()]
        out += [o for family in self.held.values() for o in family if o.alive()]
        return out

    def busy_keys(self) -> set[str]:
        """Position keys with a live order (sent or held)."""
        keys = {t.key for t in self.by_ref.values() if t.order.alive()}
        for fam in self.held.values():
            keys.update(position_key(feed_symbol(o.data)) for o in fam if o.alive())
        return keys


@dataclass
class Ledger:
    """Cash, positions and marks (last prices) as the bar loop sees them: fills change cash and
    positions together, a consistent account read replaces all of them at once, so
    ``value = cash + sum(qty * mark)`` always matches the positions of the same bar.

    Attributes:
        cash_usd: cash, USD.
        qty: position key -> exact signed quantity.
        pos: position key -> the backtrader ``Position`` agents read (same object throughout).
        marks: position key -> last price, USD (Alpaca's ``current_price`` at a read, a fill's
            price, the feed's close at each bar).
        fee_slack: position key -> crypto fee booked since the last account read, in coins:
            what Alpaca's own fee may differ by.

    Thread context: main thread only.
    """

    cash_usd: Decimal = ZERO
    qty: dict[str, Decimal] = field(default_factory=dict)
    pos: dict[str, bt.Position] = field(default_factory=dict)
    marks: dict[str, float] = field(default_factory=dict)
    fee_slack: dict[str, Decimal] = field(default_factory=dict)

    def value_usd(self) -> float:
        """``cash + sum(qty * mark)``, USD."""
        total = self.cash_usd
        for key, q in self.qty.items():
            if q:
                total += q * Decimal(repr(self.marks.get(key, 0.0)))
        return float(total)

    def position(self, key: str) -> bt.Position:
        pos = self.pos.get(key)
        if pos is None:
            pos = self.pos[key] = bt.Position()
            self.qty.setdefault(key, ZERO)
        return pos

    def set_position(self, key: str, qty: Decimal, avg_price: float) -> None:
        """Take a position as Alpaca reports it."""
        self.qty[key] = qty
        self.position(key).set(float(qty), avg_price if qty else 0.0)

    def sync(
        self,
        cash_usd: Decimal,
        positions: dict[str, tuple[Decimal, float]],
        marks: dict[str, float],
    ) -> dict[str, tuple[Decimal, Decimal]]:
        """Replace cash, positions and marks with an account read.

        Returns:
            Position key -> ``(this ledger's quantity, Alpaca's)`` where they differed.
        """
        diffs = {}
        for key in set(positions) | {k for k, v in self.qty.items() if v}:
            theirs, avg = positions.get(key, (ZERO, 0.0))
            ours = self.qty.get(key, ZERO)
            if theirs != ours:
                diffs[key] = (ours, theirs)
                self.set_position(key, theirs, avg)
        self.cash_usd = cash_usd
        self.marks.update(marks)
        self.fee_slack.clear()
        return diffs


@dataclass(frozen=True, slots=True)
class MarketClock:
    """The last Alpaca clock read.

    Attributes:
        is_open: the market was open.
        next_open, next_close: Alpaca's next open and close (aware datetimes).
        fetched_s: ``time.monotonic()`` of the read.
    """

    is_open: bool
    next_open: datetime
    next_close: datetime
    fetched_s: float

    @classmethod
    def of(cls, clock: Clock, fetched_s: float) -> MarketClock:
        return cls(clock.is_open, clock.next_open, clock.next_close, fetched_s)

    def stale(self, now: datetime, now_s: float, poll_interval_s: float) -> bool:
        """True when the answer may have changed: past ``next_open``/``next_close``, older than
        60 s, or (while closed) older than one poll interval.

        Args:
            now: the current time (aware). now_s: ``time.monotonic()``.
        """
        age = now_s - self.fetched_s
        flipped = now >= (self.next_close if self.is_open else self.next_open)
        return flipped or age > 60.0 or (not self.is_open and age >= poll_interval_s)

    def surely_closed(self, now: datetime) -> bool:
        """True when this read still proves the market closed (before its ``next_open``)."""
        return not self.is_open and now < self.next_open


@dataclass(frozen=True, slots=True)
class BrokerReport:
    """What the broker did, reported at stop (all amounts USD)."""

    endpoint: str
    live: bool
    api: str
    cash_usd: float
    value_usd: float
    positions: dict[str, float]
    orders_submitted: int
    orders_filled: int
    orders_canceled: int
    orders_rejected: int
    orders_expired: int
    open_orders_left: int
    requests: int
    retries: int
    commission_usd: float
