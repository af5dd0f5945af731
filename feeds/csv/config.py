"""How to read one historical CSV file: :class:`CSVFeedConfig`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dt_time
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pandas as pd

from core.errors import ConfigError
from core.settings import setting

EPOCH_FORMATS = ("epoch_s", "epoch_ms", "epoch_us", "epoch_ns")
# CSV_THOUSANDS spelled by name: a space, a no-break space, a narrow no-break space.
_SPACES = {"space": " ", "nbsp": "\u00a0", "nnbsp": "\u202f", "narrow_nbsp": "\u202f"}
BAR_SIZE_RE = re.compile(r"^(\d+)\s*(ms|s|sec|min|m|h|d|w|mo)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class CSVFeedConfig:
    """How to read one historical CSV file.

    Attributes:
        path: the file (a ``str`` is taken as a path).
        symbol: the symbol its bars belong to (``BTC/USD`` style allowed); part of each data hash.
        datetime_column: column name, or 0-based position as an int, or ``"Date+Time"`` to join
            two columns with a space; ``None`` = the first column.
        datetime_format: ``strftime`` format, or ``epoch_s``/``epoch_ms``/``epoch_us``/
            ``epoch_ns`` (Unix time, UTC); ``None`` = ISO 8601 or inferred from the first value,
            with the day/month order decided by the data or refused (see ``docs/csv.md``).
        timezone: IANA zone of naive timestamps (aware ones are converted to UTC regardless).
        bar_size: ``"1d"``, ``"1h"``, ``"5min"``, ``"500ms"``, ...; ``None`` = inferred (median
            spacing).
        columns: our field name -> the file's column name, for OHLCV and extras
            (e.g. ``{"close": "Adj Close"}``).
        delimiter: the field separator (one character; ``"tab"`` or ``"\\t"`` for a tab).
        decimal: the decimal mark, ``"."`` or ``","``.
        thousands: a thousands separator to remove (only in correct 3-digit groups).
        suffixes: accept ``K``/``M``/``B`` number suffixes (x1e3/1e6/1e9).
        on_bad_rows: ``"raise"``: stop at the first bad row with file and line; ``"skip"``: skip
            it, count it and report the count.
        start, end: optional inclusive bar-time bounds (aware UTC).

    Raises:
        ConfigError: at construction, for an empty symbol, an unknown bad-row policy, a bar
            size that is not ``<n><unit>``, an unknown timezone, or separators that clash.
    """

    path: Path
    symbol: str
    datetime_column: str | int | None = setting(
        None,
        env="CSV_DATETIME_COLUMN",
        help="datetime column name or 0-based index, or Date+Time to join a date and a time "
        "column; default: the first column",
    )
    datetime_format: str | None = setting(
        None,
        env="CSV_DATETIME_FORMAT",
        help="strftime format of that column, or epoch_s/epoch_ms/epoch_us/epoch_ns for Unix "
        "times; default: ISO 8601 or inferred (day/month order must be decidable)",
    )
    timezone: str = setting(
        "UTC", env="CSV_TIMEZONE", help="IANA timezone of naive timestamps in the files"
    )
    bar_size: str | None = setting(
        None,
        env="CSV_BAR_SIZE",
        help="bar size, e.g. 500ms, 1s, 1min, 5min, 1h, 1d, 1w, 1mo; default: inferred from the "
        "spacing of the bars",
    )
    columns: Mapping[str, str] = setting(
        env="CSV_COLUMNS",
        help='JSON object mapping our names to the file\'s, e.g. {"close": "Adj Close"}',
        default_factory=dict,
        default_text="",
    )
    delimiter: str = setting(
        ",", env="CSV_DELIMITER", help="field separator: one character, or tab"
    )
    decimal: Literal[".", ","] = setting(
        ".", env="CSV_DECIMAL", help="decimal mark of numbers: . or , (1,5 = 1.5)"
    )
    thousands: str | None = setting(
        None,
        env="CSV_THOUSANDS",
        help="thousands separator removed from numbers in 3-digit groups: , . ' or space, nbsp, "
        "nnbsp (a space, a no-break space, a narrow one); default: none, so 1,234 is not a "
        "number",
    )
    suffixes: bool = setting(
        False,
        env="CSV_NUMBER_SUFFIXES",
        help="numbers may end in K, M or B (x1e3, x1e6, x1e9), as Investing.com writes volumes",
    )
    on_bad_rows: Literal["raise", "skip"] = setting(
        "raise",
        env="CSV_ON_BAD_ROWS",
        help="raise (stop with file and line) or skip (skip, count, report)",
    )
    start: datetime | None = setting(
        None,
        env="BACKTEST_START",
        help="first bar time to use (ISO date or datetime; without an offset, in "
        "CSV_TIMEZONE), inclusive",
        local_time=True,
    )
    end: datetime | None = setting(
        None,
        env="BACKTEST_END",
        help="last bar time to use (ISO date or datetime; without an offset, in CSV_TIMEZONE), "
        "inclusive: a date includes its whole day",
        local_time=True,
    )

    def __post_init__(self) -> None:
        if isinstance(self.path, str | os.PathLike) and not isinstance(self.path, Path):
            object.__setattr__(self, "path", Path(self.path))  # "data/GOOG.csv", as users write it
        if not isinstance(self.path, Path):
            raise ConfigError(
                f"CSVFeedConfig.path: expected a file path, got {type(self.path).__name__}"
            )
        if not self.symbol:
            raise ConfigError("CSVFeedConfig.symbol must not be empty")
        if self.on_bad_rows not in ("raise", "skip"):
            raise ConfigError(f"CSV_ON_BAD_ROWS: expected raise or skip, got {self.on_bad_rows!r}")
        size = BAR_SIZE_RE.match((self.bar_size or "").strip().lower())
        if self.bar_size is not None and (size is None or int(size.group(1)) <= 0):
            raise ConfigError(
                f"CSV_BAR_SIZE={self.bar_size!r}: expected a positive count and a unit: "
                "500ms, 1s, 1min, 5min, 1h, 1d, 1w or 1mo"
            )
        for k, v in self.columns.items():
            if not isinstance(v, str):
                raise ConfigError(f"CSV_COLUMNS: expected string column names, got {k}={v!r}")
        if self.delimiter.lower() in ("tab", "\\t"):
            object.__setattr__(self, "delimiter", "\t")
        if len(self.delimiter) != 1 or self.delimiter in ('"', "\n", "\r"):
            raise ConfigError(
                f"CSV_DELIMITER={self.delimiter!r}: expected one character (e.g. , ; | or tab)"
            )
        if self.decimal not in (".", ","):
            raise ConfigError(f"CSV_DECIMAL={self.decimal!r}: expected . or ,")
        if self.decimal == self.delimiter:
            raise ConfigError(
                f"CSV_DECIMAL={self.decimal!r} is also CSV_DELIMITER: a decimal comma needs "
                "another separator, e.g. CSV_DELIMITER=;"
            )
        # spaces by name: an environment value of spaces alone is read as unset (found by an
        # attack, helper-67: CSV_THOUSANDS=" " was dropped; French exports group with U+202F)
        named = _SPACES.get((self.thousands or "").strip().lower())
        if named is not None:
            object.__setattr__(self, "thousands", named)
        if self.thousands is not None and (
            len(self.thousands) != 1 or self.thousands == self.decimal or self.thousands.isalnum()
        ):
            raise ConfigError(
                f"CSV_THOUSANDS={self.thousands!r}: expected one character other than the "
                f"decimal mark {self.decimal!r} (e.g. , . ' or space, nbsp, nnbsp)"
            )
        fmt = self.datetime_format
        if fmt is not None and fmt.startswith("epoch") and fmt not in EPOCH_FORMATS:
            raise ConfigError(
                f"CSV_DATETIME_FORMAT={fmt!r}: expected epoch_s, epoch_ms, epoch_us or epoch_ns"
            )
        if fmt is not None and fmt not in EPOCH_FORMATS:
            _check_strftime(fmt)
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ConfigError(
                f"CSV_TIMEZONE={self.timezone!r}: expected an IANA timezone such as UTC or "
                "America/New_York"
            ) from e
        for name, value in (("start", self.start), ("end", self.end)):
            if value is not None and not isinstance(value, datetime):
                raise ConfigError(
                    f"CSVFeedConfig.{name}: expected a datetime, got {type(value).__name__}"
                )
        if self.end is not None and self.end.time() == dt_time(0):
            # a date (or a midnight) ends with its whole day, in its own zone
            object.__setattr__(
                self, "end", self.end.replace(hour=23, minute=59, second=59, microsecond=999_999)
            )
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:  # the window in UTC; a time without an offset is CSV_TIMEZONE's
                aware = value.replace(tzinfo=zone) if value.tzinfo is None else value
                object.__setattr__(self, name, aware.astimezone(UTC))
        if self.start and self.end and self.end < self.start:
            raise ConfigError(
                f"BACKTEST_END={self.end.date()} is before BACKTEST_START={self.start.date()}"
            )


# directives pandas' strict parser (pandas._libs.tslibs.strptime) accepts
_DIRECTIVES = set("aAbBcdfGHIjmMpSuUVwWxXyYzZ%")


def _check_strftime(fmt: str) -> None:
    """Refuse a ``CSV_DATETIME_FORMAT`` with an unknown directive (``%Q``, a lone ``%``) or
    none at all, at start (pandas would raise ``ValueError`` only when reading).

    Raises:
        ConfigError: naming the variable and the directive.
    """
    i = 0
    found = False
    while i < len(fmt):
        if fmt[i] == "%":
            d = fmt[i + 1 : i + 2]
            if d not in _DIRECTIVES or not d:
                what = f"'%{d}'" if d else "a lone '%' at the end"
                raise ConfigError(
                    f"CSV_DATETIME_FORMAT={fmt!r}: {what} is not a strftime directive "
                    "(e.g. %Y-%m-%d %H:%M:%S, %d/%m/%Y; write a literal % as %%)"
                )
            found = found or d != "%"
            i += 2
        else:
            i += 1
    try:  # pandas' own check of the format (e.g. %G without %V), as it will be used
        pd.to_datetime(pd.Series(["2020-01-02"]), format=fmt, errors="coerce")
    except ValueError as e:
        raise ConfigError(f"CSV_DATETIME_FORMAT={fmt!r}: {e}") from e
    if not found:
        raise ConfigError(
            f"CSV_DATETIME_FORMAT={fmt!r}: no strftime directive (e.g. %Y-%m-%d %H:%M:%S), "
            "or epoch_s/epoch_ms/epoch_us/epoch_ns"
        )
