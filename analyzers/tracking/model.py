"""What a tracked read points at: the feed (:class:`FeedInfo`) and the line (:class:`LineTag`)."""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.bars import BarHashes, feed_symbol

# The feeds' positions at one bar (AccessTracker.capture()): a 4-tuple of ints per feed, in
# capture order, or the same numbers packed as native int64 bytes, 32 a feed (the compiled
# ``_fastread.capture_packed``, when each number is an int that fits: what a bar holds until
# the writer resolves it, ~112 bytes a feed as tuples of four ints, measured).
State = tuple[tuple[int, int, int, int], ...] | bytes
_ROW = struct.Struct("=4q")


def state_row(state: State, slot: int) -> tuple[int, int, int, int]:
    """Feed ``slot``'s row of ``state``, as ``state[slot]`` of the tuple form gives it (a
    negative slot counts from the end; IndexError past either end)."""
    if not isinstance(state, bytes):
        return state[slot]
    n = len(state) // _ROW.size
    if slot < 0:
        slot += n
    if not 0 <= slot < n:
        raise IndexError("tuple index out of range")
    return _ROW.unpack_from(state, slot * _ROW.size)  # type: ignore[return-value]


def state_rows(state: State) -> tuple[tuple[int, int, int, int], ...]:
    """``state`` in its tuple form (a tuple is returned as it is)."""
    if not isinstance(state, bytes):
        return state
    return tuple(_ROW.iter_unpack(state))


if TYPE_CHECKING:
    from analyzers.tracking.tracker import AccessTracker

logger = logging.getLogger(__name__)


Read = tuple[int, int, int, int, Any]
# (tag id, ago, size, bar index in the line's own buffer, value). size 0 marks ``len()``; a value
# of None on a number line marks a window read that returned nothing. The tag is referred to by
# its id (:attr:`LineTag.id`, its position in :attr:`AccessTracker.tags`), so a raw read holds
# only numbers and text: the garbage collector stops tracking it at its first pass (a reference
# to the tag would keep hundreds of thousands of raw reads on its lists).


# ---------------------------------------------------------------------------------------------
# Feeds and tags
# ---------------------------------------------------------------------------------------------


class PinnedLine:
    """A feed's datetime line as it stood when its run ended: what resolution reads of
    :attr:`FeedInfo.dt` (``array``, ``lencount``, ``_idx``, ``extension``, ``mode``).

    Bars handed to the decision writer are resolved after their bar, from the feeds' buffers
    (:attr:`AccessTracker.deferrable`). A second run over the same feeds (``cerebro.run()``
    again, ``optstrategy`` in one process) starts with backtrader's ``LineBuffer.reset()``,
    which gives the line a new buffer (``self.array = array.array('d')``: backtrader's
    ``linebuffer.py``) and then preloads it; the old buffer object is left as it was. Holding
    it, and the positions, keeps the ended run's bars for what is still to resolve, without a
    copy."""

    __slots__ = ("_idx", "array", "extension", "lencount", "mode")

    def __init__(self, line: Any) -> None:
        self.array = line.array
        self.lencount = line.lencount
        self._idx = line._idx
        self.extension = line.extension
        self.mode = getattr(line, "mode", None)


def feed_labels(datas: list[Any]) -> dict[int, str]:
    """What each of a strategy's feeds is recorded as (``symbol`` of its ``data_accessed``
    entries, actions and positions): ``{id(feed): label}``, each label distinct.

    A feed's label is its symbol (:func:`~core.bars.feed_symbol`). Feeds that share a symbol
    (a daily feed and its weekly resample, ``cerebro.resampledata(data, ...)``; one symbol
    from two files) would otherwise be one group in a record, with one data hash and bar
    indexes of either feed. The first of them in ``datas`` order keeps the symbol; each
    other one is recorded under its backtrader name (``adddata(d, name="GOOG2")``,
    ``resampledata(d, name="GOOG_W")``) when it has one no other feed is recorded as, else
    ``<symbol>#<i>``, ``i`` its position in ``datas`` (``self.datas[i]``)."""
    symbols = [feed_symbol(d) for d in datas]
    taken = set(symbols)
    seen: set[str] = set()
    out: dict[int, str] = {}
    for i, (data, symbol) in enumerate(zip(datas, symbols, strict=True)):
        if id(data) in out:
            continue
        label = symbol
        if symbol in seen:
            name = str(getattr(data, "_name", "") or "")
            label = name if name and name not in taken else f"{symbol}#{i}"
            k = i
            while label in taken:  # a feed named "GOOG#1" beside two unnamed GOOG clones
                k += len(datas)
                label = f"{symbol}#{k}"
            taken.add(label)
        seen.add(symbol)
        out[id(data)] = label
    return out


class FeedInfo:
    """A source feed as resolution sees it: the symbol it is recorded as
    (:func:`feed_labels`), hash history and its datetime line.

    Bar indexes are absolute (0 = the feed's first bar), also for feeds with bounded buffers.
    """

    __slots__ = ("dt", "feed", "hashes", "slot", "symbol")

    def __init__(self, feed: Any, symbol: str | None = None) -> None:
        self.slot = -1  # position in AccessTracker.capture()
        self.feed = feed
        self.symbol = symbol or feed_symbol(feed)
        # a feed's bar hashes follow the rows of its source; a resampled or replayed feed, or
        # one with any other filter (backtrader's ``addfilter``: bars merged, split, dropped),
        # has bars that are not those rows: no hash (NULL, and a tracking gap says so)
        filtered = bool(getattr(feed, "_filters", None) or getattr(feed, "resampling", 0))
        self.hashes: BarHashes | None = None if filtered else getattr(feed, "bar_hashes", None)
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
        "id",
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
        self.id = len(tracker.tags)  # what raw reads carry (see Read)
        tracker.tags.append(self)
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
