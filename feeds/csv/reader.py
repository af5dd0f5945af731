"""Reading, validating and hashing one CSV file into :class:`CSVBars` (pyarrow, vectorised).

The file is split into rows of text by pyarrow (:mod:`feeds.csv.table`, which also gives every
row its physical line number), values are parsed by :mod:`feeds.csv.values`, and every check is
a numpy operation over whole columns; the OHLCV rule is :func:`core.bars.check_bars`, shared with
Pub/Sub. Data hashes are computed per bar on first use (:class:`RowHashes`), not at load time.

Bad rows raise :class:`~core.errors.DataError` naming the file, the line as a text editor
counts it (1 = the header, blank lines counted) and the reason, or, with
``on_bad_rows="skip"``, are skipped, logged and counted (:attr:`CSVBars.skipped`): a wrong
number of fields, an unparsable or empty date, a price that is not a number, missing, NaN,
infinite or not positive, ``high < low``, open or close outside ``[low, high]``, a negative or
infinite volume, an infinite extra value, a time that does not exist in ``CSV_TIMEZONE``, a
timestamp duplicated or going backwards. Problems of the whole file (empty, no header, a
missing or duplicated column, an undecidable date format) always raise. Blank lines carry no
data and are only counted. Nothing is silently changed.
"""

from __future__ import annotations

import logging
import operator
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, overload
from zoneinfo import ZoneInfo

import backtrader as bt
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core import bar_hash_cache
from core.bars import (
    OHLCV,
    OPEN_INTEREST,
    PRICE_FIELDS,
    bar_hash,
    bar_hashes,
    bar_seconds,
    check_bars,
    field_name,
)
from core.errors import DataError
from core.hash_worker import BarHashJob
from feeds.csv.config import BAR_SIZE_RE, CSVFeedConfig
from feeds.csv.table import RawTable, read_header, read_raw_table
from feeds.csv.values import NumberStyle, day_starts, parse_numbers, parse_times, trim
from feeds.fields import reserved_reason

logger = logging.getLogger(__name__)

# Columns read into backtrader's own lines: OHLCV and open interest (a value that is not a
# number makes the row bad); any other column is an extra field.
_LINES: tuple[str, ...] = (*OHLCV, OPEN_INTEREST)

_MAX_LISTED = 5
_EPOCH = datetime(1970, 1, 1)
_DATA_LIKE = re.compile(
    r"^(?:[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}.*)$"
)


HASH_BLOCK = 256  # bars hashed together on a miss (RowHashes)
# Fewer bars than this in all the series of a prefetch: hashed in-thread (starting the helper
# process costs ~0.2 s of CPU on the other core; hashing costs ~4 us a bar)
PREFETCH_MIN_BARS = 2_000


class RowHashes(Sequence[str]):
    """Data hash of each bar of a :class:`CSVBars`, computed on first use and kept.

    Each is :func:`core.bars.bar_hash` of the bar's symbol, time and values (NaN numbers and
    empty text left out), exactly as the Pub/Sub feed computes it for the same bar. A slice is a
    new lazy sequence over the sliced arrays (with every hash already, when this series has
    them all: a study's windows of a file read once). Equal to any sequence of the same hashes.
    Complete series are kept on disk between runs (:mod:`core.bar_hash_cache`).

    Thread context: any thread (FMEL's decision writer asks from its own); two threads asking for
    the same block at once both compute it and store the same hashes (dict updates under the GIL).
    """

    __slots__ = ("_cache", "_disk", "_job", "_numeric", "_symbol", "_text", "_times")

    def __init__(
        self,
        symbol: str,
        times: np.ndarray,
        numeric: dict[str, np.ndarray],
        text: dict[str, list[str | None]],
    ) -> None:
        self._symbol = symbol
        self._times = times.astype("datetime64[ns]").astype(np.int64)
        # its own copies: a column the caller adds, replaces or edits in the CSVBars later
        # changes neither these hashes nor what the disk cache keeps under the file's key
        self._numeric = {k: np.asarray(v) for k, v in numeric.items()}
        self._text = {k: list(v) for k, v in text.items()}
        self._cache: dict[int, str] = {}
        self._job: tuple[BarHashJob, int] | None = None  # see prefetch_hashes
        # the disk cache (core.bar_hash_cache): None not asked yet, else its key ("" when off)
        self._disk: str | None = None

    def __len__(self) -> int:
        return len(self._times)

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> RowHashes: ...

    def __getitem__(self, index: int | slice) -> str | RowHashes:
        if isinstance(index, slice):
            part = RowHashes(
                self._symbol,
                self._times[index].view("datetime64[ns]"),
                {k: v[index] for k, v in self._numeric.items()},
                {k: v[index] for k, v in self._text.items()},
            )
            if len(self._cache) == len(self._times):  # every hash known: the slice's too
                cache = self._cache
                part._cache = dict(enumerate(map(cache.__getitem__, range(len(self))[index])))
                part._disk = ""  # nothing to read or keep: its hashes are the series'
            return part
        index = operator.index(index)  # TypeError for 1.0 or 2.5, as a list
        n = len(self._times)
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"bar {index} out of range ({n} bars)")
        digest = self._cache.get(i)
        if digest is None:
            digest = self._compute_block(i)
        return digest

    def take(self, indexes: Sequence[int]) -> list[str]:
        """``[self[i] for i in indexes]``, with the cached ones looked up in one pass (FMEL's
        writer asks for a batch's bars at once). Raises IndexError as ``self[i]`` does."""
        out: list[str | None] = list(map(self._cache.get, indexes))
        if None in out:
            for k, digest in enumerate(out):
                if digest is None:
                    out[k] = self[indexes[k]]
        return out  # type: ignore[return-value]  # no None is left

    def from_disk(self) -> bool:
        """Take every hash from the disk cache (:mod:`core.bar_hash_cache`) if it holds this
        series; asked once. Returns whether every hash is known now."""
        if self._disk is None:
            n = len(self._times)
            key = ""
            if bar_hash_cache.folder() is not None and n >= HASH_BLOCK:
                key = bar_hash_cache.cache_key(self._symbol, self._times, self._numeric, self._text)
            self._disk = key
            cached = bar_hash_cache.load(key, n) if key else None
            if cached is not None:
                self._cache.update(zip(range(n), cached))
        return len(self._cache) == len(self._times)

    def _to_disk(self) -> None:
        """Store the series in the disk cache once every hash is known (then never again)."""
        if self._disk and len(self._cache) == len(self._times):
            key, self._disk = self._disk, ""
            bar_hash_cache.store(key, [self._cache[j] for j in range(len(self._times))])

    def _compute_block(self, i: int) -> str:
        """Compute the hashes of the block of :data:`HASH_BLOCK` bars holding bar ``i`` at
        once (:func:`core.bars.bar_hashes`: whoever asks for one bar's hash, FMEL's writer,
        asks for its neighbours next); returns bar ``i``'s. The disk cache is asked first,
        and given the series once it is complete."""
        if self._disk is None and self.from_disk():
            return self._cache[i]
        job = self._job
        if job is not None:
            self._job = None
            done = job[0].result(job[1])
            if done is not None:
                if None in done:  # bars the helper left out: computed here when asked for
                    self._cache.update((j, h) for j, h in enumerate(done) if h is not None)
                else:
                    self._cache.update(zip(range(len(done)), done))  # type: ignore[arg-type]
                    self._to_disk()
                digest = self._cache.get(i)
                if digest is not None:
                    return digest
        lo = i - i % HASH_BLOCK
        hi = min(lo + HASH_BLOCK, len(self._times))
        try:
            digests = bar_hashes(
                self._symbol,
                self._times[lo:hi] // 1000,
                {k: v[lo:hi] for k, v in self._numeric.items()},
                {k: v[lo:hi] for k, v in self._text.items()},
            )
        except ValueError:  # a bar of the block the one-bar rule refuses: only bar i
            digest = self._cache[i] = self._compute(i)
            return digest
        self._cache.update(zip(range(lo, hi), digests, strict=True))
        self._to_disk()
        return digests[i - lo]

    def _compute(self, i: int) -> str:
        ts = _EPOCH + timedelta(microseconds=int(self._times[i]) // 1000)
        values: dict[str, Any] = {}
        for name, col in self._numeric.items():
            x = float(col[i])
            if x == x:  # not NaN
                values[name] = x
        for name, tcol in self._text.items():
            t = tcol[i]
            if t is not None:
                values[name] = t
        return bar_hash(self._symbol, ts, values)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self._times)):
            yield self[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (RowHashes, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RowHashes({self._symbol!r}, {len(self)} bars, {len(self._cache)} computed)"


def prefetch_hashes(sequences: Sequence[object]) -> BarHashJob | None:
    """Start hashing, in one helper process (:class:`core.hash_worker.BarHashJob`), every
    :class:`RowHashes` among ``sequences`` (or behind one: a :class:`core.bars.BarHashes`
    over a ``source``) that has computed nothing yet; each collects its hashes on first use.
    Other sequences are left alone. Returns the job, or ``None`` when there was nothing worth a
    process (fewer than :data:`PREFETCH_MIN_BARS` bars in all).

    Called by FMEL's analyzer at the start of a backtest whose reads are resolved on the
    writer's thread. Thread context: before the run, with no other thread using these
    sequences.
    """
    todo: list[RowHashes] = []
    for seq in sequences:
        # a feed's BarHashes reads through to its file's RowHashes (feeds.csv.feed)
        h = getattr(seq, "source", None) or seq
        if not isinstance(h, RowHashes) or h._cache or h._job is not None or h.from_disk():
            continue
        if all(h is not t for t in todo):
            todo.append(h)
    if sum(len(h) for h in todo) < PREFETCH_MIN_BARS:
        return None
    job = BarHashJob([(h._symbol, h._times // 1000, h._numeric, h._text) for h in todo])
    for k, h in enumerate(todo):
        h._job = (job, k)
    return job


@dataclass(slots=True)
class CSVBars:
    """A validated CSV file, ready to feed.

    Attributes:
        symbol: the symbol of every bar.
        path: the source file.
        times: bar times as ``datetime64[ns]`` UTC (naive), strictly increasing.
        numeric: field name -> float64 array (OHLCV first, then ``openinterest`` when the
            file has an ``OpenInterest`` column, then extras in file order).
        text: field name -> list of str/None.
        hashes: data hash per bar (:class:`RowHashes`, computed on first use; a list also does).
        timeframe, compression: backtrader bar size.
        skipped: ``(line, reason)`` of every skipped row.
        lines: physical line of each bar in the file (1 = header).
        timezone: IANA zone the file's times without an offset were read in
            (``CSV_TIMEZONE``).
        date_only: every bar time is a midnight in ``timezone``, or in the UTC offset it was
            written with (``day_offsets``): a file of dates, each bar holds its whole day; see
            :class:`~feeds.csv.feed.HistoricalCSVFeed`.
        day_offsets: for a file of dates written as midnights with their own UTC offsets
            (yfinance's ``2024-01-03 00:00:00-05:00``), each bar's offset, seconds (local =
            UTC + offset); else ``None``.
    """

    symbol: str
    path: Path
    times: np.ndarray
    numeric: dict[str, np.ndarray]
    text: dict[str, list[str | None]]
    hashes: Sequence[str]
    timeframe: int
    compression: int
    skipped: list[tuple[int, str]] = field(default_factory=list)
    lines: np.ndarray | None = None
    timezone: str = "UTC"
    date_only: bool = False
    day_offsets: np.ndarray | None = None
    _by_day: tuple[np.ndarray, np.ndarray] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def offsets_by_day(self) -> tuple[np.ndarray, np.ndarray]:
        """For a file of dates: ``(days, offsets)``, its local days (days since 1970-01-01,
        increasing) and the UTC offset of each day's midnight, seconds (written offsets, else
        ``timezone``'s). Two files of dates begin and end their days together when they agree
        on every day both hold. Computed once (a Cerebro of N such feeds compares N**2 pairs
        at start)."""
        if self._by_day is None:
            offsets = self.day_offsets
            if offsets is None:
                offsets = zone_offsets(self.times, self.timezone)
            ns = self.times.astype("datetime64[ns]").astype(np.int64) + offsets * 1_000_000_000
            self._by_day = (np.floor_divide(ns, 86_400_000_000_000), offsets)
        return self._by_day

    @property
    def extra_fields(self) -> tuple[str, ...]:
        return tuple(k for k in self.numeric if k not in OHLCV and k != OPEN_INTEREST)

    def __len__(self) -> int:
        return len(self.times)


def parse_bar_size(text: str) -> tuple[int, int]:
    """``"5min"`` -> ``(bt.TimeFrame.Minutes, 5)``; ``"1h"`` -> ``(Minutes, 60)``; ``"1d"`` ->
    ``(Days, 1)``; ``"1w"``, ``"1mo"``, ``"30s"`` likewise; ``"500ms"`` -> ``(MicroSeconds,
    500_000)`` (backtrader has no millisecond timeframe).

    Raises:
        ValueError: for anything else.
    """
    m = BAR_SIZE_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"bar size {text!r}: expected e.g. 500ms, 1s, 1min, 5min, 1h, 1d, 1w, 1mo")
    n, unit = int(m.group(1)), m.group(2)
    if n <= 0:
        raise ValueError(f"bar size {text!r}: expected a positive count")
    if unit == "ms":
        return bt.TimeFrame.MicroSeconds, 1000 * n
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


_UNITS = {
    bt.TimeFrame.Seconds: "s",
    bt.TimeFrame.Minutes: "min",
    bt.TimeFrame.Days: "d",
    bt.TimeFrame.Weeks: "w",
    bt.TimeFrame.Months: "mo",
    bt.TimeFrame.Years: "y",
}


def bar_size_text(timeframe: int, compression: int) -> str:
    """``(Minutes, 60)`` -> ``"1h"``, ``(Days, 1)`` -> ``"1d"``, ``(MicroSeconds, 500_000)`` ->
    ``"500ms"`` (the CSV_BAR_SIZE spelling; ``"250us"`` below a millisecond, ``"1tick"`` for
    ticks)."""
    if timeframe == bt.TimeFrame.Minutes and compression % 60 == 0:
        return f"{compression // 60}h"
    if timeframe == bt.TimeFrame.MicroSeconds:
        if compression % 1000 == 0:
            return f"{compression // 1000}ms"
        return f"{compression}us"
    return f"{compression}{_UNITS.get(timeframe, 'tick')}"


def parse_bar_size_text(text: str) -> tuple[int, int]:
    """Inverse of :func:`bar_size_text` (``"1y"`` and ``"250us"`` included).

    Raises:
        ValueError: for text that is not ``<n><unit>``.
    """
    for unit, timeframe in (("us", bt.TimeFrame.MicroSeconds), ("y", bt.TimeFrame.Years)):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return timeframe, int(text[: -len(unit)])
    tf, comp = parse_bar_size(text)
    return int(tf), int(comp)


# A spacing that at least this share of a file's spacings have is one of its bar lengths
# (1/5: a fifth of daily bars follow a weekend; a thin market's minutes still have many
# spacings of one minute).
_COMMON_SHARE = 0.2


def _bar_spacing_ms(spacing: np.ndarray) -> tuple[float, bool]:
    """``(spacing, common)`` of the spacings of a file's bars (whole milliseconds, at least
    one): the shortest that at least :data:`_COMMON_SHARE` of them have (``common``), else
    their median (irregular times)."""
    values, counts = np.unique(spacing, return_counts=True)
    common = values[(counts >= _COMMON_SHARE * len(spacing)) & (values > 0)]
    if len(common):
        return float(common[0]), True
    return float(np.median(spacing)), False


def infer_bar_size(times: np.ndarray) -> tuple[int, int]:
    """Bar size of ``times`` (datetime64). A day or longer (the lower median spacing, at least
    0.9 days): days, weeks or months, rounded (daily bars with weekend gaps: one day; monthly
    bars 28-31 days; a week shortened by a holiday stays a week). Below a day: the shortest
    spacing that at least a fifth of the spacings have, to the millisecond (a thin market
    lacking half its minutes: one minute), in the largest unit that holds it whole (``90 s`` ->
    ``(Seconds, 90)``, ``1.5 s`` -> ``(MicroSeconds, 1_500_000)``: backtrader has no
    milliseconds); irregular times (no such spacing): the median, rounded to whole minutes,
    seconds or milliseconds. Fewer than two times: one day."""
    if len(times) < 2:
        return bt.TimeFrame.Days, 1
    spacing = np.rint(np.diff(times).astype("timedelta64[ns]").astype(np.int64) / 1e6)
    seconds = float(np.percentile(spacing, 50, method="lower")) / 1000
    day = 86_400.0
    if seconds >= 27 * day:
        return bt.TimeFrame.Months, max(1, round(seconds / (30.44 * day)))
    if seconds >= 6.5 * day:
        return bt.TimeFrame.Weeks, max(1, round(seconds / (7 * day)))
    if seconds >= 0.9 * day:
        return bt.TimeFrame.Days, max(1, round(seconds / day))
    spacing_ms, common = _bar_spacing_ms(spacing)
    ms = max(1, round(spacing_ms))
    if common:  # a bar length many bars have: exact
        if ms % 60_000 == 0:
            return bt.TimeFrame.Minutes, ms // 60_000
        if ms % 1000 == 0:
            return bt.TimeFrame.Seconds, ms // 1000
        return bt.TimeFrame.MicroSeconds, 1000 * ms
    seconds = spacing_ms / 1000
    if seconds >= 60:
        return bt.TimeFrame.Minutes, round(seconds / 60)
    if seconds >= 1:
        return bt.TimeFrame.Seconds, round(seconds)
    return bt.TimeFrame.MicroSeconds, 1000 * ms


def _check_inferred_size(where: str, timeframe: int, compression: int, times: np.ndarray) -> None:
    """Log a WARNING when an inferred bar size below a day is under a quarter of the median
    spacing: found by an attack (helper-68), 5-minute bars with a corrected re-print 1 s after
    every fourth bar were taken as 1-second bars, with nothing said. A thin market (a fifth of
    its minutes) is warned too: setting CSV_BAR_SIZE says which it is."""
    length = bar_seconds(timeframe, compression)
    if len(times) < 3 or length >= 0.9 * 86_400:
        return
    median_s = float(np.median(np.diff(times).astype("timedelta64[ns]").astype(np.int64))) / 1e9
    if median_s > 4 * length:
        logger.warning(
            "%s: bar size inferred as %s (a fifth of the spacings or more), but the median "
            "spacing is %g s: if the bars are that far apart, set CSV_BAR_SIZE",
            where,
            bar_size_text(timeframe, compression),
            median_s,
        )


# When a file's bars are too close or too far apart for CSV_BAR_SIZE: a bar length many of
# its bars have (:func:`_bar_spacing_ms`) below 0.9 of the declared one (a month counts 30.44
# days and runs 28 to 31), or 9 in 10 spacings above 1.25 of it. A feed that lacks bars (a
# thin market's minutes) still has many spacings of one bar length; a file of longer bars has
# none.
_CLOSER, _FARTHER = 0.9, 1.25


def _check_declared_size(
    where: str, text: str, timeframe: int, compression: int, times: np.ndarray
) -> None:
    """Log a WARNING when the bars of a file (``times``, datetime64, at least three) are not as
    far apart as the declared ``CSV_BAR_SIZE`` (``text``, parsed to ``timeframe`` and
    ``compression``) says. Found by an attack (helper-65): a file of 5-minute bars declared
    ``1min`` was noted as missing four steps in five beside 1-minute bars, with nothing said.
    Only a warning: the declared size is used as given."""
    if len(times) < 3:
        return
    declared_s = bar_seconds(timeframe, compression)
    spacing_s = np.diff(times).astype("timedelta64[ns]").astype(np.int64) / 1e9
    spacing_ms, common = _bar_spacing_ms(np.rint(spacing_s * 1000))
    low_s = float(np.percentile(spacing_s, 10))
    if spacing_ms / 1000 < _CLOSER * declared_s:
        seen = f"{'often' if common else 'a median'} {spacing_ms / 1000:g} s apart"
    elif low_s > _FARTHER * declared_s:
        seen = f"{low_s:g} s or more apart (9 in 10 of them)"
    else:
        return
    logger.warning(
        "%s: CSV_BAR_SIZE=%s, but its bars are %s, as bars of %s are: the bar size decides "
        "at which steps the feed is noted as having missed a bar (feeds_missed_step) and how "
        "curves of daily or longer bars are annualised. Set CSV_BAR_SIZE to the bars' size, "
        "or leave it unset to infer it",
        where,
        text,
        seen,
        bar_size_text(*infer_bar_size(times)),
    )


def _header_index(header: list[str], name: str, where: str, what: str) -> int:
    if name not in header:
        raise DataError(f"{where} line 1: {what} {name!r} not found; columns are {header}")
    if header.count(name) > 1:
        raise DataError(f"{where} line 1: column {name!r} appears {header.count(name)} times")
    return header.index(name)


def _resolve_columns(
    cfg: CSVFeedConfig, header: list[str]
) -> tuple[list[int], dict[str, int], list[int]]:
    """(datetime column positions, {field name: column position} for OHLCV and extras,
    positions of nameless columns: ignored when they hold no value).

    Raises:
        DataError: naming line 1 (the header): a column not found, two columns that become one
            field name, a missing price column, a reserved name.
    """
    where = f"CSV {cfg.path.name}"
    dt_spec = cfg.datetime_column
    if dt_spec is None:
        dt_cols = [0]
    elif isinstance(dt_spec, int):
        if not 0 <= dt_spec < len(header):
            raise DataError(
                f"{where} line 1: datetime column index {dt_spec} is out of range (the file "
                f"has {len(header)} columns)"
            )
        dt_cols = [dt_spec]
    elif dt_spec not in header and "+" in dt_spec:
        dt_cols = [
            _header_index(header, part.strip(), where, "datetime column")
            for part in dt_spec.split("+")
        ]
    else:
        dt_cols = [_header_index(header, dt_spec, where, "datetime column")]
    explicit: dict[str, int] = {}
    for ours, theirs in cfg.columns.items():
        explicit[field_name(ours)] = _header_index(
            header, theirs, where, f"column (mapped to {ours} by CSV_COLUMNS)"
        )
    used = set(explicit.values()) | set(dt_cols)
    by_norm: dict[str, list[int]] = {}
    nameless: list[int] = []
    for pos, col in enumerate(header):
        if pos in used:
            continue
        if not col:
            nameless.append(pos)
            continue
        try:
            name = field_name(col)
        except ValueError as e:
            raise DataError(f"{where} line 1: column {col!r}: {e}") from e
        by_norm.setdefault(name, []).append(pos)
    for name, positions in by_norm.items():
        clash = ([explicit[name]] if name in explicit else []) + positions
        if len(clash) > 1:
            cols = " and ".join(repr(header[p]) for p in sorted(clash))
            raise DataError(
                f"{where} line 1: columns {cols} would both become field {name!r}; map them "
                f'to distinct names with CSV_COLUMNS (e.g. {{"{name}": {header[clash[0]]!r}, '
                f'"{name}_2": {header[clash[1]]!r}}})'.replace("'", '"')
            )
    mapping: dict[str, int] = {}
    for name in OHLCV:
        if name in explicit:
            mapping[name] = explicit[name]
        elif name in by_norm:
            mapping[name] = by_norm.pop(name)[0]
    missing = [n for n in PRICE_FIELDS if n not in mapping]
    if missing:
        raise DataError(
            f"{where} line 1: no column for {', '.join(missing)}; columns are {header} "
            "(map them with CSV_COLUMNS / CSVFeedConfig.columns)"
        )
    for name, pos in explicit.items():
        if name not in OHLCV:
            mapping[name] = pos
    for name, positions in by_norm.items():
        mapping[name] = positions[0]
    for name, pos in mapping.items():
        why = None if name in _LINES else reserved_reason(name)
        if why:
            raise DataError(
                f"{where} line 1: column {header[pos]!r} would become field {name!r}, a "
                f"reserved name ({why}): data.{name} would not read the column; rename it "
                f'with CSV_COLUMNS, e.g. CSV_COLUMNS={{"{name}_value": "{header[pos]}"}}'
            )
    return dt_cols, mapping, nameless


def _check_nameless(raw: RawTable, nameless: list[int], where: str) -> None:
    """A column without a name is ignored when it holds no value, else refused."""
    for pos in nameless:
        if pc.all(pc.equal(trim(raw.columns[pos]), "")).as_py() in (True, None):
            logger.info("%s: column %d has no name and no values; ignored", where, pos + 1)
            continue
        raise DataError(
            f"{where} line 1: column {pos + 1} has no name but has values; name it in the header"
        )


def _check_header(cfg: CSVFeedConfig, header: list[str]) -> None:
    cells = [c for c in header if c]
    if len(cells) >= 2 and all(_DATA_LIKE.match(c) for c in cells):
        raise DataError(
            f"CSV {cfg.path.name} line 1: looks like data, not a header ({', '.join(cells[:3])}"
            ", ...); add a header line naming the columns (e.g. Date,Open,High,Low,Close,Volume)"
        )


def read_csv_bars(cfg: CSVFeedConfig) -> CSVBars:
    """Read, validate and index one CSV file (hashes are computed on first use).

    Returns:
        :class:`CSVBars` with strictly increasing bar times.

    Raises:
        DataError: the file is unreadable, empty or without a header, a needed column is
            missing or two columns clash, the date order is ambiguous, or (``on_bad_rows=
            "raise"``) a row is bad: the message names the file, the line (1 = header, blank
            lines counted) and the reason, and lists up to five bad rows.
    """
    where = f"CSV {cfg.path.name}"
    try:
        data = cfg.path.read_bytes()
    except OSError as e:
        raise DataError(f"{where}: cannot read {cfg.path}: {e.strerror or e}") from e
    header = read_header(data, delimiter=cfg.delimiter, where=where)
    _check_header(cfg, header)
    dt_cols, mapping, nameless = _resolve_columns(cfg, header)
    style = NumberStyle(decimal=cfg.decimal, thousands=cfg.thousands, suffixes=cfg.suffixes)
    # plain numbers: the OHLCV columns are parsed while reading (one C++ pass)
    fast = tuple(mapping[k] for k in OHLCV if k in mapping) if style == NumberStyle() else ()
    raw = read_raw_table(
        data, delimiter=cfg.delimiter, where=where, header=header, float_columns=fast
    )
    del data
    _check_nameless(raw, nameless, where)
    n = len(raw)
    if n == 0 and not raw.bad_rows:
        raise DataError(f"{where} line 2: no data rows after the header")
    lines = raw.lines
    bad: dict[int, str] = {}

    dt_text = raw.columns[dt_cols[0]]
    for pos in dt_cols[1:]:
        part = trim(raw.columns[pos])
        # an empty part (a missing time) would parse as midnight: the row is bad instead
        part_empty = np.asarray(pc.equal(part, "").to_numpy(zero_copy_only=False), dtype=bool)
        first_filled = np.asarray(
            pc.not_equal(trim(raw.columns[dt_cols[0]]), "").to_numpy(zero_copy_only=False),
            dtype=bool,
        )
        for pos_i in np.flatnonzero(part_empty & first_filled):
            bad.setdefault(int(pos_i), f"the {header[pos]} value is empty")
        dt_text = pc.binary_join_element_wise(trim(dt_text), part, " ")
    times = (
        parse_times(
            dt_text, fmt=cfg.datetime_format, timezone=cfg.timezone, lines=lines, where=where
        )
        if n
        else None
    )
    if times is not None:
        for i, reason in times.bad.items():
            bad.setdefault(i, reason)

    numeric: dict[str, np.ndarray] = {}
    for name in _LINES:
        if name not in mapping:
            continue
        col = raw.columns[mapping[name]]
        values, not_number = parse_numbers(col, style)
        for pos_i in np.flatnonzero(not_number):
            j = int(pos_i)
            bad.setdefault(j, f"{name} {col[j].as_py().strip()!r} is not a number")
        if name == OPEN_INTEREST:  # a finite number >= 0 (contracts) or empty (NaN)
            for pos_i in np.flatnonzero(np.isinf(values) | (values < 0)):
                j = int(pos_i)
                why = "is infinite" if np.isinf(values[j]) else "is negative"
                bad.setdefault(j, f"{name} {col[j].as_py().strip()!r} {why}")
        numeric[name] = values
    if "volume" not in numeric:
        numeric["volume"] = np.full(n, np.nan)
        logger.info("%s: no volume column; volume reads as NaN", where)
    for i, reason in check_bars(*(numeric[k] for k in OHLCV)).items():
        bad.setdefault(i, reason)

    # An extra column is numeric when every value of the rows still good is a number (a row
    # already bad, e.g. Yahoo's all-"null" rows, does not turn a numeric column into text).
    still_good = np.ones(n, dtype=bool)
    if bad:
        still_good[list(bad)] = False
    text: dict[str, list[str | None]] = {}
    for name, pos in mapping.items():
        if name in _LINES:
            continue
        col = raw.columns[pos]
        values, not_number = parse_numbers(col, style)
        if (not_number & still_good).any():
            col = trim(col)
            nulled = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
            text[name] = nulled.to_pylist()
            continue
        numeric[name] = values
        _warn_rounded(where, name, values, lines)
        for pos_i in np.flatnonzero(np.isinf(values) & still_good):
            j = int(pos_i)
            bad.setdefault(j, f"{name} {col[j].as_py().strip()!r} is infinite")

    t_ns = times.ns if times is not None else np.zeros(0, dtype=np.int64)
    _check_order(t_ns, bad)
    _check_spacing(t_ns, bad)

    problems = sorted([(int(lines[i]), r) for i, r in bad.items()] + raw.bad_rows)
    if problems:
        listed = "; ".join(f"line {line}: {r}" for line, r in problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        if _newest_first(t_ns, bad):
            more += (
                " (the file runs newest first: sort it oldest first, e.g. "
                "df.sort_values(date column) in pandas)"
            )
        if cfg.on_bad_rows == "raise":
            raise DataError(
                f"{where} {listed}{more}. Fix the file, or set CSV_ON_BAD_ROWS=skip "
                "to skip and count bad rows"
            )
        logger.warning("%s: skipped %d bad rows: %s%s", where, len(problems), listed, more)
    if raw.blank_lines:
        logger.info("%s: %d blank lines ignored", where, raw.blank_lines)

    keep = np.ones(n, dtype=bool)
    if bad:
        keep[list(bad)] = False
    tvals = t_ns.view("datetime64[ns]")
    # the window, aware UTC (CSVFeedConfig: a time without an offset is CSV_TIMEZONE's, an end
    # given as a date includes its whole day)
    wall, start, end = tvals, cfg.start, cfg.end
    if (start is not None or end is not None) and keep.any():
        # dates written as midnights with their own offsets are windowed by their own dates,
        # as a window's dates are CSV_TIMEZONE's (found by an attack, helper-68: a Kolkata
        # file lost its first day and gained one after the end)
        good = pc.filter(dt_text, keep)
        # any row (helper-69: a first row without an offset turned the rule off)
        if pc.any(pc.match_substring_regex(trim(good), _OFFSET_MIDNIGHT)).as_py():
            offsets = _day_offsets(good, tvals[keep], cfg.timezone, where, lines[keep], warn=False)
            if offsets is not None:
                wall = tvals.copy()
                wall[keep] = tvals[keep] + offsets.astype("timedelta64[s]")
                zone = ZoneInfo(cfg.timezone)
                start = None if start is None else start.astimezone(zone).replace(tzinfo=UTC)
                end = None if end is None else end.astimezone(zone).replace(tzinfo=UTC)
    if start is not None:
        keep &= wall >= np.datetime64(start.astimezone(UTC).replace(tzinfo=None), "ns")
    if end is not None:
        keep &= wall <= np.datetime64(end.astimezone(UTC).replace(tzinfo=None), "ns")
    if keep.all():  # the common case: no copy
        times_kept = tvals
    else:
        times_kept = tvals[keep]
        numeric = {k: a[keep] for k, a in numeric.items()}
        keep_list = keep.tolist()
        text = {k: [x for x, kk in zip(v, keep_list, strict=True) if kk] for k, v in text.items()}
    if len(times_kept) == 0:
        first_line = problems[0][0] if problems else int(lines[0])
        raise DataError(
            f"{where} line {first_line}: no bars left: {len(problems)} bad rows skipped, "
            f"{int((~keep).sum()) - len(bad)} outside BACKTEST_START/BACKTEST_END"
        )

    if cfg.bar_size:
        timeframe, compression = parse_bar_size(cfg.bar_size)
        _check_declared_size(where, cfg.bar_size, timeframe, compression, times_kept)
    else:
        timeframe, compression = infer_bar_size(times_kept)
        _check_inferred_size(where, timeframe, compression, times_kept)
    if text:
        logger.info(
            "%s: text columns %s are served as text fields (data.<name>[0] returns str)",
            where,
            ", ".join(text),
        )
    if times is not None and times.how:
        logger.info("%s: dates read as %s", where, times.how)
    date_only, day_offsets = _midnights(times_kept, cfg.timezone), None
    if not date_only and timeframe >= bt.TimeFrame.Days and n:
        kept_text = dt_text if keep.all() else pc.filter(dt_text, keep)
        day_offsets = _day_offsets(kept_text, times_kept, cfg.timezone, where, lines[keep])
        date_only = day_offsets is not None
    return CSVBars(
        symbol=cfg.symbol,
        path=cfg.path,
        times=times_kept,
        numeric=numeric,
        text=text,
        hashes=RowHashes(cfg.symbol, times_kept, numeric, text),
        timeframe=timeframe,
        compression=compression,
        skipped=problems if cfg.on_bad_rows == "skip" else [],
        lines=lines if keep.all() else lines[keep],
        timezone=cfg.timezone,
        date_only=date_only,
        day_offsets=day_offsets,
    )


# A midnight with its UTC offset, at the end of a time: "2024-01-03 00:00:00-05:00" (yfinance's
# daily bars), "2024-01-03T00:00+0530", "...00:00:00.000Z".
_OFFSET_MIDNIGHT = r"[T ]00:00(?::00(?:\.0+)?)?\s*(?P<sign>[Zz+-])(?P<hh>\d{2})?:?(?P<mm>\d{2})?$"


def _day_offsets(
    text: pa.Array,
    times: np.ndarray,
    timezone: str,
    where: str,
    lines: np.ndarray,
    *,
    warn: bool = True,
) -> np.ndarray | None:
    """For a file of dates given as midnights, some or all written with their own UTC offset
    (yfinance's daily bars, ``2024-01-03 00:00:00-05:00``): the UTC offset of each day's
    midnight, seconds (local = UTC + offset; a row without an offset: ``timezone``'s). A file
    of dates whatever ``CSV_TIMEZONE`` says. Found by an attack (helper-67): such a file beside
    hourly bars was delivered at 05:00 UTC, and the agent read each day's close at its start
    with no look-ahead flagged. ``None`` when a time is not a midnight; logged as a WARNING
    when nine in ten are (helper-68: one such row turned the rule off silently).

    Args:
        text: the kept rows' date text; times: their UTC times (``datetime64[ns]``, naive);
        lines: their lines in the file.
    """
    parts = pc.extract_regex(trim(text), _OFFSET_MIDNIGHT)
    written = np.asarray(pc.is_valid(parts).to_numpy(zero_copy_only=False), dtype=bool)
    sign = np.asarray(pc.struct_field(parts, "sign").to_numpy(zero_copy_only=False))
    hh = np.asarray(pc.struct_field(parts, "hh").to_numpy(zero_copy_only=False))
    mm = np.asarray(pc.struct_field(parts, "mm").to_numpy(zero_copy_only=False))
    hours = np.array([int(h) if h else 0 for h in hh], dtype=np.int64)
    minutes = np.array([int(m) if m else 0 for m in mm], dtype=np.int64)
    written &= ~(np.isin(sign, ["Z", "z"]) & ((hours != 0) | (minutes != 0)))
    own = np.where(sign == "-", -1, 1) * (hours * 3600 + minutes * 60)
    in_zone = _midnight_mask(times, timezone)
    dates = written | in_zone
    if not dates.all():
        if warn and dates.mean() >= 0.9:
            j = int(np.flatnonzero(~dates)[0])
            logger.warning(
                "%s line %d: %r is not a midnight, so the file is not read as a file of dates "
                "(%d of %d rows are not): beside intraday bars each day's bar is seen at its "
                "own time, which for a date is the start of its day. Give every row as a date",
                where,
                int(lines[j]),
                str(text[j].as_py()).strip(),
                int((~dates).sum()),
                len(dates),
            )
        return None
    if not written.any():
        return None  # dates in the zone alone: date_only already (_midnights)
    offsets: np.ndarray = np.where(written, own, zone_offsets(times, timezone))
    return offsets


def zone_offsets(times: np.ndarray, timezone: str) -> np.ndarray:
    """The UTC offset of ``timezone`` at each time of ``times`` (``datetime64[ns]``, naive
    UTC), int64 seconds (local = UTC + offset)."""
    if timezone == "UTC":
        return np.zeros(len(times), dtype=np.int64)
    wall = pd.DatetimeIndex(times).tz_localize("UTC").tz_convert(timezone).tz_localize(None)
    delta = wall.to_numpy().astype("datetime64[ns]") - times.astype("datetime64[ns]")
    seconds: np.ndarray = delta.astype(np.int64) // 1_000_000_000
    return seconds


def _midnights(times: np.ndarray, timezone: str) -> bool:
    """Whether every time of ``times`` (``datetime64[ns]``, naive UTC) begins its day in
    ``timezone`` (:func:`~feeds.csv.values.day_starts`: a midnight, or 01:00 where the zone
    skips midnight): a file of dates."""
    return len(times) > 0 and bool(_midnight_mask(times, timezone).all())


def _midnight_mask(times: np.ndarray, timezone: str) -> np.ndarray:
    """Which times of ``times`` (``datetime64[ns]``, naive UTC) begin their day in
    ``timezone`` (see :func:`_midnights`)."""
    ns = times.view(np.int64)
    if timezone == "UTC":
        mask: np.ndarray = ns % 86_400_000_000_000 == 0
        return mask
    aware = pd.DatetimeIndex(times).tz_localize("UTC").tz_convert(timezone)
    starts = day_starts(pd.Series(aware.tz_localize(None).normalize()), timezone)
    return np.asarray(pd.DatetimeIndex(starts) == aware, dtype=bool)


# The largest magnitude below which every integer is exact in float64 (IEEE 754: 53 bits).
_EXACT_INTEGERS = 2.0**53


def _warn_rounded(where: str, name: str, values: np.ndarray, lines: np.ndarray) -> None:
    """Log a WARNING when an extra column holds numbers beyond 2**53, where float64 (the type of
    backtrader's lines) no longer holds every integer (trade ids, nanosecond times): their
    last digits may have been rounded. Found by an attack (helper-67): Binance's ``first_id``
    9007199254740993 read as 9007199254740992.0, silently."""
    # ids and times fit 64 bits; a larger number ("1e300") was a float already (helper-68)
    size = np.abs(values)
    big = np.flatnonzero((size >= _EXACT_INTEGERS) & (size < 2.0**64))
    if len(big):
        j = int(big[0])
        logger.warning(
            "%s line %d: %s reads as %.17g: numbers beyond 2**53 are not exact integers in "
            "float64 (backtrader's lines), so the column's large values may be rounded (%d "
            "rows)",
            where,
            int(lines[j]),
            name,
            values[j],
            len(big),
        )


def _newest_first(t_ns: np.ndarray, bad: dict[int, str]) -> bool:
    """True when most of the file's times go backwards (a newest-first export)."""
    if len(t_ns) < 3:
        return False
    ok = np.ones(len(t_ns), dtype=bool)
    for i, reason in bad.items():
        ok[i] = reason.startswith(("timestamp goes backwards", "duplicate timestamp"))
    t = t_ns[ok]
    return len(t) >= 3 and float(np.mean(np.diff(t) < 0)) > 0.9


# Bar times are kept to the millisecond downstream (decision records' bar_time, backtrader's
# float day numbers: ~10 us coarse at today's dates), so two bars less than this apart would
# be one time there.
_MIN_SPACING_NS = 1_000_000


def _check_spacing(t_ns: np.ndarray, bad: dict[int, str]) -> None:
    """Flag a row less than 1 ms after the previous row that stays (found by an attack,
    helper-59: bars 7 us apart all became one bar time, 14:30:00.000, and the report failed).
    After :func:`_check_order`, so the rows that stay are in order."""
    keep = np.ones(len(t_ns), dtype=bool)
    if bad:
        keep[list(bad)] = False
    rows = np.flatnonzero(keep)
    if len(rows) < 2 or not (np.diff(t_ns[rows]) < _MIN_SPACING_NS).any():
        return
    last = int(t_ns[rows[0]])
    for pos_i in rows[1:]:
        i = int(pos_i)
        t = int(t_ns[i])
        if t - last < _MIN_SPACING_NS:
            bad[i] = (
                f"timestamp {pd.Timestamp(t)} UTC is less than 1 ms after the previous bar's "
                f"({pd.Timestamp(last)} UTC): bar times are kept to the millisecond"
            )
        else:
            last = t


def _check_order(t_ns: np.ndarray, bad: dict[int, str]) -> None:
    """Flag rows whose time does not come after every earlier good row's (duplicate or going
    backwards), judged against the rows that stay, vectorised.

    A row flagged here is never later than the running maximum, so leaving it in the maximum
    changes nothing: one pass of ``maximum.accumulate`` over the good rows decides all.
    """
    if len(t_ns) < 2:
        return
    floor = np.iinfo(np.int64).min
    good = t_ns.copy()
    if bad:
        good[list(bad)] = floor
    prev_max = np.maximum.accumulate(good)[:-1]
    later = t_ns[1:]
    ok = np.ones(len(t_ns), dtype=bool)
    if bad:
        ok[list(bad)] = False
    flagged = np.flatnonzero(ok[1:] & (later <= prev_max)) + 1
    for pos_i in flagged:
        i = int(pos_i)
        stamp = f"{pd.Timestamp(int(t_ns[i]))} UTC"
        if t_ns[i] == prev_max[i - 1]:
            bad[i] = f"duplicate timestamp {stamp}"
        else:
            bad[i] = f"timestamp goes backwards: {stamp}"
