"""The graph of the agent's line objects: the lines each indicator owns and the feeds it reads."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import backtrader as bt
from backtrader.linebuffer import LineActions, LineBuffer, _LineDelay, _LineForward
from backtrader.lineiterator import LineIterator, SingleCoupler
from backtrader.lineroot import LineRoot
from backtrader.lineseries import LineSeriesStub

logger = logging.getLogger(__name__)

_IND = LineIterator.IndType


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
