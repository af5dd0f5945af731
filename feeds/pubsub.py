"""Live market data from Google Pub/Sub: one subscriber per runner, one backtrader feed per symbol.

Data path (ARCHITECTURE.md, "Live data path")::

    topic --(one subscription per runner and topic)--> PubSubBarSubscriber
      callback thread: MessageHandler.handle(): decode_message() (JSON -> validated, hashed
                       LiveBar), de-duplicate, route by the ``symbol`` attribute -> BarHub.offer()
                       (blocks while that symbol's buffer is full = back-pressure), then ack
      main thread:     PubSubMarketDataFeed._load() -> BarHub.take(): one bar, at most qcheck
                       seconds of waiting -> OHLCV + dynamic lines + text fields + data hash

Message contract (README, "Live bars over Pub/Sub"): one JSON object per message with ``symbol``,
``timestamp`` (ISO-8601; UTC when it has no offset), ``open``, ``high``, ``low``, ``close``,
optional ``volume``, any extra fields (numbers, booleans, text, nested objects flattened with the
CSV rule of :func:`feeds.fields.flatten`, lists kept as JSON text) and an optional publisher
``data_hash`` that must equal :func:`feeds.fields.bar_hash` of the content. Attribute ``symbol`` on
every message; publishers should set ``ordering_key=symbol`` (the replay tool does) so a symbol's
bars arrive in time order.

Alignment: a bar waits (at most ``align_wait_s``) until every recently active symbol has reached
its time, and the feeds hand out one timestamp per backtrader step, so a multi-symbol agent sees
the bars of one time together, as in a backtest. Each feed keeps ``lookback_bars`` bars per line
(backtrader's bounded ``QBuffer`` mode) and as many hashes, so memory stays bounded.

Threads: the Pub/Sub client's callback thread (one worker per stream) runs
:meth:`MessageHandler.handle`; the supervisor thread probes the subscription and reconnects;
everything touching backtrader runs on the main thread. The only hand-off is :class:`BarHub`
(one lock and condition).
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import math
import re
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import backtrader as bt
import pandas as pd
from backtrader.linebuffer import LineBuffer

from core.bars import (
    OHLCV,
    PRICE_FIELDS,
    RESERVED_NAMES,
    BarHashes,
    bar_hash,
    check_bar,
    field_name,
    flatten,
)
from core.errors import ConfigError, DataError, TransientError
from feeds.fields import TextLine, dynamic_feed_class
from runtime.config import AppConfig, CSVFeedConfig, PubSubFeedConfig

__all__ = [
    "BarHub",
    "FieldSet",
    "LiveBar",
    "LiveMemoryBound",
    "MalformedMessageError",
    "MessageHandler",
    "PubSubBarSubscriber",
    "PubSubFeedConfig",
    "PubSubMarketDataFeed",
    "StreamSettings",
    "backfill_bars",
    "decode_message",
    "make_pubsub_feed",
    "parse_declared_fields",
    "symbol_filter",
]

logger = logging.getLogger(__name__)

# Body keys that describe the message rather than the bar.
META_KEYS = frozenset({"symbol", "timestamp", "data_hash"})
# A held bar waits at most this many align_wait_s, even while other bars keep arriving.
HOLD_CAP_FACTOR = 10.0
# Pub/Sub refuses filters longer than this (bytes).
MAX_FILTER_BYTES = 256
_SUB_ID_RE = re.compile(r"[^A-Za-z0-9\-_.~+%]+")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSettings:
    """Tuning of the subscriber; the defaults suit production, tests shorten the periods.

    Attributes:
        health_interval_s: period of the subscription probe that detects a dead stream, seconds.
        probe_timeout_s: timeout of one probe / admin call, seconds.
        reconnect_initial_s: first reconnect delay, seconds; doubled per failed attempt...
        reconnect_max_s: ...up to this cap, seconds.
        ack_deadline_s: ack deadline of created subscriptions, seconds (10..600).
        max_outstanding_messages: flow control: messages held by the client before it pauses
            the stream (back-pressure reaches Pub/Sub here).
        max_outstanding_bytes: flow control in bytes.
        dedup_message_ids: message ids remembered for de-duplication.
        dedup_times_per_symbol: bar times remembered per symbol for de-duplication (a copy
            of an older bar is refused as ``stale_timestamp`` instead); memory is about
            100 bytes per entry per symbol.
        admin_timeout_s: timeout of create/delete calls, seconds.
    """

    health_interval_s: float = 2.0
    probe_timeout_s: float = 2.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    ack_deadline_s: int = 60
    max_outstanding_messages: int = 1000
    max_outstanding_bytes: int = 64 * 1024 * 1024
    dedup_message_ids: int = 100_000
    dedup_times_per_symbol: int = 128
    admin_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.health_interval_s <= 0 or self.probe_timeout_s <= 0:
            raise ConfigError("StreamSettings: health_interval_s and probe_timeout_s must be > 0")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ConfigError("StreamSettings: need 0 < reconnect_initial_s <= reconnect_max_s")
        if not 10 <= self.ack_deadline_s <= 600:
            raise ConfigError(
                f"StreamSettings: ack_deadline_s must be 10..600, got {self.ack_deadline_s}"
            )

    def reconnect_delay_s(self, attempt: int) -> float:
        """Capped exponential backoff: ``initial * 2**attempt``, at most ``reconnect_max_s``."""
        return float(min(self.reconnect_max_s, self.reconnect_initial_s * 2 ** min(attempt, 30)))


@dataclass(frozen=True, slots=True)
class FieldSet:
    """Extra fields of a feed: numeric ones become lines, text ones :class:`TextLine` s."""

    numeric: tuple[str, ...] = ()
    text: tuple[str, ...] = ()

    def union(self, other: FieldSet) -> FieldSet:
        """Both sets, in order; a name keeps the kind it has in ``self``."""
        have = set(self.numeric) | set(self.text)
        numeric = self.numeric + tuple(n for n in other.numeric if n not in have)
        text = self.text + tuple(n for n in other.text if n not in have)
        return FieldSet(numeric, text)

    def kind(self, name: str) -> str | None:
        if name in self.numeric:
            return "number"
        if name in self.text:
            return "text"
        return None

    def __bool__(self) -> bool:
        return bool(self.numeric or self.text)


def parse_declared_fields(specs: Iterable[str]) -> FieldSet:
    """``("sentiment", "headline:text", "latest_news.relevance:number")`` -> a FieldSet.

    Names are normalised like CSV columns (:func:`feeds.fields.field_name`).

    Raises:
        ConfigError: on a bad kind or a reserved name.
    """
    numeric: list[str] = []
    text: list[str] = []
    for spec in specs:
        raw, _, kind = spec.partition(":")
        try:
            name = field_name(raw)
        except ValueError as e:
            raise ConfigError(f"PUBSUB_FIELDS: {spec!r}: {e}") from e
        if name in OHLCV:
            continue
        if name in RESERVED_NAMES or name.startswith("_"):
            raise ConfigError(
                f"PUBSUB_FIELDS: {spec!r} would become {name!r}, a name backtrader reserves"
            )
        kind = kind.strip().lower() or "number"
        if kind not in ("number", "text"):
            raise ConfigError(f"PUBSUB_FIELDS: {spec!r}: kind must be number or text")
        target = text if kind == "text" else numeric
        if name not in numeric and name not in text:
            target.append(name)
    return FieldSet(tuple(numeric), tuple(text))


# --------------------------------------------------------------------------------------------
# Decoding and validation (pure)
# --------------------------------------------------------------------------------------------


class LiveBar(NamedTuple):
    """One validated bar.

    Attributes:
        symbol: from the ``symbol`` attribute.
        ts: bar time, aware UTC.
        dt_num: the same time as backtrader's float date number (naive UTC).
        values: OHLCV as floats (volume NaN when absent) and flattened extras (float, str or
            None for JSON null).
        data_hash: :func:`feeds.fields.bar_hash` of the content.
        message_id: Pub/Sub message id (None for backfill bars).
        publish_time_s: Pub/Sub publish time, epoch seconds (None when unknown).
        received_s: epoch seconds when the callback decoded it.
        live: False for CSV backfill bars.
        verified: the publisher sent a ``data_hash`` and it matched.
    """

    symbol: str
    ts: datetime
    dt_num: float
    values: dict[str, Any]
    data_hash: str
    message_id: str | None = None
    publish_time_s: float | None = None
    received_s: float = 0.0
    live: bool = True
    verified: bool = False


class MalformedMessageError(DataError):
    """A message that breaks the contract. ``reason`` is a short key used for counting
    (``bad_json``, ``missing_symbol``, ``symbol_mismatch``, ``unknown_symbol``,
    ``bad_timestamp``, ``missing_price``, ``non_numeric_price``, ``non_numeric_volume``,
    ``invalid_bar``, ``bad_field``, ``reserved_field``, ``hash_mismatch``, ``stale_timestamp``);
    ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def parse_timestamp(raw: Any) -> datetime:
    """ISO-8601 text -> aware UTC datetime (no offset = UTC).

    Raises:
        MalformedMessageError: ``bad_timestamp``.
    """
    if not isinstance(raw, str):
        raise MalformedMessageError(
            "bad_timestamp", f"timestamp must be ISO-8601 text, got {raw!r}"
        )
    try:
        ts = datetime.fromisoformat(raw.strip())
    except ValueError as e:
        raise MalformedMessageError("bad_timestamp", f"unparsable timestamp {raw!r}") from e
    if ts.tzinfo is None:
        return ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def _number(name: str, value: Any, reason: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise MalformedMessageError(reason, f"{name} {value!r} is not a number")
    try:
        return float(value)
    except ValueError as e:
        raise MalformedMessageError(reason, f"{name} {value!r} is not a number") from e


_cached_field_name = functools.lru_cache(maxsize=65_536)(field_name)


def _flatten(body: dict[str, Any]) -> dict[str, Any]:
    """:func:`feeds.fields.flatten` (the CSV rule), with a fast path for flat bodies: their
    keys repeat from message to message, so the normalised names are cached."""
    for value in body.values():
        if isinstance(value, (Mapping, list, tuple)):
            return flatten(body)
    return {_cached_field_name(str(k)): v for k, v in body.items()}


def _leaves(obj: Mapping[str, Any]) -> int:
    return sum(_leaves(v) if isinstance(v, Mapping) else 1 for v in obj.values())


def decode_message(
    data: bytes,
    attributes: Mapping[str, str],
    *,
    message_id: str | None = None,
    publish_time_s: float | None = None,
    received_s: float | None = None,
) -> LiveBar:
    """Decode and validate one message against the contract, and hash the bar.

    Args:
        data: the message body (UTF-8 JSON object).
        attributes: message attributes; ``symbol`` is required.
        message_id, publish_time_s, received_s: carried into the result.

    Returns:
        The :class:`LiveBar`.

    Raises:
        MalformedMessageError: with the reason key and a detail naming the offending value.
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise MalformedMessageError("bad_json", f"body is not JSON ({e})") from e
    if not isinstance(doc, dict):
        raise MalformedMessageError(
            "bad_json", f"body must be a JSON object, got {type(doc).__name__}"
        )
    symbol = attributes.get("symbol")
    if not symbol:
        raise MalformedMessageError("missing_symbol", "no 'symbol' attribute")
    body_symbol = doc.get("symbol")
    if body_symbol is not None and body_symbol != symbol:
        raise MalformedMessageError(
            "symbol_mismatch", f"attribute symbol {symbol!r} != body symbol {body_symbol!r}"
        )
    ts = parse_timestamp(doc.get("timestamp"))
    published_hash = doc.get("data_hash")
    body = {k: v for k, v in doc.items() if k not in META_KEYS}
    try:
        flat = _flatten(body)
    except ValueError as e:
        raise MalformedMessageError("bad_field", str(e)) from e
    if len(flat) != _leaves(body):
        raise MalformedMessageError(
            "bad_field", "two keys normalise to the same field name (e.g. 'Close' and 'close')"
        )
    values: dict[str, Any] = {}
    for name in PRICE_FIELDS:
        raw = flat.pop(name, None)
        if raw is None:
            raise MalformedMessageError("missing_price", f"no {name}")
        values[name] = _number(name, raw, "non_numeric_price")
    raw_volume = flat.pop("volume", None)
    values["volume"] = (
        math.nan if raw_volume is None else _number("volume", raw_volume, "non_numeric_volume")
    )
    problem = check_bar(
        values["open"],
        values["high"],
        values["low"],
        values["close"],
        values["volume"] if raw_volume is not None else 0.0,
    )
    if problem:
        raise MalformedMessageError("invalid_bar", problem)
    for name, value in flat.items():
        if name in RESERVED_NAMES or name.startswith("_"):
            raise MalformedMessageError(
                "reserved_field", f"field {name!r} is a name backtrader reserves"
            )
        if isinstance(value, bool):
            value = 1.0 if value else 0.0
        elif isinstance(value, int):
            value = float(value)
        values[name] = value
    digest = bar_hash(symbol, ts, values)
    if published_hash is not None and (
        not isinstance(published_hash, str) or published_hash.lower() != digest
    ):
        raise MalformedMessageError(
            "hash_mismatch", f"publisher data_hash {published_hash!r} != content hash {digest}"
        )
    return LiveBar(
        symbol=symbol,
        ts=ts,
        dt_num=bt.date2num(ts.replace(tzinfo=None)),
        values=values,
        data_hash=digest,
        message_id=message_id,
        publish_time_s=publish_time_s,
        received_s=time.time() if received_s is None else received_s,
        verified=published_hash is not None,
    )


def bar_fields(bar: LiveBar) -> FieldSet:
    """The extra fields of one bar and their kinds (null values count as numbers)."""
    numeric = tuple(k for k, v in bar.values.items() if k not in OHLCV and not isinstance(v, str))
    text = tuple(k for k, v in bar.values.items() if k not in OHLCV and isinstance(v, str))
    return FieldSet(numeric, text)


# --------------------------------------------------------------------------------------------
# The hand-off between the callback thread and the main thread
# --------------------------------------------------------------------------------------------


class _SymbolBuffer:
    """Bars of one symbol: ``held`` wait for alignment, ``ready`` can be taken."""

    __slots__ = (
        "held",
        "lagging",
        "last_num",
        "order",
        "ready",
        "recv_seq",
        "rel_seq",
        "size",
        "symbol",
    )

    def __init__(self, symbol: str, order: int) -> None:
        self.symbol = symbol
        self.order = order
        self.held: deque[LiveBar] = deque()
        self.ready: deque[LiveBar] = deque()
        self.size = 0
        self.last_num = -math.inf
        self.lagging = False  # timed out an alignment: not waited for until its next bar
        self.recv_seq = 0
        self.rel_seq = 0


class BarHub:
    """Per-symbol bounded buffers between the callback thread(s) and backtrader's main thread.

    * :meth:`offer` (callback thread) blocks while the symbol already buffers
      ``max_buffered_bars`` bars: no bar is dropped to make room; the Pub/Sub client's flow
      control then pauses the stream.
    * Alignment: an offered bar is *held* until every symbol has reached its time. Held bars
      are released anyway once no bar has arrived for ``align_wait_s`` (the burst of a bar
      time is over), after ``HOLD_CAP_FACTOR * align_wait_s`` however busy the stream, or when
      their symbol's buffer is full; the symbols still behind (halted, ended, not started) are
      then not waited for until their next bar.
    * :meth:`take` (main thread) hands out, per backtrader step, only bars of the step's time
      (the smallest ready time), so no feed delivers a bar later than another feed's in the same
      step and backtrader never has to rewind a bounded buffer.
    * :meth:`close_input` ends the input; feeds then drain what is buffered (until the optional
      drain deadline) and report the end.

    Args:
        symbols: the symbols routed here.
        max_buffered_bars: per symbol (held + ready).
        align_wait_s: 0 disables alignment.
        idle_timeout_s: close the input after this long without a bar, counted from the first
            bar (0 = never).
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        max_buffered_bars: int = 10_000,
        align_wait_s: float = 1.0,
        idle_timeout_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_buffered_bars < 1:
            raise ConfigError(f"max_buffered_bars must be >= 1, got {max_buffered_bars}")
        self._clock = clock
        self._bufs = {s: _SymbolBuffer(s, i) for i, s in enumerate(symbols)}
        self.symbols = tuple(self._bufs)
        self.max_buffered_bars = max_buffered_bars
        self.align_wait_s = align_wait_s
        self.idle_timeout_s = idle_timeout_s
        self._cond = threading.Condition(threading.Lock())
        self._wm: list[tuple[float, int, _SymbolBuffer]] = [
            (b.last_num, b.order, b) for b in self._bufs.values()
        ]
        self._held_heads: list[tuple[float, int, _SymbolBuffer]] = []
        self._ready_heads: list[tuple[float, int, _SymbolBuffer]] = []
        self._arrivals: deque[tuple[float, _SymbolBuffer, int, float]] = deque()
        self._held_total = 0
        self._blocked = 0
        self._last_offer: float | None = None
        self._step: float | None = None
        self._pass_seen: set[int] = set()
        self.input_closed = False
        self.close_reason = ""
        self._drain_deadline: float | None = None
        self.backpressure_waits = 0
        self.undelivered = 0
        self.consumer_waiting = False  # the main thread waits in take() for a bar
        self._epoch = 0
        self._transitions: deque[tuple[int, str, str]] = deque(maxlen=64)
        self.status = "CONNECTING"

    # -- producer side (callback thread) -----------------------------------------------------

    def offer(self, bar: LiveBar, timeout_s: float | None = None) -> bool:
        """Buffer one bar, waiting while its symbol's buffer is full.

        Returns:
            True when buffered; False when the input is closed (or ``timeout_s`` passed): the
            caller must not ack the message.

        Raises:
            KeyError: for a symbol not routed here.
        """
        buf = self._bufs[bar.symbol]
        with self._cond:
            deadline = None if timeout_s is None else self._clock() + timeout_s
            if buf.size >= self.max_buffered_bars:
                self.backpressure_waits += 1
            self._blocked += 1  # a blocked producer is not a quiet stream
            try:
                while buf.size >= self.max_buffered_bars and not self.input_closed:
                    if buf.held:  # nothing can be taken while held: stop aligning up to here
                        self._force(buf.held[-1].dt_num)
                    wait = 0.25
                    if deadline is not None:
                        wait = min(wait, deadline - self._clock())
                        if wait <= 0:
                            return False
                    self._cond.wait(wait)
            finally:
                self._blocked -= 1
            if self.input_closed:
                return False
            now = self._clock()
            buf.size += 1
            buf.last_num = bar.dt_num
            buf.lagging = False
            self._last_offer = now
            if self.align_wait_s <= 0:
                self._append_ready(buf, bar)
                self._cond.notify_all()
                return True
            if not buf.held:
                heapq.heappush(self._held_heads, (bar.dt_num, buf.order, buf))
            buf.held.append(bar)
            self._held_total += 1
            self._arrivals.append((now, buf, buf.recv_seq, bar.dt_num))
            buf.recv_seq += 1
            heapq.heappush(self._wm, (bar.dt_num, buf.order, buf))
            self._release(now)
        return True

    def preload(self, bars: Iterable[LiveBar]) -> int:
        """Put bars straight into the ready buffers (CSV backfill, before the stream starts),
        bypassing alignment and the size limit. Returns how many."""
        n = 0
        with self._cond:
            for bar in bars:
                buf = self._bufs[bar.symbol]
                self._append_ready(buf, bar)
                buf.size += 1
                if bar.dt_num > buf.last_num:
                    buf.last_num = bar.dt_num
                    heapq.heappush(self._wm, (bar.dt_num, buf.order, buf))
                n += 1
            self._cond.notify_all()
        return n

    def close_input(self, reason: str, drain_timeout_s: float | None = None) -> None:
        """No more input: blocked :meth:`offer` calls return False, held bars become ready and
        feeds end once their buffer is empty (or ``drain_timeout_s`` has passed). Idempotent;
        the first reason is kept."""
        with self._cond:
            if not self.input_closed:
                self.input_closed = True
                self.close_reason = reason
                if drain_timeout_s is not None:
                    self._drain_deadline = self._clock() + drain_timeout_s
                logger.info(
                    "live input closed (%s); %d bars buffered to drain", reason, self.buffered
                )
            for buf in self._bufs.values():
                if buf.held:
                    self._release_upto(buf, buf.recv_seq)
            self._cond.notify_all()

    def set_status(self, status: str, detail: str = "") -> None:
        """Record a connection transition (``LIVE``, ``DISCONNECTED``, ``CONNBROKEN``); feeds
        turn it into backtrader notifications on the main thread."""
        with self._cond:
            if status == self.status:
                return
            self.status = status
            self._epoch += 1
            self._transitions.append((self._epoch, status, detail))
            self._cond.notify_all()

    # -- consumer side (main thread) ---------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    def transitions_since(self, epoch: int) -> list[tuple[int, str, str]]:
        with self._cond:
            return [t for t in self._transitions if t[0] > epoch]

    def begin_pass(self, key: int) -> None:
        """Called by each feed at the start of its ``next()`` without a master: the first feed
        to come back starts a new backtrader step (the step's time is then recomputed)."""
        if key in self._pass_seen:
            self._pass_seen = {key}
            self._step = None
        else:
            self._pass_seen.add(key)

    def has_ready(self, symbol: str) -> bool:
        return bool(self._bufs[symbol].ready)

    def take(
        self, symbol: str, timeout_s: float, master_num: float | None = None
    ) -> LiveBar | None:
        """The next bar of ``symbol`` for the current step, or None.

        Args:
            symbol: the feed's symbol.
            timeout_s: longest wait when no symbol has a ready bar, seconds.
            master_num: in backtrader's second chance within a step, the step's date number: a
                bar at or before it may be taken.
        """
        buf = self._bufs[symbol]
        deadline: float | None = None
        with self._cond:
            while True:
                now = self._clock()
                if self._held_total:
                    self._release(now)
                if (
                    self.idle_timeout_s > 0
                    and not self.input_closed
                    and self._last_offer is not None
                    and now - self._last_offer >= self.idle_timeout_s
                ):
                    self._close_locked(
                        f"no bar for {self.idle_timeout_s:g} s (PUBSUB_IDLE_TIMEOUT_S)"
                    )
                if self._drain_expired(now):
                    return None
                ready = buf.ready
                if ready:
                    head = ready[0]
                    if master_num is not None:
                        ok = head.dt_num <= master_num
                    else:
                        if self._step is None:
                            self._step = self._min_ready()
                        ok = head.dt_num == self._step
                    if not ok:
                        return None
                    ready.popleft()
                    buf.size -= 1
                    if ready:
                        heapq.heappush(self._ready_heads, (ready[0].dt_num, buf.order, buf))
                    self._cond.notify_all()
                    return head
                if master_num is not None:
                    return None
                if self._step is None:
                    self._step = self._min_ready()
                if self._step is not None or self.input_closed:
                    return None
                if deadline is None:
                    deadline = now + timeout_s
                remaining = deadline - now
                if remaining <= 0:
                    return None
                self.consumer_waiting = True
                try:
                    self._cond.wait(min(remaining, self._next_due(now)))
                finally:
                    self.consumer_waiting = False

    def finished(self, symbol: str) -> bool:
        """True once the input is closed and ``symbol`` has nothing left to deliver (or the
        drain deadline passed; what remained is counted in :attr:`undelivered`)."""
        if not self.input_closed:
            return False
        with self._cond:
            return self._drain_expired(self._clock()) or self._bufs[symbol].size == 0

    @property
    def buffered(self) -> int:
        return sum(b.size for b in self._bufs.values())

    def depth(self, symbol: str) -> int:
        return self._bufs[symbol].size

    # -- internals (lock held) ---------------------------------------------------------------

    def _close_locked(self, reason: str) -> None:
        self.input_closed = True
        self.close_reason = reason
        logger.info("live input closed (%s)", reason)
        for buf in self._bufs.values():
            if buf.held:
                self._release_upto(buf, buf.recv_seq)
        self._cond.notify_all()

    def _drain_expired(self, now: float) -> bool:
        if self._drain_deadline is None or now < self._drain_deadline:
            return False
        left = self.buffered
        if left:
            logger.warning("shutdown: %d buffered bars not delivered (drain time over)", left)
            for buf in self._bufs.values():
                buf.held.clear()
                buf.ready.clear()
                buf.size = 0
            self._held_total = 0
            self.undelivered += left
        return True

    def _append_ready(self, buf: _SymbolBuffer, bar: LiveBar) -> None:
        if not buf.ready:
            heapq.heappush(self._ready_heads, (bar.dt_num, buf.order, buf))
        buf.ready.append(bar)

    def _min_ready(self) -> float | None:
        heads = self._ready_heads
        while heads:
            num, _, buf = heads[0]
            if buf.ready and buf.ready[0].dt_num == num:
                return num
            heapq.heappop(heads)
        return None

    def _watermark(self) -> float:
        """Smallest latest bar time among the symbols waited for (lazy heap)."""
        wm = self._wm
        while wm:
            num, _, buf = wm[0]
            if num != buf.last_num or buf.lagging:
                heapq.heappop(wm)
                continue
            return num
        return math.inf

    def _release(self, now: float) -> None:
        limit = self._watermark()
        arrivals = self._arrivals
        while arrivals and arrivals[0][2] < arrivals[0][1].rel_seq:
            arrivals.popleft()
        if arrivals:
            forced = -math.inf
            if self._quiet(now):
                forced = max(num for _, b, seq, num in arrivals if seq >= b.rel_seq)
            else:
                cap = self.align_wait_s * HOLD_CAP_FACTOR
                while arrivals and now - arrivals[0][0] >= cap:
                    _, buf, seq, num = arrivals.popleft()
                    if seq >= buf.rel_seq:
                        forced = max(forced, num)
            if forced > limit:
                self._mark_laggards(forced)
                limit = forced
        self._release_to(limit)

    def _quiet(self, now: float) -> bool:
        """No bar arrived for ``align_wait_s`` and no producer is blocked: a burst is over."""
        return (
            self._blocked == 0
            and self._last_offer is not None
            and now - self._last_offer >= self.align_wait_s
        )

    def _force(self, limit: float) -> None:
        """Release every held bar up to ``limit``; symbols still behind it lag."""
        self._mark_laggards(limit)
        self._release_to(max(limit, self._watermark()))

    def _mark_laggards(self, limit: float) -> None:
        wm = self._wm
        while wm and wm[0][0] < limit:
            num, _, buf = heapq.heappop(wm)
            if num == buf.last_num and not buf.lagging:
                buf.lagging = True
                logger.debug(
                    "alignment: %s lags (last bar %s); not waited for until its next bar",
                    buf.symbol,
                    bt.num2date(num) if num > 0 else None,
                )

    def _release_to(self, limit: float) -> None:
        heads = self._held_heads
        released = False
        while heads and heads[0][0] <= limit:
            num, order, buf = heapq.heappop(heads)
            held = buf.held
            if not held or held[0].dt_num != num:
                continue
            while held and held[0].dt_num <= limit:
                self._append_ready(buf, held.popleft())
                buf.rel_seq += 1
                self._held_total -= 1
            if held:
                heapq.heappush(heads, (held[0].dt_num, order, buf))
            released = True
        if released:
            self._cond.notify_all()

    def _release_upto(self, buf: _SymbolBuffer, seq: int) -> None:
        while buf.held and buf.rel_seq < seq:
            self._append_ready(buf, buf.held.popleft())
            buf.rel_seq += 1
            self._held_total -= 1

    def _next_due(self, now: float) -> float:
        """Seconds until a held bar may be released by time alone (for waits)."""
        due = math.inf
        if self._held_total and self._arrivals:
            due = self._arrivals[0][0] + self.align_wait_s * HOLD_CAP_FACTOR - now
            if self._last_offer is not None:
                due = min(due, self._last_offer + self.align_wait_s - now)
        if self.idle_timeout_s > 0 and not self.input_closed and self._last_offer is not None:
            due = min(due, self._last_offer + self.idle_timeout_s - now)
        return max(due, 0.001)


# --------------------------------------------------------------------------------------------
# The callback side: validation, de-duplication, field bookkeeping
# --------------------------------------------------------------------------------------------


class FeedEvents(Protocol):
    """Optional observer of the callback thread's outcomes (metrics). Must be thread-safe."""

    def on_bar(self, symbol: str, age_s: float | None) -> None: ...

    def on_malformed(self, symbol: str, reason: str) -> None: ...

    def on_duplicate(self, symbol: str) -> None: ...


DELIVERED, DUPLICATE, MALFORMED, STOPPED = "delivered", "duplicate", "malformed", "stopped"


@dataclass(slots=True)
class FeedStats:
    """Counters of the live input (read by the report; written under the handler's lock)."""

    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    duplicate_conflicts: int = 0
    hash_verified: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    per_symbol: Counter[str] = field(default_factory=Counter)
    late_fields: dict[str, Counter[str]] = field(default_factory=dict)
    type_mismatches: Counter[str] = field(default_factory=Counter)
    internal_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "duplicate_conflicts": self.duplicate_conflicts,
            "hash_verified": self.hash_verified,
            "malformed": dict(self.malformed),
            "malformed_total": sum(self.malformed.values()),
            "late_fields": {s: dict(c) for s, c in self.late_fields.items()},
            "type_mismatches": dict(self.type_mismatches),
            "internal_errors": self.internal_errors,
        }


class MessageHandler:
    """Everything the callback thread does with one message before the ack.

    Decodes and validates (:func:`decode_message`), refuses unknown symbols and bars whose time
    is not after the symbol's last bar, drops duplicates (same message id with the same
    content, or a symbol+time already seen), records field kinds (discovery, late fields), and
    hands the bar to :meth:`BarHub.offer`. Malformed messages are counted per reason and logged
    once per reason with their message id.

    Thread context: Pub/Sub callback threads (serialised by a lock); :meth:`wait_discovery`
    and :meth:`freeze_fields` from the main thread.
    """

    def __init__(
        self,
        hub: BarHub,
        *,
        settings: StreamSettings | None = None,
        events: FeedEvents | None = None,
    ) -> None:
        st = settings or StreamSettings()
        self.hub = hub
        self.symbols = frozenset(hub.symbols)
        self.events = events
        self.stats = FeedStats()
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._max_ids = st.dedup_message_ids
        self._max_times = st.dedup_times_per_symbol
        self._last: dict[str, float] = {}
        self._recent: dict[str, OrderedDict[float, str]] = {s: OrderedDict() for s in self.symbols}
        self._logged: set[str] = set()
        self._first: dict[str, FieldSet] = {}
        self._seen_kinds: dict[str, dict[str, str]] = {s: {} for s in self.symbols}
        self._frozen: dict[str, FieldSet] | None = None
        self._all_first = threading.Event()

    # -- per message -------------------------------------------------------------------------

    def handle(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        *,
        message_id: str | None,
        publish_time_s: float | None = None,
    ) -> str:
        """Process one message. Returns ``delivered``, ``duplicate``, ``malformed`` (ack all
        three) or ``stopped`` (input closed: do not ack)."""
        try:
            bar = decode_message(
                data, attributes, message_id=message_id, publish_time_s=publish_time_s
            )
        except MalformedMessageError as e:
            self._reject(e.reason, e.detail, message_id, attributes.get("symbol"))
            return MALFORMED
        sym = bar.symbol
        with self._lock:
            self.stats.received += 1
            if sym not in self.symbols:
                self._reject_locked(
                    "unknown_symbol", f"symbol {sym!r} is not in SYMBOLS", message_id, sym
                )
                return MALFORMED
            if message_id is not None and self._ids.get(message_id) == bar.data_hash:
                return self._duplicate_locked(sym, message_id, "same message id")
            recent = self._recent[sym]
            seen_hash = recent.get(bar.dt_num)
            if seen_hash is not None:
                if seen_hash != bar.data_hash:
                    self.stats.duplicate_conflicts += 1
                    self._log_once(
                        f"conflict:{sym}",
                        "%s: message %s repeats bar time %s with "
                        "different content; the first version is kept (further "
                        "conflicts are counted)",
                        sym,
                        message_id,
                        bar.ts.isoformat(),
                    )
                return self._duplicate_locked(sym, message_id, "same symbol and timestamp")
            last = self._last.get(sym)
            if last is not None and bar.dt_num <= last:
                self._reject_locked(
                    "stale_timestamp",
                    f"{sym} bar time {bar.ts.isoformat()} is not after the symbol's last bar",
                    message_id,
                    sym,
                )
                return MALFORMED
            # Reserve before the (possibly blocking) offer.
            self._last[sym] = bar.dt_num
            recent[bar.dt_num] = bar.data_hash
            if len(recent) > self._max_times:
                recent.popitem(last=False)
            if message_id is not None:
                self._ids[message_id] = bar.data_hash
                if len(self._ids) > self._max_ids:
                    self._ids.popitem(last=False)
            self._note_fields(sym, bar)
        if not self.hub.offer(bar):
            with self._lock:
                if self._last.get(sym) == bar.dt_num:
                    self._last[sym] = last if last is not None else -math.inf
                recent.pop(bar.dt_num, None)
                if message_id is not None:
                    self._ids.pop(message_id, None)
            return STOPPED
        if self.hub.consumer_waiting:
            # Hand the GIL to the waiting main thread now rather than at the next switch
            # interval (5 ms): keeps callback -> next() well under a millisecond.
            time.sleep(0)
        with self._lock:
            self.stats.delivered += 1
            self.stats.per_symbol[sym] += 1
            if bar.verified:
                self.stats.hash_verified += 1
        if self.events is not None:
            age = bar.received_s - publish_time_s if publish_time_s is not None else None
            self.events.on_bar(sym, age)
        return DELIVERED

    def seed(self, symbol: str, bars: Sequence[LiveBar]) -> None:
        """Remember backfilled bars so live copies of them count as duplicates."""
        with self._lock:
            recent = self._recent[symbol]
            for bar in bars[-self._max_times :]:
                recent[bar.dt_num] = bar.data_hash
            while len(recent) > self._max_times:
                recent.popitem(last=False)
            if bars:
                self._last[symbol] = max(self._last.get(symbol, -math.inf), bars[-1].dt_num)

    def forget_message_ids(self) -> None:
        """After a new subscription (e.g. a restarted server), ids may be reused."""
        with self._lock:
            self._ids.clear()

    # -- fields ------------------------------------------------------------------------------

    def _note_fields(self, sym: str, bar: LiveBar) -> None:
        kinds = self._seen_kinds[sym]
        frozen = self._frozen.get(sym) if self._frozen is not None else None
        for name, value in bar.values.items():
            if name in OHLCV or value is None:
                continue
            kind = "text" if isinstance(value, str) else "number"
            if name not in kinds:
                kinds[name] = kind
            if frozen is not None:
                self._check_frozen(sym, name, kind, frozen)
        if sym not in self._first:
            self._first[sym] = bar_fields(bar)
            if len(self._first) == len(self.symbols):
                self._all_first.set()

    def _check_frozen(self, sym: str, name: str, kind: str, frozen: FieldSet) -> None:
        have = frozen.kind(name)
        if have is None:
            self.stats.late_fields.setdefault(sym, Counter())[name] += 1
            self._log_once(
                f"late:{sym}:{name}",
                "%s: field %r appeared after the feed's "
                "fields were fixed; it is covered by the data hash but agents cannot "
                "read it (declare it with PUBSUB_FIELDS)",
                sym,
                name,
            )
        elif have != kind:
            self.stats.type_mismatches[f"{sym}.{name}"] += 1
            self._log_once(
                f"kind:{sym}:{name}",
                "%s: field %r is a %s line but a message "
                "carried %s; it reads as %s for that bar (counted)",
                sym,
                name,
                have,
                kind,
                "NaN" if have == "number" else "its JSON text",
            )

    def wait_discovery(self, timeout_s: float) -> dict[str, FieldSet]:
        """Wait up to ``timeout_s`` for the first valid bar of every symbol; returns the extra
        fields of each symbol's first bar (empty for symbols that sent nothing in time)."""
        self._all_first.wait(timeout_s)
        with self._lock:
            found = {s: self._first.get(s, FieldSet()) for s in self.hub.symbols}
            missing = [s for s in self.hub.symbols if s not in self._first]
        if missing:
            logger.warning(
                "no bar within the %.1f s discovery window for %s: OHLCV only; "
                "fields appearing later are reported (PUBSUB_FIELDS declares them)",
                timeout_s,
                ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
            )
        return found

    def freeze_fields(self, fields: Mapping[str, FieldSet]) -> None:
        """Fix each symbol's lines; fields seen so far outside them are reported now, later
        ones as they come."""
        with self._lock:
            self._frozen = dict(fields)
            for sym, kinds in self._seen_kinds.items():
                frozen = self._frozen.get(sym, FieldSet())
                for name, kind in kinds.items():
                    self._check_frozen(sym, name, kind, frozen)

    # -- outcomes ------------------------------------------------------------------------------

    def _duplicate_locked(self, sym: str, message_id: str | None, why: str) -> str:
        self.stats.duplicates += 1
        self._log_once(
            "duplicate",
            "duplicate message %s (%s) of %s dropped; further duplicates are counted, not logged",
            message_id,
            why,
            sym,
        )
        if self.events is not None:
            self.events.on_duplicate(sym)
        return DUPLICATE

    def _reject(self, reason: str, detail: str, message_id: str | None, symbol: str | None) -> None:
        with self._lock:
            self.stats.received += 1
            self._reject_locked(reason, detail, message_id, symbol)

    def _reject_locked(
        self, reason: str, detail: str, message_id: str | None, symbol: str | None
    ) -> None:
        self.stats.malformed[reason] += 1
        self._log_once(
            f"malformed:{reason}",
            "malformed message %s refused (%s): %s; further %s messages are counted, not logged",
            message_id,
            reason,
            detail,
            reason,
        )
        if self.events is not None:
            self.events.on_malformed(symbol or "unknown", reason)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(msg, *args)


# --------------------------------------------------------------------------------------------
# The backtrader feed
# --------------------------------------------------------------------------------------------


class PubSubMarketDataFeed(bt.feed.DataBase):  # type: ignore[misc]
    """A live backtrader feed of one symbol, fed by a :class:`BarHub`. Build it with
    :func:`make_pubsub_feed` (or :meth:`PubSubBarSubscriber.make_feeds`), which adds the extra
    numeric fields as lines.

    ``islive()`` is True (backtrader then runs next-by-next without preloading). ``_load()``
    returns True with a bar, None when nothing is due yet (after waiting at most the ``qcheck``
    backtrader hands it), False once the input is closed and drained.

    Status notifications (``notify_data``): DELAYED from the start (also while CSV backfill bars
    play), LIVE with the first live bar and after a reconnect, DISCONNECTED while the stream is
    down (the subscriber reconnects with capped exponential backoff), CONNBROKEN when it gives up.

    Attributes:
        symbol: the symbol (part of every data hash).
        bar_hashes: data hash by absolute bar index (newest ``lookback`` kept).
        text_lines: text field name -> :class:`TextLine` (newest ``lookback`` kept).
        extra_fields: extra numeric line names.
        last_bar: the :class:`LiveBar` loaded last (message id, publish time...).

    Thread context: main thread only.

    Params:
        hub (BarHub): where bars come from.
        fields (FieldSet): extra fields (numeric ones must match the class's lines).
        lookback (int): bars kept per line, text field and hash history.
    """

    params = (("hub", None), ("fields", None), ("lookback", 5000))

    def __init__(self) -> None:
        self.symbol: str = self.p.name
        self._hub: BarHub = self.p.hub
        fields: FieldSet = self.p.fields or FieldSet()
        self.extra_fields = fields.numeric
        self.text_fields = fields.text
        self._lookback = int(self.p.lookback)
        self.bar_hashes = BarHashes(maxlen=self._lookback)
        self.text_lines: dict[str, TextLine] = {}
        self._new_text_lines()
        self.last_bar: LiveBar | None = None
        self.live_bars = 0
        self._master_num: float | None = None
        self._seen_epoch = 0
        self._was_live = False
        self._slots: list[tuple[Any, str]] = []

    def islive(self) -> bool:
        return True

    def haslivedata(self) -> bool:
        return self._hub.has_ready(self.symbol)

    def start(self) -> None:
        super().start()
        self.bar_hashes = BarHashes(maxlen=self._lookback)
        self._new_text_lines()
        self._slots = [(getattr(self.lines, n), n) for n in (*OHLCV, *self.extra_fields)]
        self._seen_epoch = self._hub.epoch
        self._bound_lines()
        self.put_notification(self.DELAYED)

    def _new_text_lines(self) -> None:
        self.text_lines = {n: TextLine(self, n, maxlen=self._lookback) for n in self.text_fields}
        for name, text_line in self.text_lines.items():
            setattr(self, name, text_line)  # data.headline[0], like a line (as the CSV feed)

    def _bound_lines(self) -> None:
        # backtrader's own bounded mode (as with exactbars), at least `lookback` bars.
        for line in self.lines:
            if line.mode != LineBuffer.QBuffer:
                LineBuffer.qbuffer(line)
            line.minbuffer(self._lookback)

    def qbuffer(self, savemem: int = 0, replaying: bool = False) -> None:
        self._bound_lines()

    def next(self, datamaster: Any = None, ticks: bool = True) -> Any:
        if datamaster is None:
            self._master_num = None
            self._hub.begin_pass(id(self))
        else:
            self._master_num = float(datamaster.lines.datetime[0])
        return super().next(datamaster=datamaster, ticks=ticks)

    def _notify(self, status: int, *args: Any) -> None:
        if status != self._laststatus:
            self.put_notification(status, *args)

    def _apply_transitions(self) -> None:
        for epoch, status, detail in self._hub.transitions_since(self._seen_epoch):
            self._seen_epoch = epoch
            if status == "LIVE":
                self._notify(self.LIVE if self._was_live else self.DELAYED)
            elif status == "DISCONNECTED":
                self._notify(self.DISCONNECTED, detail)
            elif status == "CONNBROKEN":
                self._notify(self.CONNBROKEN, detail)

    def _load(self) -> bool | None:
        hub = self._hub
        if hub.epoch != self._seen_epoch:
            self._apply_transitions()
        bar = hub.take(self.symbol, self._qcheck, self._master_num)
        if bar is None:
            return False if hub.finished(self.symbol) else None
        lines = self.lines
        lines.datetime[0] = bar.dt_num
        values = bar.values
        for line, name in self._slots:
            v = values.get(name)
            line[0] = v if type(v) is float else math.nan
        for name, text_line in self.text_lines.items():
            tv = values.get(name)
            text_line.append(tv if tv is None or isinstance(tv, str) else json.dumps(tv))
        self.bar_hashes.append(bar.data_hash)
        self.last_bar = bar
        if bar.live:
            self.live_bars += 1
            if not self._was_live:
                self._was_live = True
            if self._laststatus == self.DELAYED and hub.status == "LIVE":
                self.put_notification(self.LIVE)
        return True


def live_feed_class(extra_fields: tuple[str, ...]) -> type:
    """A :class:`PubSubMarketDataFeed` subclass with ``extra_fields`` as lines (cached)."""
    return dynamic_feed_class(PubSubMarketDataFeed, extra_fields)


def make_pubsub_feed(
    hub: BarHub,
    symbol: str,
    fields: FieldSet | None = None,
    *,
    lookback: int = 5000,
    qcheck_s: float = 0.5,
    timeframe: int = bt.TimeFrame.Minutes,
    compression: int = 1,
) -> PubSubMarketDataFeed:
    """A live feed of ``symbol``; its backtrader name is the symbol. ``qcheck_s`` is the
    longest one backtrader step waits for a bar, seconds."""
    fields = fields or FieldSet()
    cls = live_feed_class(fields.numeric)
    feed: PubSubMarketDataFeed = cls(
        hub=hub,
        fields=fields,
        lookback=lookback,
        name=symbol,
        qcheck=qcheck_s,
        timeframe=timeframe,
        compression=compression,
    )
    return feed


def backfill_bars(cfg: CSVFeedConfig, n: int) -> tuple[list[LiveBar], FieldSet, int, int]:
    """The last ``n`` bars of a CSV file as non-live :class:`LiveBar` s (indicator warm-up),
    their fields, and the file's (timeframe, compression). Hashes are the CSV feed's.

    Raises:
        DataError: as :func:`feeds.csv.read_csv_bars`.
    """
    from feeds.csv import read_csv_bars

    bars = read_csv_bars(cfg)
    start = max(0, len(bars) - n)
    stamps = pd.DatetimeIndex(bars.times[start:]).to_pydatetime()
    numeric = {k: a[start:].tolist() for k, a in bars.numeric.items()}
    text = {k: v[start:] for k, v in bars.text.items()}
    out = []
    for i, ts in enumerate(stamps):
        values: dict[str, Any] = {k: col[i] for k, col in numeric.items()}
        values.update((k, col[i]) for k, col in text.items())
        out.append(
            LiveBar(
                symbol=cfg.symbol,
                ts=ts.replace(tzinfo=UTC),
                dt_num=bt.date2num(ts),
                values=values,
                data_hash=bars.hashes[start + i],
                live=False,
            )
        )
    fields = FieldSet(tuple(bars.extra_fields), tuple(bars.text))
    return out, fields, bars.timeframe, bars.compression


class LiveMemoryBound(bt.Analyzer):  # type: ignore[misc]
    """Bounds the memory of a live run of any length: the strategy's own lines, indicators and
    observers use backtrader's bounded buffers (the ``exactbars=1`` scheme) with at least
    ``indicator_lookback`` bars; live feeds keep their own ``lookback``.

    Added by the runner in paper mode. Params: ``indicator_lookback`` (int, bars).
    """

    params = (("indicator_lookback", 64),)

    def start(self) -> None:
        floor = int(self.p.indicator_lookback)
        seen: set[int] = set()

        def bound(obj: Any) -> None:
            if id(obj) in seen or isinstance(obj, bt.AbstractDataBase):
                return
            seen.add(id(obj))
            for line in obj.lines:
                if isinstance(line, LineBuffer):
                    if line.mode != LineBuffer.QBuffer:
                        LineBuffer.qbuffer(line)
                    line.minbuffer(max(floor, line._minperiod))
            for children in getattr(obj, "_lineiterators", {}).values():
                for child in children:
                    bound(child)

        bound(self.strategy)


# --------------------------------------------------------------------------------------------
# The subscriber
# --------------------------------------------------------------------------------------------


def symbol_filter(symbols: Sequence[str]) -> str | None:
    """A Pub/Sub subscription filter on the ``symbol`` attribute, or None when it would exceed
    Pub/Sub's 256-byte limit (routing happens in our code regardless)."""
    if any('"' in s or "\\" in s for s in symbols):
        return None
    text = " OR ".join(f'attributes.symbol = "{s}"' for s in symbols)
    return text if len(text.encode()) <= MAX_FILTER_BYTES else None


def subscription_id(prefix: str, session_id: str, topic_id: str, many: bool) -> str:
    """``<prefix>-<session>[-<topic>]``, made legal (letters first, 3..255 chars)."""
    raw = f"{prefix}-{session_id}" + (f"-{topic_id}" if many else "")
    name = _SUB_ID_RE.sub("-", raw).strip("-")
    if not name or not name[0].isalpha():
        name = "s-" + name
    return name[:255].ljust(3, "x")


def _path(project: str, kind: str, name: str) -> str:
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


@dataclass(slots=True)
class _Sub:
    path: str
    topic: str
    owned: bool
    future: Any = None


class PubSubBarSubscriber:
    """The one subscriber of a runner: its subscriptions (one per topic), streams, hub, handler
    and supervisor thread.

    Lifecycle (main thread): :meth:`start` -> :meth:`discover_fields` -> :meth:`make_feeds` ->
    ``cerebro.run()`` -> :meth:`close`. :meth:`request_stop` is safe from a signal handler.

    Subscriptions are named ``<PUBSUB_SUBSCRIPTION_PREFIX>-<session id>`` (plus the topic id when
    there are several topics), carry an expiration policy (``PUBSUB_SUBSCRIPTION_TTL_S``) so a
    crashed pod leaves nothing behind, message ordering, and a ``symbol`` filter when it fits
    (the emulator stores but ignores filters; routing is done here in any case). One that
    already exists under that name is reused; ``PUBSUB_SUBSCRIPTION`` reuses a named one that
    this runner then neither recreates nor deletes. Created ones are deleted by :meth:`close`.

    Args:
        cfg: the feed config.
        symbols: symbols to route (others are refused as ``unknown_symbol``).
        session_id: the runner's session (names the subscription).
        settings: stream tuning.
        events: optional metrics observer.
    """

    def __init__(
        self,
        cfg: PubSubFeedConfig,
        *,
        symbols: Sequence[str],
        session_id: str,
        settings: StreamSettings | None = None,
        events: FeedEvents | None = None,
    ) -> None:
        if not symbols:
            raise ConfigError("SYMBOLS: a live run needs at least one symbol")
        if cfg.subscription and len(cfg.topics) > 1:
            raise ConfigError(
                "PUBSUB_SUBSCRIPTION names one subscription but PUBSUB_TOPIC lists "
                f"{len(cfg.topics)} topics; use one topic or drop "
                "PUBSUB_SUBSCRIPTION"
            )
        self.cfg = cfg
        self.symbols = tuple(symbols)
        self.session_id = session_id
        self.settings = settings or StreamSettings()
        self.hub = BarHub(
            self.symbols,
            max_buffered_bars=cfg.max_buffered_bars,
            align_wait_s=cfg.align_wait_s,
            idle_timeout_s=cfg.idle_timeout_s,
        )
        self.handler = MessageHandler(self.hub, settings=self.settings, events=events)
        self.declared = parse_declared_fields(cfg.fields)
        self.fields: dict[str, FieldSet] = {}
        self.timeframe: int = bt.TimeFrame.Minutes
        self.compression = 1
        self.drain_timeout_s: float | None = None
        self.disconnects = 0
        self.reconnects = 0
        self.last_error = ""
        self._client: Any = None
        self._subs: list[_Sub] = []
        self._stop = threading.Event()
        self._stream_lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._drain_timeout_s: float | None = None
        self._closed = False
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, backfill: Mapping[str, Sequence[LiveBar]] | None = None) -> None:
        """Queue the backfill bars (they play before any live bar), create or reuse the
        subscriptions, open the streams, start the supervisor.

        Args:
            backfill: per symbol, CSV bars from :func:`backfill_bars` (oldest first); live bars
                at or before a symbol's last backfill bar are then dropped as duplicates/stale.

        Raises:
            ConfigError: the topic does not exist, or a reused subscription is missing or
                bound to another topic.
            TransientError: Pub/Sub is unreachable or refused a call (the message says which).
        """
        from google.api_core import exceptions as gexc

        for sym, bars in (backfill or {}).items():
            if bars:
                self.handler.seed(sym, bars)
                self.hub.preload(bars)
        self._client = _subscriber_client(self.cfg.emulator_host)
        many = len(self.cfg.topics) > 1
        try:
            for topic in self.cfg.topics:
                topic_path = _path(self.cfg.project, "topics", topic)
                if self.cfg.subscription:
                    sub = _Sub(
                        _path(self.cfg.project, "subscriptions", self.cfg.subscription),
                        topic_path,
                        owned=False,
                    )
                    self._check_reused(sub)
                else:
                    name = subscription_id(
                        self.cfg.subscription_prefix,
                        self.session_id,
                        topic_path.rsplit("/", 1)[-1],
                        many,
                    )
                    sub = _Sub(
                        _path(self.cfg.project, "subscriptions", name), topic_path, owned=True
                    )
                    try:
                        self._ensure(sub)
                    except gexc.NotFound as e:
                        raise ConfigError(
                            f"PUBSUB_TOPIC: topic {topic_path} does not exist "
                            "(create it, or start the publisher first)"
                        ) from e
                self._subs.append(sub)
            self._open_streams()
        except gexc.GoogleAPICallError as e:
            self._abort()
            raise TransientError(f"Pub/Sub at {self.cfg.emulator_host or 'Google'}: {e}") from e
        except Exception:
            self._abort()
            raise
        self.hub.set_status("LIVE")
        self._started = True
        self._supervisor = threading.Thread(
            target=self._supervise, name="pubsub-supervisor", daemon=True
        )
        self._supervisor.start()
        logger.info(
            "subscribed to %s via %s (%d symbols)",
            ", ".join(self.cfg.topics),
            ", ".join(s.path.rsplit("/", 1)[-1] for s in self._subs),
            len(self.symbols),
        )

    def discover_fields(
        self, backfill: Mapping[str, FieldSet] | None = None
    ) -> dict[str, FieldSet]:
        """Each symbol's extra fields: the declared ones (PUBSUB_FIELDS) or those of its first
        message within ``PUBSUB_DISCOVERY_S``, plus the backfill file's; then fixed."""
        if self.declared:
            found = {s: self.declared for s in self.symbols}
        elif self.cfg.discovery_s > 0:
            found = self.handler.wait_discovery(self.cfg.discovery_s)
        else:
            found = {s: FieldSet() for s in self.symbols}
        if backfill:
            found = {s: found[s].union(backfill.get(s, FieldSet())) for s in self.symbols}
        self.fields = found
        self.handler.freeze_fields(found)
        return found

    def make_feeds(
        self, *, timeframe: int | None = None, compression: int | None = None
    ) -> list[PubSubMarketDataFeed]:
        """One feed per symbol (in SYMBOLS order). Call after :meth:`discover_fields`. The bar
        size defaults to :attr:`timeframe`/:attr:`compression` (the backfill file's, else one
        minute)."""
        tf = self.timeframe if timeframe is None else timeframe
        comp = self.compression if compression is None else compression
        return [
            make_pubsub_feed(
                self.hub,
                s,
                self.fields.get(s, FieldSet()),
                lookback=self.cfg.lookback_bars,
                qcheck_s=self.cfg.qcheck_s,
                timeframe=tf,
                compression=comp,
            )
            for s in self.symbols
        ]

    def request_stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop pulling; feeds drain what was delivered (for at most ``drain_timeout_s``,
        default :attr:`drain_timeout_s`) then end. Safe from a signal handler: only sets an
        event; the supervisor thread does the work."""
        self._drain_timeout_s = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._stop.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the streams, join the supervisor, delete the subscriptions this runner created
        and close the client. Idempotent; never raises (failures are logged: an undeleted
        subscription expires by its TTL)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.hub.close_input("subscriber closed", self._drain_timeout_s)
        if self._supervisor is not None:
            self._supervisor.join(timeout_s)
        self._cancel_streams(timeout_s)
        self._delete_owned()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                logger.exception("closing the Pub/Sub client failed")
            self._client = None

    # -- report --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for the final report and metrics."""
        out = self.handler.stats.as_dict()
        out.update(
            buffered=self.hub.buffered,
            undelivered_at_stop=self.hub.undelivered,
            backpressure_waits=self.hub.backpressure_waits,
            disconnects=self.disconnects,
            reconnects=self.reconnects,
            subscriptions=[s.path for s in self._subs],
            status=self.hub.status,
            input_closed=self.hub.close_reason,
        )
        return out

    def feed_counters(self) -> dict[str, dict[str, int]]:
        """Per-symbol counters plus an ``all`` row (malformed by reason, duplicates...)."""
        st = self.handler.stats
        rows: dict[str, dict[str, int]] = {
            s: {"delivered": st.per_symbol.get(s, 0)} for s in self.symbols
        }
        total = {
            "received": st.received,
            "delivered": st.delivered,
            "duplicates": st.duplicates,
            "malformed": sum(st.malformed.values()),
            "disconnects": self.disconnects,
            "undelivered": self.hub.undelivered,
        }
        total.update({f"malformed.{k}": v for k, v in sorted(st.malformed.items())})
        rows["all"] = total
        return rows

    # -- streams (supervisor thread, and start) -------------------------------------------------

    def _callback(self, message: Any) -> None:
        """Pub/Sub callback thread: decode, validate, hash, buffer, then ack."""
        try:
            pt = message.publish_time
            outcome = self.handler.handle(
                message.data,
                message.attributes,
                message_id=message.message_id,
                publish_time_s=pt.timestamp() if pt else None,
            )
        except Exception:
            self.handler.stats.internal_errors += 1
            logger.exception(
                "internal error handling message %s; nacked", getattr(message, "message_id", "?")
            )
            message.nack()
            return
        if outcome == STOPPED:
            message.nack()
        else:
            message.ack()

    def _open_streams(self) -> None:
        from google.cloud.pubsub_v1 import types as pubsub_types
        from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

        st = self.settings
        flow = pubsub_types.FlowControl(
            max_messages=st.max_outstanding_messages, max_bytes=st.max_outstanding_bytes
        )
        with self._stream_lock:
            for sub in self._subs:
                # One worker per stream: bars of a symbol are handled in arrival order.
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pubsub-cb")
                sub.future = self._client.subscribe(
                    sub.path, self._callback, flow_control=flow, scheduler=ThreadScheduler(executor)
                )

    def _cancel_streams(self, timeout_s: float) -> None:
        with self._stream_lock:
            futures = [(s, s.future) for s in self._subs if s.future is not None]
            for s, _ in futures:
                s.future = None
        for _, fut in futures:
            fut.cancel()
        for sub, fut in futures:
            try:
                fut.result(timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - the stream is gone either way
                logger.debug("stream %s ended: %r", sub.path, e)

    def _ensure(self, sub: _Sub) -> None:
        """Create an owned subscription, or reuse it when it already exists."""
        from google.api_core import exceptions as gexc
        from google.protobuf import duration_pb2

        request: dict[str, Any] = {
            "name": sub.path,
            "topic": sub.topic,
            "ack_deadline_seconds": self.settings.ack_deadline_s,
            "enable_message_ordering": True,
            "expiration_policy": {
                "ttl": duration_pb2.Duration(seconds=int(self.cfg.subscription_ttl_s))
            },
        }
        flt = symbol_filter(self.symbols)
        if flt is not None:
            request["filter"] = flt
        try:
            self._client.create_subscription(
                request=request, retry=None, timeout=self.settings.admin_timeout_s
            )
            logger.info(
                "created subscription %s on %s (expires after %d s idle)",
                sub.path,
                sub.topic,
                self.cfg.subscription_ttl_s,
            )
        except gexc.AlreadyExists:
            self._check_reused(sub)
            logger.info("reusing existing subscription %s", sub.path)

    def _check_reused(self, sub: _Sub) -> None:
        from google.api_core import exceptions as gexc

        try:
            got = self._client.get_subscription(
                request={"subscription": sub.path},
                retry=None,
                timeout=self.settings.admin_timeout_s,
            )
        except gexc.NotFound as e:
            raise ConfigError(f"PUBSUB_SUBSCRIPTION: {sub.path} does not exist") from e
        if got.topic != sub.topic:
            raise ConfigError(
                f"subscription {sub.path} is attached to {got.topic}, not {sub.topic}"
            )

    def _probe(self) -> str | None:
        """None when every stream runs and its subscription answers; else what is wrong."""
        with self._stream_lock:
            subs = list(self._subs)
        for sub in subs:
            fut = sub.future
            if fut is None:
                return f"stream of {sub.path} not running"
            if fut.done():
                return f"stream of {sub.path} ended: {_exc_text(fut)}"
        for sub in subs:
            try:
                self._client.get_subscription(
                    request={"subscription": sub.path},
                    retry=None,
                    timeout=self.settings.probe_timeout_s,
                )
            except Exception as e:  # noqa: BLE001 - any failure means "not connected"
                return f"{sub.path}: {type(e).__name__}: {e}"
        return None

    def _reconnect(self) -> None:
        """Recreate owned subscriptions that vanished (e.g. a restarted server) and reopen the
        streams. Raises what the calls raise."""
        from google.api_core import exceptions as gexc

        self._cancel_streams(self.settings.probe_timeout_s)
        for sub in self._subs:
            try:
                self._client.get_subscription(
                    request={"subscription": sub.path},
                    retry=None,
                    timeout=self.settings.probe_timeout_s,
                )
            except gexc.NotFound:
                if not sub.owned:
                    raise
                self._ensure(sub)
                # A new subscription may reuse message ids (a restarted emulator starts at 1).
                self.handler.forget_message_ids()
        self._open_streams()

    def _supervise(self) -> None:
        """Supervisor thread: probe every ``health_interval_s``; on failure report
        DISCONNECTED and reconnect with capped exponential backoff until LIVE again."""
        from google.api_core import exceptions as gexc

        terminal = (gexc.PermissionDenied, gexc.Unauthenticated, gexc.InvalidArgument)
        st = self.settings
        attempt = 0
        connected = True
        while not self._stop.is_set():
            if connected:
                if self._stop.wait(st.health_interval_s):
                    break
                problem = self._probe()
                if problem is None:
                    continue
                connected = False
                self.disconnects += 1
                self.last_error = problem
                logger.warning("Pub/Sub stream down (%s); reconnecting", problem)
                self.hub.set_status("DISCONNECTED", problem)
                attempt = 0
                continue
            if self._stop.wait(st.reconnect_delay_s(attempt)):
                break
            attempt += 1
            try:
                self._reconnect()
            except terminal as e:
                self.last_error = f"{type(e).__name__}: {e}"
                logger.error(
                    "Pub/Sub refused the subscription for good (%s); ending the live input",
                    self.last_error,
                )
                self.hub.set_status("CONNBROKEN", self.last_error)
                self.hub.close_input(f"stream broken: {self.last_error}")
                return
            except Exception as e:  # noqa: BLE001 - retried with backoff
                self.last_error = f"{type(e).__name__}: {e}"
                logger.info("reconnect attempt %d failed: %s", attempt, self.last_error)
                continue
            connected = True
            self.reconnects += 1
            logger.warning("Pub/Sub stream reconnected after %d attempt(s)", attempt)
            self.hub.set_status("LIVE")
        # Stop requested: stop pulling; the feeds drain what was delivered.
        self.hub.close_input("stop requested", self._drain_timeout_s)
        self._cancel_streams(st.probe_timeout_s)

    def _delete_owned(self) -> None:
        if self._client is None:
            return
        for sub in self._subs:
            if not sub.owned:
                continue
            try:
                self._client.delete_subscription(
                    request={"subscription": sub.path},
                    retry=None,
                    timeout=self.settings.admin_timeout_s,
                )
                logger.info("deleted subscription %s", sub.path)
            except Exception as e:  # noqa: BLE001 - it expires by its TTL anyway
                logger.warning(
                    "could not delete subscription %s (%s); it expires after %d s idle",
                    sub.path,
                    e,
                    self.cfg.subscription_ttl_s,
                )

    def _abort(self) -> None:
        self._cancel_streams(self.settings.probe_timeout_s)
        self._delete_owned()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None


def start_live_input(
    config: AppConfig,
    *,
    session_id: str,
    events: FeedEvents | None = None,
    settings: StreamSettings | None = None,
) -> PubSubBarSubscriber:
    """Everything ``MODE=paper`` needs before the feeds are added: read the CSV backfill
    (``PUBSUB_BACKFILL_BARS``), start the subscriber, discover the fields. Then call
    :meth:`PubSubBarSubscriber.make_feeds`, and :meth:`~PubSubBarSubscriber.close` at the end.

    Raises:
        ConfigError, DataError: bad settings or backfill file.
        TransientError: Pub/Sub unreachable.
    """
    cfg = config.pubsub
    if cfg is None:
        raise ConfigError(
            "MODE=paper needs the Pub/Sub settings (PUBSUB_TOPIC, GOOGLE_CLOUD_PROJECT)"
        )
    sub = PubSubBarSubscriber(
        cfg, symbols=config.run.symbols, session_id=session_id, settings=settings, events=events
    )
    # Half the shutdown budget drains buffered bars; the rest flushes decisions and cleans up.
    sub.drain_timeout_s = config.ops.shutdown_timeout_s / 2
    backfill: dict[str, list[LiveBar]] = {}
    backfill_fields: dict[str, FieldSet] = {}
    if cfg.backfill_bars > 0:
        for fc in config.csv_feeds:
            bars, file_fields, sub.timeframe, sub.compression = backfill_bars(fc, cfg.backfill_bars)
            backfill[fc.symbol] = bars
            backfill_fields[fc.symbol] = file_fields
            logger.info(
                "backfill %s: %d bars from %s before going live", fc.symbol, len(bars), fc.path.name
            )
    sub.start(backfill)
    try:
        fields = sub.discover_fields(backfill_fields)
    except BaseException:
        sub.close()
        raise
    logger.info(
        "live fields: %s",
        "; ".join(
            f"{s}: {', '.join(f.numeric + f.text) or 'OHLCV only'}" for s, f in fields.items()
        ),
    )
    return sub


def _exc_text(fut: Any) -> str:
    try:
        exc = fut.exception(timeout=0)
    except Exception as e:  # noqa: BLE001 - cancelled futures raise here
        return type(e).__name__
    return f"{type(exc).__name__}: {exc}" if exc is not None else "finished"


def _subscriber_client(emulator_host: str | None) -> Any:
    """A SubscriberClient; for an emulator host, on a plain-text channel without credentials
    (what the client itself does when PUBSUB_EMULATOR_HOST is set)."""
    from google.cloud.pubsub_v1 import SubscriberClient

    if emulator_host:
        import grpc
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        channel = grpc.insecure_channel(emulator_host)
        return SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
    return SubscriberClient()


def publisher_client(emulator_host: str | None, *, ordering: bool = True) -> Any:
    """A PublisherClient with message ordering (``ordering_key=symbol`` keeps each symbol's bars
    in order); plain-text channel for an emulator host."""
    from google.cloud.pubsub_v1 import PublisherClient
    from google.cloud.pubsub_v1 import types as pubsub_types

    options = pubsub_types.PublisherOptions(enable_message_ordering=ordering)
    if emulator_host:
        import grpc
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        channel = grpc.insecure_channel(emulator_host)
        return PublisherClient(
            publisher_options=options, transport=PublisherGrpcTransport(channel=channel)
        )
    return PublisherClient(publisher_options=options)


def metrics_events(metrics: Any) -> FeedEvents:
    """Adapter from the runner's ``RunMetrics`` (``bars_received``, ``message_age``,
    ``malformed``, ``duplicates``, labelled by feed) to :class:`FeedEvents`."""

    class _Events:
        def on_bar(self, symbol: str, age_s: float | None) -> None:
            metrics.bars_received.labels(feed=symbol).inc()
            if age_s is not None:
                metrics.message_age.labels(feed=symbol).observe(max(age_s, 0.0))

        def on_malformed(self, symbol: str, reason: str) -> None:
            metrics.malformed.labels(feed=symbol).inc()

        def on_duplicate(self, symbol: str) -> None:
            metrics.duplicates.labels(feed=symbol).inc()

    return _Events()
