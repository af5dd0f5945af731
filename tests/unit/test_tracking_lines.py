"""Tracking of every line object, look-ahead, strict mode, gaps and storage of what is new.

The idiom corpus (``test_idiom_corpus.py``) and the property test (``test_fmel_properties.py``)
check recorded reads against the agent's own log; these tests pin the parts they do not reach:
strict mode, what cannot be tracked, lines created after start, classes given back, the stored
columns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import backtrader as bt
import duckdb
import pytest

from analyzers.fmel import FMELAnalyzer
from analyzers.schema import DECISION_SCHEMA, row_json, to_row
from analyzers.sinks.duckdb import LocalDuckDBSink
from core.errors import LookAheadError
from feeds.csv import CSVFeedConfig, make_csv_feed
from runtime.report import RunReport
from tests.idioms.harness import DATA

START, END = datetime(2004, 8, 2), datetime(2004, 10, 29)


def feed(name: str) -> Any:
    files = {
        "SP500": ("SP500.csv", "%m/%d/%Y"),
        "NASDAQ": ("NASDAQ.csv", "%m/%d/%Y"),
        "GOOG": ("enriched/GOOG.csv", None),
    }
    file, fmt = files[name]
    cfg = CSVFeedConfig(path=DATA / file, symbol=name, datetime_format=fmt, start=START, end=END)
    return make_csv_feed(cfg)


def run(agent: type, *names: str, runonce: bool = True, **fmel: Any) -> tuple[Any, list[Any]]:
    cerebro = bt.Cerebro(stdstats=False, runonce=runonce)
    for name in names or ("SP500",):
        cerebro.adddata(feed(name), name=name)
    cerebro.addstrategy(agent)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", **fmel)
    strategy = cerebro.run()[0]
    return strategy, strategy.analyzers.fmel.records


def reads(records: list[Any]) -> list[tuple[str, str, int, int, bool]]:
    return [
        (d.symbol, a.field, a.index, a.bar_index, a.lookahead)
        for r in records
        for d in r.data_accessed
        for a in d.access_patterns
    ]


# -- strict look-ahead ------------------------------------------------------------------------


class FirstBarPeek(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        self.data.close[-1]  # on the first bar: the last bar of the file


class UnstartedPeek(bt.Strategy):  # type: ignore[misc]
    def prenext(self) -> None:
        self.data1.close[0]  # GOOG starts on 2004-08-19: its last bar


class ForwardPeek(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.fwd = bt.ind.SMA(self.data.close(1), period=1)

    def next(self) -> None:
        self.fwd[0]


@pytest.mark.parametrize(
    ("agent", "names", "message"),
    [
        (FirstBarPeek, ("SP500",), r"SP500\.close\[-1\]: index -1 is before the first bar"),
        (UnstartedPeek, ("SP500", "GOOG"), r"GOOG\.close\[0\]: GOOG has not started yet"),
        (ForwardPeek, ("SP500",), r"SP500\.fwd\[0\]: a line shifted 1 bar\(s\) forward"),
    ],
)
def test_strict_mode_raises_at_the_read_that_looks_ahead(
    agent: type, names: tuple[str, ...], message: str
) -> None:
    with pytest.raises(LookAheadError, match=message):
        run(agent, *names, strict_lookahead=True)


def test_without_strict_mode_the_same_reads_are_flagged_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="analyzers.tracking"):
        strategy, records = run(FirstBarPeek)
    first = reads(records[:1])
    assert first == [("SP500", "close", -1, len(strategy.data.close.array) - 1, True)]
    assert [r.lookahead_reads for r in records[:2]] == [1, 0]
    assert strategy.analyzers.fmel.lookahead_total == 1
    assert caplog.text.count("look-ahead: agent read SP500.close[-1]") == 1


# -- what cannot be tracked is said ---------------------------------------------------------


class RawBuffer(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.closes = self.data.close.array  # a raw buffer: reads through it are invisible

    def next(self) -> None:
        pass


class OnceIndicator(bt.Indicator):  # type: ignore[misc]
    lines: Any = ("x",)

    def once(self, start: int, end: int) -> None:
        src, dst = self.data.close.array, self.lines.x.array
        for i in range(start, end):
            dst[i] = src[i]


class WithOnce(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.ind = OnceIndicator(self.data)


def test_gaps_are_logged_and_stored_in_the_run_metadata(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="analyzers.tracking"):
        _, records = run(RawBuffer)
        _, once_records = run(WithOnce)
    gaps = json.loads(records[0].run.tracking_gaps)
    assert any("self.closes holds the raw value buffer (.array) of SP500.close" in g for g in gaps)
    # this very module reads .array (OnceIndicator): the source scan says so, with lines
    assert any("reads raw line buffers (.array / plotrange)" in g for g in gaps)
    once_gaps = json.loads(once_records[0].run.tracking_gaps)
    assert any("ind (OnceIndicator) computes in once()" in g for g in once_gaps)
    assert "FMEL cannot track: self.closes holds the raw value buffer" in caplog.text


def test_a_resampled_feed_has_no_hashes_and_says_so() -> None:
    class Weekly(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            self.data1.close[0]

    cerebro = bt.Cerebro(stdstats=False)
    data = feed("SP500")
    cerebro.adddata(data, name="SP500")
    cerebro.resampledata(data, timeframe=bt.TimeFrame.Weeks, name="SP500w")
    cerebro.addstrategy(Weekly)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    records = cerebro.run()[0].analyzers.fmel.records
    assert any(
        "feed SP500w has no data hashes" in g for g in json.loads(records[0].run.tracking_gaps)
    )
    weekly = [a for r in records for d in r.data_accessed for a in d.access_patterns]
    assert weekly and all(a.data_hash is None and a.field == "close" for a in weekly)


def test_an_agent_without_gaps_stores_none() -> None:
    # the example agent: neither its module nor a base class's reads a raw buffer (the idiom
    # corpus's agents have the test harness as a base class, which reads them on purpose)
    from agents.sma_cross import SmaCrossAgent

    _, records = run(SmaCrossAgent)
    assert records[0].run.tracking_gaps is None


# -- lines created later, classes given back --------------------------------------------------


class LateLines(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        if not hasattr(self, "late"):
            self.late = bt.ind.SMA(self.data, period=2)  # created in next(): bar by bar only
        elif len(self.late) > 3:
            self.late[-1]


def test_line_objects_created_after_start_are_tracked_from_then_on() -> None:
    _, records = run(LateLines, runonce=False)
    fields = {a[1] for a in reads(records)}
    assert "late" in fields


class Everything(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.sig = self.data.close > bt.ind.SMA(self.data, period=3)
        self.both = bt.And(self.sig, self.data.close(-1) < self.data.close)
        self.macd = bt.ind.MACD(self.data)

    def next(self) -> None:
        self.both[0]


def test_every_tracked_line_gets_its_class_back() -> None:
    strategy, _ = run(Everything)
    assert type(strategy.both).__name__ == "And"
    assert type(strategy.sig).__name__ == "LinesOperation"
    assert all(type(line).__name__ == "LineBuffer" for line in strategy.macd.lines)
    assert all(type(line).__name__ == "LineBuffer" for line in strategy.data.lines)


def test_labels_never_hold_object_addresses() -> None:
    class Keyed(bt.Strategy):  # type: ignore[misc]
        def __init__(self) -> None:
            self.sma = {d: bt.ind.SMA(d, period=5) for d in self.datas}
            self.by_pair = {(self.data0, self.data1): self.data0.close - self.data1.close}

        def next(self) -> None:
            for d in self.datas:
                self.sma[d][0]
            self.by_pair[(self.data0, self.data1)][0]

    _, records = run(Keyed, "SP500", "NASDAQ")
    fields = {(s, f) for s, f, *_ in reads(records)}
    assert fields == {
        ("SP500", "sma"),
        ("NASDAQ", "sma"),
        ("SP500", "by_pair[SP500,NASDAQ]"),
        ("NASDAQ", "by_pair[SP500,NASDAQ]"),
    }


# -- storage of bar_time and tracking_gaps ----------------------------------------------------


def test_bar_time_and_gaps_reach_the_local_store(tmp_path: Path) -> None:
    _, records = run(RawBuffer)
    _, read_records = run(FirstBarPeek)
    rec = read_records[0]._replace(run=records[0].run)
    assert json.loads(row_json(rec)) == to_row(rec)
    sink = LocalDuckDBSink(tmp_path / "f.duckdb")
    sink.open()
    try:
        sink.write_records([rec])
    finally:
        sink.close()
    con = duckdb.connect(str(tmp_path / "f.duckdb"), read_only=True)
    try:
        row = con.execute(
            "SELECT tracking_gaps, ap.bar_time, ap.lookahead FROM decisions d, "
            "UNNEST(d.data_accessed) AS t(da), UNNEST(da.access_patterns) AS u(ap)"
        ).fetchone()
        assert row is not None
        gaps, t, la = row
    finally:
        con.close()
    access = rec.data_accessed[0].access_patterns[0]
    assert json.loads(gaps) == json.loads(records[0].run.tracking_gaps)
    assert la is True and math.isclose(t.timestamp(), access.bar_time)
    assert [f.name for f in DECISION_SCHEMA][-1] == "tracking_gaps"


def test_the_report_always_states_the_look_ahead_count() -> None:
    # fill whatever fields the report has today (others are changing it): None where unknown
    known: dict[str, Any] = dict(
        session_id="s",
        agent="a",
        mode="backtest",
        symbols=("SP500",),
        start_value_usd=1.0,
        end_value_usd=1.0,
        trades=0,
        trades_won=0,
        bars=1,
        decisions=1,
        lookahead_reads=0,
        stored_at="x",
        example_query="y",
    )
    required = [
        f.name
        for f in dataclasses.fields(RunReport)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    values: dict[str, Any] = {name: known.get(name) for name in required}
    report = RunReport(**values)
    assert "look-ahead       0 reads of bars not in the past" in report.render()
    report.lookahead_reads = 3
    assert "look-ahead       3 reads of bars not in the past (future, wrapped" in report.render()


# -- a forward-shifted line on the last bar (found by a fresh-context attack) -------------------


class LastBarPeek(bt.Strategy):  # type: ignore[misc]
    """On the last bar, ``close(1)`` wraps around to the FIRST bar of the file (runonce)."""

    def __init__(self) -> None:
        self.fut = self.data.close(1)
        self.seen: list[float] = []

    def next(self) -> None:
        if len(self.data) == self.data.buflen():
            self.seen.append(self.fut[0])


def test_a_forward_line_read_on_the_last_bar_is_flagged() -> None:
    strategy, records = run(LastBarPeek)
    first_close = strategy.data.close.array[0]
    assert strategy.seen == [first_close]  # backtrader really served the first bar
    last = [a for a in reads(records[-1:]) if a[1] == "fut"]
    assert last and all(flag for *_, flag in last), last
    with pytest.raises(LookAheadError, match="past the last bar"):
        run(LastBarPeek, strict_lookahead=True)


def test_raw_buffer_reads_in_a_base_class_module_are_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-116 F3: the agent's base class, kept in a library module, read tomorrow's close
    through ``line.array[line.idx + 1]``; only the agent's own module was read for raw-buffer
    reads, so the run made +53 % with no tracking gap and no look-ahead read. Every module of
    the agent's base classes is read now (backtrader's own excepted)."""
    import importlib

    (tmp_path / "fmel_base_lib.py").write_text(
        "import backtrader as bt\n\n\n"
        "class Peeking(bt.Strategy):\n"
        "    def tomorrow(self):\n"
        "        line = self.data.close\n"
        "        return line.array[line.idx + 1]\n"
    )
    (tmp_path / "fmel_user_agent.py").write_text(
        "from fmel_base_lib import Peeking\n\n\n"
        "class Agent(Peeking):\n"
        "    def next(self):\n"
        "        if not self.position and self.tomorrow() > self.data.close[0]:\n"
        "            self.buy()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    agent = importlib.import_module("fmel_user_agent").Agent
    _, records = run(agent)
    gaps = json.loads(records[0].run.tracking_gaps)
    told = [g for g in gaps if "reads raw line buffers" in g]
    assert len(told) == 1 and "fmel_base_lib.py line(s) 7" in told[0], gaps


class ListsTheBuffer(bt.Strategy):  # type: ignore[misc]
    """``list(line)`` (Python's sequence protocol) reads every index of the buffer, the future
    bars of a preloaded feed among them."""

    def next(self) -> None:
        if len(self) in (5, 6):
            list(self.data.close)


def test_look_ahead_is_warned_once_per_field_not_once_per_index(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """helper-116 F7: the warning's key held the reason, which names the index, so one
    ``list(self.data.close)`` logged ~2,100 warnings; the reads stay flagged one by one."""
    with caplog.at_level(logging.WARNING, logger="analyzers.tracking"):
        _, records = run(ListsTheBuffer)
    flagged = sum(r.lookahead_reads for r in records)
    assert flagged > 100  # every future bar of the file's buffer, twice
    warned = [r for r in caplog.records if r.getMessage().startswith("look-ahead:")]
    assert len(warned) == 1 and "SP500.close[1]: index 1 is a future bar" in warned[0].getMessage()


def test_reads_of_observer_lines_and_overridden_order_methods_are_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-116 F2 and F5: an agent trading on ``self.stats.drawdown.drawdown[0]`` (an
    observer's line) and one whose ``buy()`` override reads ``low[0..-2]`` for its limit
    price: those reads were dropped without a word. They are still not recorded, and the
    run's tracking gaps now say so (file and lines, the method)."""
    import importlib

    (tmp_path / "fmel_obs_agent.py").write_text(
        "import backtrader as bt\n\n\n"
        "class Agent(bt.Strategy):\n"
        "    def next(self):\n"
        "        if self.stats.drawdown.drawdown[0] < 5 and not self.position:\n"
        "            self.buy()\n\n"
        "    def buy(self, **kw):\n"
        "        low = min(self.data.low[-i] for i in range(3))\n"
        "        return super().buy(price=low, exectype=bt.Order.Limit, **kw)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    agent = importlib.import_module("fmel_obs_agent").Agent
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(feed("SP500"), name="SP500")
    cerebro.addstrategy(agent)
    cerebro.addobserver(bt.observers.DrawDown)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    records = cerebro.run()[0].analyzers.fmel.records
    gaps = json.loads(records[0].run.tracking_gaps)
    assert [g for g in gaps if "observer lines (self.stats / self.observers)" in g] == [
        f"agent code reads observer lines (self.stats / self.observers) at "
        f"{tmp_path / 'fmel_obs_agent.py'} line(s) 6: those reads are not recorded"
    ]
    assert any(g.startswith("the agent overrides buy() (Agent.buy)") for g in gaps)
    assert any(r.action == "BUY" for r in records)


def test_an_agent_with_its_own_stats_attribute_is_not_told_of_observers() -> None:
    """``self.stats`` is backtrader's name for the observers unless the agent replaced it."""

    class OwnStats(bt.Strategy):  # type: ignore[misc]
        def __init__(self) -> None:
            self.stats = {"n": 0}

        def next(self) -> None:
            self.stats["n"] += 1

    _, records = run(OwnStats)
    gaps = json.loads(records[0].run.tracking_gaps or "[]")
    assert not [g for g in gaps if "observer lines" in g]


class SmaMadeInStart(bt.Strategy):  # type: ignore[misc]
    """An indicator created in ``start()`` (backtrader computes it: the agent's start runs
    before the first bar)."""

    def start(self) -> None:
        self.sma = bt.ind.SMA(self.data.close, period=3)
        self.nexts = 0

    def next(self) -> None:
        self.nexts += 1
        self.sma[0]


@pytest.mark.parametrize("runonce", [True, False])
def test_an_indicator_made_in_start_is_recorded_from_the_first_bar(
    runonce: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """helper-116 F6: it was tracked from the first record's end (the once-a-bar sync), so
    the first next()'s read of it was lost, after a warning that it was made "in next()"."""
    with caplog.at_level(logging.WARNING, logger="analyzers.tracking"):
        strategy, records = run(SmaMadeInStart, runonce=runonce)
    sma_reads = [a for r in records for d in r.data_accessed for a in d.access_patterns]
    assert len(sma_reads) == strategy.nexts > 50
    assert {a.field for a in sma_reads} == {"sma"}
    assert "after start" not in caplog.text


def _agent_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> Any:
    """The class ``Agent`` of the first of ``files`` (module name -> source), written to
    ``tmp_path`` and imported from there."""
    import importlib

    for name, text in files.items():
        (tmp_path / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(next(iter(files))).Agent


_PEEKS = (
    "import backtrader as bt\n\n\n"
    "class Agent(bt.Strategy):\n"
    "    def next(self):\n"
    "        line = self.data.close\n"
    "        if not self.position and line.array[line.idx + 1] > line[0]:\n"
    "            self.buy()\n"
)


def test_an_agent_module_named_like_backtrader_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-118: ``backtrader_myagent`` passed for backtrader's own code (a prefix test),
    so its peek at tomorrow's close was not told any more."""
    agent = _agent_from(tmp_path, monkeypatch, {"backtrader_myagent": _PEEKS})
    _, records = run(agent)
    gaps = json.loads(records[0].run.tracking_gaps)
    assert any("backtrader_myagent.py line(s) 7" in g for g in gaps), gaps


def test_an_agent_whose_source_cannot_be_read_is_told_so() -> None:
    """helper-118: an agent made by ``exec`` (as a notebook's, or ``python -c``) was scanned
    against another file, or not at all, and told nothing."""
    space: dict[str, Any] = {}
    exec(_PEEKS, space)  # the case itself
    _, records = run(space["Agent"])
    gaps = json.loads(records[0].run.tracking_gaps)
    assert any(g.startswith("the source of Agent (") and "cannot be read" in g for g in gaps)


def test_only_the_base_classes_are_read_not_the_rest_of_their_modules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-118: a mixin's module also held an observer-pattern class (``self.observers``),
    a ``self.stats`` dict and a pandas helper (``df[col].array``): the agent was told it read
    raw buffers and observers. Only the base class's own source counts now; the agent's own
    ``self.stats`` (set in ``start()``, after FMEL's start) is its attribute, not observers."""
    lib = (
        "class EventsMixin:\n"
        "    def note(self, what):\n"
        "        self.events = getattr(self, 'events', []) + [what]\n\n\n"
        "class Subject:\n"
        "    def __init__(self):\n"
        "        self.observers = []\n"
        "        self.stats = {}\n\n\n"
        "def column(df, col):\n"
        "    return df[col].array\n"
    )
    agent_src = (
        "import collections\n\n"
        "import backtrader as bt\n\n"
        "from fmel_mixins import EventsMixin\n\n\n"
        "class Agent(EventsMixin, bt.Strategy):\n"
        "    def start(self):\n"
        "        self.stats = collections.Counter()\n\n"
        "    def next(self):\n"
        "        self.stats['bars'] += 1\n"
        "        if self.data.close[0] > 0:\n"
        "            self.note('bar')\n"
    )
    agent = _agent_from(tmp_path, monkeypatch, {"fmel_mixin_agent": agent_src, "fmel_mixins": lib})
    _, records = run(agent)
    assert records[0].run.tracking_gaps is None


def test_observers_held_and_order_calls_replaced_on_the_instance_are_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-118: ``self.dd = bt.observers.DrawDown()`` read as ``self.dd.lines.drawdown[0]``,
    and ``self.buy = self._limit_buy`` (which reads ``low[0..-2]``): neither was told."""
    src = (
        "import backtrader as bt\n\n\n"
        "class Agent(bt.Strategy):\n"
        "    def __init__(self):\n"
        "        self.dd = bt.observers.DrawDown()\n"
        "        self.buy = self._limit_buy\n\n"
        "    def _limit_buy(self, **kw):\n"
        "        low = min(self.data.low[-i] for i in range(3))\n"
        "        return bt.Strategy.buy(self, price=low, exectype=bt.Order.Limit, **kw)\n\n"
        "    def next(self):\n"
        "        if self.dd.lines.drawdown[0] < 5 and not self.position:\n"
        "            self.buy()\n"
    )
    agent = _agent_from(tmp_path, monkeypatch, {"fmel_held_observer": src})
    _, records = run(agent)
    gaps = json.loads(records[0].run.tracking_gaps)
    assert any(g.startswith("the agent holds observers (self.dd)") for g in gaps), gaps
    assert any(g.startswith("the agent replaces buy() (Agent._limit_buy)") for g in gaps), gaps


def test_the_class_in_use_is_read_among_classes_of_one_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-120 F2: ``inspect`` took the first ``class Base`` of a module, so a fallback
    class after ``try: ... except ImportError`` that reads ``.array`` was not told, and a dead
    branch's class was. The class statement holding the class's methods is read now."""
    lib = (
        "import backtrader as bt\n"
        "try:\n"
        "    from fmel_no_such_module import Base\n"
        "except ImportError:\n"
        "    class Base:\n"
        "        def tomorrow(self):\n"
        "            line = self.data.close\n"
        "            return line.array[line.idx + 1]\n\n\n"
        "if False:\n"
        "    class Other(bt.Strategy):\n"
        "        pass\n"
    )
    dead_first = (
        "import backtrader as bt\n"
        "if False:\n"
        "    class Base:\n"
        "        def tomorrow(self):\n"
        "            return self.data.close.array[0]\n"
        "else:\n"
        "    class Base:\n"
        "        def tomorrow(self):\n"
        "            return self.data.close[1]\n"
    )
    agent = (
        "import backtrader as bt\n\nfrom {lib} import Base\n\n\n"
        "class Agent(Base, bt.Strategy):\n"
        "    def next(self):\n"
        "        if not self.position and self.tomorrow() > self.data.close[0]:\n"
        "            self.buy()\n"
    )
    told = _agent_from(
        tmp_path,
        monkeypatch,
        {"fmel_twin_agent": agent.format(lib="fmel_twins"), "fmel_twins": lib},
    )
    _, records = run(told)
    gaps = json.loads(records[0].run.tracking_gaps)
    assert any("fmel_twins.py line(s) 8" in g for g in gaps), gaps
    clean = _agent_from(
        tmp_path,
        monkeypatch,
        {"fmel_twin_agent2": agent.format(lib="fmel_twins2"), "fmel_twins2": dead_first},
    )
    _, records = run(clean)
    assert not [g for g in json.loads(records[0].run.tracking_gaps or "[]") if "raw" in g]


def test_a_base_class_made_in_a_function_with_text_at_column_0_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-120 F3: the class's own source, dedented, did not parse (a docstring's lines at
    column 0), and the class was told as unreadable. The module is parsed whole now."""
    lib = (
        "import backtrader as bt\n\n\n"
        "def make_base():\n"
        "    class Base(bt.Strategy):\n"
        "        def describe(self):\n"
        '            return """two\n'
        'lines"""\n\n'
        "    return Base\n"
    )
    agent = (
        "from fmel_factory import make_base\n\n\n"
        "class Agent(make_base()):\n"
        "    def next(self):\n"
        "        self.data.close[0]\n"
    )
    cls = _agent_from(tmp_path, monkeypatch, {"fmel_factory_agent": agent, "fmel_factory": lib})
    _, records = run(cls)
    assert records[0].run.tracking_gaps is None


def test_self_stats_of_another_class_does_not_hide_the_agents_observer_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-120 F5 and F12: any ``self.stats =`` in the agent's module (a helper class's)
    turned the observer check off, and a base class's own ``self.stats`` (a Counter) was
    taken for observers. Only assignments inside the agent's classes count now."""
    src = (
        "import backtrader as bt\n\n\n"
        "class Counter:\n"
        "    def __init__(self):\n"
        "        self.stats = {}\n\n\n"
        "class Agent(bt.Strategy):\n"
        "    def next(self):\n"
        "        if self.stats.broker.value[0] > 0 and not self.position:\n"
        "            self.buy()\n"
    )
    cls = _agent_from(tmp_path, monkeypatch, {"fmel_counter_agent": src})
    cerebro = bt.Cerebro()  # stdstats: the Broker observer is self.stats.broker
    cerebro.adddata(feed("SP500"), name="SP500")
    cerebro.addstrategy(cls)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    records = cerebro.run()[0].analyzers.fmel.records
    gaps = json.loads(records[0].run.tracking_gaps)
    assert any("observer lines" in g and "line(s) 11:" in g for g in gaps), gaps
    lib = (
        "import collections\n\nimport backtrader as bt\n\n\n"
        "class Counting(bt.Strategy):\n"
        "    def start(self):\n"
        "        self.stats = collections.Counter()\n\n"
        "    def next(self):\n"
        "        self.stats['bars'] += 1\n"
    )
    agent = "from fmel_counting import Counting\n\n\nclass Agent(Counting):\n    pass\n"
    cls = _agent_from(tmp_path, monkeypatch, {"fmel_counting_agent": agent, "fmel_counting": lib})
    _, records = run(cls)
    assert records[0].run.tracking_gaps is None


def test_a_module_is_parsed_once_for_many_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-120 F11: a 5,000-line agent module was parsed at every run's start (0.45 s a
    run, 7.0 s for 10 optimisation runs against 1.3 s plain). Its facts are kept per file
    version (path, size, modification time)."""
    import ast as ast_module

    from analyzers.tracking import source_scan

    body = "".join(f"def helper_{i}(x):\n    return x + {i}\n\n\n" for i in range(500))
    src = (
        "import backtrader as bt\n\n\n"
        + body
        + ("class Agent(bt.Strategy):\n    def next(self):\n        self.data.close[0]\n")
    )
    cls = _agent_from(tmp_path, monkeypatch, {"fmel_big_agent": src})
    parsed: list[str] = []
    real_parse = ast_module.parse

    def counting(source: Any, filename: str = "<unknown>", *a: Any, **k: Any) -> Any:
        parsed.append(filename)
        return real_parse(source, filename, *a, **k)

    monkeypatch.setattr(source_scan.ast, "parse", counting)
    for _ in range(3):
        _, records = run(cls)
        assert records[0].run.tracking_gaps is None
    assert [p for p in parsed if p.endswith("fmel_big_agent.py")] == [
        str(tmp_path / "fmel_big_agent.py")
    ]


_PEEK_HELPER = (
    "import backtrader as bt\n\n\n"
    "def tomorrow(line):\n"
    "    return line.array[line.idx + 1]\n\n\n"
    "class Agent(bt.Strategy):\n"
    "    def next(self):\n"
    "        if not self.position and tomorrow(self.data.close) > self.data.close[0]:\n"
    "            self.buy()\n"
)


def test_a_subclass_of_an_agent_keeps_its_modules_helpers_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-122 F1: ``class Tuned(Agent): pass`` in a run script, or ``type("Typed",
    (Agent,), {})``: the agent's module was read only inside its class statement, so the
    module-level helper peeking at tomorrow was not told. A strategy base's module is read
    whole, as the agent's own; a class with no code of its own is not told as unreadable."""
    agent = _agent_from(tmp_path, monkeypatch, {"fmel_peek_helper": _PEEK_HELPER})
    tuned = type("Tuned", (agent,), {"__module__": __name__})
    typed = type("Typed", (agent,), {})
    for cls in (tuned, typed):
        _, records = run(cls)
        gaps = json.loads(records[0].run.tracking_gaps)
        assert [g for g in gaps if "fmel_peek_helper.py line(s) 5:" in g], (cls, gaps)
        assert not [g for g in gaps if "cannot be read" in g], (cls, gaps)


def test_the_file_read_is_the_one_the_class_code_comes_from(tmp_path: Path) -> None:
    """helper-122 F2: two files loaded under one module name (a runner loading agents from a
    folder): the scan read the file of the module name's last load, so a peeking agent passed
    clean, or a clean one was told. The file is the one its functions' code comes from."""
    import importlib.util

    (tmp_path / "peeker.py").write_text(_PEEK_HELPER)
    (tmp_path / "clean.py").write_text(
        "import backtrader as bt\n\n\nclass Agent(bt.Strategy):\n    def next(self):\n"
        "        self.data.close[0]\n"
    )
    loaded = []
    for name in ("peeker", "clean"):
        spec = importlib.util.spec_from_file_location("fmel_user_agent", tmp_path / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["fmel_user_agent"] = module
        spec.loader.exec_module(module)
        loaded.append(module.Agent)
    try:
        (_, peeking), (_, clean) = run(loaded[0]), run(loaded[1])
    finally:
        del sys.modules["fmel_user_agent"]
    assert any("peeker.py line(s) 5:" in g for g in json.loads(peeking[0].run.tracking_gaps))
    assert clean[0].run.tracking_gaps is None


def test_a_file_edited_in_place_with_its_times_kept_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-122 F3: a same-size edit with the modification time kept (``cp -p``, ``rsync
    -t``, ``os.utime``) was taken for the cached version. The change time is in the key."""
    import importlib
    import os

    clean = (
        "import backtrader as bt\n\n\nclass Agent(bt.Strategy):\n    def next(self):\n"
        "        self.data.close[0]      \n"
    )
    peeks = clean.replace("close[0]      ", "close.array[0]")
    assert len(peeks) == len(clean)
    agent = _agent_from(tmp_path, monkeypatch, {"fmel_edited": clean})
    assert run(agent)[1][0].run.tracking_gaps is None
    path = tmp_path / "fmel_edited.py"
    st = path.stat()
    time.sleep(0.01)
    path.write_text(peeks)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    module = importlib.reload(sys.modules["fmel_edited"])
    gaps = json.loads(run(module.Agent)[1][0].run.tracking_gaps)
    assert any("fmel_edited.py line(s) 6:" in g for g in gaps), gaps


def test_the_class_in_use_is_found_through_decorated_methods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """helper-122 F4: with its methods decorated (their code in the decorator's module), the
    class in use was not found among two of one name, and the first (a draft with its own
    ``self.stats``) was read: the observer reads of the one in use went untold."""
    deco = (
        "import functools\n\n\n"
        "def logged(fn):\n"
        "    @functools.wraps(fn)\n"
        "    def call(*a, **k):\n"
        "        return fn(*a, **k)\n\n"
        "    return call\n"
    )
    src = (
        "import collections\n\nimport backtrader as bt\n\nfrom fmel_deco import logged\n\n\n"
        "class Agent(bt.Strategy):\n"
        "    def next(self):\n"
        "        self.stats = collections.Counter()\n\n\n"
        "class Agent(bt.Strategy):  # noqa: F811\n"
        "    @logged\n"
        "    def next(self):\n"
        "        if self.stats.broker.value[0] > 0 and not self.position:\n"
        "            self.buy()\n"
    )
    cls = _agent_from(tmp_path, monkeypatch, {"fmel_twin_deco": src, "fmel_deco": deco})
    cerebro = bt.Cerebro()
    cerebro.adddata(feed("SP500"), name="SP500")
    cerebro.addstrategy(cls)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    records = cerebro.run()[0].analyzers.fmel.records
    gaps = json.loads(records[0].run.tracking_gaps)
    assert any("observer lines" in g and "line(s) 16:" in g for g in gaps), gaps
