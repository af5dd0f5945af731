"""The backtrader side of the field model: text fields read like lines, and feed classes with
dynamic lines. Names, checks and the data hash live in :mod:`core.bars`.
"""

from __future__ import annotations

from collections import deque
from typing import Any


class TextLine:
    """A text field of a feed (headline, rating), read like a line: ``data.headline[0]``.

    Backtrader lines hold floats; text lives here, aligned with the owning feed's bars by absolute
    bar index. ``[ago]`` follows backtrader's convention (0 = current bar, -1 = previous); a
    missing value reads as ``None``. Reads are tracked by FMEL like number reads when a tracker
    is attached (see :mod:`analyzers.tracking`).

    Args:
        feed: the owning data feed (its ``len()`` is the current bar count).
        name: the field name.
        maxlen: keep only this many values (live feeds); ``None`` = all.
    """

    __slots__ = ("_base", "_fmel", "_fmel_tag", "_values", "feed", "name")

    def __init__(self, feed: Any, name: str, maxlen: int | None = None) -> None:
        self.feed = feed
        self.name = name
        self._values: deque[str | None] | list[str | None] = deque(maxlen=maxlen) if maxlen else []
        self._base = 0
        self._fmel: Any = None

    def append(self, value: str | None) -> None:
        values = self._values
        if isinstance(values, deque) and values.maxlen is not None and len(values) == values.maxlen:
            self._base += 1
        values.append(value)

    def value_at(self, index: int) -> str | None:
        i = index - self._base
        if 0 <= i < len(self._values):
            return self._values[i]
        return None

    def __getitem__(self, ago: int) -> str | None:
        # the datetime line's count is the feed's bar count (and is never tracked itself)
        index = self.feed.lines.datetime.lencount - 1 + ago
        value = self.value_at(index)
        tracker = self._fmel
        if tracker is not None:  # set by FMEL's tracker, which ignores reads made outside the agent
            tracker.on_text_read(self, ago, index, value)
        return value

    def get(self, ago: int = 0, size: int = 1) -> list[str | None]:
        end = self.feed.lines.datetime.lencount - 1 + ago
        return [self.value_at(i) for i in range(end - size + 1, end + 1)]

    def __len__(self) -> int:
        return len(self.feed)


_FEED_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def dynamic_feed_class(base: type, extra_fields: tuple[str, ...]) -> type:
    """A subclass of the feed class ``base`` whose ``lines`` add ``extra_fields`` (numeric
    dynamic fields). Cached per (base, fields), so many symbols with the same fields share one
    class. Both the CSV and the Pub/Sub feed build their classes here."""
    key = (base, extra_fields)
    cls = _FEED_CLASSES.get(key)
    if cls is None:
        name = (
            f"{base.__name__}_{'_'.join(extra_fields)}" if extra_fields else f"{base.__name__}OHLCV"
        )
        cls = type(name, (base,), {"lines": extra_fields, "__module__": base.__module__})
        _FEED_CLASSES[key] = cls
    return cls
