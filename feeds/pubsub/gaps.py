"""Missing bar times: how many bars of a symbol should lie between two bars it delivered.

The bar size is known (``PUBSUB_BAR_SIZE``, else the backfill file's) or inferred: the smallest
spacing seen between two consecutive bars of one symbol so far (a jump before the true size is
seen then counts too few, never too many). Rules, by bar size:

* up to a day: ``round(jump / size) - 1`` missing bar times; a jump longer than ``gap_max_s``
  (when set) is a market close and counts nothing;
* a day to under a week: business days (Monday to Friday, :func:`numpy.busday_count`) strictly
  between the two dates, divided by the compression, so weekends are not gaps (holidays are);
* a week or more: ``round(jump / size) - 1``.

Pure; :class:`GapCounter` is not thread-safe (the handler calls it under its lock).
"""

from __future__ import annotations

import math

import numpy as np

from core.time import BT_EPOCH_DAYS

__all__ = ["GapCounter"]

_DAY_S = 86_400.0
_WEEK_S = 7 * _DAY_S


class GapCounter:
    """Counts missing bar times between consecutive bars of a symbol.

    Args:
        bar_s: bar size in seconds; None = inferred from the bars.
        gap_max_s: a longer intraday jump is a market close (0 = no limit).
    """

    def __init__(self, bar_s: float | None = None, *, gap_max_s: float = 0.0) -> None:
        self.bar_s = bar_s if bar_s and bar_s > 0 else None
        self.inferred = self.bar_s is None
        self.gap_max_s = gap_max_s

    def missing(self, prev_num: float, num: float) -> int:
        """Bar times missing strictly between two consecutive bars of one symbol.

        Args:
            prev_num, num: the two bars' times as backtrader day numbers, ``prev_num < num``.

        Returns:
            How many bar times lie between them on the bar-size grid (0 when none).
        """
        jump_s = round((num - prev_num) * _DAY_S, 3)  # day numbers hold ~15 us
        if jump_s <= 0:
            return 0
        if self.inferred and (self.bar_s is None or jump_s < self.bar_s):
            self.bar_s = jump_s  # the smallest spacing seen is the bar size
            return 0
        size = self.bar_s
        assert size is not None
        if _DAY_S <= size < _WEEK_S:
            start = np.datetime64(math.floor(prev_num - BT_EPOCH_DAYS), "D") + 1
            end = np.datetime64(math.floor(num - BT_EPOCH_DAYS), "D")
            between = int(np.busday_count(start, end)) if end > start else 0
            return between // max(1, round(size / _DAY_S))
        if size < _DAY_S and self.gap_max_s > 0 and jump_s > self.gap_max_s:
            return 0
        return max(0, round(jump_s / size) - 1)
