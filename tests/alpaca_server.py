"""A local Alpaca server for tests and benchmarks: the Trading API v2 and the Broker API's trading
endpoints, over one account (stdlib ``http.server``, one port).

It keeps real order state and answers in Alpaca's documented JSON shapes (the keys of the example
responses in ``tests/data/alpaca/``; decimals as strings), so the real ``alpaca-py`` clients run
against it unchanged: ``TradingClient(key, secret, url_override=server.url)`` and
``BrokerClient(broker_key, broker_secret, url_override=server.url)`` on
:attr:`AlpacaServer.account_id`.

Where Alpaca is strict, this server is strict too. Every such behaviour cites its source where it
is implemented; the sources are:

* [orders] docs.alpaca.markets "Orders" (alpaca.markets/docs/trading/orders): statuses
  (``pending_cancel``: "the order is waiting to be canceled"), buying power (open buy orders
  reduce it; a market buy counts 2.5% above the price), bracket/OCO/OTO classes, extended hours
  (``extended_hours`` needs a ``limit`` ``day`` order), orders outside market hours are queued
  for the open, ``DELETE /v2/orders/{id}`` answers 204 or 422 when not cancelable.
* [forum-cancel] Alpaca staff on forum.alpaca.markets "Orders are showing PENDING CANCEL": a
  cancel is only a request; the order shows ``pending_cancel`` (seconds, minutes, or until the
  next open) and can still fill meanwhile.
* [bt-80] alpacahq/alpaca-backtrader-api #80 / PR #81 (maintainer): "the stop loss order, when
  filled is replaced by a different order and then filled ... the take profit order doesn't".
* [py-198] alpacahq/alpaca-py #198: after the entry fills the stop-loss leg is ``held`` and the
  take-profit ``new``; when the take profit fills, the held stop leg's cancel is not sent on the
  trade-updates stream; one observed variant of a stop trigger shows the take profit
  ``replaced`` and the stop leg ``filled``.
* [py-322] alpacahq/alpaca-trade-api-python #322 (maintainer): a held stop leg is not listed as
  an open order; a position's shares can be allocated to one closing order at a time.
* [js-87] alpacahq/alpaca-trade-api-js #87 (and #80) (maintainer): once a bracket's entry
  filled, ``GET /orders?status=open&nested=true`` lists nothing of it, ``nested=false`` lists the
  take-profit leg but not the held stop leg; "the amount of shares is allocated per order".
* [bt-127] alpacahq/alpaca-backtrader-api #127 (maintainer): "you have open order on this
  position. you can't open another".
* [crypto] docs.alpaca.markets "Crypto Spot Trading": market, limit and stop-limit orders only,
  time in force ``gtc``/``ioc``, fractional; asset ``BTC/USD`` has ``min_order_size`` 0.0001;
  positions keyed ``BTCUSD``.
* [crypto-fees] alpaca.markets/docs/crypto/activities "Crypto Fees" and the support FAQ
  "What is Maker / Taker?": the fee is charged on the credited asset (buy ETH/USD: fee in ETH;
  sell ETH/USD: fee in USD); tier 1: maker 0.15%, taker 0.25%.
* [rate] alpaca.markets/support/usage-limit-api-calls and Alpaca staff on forum.alpaca.markets
  "Executing Orders": 200 requests per minute per account, then ``429``; every answer carries
  ``X-Ratelimit-Limit``/``X-Ratelimit-Remaining``/``X-Ratelimit-Reset`` (epoch seconds of the
  counter's reset).
* [broker-api] docs.alpaca.markets Broker API reference and alpaca-py's ``BrokerClient``: HTTP
  Basic auth with the broker key and secret, ``/v1/trading/accounts/{account_id}/orders``,
  ``.../positions``, ``.../account``, ``/v1/clock``; trade events over SSE at
  ``/v1/events/trades`` (legacy, integer ``event_id``; what alpaca-py 0.44 calls) and
  ``/v2/events/trades`` (ULID ids), replay with ``since_id``; SSE comment lines (``:``) carry
  no event.
* [stream] docs.alpaca.markets "Websocket streaming": ``wss://<host>/stream`` on the Trading API
  host, ``authenticate`` then ``listen`` to ``trade_updates``.
* [flip] alpacahq/Alpaca-API #90 (maintainer umitanuki: "yes that's correct") and
  alpaca-trade-api-python #129: one order cannot take a position from long to short or back;
  "you can't sell more shares than you have": 403 ``insufficient qty available for order
  (requested: 2, available: 1)``, with shorting enabled.
* [wash] docs.alpaca.markets/docs/trading/user-protections "Preventing Wash Trades" (checked
  on every order, crypto included) and Alpaca staff on forum.alpaca.markets "Bogus rule:
  potential trade wash detected" (a market buy while a limit sell is pending on the same stock):
  403 ``40310000`` ``potential wash trade detected. use complex orders``; "a wash trade is where
  a buy and a sell would fill against each other" (forum "Frustrated with Alpaca's Wash Trade
  Flags"). Modelled by the table of docs.alpaca.markets/docs/user-protection: a new order is
  refused when an opposite-side order of the same symbol is working and the two could fill
  against each other: market, limit, stop and stop-limit orders count (any market or stop
  against an opposite order is "always rejected", e.g. "stop sell | market buy"; two limit
  prices conflict when the buy's is at or above the sell's); complex orders (bracket, OTO,
  OCO, their legs) and trailing stops are the exceptions.
* [short] docs.alpaca.markets/docs/orders-at-alpaca "Buying Power": an opening short sell is
  checked against buying power at MAX(limit price, 3% above the ask) * qty (market: 3% above
  the ask), and open sell-short orders reduce buying power like open buys; the asset must be
  ``shortable`` (docs "Margin and Short Selling"). The wording of the not-shortable answer
  is ours (no copy of Alpaca's text was found); assets in :attr:`AlpacaServer.unshortable`.
* [fractional] docs.alpaca.markets/docs/fractional-trading and alpaca.markets/support "How can
  I pass a fractional order": fractional quantities (and ``notional``) take time in force
  ``day`` only (alpaca-java #140: 422 "fractional orders must be DAY orders"), simple orders;
  qty and notional are mutually exclusive ("If both qty and notional are entered the request
  will be rejected"; the wording of that answer is ours); alpaca-trade-api-python #405: a
  fractional sell beyond the position answers ``fractional orders are not allowed to short``.
* [bracket] docs.alpaca.markets/docs/orders-at-alpaca "Bracket Orders": ``time_in_force`` day
  or gtc; ``take_profit.limit_price`` and ``stop_loss.stop_price`` on the exit side of the
  entry's base price (limit price, or the market price for a market entry), at least a cent
  away (``take_profit.limit_price must be >= base_price + 0.01`` / ``stop_loss.stop_price
  must be <= base_price - 0.01`` for a buy, mirrored for a sell: Alpaca's wording as
  remembered, not confirmed by a stored copy; the time-in-force answer's wording is ours);
  alpaca-trade-api-js #248: a bracket that would close a position is refused 422 ``bracket
  orders must be entry orders``.
* [subpenny] alpaca-trade-api-go #260 and alpaca-trade-api-csharp #497 (SEC Rule 612): 422
  ``42210000`` ``invalid limit_price 11.055. sub-penny increment does not fulfill minimum
  pricing criteria``: prices >= $1.00 take at most 2 decimals, below $1.00 at most 4 (a
  $0.6013 limit was accepted).
* [replace] alpaca-trade-api-python #306: ``PATCH`` of an order Alpaca has not routed yet
  (``accepted``/``pending_new``) answers ``unable to replace order, order isn't sent to exchange
  yet``; alpaca-trade-api-js #123: 403 ``order parameters are not changed`` when nothing
  changes; the docs' "Replace an order": the order must be open (not ``pending_cancel``/
  ``pending_replace``); a new qty must exceed what already filled.

Test controls: fills are driven by the test (:meth:`AlpacaServer.fill`, :meth:`tick`,
:meth:`set_price` crossing limit/stop prices, or ``fill_mode="immediate"``), the clock by
:meth:`set_clock`, faults by a :class:`FaultPlan` (429, 5xx, a stalled answer, a reset
connection, each processed or not). ``time_scale`` compresses time for the rate limiter (a test
polling every 30 ms instead of 2 s runs at ``time_scale=66.7``: the same requests per poll are
allowed as in real time).

Every request is logged in :attr:`AlpacaServer.requests` (arrival time, method, path, kind,
status, fault).

Thread context: one handler thread per connection (websocket and SSE connections keep theirs);
all state changes hold one lock; a venue thread settles cancels and runs the optional ticker.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import heapq
import itertools
import json
import math
import queue
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_EVEN, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DATA_DIR = Path(__file__).parent / "data" / "alpaca"
ORDER_KEYS: tuple[str, ...] = tuple(json.loads((DATA_DIR / "order_new.json").read_text()).keys())
ACCOUNT_TEMPLATE: dict[str, Any] = json.loads((DATA_DIR / "account.json").read_text())
BROKER_ACCOUNT_TEMPLATE: dict[str, Any] = json.loads(
    (DATA_DIR / "broker_trade_account.json").read_text()
)
POSITION_KEYS: tuple[str, ...] = tuple(
    json.loads((DATA_DIR / "positions.json").read_text())[0].keys()
)

# Statuses in which an order is still working ([orders]).
OPEN_STATUSES = frozenset(
    {
        "new",
        "partially_filled",
        "accepted",
        "pending_new",
        "held",
        "pending_cancel",
        "pending_replace",
        "accepted_for_bidding",
        "stopped",
        "suspended",
        "calculated",
        "done_for_day",
    }
)
# What ``GET /orders?status=open`` lists: open statuses except ``held`` ([py-322], [js-87]).
LISTED_OPEN = OPEN_STATUSES - {"held"}
QTY_STEP = Decimal("0.000000001")  # Alpaca accepts up to 9 decimals
FAULT_KINDS = ("429", "500", "502", "503", "timeout", "reset")
CRYPTO_TYPES = frozenset({"market", "limit", "stop_limit"})  # [crypto]
CRYPTO_MIN_ORDER_SIZE = {"BTC/USD": Decimal("0.0001")}  # [crypto]: the documented asset example
MARKET_BUY_BUFFER = Decimal("1.025")  # [orders]: a market buy counts 2.5% above the price
SHORT_BUFFER = Decimal("1.03")  # [short]: an opening short counts 3% above the ask
CENT = Decimal("0.01")
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _dec(x: Any) -> Decimal:
    return Decimal(str(x))


def _s(x: Decimal | None) -> str | None:
    if x is None:
        return None
    return format(x.normalize(), "f")


def position_key(symbol: str) -> str:
    """Alpaca keys crypto positions without the slash: ``BTC/USD`` -> ``BTCUSD``."""
    return symbol.replace("/", "").upper()


def _sub_penny(price: Decimal) -> bool:
    """[subpenny]: more decimals than Alpaca takes for an equity price."""
    step = CENT if price >= 1 else Decimal("0.0001")
    return price != price.quantize(step)


class ApiError(Exception):
    """An Alpaca error answer: HTTP status and ``{"code", "message"}`` body."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FaultPlan:
    """Faults injected on API requests.

    Attributes:
        rate: probability a request is hit (0 = never).
        kinds: kinds drawn uniformly from (see ``FAULT_KINDS``).
        seed: RNG seed, for reproducible runs.
        stall_s: how long a ``timeout`` fault stalls (must exceed the client's timeout).
        paths: only requests whose path starts with one of these are hit (default: both APIs).
        methods: only these HTTP methods are hit (empty: all).
        limit: at most this many faults in total (``None``: no limit).
        processed: for ``timeout``/``reset``: whether the request was processed before its
            answer was lost (``None``: a coin flip each time).
        kinds_for: only requests of these kinds are hit (see :attr:`Req.kind`; empty: all).
        forced: ``(request kind, fault, processed)`` served in order to the first requests of
            that kind, before and besides the random draws (e.g. ``("submit", "reset", True)``:
            a submit is carried out and its answer lost).
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500", "503", "timeout", "reset")
    seed: int = 0
    stall_s: float = 0.5
    paths: tuple[str, ...] = ("/v2/", "/v1/")
    methods: tuple[str, ...] = ()
    limit: int | None = None
    processed: bool | None = None
    kinds_for: tuple[str, ...] = ()
    forced: tuple[tuple[str, str, bool], ...] = ()

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")


@dataclass
class Req:
    """One logged request.

    ``kind`` is API-independent: ``account``, ``positions``, ``list``, ``order``, ``by_coid``,
    ``submit``, ``cancel``, ``cancel_all``, ``replace``, ``clock``, ``events``, ``stream``,
    ``other``.
    """

    t: float  # time.perf_counter() at arrival
    method: str
    path: str
    query: dict[str, list[str]]
    kind: str = "other"
    api: str = "trading"
    status: int = 0
    fault: str | None = None
    body: Any = None
    processed: bool | None = None  # a lost answer (timeout/reset): was the request carried out?


@dataclass
class _Order:
    id: str
    client_order_id: str
    symbol: str
    asset_class: str
    side: str
    type: str
    qty: Decimal
    time_in_force: str
    order_class: str = ""
    limit_price: Decimal | None = None
    stop_price: Decimal | None = None
    trail_price: Decimal | None = None
    trail_percent: Decimal | None = None
    extended_hours: bool = False
    status: str = "new"
    filled_qty: Decimal = Decimal(0)
    filled_value: Decimal = Decimal(0)  # sum(qty * price) of fills
    created_at: datetime = field(default_factory=_now)
    updated_at: datetime = field(default_factory=_now)
    filled_at: datetime | None = None
    canceled_at: datetime | None = None
    expired_at: datetime | None = None
    failed_at: datetime | None = None
    replaced_at: datetime | None = None
    replaced_by: str | None = None
    replaces: str | None = None
    parent_id: str | None = None
    leg_ids: list[str] = field(default_factory=list)
    hwm: Decimal | None = None
    fills: list[tuple[Decimal, Decimal]] = field(default_factory=list)
    fees: Decimal = Decimal(0)  # crypto: in the coin for buys, USD for sells ([crypto-fees])
    maker: bool = False  # a resting limit order (maker fee) rather than a marketable one
    hide_replaced_by: bool = False  # shows replaced_by: null (a successor Alpaca did not link)
    short_open: bool = False  # an opening short sell: holds buying power ([short])
    elected: bool = False  # a stop-limit whose stop was crossed: a limit order from then on

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES

    @property
    def remaining(self) -> Decimal:
        return self.qty - self.filled_qty

    @property
    def avg_price(self) -> Decimal | None:
        if not self.filled_qty:
            return None
        return (self.filled_value / self.filled_qty).quantize(QTY_STEP)


class _RateLimiter:
    """[rate]: a fixed window of ``limit`` requests per ``60 / time_scale`` seconds per account,
    reset on the window boundary (``X-Ratelimit-Reset``)."""

    def __init__(self, limit: int | None, time_scale: float) -> None:
        self.limit = limit
        self.window_s = 60.0 / time_scale
        self._lock = threading.Lock()
        self._counts: dict[str, tuple[int, int]] = {}  # account -> (window index, count)
        self.rejected = 0

    def hit(self, account: str) -> tuple[bool, dict[str, str]]:
        """Count one request; ``(allowed, headers)``."""
        if self.limit is None:
            return True, {}
        now = time.time()
        index = int(now // self.window_s)
        with self._lock:
            w, n = self._counts.get(account, (index, 0))
            if w != index:
                w, n = index, 0
            n += 1
            self._counts[account] = (w, n)
            allowed = n <= self.limit
            if not allowed:
                self.rejected += 1
        reset = math.ceil((index + 1) * self.window_s)
        return allowed, {
            "X-Ratelimit-Limit": str(self.limit),
            "X-Ratelimit-Remaining": str(max(0, self.limit - n)),
            "X-Ratelimit-Reset": str(reset),
        }


class AlpacaServer:
    """The server. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        api_key, secret_key: Trading API credentials (``APCA-API-KEY-ID``/``-SECRET-KEY``).
        broker_key, broker_secret: Broker API credentials (HTTP Basic auth).
        account_id: the Broker API account id of the one account both APIs trade.
        cash_usd: starting cash.
        prices: symbol -> price used for market fills and valuations (default 100).
        fill_mode: ``"manual"`` (fills only via :meth:`fill`/:meth:`tick`/:meth:`set_price`) or
            ``"immediate"`` (market orders fill in the submit call at the current price).
        partial_steps: slices per market order in :meth:`tick`.
        faults: the fault plan (default none).
        market_open: initial clock state.
        tick_interval_s: when set, a background thread calls :meth:`tick` this often.
        shorting: allow equity sells beyond a flat position.
        rate_limit_per_min: requests allowed per (scaled) minute per account ([rate]); ``None``
            turns the limit off.
        time_scale: how much faster than real time the test runs (rate limit window
            ``60 / time_scale`` s).
        cancel_latency_s: how long a cancel stays ``pending_cancel`` ([forum-cancel]); ``None``:
            until :meth:`settle_cancels`.
        stop_trigger: what a triggered bracket stop leg does: ``"replace_stop"`` ([bt-80]: the
            stop leg is ``replaced`` by a new order that fills; the take profit is canceled) or
            ``"replace_take_profit"`` ([py-198]: the take profit is ``replaced`` by the stop
            leg, which fills).
        hide_replaced_by: replaced orders show ``replaced_by: null`` (the successor still has
            ``replaces``).
        crypto_taker_bps, crypto_maker_bps: crypto fees ([crypto-fees], tier 1).
        sse_heartbeat_s: period of the SSE comment heartbeats, seconds.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        secret_key: str = "test-secret",
        broker_key: str = "broker-key",
        broker_secret: str = "broker-secret",
        account_id: str = "7b3c2a10-5d4e-4f6a-9b8c-1d2e3f4a5b6c",
        cash_usd: float = 100_000.0,
        prices: dict[str, float] | None = None,
        fill_mode: str = "manual",
        partial_steps: int = 1,
        faults: FaultPlan | None = None,
        market_open: bool = True,
        tick_interval_s: float | None = None,
        shorting: bool = True,
        rate_limit_per_min: int | None = 200,
        time_scale: float = 1.0,
        cancel_latency_s: float | None = 0.02,
        stop_trigger: str = "replace_stop",
        hide_replaced_by: bool = False,
        crypto_taker_bps: float = 25.0,
        crypto_maker_bps: float = 15.0,
        sse_heartbeat_s: float = 0.5,
        websocket: bool = True,  # kept for callers; the stream is always served
    ) -> None:
        if fill_mode not in ("manual", "immediate"):
            raise ValueError(f"fill_mode must be manual or immediate, got {fill_mode!r}")
        if partial_steps < 1:
            raise ValueError("partial_steps must be >= 1")
        if stop_trigger not in ("replace_stop", "replace_take_profit"):
            raise ValueError(f"unknown stop_trigger {stop_trigger!r}")
        del websocket
        self.api_key, self.secret_key = api_key, secret_key
        self.broker_key, self.broker_secret = broker_key, broker_secret
        self.account_id = account_id
        self.lock = threading.RLock()
        self.cash = _dec(cash_usd)
        self.prices: dict[str, Decimal] = {
            position_key(k): _dec(v) for k, v in (prices or {}).items()
        }
        self.positions: dict[str, Decimal] = {}
        self.cost: dict[str, Decimal] = {}  # position_key -> cost basis (avg * qty)
        self.crypto: set[str] = set()  # position keys of crypto assets
        self.orders: dict[str, _Order] = {}
        self.by_coid: dict[str, str] = {}
        self.fill_mode = fill_mode
        self.partial_steps = partial_steps
        self.faults = faults or FaultPlan()
        self._rng = random.Random(self.faults.seed)
        self._forced = list(self.faults.forced)
        self.requests: list[Req] = []
        self.faults_injected = 0
        self.shorting = shorting
        self.unknown_symbols: set[str] = {"NOPE"}
        self.unshortable: set[str] = {"HTB"}  # [short]: assets whose ``shortable`` is false
        self.market_is_open = market_open
        self.next_open = _now() + timedelta(hours=12)
        self.next_close = _now() + timedelta(hours=6)
        self.account_blocked = False
        self.fail_account = False  # every account call answers 500 (start-up failure test)
        self.fail_clock = False  # every clock call answers 503 (clock outage test)
        self.tick_interval_s = tick_interval_s
        self.rate = _RateLimiter(rate_limit_per_min, time_scale)
        self.cancel_latency_s = cancel_latency_s
        # seconds every API answer is held back (a slow but healthy Alpaca); not a fault
        self.answer_latency_s = 0.0
        # seconds a trade-updates connection (SSE or websocket) waits before its answer's
        # headers (a slow network or load balancer; not an Alpaca behaviour): a client stopped
        # while it connects
        self.stream_connect_latency_s = 0.0
        self.stop_trigger = stop_trigger
        self.hide_replaced_by = hide_replaced_by
        self.crypto_taker = _dec(crypto_taker_bps) / 10_000
        self.crypto_maker = _dec(crypto_maker_bps) / 10_000
        self.sse_heartbeat_s = sse_heartbeat_s
        self.fees_usd = Decimal(0)  # crypto fees charged in USD (sells)
        self.vanished: dict[str, _Order] = {}
        self.events: list[dict[str, Any]] = []  # every trade update emitted, in order
        self._subscribers: list[queue.Queue[tuple[int, dict[str, Any]] | None]] = []
        self._connections: set[Any] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._venue: threading.Thread | None = None
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._wake = threading.Condition(self.lock)
        self._stop = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None
        port = self._httpd.server_address[1]
        return f"http://127.0.0.1:{port}"

    @property
    def ws_url(self) -> str:
        """The trade-updates websocket: ``ws://<host>/stream`` on the same port ([stream])."""
        return self.url.replace("http://", "ws://") + "/stream"

    def start(self) -> AlpacaServer:
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="alpaca-test-server",
            daemon=True,
        )
        self._thread.start()
        self._venue = threading.Thread(target=self._venue_loop, name="alpaca-test-venue")
        self._venue.daemon = True
        self._venue.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            self._wake.notify_all()
            for q in list(self._subscribers):
                q.put(None)
        if self._venue is not None:
            self._venue.join(timeout=5)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(2)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> AlpacaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _venue_loop(self) -> None:
        next_tick = time.monotonic() + (self.tick_interval_s or 0)
        with self.lock:
            while not self._stop.is_set():
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    _, _, action = heapq.heappop(self._timers)
                    action()
                if self.tick_interval_s and now >= next_tick:
                    self.tick()
                    next_tick = now + self.tick_interval_s
                waits = [self._timers[0][0] - now] if self._timers else []
                if self.tick_interval_s:
                    waits.append(next_tick - now)
                self._wake.wait(timeout=max(0.001, min(waits)) if waits else 0.2)

    def _later(self, delay_s: float, action: Callable[[], None]) -> None:
        """Run ``action`` under the lock on the venue thread after ``delay_s``."""
        heapq.heappush(self._timers, (time.monotonic() + delay_s, next(self._timer_seq), action))
        self._wake.notify_all()

    # -- test controls --------------------------------------------------------------------------

    def set_price(self, symbol: str, price: float) -> None:
        """Set the market price: working limit/stop orders it crosses fill (fully); triggered
        bracket stop legs are replaced ([bt-80]) or take the take profit's place ([py-198])."""
        key = position_key(symbol)
        with self.lock:
            self.prices[key] = _dec(price)
            for o in list(self.orders.values()):
                if position_key(o.symbol) != key or not o.is_open:
                    continue
                if o.status == "held":
                    if self._leg_active(o) and self._cross_price(o) is not None:
                        self._trigger_stop_leg(o)
                    continue
                if o.status == "accepted" or (o.parent_id and not self._leg_active(o)):
                    continue
                px = self._cross_price(o)
                if px is not None:
                    self._fill(o, o.remaining, px)

    def set_clock(
        self,
        *,
        is_open: bool,
        next_open: datetime | None = None,
        next_close: datetime | None = None,
    ) -> None:
        """Set the market clock. Opening it releases equity orders queued as ``accepted``
        ([orders]: orders outside market hours are queued for the next open)."""
        with self.lock:
            self.market_is_open = is_open
            if next_open is not None:
                self.next_open = next_open
            if next_close is not None:
                self.next_close = next_close
            if is_open:
                for o in list(self.orders.values()):
                    if o.status == "accepted" and o.parent_id is None:
                        self._set_status(o, "new", "new")
                        if self.fill_mode == "immediate" and o.type == "market":
                            self._fill(o, o.remaining, self._price(o.symbol))

    def fill(
        self,
        order_id: str,
        qty: float | Decimal | None = None,
        price: float | Decimal | None = None,
    ) -> None:
        """Fill ``qty`` (default: the remainder) of an order at ``price`` (default: market).
        A ``pending_cancel`` order can still fill ([forum-cancel])."""
        with self.lock:
            o = self._get(order_id)
            if not o.is_open or o.status == "held":
                raise ValueError(f"order {order_id} is {o.status}, cannot fill")
            q = o.remaining if qty is None else _dec(qty)
            self._fill(o, q, self._price(o.symbol) if price is None else _dec(price))

    def tick(self) -> int:
        """Advance every working market order by one slice; returns how many fills happened."""
        n = 0
        with self.lock:
            for o in list(self.orders.values()):
                if o.status == "pending_new":
                    self._set_status(o, "new", "new")
                    continue
                if not o.is_open or o.status in ("held", "accepted"):
                    continue
                if o.parent_id and not self._leg_active(o):
                    continue
                if o.type != "market":
                    px = self._cross_price(o)
                    if px is not None:
                        self._fill(o, o.remaining, px)
                        n += 1
                    continue
                step = (o.qty / self.partial_steps).quantize(QTY_STEP, rounding=ROUND_DOWN)
                if o.qty == o.qty.to_integral_value() and "/" not in o.symbol:
                    # a whole-share order fills in whole shares (only fractional orders
                    # execute in fractions, [fractional])
                    step = max(step.to_integral_value(rounding=ROUND_DOWN), Decimal(1))
                last = step <= 0 or step >= o.remaining or len(o.fills) >= self.partial_steps - 1
                self._fill(o, o.remaining if last else step, self._price(o.symbol))
                n += 1
        return n

    def settle_cancels(self) -> int:
        """Turn every ``pending_cancel`` order ``canceled`` now; returns how many."""
        with self.lock:
            pending = [o for o in self.orders.values() if o.status == "pending_cancel"]
            for o in pending:
                self._finish_cancel(o)
            return len(pending)

    def cancel_by_venue(self, order_id: str) -> None:
        """The venue cancels an order (e.g. IOC remainder)."""
        with self.lock:
            self._finish_cancel(self._get(order_id))

    def expire(self, order_id: str) -> None:
        """A day order expires at the close."""
        with self.lock:
            o = self._get(order_id)
            o.expired_at = _now()
            self._set_status(o, "expired", "expired")
            for leg in self._legs(o):
                if leg.is_open:
                    leg.expired_at = _now()
                    self._set_status(leg, "expired", "expired")

    def reject(self, order_id: str) -> None:
        """The venue rejects an accepted order."""
        with self.lock:
            o = self._get(order_id)
            o.failed_at = _now()
            self._set_status(o, "rejected", "rejected")
            for leg in self._legs(o):
                if leg.is_open:
                    self._set_status(leg, "canceled", "canceled")

    def replace(self, order_id: str, **changes: Any) -> str:
        """Replace an order (as ``PATCH /v2/orders/{id}`` does); returns the new order's id."""
        with self.lock:
            return self._replace(self._get(order_id), changes).id

    def vanish(self, order_id: str) -> None:
        """The API stops showing an order (listings and lookups answer as if it never existed):
        a replacement Alpaca made but never lets the client see."""
        with self.lock:
            o = self.orders.pop(order_id)
            self.by_coid.pop(o.client_order_id, None)
            self.vanished[order_id] = o

    def add_position(self, symbol: str, qty: float, avg_price: float) -> None:
        """Give the account an existing position (start-up reconciliation tests)."""
        key = position_key(symbol)
        with self.lock:
            self.positions[key] = _dec(qty)
            self.cost[key] = _dec(qty) * _dec(avg_price)
            if "/" in symbol:
                self.crypto.add(key)
            self.prices.setdefault(key, _dec(avg_price))
            self.cash -= _dec(qty) * _dec(avg_price)

    def place(self, body: dict[str, Any]) -> dict[str, Any]:
        """Create an order directly (as another client of the account would)."""
        with self.lock:
            return self._render(self._submit(body), nested=True)

    def order_by_coid(self, coid: str) -> dict[str, Any] | None:
        with self.lock:
            oid = self.by_coid.get(coid)
            return None if oid is None else self._render(self.orders[oid], nested=True)

    def position_qty(self) -> dict[str, Decimal]:
        """Position key -> signed quantity (zero positions left out)."""
        with self.lock:
            return {k: v for k, v in self.positions.items() if v != 0}

    def open_orders(self) -> list[dict[str, Any]]:
        """Every order still working, held legs included (what the account really has)."""
        with self.lock:
            return [self._render(o, nested=False) for o in self.orders.values() if o.is_open]

    def count(self, method: str, path: str) -> int:
        """Requests answered (not faulted) with this method and exact path."""
        return sum(
            1
            for r in list(self.requests)
            if r.method == method and r.path == path and r.fault is None
        )

    def count_kind(self, kind: str) -> int:
        """Requests of this kind (see :attr:`Req.kind`) answered, on either API."""
        return sum(1 for r in list(self.requests) if r.kind == kind and r.fault is None)

    def stream_clients(self) -> int:
        """Open trade-updates connections (websocket or SSE)."""
        with self.lock:
            return len(self._subscribers)

    def drop_streams(self) -> None:
        """Close every trade-updates connection (clients reconnect; polling covers the gap)."""
        with self.lock:
            for q in list(self._subscribers):
                q.put(None)

    drop_websockets = drop_streams

    # -- internals: orders ------------------------------------------------------------------------

    def _get(self, order_id: str) -> _Order:
        o = self.orders.get(order_id)
        if o is None:
            raise ApiError(404, 40410000, "order not found")
        return o

    def _legs(self, o: _Order) -> list[_Order]:
        return [self.orders[i] for i in o.leg_ids]

    def _siblings(self, o: _Order) -> list[_Order]:
        if o.parent_id is None:
            return []
        return [x for x in self._legs(self.orders[o.parent_id]) if x.id != o.id]

    def _exit_partners(self, o: _Order) -> list[_Order]:
        """The other exits of the same one-cancels-other group: a bracket/OTO leg's siblings;
        an OCO's take profit (its parent) and stop leg for each other."""
        if o.parent_id is not None:
            parent = self.orders[o.parent_id]
            partners = self._siblings(o)
            return [parent, *partners] if parent.order_class == "oco" else partners
        if o.order_class == "oco":
            return self._legs(o)
        return []

    def _leg_active(self, leg: _Order) -> bool:
        """A bracket/OTO leg works once its entry filled; an OCO leg at once."""
        if leg.parent_id is None:
            return True
        parent = self.orders[leg.parent_id]
        return parent.order_class == "oco" or parent.status == "filled"

    def _price(self, symbol: str) -> Decimal:
        return self.prices.get(position_key(symbol), Decimal(100))

    def _cross_price(self, o: _Order) -> Decimal | None:
        """Fill price when the current market price crosses the order, else None."""
        p = self._price(o.symbol)
        buy = o.side == "buy"
        if o.type == "limit" and o.limit_price is not None:
            if (buy and p <= o.limit_price) or (not buy and p >= o.limit_price):
                return o.limit_price
        elif o.type in ("stop", "stop_limit") and o.stop_price is not None:
            if (buy and p >= o.stop_price) or (not buy and p <= o.stop_price):
                if o.type == "stop":
                    return p
                # [orders] stop-limit: once the stop price is reached the order becomes a limit
                # order ("after election"), which rests until its limit is met
                o.elected = True
            if o.type == "stop_limit" and o.elected:
                lim = o.limit_price
                if lim is not None and ((buy and p <= lim) or (not buy and p >= lim)):
                    return p
        elif o.type == "trailing_stop":
            o.hwm = p if o.hwm is None else (max(o.hwm, p) if not buy else min(o.hwm, p))
            if o.trail_price is not None:
                trig = o.hwm - o.trail_price if not buy else o.hwm + o.trail_price
            else:
                pct = (o.trail_percent or Decimal(0)) / 100
                trig = o.hwm * (1 - pct) if not buy else o.hwm * (1 + pct)
            if (not buy and p <= trig) or (buy and p >= trig):
                return p
        return None

    def _emit(
        self,
        event: str,
        o: _Order,
        *,
        qty: Decimal | None = None,
        price: Decimal | None = None,
    ) -> None:
        key = position_key(o.symbol)
        msg: dict[str, Any] = {
            "event": event,
            "timestamp": _iso(_now()),
            "order": self._render(o, nested=False),
        }
        if qty is not None:
            msg.update(
                execution_id=str(uuid.uuid4()),
                qty=_s(qty),
                price=_s(price),
                position_qty=_s(self.positions.get(key, Decimal(0))),
            )
        self.events.append(msg)
        seq = len(self.events)
        for q in list(self._subscribers):
            q.put((seq, msg))

    def _set_status(self, o: _Order, status: str, event: str | None) -> None:
        o.status = status
        o.updated_at = _now()
        if event:
            self._emit(event, o)

    def _fill(self, o: _Order, qty: Decimal, price: Decimal) -> None:
        qty = min(qty, o.remaining)
        if qty <= 0:
            return
        key = position_key(o.symbol)
        signed = qty if o.side == "buy" else -qty
        crypto = o.asset_class == "crypto"
        fee = Decimal(0)
        if crypto:
            # [crypto-fees]: charged on the credited asset: coins on a buy, USD on a sell.
            rate = self.crypto_maker if o.maker else self.crypto_taker
            if o.side == "buy":
                fee = (qty * rate).quantize(QTY_STEP, rounding=ROUND_HALF_EVEN)
            else:
                fee = (qty * price * rate).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
                self.fees_usd += fee
            o.fees += fee
            self.crypto.add(key)
        old = self.positions.get(key, Decimal(0))
        delta = signed - fee if crypto and o.side == "buy" else signed
        new = old + delta
        cost = self.cost.get(key, Decimal(0))
        if old == 0 or (old > 0) == (delta > 0):
            cost += signed * price
        elif abs(delta) <= abs(old):
            cost = cost * new / old if old else Decimal(0)
        else:  # flips side: the remainder opens at this price
            cost = new * price
        self.positions[key] = new
        self.cost[key] = cost if new != 0 else Decimal(0)
        self.cash -= signed * price
        if crypto and o.side == "sell":
            self.cash -= fee
        o.filled_qty += qty
        o.filled_value += qty * price
        o.fills.append((qty, price))
        o.updated_at = _now()
        if o.remaining == 0:
            o.status = "filled"
            o.filled_at = o.updated_at
            self._emit("fill", o, qty=qty, price=price)
            self._after_fill(o)
        else:
            if o.status != "pending_cancel":
                o.status = "partially_filled"
            self._emit("partial_fill", o, qty=qty, price=price)

    def _after_fill(self, o: _Order) -> None:
        if o.leg_ids and o.order_class in ("bracket", "oto"):
            # [py-198]: the entry filled: the take profit goes live ("new"), the stop-loss leg
            # stays "held" (Alpaca watches its trigger itself).
            for leg in self._legs(o):
                if leg.status == "held" and leg.type == "limit":
                    self._set_status(leg, "new", "new")
            for leg in self._legs(o):
                if leg.status == "new":
                    px = self._cross_price(leg)
                    if px is not None:
                        self._fill(leg, leg.remaining, px)
                        return
                elif leg.status == "held" and self._cross_price(leg) is not None:
                    self._trigger_stop_leg(leg)
                    return
        elif o.order_class == "oco" or o.parent_id is not None:
            # an exit filled: the other exits of its group are canceled (one-cancels-other); a
            # held leg's cancel is not sent on the stream ([py-198])
            for sib in self._exit_partners(o):
                if sib.is_open:
                    self._finish_cancel(sib, emit=sib.status != "held")

    def _exit_left(self, leg: _Order) -> Decimal:
        """What a stop-loss leg may still sell (buy) when it triggers: the exits of a bracket or
        OCO share one closing allocation ([py-322], [js-87]: one allocation per bracket), so
        what its take profit already filled is gone from it; and never more than the position
        left in the closing direction (Alpaca's qty check: a sell beyond the long position
        would open a short, [flip]). No Alpaca text covers a take profit partially filled
        before the stop triggers; this is the strict minimum (issue 13, finding 2)."""
        partners = self._exit_partners(leg)
        left = leg.qty - leg.filled_qty - sum((p.filled_qty for p in partners), Decimal(0))
        held = self.positions.get(position_key(leg.symbol), Decimal(0))
        room = held if leg.side == "sell" else -held
        return max(Decimal(0), min(left, room))

    def _trigger_stop_leg(self, leg: _Order) -> None:
        """A held stop-loss leg's stop price was crossed."""
        siblings = [s for s in self._exit_partners(leg) if s.is_open]
        left = self._exit_left(leg)
        if left <= 0:
            # nothing left to close: the leg ends with its group (one-cancels-other)
            for x in [leg, *siblings]:
                self._finish_cancel(x)
            return
        if left < leg.remaining:
            leg.qty = leg.filled_qty + left
        if self.stop_trigger == "replace_take_profit" and siblings:
            # [py-198] variant: the live take profit is replaced by the stop leg, which fills.
            for tp in siblings:
                tp.replaced_at = _now()
                tp.replaced_by = None if self.hide_replaced_by else leg.id
                tp.hide_replaced_by = self.hide_replaced_by
                self._set_status(tp, "replaced", "replaced")
            self._set_status(leg, "new", "new")
            self._fill(leg, leg.remaining, self._price(leg.symbol))
            return
        # [bt-80]: the stop loss "is replaced by a different order and then filled"; the take
        # profit is canceled (OCO) so the shares it held go to the new order.
        for tp in siblings:
            self._finish_cancel(tp)
        new = _Order(
            id=str(uuid.uuid4()),
            client_order_id=str(uuid.uuid4()),
            symbol=leg.symbol,
            asset_class=leg.asset_class,
            side=leg.side,
            type=leg.type,
            qty=leg.remaining,
            time_in_force=leg.time_in_force,
            order_class=leg.order_class,
            limit_price=leg.limit_price,
            stop_price=leg.stop_price,
            replaces=leg.id,
            status="new",
        )
        self.orders[new.id] = new
        self.by_coid[new.client_order_id] = new.id
        leg.replaced_at = _now()
        leg.replaced_by = new.id
        leg.hide_replaced_by = self.hide_replaced_by
        self._set_status(leg, "replaced", "replaced")
        self._emit("new", new)
        px = self._cross_price(new)
        if px is not None:
            self._fill(new, new.remaining, px)

    def _request_cancel(self, o: _Order) -> None:
        """``DELETE``: [orders] 422 when the order is no longer cancelable, else 204 and
        ``pending_cancel`` until the venue confirms ([forum-cancel]). A bracket's legs go with
        their parent; cancelling a leg cancels its siblings (OCO)."""
        if not o.is_open or o.status == "pending_cancel":
            raise ApiError(422, 42210000, "order is not cancelable")
        family = [o]
        if o.leg_ids:
            family += [x for x in self._legs(o) if x.is_open]
        family += [x for x in self._exit_partners(o) if x.is_open and x not in family]
        for x in family:
            if x.status == "pending_cancel":
                continue
            self._set_status(x, "pending_cancel", "pending_cancel")
            if self.cancel_latency_s is not None:
                self._later(self.cancel_latency_s, functools.partial(self._finish_cancel, x))

    def _finish_cancel(self, o: _Order, emit: bool = True) -> None:
        if o.status in ("filled", "canceled", "expired", "rejected", "replaced"):
            return
        o.canceled_at = _now()
        self._set_status(o, "canceled", "canceled" if emit else None)
        for leg in self._legs(o):
            if leg.is_open:
                leg.canceled_at = _now()
                self._set_status(leg, "canceled", "canceled" if leg.status != "held" else None)

    def _replace(self, o: _Order, changes: dict[str, Any]) -> _Order:
        """``PATCH``: [orders] an open simple order; [replace] not before Alpaca routed it,
        not when nothing changes, never below what already filled."""
        if (
            not o.is_open
            or o.leg_ids
            or o.parent_id
            or o.status in ("pending_cancel", "pending_replace", "done_for_day")
        ):
            raise ApiError(422, 42210000, "order is not replaceable")
        if o.status in ("accepted", "pending_new"):
            raise ApiError(
                422, 42210000, "unable to replace order, order isn't sent to exchange yet"
            )
        fields = ("qty", "limit_price", "stop_price", "trail", "time_in_force")
        current = {
            "qty": o.qty,
            "limit_price": o.limit_price,
            "stop_price": o.stop_price,
            "trail": o.trail_price if o.trail_price is not None else o.trail_percent,
            "time_in_force": o.time_in_force,
        }
        asked = {k: changes.get(k) for k in fields if changes.get(k) is not None}
        if not any(
            (str(v) != current[k]) if k == "time_in_force" else _dec(v) != current[k]
            for k, v in asked.items()
        ):
            raise ApiError(403, 40310000, "order parameters are not changed")
        if asked.get("qty") is not None and _dec(asked["qty"]) <= o.filled_qty:
            raise ApiError(422, 42210000, f"qty must be > filled_qty ({_s(o.filled_qty)})")
        if o.asset_class != "crypto":
            for name in ("limit_price", "stop_price"):
                if asked.get(name) is not None and _sub_penny(_dec(asked[name])):
                    raise ApiError(
                        422,
                        42210000,
                        f"invalid {name} {_s(_dec(asked[name]))}. sub-penny increment does not "
                        "fulfill minimum pricing criteria",
                    )
        new = _Order(
            id=str(uuid.uuid4()),
            client_order_id=str(changes.get("client_order_id") or uuid.uuid4()),
            symbol=o.symbol,
            asset_class=o.asset_class,
            side=o.side,
            type=o.type,
            qty=_dec(changes["qty"]) if changes.get("qty") is not None else o.qty,
            time_in_force=str(changes.get("time_in_force") or o.time_in_force),
            limit_price=_dec(changes["limit_price"])
            if changes.get("limit_price") is not None
            else o.limit_price,
            stop_price=_dec(changes["stop_price"])
            if changes.get("stop_price") is not None
            else o.stop_price,
            trail_price=o.trail_price,
            trail_percent=o.trail_percent,
            replaces=o.id,
            status="new",
        )
        if new.client_order_id in self.by_coid:
            raise ApiError(422, 40010001, "client_order_id must be unique")
        # Alpaca: the replacement carries the remaining quantity; what filled stays filled.
        self.orders[new.id] = new
        self.by_coid[new.client_order_id] = new.id
        o.replaced_at, o.replaced_by = _now(), new.id
        o.hide_replaced_by = self.hide_replaced_by
        self._set_status(o, "replaced", "replaced")
        self._emit("new", new)
        return new

    def _validate(self, body: dict[str, Any]) -> None:
        def bad(msg: str) -> ApiError:
            return ApiError(422, 40010001, msg)

        for key in ("symbol", "side", "type", "time_in_force"):
            if not body.get(key):
                raise bad(f"{key} is required")
        if body["side"] not in ("buy", "sell"):
            raise bad("invalid side")
        if body["type"] not in ("market", "limit", "stop", "stop_limit", "trailing_stop"):
            raise bad("invalid order type")
        if body["time_in_force"] not in ("day", "gtc", "opg", "cls", "ioc", "fok"):
            raise bad("invalid time_in_force")
        if body["time_in_force"] in ("opg", "cls") and body["type"] not in ("market", "limit"):
            # [orders] "Time in Force": opg / cls go with a market or limit order (market/limit
            # on open, market/limit on close) only (helper-75: the fake took a stop)
            raise bad(f"{body['time_in_force']} orders must be market or limit orders")
        if body["type"] == "trailing_stop" and body["time_in_force"] not in ("day", "gtc"):
            # [orders] "Trailing Stop Orders": time in force day or gtc only
            raise bad("trailing stop orders must be DAY or GTC orders")
        if body.get("qty") is None and body.get("notional") is None:
            raise bad("qty or notional is required")
        if body.get("qty") is not None and body.get("notional") is not None:
            raise bad("qty and notional are mutually exclusive")  # [fractional]
        if body.get("qty") is not None and _dec(body["qty"]) <= 0:
            raise bad("qty must be > 0")
        if position_key(body["symbol"]) in self.unknown_symbols:
            raise bad(f'asset "{body["symbol"]}" not found')
        oco_take = (body.get("take_profit") or {}).get("limit_price")
        if (
            body["type"] in ("limit", "stop_limit")
            and body.get("limit_price") is None
            and not (body.get("order_class") == "oco" and oco_take)
        ):
            # [orders]: an OCO may carry its limit in take_profit.limit_price
            raise bad("limit_price is required")
        if body["type"] in ("stop", "stop_limit") and body.get("stop_price") is None:
            raise bad("stop_price is required")
        crypto = "/" in body["symbol"]
        oc = body.get("order_class") or "simple"
        if crypto:
            if body["time_in_force"] not in ("gtc", "ioc"):
                raise bad("invalid crypto time_in_force")
            if body["type"] not in CRYPTO_TYPES:
                raise bad(f"invalid order type for crypto order: {body['type']}")
            if oc != "simple":
                raise bad(f"crypto orders must be simple orders, not {oc}")
            minimum = CRYPTO_MIN_ORDER_SIZE.get(body["symbol"])
            if minimum is not None and body.get("qty") is not None and _dec(body["qty"]) < minimum:
                raise bad(f"qty must be >= {_s(minimum)}")
        fractional = body.get("notional") is not None or (
            body.get("qty") is not None
            and _dec(body["qty"]) != _dec(body["qty"]).to_integral_value()
        )
        if not crypto and fractional:
            # [fractional]: day orders only, simple orders, no trailing stops
            if body["time_in_force"] != "day":
                raise bad("fractional orders must be DAY orders")
            if oc != "simple" or body["type"] == "trailing_stop":
                raise bad(f"fractional orders must be simple orders, not {oc} {body['type']}")
        if not crypto:
            # [subpenny]: >= $1.00 in cents, below $1.00 to 4 decimals
            prices = [
                ("limit_price", body.get("limit_price")),
                ("stop_price", body.get("stop_price")),
            ]
            prices += [
                (f"{leg}.{name}", (body.get(leg) or {}).get(name))
                for leg in ("take_profit", "stop_loss")
                for name in ("limit_price", "stop_price")
            ]
            for name, value in prices:
                if value is not None and _sub_penny(_dec(value)):
                    raise ApiError(
                        422,
                        42210000,
                        f"invalid {name} {_s(_dec(value))}. sub-penny increment does not fulfill "
                        "minimum pricing criteria",
                    )
        if body.get("extended_hours") and (
            body["type"] != "limit" or body["time_in_force"] != "day"
        ):
            # [orders] extended hours: limit orders with time in force day only
            raise bad("extended hours order must be DAY limit orders")
        if oc == "bracket":
            if not (body.get("take_profit") or {}).get("limit_price"):
                raise bad("bracket orders must specify take_profit.limit_price")
            if not (body.get("stop_loss") or {}).get("stop_price"):
                raise bad("bracket orders must specify stop_loss.stop_price")
        if oc in ("bracket", "oto"):
            self._validate_bracket(body, oc)
        if oc == "oco":
            # [orders] OCO: exit orders only, a limit (take profit) with a stop-loss leg
            if body["type"] != "limit":
                raise bad("oco orders must be limit orders")
            if not (body.get("stop_loss") or {}).get("stop_price"):
                raise bad("oco orders must specify stop_loss.stop_price")
        if oc == "oto" and not (body.get("take_profit") or body.get("stop_loss")):
            raise bad("oto orders must specify take_profit or stop_loss")
        if body.get("client_order_id") and len(str(body["client_order_id"])) > 128:
            raise bad("client_order_id must be at most 128 characters")

    def _validate_bracket(self, body: dict[str, Any], oc: str) -> None:
        """[bracket]: time in force day/gtc; exits on the exit side of the base price."""
        if body["time_in_force"] not in ("day", "gtc"):
            raise ApiError(
                422, 42210000, f"{oc} orders must be day or gtc, not {body['time_in_force']}"
            )
        buy = body["side"] == "buy"
        base = (
            _dec(body["limit_price"])
            if body["type"] in ("limit", "stop_limit") and body.get("limit_price") is not None
            else _dec(body["stop_price"])
            if body["type"] == "stop" and body.get("stop_price") is not None
            else self._price(body["symbol"])
        )
        take = (body.get("take_profit") or {}).get("limit_price")
        stop = (body.get("stop_loss") or {}).get("stop_price")
        if take is not None:
            tp = _dec(take)
            if buy and tp < base + CENT:
                raise ApiError(
                    422,
                    42210000,
                    f"take_profit.limit_price must be >= base_price + 0.01 (base_price {_s(base)})",
                )
            if not buy and tp > base - CENT:
                raise ApiError(
                    422,
                    42210000,
                    f"take_profit.limit_price must be <= base_price - 0.01 (base_price {_s(base)})",
                )
        if stop is not None:
            sp = _dec(stop)
            if buy and sp > base - CENT:
                raise ApiError(
                    422,
                    42210000,
                    f"stop_loss.stop_price must be <= base_price - 0.01 (base_price {_s(base)})",
                )
            if not buy and sp < base + CENT:
                raise ApiError(
                    422,
                    42210000,
                    f"stop_loss.stop_price must be >= base_price + 0.01 (base_price {_s(base)})",
                )

    def _wash_trade(self, body: dict[str, Any]) -> None:
        """[wash]: refuse a new order that could fill against a working opposite-side order of
        the same symbol, by the table of docs.alpaca.markets/docs/user-protection "Preventing
        Wash Trades": market, limit, stop and stop-limit orders all count (a stop is "always
        rejected" against an opposite market order, e.g. "stop sell | market buy"); two orders
        that both carry a limit price (limit or stop-limit) conflict only when the buy's limit
        is at or above the sell's; complex orders (bracket, OTO, OCO and their legs) and
        trailing stops are the exceptions, new or working. ``pending_cancel`` orders are on
        their way out and do not count (issue 13, finding 3)."""
        if body["type"] == "trailing_stop" or (body.get("order_class") or "simple") != "simple":
            return
        key = position_key(body["symbol"])
        side = body["side"]
        limit = body.get("limit_price")
        new_px = (
            _dec(limit) if body["type"] in ("limit", "stop_limit") and limit is not None else None
        )
        for o in self.orders.values():
            if (
                position_key(o.symbol) != key
                or o.side == side
                or not o.is_open
                or o.status == "pending_cancel"
                or o.type == "trailing_stop"
                or o.parent_id is not None
                or o.order_class in ("bracket", "oto", "oco")
            ):
                continue
            old_px = o.limit_price if o.type in ("limit", "stop_limit") else None
            if new_px is None or old_px is None:
                crosses = True  # a market or stop order on either side: always rejected
            else:
                buy_px, sell_px = (new_px, old_px) if side == "buy" else (old_px, new_px)
                crosses = buy_px >= sell_px
            if crosses:
                raise ApiError(403, 40310000, "potential wash trade detected. use complex orders")

    def _reserving(self, o: _Order) -> Decimal:
        """Quantity an open order holds back from its position ([py-322], [js-87]): one
        closing allocation per bracket (the held stop leg shares the take profit's), nothing
        for a leg whose entry has not filled."""
        if not o.is_open:
            return Decimal(0)
        if o.parent_id is not None:
            parent = self.orders[o.parent_id]
            if parent.order_class != "oco" and parent.status != "filled":
                return Decimal(0)
            if o.status == "held" and any(
                s.is_open and s.status != "held" for s in self._siblings(o)
            ):
                return Decimal(0)
            if parent.order_class == "oco":
                return Decimal(0)  # the OCO's parent (the take profit) holds the shares
        return o.remaining

    def _available(self, key: str, side: str) -> tuple[Decimal, Decimal]:
        """``(position, quantity free to close it)`` for an order on ``side``."""
        held = self.positions.get(key, Decimal(0))
        reserved = sum(
            (
                self._reserving(o)
                for o in self.orders.values()
                if position_key(o.symbol) == key and o.side == side
            ),
            Decimal(0),
        )
        return held, (held if side == "sell" else -held) - reserved

    def _buying_power(self) -> Decimal:
        """[orders], [short]: cash less what open buy orders and open short sells already
        claim, less the value of short positions (their proceeds are not buying power)."""
        claimed = Decimal(0)
        for o in self.orders.values():
            if o.is_open and o.side == "buy" and o.parent_id is None:
                px = o.limit_price or self._price(o.symbol) * MARKET_BUY_BUFFER
                claimed += o.remaining * px
            elif o.is_open and o.short_open and o.parent_id is None:
                px = max(o.limit_price or Decimal(0), self._price(o.symbol) * SHORT_BUFFER)
                claimed += o.remaining * px
        shorts = sum(
            (-q * self.prices.get(k, Decimal(100)) for k, q in self.positions.items() if q < 0),
            Decimal(0),
        )
        return self.cash - claimed - shorts

    def _check_funds(self, body: dict[str, Any]) -> None:
        key = position_key(body["symbol"])
        qty = _dec(body["qty"]) if body.get("qty") is not None else None
        crypto = "/" in body["symbol"]
        side = body["side"]
        held, free = self._available(key, side)
        closing = held if side == "sell" else -held  # > 0: this order reduces a position
        if crypto and side == "sell" and qty is not None and qty > max(free, Decimal(0)):
            # [crypto]: no shorting; [py-322]: open sells hold their coins back
            base = body["symbol"].split("/")[0]
            raise ApiError(
                403,
                40310000,
                f"insufficient balance for {base} (requested: {_s(qty)}, "
                f"available: {_s(max(free, Decimal(0)))})",
            )
        if not crypto and qty is not None and closing > 0 and qty > free:
            # [py-322], [js-87], [bt-127]: shares held by open orders cannot be sold again;
            # [flip]: nor can an order close a position and open the other side
            raise ApiError(
                403,
                40310000,
                f"insufficient qty available for order (requested: {_s(qty)}, "
                f"available: {_s(max(free, Decimal(0)))})",
            )
        if not crypto and side == "sell" and closing <= 0 and not self.shorting:
            raise ApiError(
                403,
                40310000,
                f"insufficient qty available for order (requested: {_s(qty)}, available: 0)",
            )
        oc = body.get("order_class") or "simple"
        if oc in ("bracket", "oto") and closing > 0:
            # [bracket] (alpaca-trade-api-js #248): a bracket opens a position
            raise ApiError(422, 42210000, "bracket orders must be entry orders")
        if not crypto and side == "sell" and closing <= 0:
            if qty is None or qty != qty.to_integral_value():
                # [fractional] (alpaca-trade-api-python #405)
                raise ApiError(403, 40310000, "fractional orders are not allowed to short")
            if key in self.unshortable:
                raise ApiError(403, 40310000, f"asset {body['symbol']} cannot be sold short")
            px = max(
                _dec(body["limit_price"]) if body.get("limit_price") is not None else Decimal(0),
                self._price(body["symbol"]) * SHORT_BUFFER,
            )
            if qty * px > self._buying_power():
                # [short]: MAX(limit price, 3% above the ask) * qty against buying power
                raise ApiError(403, 40310000, "insufficient buying power")
        if side == "buy" and closing <= 0:
            px = (
                _dec(body["limit_price"])
                if body.get("limit_price") is not None
                else self._price(body["symbol"]) * MARKET_BUY_BUFFER
            )
            cost = qty * px if qty is not None else _dec(body["notional"])
            if cost > self._buying_power():
                # [orders]: open buy orders already claim part of the buying power
                raise ApiError(403, 40310000, "insufficient buying power")

    def _submit(self, body: dict[str, Any]) -> _Order:
        if self.account_blocked:
            raise ApiError(403, 40310000, "account is not allowed to trade")
        self._validate(body)
        # The request is checked against the account before the order is stored under its
        # client_order_id, so a resent submit whose first attempt landed (and used the buying
        # power or the shares) may be told "insufficient ..." rather than "must be unique".
        self._check_funds(body)
        self._wash_trade(body)
        coid = str(body.get("client_order_id") or uuid.uuid4())
        if coid in self.by_coid:
            raise ApiError(422, 40010001, "client_order_id must be unique")
        oc = body.get("order_class") or ""
        if oc == "simple":
            oc = ""
        crypto = "/" in body["symbol"]
        qty = (
            _dec(body["qty"])
            if body.get("qty") is not None
            else (_dec(body["notional"]) / self._price(body["symbol"])).quantize(
                QTY_STEP, ROUND_DOWN
            )
        )
        extended = bool(body.get("extended_hours"))
        # [orders]: outside market hours, orders not eligible for extended hours are queued
        waits = not crypto and not self.market_is_open and not extended

        def opt(name: str, src: dict[str, Any] | None = None) -> Decimal | None:
            v = (src if src is not None else body).get(name)
            return None if v is None else _dec(v)

        o = _Order(
            id=str(uuid.uuid4()),
            client_order_id=coid,
            symbol=body["symbol"],
            asset_class="crypto" if crypto else "us_equity",
            side=body["side"],
            type=body["type"],
            qty=qty,
            time_in_force=body["time_in_force"],
            order_class=oc,
            limit_price=opt("limit_price")
            if oc != "oco" or body.get("limit_price") is not None
            else opt("limit_price", body.get("take_profit")),
            stop_price=opt("stop_price"),
            trail_price=opt("trail_price"),
            trail_percent=opt("trail_percent"),
            extended_hours=extended,
            status="accepted" if waits else "new",
        )
        o.maker = o.type == "limit" and self._cross_price(o) is None
        o.short_open = (
            not crypto
            and o.side == "sell"
            and self.positions.get(position_key(o.symbol), Decimal(0)) <= 0
        )
        self.orders[o.id] = o
        self.by_coid[coid] = o.id
        if oc in ("bracket", "oto", "oco"):
            tp, sl = body.get("take_profit"), body.get("stop_loss")
            legs: list[tuple[str, Decimal | None, Decimal | None]] = []
            if tp and oc != "oco":
                legs.append(("limit", opt("limit_price", tp), None))
            if sl:
                legs.append(
                    (
                        "stop_limit" if sl.get("limit_price") else "stop",
                        opt("limit_price", sl),
                        opt("stop_price", sl),
                    )
                )
            exit_side = o.side if oc == "oco" else ("sell" if o.side == "buy" else "buy")
            for typ, lim, stop in legs:
                leg = _Order(
                    id=str(uuid.uuid4()),
                    client_order_id=str(uuid.uuid4()),
                    symbol=o.symbol,
                    asset_class=o.asset_class,
                    side=exit_side,
                    type=typ,
                    qty=qty,
                    time_in_force=o.time_in_force,
                    order_class=oc,
                    limit_price=lim,
                    stop_price=stop,
                    status="held",
                    parent_id=o.id,
                    maker=typ == "limit",
                )
                self.orders[leg.id] = leg
                self.by_coid[leg.client_order_id] = leg.id
                o.leg_ids.append(leg.id)
        self._emit("new" if not waits else "accepted", o)
        if not waits:
            if o.type == "market" and self.fill_mode == "immediate":
                self._fill(o, o.remaining, self._price(o.symbol))
            elif o.type != "market":
                px = self._cross_price(o)
                if px is not None and self.fill_mode == "immediate":
                    self._fill(o, o.remaining, px)
            if o.is_open and o.time_in_force in ("ioc", "fok") and self.fill_mode == "immediate":
                self._finish_cancel(o)
            if oc == "oco" and o.is_open:
                for leg in self._legs(o):
                    if leg.status == "held" and self._cross_price(leg) is not None:
                        self._trigger_stop_leg(leg)
        return o

    def _render(self, o: _Order, *, nested: bool) -> dict[str, Any]:
        typ = o.type
        intent = "to_open"
        if o.parent_id is not None or o.order_class == "oco":
            intent = "to_close"
        out: dict[str, Any] = {
            "id": o.id,
            "client_order_id": o.client_order_id,
            "created_at": _iso(o.created_at),
            "updated_at": _iso(o.updated_at),
            "submitted_at": _iso(o.created_at),
            "filled_at": _iso(o.filled_at),
            "expired_at": _iso(o.expired_at),
            "canceled_at": _iso(o.canceled_at),
            "failed_at": _iso(o.failed_at),
            "replaced_at": _iso(o.replaced_at),
            "replaced_by": None if o.hide_replaced_by else o.replaced_by,
            "replaces": o.replaces,
            "asset_id": str(uuid.uuid5(uuid.NAMESPACE_URL, position_key(o.symbol))),
            "symbol": o.symbol,
            "asset_class": o.asset_class,
            "notional": None,
            "qty": _s(o.qty),
            "filled_qty": _s(o.filled_qty),
            "filled_avg_price": _s(o.avg_price),
            "order_class": o.order_class,
            "order_type": typ,
            "type": typ,
            "side": o.side,
            "position_intent": f"{o.side}_{intent}",
            "time_in_force": o.time_in_force,
            "limit_price": _s(o.limit_price),
            "stop_price": _s(o.stop_price),
            "status": o.status,
            "extended_hours": o.extended_hours,
            "legs": [self._render(leg, nested=False) for leg in self._legs(o)]
            if nested and o.leg_ids
            else None,
            "trail_percent": _s(o.trail_percent),
            "trail_price": _s(o.trail_price),
            "hwm": _s(o.hwm),
            "subtag": None,
            "source": None,
            "expires_at": None,
        }
        return {k: out[k] for k in ORDER_KEYS}

    def _account(self, api: str = "trading") -> dict[str, Any]:
        long_mv = sum(
            (q * self.prices.get(k, Decimal(100)) for k, q in self.positions.items() if q > 0),
            Decimal(0),
        )
        short_mv = sum(
            (q * self.prices.get(k, Decimal(100)) for k, q in self.positions.items() if q < 0),
            Decimal(0),
        )
        equity = self.cash + long_mv + short_mv
        acct = dict(BROKER_ACCOUNT_TEMPLATE if api == "broker" else ACCOUNT_TEMPLATE)
        if api == "broker":
            acct.update(cash_withdrawable=_s(self.cash), cash_transferable=_s(self.cash))
        acct.update(
            id=self.account_id,
            cash=_s(self.cash),
            equity=_s(equity),
            portfolio_value=_s(equity),
            last_equity=_s(equity),
            long_market_value=_s(long_mv),
            short_market_value=_s(short_mv),
            position_market_value=_s(long_mv + short_mv),
            buying_power=_s(self._buying_power()),
            regt_buying_power=_s(self._buying_power()),
            non_marginable_buying_power=_s(self._buying_power()),
            multiplier="1",
            trading_blocked=self.account_blocked,
        )
        return acct

    def _position(self, key: str) -> dict[str, Any]:
        qty = self.positions[key]
        price = self.prices.get(key, Decimal(100))
        cost = self.cost.get(key, Decimal(0))
        crypto = key in self.crypto
        avg = cost / qty if qty else Decimal(0)
        mv = qty * price
        pl = mv - cost
        side = "sell" if qty > 0 else "buy"
        _, free = self._available(key, side)
        out = {
            "asset_id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
            "symbol": key,
            "exchange": "CRYPTO" if crypto else "NASDAQ",
            "asset_class": "crypto" if crypto else "us_equity",
            "asset_marginable": not crypto,
            "qty": _s(qty),
            "avg_entry_price": _s(abs(avg).quantize(QTY_STEP)),
            "side": "long" if qty > 0 else "short",
            "market_value": _s(mv),
            "cost_basis": _s(cost),
            "unrealized_pl": _s(pl),
            "unrealized_plpc": _s(pl / abs(cost)) if cost else "0",
            "unrealized_intraday_pl": _s(pl),
            "unrealized_intraday_plpc": _s(pl / abs(cost)) if cost else "0",
            "current_price": _s(price),
            "lastday_price": _s(price),
            "change_today": "0",
            "qty_available": _s(max(free, Decimal(0)) if qty > 0 else -max(free, Decimal(0))),
        }
        return {k: out[k] for k in POSITION_KEYS}

    # -- routing ----------------------------------------------------------------------------------

    def route(self, method: str, path: str) -> tuple[str, str, str | None]:
        """``(api, kind, account id in the path)`` of a request path."""
        if path.startswith("/v1/"):
            api = "broker"
            rest = path[len("/v1") :]
            account = None
            if rest.startswith("/trading/accounts/"):
                parts = rest.split("/")
                account = parts[3] if len(parts) > 3 else ""
                rest = "/" + "/".join(parts[4:])
            elif rest.startswith("/events/trades"):
                return api, "events", None
        elif path.startswith("/v2/events/trades"):
            return "broker", "events", None
        elif path.startswith("/v2/"):
            api, rest, account = "trading", path[len("/v2") :], None
        elif path == "/stream":
            return "trading", "stream", None
        else:
            return "trading", "other", None
        if rest == "/account":
            kind = "account"
        elif rest.startswith("/positions"):
            kind = "positions"
        elif rest == "/clock":
            kind = "clock"
        elif rest == "/orders":
            kind = {"GET": "list", "POST": "submit", "DELETE": "cancel_all"}.get(method, "other")
        elif rest == "/orders:by_client_order_id":
            kind = "by_coid"
        elif rest.startswith("/orders/"):
            kind = {"GET": "order", "DELETE": "cancel", "PATCH": "replace"}.get(method, "other")
        else:
            kind = "other"
        return api, kind, account

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        """Answer one REST call on either API: (HTTP status, JSON body or None)."""
        q = {k: v[-1] for k, v in query.items()}
        api, kind, account = self.route(method, path)
        rest = path.split("/orders", 1)[-1] if "/orders" in path else ""
        with self.lock:
            if api == "broker" and kind != "clock" and account != self.account_id:
                raise ApiError(404, 40410000, "account not found")
            if kind == "account":
                if self.fail_account:
                    raise ApiError(500, 50010000, "internal server error")
                return 200, self._account(api)
            if kind == "clock":
                if self.fail_clock:
                    raise ApiError(503, 50310000, "service unavailable")
                return 200, {
                    "timestamp": _now().isoformat(),
                    "is_open": self.market_is_open,
                    "next_open": self.next_open.isoformat(),
                    "next_close": self.next_close.isoformat(),
                }
            if kind == "positions" and method == "GET":
                sym = path.split("/positions", 1)[1].strip("/")
                if not sym:
                    return 200, [self._position(k) for k, v in sorted(self.positions.items()) if v]
                key = position_key(unquote(sym))
                if not self.positions.get(key):
                    raise ApiError(404, 40410000, "position does not exist")
                return 200, self._position(key)
            if kind == "submit":
                if not isinstance(body, dict):
                    raise ApiError(400, 40010000, "request body format is invalid")
                return 200, self._render(self._submit(body), nested=True)
            if kind == "list":
                return 200, self._list(q)
            if kind == "cancel_all":
                out = []
                for o in list(self.orders.values()):
                    if o.is_open and o.parent_id is None and o.status != "pending_cancel":
                        self._request_cancel(o)
                        out.append({"id": o.id, "status": 200, "body": None})
                return 207, out
            if kind == "by_coid":
                oid = self.by_coid.get(q.get("client_order_id", ""))
                if oid is None:
                    raise ApiError(404, 40410000, "order not found")
                return 200, self._render(self.orders[oid], nested=True)
            if kind in ("order", "cancel", "replace"):
                oid = rest.strip("/")
                try:
                    uuid.UUID(oid)
                except ValueError as e:
                    raise ApiError(422, 40010001, "order_id is missing") from e
                o = self._get(oid)
                if kind == "order":
                    return 200, self._render(o, nested=q.get("nested") in ("true", "True"))
                if kind == "cancel":
                    self._request_cancel(o)
                    return 204, None
                return 200, self._render(self._replace(o, body or {}), nested=True)
        raise ApiError(404, 40410000, "endpoint not found")

    def _list(self, q: dict[str, str]) -> list[dict[str, Any]]:
        """``GET /orders``: [py-322], [js-87]: ``status=open`` lists open orders except held
        ones (held legs count as closed); ``nested=true`` rolls legs up under their parent,
        which is listed by its own status (a filled entry takes its live legs out of the open
        list)."""
        status = q.get("status", "open")
        # [orders] "Get all orders": status is open, closed or all; direction asc or desc;
        # after/until are timestamps; anything else is refused (422), never ignored
        if status not in ("open", "closed", "all"):
            raise ApiError(422, 40010001, f"invalid status: {status}")
        if q.get("direction", "desc") not in ("asc", "desc"):
            raise ApiError(422, 40010001, f"invalid direction: {q['direction']}")
        try:
            limit = min(int(q.get("limit", 50)), 500)
        except ValueError as e:
            raise ApiError(422, 40010001, f"invalid limit: {q['limit']}") from e
        nested = q.get("nested") in ("true", "True")

        def stamp(name: str) -> datetime | None:
            if not q.get(name):
                return None
            try:
                return datetime.fromisoformat(q[name].replace("Z", "+00:00"))
            except ValueError as e:
                raise ApiError(422, 40010001, f"invalid {name}: {q[name]}") from e

        after, until = stamp("after"), stamp("until")
        symbols = set(q["symbols"].split(",")) if q.get("symbols") else None
        rows = []
        for o in self.orders.values():
            if nested and o.parent_id is not None:
                continue  # rolled up under its parent
            listed_open = o.status in LISTED_OPEN
            if status == "open" and not listed_open:
                continue
            if status == "closed" and listed_open:
                continue
            if after and o.created_at <= after:
                continue
            if until and o.created_at >= until:
                continue
            if symbols and o.symbol not in symbols and position_key(o.symbol) not in symbols:
                continue
            rows.append(o)
        rows.sort(key=lambda o: o.created_at, reverse=q.get("direction", "desc") == "desc")
        return [self._render(o, nested=nested) for o in rows[:limit]]

    # -- faults -----------------------------------------------------------------------------------

    def draw_fault(self, method: str, path: str, kind: str) -> tuple[str | None, bool | None]:
        """``(fault or None, processed)`` for one request (``processed`` only for forced
        faults; else :meth:`processed` decides)."""
        plan = self.faults
        with self.lock:
            for i, (k, fault, processed) in enumerate(self._forced):
                if k == kind:
                    del self._forced[i]
                    return fault, processed
        if (
            plan.rate <= 0
            or not path.startswith(plan.paths)
            or (plan.methods and method not in plan.methods)
            or (plan.kinds_for and kind not in plan.kinds_for)
            or kind in ("events", "stream")
        ):
            return None, None
        with self.lock:
            if plan.limit is not None and self.faults_injected >= plan.limit:
                return None, None
            if self._rng.random() >= plan.rate:
                return None, None
            self.faults_injected += 1
            return self._rng.choice(plan.kinds), None

    def processed(self) -> bool:
        """Was a lost request processed anyway? (``FaultPlan.processed`` or a coin flip)"""
        if self.faults.processed is not None:
            return self.faults.processed
        with self.lock:
            return self._rng.random() < 0.5

    # -- streams ----------------------------------------------------------------------------------

    def subscribe(self, since: int | None) -> queue.Queue[tuple[int, dict[str, Any]] | None]:
        """A queue of ``(sequence, trade update)`` for one stream connection; with ``since``,
        the events after that sequence number are replayed first ([broker-api])."""
        q: queue.Queue[tuple[int, dict[str, Any]] | None] = queue.Queue()
        with self.lock:
            if since is not None:
                for i, msg in enumerate(self.events[since:], start=since + 1):
                    q.put((i, msg))
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue[tuple[int, dict[str, Any]] | None]) -> None:
        with self.lock, contextlib.suppress(ValueError):
            self._subscribers.remove(q)


def _ulid_of(seq: int) -> str:
    """A sortable 26-character id for event ``seq`` (the shape of the v2 events' ULIDs)."""
    return f"{seq:026d}"


def _seq_of(event_id: str) -> int:
    return int(event_id)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # injected resets break pipes on purpose


class _Handler(BaseHTTPRequestHandler):
    app: AlpacaServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every call costs ~44 ms (delayed ACK)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet

    def _authorized(self, api: str) -> str | None:
        """The account the credentials name, or None. The Trading API takes the key headers,
        the Broker API HTTP Basic auth ([broker-api]); neither takes the other's keys."""
        app = self.app
        if api == "trading":
            if (
                self.headers.get("APCA-API-KEY-ID") == app.api_key
                and self.headers.get("APCA-API-SECRET-KEY") == app.secret_key
            ):
                return app.account_id
            return None
        auth = self.headers.get("Authorization") or ""
        if not auth.startswith("Basic "):
            return None
        try:
            key, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
        except ValueError:
            return None
        if key == app.broker_key and secret == app.broker_secret:
            return app.account_id
        return None

    def _serve(self, method: str) -> None:
        app = self.app
        parts = urlsplit(self.path)
        api, kind, _ = app.route(method, parts.path)
        rec = Req(
            t=time.perf_counter(),
            method=method,
            path=parts.path,
            query=parse_qs(parts.query),
            kind=kind,
            api=api,
        )
        app.requests.append(rec)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if kind in ("stream", "events") and app.stream_connect_latency_s:
            time.sleep(app.stream_connect_latency_s)
        if kind == "stream":
            self._websocket(rec)
            return
        account = self._authorized(api)
        if account is None:
            self._send(401, {"code": 40110000, "message": "request is not authorized"}, rec)
            return
        allowed, headers = app.rate.hit(account)
        if not allowed:
            # [rate]: over 200 requests in the minute
            self._send(429, {"code": 42910000, "message": "rate limit exceeded"}, rec, headers)
            return
        if kind == "events":
            self._sse(rec)
            return
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            self._send(400, {"code": 40010000, "message": "request body format is invalid"}, rec)
            return
        rec.body = body
        if app.answer_latency_s:
            time.sleep(app.answer_latency_s)
        fault, forced_processed = app.draw_fault(method, parts.path, kind)
        rec.fault = fault
        if fault in ("429", "500", "502", "503"):
            code = {"429": 42910000, "500": 50010000, "502": 50210000, "503": 50310000}[fault]
            msg = "rate limit exceeded" if fault == "429" else "internal server error"
            self._send(int(fault), {"code": code, "message": msg}, rec)  # no rate headers
            return
        if fault in ("timeout", "reset"):
            rec.processed = app.processed() if forced_processed is None else forced_processed
            if rec.processed:  # processed, the answer is lost
                with contextlib.suppress(ApiError):
                    app.handle(method, parts.path, rec.query, body)
            if fault == "timeout":
                time.sleep(app.faults.stall_s)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(2)
            return
        try:
            status, out = app.handle(method, parts.path, rec.query, body)
        except ApiError as e:
            self._send(e.status, {"code": e.code, "message": e.message}, rec, headers)
            return
        except Exception as e:
            self._send(500, {"code": 50010000, "message": f"test server error: {e!r}"}, rec)
            return
        self._send(status, out, rec, headers)

    def _send(
        self, status: int, body: Any, rec: Req, headers: dict[str, str] | None = None
    ) -> None:
        rec.status = status
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    # -- SSE ([broker-api]) -----------------------------------------------------------------------

    def _sse(self, rec: Req) -> None:
        app = self.app
        v1 = rec.path.startswith("/v1/")
        raw_since: str | None = (rec.query.get("since_id") or [None])[-1]  # type: ignore[list-item]
        since = None
        if raw_since is not None:
            since = int(raw_since) if v1 else _seq_of(raw_since)
        rec.status = 200
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        q = app.subscribe(since)
        app._connections.add(self.connection)
        try:
            self.wfile.write(b": connected\n\n")
            self.wfile.flush()
            while not app._stop.is_set():
                try:
                    item = q.get(timeout=app.sse_heartbeat_s)
                except queue.Empty:
                    self.wfile.write(b": heartbeat\n\n")  # a comment: no event
                    self.wfile.flush()
                    continue
                if item is None:
                    return
                seq, msg = item
                event = dict(msg)
                event["account_id"] = app.account_id
                event["at"] = msg["timestamp"]
                event["event_id"] = seq if v1 else _ulid_of(seq)
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
        except OSError:
            return
        finally:
            app.unsubscribe(q)
            app._connections.discard(self.connection)

    # -- websocket ([stream]; RFC 6455 framing, no extensions) ------------------------------------

    def _websocket(self, rec: Req) -> None:
        app = self.app
        key = self.headers.get("Sec-WebSocket-Key")
        if (self.headers.get("Upgrade") or "").lower() != "websocket" or not key:
            self._send(400, {"code": 40010000, "message": "websocket upgrade required"}, rec)
            return
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        rec.status = 101
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        write_lock = threading.Lock()
        sock = self.connection
        app._connections.add(sock)

        def send(opcode: int, payload: bytes) -> None:
            n = len(payload)
            if n < 126:
                head = struct.pack("!BB", 0x80 | opcode, n)
            elif n < 65536:
                head = struct.pack("!BBH", 0x80 | opcode, 126, n)
            else:
                head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
            with write_lock:
                sock.sendall(head + payload)

        def recv() -> tuple[int, bytes] | None:
            head = self.rfile.read(2)
            if len(head) < 2:
                return None
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack("!H", self.rfile.read(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self.rfile.read(8))[0]
            mask = self.rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytearray(self.rfile.read(n))
            for i in range(len(data)):
                data[i] ^= mask[i % 4]
            return opcode, bytes(data)

        def text(msg: dict[str, Any]) -> None:
            send(0x1, json.dumps(msg).encode())

        q: queue.Queue[tuple[int, dict[str, Any]] | None] | None = None
        pump: threading.Thread | None = None
        try:
            frame = recv()
            auth = json.loads(frame[1]) if frame and frame[0] == 0x1 else {}
            data = auth.get("data") or {}
            if (
                auth.get("action") != "authenticate"
                or data.get("key_id") != app.api_key
                or data.get("secret_key") != app.secret_key
            ):
                text(
                    {
                        "stream": "authorization",
                        "data": {"status": "unauthorized", "action": "authenticate"},
                    }
                )
                send(0x8, struct.pack("!H", 1008))
                return
            text(
                {
                    "stream": "authorization",
                    "data": {"status": "authorized", "action": "authenticate"},
                }
            )
            while True:
                frame = recv()
                if frame is None or frame[0] == 0x8:
                    return
                if frame[0] == 0x9:
                    send(0xA, frame[1])
                    continue
                if frame[0] == 0x1:
                    break
            listen = json.loads(frame[1])
            streams = (listen.get("data") or {}).get("streams") or []
            text({"stream": "listening", "data": {"streams": streams}})
            q = app.subscribe(None)

            def pump_events() -> None:
                assert q is not None
                while True:
                    item = q.get()
                    if item is None:
                        with contextlib.suppress(OSError):
                            send(0x8, struct.pack("!H", 1001))
                            sock.shutdown(2)
                        return
                    with contextlib.suppress(OSError):
                        text({"stream": "trade_updates", "data": item[1]})

            pump = threading.Thread(target=pump_events, name="alpaca-test-ws", daemon=True)
            pump.start()
            while True:
                frame = recv()
                if frame is None or frame[0] == 0x8:
                    return
                if frame[0] == 0x9:
                    send(0xA, frame[1])
        except (OSError, ValueError, struct.error):
            return
        finally:
            if q is not None:
                app.unsubscribe(q)
                q.put(None)
            if pump is not None:
                pump.join(timeout=2)
            app._connections.discard(sock)

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PATCH(self) -> None:
        self._serve("PATCH")


@contextlib.contextmanager
def running(**kwargs: Any) -> Iterator[AlpacaServer]:
    """``with running(fill_mode="immediate") as server: ...`` (stopped on exit)."""
    server = AlpacaServer(**kwargs).start()
    try:
        yield server
    finally:
        server.stop()
