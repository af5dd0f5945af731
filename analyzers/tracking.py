"""Access tracking: which bar of which field an agent read, with the value it got.

The agent's data feeds (and the indicators it owns) are wrapped in place: each of their line
buffers becomes a tracking proxy of the same buffer (its class is swapped for a subclass whose
``__getitem__``, ``get`` and ``__len__`` also report the read). Identity, hashing and every
backtrader internal keep working because the object is the same; only reads made while
:attr:`AccessTracker.active` is true (the agent's own ``prenext``/``nextstart``/``next`` and
``notify_*`` calls) are recorded, so reads made by the broker, by indicators computing, by
observers or by order construction are not attributed to the agent.

A recorded read is a tuple ``(tag, index, size, bar_index, value)``; the analyzer resolves the
bar's data hash from ``tag.hashes`` when it builds the decision record at the end of the bar.

Thread context: main (backtrader) thread only.
"""

from __future__ import annotations

import logging
from typing import Any

import backtrader as bt
from backtrader.linebuffer import LineBuffer

from core.bars import BarHashes, feed_symbol
from core.errors import LookAheadError
from feeds.fields import TextLine

logger = logging.getLogger(__name__)

Read = tuple["LineTag", int, int, int, Any]

# True only while an agent callback runs. Module-level so the check on every line read (also
# backtrader's own, millions per run) is a single global load. Main thread only.
ACTIVE = False


def set_active(value: bool) -> bool:
    """Set the tracking flag; returns the previous value (for nesting)."""
    global ACTIVE
    was, ACTIVE = ACTIVE, value
    return was


class LineTag:
    """What a tracked line is: the tracker, the symbol and field it stands for, the hash
    history of the feed whose bars it follows."""

    __slots__ = ("field", "hashes", "symbol", "tracker")

    def __init__(
        self, tracker: AccessTracker, symbol: str, field: str, hashes: BarHashes | None
    ) -> None:
        self.tracker = tracker
        self.symbol = symbol
        self.field = field
        self.hashes = hashes


class AccessTracker:
    """Collects the reads of the current decision.

    Attributes:
        reads: reads since the last :meth:`drain`, in order (recorded while the module flag
            :data:`ACTIVE` is true, i.e. while an agent callback runs).
        strict_lookahead: raise :class:`LookAheadError` on a read at a positive index.
    """

    def __init__(self, strict_lookahead: bool = False) -> None:
        self.reads: list[Read] = []
        self.strict_lookahead = strict_lookahead
        self._warned: set[tuple[str, str]] = set()
        self._tracked: list[tuple[Any, type]] = []

    # -- recording (hot path) ---------------------------------------------------------------

    def lookahead(self, tag: LineTag, ago: int) -> None:
        """Called for a read at ``ago > 0`` (a future bar in a preloaded backtest)."""
        key = (tag.symbol, tag.field)
        if self.strict_lookahead:
            raise LookAheadError(
                f"agent read {tag.symbol}.{tag.field}[{ago}]: index {ago} is a "
                "future bar (FMEL_STRICT_LOOKAHEAD is on)"
            )
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(
                "look-ahead: agent read %s.%s[%d], a future bar; flagged in the decision record",
                tag.symbol,
                tag.field,
                ago,
            )

    def on_text_read(self, line: TextLine, ago: int, index: int, value: str | None) -> None:
        """Called by :class:`~feeds.fields.TextLine` on every read; kept only while an agent
        callback runs (:data:`ACTIVE`)."""
        if not ACTIVE:
            return
        tag: LineTag = line._fmel_tag  # type: ignore[attr-defined]
        if ago > 0:
            self.lookahead(tag, ago)
        self.reads.append((tag, ago, 1, index, value))

    def drain(self) -> list[Read]:
        reads, self.reads = self.reads, []
        return reads

    # -- wiring -----------------------------------------------------------------------------

    def track_line(self, line: Any, symbol: str, field: str, hashes: BarHashes | None) -> None:
        """Make ``line`` (a LineBuffer or TextLine) report reads to this tracker."""
        tag = LineTag(self, symbol, field, hashes)
        if isinstance(line, TextLine):
            line._fmel_tag = tag  # type: ignore[attr-defined]
            line._fmel = self
            self._tracked.append((line, TextLine))
            return
        if not isinstance(line, LineBuffer):
            return
        original = type(line)
        line._fmel = tag
        line.__class__ = _tracked_class(original)
        self._tracked.append((line, original))

    def track_feed(self, data: Any) -> int:
        """Track every line of a data feed (OHLCV, extras, text fields). Returns lines tracked.

        ``datetime`` is left alone: it is when, not what.
        """
        symbol = feed_symbol(data)
        hashes: BarHashes | None = getattr(data, "bar_hashes", None)
        n = 0
        for alias in data.lines.getlinealiases():
            if alias == "datetime":
                continue
            self.track_line(getattr(data.lines, alias), symbol, alias, hashes)
            n += 1
        for name, text_line in getattr(data, "text_lines", {}).items():
            self.track_line(text_line, symbol, name, hashes)
            n += 1
        return n

    def track_indicator(self, ind: Any, label: str) -> None:
        """Track an indicator the agent owns: field ``<label>.<line>``, symbol and hashes of the
        feed it is computed from."""
        feed = _root_feed(ind)
        symbol = feed_symbol(feed) if feed is not None else "?"
        hashes = getattr(feed, "bar_hashes", None) if feed is not None else None
        suffix = f"[{symbol}]"
        if label.endswith(suffix):  # self.sma["GOOG"] reads as field "sma" of symbol GOOG
            label = label[: -len(suffix)]
        aliases = ind.lines.getlinealiases()
        for i, alias in enumerate(aliases):
            field = label if len(aliases) == 1 else f"{label}.{alias or i}"
            self.track_line(ind.lines[i], symbol, field, hashes)

    def untrack_all(self) -> None:
        """Give every tracked line its original class back (after the run)."""
        for line, original in self._tracked:
            if isinstance(line, TextLine):
                line._fmel = None
            else:
                line.__class__ = original
        self._tracked.clear()


def _root_feed(obj: Any) -> Any:
    seen = 0
    while obj is not None and seen < 32:
        if isinstance(obj, bt.AbstractDataBase):
            return obj
        # indicator -> its data; a line passed as data (LineSeriesStub) -> the feed owning it
        nxt = getattr(obj, "data", None)
        if nxt is None:
            nxt = getattr(obj, "_clock", None)
        if nxt is None:
            nxt = getattr(obj, "_owner", None)
        obj = nxt
        seen += 1
    return None


_TRACKED_CLASSES: dict[type, type] = {}


def _tracked_class(base: type) -> type:
    cls = _TRACKED_CLASSES.get(base)
    if cls is not None:
        return cls

    def __getitem__(self: Any, ago: int) -> Any:  # noqa: N807
        value = self.array[self.idx + ago]
        if ACTIVE:
            tag = self._fmel
            if ago > 0:
                tag.tracker.lookahead(tag, ago)
            tag.tracker.reads.append((tag, ago, 1, self.lencount - 1 + ago, value))
        return value

    def get(self: Any, ago: int = 0, size: int = 1) -> Any:
        values = base.get(self, ago, size)  # type: ignore[attr-defined]
        if ACTIVE:
            tag = self._fmel
            if ago > 0:
                tag.tracker.lookahead(tag, ago)
            last = values[-1] if len(values) else None
            tag.tracker.reads.append((tag, ago, size, self.lencount - 1 + ago, last))
        return values

    def __len__(self: Any) -> int:  # noqa: N807
        if ACTIVE:
            tag = self._fmel
            tag.tracker.reads.append((tag, 0, 0, self.lencount - 1, None))
        return self.lencount  # type: ignore[no-any-return]

    cls = type(
        f"Tracked{base.__name__}",
        (base,),
        {"__getitem__": __getitem__, "get": get, "__len__": __len__, "__module__": __name__},
    )
    _TRACKED_CLASSES[base] = cls
    return cls
