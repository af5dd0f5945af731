"""Historical CSV feed: both shipped formats, options, dynamic/text fields, bad rows."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import backtrader as bt
import pytest

from core.bars import bar_hash
from core.errors import DataError
from feeds.csv import make_csv_feed, read_csv_bars
from runtime.config import CSVFeedConfig
from tests.conftest import DATA


def cfg(path: Path, symbol: str = "X", **kw: object) -> CSVFeedConfig:
    return CSVFeedConfig(path=path, symbol=symbol, **kw)  # type: ignore[arg-type]


def test_backtesting_py_format_loads_unedited() -> None:
    bars = read_csv_bars(cfg(DATA / "GOOG.csv", "GOOG"))
    assert len(bars) == 2148 and bars.extra_fields == () and not bars.text
    assert (bars.timeframe, bars.compression) == (bt.TimeFrame.Days, 1)
    assert bars.numeric["close"][0] == 100.34 and bars.numeric["volume"][-1] == 2175400
    assert str(bars.times[0]) == "2004-08-19T00:00:00.000000000"


def test_yahoo_format_with_m_d_y_dates_and_adj_close() -> None:
    bars = read_csv_bars(cfg(DATA / "SP500.csv", "SP500"))
    assert len(bars) == 5031 and bars.extra_fields == ("adj_close",)
    assert str(bars.times[0])[:10] == "1999-01-04" and str(bars.times[-1])[:10] == "2018-12-31"


def test_bar_size_inferred_for_hourly_and_monthly() -> None:
    eur = read_csv_bars(cfg(DATA / "EURUSD.csv", "EUR/USD"))
    assert (eur.timeframe, eur.compression) == (bt.TimeFrame.Minutes, 60)
    btc = read_csv_bars(cfg(DATA / "BTCUSD.csv", "BTC/USD"))
    assert (btc.timeframe, btc.compression) == (bt.TimeFrame.Months, 1)
    forced = read_csv_bars(cfg(DATA / "BTCUSD.csv", "BTC/USD", bar_size="1w"))
    assert (forced.timeframe, forced.compression) == (bt.TimeFrame.Weeks, 1)


def test_options_column_names_format_timezone(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text(
        "when;px_o;px_h;px_l;px_c;qty\n"
        "19.08.2004 09:30;100;104;95;100.5;10\n"
        "19.08.2004 10:30;100.5;101;99;100;11\n".replace(";", ",")
    )
    bars = read_csv_bars(
        cfg(
            p,
            "GOOG",
            datetime_column="when",
            datetime_format="%d.%m.%Y %H:%M",
            timezone="America/New_York",
            columns={
                "open": "px_o",
                "high": "px_h",
                "low": "px_l",
                "close": "px_c",
                "volume": "qty",
            },
        )
    )
    assert str(bars.times[0]) == "2004-08-19T13:30:00.000000000"  # EDT -> UTC
    assert bars.extra_fields == ()
    assert (bars.timeframe, bars.compression) == (bt.TimeFrame.Minutes, 60)


def test_dynamic_numeric_nested_and_text_fields() -> None:
    bars = read_csv_bars(cfg(DATA / "enriched" / "GOOG.csv", "GOOG"))
    assert bars.extra_fields == ("rsi", "signals_momentum_20")
    assert list(bars.text) == ["regime"]
    assert bars.text["regime"][0] is None and bars.text["regime"][-1] in ("up", "down")


def test_hash_is_content_addressed_and_matches_a_message_of_the_same_bar(tmp_path: Path) -> None:
    bars = read_csv_bars(cfg(DATA / "GOOG.csv", "GOOG"))
    expected = bar_hash(
        "GOOG",
        datetime(2004, 8, 19, tzinfo=UTC),
        {"open": 100, "high": 104.06, "low": 95.96, "close": 100.34, "volume": 22351900},
    )
    assert bars.hashes[0] == expected
    # the same bar at another file position hashes the same
    lines = (DATA / "GOOG.csv").read_text().splitlines()
    p = tmp_path / "GOOG.csv"
    p.write_text("\n".join([lines[0], *lines[1:3][::-1]]) + "\n")
    with pytest.raises(DataError):
        read_csv_bars(cfg(p, "GOOG"))  # reversed order is itself an error...
    p.write_text("\n".join([lines[0], lines[1]]) + "\n")
    assert read_csv_bars(cfg(p, "GOOG")).hashes[0] == expected


BAD_ROWS = [
    ("2004-08-20,101,99,100,100,5", "line 3: high 99.0 < low 100.0"),
    ("2004-08-20,101,102,100,nan,5", "line 3: close is missing or NaN"),
    ("2004-08-20,101,102,100,abc,5", "line 3: close 'abc' is not a number"),
    ("2004-08-20,-1,102,100,101,5", "line 3: open -1.0 is not positive"),
    ("2004-13-45,101,102,100,101,5", "line 3: unparsable date '2004-13-45'"),
    ("2004-08-19,101,102,100,101,5", "line 3: duplicate timestamp"),
    ("2004-08-18,101,102,100,101,5", "line 3: timestamp goes backwards"),
]


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_bad_rows_raise_with_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    p = tmp_path / "BAD.csv"
    p.write_text(
        f"Date,Open,High,Low,Close,Volume\n2004-08-19,100,104,95,100,10\n{row}\n"
        "2004-08-23,100,104,95,100,10\n"
    )
    with pytest.raises(DataError) as err:
        read_csv_bars(cfg(p))
    assert f"CSV BAD.csv {message}" in str(err.value)
    assert "CSV_ON_BAD_ROWS=skip" in str(err.value)


def test_bad_rows_skipped_and_counted_when_chosen(tmp_path: Path) -> None:
    p = tmp_path / "BAD.csv"
    p.write_text(
        "Date,Open,High,Low,Close,Volume\n2004-08-19,100,104,95,100,10\n"
        + "\n".join(r for r, _ in BAD_ROWS)
        + "\n2004-08-23,100,104,95,100,10\n"
    )
    bars = read_csv_bars(cfg(p, on_bad_rows="skip"))
    assert len(bars) == 2  # nothing changed, only skipped
    assert [line for line, _ in bars.skipped] == list(range(3, 3 + len(BAD_ROWS)))
    assert bars.numeric["close"].tolist() == [100.0, 100.0]


def test_missing_price_column_is_named(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("Date,Open,High,Close\n2004-08-19,1,2,1.5\n")
    with pytest.raises(DataError, match="no column for low"):
        read_csv_bars(cfg(p))


def test_reserved_field_name_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.csv"
    p.write_text("Date,Open,High,Low,Close,Volume,Lines\n2004-08-19,1,2,0.5,1.5,3,4\n")
    with pytest.raises(DataError, match="reserves"):
        read_csv_bars(cfg(p))


def test_feed_serves_lines_text_and_hashes_in_backtrader() -> None:
    c = cfg(DATA / "enriched" / "GOOG.csv", "GOOG")
    bars = read_csv_bars(c)
    seen: list[tuple[float, float, str | None, str | None]] = []

    class Probe(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            d = self.data
            seen.append((d.close[0], d.rsi[0], d.regime[0], d.bar_hashes.at(len(d) - 1)))

    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(c, bars), name="GOOG")
    cerebro.addstrategy(Probe)
    cerebro.run()
    assert len(seen) == len(bars)
    assert seen[-1][0] == bars.numeric["close"][-1] and seen[-1][1] == bars.numeric["rsi"][-1]
    assert seen[-1][2] == bars.text["regime"][-1]
    assert [s[3] for s in seen] == bars.hashes


def test_date_range_bounds(tmp_path: Path) -> None:
    bars = read_csv_bars(
        cfg(
            DATA / "GOOG.csv",
            "GOOG",
            start=datetime(2010, 1, 1, tzinfo=UTC),
            end=datetime(2010, 12, 31, tzinfo=UTC),
        )
    )
    assert str(bars.times[0])[:4] == "2010" and str(bars.times[-1])[:10] == "2010-12-31"
