"""Historical CSV feed with dynamic fields.

:func:`read_csv_bars` reads and validates a file (pyarrow's C++ reader, then vectorised parsing
and checks; the datetime column(s), format and timezone, separators, number style, column names
and bar size are options, so files of different shapes load unedited);
:class:`HistoricalCSVFeed` serves the result to backtrader. Extra numeric columns become lines
(``data.rsi[0]``); extra text columns become :class:`~feeds.fields.TextLine` fields
(``data.headline[0]``), both tracked by FMEL. Every bar has its content-addressed data hash
(:func:`core.bars.bar_hash`, computed on first use by :class:`RowHashes`), so the same bar
arriving over Pub/Sub hashes the same.

Bad rows (see :mod:`feeds.csv.reader`) raise :class:`~core.errors.DataError` naming the file,
the line as a text editor counts it and the reason, or, with ``on_bad_rows="skip"``, are
skipped, logged and counted (:attr:`CSVBars.skipped`). Nothing is silently changed.
"""

from feeds.csv.config import BAR_SIZE_RE, CSVFeedConfig
from feeds.csv.feed import HistoricalCSVFeed, feed_class, first_last, make_csv_feed
from feeds.csv.reader import (
    CSVBars,
    RowHashes,
    infer_bar_size,
    parse_bar_size,
    prefetch_hashes,
    read_csv_bars,
)

__all__ = [
    "BAR_SIZE_RE",
    "CSVBars",
    "CSVFeedConfig",
    "HistoricalCSVFeed",
    "RowHashes",
    "feed_class",
    "first_last",
    "infer_bar_size",
    "make_csv_feed",
    "parse_bar_size",
    "prefetch_hashes",
    "read_csv_bars",
]
