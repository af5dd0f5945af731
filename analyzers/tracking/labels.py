"""Stable, readable labels for the line objects an agent holds, wherever it keeps them."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import sysconfig
from collections import deque
from collections.abc import Mapping
from enum import Enum
from typing import Any

import backtrader as bt
from backtrader.linebuffer import LineActions, LineBuffer
from backtrader.lineiterator import LineIterator
from backtrader.lineroot import LineRoot
from backtrader.lineseries import LineSeriesStub

from core.bars import feed_symbol

logger = logging.getLogger(__name__)


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


def _key_label(key: Any, feeds: Mapping[int, str] | None = None) -> str:
    """A stable, readable label for a container key (a feed is what it is recorded as:
    ``feeds[id(feed)]``, else its symbol)."""
    if isinstance(key, bt.AbstractDataBase):
        label = feeds.get(id(key)) if feeds is not None else None
        return label or feed_symbol(key)
    if isinstance(key, str):
        return key
    if isinstance(key, Enum):
        return key.name
    if isinstance(key, bool | int | float) or key is None:
        return repr(key)
    if isinstance(key, tuple):
        return ",".join(_key_label(k, feeds) for k in key)
    try:
        text = repr(key)
    except Exception:  # noqa: BLE001 (an agent's own key class: its repr may fail)
        return type(key).__name__
    if " at 0x" in text or type(key).__repr__ is object.__repr__:  # type: ignore[comparison-overlap]
        return type(key).__name__
    return text


def scan_labels(
    strategy: Any, feeds: Mapping[int, str] | None = None
) -> tuple[dict[int, str], list[tuple[str, int]], str]:
    """Where the agent keeps its line objects: ``{id(obj): label}`` for indicators, lines
    operations and indicator lines found in its attributes (any name, ``_private`` included),
    in nested containers (``sma[GOOG][fast]``, ``pairs[0][1]``) and in helper objects
    (``helper.sma``), breadth first, attributes in name order (the shortest path wins). A
    container key that is a feed is labelled ``feeds[id(feed)]`` (what the feed is recorded
    as), else its symbol.

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
                queue.append((f"{path}[{_key_label(key, feeds)}]", value, depth + 1))
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
