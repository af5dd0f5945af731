"""The :class:`AccessTracker`: wires the proxies onto the agent's lines, collects raw reads, and
resolves them into accesses (bar index, bar time, data hash, look-ahead)."""

from __future__ import annotations

import bisect
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import backtrader as bt
from backtrader.linebuffer import LineActions, LineBuffer
from backtrader.lineiterator import LineIterator

from analyzers.schema import Access, DataAccess
from analyzers.tracking import proxies
from analyzers.tracking.graph import _IND, Reach, _children, _clock_root, _Graph, _named_lines
from analyzers.tracking.labels import scan_labels
from analyzers.tracking.model import (
    FeedInfo,
    LineTag,
    PinnedLine,
    Read,
    Snapshot,
    State,
    feed_labels,
    state_row,
)
from analyzers.tracking.proxies import (
    _tracked_class,
    _TrackedTextLine,
    compiled_in_use,
    untracked_class,
)
from analyzers.tracking.source_scan import (
    ClassSpan,
    ModuleFacts,
    class_span,
    code_files,
    file_facts,
    module_facts,
)
from core.bars import BarHashes, feed_symbol
from core.errors import LookAheadError
from core.time import BT_EPOCH_DAYS, SECONDS_PER_DAY
from feeds.fields import TextLine

if TYPE_CHECKING:
    from analyzers.tracking._fastread import ReadBuffer

_capture_c: Callable[[list[tuple[Any, Any]]], State] | None
_ReadBuffer: type[ReadBuffer] | None
try:
    from analyzers.tracking._fastread import ReadBuffer as _Built
    from analyzers.tracking._fastread import capture_packed as _capture_c
    from analyzers.tracking._fastread import count_by_attribute as _count_by_attribute
except ImportError:  # not built: AccessTracker.capture_py, and the reads in a list
    _capture_c = _ReadBuffer = None
else:
    # a feed's BarHashes is counted by its _count (what its __len__ returns) without a Python
    # call a feed a bar
    _count_by_attribute(BarHashes, "_count")
    # a sequence of reads to whoever asks (isinstance): it behaves as a list of 5-tuples does
    _ReadBuffer = Sequence.register(_Built)

logger = logging.getLogger(__name__)


def take_reads(reads: ReadBuffer | list[Read]) -> Sequence[Read]:
    """A tracker's raw reads so far, and the buffer emptied (main thread, once a bar): a
    :class:`ReadBuffer` takes them without making a tuple (``take``), a list is copied and
    cleared. Either way the result iterates, indexes and slices as the list of 5-tuples."""
    if isinstance(reads, list):
        out = reads[:]
        reads.clear()
        return out
    return reads.take()


_tuple_new = tuple.__new__


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
        # packed in C (no tuple per read) when the compiled reads are in use; their own
        # appends and the Python ones (text lines, windows) go in the same buffer, in read order
        self.reads: ReadBuffer | list[Read] = (
            _ReadBuffer() if _ReadBuffer is not None and compiled_in_use() else []
        )
        # every LineTag made for this tracker, by LineTag.id (raw reads carry the id)
        self.tags: list[LineTag] = []
        self.strict_lookahead = strict_lookahead
        self.gaps: list[str] = []
        self.lookahead_total = 0
        self.runonce = True
        self.preload = False
        self._warned: set[tuple[str, str, str]] = set()
        self._tracked: list[tuple[Any, type]] = []
        self._feeds: dict[int, FeedInfo] = {}
        self._labels: dict[int, str] = {}  # id(feed): what it is recorded as (feed_labels)
        self._derived: list[LineTag] = []
        self._dynamic: dict[int, Reach] = {}
        self._stale = False
        self._graph: _Graph | None = None
        self._registered = 0
        self._strategy: Any = None
        # (line, tag attribute, tag) of every feed line this tracker tags: activate()
        self._feed_tags: list[tuple[Any, str, LineTag]] = []
        # every FeedInfo resolution may use (source feeds and strategy step clocks), in the
        # order of :meth:`capture`; FeedInfo.slot is the position
        self._infos: list[FeedInfo] = []
        self._captured: list[tuple[Any, Any]] = []  # (datetime line, hashes) per info
        # serialises resolution (the writer thread and the owner may both resolve deferred
        # bars) and the refresh of the tags' sources
        self.resolve_lock = threading.Lock()
        # the compiled capture, or None for capture_py: fixed when the tracker is made, as the
        # tracked line classes are (proxies.use_compiled)
        self._capture_c = _capture_c if compiled_in_use() else None

    @property
    def feed_hashes(self) -> list[Any]:
        """The data hashes of every feed resolution may use (``None`` for a feed without
        them), in :meth:`capture` order."""
        return [hashes for _, hashes in self._captured]

    # -- wiring -----------------------------------------------------------------------------

    @property
    def feed_labels(self) -> dict[int, str]:
        """What each feed of the tracked strategy is recorded as: ``{id(feed): symbol}``
        (:func:`~analyzers.tracking.model.feed_labels`; empty before
        :meth:`track_strategy`)."""
        return dict(self._labels)

    def feed_info(self, feed: Any) -> FeedInfo:
        info = self._feeds.get(id(feed))
        if info is None:
            info = FeedInfo(feed, self._labels.get(id(feed)))
            info = self._feeds[id(feed)] = self._add_info(info)
        return info

    def _add_info(self, info: FeedInfo) -> FeedInfo:
        info.slot = len(self._infos)
        self._infos.append(info)
        self._captured.append((info.dt, info.hashes))
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
            if hashes is not None and getattr(hashes, "bounded", False):
                return False
        return True

    def capture(self) -> State:
        """Every feed's position now (:meth:`FeedInfo.capture`), for :meth:`resolve` later
        (main thread, once per bar; four ints per feed). Compiled when the extension is built
        and in use (:func:`~analyzers.tracking.proxies.use_compiled`): the same expressions
        evaluated the same way (``_fastread.capture_packed``), the numbers packed as int64
        bytes when each is an int that fits (:data:`~analyzers.tracking.model.State`;
        :func:`~analyzers.tracking.model.state_rows` gives the tuples); else
        :meth:`capture_py`."""
        compiled = self._capture_c
        if compiled is not None:
            return compiled(self._captured)
        return self.capture_py()

    def capture_py(self) -> tuple[tuple[int, int, int, int], ...]:
        """:meth:`capture` in Python (:meth:`FeedInfo.capture` inlined)."""
        return tuple(
            [
                (
                    dt.lencount,
                    dt._idx,
                    len(dt.array) - dt.extension,
                    len(hashes) if hashes is not None else 0,
                )
                for dt, hashes in self._captured
            ]
        )

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
            tag = LineTag(self, line, alias, info, direct=True)
            if self._swap(line, tag):
                self._feed_tags.append((line, "_fmel", tag))
                n += 1
        for name, text_line in getattr(data, "text_lines", {}).items():
            if isinstance(text_line, TextLine) and type(text_line) in (TextLine, _TrackedTextLine):
                tag = LineTag(self, text_line, name, info, direct=True)
                if self._claim(text_line, "_fmel_tag", tag, TextLine, _TrackedTextLine):
                    self._feed_tags.append((text_line, "_fmel_tag", tag))
                    n += 1
        if info.hashes is None:
            self._gap(
                f"feed {info.symbol} has no data hashes (a resampled, replayed, filtered or "
                "custom feed): its reads are recorded with data_hash NULL"
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
        self._labels = feed_labels(list(strategy.datas))
        shared = {
            feed_symbol(d): label
            for d in strategy.datas
            if (label := self._labels[id(d)]) != feed_symbol(d)
        }
        if shared:
            logger.info(
                "FMEL: feeds share a symbol; the later ones are recorded as %s",
                ", ".join(f"{label} ({symbol})" for symbol, label in shared.items()),
            )
        for data in strategy.datas:
            self.track_feed(data)
        if not track_indicators:
            return
        self._graph = _Graph(self._dynamic)
        self._track_registry(strategy)
        self._scan_sources(type(strategy))
        # observers the agent made and holds (self.dd = bt.observers.DrawDown()): their lines
        # are not tracked either (helper-118: trading on self.dd.lines.drawdown[0], untold)
        held = sorted(name for name, v in vars(strategy).items() if isinstance(v, bt.Observer))
        if held:
            self._gap(
                f"the agent holds observers ({', '.join('self.' + n for n in held)}): observer "
                "lines are not tracked, so reads of them are not recorded"
            )

    def _track_registry(self, strategy: Any) -> None:
        labels, held_arrays, truncated = scan_labels(strategy, self._labels)
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
        if not isinstance(line, LineBuffer):
            return False
        base = untracked_class(type(line)) or type(line)
        return self._claim(line, "_fmel", tag, base, _tracked_class(base))

    def _claim(self, line: Any, attr: str, tag: LineTag, base: type, tracked: type) -> bool:
        """Tag ``line`` (its attribute ``attr``) for this tracker; False when it is already.

        A line another tracker tagged is either shared or left behind. Shared: the feeds'
        lines are the same objects for every strategy of a Cerebro, each strategy with its
        own analyzer; the line keeps one tag at a time, and :meth:`activate` (called when the
        agent's code starts, see ``FMELAnalyzer``) points it at this tracker's. Left behind: a
        run that raised never reached its analyzer's stop, so the lines kept that tracker's
        tags (and class); this tracker takes them over and gives the class back at its stop.
        """
        held = getattr(line, attr, None)
        if isinstance(held, LineTag):
            if held.tracker is self:
                return False
            if self._beside(held.tracker):
                return True
        setattr(line, attr, tag)
        if type(line) is not tracked:
            line.__class__ = tracked
        self._tracked.append((line, base))
        return True

    def _beside(self, other: AccessTracker) -> bool:
        """Whether ``other`` tracks another strategy running in this tracker's run."""
        mine, theirs = self._strategy, other._strategy
        if mine is None or theirs is None or mine is theirs:
            return False
        cerebro = getattr(mine, "cerebro", None)
        running = getattr(cerebro, "runningstrats", None) or ()
        return getattr(theirs, "cerebro", None) is cerebro and any(s is theirs for s in running)

    def activate(self) -> None:
        """Point the feeds' lines at this tracker's tags (:meth:`_claim`: lines shared with
        the other strategies of the run). Main thread, when the agent's code starts and
        another tracker was the last to (one global compare otherwise); a few attribute
        stores per feed."""
        for line, attr, tag in self._feed_tags:
            setattr(line, attr, tag)
        proxies.OWNER = self

    def sync(self, in_start: bool = False) -> None:
        """Track line objects the agent created after start (e.g. in ``next()``); cheap when
        there are none (one ``len``). ``in_start``: called right after the agent's own
        ``start()`` (which backtrader runs after the analyzers' start, before the first bar):
        what it created is tracked from the first bar, without the warning."""
        strategy = self._strategy
        if strategy is None or self._graph is None:
            return
        if len(strategy._lineiterators.get(_IND, ())) == self._registered:
            return
        if in_start:
            logger.info("FMEL: the agent created line objects in start(); tracked")
        else:
            logger.warning(
                "FMEL: the agent created line objects after start (in next()?); tracked from now on"
            )
        self._graph = _Graph(self._dynamic)
        self._track_registry(strategy)

    def pin(self) -> None:
        """The run ended: resolve what is left against its feeds as they are now
        (:class:`~analyzers.tracking.model.PinnedLine`), whatever a next run over the same
        feeds does to them. Main thread, at the analyzer's stop. No lock: a resolution on the
        writer thread reading a line before and its pin after sees the same bars (nothing
        moves the feeds between the run's end and the next run's reset)."""
        for info in self._infos:
            if not isinstance(info.dt, PinnedLine):
                info.dt = PinnedLine(info.dt)

    def untrack_all(self) -> None:
        """Give every tracked line its original class back (after the run)."""
        for line, original in self._tracked:
            line.__class__ = original
            if isinstance(line, TextLine):
                line._fmel_tag = None  # type: ignore[attr-defined]
            else:
                line._fmel = None
        self._feed_tags.clear()
        if proxies.OWNER is self:
            proxies.OWNER = None
        self._tracked.clear()

    # -- what cannot be tracked -------------------------------------------------------------

    def note_overrides(self, strategy: Any, names: Sequence[str]) -> None:
        """Tell (a tracking gap) each of backtrader's order methods ``names`` the agent's class
        overrides (``buy``, ``close``, ``order_target_percent``, ...): what runs inside them is
        taken as backtrader reading the feeds on the agent's behalf (sizers, order prices), so
        the override's own reads are not recorded (helper-116 F5: a ``buy()`` that set its
        limit from ``low[0..-2]`` lost those reads)."""
        for name in names:
            held = vars(strategy).get(name)  # replaced on the instance (self.buy = ...)
            own = held if callable(held) else getattr(type(strategy), name, None)
            if own is None or own is getattr(bt.Strategy, name, None):
                continue
            if held is not None or _defined_outside_backtrader(own):
                what = "replaces" if held is not None else "overrides"
                self._gap(
                    f"the agent {what} {name}() ({getattr(own, '__qualname__', name)}): the "
                    f"reads its own code makes inside it are not recorded (FMEL takes what runs "
                    f"inside {name}() as backtrader's reads on the agent's behalf)"
                )

    def _time_gone(self, info: FeedInfo) -> None:
        self._gap(
            f"feed {info.symbol} keeps fewer bar times than values (exactbars >= 1): reads of "
            "bars older than its datetime buffer are recorded with bar_time NULL"
        )

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

    def _scan_sources(self, cls: type) -> None:
        """Flag what the agent's code reads that FMEL cannot see (:mod:`.source_scan`):
        raw-buffer reads (``.array``, ``plotrange``) anywhere in the agent's module (helpers
        it calls included) and inside its base classes outside backtrader (helper-116 F3: a
        library base class read tomorrow's close through ``line.array[line.idx + 1]``;
        helper-118: not the rest of their modules, which flagged a mixin's neighbours), and
        reads of the strategy's observers (``self.stats``, ``self.observers``; helper-116 F2)
        inside those classes, ``self.stats`` only when none of them assigns ``self.stats``
        itself (helper-120: a helper class's or a base's own ``stats``). A class whose
        source cannot be read (an interactive session, ``exec``, a compiled module) is told
        as not checked (helper-118). Reported with file and line numbers, as tracking gaps."""
        found: list[tuple[type, ModuleFacts, ClassSpan]] = []
        for base in cls.__mro__:
            module = getattr(base, "__module__", "") or ""
            if base is not cls and (module == "builtins" or not _defined_outside_backtrader(base)):
                continue
            files = code_files(base)
            if not files and base is not cls:
                continue  # nothing of its own to read (a mixin of attributes)
            # the file its functions come from, whatever module name it was loaded under
            facts = file_facts(files[0]) if files else module_facts(module)
            span = class_span(facts, base) if facts is not None else None
            if span is None and not files:
                continue  # a class with no code of its own (type("T", (Agent,), {}))
            if facts is None or span is None:
                self._gap(
                    f"the source of {base.__qualname__} ({module}) cannot be read (an "
                    "interactive session, exec'd or compiled code): its raw-buffer (.array) "
                    "and observer (self.stats) reads are not checked"
                )
                continue
            found.append((base, facts, span))

        def inside(lines: Any, facts: ModuleFacts, span: ClassSpan) -> list[int]:
            return [n for n in lines if span.first <= n <= span.last]

        own_stats = any(inside(f.stats_assigned, f, sp) for _, f, sp in found)
        strategy = self._strategy
        observers = {"observers"}
        if not own_stats and getattr(strategy, "stats", None) is getattr(strategy, "observers", 0):
            observers.add("stats")  # backtrader's alias of the observers
        raw: dict[str, set[int]] = {}
        seen: dict[str, set[int]] = {}
        for base, facts, span in found:
            # the whole module of the agent's class and of the strategies it is built on
            # (helpers they call; helper-122: a subclass of an agent hid its module's peek),
            # the class statement alone of other bases (helper-118: a mixin's neighbours)
            whole = base is cls or issubclass(base, bt.Strategy)
            lines = facts.raw_reads if whole else inside(facts.raw_reads, facts, span)
            raw.setdefault(facts.path, set()).update(lines)
            reads = [n for n, attr in facts.self_reads if attr in observers]
            seen.setdefault(facts.path, set()).update(inside(reads, facts, span))
        for lines_by_path, what, why in (
            (
                raw,
                "raw line buffers (.array / plotrange)",
                "not recorded and not checked for look-ahead",
            ),
            (seen, "observer lines (self.stats / self.observers)", "not recorded"),
        ):
            for path, found_lines in lines_by_path.items():
                if found_lines:
                    where = ", ".join(str(n) for n in sorted(found_lines)[:10])
                    self._gap(
                        f"agent code reads {what} at {path} line(s) {where}: those reads are {why}"
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
        if reader is None:
            return
        # the reader's own tracker: the feed's lines are shared by the strategies of a run and
        # carry the tags of whichever ran last (activate); the reader's lines carry its own
        mine: AccessTracker = self
        for own in getattr(getattr(reader, "lines", None), "lines", ()):
            held = getattr(own, "_fmel", None)
            if isinstance(held, LineTag):
                mine = held.tracker
                break
        mine._reads_ahead(reader, line, ago, tag)

    def _reads_ahead(self, reader: Any, line: Any, ago: int, tag: LineTag) -> None:
        """``reader`` (a line iterator of this tracker's strategy) read ``line[ago]``, ``ago``
        bars ahead: what it reaches grows (see :meth:`internal_future_read`)."""
        if self._graph is None:
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

    def drain(self) -> Sequence[Read]:
        """The raw reads since the last call (every tag appends to the same buffer, so it is
        copied and cleared): a :class:`ReadBuffer` of them, or a list (pure Python). Main
        thread."""
        return take_reads(self.reads)

    def check_strict(self) -> None:
        """Strict mode, called right after a read: raise if it reached a bar not in the past."""
        self.resolve(self.reads[-1:], count=False)

    def resolve(
        self,
        reads: Sequence[Read],
        count: bool = True,
        state: State | None = None,
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
        tags = self.tags
        for seq, (tid, ago, size, index, value) in enumerate(reads):
            tag = tags[tid]
            info = tag.clock
            if tag.direct and size == 1 and value.__class__ is float and info is not None:
                # the common read, d.close[-1]: one source, the feed's own bar
                cur, off, nbuf, times, at = snaps[info]
                if 0 <= index < nbuf and index >= off:  # its time still in the dt buffer
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
                if not la and offset > 0 and returned and bar >= nbuf > 0 and num == num:
                    # a forward-shifted line on the last bars: backtrader's buffer wrapped
                    # around to the first bar and served its (not NaN) value
                    la = True
                    reason = (
                        f"a line shifted {offset} bar(s) forward reaches past the last bar of "
                        f"{info.symbol}: backtrader's buffer wrapped around to its first bar"
                    )
            if la:
                ahead = True
                if not reason:
                    reason = _reason(tag, ago, index, offset, cur, info)
            if got:
                digest = at(bar) if at is not None else None
                # exactbars=1 keeps each line only as long as its consumers need: a feed's
                # datetime buffer can be shorter than its close's, so an older bar's time may
                # be gone (a negative position would wrap around to a wrong time)
                when = (
                    round((times[bar - off] - BT_EPOCH_DAYS) * SECONDS_PER_DAY, 3)
                    if bar >= off
                    else None
                )
                if when is None:
                    self._time_gone(info)
            else:
                digest = when = None
            if not returned:  # a window that returned nothing: no bar (the schema's -1)
                bar = -1
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
        # once per field and kind of reason: the reasons name the index, and list(line) or
        # np.asarray(line) read every index of the buffer (helper-116 F7: ~2,100 warnings)
        key = (tag.symbol, tag.field, _DIGITS.sub("#", reason))
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "look-ahead: %s; flagged in the decision record (further such reads of this "
                "field are flagged without a warning)",
                text,
            )


_DIGITS = re.compile(r"-?\d+")  # the numbers of a look-ahead reason (its index, offsets)


class _Snaps(dict[FeedInfo, Snapshot]):
    """Each feed's :data:`Snapshot` for one bar, made on first use: from the captured state
    (:meth:`AccessTracker.capture`) when there is one, else from the feed now."""

    __slots__ = ("state",)

    def __init__(self, state: State | None) -> None:
        super().__init__()
        self.state = state

    def __missing__(self, info: FeedInfo) -> Snapshot:
        state = self.state
        snap = info.snapshot() if state is None else info.snapshot_of(state_row(state, info.slot))
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
    """Whether ``fn`` (a function or class) comes from outside the ``backtrader`` package
    (``backtrader_contrib`` or a user's ``backtrader_agents`` is outside: helper-118)."""
    module = getattr(fn, "__module__", "") or ""
    return module != "backtrader" and not module.startswith("backtrader.")
