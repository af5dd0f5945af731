"""The tracked line classes: every read an agent makes goes through them (the hot path).

:data:`ACTIVE` is true only while the agent's own code runs (set by the analyzer)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from backtrader.linebuffer import LineBuffer

from analyzers.tracking.model import LineTag
from feeds.fields import TextLine

logger = logging.getLogger(__name__)


# True only while the agent's own code runs. Module-level so the check on every line read (also
# backtrader's own, millions per run) is a single global load. Main thread only.
ACTIVE = False


def set_active(value: bool) -> bool:
    """Set the tracking flag; returns the previous value (for nesting)."""
    global ACTIVE
    was, ACTIVE = ACTIVE, value
    return was


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
            tag.out.append((tag.id, ago, 1, pos + self.lencount - 1 - idx, value))
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
            tag.out.append((tag.id, ago, size, newest + self.lencount - 1 - idx, last))
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
            tag.out.append((tag.id, bar - (self.lencount - 1), 1, bar, value))
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
            tag.out.append((tag.id, newest - (self.lencount - 1), size, newest, last))
            if tag.strict:
                tag.tracker.check_strict()
        return values

    def __len__(self: Any) -> int:  # noqa: N807
        if ACTIVE:
            tag = self._fmel
            tag.out.append((tag.id, 0, 0, self.lencount - 1, None))
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
            tag.out.append((tag.id, ago, 1, index, value))
            if tag.strict:
                tag.tracker.check_strict()
        return value

    def get(self, ago: int = 0, size: int = 1) -> list[str | None]:
        values = TextLine.get(self, ago, size)
        if ACTIVE:
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
