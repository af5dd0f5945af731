"""A local Alpaca market-data server for tests and benchmarks: the real-time websocket stream and
the historical bars/trades REST API, over one scripted market.

The market is a deterministic list of minutes per symbol (:class:`ScriptedMarket`): each minute
has its trades; its bar aggregates them (``o`` first price, ``h``/``l`` extremes, ``c`` last,
``v`` volume, ``n`` trade count, ``vw`` volume-weighted price), so stream bars, historical bars
and historical trades always agree. The test drives time: :meth:`AlpacaMarketServer.advance`
releases the next minutes -- their trades then their bar are sent to every subscribed session
(Alpaca sends a minute bar once the minute has closed) -- and only released minutes are visible
to the REST API. :meth:`AlpacaMarketServer.disconnect` drops every session, optionally releasing
minutes nobody receives (what a client misses while it reconnects).

Behaviour and its sources (alpacahq/alpaca-docs: ``content/api-references/market-data-api/
stock-pricing-data/realtime.md`` = RT, ``.../stock-pricing-data/historical.md`` = HIST,
``.../crypto-pricing-data/realtime.md``; alpaca-py 0.44 ``alpaca/data/live/websocket.py`` = PY):

* URL paths ``/v2/iex``, ``/v2/sip`` and ``/v1beta3/crypto/us`` (RT "URL"; PY ``CryptoDataStream``
  appends ``/v1beta3/crypto/us``); any other path is refused with HTTP 404.
* Encoding: msgpack frames when the client sends ``Content-Type: application/msgpack`` (what
  alpaca-py does, PY ``_connect``), JSON text otherwise (RT "Message format"); timestamps are
  msgpack Timestamp extensions in msgpack (PY ``_cast`` calls ``.to_datetime()`` on ``t``) and
  RFC-3339 text in JSON (RT schemas).
* Every server message is an array; control messages alone in an array of one, data points
  batched (RT "Message format").
* Welcome ``[{"T":"success","msg":"connected"}]`` on connect; ``auth`` with the right key and
  secret -> ``[{"T":"success","msg":"authenticated"}]`` (RT "Establishment").
* Errors ``{"T":"error","code","msg"}`` (RT "Errors"): 400 invalid syntax (not an object or no
  known ``action``), 401 not authenticated (subscribe before auth), 402 auth failed (wrong
  credentials), 403 already authenticated, 404 auth timeout (no auth within
  :attr:`AlpacaMarketServer.auth_timeout_s`; "You have a few seconds to authenticate"), 406
  connection limit exceeded (a second authenticated session on one key; "each account can have
  up to one concurrent websocket connection. Subsequent attempts to connect are rejected": the
  socket is then closed), 405 symbol limit exceeded (more than 30 ``trades``/``quotes``
  symbols on ``iex``, RT "Subscription Plans"; subscriptions unchanged), 409 insufficient
  subscription (``/v2/sip`` when the plan is ``iex``).
* ``subscribe``/``unsubscribe`` add/subtract channels; the answer lists every current
  subscription (RT "Subscription confirmation"); ``*`` is allowed for ``bars`` only.
* Bars ``{"T":"b","S","o","h","l","c","v","t","n","vw"}``, trades
  ``{"T":"t","S","i","x","p","s","t","c","z"}`` (stock) or ``{"T":"t","S","p","s","t","i",
  "tks"}`` (crypto) (RT "Data Points", crypto realtime.md).
* REST ``GET /v2/stocks/bars``, ``/v2/stocks/trades``, ``/v1beta3/crypto/us/bars``,
  ``/v1beta3/crypto/us/trades`` (HIST "Multi Bars", "Multi Trades"): ``symbols`` required,
  ``start``/``end`` RFC-3339 and inclusive ("equal to or after" / "equal to or before"; ``end``
  defaults to now = the released minutes), ``limit`` 1..10000 (default 1000), ``page_token``
  (``next_page_token`` null on the last page; it names the last item served),
  ``timeframe`` ``1Min`` (bars), ``feed`` ``iex``/``sip``; answers
  ``{"bars"|"trades": {symbol: [...]}, "next_page_token"}``, items ordered by symbol then time;
  stock endpoints need the ``APCA-API-KEY-ID`` /
  ``APCA-API-SECRET-KEY`` headers (403 otherwise); errors ``{"message": ...}`` with 400, 403,
  422, 429 (more than :attr:`AlpacaMarketServer.rate_limit_per_min` calls in a minute).

Test knobs (not Alpaca behaviour, named as such): :attr:`page_cap` caps a page below ``limit`` so
small data sets paginate; :meth:`fail_rest` makes the next REST calls fail with a status.

Thread context: the websocket server runs an asyncio loop on its own thread, the REST server a
``ThreadingHTTPServer``; state shared between them and the test thread holds one lock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import math
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import msgpack
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
STOCK_PATHS = {"/v2/iex": "iex", "/v2/sip": "sip"}
CRYPTO_PATH = "/v1beta3/crypto/us"
IEX_TRADE_QUOTE_LIMIT = 30  # RT "Subscription Plans", IEX: 30 channels for trades and quotes
STOCK_CHANNELS = (
    "trades",
    "quotes",
    "bars",
    "updatedBars",
    "dailyBars",
    "statuses",
    "lulds",
    "corrections",
    "cancelErrors",
)
CRYPTO_CHANNELS = ("trades", "quotes", "orderbooks", "bars", "updatedBars", "dailyBars")


def rfc3339(ns: int) -> str:
    """Nanoseconds since the epoch -> ``2024-01-02T14:30:00.123456789Z`` (fraction only when
    non-zero, as Alpaca writes trade times)."""
    sec, frac = divmod(ns, 1_000_000_000)
    text = (EPOCH + timedelta(seconds=sec)).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{frac:09d}Z" if frac else f"{text}Z"


def parse_time(text: str) -> int:
    """RFC-3339 (any fraction, ``Z`` or an offset) -> nanoseconds since the epoch.

    Raises:
        ValueError: not RFC-3339.
    """
    text = text.strip().replace(" ", "+")  # a '+' in a query string may arrive as a space
    frac = 0
    dot = text.find(".")
    if dot >= 0:
        end = dot + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        frac = int((text[dot + 1 : end] + "000000000")[:9])
        text = text[:dot] + text[end:]
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        raise ValueError("RFC-3339 needs an offset")
    return int((dt - EPOCH).total_seconds()) * 1_000_000_000 + frac


@dataclass(frozen=True, slots=True)
class Trade:
    ns: int
    price: float
    size: float
    id: int


@dataclass(frozen=True, slots=True)
class Minute:
    """One minute of one symbol: its trades and the bar they make."""

    symbol: str
    start_ns: int
    trades: tuple[Trade, ...]

    def bar(self) -> dict[str, Any]:
        """The bar's fields (``t`` as nanoseconds)."""
        p = [t.price for t in self.trades]
        v = sum(t.size for t in self.trades)
        vw = math.fsum(t.price * t.size for t in self.trades) / v
        return {
            "o": p[0],
            "h": max(p),
            "l": min(p),
            "c": p[-1],
            "v": v,
            "t": self.start_ns,
            "n": len(self.trades),
            "vw": vw,
        }


@dataclass(slots=True)
class ScriptedMarket:
    """Deterministic minutes of every symbol (a random walk of trades, seeded).

    Args:
        symbols: e.g. ``("AAA", "BBB")`` or ``("BTC/USD",)``.
        minutes: how many minutes.
        start: time of the first minute.
        seed: random seed.
        crypto: fractional sizes (coins) instead of whole shares.
        trades_per_minute: inclusive range of trades in a minute (>= 1: every minute has a bar).
    """

    symbols: tuple[str, ...]
    minutes: int
    start: datetime = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    seed: int = 7
    crypto: bool = False
    trades_per_minute: tuple[int, int] = (2, 12)
    data: dict[str, list[Minute]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        start_ns = int((self.start - EPOCH).total_seconds()) * 1_000_000_000
        trade_id = 1
        for k, symbol in enumerate(self.symbols):
            price = 100.0 + 37.0 * k
            rows = []
            for m in range(self.minutes):
                m_ns = start_ns + m * 60_000_000_000
                n = rng.randint(*self.trades_per_minute)
                offsets = sorted(rng.randrange(0, 60_000_000_000) for _ in range(n))
                trades = []
                # A drift that flips every 25 minutes gives moving averages something to cross.
                drift = 0.0015 if (m // 25) % 2 == 0 else -0.0015
                for off in offsets:
                    price = round(price * math.exp(drift / n + rng.gauss(0, 0.0008)), 2)
                    size = (
                        round(rng.uniform(0.001, 2.0), 6)
                        if self.crypto
                        else float(rng.randint(1, 500))
                    )
                    trades.append(Trade(m_ns + off, price, size, trade_id))
                    trade_id += 1
                rows.append(Minute(symbol, m_ns, tuple(trades)))
            self.data[symbol] = rows


@dataclass(slots=True)
class _Session:
    ws: ServerConnection
    feed: str
    msgpack: bool
    authenticated: bool = False
    key: str | None = None
    subs: dict[str, set[str]] = field(default_factory=dict)


class AlpacaMarketServer:
    """The websocket stream and the REST API over one :class:`ScriptedMarket`.

    Args:
        market: the scripted minutes.
        key, secret: the only credentials accepted.
        plan: ``iex`` (free: ``/v2/sip`` answers 409) or ``sip``.

    Attributes:
        ws_base: ``ws://127.0.0.1:PORT`` (append ``/v2/iex`` or ``/v1beta3/crypto/us``).
        rest_url: ``http://127.0.0.1:PORT`` (alpaca-py ``url_override`` of the data clients).
        released: minutes released so far (the market's "now").
        auth_timeout_s: seconds a connection may stay unauthenticated (error 404 then close).
        rate_limit_per_min: REST calls per minute before 429.
        page_cap: test knob: most items per REST page (``None``: ``limit``).
        errors_sent: codes of every error message sent, in order.
        rest_calls: ``(path, query)`` of every REST call.
        connections: websocket connections accepted.
    """

    def __init__(
        self,
        market: ScriptedMarket,
        *,
        key: str = "test-key",
        secret: str = "test-secret",
        plan: str = "iex",
    ) -> None:
        self.market = market
        self.key = key
        self.secret = secret
        self.plan = plan
        self.released = 0
        self.auth_timeout_s = 10.0
        self.rate_limit_per_min = 200
        self.page_cap: int | None = None
        self.errors_sent: list[int] = []
        self.rest_calls: list[tuple[str, dict[str, str]]] = []
        self.connections = 0
        self._rest_times: deque[float] = deque()
        self._fail: list[int] = []
        self._sessions: list[_Session] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws_server: Any = None
        self._ws_thread: threading.Thread | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None
        self.ws_base = ""
        self.rest_url = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> AlpacaMarketServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)

            async def main() -> None:
                self._ws_server = await serve(
                    self._handle, "127.0.0.1", 0, process_request=self._check_path
                )
                port = self._ws_server.sockets[0].getsockname()[1]
                self.ws_base = f"ws://127.0.0.1:{port}"
                ready.set()
                await self._ws_server.wait_closed()

            loop.run_until_complete(main())
            loop.close()

        self._ws_thread = threading.Thread(target=run, name="fake-alpaca-ws", daemon=True)
        self._ws_thread.start()
        owner = self

        class Handler(_RestHandler):
            server_owner = owner

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.rest_url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, name="fake-alpaca-rest", daemon=True
        )
        self._http_thread.start()
        if not ready.wait(10):
            raise RuntimeError("websocket server did not start")
        return self

    def stop(self) -> None:
        """Close every session and both servers, join the threads. Idempotent."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._loop is not None and self._ws_server is not None:
            loop, server = self._loop, self._ws_server
            self._ws_server = None

            async def close() -> None:
                server.close()
                await server.wait_closed()

            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=10)
        for t in (self._ws_thread, self._http_thread):
            if t is not None:
                t.join(10)

    def __enter__(self) -> AlpacaMarketServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stock_url(self) -> str:
        return f"{self.ws_base}/v2/iex"

    @property
    def crypto_url(self) -> str:
        return f"{self.ws_base}{CRYPTO_PATH}"

    # -- test controls ---------------------------------------------------------------------------

    def _run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)

    def advance(self, minutes: int = 1) -> None:
        """Release the next ``minutes``: each one's trades, then its bars, to every subscribed
        session. Returns when the frames are written to the sockets."""
        self._run(self._release(minutes))

    def disconnect(self, *, missed: int = 0) -> None:
        """Close every session (as a server restart or a network cut does), then release
        ``missed`` minutes that no session receives."""

        async def go() -> None:
            with self._lock:
                sessions, self._sessions = list(self._sessions), []
            for s in sessions:
                with contextlib.suppress(Exception):
                    await s.ws.close(code=1011, reason="server restarting")
            await self._release(missed)

        self._run(go())

    def wait_subscribed(self, count: int = 1, timeout_s: float = 30.0) -> None:
        """Block until ``count`` sessions are authenticated and subscribed to something."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._subscribed() < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._subscribed()} of {count} sessions subscribed")
                self._cond.wait(left)

    def _subscribed(self) -> int:
        return sum(1 for s in self._sessions if s.authenticated and any(s.subs.values()))

    def fail_rest(self, count: int, status: int = 500) -> None:
        """Test knob: the next ``count`` REST calls answer ``status``."""
        with self._lock:
            self._fail += [status] * count

    def bars(self, symbol: str, upto: int | None = None) -> list[dict[str, Any]]:
        """The bars of ``symbol`` (``t`` in ns) of the first ``upto`` minutes (default: all)."""
        return [m.bar() for m in self.market.data[symbol][:upto]]

    # -- websocket -------------------------------------------------------------------------------

    def _check_path(self, conn: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in STOCK_PATHS or path == CRYPTO_PATH:
            return None
        return conn.respond(404, "not found\n")

    def _encode(self, s: _Session, msgs: Sequence[dict[str, Any]]) -> bytes | str:
        if s.msgpack:
            return msgpack.packb(list(msgs), use_bin_type=True)  # type: ignore[no-any-return]
        return json.dumps(list(msgs), separators=(",", ":"))

    async def _send(self, s: _Session, msgs: Sequence[dict[str, Any]]) -> None:
        for m in msgs:
            if m.get("T") == "error":
                self.errors_sent.append(int(m["code"]))
        await s.ws.send(self._encode(s, msgs))

    async def _error(self, s: _Session, code: int, msg: str) -> None:
        await self._send(s, [{"T": "error", "code": code, "msg": msg}])

    async def _handle(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path if ws.request else ""
        headers = ws.request.headers if ws.request else {}
        feed = "crypto" if path == CRYPTO_PATH else STOCK_PATHS[path]
        s = _Session(
            ws=ws,
            feed=feed,
            msgpack=headers.get("Content-Type", "") == "application/msgpack",
        )
        with self._lock:
            self.connections += 1
        try:
            await self._send(s, [{"T": "success", "msg": "connected"}])
            try:
                first = await asyncio.wait_for(ws.recv(), self.auth_timeout_s)
            except TimeoutError:
                await self._error(s, 404, "auth timeout")
                return
            await self._message(s, first)
            async for raw in ws:
                await self._message(s, raw)
        except ConnectionClosed:
            pass
        finally:
            with self._cond:
                if s in self._sessions:
                    self._sessions.remove(s)
                self._cond.notify_all()

    def _decode(self, s: _Session, raw: bytes | str) -> Any:
        try:
            if isinstance(raw, bytes):
                return msgpack.unpackb(raw) if s.msgpack else json.loads(raw)
            return json.loads(raw)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return None

    async def _message(self, s: _Session, raw: bytes | str) -> None:
        msg = self._decode(s, raw)
        action = msg.get("action") if isinstance(msg, dict) else None
        if action == "auth":
            await self._auth(s, msg)
        elif action in ("subscribe", "unsubscribe"):
            if not s.authenticated:
                await self._error(s, 401, "not authenticated")
                return
            await self._subscribe(s, msg, add=action == "subscribe")
        else:
            await self._error(s, 400, "invalid syntax")

    async def _auth(self, s: _Session, msg: dict[str, Any]) -> None:
        if s.authenticated:
            await self._error(s, 403, "already authenticated")
            return
        if msg.get("key") != self.key or msg.get("secret") != self.secret:
            await self._error(s, 402, "auth failed")
            return
        if s.feed == "sip" and self.plan != "sip":
            await self._error(s, 409, "insufficient subscription")
            await s.ws.close()
            return
        with self._cond:
            taken = any(o.authenticated and o.key == self.key for o in self._sessions)
            if not taken:
                s.authenticated, s.key = True, self.key
                self._sessions.append(s)
        if taken:
            await self._error(s, 406, "connection limit exceeded")
            await s.ws.close()
            return
        await self._send(s, [{"T": "success", "msg": "authenticated"}])

    async def _subscribe(self, s: _Session, msg: dict[str, Any], *, add: bool) -> None:
        channels = CRYPTO_CHANNELS if s.feed == "crypto" else STOCK_CHANNELS
        new = {c: set(v) for c, v in s.subs.items()}
        for c in channels:
            symbols = msg.get(c)
            if symbols is None:
                continue
            if not isinstance(symbols, list) or not all(isinstance(x, str) for x in symbols):
                await self._error(s, 400, "invalid syntax")
                return
            if "*" in symbols and c != "bars":
                await self._error(s, 400, "invalid syntax")
                return
            cur = new.setdefault(c, set())
            cur.update(symbols) if add else cur.difference_update(symbols)
        if s.feed == "iex" and any(
            len(new.get(c, ())) > IEX_TRADE_QUOTE_LIMIT for c in ("trades", "quotes")
        ):
            await self._error(s, 405, "symbol limit exceeded")
            return
        if s.feed != "crypto":  # corrections and cancel errors follow trades (RT examples)
            new["corrections"] = set(new.get("trades", ()))
            new["cancelErrors"] = set(new.get("trades", ()))
        with self._cond:
            s.subs = new
            self._cond.notify_all()
        ack: dict[str, Any] = {"T": "subscription"}
        for c in channels:
            ack[c] = sorted(new.get(c, ()))
        await self._send(s, [ack])

    def _stamp(self, s: _Session, ns: int) -> Any:
        if s.msgpack:
            return msgpack.Timestamp.from_unix_nano(ns)
        return rfc3339(ns)

    async def _release(self, minutes: int) -> None:
        for _ in range(minutes):
            with self._lock:
                if self.released >= self.market.minutes:
                    return
                m = self.released
                self.released += 1
                sessions = [x for x in self._sessions if x.authenticated]
            for s in sessions:
                trades: list[dict[str, Any]] = []
                bars: list[dict[str, Any]] = []
                for symbol, rows in self.market.data.items():
                    minute = rows[m]
                    if symbol in s.subs.get("trades", ()):
                        trades += [self._trade_msg(s, symbol, t) for t in minute.trades]
                    if symbol in s.subs.get("bars", ()) or "*" in s.subs.get("bars", ()):
                        b = minute.bar()
                        b["t"] = self._stamp(s, b["t"])
                        bars.append({"T": "b", "S": symbol, **b})
                with contextlib.suppress(ConnectionClosed):
                    if trades:
                        await self._send(s, trades)
                    if bars:
                        await self._send(s, bars)

    def _trade_msg(self, s: _Session, symbol: str, t: Trade) -> dict[str, Any]:
        if s.feed == "crypto":
            return {
                "T": "t",
                "S": symbol,
                "p": t.price,
                "s": t.size,
                "t": self._stamp(s, t.ns),
                "i": t.id,
                "tks": "B",
            }
        return {
            "T": "t",
            "S": symbol,
            "i": t.id,
            "x": "V",
            "p": t.price,
            "s": int(t.size),
            "t": self._stamp(s, t.ns),
            "c": ["@"],
            "z": "C",
        }

    # -- REST ------------------------------------------------------------------------------------

    def rest(
        self, method: str, path: str, query: dict[str, str], headers: Any
    ) -> tuple[int, dict[str, Any]]:
        """Answer one REST call: ``(status, JSON body)``."""
        with self._lock:
            self.rest_calls.append((path, dict(query)))
            now = time.monotonic()
            while self._rest_times and now - self._rest_times[0] > 60:
                self._rest_times.popleft()
            self._rest_times.append(now)
            if len(self._rest_times) > self.rate_limit_per_min:
                return 429, {"message": "too many requests."}
            if self._fail:
                return self._fail.pop(0), {"message": "internal server error"}
        if method != "GET":
            return 405, {"message": "method not allowed"}
        crypto = path.startswith("/v1beta3/crypto/us/")
        kind = path.rsplit("/", 1)[-1]
        if path not in (
            "/v2/stocks/bars",
            "/v2/stocks/trades",
            "/v1beta3/crypto/us/bars",
            "/v1beta3/crypto/us/trades",
        ):
            return 404, {"message": "not found"}
        key, secret = headers.get("APCA-API-KEY-ID"), headers.get("APCA-API-SECRET-KEY")
        if (not crypto or key is not None) and (key != self.key or secret != self.secret):
            return 403, {"message": "forbidden."}
        symbols_text = query.get("symbols", "")
        symbols = [x for x in symbols_text.split(",") if x]
        if not symbols:
            return 400, {"message": "missing symbols"}
        try:
            limit = int(query.get("limit", "1000"))
        except ValueError:
            return 400, {"message": "invalid limit"}
        if not 1 <= limit <= 10_000:
            return 422, {"message": "invalid limit: must be between 1 and 10000"}
        if kind == "bars" and query.get("timeframe") != "1Min":
            return 422, {"message": "invalid timeframe"}
        if not crypto and query.get("feed", "iex") not in ("iex", "sip"):
            return 422, {"message": "invalid feed"}
        if not crypto and query.get("feed") == "sip" and self.plan != "sip":
            return 403, {"message": "subscription does not permit querying recent SIP data"}
        try:
            start = parse_time(query["start"]) if "start" in query else 0
            end = parse_time(query["end"]) if "end" in query else None
        except ValueError as e:
            return 400, {"message": f"invalid time: {e}"}
        if end is not None and start > end:
            return 422, {"message": "end should not be before start."}
        with self._lock:
            released = self.released
        items: list[tuple[str, int, dict[str, Any], int]] = []  # symbol, time, item, id
        for symbol in sorted(set(symbols)):
            for minute in self.market.data.get(symbol, [])[:released]:
                if kind == "bars":
                    if start <= minute.start_ns and (end is None or minute.start_ns <= end):
                        b = minute.bar()
                        b["t"] = rfc3339(b["t"])
                        items.append((symbol, minute.start_ns, b, 0))
                else:
                    for t in minute.trades:
                        if start <= t.ns and (end is None or t.ns <= end):
                            items.append((symbol, t.ns, self._rest_trade(crypto, t), t.id))
        # The token names the last item served (HIST example tokens decode to
        # "SYMBOL|time|..."), so a page goes on after it even when minutes were released
        # between two pages.
        if query.get("page_token"):
            try:
                sym, ns_text, seq_text = base64.b64decode(query["page_token"]).decode().split("|")
                after = (sym, int(ns_text), int(seq_text))
            except ValueError:
                return 400, {"message": "invalid page token"}
            items = [it for it in items if (it[0], it[1], it[3]) > after]
        size = min(limit, self.page_cap or limit)
        page = items[:size]
        out: dict[str, list[dict[str, Any]]] = {}
        for symbol, _, item, _ in page:
            out.setdefault(symbol, []).append(item)
        token = None
        if len(items) > size:
            last = page[-1]
            token = base64.b64encode(f"{last[0]}|{last[1]}|{last[3]}".encode()).decode()
        return 200, {kind: out, "next_page_token": token}

    @staticmethod
    def _rest_trade(crypto: bool, t: Trade) -> dict[str, Any]:
        if crypto:
            return {"t": rfc3339(t.ns), "p": t.price, "s": t.size, "tks": "B", "i": t.id}
        return {
            "t": rfc3339(t.ns),
            "x": "V",
            "p": t.price,
            "s": int(t.size),
            "c": ["@"],
            "i": t.id,
            "z": "C",
        }


class _RestHandler(BaseHTTPRequestHandler):
    server_owner: AlpacaMarketServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # docs/field-notes.md: without it every call costs ~44 ms

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        status, body = self.server_owner.rest("GET", parts.path, query, self.headers)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def date_time_string(self, timestamp: float | None = None) -> str:
        # An origin server with a clock sends Date (RFC 9110 section 6.6.1); Alpaca's does. The
        # market's clock is the middle of the minute in progress (minute ``released``).
        owner = self.server_owner
        now = owner.market.start + timedelta(minutes=owner.released, seconds=30)
        return email.utils.format_datetime(now.astimezone(UTC), usegmt=True)

    def log_message(self, format: str, *args: Any) -> None:
        pass
