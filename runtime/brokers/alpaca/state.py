"""Bookkeeping of the Alpaca broker: which backtrader order is which Alpaca order.

* :class:`FlightBook`: the order families in flight, shared by the main thread and the worker
  threads (one lock, every access through its methods).
* :class:`TrackedOrder` and :class:`OrderBook`: the main thread's link from each backtrader order
  to its Alpaca order and the fills already applied to it.
* :class:`MarketClock`: the last Alpaca clock read. :class:`BrokerReport`: what the broker did.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from alpaca.trading.models import Clock
from alpaca.trading.models import Order as AlpacaOrder

from runtime.brokers.alpaca.orders import ZERO

logger = logging.getLogger(__name__)


# -- shared with the worker threads ------------------------------------------------------------


@dataclass(eq=False)
class Flight:
    """What the worker threads know about one submitted order family.

    Attributes:
        coid: the family's ``client_order_id``.
        symbol: Alpaca symbol.
        alpaca_id: Alpaca's id of the entry order once known (its successor after a replace).
        submit_done: the submit was answered or judged failed (until then the monitor leaves
            the family alone).
    """

    coid: str
    symbol: str
    alpaca_id: str | None = None
    submit_done: bool = False


class FlightBook:
    """The order families the worker threads follow, and per-symbol order generations.

    A generation counts the orders sent on a symbol: an account read that started before the
    latest one may predate its fills, so that symbol's position is not reconciled from it.

    Thread context: any thread; every method takes the lock; what it returns are copies.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, Flight] = {}
        self._generation: dict[str, int] = {}

    def __len__(self) -> int:
        with self._lock:
            return len(self._flights)

    def add_sent(self, coid: str, symbol: str, key: str) -> None:
        """A family about to be sent (main thread); bumps the generation of ``key``."""
        with self._lock:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._flights[coid] = Flight(coid=coid, symbol=symbol)

    def add_adopted(self, coid: str, symbol: str, alpaca_id: str) -> None:
        """A family found open at start and adopted (already at Alpaca)."""
        with self._lock:
            self._flights[coid] = Flight(
                coid=coid, symbol=symbol, alpaca_id=alpaca_id, submit_done=True
            )

    def mark_sent(self, coid: str, alpaca_id: str | None) -> None:
        """The submit of ``coid`` is over (orders thread); ``alpaca_id`` when it landed."""
        with self._lock:
            fl = self._flights.get(coid)
            if fl is not None:
                fl.submit_done = True
                if alpaca_id is not None:
                    fl.alpaca_id = alpaca_id

    def link(self, coid: str, alpaca_id: str) -> None:
        """Follow Alpaca order ``alpaca_id`` for ``coid`` (main thread, on its first snapshot)."""
        with self._lock:
            fl = self._flights.get(coid)
            if fl is not None:
                fl.alpaca_id = alpaca_id

    def follow_replacement(self, coid: str, old_id: str | None, new_id: str) -> None:
        """Follow ``new_id`` for ``coid`` if it still follows ``old_id`` (the monitor saw
        ``old_id`` replaced by ``new_id``)."""
        with self._lock:
            fl = self._flights.get(coid)
            if fl is not None and fl.alpaca_id == old_id:
                fl.alpaca_id = new_id

    def alpaca_id(self, coid: str) -> str | None:
        with self._lock:
            fl = self._flights.get(coid)
            return fl.alpaca_id if fl is not None else None

    def remove(self, coid: str) -> None:
        """Stop following ``coid`` (its whole family is done)."""
        with self._lock:
            self._flights.pop(coid, None)

    def snapshot(self) -> FlightsSnapshot:
        """Copies of every flight and of the generations, taken together."""
        with self._lock:
            return FlightsSnapshot(
                flights={c: dataclasses.replace(f) for c, f in self._flights.items()},
                generations=dict(self._generation),
            )

    def generations(self) -> dict[str, int]:
        """A copy of the per-symbol generations."""
        with self._lock:
            return dict(self._generation)


@dataclass(frozen=True, slots=True)
class FlightsSnapshot:
    """What :meth:`FlightBook.snapshot` returns: flights by ``coid``, generations by position
    key."""

    flights: dict[str, Flight]
    generations: dict[str, int]


# -- main thread -----------------------------------------------------------------------------


@dataclass(eq=False)
class TrackedOrder:
    """Main-thread state of one backtrader order linked to one Alpaca order.

    Quantities are ``Decimal`` shares or coins, values USD.
    """

    order: Any
    symbol: str
    key: str
    qty: Decimal
    coid: str | None = None
    alpaca_id: str | None = None
    role: str | None = None  # None for a root, "take_profit"/"stop_loss" for bracket legs
    root: TrackedOrder | None = None
    legs: list[TrackedOrder] = field(default_factory=list)
    cum: Decimal = ZERO  # cumulative filled quantity applied
    value: Decimal = ZERO  # cum * filled_avg_price applied, USD
    base_cum: Decimal = ZERO  # filled by orders this one replaced (Alpaca restarts at 0)
    base_value: Decimal = ZERO
    status: str | None = None  # last Alpaca status applied
    updated_at: datetime | None = None

    def family(self) -> list[TrackedOrder]:
        return [self, *self.legs]


class OrderBook:
    """Index of the backtrader orders the broker follows: by backtrader ref, by
    ``client_order_id`` (family roots), by Alpaca id, plus the bracket orders not transmitted
    yet (``held``, parent ref -> orders).

    Args:
        flights: the shared :class:`FlightBook`, kept in step when a root's Alpaca id changes or
            its family is done.

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
        """The tracked order an Alpaca snapshot is about (by id, ``client_order_id``, or the
        order it replaced, which is then followed to it)."""
        tr = self.by_id.get(str(snap.id))
        if tr is None:
            tr = self.by_coid.get(snap.client_order_id)
        if tr is None and snap.replaces is not None:
            tr = self.by_id.get(str(snap.replaces))
            if tr is not None and tr.alpaca_id == str(snap.replaces):
                self.follow(tr, str(snap.id))
        return tr

    def link(self, tr: TrackedOrder, alpaca_id: str) -> None:
        """``tr`` is Alpaca order ``alpaca_id`` from now on."""
        tr.alpaca_id = alpaca_id
        self.by_id[alpaca_id] = tr
        if tr.root is None and tr.coid is not None:
            self.flights.link(tr.coid, alpaca_id)

    def follow(self, tr: TrackedOrder, new_id: str) -> None:
        """The Alpaca order of ``tr`` was replaced (``PATCH``, outside this run): the same
        backtrader order continues as ``new_id``, whose ``filled_qty`` starts again at 0."""
        if tr.alpaca_id == new_id:
            return
        logger.warning(
            "order %s (%s) was replaced by %s; following the replacement",
            tr.alpaca_id,
            tr.symbol,
            new_id,
        )
        tr.base_cum, tr.base_value, tr.updated_at = tr.cum, tr.value, None
        self.link(tr, new_id)

    def forget_if_done(self, root: TrackedOrder) -> None:
        """Stop following a family once every order of it is done."""
        if any(t.order.alive() for t in root.family()):
            return
        if root.coid is not None:
            self.flights.remove(root.coid)

    def alive_orders(self) -> list[Any]:
        """Backtrader orders still alive: sent, or held until their bracket is transmitted."""
        out = [t.order for t in self.by_ref.values() if t.order.alive()]
        out += [o for family in self.held.values() for o in family if o.alive()]
        return out


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


@dataclass(frozen=True, slots=True)
class BrokerReport:
    """What the broker did, reported at stop (all amounts USD)."""

    endpoint: str
    live: bool
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
