"""Backtrader <-> Alpaca order mapping. Pure: no I/O, no threads, no clocks read.

* :func:`to_order_request`: a backtrader order (and its bracket children) as the alpaca-py
  request (alpaca-py's own shape: a small pure function, unit-tested on its own).
* :data:`STATUS_MAP`: Alpaca order status -> backtrader status, one row per Alpaca status.
* :func:`client_order_id`: ``"<session>-<order ref>"``, so a resent submit can never create a
  second order.
* Quantities are ``Decimal`` (:func:`quantity`, :func:`to_decimal`): partial fills sum exactly.
* :func:`fill_increment`: what a snapshot adds to the fills already applied, from Alpaca's
  cumulative ``filled_qty`` and ``filled_avg_price``.
* :func:`adopted_order`: an open Alpaca order found at start as a backtrader order.
* :func:`validity`: backtrader's ``valid=`` as Alpaca's time in force plus, where Alpaca has no
  good-till-date, the moment this broker expires the order itself.
* :func:`crypto_fee`: the fee booked for a crypto fill, in the coin received.
* :func:`split_reversal`: an order that takes a position through zero as the closing quantity
  and the opening quantity Alpaca must get as two orders.

Alpaca behaviour relied on (docs.alpaca.markets, Trading API v2 "Orders", "Positions", "Crypto
Spot Trading", "Crypto Fees"): decimals are strings; crypto positions are keyed ``BTCUSD``
while crypto orders use ``BTC/USD``; crypto takes market, limit and stop-limit orders, time in
force ``gtc``/``ioc`` only, and pays its fee in the asset received; extended-hours orders are
``limit`` ``day`` orders; an OCO is an exit: a take-profit limit with a stop-loss leg; a
bracket's legs come back under ``legs`` with ``nested=true``; one order cannot close a position
and open the other side (Alpaca-API #90: 403 "insufficient qty available"); fractional equity
quantities take time in force ``day`` and simple orders only, and are never sold short (docs
"Fractional Trading", alpaca-trade-api-python #405); equity prices are cents at or above 1 USD,
4 decimals below (sub-penny rule, 422 "sub-penny increment does not fulfill minimum pricing
criteria").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, time
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any

import backtrader as bt
from alpaca.trading.enums import OrderClass, OrderSide, TimeInForce
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import Position as AlpacaPosition
from alpaca.trading.requests import (
    LimitOrderRequest,
    MarketOrderRequest,
    OrderRequest,
    StopLimitOrderRequest,
    StopLossRequest,
    StopOrderRequest,
    TakeProfitRequest,
    TrailingStopOrderRequest,
)

from core.errors import BrokerError, OrderRejectedError

QTY_QUANTUM = Decimal("0.000000001")  # Alpaca takes up to 9 decimals
ZERO = Decimal(0)
CENT = Decimal("0.01")
# backtrader stores an absolute ``valid`` as a day number (~7.4e5 today); its numeric offsets in
# days (``valid=2.5``) are left unconverted by backtrader and are far below this.
_DAYNUM_FLOOR = 1000.0

# Alpaca order status -> backtrader status. ``None``: the order keeps its backtrader state
# (still working; nothing new for the agent). One row per Alpaca status, checked by a test.
STATUS_MAP: dict[str, int | None] = {
    "pending_new": bt.Order.Submitted,
    "accepted": bt.Order.Accepted,
    "new": bt.Order.Accepted,
    "accepted_for_bidding": bt.Order.Accepted,
    "held": bt.Order.Accepted,  # a bracket leg waiting for its parent: accepted, inactive
    "partially_filled": bt.Order.Partial,
    "filled": bt.Order.Completed,
    "canceled": bt.Order.Canceled,
    "expired": bt.Order.Expired,
    "rejected": bt.Order.Rejected,
    "done_for_day": None,  # no more fills today, still working tomorrow
    "replaced": None,  # followed to the replacing order (same backtrader order)
    "pending_cancel": None,
    "pending_replace": None,
    "pending_review": None,
    "stopped": None,
    "suspended": None,
    "calculated": None,
}
TERMINAL = frozenset({"filled", "canceled", "expired", "rejected", "replaced"})

# Alpaca order type -> backtrader exectype, for adopted orders.
EXECTYPE_OF: dict[str, int] = {
    "market": bt.Order.Market,
    "limit": bt.Order.Limit,
    "stop": bt.Order.Stop,
    "stop_limit": bt.Order.StopLimit,
    "trailing_stop": bt.Order.StopTrail,
}


# -- symbols, ids, quantities, prices --------------------------------------------------------


def is_crypto(symbol: str) -> bool:
    """Alpaca crypto pairs are written with a slash (``BTC/USD``)."""
    return "/" in symbol


def position_key(symbol: str) -> str:
    """Key of a position at Alpaca: ``BTC/USD`` -> ``BTCUSD``, ``AAPL`` -> ``AAPL``."""
    return symbol.replace("/", "").upper()


def client_order_id(session_id: str, ref: int) -> str:
    """Deterministic ``client_order_id`` of backtrader order ``ref`` in ``session_id``.

    Alpaca refuses a second order with the same id, so resending a request after a timeout can
    never create a duplicate. At most 128 characters (Alpaca's limit).

    Raises:
        ValueError: the id would be longer than 128 characters (session id too long).
    """
    coid = f"{session_id}-{ref}"
    if len(coid) > 128:
        raise ValueError(
            f"client_order_id longer than 128 characters: session id too long "
            f"({len(session_id)} characters)"
        )
    return coid


def to_decimal(value: Any) -> Decimal:
    """An Alpaca decimal (string, float or None) as ``Decimal`` (None -> 0).

    Raises:
        BrokerError: ``value`` is not a number.
    """
    if value is None or value == "":
        return ZERO
    try:
        return Decimal(str(value))
    except InvalidOperation as e:
        raise BrokerError(f"Alpaca sent a malformed number {value!r}") from e


def quantity(size: float) -> Decimal:
    """A backtrader size as an Alpaca quantity: absolute, 9 decimals, from its shortest repr
    (``0.1`` stays ``0.1``, not ``0.1000000000000000055``)."""
    return Decimal(repr(abs(float(size)))).quantize(QTY_QUANTUM, rounding=ROUND_HALF_EVEN)


def price_for(symbol: str, price: float, rounding: str = ROUND_HALF_EVEN) -> float:
    """Round a price to an increment Alpaca accepts: equities at or above 1 USD to cents,
    below 1 USD to 4 decimals (sub-penny rule); crypto to 9 decimals.

    Args:
        rounding: a :mod:`decimal` rounding mode (nearest by default; :func:`limit_price_for`
            and :func:`stop_price_for` choose the direction that never works against the
            agent).
    """
    if is_crypto(symbol):
        return float(Decimal(repr(price)).quantize(QTY_QUANTUM, rounding=rounding))
    tick = CENT if price >= 1.0 else Decimal("0.0001")
    return float(Decimal(repr(price)).quantize(tick, rounding=rounding))


def limit_price_for(symbol: str, price: float, buy: bool) -> float:
    """A limit price on Alpaca's increments that is never worse than asked: a buy limit
    rounds down (never pays more), a sell limit up (never sells for less)."""
    return price_for(symbol, price, ROUND_FLOOR if buy else ROUND_CEILING)


def stop_price_for(symbol: str, price: float, buy: bool) -> float:
    """A stop price on Alpaca's increments that never triggers earlier than asked: a buy stop
    (triggers at or above) rounds up, a sell stop (at or below) down."""
    return price_for(symbol, price, ROUND_CEILING if buy else ROUND_FLOOR)


class FractionalCommInfo(bt.CommInfoBase):  # type: ignore[misc]
    """Commission info for symbols traded in fractions (crypto): ``getsize`` returns the
    exact fractional size a cash amount buys, so ``order_target_percent``/``_value`` and the
    sizers place fractional orders (backtrader's default rounds down to whole units, which is
    0 for one BTC at 50,000 USD). backtrader's documented way: subclass ``CommInfoBase`` and
    override ``getsize`` (backtrader.com, "Fractional Sizes", 2019-08-29). No commission here:
    Alpaca's crypto fee is booked by the broker from each fill."""

    params = (("stocklike", True), ("commtype", bt.CommInfoBase.COMM_PERC), ("percabs", True))

    def getsize(self, price: float, cash: float) -> float:
        """Size that ``cash`` USD buys at ``price`` USD, fractional (times ``leverage``)."""
        return float(self.p.leverage * (cash / price)) if price else 0.0


def default_time_in_force(symbol: str) -> str:
    """``gtc`` for crypto (Alpaca takes gtc or ioc there), ``day`` for equities."""
    return "gtc" if is_crypto(symbol) else "day"


def bt_time(dt: datetime | None, now: datetime) -> float:
    """An Alpaca timestamp as backtrader's naive-UTC float date; ``now`` when Alpaca sent none."""
    when = (dt or now).astimezone(UTC).replace(tzinfo=None)
    return float(bt.date2num(when))


# -- backtrader order -> Alpaca request ------------------------------------------------------


def validity(order: Any, symbol: str, bar_num: float) -> tuple[str | None, float | None]:
    """Backtrader's ``valid=`` as Alpaca's time in force (pure).

    Alpaca has ``day`` and ``gtc`` but no good-till-date, so a later expiry is sent ``gtc`` and
    expired by the broker itself when a bar passes it (backtrader's own rule: bar time >
    ``valid``).

    Args:
        order: the backtrader order (``order.valid``: ``None``, ``0``/``Order.DAY`` for today,
            an absolute day number, or a number of days backtrader left unconverted).
        symbol: Alpaca symbol (crypto has no ``day``).
        bar_num: the current bar's backtrader day number.

    Returns:
        ``(time in force or None for the default, expiry day number or None)``.
    """
    valid = getattr(order, "valid", None)
    if valid is None:
        return None, None
    valid = float(valid)
    today = bt.num2date(bar_num).date()
    if valid == 0.0:  # Order.DAY as a number: until the end of this session
        day_end = float(bt.date2num(datetime.combine(today, time(23, 59, 59))))
        return ("gtc", day_end) if is_crypto(symbol) else ("day", None)
    expiry = valid if valid >= _DAYNUM_FLOOR else bar_num + valid
    if not is_crypto(symbol) and bt.num2date(expiry).date() <= today:
        return "day", expiry  # Order.DAY (backtrader stores today 23:59:59.9999) or earlier
    return "gtc", expiry


def crypto_fee(buy: bool, size: Decimal, price_usd: float, bps: float) -> tuple[Decimal, Decimal]:
    """The fee booked for a crypto fill: Alpaca charges it on the asset received (a buy pays
    in the coin, a sell in USD; docs "Crypto Fees").

    Rounded up (coins to 1e-9, USD to the cent) so a position is never overstated.

    Returns:
        ``(fee in coins, fee in USD)``; a buy's USD figure is the coins at ``price_usd``.
    """
    rate = Decimal(repr(float(bps))) / 10_000
    price = Decimal(repr(float(price_usd)))
    if buy:
        coins = (size * rate).quantize(QTY_QUANTUM, rounding=ROUND_CEILING)
        return coins, coins * price
    return ZERO, (size * price * rate).quantize(CENT, rounding=ROUND_CEILING)


def split_reversal(position: Decimal, buy: bool, qty: Decimal) -> tuple[Decimal, Decimal]:
    """Split an order that would take a position through zero (pure).

    Alpaca refuses one order that closes a position and opens the other side (403
    "insufficient qty available for order"; maintainers in Alpaca-API #90 and
    alpaca-trade-api-python #129): it must be a closing order, then an opening order.

    Args:
        position: the signed position (shares or coins; < 0 short).
        buy: the order's side.
        qty: the order's unsigned quantity (> 0).

    Returns:
        ``(closing quantity, opening quantity)``: ``(qty, 0)`` when the order does not cross
        zero (it only adds, only reduces, or exactly closes), else ``(|position|, qty -
        |position|)``; the two always sum to ``qty``.
    """
    closing = -position if buy else position  # > 0: this side reduces the position
    if closing <= 0 or qty <= closing:
        return qty, ZERO
    return closing, qty - closing


def is_fractional(qty: Decimal) -> bool:
    """A quantity with a fraction of a share."""
    return qty != qty.to_integral_value()


def to_order_request(
    order: Any,
    symbol: str,
    *,
    client_order_id: str | None = None,
    time_in_force: str | None = None,
    children: Sequence[Any] = (),
    oco_stop: Any = None,
    qty: Decimal | None = None,
) -> OrderRequest:
    """Build the alpaca-py request for a backtrader order (pure; no I/O).

    Args:
        order: the backtrader order (the parent, for a bracket).
        symbol: Alpaca symbol, e.g. ``AAPL`` or ``BTC/USD``.
        client_order_id: the deterministic id (see :func:`client_order_id`).
        time_in_force: run-wide override; ``order.info["time_in_force"]`` (``buy(...,
            time_in_force="ioc")``) wins over it; default per asset class
            (:func:`default_time_in_force`).
        children: the bracket children (``buy_bracket``'s stop and limit orders): both ->
            ``order_class=bracket``, one -> ``oto``.
        oco_stop: the stop/stop-limit order paired with ``order`` (a limit: the take profit)
            through ``oco=``: both as one ``order_class=oco`` exit.
        qty: the quantity to send instead of the order's size (one part of a split
            reversal, :func:`split_reversal`).

    Returns:
        A Market/Limit/Stop/StopLimit/TrailingStop ``OrderRequest``. Quantity is the absolute
        size (fractions allowed); side from ``order.isbuy()``; prices rounded by
        :func:`price_for`; backtrader's ``trailpercent`` (a fraction) becomes Alpaca's
        ``trail_percent`` (percent); ``Order.Close`` is a market order with ``cls``.

    Raises:
        OrderRejectedError: an order type Alpaca does not have (StopTrailLimit, Historical), a
            crypto order Alpaca refuses (stop, trailing stop, bracket; time in force other than
            gtc/ioc), an extended-hours order that is not a limit day order, a bracket child
            that is not a limit (take profit) or stop/stop-limit (stop loss), an OCO pair that
            is not a limit and a stop, a size of zero, or a fractional equity quantity in an
            order Alpaca takes only in whole shares (time in force other than day, bracket, OTO,
            OCO, trailing stop), a bracket/OTO whose time in force is not day or gtc, or an
            ``opg``/``cls`` order that is not a market or limit order.
    """
    crypto = is_crypto(symbol)
    info = getattr(order, "info", None) or {}
    tif = str(info.get("time_in_force") or time_in_force or default_time_in_force(symbol))
    if order.exectype == bt.Order.Close:
        if crypto:
            raise OrderRejectedError(f"{symbol}: market-on-close orders are for equities only")
        tif = "cls"
    if crypto and tif not in ("gtc", "ioc"):
        raise OrderRejectedError(
            f"{symbol}: crypto orders take time in force gtc or ioc, not {tif!r}"
        )
    if crypto and order.exectype in (bt.Order.Stop, bt.Order.StopTrail):
        raise OrderRejectedError(
            f"{symbol}: Alpaca takes market, limit and stop-limit crypto orders, not "
            f"{bt.Order.ExecTypes[order.exectype]}"
        )
    if crypto and (children or oco_stop is not None):
        raise OrderRejectedError(f"{symbol}: Alpaca has no bracket, OTO or OCO crypto orders")
    if children and tif not in ("day", "gtc"):
        # docs "Orders at Alpaca", bracket orders: time in force day or gtc
        raise OrderRejectedError(
            f"{symbol}: bracket and OTO orders take time in force day or gtc, not {tif!r}"
        )
    if tif in ("opg", "cls") and order.exectype not in (
        bt.Order.Market,
        bt.Order.Limit,
        bt.Order.Close,
    ):
        # docs "Orders at Alpaca", time in force: opg and cls are market/limit on open/close
        # only (helper-75: a stop with opg went out and Alpaca refuses it with 422)
        raise OrderRejectedError(
            f"{symbol}: {tif} (auction) orders must be market or limit orders, not "
            f"{bt.Order.ExecTypes[order.exectype]}"
        )
    if info.get("extended_hours") and (order.exectype != bt.Order.Limit or tif != "day"):
        raise OrderRejectedError(
            f"{symbol}: extended-hours orders must be limit orders with time in force day"
        )
    if qty is None:
        qty = quantity(order.created.size)
    if qty <= 0:
        raise OrderRejectedError(f"{symbol}: order size {order.created.size} rounds to zero")
    if not crypto and is_fractional(qty):
        # docs "Fractional Trading": day orders, simple orders (no trailing stop)
        if tif != "day":
            raise OrderRejectedError(
                f"{symbol}: fractional quantity {qty} needs time in force day, not {tif!r}"
            )
        if children or oco_stop is not None or order.exectype == bt.Order.StopTrail:
            raise OrderRejectedError(
                f"{symbol}: fractional quantity {qty} is for simple market, limit, stop and "
                "stop-limit orders only"
            )
    common: dict[str, Any] = {
        "symbol": symbol,
        "qty": float(qty),
        "side": OrderSide.BUY if order.isbuy() else OrderSide.SELL,
        "time_in_force": TimeInForce(tif),
        "client_order_id": client_order_id,
    }
    if info.get("extended_hours"):
        common["extended_hours"] = True
    if children:
        common.update(_bracket_fields(children, symbol, order))
    if oco_stop is not None:
        return _oco_request(order, oco_stop, symbol, common)
    ex = order.exectype
    price = float(order.created.price or 0.0)
    buy = bool(order.isbuy())
    if ex in (bt.Order.Market, bt.Order.Close):
        return MarketOrderRequest(**common)
    if ex == bt.Order.Limit:
        return LimitOrderRequest(limit_price=limit_price_for(symbol, price, buy), **common)
    if ex == bt.Order.Stop:
        return StopOrderRequest(stop_price=stop_price_for(symbol, price, buy), **common)
    if ex == bt.Order.StopLimit:
        return StopLimitOrderRequest(
            stop_price=stop_price_for(symbol, price, buy),
            limit_price=limit_price_for(symbol, float(order.created.pricelimit), buy),
            **common,
        )
    if ex == bt.Order.StopTrail:
        if order.trailamount:
            return TrailingStopOrderRequest(
                trail_price=price_for(symbol, order.trailamount), **common
            )
        if order.trailpercent:
            return TrailingStopOrderRequest(
                trail_percent=round(order.trailpercent * 100.0, 4), **common
            )
        raise OrderRejectedError(f"{symbol}: trailing stop needs trailamount or trailpercent")
    raise OrderRejectedError(f"{symbol}: Alpaca has no {bt.Order.ExecTypes[ex]} order type")


def _oco_request(take: Any, stop: Any, symbol: str, common: dict[str, Any]) -> OrderRequest:
    if take.exectype != bt.Order.Limit or stop.exectype not in (bt.Order.Stop, bt.Order.StopLimit):
        raise OrderRejectedError(
            f"{symbol}: an OCO pair is a limit (take profit) and a stop or stop-limit "
            f"(stop loss), got {bt.Order.ExecTypes[take.exectype]} and "
            f"{bt.Order.ExecTypes[stop.exectype]}"
        )
    if take.isbuy() != stop.isbuy() or quantity(take.created.size) != quantity(stop.created.size):
        raise OrderRejectedError(f"{symbol}: an OCO pair must have the same side and size")
    buy = bool(stop.isbuy())
    stop_loss = StopLossRequest(
        stop_price=stop_price_for(symbol, float(stop.created.price), buy),
        limit_price=limit_price_for(symbol, float(stop.created.pricelimit), buy)
        if stop.exectype == bt.Order.StopLimit
        else None,
    )
    return LimitOrderRequest(
        order_class=OrderClass.OCO,
        take_profit=TakeProfitRequest(
            limit_price=limit_price_for(symbol, float(take.created.price), buy)
        ),
        stop_loss=stop_loss,
        **common,
    )


def _bracket_stop(symbol: str, child: Any, entry: Any) -> float:
    """The stop price of a bracket's stop leg on Alpaca's increments: rounded so it never
    triggers earlier than asked, but never onto (or past) the entry's own limit price, which
    Alpaca refuses (the stop must be below a buy bracket's base price): then one tick away."""
    buy = bool(child.isbuy())
    stop = stop_price_for(symbol, float(child.created.price), buy)
    if entry.exectype != bt.Order.Limit or not entry.created.price:
        return stop
    base = limit_price_for(symbol, float(entry.created.price), bool(entry.isbuy()))
    if (buy and stop <= base) or (not buy and stop >= base):
        tick = 0.01 if base >= 1.0 else 0.0001
        stop = price_for(symbol, base + tick if buy else base - tick)
    return stop


def _bracket_fields(children: Sequence[Any], symbol: str, entry: Any) -> dict[str, Any]:
    take = stop = None
    for child in children:
        buy = bool(child.isbuy())
        if child.exectype == bt.Order.Limit:
            take = TakeProfitRequest(
                limit_price=limit_price_for(symbol, float(child.created.price), buy)
            )
        elif child.exectype == bt.Order.Stop:
            stop = StopLossRequest(stop_price=_bracket_stop(symbol, child, entry))
        elif child.exectype == bt.Order.StopLimit:
            stop = StopLossRequest(
                stop_price=_bracket_stop(symbol, child, entry),
                limit_price=limit_price_for(symbol, float(child.created.pricelimit), buy),
            )
        else:
            raise OrderRejectedError(
                f"{symbol}: a bracket exit must be a limit (take profit) or a stop/stop-limit "
                f"(stop loss), got {bt.Order.ExecTypes[child.exectype]}"
            )
    out: dict[str, Any] = {"order_class": OrderClass.BRACKET if take and stop else OrderClass.OTO}
    if take:
        out["take_profit"] = take
    if stop:
        out["stop_loss"] = stop
    return out


# -- Alpaca order -> backtrader ---------------------------------------------------------------


def alpaca_status(o: AlpacaOrder) -> str:
    """The order's status as Alpaca's lower-case text (``"partially_filled"``)."""
    return str(getattr(o.status, "value", o.status))


def leg_role(order_type: Any) -> str:
    """Role of an Alpaca bracket leg from its order type: a limit takes profit, the rest stop
    losses."""
    value = getattr(order_type, "value", order_type)
    return "take_profit" if value == "limit" else "stop_loss"


def child_role(order: Any) -> str:
    """Role of a backtrader bracket child (the same rule as :func:`leg_role`)."""
    return "take_profit" if order.exectype == bt.Order.Limit else "stop_loss"


@dataclass(frozen=True, slots=True)
class FillIncrement:
    """What one Alpaca snapshot adds to the fills already applied to a backtrader order.

    Attributes:
        size: quantity newly filled (> 0, unsigned).
        price_usd: average price of that quantity.
        cum: cumulative filled quantity after it.
        value_usd: cumulative filled notional after it.
    """

    size: Decimal
    price_usd: float
    cum: Decimal
    value_usd: Decimal


def fill_increment(
    *,
    applied_cum: Decimal,
    applied_value_usd: Decimal,
    base_cum: Decimal,
    base_value_usd: Decimal,
    filled_qty: Decimal,
    filled_avg_price: Decimal,
) -> FillIncrement | None:
    """The new fill in a snapshot of Alpaca's cumulative ``filled_qty``/``filled_avg_price``.

    The increment is ``cum - applied_cum`` and its price
    ``(cum * avg - prev_cum * prev_avg) / increment``, so partial fills sum exactly and repeated
    or stale snapshots add nothing.

    Args:
        applied_cum, applied_value_usd: what was applied so far (quantity, notional USD).
        base_cum, base_value_usd: filled by the orders this one replaced (Alpaca restarts
            ``filled_qty`` at 0 on the replacement).
        filled_qty, filled_avg_price: the snapshot's cumulative fill and its average price.

    Returns:
        The increment, or ``None`` when the snapshot fills nothing new.
    """
    cum = base_cum + filled_qty
    if cum <= applied_cum:
        return None
    value = base_value_usd + filled_qty * filled_avg_price
    size = cum - applied_cum
    return FillIncrement(size, float((value - applied_value_usd) / size), cum, value)


def positions_of(rows: Iterable[AlpacaPosition]) -> dict[str, tuple[Decimal, float]]:
    """Alpaca positions as ``position key -> (signed quantity, average entry price USD)``."""
    out = {}
    for p in rows:
        qty = abs(to_decimal(p.qty))
        side = str(getattr(p.side, "value", p.side))
        out[position_key(p.symbol)] = (
            -qty if side == "short" else qty,
            float(to_decimal(p.avg_entry_price)),
        )
    return out


def adopted_order(snap: AlpacaOrder, data: Any, parent: Any = None) -> Any:
    """A backtrader order standing for an open Alpaca order found at start (policy ``adopt``).

    Args:
        snap: the Alpaca order (or bracket leg).
        data: the feed of its symbol.
        parent: the backtrader order of the bracket's entry, for a leg.

    Returns:
        A ``BuyOrder``/``SellOrder`` of the Alpaca quantity, type and prices, with
        ``info["adopted"] = True`` and ``info["alpaca_id"]``; still ``Created`` (the broker
        submits and accepts it).
    """
    buy = snap.side == OrderSide.BUY
    cls = bt.BuyOrder if buy else bt.SellOrder
    typ = str(getattr(snap.type, "value", snap.type))
    price: Any = snap.stop_price if typ in ("stop", "stop_limit") else snap.limit_price
    trail: dict[str, float] = {}
    if typ == "trailing_stop":
        trail, price = _adopted_trail(snap, buy, data)
    order = cls(
        owner=None,
        data=data,
        size=float(to_decimal(snap.qty)),
        price=float(to_decimal(price)) if price is not None else None,
        pricelimit=float(to_decimal(snap.limit_price)) if typ == "stop_limit" else None,
        exectype=EXECTYPE_OF.get(typ, bt.Order.Market),
        parent=parent,
        simulated=True,
        **trail,
    )
    order.p.simulated = False  # built without reading the feed; notified like any order
    order.addinfo(adopted=True, alpaca_id=str(snap.id))
    return order


def _adopted_trail(snap: AlpacaOrder, buy: bool, data: Any) -> tuple[dict[str, float], Decimal]:
    """A trailing stop's backtrader terms: ``trailamount`` (Alpaca's ``trail_price``, USD) or
    ``trailpercent`` (``trail_percent`` / 100: backtrader's is a fraction), and the reference
    price backtrader trails from, so that its stop equals Alpaca's ``stop_price``: Alpaca's
    ``hwm`` (the highest price since a sell stop went live, the lowest for a buy; docs "Orders
    at Alpaca", trailing stop orders), else one derived from ``stop_price``, else the feed's
    close (as backtrader's own trailing stops start). Without this the order was built
    without a price or a trail, and backtrader's ``Order.__init__`` raised ``TypeError`` out
    of the first bar (fresh-context attack)."""
    amount = to_decimal(snap.trail_price) if snap.trail_price is not None else None
    percent = to_decimal(snap.trail_percent) / 100 if snap.trail_percent is not None else None
    trail: dict[str, float] = {}
    if amount:
        trail["trailamount"] = float(amount)
    elif percent:
        trail["trailpercent"] = float(percent)
    if snap.hwm is not None:
        return trail, to_decimal(snap.hwm)
    stop = to_decimal(snap.stop_price) if snap.stop_price is not None else None
    if stop is not None and amount:
        return trail, stop - amount if buy else stop + amount
    if stop is not None and percent and percent < 1:
        return trail, stop / (1 + percent) if buy else stop / (1 - percent)
    return trail, Decimal(repr(float(data.close[0])))
