"""Performance statistics of an equity curve, annualised from the bar size.

Every number comes from `empyrical-reloaded <https://github.com/stefan-jansen/empyrical-reloaded>`_
(the statistics library of pyfolio/zipline-reloaded); this module only chooses the returns and
the annualisation factor and turns undefined results (NaN, infinity) into ``None``.

Definitions (empyrical, ``empyrical/stats.py``), with ``r`` the simple returns of the equity
curve bar to bar and ``P`` the periods per year (:func:`periods_per_year`):

* total return: ``V_last / V_first - 1``.
* CAGR (``annual_return``): ``(1 + total return) ** (P / len(r)) - 1``.
* Sharpe (``sharpe_ratio``, zero risk-free rate): ``mean(r) / std(r, ddof=1) * sqrt(P)``.
* Sortino (``sortino_ratio``, zero required return): ``mean(r) * P / downside risk``, with
  downside risk ``sqrt(mean(min(r, 0) ** 2)) * sqrt(P)`` (Sortino & Price 1994; empyrical cites
  Sortino, "The Sortino Framework", Futures Magazine 2013).
* max drawdown (``max_drawdown``): the largest fall from a running peak, reported here as a
  positive percent.
* Calmar (``calmar_ratio``): CAGR / |max drawdown|; undefined without a drawdown.

Periods per year (the rule, :func:`periods_per_year`):

=================  ================================================================
bar size           periods per year
=================  ================================================================
``n`` years        ``1 / n``
``n`` months       ``12 / n``       (empyrical ``MONTHLY``)
``n`` weeks        ``52 / n``       (empyrical ``WEEKLY``)
``n`` days         ``D / n``
intraday           ``D * B``
=================  ================================================================

``D`` is the number of trading days in a year: 252 (empyrical's ``DAILY``, the exchange
calendar convention), or 365 when Saturday and Sunday (UTC) each hold at least half their
calendar share (1/14) of the curve's days with bars, i.e. the market never closes (crypto;
freqtrade and QuantStats use 365 for crypto). The curve's own spacing decides, not a few weekend
bars: a monthly crypto feed mixed with a daily stock has a weekend bar now and then and is still
a five-day curve. ``B`` is the median
number of bars per UTC calendar day that has bars: an exchange session of 6.5 hours gives 7
hourly bars, FX 24, crypto 24; the bar size alone cannot say how long a session is.

Runs anywhere (pure functions, no threads, no I/O).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import backtrader as bt
import empyrical
import numpy as np
import pandas as pd

from core.bars import bar_seconds
from core.errors import DataError

#: Trading days a year on an exchange calendar (empyrical's annualisation factor for daily).
EXCHANGE_DAYS_PER_YEAR = int(empyrical.periods.ANNUALIZATION_FACTORS[empyrical.DAILY])
#: Days a year of a market that never closes (crypto).
ALWAYS_OPEN_DAYS_PER_YEAR = 365
MONTHS_PER_YEAR = int(empyrical.periods.ANNUALIZATION_FACTORS[empyrical.MONTHLY])
WEEKS_PER_YEAR = int(empyrical.periods.ANNUALIZATION_FACTORS[empyrical.WEEKLY])

# Dispersion below this fraction of the largest return is rounding noise (see
# _nonzero_dispersion).
_NEGLIGIBLE = 1e-9

# A drawdown (or a largest return, for Sharpe and Sortino) below this fraction is rounding
# noise: prices are float64 (~16 significant digits), and a return computed from them carries
# a relative error of ~1e-16, so a Calmar ratio over a drawdown of 1e-9 is good to ~1e-7 and one
# over 6.6e-12 only to ~1e-5 (a property test found 100, 100, 99.9999999993399 giving -6.0 and
# the same curve times 1.5 giving -5.99997). Below it the ratio is undefined (None).
NOISE_DRAWDOWN = 1e-9


def finest_bar_size(sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The shortest of several ``(timeframe, compression)`` bar sizes (the run's clock ticks at
    the finest feed's bars); ``(Days, 1)`` for an empty list."""
    if not sizes:
        return bt.TimeFrame.Days, 1
    return min(sizes, key=lambda s: bar_seconds(s[0], s[1], unknown=86_400.0))


def trading_days_per_year(index: pd.DatetimeIndex) -> int:
    """365 when Saturday and Sunday (UTC) each hold at least 1/14 of the distinct days of
    ``index`` that have bars (half of a seven-day market's 1/7), else 252.

    Both days count: a session that opens on Sunday evening UTC (FX) or a positive-offset
    exchange whose Monday falls on Sunday in UTC (Tokyo) is still a five-day market. A share,
    not mere presence: daily stock bars mixed with monthly crypto bars (an occasional weekend
    bar) are a five-day curve; crypto every day or every other day is a seven-day one.
    """
    idx = pd.DatetimeIndex(index)
    days = idx.normalize().unique()
    if len(days) == 0:
        return EXCHANGE_DAYS_PER_YEAR
    dow = pd.Series(days.day_of_week)
    share = min(float((dow == 5).mean()), float((dow == 6).mean()))
    return ALWAYS_OPEN_DAYS_PER_YEAR if share >= 1 / 14 else EXCHANGE_DAYS_PER_YEAR


def periods_per_year(index: pd.DatetimeIndex, timeframe: int, compression: int = 1) -> float:
    """Bars a year for the annualisation of a curve with bar size ``(timeframe, compression)``
    (the rule in the module docstring).

    Args:
        index: bar times of the curve (aware UTC or naive UTC); shape (n,).
        timeframe: a ``backtrader.TimeFrame`` value.
        compression: bars of ``timeframe`` per bar (``Minutes, 60`` is hourly).

    Returns:
        periods per year (> 0).

    Raises:
        DataError: for a compression < 1 or an intraday curve without any bar.
    """
    if compression < 1:
        raise DataError(f"bar compression must be >= 1, got {compression}")
    if timeframe == bt.TimeFrame.Years:
        return 1.0 / compression
    if timeframe == bt.TimeFrame.Months:
        return MONTHS_PER_YEAR / compression
    if timeframe == bt.TimeFrame.Weeks:
        return WEEKS_PER_YEAR / compression
    idx = pd.DatetimeIndex(index)
    days = trading_days_per_year(idx)
    if timeframe == bt.TimeFrame.Days:
        return days / compression
    if len(idx) == 0:
        raise DataError("cannot annualise an intraday curve without bars")
    per_day = float(pd.Series(1, index=idx).groupby(idx.normalize()).size().median())
    return days * per_day


def infer_bar_size(index: pd.DatetimeIndex) -> tuple[int, int]:
    """``(timeframe, compression)`` from the spacing of ``index`` (the CSV feed's rule,
    :func:`feeds.csv.infer_bar_size`), for curves read back from a store."""
    from feeds.csv import infer_bar_size as infer

    times = pd.DatetimeIndex(index).tz_localize(None) if index.tz is not None else index
    return infer(np.asarray(times, dtype="datetime64[ns]"))


@dataclass(frozen=True, slots=True, kw_only=True)
class PerformanceStats:
    """Statistics of one equity curve. ``None`` where undefined (a flat curve has no Sharpe, a
    curve that never fell has no Calmar, fewer than two bars have nothing).

    Attributes:
        bars: points on the curve.
        periods_per_year: the annualisation factor used.
        start_value_usd, end_value_usd: first and last value.
        total_return_pct: ``(end / start - 1) * 100``.
        cagr_pct: compound annual growth rate, percent.
        volatility_pct: annualised standard deviation of returns, percent.
        sharpe, sortino, calmar: annualised ratios (risk-free rate and required return 0).
        max_drawdown_pct: largest peak-to-trough fall, positive percent.
    """

    bars: int
    periods_per_year: float
    start_value_usd: float | None
    end_value_usd: float | None
    total_return_pct: float | None
    cagr_pct: float | None
    volatility_pct: float | None
    sharpe: float | None
    sortino: float | None
    calmar: float | None
    max_drawdown_pct: float | None

    def as_dict(self) -> dict[str, Any]:
        """Field name -> value (JSON-ready: floats or None)."""
        return {name: getattr(self, name) for name in self.__slots__}


def _finite(x: Any, scale: float = 1.0) -> float | None:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value * scale if math.isfinite(value) else None


def returns_of(equity: pd.Series) -> pd.Series:
    """Simple returns bar to bar (``empyrical.simple_returns``); shape (n - 1,)."""
    return pd.Series(empyrical.simple_returns(equity.astype(float))).dropna()


def performance_stats(equity: pd.Series, *, periods_per_year: float) -> PerformanceStats:
    """Statistics of ``equity`` (portfolio value in USD indexed by bar time, oldest first).

    Args:
        equity: shape (n,), finite values (a curve that reaches 0 or below gives returns
            without meaning after that bar; the statistics are computed as empyrical defines
            them regardless).
        periods_per_year: see :func:`periods_per_year`.

    Returns:
        the statistics; undefined ones are ``None``.

    Raises:
        DataError: a value that is not finite, or ``periods_per_year <= 0``.
    """
    if not periods_per_year > 0 or not math.isfinite(periods_per_year):
        raise DataError(f"periods_per_year must be a finite number > 0, got {periods_per_year}")
    values = equity.astype(float)
    if not np.isfinite(values.to_numpy()).all():
        raise DataError("equity curve: every value must be a finite number of USD")
    n = len(values)
    first = float(values.iloc[0]) if n else None
    last = float(values.iloc[-1]) if n else None
    if n < 2:
        return PerformanceStats(
            bars=n,
            periods_per_year=periods_per_year,
            start_value_usd=first,
            end_value_usd=last,
            total_return_pct=None,
            cagr_pct=None,
            volatility_pct=None,
            sharpe=None,
            sortino=None,
            calmar=None,
            max_drawdown_pct=None,
        )
    r = returns_of(values)
    ann = periods_per_year
    max_dd = _finite(empyrical.max_drawdown(r))
    return PerformanceStats(
        bars=n,
        periods_per_year=ann,
        start_value_usd=first,
        end_value_usd=last,
        total_return_pct=_finite(empyrical.cum_returns_final(r), 100.0),
        cagr_pct=_finite(empyrical.annual_return(r, annualization=ann), 100.0),
        volatility_pct=_finite(empyrical.annual_volatility(r, annualization=ann), 100.0),
        sharpe=_nonzero_dispersion(r, empyrical.sharpe_ratio(r, annualization=ann)),
        sortino=_nonzero_dispersion(
            r, empyrical.sortino_ratio(r, annualization=ann), downside=True
        ),
        # a drawdown of rounding noise is no drawdown: Calmar undefined, not 1e15 (see
        # NOISE_DRAWDOWN)
        calmar=(
            _finite(empyrical.calmar_ratio(r, annualization=ann))
            if max_dd is not None and abs(max_dd) > NOISE_DRAWDOWN
            else None
        ),
        max_drawdown_pct=None if max_dd is None else abs(max_dd) * 100.0,
    )


def _nonzero_dispersion(r: pd.Series, ratio: Any, *, downside: bool = False) -> float | None:
    """``ratio`` as a float, or ``None`` when the dispersion it divides by is only rounding
    noise: returns equal up to the last bits (``1.0625`` bar after bar computed from different
    prices) have a standard deviation of ~1e-17, and empyrical, which catches only exactly equal
    values, then gives a ratio of ~1e15."""
    x = r.to_numpy(dtype=float)
    spread = float(np.sqrt(np.mean(np.minimum(x, 0.0) ** 2))) if downside else float(np.std(x))
    largest = float(np.max(np.abs(x)))
    if largest <= NOISE_DRAWDOWN or spread <= _NEGLIGIBLE * largest + 1e-15:
        return None  # every return is rounding noise (as NOISE_DRAWDOWN), or their spread is
    return _finite(ratio)
