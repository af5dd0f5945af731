"""Property test of FMEL: generated agents on generated data record exactly what they read.

Hypothesis draws the data (1-3 feeds of valid daily OHLCV bars with an extra numeric field that
has gaps and a text field, each feed starting on its own date) and the agent: indicator
compositions (SMA, delays ``x(-k)``, forward shifts ``x(k)``, ``a - b``, ``a > b``, ``bt.Max``,
across feeds in next-bar mode), kept where agents keep them (attributes, ``_private``, nested
dicts, lists of tuples, a helper object, a dict keyed by the data feed), reads of every kind in
``prenext`` and ``next`` (index, window, ``len``, text, comparisons) and order calls (``buy``,
``sell``, ``close``, ``order_target_percent``).

Properties, as for the idiom corpus: the same orders and final value with and without FMEL, and
the recorded reads equal the agent's own log of its reads (kept by the harness of
:mod:`tests.idioms.harness`, independently of FMEL), read by read. The expected label, source
feeds and bar offsets of each indicator come from the generator's own model of the expression
(not from backtrader's objects).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import backtrader as bt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.idioms.harness import FeedSpec, IdiomAgent
from tests.idioms.runs import Case, run_case

FIELDS = ("open", "high", "low", "close", "volume", "signal")
TEXT = ("up", "down", "flat", "news: beat", "ünï")

# ---------------------------------------------------------------------------------------------
# Expressions and their model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    feed: int
    field: str


@dataclass(frozen=True)
class Node:
    kind: str  # sma, shift, sub, gt, max
    args: tuple[Any, ...]
    n: int = 0  # period of sma, bars of shift (negative: delay, positive: forward)


def clock(e: Any) -> int:
    """The feed whose bars the built line follows: its first operand's, except that Python
    evaluates the comparison ``line > op`` as ``op.__lt__(line)`` when ``op``'s class is a
    subclass of the plain line's (every lines operation and shifted line is): backtrader then
    clocks the operation by ``op``. (Arithmetic reflects only when the subclass overrides the
    reflected method, which backtrader's do not: ``line - op`` is clocked by ``line``.)"""
    if isinstance(e, Leaf):
        return e.feed
    left, right = e.args[0], e.args[-1]
    reflected = isinstance(left, Leaf) and isinstance(right, Node) and right.kind != "sma"
    if e.kind == "gt" and reflected:
        return clock(right)
    return clock(e.args[0])


def reach(e: Any) -> dict[int, int]:
    """The newest bar offset of each source feed (the generator's model)."""
    if isinstance(e, Leaf):
        return {e.feed: 0}
    if e.kind == "sma":
        return reach(e.args[0])
    if e.kind == "shift":
        return {k: off + e.n for k, off in reach(e.args[0]).items()}
    out: dict[int, int] = {}
    for arg in e.args:
        for k, off in reach(arg).items():
            out[k] = max(out.get(k, off), off)
    return out


def build(e: Any, datas: list[Any]) -> Any:
    if isinstance(e, Leaf):
        return getattr(datas[e.feed], e.field)
    args = [build(a, datas) for a in e.args]
    if e.kind == "sma":
        return bt.ind.SMA(args[0], period=e.n)
    if e.kind == "shift":
        return args[0](e.n)
    if e.kind == "sub":
        return args[0] - args[1]
    if e.kind == "gt":
        return args[0] > args[1]
    return bt.Max(args[0], args[1])


def expressions(feeds: list[int], depth: int = 3) -> st.SearchStrategy[Any]:
    leaf = st.builds(Leaf, st.sampled_from(feeds), st.sampled_from(FIELDS))

    def extend(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(
            st.builds(lambda x, p: Node("sma", (x,), p), inner, st.integers(1, 4)),
            st.builds(
                lambda x, k: Node("shift", (x,), k),
                inner,
                st.integers(-3, 2).filter(lambda k: k != 0),
            ),
            st.builds(
                lambda a, b, k: Node(k, (a, b)), inner, inner, st.sampled_from(["sub", "gt", "max"])
            ),
        )

    return st.recursive(leaf, extend, max_leaves=4).filter(lambda e: not isinstance(e, Leaf))


# ---------------------------------------------------------------------------------------------
# The generated agent
# ---------------------------------------------------------------------------------------------

HOLDERS = ("attr", "private", "dict", "nested", "list", "helper", "bydata")


class Helper:
    """A helper object the agent keeps indicators in."""


# the generated agent's own index of its indicators, kept outside the agent so that the label
# scan finds each indicator where the plan put it (not in this list)
_INDEX: dict[int, list[Any]] = {}


@dataclass(frozen=True)
class Plan:
    exprs: tuple[Any, ...]
    holders: tuple[str, ...]
    reads: tuple[tuple[Any, ...], ...]
    orders: tuple[tuple[Any, ...], ...]


class Generated(IdiomAgent):
    params: ClassVar[Any] = (("plan", None),)

    def __init__(self) -> None:
        plan: Plan = self.p.plan
        self.box: dict[str, Any] = {}
        self.nest: dict[str, dict[str, Any]] = {"a": {}}
        self.pairs: list[tuple[Any, ...]] = []
        self.helper = Helper()
        self.by: dict[int, dict[Any, Any]] = {}
        _INDEX.clear()  # one agent at a time
        inds = _INDEX[id(self)] = []
        for i, (expr, holder) in enumerate(zip(plan.exprs, plan.holders, strict=True)):
            obj = build(expr, self.datas)
            data = self.datas[clock(expr)]
            if holder == "attr":
                setattr(self, f"ind{i}", obj)
                label = f"ind{i}"
            elif holder == "private":
                setattr(self, f"_p{i}", obj)
                label = f"_p{i}"
            elif holder == "dict":
                self.box[f"k{i}"] = obj
                label = f"box[k{i}]"
            elif holder == "nested":
                self.nest["a"][f"b{i}"] = obj
                label = f"nest[a][b{i}]"
            elif holder == "list":
                self.pairs.append((obj,))
                label = f"pairs[{len(self.pairs) - 1}][0]"
            elif holder == "helper":
                setattr(self.helper, f"h{i}", obj)
                label = f"helper.h{i}"
            else:  # keyed by the data feed: recorded under its symbol, without the key
                self.by[i] = {data: obj}
                label = f"by[{i}]"
            sources = [(self.datas[k], off) for k, off in sorted(reach(expr).items())]
            self.spec(obj, label, *sources, clock=data)
            inds.append(obj)

    def _read(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        inds = _INDEX[id(self)]
        try:
            if kind == "feed":
                _, k, fld, ago = op
                self.r(getattr(self.datas[k], fld), ago)
            elif kind == "item":
                self.r(self.datas[op[1]], op[2])
            elif kind == "get":
                _, k, fld, ago, size = op
                self.r_get(getattr(self.datas[k], fld), ago, size)
            elif kind == "len":
                self.r_len(self.datas[op[1]])
            elif kind == "text":
                self.r(self.datas[op[1]].note, op[2])
            elif kind == "textget":
                self.r_get(self.datas[op[1]].note, op[2], op[3])
            elif kind == "ind":
                self.r(inds[op[1]], op[2])
            elif kind == "indget":
                self.r_get(inds[op[1]], op[2], op[3])
            elif kind == "indlen":
                self.r_len(inds[op[1]])
            elif kind == "cmp":
                self.r_cmp(inds[op[1]], ">", 0.0)
            elif kind == "bool":
                self.r_bool(inds[op[1]])
        except IndexError:
            pass  # beyond the buffer: backtrader raises, nothing was read

    def prenext(self) -> None:
        for op in self.p.plan.reads:
            self._read(op)

    def next(self) -> None:
        for op in self.p.plan.reads:
            self._read(op)
        for every, action, k, amount in self.p.plan.orders:
            if len(self) % every:
                continue
            d = self.datas[k]
            if action == "buy":
                self.buy(data=d, size=amount)
            elif action == "sell":
                self.sell(data=d, size=amount)
            elif action == "close":
                self.close(data=d)
            else:
                self.order_target_percent(data=d, target=amount / 10.0)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@st.composite
def feed_rows(draw: st.DrawFn) -> list[tuple[float, ...] | str | None]:
    n = draw(st.integers(8, 30))
    price = draw(st.floats(5.0, 500.0))
    rows: list[Any] = []
    for _ in range(n):
        change = draw(st.floats(-0.08, 0.08))
        close = round(max(0.5, price * (1 + change)), 4)
        open_ = round(price, 4)
        high = round(max(open_, close) * (1 + draw(st.floats(0.0, 0.03))), 4)
        low = round(min(open_, close) * (1 - draw(st.floats(0.0, 0.03))), 4)
        volume = draw(st.integers(0, 10**7))
        signal = draw(st.one_of(st.none(), st.floats(-5.0, 5.0).map(lambda x: round(x, 3))))
        note = draw(st.one_of(st.none(), st.sampled_from(TEXT)))
        rows.append((open_, high, low, close, volume, signal, note))
        price = close
    rows[0] = (*rows[0][:5], 1.0, "up")  # each extra column holds a value of its kind
    return rows


def write_csv(folder: Path, symbol: str, start: datetime, rows: list[Any]) -> str:
    path = folder / f"{symbol}-{uuid.uuid4().hex[:8]}.csv"
    lines = ["Date,Open,High,Low,Close,Volume,signal,note"]
    for i, (o, h, lo, c, v, s, note) in enumerate(rows):
        day = (start + timedelta(days=i)).date().isoformat()
        sig = "" if s is None else repr(s)
        text = "" if note is None else f'"{note}"'
        lines.append(f"{day},{o!r},{h!r},{lo!r},{c!r},{v},{sig},{text}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[tuple[int, list[Any]]], Plan, bool]:
    runonce = draw(st.booleans())
    n_feeds = draw(st.integers(1, 3))
    feeds = [(draw(st.integers(0, 6)), draw(feed_rows())) for _ in range(n_feeds)]
    ks = list(range(n_feeds))
    # one pass (runonce): backtrader computes lines operations across feeds index by index, and
    # fails when the feeds' lengths differ: keep each expression on one feed there
    if runonce:
        home = draw(st.sampled_from(ks))
        exprs = draw(st.lists(expressions([home]), min_size=1, max_size=3))
    else:
        exprs = draw(st.lists(expressions(ks), min_size=1, max_size=3))
    holders = draw(st.lists(st.sampled_from(HOLDERS), min_size=len(exprs), max_size=len(exprs)))
    ago = st.integers(-4, 2)
    idx = st.integers(0, len(exprs) - 1)
    read = st.one_of(
        st.tuples(st.just("feed"), st.sampled_from(ks), st.sampled_from(FIELDS), ago),
        st.tuples(st.just("item"), st.sampled_from(ks), ago),
        st.tuples(
            st.just("get"), st.sampled_from(ks), st.sampled_from(FIELDS), ago, st.integers(1, 4)
        ),
        st.tuples(st.just("len"), st.sampled_from(ks)),
        st.tuples(st.just("text"), st.sampled_from(ks), ago),
        st.tuples(st.just("textget"), st.sampled_from(ks), ago, st.integers(1, 3)),
        st.tuples(st.just("ind"), idx, ago),
        st.tuples(st.just("indget"), idx, ago, st.integers(1, 3)),
        st.tuples(st.just("indlen"), idx),
        st.tuples(st.just("cmp"), idx),
        st.tuples(st.just("bool"), idx),
    )
    reads = draw(st.lists(read, min_size=1, max_size=6))
    order = st.tuples(
        st.integers(2, 6),
        st.sampled_from(["buy", "sell", "close", "target"]),
        st.sampled_from(ks),
        st.integers(1, 5),
    )
    orders = draw(st.lists(order, max_size=3))
    plan = Plan(tuple(exprs), tuple(holders), tuple(reads), tuple(orders))
    return feeds, plan, runonce


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenarios())
def test_generated_agents_record_exactly_what_they_read(
    tmp_path_factory: pytest.TempPathFactory,
    scenario: tuple[list[tuple[int, list[Any]]], Plan, bool],
) -> None:
    feeds, plan, runonce = scenario
    folder = tmp_path_factory.mktemp("prop")
    base = datetime(2021, 1, 4)
    specs = []
    for k, (offset, rows) in enumerate(feeds):
        symbol = f"S{k}"
        specs.append(
            FeedSpec(write_csv(folder, symbol, base + timedelta(days=offset), rows), symbol)
        )
    case = Case(
        Generated,
        feeds=tuple(specs),
        start=base,
        end=base + timedelta(days=60),
        runonce=runonce,
        params=(("plan", plan),),
    )
    try:
        plain = run_case(case, fmel=False)
    except (IndexError, ZeroDivisionError, ValueError) as error:
        # plain backtrader cannot run this agent (e.g. an indicator over too short a feed):
        # nothing to compare, but FMEL must fail the same way
        failure: type[Exception] | None = type(error)
    else:
        failure = None
    if failure is not None:
        with pytest.raises(failure):
            run_case(case, fmel=True)
        return
    tracked = run_case(case, fmel=True)
    assert tracked.events == plain.events
    assert tracked.value == plain.value or (math.isnan(tracked.value) and math.isnan(plain.value))
    assert tracked.expected == plain.expected
    for i, (want, got) in enumerate(zip(tracked.expected, tracked.recorded, strict=False)):
        assert got == want, f"read {i} differs:\n  want {want}\n  got  {got}"
    assert len(tracked.recorded) == len(tracked.expected)
    steps: dict[float, set[int]] = {}
    flagged: dict[float, set[int]] = {}
    for e in tracked.expected:
        steps.setdefault(e[0], set()).add(e[1])
        if e[10]:
            flagged.setdefault(e[0], set()).add(e[1])
    assert {r.bar_time: r.reads for r in tracked.records if r.reads} == {
        t: len(s) for t, s in steps.items()
    }
    assert {r.bar_time: r.lookahead_reads for r in tracked.records if r.lookahead_reads} == {
        t: len(s) for t, s in flagged.items()
    }
