"""runtime.stats: statistics from empyrical, annualised from the bar size, checked against
hand computation (numpy, formulas written out below) on daily, hourly and monthly bars."""

from __future__ import annotations

import math

import backtrader as bt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DataError
from runtime.stats import (
    finest_bar_size,
    infer_bar_size,
    performance_stats,
    periods_per_year,
    trading_days_per_year,
)
from tests.conftest import DATA


def closes(name: str) -> pd.Series:
    df = pd.read_csv(DATA / name, index_col=0, parse_dates=True)
    s = df["Close"].astype(float)
    s.index = pd.DatetimeIndex(s.index).tz_localize("UTC")
    return s


def by_hand(values: np.ndarray, ppy: float) -> dict[str, float]:
    """The textbook formulas, written without empyrical."""
    r = values[1:] / values[:-1] - 1.0
    sharpe = r.mean() / r.std(ddof=1) * math.sqrt(ppy)
    downside = math.sqrt(np.mean(np.minimum(r, 0.0) ** 2)) * math.sqrt(ppy)
    sortino = r.mean() * ppy / downside
    cagr = (values[-1] / values[0]) ** (ppy / len(r)) - 1.0
    peak, max_dd = values[0], 0.0
    for v in values:
        peak = max(peak, v)
        max_dd = max(max_dd, 1.0 - v / peak)
    return {
        "sharpe": sharpe,
        "sortino": sortino,
        "cagr_pct": cagr * 100,
        "max_drawdown_pct": max_dd * 100,
        "calmar": cagr / max_dd,
        "total_return_pct": (values[-1] / values[0] - 1) * 100,
        "volatility_pct": r.std(ddof=1) * math.sqrt(ppy) * 100,
    }


def check_against_hand(equity: pd.Series, ppy: float) -> None:
    got = performance_stats(equity, periods_per_year=ppy)
    want = by_hand(equity.to_numpy(), ppy)
    for key, value in want.items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-9), key
    assert got.bars == len(equity) and got.periods_per_year == ppy


def test_daily_equity_bars_use_252() -> None:
    goog = closes("GOOG.csv")
    assert infer_bar_size(goog.index) == (bt.TimeFrame.Days, 1)
    ppy = periods_per_year(goog.index, bt.TimeFrame.Days, 1)
    assert ppy == 252
    check_against_hand(goog, ppy)


def test_daily_bars_of_a_market_that_never_closes_use_365() -> None:
    idx = pd.date_range("2021-01-01", periods=400, freq="D", tz="UTC")
    rng = np.random.default_rng(7)
    equity = pd.Series(100 * np.cumprod(1 + rng.normal(0.001, 0.03, 400)), index=idx)
    ppy = periods_per_year(idx, bt.TimeFrame.Days, 1)
    assert ppy == 365
    check_against_hand(equity, ppy)
    assert periods_per_year(idx, bt.TimeFrame.Days, 7) == pytest.approx(365 / 7)


def test_hourly_fx_bars_use_trading_days_times_bars_a_day() -> None:
    eurusd = closes("EURUSD.csv")  # FX: Sunday-evening opens, no Saturday
    assert infer_bar_size(eurusd.index) == (bt.TimeFrame.Minutes, 60)
    assert trading_days_per_year(eurusd.index) == 252
    ppy = periods_per_year(eurusd.index, bt.TimeFrame.Minutes, 60)
    assert ppy == 252 * 24
    check_against_hand(eurusd, ppy)


def test_hourly_exchange_session_counts_its_bars_a_day() -> None:
    # 7 hourly bars a day (09:30 .. 15:30 New York = 14:30 .. 20:30 UTC), weekdays only
    days = pd.bdate_range("2023-01-02", periods=60)
    idx = pd.DatetimeIndex(
        [
            d + pd.Timedelta(hours=14, minutes=30) + pd.Timedelta(hours=h)
            for d in days
            for h in range(7)
        ]
    ).tz_localize("UTC")
    assert periods_per_year(idx, bt.TimeFrame.Minutes, 60) == 252 * 7


def test_monthly_btc_buy_and_hold_sharpe_is_monthly_sharpe_times_sqrt_12() -> None:
    """Issue 11 item 6: monthly BTC/USD reported 3.95 (daily annualisation) where the monthly
    Sharpe times sqrt(12) is 0.86."""
    btc = closes("BTCUSD.csv")
    assert infer_bar_size(btc.index) == (bt.TimeFrame.Months, 1)
    ppy = periods_per_year(btc.index, bt.TimeFrame.Months, 1)
    assert ppy == 12
    check_against_hand(btc, ppy)
    r = btc.pct_change().dropna()
    assert performance_stats(btc, periods_per_year=ppy).sharpe == pytest.approx(
        r.mean() / r.std() * math.sqrt(12)
    )
    assert round(performance_stats(btc, periods_per_year=ppy).sharpe or 0, 2) == 0.86


def test_weekly_and_yearly_and_compression() -> None:
    idx = pd.date_range("2020-01-05", periods=10, freq="W", tz="UTC")
    assert periods_per_year(idx, bt.TimeFrame.Weeks, 1) == 52
    assert periods_per_year(idx, bt.TimeFrame.Months, 3) == 4
    assert periods_per_year(idx, bt.TimeFrame.Years, 1) == 1
    with pytest.raises(DataError):
        periods_per_year(idx, bt.TimeFrame.Days, 0)
    with pytest.raises(DataError, match="without bars"):
        periods_per_year(pd.DatetimeIndex([], tz="UTC"), bt.TimeFrame.Minutes, 1)


def test_weekend_rule_needs_both_days() -> None:
    # a +09:00 exchange: Monday 00:00 local is Sunday 15:00 UTC; still a five-day market
    tokyo = pd.bdate_range("2023-01-02", periods=30).tz_localize("Asia/Tokyo").tz_convert("UTC")
    assert set(tokyo.day_of_week) == {6, 0, 1, 2, 3}
    assert trading_days_per_year(tokyo) == 252


def test_finest_bar_size() -> None:
    day, hour = (bt.TimeFrame.Days, 1), (bt.TimeFrame.Minutes, 60)
    assert finest_bar_size([day, hour, (bt.TimeFrame.Months, 1)]) == hour
    assert finest_bar_size([]) == day


def test_undefined_values_are_none() -> None:
    idx = pd.date_range("2020-01-01", periods=5, freq="D", tz="UTC")
    flat = performance_stats(pd.Series(100.0, index=idx), periods_per_year=252)
    assert flat.sharpe is None and flat.sortino is None and flat.calmar is None
    assert flat.total_return_pct == 0 and flat.max_drawdown_pct == 0
    rising = performance_stats(pd.Series([1.0, 2, 3, 4, 5], index=idx), periods_per_year=252)
    assert rising.sortino is None and rising.calmar is None and rising.sharpe is not None
    one = performance_stats(pd.Series([100.0], index=idx[:1]), periods_per_year=252)
    assert one.sharpe is None and one.total_return_pct is None and one.start_value_usd == 100
    with pytest.raises(DataError, match="finite"):
        performance_stats(pd.Series([1.0, math.inf], index=idx[:2]), periods_per_year=252)
    with pytest.raises(DataError, match="periods_per_year"):
        performance_stats(pd.Series([1.0, 2.0], index=idx[:2]), periods_per_year=0)


curves = st.lists(
    st.floats(min_value=-0.2, max_value=0.2, allow_nan=False), min_size=3, max_size=200
).map(lambda rs: 100.0 * np.cumprod(1.0 + np.asarray(rs)))


@settings(max_examples=200, deadline=None)
@given(curves, st.floats(min_value=0.01, max_value=1e6), st.sampled_from([12.0, 52.0, 252.0]))
def test_properties(values: np.ndarray, scale: float, ppy: float) -> None:
    idx = pd.date_range("2020-01-01", periods=len(values), freq="D", tz="UTC")
    base = performance_stats(pd.Series(values, index=idx), periods_per_year=ppy)
    scaled = performance_stats(pd.Series(values * scale, index=idx), periods_per_year=ppy)
    # statistics of returns do not depend on the account's size (up to float64 rounding:
    # Calmar is undefined under a drawdown of 1e-9, Sharpe and Sortino when every return is,
    # and at those bounds a curve and its scaled copy may fall on either side)
    keys = ["max_drawdown_pct", "total_return_pct"]
    if not 0.5e-7 < (base.max_drawdown_pct or 0) < 2e-7:
        keys.append("calmar")
    if not 0.5e-9 < float(np.max(np.abs(np.diff(values) / values[:-1]))) < 2e-9:
        keys += ["sharpe", "sortino"]  # undefined when every return is under 1e-9
    for key in keys:
        a, b = getattr(base, key), getattr(scaled, key)
        assert (a is None) == (b is None) or abs((a or 0) - (b or 0)) < 1e-6, key
        if a is not None and b is not None:
            assert a == pytest.approx(b, rel=1e-6, abs=1e-9), key
    assert base.max_drawdown_pct is not None and 0 <= base.max_drawdown_pct <= 100
    # Sharpe scales with the square root of the annualisation factor
    quad = performance_stats(pd.Series(values, index=idx), periods_per_year=ppy * 4)
    if base.sharpe is not None:
        assert quad.sharpe == pytest.approx(2 * base.sharpe, rel=1e-9)
        r = np.diff(values) / values[:-1]
        assert math.copysign(1, base.sharpe) == math.copysign(1, r.mean()) or base.sharpe == 0


def test_a_few_weekend_bars_do_not_make_a_seven_day_market() -> None:
    """Daily stock bars mixed with monthly crypto bars (some on a weekend) stay 252; crypto
    every other day stays 365 (attack15 mix_btc_goog)."""
    stock = pd.bdate_range("2012-01-02", "2013-02-28", tz="UTC")
    monthly = pd.date_range("2012-01-01", "2013-02-28", freq="MS", tz="UTC")  # some weekends
    mixed = stock.union(monthly)
    assert {5, 6} <= set(mixed.day_of_week)
    assert trading_days_per_year(mixed) == 252
    assert periods_per_year(mixed, bt.TimeFrame.Days, 1) == 252
    every_other = pd.date_range("2021-01-01", periods=200, freq="2D", tz="UTC")
    assert trading_days_per_year(every_other) == 365


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 6), st.integers(30, 400), st.integers(0, 20))
def test_weekend_share_rule(start: int, n: int, extra: int) -> None:
    """A five-day calendar plus up to ``extra`` weekend bars a year is 252 while the extra
    bars are rarer than 1/14 of the days; any seven-day calendar is 365."""
    seven = pd.date_range(
        pd.Timestamp("2021-01-04", tz="UTC") + pd.Timedelta(days=start), periods=n, freq="D"
    )
    assert trading_days_per_year(seven) == 365
    five = pd.bdate_range("2021-01-04", periods=n, tz="UTC")
    weekend = [d for d in seven if d.day_of_week >= 5][: min(extra, n // 30)]
    assert trading_days_per_year(five.union(pd.DatetimeIndex(weekend))) == 252
