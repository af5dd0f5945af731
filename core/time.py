"""Time conversion between backtrader's day numbers, POSIX seconds and aware UTC datetimes.

backtrader stores a bar's time as a naive float: days since 0001-01-01 in the proleptic Gregorian
calendar plus the fraction of the day (``backtrader.utils.dateintern.date2num``, which follows
matplotlib's old ``date2num``). Every boundary of ours converts to aware UTC here, once.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

# backtrader's day number of 1970-01-01 00:00 UTC (datetime(1970, 1, 1).toordinal()).
BT_EPOCH_DAYS = 719_163.0
SECONDS_PER_DAY = 86_400.0


def bt_num_to_posix(num: float) -> float:
    """POSIX seconds (UTC) of a backtrader day number."""
    return (num - BT_EPOCH_DAYS) * SECONDS_PER_DAY


def posix_to_bt_num(posix_s: float) -> float:
    """backtrader day number of POSIX seconds (UTC)."""
    return posix_s / SECONDS_PER_DAY + BT_EPOCH_DAYS


def utc_to_bt_num(ts: datetime) -> float:
    """backtrader day number of ``ts`` (aware: converted to UTC; naive: taken as UTC).

    Same arithmetic as ``backtrader.date2num``, so both give bit-identical floats.
    """
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return math.fsum(
        (
            float(ts.toordinal()),
            ts.hour / 24.0,
            ts.minute / 1440.0,
            ts.second / 86_400.0,
            ts.microsecond / 86_400_000_000.0,
        )
    )


def bt_num_to_utc(num: float) -> datetime:
    """Aware UTC datetime of a backtrader day number, to the microsecond (as ``num2date``)."""
    days = int(num)
    frac_us = round((num - days) * 86_400_000_000)
    return datetime.fromordinal(days).replace(tzinfo=UTC) + timedelta(microseconds=frac_us)


def as_utc(ts: datetime) -> datetime:
    """``ts`` as aware UTC; naive input is taken as UTC."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def iso_utc(ts: datetime) -> str:
    """``2004-08-19T00:00:00Z`` (microseconds only when present). Naive input is taken as UTC."""
    ts = as_utc(ts)
    fmt = "%Y-%m-%dT%H:%M:%S.%fZ" if ts.microsecond else "%Y-%m-%dT%H:%M:%SZ"
    return ts.strftime(fmt)
