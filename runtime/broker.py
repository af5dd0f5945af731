"""Alpaca broker for backtrader on ``alpaca-py``: AlpacaBrokerConfig + AlpacaPaperTradingBroker.

Agents trade through the ordinary backtrader calls (``buy``/``sell``/``close``/``cancel``/
``buy_bracket``/``sell_bracket``); this broker turns them into Alpaca orders and Alpaca's answers
back into backtrader notifications.

Threads (each owned here, stopped and joined by :meth:`AlpacaPaperTradingBroker.stop`):

* main (backtrader) thread: ``buy``/``sell``/``cancel`` build the order, run the risk guard,
  notify ``Submitted`` and enqueue a command; ``next()`` drains the event queue and applies every
  Alpaca order snapshot to the backtrader orders, positions and cash. Backtrader objects are
  touched only here.
* ``alpaca-orders``: sends submits and cancels (HTTP), holds equity orders until the market is
  open (Alpaca clock), puts the answers on the event queue.
* ``alpaca-monitor``: every ``poll_interval_s`` one ``GET /v2/orders?status=open&nested=true``
  for all open orders (Alpaca allows ~200 requests/min), one lookup per order that left the open
  list, and an account + positions refresh after fills and every ``refresh_interval_s``.
* ``alpaca-stream`` (``use_stream``): the trade-updates websocket, polling stays the fallback.

Correctness rules (the bugs users hit with the deprecated bridges):

* ``client_order_id = "<session>-<order ref>"``: a retried submit can never create a second
  order; a retry answered ``client_order_id must be unique`` adopts the order that did land.
* Fills are increments of Alpaca's cumulative ``filled_qty`` in ``Decimal`` (partial fills sum
  exactly, repeated or stale snapshots add nothing); the increment's price comes from the
  cumulative ``filled_avg_price``: ``(cum * avg - prev_cum * prev_avg) / increment``.
* Statuses map one to one (:data:`STATUS_MAP`): ``canceled`` is Canceled, never Rejected;
  ``expired`` is Expired; ``replaced`` follows the replacing order; bracket legs are ``held``
  (Accepted, inactive) until the parent fills.
* Every notification is queued on the main thread, in order, exactly once
  (``get_notification``).
* 429, 5xx, timeouts and connection errors are retried with capped exponential backoff and
  equal jitter; a 4xx on submit is a Rejected order whose ``info["reason"]`` carries Alpaca's
  message (FMEL records it); a failure to read the account raises :class:`BrokerError`.

Alpaca behaviour relied on (docs.alpaca.markets, Trading API v2 "Orders", "Account",
"Positions", "Clock", "Websocket streaming"): decimals are strings; crypto positions are keyed
``BTCUSD`` while crypto orders use ``BTC/USD``; crypto allows ``gtc``/``ioc`` only; a bracket's
legs come back under ``legs`` with ``nested=true``; error bodies are ``{"code", "message"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, TypeVar, cast

import backtrader as bt
import requests
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderClass, OrderSide, QueryOrderStatus, TimeInForce
from alpaca.trading.models import Clock, TradeAccount, TradeUpdate
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import Position as AlpacaPosition
from alpaca.trading.requests import (
    GetOrderByIdRequest,
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    OrderRequest,
    StopLimitOrderRequest,
    StopLossRequest,
    StopOrderRequest,
    TakeProfitRequest,
    TrailingStopOrderRequest,
)

from core.bars import feed_symbol
from core.errors import BrokerError, OrderRejectedError, TransientError
from runtime.config import AlpacaBrokerConfig, RiskConfig
from runtime.risk import RiskGuard

logger = logging.getLogger(__name__)

T = TypeVar("T")

PAPER_URL = "https://paper-api.alpaca.markets"
LIVE_URL = "https://api.alpaca.markets"
PAPER_STREAM_URL = "wss://paper-api.alpaca.markets/stream"
LIVE_STREAM_URL = "wss://api.alpaca.markets/stream"

QTY_QUANTUM = Decimal("0.000000001")  # Alpaca takes up to 9 decimals
ZERO = Decimal(0)

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
TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})


# ------------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------------


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
    """
    coid = f"{session_id}-{ref}"
    if len(coid) > 128:
        raise ValueError(
            f"client_order_id longer than 128 characters: session id too long "
            f"({len(session_id)} characters)"
        )
    return coid


def to_decimal(value: Any) -> Decimal:
    """An Alpaca decimal (string, float or None) as ``Decimal`` (None -> 0)."""
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


def price_for(symbol: str, price: float) -> float:
    """Round a price to an increment Alpaca accepts: equities at or above 1 USD to cents,
    below 1 USD to 4 decimals (sub-penny rule); crypto to 9 decimals."""
    if is_crypto(symbol):
        return float(Decimal(repr(price)).quantize(QTY_QUANTUM))
    return round(price, 2 if price >= 1.0 else 4)


def default_time_in_force(symbol: str) -> str:
    """``gtc`` for crypto (Alpaca takes gtc or ioc there), ``day`` for equities."""
    return "gtc" if is_crypto(symbol) else "day"


def to_order_request(
    order: Any,
    symbol: str,
    *,
    client_order_id: str | None = None,
    time_in_force: str | None = None,
    children: Sequence[Any] = (),
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

    Returns:
        A Market/Limit/Stop/StopLimit/TrailingStop ``OrderRequest``. Quantity is the absolute
        size (fractions allowed); side from ``order.isbuy()``; prices rounded by
        :func:`price_for`; backtrader's ``trailpercent`` (a fraction) becomes Alpaca's
        ``trail_percent`` (percent); ``Order.Close`` is a market order with ``cls``.

    Raises:
        OrderRejectedError: an order type Alpaca does not have (StopTrailLimit, Historical), a
            time in force crypto does not take, a bracket child that is not a limit (take
            profit) or stop/stop-limit (stop loss), or a size of zero.
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
    qty = quantity(order.created.size)
    if qty <= 0:
        raise OrderRejectedError(f"{symbol}: order size {order.created.size} rounds to zero")
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
        common.update(_bracket_fields(children, symbol))
    ex = order.exectype
    price = float(order.created.price or 0.0)
    if ex in (bt.Order.Market, bt.Order.Close):
        return MarketOrderRequest(**common)
    if ex == bt.Order.Limit:
        return LimitOrderRequest(limit_price=price_for(symbol, price), **common)
    if ex == bt.Order.Stop:
        return StopOrderRequest(stop_price=price_for(symbol, price), **common)
    if ex == bt.Order.StopLimit:
        return StopLimitOrderRequest(
            stop_price=price_for(symbol, price),
            limit_price=price_for(symbol, float(order.created.pricelimit)),
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


def _bracket_fields(children: Sequence[Any], symbol: str) -> dict[str, Any]:
    take = stop = None
    for child in children:
        if child.exectype == bt.Order.Limit:
            take = TakeProfitRequest(limit_price=price_for(symbol, float(child.created.price)))
        elif child.exectype == bt.Order.Stop:
            stop = StopLossRequest(stop_price=price_for(symbol, float(child.created.price)))
        elif child.exectype == bt.Order.StopLimit:
            stop = StopLossRequest(
                stop_price=price_for(symbol, float(child.created.price)),
                limit_price=price_for(symbol, float(child.created.pricelimit)),
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


def _leg_role(order_type: Any) -> str:
    value = getattr(order_type, "value", order_type)
    return "take_profit" if value == "limit" else "stop_loss"


def _child_role(order: Any) -> str:
    return "take_profit" if order.exectype == bt.Order.Limit else "stop_loss"


def _status(o: AlpacaOrder) -> str:
    return str(getattr(o.status, "value", o.status))


def _family_terminal(o: AlpacaOrder) -> bool:
    """Nothing more can happen to the order or its legs (``replaced`` lives on in its
    successor, so it does not count)."""
    done = TERMINAL - {"replaced"}
    return _status(o) in done and all(_status(leg) in done for leg in o.legs or ())


# Typed calls (alpaca-py annotates every answer as ``Model | RawData``; raw_data is off here).


def _get_account(c: TradingClient) -> TradeAccount:
    return cast(TradeAccount, c.get_account())


def _get_positions(c: TradingClient) -> list[AlpacaPosition]:
    return cast(list[AlpacaPosition], c.get_all_positions())


def _get_open_orders(c: TradingClient) -> list[AlpacaOrder]:
    """Every open order, bracket legs nested under their parent (one request, up to 500)."""
    return cast(
        list[AlpacaOrder],
        c.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=True, limit=500)),
    )


def _get_order(c: TradingClient, alpaca_id: str) -> AlpacaOrder:
    return cast(AlpacaOrder, c.get_order_by_id(alpaca_id, GetOrderByIdRequest(nested=True)))


def _get_order_by_coid(c: TradingClient, coid: str) -> AlpacaOrder:
    return cast(AlpacaOrder, c.get_order_by_client_id(coid))


def _get_clock(c: TradingClient) -> Clock:
    return cast(Clock, c.get_clock())


def _submit_order(c: TradingClient, request: OrderRequest) -> AlpacaOrder:
    return cast(AlpacaOrder, c.submit_order(request))


def _cancel_order(c: TradingClient, alpaca_id: str) -> None:
    c.cancel_order_by_id(alpaca_id)


def _to_num(dt: datetime | None) -> float:
    when = (dt or datetime.now(UTC)).astimezone(UTC).replace(tzinfo=None)
    return float(bt.date2num(when))


# ------------------------------------------------------------------------------------------------
# HTTP: timeouts, retries, typed errors
# ------------------------------------------------------------------------------------------------


class AlpacaAPIError(BrokerError):
    """Alpaca answered with a status that retrying will not change (4xx other than 429).

    Attributes:
        status: HTTP status.
        code: Alpaca's error code (``None`` if the body was not Alpaca JSON).
        message: Alpaca's message.
        attempt: which attempt got this answer (``> 1`` means an earlier attempt may have
            landed).
    """

    def __init__(
        self, what: str, status: int | None, code: int | None, message: str, attempt: int
    ) -> None:
        super().__init__(f"{what}: HTTP {status} code {code}: {message}")
        self.status, self.code, self.message, self.attempt = status, code, message, attempt


def _api_error_parts(e: APIError) -> tuple[int | None, int | None, str]:
    status = e.status_code
    try:
        body = json.loads(str(e))
        return status, body.get("code"), str(body.get("message", ""))
    except (ValueError, AttributeError):
        return status, None, str(e)[:300]


class _TimeoutSession(requests.Session):
    """alpaca-py sends requests without a timeout; every request here gets one."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        *args: Any,
        **kwargs: Any,
    ) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(method, url, *args, **kwargs)


class _StoppingError(TransientError):
    """The broker is stopping: a retry loop gave up early."""


class Retrier:
    """Runs one Alpaca call with retries on 429/5xx/timeouts/connection errors.

    Backoff: attempt ``n`` waits ``uniform(d/2, d)`` with ``d = min(max_s, base_s * 2**(n-1))``
    (capped exponential, equal jitter, as in AWS's "Exponential Backoff and Jitter"). Waits
    end early when ``stop`` is set.

    Thread context: any thread; each thread may share one instance (no mutable state besides
    counters guarded by the GIL's atomic increments).
    """

    def __init__(
        self, config: AlpacaBrokerConfig, stop: threading.Event, rng: random.Random | None = None
    ) -> None:
        self.max_attempts = config.max_attempts
        self.base_s = config.backoff_base_s
        self.max_s = config.backoff_max_s
        self.stop = stop
        self.rng = rng or random.Random()
        self.calls = 0
        self.retries = 0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        d = min(self.max_s, self.base_s * 2 ** (attempt - 1))
        return self.rng.uniform(d / 2, d)

    def call(
        self, what: str, fn: Callable[..., T], *args: Any, interruptible: bool = True, **kwargs: Any
    ) -> T:
        """Call ``fn(*args, **kwargs)`` with retries.

        Raises:
            AlpacaAPIError: a non-retryable answer (4xx other than 429).
            TransientError: still failing after ``max_attempts`` (or stopping).
        """
        last: Exception | None = None
        for attempt in range(1, self.max_attempts + 1):
            self.calls += 1
            try:
                return fn(*args, **kwargs)
            except APIError as e:
                status, code, message = _api_error_parts(e)
                if status not in TRANSIENT_HTTP:
                    raise AlpacaAPIError(what, status, code, message, attempt) from e
                last = e
            except (requests.Timeout, requests.ConnectionError) as e:
                last = e
            if attempt == self.max_attempts:
                break
            self.retries += 1
            wait = self.delay(attempt)
            logger.debug(
                "%s: attempt %d failed (%s); retrying in %.2f s",
                what,
                attempt,
                _describe(last),
                wait,
            )
            if self.stop.wait(wait) and interruptible:
                raise _StoppingError(
                    f"{what}: stopping after attempt {attempt}: {_describe(last)}"
                ) from last
        raise TransientError(
            f"{what}: still failing after {self.max_attempts} attempts: {_describe(last)}"
        ) from last


def _describe(e: Exception | None) -> str:
    if isinstance(e, APIError):
        status, _, message = _api_error_parts(e)
        return f"HTTP {status} {message}"
    return type(e).__name__ if e is not None else "?"


# ------------------------------------------------------------------------------------------------
# State shared between threads and kept on the main thread
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Flight:
    """What the worker threads know about one submitted order family (guarded by the lock)."""

    coid: str
    symbol: str
    alpaca_id: str | None = None
    submit_done: bool = False


@dataclass(eq=False)
class _Tracked:
    """Main-thread state of one backtrader order linked to one Alpaca order."""

    order: Any
    symbol: str
    key: str
    qty: Decimal
    coid: str | None = None
    alpaca_id: str | None = None
    role: str | None = None  # None for a root, "take_profit"/"stop_loss" for bracket legs
    root: _Tracked | None = None
    legs: list[_Tracked] = field(default_factory=list)
    cum: Decimal = ZERO  # cumulative filled quantity applied
    value: Decimal = ZERO  # cum * filled_avg_price applied, USD
    base_cum: Decimal = ZERO  # filled by orders this one replaced (Alpaca restarts at 0)
    base_value: Decimal = ZERO
    status: str | None = None  # last Alpaca status applied
    updated_at: datetime | None = None

    def family(self) -> list[_Tracked]:
        return [self, *self.legs]


@dataclass(frozen=True, slots=True)
class AccountState:
    """An account + positions read (worker thread -> main thread).

    Attributes:
        cash_usd, equity_usd: from ``GET /v2/account``.
        positions: position key -> (signed quantity, average entry price USD).
        generations: per-symbol order generations read before the orders poll that preceded
            this read; a symbol whose generation moved since is not reconciled.
    """

    cash_usd: float
    equity_usd: float
    positions: dict[str, tuple[Decimal, float]]
    generations: dict[str, int]


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


def _positions_of(rows: Iterable[AlpacaPosition]) -> dict[str, tuple[Decimal, float]]:
    out = {}
    for p in rows:
        qty = abs(to_decimal(p.qty))
        side = str(getattr(p.side, "value", p.side))
        out[position_key(p.symbol)] = (
            -qty if side == "short" else qty,
            float(to_decimal(p.avg_entry_price)),
        )
    return out


_STOP = object()


# ------------------------------------------------------------------------------------------------
# The broker
# ------------------------------------------------------------------------------------------------


class AlpacaPaperTradingBroker(bt.BrokerBase):  # type: ignore[misc]
    """A backtrader broker trading an Alpaca account (paper by default).

    Args:
        config: endpoint, keys, polling, policies (:class:`AlpacaBrokerConfig`).
        session_id: this run's id; prefix of every ``client_order_id``.
        risk: pre-trade limits and kill switch (:mod:`runtime.risk`); ``None`` = none.
        client_factory: builds a ``TradingClient`` (tests); default from ``config``. One client
            per thread.

    Attributes:
        report: the :class:`BrokerReport`, set by :meth:`stop`.
        guard: the risk guard, if any.

    Raises (from :meth:`start`):
        BrokerError: the account cannot be read or cannot trade, open orders found with policy
            ``halt``, or an open order to adopt is for a symbol no feed trades.

    Thread context: every public method runs on the main (backtrader) thread.
    """

    params = ()

    def __init__(
        self,
        config: AlpacaBrokerConfig,
        *,
        session_id: str,
        risk: RiskConfig | None = None,
        client_factory: Callable[[], TradingClient] | None = None,
    ) -> None:
        super().__init__()
        if not session_id:
            raise ValueError("session_id must not be empty")
        client_order_id(session_id, 10**12)  # fails now if the session id is too long
        self.config = config
        self.session_id = session_id
        self.endpoint = config.base_url or (LIVE_URL if config.live_trading else PAPER_URL)
        self.live = config.points_at_live
        self._client_factory = client_factory or self._default_client
        self.guard: RiskGuard | None = (
            RiskGuard(risk) if risk is not None and risk.enabled else None
        )
        self.report: BrokerReport | None = None
        self.notifs: deque[Any] = deque()
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._commands: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._refresh_due = threading.Event()  # a fill was seen: refresh the account soon
        self._poll_due = threading.Event()  # poll orders now (after a cancel)
        self._retry = Retrier(config, self._stop)
        self._flights: dict[str, _Flight] = {}
        self._generation: dict[str, int] = {}
        self._threads: list[threading.Thread] = []
        self._stream: Any = None
        self._connected = False
        self._started = False
        self._stopped = False
        self._fatal: BaseException | None = None
        # main-thread state
        self._by_coid: dict[str, _Tracked] = {}
        self._by_id: dict[str, _Tracked] = {}
        self._by_ref: dict[int, _Tracked] = {}
        self._held: dict[int, list[Any]] = {}  # parent ref -> bracket orders not transmitted
        self._qty: dict[str, Decimal] = {}
        self._pos: dict[str, bt.Position] = {}
        self._datas: dict[str, Any] = {}
        self._to_adopt: list[AlpacaOrder] = []
        self._orphans: set[str] = set()
        self._cash = 0.0
        self._value = 0.0
        self.startingcash = 0.0
        self._counts = dict.fromkeys(("submitted", "filled", "canceled", "rejected", "expired"), 0)
        # worker-thread state (monitor thread only)
        self._mon_cum: dict[str, Decimal] = {}
        self._mon_done: set[str] = set()
        self._mon_failures = 0
        self._poll_generations: dict[str, int] = {}

    def __repr__(self) -> str:
        return (
            f"AlpacaPaperTradingBroker(endpoint={self.endpoint!r}, live={self.live}, "
            f"session_id={self.session_id!r})"
        )

    @property
    def healthy(self) -> bool:
        """False once the monitor's polls fail in a row or a worker failed (any thread may
        read it: the health endpoint does)."""
        return self._mon_failures == 0 and self._fatal is None

    def describe(self) -> str:
        """One line for logs and the run report (never the keys)."""
        kind = "LIVE (real money)" if self.live else "paper"
        return f"alpaca {kind} at {self.endpoint}"

    def _default_client(self) -> TradingClient:
        cfg = self.config
        client = TradingClient(
            cfg.api_key.reveal(),
            cfg.secret_key.reveal(),
            paper=not cfg.live_trading,
            url_override=cfg.base_url,
        )
        return client

    def _make_client(self) -> TradingClient:
        client = self._client_factory()
        # Our Retrier owns retries (alpaca-py would sleep 3 s per 429/504) and every request
        # gets a timeout (alpaca-py sets none).
        client._retry = 0
        client._session = _TimeoutSession(self.config.request_timeout_s)
        return client

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
        self._reconcile()
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
        self._spawn("alpaca-orders", self._orders_loop)
        self._spawn("alpaca-monitor", self._monitor_loop)
        if self.config.use_stream:
            self._spawn("alpaca-stream", self._stream_loop)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        # daemon: a crashed run must never hang the interpreter; stop() still joins them.
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _read(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return self._retry.call(what, fn, *args, interruptible=False)
        except (TransientError, AlpacaAPIError) as e:
            raise BrokerError(
                f"cannot read the Alpaca {what} at {self.endpoint}: {e}; refusing "
                "to run on an unknown portfolio"
            ) from e

    def _reconcile(self) -> None:
        client = self._client
        account = self._read("account", _get_account, client)
        self._check_account(account)
        open_orders = self._read("open orders", _get_open_orders, client)
        if open_orders:
            self._open_order_policy(open_orders)
            account = self._read("account", _get_account, client)
        positions = _positions_of(self._read("positions", _get_positions, client))
        for key, (qty, avg) in positions.items():
            self._qty[key] = qty
            self._pos[key] = bt.Position(float(qty), avg)
        self._cash = float(to_decimal(account.cash))
        self._value = float(to_decimal(account.equity))
        self.startingcash = self._cash
        clock = self._read("clock", _get_clock, client)
        self._clock = (clock.is_open, clock.next_open, clock.next_close, time.monotonic())
        untraded = sorted(set(positions) - set(self._datas)) if self._datas else []
        logger.info(
            "Alpaca account %s: cash %.2f USD, equity %.2f USD, %d position(s)%s, %d "
            "open order(s) (%s), market %s",
            account.account_number,
            self._cash,
            self._value,
            len(positions),
            f" ({', '.join(untraded)} not traded by this run)" if untraded else "",
            len(open_orders),
            self.config.open_order_policy,
            "open" if clock.is_open else "closed",
        )

    def _check_account(self, account: TradeAccount) -> None:
        status = str(getattr(account.status, "value", account.status))
        if (
            status != "ACTIVE"
            or account.trading_blocked
            or account.account_blocked
            or account.trade_suspended_by_user
        ):
            raise BrokerError(
                f"Alpaca account {account.account_number} cannot trade (status "
                f"{status}, trading_blocked={account.trading_blocked}, "
                f"account_blocked={account.account_blocked})"
            )

    def _open_order_policy(self, orders: list[AlpacaOrder]) -> None:
        policy = self.config.open_order_policy
        listing = "; ".join(
            f"{o.symbol} {getattr(o.side, 'value', o.side)} {o.qty} "
            f"{getattr(o.type, 'value', o.type)} {_status(o)} id={o.id}"
            for o in orders[:10]
        )
        if policy == "halt":
            raise BrokerError(
                f"the Alpaca account has {len(orders)} open order(s) ({listing}). "
                "ALPACA_OPEN_ORDER_POLICY=halt stops here: cancel them, or set "
                "ALPACA_OPEN_ORDER_POLICY=cancel (cancel at start) or adopt (track them as "
                "this run's orders)"
            )
        if policy == "adopt":
            missing = sorted(
                {str(o.symbol) for o in orders if position_key(str(o.symbol)) not in self._datas}
            )
            if missing:
                raise BrokerError(
                    f"cannot adopt open orders for {', '.join(missing)}: no feed of "
                    "this run trades them; cancel them or add the symbols"
                )
            self._to_adopt = list(orders)
            logger.warning("adopting %d open order(s): %s", len(orders), listing)
            return
        logger.warning("cancelling %d open order(s) found at start: %s", len(orders), listing)
        for o in orders:
            with contextlib.suppress(AlpacaAPIError):  # 422: filled meanwhile; checked below
                self._read("order cancel", _cancel_order, self._client, str(o.id))
        deadline = time.monotonic() + max(30.0, 5 * self.config.poll_interval_s)
        ids = {str(o.id) for o in orders}
        while True:
            left = [
                o
                for o in self._read("open orders", _get_open_orders, self._client)
                if str(o.id) in ids
            ]
            if not left:
                return
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{len(left)} open order(s) still open after cancelling at "
                    "start: " + ", ".join(str(o.id) for o in left)
                )
            time.sleep(min(0.5, self.config.poll_interval_s))

    def stop(self) -> None:
        """Stop the threads (joined), optionally cancel open orders, final sync, report.

        Idempotent. Orders still waiting to be sent are not sent (Canceled, reason
        ``"not sent: broker stopped"``).
        """
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._stop.set()
        self._commands.put(_STOP)
        self._wake.set()
        self._stop_stream()
        join_s = self.config.request_timeout_s + 5.0
        for t in self._threads:
            t.join(timeout=join_s)
            if t.is_alive():
                logger.error("thread %s did not stop within %.1f s", t.name, join_s)
        self._drain()
        client = self._client
        if self.config.cancel_on_stop:
            with self._lock:
                flights = list(self._flights.values())
            for fl in flights:
                if fl.alpaca_id is None:
                    continue
                try:
                    self._retry.call(
                        "cancel at stop", _cancel_order, client, fl.alpaca_id, interruptible=False
                    )
                except (AlpacaAPIError, TransientError) as e:
                    logger.warning("cancel at stop of %s: %s", fl.coid, e)
        try:
            # a few rounds: a cancel may show as pending_cancel for a moment
            for _ in range(5 if self.config.cancel_on_stop else 1):
                self._poll_once(client, final=True)
                self._drain()
                with self._lock:
                    if not self._flights:
                        break
                time.sleep(min(0.2, self.config.poll_interval_s))
            self._refresh_account(client)
        except (TransientError, BrokerError) as e:
            logger.error("final sync with Alpaca failed: %s", e)
        self._drain()
        self.report = self._make_report()
        r = self.report
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

    def _make_report(self) -> BrokerReport:
        with self._lock:
            left = len(self._flights)
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
            open_orders_left=left,
            requests=self._retry.calls,
            retries=self._retry.retries,
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
        out = [t.order for t in self._by_ref.values() if t.order.alive()]
        out += [o for fam in self._held.values() for o in fam if o.alive()]
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
        return self._order(
            bt.BuyOrder,
            owner,
            data,
            size,
            price,
            plimit,
            exectype,
            valid,
            tradeid,
            trailamount,
            trailpercent,
            parent,
            transmit,
            kwargs,
        )

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
        return self._order(
            bt.SellOrder,
            owner,
            data,
            size,
            price,
            plimit,
            exectype,
            valid,
            tradeid,
            trailamount,
            trailpercent,
            parent,
            transmit,
            kwargs,
        )

    def _order(
        self,
        order_cls: Any,
        owner: Any,
        data: Any,
        size: float,
        price: float | None,
        plimit: float | None,
        exectype: int | None,
        valid: Any,
        tradeid: int,
        trailamount: float | None,
        trailpercent: float | None,
        parent: Any,
        transmit: bool,
        kwargs: dict[str, Any],
    ) -> Any:
        """Build backtrader's order object (BuyOrder/SellOrder) and send it."""
        return self._transmit(
            order_cls(
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
            ),
            kwargs,
        )

    def submit(self, order: Any) -> Any:
        """Send an order built elsewhere (backtrader's generic broker API)."""
        return self._transmit(order, {})

    def cancel(self, order: Any) -> bool:
        """Ask Alpaca to cancel ``order`` (any order of a bracket cancels the bracket). The
        ``Canceled`` notification comes when Alpaca confirms; returns False when the order is
        not alive."""
        if not order.alive():
            return False
        for pref, family in list(self._held.items()):
            if any(o.ref == order.ref for o in family):  # bracket not transmitted yet
                del self._held[pref]
                for o in family:
                    o.cancel()
                    self.notify(o)
                return True
        tr = self._by_ref.get(order.ref)
        if tr is None:
            return False
        root = tr.root or tr
        target = root if root.order.alive() else tr
        self._commands.put(("cancel", root.coid, target.alpaca_id))
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
        order.addinfo(**info)
        order.addcomminfo(self.getcommissioninfo(order.data))
        parent = order.parent
        if parent is None and not order.transmit:
            self._held[order.ref] = [order]
            return order
        if parent is not None:
            family = self._held.pop(parent.ref, None)
            if family is None:
                reason = parent.info.get("reason") or "parent order was not transmitted"
                self._reject_local([order], f"{reason} (parent order {parent.ref})")
                return order
            family.append(order)
            if not order.transmit:
                self._held[parent.ref] = family
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
        tr = _Tracked(
            order=root, symbol=symbol, key=key, qty=quantity(root.created.size), coid=coid
        )
        for child in family[1:]:
            leg = _Tracked(
                order=child, symbol=symbol, key=key, qty=tr.qty, role=_child_role(child), root=tr
            )
            tr.legs.append(leg)
        for t in tr.family():
            self._by_ref[t.order.ref] = t
            t.order.submit(self)
            self.notify(t.order)
        self._by_coid[coid] = tr
        self._counts["submitted"] += 1
        self._datas.setdefault(key, root.data)
        with self._lock:
            self._generation[key] = self._generation.get(key, 0) + 1
            self._flights[coid] = _Flight(coid=coid, symbol=symbol)
        self._commands.put(("submit", coid, request, symbol))

    # -- applying events (main thread) --------------------------------------------------------

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            kind = event[0]
            if kind == "order":
                self._apply_snapshot(event[1])
            elif kind == "reject":
                self._apply_reject(event[1], event[2])
            elif kind == "local_cancel":
                self._apply_local_cancel(event[1], event[2])
            elif kind == "account":
                self._apply_account(event[1])
            elif kind == "fatal":
                self._fatal = event[1]

    def _apply_reject(self, coid: str, reason: str) -> None:
        tr = self._by_coid.get(coid)
        if tr is None or not tr.order.alive():
            return
        family = [t.order for t in tr.family() if t.order.alive()]
        for o in family:
            o.addinfo(reason=reason)
            o.reject(self)
            self.notify(o)
        self._counts["rejected"] += 1
        logger.warning("order %s rejected: %s", coid, reason)
        self._forget(tr)

    def _apply_local_cancel(self, coid: str, reason: str) -> None:
        tr = self._by_coid.get(coid)
        if tr is None:
            return
        for t in tr.family():
            if t.order.alive():
                t.order.addinfo(reason=reason)
                t.order.cancel()
                self.notify(t.order)
        self._counts["canceled"] += 1
        self._forget(tr)

    def _forget(self, root: _Tracked) -> None:
        """Stop following a family once every order of it is done."""
        if any(t.order.alive() for t in root.family()):
            return
        if root.coid is not None:
            with self._lock:
                self._flights.pop(root.coid, None)

    def _find(self, snap: AlpacaOrder) -> _Tracked | None:
        tr = self._by_id.get(str(snap.id))
        if tr is None:
            tr = self._by_coid.get(snap.client_order_id)
        if tr is None and snap.replaces is not None:
            tr = self._by_id.get(str(snap.replaces))
            if tr is not None and tr.alpaca_id == str(snap.replaces):
                self._follow(tr, str(snap.id))
        return tr

    def _follow(self, tr: _Tracked, new_id: str) -> None:
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
        self._link(tr, new_id)

    def _link(self, tr: _Tracked, alpaca_id: str) -> None:
        tr.alpaca_id = alpaca_id
        self._by_id[alpaca_id] = tr
        root = tr.root or tr
        if root is tr and root.coid is not None:
            with self._lock:
                fl = self._flights.get(root.coid)
                if fl is not None:
                    fl.alpaca_id = alpaca_id

    def _apply_snapshot(self, snap: AlpacaOrder) -> None:
        tr = self._find(snap)
        if tr is None:
            self._orphan(snap)
            return
        if tr.alpaca_id is None:
            self._link(tr, str(snap.id))
        self._apply_state(tr, snap)
        for leg_snap in snap.legs or ():
            leg = self._by_id.get(str(leg_snap.id))
            if leg is None:
                role = _leg_role(leg_snap.type or leg_snap.order_type)
                leg = next((t for t in tr.legs if t.alpaca_id is None and t.role == role), None)
                if leg is None:
                    continue
                leg.coid = leg_snap.client_order_id
                self._link(leg, str(leg_snap.id))
            self._apply_state(leg, leg_snap)
        self._forget(tr.root or tr)

    def _apply_state(self, tr: _Tracked, snap: AlpacaOrder) -> None:
        order = tr.order
        status = _status(snap)
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
            avg = to_decimal(snap.filled_avg_price)
            new_value = tr.base_value + filled * avg
            increment = cum - tr.cum
            price = float((new_value - tr.value) / increment)
            if order.status == bt.Order.Submitted:
                order.accept(self)
                self.notify(order)
            tr.cum, tr.value = cum, new_value
            done = status == "filled" or cum >= tr.qty
            self._execute(tr, increment, price, snap.filled_at or snap.updated_at, done)
            if done:
                self._counts["filled"] += 1
                for leg in tr.legs:  # a bracket's exits go live once the entry is filled
                    leg.order.activate()
        if status == "replaced":
            if snap.replaced_by is not None:
                self._follow(tr, str(snap.replaced_by))
            return
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
            order.executed.dt = _to_num(snap.expired_at or snap.updated_at)
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
        tr.status = status

    def _execute(
        self, tr: _Tracked, increment: Decimal, price: float, when: datetime | None, done: bool
    ) -> None:
        order = tr.order
        data = order.data
        signed = increment if order.isbuy() else -increment
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
            _to_num(when),
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

    def _adjust_position(self, tr: _Tracked, increment: Decimal) -> None:
        signed = increment if tr.order.isbuy() else -increment
        self._qty[tr.key] = self._qty.get(tr.key, ZERO) + signed
        pos = self._pos.setdefault(tr.key, bt.Position())
        pos.size = float(self._qty[tr.key])

    def _orphan(self, snap: AlpacaOrder) -> None:
        """An order of this session that no backtrader order follows (its submit was judged
        failed): cancel it so nothing trades behind the agent's back."""
        if not snap.client_order_id.startswith(f"{self.session_id}-"):
            return
        oid = str(snap.id)
        if _status(snap) in TERMINAL or oid in self._orphans:
            return
        self._orphans.add(oid)
        logger.error(
            "order %s (%s) is open on Alpaca but no agent order follows it; cancelling it",
            snap.client_order_id,
            snap.symbol,
        )
        self._commands.put(("cancel", None, oid))

    def _apply_account(self, acct: AccountState) -> None:
        self._cash, self._value = acct.cash_usd, acct.equity_usd
        with self._lock:
            generations = dict(self._generation)
        busy = {t.key for t in self._by_ref.values() if t.order.alive()}
        for fam in self._held.values():
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

    # -- adoption (main thread) ----------------------------------------------------------------

    def _adopt(self) -> None:
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

    def _adopt_one(self, snap: AlpacaOrder, data: Any, root: _Tracked | None) -> _Tracked:
        cls = bt.BuyOrder if snap.side == OrderSide.BUY else bt.SellOrder
        typ = str(getattr(snap.type, "value", snap.type))
        exectype = {
            "market": bt.Order.Market,
            "limit": bt.Order.Limit,
            "stop": bt.Order.Stop,
            "stop_limit": bt.Order.StopLimit,
            "trailing_stop": bt.Order.StopTrail,
        }.get(typ, bt.Order.Market)
        price = snap.stop_price if typ in ("stop", "stop_limit") else snap.limit_price
        qty = to_decimal(snap.qty)
        order = cls(
            owner=None,
            data=data,
            size=float(qty),
            price=float(to_decimal(price)) if price is not None else None,
            pricelimit=float(to_decimal(snap.limit_price)) if typ == "stop_limit" else None,
            exectype=exectype,
            parent=root.order if root else None,
            simulated=True,
        )
        order.p.simulated = False  # built without reading the feed; notified like any order
        order.addcomminfo(self.getcommissioninfo(data))
        order.addinfo(adopted=True, alpaca_id=str(snap.id))
        symbol = str(snap.symbol)
        cum = to_decimal(snap.filled_qty)
        tr = _Tracked(
            order=order,
            symbol=symbol,
            key=position_key(symbol),
            qty=qty,
            coid=snap.client_order_id,
            alpaca_id=str(snap.id),
            role=_leg_role(snap.type) if root else None,
            root=root,
            cum=cum,
            value=cum * to_decimal(snap.filled_avg_price),
            status=_status(snap),
            updated_at=snap.updated_at,
        )
        if root is not None:
            root.legs.append(tr)
        else:
            self._by_coid[snap.client_order_id] = tr
            with self._lock:
                self._flights[snap.client_order_id] = _Flight(
                    coid=snap.client_order_id,
                    symbol=symbol,
                    alpaca_id=str(snap.id),
                    submit_done=True,
                )
        self._by_ref[order.ref] = tr
        self._by_id[str(snap.id)] = tr
        order.submit(self)
        order.accept(self)
        if root is None or (root.order.status == bt.Order.Completed):
            order.activate()
        self.notify(order)
        return tr

    # -- alpaca-orders thread -----------------------------------------------------------------

    def _orders_loop(self) -> None:
        client = self._make_client()
        parked: list[tuple[Any, ...]] = []
        while True:
            try:
                cmd = self._commands.get(timeout=self.config.poll_interval_s if parked else None)
            except queue.Empty:
                cmd = None
            try:
                if cmd is _STOP:
                    self._drain_commands(client, parked)
                    return
                if cmd is not None:
                    if cmd[0] == "submit":
                        if self._must_wait(cmd[3], client):
                            logger.info(
                                "%s: market closed, order %s waits for the open", cmd[3], cmd[1]
                            )
                            parked.append(cmd)
                        else:
                            self._submit(client, cmd[1], cmd[2])
                    elif cmd[0] == "cancel":
                        hit = [p for p in parked if cmd[1] is not None and p[1] == cmd[1]]
                        if hit:
                            parked.remove(hit[0])
                            self._put(
                                "local_cancel",
                                cmd[1],
                                "canceled before it was sent (market closed)",
                            )
                        else:
                            self._cancel(client, cmd[1], cmd[2])
                if parked and not self._must_wait(parked[0][3], client):
                    for p in parked:
                        self._submit(client, p[1], p[2])
                    parked.clear()
            except _StoppingError:
                continue
            except Exception as e:
                logger.exception("alpaca-orders thread error")
                self._put("fatal", e)

    def _drain_commands(self, client: TradingClient, parked: list[tuple[Any, ...]]) -> None:
        for p in parked:
            self._put("local_cancel", p[1], "not sent: broker stopped")
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd is _STOP:
                continue
            if cmd[0] == "submit":
                self._put("local_cancel", cmd[1], "not sent: broker stopped")
            elif cmd[0] == "cancel":
                with contextlib.suppress(TransientError, BrokerError):
                    self._cancel(client, cmd[1], cmd[2])

    def _put(self, *event: Any) -> None:
        self._events.put(event)

    def _must_wait(self, symbol: str, client: TradingClient) -> bool:
        """True when ``symbol`` is an equity and the Alpaca clock says the market is closed.

        The clock is read again when its answer may have changed: past ``next_open`` /
        ``next_close``, older than 60 s, or (while closed) older than one poll interval.
        """
        if is_crypto(symbol) or not self.config.wait_for_market_open:
            return False
        is_open, next_open, next_close, fetched = self._clock
        age = time.monotonic() - fetched
        flipped = datetime.now(UTC) >= (next_close if is_open else next_open)
        if flipped or age > 60.0 or (not is_open and age >= self.config.poll_interval_s):
            clock = self._retry.call("clock", _get_clock, client)
            self._clock = (clock.is_open, clock.next_open, clock.next_close, time.monotonic())
            is_open = clock.is_open
        return not is_open

    def _submit(self, client: TradingClient, coid: str, request: OrderRequest) -> None:
        snap: AlpacaOrder | None = None
        try:
            snap = self._retry.call(f"submit {coid}", _submit_order, client, request)
        except AlpacaAPIError as e:
            duplicate = "client_order_id" in e.message and "unique" in e.message
            if duplicate and e.attempt > 1:
                # an earlier attempt landed (its answer was lost): follow that order
                snap = self._lookup(client, coid)
            elif duplicate:
                self._put(
                    "reject",
                    coid,
                    f"alpaca: {e.message}: client_order_id {coid} "
                    "already used on this account (session id reused?)",
                )
            else:
                self._put("reject", coid, f"alpaca: {e.message} (HTTP {e.status}, code {e.code})")
        except _StoppingError:
            logger.warning("submit %s interrupted by stop; resolved at the final sync", coid)
        except TransientError as e:
            logger.warning("submit %s: %s; looking the order up", coid, e)
            try:
                snap = self._lookup(client, coid)
            except (TransientError, BrokerError) as e2:
                logger.warning("lookup %s: %s; the monitor will resolve it", coid, e2)
        finally:
            if snap is not None:  # queued before the submit counts as done
                self._put("order", snap, "submit")
            with self._lock:
                fl = self._flights.get(coid)
                if fl is not None:
                    fl.submit_done = True
                    if snap is not None:
                        fl.alpaca_id = str(snap.id)

    def _lookup(
        self, client: TradingClient, coid: str, interruptible: bool = True
    ) -> AlpacaOrder | None:
        """The order with ``coid``, or None after queuing a rejection when Alpaca has none."""
        try:
            return self._retry.call(
                f"lookup {coid}", _get_order_by_coid, client, coid, interruptible=interruptible
            )
        except AlpacaAPIError as e:
            if e.status == 404:
                self._put(
                    "reject",
                    coid,
                    "alpaca: order not accepted (Alpaca was unreachable "
                    "and has no order with this client_order_id)",
                )
                return None
            raise

    def _cancel(self, client: TradingClient, coid: str | None, alpaca_id: str | None) -> None:
        if alpaca_id is None and coid is not None:
            with self._lock:
                fl = self._flights.get(coid)
                alpaca_id = fl.alpaca_id if fl is not None else None
            if alpaca_id is None:
                snap = self._lookup(client, coid)
                if snap is None:
                    return
                alpaca_id = str(snap.id)
        if alpaca_id is None:
            return
        try:
            self._retry.call(f"cancel {coid or alpaca_id}", _cancel_order, client, alpaca_id)
        except AlpacaAPIError as e:
            # 422 not cancelable: it already filled/ended; the monitor reports what happened
            logger.info("cancel %s: %s", coid or alpaca_id, e.message)
        self._poll_due.set()
        self._wake.set()

    # -- alpaca-monitor thread ----------------------------------------------------------------

    def _monitor_loop(self) -> None:
        client = self._make_client()
        cfg = self.config
        next_poll = time.monotonic() + cfg.poll_interval_s
        next_refresh = time.monotonic() + cfg.refresh_interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, min(next_poll, next_refresh) - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                filled = False
                if time.monotonic() >= next_poll or self._poll_due.is_set():
                    self._poll_due.clear()
                    filled = self._poll_once(client)
                    next_poll = time.monotonic() + cfg.poll_interval_s
                if filled or self._refresh_due.is_set() or time.monotonic() >= next_refresh:
                    self._refresh_due.clear()
                    self._refresh_account(client)
                    next_refresh = time.monotonic() + self.config.refresh_interval_s
                self._mon_failures = 0
            except _StoppingError:
                return
            except (TransientError, BrokerError) as e:
                self._mon_failures += 1
                logger.warning("Alpaca poll failed (%d in a row): %s", self._mon_failures, e)
                if self._mon_failures >= 10:
                    self._put("fatal", e)
                    return
            except Exception as e:
                logger.exception("alpaca-monitor thread error")
                self._put("fatal", e)
                return

    def _poll_once(self, client: TradingClient, final: bool = False) -> bool:
        """One poll: one list call for every open order, a lookup for each followed order that
        left the list. Returns True when a fill was seen (the account is then refreshed)."""
        with self._lock:
            flights = {c: (f.alpaca_id, f.submit_done) for c, f in self._flights.items()}
            self._poll_generations = dict(self._generation)
        self._mon_done &= set(flights)
        if not flights:
            return False
        interruptible = not final
        rows = self._retry.call(
            "poll open orders", _get_open_orders, client, interruptible=interruptible
        )
        ids = {aid for aid, _ in flights.values() if aid}
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
                self._put("order", o, "poll")
        for coid, (aid, submit_done) in flights.items():
            if coid in seen or (aid and aid in seen) or coid in self._mon_done:
                continue
            if not submit_done and not final:
                continue  # the orders thread is still sending it
            snap: AlpacaOrder | None
            if aid:
                snap = self._retry.call(
                    f"order {coid}", _get_order, client, aid, interruptible=interruptible
                )
            else:
                snap = self._lookup(client, coid, interruptible)
                if snap is None:
                    self._mon_done.add(coid)
                    continue
            filled |= self._note_fills(snap)
            if _family_terminal(snap):
                self._mon_done.add(coid)
            elif _status(snap) == "replaced" and snap.replaced_by is not None:
                with self._lock:  # look the successor up next time
                    fl = self._flights.get(coid)
                    if fl is not None and fl.alpaca_id == aid:
                        fl.alpaca_id = str(snap.replaced_by)
            self._put("order", snap, "lookup")
        return filled

    def _note_fills(self, o: AlpacaOrder) -> bool:
        changed = False
        for x in (o, *(o.legs or ())):
            cum = to_decimal(x.filled_qty)
            if cum != self._mon_cum.get(str(x.id), ZERO):
                self._mon_cum[str(x.id)] = cum
                changed = True
        return changed

    def _refresh_account(self, client: TradingClient) -> None:
        generations = self._poll_generations
        account = self._retry.call("account", _get_account, client, interruptible=False)
        positions = self._retry.call("positions", _get_positions, client, interruptible=False)
        self._put(
            "account",
            AccountState(
                cash_usd=float(to_decimal(account.cash)),
                equity_usd=float(to_decimal(account.equity)),
                positions=_positions_of(positions),
                generations=generations,
            ),
        )

    # -- alpaca-stream thread -----------------------------------------------------------------

    def _stream_url(self) -> str:
        cfg = self.config
        if cfg.stream_url:
            return cfg.stream_url
        if cfg.base_url:
            scheme, rest = cfg.base_url.split("://", 1)
            return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}/stream"
        return LIVE_STREAM_URL if cfg.live_trading else PAPER_STREAM_URL

    def _stream_loop(self) -> None:
        from alpaca.trading.stream import TradingStream

        cfg = self.config
        stream = TradingStream(
            cfg.api_key.reveal(),
            cfg.secret_key.reveal(),
            paper=not cfg.live_trading,
            url_override=self._stream_url(),
        )
        stream.subscribe_trade_updates(self._on_trade_update)
        self._stream = stream
        try:
            stream.run()
        except Exception:
            logger.exception("trade-updates stream ended; polling continues")

    async def _on_trade_update(self, update: TradeUpdate) -> None:
        self._put("order", update.order, "stream")
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


__all__ = [
    "STATUS_MAP",
    "AccountState",
    "AlpacaAPIError",
    "AlpacaPaperTradingBroker",
    "BrokerReport",
    "Retrier",
    "client_order_id",
    "default_time_in_force",
    "is_crypto",
    "position_key",
    "price_for",
    "quantity",
    "to_order_request",
]
