"""CSV warm-up of a live feed: the last bars of a symbol's CSV file, played before the live ones.

Backfill bars are ordinary :class:`~feeds.pubsub.messages.LiveBar` s marked ``live=False``, with
the CSV feed's data hashes (the same content hashes the same over Pub/Sub), so live copies of
them are dropped as duplicates. Read on the main thread before the subscriber starts.
"""

from __future__ import annotations

from datetime import UTC
from typing import Any

import pandas as pd

from core.time import utc_to_bt_num
from feeds.csv import CSVFeedConfig, read_csv_bars
from feeds.pubsub.config import FieldSet
from feeds.pubsub.messages import LiveBar

__all__ = ["backfill_bars"]


def backfill_bars(cfg: CSVFeedConfig, n: int) -> tuple[list[LiveBar], FieldSet, int, int]:
    """The last ``n`` bars of a CSV file as non-live :class:`LiveBar` s (indicator warm-up).

    Args:
        cfg: the symbol's CSV file and how to read it.
        n: bars wanted (fewer when the file is shorter).

    Returns:
        ``(bars, fields, timeframe, compression)``: the bars oldest first, their extra fields,
        and the file's backtrader bar size.

    Raises:
        DataError: as :func:`feeds.csv.read_csv_bars`.
    """
    bars = read_csv_bars(cfg)
    start = max(0, len(bars) - n)
    stamps = pd.DatetimeIndex(bars.times[start:]).to_pydatetime()
    numeric = {k: a[start:].tolist() for k, a in bars.numeric.items()}
    text = {k: v[start:] for k, v in bars.text.items()}
    out = []
    for i, ts in enumerate(stamps):
        values: dict[str, Any] = {k: col[i] for k, col in numeric.items()}
        values.update((k, col[i]) for k, col in text.items())
        out.append(
            LiveBar(
                symbol=cfg.symbol,
                ts=ts.replace(tzinfo=UTC),
                dt_num=utc_to_bt_num(ts),
                values=values,
                data_hash=bars.hashes[start + i],
                live=False,
            )
        )
    fields = FieldSet(tuple(bars.extra_fields), tuple(bars.text))
    return out, fields, bars.timeframe, bars.compression
