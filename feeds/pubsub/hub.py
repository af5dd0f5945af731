"""The hand-off between the Pub/Sub pull thread(s) and backtrader's main thread.

:class:`BarHub` holds one bounded buffer per symbol. The pull thread offers bars (blocking
while the symbol's buffer is full: back-pressure, nothing is dropped); the main thread takes
them, one bar time per backtrader step.

Alignment (what a multi-symbol agent sees, as in a backtest):

* A **step** is one bar time ``T``, served in time order. It is served as soon as every symbol
  that is waited for has a bar at or after ``T``, and at the latest ``align_wait_s`` after the
  first bar of time ``T`` arrived (also at once when the input is closed, when a producer is
  blocked on a full buffer, or with ``align_wait_s == 0``).
* Only bars of time ``T`` are delivered in step ``T``: bars of different times are never merged
  into one step.
* A symbol that had no bar at ``T`` when step ``T`` was served **missed** the step (counted in
  :attr:`BarHub.missed`); it is not waited for again until it has caught up: one of its bars
  arrives for the latest step served or a later one. (A symbol that lags by several steps is
  thus never waited for, and costs the others nothing.)
* A bar that arrives after its step (or a later one) was served is **late**: it is refused
  (:data:`LATE`, counted in :attr:`BarHub.late`), never delivered in a later step. So a live run
  decides exactly like a backtest whose CSV files lack the bars that missed their step.
* **Holds** (:meth:`BarHub.hold_steps`): after a (re)connect, what a dead runner or a broken
  connection had pulled comes back one lease later, mixed with newer bars, so no step is served
  for a while, and then not until deliveries have been in order for a while. With a known bar
  size, for :attr:`BarHub.gap_hold_s` after a hold began, a step that would leave bar times
  missing after the last step served (or after the last one an earlier run decided,
  :meth:`BarHub.resume_after`) also waits for them: Pub/Sub redelivers late, and the emulator
  later than its ack deadline says. A gap that is real costs that wait once per reconnect.

A backlog larger than the buffer (a symbol's ``max_buffered_bars``, coming out of order after a
restart or a cut): bars that carry a ``token`` can go back to Pub/Sub to come again later. While
the symbol's buffer is full, an older bar takes the place of the newest one buffered (which is
handed back: :meth:`BarHub.pop_returned`), and during a hold a newer bar is itself handed back
(:data:`RETURNED`) rather than stopping the pull thread, so older bars still on their way are
pulled. The time of every bar handed back is **owed**: no step at or after it is served until
it comes again (at most :data:`MAX_HOLD_S` after it was handed back). Before, the pull thread
waited for room behind the newest bars, the hold ran out, and the older ones came late and
were refused: lost. Without a token (acknowledged on receipt) a bar cannot come again, and
:meth:`BarHub.offer` waits for room as before.

Acknowledgement ledger: bars that carry a ``token`` (the Pub/Sub message, when the subscriber
acknowledges only once the decision on a bar is on disk) are remembered when taken, in step
order; :meth:`BarHub.pop_loaded_through` hands back those of the steps up to a bar time, and
:meth:`BarHub.pop_unacknowledged` everything not yet handed back (for the shutdown's nacks).

Thread context: one lock and condition guard everything; :meth:`BarHub.offer` runs on pull
threads, :meth:`BarHub.take` and the other consumer methods on the main thread; the ledger
methods on any thread.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta

from core.errors import ConfigError
from core.time import bt_num_to_utc
from feeds.pubsub.gaps import GapCounter
from feeds.pubsub.messages import LiveBar

__all__ = ["CLOSED", "LATE", "OFFERED", "RETURNED", "BarHub"]

logger = logging.getLogger(__name__)
_HALF_MS = timedelta(microseconds=500)  # added before a cut to milliseconds: rounds

# At most this many gap events are logged per minute; the others are counted.
GAP_LOGS_PER_MINUTE = 10
# Longest hold of steps (BarHub.hold_steps), however long disorder goes on.
MAX_HOLD_S = 120.0

# Outcomes of BarHub.offer.
OFFERED, LATE, CLOSED, RETURNED = "offered", "late", "closed", "returned"
# A step time's first arrival for bars preloaded before pulling starts (served without waiting).
_PRELOADED = -math.inf
# Tolerance when comparing a decision's bar time (POSIX seconds rounded to the millisecond) with
# backtrader day numbers: half a millisecond, in days.
_HALF_MS_DAYS = 0.0005 / 86_400.0


class _SymbolBuffer:
    """Bars of one symbol waiting to be taken, in time order."""

    __slots__ = ("last_num", "order", "pending", "symbol", "taken_num", "waited")

    def __init__(self, symbol: str, order: int) -> None:
        self.symbol = symbol
        self.order = order
        self.pending: deque[LiveBar] = deque()
        self.last_num = -math.inf  # latest bar time offered
        self.taken_num = -math.inf  # time of the bar taken last
        self.waited = True  # a step waits for this symbol (until it misses one)


class BarHub:
    """Per-symbol bounded buffers between the pull thread(s) and backtrader's main thread.

    * :meth:`offer` (pull thread) blocks while the symbol already buffers
      ``max_buffered_bars`` bars: no bar is dropped to make room; the pull thread then pulls
      no more until there is room. Returns :data:`LATE` for a bar whose step was served.
    * :meth:`take` (main thread) hands out, per backtrader step, only bars of the step's time,
      following the alignment rule of the module docstring.
    * :meth:`close_input` ends the input; feeds then drain what is buffered (until the optional
      drain deadline) and report the end.

    Args:
        symbols: the symbols routed here.
        max_buffered_bars: per symbol.
        align_wait_s: longest a step waits for late symbols, from its first bar, seconds;
            0 disables alignment waits.
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
        # Lazy heaps: (time, order, buffer); stale entries are skipped when popped.
        self._heads: list[tuple[float, int, _SymbolBuffer]] = []  # pending heads
        self._wm: list[tuple[float, int, _SymbolBuffer]] = [
            (b.last_num, b.order, b) for b in self._bufs.values()
        ]  # latest offered time of the waited symbols (the watermark is the smallest)
        self._first_arrival: dict[float, float] = {}  # step time -> first bar's arrival
        self._arrival_times: list[float] = []  # heap of the keys of _first_arrival
        self._buffered = 0
        self._blocked = 0
        self._last_offer: float | None = None
        self._served = -math.inf  # time of the last step served
        self._step: float | None = None  # the step being served in this backtrader pass
        self._pass_seen: set[int] = set()
        self._loaded: deque[LiveBar] = deque()  # taken bars whose token is not handed back
        self._drain_over = False
        self._hold_until = -math.inf
        self._hold_cap = math.inf
        self._served_in_hold = True  # a step was served since the last hold began
        self._backlog_before = -math.inf  # publish times before this are backlog
        # Steps wait until deliveries have been in order this long after disorder (0: never);
        # the subscriber sets it (StreamSettings.backlog_quiet_s).
        self.disorder_quiet_s = 0.0
        # After a hold (a (re)connect), for this long a step that leaves a gap after the last
        # step served (or after resume_after) waits for the missing bar times (0: never); the
        # subscriber sets it (PUBSUB_GAP_HOLD_S). Needs a known bar size.
        self.gap_hold_s = 0.0
        self._gap_hold_until = -math.inf
        self._resume_after = -math.inf  # last bar time decided by an earlier run (day number)
        self.gap_holds = 0  # steps that waited for a gap to fill
        self._gap_waiting = False
        self.disordered = 0  # bars that came out of order (or from a backlog)
        self.holds = 0
        # Missing bar times, counted when bars are taken (what the agent sees).
        self.gaps = GapCounter()
        self.missing: Counter[str] = Counter()
        self.gap_events = 0
        self.on_gap: Callable[[str, int], None] | None = None
        self._gap_log = (-math.inf, 0, 0)  # (window start, logged, suppressed)
        self.input_closed = False
        self.close_reason = ""
        self._drain_deadline: float | None = None
        self.backpressure_waits = 0
        self.undelivered = 0
        self.steps = 0
        # bars handed back to Pub/Sub (buffer full during a backlog), per symbol
        self.returned: Counter[str] = Counter()
        self._returned: list[LiveBar] = []  # evicted, for pop_returned
        self._owed: dict[tuple[str, float], float] = {}  # (symbol, time) -> owed until
        self._owed_heap: list[tuple[float, str]] = []  # lazy: (time, symbol)
        # the oldest owed bar time when the input closed: the drain serves no step at or
        # after it (those bars stay unacknowledged and come again at the next start)
        self._closed_owed = math.inf
        self.missed: Counter[str] = Counter()
        self.late: Counter[str] = Counter()
        self.consumer_waiting = False  # the main thread waits in take() for a bar
        # clock seconds of the last take() (a loop turn in it): the bar loop's heartbeat
        self.last_take_s: float | None = None
        self._epoch = 0
        self._transitions: deque[tuple[int, str, str]] = deque(maxlen=64)
        self.status = "CONNECTING"

    # -- producer side (pull threads) --------------------------------------------------------

    def offer(self, bar: LiveBar, timeout_s: float | None = None) -> str:
        """Buffer one bar, waiting while its symbol's buffer is full.

        Returns:
            :data:`OFFERED` when buffered; :data:`LATE` when its step (or a later one) was
            served already (the bar is not buffered); :data:`CLOSED` when the input is closed
            or ``timeout_s`` passed (the caller must not acknowledge the message).

        Raises:
            KeyError: for a symbol not routed here.
        """
        buf = self._bufs[bar.symbol]
        with self._cond:
            deadline = None if timeout_s is None else self._clock() + timeout_s
            if self._owed:
                self._owed.pop((bar.symbol, bar.dt_num), None)  # it came again
            full = len(buf.pending) >= self.max_buffered_bars and not self.input_closed
            if (
                full
                and bar.dt_num > self._served
                and any(b.dt_num == bar.dt_num for b in buf.pending)
            ):
                # a second copy of a buffered bar (one the handler's window of recent bar
                # times no longer holds) needs no room: refused as below without waiting for
                # it (a fresh-context attack: it stopped the pull during a hold behind a full
                # buffer, and the older half of a backlog came after its steps)
                self.late[bar.symbol] += 1
                return LATE
            if full and bar.token is not None and bar.dt_num > self._served:
                newest = buf.pending[-1]
                if bar.dt_num > newest.dt_num:
                    now = self._clock()
                    if self._holding_locked(now) or self._min_owed(now) < math.inf:
                        # a backlog: pull on for the older bars rather than wait behind this
                        self._owe_locked(bar)
                        self._last_offer = self._clock()
                        self._cond.notify_all()
                        return RETURNED
                elif newest.token is not None:
                    # keep the oldest bars: the newest goes back to Pub/Sub
                    buf.pending.pop()
                    self._buffered -= 1
                    self._owe_locked(newest)
                    self._returned.append(newest)
            if len(buf.pending) >= self.max_buffered_bars and not self.input_closed:
                self.backpressure_waits += 1
                self._blocked += 1  # a blocked producer: a step cannot wait for more bars
                self._cond.notify_all()
                try:
                    while len(buf.pending) >= self.max_buffered_bars and not self.input_closed:
                        wait = 0.25
                        if deadline is not None:
                            wait = min(wait, deadline - self._clock())
                            if wait <= 0:
                                return CLOSED
                        self._cond.wait(wait)
                finally:
                    self._blocked -= 1
            if self.input_closed:
                return CLOSED
            now = self._clock()
            self._last_offer = now
            num = bar.dt_num
            if num <= self._served:
                # Refused whatever comes: it starts no hold either. Every bar it could be
                # waited for with is older still, so also late (a fresh-context attack: one
                # bar an hour old held every symbol 15 s; one every 5 s held them all).
                self.late[bar.symbol] += 1
                if num == self._served and num >= buf.last_num:
                    # Late for the latest step only: caught up, waited for from the next one.
                    buf.last_num = num
                    buf.waited = True
                    heapq.heappush(self._wm, (num, buf.order, buf))
                return LATE
            if num < buf.last_num or (
                bar.publish_time_s is not None and bar.publish_time_s < self._backlog_before
            ):
                self._disorder_locked(now)
            pending = buf.pending
            if not pending or num > pending[-1].dt_num:
                if not pending:
                    heapq.heappush(self._heads, (num, buf.order, buf))
                pending.append(bar)
            else:  # out of order (no Pub/Sub ordering, a redelivery): put it in its place
                i = len(pending)
                while i > 0 and pending[i - 1].dt_num > num:
                    i -= 1
                if i > 0 and pending[i - 1].dt_num == num:
                    self.late[bar.symbol] += 1  # a second copy of a buffered bar
                    return LATE
                pending.insert(i, bar)
                if i == 0:
                    heapq.heappush(self._heads, (num, buf.order, buf))
            self._buffered += 1
            if num not in self._first_arrival:
                self._first_arrival[num] = now
                heapq.heappush(self._arrival_times, num)
            if num > buf.last_num:
                buf.last_num = num
                heapq.heappush(self._wm, (num, buf.order, buf))
            if not buf.waited:
                buf.waited = True  # in time again
                heapq.heappush(self._wm, (buf.last_num, buf.order, buf))
            self._cond.notify_all()
        return OFFERED

    def shed_newest(self, count: int) -> int:
        """Hand back up to ``count`` of the newest buffered bars, across symbols, at most half
        of what is buffered and only bars not acknowledged yet; their times are owed (no step
        from the oldest of them on is served until they come again, or :data:`MAX_HOLD_S`).
        Collected by :meth:`pop_returned`. Returns how many.

        For the pull thread when the leased messages reached their limit while steps are held
        (helper-78 F2): a backlog arriving newest first filled the leases with its newest bars
        while no symbol's buffer was full, so nothing went back, the pull stopped, and the
        oldest bars came after their steps. Any thread (called by pull threads)."""
        with self._cond:
            count = min(count, self._buffered // 2)
            if count <= 0:
                return 0
            tails: list[tuple[float, int, _SymbolBuffer]] = []
            for buf in self._bufs.values():
                for b in reversed(buf.pending):  # a symbol's newest first, to an acked one
                    if b.token is None:
                        break
                    tails.append((b.dt_num, buf.order, buf))
            chosen = heapq.nlargest(count, tails, key=lambda t: (t[0], t[1]))
            quota = Counter(t[2].symbol for t in chosen)
            for symbol, n in quota.items():
                pending = self._bufs[symbol].pending
                for _ in range(n):
                    bar = pending.pop()
                    self._buffered -= 1
                    self._owe_locked(bar)
                    self._returned.append(bar)
            self._cond.notify_all()
            return len(chosen)

    def pop_returned(self) -> list[LiveBar]:
        """Bars taken out of a full buffer by an older one since the last call, to go back to
        Pub/Sub (their time is owed: see the module docstring). Pull threads, after
        :meth:`offer`."""
        with self._cond:
            out, self._returned = self._returned, []
        return out

    def _owe_locked(self, bar: LiveBar) -> None:
        key = (bar.symbol, bar.dt_num)
        if key not in self._owed:
            heapq.heappush(self._owed_heap, (bar.dt_num, bar.symbol))
        self._owed[key] = self._clock() + MAX_HOLD_S
        self.returned[bar.symbol] += 1

    def _min_owed(self, now: float) -> float:
        """The oldest bar time handed back and not come again (inf: none); an owed time is
        forgotten :data:`MAX_HOLD_S` after it was last handed back (lazy heap)."""
        heap, owed = self._owed_heap, self._owed
        while heap:
            num, symbol = heap[0]
            until = owed.get((symbol, num))
            if until is not None and now < until:
                return num
            if until is not None:
                del owed[(symbol, num)]
            heapq.heappop(heap)
        return math.inf

    def _oldest_owed_until(self) -> float:
        """When the oldest owed time is forgotten (clock seconds); call right after
        :meth:`_min_owed` returned a finite time (its heap's head is then live)."""
        num, symbol = self._owed_heap[0]
        return self._owed[(symbol, num)]

    def _holding_locked(self, now: float) -> bool:
        return now < self._hold_until or (self._gap_waiting and now < self._gap_hold_until)

    def hold_steps(self, seconds: float, *, backlog_before_s: float | None = None) -> None:
        """Serve no step for ``seconds``, and then until deliveries have been in order for
        :attr:`disorder_quiet_s` (unless the input closes; at most :data:`MAX_HOLD_S` at a
        time).

        After a connection broke or a runner was killed, Pub/Sub delivers what was pulled and
        not acknowledged only after its ack deadline, so older bars come mixed with newer ones:
        a newer bar must not be served before an older one that is still on its way. Disorder
        is seen as a bar older than its symbol's newest one, or (``backlog_before_s``, POSIX
        seconds) a bar published before the connection was (re)established. Any thread.
        """
        with self._cond:
            now = self._clock()
            self._start_hold_locked(now)
            self._hold_until = max(self._hold_until, min(now + seconds, self._hold_cap))
            if self.gap_hold_s > 0:
                self._gap_hold_until = max(self._gap_hold_until, now + self.gap_hold_s)
            if backlog_before_s is not None:
                self._backlog_before = max(self._backlog_before, backlog_before_s)
            self._cond.notify_all()

    def resume_after(self, num: float) -> None:
        """The last bar time an earlier run of this deployment decided and acknowledged
        (backtrader day number): within :attr:`gap_hold_s` of the next hold, the first step
        waits for the bar times after it (what that run had pulled comes back one lease
        later). Call before pulling starts."""
        with self._cond:
            self._resume_after = max(self._resume_after, num)
            # Bars up to it were decided (and acknowledged) by that run: a copy that comes back
            # (an acknowledgement lost with the kill, a publisher's backfill) is refused as late,
            # never decided (or traded) twice. CSV backfill bars already preloaded still play.
            self._served = max(self._served, num)

    def holding(self) -> bool:
        """Steps are held (after a (re)connect, a disorder, for a gap to fill, or for a bar
        handed back to come again): the bars pulled meanwhile wait for their step, leased.
        The pull thread then pulls past its flow control limit (up to
        :attr:`max_buffered_bars` per symbol, where :meth:`offer` blocks or hands bars back),
        because the bars that end the hold may be queued behind the ones already leased. Any
        thread."""
        with self._cond:
            now = self._clock()
            return self._holding_locked(now) or self._min_owed(now) < math.inf

    def _gap_before(self, step: float) -> bool:
        """Bar times are missing between the last step served (or resumed after) and
        ``step`` (lock held; only with a configured bar size)."""
        last = max(self._served, self._resume_after)
        gaps = self.gaps
        if last == -math.inf or step <= last or gaps.inferred or gaps.bar_s is None:
            return False
        return gaps.missing(last, step) > 0

    def _start_hold_locked(self, now: float) -> None:
        if self._hold_until < now:
            self._hold_cap = now + MAX_HOLD_S
            self._served_in_hold = False
            self.holds += 1

    def _disorder_locked(self, now: float) -> None:
        """A bar came out of order (lock held): no step until deliveries have been in order for
        :attr:`disorder_quiet_s` (0 disables). After a hold that reached its
        :data:`MAX_HOLD_S` cap, a disorder starts a new hold only once a step was served: a
        backlog that keeps arriving out of order chained holds for minutes before (attack
        finding), each new one starting as the last one ended."""
        self.disordered += 1
        if self.disorder_quiet_s <= 0:
            return
        if self._hold_until < now and self._hold_cap <= now and not self._served_in_hold:
            return
        self._start_hold_locked(now)
        self._hold_until = max(self._hold_until, min(now + self.disorder_quiet_s, self._hold_cap))

    def preload(self, bars: Iterable[LiveBar]) -> int:
        """Buffer bars (CSV backfill, before pulling starts) for steps served without
        waiting, bypassing the size limit. Returns how many."""
        n = 0
        with self._cond:
            for bar in bars:
                buf = self._bufs[bar.symbol]
                if bar.dt_num <= max(self._served, buf.last_num):
                    continue
                if not buf.pending:
                    heapq.heappush(self._heads, (bar.dt_num, buf.order, buf))
                buf.pending.append(bar)
                self._buffered += 1
                if bar.dt_num not in self._first_arrival:
                    heapq.heappush(self._arrival_times, bar.dt_num)
                self._first_arrival[bar.dt_num] = _PRELOADED
                buf.last_num = bar.dt_num
                heapq.heappush(self._wm, (bar.dt_num, buf.order, buf))
                n += 1
            self._cond.notify_all()
        return n

    def close_input(self, reason: str, drain_timeout_s: float | None = None) -> None:
        """No more input: blocked :meth:`offer` calls return :data:`CLOSED`, steps no longer
        wait, and feeds end once their buffer is empty (or ``drain_timeout_s`` has passed).
        Idempotent; the first reason is kept."""
        with self._cond:
            if not self.input_closed:
                self._close_locked(reason)
                if drain_timeout_s is not None:
                    self._drain_deadline = self._clock() + drain_timeout_s
            self._cond.notify_all()

    def set_status(self, status: str, detail: str = "") -> None:
        """Record a connection transition (``CONNECTED``: pulling works, no bar yet; ``LIVE``:
        bars flow; ``DISCONNECTED``; ``CONNBROKEN``); feeds turn it into backtrader
        notifications on the main thread."""
        with self._cond:
            if status == self.status:
                return
            self.status = status
            self._epoch += 1
            self._transitions.append((self._epoch, status, detail))
            self._cond.notify_all()

    # -- acknowledgement ledger (any thread) -------------------------------------------------

    def pop_loaded_through(self, bar_time_num: float) -> list[LiveBar]:
        """Taken bars of the steps up to ``bar_time_num`` (backtrader day number; a decision's
        bar time to the millisecond is enough), oldest first; each is handed back once."""
        out: list[LiveBar] = []
        limit = bar_time_num + _HALF_MS_DAYS
        with self._cond:
            loaded = self._loaded
            while loaded and loaded[0].dt_num <= limit:
                out.append(loaded.popleft())
        return out

    def pop_unacknowledged(self) -> tuple[list[LiveBar], list[LiveBar]]:
        """What was not handed back: ``(taken, not taken)``: bars taken whose token was not
        handed back by :meth:`pop_loaded_through`, and bars never taken (still buffered when
        the input closed or the drain deadline passed; now counted in :attr:`undelivered`). The
        buffers are emptied; call once the feeds stopped."""
        with self._cond:
            taken = list(self._loaded)
            self._loaded.clear()
            rest: list[LiveBar] = []
            for buf in self._bufs.values():
                rest.extend(buf.pending)
                buf.pending.clear()
            self.undelivered += self._buffered
            self._buffered = 0
            self._cond.notify_all()
        return taken, rest

    # -- consumer side (main thread) ---------------------------------------------------------

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def current_step(self) -> float | None:
        """Time of the step being served (backtrader day number), None between steps."""
        return self._step

    def transitions_since(self, epoch: int) -> list[tuple[int, str, str]]:
        with self._cond:
            return [t for t in self._transitions if t[0] > epoch]

    def begin_pass(self, key: int) -> None:
        """Called by each feed at the start of its ``next()`` without a master: the first feed
        to come back starts a new backtrader pass (the next step is then chosen)."""
        if key in self._pass_seen:
            self._pass_seen = {key}
            self._step = None
        else:
            self._pass_seen.add(key)

    def has_ready(self, symbol: str) -> bool:
        """A bar of ``symbol`` could be taken now, without waiting."""
        buf = self._bufs[symbol]
        if not buf.pending:
            return False
        with self._cond:
            step = self._step if self._step is not None else self._due(self._clock())
            return bool(buf.pending) and buf.pending[0].dt_num == step

    def take(
        self, symbol: str, timeout_s: float, master_num: float | None = None
    ) -> LiveBar | None:
        """The bar of ``symbol`` for the current step, or None.

        Args:
            symbol: the feed's symbol.
            timeout_s: longest wait for a step to become due, seconds.
            master_num: in backtrader's second chance within a step, the step's date number
                (only a bar of exactly the step's time is handed out).
        """
        buf = self._bufs[symbol]
        deadline: float | None = None
        with self._cond:
            while True:
                now = self._clock()
                self.last_take_s = now  # the bar loop asks: alive (HEALTH_STALL_S)
                if (
                    self.idle_timeout_s > 0
                    and not self.input_closed
                    and self._last_offer is not None
                    and now - self._last_offer >= self.idle_timeout_s
                    and self._min_owed(now) == math.inf  # bars that went back come again
                ):
                    self._close_locked(
                        f"no bar for {self.idle_timeout_s:g} s (PUBSUB_IDLE_TIMEOUT_S)"
                    )
                expired = self._drain_expired(now)
                if expired and self._step is None:
                    return None  # no new step; the one being served is completed
                if self._step is None:
                    due = self._due(now)
                    if due is not None:
                        self._open_step(due)
                step = self._step
                if step is not None:
                    pending = buf.pending
                    if pending and pending[0].dt_num == step:
                        bar = pending.popleft()
                        self._buffered -= 1
                        if pending:
                            heapq.heappush(self._heads, (pending[0].dt_num, buf.order, buf))
                        if bar.token is not None:
                            self._loaded.append(bar)
                        prev, buf.taken_num = buf.taken_num, bar.dt_num
                        if bar.live and prev > -math.inf:
                            self._count_gap(buf.symbol, prev, bar)
                        self._cond.notify_all()  # a producer may wait for room
                        return bar
                    return None
                if master_num is not None or self.input_closed:
                    return None
                if deadline is None:
                    deadline = now + timeout_s
                remaining = deadline - now
                if remaining <= 0:
                    return None
                self.consumer_waiting = True
                try:
                    self._cond.wait(min(remaining, self._until_due(now)))
                finally:
                    self.consumer_waiting = False

    def served_through(self, num: float, timeout_s: float) -> bool:
        """Wait until the step of time ``num`` (backtrader day number), or a later one, has been
        served; False after ``timeout_s`` seconds. Any thread (tools, tests)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._served < num:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def finished(self, symbol: str) -> bool:
        """True once the input is closed and ``symbol`` has nothing left to deliver (or the
        drain deadline passed; what remained is counted in :attr:`undelivered`)."""
        if not self.input_closed:
            return False
        with self._cond:
            pending = self._bufs[symbol].pending
            return (
                self._drain_expired(self._clock())
                or not pending
                or pending[0].dt_num >= self._closed_owed
            )

    @property
    def buffered(self) -> int:
        return self._buffered

    def depth(self, symbol: str) -> int:
        return len(self._bufs[symbol].pending)

    # -- internals (lock held) ---------------------------------------------------------------

    def _close_locked(self, reason: str) -> None:
        self.input_closed = True
        # A bar that went back to Pub/Sub and has not come again: serving the steps after it
        # in the drain would decide them (and acknowledge their bars) before it, and it would
        # be refused as late at the next start (a fresh-context attack: the idle timeout lost
        # 8 bars of a backlog so). The drain stops before it instead.
        self._closed_owed = self._min_owed(self._clock())
        if self._closed_owed < math.inf:
            logger.warning(
                "live input closed with bars handed back to Pub/Sub not come again; steps "
                "from the oldest of them on are not served in the drain (their bars go back "
                "to Pub/Sub for the next start)"
            )
        self.close_reason = reason
        logger.info("live input closed (%s); %d bars buffered to drain", reason, self._buffered)
        self._cond.notify_all()

    def _drain_expired(self, now: float) -> bool:
        """The drain deadline passed: no new step is served; what is left stays buffered
        until :meth:`pop_unacknowledged` counts it as undelivered."""
        if self._drain_deadline is None or now < self._drain_deadline:
            return False
        if not self._drain_over:
            self._drain_over = True
            if self._buffered:
                logger.warning(
                    "shutdown: %d buffered bars not delivered (drain time over); with "
                    "acknowledgement on disk they go back to Pub/Sub for the next start",
                    self._buffered,
                )
        return True

    def _min_pending(self) -> float | None:
        heads = self._heads
        while heads:
            num, _, buf = heads[0]
            if buf.pending and buf.pending[0].dt_num == num:
                return num
            heapq.heappop(heads)
        return None

    def _watermark(self) -> float:
        """Smallest latest bar time among the symbols waited for (lazy heap)."""
        wm = self._wm
        while wm:
            num, _, buf = wm[0]
            if num != buf.last_num or not buf.waited:
                heapq.heappop(wm)
                continue
            return num
        return math.inf

    def _due(self, now: float) -> float | None:
        """The next step's time when it may be served now, else None."""
        step = self._min_pending()
        if step is None or step >= self._closed_owed:
            return None
        if now < self._hold_until and not self.input_closed:
            return None
        if self._owed_heap and not self.input_closed and step >= self._min_owed(now):
            return None  # a bar of this time or older went back to Pub/Sub and comes again
        if now < self._gap_hold_until and not self.input_closed and self._gap_before(step):
            if not self._gap_waiting:
                self._gap_waiting = True
                self.gap_holds += 1
            return None
        self._gap_waiting = False
        if (
            self.align_wait_s <= 0
            or self.input_closed
            or self._blocked
            or self._watermark() >= step
            or now - self._first_arrival.get(step, _PRELOADED) >= self.align_wait_s
        ):
            return step
        return None

    def _until_due(self, now: float) -> float:
        """Seconds until the next step becomes due by time alone (or the idle timeout)."""
        due = math.inf
        step = self._min_pending()
        if step is not None:
            due = (
                max(
                    self._first_arrival.get(step, _PRELOADED) + self.align_wait_s,
                    self._hold_until,
                    self._gap_hold_until if self._gap_before(step) else -math.inf,
                )
                - now
            )
            if self._owed_heap and step >= self._min_owed(now):
                due = max(due, self._oldest_owed_until() - now)
        if self.idle_timeout_s > 0 and not self.input_closed and self._last_offer is not None:
            idle_at = self._last_offer + self.idle_timeout_s
            if self._min_owed(now) < math.inf:  # no idle end while a bar is owed (take())
                idle_at = max(idle_at, self._oldest_owed_until())
            due = min(due, idle_at - now)
        return max(due, 0.001)

    def _count_gap(self, symbol: str, prev: float, bar: LiveBar) -> None:
        """Missing bar times between the symbol's last two bars taken (lock held)."""
        missing = self.gaps.missing(prev, bar.dt_num)
        if not missing:
            return
        self.missing[symbol] += missing
        self.gap_events += 1
        start, logged, suppressed = self._gap_log
        now = time.monotonic()
        if now - start >= 60.0:
            if suppressed:
                logger.warning(
                    "%d more gap events in the last minute were counted, not logged", suppressed
                )
            start, logged, suppressed = now, 0, 0
        if logged < GAP_LOGS_PER_MINUTE:
            logger.warning(
                "%s: %d bar time(s) missing between %s and %s (bar size %s s; lost upstream, "
                "or late); counted in the report and runner_bars_missing_total",
                symbol,
                missing,
                # to the millisecond, rounded: a day number's float is ~14 us coarse here
                # (14:41 printed as 14:40:59.999 when cut)
                (bt_num_to_utc(prev) + _HALF_MS).isoformat(timespec="milliseconds"),
                bar.ts.isoformat(),
                f"{self.gaps.bar_s:g}" if self.gaps.bar_s else "?",
            )
            logged += 1
        else:
            suppressed += 1
        self._gap_log = (start, logged, suppressed)
        if self.on_gap is not None:
            try:
                self.on_gap(symbol, missing)
            except Exception:
                logger.exception("gap observer failed")

    def _open_step(self, step: float) -> None:
        """Serve step ``step``: symbols still waited for but behind it missed it."""
        self._step = step
        self._served = max(self._served, step)  # preloaded history plays below a resume point
        self._served_in_hold = True
        self.steps += 1
        self._cond.notify_all()  # served_through() waiters
        times = self._arrival_times
        while times and times[0] <= step:
            self._first_arrival.pop(heapq.heappop(times), None)
        wm = self._wm
        while wm and wm[0][0] < step:
            num, _, buf = heapq.heappop(wm)
            if num == buf.last_num and buf.waited:
                buf.waited = False
                self.missed[buf.symbol] += 1
                if self.missed[buf.symbol] == 1:
                    logger.warning(
                        "alignment: %s had no bar when a step was served %.3g s after its "
                        "first bar (PUBSUB_ALIGN_WAIT_S); it missed the step, and a bar of it "
                        "that comes later is refused as late_bar (further misses are counted)",
                        buf.symbol,
                        self.align_wait_s,
                    )
