"""The corpus: every case is an agent of :mod:`tests.idioms.agents` on real bundled data."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import backtrader as bt

from tests.idioms import agents as a
from tests.idioms.runs import BTCUSD, EURUSD, GOOG, GOOG_PLAIN, SP500, Case


def _longonly(c: bt.Cerebro) -> None:
    c.addsizer(a.LongOnly)


def _percent(c: bt.Cerebro) -> None:
    c.addsizer(bt.sizers.PercentSizer, percents=10)


def _reverser(c: bt.Cerebro) -> None:
    c.addsizer(bt.sizers.FixedReverser, stake=5)


def _analyzers(c: bt.Cerebro) -> None:
    c.addanalyzer(bt.analyzers.SharpeRatio, _name="sharpe")
    c.addanalyzer(bt.analyzers.DrawDown, _name="dd")
    c.addanalyzer(bt.analyzers.TradeAnalyzer, _name="trades")
    c.addanalyzer(bt.analyzers.TimeReturn, _name="ret", timeframe=bt.TimeFrame.Months)


GOOG_2005: dict[str, Any] = dict(
    feeds=(GOOG,), start=datetime(2005, 1, 1), end=datetime(2005, 9, 30)
)
LATE_START: dict[str, Any] = dict(
    feeds=(SP500, GOOG), start=datetime(2004, 8, 2), end=datetime(2004, 12, 31)
)

CASES: list[Case] = [
    Case(a.QuickstartDowns),
    Case(a.QuickstartDowns, runonce=False),
    Case(a.QuickstartSma),
    Case(a.SmaCross),
    Case(a.LinesOpSignal),
    Case(a.LinesOpSignal, runonce=False),
    Case(a.DeltaLines),
    Case(a.LogicLines),
    Case(a.LogicLines, runonce=False),
    Case(a.MacdLines),
    Case(a.Bollinger),
    Case(a.Oscillators),
    Case(a.AtrStop),
    Case(a.IchimokuCloud),
    Case(a.IchimokuCloud, runonce=False),
    Case(a.Donchian),
    Case(a.CustomIndicators),
    Case(a.CustomIndicators, runonce=False),
    Case(a.PeekAhead),
    Case(a.PeekAhead, runonce=False),
    Case(a.HiddenIndicators),
    Case(a.ItemForms),
    Case(a.Windows, **GOOG_2005),
    Case(a.PrenextUnstarted, **LATE_START),
    Case(a.PrenextUnstarted, runonce=False, params=(("read_indicator", False),), **LATE_START),
    Case(a.OrderTarget, params=(("kind", "size"),)),
    Case(a.OrderTarget, params=(("kind", "value"),)),
    Case(a.OrderTarget, params=(("kind", "percent"),)),
    Case(a.SizerCloseSma, setup=_longonly),
    Case(a.SizerCloseSma, setup=_percent),
    Case(a.SizerCloseSma, setup=_reverser),
    *(
        Case(a.OrderExecution, params=(("exectype", kind),))
        for kind in (
            "Market",
            "Close",
            "Limit",
            "Stop",
            "StopLimit",
            "StopTrail",
            "StopTrailLimit",
        )
    ),
    Case(a.Bracket),
    Case(a.Bracket, params=(("usebracket", False),)),
    Case(a.Oco),
    Case(a.CancelStale),
    Case(a.TradeNotes),
    Case(a.CheatOnOpen, cerebro=(("cheat_on_open", True),)),
    Case(a.MonthlyTimer),
    Case(a.WithAnalyzers, setup=_analyzers),
    Case(a.MultiDataInds),
    Case(a.MultiDataSignal),
    Case(a.PairsSpread),
    Case(a.UnalignedSpread, runonce=False, **LATE_START),
    Case(
        a.MonthlyFilter,
        feeds=(GOOG_PLAIN, BTCUSD),
        start=datetime(2012, 2, 1),
        end=datetime(2013, 2, 28),
        runonce=False,
    ),
    Case(a.HourlyFX, feeds=(EURUSD,), start=datetime(2017, 5, 1), end=datetime(2017, 5, 31)),
    Case(
        a.MonthlyMomentum, feeds=(BTCUSD,), start=datetime(2015, 1, 1), end=datetime(2020, 12, 31)
    ),
    Case(a.LenAndStages),
    Case(a.LenAndStages, runonce=False),
]
