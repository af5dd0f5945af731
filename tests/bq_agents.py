"""Agents for the BigQuery/SQL tests (``AGENT=tests.bq_agents:PeekingSmaAgent``)."""

from __future__ import annotations

from typing import Any

from agents.sma_cross import SmaCrossAgent


class PeekingSmaAgent(SmaCrossAgent):
    """The SMA-cross agent plus reads the SQL questions are about: every ``every`` bars a
    ``window``-bar window and ``close[-depth]`` of the first feed, and at its ``peek_at``-th
    ``next()`` one look-ahead read (``close[1]``, possible only in a preloaded backtest)."""

    params = (("every", 7), ("depth", 5), ("window", 3), ("peek_at", 40))  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def next(self) -> None:
        self.calls += 1
        data = self.datas[0]
        if self.calls % self.p.every == 0:
            _ = data.close.get(size=self.p.window)
            _ = data.close[-self.p.depth]
        if self.calls == self.p.peek_at:
            _ = data.close[1]
        super().next()


def real_records(
    session_id: str = "bq-test",
    start: str = "2010-01-01",
    end: str = "2010-12-31",
    symbols: tuple[str, ...] = ("GOOG", "SP500"),
) -> list[Any]:
    """Decision records of a real backtest (bundled CSVs, :class:`PeekingSmaAgent`), kept in
    memory by the FMEL analyzer (no writer): material for sink tests."""
    from datetime import UTC, datetime

    import backtrader as bt

    from analyzers.fmel import FMELAnalyzer, make_run_info
    from feeds.csv import CSVFeedConfig, make_csv_feed
    from runtime.config import BUNDLED_DATA_DIR

    def _parse_utc(day: str) -> datetime:
        return datetime.fromisoformat(day).replace(tzinfo=UTC)

    cerebro = bt.Cerebro(stdstats=False)
    for sym in symbols:
        cerebro.adddata(
            make_csv_feed(
                CSVFeedConfig(
                    path=BUNDLED_DATA_DIR / f"{sym}.csv",
                    symbol=sym,
                    start=_parse_utc(start),
                    end=_parse_utc(end),
                )
            ),
            name=sym,
        )
    cerebro.broker.setcash(100_000.0)
    cerebro.addstrategy(PeekingSmaAgent)
    run = make_run_info(PeekingSmaAgent, session_id=session_id, agent_id=None, mode="backtest")
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=None, run=run)
    strategy = cerebro.run()[0]
    return list(strategy.analyzers.fmel.records)
