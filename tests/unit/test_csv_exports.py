"""Odd CSV exports as real tools write them (``tests/data/csv_exports/``): each loads right with
the options docs/csv.md gives for it, or is refused with a message that names the file, the line
and what to do.

The files are small, made in the shape of each source's export (header, separators, number and
date style, order, banner lines): Yahoo Finance, Stooq, Investing.com, MetaTrader 5, TradingView,
Binance, Excel (German locale), Quandl/Nasdaq Data Link, CryptoDataDownload, Dukascopy.
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import backtrader as bt
import numpy as np
import pytest

from core.errors import DataError
from feeds.csv import CSVBars, CSVFeedConfig, read_csv_bars
from tests.conftest import TEST_DATA

EXPORTS = TEST_DATA / "csv_exports"


def load(name: str, **options: Any) -> CSVBars:
    return read_csv_bars(CSVFeedConfig(path=EXPORTS / name, symbol="X", **options))


def refused(name: str, **options: Any) -> str:
    with pytest.raises(DataError) as err:
        load(name, **options)
    message = str(err.value)
    assert message.startswith(f"CSV {name} line "), message
    return message


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> np.datetime64:
    return np.datetime64(datetime(year, month, day, hour, minute), "ns")


def first_row(name: str) -> list[str]:
    text = (EXPORTS / name).read_text(encoding="utf-8-sig")
    return text.splitlines()[1].split(",")


def test_yahoo_finance_null_rows_are_named_or_skipped() -> None:
    # Yahoo writes "null" in every field of a day without prices
    message = refused("yahoo_finance.csv")
    assert "line 11: open 'null' is not a number" in message
    bars = load("yahoo_finance.csv", on_bad_rows="skip")
    assert len(bars) == 24 and bars.skipped == [(11, "open 'null' is not a number")]
    assert bars.extra_fields == ("adj_close",)
    assert bars.times[0] == utc(2024, 1, 2) and (bars.timeframe, bars.compression) == (
        bt.TimeFrame.Days,
        1,
    )
    assert bars.numeric["close"][0] == 182.735466 and bars.numeric["adj_close"][0] == 181.876609


def test_yahoo_adjusted_close_as_close_needs_the_raw_close_renamed() -> None:
    message = refused("yahoo_finance.csv", columns={"close": "Adj Close"}, on_bad_rows="skip")
    assert 'line 1: columns "Close" and "Adj Close" would both become field "close"' in message
    assert '{"close": "Adj Close", "close_2": "Close"}' in message  # the fix, spelled out
    bars = load(
        "yahoo_finance.csv",
        columns={"close": "Adj Close", "close_raw": "Close"},
        on_bad_rows="skip",
    )
    assert bars.numeric["close"][0] == 181.876609 and bars.numeric["close_raw"][0] == 182.735466


def test_stooq_intraday_joins_date_and_time_columns() -> None:
    bars = load("stooq_intraday.txt", datetime_column="<DATE>+<TIME>", columns={"volume": "<VOL>"})
    assert len(bars) == 30 and bars.times[0] == utc(2024, 1, 2, 15, 35)
    assert (bars.timeframe, bars.compression) == (bt.TimeFrame.Minutes, 5)
    assert bars.numeric["open"][0] == 187.15 and bars.numeric["volume"][0] == 29015
    assert bars.text["ticker"][0] == "AAPL.US" and bars.numeric["per"][0] == 5
    assert bars.lines is not None and bars.lines[0] == 2  # CRLF file, header = line 1


def test_investing_com_newest_first_is_refused_with_the_reason() -> None:
    options: dict[str, Any] = {
        "columns": {"close": "Price", "volume": "Vol."},
        "thousands": ",",
        "suffixes": True,
    }
    message = refused("investing_com.csv", **options)
    assert "line 3: timestamp goes backwards" in message and "newest first" in message
    bars = load("investing_com_oldest_first.csv", **options)
    assert len(bars) == 20 and bars.times[0] == utc(2024, 1, 2)  # 01/02 with 01/16 -> m/d/Y
    assert bars.numeric["close"][0] == 37508.94 and bars.numeric["open"][0] == 37500.0
    assert bars.numeric["volume"][0] == 41_400_000.0  # "41.40M", exactly
    assert bars.text["change"][1] == "0.86%"  # a percentage stays text, unchanged


def test_investing_com_without_the_number_options_names_the_value() -> None:
    message = refused("investing_com_oldest_first.csv", columns={"close": "Price"})
    assert "line 2: open '37,500.00' is not a number" in message


def test_metatrader5_tab_separated_date_and_time() -> None:
    message = refused("metatrader5_bars.csv")
    assert "line 1: the header has one column" in message and "CSV_DELIMITER" in message
    bars = load(
        "metatrader5_bars.csv",
        delimiter="tab",
        datetime_column="<DATE>+<TIME>",
        columns={"volume": "<TICKVOL>"},
    )
    assert len(bars) == 24 and bars.times[1] == utc(2024, 1, 2, 1)
    assert (bars.timeframe, bars.compression) == (bt.TimeFrame.Minutes, 60)
    assert bars.numeric["open"][0] == 1.10427 and set(bars.extra_fields) == {"vol", "spread"}


def test_tradingview_unix_seconds_need_epoch_s() -> None:
    message = refused("tradingview.csv")
    assert "looks like a Unix time; set CSV_DATETIME_FORMAT=epoch_s" in message
    bars = load("tradingview.csv", datetime_format="epoch_s")
    assert bars.times[0] == utc(2024, 1, 2, 14, 30) and len(bars) == 20
    assert np.isnan(bars.numeric["rsi"][0]) and not np.isnan(bars.numeric["rsi"][-1])


def test_tradingview_iso_times_with_offsets_across_a_dst_change() -> None:
    bars = load("tradingview_iso_offsets.csv")
    assert bars.times[0] == utc(2024, 3, 8, 14, 30)  # 09:30-05:00
    assert bars.times[-1] == utc(2024, 3, 14, 1, 30)  # 2024-03-13T21:30:00-04:00
    assert np.all(np.diff(bars.times.astype(np.int64)) > 0)


def test_binance_klines_without_header_are_refused_and_load_with_one() -> None:
    message = refused("binance_klines.csv")
    assert "line 1: looks like data, not a header" in message
    message = refused("binance_klines_header.csv")
    assert "set CSV_DATETIME_FORMAT=epoch_ms" in message
    bars = load("binance_klines_header.csv", datetime_format="epoch_ms")
    assert len(bars) == 30 and bars.times[0] == utc(2024, 1, 1)
    assert (bars.timeframe, bars.compression) == (bt.TimeFrame.Minutes, 1)
    assert bars.numeric["close_time"][0] == 1704067259999 and "ignore" in bars.extra_fields
    assert bars.numeric["open"][0] == float(first_row("binance_klines_header.csv")[1])


def test_excel_german_locale() -> None:
    options: dict[str, Any] = {
        "delimiter": ";",
        "decimal": ",",
        "thousands": ".",
        "columns": {
            "open": "Eröffnung",
            "high": "Hoch",
            "low": "Tief",
            "close": "Schluss",
            "volume": "Volumen",
        },
    }
    bars = load("excel_de.csv", **options)
    assert len(bars) == 15 and bars.times[0] == utc(2024, 1, 2)  # 15.01 decides day first
    assert bars.numeric["open"][0] == 1234.5 and bars.numeric["high"][0] == 1273.54
    assert bars.extra_fields == ()
    without_decimal = {k: v for k, v in options.items() if k not in ("decimal", "thousands")}
    assert "line 2: open '1.234,50' is not a number" in refused("excel_de.csv", **without_decimal)


def test_quandl_wiki_every_extra_column_is_a_field() -> None:
    bars = load("quandl_wiki.csv")
    assert bars.extra_fields == (
        "ex_dividend",
        "split_ratio",
        "adj_open",
        "adj_high",
        "adj_low",
        "adj_close",
        "adj_volume",
    )
    assert bars.numeric["ex_dividend"][6] == 0.57 and len(bars) == 20


def test_cryptodatadownload_banner_line_is_refused() -> None:
    message = refused("cryptodatadownload.csv")
    assert "line 1: the header has one column ('https://www.CryptoDataDownload.com')" in message
    assert "if line 1 is a title or a URL rather than the column names, delete it" in message


def test_dukascopy_day_first_dots_within_one_day_need_the_format() -> None:
    message = refused("dukascopy.csv")
    assert "line 2: dates like '03.01.2024 00:00:00.000' could be day first or month first" in (
        message
    )
    bars = load("dukascopy.csv", datetime_format="%d.%m.%Y %H:%M:%S.%f")
    assert len(bars) == 40 and bars.times[0] == utc(2024, 1, 3)
    assert (bars.timeframe, bars.compression) == (bt.TimeFrame.Minutes, 1)


@pytest.mark.parametrize("path", sorted(EXPORTS.iterdir()), ids=lambda p: p.name)
def test_every_export_is_covered_above(path: Path) -> None:
    source = Path(__file__).read_text()
    assert f'"{path.name}"' in source


@pytest.mark.parametrize(("sep", "decimal", "value"), [(".", ",", "0.125"), (",", ".", "00,123")])
def test_a_group_with_a_leading_zero_is_no_thousands_grouping(
    tmp_path: Path, sep: str, decimal: str, value: str
) -> None:
    # Found by an attack (helper-59): with a thousands separator, a stray "0.125" in a
    # decimal-comma file was read as 125 (and "00,123" as 123), and the run went on.
    delimiter = ";"
    path = tmp_path / "p.csv"
    path.write_text(
        "Date;Open;High;Low;Close;Volume\n"
        f"2024-01-02;1{decimal}0;2{decimal}0;0{decimal}5;1{decimal}5;1{sep}000\n"
        f"2024-01-03;1{decimal}0;{value};0{decimal}5;1{decimal}5;1{sep}000\n"
    )
    cfg = CSVFeedConfig(path=path, symbol="X", delimiter=delimiter, decimal=decimal, thousands=sep)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=rf"line 3: high '{re.escape(value)}' is not a number"):
        read_csv_bars(cfg)
    good = read_csv_bars(cfg.__class__(**{**_fields(cfg), "on_bad_rows": "skip"}))
    assert len(good.times) == 1 and good.numeric["volume"][0] == 1000.0


def _fields(cfg: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_bars_less_than_a_millisecond_apart_are_bad_rows(tmp_path: Path) -> None:
    # Found by an attack (helper-59): bars 7 us apart were accepted, all became one bar time
    # (14:30:00.000) in the records, and the HTML report failed with a traceback.
    base = 1_704_205_800_000_000_000  # 2024-01-02 14:30 UTC, in ns
    stamps = [
        base,
        base + 7_000,
        base + 999_999,
        base + 1_000_000,
        base + 1_500_000,
        base + 3_000_000,
    ]
    path = tmp_path / "t.csv"
    path.write_text(
        "time,open,high,low,close,volume\n" + "".join(f"{t},1.0,1.0,1.0,1.0,1\n" for t in stamps)
    )
    cfg = CSVFeedConfig(path=path, symbol="X", datetime_format="epoch_ns")
    with pytest.raises(DataError, match=r"line 3: timestamp .* is less than 1 ms after"):
        read_csv_bars(cfg)
    kept = read_csv_bars(
        CSVFeedConfig(path=path, symbol="X", datetime_format="epoch_ns", on_bad_rows="skip")
    )
    # the 1.5 ms row is 0.5 ms after the kept 1 ms row; 3 ms is kept
    assert kept.times.astype("int64").tolist() == [base, base + 1_000_000, base + 3_000_000]
    assert len(kept.skipped) == 3


@pytest.mark.parametrize(
    ("env", "sep"),
    [("space", " "), ("NBSP", "\u00a0"), ("nnbsp", "\u202f"), ("narrow_nbsp", "\u202f")],
)
def test_a_space_thousands_separator_is_set_by_name(tmp_path: Path, env: str, sep: str) -> None:
    # Found by an attack (helper-67): CSV_THOUSANDS=" " was read as unset (environment values
    # are trimmed) and every row was refused as not a number; French Excel and LibreOffice
    # exports group digits with a no-break space or a narrow one.
    from runtime.config import load_config

    (tmp_path / "FR.csv").write_text(
        "Date;Open;High;Low;Close;Volume\n"
        f"2024-01-02;1{sep}234,50;1{sep}240,00;1{sep}230,00;1{sep}235,25;12{sep}345\n",
        encoding="utf-8",
    )
    config = load_config(
        {
            "SYMBOLS": "FR",
            "DATA_DIR": str(tmp_path),
            "CSV_DELIMITER": ";",
            "CSV_DECIMAL": ",",
            "CSV_THOUSANDS": env,
        }
    )
    cfg = config.csv_feeds[0]
    assert cfg.thousands == sep
    bars = read_csv_bars(cfg)
    assert bars.numeric["open"][0] == 1234.5 and bars.numeric["volume"][0] == 12345.0


def test_integers_beyond_float64_are_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Found by an attack (helper-67): Binance's trade ids and nanosecond times beyond 2**53
    # were rounded silently (9007199254740993 read as 9007199254740992.0).
    path = tmp_path / "B.csv"
    path.write_text(
        "Date,Open,High,Low,Close,Volume,first_id,count\n"
        "2024-01-02,1,2,0.5,1.5,10,9007199254740992,3\n"
        "2024-01-03,1,2,0.5,1.5,10,9007199254740993,4\n"
        "2024-01-04,1,2,0.5,1.5,10,3,1e300\n"  # a float already (helper-68): not warned
    )
    with caplog.at_level("WARNING", logger="feeds.csv.reader"):
        bars = read_csv_bars(CSVFeedConfig(path=path, symbol="B"))
    said = [r.getMessage() for r in caplog.records]
    assert bars.numeric["first_id"][1] == 9007199254740992.0  # float64, as backtrader's lines
    assert len(said) == 1 and said[0].startswith(
        "CSV B.csv line 2: first_id reads as 9007199254740992: numbers beyond 2**53"
    )


def test_a_windows_1252_header_is_named_as_not_utf8(tmp_path: Path) -> None:
    # Found by an attack (helper-67): with CSV_COLUMNS naming "Eröffnung", an ANSI Excel export
    # was refused as "column 'Eröffnung' not found; columns are [... 'Er\ufffdffnung' ...]".
    path = tmp_path / "DE.csv"
    path.write_bytes(
        "Datum;Eröffnung;Hoch;Tief;Schluss\n2024-01-02;1,0;2,0;0,5;1,5\n".encode("cp1252")
    )
    cfg = CSVFeedConfig(
        path=path,
        symbol="DE",
        delimiter=";",
        decimal=",",
        columns={"open": "Eröffnung", "high": "Hoch", "low": "Tief", "close": "Schluss"},
    )
    with pytest.raises(DataError, match=r"^CSV DE\.csv line 1: invalid UTF-8 bytes b'\\xf6'"):
        read_csv_bars(cfg)
