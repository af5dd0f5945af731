"""Access tracking: every kind of read an agent makes is recorded with the bar it read."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import backtrader as bt
import pytest
from backtrader.linebuffer import LineBuffer

from analyzers.fmel import FMELAnalyzer
from analyzers.schema import DecisionRecord
from core.errors import LookAheadError
from feeds.csv import CSVBars, CSVFeedConfig, make_csv_feed, read_csv_bars
from tests.conftest import DATA

ENRICHED = CSVFeedConfig(path=DATA / "enriched" / "GOOG.csv", symbol="GOOG")
SP500 = CSVFeedConfig(path=DATA / "SP500.csv", symbol="SP500")


@pytest.fixture(scope="module")
def bars() -> dict[str, CSVBars]:
    return {"GOOG": read_csv_bars(ENRICHED), "SP500": read_csv_bars(SP500)}


def run(agent: type, bars: dict[str, CSVBars], **analyzer_kw: Any) -> tuple[Any, list[Any]]:
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(ENRICHED, bars["GOOG"]), name="GOOG")
    cerebro.adddata(make_csv_feed(SP500, bars["SP500"]), name="SP500")
    cerebro.addstrategy(agent)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", **analyzer_kw)
    strategy = cerebro.run()[0]
    return strategy, strategy.analyzers.fmel.records


class Reader(bt.Strategy):  # type: ignore[misc]
    """Reads one of every kind at decision 300 and remembers what it got."""

    got: ClassVar[dict[str, Any]] = {}
    calls = 0

    def next(self) -> None:
        self.calls += 1
        if self.calls != 300:
            return
        d = self.data
        Reader.got = {
            "close0": d.close[0],
            "close1": d.close[-1],
            "rsi": self.datas[0].rsi[0],
            "window": list(d.close.get(size=5)),
            "len": len(d),
            "byname": self.getdatabyname("SP500").close[0],
            "regime": d.regime[0],
            "item": d[0],
        }


def test_every_kind_of_read_is_recorded(bars: dict[str, CSVBars]) -> None:
    _, records = run(Reader, bars)
    rec = next(r for r in records if r.reads)
    got = Reader.got
    assert rec.reads == 8 and rec.stage == "NEXT"
    by_symbol = {d.symbol: d for d in rec.data_accessed}
    goog, spx = by_symbol["GOOG"], by_symbol["SP500"]
    assert goog.fields_accessed == ("close", "rsi", "len", "regime")
    pats = goog.access_patterns
    n = got["len"]  # bars GOOG has delivered at this decision
    h = bars["GOOG"].hashes
    assert [(p.field, p.index, p.size, p.bar_index) for p in pats] == [
        ("close", 0, 1, n - 1),
        ("close", -1, 1, n - 2),
        ("rsi", 0, 1, n - 1),
        ("close", 0, 5, n - 1),
        ("len", 0, 1, n - 1),
        ("regime", 0, 1, n - 1),
        ("close", 0, 1, n - 1),
    ]
    # the hash is that of the bar actually read, not just the current one
    assert [p.data_hash for p in pats] == [
        h[n - 1],
        h[n - 2],
        h[n - 1],
        h[n - 1],
        h[n - 1],
        h[n - 1],
        h[n - 1],
    ]
    assert goog.data_hash == h[n - 1]
    assert [p.value for p in pats[:4]] == [
        got["close0"],
        got["close1"],
        got["rsi"],
        got["window"][-1],
    ]
    assert pats[4].value == float(n) and pats[5].text_value == got["regime"] is not None
    assert spx.fields_accessed == ("close",) and spx.access_patterns[0].value == got["byname"]
    assert (
        spx.access_patterns[0].data_hash == bars["SP500"].hashes[spx.access_patterns[0].bar_index]
    )
    assert [p.seq for d in rec.data_accessed for p in d.access_patterns] == [0, 1, 2, 3, 4, 6, 7, 5]


class IndicatorOnly(bt.Strategy):  # type: ignore[misc]
    """Owns an SMA but reads nothing; buys once (the broker reads prices to fill it)."""

    def __init__(self) -> None:
        self.sma = bt.ind.SMA(self.data.close, period=20)
        self.done = False

    def next(self) -> None:
        if not self.done:
            self.done = True
            self.buy(size=1)


def test_reads_by_indicators_broker_and_order_creation_are_not_attributed(
    bars: dict[str, CSVBars],
) -> None:
    _, records = run(IndicatorOnly, bars)
    assert sum(r.reads for r in records) == 0
    assert any(r.action == "BUY" for r in records)


class SmaReader(IndicatorOnly):
    def next(self) -> None:
        if not self.done:
            self.done = True
            self.seen = self.sma[0]


def test_agent_owned_indicator_reads_are_attributed_to_the_symbol(bars: dict[str, CSVBars]) -> None:
    strategy, records = run(SmaReader, bars)
    rec = next(r for r in records if r.reads)
    (da,) = rec.data_accessed
    assert da.symbol == "GOOG" and da.fields_accessed == ("sma",)
    assert da.access_patterns[0].value == strategy.seen


class Peeker(bt.Strategy):  # type: ignore[misc]
    def nextstart(self) -> None:
        self.future = self.data.close[1]


def test_lookahead_is_flagged_and_warned(
    bars: dict[str, CSVBars], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="analyzers.tracking"):
        _, records = run(Peeker, bars)
    rec = next(r for r in records if r.reads)
    assert rec.lookahead_reads == 1
    assert rec.data_accessed[0].access_patterns[0].lookahead is True
    assert "look-ahead: agent read GOOG.close[1]" in caplog.text


def test_strict_lookahead_raises(bars: dict[str, CSVBars]) -> None:
    with pytest.raises(LookAheadError, match=r"GOOG.close\[1\]"):
        run(Peeker, bars, strict_lookahead=True)


def test_lines_get_their_class_back_after_the_run(bars: dict[str, CSVBars]) -> None:
    strategy, _ = run(Reader, bars)
    for data in strategy.datas:
        assert all(type(line) is LineBuffer for line in data.lines)


def test_records_are_immutable(bars: dict[str, CSVBars]) -> None:
    _, records = run(Reader, bars)
    rec: DecisionRecord = records[0]
    with pytest.raises(AttributeError):
        rec.action = "BUY"  # type: ignore[misc]
