"""Historical CSV feed: both shipped formats, options, dynamic/text fields, bad rows."""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from pathlib import Path
from typing import Any

import backtrader as bt
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.bars import bar_hash
from core.errors import ConfigError, DataError
from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
from feeds.csv.reader import HASH_BLOCK, RowHashes
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


def _spaced(folder: Path, name: str, stamps: pd.DatetimeIndex) -> Path:
    lines = ["datetime,open,high,low,close,volume"]
    lines += [f"{t.isoformat()},10,11,9,10.5,100" for t in stamps]
    path = folder / f"{name}.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    ("freq", "size"),
    [
        # found by an attack (helper-65): bars 500 ms apart were inferred as one second, so a
        # missing bar was never noted (the spacing was cut to whole seconds before the median)
        ("500ms", (bt.TimeFrame.MicroSeconds, 500_000)),
        ("1ms", (bt.TimeFrame.MicroSeconds, 1_000)),
        ("999ms", (bt.TimeFrame.MicroSeconds, 999_000)),
        # helper-66: 1.5 s and 2.5 s bars were both taken as 2 s, 90 s as 2 minutes
        ("1500ms", (bt.TimeFrame.MicroSeconds, 1_500_000)),
        ("2500ms", (bt.TimeFrame.MicroSeconds, 2_500_000)),
        ("1s", (bt.TimeFrame.Seconds, 1)),
        ("90s", (bt.TimeFrame.Seconds, 90)),
        ("4h", (bt.TimeFrame.Minutes, 240)),
    ],
)
def test_bar_size_inferred_below_a_minute(tmp_path: Path, freq: str, size: tuple[int, int]) -> None:
    stamps = pd.date_range("2024-01-02 10:00", periods=20, freq=freq)
    bars = read_csv_bars(cfg(_spaced(tmp_path, "X", stamps)))
    assert (bars.timeframe, bars.compression) == size


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("500ms", (bt.TimeFrame.MicroSeconds, 500_000)),
        ("250 MS", (bt.TimeFrame.MicroSeconds, 250_000)),
        ("30s", (bt.TimeFrame.Seconds, 30)),
        ("2h", (bt.TimeFrame.Minutes, 120)),
        ("1mo", (bt.TimeFrame.Months, 1)),
    ],
)
def test_declared_bar_sizes(text: str, size: tuple[int, int]) -> None:
    from feeds.csv.reader import bar_size_text, parse_bar_size, parse_bar_size_text

    assert parse_bar_size(text) == size
    assert parse_bar_size_text(bar_size_text(*size)) == size


@pytest.mark.parametrize(
    ("freq", "declared", "warned"),
    [
        ("5min", "1min", True),  # helper-65: noted as missing four steps in five, nothing said
        ("1min", "5min", True),  # bars closer than their size
        ("1min", "1min", False),
        ("1h", "60min", False),
        ("500ms", "500ms", False),
        ("1s", "500ms", True),
        ("MS", "1mo", False),  # months of 28 to 31 days
        ("W-FRI", "1w", False),
        ("B", "1d", False),  # weekends: a median of one day
        ("B", "1w", True),
    ],
)
def test_a_declared_bar_size_that_is_not_the_files_spacing_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, freq: str, declared: str, warned: bool
) -> None:
    stamps = pd.date_range("2024-01-01", periods=40, freq=freq)
    path = _spaced(tmp_path, "X", stamps)
    with caplog.at_level("WARNING", logger="feeds.csv.reader"):
        bars = read_csv_bars(cfg(path, bar_size=declared))
    from feeds.csv.reader import parse_bar_size

    assert (bars.timeframe, bars.compression) == parse_bar_size(declared)  # as declared
    said = [r.getMessage() for r in caplog.records if "CSV_BAR_SIZE" in r.getMessage()]
    assert bool(said) == warned, said
    if warned:
        assert said[0].startswith(f"CSV X.csv: CSV_BAR_SIZE={declared}, but its bars are ")


def test_a_thin_market_lacking_some_bars_is_not_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    minutes = pd.date_range("2024-01-02 14:30", periods=60, freq="1min")
    thin = minutes.delete(list(range(1, 60, 3)))  # a third of the minutes: a median of 2 min
    with caplog.at_level("WARNING", logger="feeds.csv.reader"):
        read_csv_bars(cfg(_spaced(tmp_path, "X", thin), bar_size="1min"))
    assert not [r for r in caplog.records if "CSV_BAR_SIZE" in r.getMessage()]


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
    with pytest.raises(DataError, match="reserved name"):
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


# --- the cases of issue 11 -------------------------------------------------------------------

HEAD = "Date,Open,High,Low,Close,Volume\n"
GOOD = "2020-01-0{d},1,2,0.5,1.5,10\n"


def write(tmp_path: Path, text: str, name: str = "T.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_zero_byte_file_is_named(tmp_path: Path) -> None:
    p = write(tmp_path, "")
    with pytest.raises(DataError, match=r"^CSV T\.csv line 1: the file is empty \(0 bytes\)"):
        read_csv_bars(cfg(p, on_bad_rows="skip"))


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32-le"])
def test_a_utf16_file_is_named_with_or_without_its_byte_order_mark(
    tmp_path: Path, encoding: str
) -> None:
    # found by an attack (helper-59): without a byte-order mark the header was read as names
    # with NULs between their letters ("no column for open, ...")
    p = tmp_path / "T.csv"
    p.write_bytes((HEAD + GOOD.format(d=1) + GOOD.format(d=2)).encode(encoding))
    with pytest.raises(
        DataError, match=r"^CSV T\.csv line 1: the (file is|header holds NUL).*UTF-16"
    ):
        read_csv_bars(cfg(p, on_bad_rows="skip"))


@pytest.mark.parametrize(("value", "reason"), [("inf", "is infinite"), ("1e400", "is infinite")])
def test_infinite_prices_are_bad_rows_skipped_when_asked(
    tmp_path: Path, value: str, reason: str
) -> None:
    p = write(tmp_path, HEAD + GOOD.format(d=1) + f"2020-01-02,1,{value},0.5,1.5,10\n")
    with pytest.raises(DataError, match=rf"^CSV T\.csv line 3: high {reason}"):
        read_csv_bars(cfg(p))
    bars = read_csv_bars(cfg(p, on_bad_rows="skip"))
    assert len(bars) == 1 and bars.skipped == [(3, f"high {reason}")]


def test_blank_lines_do_not_shift_line_numbers(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + GOOD.format(d=1) + "\n  \n\n" + "2020-01-02,1,2,0.5,x,10\n")
    with pytest.raises(DataError, match=r"^CSV T\.csv line 6: close 'x' is not a number"):
        read_csv_bars(cfg(p))
    crlf = write(
        tmp_path,
        (HEAD + GOOD.format(d=1) + "\n2020-01-02,1,2,0.5,x,10\n").replace("\n", "\r\n"),
        "CRLF.csv",
    )
    with pytest.raises(DataError, match=r"^CSV CRLF\.csv line 4: close 'x'"):
        read_csv_bars(cfg(crlf))


def test_a_quoted_line_break_counts_as_a_line(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "Date,Open,High,Low,Close,Volume,note\n"
        '2020-01-01,1,2,0.5,1.5,10,"two\nlines"\n'
        "2020-01-02,1,2,0.5,9,10,x\n",
    )
    with pytest.raises(DataError, match=r"^CSV T\.csv line 4: close 9\.0 outside"):
        read_csv_bars(cfg(p))


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("2020-01-02,1,2,0.5,1.5", "5 fields where the header has 6 (missing fields)"),
        ("2020-01-02,1,2,0.5,1.5,10,7", "7 fields where the header has 6 (extra fields)"),
    ],
)
def test_a_row_with_a_field_missing_or_extra_is_a_bad_row(
    tmp_path: Path, row: str, reason: str
) -> None:
    p = write(tmp_path, HEAD + GOOD.format(d=1) + row + "\n")
    with pytest.raises(DataError, match=rf"^CSV T\.csv line 3: {re.escape(reason)}"):
        read_csv_bars(cfg(p))
    bars = read_csv_bars(cfg(p, on_bad_rows="skip"))
    assert len(bars) == 1 and bars.skipped == [(3, reason)]


def test_two_columns_with_one_field_name_are_both_named(tmp_path: Path) -> None:
    p = write(tmp_path, "Date,Open,High,Low,Close,Adj Close,adj_close\n2020-01-01,1,2,.5,1,1,1\n")
    with pytest.raises(DataError) as err:
        read_csv_bars(cfg(p))
    assert "line 1: columns 'Adj Close' and 'adj_close' would both become field 'adj_close'" in (
        str(err.value).replace('"', "'")
    )
    assert "CSV_COLUMNS" in str(err.value)
    bars = read_csv_bars(cfg(p, columns={"adj_close": "Adj Close", "adj_close_2": "adj_close"}))
    assert bars.extra_fields == ("adj_close", "adj_close_2")


def test_open_or_close_outside_the_range_is_a_bad_row(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + "2020-01-01,3,2,0.5,1.5,10\n")
    with pytest.raises(DataError, match=r"line 2: open 3\.0 outside \[low 0\.5, high 2\.0\]"):
        read_csv_bars(cfg(p))


def _dates(days: range, fmt: str) -> str:
    return HEAD + "".join(f"{datetime(2020, 2, d):{fmt}},1,2,0.5,1.5,10\n" for d in days)


def test_ambiguous_day_month_order_is_refused_unless_the_format_is_given(tmp_path: Path) -> None:
    p = write(tmp_path, _dates(range(1, 11), "%d/%m/%Y"))  # 01/02/2020 ... 10/02/2020
    with pytest.raises(DataError) as err:
        read_csv_bars(cfg(p))
    assert "line 2: dates like '01/02/2020' could be day first or month first" in str(err.value)
    assert "CSV_DATETIME_FORMAT" in str(err.value)
    bars = read_csv_bars(cfg(p, datetime_format="%d/%m/%Y"))
    assert str(bars.times[0])[:10] == "2020-02-01" and str(bars.times[-1])[:10] == "2020-02-10"


def test_unambiguous_day_month_order_is_decided_by_the_data(tmp_path: Path) -> None:
    day_first = read_csv_bars(cfg(write(tmp_path, _dates(range(10, 15), "%d/%m/%Y"), "D.csv")))
    month_first = read_csv_bars(cfg(write(tmp_path, _dates(range(10, 15), "%m/%d/%Y"), "M.csv")))
    assert day_first.times.tolist() == month_first.times.tolist()
    assert str(day_first.times[0])[:10] == "2020-02-10"
    both = write(tmp_path, HEAD + "13/01/2020,1,2,.5,1,1\n01/14/2020,1,2,.5,1,1\n", "B.csv")
    with pytest.raises(DataError, match="line 2: '13/01/2020' is day first but line 3"):
        read_csv_bars(cfg(both))


def test_iso_offsets_among_naive_times_are_converted(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        HEAD
        + "2020-01-02 09:30:00,1,2,0.5,1.5,10\n"
        + "2020-01-02T10:30:00-05:00,1,2,0.5,1.5,10\n"  # aware: its own offset
        + "2020-01-02T16:30:00Z,1,2,0.5,1.5,10\n"
        + "2020-01-02 12:30,1,2,0.5,1.5,10\n",
    )
    bars = read_csv_bars(cfg(p, timezone="America/New_York"))
    assert [str(t)[11:16] for t in bars.times] == ["14:30", "15:30", "16:30", "17:30"]
    utc_file = write(
        tmp_path,
        HEAD + "2020-01-02 09:30,1,2,.5,1,1\n2020-01-02T11:30:00+01:00,1,2,.5,1,1\n",
        "U.csv",
    )
    assert [str(t)[11:16] for t in read_csv_bars(cfg(utc_file)).times] == ["09:30", "10:30"]


def test_dates_without_a_time_are_not_mistaken_for_offsets(tmp_path: Path) -> None:
    # " 2020-01-02" (spaces: the row-by-row path) ends in "-02", which is not an offset
    p = write(tmp_path, HEAD + " 2020-01-02 ,1,2,.5,1,1\n2020-01-03T00:00+01:00,1,2,.5,1,1\n")
    bars = read_csv_bars(cfg(p, timezone="Europe/Berlin"))
    assert [str(t)[:16] for t in bars.times] == ["2020-01-01T23:00", "2020-01-02T23:00"]


def test_a_time_skipped_by_daylight_saving_is_named(tmp_path: Path) -> None:
    p = write(tmp_path, HEAD + "2021-03-14 01:30,1,2,.5,1,1\n2021-03-14 02:30,1,2,.5,1,1\n")
    with pytest.raises(DataError, match="line 3: time '2021-03-14 02:30' does not exist"):
        read_csv_bars(cfg(p, timezone="America/New_York"))


@pytest.mark.parametrize(
    ("zone", "day", "utc"),
    [
        # Santiago skips 2024-09-08 00:00-01:00: the day begins at 01:00 -03
        ("America/Santiago", "2024-09-08", "2024-09-08T04:00"),
        # Havana repeats 2024-11-03 00:00-01:00: the day begins at its first midnight (-04)
        ("America/Havana", "2024-11-03", "2024-11-03T04:00"),
    ],
)
def test_a_date_whose_midnight_daylight_saving_skips_is_its_days_first_instant(
    tmp_path: Path, zone: str, day: str, utc: str
) -> None:
    # Found by an attack (helper-59): a daily file of dates in America/Santiago was refused
    # at the day clocks go forward at midnight ("does not exist"), though a date names a day.
    before = (date.fromisoformat(day) - timedelta(days=1)).isoformat()
    after = (date.fromisoformat(day) + timedelta(days=1)).isoformat()
    rows = "".join(f"{d},1,2,.5,1,1\n" for d in (before, day, after))
    bars = read_csv_bars(cfg(write(tmp_path, HEAD + rows), timezone=zone))
    assert str(bars.times[1])[:16] == utc and bars.date_only
    # a time of day is not a date: a skipped or repeated midnight stays a bad row
    stamped = HEAD + f"{before} 00:00,1,2,.5,1,1\n{day} 00:00,1,2,.5,1,1\n{day} 12:00,1,2,.5,1,1\n"
    with pytest.raises(DataError, match=f"line 3: time '{day} 00:00' does not exist or exists"):
        read_csv_bars(cfg(write(tmp_path, stamped), timezone=zone))


# --- data hashes: lazy, and equal to the Pub/Sub path's -----------------------------------


def test_hashes_are_computed_on_first_use_only() -> None:
    bars = read_csv_bars(cfg(DATA / "GOOG.csv", "GOOG"))
    hashes = bars.hashes
    assert isinstance(hashes, RowHashes) and "0 computed" in repr(hashes)
    # computed on first use, a block of HASH_BLOCK bars at a time: only the last bar's block
    last_block = (len(hashes) - 1) % HASH_BLOCK + 1
    assert hashes[-1] == hashes[len(hashes) - 1] and f"{last_block} computed" in repr(hashes)
    part = hashes[10:20]
    assert list(part) == [hashes[i] for i in range(10, 20)]
    with pytest.raises(IndexError):
        hashes[len(hashes)]


symbols = st.sampled_from(["GOOG", "BTC/USD", "ÆØÅ"])
texts = st.one_of(st.none(), st.text(alphabet="abc xyz,\"'é€\n", max_size=6).map(lambda s: "t" + s))
numbers = st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    symbol=symbols,
    rows=st.lists(
        st.tuples(
            st.floats(0.01, 1e6),
            st.floats(0, 1e3),
            st.one_of(st.none(), st.integers(0, 10**15)),
            st.one_of(st.none(), numbers),
            texts,
        ),
        min_size=1,
        max_size=6,
    ),
    seconds=st.integers(0, 10**9),
)
def test_csv_hash_equals_the_pubsub_message_hash_of_the_same_bar(
    tmp_path_factory: pytest.TempPathFactory,
    symbol: str,
    rows: list[tuple[float, float, int | None, float | None, str | None]],
    seconds: int,
) -> None:
    from feeds.pubsub.messages import decode_message

    path = tmp_path_factory.mktemp("h") / "H.csv"
    # live bar times are whole milliseconds (a finer time is refused: test_pubsub_decoder.py)
    start = datetime(2001, 1, 1, tzinfo=UTC) + timedelta(
        seconds=seconds, milliseconds=seconds % 1000
    )
    lines = ["time,open,high,low,close,volume,signal,note"]
    docs = []
    for i, (low, spread, volume, signal, note) in enumerate(rows):
        ts = start + timedelta(minutes=i)
        high = low + spread
        quoted = '"' + note.replace('"', '""') + '"' if note is not None else ""
        lines.append(
            f"{ts.isoformat()},{low!r},{high!r},{low!r},{high!r},"
            f"{'' if volume is None else volume},{'' if signal is None else repr(signal)},{quoted}"
        )
        doc: dict[str, object] = {
            "timestamp": ts.isoformat(),
            "open": low,
            "high": high,
            "low": low,
            "close": high,
        }
        if volume is not None:
            doc["volume"] = volume
        if signal is not None:
            doc["signal"] = signal
        if note is not None and note.strip():
            doc["note"] = note.strip()
        docs.append(doc)
    path.write_text("\n".join(lines) + "\n")
    bars = read_csv_bars(CSVFeedConfig(path=path, symbol=symbol, bar_size="1min"))
    assert len(bars) == len(rows)
    for i, doc in enumerate(docs):
        live = decode_message(json.dumps(doc).encode(), {"symbol": symbol})
        assert bars.hashes[i] == live.data_hash, (doc, bars.numeric, bars.text)


def test_bar_hashes_over_a_source_answer_only_delivered_bars() -> None:
    from core.bars import BarHashes

    bars = read_csv_bars(cfg(DATA / "GOOG.csv", "GOOG"))
    delivered = BarHashes(source=bars.hashes)
    assert len(delivered) == 0 and delivered.at(0) is None
    delivered.advance()
    delivered.advance()
    assert len(delivered) == 2 and delivered.at(1) == bars.hashes[1] and delivered.at(2) is None
    assert delivered.at(-1) is None
    with pytest.raises(TypeError):
        delivered.append("0" * 32)


# --- attack 11 regressions: each once loaded silently wrong or escaped as another exception ---

HDR = "Date,Open,High,Low,Close,Volume"


def _write(tmp_path: Path, text: str, name: str = "x.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_unclosed_quote_in_last_column_is_refused_on_its_line(tmp_path: Path, policy: str) -> None:
    rows = "".join(f"2020-01-{d:02d},100,102,99,101,1000,ok\n" for d in range(6, 20))
    p = _write(
        tmp_path,
        f"{HDR},Headline\n2020-01-02,100,102,99,101,1000,ok\n"
        f'2020-01-03,100,102,99,101,1000,"Apple unveils iMac (truncated\n{rows}',
    )
    with pytest.raises(DataError, match=r"^CSV x\.csv line 3: a quote opened .* never closed"):
        read_csv_bars(cfg(p, on_bad_rows=policy))


def test_unclosed_quote_in_a_price_column_is_refused_even_with_skip(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        f'{HDR}\n2020-01-02,1,2,0.5,1.5,10\n2020-01-03,1,2,0.5,"1.5,10\n'
        + "".join(f"2020-01-{d:02d},1,2,0.5,1.5,10\n" for d in range(6, 30)),
    )
    with pytest.raises(DataError, match=r"^CSV x\.csv line 3: .*never closed"):
        read_csv_bars(cfg(p, on_bad_rows="skip"))


@pytest.mark.parametrize("cell", ['"5" screen', '"10"1'])
def test_text_after_a_closing_quote_is_refused(tmp_path: Path, cell: str) -> None:
    p = _write(
        tmp_path, f"{HDR},Note\n2020-01-02,1,2,0.5,1.5,10,x\n2020-01-03,1,2,0.5,1.5,10,{cell}\n"
    )
    with pytest.raises(DataError, match=r"^CSV x\.csv line 3: text after a closing quote"):
        read_csv_bars(cfg(p, on_bad_rows="skip"))


def test_inch_mark_then_multiline_value_keeps_line_numbers(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        f"{HDR},Headline\n"
        '2020-01-02,100,102,99,101,1000,Apple unveils 24" iMac\n'
        '2020-01-03,100,102,99,101,1000,"Two-line\nheadline"\n'
        "2020-01-06,100,102,99,101,1000,ok\n"
        "2020-01-07,100,102,99,BAD,1000,ok\n"
        "2020-01-08,100,102,99,BAD,1000,ok\n"
        "2020-01-09,100,102,99,101,1000,ok\n",
    )
    with pytest.raises(DataError, match=r"^CSV x\.csv line 6: close 'BAD'"):
        read_csv_bars(cfg(p))
    bars = read_csv_bars(cfg(p, on_bad_rows="skip"))
    assert [line for line, _ in bars.skipped] == [6, 7]
    assert bars.lines is not None and bars.lines.tolist() == [2, 3, 5, 8]
    assert bars.text["headline"][:2] == ['Apple unveils 24" iMac', "Two-line\nheadline"]


def test_header_with_unclosed_quote_is_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, 'Date,Open,High,Low,Close,"Vol\n2020-01-02,1,2,0.5,1.5,10\n')
    with pytest.raises(DataError, match=r"^CSV x\.csv line 1: cannot read the header"):
        read_csv_bars(cfg(p))


def test_epoch_ns_with_a_bad_row_keeps_every_nanosecond(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        # 1 ms and 2 ns apart: bars closer than 1 ms are bad rows (the records keep ms)
        f"{HDR}\n1609459200123456789,1,1,1,1,5\n1609459200124456791,1,1,1,1,5\n,1,1,1,1,5\n",
    )
    bars = read_csv_bars(cfg(p, datetime_format="epoch_ns", on_bad_rows="skip"))
    assert bars.times.astype(np.int64).tolist() == [1609459200123456789, 1609459200124456791]
    assert bars.skipped == [(4, "the date is empty")]


def test_epoch_with_a_plus_sign_loads(tmp_path: Path) -> None:
    p = _write(tmp_path, f"{HDR}\n+1609459200,1,1,1,1,5\n1609459260,1,1,1,1,5\n")
    bars = read_csv_bars(cfg(p, datetime_format="epoch_s"))
    assert bars.times.astype("datetime64[s]").astype(np.int64).tolist() == [1609459200, 1609459260]


def test_two_digit_year_first_dates_are_refused_as_ambiguous(tmp_path: Path) -> None:
    p = _write(tmp_path, f"{HDR}\n20-01-02,1,2,0.5,1.5,10\n20-01-03,1,2,0.5,1.5,10\n")
    with pytest.raises(DataError, match=r"line 2: .*2-digit year.*CSV_DATETIME_FORMAT"):
        read_csv_bars(cfg(p))
    bars = read_csv_bars(cfg(p, datetime_format="%y-%m-%d"))
    assert str(bars.times[0])[:10] == "2020-01-02"


def test_compact_dates_without_zero_padding_are_refused(tmp_path: Path) -> None:
    p = _write(tmp_path, f"{HDR}\n20200102,1,2,0.5,1.5,10\n2020113,1,2,0.5,1.5,10\n")
    with pytest.raises(DataError, match=r"^CSV x\.csv line 3: date '2020113' has 7 characters"):
        read_csv_bars(cfg(p))
    with pytest.raises(DataError, match=r"line 3: date '2020113'"):
        read_csv_bars(cfg(p, datetime_format="%Y%m%d"))


def test_empty_time_in_a_separate_column_is_a_bad_row(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "Date,Time,Open,High,Low,Close\n2020-01-02,15:59,1,2,0.5,1.5\n2020-01-03,,1,2,0.5,1.5\n"
        "2020-01-03,09:31,1,2,0.5,1.5\n",
    )
    with pytest.raises(DataError, match=r"^CSV x\.csv line 3: the Time value is empty"):
        read_csv_bars(cfg(p, datetime_column="Date+Time"))
    bars = read_csv_bars(cfg(p, datetime_column="Date+Time", on_bad_rows="skip"))
    assert bars.skipped == [(3, "the Time value is empty")] and len(bars) == 2


@pytest.mark.parametrize("z", [" Z", "Z", " +00:00", "+0000"])
def test_utc_designator_after_a_space_is_an_offset(tmp_path: Path, z: str) -> None:
    p = _write(tmp_path, f"{HDR}\n2020-01-02T09:30:00{z},1,2,0.5,1.5,10\n")
    bars = read_csv_bars(cfg(p, timezone="America/New_York"))
    assert str(bars.times[0]) == "2020-01-02T09:30:00.000000000"


@pytest.mark.parametrize(
    "column",
    [
        "Forward",
        "home",
        "buflen",
        "reset",
        "extend",
        "advance",
        "backwards",
        "fullsize",
        "getlinealiases",
        "start",
        "stop",
        "islive",
        "load",
        "preload",
        "setenvironment",
        "next",
        "clone",
        "sessionstart",
        "tick_close",
        "notifs",
        "alias",
        "l",
        "skipped_rows",
    ],
)
@pytest.mark.parametrize("value", ["4", "text"])
def test_column_shadowing_a_feed_attribute_is_refused(
    tmp_path: Path, column: str, value: str
) -> None:
    p = _write(tmp_path, f"{HDR},{column}\n2020-01-02,1,2,0.5,1.5,10,{value}\n")
    with pytest.raises(DataError, match=r"^CSV x\.csv line 1: .*reserved name.*CSV_COLUMNS"):
        read_csv_bars(cfg(p))


def test_every_backtrader_feed_attribute_is_reserved() -> None:
    from feeds.fields import reserved_reason

    feed = make_csv_feed(cfg(DATA / "GOOG.csv", "GOOG"))
    public = {n for n in dir(feed) if not n.startswith("_")} | {
        n for n in dir(feed.lines) if not n.startswith("_")
    }
    ohlcv = {"open", "high", "low", "close", "volume"}
    assert not [n for n in sorted(public - ohlcv) if reserved_reason(n) is None]


@pytest.mark.parametrize(
    ("kw", "var"),
    [
        ({"bar_size": "0min"}, "CSV_BAR_SIZE"),
        ({"bar_size": "00d"}, "CSV_BAR_SIZE"),
        ({"datetime_format": "%Q"}, "CSV_DATETIME_FORMAT"),
        ({"datetime_format": "%"}, "CSV_DATETIME_FORMAT"),
        ({"datetime_format": "%Y-%m-%d %G"}, "CSV_DATETIME_FORMAT"),
        ({"datetime_format": "Date"}, "CSV_DATETIME_FORMAT"),
    ],
)
def test_bad_bar_size_or_format_is_a_config_error(kw: dict[str, str], var: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{var}="):
        cfg(Path("x.csv"), **kw)


def test_epoch_unit_too_large_is_refused_not_1970(tmp_path: Path) -> None:
    p = _write(tmp_path, f"{HDR}\n1609459200,1,2,0.5,1.5,10\n1609459260,1,2,0.5,1.5,10\n")
    with pytest.raises(DataError, match=r"line 2: .*before 1971.*suggest epoch_s"):
        read_csv_bars(cfg(p, datetime_format="epoch_ms"))


def test_header_name_with_a_line_break_is_refused_on_line_1(tmp_path: Path) -> None:
    p = _write(tmp_path, 'Date,Open,High,Low,"Clo\nse"\n2020-01-02,1,2,0.5,1.5\n')
    with pytest.raises(DataError, match=r"^CSV x\.csv line 1: column name .* line break"):
        read_csv_bars(cfg(p))


# backtrader's own CSV format (bt.feeds.BacktraderCSVData; its samples, datas/2006-day-001.txt,
# begin with these rows): an OpenInterest column after Volume. Found by an attack (helper-59):
# it was refused as a reserved name, so backtrader's own sample data did not load.
_BT_FORMAT = (
    "Date,Open,High,Low,Close,Volume,OpenInterest\n"
    "2006-01-02,3578.73,3605.95,3578.73,3604.33,0,0\n"
    "2006-01-03,3604.08,3638.42,3601.84,3614.34,0,\n"
    "2006-01-04,3615.23,3652.46,3615.23,3652.46,0,1250\n"
)


def test_an_open_interest_column_fills_backtraders_openinterest_line(tmp_path: Path) -> None:
    from analyzers.fmel import FMELAnalyzer

    bars = read_csv_bars(cfg(_write(tmp_path, _BT_FORMAT)))
    assert bars.extra_fields == ()  # backtrader's own line, not an extra one
    seen: list[tuple[float, float]] = []

    class Reads(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            seen.append((self.data.openinterest[0], self.data.close[0]))

    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(cfg(tmp_path / "x.csv"), bars))
    cerebro.addstrategy(Reads)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    records = cerebro.run()[0].analyzers.fmel.records
    assert seen[0] == (0.0, 3604.33) and np.isnan(seen[1][0]) and seen[2] == (1250.0, 3652.46)
    fields = [a.fields_accessed for a in records[2].data_accessed]
    assert fields == [("openinterest", "close")]
    # the bar's hash holds it (an empty cell is left out, as an empty volume)
    assert bars.hashes[2] == bar_hash(
        "X",
        datetime(2006, 1, 4, tzinfo=UTC),
        {"open": 3615.23, "high": 3652.46, "low": 3615.23, "close": 3652.46, "volume": 0.0}
        | {"openinterest": 1250.0},
    )
    assert bars.hashes[1] == bar_hash(
        "X",
        datetime(2006, 1, 3, tzinfo=UTC),
        {"open": 3604.08, "high": 3638.42, "low": 3601.84, "close": 3614.34, "volume": 0.0},
    )


def test_open_interest_is_a_number_or_the_row_is_bad(tmp_path: Path) -> None:
    text = _BT_FORMAT.replace(",0,1250\n", ",0,n/a\n")
    with pytest.raises(DataError, match=r"line 4: openinterest 'n/a' is not a number"):
        read_csv_bars(cfg(_write(tmp_path, text)))
    bars = read_csv_bars(cfg(tmp_path / "x.csv", on_bad_rows="skip"))
    assert len(bars) == 2 and bars.skipped == [(4, "openinterest 'n/a' is not a number")]
    # another spelling is an extra field, unless mapped to the line
    spaced = _write(tmp_path, _BT_FORMAT.replace("OpenInterest", "Open Interest"), "y.csv")
    assert read_csv_bars(cfg(spaced)).extra_fields == ("open_interest",)
    mapped = read_csv_bars(cfg(spaced, columns={"openinterest": "Open Interest"}))
    assert mapped.extra_fields == () and mapped.numeric["openinterest"][2] == 1250.0


def test_open_interest_replayed_through_pubsub_keeps_the_bar_hash(tmp_path: Path) -> None:
    from feeds.pubsub.messages import bar_fields, decode_message
    from feeds.replay import bar_messages

    bars = read_csv_bars(cfg(_write(tmp_path, _BT_FORMAT)))
    messages = list(bar_messages([bars]))
    assert json.loads(messages[2].body)["openinterest"] == 1250.0
    for message, digest in zip(messages, bars.hashes, strict=True):
        live = decode_message(message.body, {"symbol": "X"})
        assert live.verified and live.data_hash == digest
        assert bar_fields(live).numeric == ()
    for bad in ('"many"', "1e999", "true"):
        body = messages[2].body.replace(b"1250.0", bad.encode())
        with pytest.raises(ValueError, match="openinterest"):
            decode_message(body, {"symbol": "X"})


def _daily_and_hourly(folder: Path) -> tuple[Path, Path]:
    """A file of dates (daily bars) and one of hourly bars 14:30-20:30 UTC, 2024-01-02..05."""
    days = ["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05"]
    daily = ["Date,Open,High,Low,Close,Volume"]
    hourly = ["Date,Open,High,Low,Close,Volume"]
    for k, day in enumerate(days):
        daily.append(f"{day},100,120,90,{101 + k},1000")
        for h in range(14, 21):
            hourly.append(f"{day} {h}:30:00,100,110,90,{100 + k + h / 100:.2f},10")
    d, h = folder / "DAILY.csv", folder / "HOURLY.csv"
    d.write_text("\n".join(daily) + "\n")
    h.write_text("\n".join(hourly) + "\n")
    return d, h


class _Steps(bt.Strategy):  # type: ignore[misc]
    def __init__(self) -> None:
        self.steps: list[tuple[str, float, str, float]] = []

    def next(self) -> None:
        day, hour = self.datas
        self.steps.append(
            (
                day.datetime.datetime(0).isoformat(timespec="milliseconds"),
                day.close[0],
                hour.datetime.datetime(0).isoformat(timespec="seconds"),
                hour.close[0],
            )
        )


def test_daily_dates_beside_hourly_bars_are_seen_at_the_end_of_their_day(tmp_path: Path) -> None:
    # Found by an attack (helper-59): a daily file of dates was stamped 00:00 beside hourly
    # bars, so at 14:30 the agent read the close of a day not yet over, and FMEL called it
    # no look-ahead. backtrader's own CSV feeds stamp such bars at the day's session end: the
    # same files through bt.feeds.GenericCSVData give the same steps.
    from analyzers.fmel import FMELAnalyzer
    from analyzers.missed_step import MissedStepNote

    d, h = _daily_and_hourly(tmp_path)

    def ours() -> tuple[list[Any], Any]:
        cerebro = bt.Cerebro(stdstats=False)
        for path, symbol in ((d, "DAILY"), (h, "HOURLY")):
            cerebro.adddata(make_csv_feed(cfg(path, symbol)))
        cerebro.addstrategy(_Steps)
        cerebro.addanalyzer(MissedStepNote)
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
        s = cerebro.run()[0]
        return s.steps, s.analyzers.fmel

    def backtraders() -> list[Any]:
        cerebro = bt.Cerebro(stdstats=False)
        for path, fmt, tf, comp in (
            (d, "%Y-%m-%d", bt.TimeFrame.Days, 1),
            (h, "%Y-%m-%d %H:%M:%S", bt.TimeFrame.Minutes, 60),
        ):
            cerebro.adddata(
                bt.feeds.GenericCSVData(
                    dataname=str(path),
                    dtformat=fmt,
                    timeframe=tf,
                    compression=comp,
                    openinterest=-1,
                )
            )
        cerebro.addstrategy(_Steps)
        return list(cerebro.run()[0].steps)

    steps, fmel = ours()
    assert steps == backtraders()  # their session end, 23:59:59.999990, is ours to the ms
    # at 2024-01-03 14:30 the day seen is 2024-01-02, complete
    assert ("2024-01-02T23:59:59.999", 101.0, "2024-01-03T14:30:00", 101.14) in steps
    assert not any(r.lookahead_reads for r in fmel.records)
    assert not any(r.notes for r in fmel.records)  # the day-end steps missed no hourly bar
    bar_times = {
        p.bar_time
        for r in fmel.records
        for a in r.data_accessed
        if a.symbol == "DAILY"
        for p in a.access_patterns
    }
    assert datetime(2024, 1, 2, 23, 59, 59, 999000, tzinfo=UTC).timestamp() in bar_times


def test_daily_dates_alone_keep_their_times_and_sessionend_is_respected(tmp_path: Path) -> None:
    d, h = _daily_and_hourly(tmp_path)
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(cfg(d, "DAILY")))
    cerebro.adddata(make_csv_feed(cfg(d, "DAILY2")))
    cerebro.addstrategy(_Steps)
    steps = cerebro.run()[0].steps
    assert [s[0] for s in steps] == [f"2024-01-0{k}T00:00:00.000" for k in (2, 3, 4, 5)]

    # a session end of the user's (backtrader's sessionend parameter) in the file's zone:
    # a New York day is over at 16:00 there (21:00 UTC in January, 20:00 in July)
    cerebro = bt.Cerebro(stdstats=False)
    text = d.read_text().replace("2024-01-05", "2024-07-05")
    (tmp_path / "NY.csv").write_text(text)
    daily = make_csv_feed(cfg(tmp_path / "NY.csv", "NY", timezone="America/New_York"))
    daily.p.sessionend = dt_time(16, 0)
    cerebro.adddata(daily)
    cerebro.adddata(make_csv_feed(cfg(h, "HOURLY")))
    cerebro.addstrategy(_Steps)
    seen = {s[0] for s in cerebro.run()[0].steps}
    assert {"2024-01-02T21:00:00.000", "2024-01-04T21:00:00.000"} <= seen
    assert "2024-07-05T20:00:00.000" in seen  # daylight saving time: 16:00 is 20:00 UTC


def test_daily_bars_with_times_are_not_moved(tmp_path: Path) -> None:
    d, h = _daily_and_hourly(tmp_path)
    stamped = (
        d.read_text().replace(",100,120", " 21:00:00,100,120").replace("Date 21:00:00", "Date")
    )
    (tmp_path / "CLOSE.csv").write_text(stamped)
    bars = read_csv_bars(cfg(tmp_path / "CLOSE.csv", "CLOSE"))
    assert not bars.date_only
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(cfg(tmp_path / "CLOSE.csv", "CLOSE"), bars))
    cerebro.adddata(make_csv_feed(cfg(h, "HOURLY")))
    cerebro.addstrategy(_Steps)
    steps = cerebro.run()[0].steps
    assert {s[0] for s in steps} == {f"2024-01-0{k}T21:00:00.000" for k in (2, 3, 4, 5)}


@pytest.mark.parametrize(
    ("zone", "start", "end", "first", "last"),
    [
        # Tokyo daily bars (dates, midnight JST = 15:00 UTC the day before): the window is
        # Tokyo's days. It was UTC's: the first day was dropped and a day after the end added.
        ("Asia/Tokyo", "2024-01-04", "2024-01-05", "2024-01-04", "2024-01-05"),
        ("America/New_York", "2024-01-04", "2024-01-05", "2024-01-04", "2024-01-05"),
        ("UTC", "2024-01-04", "2024-01-05", "2024-01-04", "2024-01-05"),
        # an offset is that instant: 2024-01-04 00:00 UTC is 09:00 in Tokyo, after its midnight
        ("Asia/Tokyo", "2024-01-04T00:00:00+00:00", "2024-01-06", "2024-01-05", "2024-01-06"),
        # a time of day: inclusive, in the file's zone
        ("Asia/Tokyo", "2024-01-03T00:00:01", "2024-01-05T00:00:00.5", "2024-01-04", "2024-01-05"),
    ],
)
def test_the_backtest_window_is_in_the_files_timezone(
    tmp_path: Path, zone: str, start: str, end: str, first: str, last: str
) -> None:
    from runtime.config import load_config

    days = [f"2024-01-0{k}" for k in range(2, 9)]
    (tmp_path / "JP.csv").write_text(
        "Date,Open,High,Low,Close,Volume\n" + "".join(f"{d},10,11,9,10,1\n" for d in days)
    )
    env = {
        "SYMBOLS": "JP",
        "DATA_DIR": str(tmp_path),
        "CSV_TIMEZONE": zone,
        "BACKTEST_START": start,
        "BACKTEST_END": end,
    }
    bars = read_csv_bars(load_config(env).csv_feeds[0])
    local = pd.DatetimeIndex(bars.times).tz_localize("UTC").tz_convert(zone)
    assert (local[0].date().isoformat(), local[-1].date().isoformat()) == (first, last)
    # the same window given in Python, as naive datetimes
    cfg_py = cfg(
        tmp_path / "JP.csv",
        "JP",
        timezone=zone,
        start=datetime.fromisoformat(start),
        end=datetime.fromisoformat(end),
    )
    assert list(read_csv_bars(cfg_py).times) == list(bars.times)


def test_a_window_bound_must_be_a_datetime(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CSVFeedConfig.start: expected a datetime, got str"):
        cfg(tmp_path / "x.csv", start="2024-01-01")


def _hourly_frame(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, parse_dates=["Date"], index_col="Date")
    frame.columns = [c.lower() for c in frame.columns]
    return frame


@pytest.mark.parametrize("beside", ["pandas-default-timeframe", "resampled-to-days"])
def test_dates_are_day_ended_beside_any_feed_that_is_not_dates(tmp_path: Path, beside: str) -> None:
    # Found by an attack (helper-63): the first rule compared declared bar sizes, so beside a
    # PandasData of hourly bars (backtrader's default timeframe: Days) or the daily resample of
    # hourly bars the dates kept midnight and the agent read each day's close at its start.
    # backtrader's GenericCSVData gives the same steps as ours.
    d, h = _daily_and_hourly(tmp_path)

    def run(daily: Any) -> list[Any]:
        cerebro = bt.Cerebro(stdstats=False)
        cerebro.adddata(daily)
        if beside == "pandas-default-timeframe":
            cerebro.adddata(bt.feeds.PandasData(dataname=_hourly_frame(h)))
        else:
            hourly = make_csv_feed(cfg(h, "HOURLY"))
            cerebro.resampledata(hourly, timeframe=bt.TimeFrame.Days)
        cerebro.addstrategy(_Steps)
        return list(cerebro.run()[0].steps)

    theirs = bt.feeds.GenericCSVData(
        dataname=str(d), dtformat="%Y-%m-%d", timeframe=bt.TimeFrame.Days, openinterest=-1
    )
    ours = run(make_csv_feed(cfg(d, "DAILY")))
    if beside == "pandas-default-timeframe":
        assert ours == run(theirs)
    else:
        # backtrader's resample stamps a day at 23:59:59.999990, ours at .999 (decision
        # records keep milliseconds): the steps pair differently, and no day is seen early
        assert run(theirs)[0][:2] == ("2024-01-02T23:59:59.999", 101.0)
    assert [s[:2] for s in ours][-1] == ("2024-01-05T23:59:59.999", 104.0)
    assert all(day[:10] < hour[:10] or day[11:] == "23:59:59.999" for day, _, hour, _ in ours)


def test_dates_are_day_ended_beside_daily_bars_stamped_at_their_close(tmp_path: Path) -> None:
    d, _ = _daily_and_hourly(tmp_path)
    stamped = tmp_path / "CLOSE.csv"
    stamped.write_text(
        d.read_text().replace(",100,120", " 21:00:00,100,120").replace("Date 21:00:00", "Date")
    )
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(cfg(d, "DAILY")))
    cerebro.adddata(make_csv_feed(cfg(stamped, "CLOSE")))
    cerebro.addstrategy(_Steps)
    steps = cerebro.run()[0].steps
    # at each close (21:00) the day seen of DAILY is the day before; it ends at 23:59:59.999
    want = []
    for k in (2, 3, 4, 5):
        if k > 2:
            want.append((f"2024-01-0{k - 1}T23:59:59.999", 98.0 + k, f"2024-01-0{k}T21:00:00"))
        want.append((f"2024-01-0{k}T23:59:59.999", 99.0 + k, f"2024-01-0{k}T21:00:00"))
    assert [s[:3] for s in steps] == want


def test_a_sessionend_that_is_not_a_time_of_the_files_zone_is_refused(tmp_path: Path) -> None:
    d, h = _daily_and_hourly(tmp_path)
    for bad in ("16:00", dt_time(16, tzinfo=UTC)):
        cerebro = bt.Cerebro(stdstats=False)
        daily = make_csv_feed(cfg(d, "DAILY"))
        daily.p.sessionend = bad
        cerebro.adddata(daily)
        cerebro.adddata(make_csv_feed(cfg(h, "HOURLY")))
        cerebro.addstrategy(_Steps)
        with pytest.raises(ConfigError, match=r"DAILY: sessionend must be a datetime.time"):
            cerebro.run()


def test_a_sessionend_at_midnight_or_a_second_zone_is_refused(tmp_path: Path) -> None:
    # Found by an attack (helper-65): sessionend=time(0, 0) delivered each date at its own
    # start (the day's close seen before the day), and tzinput beside CSV_TIMEZONE moved the
    # file's times twice.
    d, h = _daily_and_hourly(tmp_path)

    def run(daily: bt.feed.DataBase) -> None:
        cerebro = bt.Cerebro(stdstats=False)
        cerebro.adddata(daily)
        cerebro.adddata(make_csv_feed(cfg(h, "HOURLY")))
        cerebro.addstrategy(_Steps)
        cerebro.run()

    for start in (dt_time(0, 0), dt_time(0, 0, 0, 999)):  # a millisecond: the bar times' unit
        daily = make_csv_feed(cfg(d, "DAILY"))
        daily.p.sessionend = start
        with pytest.raises(ConfigError, match=r"^DAILY: sessionend 00:00:00.* start of the day"):
            run(daily)
    zoned = make_csv_feed(cfg(d, "DAILY", timezone="America/New_York"))
    zoned.p.tzinput = "US/Eastern"
    with pytest.raises(ConfigError, match=r"^DAILY: tzinput='US/Eastern' and CSV_TIMEZONE="):
        run(zoned)
    utc = make_csv_feed(cfg(d, "DAILY"))
    utc.p.tzinput = "US/Eastern"  # backtrader's idiom over times read as UTC: allowed
    run(utc)
    # zones that are UTC by another name (helper-66: refused though nothing moved twice)
    for zone, tzinput in [("Etc/UTC", "US/Eastern"), ("GMT", "US/Eastern"), ("Asia/Tokyo", "UTC")]:
        feed = make_csv_feed(cfg(d, "DAILY", timezone=zone))
        feed.p.tzinput = tzinput
        run(feed)


@pytest.mark.parametrize("offset", ["-05:00", "+09:00", "-0500", "Z"])
def test_dates_written_as_midnights_with_an_offset_are_seen_at_the_end_of_their_day(
    tmp_path: Path, offset: str
) -> None:
    # Found by an attack (helper-67): yfinance writes daily bars as "2024-01-03 00:00:00-05:00";
    # beside hourly bars they were delivered at 05:00 UTC and the agent read each day's close
    # at its start, with no look-ahead flagged (CSV_TIMEZONE left at UTC, as the docs allow).
    d, h = _daily_and_hourly(tmp_path)
    header, *rows = d.read_text().splitlines()
    d.write_text("\n".join([header] + [r.replace(",", f" 00:00:00{offset},", 1) for r in rows]))
    bars = read_csv_bars(cfg(d, "DAILY"))
    assert bars.date_only
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(cfg(d, "DAILY")))
    cerebro.adddata(make_csv_feed(cfg(h, "HOURLY")))
    cerebro.addstrategy(_Steps)
    steps = cerebro.run()[0].steps
    hours = int(offset[:3]) if offset != "Z" else 0
    for day_time, *_ in steps:
        local = datetime.fromisoformat(day_time) + timedelta(hours=hours)
        end = datetime.combine(local.date(), dt_time(23, 59, 59, 999_000))
        assert abs(local - end) <= timedelta(milliseconds=1), (offset, day_time)  # day numbers
    # at 2024-01-03 14:30 UTC the agent sees Jan 2's close (101), not Jan 3's (102)
    at_1430 = next(c for _, c, h, _ in steps if h == "2024-01-03T14:30:00")  # its own step
    assert at_1430 == 101.0
    mixed = tmp_path / "MIXED.csv"  # a midnight beside a time of day: not a file of dates
    mixed.write_text(
        f"{header}\n{rows[0].replace(',', ' 00:00:00-05:00,', 1)}\n"
        f"{rows[1].replace(',', ' 16:00:00-05:00,', 1)}\n"
    )
    assert not read_csv_bars(cfg(mixed, "MIXED")).date_only


def test_dates_of_two_offsets_are_day_ended_and_a_stray_row_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by an attack (helper-68): yfinance's BTC-USD (+00:00) beside SPY (-05:00) kept
    # their midnights (both "dates in UTC"), so at 00:00 UTC the agent saw BTC's close of a day
    # not yet over; and one row that was not a midnight turned the rule off silently.
    def dates(name: str, offset: str, closes: list[float]) -> Path:
        rows = [
            f"2024-01-0{2 + k} 00:00:00{offset},{c},{c + 1},{c - 1},{c},1"
            for k, c in enumerate(closes)
        ]
        path = tmp_path / f"{name}.csv"
        path.write_text("Date,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n")
        return path

    btc, spy = dates("BTC", "+00:00", [10, 11, 12]), dates("SPY", "-05:00", [500, 501, 502])
    cerebro = bt.Cerebro(stdstats=False)
    for path, symbol in ((btc, "BTC"), (spy, "SPY")):
        cerebro.adddata(make_csv_feed(cfg(path, symbol)))
    seen: list[tuple[str, str]] = []

    class Seen(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            seen.append(
                (
                    self.datas[0].datetime.datetime(0).isoformat(),
                    self.datas[1].datetime.datetime(0).isoformat(),
                )
            )

    cerebro.addstrategy(Seen)
    cerebro.run()
    # each day at its own end: BTC's at 23:59:59.999 UTC, SPY's at 04:59:59.999 UTC next day
    assert seen and all(b[11:19] == "23:59:59" and s[11:19] == "04:59:59" for b, s in seen), seen
    # a plain date among offset midnights is a date too (its own zone's midnight)
    mixed = dates("MIX", "-05:00", [2, 3, 3.5])
    mixed.write_text(mixed.read_text() + "2024-01-05,4,5,3,4,1\n")
    assert read_csv_bars(cfg(mixed, "MIX")).date_only
    stray = tmp_path / "STRAY.csv"
    rows = [f"2024-01-{d:02d} 00:00:00-05:00,1,2,0.5,1.5,1" for d in range(1, 21)]
    rows[7] = "2024-01-08 16:00:00-05:00,1,2,0.5,1.5,1"
    stray.write_text("Date,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="feeds.csv.reader"):
        assert not read_csv_bars(cfg(stray, "STRAY")).date_only
    assert any(
        "line 9: '2024-01-08 16:00:00-05:00' is not a midnight" in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize("offset", ["+05:30", "-05:00", "+09:00"])
def test_dates_with_their_own_offsets_are_windowed_by_their_dates(
    tmp_path: Path, offset: str
) -> None:
    # Found by an attack (helper-68): BACKTEST_START=2024-01-03 dropped a Kolkata file's
    # Jan 3 (its midnight is Jan 2 18:30 UTC) and BACKTEST_END=2024-01-05 kept its Jan 6.
    rows = [f"2024-01-0{d} 00:00:00{offset},1,9,0.5,{d},1" for d in range(2, 9)]
    path = tmp_path / "D.csv"
    path.write_text("Date,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n")
    window = {
        "start": datetime(2024, 1, 3, tzinfo=UTC),
        "end": datetime(2024, 1, 5, 23, 59, 59, 999_999, tzinfo=UTC),
    }
    bars = read_csv_bars(cfg(path, "D", **window))
    assert bars.numeric["close"].tolist() == [3.0, 4.0, 5.0] and bars.date_only


def test_a_plain_dates_file_with_a_stray_row_is_warned_and_mixed_windows_hold(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by an attack (helper-69): the near-miss warning needed a written offset, and the
    # window by own dates looked at the first row only.
    rows = [f"2024-01-{d:02d},1,99,0.5,{d},1" for d in range(1, 21)]
    rows[5] = "2024-01-06 16:00:00,1,9,0.5,6,1"
    stray = tmp_path / "STRAY.csv"
    stray.write_text("Date,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n")
    with caplog.at_level("WARNING", logger="feeds.csv.reader"):
        assert not read_csv_bars(cfg(stray, "STRAY")).date_only
    assert any(
        "line 7: '2024-01-06 16:00:00' is not a midnight" in r.getMessage() for r in caplog.records
    )
    mixed = tmp_path / "MIXED.csv"
    rows = ["2024-01-01,1,9,0.5,1,1"] + [
        f"2024-01-{d:02d} 00:00:00+05:30,1,9,0.5,{d},1" for d in range(2, 10)
    ]
    mixed.write_text("Date,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n")
    window = {
        "start": datetime(2024, 1, 3, tzinfo=UTC),
        "end": datetime(2024, 1, 6, 23, 59, 59, 999_999, tzinfo=UTC),
    }
    bars = read_csv_bars(cfg(mixed, "MIXED", **window))
    assert bars.numeric["close"].tolist() == [3.0, 4.0, 5.0, 6.0]


def test_dates_with_the_same_offsets_on_different_days_are_day_ended(tmp_path: Path) -> None:
    # Found by an attack (helper-69): London (+00:00 then +01:00) beside Casablanca (+01:00 then
    # +00:00 in Ramadan) had the same set of offsets and kept their midnights.
    def dates(name: str, offsets: list[str]) -> Path:
        rows = [f"2024-03-{4 + k:02d} 00:00:00{o},1,9,0.5,{k + 1},1" for k, o in enumerate(offsets)]
        path = tmp_path / f"{name}.csv"
        path.write_text("Date,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n")
        return path

    a = dates("A", ["+00:00", "+00:00", "+01:00", "+01:00"])
    b = dates("B", ["+01:00", "+01:00", "+00:00", "+00:00"])
    same = dates("C", ["+00:00", "+00:00", "+01:00", "+01:00"])
    for other, ended in ((b, True), (same, False)):
        cerebro = bt.Cerebro(stdstats=False)
        feeds = [make_csv_feed(cfg(a, "A")), make_csv_feed(cfg(other, "O"))]
        for feed in feeds:
            cerebro.adddata(feed)
        cerebro.addstrategy(bt.Strategy)
        cerebro.run()
        times = [bt.num2date(n) for n in feeds[0]._dates]
        assert all(t.minute == (59 if ended else 0) for t in times), (other.name, times)


def test_an_inferred_size_far_below_the_median_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by an attack (helper-68): 5-minute bars with a corrected re-print 1 s after every
    # fourth bar were inferred as 1-second bars, with nothing said.
    stamps = list(pd.date_range("2024-01-02 14:30", periods=40, freq="5min"))
    stamps += [t + pd.Timedelta(seconds=1) for t in stamps[::4]]
    with caplog.at_level("WARNING", logger="feeds.csv.reader"):
        bars = read_csv_bars(cfg(_spaced(tmp_path, "X", pd.DatetimeIndex(sorted(stamps)))))
    assert (bars.timeframe, bars.compression) == (bt.TimeFrame.Seconds, 1)
    assert any("bar size inferred as 1s" in r.getMessage() for r in caplog.records)


def test_negative_open_interest_is_a_bad_row(tmp_path: Path) -> None:
    from feeds.pubsub.messages import decode_message

    text = _BT_FORMAT.replace(",0,1250\n", ",0,-5\n")
    with pytest.raises(DataError, match=r"line 4: openinterest '-5' is negative"):
        read_csv_bars(cfg(_write(tmp_path, text)))
    body = b'{"timestamp":"2024-01-02","open":1,"high":2,"low":1,"close":2,"openinterest":-5}'
    with pytest.raises(DataError, match=r"openinterest -5 is not a finite number >= 0"):
        decode_message(body, {"symbol": "X"})


def test_a_day_whose_last_hour_repeats_ends_at_its_later_occurrence(tmp_path: Path) -> None:
    # Found by an attack (helper-64): Santiago's clocks go back at midnight on 2024-04-07, so
    # Saturday's 23:00-23:59 happens twice; Saturday's bar was delivered at the first 23:59
    # (-03), an hour before the day was over.
    days = "".join(f"2024-04-0{k},1,2,.5,1,1\n" for k in (5, 6, 8))
    hours = "".join(f"2024-04-07 {h:02d}:00:00,1,2,.5,1,1\n" for h in range(0, 6))
    cerebro = bt.Cerebro(stdstats=False)
    daily = make_csv_feed(cfg(write(tmp_path, HEAD + days), "SCL", timezone="America/Santiago"))
    cerebro.adddata(daily)
    cerebro.adddata(make_csv_feed(cfg(write(tmp_path, HEAD + hours, "H.csv"), "H")))
    cerebro.addstrategy(_Steps)
    steps = cerebro.run()[0].steps
    # 2024-04-06 23:59:59.999 -04:00 is 03:59:59.999 UTC on the 7th
    assert ("2024-04-07T03:59:59.999", 1.0) in [s[:2] for s in steps]
    assert all(
        not (s[0].startswith("2024-04-07T03:59") and s[2] < "2024-04-07T03:00") for s in steps
    )
    seen_at_3 = [s for s in steps if s[2] == "2024-04-07T03:00:00"]
    assert seen_at_3 and seen_at_3[0][0] == "2024-04-06T02:59:59.999"  # Friday's, not Saturday's


def test_a_feed_in_two_cerebros_follows_the_one_running_it(tmp_path: Path) -> None:
    # Found by an attack (helper-64): backtrader keeps only the last Cerebro a feed was added
    # to; beside hourly bars in the first, dates-only in the second, running the first
    # delivered the dates at midnight (each day's close seen at 09:00).
    d, h = _daily_and_hourly(tmp_path)
    daily = make_csv_feed(cfg(d, "DAILY"))
    first = bt.Cerebro(stdstats=False)
    first.adddata(daily)
    first.adddata(make_csv_feed(cfg(h, "HOURLY")))
    first.addstrategy(_Steps)
    second = bt.Cerebro(stdstats=False)
    second.adddata(daily)
    second.adddata(make_csv_feed(cfg(d, "DAILY2")))
    second.addstrategy(_Steps)
    steps = first.run()[0].steps
    assert all(s[0].endswith("T23:59:59.999") for s in steps)
    assert all(s[0].endswith("T00:00:00.000") for s in second.run()[0].steps)


@settings(max_examples=60, deadline=None)
@given(spacing_ms=st.integers(1, 59_999), n=st.integers(2, 30))
def test_regular_bars_below_a_minute_are_inferred_to_their_spacing(spacing_ms: int, n: int) -> None:
    from core.bars import bar_seconds
    from feeds.csv.reader import infer_bar_size

    times = np.datetime64("2024-01-02T10:00") + np.arange(n) * np.timedelta64(spacing_ms, "ms")
    size = infer_bar_size(times)
    assert bar_seconds(*size) == pytest.approx(spacing_ms / 1000, rel=1e-12)  # exact
    unit = 60_000 if spacing_ms % 60_000 == 0 else 1000 if spacing_ms % 1000 == 0 else 1
    assert (
        size[0]
        == {
            60_000: bt.TimeFrame.Minutes,
            1000: bt.TimeFrame.Seconds,
            1: bt.TimeFrame.MicroSeconds,
        }[unit]
    )


@settings(max_examples=60, deadline=None)
@given(
    spacing_ms=st.sampled_from([1, 250, 500, 1500, 60_000, 90_000, 300_000, 3_600_000]),
    present=st.floats(0.35, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_file_lacking_bars_keeps_its_bar_size(spacing_ms: int, present: float, seed: int) -> None:
    # found by an attack (helper-66): a 1-minute file with half its minutes was inferred as
    # 2 minutes, coarser than a full feed beside it, and its gaps were never noted
    from core.bars import bar_seconds
    from feeds.csv.reader import infer_bar_size

    rng = np.random.default_rng(seed)
    slots = np.flatnonzero(rng.random(400) < present)
    if len(slots) < 2:
        return
    times = np.datetime64("2024-01-02T10:00") + slots * np.timedelta64(spacing_ms, "ms")
    assert bar_seconds(*infer_bar_size(times)) == pytest.approx(spacing_ms / 1000, rel=1e-12)


@pytest.mark.parametrize(
    ("stamps", "size"),
    [
        # helper-59: three daily rows over a weekend (1 and 3 days) were inferred as 2 days
        (["2024-01-04", "2024-01-05", "2024-01-08"], (bt.TimeFrame.Days, 1)),
        (["2024-01-31", "2024-02-29", "2024-03-31"], (bt.TimeFrame.Months, 1)),
        (["2024-01-05", "2024-01-12", "2024-01-18", "2024-01-26"], (bt.TimeFrame.Weeks, 1)),
    ],
)
def test_a_short_file_takes_its_shortest_common_spacing(
    stamps: list[str], size: tuple[int, int]
) -> None:
    from feeds.csv.reader import infer_bar_size

    assert infer_bar_size(np.array(stamps, dtype="datetime64[ns]")) == size


class _ReadsExtras(bt.Strategy):  # type: ignore[misc]
    def next(self) -> None:
        self.data.rsi[0]
        self.data.regime[0]


@pytest.mark.parametrize("how", ["resampledata", "replaydata"])
def test_a_resampled_or_replayed_feed_with_extra_fields_is_refused_by_name(how: str) -> None:
    """helper-116 F4: backtrader's Resampler and Replayer build bars from OHLCV and open
    interest only. The weekly bars of data/enriched/GOOG.csv read ``rsi`` NaN (resample) or
    the week's first day's (replay: 85.78 for the week whose last row says 82.52) and
    ``regime`` None, with no warning, and FMEL stored those values as the bars'. Refused now
    before the first bar, naming the symbol and the fields; the same file added as it is,
    and a file without extra fields resampled, run as before."""
    enriched = CSVFeedConfig(path=DATA / "enriched" / "GOOG.csv", symbol="GOOG")
    cerebro = bt.Cerebro(stdstats=False)
    getattr(cerebro, how)(
        make_csv_feed(enriched, read_csv_bars(enriched)), timeframe=bt.TimeFrame.Weeks
    )
    cerebro.addstrategy(_ReadsExtras)
    with pytest.raises(
        ConfigError,
        match=r"^GOOG: the backtrader filter (Resampler|Replayer) with the extra fields rsi, "
        r".*regime: backtrader",
    ):
        cerebro.run()
    daily = bt.Cerebro(stdstats=False)
    daily.adddata(make_csv_feed(enriched, read_csv_bars(enriched)))
    daily.addstrategy(_ReadsExtras)
    assert len(daily.run()[0]) > 2000
    plain = CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG")
    weekly = bt.Cerebro(stdstats=False)
    getattr(weekly, how)(make_csv_feed(plain, read_csv_bars(plain)), timeframe=bt.TimeFrame.Weeks)
    weekly.addstrategy(bt.Strategy)
    assert len(weekly.run()[0]) > 400


class _SkipMondays:
    """A backtrader filter (a callable taking the feed) that drops Monday bars, as
    backtrader's docs show filters: ``data.backwards()`` and True to drop the bar."""

    def __init__(self, data: Any) -> None:
        pass

    def __call__(self, data: Any) -> bool:
        if data.datetime.date(0).weekday() == 0:
            data.backwards()
            return True
        return False


@pytest.mark.parametrize("make_filter", ["calendar_days", "skip_mondays"])
def test_text_fields_under_a_filter_that_adds_or_drops_bars_are_refused(
    make_filter: str,
) -> None:
    """helper-118: text is kept one value per row read, so a filter that adds bars
    (``CalendarDays``) or drops them put every later text on another bar: ``regime == 'up'``
    read on 2004-10-01 when the file says so first on 2004-10-28, not flagged. Refused, naming
    the filter; numbers under such filters stay as backtrader makes them."""
    enriched = CSVFeedConfig(path=DATA / "enriched" / "GOOG.csv", symbol="GOOG")
    feed = make_csv_feed(enriched, read_csv_bars(enriched))
    if make_filter == "calendar_days":
        feed.addfilter(bt.filters.CalendarDays, fill_price=0)
    else:
        feed.addfilter(_SkipMondays)
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(feed)
    cerebro.addstrategy(_ReadsExtras)
    with pytest.raises(ConfigError, match=r"^GOOG: the backtrader filter .* regime: text fields"):
        cerebro.run()


def test_text_fields_under_heikin_ashi_read_their_own_rows() -> None:
    """helper-120: HeikinAshi changes prices in place, every bar kept: its text fields read
    their rows (refused at first with every other filter)."""
    enriched = CSVFeedConfig(path=DATA / "enriched" / "GOOG.csv", symbol="GOOG")
    bars = read_csv_bars(enriched)
    feed = make_csv_feed(enriched, bars)
    feed.addfilter(bt.filters.HeikinAshi)
    seen: list[tuple[float, Any]] = []

    class Reads(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            seen.append((self.data.datetime[0], self.data.regime[0]))

    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(feed)
    cerebro.addstrategy(Reads)
    cerebro.run()
    expected = list(bars.text["regime"])
    assert len(seen) == len(expected) > 2000
    assert [text for _, text in seen] == expected
