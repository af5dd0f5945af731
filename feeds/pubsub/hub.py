"""The hand-off between the Pub/Sub callback thread(s) and backtrader's main thread.

:class:`BarHub` holds one bounded buffer per symbol. The callback thread offers bars (blocking
while the symbol's buffer is full: back-pressure, nothing is dropped); the main thread takes them,
one bar time per backtrader step.

Alignment: a bar waits (at most ``align_wait_s``) until every recently active symbol has reached
its time, and the feeds hand out one timestamp per backtrader step, so a multi-symbol agent sees
the bars of one time together, as in a backtest.

Thread context: one lock and condition guard everything; :meth:`BarHub.offer` runs on callback
threads, :meth:`BarHub.take` and the other consumer methods on the main thread.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from core.errors import ConfigError
from core.time import bt_num_to_utc
from feeds.pubsub.messages import LiveBar

__all__ = ["HOLD_CAP_FACTOR", "BarHub"]

logger = logging.getLogger(__name__)

# A held bar waits at most this many align_wait_s, even while other bars keep arriving.
HOLD_CAP_FACTOR = 10.0


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
                    bt_num_to_utc(num) if num > 0 else None,
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
