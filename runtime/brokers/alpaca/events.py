"""What the broker and its worker threads tell each other, over two thread-safe queues.

Commands, main thread -> ``alpaca-orders`` thread: :class:`SubmitOrder`, :class:`CancelOrder`,
:data:`SHUTDOWN`.

Events, worker threads -> main thread (applied by ``AlpacaPaperTradingBroker.next()``, the only
place backtrader objects are touched): :class:`AlpacaOrderUpdate`, :class:`SubmitRejected`,
:class:`NotSent`, :class:`ReplacementLost`, :class:`AccountState`, :class:`WorkerFailed`.

Every message is immutable; Alpaca models inside are never changed after they are queued.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.requests import OrderRequest

# -- commands ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitOrder:
    """Send ``request`` (its ``client_order_id`` is ``coid``).

    Attributes:
        symbol: Alpaca symbol.
        extended_hours: the order may trade outside regular hours (never held for the open).
        after: families whose cancels must settle first (their shares are reserved until
            then); the submit then retries Alpaca's 403 "insufficient qty available" a few times
            while a cancel is still pending.
        reduce_only: the order was meant to reduce or close a position (a flatten order, or
            an order that only reduced the position when created and was held behind
            cancels). Right before it is sent the orders thread reads Alpaca's position and
            sends at most the position in the reducing direction; when the position is flat
            or on the other side already, nothing is sent (:class:`NotSent`, ``resized``).
        closes: with ``reduce_only``, a crypto order closing the whole position as this run
            knows it: sent for Alpaca's whole position when that is at most 1% larger (the
            fee Alpaca took in the coin differs from the estimate, e.g. a maker fee), so no
            dust below Alpaca's minimum order size is left behind.
    """

    coid: str
    request: OrderRequest
    symbol: str
    extended_hours: bool = False
    after: frozenset[str] = frozenset()
    reduce_only: bool = False
    closes: bool = False  # a crypto order that closes the whole position as this run knows it


@dataclass(frozen=True, slots=True)
class CancelOrder:
    """Cancel an order family: by Alpaca id when known, else looked up by ``coid``."""

    coid: str | None
    alpaca_id: str | None


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The orders thread stops after this: orders not yet sent are reported :class:`NotSent`."""


SHUTDOWN = Shutdown()
Command = SubmitOrder | CancelOrder | Shutdown


# -- events ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AlpacaOrderUpdate:
    """A snapshot of an Alpaca order (with its bracket legs), from a submit answer, a poll, a
    lookup or the trade-updates stream. The broker turns new fills and statuses into
    ``notify_order``."""

    order: AlpacaOrder
    source: Literal["submit", "poll", "lookup", "stream"]
    fill_qty: Decimal | None = None  # a stream fill/partial_fill: this execution's quantity
    fill_price_usd: Decimal | None = None  # ... and its own price (not a rounded average)


@dataclass(frozen=True, slots=True)
class SubmitRejected:
    """Alpaca refused the submit of ``coid`` (or has no such order after a lost answer)."""

    coid: str
    reason: str


@dataclass(frozen=True, slots=True)
class NotSent:
    """The order ``coid`` was never sent (cancelled while waiting for the open, or stopping,
    or a reduce-only order whose position was already flat or reversed)."""

    coid: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReplacementLost:
    """Alpaca order ``alpaca_id`` of family ``coid`` was replaced and its successor could not be
    found: the backtrader order it stood for ends (the account read then sets the position)."""

    coid: str
    alpaca_id: str


@dataclass(frozen=True, slots=True)
class AccountState:
    """An account + positions read.

    Attributes:
        cash_usd, equity_usd: from the account.
        positions: position key -> (signed quantity, average entry price USD).
        marks: position key -> Alpaca's current price, USD.
        consistent: no followed order filled, and no order was sent, while it was read (the
            fill markers before and after the read were equal).
        checked_keys: position keys whose every family was looked up just before the read
            (a difference there is not a fill still to be seen).
    """

    cash_usd: Decimal
    equity_usd: float
    positions: dict[str, tuple[Decimal, float]]
    marks: dict[str, float]
    consistent: bool
    checked_keys: frozenset[str]


@dataclass(frozen=True, slots=True)
class WorkerFailed:
    """A worker thread gave up (e.g. Alpaca unreachable for many polls); the next bar raises."""

    error: BaseException


Event = AlpacaOrderUpdate | SubmitRejected | NotSent | ReplacementLost | AccountState | WorkerFailed
