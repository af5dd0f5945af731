"""A read-heavy agent and its decision records: ~130 reads per decision over six daily feeds.

:class:`ReadHeavyAgent` reads the last ``depth`` closes and a moving average of every feed at
each bar (6 feeds x 21 reads = 126 reads), like a ranking agent looking back a month; its
records are about 26 kB as full JSON rows. ``sleep_s`` paces a runner subprocess so a test can
act while the run is in progress (``AGENT=tests.bq_read_heavy:ReadHeavyAgent``).

:func:`six_feed_data_dir` makes a ``DATA_DIR`` with six real daily files (the bundled SP500 and
NASDAQ files under six symbols), and :func:`read_heavy_records` runs the agent in memory (no
writer) for sink tests and the benchmark.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import backtrader as bt

from tests.conftest import DATA

# Six symbols over two real daily files (1999-2018, the same trading days).
SIX_FEEDS: dict[str, str] = {
    "SP500": "SP500",
    "NASDAQ": "NASDAQ",
    "SPXA": "SP500",
    "NDXA": "NASDAQ",
    "SPXB": "SP500",
    "NDXB": "NASDAQ",
}


class ReadHeavyAgent(bt.Strategy):  # type: ignore[misc]
    """Reads ``close[0]`` .. ``close[-(depth-2)]`` (fewer in the first bars) and a 10-bar SMA of
    every feed at each bar;
    buys the first feed on every 50th bar and sells it 10 bars later (so some records have
    orders). Params: depth (int, reads per feed), sleep_s (float, wall-clock pause per bar)."""

    params = (("depth", 21), ("sleep_s", 0.0))

    def __init__(self) -> None:
        self.smas = [bt.ind.SMA(d.close, period=10) for d in self.datas]
        self.bars = 0

    def next(self) -> None:
        self.bars += 1
        for data, sma in zip(self.datas, self.smas, strict=True):
            for i in range(min(self.p.depth - 1, len(data))):  # never before the first bar
                _ = data.close[-i]
            _ = sma[0]
        if self.bars % 50 == 0:
            self.buy(data=self.datas[0], size=1)
        elif self.bars % 50 == 10:
            self.sell(data=self.datas[0], size=1)
        if self.p.sleep_s:
            time.sleep(self.p.sleep_s)


def six_feed_data_dir(folder: Path) -> tuple[Path, str]:
    """Copy the bundled files into ``folder`` under the six symbols; returns ``(folder,
    "SP500,NASDAQ,...")`` for ``DATA_DIR`` and ``SYMBOLS``."""
    folder.mkdir(parents=True, exist_ok=True)
    for symbol, source in SIX_FEEDS.items():
        shutil.copyfile(DATA / f"{source}.csv", folder / f"{symbol}.csv")
    return folder, ",".join(SIX_FEEDS)


def read_heavy_records(
    session_id: str = "heavy", start: str = "2017-01-01", end: str = "2018-12-31"
) -> list[Any]:
    """Decision records of :class:`ReadHeavyAgent` on the six feeds between ``start`` and
    ``end`` (bar dates, UTC), kept in memory by the FMEL analyzer."""
    from analyzers.fmel import FMELAnalyzer, make_run_info
    from feeds.csv import CSVFeedConfig, make_csv_feed

    cerebro = bt.Cerebro(stdstats=False)
    for symbol, source in SIX_FEEDS.items():
        cfg = CSVFeedConfig(
            path=DATA / f"{source}.csv",
            symbol=symbol,
            start=datetime.fromisoformat(start).replace(tzinfo=UTC),
            end=datetime.fromisoformat(end).replace(tzinfo=UTC),
        )
        cerebro.adddata(make_csv_feed(cfg), name=symbol)
    cerebro.broker.setcash(100_000.0)
    cerebro.addstrategy(ReadHeavyAgent)
    run = make_run_info(ReadHeavyAgent, session_id=session_id, agent_id=None, mode="backtest")
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=None, run=run)
    strategy = cerebro.run()[0]
    return list(strategy.analyzers.fmel.records)
