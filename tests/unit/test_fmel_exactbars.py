"""``exactbars=1``: backtrader keeps each line only as long as what reads it needs, so a feed's
datetime buffer can be shorter than its close's. Found by a fresh-context attack: an agent
reading ``close[-5]`` beside an ``SMA(10)`` made FMEL's resolution index the datetime buffer out
of range, and the run died (without FMEL it ran). Now such a read is recorded with its bar,
value and look-ahead flag, its time NULL, and a tracking gap says why."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import backtrader as bt
import pytest

from analyzers.fmel import FMELAnalyzer
from runtime.config import BUNDLED_DATA_DIR


class _Agent(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.sma = bt.ind.SMA(self.data.close, period=10)

    def next(self) -> None:
        self.data.close[-5] + self.data.close[0] + self.sma[0]


def _run(exactbars: int) -> tuple[list[Any], list[str]]:
    cerebro = bt.Cerebro(stdstats=False, exactbars=exactbars)
    cerebro.adddata(
        bt.feeds.GenericCSVData(
            dataname=str(BUNDLED_DATA_DIR / "GOOG.csv"),
            dtformat="%Y-%m-%d",
            datetime=0,
            open=1,
            high=2,
            low=3,
            close=4,
            volume=5,
            openinterest=-1,
            fromdate=datetime(2005, 1, 1),
            todate=datetime(2005, 3, 1),
        ),
        name="GOOG",
    )
    cerebro.addstrategy(_Agent)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    fmel = cerebro.run()[0].analyzers.fmel
    return list(fmel.records), list(fmel.tracker.gaps)


@pytest.mark.parametrize("exactbars", [1, -1])
def test_reads_older_than_the_datetime_buffer(exactbars: int) -> None:
    bounded, gaps = _run(exactbars)
    full, _ = _run(0)
    assert len(bounded) == len(full) > 0

    def accesses(records: list[Any]) -> list[Any]:
        return [a for r in records for g in r.data_accessed for a in g.access_patterns]

    got, want = accesses(bounded), accesses(full)
    assert len(got) == len(want)
    gone = 0
    for a, b in zip(got, want, strict=True):
        # the same bar, value and flag; the time is the right one, or NULL when it is gone
        assert (a.field, a.index, a.bar_index, a.value, a.lookahead) == (
            b.field,
            b.index,
            b.bar_index,
            b.value,
            b.lookahead,
        )
        assert a.bar_time in (b.bar_time, None)
        gone += a.bar_time is None
    if exactbars == 1:
        assert gone > 0, "no read older than the datetime buffer: the case tests nothing"
        assert any("fewer bar times" in g for g in gaps)
