"""Reading, validating and hashing one CSV file into :class:`CSVBars` (pandas, vectorised).

Bad rows (unparsable date, non-numeric/NaN/infinite/non-positive price, high < low, negative
volume, timestamp duplicated or going backwards) raise :class:`~core.errors.DataError` naming the
file and line, or, with ``on_bad_rows="skip"``, are skipped, logged and counted
(:attr:`CSVBars.skipped`). The OHLCV rule is :func:`core.bars.check_bars`, shared with Pub/Sub.
Nothing is silently changed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import backtrader as bt
import numpy as np
import pandas as pd

from core.bars import (
    OHLCV,
    PRICE_FIELDS,
    RESERVED_NAMES,
    bar_hash,
    check_bars,
    field_name,
)
from core.errors import DataError
from feeds.csv.config import BAR_SIZE_RE, CSVFeedConfig

logger = logging.getLogger(__name__)

_MAX_LISTED = 5


@dataclass(slots=True)
class CSVBars:
    """A validated CSV file, ready to feed.

    Attributes:
        symbol: the symbol of every bar.
        path: the source file.
        times: bar times as ``datetime64[ns]`` UTC (naive), strictly increasing.
        numeric: field name -> float64 array (OHLCV first, then extras in file order).
        text: field name -> list of str/None.
        hashes: data hash per bar.
        timeframe, compression: backtrader bar size.
        skipped: ``(line, reason)`` of every skipped row.
    """

    symbol: str
    path: Path
    times: np.ndarray
    numeric: dict[str, np.ndarray]
    text: dict[str, list[str | None]]
    hashes: list[str]
    timeframe: int
    compression: int
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def extra_fields(self) -> tuple[str, ...]:
        return tuple(k for k in self.numeric if k not in OHLCV)

    def __len__(self) -> int:
        return len(self.times)


def parse_bar_size(text: str) -> tuple[int, int]:
    """``"5min"`` -> ``(bt.TimeFrame.Minutes, 5)``; ``"1h"`` -> ``(Minutes, 60)``; ``"1d"`` ->
    ``(Days, 1)``; ``"1w"``, ``"1mo"``, ``"30s"`` likewise.

    Raises:
        ValueError: for anything else.
    """
    m = BAR_SIZE_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"bar size {text!r}: expected e.g. 1min, 5min, 1h, 1d, 1w, 1mo")
    n, unit = int(m.group(1)), m.group(2)
    if n <= 0:
        raise ValueError(f"bar size {text!r}: expected a positive count")
    if unit in ("s", "sec"):
        return bt.TimeFrame.Seconds, n
    if unit in ("m", "min"):
        return bt.TimeFrame.Minutes, n
    if unit == "h":
        return bt.TimeFrame.Minutes, 60 * n
    if unit == "d":
        return bt.TimeFrame.Days, n
    if unit == "w":
        return bt.TimeFrame.Weeks, n
    return bt.TimeFrame.Months, n


def infer_bar_size(times: np.ndarray) -> tuple[int, int]:
    """Bar size from the median spacing of ``times`` (datetime64). Daily bars with weekend gaps
    have a median of one day; monthly bars 28-31 days."""
    if len(times) < 2:
        return bt.TimeFrame.Days, 1
    median_s = float(np.median(np.diff(times).astype("timedelta64[s]").astype(np.int64)))
    day = 86_400.0
    if median_s >= 27 * day:
        return bt.TimeFrame.Months, max(1, round(median_s / (30.44 * day)))
    if median_s >= 6.5 * day:
        return bt.TimeFrame.Weeks, max(1, round(median_s / (7 * day)))
    if median_s >= 0.9 * day:
        return bt.TimeFrame.Days, max(1, round(median_s / day))
    if median_s >= 60:
        return bt.TimeFrame.Minutes, max(1, round(median_s / 60))
    return bt.TimeFrame.Seconds, max(1, round(median_s))


def _resolve_columns(cfg: CSVFeedConfig, header: list[str]) -> tuple[str, dict[str, str]]:
    """(datetime column, {field name: file column}) for OHLCV and extras."""
    where = f"CSV {cfg.path.name}"
    dt_col = cfg.datetime_column
    if dt_col is None:
        dt_name = header[0]
    elif isinstance(dt_col, int):
        if not 0 <= dt_col < len(header):
            raise DataError(
                f"{where}: datetime column index {dt_col} is out of range (the file "
                f"has {len(header)} columns)"
            )
        dt_name = header[dt_col]
    else:
        if dt_col not in header:
            raise DataError(f"{where}: datetime column {dt_col!r} not found; columns are {header}")
        dt_name = dt_col
    explicit = {field_name(k): v for k, v in cfg.columns.items()}
    for ours, theirs in explicit.items():
        if theirs not in header:
            raise DataError(
                f"{where}: column {theirs!r} (mapped to {ours}) not found; columns are {header}"
            )
    used = set(explicit.values()) | {dt_name}
    mapping: dict[str, str] = {}
    by_norm: dict[str, str] = {}
    for col in header:
        if col in used:
            continue
        try:
            by_norm.setdefault(field_name(col), col)
        except ValueError as e:
            raise DataError(f"{where}: column {col!r}: {e}") from e
    for name in OHLCV:
        if name in explicit:
            mapping[name] = explicit[name]
        elif name in by_norm:
            mapping[name] = by_norm.pop(name)
    missing = [n for n in PRICE_FIELDS if n not in mapping]
    if missing:
        raise DataError(
            f"{where}: no column for {', '.join(missing)}; columns are {header} "
            "(map them with CSV_COLUMNS / CSVFeedConfig.columns)"
        )
    for name, col in explicit.items():
        if name not in OHLCV:
            mapping[name] = col
    for name, col in by_norm.items():
        if col not in mapping.values():
            mapping[name] = col
    for name in mapping:
        if name not in OHLCV and (name in RESERVED_NAMES or name.startswith("_")):
            raise DataError(
                f"{where}: column {mapping[name]!r} would become field {name!r}, a "
                "name backtrader reserves; rename it with CSV_COLUMNS"
            )
    return dt_name, mapping


def _parse_times(cfg: CSVFeedConfig, raw: pd.Series) -> pd.Series:
    """UTC-naive datetime64 (NaT where unparsable)."""
    fmt = cfg.datetime_format
    try:
        parsed = pd.to_datetime(raw, format=fmt, errors="coerce", utc=False)
    except (ValueError, TypeError):
        # mixed offsets: parse as UTC directly
        parsed = pd.to_datetime(raw, format=fmt, errors="coerce", utc=True)
    if getattr(parsed.dt, "tz", None) is None:
        try:
            parsed = parsed.dt.tz_localize(cfg.timezone, ambiguous="NaT", nonexistent="NaT")
        except (TypeError, ValueError) as e:
            raise DataError(
                f"CSV {cfg.path.name}: cannot apply timezone {cfg.timezone}: {e}"
            ) from e
    return parsed.dt.tz_convert("UTC").dt.tz_localize(None).astype("datetime64[ns]")


def read_csv_bars(cfg: CSVFeedConfig) -> CSVBars:
    """Read, validate and hash one CSV file.

    Returns:
        :class:`CSVBars` with strictly increasing bar times.

    Raises:
        DataError: the file is unreadable, a needed column is missing, or (``on_bad_rows=
            "raise"``) a row is bad: the message names the file, the line (1 = header) and
            the reason, and lists up to five bad rows.
    """
    where = f"CSV {cfg.path.name}"
    try:
        df = pd.read_csv(cfg.path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: cannot read {cfg.path}: {e}") from e
    if df.empty:
        raise DataError(f"{where}: no rows")
    header = [str(c) for c in df.columns]
    df.columns = header
    dt_name, mapping = _resolve_columns(cfg, header)

    n = len(df)
    lines = np.arange(n) + 2  # header is line 1
    bad: dict[int, str] = {}

    def flag(mask: np.ndarray, reason_of: Any) -> None:
        for i in np.flatnonzero(mask):
            if int(i) not in bad:
                bad[int(i)] = reason_of(int(i))

    raw_dt = df[dt_name].str.strip()
    times = _parse_times(cfg, raw_dt)
    flag(
        times.isna().to_numpy(),
        lambda i: (
            f"unparsable date {raw_dt.iat[i]!r}"
            + (f" (format {cfg.datetime_format})" if cfg.datetime_format else "")
        ),
    )

    numeric: dict[str, np.ndarray] = {}
    text: dict[str, list[str | None]] = {}
    for name, col in mapping.items():
        raw = df[col].str.strip()
        values = pd.to_numeric(raw.mask(raw == ""), errors="coerce").to_numpy(dtype=np.float64)
        not_number = np.isnan(values) & ~raw.str.lower().isin(["", "nan"]).to_numpy()
        if name in OHLCV:
            flag(not_number, lambda i, raw=raw, name=name: f"{name} {raw.iat[i]!r} is not a number")
            numeric[name] = values
        elif not_number.any():
            text[name] = [v if v != "" else None for v in raw.tolist()]
        else:
            numeric[name] = values
    if "volume" not in numeric:
        numeric["volume"] = np.full(n, np.nan)
        logger.info("%s: no volume column; volume reads as NaN", where)

    for i, reason in check_bars(*(numeric[k] for k in OHLCV)).items():
        bad.setdefault(i, reason)

    # Time order, judged against the rows that stay.
    t_int = times.to_numpy().astype("datetime64[ns]").astype(np.int64)
    last = None
    for i in range(n):
        if i in bad:
            continue
        if last is not None and t_int[i] <= last:
            bad[i] = (
                "duplicate timestamp " if t_int[i] == last else "timestamp goes backwards: "
            ) + str(times.iat[i])
            continue
        last = t_int[i]

    skipped: list[tuple[int, str]] = []
    if bad:
        items = sorted(bad.items())
        listed = "; ".join(f"line {lines[i]}: {r}" for i, r in items[:_MAX_LISTED])
        more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
        if cfg.on_bad_rows == "raise":
            raise DataError(
                f"{where} {listed}{more}. Fix the file, or set CSV_ON_BAD_ROWS=skip "
                "to skip and count bad rows"
            )
        skipped = [(int(lines[i]), r) for i, r in items]
        logger.warning("%s: skipped %d bad rows: %s%s", where, len(items), listed, more)

    keep = np.ones(n, dtype=bool)
    if bad:
        keep[list(bad)] = False
    tvals = times.to_numpy()
    if cfg.start is not None:
        keep &= tvals >= np.datetime64(cfg.start.replace(tzinfo=None), "ns")
    if cfg.end is not None:
        end = cfg.end.replace(tzinfo=None)
        if end.hour == end.minute == end.second == 0:
            end = end.replace(hour=23, minute=59, second=59, microsecond=999999)
        keep &= tvals <= np.datetime64(end, "ns")
    times_kept = tvals[keep]
    numeric = {k: a[keep] for k, a in numeric.items()}
    text = {k: [x for x, kk in zip(vals, keep, strict=True) if kk] for k, vals in text.items()}
    if len(times_kept) == 0:
        raise DataError(f"{where}: no bars left after validation and the date range")

    if cfg.bar_size:
        timeframe, compression = parse_bar_size(cfg.bar_size)
    else:
        timeframe, compression = infer_bar_size(times_kept)

    hashes = _hash_rows(cfg.symbol, times_kept, numeric, text)
    if text:
        logger.info(
            "%s: text columns %s are served as text fields (data.<name>[0] returns str)",
            where,
            ", ".join(text),
        )
    return CSVBars(
        symbol=cfg.symbol,
        path=cfg.path,
        times=times_kept,
        numeric=numeric,
        text=text,
        hashes=hashes,
        timeframe=timeframe,
        compression=compression,
        skipped=skipped,
    )


def _hash_rows(
    symbol: str,
    times: np.ndarray,
    numeric: dict[str, np.ndarray],
    text: dict[str, list[str | None]],
) -> list[str]:
    names = list(numeric)
    cols = [numeric[k].tolist() for k in names]
    tnames = list(text)
    tcols = [text[k] for k in tnames]
    stamps = pd.DatetimeIndex(times).to_pydatetime()
    out = []
    for i, ts in enumerate(stamps):
        values: dict[str, Any] = {}
        for name, col in zip(names, cols, strict=True):
            x = col[i]
            if not math.isnan(x):
                values[name] = x
        for name, tcol in zip(tnames, tcols, strict=True):
            if tcol[i] is not None:
                values[name] = tcol[i]
        out.append(bar_hash(symbol, ts, values))
    return out
