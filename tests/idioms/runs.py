"""Running a corpus case with and without FMEL, and what each run gives back."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import backtrader as bt

from analyzers.fmel import FMELAnalyzer
from feeds.csv import CSVBars, CSVFeedConfig, make_csv_feed, read_csv_bars
from tests.idioms.harness import (
    DATA,
    Entry,
    FeedSpec,
    ReadLog,
    at_day_end,
    load_hfeed,
    value_key,
)

SP500 = FeedSpec("SP500.csv", "SP500", "%m/%d/%Y")
NASDAQ = FeedSpec("NASDAQ.csv", "NASDAQ", "%m/%d/%Y")
GOOG = FeedSpec("enriched/GOOG.csv", "GOOG")
GOOG_PLAIN = FeedSpec("GOOG.csv", "GOOG")
EURUSD = FeedSpec("EURUSD.csv", "EURUSD")
BTCUSD = FeedSpec("BTCUSD.csv", "BTC/USD")


@dataclass(frozen=True)
class Case:
    """One corpus run: the agent, its feeds (data0 first), the dates, cerebro options and
    anything else the case adds to cerebro (sizers, analyzers, broker settings)."""

    agent: type
    feeds: tuple[FeedSpec, ...] = (SP500, NASDAQ)
    start: datetime = datetime(2004, 6, 1)
    end: datetime = datetime(2005, 1, 31)
    runonce: bool = True
    cerebro: tuple[tuple[str, Any], ...] = ()
    setup: Callable[[bt.Cerebro], None] | None = None
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def id(self) -> str:
        parts = [self.agent.__name__, "once" if self.runonce else "next"]
        parts += [str(v) for _, v in self.params]
        if self.setup is not None:
            parts.append(self.setup.__name__.strip("_"))
        return "-".join(parts)


@functools.cache
def _bars(spec: FeedSpec, start: datetime, end: datetime) -> CSVBars:
    cfg = CSVFeedConfig(
        path=DATA / spec.file,
        symbol=spec.symbol,
        datetime_format=spec.datetime_format,
        start=start,
        end=end,
    )
    return read_csv_bars(cfg)


class OrderLog(bt.Analyzer):  # type: ignore[misc]
    """Every order and trade notification, with order refs numbered from 0 in this run."""

    def start(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self._refs: dict[int, int] = {}

    def _ref(self, ref: int) -> int:
        return self._refs.setdefault(ref, len(self._refs))

    def notify_order(self, order: Any) -> None:
        self.events.append(
            (
                "order",
                self._ref(order.ref),
                order.getstatusname(),
                order.ordtypename(),
                order.getordername(),
                order.data._name,
                order.created.size,
                value_key(order.created.price),
                order.executed.size,
                value_key(order.executed.price),
                value_key(order.executed.comm),
            )
        )

    def notify_trade(self, trade: Any) -> None:
        self.events.append(
            (
                "trade",
                trade.status,
                trade.data._name,
                value_key(trade.pnl),
                value_key(trade.pnlcomm),
            )
        )


@dataclass
class Outcome:
    """What one run gave: order events, final value and cash, the agent's own read log, and
    (with FMEL) the recorded reads flattened like :data:`~tests.idioms.harness.Entry`."""

    events: list[tuple[Any, ...]]
    value: float
    cash: float
    expected: list[Entry]
    recorded: list[Entry] = field(default_factory=list)
    records: list[Any] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    strategy: Any = None


def flatten(records: list[Any]) -> list[Entry]:
    """Recorded reads as harness entries, one per read and source feed."""
    out: list[Entry] = []
    for rec in records:
        for da in rec.data_accessed:
            for a in da.access_patterns:
                out.append(
                    (
                        rec.bar_time,
                        a.seq,
                        da.symbol,
                        a.field,
                        a.index,
                        a.size,
                        a.bar_index,
                        a.data_hash,
                        value_key(a.value),
                        a.text_value,
                        a.lookahead,
                        a.bar_time,
                    )
                )
    return sorted(out, key=lambda e: (e[0], e[1], e[2]))


def run_case(case: Case, fmel: bool, **analyzer_kw: Any) -> Outcome:
    """Run ``case`` once, with the FMEL analyzer (records kept in memory) or without."""
    cerebro = bt.Cerebro(stdstats=False, runonce=case.runonce, **dict(case.cerebro))
    feeds = {}
    for spec in case.feeds:
        cerebro.adddata(make_csv_feed_for(spec, case), name=spec.symbol)
        feeds[spec.symbol] = load_hfeed(spec, case.start, case.end)
    feeds = at_day_end(feeds)
    log = ReadLog(feeds=feeds, runonce=case.runonce)
    cerebro.addstrategy(case.agent, reads=log, **dict(case.params))
    cerebro.broker.setcash(100_000.0)
    cerebro.broker.setcommission(commission=0.001)
    if case.setup is not None:
        case.setup(cerebro)
    cerebro.addanalyzer(OrderLog, _name="orderlog")
    if fmel:
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel", **analyzer_kw)
    strategy = cerebro.run()[0]
    out = Outcome(
        events=strategy.analyzers.orderlog.events,
        value=cerebro.broker.getvalue(),
        cash=cerebro.broker.getcash(),
        expected=sorted(log.entries, key=lambda e: (e[0], e[1], e[2])),
        strategy=strategy,
    )
    if fmel:
        out.records = strategy.analyzers.fmel.records
        out.recorded = flatten(out.records)
        out.gaps = list(strategy.analyzers.fmel.tracker.gaps)
    return out


def make_csv_feed_for(spec: FeedSpec, case: Case) -> Any:
    cfg = CSVFeedConfig(
        path=DATA / spec.file,
        symbol=spec.symbol,
        datetime_format=spec.datetime_format,
        start=case.start,
        end=case.end,
    )
    return make_csv_feed(cfg, _bars(spec, case.start, case.end))
