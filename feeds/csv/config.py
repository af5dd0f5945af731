"""How to read one historical CSV file: :class:`CSVFeedConfig`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from core.errors import ConfigError
from core.settings import setting

BAR_SIZE_RE = re.compile(r"^(\d+)\s*(s|sec|min|m|h|d|w|mo)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class CSVFeedConfig:
    """How to read one historical CSV file.

    Attributes:
        path: the file.
        symbol: the symbol its bars belong to (``BTC/USD`` style allowed); part of each data hash.
        datetime_column: column name, or 0-based position as an int; ``None`` = the first column.
        datetime_format: ``strftime`` format; ``None`` = inferred by pandas from the first value.
        timezone: IANA zone of naive timestamps (aware ones are converted to UTC regardless).
        bar_size: ``"1d"``, ``"1h"``, ``"5min"``, ...; ``None`` = inferred (median spacing).
        columns: our field name -> the file's column name, for OHLCV and extras
            (e.g. ``{"close": "Adj Close"}``).
        on_bad_rows: ``"raise"``: stop at the first bad row with file and line; ``"skip"``: skip
            it, count it and report the count.
        start, end: optional inclusive bar-time bounds (aware UTC).

    Raises:
        ConfigError: at construction, for an empty symbol, an unknown bad-row policy, a bar
            size that is not ``<n><unit>``, or an unknown timezone.
    """

    path: Path
    symbol: str
    datetime_column: str | int | None = setting(
        None,
        env="CSV_DATETIME_COLUMN",
        help="datetime column name or 0-based index; default: the first column",
    )
    datetime_format: str | None = setting(
        None, env="CSV_DATETIME_FORMAT", help="strftime format of that column; default: inferred"
    )
    timezone: str = setting(
        "UTC", env="CSV_TIMEZONE", help="IANA timezone of naive timestamps in the files"
    )
    bar_size: str | None = setting(
        None,
        env="CSV_BAR_SIZE",
        help="bar size, e.g. 1min, 5min, 1h, 1d, 1w, 1mo; default: inferred from the median "
        "spacing",
    )
    columns: Mapping[str, str] = setting(
        env="CSV_COLUMNS",
        help='JSON object mapping our names to the file\'s, e.g. {"close": "Adj Close"}',
        default_factory=dict,
        default_text="",
    )
    on_bad_rows: Literal["raise", "skip"] = setting(
        "raise",
        env="CSV_ON_BAD_ROWS",
        help="raise (stop with file and line) or skip (skip, count, report)",
    )
    start: datetime | None = setting(
        None, env="BACKTEST_START", help="first bar time to use (ISO date), inclusive"
    )
    end: datetime | None = setting(
        None, env="BACKTEST_END", help="last bar time to use (ISO date), inclusive"
    )

    def __post_init__(self) -> None:
        if not self.symbol:
            raise ConfigError("CSVFeedConfig.symbol must not be empty")
        if self.on_bad_rows not in ("raise", "skip"):
            raise ConfigError(f"CSV_ON_BAD_ROWS: expected raise or skip, got {self.on_bad_rows!r}")
        if self.bar_size is not None and not BAR_SIZE_RE.match(self.bar_size.strip().lower()):
            raise ConfigError(
                f"CSV_BAR_SIZE={self.bar_size!r}: expected 1min, 5min, 1h, 1d, 1w or 1mo"
            )
        for k, v in self.columns.items():
            if not isinstance(v, str):
                raise ConfigError(f"CSV_COLUMNS: expected string column names, got {k}={v!r}")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as e:
            raise ConfigError(
                f"CSV_TIMEZONE={self.timezone!r}: expected an IANA timezone such as UTC or "
                "America/New_York"
            ) from e
        if self.start and self.end and self.end < self.start:
            raise ConfigError(
                f"BACKTEST_END={self.end.date()} is before BACKTEST_START={self.start.date()}"
            )
