"""A local Alpaca Trading API v2 server for tests and benchmarks (stdlib ``http.server``).

It keeps real order state and answers in Alpaca's documented JSON shapes (the keys of the example
responses in ``tests/data/alpaca/``; decimals as strings), so the real ``alpaca-py`` client runs
against it unchanged: ``TradingClient(key, secret, url_override=server.url)``.

What it models:
    * orders: market, limit, stop, stop-limit, trailing stop; ``order_class`` simple, ``bracket``
      and ``oto`` with legs ``held`` until the parent fills, then ``new``; one exit leg filling
      cancels the other. Statuses: pending_new -> new/accepted -> partially_filled -> filled,
      canceled, expired, rejected, replaced (``PATCH`` or :meth:`AlpacaServer.replace`).
    * ``client_order_id`` is unique: a second submit with the same id is refused with 422
      ``client_order_id must be unique`` (what makes client retries safe).
    * fills are driven by the test: :meth:`fill` (any quantity, partials exact), :meth:`tick`
      (every working market order fills ``partial_steps`` equal slices, the last one the exact
      remainder; limit/stop orders fill when :meth:`set_price` crosses them), or
      ``fill_mode="immediate"`` (market orders fill in the submit call).
    * the account: cash, equity, positions (crypto positions are keyed ``BTCUSD``), buying
      power checks (403 ``insufficient buying power``), crypto balance checks, the market
      clock (``set_clock``) under which equity orders wait as ``accepted``.
    * errors as Alpaca sends them: ``{"code": N, "message": "..."}`` with the HTTP status.
    * fault injection on ``/v2`` calls at ``FaultPlan.rate``: 429, 500, 502, 503, ``timeout``
      (the handler stalls past the client's timeout, with the request processed or not) and
      ``reset`` (the connection closes without an answer, processed or not).
    * optional ``trade_updates`` websocket (``websockets`` sync server, its own port).

Every request is logged in :attr:`AlpacaServer.requests` (arrival time, method, path, status,
fault), which tests and the benchmark read.

Thread context: one handler thread per connection; all state changes hold one lock.
"""

from __future__ import annotations

import contextlib
import json
import queue
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

DATA_DIR = Path(__file__).parent / "data" / "alpaca"
ORDER_KEYS: tuple[str, ...] = tuple(json.loads((DATA_DIR / "order_new.json").read_text()).keys())
ACCOUNT_TEMPLATE: dict[str, Any] = json.loads((DATA_DIR / "account.json").read_text())
POSITION_KEYS: tuple[str, ...] = tuple(
    json.loads((DATA_DIR / "positions.json").read_text())[0].keys()
)

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
QTY_STEP = Decimal("0.000000001")  # Alpaca accepts up to 9 decimals
FAULT_KINDS = ("429", "500", "502", "503", "timeout", "reset")


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _dec(x: Any) -> Decimal:
    return Decimal(str(x))


def _s(x: Decimal | None) -> str | None:
    if x is None:
        return None
    text = format(x.normalize(), "f")
    return text


def position_key(symbol: str) -> str:
    """Alpaca keys crypto positions without the slash: ``BTC/USD`` -> ``BTCUSD``."""
    return symbol.replace("/", "").upper()


class ApiError(Exception):
    """An Alpaca error answer: HTTP status and ``{"code", "message"}`` body."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class FaultPlan:
    """Faults injected on ``/v2`` requests.

    Attributes:
        rate: probability a request is hit (0 = never).
        kinds: kinds drawn uniformly from (see ``FAULT_KINDS``).
        seed: RNG seed, for reproducible runs.
        stall_s: how long a ``timeout`` fault stalls (must exceed the client's timeout).
        paths: only requests whose path starts with one of these are hit (default: all /v2).
        methods: only these HTTP methods are hit (empty: all).
        limit: at most this many faults in total (``None``: no limit).
        processed: for ``timeout``/``reset``: whether the request was processed before its
            answer was lost (``None``: a coin flip each time).
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500", "503", "timeout", "reset")
    seed: int = 0
    stall_s: float = 0.5
    paths: tuple[str, ...] = ("/v2/",)
    methods: tuple[str, ...] = ()
    limit: int | None = None
    processed: bool | None = None

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")


@dataclass
class Req:
    """One logged request."""

    t: float  # time.perf_counter() at arrival
    method: str
    path: str
    query: dict[str, list[str]]
    status: int = 0
    fault: str | None = None
    body: Any = None


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
        return (self.filled_value / self.filled_qty).quantize(Decimal("0.000000001"))


class AlpacaServer:
    """The server. Use as a context manager or call :meth:`start` / :meth:`stop`.

    Args:
        api_key, secret_key: the credentials the client must send.
        cash_usd: starting cash.
        prices: symbol -> price used for market fills and valuations (default 100).
        fill_mode: ``"manual"`` (fills only via :meth:`fill`/:meth:`tick`/:meth:`set_price`) or
            ``"immediate"`` (market orders fill in the submit call at the current price).
        partial_steps: slices per market order in :meth:`tick`.
        faults: the fault plan (default none).
        market_open: initial clock state.
        tick_interval_s: when set, a background thread calls :meth:`tick` this often.
        websocket: also serve the ``trade_updates`` stream on :attr:`ws_url`.
        shorting: allow equity sells beyond the position.
    """

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        secret_key: str = "test-secret",
        cash_usd: float = 100_000.0,
        prices: dict[str, float] | None = None,
        fill_mode: str = "manual",
        partial_steps: int = 1,
        faults: FaultPlan | None = None,
        market_open: bool = True,
        tick_interval_s: float | None = None,
        websocket: bool = False,
        shorting: bool = True,
    ) -> None:
        if fill_mode not in ("manual", "immediate"):
            raise ValueError(f"fill_mode must be manual or immediate, got {fill_mode!r}")
        if partial_steps < 1:
            raise ValueError("partial_steps must be >= 1")
        self.api_key, self.secret_key = api_key, secret_key
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
        self.requests: list[Req] = []
        self.faults_injected = 0
        self.shorting = shorting
        self.unknown_symbols: set[str] = {"NOPE"}
        self.market_is_open = market_open
        self.next_open = _now() + timedelta(hours=12)
        self.next_close = _now() + timedelta(hours=6)
        self.account_blocked = False
        self.fail_account = False  # every /v2/account call answers 500 (start-up failure test)
        self.tick_interval_s = tick_interval_s
        self._ws_enabled = websocket
        self._ws_queues: list[queue.Queue[str | None]] = []
        self._ws_server: Any = None
        self._ws_thread: threading.Thread | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ticker: threading.Thread | None = None
        self._stop = threading.Event()
        self.events: list[dict[str, Any]] = []  # every trade update emitted, in order

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None
        port = self._httpd.server_address[1]
        return f"http://127.0.0.1:{port}"

    @property
    def ws_url(self) -> str:
        assert self._ws_server is not None
        port = self._ws_server.socket.getsockname()[1]
        return f"ws://127.0.0.1:{port}/stream"

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
        if self._ws_enabled:
            self._start_ws()
        if self.tick_interval_s:
            self._ticker = threading.Thread(
                target=self._tick_loop, name="alpaca-test-ticker", daemon=True
            )
            self._ticker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self._ws_server is not None:
            for q in list(self._ws_queues):
                q.put(None)
            self._ws_server.shutdown()
            if self._ws_thread is not None:
                self._ws_thread.join(timeout=5)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> AlpacaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tick_loop(self) -> None:
        assert self.tick_interval_s is not None
        while not self._stop.wait(self.tick_interval_s):
            self.tick()

    # -- test controls --------------------------------------------------------------------------

    def set_price(self, symbol: str, price: float) -> None:
        """Set the market price; working limit/stop orders that it crosses fill (fully)."""
        key = position_key(symbol)
        with self.lock:
            self.prices[key] = _dec(price)
            for o in list(self.orders.values()):
                if o.is_open and position_key(o.symbol) == key and o.status != "held":
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
        """Set the market clock. Opening it releases equity orders waiting as ``accepted``."""
        with self.lock:
            self.market_is_open = is_open
            if next_open is not None:
                self.next_open = next_open
            if next_close is not None:
                self.next_close = next_close
            if is_open:
                for o in self.orders.values():
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
        """Fill ``qty`` (default: the remainder) of an order at ``price`` (default: market)."""
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
                if o.type != "market":
                    px = self._cross_price(o)
                    if px is not None:
                        self._fill(o, o.remaining, px)
                        n += 1
                    continue
                step = (o.qty / self.partial_steps).quantize(QTY_STEP, rounding=ROUND_DOWN)
                last = step <= 0 or step >= o.remaining or len(o.fills) >= self.partial_steps - 1
                self._fill(o, o.remaining if last else step, self._price(o.symbol))
                n += 1
        return n

    def cancel_by_venue(self, order_id: str) -> None:
        """The venue cancels an order (e.g. IOC remainder)."""
        with self.lock:
            self._cancel(self._get(order_id))

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
        with self.lock:
            return [self._render(o, nested=False) for o in self.orders.values() if o.is_open]

    def count(self, method: str, path: str) -> int:
        """Requests answered (not faulted) with this method and exact path."""
        return sum(
            1
            for r in list(self.requests)
            if r.method == method and r.path == path and r.fault is None
        )

    # -- internals -------------------------------------------------------------------------------

    def _get(self, order_id: str) -> _Order:
        o = self.orders.get(order_id)
        if o is None:
            raise ApiError(404, 40410000, "order not found")
        return o

    def _legs(self, o: _Order) -> list[_Order]:
        return [self.orders[i] for i in o.leg_ids]

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
        self, event: str, o: _Order, *, qty: Decimal | None = None, price: Decimal | None = None
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
        if self._ws_queues:
            text = json.dumps({"stream": "trade_updates", "data": msg})
            for q in list(self._ws_queues):
                q.put(text)

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
        old = self.positions.get(key, Decimal(0))
        new = old + signed
        cost = self.cost.get(key, Decimal(0))
        if old == 0 or (old > 0) == (signed > 0):
            cost += signed * price
        elif abs(signed) <= abs(old):
            cost = cost * new / old if old else Decimal(0)
        else:  # flips side: the remainder opens at this price
            cost = new * price
        self.positions[key] = new
        self.cost[key] = cost if new != 0 else Decimal(0)
        if o.asset_class == "crypto":
            self.crypto.add(key)
        self.cash -= signed * price
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
            o.status = "partially_filled"
            self._emit("partial_fill", o, qty=qty, price=price)

    def _after_fill(self, o: _Order) -> None:
        if o.leg_ids:  # a bracket/oto parent: its legs go live
            for leg in self._legs(o):
                if leg.status == "held":
                    self._set_status(leg, "new", "new")
            for leg in self._legs(o):
                px = self._cross_price(leg)
                if leg.is_open and px is not None:
                    self._fill(leg, leg.remaining, px)
                    break
        elif o.parent_id is not None:  # an exit leg filled: the other one is canceled
            parent = self.orders[o.parent_id]
            for leg in self._legs(parent):
                if leg.id != o.id and leg.is_open:
                    self._cancel(leg)

    def _cancel(self, o: _Order) -> None:
        if not o.is_open:
            raise ApiError(422, 42210000, "order is not cancelable")
        o.canceled_at = _now()
        self._set_status(o, "canceled", "canceled")
        family = (
            self._legs(o)
            if o.leg_ids
            else (self._legs(self.orders[o.parent_id]) if o.parent_id else [])
        )
        for leg in family:
            if leg.is_open:
                leg.canceled_at = _now()
                self._set_status(leg, "canceled", "canceled")

    def _replace(self, o: _Order, changes: dict[str, Any]) -> _Order:
        if not o.is_open or o.leg_ids or o.parent_id:
            raise ApiError(422, 42210000, "order is not replaceable")
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
        new.filled_qty, new.filled_value = Decimal(0), Decimal(0)
        # Alpaca: the replacement carries the remaining quantity; what filled stays filled.
        self.orders[new.id] = new
        self.by_coid[new.client_order_id] = new.id
        o.replaced_at, o.replaced_by = _now(), new.id
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
        if body.get("qty") is None and body.get("notional") is None:
            raise bad("qty or notional is required")
        if body.get("qty") is not None and _dec(body["qty"]) <= 0:
            raise bad("qty must be > 0")
        if position_key(body["symbol"]) in self.unknown_symbols:
            raise bad(f'asset "{body["symbol"]}" not found')
        if (
            body["type"] in ("limit", "stop_limit")
            and body.get("limit_price") is None
            and body.get("order_class") != "oco"
        ):
            raise bad("limit_price is required")
        if body["type"] in ("stop", "stop_limit") and body.get("stop_price") is None:
            raise bad("stop_price is required")
        crypto = "/" in body["symbol"]
        if crypto and body["time_in_force"] not in ("gtc", "ioc"):
            raise bad("invalid crypto time_in_force")
        if not crypto and body.get("qty") is not None:
            q = _dec(body["qty"])
            if q != q.to_integral_value() and (
                body["type"] != "market" or body["time_in_force"] != "day"
            ):
                raise bad("fractional orders must be simple market day orders")
        oc = body.get("order_class") or "simple"
        if oc in ("bracket", "oco"):
            if not (body.get("take_profit") or {}).get("limit_price"):
                raise bad("bracket orders must specify take_profit.limit_price")
            if not (body.get("stop_loss") or {}).get("stop_price"):
                raise bad("bracket orders must specify stop_loss.stop_price")
        if body.get("client_order_id") and len(str(body["client_order_id"])) > 128:
            raise bad("client_order_id must be at most 128 characters")

    def _check_funds(self, body: dict[str, Any]) -> None:
        key = position_key(body["symbol"])
        qty = _dec(body["qty"]) if body.get("qty") is not None else None
        px = (
            _dec(body["limit_price"])
            if body.get("limit_price") is not None
            else self._price(body["symbol"])
        )
        if body["side"] == "buy":
            cost = qty * px if qty is not None else _dec(body["notional"])
            if cost > self.cash:
                raise ApiError(403, 40310000, "insufficient buying power")
        else:
            held = self.positions.get(key, Decimal(0))
            if "/" in body["symbol"] and qty is not None and qty > held:
                base = body["symbol"].split("/")[0]
                raise ApiError(
                    403,
                    40310000,
                    f"insufficient balance for {base} (requested: "
                    f"{_s(qty)}, available: {_s(held)})",
                )
            if not self.shorting and qty is not None and qty > held:
                raise ApiError(
                    403,
                    40310000,
                    "insufficient qty available for order "
                    f"(requested: {_s(qty)}, available: {_s(held)})",
                )

    def _submit(self, body: dict[str, Any]) -> _Order:
        if self.account_blocked:
            raise ApiError(403, 40310000, "account is not allowed to trade")
        self._validate(body)
        coid = str(body.get("client_order_id") or uuid.uuid4())
        if coid in self.by_coid:
            raise ApiError(422, 40010001, "client_order_id must be unique")
        self._check_funds(body)
        crypto = "/" in body["symbol"]
        qty = (
            _dec(body["qty"])
            if body.get("qty") is not None
            else (_dec(body["notional"]) / self._price(body["symbol"])).quantize(
                QTY_STEP, ROUND_DOWN
            )
        )
        oc = body.get("order_class") or ""
        if oc == "simple":
            oc = ""
        waits = not crypto and not self.market_is_open

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
            limit_price=opt("limit_price"),
            stop_price=opt("stop_price"),
            trail_price=opt("trail_price"),
            trail_percent=opt("trail_percent"),
            extended_hours=bool(body.get("extended_hours")),
            status="accepted" if waits else "new",
        )
        self.orders[o.id] = o
        self.by_coid[coid] = o.id
        if oc in ("bracket", "oto", "oco"):
            exit_side = "sell" if o.side == "buy" else "buy"
            tp, sl = body.get("take_profit"), body.get("stop_loss")
            legs: list[tuple[str, Decimal | None, Decimal | None]] = []
            if tp:
                legs.append(("limit", opt("limit_price", tp), None))
            if sl:
                legs.append(
                    (
                        "stop_limit" if sl.get("limit_price") else "stop",
                        opt("limit_price", sl),
                        opt("stop_price", sl),
                    )
                )
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
                self._cancel(o)
        return o

    def _render(self, o: _Order, *, nested: bool) -> dict[str, Any]:
        typ = o.type
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
            "replaced_by": o.replaced_by,
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
            "position_intent": f"{o.side}_to_open",
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

    def _account(self) -> dict[str, Any]:
        long_mv = sum(
            (q * self.prices.get(k, Decimal(100)) for k, q in self.positions.items() if q > 0),
            Decimal(0),
        )
        short_mv = sum(
            (q * self.prices.get(k, Decimal(100)) for k, q in self.positions.items() if q < 0),
            Decimal(0),
        )
        equity = self.cash + long_mv + short_mv
        acct = dict(ACCOUNT_TEMPLATE)
        acct.update(
            cash=_s(self.cash),
            equity=_s(equity),
            portfolio_value=_s(equity),
            last_equity=_s(equity),
            long_market_value=_s(long_mv),
            short_market_value=_s(short_mv),
            position_market_value=_s(long_mv + short_mv),
            buying_power=_s(self.cash),
            regt_buying_power=_s(self.cash),
            non_marginable_buying_power=_s(self.cash),
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
        out = {
            "asset_id": str(uuid.uuid5(uuid.NAMESPACE_URL, key)),
            "symbol": key,
            "exchange": "CRYPTO" if crypto else "NASDAQ",
            "asset_class": "crypto" if crypto else "us_equity",
            "asset_marginable": not crypto,
            "qty": _s(qty),
            "avg_entry_price": _s(abs(avg)),
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
            "qty_available": _s(qty),
        }
        return {k: out[k] for k in POSITION_KEYS}

    # -- routing ----------------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        """Answer one API call: (HTTP status, JSON body or None)."""
        q = {k: v[-1] for k, v in query.items()}
        with self.lock:
            if path == "/v2/account":
                if self.fail_account:
                    raise ApiError(500, 50010000, "internal server error")
                return 200, self._account()
            if path == "/v2/clock":
                return 200, {
                    "timestamp": _now().isoformat(),
                    "is_open": self.market_is_open,
                    "next_open": self.next_open.isoformat(),
                    "next_close": self.next_close.isoformat(),
                }
            if path == "/v2/positions" and method == "GET":
                return 200, [self._position(k) for k, v in sorted(self.positions.items()) if v]
            if path.startswith("/v2/positions/") and method == "GET":
                key = position_key(path.rsplit("/", 1)[1].replace("%2F", "/"))
                if not self.positions.get(key):
                    raise ApiError(404, 40410000, "position does not exist")
                return 200, self._position(key)
            if path == "/v2/orders" and method == "POST":
                if not isinstance(body, dict):
                    raise ApiError(400, 40010000, "request body format is invalid")
                return 200, self._render(self._submit(body), nested=True)
            if path == "/v2/orders" and method == "GET":
                return 200, self._list(q)
            if path == "/v2/orders" and method == "DELETE":
                out = []
                for o in list(self.orders.values()):
                    if o.is_open and o.parent_id is None:
                        self._cancel(o)
                        out.append(
                            {"id": o.id, "status": 200, "body": self._render(o, nested=False)}
                        )
                return 207, out
            if path == "/v2/orders:by_client_order_id" and method == "GET":
                oid = self.by_coid.get(q.get("client_order_id", ""))
                if oid is None:
                    raise ApiError(404, 40410000, "order not found")
                return 200, self._render(self.orders[oid], nested=True)
            if path.startswith("/v2/orders/"):
                oid = path.rsplit("/", 1)[1]
                try:
                    uuid.UUID(oid)
                except ValueError as e:
                    raise ApiError(422, 40010001, "order_id is missing") from e
                o = self._get(oid)
                if method == "GET":
                    return 200, self._render(o, nested=q.get("nested") in ("true", "True"))
                if method == "DELETE":
                    self._cancel(o)
                    return 204, None
                if method == "PATCH":
                    return 200, self._render(self._replace(o, body or {}), nested=True)
        raise ApiError(404, 40410000, "endpoint not found")

    def _list(self, q: dict[str, str]) -> list[dict[str, Any]]:
        status = q.get("status", "open")
        limit = min(int(q.get("limit", 50)), 500)
        nested = q.get("nested") in ("true", "True")
        after = (
            datetime.fromisoformat(q["after"].replace("Z", "+00:00")) if q.get("after") else None
        )
        until = (
            datetime.fromisoformat(q["until"].replace("Z", "+00:00")) if q.get("until") else None
        )
        symbols = set(q["symbols"].split(",")) if q.get("symbols") else None
        rows = []
        for o in self.orders.values():
            if nested and o.parent_id is not None:
                continue  # rolled up under its parent
            family_open = o.is_open or (nested and any(leg.is_open for leg in self._legs(o)))
            if status == "open" and not family_open:
                continue
            if status == "closed" and family_open:
                continue
            if after and o.created_at <= after:
                continue
            if until and o.created_at > until:
                continue
            if symbols and o.symbol not in symbols:
                continue
            rows.append(o)
        rows.sort(key=lambda o: o.created_at, reverse=q.get("direction", "desc") == "desc")
        return [self._render(o, nested=nested) for o in rows[:limit]]

    # -- faults -----------------------------------------------------------------------------------

    def draw_fault(self, method: str, path: str) -> str | None:
        plan = self.faults
        if (
            plan.rate <= 0
            or not path.startswith(plan.paths)
            or (plan.methods and method not in plan.methods)
        ):
            return None
        with self.lock:
            if plan.limit is not None and self.faults_injected >= plan.limit:
                return None
            if self._rng.random() >= plan.rate:
                return None
            self.faults_injected += 1
            return self._rng.choice(plan.kinds)

    def processed(self) -> bool:
        """Was a lost request processed anyway? (``FaultPlan.processed`` or a coin flip)"""
        if self.faults.processed is not None:
            return self.faults.processed
        with self.lock:
            return self._rng.random() < 0.5

    # -- websocket --------------------------------------------------------------------------------

    def _start_ws(self) -> None:
        from websockets.sync.server import serve

        self._ws_server = serve(self._ws_handler, "127.0.0.1", 0)
        self._ws_thread = threading.Thread(
            target=self._ws_server.serve_forever, name="alpaca-test-ws", daemon=True
        )
        self._ws_thread.start()

    def _ws_handler(self, ws: Any) -> None:
        auth = json.loads(ws.recv(timeout=10))
        data = auth.get("data") or {}
        if (
            auth.get("action") != "authenticate"
            or data.get("key_id") != self.api_key
            or data.get("secret_key") != self.secret_key
        ):
            ws.send(
                json.dumps(
                    {
                        "stream": "authorization",
                        "data": {"status": "unauthorized", "action": "authenticate"},
                    }
                )
            )
            return
        ws.send(
            json.dumps(
                {
                    "stream": "authorization",
                    "data": {"status": "authorized", "action": "authenticate"},
                }
            )
        )
        listen = json.loads(ws.recv(timeout=10))
        streams = (listen.get("data") or {}).get("streams") or []
        ws.send(json.dumps({"stream": "listening", "data": {"streams": streams}}))
        q: queue.Queue[str | None] = queue.Queue()
        self._ws_queues.append(q)
        try:
            while not self._stop.is_set():
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    return
                ws.send(item)
        except Exception:
            return
        finally:
            with contextlib.suppress(ValueError):
                self._ws_queues.remove(q)

    def drop_websockets(self) -> None:
        """Close every websocket connection (the client should reconnect; polling covers)."""
        for q in list(self._ws_queues):
            q.put(None)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        return  # injected resets break pipes on purpose


class _Handler(BaseHTTPRequestHandler):
    app: AlpacaServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else every call costs ~44 ms (delayed ACK)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet

    def _serve(self, method: str) -> None:
        app = self.app
        parts = urlsplit(self.path)
        rec = Req(
            t=time.perf_counter(), method=method, path=parts.path, query=parse_qs(parts.query)
        )
        app.requests.append(rec)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if (
            self.headers.get("APCA-API-KEY-ID") != app.api_key
            or self.headers.get("APCA-API-SECRET-KEY") != app.secret_key
        ):
            self._send(401, {"code": 40110000, "message": "request is not authorized"}, rec)
            return
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            self._send(400, {"code": 40010000, "message": "request body format is invalid"}, rec)
            return
        rec.body = body
        fault = app.draw_fault(method, parts.path)
        rec.fault = fault
        if fault in ("429", "500", "502", "503"):
            code = {"429": 42910000, "500": 50010000, "502": 50210000, "503": 50310000}[fault]
            msg = "rate limit exceeded" if fault == "429" else "internal server error"
            self._send(int(fault), {"code": code, "message": msg}, rec)
            return
        if fault in ("timeout", "reset"):
            if app.processed():  # processed, the answer is lost
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
            self._send(e.status, {"code": e.code, "message": e.message}, rec)
            return
        except Exception as e:
            self._send(500, {"code": 50010000, "message": f"test server error: {e!r}"}, rec)
            return
        self._send(status, out, rec)

    def _send(self, status: int, body: Any, rec: Req) -> None:
        rec.status = status
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

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
