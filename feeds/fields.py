"""The backtrader side of the field model: text fields read like lines, and feed classes with
dynamic lines. Names, checks and the data hash live in :mod:`core.bars`.
"""

from __future__ import annotations

import copyreg
import inspect
import re
import sys
from collections import deque
from functools import cache
from typing import Any

import backtrader as bt

from core.bars import RESERVED_NAMES
from core.errors import ConfigError

_LINE_N = re.compile(r"^line_?\d+$")  # backtrader's positional line aliases (line0, line_0)
_ASSIGNED = re.compile(r"\b(?:self|_obj|obj)\.([A-Za-z]\w*)\s*=(?!=)")


@cache
def attribute_names(cls: type) -> frozenset[str]:
    """Every public attribute name an instance of the feed class ``cls`` has or may get: the
    names of ``cls``, of its ``lines`` class and of their bases (``forward``, ``home``,
    ``start``, ``islive``, ``buflen``, ...), and the names their modules' source assigns to an
    instance (``self.x = ...``, e.g. ``sessionstart``, ``notifs``, ``l``).

    Derived from backtrader itself at import, so a backtrader upgrade that adds a method also
    reserves its name. A field of one of these names would shadow the attribute (or be shadowed
    by it): ``data.<name>[0]`` would not be the column's value.
    """
    classes: list[type] = list(cls.__mro__)
    lines = getattr(cls, "lines", None)
    if isinstance(lines, type):
        classes += [*inspect.getmro(lines), *inspect.getmro(type(lines))]
    names: set[str] = set()
    modules = set()
    for c in classes:
        names.update(n for n in dir(c) if not n.startswith("_"))
        module = sys.modules.get(c.__module__)
        if module is not None and c.__module__ not in ("builtins", "abc"):
            modules.add(module)
    for module in modules:
        try:
            names.update(_ASSIGNED.findall(inspect.getsource(module)))
        except (OSError, TypeError):  # no source (frozen): dir() above still applies
            continue
    return frozenset(names)


BACKTRADER_NAMES = attribute_names(bt.feed.DataBase)
"""Attribute names of every backtrader feed (see :func:`attribute_names`)."""


def reserved_reason(name: str, feed_cls: type | None = None) -> str | None:
    """Why a field may not be called ``name`` (a normalised field name, not OHLCV), or
    ``None`` when it may.

    Reserved: :data:`core.bars.RESERVED_NAMES`, every attribute of backtrader's feeds
    (:data:`BACKTRADER_NAMES`) and of ``feed_cls``, names starting with ``_``, and ``tick_*``
    (backtrader sets ``tick_<line>`` on the feed for every line), ``line<N>``/``line_<N>``.
    """
    if name.startswith("_"):
        return "names starting with _ are private in Python"
    if name.startswith("tick_"):
        return "backtrader sets tick_<field> attributes on the feed"
    if _LINE_N.match(name):
        return "backtrader names every line line<N> and line_<N> too"
    if name in RESERVED_NAMES or name in BACKTRADER_NAMES:
        return "a name backtrader's feed or this runtime uses"
    if feed_cls is not None and name in attribute_names(feed_cls):
        return f"an attribute of {feed_cls.__name__}"
    return None


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


def refuse_aggregated_fields(
    feed: Any, symbol: str, numeric: tuple[str, ...], text: tuple[str, ...]
) -> None:
    """Refuse fields a backtrader filter of ``feed`` would make wrong. Its ``Resampler`` and
    ``Replayer`` (``cerebro.resampledata`` / ``replaydata``) build each bar from OHLCV and
    open interest only (``backtrader.dataseries._Bar``): an extra line read NaN or a stale
    value of another underlying bar (helper-116 F4: a weekly replay's ``rsi`` was the week's
    first day's). Text fields are kept by bar count, one value per row read, so a filter
    that adds or drops bars (``CalendarDays``, a filter that skips Mondays, the resamplers)
    shifts every later text onto another bar (helper-118: ``regime == 'up'`` read four weeks
    before the file says so, not flagged as look-ahead). Whether a filter does cannot be
    known from outside it, so text fields are refused under any filter but those known to
    keep every bar (:data:`_BAR_KEEPING`: backtrader's ``HeikinAshi``; helper-120).

    Raises:
        ConfigError: naming the symbol, the fields and what to do instead. Called at the
            feed's ``start()`` (main thread), before the first bar.
    """
    filters = [f for f, *_ in getattr(feed, "_filters", ()) if not isinstance(f, _BAR_KEEPING)]
    if not filters:
        return
    aggregating = [f for f in filters if isinstance(f, _AGGREGATING)]
    wrong = (*numeric, *text) if aggregating else text
    if not wrong:
        return
    what = type((aggregating or filters)[0])
    name = getattr(what, "__name__", str(what))
    raise ConfigError(
        f"{symbol}: the backtrader filter {name} with the extra fields {', '.join(wrong)}: "
        + (
            "backtrader builds resampled and replayed bars from OHLCV and open interest only, "
            "so those fields would read NaN, a stale value or another bar's text"
            if aggregating
            else "text fields are kept one value per row read, so a filter that adds or drops "
            "bars would put each text on another bar (a filter is taken to, but HeikinAshi)"
        )
        + ". Resample or filter the file before loading it (pandas DataFrame.resample with the "
        "rule each field needs: last, mean, sum), or load the bars without those fields"
    )


_AGGREGATING = (bt.resamplerfilter.Resampler, bt.resamplerfilter.Replayer)
# backtrader filters that change a bar's prices in place, never adding or dropping one
_BAR_KEEPING = (bt.filters.HeikinAshi,)


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
        _BUILT[cls] = key
        copyreg.pickle(type(cls), _reduce_feed_class)
    return cls


_BUILT: dict[type, tuple[type, tuple[str, ...]]] = {}


def _reduce_feed_class(cls: type) -> str | tuple[Any, ...]:
    """Pickle a class built by :func:`dynamic_feed_class` as the call that builds it: it is
    not an attribute of its module, where pickle looks classes up. Needed where backtrader
    pickles feeds: ``cerebro.optstrategy`` with ``maxcpus`` > 1 sends the Cerebro to worker
    processes. Registered with ``copyreg`` for the classes' metaclass (backtrader's
    ``MetaAbstractDataBase``): any other class of that metaclass is pickled by name, as
    pickle does without a reducer (a reducer returning a string: Python docs, ``pickle``,
    "Pickling Class Instances", ``__reduce__``)."""
    key = _BUILT.get(cls)
    if key is None:
        return cls.__qualname__
    return dynamic_feed_class, key
