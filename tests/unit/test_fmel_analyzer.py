"""The FMEL analyzer: records per bar, order events, notes, and no effect on results."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import backtrader as bt
import numpy as np
import pytest

from agents.sma_cross import SmaCrossAgent
from analyzers.fmel import FMELAnalyzer, attach_note, make_run_info
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from feeds.csv import CSVBars, CSVFeedConfig, make_csv_feed, read_csv_bars
from tests.conftest import DATA

FEEDS = [CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s) for s in ("GOOG", "SP500", "NASDAQ")]


@pytest.fixture(scope="module")
def bars() -> dict[str, CSVBars]:
    return {c.symbol: read_csv_bars(c) for c in FEEDS}


class Logged(SmaCrossAgent):
    """The example agent, also keeping every fill it is notified of."""

    def __init__(self) -> None:
        super().__init__()
        self.fills: list[tuple[str, str, str, float, float]] = []

    def notify_order(self, order: Any) -> None:
        if order.status == order.Completed:
            self.fills.append(
                (
                    bt.num2date(order.executed.dt).isoformat(),
                    order.data._name,
                    "BUY" if order.isbuy() else "SELL",
                    order.executed.size,
                    order.executed.price,
                )
            )
        super().notify_order(order)


def run(
    bars: dict[str, CSVBars], analyzer: bool, writer: DecisionWriter | None = None
) -> tuple[Any, float]:
    cerebro = bt.Cerebro(stdstats=False)
    for c in FEEDS:
        cerebro.adddata(make_csv_feed(c, bars[c.symbol]), name=c.symbol)
    cerebro.addstrategy(Logged)
    cerebro.broker.setcash(100_000)
    cerebro.broker.setcommission(commission=0.001)
    if analyzer:
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer)
    strategy = cerebro.run()[0]
    return strategy, cerebro.broker.getvalue()


def test_recording_changes_no_result_on_real_data(bars: dict[str, CSVBars], tmp_path: Path) -> None:
    plain, plain_value = run(bars, analyzer=False)
    tracked, tracked_value = run(bars, analyzer=True)
    sink = LocalDuckDBSink(tmp_path / "f.duckdb")
    writer = DecisionWriter(sink, batch_size=100, spill_dir=tmp_path / "spill")
    writer.start()
    stored, stored_value = run(bars, analyzer=True, writer=writer)
    stats = writer.stop(timeout_s=300)  # a loaded machine must not spill
    assert len(plain.fills) > 100  # the comparison means something
    assert plain.fills == tracked.fills == stored.fills
    assert plain_value == tracked_value == stored_value
    assert stats.written == len(tracked.analyzers.fmel.records) == 5031


def test_one_record_per_bar_with_stages_and_order_events(bars: dict[str, CSVBars]) -> None:
    strategy, _ = run(bars, analyzer=True)
    records = strategy.analyzers.fmel.records
    assert [r.decision_point for r in records] == list(range(len(records)))
    stages = [r.stage for r in records]
    first_next = stages.index("NEXTSTART")
    assert set(stages[:first_next]) == {"PRENEXT"} and stages.count("NEXTSTART") == 1
    assert set(stages[first_next + 1 :]) == {"NEXT"}
    created = {a.order_ref: (r, a) for r in records for a in r.actions if a.event == "CREATED"}
    completed = {a.order_ref: (r, a) for r in records for a in r.actions if a.event == "COMPLETED"}
    assert len(created) == len(strategy.fills) == len(completed)
    for ref, (rec, action) in created.items():
        done_rec, done = completed[ref]
        assert done_rec.decision_point > rec.decision_point  # filled at a later bar
        assert done.exec_size == action.size and done.exec_price and done.exec_price > 0
        assert rec.action == action.side and rec.reasoning
    fills = {(f[1], f[2], abs(f[3]), f[4]) for f in strategy.fills}
    assert fills == {(a.symbol, a.side, a.exec_size, a.exec_price) for _, a in completed.values()}
    # positions and portfolio come from the broker
    last = records[-1]
    assert last.portfolio_value == pytest.approx(strategy.broker.getvalue())
    held = {p.symbol: p.size for p in last.positions}
    assert held == {
        d._name: strategy.getposition(d).size
        for d in strategy.datas
        if strategy.getposition(d).size
    }
    last_bar = bt.num2date(strategy.datetime[0]).replace(tzinfo=UTC)
    assert datetime.fromtimestamp(last.bar_time, UTC) == last_bar


class Noter(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        if len(self) == 3:
            attach_note(
                self, reasoning="because", confidence=0.75, forecast=np.array([1.5, 2.5]), model="m"
            )
        if len(self) == 4:
            self.buy(size=10**9)  # far beyond cash: the broker answers Margin


def test_notes_and_rejections_are_recorded() -> None:
    cerebro = bt.Cerebro(stdstats=False)
    c = FEEDS[0]
    cerebro.adddata(make_csv_feed(c), name=c.symbol)
    cerebro.addstrategy(Noter)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    records = cerebro.run()[0].analyzers.fmel.records
    noted = records[2]
    assert noted.reasoning == "because" and noted.confidence == 0.75
    assert json.loads(noted.notes or "") == {"forecast": [1.5, 2.5], "model": "m"}
    assert records[3].reasoning is None and records[3].notes is None
    events = [a.event for r in records for a in r.actions]
    assert events[:3] == ["CREATED", "SUBMITTED", "MARGIN"]


def test_attach_note_without_analyzer_is_a_no_op() -> None:
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(FEEDS[0]), name="GOOG")
    cerebro.addstrategy(Noter)
    cerebro.run()


def test_run_info_carries_agent_metadata() -> None:
    info = make_run_info(
        SmaCrossAgent, session_id="s1", agent_id=None, mode="backtest", params_json='{"fast": 10}'
    )
    assert info.agent_id == "SmaCrossAgent"
    assert info.agent_class == "agents.sma_cross.SmaCrossAgent"
    assert info.agent_source_hash is not None and len(info.agent_source_hash) == 32


def test_rsi_agent_reads_the_feed_field_when_present_else_its_indicator() -> None:
    from agents.rsi_agent import RsiAgent

    def fields(path: Any) -> set[str]:
        cerebro = bt.Cerebro(stdstats=False)
        cerebro.adddata(make_csv_feed(CSVFeedConfig(path=path, symbol="GOOG")), name="GOOG")
        cerebro.addstrategy(RsiAgent)
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
        records = cerebro.run()[0].analyzers.fmel.records
        return {f for r in records for d in r.data_accessed for f in d.fields_accessed}

    assert {"rsi", "regime"} <= fields(DATA / "enriched" / "GOOG.csv")
    plain = fields(DATA / "GOOG.csv")
    assert "computed_rsi" in plain and "rsi" not in plain and "regime" not in plain


class _CashReader(bt.Strategy):  # type: ignore[misc]
    """Reads the close in notify_cashvalue (called every bar by backtrader, before next)."""

    def notify_cashvalue(self, cash: float, value: float) -> None:
        self.seen = self.data.close[0]


class _FundMixin:
    def notify_fund(self, cash: float, value: float, fundvalue: float, shares: float) -> None:
        self.seen_fund = self.data.high[0]  # type: ignore[attr-defined]


class _FundReader(_FundMixin, bt.Strategy):  # type: ignore[misc]
    pass


class _AssignedReader(bt.Strategy):  # type: ignore[misc]
    """Sets its callback on the instance in ``__init__`` (no override in any class)."""

    def __init__(self) -> None:
        self.notify_cashvalue = lambda cash, value: self.data.low[0]


def _one_feed_run(strategy: type, analyzer: type = FMELAnalyzer) -> Any:
    cerebro = bt.Cerebro(stdstats=False)
    cfg = FEEDS[0]
    cerebro.adddata(make_csv_feed(cfg, read_csv_bars(cfg)), name=cfg.symbol)
    cerebro.addstrategy(strategy)
    cerebro.addanalyzer(analyzer, _name="fmel")
    return cerebro.run()[0]


@pytest.mark.parametrize(
    ("strategy", "field"),
    [
        (_CashReader, "close"),  # overridden in the agent's class
        (_FundReader, "high"),  # overridden in a mixin
        (_AssignedReader, "low"),  # assigned on the instance
    ],
)
def test_reads_in_notify_callbacks_are_recorded_however_the_agent_defines_them(
    strategy: type, field: str
) -> None:
    s = _one_feed_run(strategy)
    records = s.analyzers.fmel.records
    # notify_cashvalue/notify_fund run before next in the same step: the read lands in that
    # step's record
    with_reads = [r for r in records if r.reads]
    assert len(with_reads) >= len(records) - 1
    fields = {f for r in with_reads for d in r.data_accessed for f in d.fields_accessed}
    assert fields == {field}


class _CashReaderSeen(_CashReader):
    def stop(self) -> None:  # before the analyzers' stop: the wrappers are still on
        self.seen = set(vars(self))


def test_backtraders_own_no_op_callbacks_are_not_wrapped() -> None:
    s = _one_feed_run(_CashReaderSeen)
    assert "notify_cashvalue" in s.seen  # the agent's: wrapped
    for name in ("notify_fund", "notify_trade", "notify_order", "notify_timer", "prenext"):
        assert name not in s.seen, name  # backtrader's ``pass``: left alone
    assert "next" not in s.seen  # not overridden by _CashReader either
    assert "notify_cashvalue" not in vars(s)  # and taken off at the analyzer's stop


class _CountingFMEL(FMELAnalyzer):
    """A user's subclass: its own ``next`` and ``notify_cashvalue`` must still run."""

    def __init__(self) -> None:
        super().__init__()
        self.nexts = self.cash_notices = 0

    def next(self) -> None:
        self.nexts += 1
        super().next()

    def notify_cashvalue(self, cash: float, value: float) -> None:
        self.cash_notices += 1


class _Child(bt.Analyzer):  # type: ignore[misc]
    """Made inside its parent's ``__init__``: backtrader registers it as the parent's child."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def prenext(self) -> None:
        self.calls.append("prenext")

    def nextstart(self) -> None:
        self.calls.append("nextstart")

    def next(self) -> None:
        self.calls.append("next")

    def notify_fund(self, cash: float, value: float, fundvalue: float, shares: float) -> None:
        self.calls.append("fund")


class _ParentFMEL(FMELAnalyzer):
    def __init__(self) -> None:
        super().__init__()
        self.child = _Child()


def _run_with(analyzer: type) -> tuple[Any, Any]:
    cerebro = bt.Cerebro(stdstats=False)
    for cfg in FEEDS[:2]:  # GOOG starts later than SP500: prenext bars first
        cerebro.adddata(make_csv_feed(cfg, read_csv_bars(cfg)), name=cfg.symbol)
    cerebro.addstrategy(SmaCrossAgent)
    cerebro.addanalyzer(analyzer, _name="fmel")
    strategy = cerebro.run()[0]
    return strategy, strategy.analyzers.fmel


@pytest.mark.parametrize("analyzer", [FMELAnalyzer, _CountingFMEL, _ParentFMEL])
def test_the_bar_calls_are_shortened_without_changing_what_runs(analyzer: type) -> None:
    """``_bind_bar_calls``: one record per bar with the right stage whichever way backtrader
    reaches it; a subclass's own ``next``/``notify_cashvalue`` and a child analyzer still run
    every bar; nothing bound is left on the analyzer after the run."""
    strategy, fmel = _run_with(analyzer)
    records = fmel.records
    assert len(records) == len(strategy)
    stages = [r.stage for r in records]
    first_next = stages.index("NEXTSTART")
    assert first_next > 0 and set(stages[:first_next]) == {"PRENEXT"}
    assert set(stages[first_next + 1 :]) == {"NEXT"}
    if analyzer is _CountingFMEL:
        assert fmel.nexts == stages.count("NEXT")
        assert fmel.cash_notices == len(strategy)
    if analyzer is _ParentFMEL:
        calls = fmel.child.calls
        assert [c for c in calls if c != "fund"] == [s.lower() for s in stages]
        assert calls.count("fund") == len(strategy)
    for name in ("_prenext", "_nextstart", "_next", "_notify_cashvalue", "_notify_fund"):
        assert name not in vars(fmel), name


class _Peeker(bt.Strategy):  # type: ignore[misc]
    """Looks at how backtrader will reach the FMEL analyzer this bar."""

    def next(self) -> None:
        fmel = self.analyzers.fmel
        self.bound = {n for n in ("_next", "_notify_cashvalue", "_notify_fund") if n in vars(fmel)}


@pytest.mark.parametrize(
    ("analyzer", "bound"),
    [
        (FMELAnalyzer, {"_next", "_notify_cashvalue", "_notify_fund"}),
        (_CountingFMEL, {"_notify_fund"}),  # its own next and notify_cashvalue: backtrader's calls
        (_ParentFMEL, set()),  # a child: backtrader's calls
    ],
)
def test_the_bar_calls_are_bound_only_where_nothing_else_runs(
    analyzer: type, bound: set[str]
) -> None:
    assert _one_feed_run(_Peeker, analyzer).bound == bound


# Found by a fresh-context attack on the binding: each kept backtrader's calls before the fix.


class _PrivateHooks(FMELAnalyzer):
    """Overrides backtrader's private hooks themselves, then calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.nexts = self.cash_notices = 0

    def _next(self) -> None:
        self.nexts += 1
        super()._next()

    def _notify_cashvalue(self, cash: float, value: float) -> None:
        self.cash_notices += 1
        super()._notify_cashvalue(cash, value)


class _MonthlyFMEL(FMELAnalyzer, bt.TimeFrameAnalyzerBase):  # type: ignore[misc]
    """backtrader's timeframe analyzer does its work in _prenext/_nextstart/_next."""

    params = (("timeframe", bt.TimeFrame.Months), ("compression", 1))

    def __init__(self) -> None:
        super().__init__()
        self.months = 0

    def on_dt_over(self) -> None:
        self.months += 1


class _ChildInStart(FMELAnalyzer):
    """Adds a child analyzer in its own start(), after FMEL's."""

    def start(self) -> None:
        super().start()
        child = _Child.__new__(_Child)
        child.calls = []
        child._children = []
        self._register(child)
        self.child = child


def test_private_hook_overrides_mixins_and_late_children_keep_backtraders_calls() -> None:
    strategy, fmel = _run_with(_PrivateHooks)
    assert fmel.nexts == [r.stage for r in fmel.records].count("NEXT") > 0
    assert fmel.cash_notices == len(strategy)
    strategy, fmel = _run_with(_MonthlyFMEL)
    first, last = (
        datetime.fromtimestamp(r.bar_time, UTC) for r in fmel.records[:: len(strategy) - 1]
    )
    months = (last.year - first.year) * 12 + last.month - first.month
    assert months - 1 <= fmel.months <= months + 1 and fmel.months > 12
    strategy, fmel = _run_with(_ChildInStart)
    stages = [r.stage.lower() for r in fmel.records]
    assert [c for c in fmel.child.calls if c != "fund"] == stages
    assert len(fmel.records) == len(strategy)


def test_a_mock_patched_onto_the_class_is_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"next": 0, "cash": 0}
    own_next = FMELAnalyzer.next

    def spy_next(self: Any) -> None:
        calls["next"] += 1
        own_next(self)

    def spy_cash(self: Any, cash: float, value: float) -> None:
        calls["cash"] += 1

    monkeypatch.setattr(FMELAnalyzer, "next", spy_next)
    monkeypatch.setattr(bt.Analyzer, "notify_cashvalue", spy_cash)
    strategy, fmel = _run_with(FMELAnalyzer)
    assert calls["next"] == [r.stage for r in fmel.records].count("NEXT") > 0
    assert calls["cash"] == len(strategy)


class _Buyer(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        if self.data.close[0] > self.data.close[-1]:
            self.buy()


class _Seller(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        if self.position and self.data.close[0] < self.data.open[0]:
            self.sell()


def _two_strategies(writer: DecisionWriter | None, **fmel: Any) -> list[Any]:
    cerebro = bt.Cerebro(stdstats=False)
    cfg = FEEDS[0]
    cerebro.adddata(make_csv_feed(cfg, read_csv_bars(cfg)), name=cfg.symbol)
    cerebro.addstrategy(_Buyer)
    cerebro.addstrategy(_Seller)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer, **fmel)
    return list(cerebro.run())


def test_two_strategies_and_two_runs_into_one_store_keep_every_decision_apart(
    tmp_path: Path,
) -> None:
    # Found by an attack on the writer: with one default session id ("local") for every
    # analyzer, both strategies and both runs wrote "local:0", "local:1", ...: 4 rows per id,
    # and a store skipping ids it holds (a retried batch stored in part) dropped decisions.
    path = tmp_path / "f.duckdb"
    expected: dict[str, tuple[str, int]] = {}
    for _ in range(2):
        writer = DecisionWriter(LocalDuckDBSink(path), batch_size=100)
        writer.start()
        strategies = _two_strategies(writer)
        assert writer.stop(timeout_s=300).written == 2 * 2148
        for s in strategies:
            info = s.analyzers.fmel.run_info
            expected[info.session_id] = (type(s).__name__, s.analyzers.fmel.decisions)
    import duckdb

    with duckdb.connect(str(path), read_only=True) as con:
        got = con.execute(
            "SELECT session_id, any_value(agent_id), count(*), count(DISTINCT decision_id) "
            "FROM decisions GROUP BY session_id"
        ).fetchall()
        total = con.execute("SELECT count(*), count(DISTINCT decision_id) FROM decisions")
        assert total.fetchone() == (4 * 2148, 4 * 2148)
    assert len(expected) == 4  # a session each
    assert {sid: (agent, n) for sid, agent, n, _ in got} == expected
    assert all(n == distinct for *_, n, distinct in got)


def test_a_run_shared_by_two_writing_strategies_is_refused_by_name(tmp_path: Path) -> None:
    info = make_run_info(_Buyer, session_id="s1", agent_id=None, mode="backtest")
    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), batch_size=100)
    writer.start()
    try:
        shared = r"_Seller \(params \{\}\) would write .*\(s1:.*as _Buyer"
        with pytest.raises(ValueError, match=shared):
            _two_strategies(writer, run=info)
    finally:
        writer.stop(timeout_s=60)
    # in memory nothing collides: allowed, each keeps its own records
    a, b = _two_strategies(None, run=info)
    assert a.analyzers.fmel.decisions == b.analyzers.fmel.decisions == 2148
    # a decision scope is the id prefix of paper runs: named instead of the session
    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "g.duckdb"), batch_size=100)
    writer.start()
    try:
        with pytest.raises(ValueError, match=r"same decision ids \(deploy-1:"):
            _two_strategies(writer, run=info._replace(decision_scope="deploy-1"))
    finally:
        writer.stop(timeout_s=60)


class _Logged(bt.Analyzer):  # type: ignore[misc]
    """Logs backtrader's calls into it, in one list shared by every instance of a run."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = self.strategy.call_log

    def next(self) -> None:
        self.log.append((self.p.tag, "next"))

    def notify_cashvalue(self, cash: float, value: float) -> None:
        self.log.append((self.p.tag, f"cash {cash:.2f} {value:.2f}"))

    def notify_order(self, order: Any) -> None:
        # not order.ref: backtrader numbers orders across the process's runs
        self.log.append((self.p.tag, f"order {order.ordtypename()} {order.status} {order.size}"))

    params = (("tag", ""),)


class _LoggingAgent(SmaCrossAgent):
    def __init__(self) -> None:
        super().__init__()
        self.call_log: list[tuple[str, str]] = []
        self.types: set[type] = set()

    def next(self) -> None:
        self.types.add(type(self.analyzers))
        assert [a.p.tag for a in self.analyzers if isinstance(a, _Logged)] == ["a", "b"]
        super().next()


def _logged_run(with_fmel: bool) -> Any:
    cerebro = bt.Cerebro(stdstats=False)
    for cfg in FEEDS[:2]:
        cerebro.adddata(make_csv_feed(cfg, read_csv_bars(cfg)), name=cfg.symbol)
    cerebro.addstrategy(_LoggingAgent)
    cerebro.addanalyzer(_Logged, tag="a")
    if with_fmel:
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    cerebro.addanalyzer(_Logged, tag="b")
    return cerebro.run()[0]


def test_backtraders_loops_over_the_analyzers_reach_every_one_in_order_as_without_fmel() -> None:
    """FMEL gives the strategy's analyzers collection an ``__iter__`` for the run
    (``_iterable_analyzers``): the other analyzers get the same calls, in the same order, as
    in a run without FMEL, and the collection is backtrader's class again after the run."""
    plain, tracked = _logged_run(False), _logged_run(True)
    assert tracked.call_log == plain.call_log
    assert any(c.startswith("order") for _, c in plain.call_log)  # the agent traded
    assert plain.types == {bt.metabase.ItemCollection}
    assert tracked.types == {fmel_iterable_items()}
    assert type(tracked.analyzers) is bt.metabase.ItemCollection
    assert len(tracked.analyzers.fmel.records) == len(tracked)


def fmel_iterable_items() -> type:
    from analyzers import fmel

    return fmel._IterableItems
