"""runtime.reporting.bars: the bars a run saw, recorded with the index and data hash FMEL uses,
for feeds that start on different dates; and the session_bars table (DuckDB) written
idempotently."""

from __future__ import annotations

from pathlib import Path

import backtrader as bt
import duckdb
import numpy as np
import pandas as pd
import pytest

from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
from runtime.reporting.bars import BAR_COLUMNS, BarRecorder, write_bars_duckdb
from tests.conftest import DATA


@pytest.mark.parametrize("runonce", [True, False])
def test_every_bar_of_every_feed_with_its_hash(runonce: bool) -> None:
    cerebro = bt.Cerebro(stdstats=False, runonce=runonce)
    csv = {}
    for symbol in ("GOOG", "SP500"):  # GOOG starts in 2004, SP500 in 1999
        cfg = CSVFeedConfig(
            path=DATA / f"{symbol}.csv",
            symbol=symbol,
            end=pd.Timestamp("2006-01-01", tz="UTC").to_pydatetime(),
        )
        bars = read_csv_bars(cfg)
        csv[symbol] = bars
        cerebro.adddata(make_csv_feed(cfg, bars), name=symbol)
    cerebro.addstrategy(bt.Strategy)
    cerebro.addanalyzer(BarRecorder, _name="bars")
    frame = cerebro.run()[0].analyzers.bars.frame("s1")
    assert list(frame.columns) == list(BAR_COLUMNS)
    for symbol, bars in csv.items():
        got = frame[frame["symbol"] == symbol]
        assert got["bar_index"].tolist() == list(range(len(bars)))
        assert got["data_hash"].tolist() == list(bars.hashes)
        want_times = pd.DatetimeIndex(bars.times).tz_localize("UTC")
        assert (pd.DatetimeIndex(got["bar_time"]) == want_times).all()
        np.testing.assert_allclose(got["close"].to_numpy(), bars.numeric["close"])
        assert set(got["bar_size"]) == {"1d"} and set(got["session_id"]) == {"s1"}


def test_write_bars_duckdb_replaces_a_sessions_rows(tmp_path: Path) -> None:
    rows = pd.DataFrame(
        {
            "session_id": ["s1", "s1"],
            "symbol": ["A", "A"],
            "bar_size": ["1d", "1d"],
            "bar_index": [0, 1],
            "bar_time": pd.to_datetime(["2024-01-01", "2024-01-02"], utc=True),
            "open": [1.0, 2.0],
            "high": [1.0, 2.0],
            "low": [1.0, 2.0],
            "close": [1.0, 2.0],
            "volume": [10.0, 20.0],
            "data_hash": ["h0", "h1"],
        }
    )
    con = duckdb.connect(str(tmp_path / "f.duckdb"))
    try:
        assert write_bars_duckdb(con, rows) == 2
        assert write_bars_duckdb(con, rows) == 2  # a second write replaces, never duplicates
        other = rows.assign(session_id="s2")
        write_bars_duckdb(con, other)
        counts = con.execute(
            "SELECT session_id, count(*) FROM session_bars GROUP BY 1 ORDER BY 1"
        ).fetchall()
    finally:
        con.close()
    assert counts == [("s1", 2), ("s2", 2)]
