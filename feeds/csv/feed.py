"""The backtrader feed over a validated CSV file: :class:`HistoricalCSVFeed` and
:func:`make_csv_feed`. Extra numeric columns are lines (``data.rsi[0]``); text columns are
:class:`~feeds.fields.TextLine` fields (``data.headline[0]``); each bar keeps its data hash."""

from __future__ import annotations

import bisect
import logging
import math
import sys
from datetime import datetime, timedelta
from datetime import time as dt_time
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import backtrader as bt
import numpy as np
import pandas as pd

from core.bars import BarHashes
from core.errors import ConfigError
from feeds.csv.config import CSVFeedConfig
from feeds.csv.reader import CSVBars, read_csv_bars
from feeds.fields import TextLine, dynamic_feed_class, refuse_aggregated_fields

logger = logging.getLogger(__name__)


def _always_utc(zone: Any) -> bool:
    """Whether ``zone`` (``None``, an IANA name, or a ``tzinfo`` such as pytz's, as backtrader's
    ``tzinput`` takes) is UTC in winter and summer from 1970 to 2030 (``UTC``, ``Etc/UTC``,
    ``GMT``...). An unknown name is not: backtrader refuses it itself."""
    if zone is None:
        return True
    try:
        tz = ZoneInfo(zone) if isinstance(zone, str) else zone
        return all(
            tz.utcoffset(datetime(year, month, 1)) == timedelta(0)
            for year in (1970, 2000, 2030)
            for month in (1, 7)
        )
    except (ValueError, TypeError, ZoneInfoNotFoundError, AttributeError):
        return False


def _same_days(a: CSVBars, b: CSVBars) -> bool:
    """Whether two files of dates begin and end their days together: the same UTC offset at
    each day both hold (written offsets, else their ``CSV_TIMEZONE``'s). Found by attacks:
    yfinance's BTC-USD (``+00:00``) beside SPY (``-05:00``) kept their midnights, so at 00:00
    UTC the agent saw BTC's close of a day not yet over (helper-68); London beside Casablanca
    have the same offsets on different days (helper-69)."""
    if a.day_offsets is None and b.day_offsets is None and a.timezone == b.timezone:
        return True
    (days_a, offsets_a), (days_b, offsets_b) = a.offsets_by_day(), b.offsets_by_day()
    if np.array_equal(days_a, days_b):  # the usual case: the same trading days
        return bool(np.array_equal(offsets_a, offsets_b))
    _, in_a, in_b = np.intersect1d(days_a, days_b, return_indices=True)
    return bool(np.array_equal(offsets_a[in_a], offsets_b[in_b]))


class HistoricalCSVFeed(bt.feed.DataBase):  # type: ignore[misc]
    """Backtrader feed over :class:`CSVBars`. Use :func:`make_csv_feed`, which builds a subclass
    whose ``lines`` include the file's extra numeric fields.

    Attributes:
        symbol: the bars' symbol.
        bar_hashes: data hash by absolute bar index (each computed on first use).
        text_lines: text field name -> :class:`TextLine`.
        extra_fields: numeric extra line names.
        skipped_rows: ``(line, reason)`` of skipped rows.
    """

    params = (("bars", None),)

    def __init__(self) -> None:
        bars: CSVBars = self.p.bars
        self.symbol = bars.symbol
        self.bar_hashes = BarHashes(source=bars.hashes)
        self.extra_fields = bars.extra_fields
        self.skipped_rows = bars.skipped
        self.text_lines = {name: TextLine(self, name) for name in bars.text}
        for name, text_line in self.text_lines.items():
            setattr(self, name, text_line)  # data.headline[0], like a line
        self._bars = bars
        self._i = 0
        self._rows: list[int] | None = None
        self._cols: list[tuple[Any, list[float]]] = []
        self._dates: list[float] = []

    def start(self) -> None:
        super().start()
        bars = self._bars
        if not (_always_utc(self.p.tzinput) or _always_utc(bars.timezone)):
            # found by an attack (helper-65): the file's times, already read in CSV_TIMEZONE
            # and stored as UTC, were localised again by backtrader (AbstractDataBase.load)
            raise ConfigError(
                f"{self.symbol}: tzinput={self.p.tzinput!r} and CSV_TIMEZONE={bars.timezone} "
                "both say which zone the file's times are in; set one of them (CSV_TIMEZONE "
                "reads the file's times in that zone; tzinput, backtrader's, localises times "
                "read as UTC)"
            )
        refuse_aggregated_fields(self, self.symbol, tuple(bars.extra_fields), tuple(bars.text))
        self.bar_hashes = BarHashes(source=bars.hashes)  # computed when first read
        for name in bars.text:
            self.text_lines[name] = TextLine(self, name)
            setattr(self, name, self.text_lines[name])
        times = pd.DatetimeIndex(bars.times)
        if bars.date_only and self._timeframe >= bt.TimeFrame.Days and not self._among_dates_only():
            times = self._day_ends(times)
        self._dates = [bt.date2num(t) for t in times.to_pydatetime()]
        # The last bar time (backtrader date number): once there, the feed has ended; the
        # window's last (fromdate / todate, tzinput) once the first bar loads (_window)
        self.last_num = self._dates[-1] if self._dates else -math.inf
        self._cols = [
            (getattr(self.lines, name), arr.tolist()) for name, arr in bars.numeric.items()
        ]
        self._text = [(self.text_lines[name], vals) for name, vals in bars.text.items()]
        self._i = -1  # placed at the first _load (fromdate is set after start: _start_finish)
        self._end = len(self._dates)
        self._rows = None  # rows delivered, when not one run (_window)

    def islive(self) -> bool:
        return False

    def _among_dates_only(self) -> bool:
        """Whether every other feed of the Cerebro this feed is in is also a file of dates in
        the same zone (or a resample, replay or clone of one): then all bars are days, and
        their midnights order them as their days. Any other feed (intraday bars, a
        ``PandasData``, a daily file stamped at its close, a resample of intraday bars) can
        deliver within a day."""
        for data in self._running_datas():
            source = data
            while getattr(source, "_clone", False) and getattr(source, "data", None) is not None:
                source = source.data  # cerebro.resampledata / replaydata: a DataClone
            if source is self:
                continue
            bars = getattr(source, "_bars", None)
            if not (
                isinstance(source, HistoricalCSVFeed)
                and isinstance(bars, CSVBars)
                and bars.date_only
                and _same_days(self._bars, bars)
            ):
                return False
        return True

    def _running_datas(self) -> list[Any]:
        """The feeds of the Cerebro running this feed: the ``bt.Cerebro`` whose ``run`` called
        ``start`` (its frame on the stack: ``Cerebro.runstrategies``). backtrader's
        ``adddata`` keeps only the last Cerebro a feed was added to (``_env``), and one feed
        object may be in several (a notebook comparing two runs)."""
        frame: FrameType | None = sys._getframe(1)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, bt.Cerebro) and any(d is self for d in owner.datas):
                return list(owner.datas)
            frame = frame.f_back
        return list(getattr(getattr(self, "_env", None), "datas", None) or [])

    def _day_ends(self, times: pd.DatetimeIndex) -> pd.DatetimeIndex:
        """Each bar's time moved to the end of its day: its date in the file's timezone at
        backtrader's ``sessionend`` (default 23:59:59.999990, cut to the millisecond, the
        resolution of decision records), as UTC. backtrader's CSV feeds do the same for bars
        of a day or longer given as dates (``GenericCSVData._loadline``: ``dteos =
        datetime.combine(dt.date(), self.p.sessionend)``; ``BacktraderCSVData``, Yahoo's)."""
        zone = self._bars.timezone
        end = self.p.sessionend or dt_time(23, 59, 59, 999_000)
        if not isinstance(end, dt_time) or end.tzinfo is not None:
            raise ConfigError(
                f"{self.symbol}: sessionend must be a datetime.time without tzinfo, in the "
                f"file's zone ({zone}, CSV_TIMEZONE); got {end!r}"
            )
        offset = pd.Timedelta(
            hours=end.hour, minutes=end.minute, seconds=end.second, microseconds=end.microsecond
        ).floor("ms")
        if offset == pd.Timedelta(0):  # found by attacks (helper-65, helper-66: 00:00:00.000999)
            raise ConfigError(
                f"{self.symbol}: sessionend {end} is the start of the day (bar times are kept "
                "to the millisecond): each day's bar, given as a date, would be seen before the "
                "day is over; set the day's close (e.g. datetime.time(16, 0)) or leave it unset "
                "(the end of the day)"
            )
        if self._bars.day_offsets is not None:
            # midnights written with their own UTC offsets (yfinance): the day ends at that
            # offset (a day whose clocks change ends an hour early or late in UTC)
            ends = times + offset
            zone = "the UTC offsets of the file's dates"
        else:
            days = times.tz_localize("UTC").tz_convert(zone).tz_localize(None).normalize()
            # a repeated hour: the later occurrence (the day is not over before it); a
            # skipped one: the end of the gap
            local = (days + offset).tz_localize(zone, ambiguous=False, nonexistent="shift_forward")
            ends = local.tz_convert("UTC").tz_localize(None)
        logger.info(
            "%s: bars given as dates, beside bars that are not, are delivered at the end of "
            "their day (%s %s, backtrader's sessionend): a day's bar is seen once it is over",
            self.symbol,
            (pd.Timestamp(0) + offset).strftime("%H:%M:%S.%f")[:-3],
            zone,
        )
        return ends

    def _window(self) -> int:
        """The rows within backtrader's ``fromdate`` / ``todate`` (its ``load()`` discards
        the others after ``_load``, but a discarded row must not count as a delivered bar:
        the data hash of bar k is that of row k + the rows before ``fromdate``). The first
        row's index; sets the end. With ``tzinput`` backtrader compares the row's time
        localised to it, in UTC (``AbstractDataBase.load``: ``date2num(tzinput.localize(
        num2date(dt)))``): the same expression here, row by row."""
        dates = self._dates
        fromdate = getattr(self, "fromdate", -math.inf)
        todate = getattr(self, "todate", math.inf)
        tzinput = getattr(self, "_tzinput", None)
        if tzinput is not None:
            localise = tzinput.localize
            dates = [bt.date2num(localise(bt.num2date(d))) for d in dates]
            # backtrader drops a row before fromdate and stops at the first after todate;
            # localised times of sorted rows are sorted but around a daylight-saving change
            first = next((i for i, d in enumerate(dates) if d >= fromdate), len(dates))
            end = next((i for i in range(first, len(dates)) if dates[i] > todate), len(dates))
            kept = [i for i in range(first, end) if dates[i] >= fromdate]
            if len(kept) != end - first:
                # a row before fromdate after the first one kept: a wall-clock time that does
                # not exist at a daylight-saving change localises an hour later than the next
                # row's. backtrader would drop it after _load; it is not delivered at all, so
                # each bar keeps its row's hash.
                self._rows = kept
                self.bar_hashes.select(kept)
                self._end = len(kept)
                self.last_num = dates[kept[-1]] if kept else -math.inf
                return 0
        else:
            first = bisect.bisect_left(dates, fromdate)
            end = bisect.bisect_right(dates, todate)
        self._end = max(end, first)
        # the last bar this feed delivers, as backtrader stores it (missed_step: a feed past it
        # has ended, it did not miss a step)
        self.last_num = dates[self._end - 1] if self._end > first else -math.inf
        if first:
            self.bar_hashes.skip(first)
        return first

    def _load(self) -> bool:
        i = self._i
        if i < 0:
            i = self._window()
        if i >= self._end:
            return False
        self._i = i + 1
        rows = self._rows
        if rows is not None:
            i = rows[i]
        self.lines.datetime[0] = self._dates[i]
        for line, values in self._cols:
            line[0] = values[i]
        for text_line, tvals in self._text:
            text_line.append(tvals[i])
        self.bar_hashes.advance()
        return True


def feed_class(extra_fields: tuple[str, ...]) -> type:
    """A :class:`HistoricalCSVFeed` subclass with ``extra_fields`` as additional lines."""
    return dynamic_feed_class(HistoricalCSVFeed, extra_fields)


def make_csv_feed(cfg: CSVFeedConfig, bars: CSVBars | None = None) -> HistoricalCSVFeed:
    """A ready feed for one file (reads it unless ``bars`` is given). Its backtrader name is
    the symbol, so ``getdatabyname("BTC/USD")`` works."""
    bars = bars if bars is not None else read_csv_bars(cfg)
    cls = feed_class(bars.extra_fields)
    feed: HistoricalCSVFeed = cls(
        bars=bars, name=cfg.symbol, timeframe=bars.timeframe, compression=bars.compression
    )
    return feed


def first_last(bars: CSVBars) -> tuple[datetime, datetime]:
    """First and last bar time (naive UTC)."""
    idx = pd.DatetimeIndex(bars.times)
    return idx[0].to_pydatetime(), idx[-1].to_pydatetime()
