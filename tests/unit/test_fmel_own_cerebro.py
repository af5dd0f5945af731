"""FMEL in a user's own backtrader script (docs/decisions.md, "In your own Cerebro"): several
strategies, runs again over the same feeds (also after a run that raised), backtrader's own
optimisation (``cerebro.optstrategy``) in one process and in worker processes (``maxcpus`` >
1: backtrader pickles the Cerebro with its feeds to the workers and each run's analyzers
back, in a ``cerebro.OptReturn``), filtered feeds, and what is refused. Several cases were
found by an attack on this capability (helper-56)."""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import tempfile
import threading
from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import backtrader as bt
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from analyzers import fmel as fmel_module
from analyzers.fmel import FMELAnalyzer, make_run_info
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from analyzers.tracking.model import feed_labels
from core.bars import feed_symbol
from core.errors import ConfigError
from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
from tests.conftest import DATA
from tests.expected_records import expected_table

GOOG = CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG")
# a file with extra fields: its feed class is built at run time (feeds.fields.dynamic_feed_class)
ENRICHED = DATA / "enriched" / "GOOG.csv"


class _SmaAgent(bt.Strategy):  # type: ignore[misc]
    params = (("period", 10),)

    def __init__(self) -> None:
        self.sma = bt.ind.SMA(self.data.close, period=self.p.period)

    def next(self) -> None:
        if not self.position and self.data.close[0] > self.sma[0]:
            self.buy()
        elif self.position and self.data.close[0] < self.sma[0]:
            self.close()


def _optimise(maxcpus: int, writer: DecisionWriter | None = None) -> list[Any]:
    cerebro = bt.Cerebro(maxcpus=maxcpus, stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.optstrategy(_SmaAgent, period=[5, 20, 50])
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer)
    cerebro.addanalyzer(bt.analyzers.SharpeRatio, _name="sharpe")
    return [r[0] for r in cerebro.run()]


def _comparable(fmel: Any) -> list[Any]:
    # order refs count on per process: renumbered from the run's first
    refs: dict[int, int] = {}
    return [
        r._replace(
            ts=0.0,
            run=r.run._replace(session_id="s"),
            actions=tuple(
                a._replace(order_ref=refs.setdefault(a.order_ref, len(refs))) for a in r.actions
            ),
        )
        for r in fmel.records
    ]


def _in_fresh_process(check: str) -> None:
    """Runs this module's function ``check`` in a new Python process, as a user's script runs.

    backtrader's ``maxcpus`` > 1 forks workers (``multiprocessing.Pool``, fork on Linux). In
    the test process, threads left by earlier tests (gRPC, DuckDB, writers) may hold a lock at
    the fork, and a worker can hang on it: once in CI the pool's shutdown did not end in 600 s.
    A fresh process has only the threads the check itself starts."""
    code = f"from tests.unit.test_fmel_own_cerebro import {check}; {check}()"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_optstrategy_in_worker_processes_returns_what_one_process_does() -> None:
    _in_fresh_process("check_optstrategy_in_worker_processes")


def check_optstrategy_in_worker_processes() -> None:
    one = _optimise(maxcpus=1)
    two = _optimise(maxcpus=2)
    assert [r.params.period for r in two] == [r.params.period for r in one] == [5, 20, 50]
    for a, b in zip(one, two, strict=True):
        fa, fb = a.analyzers.fmel, b.analyzers.fmel
        assert fb.decisions == fa.decisions == len(fb.records) == 2148
        assert _comparable(fb) == _comparable(fa)
        assert dict(fb.get_analysis()) == dict(fa.get_analysis())
        assert b.analyzers.sharpe.get_analysis() == a.analyzers.sharpe.get_analysis()
    # each run its own session
    assert len({r.analyzers.fmel.run_info.session_id for r in two}) == 3


def test_a_feed_class_built_at_run_time_pickles_as_the_call_that_builds_it() -> None:
    cfg = CSVFeedConfig(path=ENRICHED, symbol="X")
    feed = make_csv_feed(cfg)
    assert feed.extra_fields  # the test means something: a class of its own
    cls = type(feed)
    assert pickle.loads(pickle.dumps(cls)) is cls
    # other classes of backtrader's feed metaclass still pickle by name
    assert pickle.loads(pickle.dumps(bt.feeds.PandasData)) is bt.feeds.PandasData
    again = pickle.loads(pickle.dumps(feed))
    assert type(again) is cls and again.symbol == "X"


class _AssignedCallback(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.notify_cashvalue = self._seen

    def _seen(self, cash: float, value: float) -> None:
        self.data.low[0]

    def next(self) -> None:
        self.data.close[0]


def test_the_agent_and_broker_are_put_back_as_they_were_at_stop() -> None:
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_AssignedCallback)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    strategy = cerebro.run()[0]
    assert strategy.analyzers.fmel.decisions == 2148  # it was tracked
    assert vars(strategy)["notify_cashvalue"] == strategy._seen  # the agent's own, back
    for name in ("next", "buy", "sell", "cancel", "close", "order_target_size", "getsizing"):
        assert name not in vars(strategy), name
    assert not {"getvalue", "get_value", "buy", "sell"} & set(vars(cerebro.broker))
    pickle.dumps(strategy.analyzers.fmel)  # a finished analyzer without a writer pickles


def test_a_writer_is_refused_by_name_when_backtrader_sends_it_to_workers() -> None:
    _in_fresh_process("check_writer_refused_for_workers")


def check_writer_refused_for_workers() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _writer_refused_for_workers(Path(tmp))


def _writer_refused_for_workers(tmp_path: Path) -> None:
    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "spill")
    writer.start()
    try:
        with pytest.raises(TypeError, match=r"DecisionWriter cannot be pickled.*maxcpus=1"):
            _optimise(maxcpus=2, writer=writer)
        fmel = _optimise(maxcpus=1, writer=writer)[0].analyzers.fmel  # in one process: fine
        assert fmel.decisions == 2148
        with pytest.raises(TypeError, match="with a writer cannot be pickled"):
            pickle.dumps(fmel)
    finally:
        stats = writer.stop(timeout_s=120)
    assert (stats.written, stats.spilled) == (3 * 2148, 0)


def _flushing_feed(writer: DecisionWriter) -> Any:
    """GOOG's feed, asking ``writer`` to write what it holds when it has loaded 1,000 bars:
    while backtrader preloads it for a run (``Cerebro.runstrategies``: ``data.reset()``, then
    ``preload()``), as a writer thread may at any time."""
    bars = read_csv_bars(GOOG)
    base = type(make_csv_feed(GOOG, bars))

    class Flushing(base):  # type: ignore[misc,valid-type]
        def _load(self) -> bool:
            loaded: bool = super()._load()
            if self._i == 1000:
                assert writer.flush(timeout_s=120)
            return loaded

    return Flushing(bars=bars, name="GOOG", timeframe=bars.timeframe, compression=bars.compression)


_SAME = "decision_point, bar_time, stage, action, data_accessed, reads, lookahead_reads, positions"


def test_a_cerebro_run_twice_with_one_writer_stores_each_runs_own_reads(tmp_path: Path) -> None:
    # The writer resolves reads after the bar, from the feeds' buffers; a second run over the
    # same feeds resets them (backtrader's LineBuffer.reset). Before the analyzer pinned its
    # feeds' bar times at stop (AccessTracker.pin), the first run's last batches failed while
    # the second run's bars loaded (IndexError in the writer; the records went to the spill).
    path = tmp_path / "f.duckdb"
    # nothing written but when the feed asks: the first run's last reads are resolved while
    # the second run's bars are half loaded
    writer = DecisionWriter(
        LocalDuckDBSink(path),
        batch_size=10_000,
        flush_interval_s=3600,
        spill_dir=tmp_path / "spill",
    )
    writer.start()
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(_flushing_feed(writer), name="GOOG")
    cerebro.addstrategy(_SmaAgent)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer)
    sessions = [cerebro.run()[0].analyzers.fmel.run_info.session_id for _ in range(2)]
    stats = writer.stop(timeout_s=300)
    assert (stats.written, stats.spilled) == (2 * 2148, 0)
    # the reference: the same run recorded in memory, each read resolved at its bar
    memory = bt.Cerebro(stdstats=False)
    memory.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    memory.addstrategy(_SmaAgent)
    memory.addanalyzer(FMELAnalyzer, _name="fmel")
    records = memory.run()[0].analyzers.fmel.records
    import duckdb

    with duckdb.connect(str(path)) as con:
        expected_table(con, records)
        want = con.execute(f"SELECT {_SAME} FROM expected ORDER BY 1").fetchall()
        assert sum(r[5] for r in want) > 4000  # close and the SMA, each bar after the first 9
        for session in sessions:
            got = con.execute(
                f"SELECT {_SAME} FROM decisions WHERE session_id = ? ORDER BY 1", [session]
            ).fetchall()
            assert got == want


def _fields(fmel: Any) -> list[list[tuple[str, str, int]]]:
    """Per record: each read's (symbol, field, bar index), in order."""
    return [
        [(d.symbol, a.field, a.bar_index) for d in r.data_accessed for a in d.access_patterns]
        for r in fmel.records
    ]


class _ReadsClose(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        self.data.close[0]


class _ReadsOpenHigh(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        self.data.open[0]
        self.data.high[-1]


def _fmel_run(*strategies: type, feed: Any = None, **kw: Any) -> list[Any]:
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(
        feed if feed is not None else make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG"
    )
    for s in strategies:
        cerebro.addstrategy(s)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", **kw)
    return list(cerebro.run())


def test_each_strategy_of_a_cerebro_records_its_own_reads() -> None:
    # Found by the attack: the feed lines carried the first strategy's tags only, so the
    # second strategy's reads were recorded in the first one's next record.
    both = _fmel_run(_ReadsClose, _ReadsOpenHigh)
    alone = [_fmel_run(s)[0] for s in (_ReadsClose, _ReadsOpenHigh)]
    for together, solo in zip(both, alone, strict=True):
        assert _fields(together.analyzers.fmel) == _fields(solo.analyzers.fmel)
    assert sum(r.reads for r in both[0].analyzers.fmel.records) == 2148
    assert sum(r.reads for r in both[1].analyzers.fmel.records) == 2 * 2148


class _Buggy(_SmaAgent):
    fail = True

    def next(self) -> None:
        super().next()
        if _Buggy.fail and len(self) == 100:
            raise ZeroDivisionError("a bug in the agent")


def test_a_run_after_one_that_raised_records_every_read_and_leaves_nothing() -> None:
    # Found by the attack: the raised run never reached the analyzer's stop; its tags stayed
    # on the feed lines and the next run's tracker skipped them (no feed read recorded).
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_Buggy)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    with pytest.raises(ZeroDivisionError):
        cerebro.run()
    _Buggy.fail = False
    try:
        again = cerebro.run()[0].analyzers.fmel
    finally:
        _Buggy.fail = True
    fresh = _fmel_run(_SmaAgent)[0].analyzers.fmel
    assert _fields(again) == _fields(fresh) and sum(len(f) for f in _fields(fresh)) > 4000
    assert not {"getvalue", "get_value", "buy", "sell"} & set(vars(cerebro.broker))
    assert type(cerebro.datas[0].lines.close).__name__ == "LineBuffer"


def test_the_tracking_goes_when_the_agent_raises(caplog: pytest.LogCaptureFixture) -> None:
    # Before, the tracking stayed on the feeds until the next FMEL run took it over: a plain
    # run in between paid for every read (~30 % slower) and kept each one in the failed
    # run's memory.
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_Buggy)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    with pytest.raises(ZeroDivisionError):
        cerebro.run()
    assert type(cerebro.datas[0].lines.close).__name__ == "LineBuffer"
    assert not {"getvalue", "get_value", "buy", "sell"} & set(vars(cerebro.broker))
    from analyzers.tracking import proxies

    assert proxies.OWNER is None
    # the agent caught its own exception and went on: so does the recording (helper-116: it
    # ended, with the orders' events, and an error said so)
    caplog.set_level(logging.ERROR, logger="analyzers.fmel")
    (s,) = _fmel_run(_CatchesItsOwn)
    records = s.analyzers.fmel.records
    assert _fields(s.analyzers.fmel) == _fields(_fmel_run(_SmaAgent)[0].analyzers.fmel)
    assert all(len(r.data_accessed) > 0 for r in records[10:])
    assert not [r for r in caplog.records if "went on" in r.getMessage()]
    assert type(cerebro.datas[0].lines.close).__name__ == "LineBuffer"


class _PrenextCallsNext(bt.Strategy):  # type: ignore[misc]
    """backtrader's multi-feed idiom: ``prenext`` calls ``next`` and skips the bars an
    indicator of a later-starting feed cannot give yet (its ``[0]`` raises IndexError)."""

    def __init__(self) -> None:
        self.sma = bt.ind.SMA(self.datas[1].close, period=5)
        self.completed = 0  # bars whose next() read both lines
        self.bought_at: list[int] = []

    def prenext(self) -> None:
        try:
            self.next()
        except IndexError:
            pass

    def next(self) -> None:
        close, sma = self.datas[0].close[0], self.sma[0]
        self.completed += 1
        if close > sma and not self.position:
            self.buy()
            self.bought_at.append(len(self))
        elif self.position and close < sma:
            self.close()


@pytest.mark.parametrize("runonce", [True, False])
def test_an_exception_the_agent_catches_in_a_nested_call_does_not_end_the_recording(
    runonce: bool,
) -> None:
    """helper-116 F1: SP500 from 1985 and GOOG from 2004; the SMA of GOOG raises IndexError
    in every prenext's nested next() until GOOG starts. The first one, caught by the agent,
    took the tracking away (wrapped calls and tracked lines): no read and no order event of
    any later bar was recorded, and the bars the agent bought at were stored as HOLD."""
    sp500 = CSVFeedConfig(path=DATA / "SP500.csv", symbol="SP500")
    cerebro = bt.Cerebro(stdstats=False, runonce=runonce, preload=runonce)
    cerebro.adddata(make_csv_feed(sp500, read_csv_bars(sp500)), name="SP500")
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_PrenextCallsNext)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    (s,) = cerebro.run()
    records = s.analyzers.fmel.records
    # every bar whose next() read both lines has both reads recorded
    both = [
        r
        for r in records
        if {f for d in r.data_accessed for f in d.fields_accessed} >= {"close", "sma"}
    ]
    assert len(both) == s.completed > 1000
    bought = [r.decision_point for r in records if r.action == "BUY"]
    assert len(bought) == len(s.bought_at) > 0
    assert type(cerebro.datas[0].lines.close).__name__ == "LineBuffer"


class _CatchesItsOwn(_SmaAgent):
    def next(self) -> None:
        super().next()
        if len(self) == 55:
            try:
                self.notify_timer(None, None)
            except RuntimeError:
                pass

    def notify_timer(self, timer: Any, when: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("caught by next")


class _Phases(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        self.data.close[0]
        if len(self) == 100:
            self.next = self._later  # an agent switching its logic by replacing next

    def _later(self) -> None:
        self.data.open[0]
        self.data.high[0]


def test_an_agent_that_replaces_its_next_during_the_run_keeps_being_recorded() -> None:
    (s,) = _fmel_run(_Phases)
    reads = [r.reads for r in s.analyzers.fmel.records]
    assert reads[:100] == [1] * 100 and reads[100:] == [2] * (2148 - 100)
    assert vars(s)["next"] == s._later  # the agent's own choice, left at stop


def test_a_resampled_or_filtered_feed_records_no_data_hash_and_says_why() -> None:
    # Found by the attack: a weekly bar carried the hash of the daily row with its index.
    for how in ("resample", "replay", "filter"):
        cerebro = bt.Cerebro(stdstats=False)
        feed = make_csv_feed(GOOG, read_csv_bars(GOOG))
        if how == "resample":
            cerebro.resampledata(feed, timeframe=bt.TimeFrame.Weeks, name="GOOG")
        elif how == "replay":
            cerebro.replaydata(feed, timeframe=bt.TimeFrame.Weeks, name="GOOG")
        else:
            feed.addfilter(bt.filters.SessionFilter)
            cerebro.adddata(feed, name="GOOG")
        cerebro.addstrategy(_ReadsClose)
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
        fmel = cerebro.run()[0].analyzers.fmel
        reads = [a for r in fmel.records for d in r.data_accessed for a in d.access_patterns]
        hashes = {a.data_hash for a in reads}
        assert len(reads) > 400 and hashes == {None}, how
        assert any("no data hashes" in g for g in fmel.get_analysis()["tracking_gaps"]), how
    # unfiltered: every read has its row's hash
    plain = _fmel_run(_ReadsClose)[0].analyzers.fmel
    assert None not in {d.data_hash for r in plain.records for d in r.data_accessed}


def test_what_would_lose_or_mix_records_is_refused_at_start(tmp_path: Path) -> None:
    # a second FMEL analyzer on a strategy
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_ReadsClose)
    cerebro.addanalyzer(FMELAnalyzer, _name="a")
    cerebro.addanalyzer(FMELAnalyzer, _name="b")
    with pytest.raises(ValueError, match="_ReadsClose has one already; one per strategy"):
        cerebro.run()
    # a writer never started (the run hung once its queue was full)
    idle = DecisionWriter(LocalDuckDBSink(tmp_path / "idle.duckdb"), spill_dir=tmp_path / "s0")
    with pytest.raises(ValueError, match=r"writer is not running .* writer\.start\(\)"):
        _fmel_run(_ReadsClose, writer=idle)
    # one explicit run given to every run of an optimisation: the same ids each time
    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "s1")
    writer.start()
    try:
        cerebro = bt.Cerebro(stdstats=False, maxcpus=1)
        cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
        cerebro.optstrategy(_SmaAgent, period=[5, 10])
        run = make_run_info(_SmaAgent, session_id="study", agent_id=None, mode="backtest")
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer, run=run)
        with pytest.raises(
            ValueError,
            match=r'_SmaAgent \(params \{"period": 10\}\) would write the same decision ids '
            r'\(study:.*as _SmaAgent \(params \{"period": 5\}\)',
        ):
            cerebro.run()
    finally:
        stats = writer.stop(timeout_s=120)
    assert stats.written == stats.submitted == 2148  # the first run's, once


# -- a second attack (helper-57) ---------------------------------------------------------------


class _Peek(bt.Indicator):  # type: ignore[misc]
    """An indicator that reads the next bar in its own code (a look-ahead bug)."""

    lines = ("peek",)

    def next(self) -> None:
        self.lines.peek[0] = self.data.close[1] if len(self.data) < self.data.buflen() else 0.0


class _UsesPeek(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.peek = _Peek(self.data)

    def next(self) -> None:
        self.peek[0]


class _Empty(bt.Strategy):  # type: ignore[misc]
    pass


@pytest.mark.parametrize("runonce", [True, False])
def test_an_indicators_look_ahead_is_flagged_on_its_own_strategy(runonce: bool) -> None:
    # Found by the attack: with another strategy first, the indicator's future read went to
    # the other strategy's tracker (the shared feed line carried its tags): 0 flagged.
    def flagged(*strategies: type) -> list[int]:
        cerebro = bt.Cerebro(stdstats=False, runonce=runonce)
        cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
        for s in strategies:
            cerebro.addstrategy(s)
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
        return [r.analyzers.fmel.lookahead_total for r in cerebro.run()]

    (alone,) = flagged(_UsesPeek)
    assert alone > 2000
    assert flagged(_Empty, _UsesPeek) == [0, alone]
    assert flagged(_ReadsClose, _UsesPeek) == [0, alone]
    assert flagged(_UsesPeek, _ReadsClose) == [alone, 0]


class _StartSetsNext(bt.Strategy):  # type: ignore[misc]
    def start(self) -> None:
        self.next = self._go  # the class itself defines no next

    def _go(self) -> None:
        self.data.close[0]


class _OrderSwap(_SmaAgent):
    """notify_order as a two-state machine, swapping itself on every notice."""

    def __init__(self) -> None:
        super().__init__()
        self.notify_order = self._h1
        self.made = 0

    def _h1(self, order: Any) -> None:
        self.data.close[0]
        self.made += 1
        self.notify_order = self._h2

    def _h2(self, order: Any) -> None:
        self.data.open[0]
        self.made += 1
        self.notify_order = self._h1


def test_callbacks_the_agent_sets_at_run_time_are_recorded() -> None:
    # Found by the attack: set in start() for a name the class does not define, 0 reads
    # recorded; a notify_order swapping itself lost all but the first notice of a bar.
    (s,) = _fmel_run(_StartSetsNext)
    assert [r.reads for r in s.analyzers.fmel.records] == [1] * 2148
    (o,) = _fmel_run(_OrderSwap)
    reads = sum(r.reads for r in o.analyzers.fmel.records)
    plain = _fmel_run(_SmaAgent)[0].analyzers.fmel.records
    assert o.made > 100 and reads == sum(r.reads for r in plain) + o.made
    assert vars(o)["notify_order"] in (o._h1, o._h2)  # the agent's, at stop


@pytest.mark.parametrize("tzinput", [None, "US/Eastern"])
def test_a_date_window_set_the_backtrader_way_keeps_each_bars_own_hash(
    tzinput: str | None,
) -> None:
    # Found by the attack: with fromdate, every read carried the hash of the row at its bar
    # index counted from the file's first row (backtrader drops rows after _load). With
    # tzinput (the file's times are New York's, backtrader compares them in UTC) all 795 reads
    # still did, until the window was computed from the times as backtrader localises them.
    bars = read_csv_bars(GOOG)
    times = bars.times.astype("datetime64[us]")
    if tzinput is not None:  # the rows' times as backtrader stores them: localised, in UTC
        utc = pd.DatetimeIndex(times).tz_localize(tzinput).tz_convert("UTC").tz_localize(None)
        times = utc.to_numpy().astype("datetime64[us]")
    row_of = {t: i for i, t in enumerate(times.astype("int64"))}
    feed = make_csv_feed(GOOG, bars)
    feed.p.tzinput = tzinput
    feed.p.fromdate = datetime(2010, 1, 1)
    feed.p.todate = datetime(2012, 6, 30)
    (s,) = _fmel_run(_ReadsClose, feed=feed)
    reads = [
        (a.bar_time, a.data_hash)
        for r in s.analyzers.fmel.records
        for d in r.data_accessed
        for a in d.access_patterns
    ]
    assert len(reads) == len(s.analyzers.fmel.records) > 600
    first = datetime.fromtimestamp(reads[0][0], UTC)
    last = datetime.fromtimestamp(reads[-1][0], UTC)
    assert first.date() == date(2010, 1, 4) and last.date() <= date(2012, 6, 30)
    for t, h in reads:
        assert h == bars.hashes[row_of[round(t * 1_000_000)]]


class _Notified(_SmaAgent):
    def notify_store(self, msg: Any, *args: Any, **kwargs: Any) -> None:
        pass  # reads nothing


def test_a_notice_from_another_thread_records_nothing_and_runs_in_threads_are_refused() -> None:
    # Found by the attack: a broker thread calling a wrapped callback switched recording on
    # for the whole process while it ran: backtrader's own reads went into the records.
    stop = threading.Event()
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_Notified)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")

    class Poker(bt.Analyzer):  # type: ignore[misc]
        def start(self) -> None:
            strategy = self.strategy

            def poke() -> None:
                while not stop.is_set():
                    strategy.notify_store("heartbeat")

            threading.Thread(target=poke, daemon=True).start()

    cerebro.addanalyzer(Poker)
    try:
        noisy = cerebro.run()[0].analyzers.fmel
    finally:
        stop.set()
    quiet = _fmel_run(_SmaAgent)[0].analyzers.fmel
    assert _fields(noisy) == _fields(quiet)
    # two FMEL runs at once on two threads share one flag: the second is refused
    started, release = threading.Event(), threading.Event()

    class Slow(_ReadsClose):
        def next(self) -> None:
            super().next()
            if len(self) == 10:
                started.set()
                release.wait(60)

    errors: list[BaseException] = []
    worker = threading.Thread(target=lambda: _fmel_run(Slow), daemon=True)
    worker.start()
    assert started.wait(60)
    try:
        _fmel_run(_ReadsClose)
    except ValueError as e:
        errors.append(e)
    finally:
        release.set()
        worker.join(60)
    assert len(errors) == 1 and "another FMEL run is in progress on another thread" in str(
        errors[0]
    )


class _FailsAtBar10(bt.Indicator):  # type: ignore[misc]
    lines = ("x",)

    def next(self) -> None:
        if len(self) > 10:
            raise RuntimeError("the indicator failed")
        self.x[0] = 1.0


class _WithFailingIndicator(_ReadsClose):
    def __init__(self) -> None:
        self.failing = _FailsAtBar10(self.data)


def test_a_run_that_raised_outside_the_agent_does_not_refuse_a_run_on_another_thread() -> None:
    """A run ended by an indicator's exception (backtrader's call, not the agent's: FMEL does
    not see it end) is kept by its cerebro on the main thread, which lives on; a run on another
    thread afterwards was refused as "in progress" (found reviewing the noted items). Only a run
    whose thread is inside that cerebro's ``runstrategies`` refuses now."""
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_WithFailingIndicator)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    with pytest.raises(RuntimeError, match="the indicator failed"):
        cerebro.run()
    outcome: list[Any] = []

    def other() -> None:
        try:
            outcome.append(_fmel_run(_ReadsClose)[0].analyzers.fmel.decisions)
        except BaseException as e:
            outcome.append(e)

    worker = threading.Thread(target=other)
    worker.start()
    worker.join(120)
    assert outcome == [2148]
    # the case looked at: the failed run's analyzer is still registered as running
    assert any(a.strategy.cerebro is cerebro for a in fmel_module._RUNNING)


def test_a_session_refused_before_its_first_bar_can_be_used_again(tmp_path: Path) -> None:
    # Found by the attack: after a run refused at start, the same run on the same writer was
    # refused for good although nothing had been written under it.
    run = make_run_info(_ReadsClose, session_id="r", agent_id=None, mode="backtest")
    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "s")
    writer.start()
    try:
        with pytest.raises(ValueError, match="would write the same decision ids"):
            _fmel_run(_ReadsClose, _ReadsOpenHigh, writer=writer, run=run)
        (s,) = _fmel_run(_ReadsClose, writer=writer, run=run)
        assert s.analyzers.fmel.decisions == 2148
        with pytest.raises(ValueError, match="would write the same decision ids"):
            _fmel_run(_ReadsClose, writer=writer, run=run)  # written now: refused
    finally:
        stats = writer.stop(timeout_s=120)
    assert stats.written == stats.submitted == 2148


class _DailyAndWeekly(bt.Strategy):  # type: ignore[misc]
    """backtrader's multi-timeframe idiom: ``data0`` daily, ``data1`` its weekly resample, an
    SMA of each kept in a dict keyed by the feeds."""

    def __init__(self) -> None:
        self.sma = {d: bt.ind.SMA(d.close, period=3) for d in self.datas}

    def next(self) -> None:
        self.datas[0].close[0]
        self.datas[1].close[0]
        self.sma[self.datas[1]][0]
        if len(self) == 100:
            self.buy(data=self.datas[1])


def _two_goog(how: str) -> bt.Cerebro:
    cerebro = bt.Cerebro(stdstats=False)
    daily = make_csv_feed(GOOG, read_csv_bars(GOOG))
    cerebro.adddata(daily, name="GOOG")
    if how == "resample":
        cerebro.resampledata(daily, timeframe=bt.TimeFrame.Weeks)
    elif how == "resample_named":
        cerebro.resampledata(daily, timeframe=bt.TimeFrame.Weeks, name="GOOG_W")
    else:  # the same symbol from a second file (here the same rows)
        cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG2")
    cerebro.addstrategy(_DailyAndWeekly)
    return cerebro


@pytest.mark.parametrize(
    ("how", "second"), [("resample", "GOOG#1"), ("resample_named", "GOOG_W"), ("file", "GOOG2")]
)
def test_feeds_that_share_a_symbol_are_recorded_apart(how: str, second: str) -> None:
    # Found by review: reads of a daily feed and of its weekly resample (or of two files of one
    # symbol) were one "GOOG" group of a record, under the daily bar's hash, with bar indexes
    # of either feed; an unnamed resample was recorded as symbol "data".
    cerebro = _two_goog(how)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    strategy = cerebro.run()[0]
    fmel = strategy.analyzers.fmel
    daily, other = strategy.datas
    rec = fmel.records[200]
    by_symbol = {d.symbol: d for d in rec.data_accessed}
    assert list(by_symbol) == ["GOOG", second]
    # each group holds its own feed's reads: the value at the recorded bar of that feed
    for d, feed in ((by_symbol["GOOG"], daily), (by_symbol[second], other)):
        for a in d.access_patterns:
            if a.field == "close":
                assert a.value == feed.close[a.bar_index - len(feed) + 1]
    assert [a.field for a in by_symbol[second].access_patterns] == ["close", "sma"]
    assert by_symbol["GOOG"].data_hash is not None
    if how == "file":
        assert by_symbol[second].data_hash == by_symbol["GOOG"].data_hash  # the same rows
    else:
        assert by_symbol[second].data_hash is None  # a weekly bar is no row of the file
        assert by_symbol[second].access_patterns[0].bar_index < 50  # weeks, not days
    # the order on data1 is recorded under the same symbol as its reads
    orders = [a for r in fmel.records for a in r.actions]
    assert len(orders) >= 2 and {a.symbol for a in orders} == {second}
    assert any(p[0] == second for r in fmel.records for p in r.positions)


def test_feeds_that_share_a_symbol_are_stored_apart_by_the_writer(tmp_path: Path) -> None:
    # the writer's columnar path groups reads by symbol too: the same rows as in memory
    path = tmp_path / "f.duckdb"
    writer = DecisionWriter(LocalDuckDBSink(path), spill_dir=tmp_path / "spill")
    writer.start()
    cerebro = _two_goog("resample")
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer)
    session = cerebro.run()[0].analyzers.fmel.run_info.session_id
    assert writer.stop(timeout_s=300).spilled == 0
    memory = _two_goog("resample")
    memory.addanalyzer(FMELAnalyzer, _name="fmel")
    records = memory.run()[0].analyzers.fmel.records
    import duckdb

    with duckdb.connect(str(path)) as con:
        expected_table(con, records)
        want = con.execute(f"SELECT {_SAME} FROM expected ORDER BY 1").fetchall()
        got = con.execute(
            f"SELECT {_SAME} FROM decisions WHERE session_id = ? ORDER BY 1", [session]
        ).fetchall()
        assert got == want
        symbols = con.execute(
            "SELECT DISTINCT symbol FROM decision_reads WHERE session_id = ? ORDER BY 1",
            [session],
        ).fetchall()
        assert symbols == [("GOOG",), ("GOOG#1",)]


_SYMBOLS = st.sampled_from(["GOOG", "SPY", "GOOG#1", "GOOG_W", ""])


@given(st.lists(st.tuples(_SYMBOLS, _SYMBOLS), max_size=8))
def test_feed_labels_are_distinct_and_keep_every_symbol_they_can(
    feeds: list[tuple[str, str]],
) -> None:
    datas = [SimpleNamespace(symbol=symbol, _name=name) for symbol, name in feeds]
    labels = feed_labels(datas)
    got = [labels[id(d)] for d in datas]
    assert len(set(got)) == len(got)
    symbols = [feed_symbol(d) for d in datas]
    for i, (symbol, label) in enumerate(zip(symbols, got, strict=True)):
        if symbol not in symbols[:i]:
            assert label == symbol  # the first feed of a symbol keeps it
        else:
            assert (label != symbol and label.startswith(symbol)) or label == datas[i]._name


def test_a_clone_is_the_instrument_of_its_source() -> None:
    cerebro = bt.Cerebro()
    daily = make_csv_feed(GOOG, read_csv_bars(GOOG))
    cerebro.adddata(daily, name="GOOG")
    weekly = cerebro.resampledata(daily, timeframe=bt.TimeFrame.Weeks, name="GOOG_W")
    assert feed_symbol(weekly) == "GOOG"  # an order on the weekly bars is an order for GOOG
    assert feed_symbol(cerebro.replaydata(daily, timeframe=bt.TimeFrame.Weeks)) == "GOOG"


class _OddKeys(bt.Strategy):  # type: ignore[misc]
    """Keys backtrader takes that are not ints (found by helper-58's attack)."""

    def next(self) -> None:
        import numpy as np

        if len(self) > 1:
            self.data.close[np.int64(-1)]
        self.data.close[False]
        self.data.high.get(size=3)  # nothing on the first two bars
        self.data.low.get(ago=np.int64(0), size=np.int64(2))
        self.data.volume[np.bool_(False)]  # numpy's bool has no __index__ (helper-61)
        self.data.open.get(ago=-1, size=0)  # no bars: reads nothing (was recorded as a len())


def test_numpy_and_bool_keys_and_empty_windows_are_recorded_as_ints(tmp_path: Path) -> None:
    # Before: index np.int64(-1) / True, bar_index np.int64, lookahead np.False_ in the
    # records; the store refused the batch (ArrowTypeError) and its spill failed too (json),
    # so writer.stop() raised and every record was lost. An empty window got the current
    # bar's index, though the schema says a negative one when no bar was returned.
    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "s")
    writer.start()
    (s,) = _fmel_run(_OddKeys, writer=writer)
    stats = writer.stop(timeout_s=300)
    assert (stats.written, stats.spilled, stats.lost) == (2148, 0, 0)
    import duckdb

    with duckdb.connect(str(tmp_path / "f.duckdb"), read_only=True) as con:
        got = con.execute(
            'SELECT field, "index", size, bar_index FROM decision_reads '
            "WHERE session_id = ? AND decision_point = 0 ORDER BY seq",
            [s.analyzers.fmel.run_info.session_id],
        ).fetchall()
    assert got == [("close", 0, 1, 0), ("high", 0, 3, -1), ("low", 0, 2, -1), ("volume", 0, 1, 0)]
    (m,) = _fmel_run(_OddKeys)
    reads = [
        a for r in m.analyzers.fmel.records for d in r.data_accessed for a in d.access_patterns
    ]
    for a in reads:
        assert (type(a.index), type(a.size), type(a.bar_index), type(a.lookahead)) == (
            int,
            int,
            int,
            bool,
        )
    first = [(a.field, a.index, a.size, a.bar_index, a.value) for a in reads[:4]]
    assert first[:3] == [
        ("close", 0, 1, 0, 100.34),
        ("high", 0, 3, -1, None),
        ("low", 0, 2, -1, None),
    ]
    assert first[3][:4] == ("volume", 0, 1, 0)
    assert not any(a.field in ("open", "len") for a in reads)
    assert sum(a.field == "close" and a.index == -1 for a in reads) == 2147


class _RepliesToFills(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        if len(self) == 5:
            self.buy()

    def notify_order(self, order: Any) -> None:
        if order.status == order.Completed and order.isbuy():
            self.sell()  # in reply to the fill


def test_an_order_placed_in_reply_to_a_fill_follows_it_in_the_actions() -> None:
    # Found by helper-58: backtrader tells the agent before its analyzers, so the reply's
    # CREATED was recorded before the COMPLETED that caused it.
    (s,) = _fmel_run(_RepliesToFills)
    actions = [(a.event, a.side) for r in s.analyzers.fmel.records for a in r.actions]
    assert actions[:5] == [
        ("CREATED", "BUY"),
        ("SUBMITTED", "BUY"),
        ("ACCEPTED", "BUY"),
        ("COMPLETED", "BUY"),
        ("CREATED", "SELL"),
    ]
    assert sum(e == ("COMPLETED", "BUY") for e in actions) == 1  # recorded once


def test_a_date_window_across_a_daylight_saving_change_keeps_each_bars_own_hash(
    tmp_path: Path,
) -> None:
    # Found by helper-61: half-hourly New York times over the spring change; 02:00 and 02:30
    # do not exist and localise to 07:00Z/07:30Z, after the 03:00 EDT row (07:00Z). backtrader
    # drops the 03:00 row for fromdate 07:15Z although a row before it is kept; each later bar
    # carried the hash of the row before its own.
    path = tmp_path / "X.csv"
    rows = [f"2021-03-14 {h:02d}:{m:02d}:00" for h in range(8) for m in (0, 30)]
    path.write_text(
        "Date,Open,High,Low,Close,Volume\n"
        + "".join(f"{t},{100 + i},{100 + i},{100 + i},{100 + i},1\n" for i, t in enumerate(rows))
    )
    cfg = CSVFeedConfig(path=path, symbol="X")
    bars = read_csv_bars(cfg)
    for preload in (True, False):
        feed = make_csv_feed(cfg, bars)
        feed.p.tzinput = "US/Eastern"
        feed.p.fromdate = datetime(2021, 3, 14, 7, 15)
        cerebro = bt.Cerebro(stdstats=False, preload=preload)
        cerebro.adddata(feed, name="X")
        cerebro.addstrategy(_ReadsClose)
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
        fmel = cerebro.run()[0].analyzers.fmel
        reads = [r.data_accessed[0].access_patterns[0] for r in fmel.records]
        delivered = [int(a.value) - 100 for a in reads]
        assert delivered == [5, *range(7, 16)], preload  # row 6 (07:00Z) before fromdate
        for a, row in zip(reads, delivered, strict=True):
            assert a.data_hash == bars.hashes[row], (preload, row)


def test_a_csv_config_takes_a_path_as_text() -> None:
    # helper-61's side note: CSVFeedConfig(path="data/GOOG.csv") failed in read_csv_bars
    # ("'str' object has no attribute 'name'")
    cfg = CSVFeedConfig(path=str(DATA / "GOOG.csv"), symbol="GOOG")
    assert cfg.path == DATA / "GOOG.csv" and len(read_csv_bars(cfg).times) == 2148
    with pytest.raises(ConfigError, match=r"CSVFeedConfig\.path: expected a file path, got int"):
        CSVFeedConfig(path=3, symbol="GOOG")  # type: ignore[arg-type]


class _StartPrimes(_SmaAgent):
    """``start()`` primes its state by calling ``next()`` in ``try`` (no bar yet: it raises)."""

    def start(self) -> None:
        try:
            self.next()
        except (IndexError, RuntimeError):
            pass


class _StopRaises(_SmaAgent):
    def stop(self) -> None:
        raise RuntimeError("a bug in the agent's stop")


def test_a_caught_exception_in_a_call_the_agents_start_makes_does_not_end_the_recording() -> None:
    """helper-118: the wrappers of the agent's start() and stop() did not count as the agent's
    call, so next() raising inside start()'s ``try`` counted as escaping: 64 records without
    a read."""
    s = _fmel_run(_StartPrimes)[0]
    primed, plain = _fields(s.analyzers.fmel), _fields(_fmel_run(_SmaAgent)[0].analyzers.fmel)
    assert primed[1:] == plain[1:] and sum(map(len, plain)) > 4000
    # start()'s own read, before any bar (the preloaded buffer's last bar: a look-ahead),
    # goes with the first decision, which it came before
    assert primed[0] == [("GOOG", "close", len(s) - 1)] and plain[0] == []
    assert s.analyzers.fmel.records[0].lookahead_reads == 1


def test_an_exception_out_of_the_agents_stop_removes_the_tracking() -> None:
    """helper-118: stop() is called by backtrader outside the bar calls, unwrapped; what it
    raised left the tracked lines, a frozen heap (~123,000 objects with gc_freeze) and the run
    registered as running."""
    import gc

    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(GOOG, read_csv_bars(GOOG)), name="GOOG")
    cerebro.addstrategy(_StopRaises)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", gc_freeze=True)
    frozen = gc.get_freeze_count()
    # analyzers of earlier tests' failed runs stay registered until the collector takes them
    # (tests/unit/test_record_c.py's run before this one in some orders)
    earlier = set(fmel_module._RUNNING)
    with pytest.raises(RuntimeError, match="agent's stop"):
        cerebro.run()
    assert type(cerebro.datas[0].lines.close).__name__ == "LineBuffer"
    assert gc.get_freeze_count() == frozen
    assert set(fmel_module._RUNNING) <= earlier


class _BuyReplacedInStart(_SmaAgent):
    """Replaces ``buy`` on the instance in ``start()``, after FMEL's start wrapped it."""

    def start(self) -> None:
        self.buy = self._limit_buy

    def _limit_buy(self, **kw: Any) -> Any:
        return bt.Strategy.buy(self, **kw)


def test_an_order_call_replaced_in_start_keeps_its_events_and_is_told() -> None:
    """helper-120 F6: ``self.buy`` replaced in ``start()`` overwrote FMEL's order wrapper:
    no CREATED event and no BUY action for any of the agent's ~1,000 buys, nothing told. It
    is wrapped again after start() and told, as a replacement made in ``__init__`` is."""
    s = _fmel_run(_BuyReplacedInStart)[0]
    plain = _fmel_run(_SmaAgent)[0]
    actions = [r.action for r in s.analyzers.fmel.records]
    assert actions == [r.action for r in plain.analyzers.fmel.records]
    assert actions.count("BUY") > 10
    gaps = s.analyzers.fmel.get_analysis()["tracking_gaps"]
    assert any(
        g.startswith("the agent replaces buy() (_BuyReplacedInStart._limit_buy)") for g in gaps
    )


class _ReferencePrice(_SmaAgent):
    """Backtrader's "reference price" idiom in ``start()``: with preloaded data the buffer's
    last bar, the future."""

    def start(self) -> None:
        self.ref = self.data.close[0]


def test_a_read_in_start_is_recorded_with_the_first_decision_as_a_look_ahead() -> None:
    """helper-120 F9: start() ran with the tracking off, so this read, the preloaded buffer's
    last close (806.19 for GOOG, whose first close is 100.34), was neither recorded nor
    flagged."""
    s = _fmel_run(_ReferencePrice)[0]
    first = s.analyzers.fmel.records[0]
    (read,) = [a for d in first.data_accessed for a in d.access_patterns]
    assert (read.field, read.value, read.lookahead) == ("close", s.ref, True)
    assert read.bar_index == len(s) - 1 and first.lookahead_reads == 1


class _WrapsBuyInStart(_SmaAgent):
    """Wraps the ``buy`` it finds in ``start()`` (FMEL's wrapper by then) in its own."""

    def start(self) -> None:
        found = self.buy

        def logged_buy(*args: Any, **kwargs: Any) -> Any:
            return found(*args, **kwargs)

        self.buy = logged_buy


class _BuyReturnsPair(_SmaAgent):
    """A ``buy()`` override placing an entry and a protective stop, returning both."""

    placed: list[int]

    def buy(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        main = super().buy(*args, **kwargs)
        stop = self.sell(exectype=bt.Order.Stop, price=self.data.close[0] * 0.9)
        self.placed = [*getattr(self, "placed", []), main.ref, stop.ref]
        return main, stop


class _DeletesBuyInStart(_SmaAgent):
    def start(self) -> None:
        self.__dict__.pop("buy", None)


class _RestartsFromNext(_SmaAgent):
    """``next()`` calls ``self.start()`` to reset, inside ``try``; start() raises early on."""

    def start(self) -> None:
        if 0 < len(self) < 30:
            raise ValueError("too few bars to reset")

    def next(self) -> None:
        if len(self) % 10 == 0:
            try:
                self.start()
            except ValueError:
                pass
        super().next()


def _created(s: Any) -> list[tuple[int, str | None]]:
    """(decision, side) of each CREATED event (order refs run on across runs)."""
    return [
        (r.decision_point, a.side)
        for r in s.analyzers.fmel.records
        for a in r.actions
        if a.event == "CREATED"
    ]


def test_order_calls_wrapped_in_start_or_returning_pairs_record_each_order_once() -> None:
    """helper-122 F5, F6, F8: a buy wrapped in start() around the buy found there recorded
    each CREATED twice; a buy() override returning (entry, stop) made the run raise
    AttributeError where backtrader ran; deleting the wrapper in start() lost every CREATED."""
    plain = _created(_fmel_run(_SmaAgent)[0])
    for agent in (_WrapsBuyInStart, _DeletesBuyInStart):
        assert _created(_fmel_run(agent)[0]) == plain, agent
    pair = _fmel_run(_BuyReturnsPair)[0]
    refs = [
        a.order_ref for r in pair.analyzers.fmel.records for a in r.actions if a.event == "CREATED"
    ]
    assert len(refs) == len(set(refs)) > len(plain)  # each once
    # every entry and stop the override placed (an entry was lost once the stop, placed
    # through the wrapped sell() inside it, had been recorded)
    assert set(pair.placed) <= set(refs) and len(pair.placed) > 100


def test_start_called_from_next_in_try_leaves_the_recording_alone() -> None:
    """helper-122 F7: next() calling self.start() in try (start raising while few bars) ended
    the recording from decision 9 on: 0 reads, 0 CREATED, 131 orders filled."""
    s = _fmel_run(_RestartsFromNext)[0]
    records = s.analyzers.fmel.records
    assert all(r.data_accessed for r in records[20:])
    assert _created(s) == _created(_fmel_run(_SmaAgent)[0])
