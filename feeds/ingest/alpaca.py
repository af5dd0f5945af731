"""Alpaca's market data through alpaca-py: the live stream and the historical bars and trades.

* :func:`make_stream`: a ``StockDataStream`` (``INGEST_ASSET_CLASS=stock``) or
  ``CryptoDataStream`` (``crypto``) with ``raw_data=True`` (msgpack dicts, no pydantic models),
  subclassed so the ingestor hears each successful (re)connection and each refused
  authentication. alpaca-py itself reconnects with backoff and re-subscribes; it has no public
  hook for either event, so the subclass wraps ``DataStream._start_ws`` (connect + auth) and
  ``close`` of the pinned alpaca-py 0.44 (``tests/integration/test_ingest_alpaca.py`` fails if
  that changes).
* :class:`History`: ``StockHistoricalDataClient`` / ``CryptoHistoricalDataClient`` bars and trades
  over a time range (alpaca-py follows ``next_page_token`` itself), with a timeout on every
  request (alpaca-py sets none), alpaca-py's own 429 sleeps off, and the project's one retry
  policy (:class:`core.retry.RetryPolicy`) on 429/5xx/timeouts.
* Normalisers: :func:`stream_bar`, :func:`rest_bar`, :func:`stream_trade`, :func:`rest_trade`
  turn Alpaca's wire dicts into :class:`AlpacaBar` and ``(ns, price, size)`` tuples.

Alpaca behaviour relied on (alpacahq/alpaca-docs, content/api-references/market-data-api/
stock-pricing-data/realtime.md and historical.md): bar ``{"T":"b","S","o","h","l","c","v","t",
"n","vw"}`` with ``t`` the start of the minute; trade ``{"T":"t","S","i","x","p","s","t","c","z"}``;
errors ``{"T":"error","code","msg"}`` (402 auth failed, 406 connection limit exceeded: "You
already have an ongoing authenticated session", 409 insufficient subscription); REST ranges are
inclusive (``start``: "equal to or after", ``end``: "equal to or before").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from core.errors import ConfigError, TransientError
from core.http import TimeoutSession, is_transient
from core.retry import RetryPolicy
from feeds.ingest.config import IngestConfig

__all__ = [
    "AUTH_FATAL",
    "INELIGIBLE_CONDITIONS",
    "SYMBOL_LIMIT_CODE",
    "AlpacaBar",
    "History",
    "StreamHooks",
    "TradeTick",
    "eligible",
    "is_transient",
    "make_stream",
    "ordered_trades",
    "parse_rfc3339_ns",
    "rest_bar",
    "rest_trade",
    "stream_bar",
    "stream_trade",
]

logger = logging.getLogger(__name__)

# Authentication answers that retrying will not change: bad keys, a feed the plan lacks.
AUTH_FATAL = ("auth failed", "insufficient subscription", "v2 not enabled")
CONNECTION_LIMIT = "connection limit exceeded"
# {"T":"error","code":405,"msg":"symbol limit exceeded"} answers a subscription with more symbols
# than the plan allows (docs.alpaca.markets/docs/real-time-stock-pricing-data, "Errors";
# the Basic plan's IEX stream allows 30 symbols for trades and quotes, "Subscription Plans").
SYMBOL_LIMIT_CODE = 405


class AlpacaBar(NamedTuple):
    """One Alpaca minute bar.

    Attributes:
        symbol: ``S`` (stream) or the key of the REST answer.
        ts: start of the minute, aware UTC.
        open, high, low, close, volume: ``o h l c v``.
        trade_count: ``n`` (``None`` when absent).
        vwap: ``vw`` (``None`` when absent).
    """

    symbol: str
    ts: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float
    trade_count: float | None
    vwap: float | None


class TradeTick(NamedTuple):
    """One trade: ``t`` as integer nanoseconds since the epoch (UTC), ``p``, ``s``, Alpaca's
    trade id ``i`` (``-1`` unknown) and its condition codes ``c``."""

    ns: int
    price: float
    size: float
    id: int = -1
    conditions: tuple[str, ...] = ()


# Sale conditions of trades that do not set a bar's last price, so they are left out of the risk
# metrics (an odd lot, an average-price or out-of-sequence print is off the tape's price
# path: condition I multiplied realized variance by 400 in attack 16). Alpaca's trade
# ``c`` field carries the SIP's codes ("c: array, trade condition"; docs.alpaca.markets/docs/
# real-time-stock-pricing-data and /v2/stocks/meta/conditions/trade). CTA/UTP "does not update
# last sale" codes: I odd lot, W average price, Z sold out of sequence, C cash, N next day,
# R seller, 4 derivatively priced, 7 qualified contingent trade, 9 corrected consolidated close.
INELIGIBLE_CONDITIONS = frozenset({"I", "W", "Z", "C", "N", "R", "4", "7", "9"})


def eligible(trade: TradeTick) -> bool:
    """True when ``trade`` may enter the risk metrics (no :data:`INELIGIBLE_CONDITIONS`)."""
    return not INELIGIBLE_CONDITIONS.intersection(trade.conditions)


def ordered_trades(ticks: Iterable[TradeTick]) -> list[TradeTick]:
    """``ticks`` in time order, ties by trade id, each trade id once, ineligible ones left out.

    Live trades arrive in any order and a reconnect may deliver one twice; sorting by
    ``(t, i)`` and keeping each id once makes the window the same as history's.
    """
    seen: set[int] = set()
    out: list[TradeTick] = []
    for t in sorted(ticks, key=lambda t: (t.ns, t.id)):
        if t.id >= 0:
            if t.id in seen:
                continue
            seen.add(t.id)
        if eligible(t):
            out.append(t)
    return out


def _conditions(raw: Mapping[str, Any]) -> tuple[str, ...]:
    c = raw.get("c")
    if c is None:
        return ()
    if isinstance(c, str):
        return (c,)
    return tuple(str(x) for x in c)


def _id(raw: Mapping[str, Any]) -> int:
    i = raw.get("i")
    return -1 if i is None else int(i)


def parse_rfc3339_ns(text: str) -> int:
    """``2022-04-11T12:00:36.002951946Z`` -> nanoseconds since the epoch (all 9 digits kept).

    Raises:
        ValueError: not RFC-3339.
    """
    text = text.strip()
    frac_ns = 0
    head = text
    dot = text.find(".")
    if dot >= 0:
        end = dot + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        digits = text[dot + 1 : end]
        frac_ns = int((digits + "000000000")[:9]) if digits else 0
        head = text[:dot] + text[end:]
    dt = datetime.fromisoformat(head.replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    whole = int((dt - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds())
    return whole * 1_000_000_000 + frac_ns


def _ns_to_dt(ns: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ns // 1_000)


def _opt(raw: Mapping[str, Any], key: str) -> float | None:
    value = raw.get(key)
    return None if value is None else float(value)


def _bar(symbol: str, ts: datetime, raw: Mapping[str, Any]) -> AlpacaBar:
    return AlpacaBar(
        symbol,
        ts,
        float(raw["o"]),
        float(raw["h"]),
        float(raw["l"]),
        float(raw["c"]),
        float(raw["v"]),
        _opt(raw, "n"),
        _opt(raw, "vw"),
    )


def _stream_ns(t: Any) -> int:
    # alpaca-py's raw stream dicts keep msgpack's Timestamp ext type; JSON text is accepted too.
    if hasattr(t, "to_unix_nano"):
        return int(t.to_unix_nano())
    if isinstance(t, datetime):
        return int(t.timestamp()) * 1_000_000_000 + t.microsecond * 1_000
    return parse_rfc3339_ns(str(t))


def stream_bar(raw: Mapping[str, Any]) -> AlpacaBar:
    """A ``{"T":"b", ...}`` stream message as :class:`AlpacaBar`.

    Raises:
        KeyError, TypeError, ValueError: a field is missing or malformed.
    """
    return _bar(str(raw["S"]), _ns_to_dt(_stream_ns(raw["t"])), raw)


def rest_bar(symbol: str, raw: Mapping[str, Any]) -> AlpacaBar:
    """One bar of a historical bars answer as :class:`AlpacaBar`."""
    return _bar(symbol, _ns_to_dt(parse_rfc3339_ns(str(raw["t"]))), raw)


def stream_trade(raw: Mapping[str, Any]) -> TradeTick:
    """A ``{"T":"t", ...}`` stream message as :class:`TradeTick`."""
    return TradeTick(
        _stream_ns(raw["t"]), float(raw["p"]), float(raw["s"]), _id(raw), _conditions(raw)
    )


def rest_trade(raw: Mapping[str, Any]) -> TradeTick:
    """One trade of a historical trades answer as :class:`TradeTick`."""
    return TradeTick(
        parse_rfc3339_ns(str(raw["t"])),
        float(raw["p"]),
        float(raw["s"]),
        _id(raw),
        _conditions(raw),
    )


# -- stream -----------------------------------------------------------------------------------


class StreamHooks(NamedTuple):
    """What the stream tells the ingestor, on the stream's event-loop thread (must not block).

    Attributes:
        on_connected: after connect + authentication succeeded, before the subscription.
        on_disconnected: after the socket closed (error, server close, or stop).
        on_auth_error: ``(message)`` when Alpaca refused the authentication (``auth failed``,
            ``connection limit exceeded``, ...). alpaca-py then retries with backoff unless the
            ingestor stops it.
        on_error: ``(code, message)`` of an ``{"T":"error"}`` message after authentication
            (e.g. 405 symbol limit exceeded in answer to the subscription); alpaca-py only logs
            those.
    """

    on_connected: Callable[[], None]
    on_disconnected: Callable[[], None]
    on_auth_error: Callable[[str], None]
    on_error: Callable[[int, str], None] | None = None


def make_stream(config: IngestConfig, hooks: StreamHooks) -> Any:
    """The alpaca-py data stream for ``config`` (not started: call ``run()`` on a thread).

    Returns:
        A ``StockDataStream`` or ``CryptoDataStream`` subclass instance with ``raw_data=True``.
    """
    from alpaca.data.enums import CryptoFeed, DataFeed
    from alpaca.data.live.crypto import CryptoDataStream
    from alpaca.data.live.stock import StockDataStream

    base: type[Any] = StockDataStream if config.asset_class == "stock" else CryptoDataStream

    class _Stream(base):  # type: ignore[misc, valid-type]
        async def _start_ws(self) -> None:
            try:
                await super()._start_ws()
            except ValueError as e:
                hooks.on_auth_error(str(e))
                raise
            hooks.on_connected()

        async def close(self) -> None:
            try:
                await super().close()
            finally:
                hooks.on_disconnected()

        async def _dispatch(self, msg: Any) -> None:
            if hooks.on_error is not None and isinstance(msg, dict) and msg.get("T") == "error":
                try:
                    code = int(msg.get("code", 0))
                except (TypeError, ValueError):
                    code = 0
                hooks.on_error(code, str(msg.get("msg", "")))
            await super()._dispatch(msg)

    key, secret = config.api_key.reveal(), config.secret_key.reveal()
    if config.asset_class == "stock":
        feed = DataFeed.IEX if config.feed == "iex" else DataFeed.SIP
        return _Stream(key, secret, raw_data=True, feed=feed, url_override=config.stream_url)
    return _Stream(key, secret, raw_data=True, feed=CryptoFeed.US, url_override=config.stream_url)


# -- history ----------------------------------------------------------------------------------


class History:
    """Historical minute bars and trades of many symbols over a time range.

    Args:
        config: keys, asset class, feed, ``data_url``, timeout and attempts.
        stop: set when the ingestor stops: a wait between retries ends at once.

    Attributes:
        calls: historical requests made (each page and each attempt counts once per call).
        retries: attempts repeated after a transient error.

    Thread context: the ingestor's worker thread (one ``requests.Session``, not shared).
    """

    def __init__(self, config: IngestConfig, *, stop: threading.Event | None = None) -> None:
        from alpaca.data.historical.crypto import CryptoHistoricalDataClient
        from alpaca.data.historical.stock import StockHistoricalDataClient

        self.config = config
        self.stop = stop
        self.calls = 0
        self.retries = 0
        self.policy: RetryPolicy = config.retry_policy
        key, secret = config.api_key.reveal(), config.secret_key.reveal()
        client: Any
        if config.asset_class == "stock":
            client = StockHistoricalDataClient(
                key, secret, raw_data=True, url_override=config.data_url
            )
        else:
            client = CryptoHistoricalDataClient(
                key, secret, raw_data=True, url_override=config.data_url
            )
        client._retry = 0  # alpaca-py sleeps 3 s per 429 itself; the policy below decides
        client._session = TimeoutSession(config.request_timeout_s, stop)
        self._client = client

    def server_now(self) -> datetime | None:
        """Alpaca's clock as of its last answer (its ``Date`` header, whole seconds) plus the
        time since, or None before any answer."""
        seen: tuple[datetime, float] | None = self._client._session.server_date
        if seen is None:
            return None
        when, mono = seen
        return when + timedelta(seconds=time.monotonic() - mono)

    def _call(self, what: str, fn: Callable[[], Mapping[str, Any]]) -> Mapping[str, Any]:
        from alpaca.common.exceptions import APIError

        def on_retry(err: BaseException) -> None:
            self.retries += 1

        def once() -> Mapping[str, Any]:
            self.calls += 1
            return fn()

        try:
            return self.policy.call(
                what, once, retry_on=is_transient, stop=self.stop, on_retry=on_retry
            )
        except APIError as e:
            if e.status_code in (401, 403):
                raise ConfigError(f"{what}: Alpaca refused the keys or the feed: {e}") from e
            raise TransientError(f"{what}: HTTP {e.status_code}: {str(e)[:300]}") from e

    def _request(self, kind: str, symbols: Sequence[str], start: datetime, end: datetime) -> Any:
        from alpaca.data.enums import Adjustment, DataFeed
        from alpaca.data.requests import (
            CryptoBarsRequest,
            CryptoTradesRequest,
            StockBarsRequest,
            StockTradesRequest,
        )
        from alpaca.data.timeframe import TimeFrame

        common: dict[str, Any] = {"symbol_or_symbols": list(symbols), "start": start, "end": end}
        if self.config.asset_class == "stock":
            feed = DataFeed.IEX if self.config.feed == "iex" else DataFeed.SIP
            if kind == "bars":
                return StockBarsRequest(
                    timeframe=TimeFrame.Minute, adjustment=Adjustment.RAW, feed=feed, **common
                )
            return StockTradesRequest(feed=feed, **common)
        if kind == "bars":
            return CryptoBarsRequest(timeframe=TimeFrame.Minute, **common)
        return CryptoTradesRequest(**common)

    def bars(
        self, symbols: Sequence[str], start: datetime, end: datetime
    ) -> dict[str, list[AlpacaBar]]:
        """Minute bars with ``start <= t <= end`` of each symbol, in time order.

        Raises:
            ConfigError: Alpaca refused the keys or the feed (401/403).
            TransientError: still failing after the retries, or another HTTP error.
            RetryInterruptedError: stopping while waiting to retry.
        """
        request = self._request("bars", symbols, start, end)
        c = self._client
        fn = (
            (lambda: c.get_stock_bars(request))
            if self.config.asset_class == "stock"
            else (lambda: c.get_crypto_bars(request))
        )
        raw = self._call(f"history bars {len(symbols)} symbols {start:%Y-%m-%dT%H:%M}", fn)
        # One bar per minute, in time order, whatever the pages did.
        out = {}
        for s in symbols:
            by_ts = {b.ts: b for b in (rest_bar(s, r) for r in raw.get(s, []))}
            out[s] = [by_ts[t] for t in sorted(by_ts)]
        return out

    def trades(
        self, symbols: Sequence[str], start: datetime, end: datetime
    ) -> dict[str, list[TradeTick]]:
        """Trades with ``start <= t <= end`` of each symbol, as :func:`ordered_trades`."""
        request = self._request("trades", symbols, start, end)
        c = self._client
        fn = (
            (lambda: c.get_stock_trades(request))
            if self.config.asset_class == "stock"
            else (lambda: c.get_crypto_trades(request))
        )
        raw = self._call(f"history trades {len(symbols)} symbols {start:%Y-%m-%dT%H:%M}", fn)
        return {s: ordered_trades(rest_trade(t) for t in raw.get(s, [])) for s in symbols}

    def close(self) -> None:
        self._client._session.close()
