"""Access tracking: which bar of which feed an agent's read returned, with the value it got.

Every line object an agent can hold is tracked where its value is read: the line buffers of the
data feeds, of every indicator and lines operation the agent created (``LineBuffer``,
``LineActions`` such as ``d.close > sma``, ``d.close(-1)``/``d.close(1)``, ``bt.And``/``bt.If``,
couplers, indicators of indicators), and the feeds' text fields. Each buffer's class is swapped
for a subclass whose ``__getitem__``, ``get``, ``getzero``, ``getzeroval`` and ``__len__`` also
report the read; identity, hashing and every backtrader internal keep working because the object
is the same. The tracker finds them through backtrader's own registry (every line object created
in the agent's ``__init__`` registers with its owner), so it does not matter where the agent keeps
them; labels come from where the agent keeps them (:func:`scan_labels`).

Who made the read: reads count only while the module flag :data:`ACTIVE` is true, i.e. while an
agent callback runs (``prenext``/``nextstart``/``next``/``notify_*``) and not inside a
backtrader call made on the agent's behalf (orders, ``order_target_*``, sizers, the broker's
``getvalue``...); :class:`~analyzers.fmel.FMELAnalyzer` sets the flag around those calls.

Hot path (main thread, per read): one tuple append ``(tag, ago, size, bar index, value)``, where
``bar index`` is the absolute position in the line's own buffer that was actually returned
(backtrader's buffer wraps around: ``close[-1]`` on the first bar of a preloaded feed returns the
LAST bar). Resolution (:meth:`AccessTracker.resolve`, once per bar) maps it to the bar of every
source feed the value comes from, with that bar's time and data hash, and flags look-ahead: a
source bar that is not in the past of the feed's current bar (a positive index, a wrapped-around
index, a feed that has not started, a forward-shifted line such as ``d.close(1)`` anywhere under
an indicator, an indicator that reads a future bar in its own code).

Thread context: main (backtrader) thread only.
"""

from __future__ import annotations

import ast
import bisect
import inspect
import logging
import os
import sys
import sysconfig
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from enum import Enum
from types import FrameType
from typing import Any

import backtrader as bt
from backtrader.linebuffer import LineActions, LineBuffer, _LineDelay, _LineForward
from backtrader.lineiterator import LineIterator, SingleCoupler
from backtrader.lineroot import LineRoot
from backtrader.lineseries import LineSeriesStub

from analyzers.schema import Access, DataAccess
from core.bars import BarHashes, feed_symbol
from core.errors import LookAheadError
from core.time import BT_EPOCH_DAYS, SECONDS_PER_DAY
from feeds.fields import TextLine

logger = logging.getLogger(__name__)

# (tag, ago, size, bar index in the line's own buffer, value). size 0 marks ``len()``; a value of
# None on a number line marks a window read that returned nothing.
Read = tuple["LineTag", int, int, int, Any]

# True only while the agent's own code runs. Module-level so the check on every line read (also
# backtrader's own, millions per run) is a single global load. Main thread only.
ACTIVE = False

_IND = LineIterator.IndType
_tuple_new = tuple.__new__


def set_active(value: bool) -> bool:
    """Set the tracking flag; returns the previous value (for nesting)."""
    global ACTIVE
    was, ACTIVE = ACTIVE, value
    return was


# ---------------------------------------------------------------------------------------------
# Feeds and tags
# ---------------------------------------------------------------------------------------------


class FeedInfo:
    """A source feed as resolution sees it: symbol, hash history and its datetime line.

    Bar indexes are absolute (0 = the feed's first bar), also for feeds with bounded buffers.
    """

    __slots__ = ("dt", "feed", "hashes", "slot", "symbol")

    def __init__(self, feed: Any) -> None:
        self.slot = -1  # position in AccessTracker.capture()
        self.feed = feed
        self.symbol = feed_symbol(feed)
        self.hashes: BarHashes | None = getattr(feed, "bar_hashes", None)
        self.dt: Any = feed.lines.datetime

    def current(self) -> int:
        """Absolute index of the feed's current bar (-1 before its first bar)."""
        return int(self.dt.lencount) - 1

    def _offset(self) -> int:
        # absolute index - array position (0 for unbounded buffers)
        dt = self.dt
        return int(dt.lencount) - 1 - int(dt._idx)

    def buffered(self) -> int:
        """Absolute index one past the newest bar held (preloaded: the whole file)."""
        dt = self.dt
        return len(dt.array) - int(dt.extension) + self._offset()

    def time_num(self, index: int) -> float | None:
        """backtrader day number of bar ``index``; None when it is not held."""
        dt = self.dt
        pos = index - self._offset()
        if 0 <= pos < len(dt.array) - dt.extension:
            return float(dt.array[pos])
        return None

    def index_at(self, num: float) -> int:
        """Absolute index of the newest bar at or before day number ``num`` (-1: none)."""
        dt = self.dt
        n = len(dt.array) - int(dt.extension)
        return bisect.bisect_right(dt.array, num, 0, n) - 1 + self._offset()

    def capture(self) -> tuple[int, int, int, int]:
        """The feed's position now, as four ints: ``(bars seen, array position, array length,
        hashes known)``. Cheap (main thread, once per bar); :meth:`snapshot_of` turns it into
        what resolution needs, later and on any thread when the feed's buffers only grow
        (:attr:`AccessTracker.deferrable`)."""
        dt = self.dt
        hashes = self.hashes
        return (
            dt.lencount,
            dt._idx,
            len(dt.array) - dt.extension,
            len(hashes) if hashes is not None else 0,
        )

    def snapshot_of(self, state: tuple[int, int, int, int]) -> Snapshot:
        """``(current bar, absolute index - array position, one past the newest bar held,
        datetime array, hash lookup)`` at the time ``state`` (:meth:`capture`) was taken."""
        count, idx, held, known = state
        cur = int(count) - 1
        off = cur - int(idx)
        hashes = self.hashes
        at: Callable[[int], str | None] | None = None
        if hashes is not None:
            lookup = hashes.at
            at = lambda i: lookup(i) if i < known else None  # noqa: E731
        return cur, off, int(held) + off, self.dt.array, at

    def snapshot(self) -> Snapshot:
        """:meth:`snapshot_of` the feed's position now."""
        return self.snapshot_of(self.capture())

    def hash_at(self, index: int) -> str | None:
        hashes = self.hashes
        return hashes.at(index) if hashes is not None and index >= 0 else None


# (current bar, absolute index - array position, one past the newest bar held, datetime array,
# hash lookup by absolute index)
Snapshot = tuple[int, int, int, Any, Callable[[int], str | None] | None]


class LineTag:
    """What a tracked line is: its label, the feed whose bars its positions follow (its clock)
    and the source feeds its values come from, each with the newest bar offset it reaches
    (``+1`` for ``d.close(1)``, ``-1`` for ``d.close(-1)``, 0 for ``sma``).

    ``direct`` is true for a feed's own lines and text fields (the clock is the only source).
    """

    __slots__ = (
        "clock",
        "direct",
        "field",
        "line",
        "out",
        "pairs",
        "steps",
        "strict",
        "tracker",
    )

    def __init__(
        self,
        tracker: AccessTracker,
        line: Any,
        field: str,
        clock: FeedInfo | None,
        *,
        direct: bool,
    ) -> None:
        self.tracker = tracker
        self.out = tracker.reads
        self.strict = tracker.strict_lookahead
        self.line = line
        self.field = field
        self.clock = clock
        # whose positions the line's own follow: the clock feed, or the strategy's steps for a
        # line clocked by the strategy (couplers): their bar times differ from any one feed's
        self.steps = clock
        self.direct = direct
        # (source feed, newest bar offset, positions aligned with the line's own, causal):
        # resolution maps a read to one bar of each source feed. Causal: the offset's forward
        # part comes from forward-shifted lines computed bar by bar, whose value for bar t is
        # only written at bar t + offset (NaN until then), so they cannot leak the future.
        self.pairs: tuple[tuple[FeedInfo, int, bool, bool], ...] = (
            ((clock, 0, True, True),) if clock else ()
        )

    @property
    def symbol(self) -> str:
        return self.clock.symbol if self.clock is not None else "?"


# ---------------------------------------------------------------------------------------------
# The tracker
# ---------------------------------------------------------------------------------------------


class AccessTracker:
    """Tracks one strategy's reads and resolves them per bar.

    Attributes:
        reads: raw reads since the last :meth:`drain` (appended while :data:`ACTIVE`).
        strict_lookahead: raise :class:`LookAheadError` on a read that reaches a bar that is not
            in the past of the current step.
        gaps: what could not be tracked, as sentences (logged at start, stored in the run
            metadata).
        lookahead_total: look-ahead reads resolved so far.
    """

    def __init__(self, strict_lookahead: bool = False) -> None:
        self.reads: list[Read] = []
        self.strict_lookahead = strict_lookahead
        self.gaps: list[str] = []
        self.lookahead_total = 0
        self.runonce = True
        self.preload = False
        self._warned: set[tuple[str, str, str]] = set()
        self._tracked: list[tuple[Any, type]] = []
        self._feeds: dict[int, FeedInfo] = {}
        self._derived: list[LineTag] = []
        self._dynamic: dict[int, Reach] = {}
        self._stale = False
        self._graph: _Graph | None = None
        self._registered = 0
        self._strategy: Any = None
        # every FeedInfo resolution may use (source feeds and strategy step clocks), in the
        # order of :meth:`capture`; FeedInfo.slot is the position
        self._infos: list[FeedInfo] = []
        # serialises resolution (the writer thread and the owner may both resolve deferred
        # bars) and the refresh of the tags' sources
        self.resolve_lock = threading.Lock()

    # -- wiring -----------------------------------------------------------------------------

    def feed_info(self, feed: Any) -> FeedInfo:
        info = self._feeds.get(id(feed))
        if info is None:
            info = self._feeds[id(feed)] = self._add_info(FeedInfo(feed))
        return info

    def _add_info(self, info: FeedInfo) -> FeedInfo:
        info.slot = len(self._infos)
        self._infos.append(info)
        return info

    @property
    def deferrable(self) -> bool:
        """Whether a bar's reads can be resolved later, on another thread, from
        :meth:`capture`: not in strict mode (it raises at the read), and every buffer
        resolution looks at only grows (preloaded, unbounded line buffers; data hashes never
        evicted). Live feeds with bounded buffers resolve on the main thread."""
        if self.strict_lookahead or not self.preload:
            return False
        for info in self._infos:
            if getattr(info.dt, "mode", None) != LineBuffer.UnBounded:
                return False
            hashes = info.hashes  # a bounded BarHashes (live feeds) evicts old hashes
            if (
                hashes is not None
                and isinstance(getattr(hashes, "_hashes", None), deque)
                and getattr(hashes, "_source", None) is None
            ):
                return False
        return True

    def capture(self) -> tuple[tuple[int, int, int, int], ...]:
        """Every feed's position now (:meth:`FeedInfo.capture`), for :meth:`resolve` later
        (main thread, once per bar; a few ints per feed)."""
        return tuple([info.capture() for info in self._infos])

    def track_feed(self, data: Any) -> int:
        """Track every line of a data feed (OHLCV, extras, text fields). Returns lines tracked.

        ``datetime`` is left alone: it is when, not what.
        """
        info = self.feed_info(data)
        n = 0
        for i, alias in enumerate(data.lines.getlinealiases()):
            if alias == "datetime":
                continue
            line = data.lines[i]
            if self._swap(line, LineTag(self, line, alias, info, direct=True)):
                n += 1
        for name, text_line in getattr(data, "text_lines", {}).items():
            if isinstance(text_line, TextLine) and type(text_line) is TextLine:
                text_line._fmel_tag = LineTag(  # type: ignore[attr-defined]
                    self, text_line, name, info, direct=True
                )
                text_line.__class__ = _TrackedTextLine
                self._tracked.append((text_line, TextLine))
                n += 1
        if info.hashes is None:
            self._gap(
                f"feed {info.symbol} has no data hashes (a resampled, replayed or custom feed): "
                "its reads are recorded with data_hash NULL"
            )
        return n

    def track_strategy(self, strategy: Any, *, track_indicators: bool = True) -> None:
        """Track the strategy's feeds and (optionally) every line object it created.

        Labels: see :func:`scan_labels`. Also notes what cannot be tracked (:attr:`gaps`).
        """
        self._strategy = strategy
        cerebro = getattr(strategy, "cerebro", None)
        self.runonce = bool(
            getattr(cerebro, "_dorunonce", False) and getattr(cerebro, "_dopreload", False)
        )
        self.preload = bool(getattr(cerebro, "_dopreload", False))
        for data in strategy.datas:
            self.track_feed(data)
        if not track_indicators:
            return
        self._graph = _Graph(self._dynamic)
        self._track_registry(strategy)
        self._scan_source(type(strategy))

    def _track_registry(self, strategy: Any) -> None:
        labels, held_arrays, truncated = scan_labels(strategy)
        assert self._graph is not None
        tracked_arrays: dict[int, str] = {}
        for tag in self._tags_of_feeds():
            tracked_arrays[id(tag.line.array)] = f"{tag.symbol}.{tag.field}"
        unlabelled: list[str] = []

        def visit(parent: Any, parent_label: str) -> None:
            counts: dict[str, int] = {}
            for child in _children(parent):
                if isinstance(child, bt.AbstractDataBase):
                    continue
                label = labels.get(id(child))
                if label is None:
                    cls = type(child).__name__.lstrip("_")
                    k = counts.get(cls, 0)
                    counts[cls] = k + 1
                    label = f"{parent_label}.{cls}#{k}" if parent_label else f"{cls}#{k}"
                    if not parent_label:
                        unlabelled.append(label)
                for field, line in _named_lines(child, label, labels):
                    if getattr(line, "_fmel", None) is None and isinstance(line, LineBuffer):
                        tag = self._derived_tag(line, field)
                        self._swap(line, tag)
                        tracked_arrays.setdefault(id(line.array), f"{tag.symbol}.{tag.field}")
                if isinstance(child, LineIterator):
                    self._check_once(child, label)
                    visit(child, label)

        visit(strategy, "")
        self._registered = len(_children(strategy))
        for path, arr_id in held_arrays:
            what = tracked_arrays.get(arr_id)
            if what is not None:
                self._gap(
                    f"self.{path} holds the raw value buffer (.array) of {what}: reads through "
                    "it are not recorded and not checked for look-ahead"
                )
        if unlabelled:
            logger.info(
                "FMEL: %d line objects the agent created are not held where the label scan "
                "looks (%s%s); their reads are recorded under these labels",
                len(unlabelled),
                ", ".join(unlabelled[:8]),
                ", ..." if len(unlabelled) > 8 else "",
            )
        if truncated:
            logger.info("FMEL: label scan stopped at %s", truncated)

    def _tags_of_feeds(self) -> Iterator[LineTag]:
        for line, _ in self._tracked:
            tag = getattr(line, "_fmel", None)
            if isinstance(tag, LineTag):
                yield tag

    def _derived_tag(self, line: Any, field: str) -> LineTag:
        root = _clock_root(line)
        steps = None
        if isinstance(root, bt.Strategy):
            steps = self._add_info(FeedInfo(root))  # not a source: only its bar times are used
            root = root.datas[0] if root.datas else None
        clock = self.feed_info(root) if root is not None else None
        if clock is not None:  # sma["GOOG"] / sma[data] read as field "sma" of symbol GOOG
            field = field.replace(f"[{clock.symbol}]", "") or field
        tag = LineTag(self, line, field, clock, direct=False)
        if steps is not None:
            tag.steps = steps
        self._set_sources(tag)
        self._derived.append(tag)
        return tag

    def _set_sources(self, tag: LineTag) -> None:
        graph = self._graph
        assert graph is not None
        reach = graph.reach(tag.line)
        sources = [(self.feed_info(feed), off, causal) for feed, off, causal in reach.values()]
        if not sources and tag.clock is not None:
            sources = [(tag.clock, 0, True)]
        # the clock first, then by symbol: a stable order for the records
        sources.sort(key=lambda s: (s[0] is not tag.clock, s[0].symbol))
        runonce = self.runonce
        tag.pairs = tuple(
            (info, off, runonce or info is tag.steps, causal and not runonce)
            for info, off, causal in sources
        )

    def _swap(self, line: Any, tag: LineTag) -> bool:
        if not isinstance(line, LineBuffer) or isinstance(getattr(line, "_fmel", None), LineTag):
            return False
        original = type(line)
        line._fmel = tag
        line.__class__ = _tracked_class(original)
        self._tracked.append((line, original))
        return True

    def sync(self) -> None:
        """Track line objects the agent created after start (e.g. in ``next()``); cheap when
        there are none (one ``len``)."""
        strategy = self._strategy
        if strategy is None or self._graph is None:
            return
        if len(strategy._lineiterators.get(_IND, ())) == self._registered:
            return
        logger.warning(
            "FMEL: the agent created line objects after start (in next()?); tracked from now on"
        )
        self._graph = _Graph(self._dynamic)
        self._track_registry(strategy)

    def untrack_all(self) -> None:
        """Give every tracked line its original class back (after the run)."""
        for line, original in self._tracked:
            line.__class__ = original
            if isinstance(line, TextLine):
                line._fmel_tag = None  # type: ignore[attr-defined]
            else:
                line._fmel = None
        self._tracked.clear()

    # -- what cannot be tracked -------------------------------------------------------------

    def _gap(self, text: str) -> None:
        if text not in self.gaps:
            self.gaps.append(text)
            logger.warning("FMEL cannot track: %s", text)

    def _check_once(self, it: Any, label: str) -> None:
        cls = type(it)
        if cls.__module__.startswith("backtrader"):
            return
        for name in ("once", "preonce", "oncestart"):
            impl = getattr(cls, name, None)
            base = getattr(bt.Indicator, name, None)
            if impl is not None and impl is not base and _defined_outside_backtrader(impl):
                self._gap(
                    f"{label} ({cls.__name__}) computes in {name}() on raw arrays: a look at "
                    "future bars made there is not detected"
                )

    def _scan_source(self, cls: type) -> None:
        """Flag raw-buffer reads in the agent's module source (``.array``, ``plotrange``)."""
        try:
            path = inspect.getsourcefile(cls)
            source = inspect.getsource(sys.modules[cls.__module__])
        except (OSError, TypeError, KeyError):
            return
        try:
            tree = ast.parse(source)
        except SyntaxError:
            return
        modules = {  # np.array, array.array: not line buffers
            alias.asname or alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        hits = sorted(
            {
                node.lineno
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute)
                and node.attr in ("array", "plotrange")
                and not (isinstance(node.value, ast.Name) and node.value.id in modules)
            }
        )
        if hits:
            where = ", ".join(str(n) for n in hits[:10])
            self._gap(
                f"agent code reads raw line buffers (.array / plotrange) at {path} line(s) "
                f"{where}: those reads are not recorded and not checked for look-ahead"
            )

    # -- look-ahead inside indicators (found while they compute) -----------------------------

    def internal_future_read(self, line: Any, ago: int, depth: int = 2) -> None:
        """A line iterator (not the agent) read ``line[ago]`` with ``ago > 0`` while computing:
        everything built on it reaches ``ago`` bars further."""
        tag: LineTag = line._fmel
        frame: FrameType | None = sys._getframe(depth)
        reader = None
        for _ in range(6):
            if frame is None:
                break
            obj = frame.f_locals.get("self")
            if isinstance(obj, LineIterator | LineActions) and not isinstance(
                obj, bt.Strategy | bt.Observer
            ):
                reader = obj
                break
            frame = frame.f_back
        if reader is None or self._graph is None:
            return
        found = self._graph.reach(line)
        dyn = self._dynamic.setdefault(id(reader), {})
        grew = False
        for key, (feed, off, _) in found.items():
            if key not in dyn or dyn[key][1] < off + ago:
                dyn[key] = (feed, off + ago, False)
                grew = True
        if grew:
            self._stale = True
            logger.warning(
                "look-ahead: %s reads %s.%s[%d] (a future bar) in its own code; reads of it and "
                "of everything built on it are flagged",
                type(reader).__name__,
                tag.symbol,
                tag.field,
                ago,
            )

    @property
    def stale(self) -> bool:
        """An indicator was found reading future bars: the tags' sources need a
        :meth:`refresh` before the next bar resolves."""
        return self._stale

    def refresh(self) -> None:
        """Recompute the tags' sources (main thread; serialised with resolution)."""
        with self.resolve_lock:
            self._refresh()

    def _refresh(self) -> None:
        self._stale = False
        self._graph = _Graph(self._dynamic)
        for tag in self._derived:
            self._set_sources(tag)

    # -- per bar ----------------------------------------------------------------------------

    def drain(self) -> list[Read]:
        """The raw reads since the last call (every tag appends to the same list, so it is
        copied and cleared)."""
        reads = self.reads[:]
        self.reads.clear()
        return reads

    def check_strict(self) -> None:
        """Strict mode, called right after a read: raise if it reached a bar not in the past."""
        self.resolve(self.reads[-1:], count=False)

    def resolve(
        self,
        reads: list[Read],
        count: bool = True,
        state: tuple[tuple[int, int, int, int], ...] | None = None,
    ) -> tuple[tuple[DataAccess, ...], int]:
        """Resolve raw reads to decision-record rows: one :class:`Access` per read and source
        feed (a read of an indicator over two feeds appears under both symbols with the same
        ``seq``), grouped by symbol in order of first read.

        Args:
            reads: one bar's raw reads, in read order.
            count: add the look-ahead reads to :attr:`lookahead_total`.
            state: the feeds' positions when the reads were made (:meth:`capture`); ``None``:
                now (the main thread, right after the reads). With a state, any thread may
                call this, when :attr:`deferrable` (serialised by :attr:`resolve_lock`).

        Returns:
            ``(data_accessed, lookahead reads)``.

        Raises:
            LookAheadError: in strict mode, on the first read that reached a bar that is not in
                the past of its feed's current bar.
        """
        if state is None and self._stale:
            self._refresh()
        new = _tuple_new
        groups: dict[str, list[Access]] = {}
        infos: dict[str, FeedInfo] = {}
        snaps = _Snaps(state)
        lookaheads = 0
        for seq, (tag, ago, size, index, value) in enumerate(reads):
            info = tag.clock
            if tag.direct and size == 1 and value.__class__ is float and info is not None:
                # the common read, d.close[-1]: one source, the feed's own bar
                cur, off, nbuf, times, at = snaps[info]
                if 0 <= index < nbuf:
                    la = index > cur
                    acc = new(
                        Access,
                        (
                            seq,
                            tag.field,
                            ago,
                            1,
                            index,
                            at(index) if at is not None else None,
                            value,
                            None,
                            la,
                            round((times[index - off] - BT_EPOCH_DAYS) * SECONDS_PER_DAY, 3),
                        ),
                    )
                    infos.setdefault(info.symbol, info)
                    groups.setdefault(info.symbol, []).append(acc)
                    if la:
                        lookaheads += 1
                        self._lookahead(tag, ago, _reason(tag, ago, index, 0, cur, info))
                    continue
            if self._resolve_one(tag, seq, ago, size, index, value, snaps, groups, infos):
                lookaheads += 1
        out = []
        for symbol, accesses in groups.items():
            cur, _, _, _, at = snaps[infos[symbol]]
            fields = tuple(dict.fromkeys([a[1] for a in accesses]))
            digest = at(cur) if at is not None and cur >= 0 else None
            out.append(new(DataAccess, (symbol, digest, fields, tuple(accesses))))
        if count:
            self.lookahead_total += lookaheads
        return tuple(out), lookaheads

    def _resolve_one(
        self,
        tag: LineTag,
        seq: int,
        ago: int,
        size: int,
        index: int,
        value: Any,
        snaps: _Snaps,
        groups: dict[str, list[Access]],
        infos: dict[str, FeedInfo],
    ) -> bool:
        """Any read: a window, ``len()``, text, a derived line with several source feeds.
        Appends one :class:`Access` per source feed to ``groups``; returns whether it looked
        ahead."""
        new = _tuple_new
        field = tag.field
        text = None
        num = None
        returned = True  # False: a window that returned nothing
        if size == 0:
            field, num = "len", float(index + 1)
        elif value is None:
            returned = isinstance(tag.line, TextLine) and index >= 0
        elif value.__class__ is str:
            text = value
        else:
            num = float(value)
        ahead = False
        reason = ""
        pairs = tag.pairs
        if size == 0 and not tag.direct:  # len() of a derived line: its clock's bar count
            clock = tag.clock
            pairs = ((clock, 0, tag.steps is clock, True),) if clock is not None else ()
        for info, offset, aligned, causal in pairs:
            cur, off, nbuf, times, at = snaps[info]
            if tag.direct:
                bar = index
            elif aligned:
                bar = index + offset
            else:
                bar, wrapped = self._time_map(tag, info, index, snaps)
                bar += offset
                if wrapped:
                    reason = f"{info.symbol} had not started when this value was computed"
            got = returned and 0 <= bar < nbuf
            if size == 0 or (got and causal and offset > 0 and bar > cur):
                # len() returns a count, not a bar's value; a forward-shifted line computed
                # bar by bar is NaN until its bar arrives: neither looks ahead
                la = False
                got = got and size == 0
            else:
                la = got and bar > cur
            if la:
                ahead = True
                if not reason:
                    reason = _reason(tag, ago, index, offset, cur, info)
            if got:
                digest = at(bar) if at is not None else None
                when = round((times[bar - off] - BT_EPOCH_DAYS) * SECONDS_PER_DAY, 3)
            else:
                digest = when = None
            acc = new(Access, (seq, field, ago, size or 1, bar, digest, num, text, la, when))
            infos.setdefault(info.symbol, info)
            groups.setdefault(info.symbol, []).append(acc)
        if ahead:
            self._lookahead(tag, ago, reason)
        return ahead

    def _time_map(
        self, tag: LineTag, info: FeedInfo, index: int, snaps: _Snaps
    ) -> tuple[int, bool]:
        """Next-bar mode, a source that is not the line's clock: the source's bar when the value
        at ``index`` was computed. A source that had no bar yet was read at index -1 of its
        buffer, i.e. its newest buffered bar (wrapped around)."""
        cur, off, nbuf, times, _ = snaps[info]
        steps = tag.steps
        num = None
        if steps is not None:
            _, s_off, s_nbuf, s_times, _ = snaps[steps]
            if index < s_nbuf and index - s_off >= 0:
                num = float(s_times[index - s_off])
        if num is None:
            return cur, False
        bar = bisect.bisect_right(times, num, 0, nbuf - off) - 1 + off
        if bar < 0:
            return nbuf - 1, True
        return bar, False

    def _lookahead(self, tag: LineTag, ago: int, reason: str) -> None:
        text = f"agent read {tag.symbol}.{tag.field}[{ago}]: {reason}"
        if self.strict_lookahead:
            raise LookAheadError(f"{text} (FMEL_STRICT_LOOKAHEAD is on)")
        key = (tag.symbol, tag.field, reason)
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("look-ahead: %s; flagged in the decision record", text)


class _Snaps(dict[FeedInfo, Snapshot]):
    """Each feed's :data:`Snapshot` for one bar, made on first use: from the captured state
    (:meth:`AccessTracker.capture`) when there is one, else from the feed now."""

    __slots__ = ("state",)

    def __init__(self, state: tuple[tuple[int, int, int, int], ...] | None) -> None:
        super().__init__()
        self.state = state

    def __missing__(self, info: FeedInfo) -> Snapshot:
        state = self.state
        snap = info.snapshot() if state is None else info.snapshot_of(state[info.slot])
        self[info] = snap
        return snap


def _reason(tag: LineTag, ago: int, index: int, offset: int, current: int, info: FeedInfo) -> str:
    if offset > 0:
        return f"a line shifted {offset} bar(s) forward reaches the future bar of {info.symbol}"
    if ago > 0:
        return f"index {ago} is a future bar"
    if current < 0:
        return (
            f"{info.symbol} has not started yet, so backtrader's buffer wrapped around to its "
            "last bar"
        )
    return (
        f"index {ago} is before the first bar, so backtrader's buffer wrapped around to bar "
        f"{index + offset} of {info.symbol}"
    )


def _defined_outside_backtrader(fn: Any) -> bool:
    module = getattr(fn, "__module__", "") or ""
    return not module.startswith("backtrader")


# ---------------------------------------------------------------------------------------------
# The line graph: clocks, children and how far each line reaches into its source feeds
# ---------------------------------------------------------------------------------------------

# id(feed) -> (feed, newest bar offset, causal: no part of a forward offset comes from a read
# of a future bar made while an indicator computed)
Reach = dict[int, tuple[Any, int, bool]]


def _children(owner: Any) -> list[Any]:
    its = getattr(owner, "_lineiterators", None)
    if not its:
        return []
    return list(its.get(_IND, ()))


def _lines_of(obj: Any) -> list[Any]:
    if isinstance(obj, LineActions):
        return [obj]
    lines = getattr(obj, "lines", None)
    inner = getattr(lines, "lines", None)
    return list(inner) if isinstance(inner, list) else []


def _named_lines(obj: Any, label: str, labels: Mapping[int, str]) -> list[tuple[str, Any]]:
    """``(field, line)`` of a line object: ``label`` for a single line, ``label.alias`` for
    each line of a multi-line indicator (a line the agent holds under its own name, of an
    indicator it does not hold, keeps that name)."""
    if isinstance(obj, LineActions):
        return [(label, obj)]
    lines = _lines_of(obj)
    try:
        aliases = list(obj.lines.getlinealiases())
    except AttributeError:
        aliases = []
    out = []
    for i, line in enumerate(lines):
        if id(obj) not in labels and id(line) in labels:
            out.append((labels[id(line)], line))
        elif len(lines) == 1:
            out.append((label, line))
        else:
            alias = aliases[i] if i < len(aliases) and aliases[i] else str(i)
            out.append((f"{label}.{alias}", line))
    return out


def _clock_root(obj: Any) -> Any:
    """The data feed whose bars ``obj``'s positions follow, or the strategy when they follow
    its steps (None if there is none)."""
    for _ in range(64):
        if obj is None or isinstance(obj, bt.AbstractDataBase | bt.Strategy):
            return obj
        if isinstance(obj, LineSeriesStub):
            obj = obj.lines[0]
        elif isinstance(obj, LineBuffer) and not isinstance(obj, LineActions):
            obj = getattr(obj, "_owner", None)
        else:
            obj = getattr(obj, "_clock", None)
    return None


class _Graph:
    """Memoised reach: for a line object, the source feeds its values come from and the newest
    bar offset reached in each (structural: delays, forward shifts, operations, bindings of
    indicator lines, sub-indicators; plus reads of future bars found while indicators compute).

    Offsets are counted in bars of the line's own clock (exact when the intermediate lines run on
    their source feed's clock, the usual case)."""

    def __init__(self, dynamic: Mapping[int, Reach]) -> None:
        self._memo: dict[int, Reach] = {}
        self._dynamic = dynamic

    def reach(self, obj: Any) -> Reach:
        key = id(obj)
        found = self._memo.get(key)
        if found is None:
            self._memo[key] = {}  # cycle guard
            found = self._memo[key] = self._compute(obj)
        return found

    def _merge(self, parts: list[Reach], shift: int = 0) -> Reach:
        out: Reach = {}
        for part in parts:
            for key, (feed, off, causal) in part.items():
                off += shift
                old = out.get(key)
                if old is None or old[1] < off or (old[1] == off and not causal):
                    out[key] = (feed, off, causal)
        return out

    def _compute(self, obj: Any) -> Reach:
        dyn = self._dynamic.get(id(obj))
        extra = [dyn] if dyn else []
        if isinstance(obj, bt.AbstractDataBase):
            return {id(obj): (obj, 0, True)}
        if isinstance(obj, LineSeriesStub):
            return self.reach(obj.lines[0])
        if isinstance(obj, _LineDelay | _LineForward):
            return self._merge([self.reach(obj.a)], int(obj.ago))
        if isinstance(obj, SingleCoupler):
            return self._merge([self.reach(obj.cdata), *extra])
        if isinstance(obj, LineActions):
            parts = [self.reach(x) for x in getattr(obj, "_datas", ()) if isinstance(x, LineRoot)]
            return self._merge([*parts, *extra])
        if isinstance(obj, LineBuffer):
            owner = getattr(obj, "_owner", None)
            if isinstance(owner, bt.AbstractDataBase):
                return {id(owner): (owner, 0, True)}
            if isinstance(owner, LineIterator):
                bound = [
                    src
                    for child in _children(owner)
                    for src in _lines_of(child)
                    if any(b is obj for b in getattr(src, "bindings", ()))
                ]
                if bound:
                    return self._merge([self.reach(s) for s in bound])
                return self.reach(owner)
            return {}
        if isinstance(obj, LineIterator):
            parts = [self.reach(d) for d in getattr(obj, "datas", ())]
            parts += [self.reach(c) for c in _children(obj)]
            return self._merge([*parts, *extra])
        return {}


# ---------------------------------------------------------------------------------------------
# Labels: where the agent keeps its line objects
# ---------------------------------------------------------------------------------------------

# backtrader's own attributes of a strategy (its registry, collections, aliases of the feeds).
_STRATEGY_INTERNALS = frozenset(
    {
        "_lineiterators",
        "_minperiods",
        "_dlens",
        "_alnames",
        "_orders",
        "_orderspending",
        "_trades",
        "_tradespending",
        "_slave_analyzers",
        "_owner",
        "_clock",
        "_sizer",
        "datas",
        "ddatas",
        "dnames",
        "writers",
        "lines",
        "l",
        "p",
        "params",
        "plotinfo",
        "plotlines",
        "env",
        "cerebro",
        "broker",
        "analyzers",
        "observers",
        "stats",
        "position",
    }
)
_MAX_DEPTH = 8
_MAX_NODES = 200_000
_LEAVES = (str, bytes, bytearray, int, float, complex, bool, type(None), range, memoryview)


_LIBRARY_MODULES: dict[str, bool] = {}
_LIBRARY_DIRS = tuple(
    {
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
    }
)


def _is_library_object(obj: Any) -> bool:
    """True for instances of classes from installed packages or the standard library
    (backtrader's broker, numpy arrays, a model...): the scan does not look inside them."""
    name = type(obj).__module__
    known = _LIBRARY_MODULES.get(name)
    if known is None:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        known = path is None or os.path.abspath(path).startswith(_LIBRARY_DIRS)
        _LIBRARY_MODULES[name] = known
    return known


def _key_label(key: Any) -> str:
    """A stable, readable label for a container key (a feed is its symbol)."""
    if isinstance(key, bt.AbstractDataBase):
        return feed_symbol(key)
    if isinstance(key, str):
        return key
    if isinstance(key, Enum):
        return key.name
    if isinstance(key, bool | int | float) or key is None:
        return repr(key)
    if isinstance(key, tuple):
        return ",".join(_key_label(k) for k in key)
    try:
        text = repr(key)
    except Exception:  # noqa: BLE001 (an agent's own key class: its repr may fail)
        return type(key).__name__
    if " at 0x" in text or type(key).__repr__ is object.__repr__:  # type: ignore[comparison-overlap]
        return type(key).__name__
    return text


def scan_labels(strategy: Any) -> tuple[dict[int, str], list[tuple[str, int]], str]:
    """Where the agent keeps its line objects: ``{id(obj): label}`` for indicators, lines
    operations and indicator lines found in its attributes (any name, ``_private`` included),
    in nested containers (``sma[GOOG][fast]``, ``pairs[0][1]``) and in helper objects
    (``helper.sma``), breadth first, attributes in name order (the shortest path wins).

    Returns:
        ``(labels, held raw arrays as (path, id(array)), why the scan stopped early or "")``.
    """
    labels: dict[int, str] = {}
    arrays: list[tuple[str, int]] = []
    seen: set[int] = {id(strategy)}
    queue: deque[tuple[str, Any, int]] = deque()

    def attrs(obj: Any) -> list[tuple[str, Any]]:
        out: dict[str, Any] = {}
        d = getattr(obj, "__dict__", None)
        if isinstance(d, dict):
            out.update(d)
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if isinstance(slot, str) and slot not in out and hasattr(obj, slot):
                    out[slot] = getattr(obj, slot)
        return sorted(out.items())

    for name, value in attrs(strategy):
        if name not in _STRATEGY_INTERNALS and not inspect.isroutine(value):
            queue.append((name, value, 1))
    nodes = 0
    truncated = ""
    while queue:
        path, obj, depth = queue.popleft()
        if isinstance(obj, _LEAVES):
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        nodes += 1
        if nodes > _MAX_NODES:
            truncated = f"{_MAX_NODES} objects (at self.{path})"
            break
        if isinstance(obj, LineRoot):
            if isinstance(obj, bt.AbstractDataBase | bt.Strategy | bt.Observer):
                continue
            if isinstance(obj, LineSeriesStub):
                continue
            if isinstance(obj, LineBuffer) and not isinstance(obj, LineActions):
                if not isinstance(getattr(obj, "_owner", None), bt.AbstractDataBase):
                    labels.setdefault(id(obj), path)
                continue
            labels.setdefault(id(obj), path)
            if isinstance(obj, LineIterator):  # sub-indicators kept as attributes: macd.me1
                for name, value in attrs(obj):
                    if name.startswith(("_", "data", "line")) or name in _STRATEGY_INTERNALS:
                        continue
                    if isinstance(value, LineRoot | list | tuple | dict):
                        queue.append((f"{path}.{name}", value, depth + 1))
            continue
        if type(obj).__name__ == "array" and type(obj).__module__ == "array":
            arrays.append((path, id(obj)))
            continue
        if depth >= _MAX_DEPTH:
            truncated = truncated or f"depth {_MAX_DEPTH} (self.{path})"
            continue
        if isinstance(obj, Mapping):
            for key, value in list(obj.items()):
                queue.append((f"{path}[{_key_label(key)}]", value, depth + 1))
        elif isinstance(obj, list | tuple | deque):
            for i, value in enumerate(obj):
                queue.append((f"{path}[{i}]", value, depth + 1))
        elif isinstance(obj, set | frozenset):
            continue  # no stable order: members get fallback labels
        elif (
            inspect.ismodule(obj)
            or inspect.isclass(obj)
            or inspect.isroutine(obj)
            or _is_library_object(obj)
        ):
            continue
        else:
            for name, value in attrs(obj):
                queue.append((f"{path}.{name}", value, depth + 1))
    return labels, arrays, truncated


# ---------------------------------------------------------------------------------------------
# Tracked classes
# ---------------------------------------------------------------------------------------------

_TRACKED_CLASSES: dict[type, type] = {}


def _tracked_class(base: type) -> type:
    """A subclass of the line class ``base`` that reports reads (cached per class)."""
    cls = _TRACKED_CLASSES.get(base)
    if cls is not None:
        return cls
    base_getitem: Callable[[Any, int], Any] = getattr(base, "__getitem__")  # noqa: B009
    base_get: Callable[..., Any] = getattr(base, "get")  # noqa: B009
    base_getzero: Callable[..., Any] = getattr(base, "getzero")  # noqa: B009
    base_getzeroval: Callable[..., Any] = getattr(base, "getzeroval")  # noqa: B009
    plain = base_getitem is LineBuffer.__getitem__

    def __getitem__(self: Any, ago: int) -> Any:  # noqa: N807
        value = self.array[self._idx + ago] if plain else base_getitem(self, ago)
        if ACTIVE:
            idx = self._idx
            pos = idx + ago
            if pos < 0:  # python indexing wrapped around to the end of the buffer
                pos += len(self.array)
            tag = self._fmel
            tag.out.append((tag, ago, 1, pos + self.lencount - 1 - idx, value))
            if tag.strict:
                tag.tracker.check_strict()
        elif ago > 0:
            self._fmel.tracker.internal_future_read(self, ago)
        return value

    def get(self: Any, ago: int = 0, size: int = 1) -> Any:
        values = base_get(self, ago, size)
        if ACTIVE:
            idx = self._idx
            if len(values):
                end = idx + ago + 1
                newest = slice(end - size, end).indices(len(self.array))[1] - 1
                last = values[-1]
            else:
                newest, last = idx + ago, None
            tag = self._fmel
            tag.out.append((tag, ago, size, newest + self.lencount - 1 - idx, last))
            if tag.strict:
                tag.tracker.check_strict()
        elif ago > 0:
            self._fmel.tracker.internal_future_read(self, ago)
        return values

    def getzeroval(self: Any, idx: int = 0) -> Any:
        value = base_getzeroval(self, idx)
        if ACTIVE:
            pos = idx + len(self.array) if idx < 0 else idx
            bar = pos + self.lencount - 1 - self._idx
            tag = self._fmel
            tag.out.append((tag, bar - (self.lencount - 1), 1, bar, value))
            if tag.strict:
                tag.tracker.check_strict()
        return value

    def getzero(self: Any, idx: int = 0, size: int = 1) -> Any:
        values = base_getzero(self, idx, size)
        if ACTIVE:
            off = self.lencount - 1 - self._idx
            if len(values):
                newest = slice(idx, idx + size).indices(len(self.array))[1] - 1 + off
                last = values[-1]
            else:
                newest, last = idx + size - 1 + off, None
            tag = self._fmel
            tag.out.append((tag, newest - (self.lencount - 1), size, newest, last))
            if tag.strict:
                tag.tracker.check_strict()
        return values

    def __len__(self: Any) -> int:  # noqa: N807
        if ACTIVE:
            tag = self._fmel
            tag.out.append((tag, 0, 0, self.lencount - 1, None))
        return self.lencount  # type: ignore[no-any-return]

    cls = type(base)(
        f"Tracked{base.__name__}",
        (base,),
        {
            "__getitem__": __getitem__,
            "get": get,
            "getzero": getzero,
            "getzeroval": getzeroval,
            "__len__": __len__,
            "__module__": __name__,
        },
    )
    _TRACKED_CLASSES[base] = cls
    return cls


class _TrackedTextLine(TextLine):
    """A :class:`~feeds.fields.TextLine` that reports reads (same layout: class-swapped)."""

    __slots__ = ()

    def __getitem__(self, ago: int) -> str | None:
        index = self.feed.lines.datetime.lencount - 1 + ago
        value = self.value_at(index)
        if ACTIVE:
            tag: LineTag = self._fmel_tag  # type: ignore[attr-defined]
            tag.out.append((tag, ago, 1, index, value))
            if tag.strict:
                tag.tracker.check_strict()
        return value

    def get(self, ago: int = 0, size: int = 1) -> list[str | None]:
        values = TextLine.get(self, ago, size)
        if ACTIVE:
            tag: LineTag = self._fmel_tag  # type: ignore[attr-defined]
            index = self.feed.lines.datetime.lencount - 1 + ago
            tag.out.append((tag, ago, size, index, values[-1] if values else None))
            if tag.strict:
                tag.tracker.check_strict()
        return values

    def __len__(self) -> int:
        n = len(self.feed.lines.datetime)
        if ACTIVE:
            tag: LineTag = self._fmel_tag  # type: ignore[attr-defined]
            tag.out.append((tag, 0, 0, n - 1, None))
        return n
