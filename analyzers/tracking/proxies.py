"""The tracked line classes: every read an agent makes goes through them (the hot path).

:data:`ACTIVE` is true only while the agent's own code runs (set by the analyzer).

A line class whose reads are backtrader's own ``LineBuffer.__getitem__`` (data feeds, indicators'
lines) gets ``__getitem__`` and ``__len__`` compiled in C (``_fastread.c``, built by ``make``):
the same code as :func:`_plain_getitem` and :func:`_plain_len`, without a Python frame per read.
When the extension is not built (no C compiler), those two Python functions are used instead
and one INFO line says so. :func:`use_compiled` switches between them for the classes made
next, and for the trackers made next (their per-bar ``capture``); ``tests/unit/test_fastread.py``
and ``tests/unit/test_idiom_corpus.py`` compare both.
"""

from __future__ import annotations

import array
import collections
import logging
from collections.abc import Callable
from operator import index
from typing import Any

from backtrader.linebuffer import LineBuffer

from analyzers.tracking.model import LineTag
from feeds.fields import TextLine

logger = logging.getLogger(__name__)


# True only while the agent's own code runs. Module-level so the check on every line read (also
# backtrader's own, millions per run) is a single global load. Main thread only.
ACTIVE = False


# The tracker whose tags the feeds' lines carry now (AccessTracker.activate): several strategies
# of one Cerebro read the same feed lines, each recorded by its own analyzer. Main thread only.
OWNER: Any = None


def set_active(value: bool) -> bool:
    """Set the tracking flag; returns the previous value (for nesting)."""
    global ACTIVE
    was, ACTIVE = ACTIVE, value
    return was


# ---------------------------------------------------------------------------------------------
# Tracked classes
# ---------------------------------------------------------------------------------------------

_TRACKED_CLASSES: dict[type, type] = {}


def _int(key: Any) -> Any:
    """An index as recorded: the int it indexed with (a numpy int, a bool: ``operator.index``;
    a numpy bool, which has no ``__index__``: its value), else as given (the read took it: a
    key no int stands for is recorded as it is)."""
    try:
        return index(key)
    except TypeError:
        item = getattr(key, "item", None)
        if callable(item) and getattr(key, "shape", None) == ():
            try:
                return index(item())
            except TypeError:
                pass
        return key


def _plain_getitem(self: Any, ago: int) -> Any:
    """``__getitem__`` of a tracked class whose base reads with ``LineBuffer.__getitem__``."""
    value = self.array[self._idx + ago]
    if ACTIVE:
        if ago.__class__ is not int:  # a numpy int, a bool: recorded as the int it indexed
            ago = _int(ago)
        idx = self._idx
        pos = idx + ago
        if pos < 0:  # python indexing wrapped around to the end of the buffer
            pos += len(self.array)
        tag = self._fmel
        tag.out.append((tag.id, ago, 1, pos + self.lencount - 1 - idx, value))
        if tag.strict:
            tag.tracker.check_strict()
    elif ago > 0:
        self._fmel.tracker.internal_future_read(self, ago)
    return value


def _plain_tail(self: Any, ago: int, value: Any) -> Any:
    """What :func:`_plain_getitem` does once it has read ``value`` (the same lines): the
    compiled version hands over to it when :data:`ACTIVE` is not a bool (or was deleted).
    Written out twice rather than called from :func:`_plain_getitem`, which is the hot path
    without the extension (one more call a read); ``tests/unit/test_fastread.py`` runs both."""
    if ACTIVE:
        if ago.__class__ is not int:  # a numpy int, a bool: recorded as the int it indexed
            ago = _int(ago)
        idx = self._idx
        pos = idx + ago
        if pos < 0:  # python indexing wrapped around to the end of the buffer
            pos += len(self.array)
        tag = self._fmel
        tag.out.append((tag.id, ago, 1, pos + self.lencount - 1 - idx, value))
        if tag.strict:
            tag.tracker.check_strict()
    elif ago > 0:
        self._fmel.tracker.internal_future_read(self, ago)
    return value


def _plain_len(self: Any) -> int:
    """``__len__`` of every tracked class: a read of the whole line (size 0)."""
    if ACTIVE:
        tag = self._fmel
        tag.out.append((tag.id, 0, 0, self.lencount - 1, None))
    return self.lencount  # type: ignore[no-any-return]


try:
    from analyzers.tracking import _fastread
except ImportError:  # not built (no C compiler): the Python functions above
    _COMPILED: tuple[Any, Any] | None = None
else:
    # the buffers backtrader's LineBuffer keeps: array.array, or a deque with exactbars
    _fastread.init(
        globals(),
        _plain_getitem,
        _plain_tail,
        _plain_len,
        (array.array, collections.deque, list),
    )
    _COMPILED = _fastread.descriptors(LineBuffer)

# what the compiled reads read from the line itself
_LINE_ATTRS = ("array", "_idx", "lencount", "_fmel")


def _dict_safe(cls: type) -> bool:
    """True when none of :data:`_LINE_ATTRS` is a data descriptor (a property, a slot) on
    ``cls``: then an entry in an instance's ``__dict__`` is what ``getattr`` returns (Python's
    attribute lookup: data descriptors of the class first, then the instance dict), and the
    compiled reads may look there directly; other classes keep the Python methods. Decided
    once per class, when it is first tracked: a property added to the class afterwards is not
    seen (backtrader adds none)."""
    for name in _LINE_ATTRS:
        for klass in cls.__mro__:
            if name in vars(klass):
                kind = type(vars(klass)[name])
                if hasattr(kind, "__set__") or hasattr(kind, "__delete__"):
                    return False
                break
    return True


COMPILED = _COMPILED is not None  # the C extension is built and importable
_use_compiled = COMPILED
_said_pure = False


def use_compiled(on: bool) -> bool:
    """Use the compiled ``__getitem__``/``__len__`` (True) or the Python ones for the tracked
    classes made from now on, and the compiled once-a-bar record
    (``FMELAnalyzer._record``) or the Python one for the FMEL analyzers made from now on;
    returns the previous setting. Lines already tracked and analyzers already made keep theirs.

    Raises:
        RuntimeError: ``on`` is true and the extension is not built (``make`` builds it).
    """
    global _use_compiled
    if on and _COMPILED is None:
        raise RuntimeError(
            "analyzers/tracking/_fastread is not built: run make (it needs a C compiler)"
        )
    was, _use_compiled = _use_compiled, bool(on)
    if was != on:
        _TRACKED_CLASSES.clear()
    return was


def compiled_in_use() -> bool:
    """Whether the compiled reads are in use for what is tracked from now on (built, and not
    switched off with :func:`use_compiled`)."""
    return _use_compiled and _COMPILED is not None


def untracked_class(cls: type) -> type | None:
    """The line class a tracked class was made from (:func:`_tracked_class`); None when
    ``cls`` is not one."""
    for base, tracked in _TRACKED_CLASSES.items():
        if tracked is cls:
            return base
    return None


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
        value = base_getitem(self, ago)
        if ACTIVE:
            if ago.__class__ is not int:  # a numpy int, a bool: recorded as the int it indexed
                ago = _int(ago)
            idx = self._idx
            pos = idx + ago
            if pos < 0:  # python indexing wrapped around to the end of the buffer
                pos += len(self.array)
            tag = self._fmel
            tag.out.append((tag.id, ago, 1, pos + self.lencount - 1 - idx, value))
            if tag.strict:
                tag.tracker.check_strict()
        elif ago > 0:
            self._fmel.tracker.internal_future_read(self, ago)
        return value

    def get(self: Any, ago: int = 0, size: int = 1) -> Any:
        values = base_get(self, ago, size)
        if ACTIVE:
            ago, size = _int(ago), _int(size)
            if size.__class__ is int and size < 1:  # a window of no bars reads nothing
                return values
            idx = self._idx
            if len(values):
                end = idx + ago + 1
                newest = slice(end - size, end).indices(len(self.array))[1] - 1
                last = values[-1]
            else:
                newest, last = idx + ago, None
            tag = self._fmel
            tag.out.append((tag.id, ago, size, newest + self.lencount - 1 - idx, last))
            if tag.strict:
                tag.tracker.check_strict()
        elif ago > 0:
            self._fmel.tracker.internal_future_read(self, ago)
        return values

    def getzeroval(self: Any, idx: int = 0) -> Any:
        value = base_getzeroval(self, idx)
        if ACTIVE:
            idx = _int(idx)
            pos = idx + len(self.array) if idx < 0 else idx
            bar = pos + self.lencount - 1 - self._idx
            tag = self._fmel
            tag.out.append((tag.id, bar - (self.lencount - 1), 1, bar, value))
            if tag.strict:
                tag.tracker.check_strict()
        return value

    def getzero(self: Any, idx: int = 0, size: int = 1) -> Any:
        values = base_getzero(self, idx, size)
        if ACTIVE:
            idx, size = _int(idx), _int(size)
            if size.__class__ is int and size < 1:  # a window of no bars reads nothing
                return values
            off = self.lencount - 1 - self._idx
            if len(values):
                newest = slice(idx, idx + size).indices(len(self.array))[1] - 1 + off
                last = values[-1]
            else:
                newest, last = idx + size - 1 + off, None
            tag = self._fmel
            tag.out.append((tag.id, newest - (self.lencount - 1), size, newest, last))
            if tag.strict:
                tag.tracker.check_strict()
        return values

    global _said_pure
    if _COMPILED is None and not _said_pure:
        _said_pure = True
        logger.info(
            "FMEL reads are tracked in pure Python: the C extension analyzers/tracking/_fastread "
            "is not built (make builds it; it needs a C compiler)"
        )
    getitem: Any = _plain_getitem if plain else __getitem__
    length: Any = _plain_len
    compiled = _use_compiled and _COMPILED is not None and issubclass(base, LineBuffer)
    if compiled and _COMPILED is not None and _dict_safe(base):
        compiled_getitem, length = _COMPILED
        if plain:
            getitem = compiled_getitem
    cls = type(base)(
        f"Tracked{base.__name__}",
        (base,),
        {
            "__getitem__": getitem,
            "get": get,
            "getzero": getzero,
            "getzeroval": getzeroval,
            "__len__": length,
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
            # a numpy int, a bool: recorded as the int it indexed
            tag.out.append((tag.id, _int(ago), 1, _int(index), value))
            if tag.strict:
                tag.tracker.check_strict()
        return value

    def get(self, ago: int = 0, size: int = 1) -> list[str | None]:
        values = TextLine.get(self, ago, size)
        if ACTIVE:
            ago, size = _int(ago), _int(size)
            if size.__class__ is int and size < 1:  # a window of no bars reads nothing
                return values
            tag: LineTag = self._fmel_tag  # type: ignore[attr-defined]
            index = self.feed.lines.datetime.lencount - 1 + ago
            tag.out.append((tag.id, ago, size, index, values[-1] if values else None))
            if tag.strict:
                tag.tracker.check_strict()
        return values

    def __len__(self) -> int:
        n = len(self.feed.lines.datetime)
        if ACTIVE:
            tag: LineTag = self._fmel_tag  # type: ignore[attr-defined]
            tag.out.append((tag.id, 0, 0, n - 1, None))
        return n
