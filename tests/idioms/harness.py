"""The idiom corpus harness: the agent's own log of its reads, kept without FMEL.

Every corpus agent reads its data through the explicit helpers of :class:`IdiomAgent`
(``self.r(self.dataclose, -1)``, ``self.r_get(...)``, ``self.r_cmp(self.crossover, ">", 0)``...).
Each helper makes the real read (through the same backtrader objects the agent holds, so FMEL
sees it as usual) and logs what the read must be recorded as: field, index, size, value, and for
every source feed the bar it returned (bar index, bar time, data hash) and whether that bar is
in the past of the feed's current bar.

The bar is computed here, independently of FMEL, from the harness's own model:

* its own parse of the CSV rows (stdlib ``csv``), with the data hash of each row computed by
  :func:`core.bars.bar_hash` from those rows;
* a feed's current bar = the number of its rows at or before the step's time, minus one
  (the step's time is the newest time among the started feeds, as backtrader's strategy clock);
* backtrader's buffer semantics as documented in its source: an index before the first bar
  wraps around to the end of the (preloaded) buffer; a window returns Python slice semantics
  (nothing when it would start before the buffer); a line shifted by ``d.close(1)`` holds bar
  ``t + 1`` at ``t`` when computed in one pass (``runonce``), and NaN until bar ``t + 1`` when
  computed bar by bar.

For feed lines the harness also checks the value read equals its own row value at that bar, so a
wrong model fails here, not silently. Indicator reads name their label and source feeds in the
agent (``self.spec(self.sma, "sma", (self.data, 0))``): the label FMEL must record, and the feeds
and bar offsets the value comes from.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import backtrader as bt
from backtrader.linebuffer import LineActions, LineBuffer

from core.bars import bar_hash, field_name
from core.time import bt_num_to_posix
from feeds.fields import TextLine

DATA = Path(__file__).resolve().parents[2] / "data"

# (step time, seq, symbol, field, index, size, bar index, data hash, value, text, lookahead,
#  bar time); value as text so NaN compares equal
Entry = tuple[float, int, str, str, int, int, int, str | None, str | None, str | None, bool, Any]


def value_key(value: Any) -> str | None:
    if value is None:
        return None
    f = float(value)
    return "nan" if math.isnan(f) else repr(f)


# ---------------------------------------------------------------------------------------------
# The harness's own model of a CSV file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeedSpec:
    """One CSV file of a run: path under ``data/``, symbol, date format when not ISO."""

    file: str
    symbol: str
    datetime_format: str | None = None


@dataclass
class HFeed:
    """The rows of one CSV file within the run's dates, parsed here with ``csv``."""

    symbol: str
    times: list[float]  # backtrader day numbers
    numeric: dict[str, list[float]]
    text: dict[str, list[str | None]]
    hashes: list[str]

    def __len__(self) -> int:
        return len(self.times)

    def pos(self, now: float) -> int:
        """The feed's current bar at step time ``now`` (-1: not started)."""
        return bisect.bisect_right(self.times, now) - 1

    def posix(self, i: int) -> float:
        return round(bt_num_to_posix(self.times[i]), 3)


@functools.cache
def load_hfeed(spec: FeedSpec, start: datetime, end: datetime) -> HFeed:
    with open(DATA / spec.file, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    header, body = rows[0], rows[1:]
    names = [field_name(h) if h.strip() else "datetime" for h in header]
    stamps = []
    for r in body:
        raw = r[0].strip()
        if spec.datetime_format:
            ts = datetime.strptime(raw, spec.datetime_format)
        else:
            ts = datetime.fromisoformat(raw)
        stamps.append(ts)
    end_incl = end.replace(hour=23, minute=59, second=59) if end.hour == 0 else end
    keep = [i for i, ts in enumerate(stamps) if start <= ts <= end_incl]
    numeric: dict[str, list[float]] = {}
    text: dict[str, list[str | None]] = {}
    for j, name in enumerate(names[1:], start=1):
        col = [body[i][j].strip() if j < len(body[i]) else "" for i in range(len(body))]

        def num(s: str) -> float | None:
            try:
                return float(s)
            except ValueError:
                return None

        if all(s == "" or num(s) is not None for s in col):
            numeric[name] = [num(col[i]) if col[i] else math.nan for i in keep]  # type: ignore[misc]
        else:
            text[name] = [col[i] or None for i in keep]
    hashes = []
    for k, i in enumerate(keep):
        values: dict[str, Any] = {n: c[k] for n, c in numeric.items() if not math.isnan(c[k])}
        values.update({n: c[k] for n, c in text.items() if c[k] is not None})
        hashes.append(bar_hash(spec.symbol, stamps[i], values))
    return HFeed(
        symbol=spec.symbol,
        times=[bt.date2num(stamps[i]) for i in keep],
        numeric=numeric,
        text=text,
        hashes=hashes,
    )


def at_day_end(feeds: dict[str, HFeed]) -> dict[str, HFeed]:
    """The run's feeds as delivered: a file of dates (every time a midnight) of daily or longer
    bars, in a run with a feed that is not a file of dates (hourly bars, daily bars stamped at
    their close), is seen at the end of each day, 23:59:59.999 UTC (backtrader's CSV feeds
    stamp such bars at ``sessionend``). Bar sizes here are the files' median spacings."""

    def spacing(f: HFeed) -> float:
        gaps = sorted(b - a for a, b in itertools.pairwise(f.times))
        return gaps[len(gaps) // 2] if gaps else math.inf

    def dates(f: HFeed) -> bool:
        return all(t == int(t) for t in f.times) and spacing(f) >= 1

    out = {}
    for symbol, f in feeds.items():
        others = [g for s, g in feeds.items() if s != symbol]
        if dates(f) and not all(dates(g) for g in others):
            end = timedelta(hours=23, minutes=59, seconds=59, milliseconds=999)
            times = [bt.date2num(bt.num2date(t) + end) for t in f.times]
            f = dataclasses.replace(f, times=times)
        out[symbol] = f
    return out


# ---------------------------------------------------------------------------------------------
# The agent's read log
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Src:
    """A source feed of a derived line: the data object, the newest bar offset the value reaches
    (``-1`` for ``d.close(-1)``, ``+1`` for ``d.close(1)``), and whether a forward offset comes
    from a shifted line computed bar by bar (``causal``: NaN until written)."""

    data: Any
    offset: int = 0
    causal: bool = True


@dataclass
class Spec:
    label: str
    sources: tuple[Src, ...]
    equals: str | None = None  # the source field the value equals (shifted lines)
    # the data whose bars the line follows (default: the first source), or "steps" for a line
    # clocked by the strategy (couplers): one position per strategy step
    clock: Any = None


@dataclass
class ReadLog:
    """What the agent read, as the decision records must show it (see the module doc)."""

    feeds: dict[str, HFeed]
    runonce: bool
    entries: list[Entry] = field(default_factory=list)
    values: list[tuple[float, str, Any]] = field(default_factory=list)  # (step, what, value)
    _step: float | None = None
    _seq: int = 0
    specs: dict[int, Spec] = field(default_factory=dict)
    strategy: Any = None
    # bars the agent's derived lines trail its feeds by: 1 inside ``next_open`` (cheat on
    # open: the feeds have the new bar, the indicators are computed after it)
    lag: int = 0

    # -- step and positions (backtrader's own state, never FMEL's) --------------------------

    def _now(self) -> float:
        started = [d.lines.datetime[0] for d in self.strategy.datas if len(d.lines.datetime)]
        now = float(max(started))
        if now != self._step:
            self._step, self._seq = now, 0
        return now

    def _hfeed(self, data: Any) -> HFeed:
        if isinstance(data, str):  # "steps": one per distinct bar time of any feed
            times = sorted({t for hf in self.feeds.values() for t in hf.times})
            return HFeed(symbol="", times=times, numeric={}, text={}, hashes=[])
        return self.feeds[data._name]

    def _add(self, now: float, rows: list[tuple[Any, ...]]) -> None:
        step = round(bt_num_to_posix(now), 3)
        for row in rows:
            self.entries.append((step, self._seq, *row))
        self._seq += 1

    # -- what a read of a feed line returns -------------------------------------------------

    def feed_read(
        self, data: Any, fld: str, ago: int, size: int, got: Any, text: bool, window: bool
    ) -> None:
        now = self._now()
        hf = self._hfeed(data)
        cur = hf.pos(now)
        n = len(hf)
        if size == 0:  # len()
            assert got == cur + 1, (data._name, got, cur)
            row = self._bar_row(hf, "len", 0, 1, cur, cur >= 0, float(cur + 1), None, cur)
            self._add(now, [row])
            return
        if text:
            index = cur + ago
            newest = (got[-1] if got else None) if window else got
            present = 0 <= index < n
            expect = hf.text[fld][index] if present else None
            assert newest == expect, (fld, index, newest, expect)
            # nothing returned before the first bar: no bar (the schema's negative bar_index)
            bar = index if newest is not None or index >= 0 else -1
            row = self._bar_row(hf, fld, ago, size, bar, present, None, newest, cur)
            self._add(now, [row])
            return
        column = hf.numeric[fld]
        if not window:
            q = cur + ago
            if q < 0:  # backtrader's buffer: a negative position wraps to the end
                q += n
            assert 0 <= q < n
            _same(got, column[q], (data._name, fld, ago, q))
            row = self._bar_row(hf, fld, ago, 1, q, True, got, None, cur)
        else:
            end = cur + ago + 1
            span = list(range(n))[end - size : end]
            assert [*got] == [column[i] for i in span] or _nan_eq(got, span, column), (
                fld,
                ago,
                size,
                list(got),
            )
            if span:
                row = self._bar_row(hf, fld, ago, size, span[-1], True, got[-1], None, cur)
            else:  # returned nothing: no bar (the schema's negative bar_index)
                row = self._bar_row(hf, fld, ago, size, -1, False, None, None, cur)
        self._add(now, [row])

    def _bar_row(
        self,
        hf: HFeed,
        fld: str,
        ago: int,
        size: int,
        bar: int,
        got: bool,
        value: Any,
        text: str | None,
        cur: int,
    ) -> tuple[Any, ...]:
        got = got and 0 <= bar < len(hf)
        return (
            hf.symbol,
            fld,
            ago,
            size,
            bar,
            hf.hashes[bar] if got else None,
            value_key(value),
            text,
            bool(got and bar > cur),
            hf.posix(bar) if got else None,
        )

    # -- what a read of an indicator / lines operation returns -----------------------------

    def derived_read(
        self, obj: Any, spec: Spec, ago: int, size: int, got: Any, window: bool
    ) -> None:
        now = self._now()
        clock = self._hfeed(spec.clock if spec.clock is not None else spec.sources[0].data)
        cpos = clock.pos(now)
        if size == 0:
            n = cpos - self.lag
            row = self._bar_row(clock, "len", 0, 1, n, n >= 0, float(n + 1), None, cpos)
            self._add(now, [row])
            return
        q = cpos + ago - self.lag
        # the line's own buffer: the whole run when computed in one pass, else what was computed
        buffer = len(clock) if self.runonce else cpos + 1 - self.lag
        if not window and q < 0:  # wraps within the line's own buffer
            q += buffer
        elif window:  # a window returns Python slice semantics on the buffer
            span = range(buffer)[q + 1 - size : q + 1]
            if span:
                q = span[-1]
        value = (got[-1] if len(got) else None) if window else got
        rows = []
        for src in spec.sources:
            hf = self._hfeed(src.data)
            fcur = hf.pos(now)
            if self.runonce or (hf is clock and not isinstance(spec.clock, str)):
                bar = q + src.offset
            elif not 0 <= q < len(clock):  # no such bar of the line: the source's current one
                bar = fcur + src.offset
            else:  # computed bar by bar: the source's bar at the time of the line's bar q
                base = hf.pos(clock.times[q])
                if base < 0:  # not started then: index -1 of its buffer, its last bar
                    base = len(hf) - 1
                bar = base + src.offset
            if window and value is None:  # returned nothing: no bar (negative bar_index)
                bar = -1
            ok = value is not None and 0 <= bar < len(hf)
            if src.causal and src.offset > 0 and not self.runonce and bar > fcur:
                ok = False  # not written yet (NaN)
            if ok and spec.equals is not None and src is spec.sources[0]:
                _same(value, hf.numeric[spec.equals][bar], (spec.label, bar))
            row = self._bar_row(hf, spec.label, ago, size, bar, ok, value, None, fcur)
            if src.offset > 0 and bar >= len(hf) and isinstance(value, float) and value == value:
                # past the last bar a forward-shifted line wraps around to the first bar: a
                # value from the future, flagged (with no bar to point at)
                row = (*row[:8], True, *row[9:])
            rows.append(row)
        self._add(now, rows)


def _same(a: Any, b: Any, what: Any) -> None:
    fa, fb = float(a), float(b)
    assert fa == fb or (math.isnan(fa) and math.isnan(fb)), (what, a, b)


def _nan_eq(got: Iterable[float], window: list[int], column: list[float]) -> bool:
    vals = list(got)
    return len(vals) == len(window) and all(
        (math.isnan(a) and math.isnan(column[i])) or a == column[i]
        for a, i in zip(vals, window, strict=True)
    )


# ---------------------------------------------------------------------------------------------
# The agents' base class
# ---------------------------------------------------------------------------------------------

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
}


class IdiomAgent(bt.Strategy):  # type: ignore[misc]
    """Base of the corpus agents: read helpers that log every read in :class:`ReadLog`."""

    params: ClassVar[Any] = (("reads", None),)

    # -- declaring derived lines -----------------------------------------------------------

    def spec(
        self, obj: Any, label: str, *sources: Any, equals: str | None = None, clock: Any = None
    ) -> Any:
        """Declare how reads of ``obj`` are recorded: ``label`` and its source feeds, each a
        data (offset 0) or ``(data, offset)`` or ``(data, offset, causal)``; ``clock``: the
        data whose bars the line follows (default: the first source)."""
        srcs = []
        for s in sources or (self.data,):
            if isinstance(s, tuple):
                srcs.append(Src(*s))
            else:
                srcs.append(Src(s))
        log: ReadLog | None = self.p.reads
        if log is not None:
            log.specs[id(obj)] = Spec(label, tuple(srcs), equals, clock)
        return obj

    # -- reads -----------------------------------------------------------------------------

    def _log(self) -> ReadLog | None:
        log: ReadLog | None = self.p.reads
        if log is not None and log.strategy is None:
            log.strategy = self
        return log

    def _route(self, obj: Any, ago: int, size: int, got: Any, window: bool = False) -> None:
        log = self._log()
        if log is None:
            return
        if isinstance(obj, TextLine):
            log.feed_read(obj.feed, obj.name, ago, size, got, text=True, window=window)
            return
        if isinstance(obj, bt.AbstractDataBase):
            obj = obj.lines[0]
        owner = getattr(obj, "_owner", None)
        if (
            isinstance(obj, LineBuffer)
            and not isinstance(obj, LineActions)
            and isinstance(owner, bt.AbstractDataBase)
        ):
            lines = owner.lines
            i = next(k for k in range(lines.size()) if lines[k] is obj)
            alias = lines._getlinealias(i)
            log.feed_read(owner, alias, ago, size, got, text=False, window=window)
            return
        spec = log.specs.get(id(obj))
        if spec is None and not isinstance(obj, LineBuffer):
            spec = log.specs.get(id(obj.lines[0]))
        if spec is None:
            raise AssertionError(f"corpus agent read {obj!r} without declaring it with spec()")
        log.derived_read(obj, spec, ago, size, got, window)

    def r(self, obj: Any, ago: int = 0) -> Any:
        """``obj[ago]`` (a line, a data feed, an indicator, a text field)."""
        value = obj[ago]
        self._route(obj, ago, 1, value)
        return value

    def r_get(self, obj: Any, ago: int = 0, size: int = 1) -> Any:
        """``obj.get(ago=ago, size=size)``."""
        values = obj.get(ago=ago, size=size)
        self._route(obj, ago, size, values, window=True)
        return values

    def r_len(self, obj: Any) -> int:
        """``len(obj)``."""
        n = len(obj)
        self._route(obj, 0, 0, n)
        return n

    def r_cmp(self, obj: Any, op: str, other: Any) -> bool:
        """``obj <op> other`` with lines, as backtrader evaluates it in ``next``: ``other[0]``
        is read first (when it is a line), then ``obj[0]``."""
        result = bool(_OPS[op](obj, other))
        log = self._log()
        if log is not None:
            from backtrader.lineroot import LineRoot

            if isinstance(other, LineRoot):
                self._route(other, 0, 1, _peek(other))
            self._route(obj, 0, 1, _peek(obj))
        return result

    def r_bool(self, obj: Any) -> bool:
        """``bool(obj)`` (``if self.signal:``)."""
        result = bool(obj)
        self._route(obj, 0, 1, _peek(obj))
        return result


def _peek(obj: Any) -> Any:
    """The value ``obj[0]`` returns, read without going through the tracked line (so it is
    not recorded a second time): straight from the buffer."""
    line = obj if isinstance(obj, LineBuffer) else obj.lines[0]
    return line.array[line._idx]
