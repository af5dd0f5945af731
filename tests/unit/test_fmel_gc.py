"""The FMEL analyzer, asked to (``gc_freeze=True``; off by default, on in the runner's
backtests), freezes the garbage collector's heap and
raises its young threshold during a run, and leaves the collector as it found it: unfrozen and
the threshold back after the last analyzer stops, untouched when something else froze it or
the collector is off, and the records are the same either way."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import backtrader as bt
import pytest

from agents.sma_cross import SmaCrossAgent
from analyzers.fmel import GC_YOUNG_THRESHOLD, FMELAnalyzer
from feeds.csv import CSVBars, CSVFeedConfig, make_csv_feed, read_csv_bars
from tests.conftest import DATA

REPO = Path(__file__).resolve().parents[2]

FEEDS = [CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s) for s in ("GOOG", "SP500")]


@pytest.fixture(scope="module")
def bars() -> dict[str, CSVBars]:
    return {c.symbol: read_csv_bars(c) for c in FEEDS}


@pytest.fixture(autouse=True)
def _collector_restored() -> Iterator[None]:
    assert gc.get_freeze_count() == 0, "a test before this one left the heap frozen"
    enabled = gc.isenabled()
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)
    if enabled:
        gc.enable()


class Watching(SmaCrossAgent):
    """The example agent, noting at its first and 1,000th bar how many objects the collector
    has frozen (``gc.get_freeze_count()`` walks them all: not every bar)."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen: list[int] = []
        self.thresholds: list[int] = []
        self.bars = 0

    def next(self) -> None:
        self.bars += 1
        if self.bars in (1, 1_000):
            self.frozen.append(gc.get_freeze_count())
            self.thresholds.append(gc.get_threshold()[0])
        super().next()


def run(bars: dict[str, CSVBars], strategies: int = 1, **params: Any) -> list[Any]:
    cerebro = bt.Cerebro(stdstats=False)
    for c in FEEDS:
        cerebro.adddata(make_csv_feed(c, bars[c.symbol]), name=c.symbol)
    for _ in range(strategies):
        cerebro.addstrategy(Watching)
    params.setdefault("gc_freeze", True)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", **params)
    return list(cerebro.run())


def records(strategy: Any) -> list[Any]:
    """The records without what differs between two runs anyway: the wall-clock time, the
    session (a new one each run) and backtrader's order refs (a process-wide counter)."""
    return [
        r._replace(
            ts=0.0,
            run=r.run._replace(session_id="s"),
            actions=tuple(a._replace(order_ref=0) for a in r.actions),
        )
        for r in strategy.analyzers.fmel.records
    ]


def test_frozen_during_the_run_and_unfrozen_after(bars: dict[str, CSVBars]) -> None:
    before = gc.get_threshold()
    (strategy,) = run(bars)
    assert len(strategy.frozen) == 2 and min(strategy.frozen) > 0
    assert set(strategy.thresholds) == {GC_YOUNG_THRESHOLD} != {before[0]}
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_off_when_asked(bars: dict[str, CSVBars]) -> None:
    before = gc.get_threshold()
    (strategy,) = run(bars, gc_freeze=False)
    assert set(strategy.frozen) == {0}
    assert set(strategy.thresholds) == {before[0]}


def test_off_by_default_and_on_for_the_runners_backtests(bars: dict[str, CSVBars]) -> None:
    """Process-wide, so opt-in; the runner's backtest (a process that ends with its run) opts
    in, live runs and optimize trials do not."""
    from runtime.assembly import add_fmel

    cerebro = bt.Cerebro(stdstats=False)
    for c in FEEDS:
        cerebro.adddata(make_csv_feed(c, bars[c.symbol]), name=c.symbol)
    cerebro.addstrategy(Watching)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    (strategy,) = cerebro.run()
    assert set(strategy.frozen) == {0}
    for mode, on in (("backtest", True), ("paper", False), ("optimize", False)):
        cerebro = bt.Cerebro(stdstats=False)
        add_fmel(
            cerebro,
            SmaCrossAgent,
            agent_params={},
            writer=None,  # type: ignore[arg-type]
            session_id="s",
            agent_id=None,
            mode=mode,
            strict_lookahead=False,
        )
        ((_, _, kwargs),) = cerebro.analyzers
        assert kwargs["gc_freeze"] is on, mode


def test_a_higher_threshold_is_kept_and_one_changed_during_the_run_is_left(
    bars: dict[str, CSVBars],
) -> None:
    gc.set_threshold(50_000, 10, 10)
    (strategy,) = run(bars)
    assert set(strategy.thresholds) == {50_000} and min(strategy.frozen) > 0
    assert gc.get_threshold() == (50_000, 10, 10)

    class Retuning(Watching):
        def next(self) -> None:
            if self.bars == 10:
                gc.set_threshold(900, 11, 12)  # the agent's own choice
            super().next()

    gc.set_threshold(700, 10, 10)
    cerebro = bt.Cerebro(stdstats=False)
    for c in FEEDS:
        cerebro.adddata(make_csv_feed(c, bars[c.symbol]), name=c.symbol)
    cerebro.addstrategy(Retuning)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", gc_freeze=True)
    cerebro.run()
    assert gc.get_threshold() == (900, 11, 12)


def test_a_collector_switched_off_by_its_threshold_is_left_alone(
    bars: dict[str, CSVBars],
) -> None:
    gc.set_threshold(0)
    (strategy,) = run(bars)
    assert set(strategy.frozen) == {0} and set(strategy.thresholds) == {0}
    assert gc.get_threshold()[0] == 0


def test_records_are_the_same_frozen_or_not(bars: dict[str, CSVBars]) -> None:
    (frozen,) = run(bars)
    (plain,) = run(bars, gc_freeze=False)
    same = records(frozen) == records(plain)  # not in the assert: pytest's diff of 5,000
    assert same  # records takes minutes
    assert len(records(frozen)) > 100 and any(r.actions for r in records(frozen))


def test_two_strategies_unfreeze_after_the_last(bars: dict[str, CSVBars]) -> None:
    first, second = run(bars, strategies=2)
    assert min(first.frozen) > 0 and min(second.frozen) > 0
    assert gc.get_freeze_count() == 0


def test_a_freeze_made_by_someone_else_is_left_alone(bars: dict[str, CSVBars]) -> None:
    """The count alone cannot say it: frozen objects still die in a run (the whole suite's
    heap lost 2 of 886,336 in one CI run), so the check follows two objects. ``gc.get_objects()``
    lists the three generations, not the permanent one (CPython's ``gc_get_objects_impl``)."""
    frozen_before = [object()]  # a container, so the collector tracks it
    gc.freeze()
    made_after = [object()]
    before = gc.get_freeze_count()
    run(bars)
    listed = {id(o) for o in gc.get_objects()}
    assert id(frozen_before) not in listed  # nothing unfroze the caller's freeze
    assert id(made_after) in listed  # the analyzer froze nothing of its own
    assert 0 < gc.get_freeze_count() <= before


def test_a_disabled_collector_is_left_alone(bars: dict[str, CSVBars]) -> None:
    gc.disable()
    (strategy,) = run(bars)
    assert set(strategy.frozen) == {0}
    assert not gc.isenabled()


class Failing(SmaCrossAgent):
    def next(self) -> None:
        self.bars = getattr(self, "bars", 0) + 1
        if self.bars == 200:
            raise RuntimeError("agent bug")
        super().next()


def test_an_agent_that_raises_leaves_the_collector_as_it_was(bars: dict[str, CSVBars]) -> None:
    before = gc.get_threshold()
    cerebro = bt.Cerebro(stdstats=False)
    for c in FEEDS:
        cerebro.adddata(make_csv_feed(c, bars[c.symbol]), name=c.symbol)
    cerebro.addstrategy(Failing)
    cerebro.addstrategy(SmaCrossAgent)  # its analyzer held the freeze too (attack)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", gc_freeze=True)
    with pytest.raises(RuntimeError, match="agent bug"):
        cerebro.run()
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


def _python(script: Path) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter with the repository importable; exit 0 asserted."""
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out


def test_a_run_that_ended_without_stop_does_not_keep_its_cerebro_alive(tmp_path: Path) -> None:
    """The freeze's holders are weak: once the user unfreezes and drops the cerebro of an
    interrupted run, it is collected (an attack: the holder list kept it for good). In a
    fresh interpreter: pytest's own bookkeeping of a test's exceptions keeps frames alive."""
    script = tmp_path / "dropped.py"
    script.write_text(
        "import gc, weakref\n"
        "import backtrader as bt\n"
        "from tests.unit.test_fmel_gc import FEEDS, FailingAnalyzer, Watching\n"
        "from analyzers.fmel import FMELAnalyzer\n"
        "from feeds.csv import make_csv_feed, read_csv_bars\n"
        "cerebro = bt.Cerebro(stdstats=False)\n"
        "for c in FEEDS:\n"
        "    cerebro.adddata(make_csv_feed(c, read_csv_bars(c)), name=c.symbol)\n"
        "cerebro.addstrategy(Watching)\n"
        "cerebro.addanalyzer(FMELAnalyzer, gc_freeze=True)\n"
        "cerebro.addanalyzer(FailingAnalyzer)\n"
        "try:\n"
        "    cerebro.run()\n"
        "except RuntimeError:\n"
        "    pass\n"
        "(strategy,) = cerebro.runningstrats\n"
        "gone = weakref.ref(strategy)\n"
        "del strategy, cerebro\n"
        "gc.unfreeze()\n"
        "gc.collect()\n"
        "print('collected', gone() is None)\n",
        encoding="utf-8",
    )
    out = _python(script)
    assert "collected True" in out.stdout


class FailingAnalyzer(bt.Analyzer):  # type: ignore[misc]
    def next(self) -> None:
        if len(self.strategy) == 200:
            raise RuntimeError("analyzer bug")


def test_a_run_that_raised_does_not_leave_the_heap_frozen_past_the_next_run(
    bars: dict[str, CSVBars],
) -> None:
    cerebro = bt.Cerebro(stdstats=False)
    for c in FEEDS:
        cerebro.adddata(make_csv_feed(c, bars[c.symbol]), name=c.symbol)
    cerebro.addstrategy(Watching)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", gc_freeze=True)
    cerebro.addanalyzer(FailingAnalyzer)
    with pytest.raises(RuntimeError, match="analyzer bug"):
        cerebro.run()
    # not out of the agent's calls: stop() never ran, still frozen; the next run finds the
    # hold stale and starts over
    assert gc.get_freeze_count() > 0
    (strategy,) = run(bars)
    assert min(strategy.frozen) > 0
    assert gc.get_freeze_count() == 0


def test_the_collector_is_put_back_at_exit_after_a_run_that_raised(tmp_path: Path) -> None:
    """Frozen at exit, the interpreter's last collection skips the heap and DuckDB's bindings
    report their objects as leaked; the analyzer puts the collector back at exit."""
    script = tmp_path / "raises.py"
    script.write_text(
        "import atexit, gc, sys\n"
        # registered first, so it runs last (atexit runs the newest first)
        "atexit.register(lambda: print('frozen at exit', gc.get_freeze_count()))\n"
        "from tests.unit.test_fmel_gc import FEEDS, FailingAnalyzer, Watching\n"
        "import backtrader as bt\n"
        "from analyzers.fmel import FMELAnalyzer\n"
        "from feeds.csv import make_csv_feed, read_csv_bars\n"
        "cerebro = bt.Cerebro(stdstats=False)\n"
        "for c in FEEDS:\n"
        "    cerebro.adddata(make_csv_feed(c, read_csv_bars(c)), name=c.symbol)\n"
        "cerebro.addstrategy(Watching)\n"
        "cerebro.addanalyzer(FMELAnalyzer, gc_freeze=True)\n"
        "cerebro.addanalyzer(FailingAnalyzer)\n"
        "try:\n"
        "    cerebro.run()\n"
        "except RuntimeError:\n"
        "    print('raised, frozen', gc.get_freeze_count() > 0)\n",
        encoding="utf-8",
    )
    out = _python(script)
    assert "raised, frozen True" in out.stdout
    assert "frozen at exit 0" in out.stdout


def test_a_run_nested_in_another_keeps_the_outer_freeze(bars: dict[str, CSVBars]) -> None:
    inner: list[int] = []

    class Outer(Watching):
        def start(self) -> None:
            run(bars)  # a whole run inside this one's start: the outer hold is live
            inner.append(gc.get_freeze_count())

    cerebro = bt.Cerebro(stdstats=False)
    for c in FEEDS:
        cerebro.adddata(make_csv_feed(c, bars[c.symbol]), name=c.symbol)
    cerebro.addstrategy(Outer)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", gc_freeze=True)
    (strategy,) = cerebro.run()
    assert min(strategy.frozen) > 0
    assert gc.get_freeze_count() == 0
