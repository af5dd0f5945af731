"""agents.indicators against hand computation (the formulas written out with math.log and
loops), in backtrader's vectorised (runonce) and bar-by-bar modes."""

from __future__ import annotations

import math
from typing import Any

import backtrader as bt
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.indicators import VWAP, BipowerVariation, JumpRatio, RealizedVariance

HIGH = [101.0, 102.5, 100.0, 103.0, 99.5, 121.0, 120.0, 118.0]
LOW = [99.0, 100.0, 98.0, 100.5, 97.0, 118.0, 117.5, 116.0]
CLOSE = [100.0, 101.0, 99.0, 102.0, 98.0, 120.0, 119.0, 117.0]
VOLUME = [1000.0, 1500.0, 800.0, 1200.0, 0.0, 3000.0, 900.0, 1100.0]


def frame(
    close: list[float],
    high: list[float] | None = None,
    low: list[float] | None = None,
    volume: list[float] | None = None,
) -> pd.DataFrame:
    n = len(close)
    return pd.DataFrame(
        {
            "open": close,
            "high": high or [c * 1.01 for c in close],
            "low": low or [c * 0.99 for c in close],
            "close": close,
            "volume": volume or [1000.0] * n,
        },
        index=pd.date_range("2024-01-01", periods=n, freq="D"),
    )


class Recorder(bt.Strategy):  # type: ignore[misc]
    params = (("period", 3), ("floor", False))

    def __init__(self) -> None:
        p = self.p.period
        self.vwap = VWAP(self.data, period=p)
        self.rv = RealizedVariance(self.data.close, period=p)
        self.bv = BipowerVariation(self.data, period=p)
        self.jr = JumpRatio(self.data.close, period=p, floor=self.p.floor)
        self.rows: list[tuple[float, float, float, float]] = []

    def prenext(self) -> None:
        self.rows.append((self.vwap[0], self.rv[0], self.bv[0], self.jr.jump[0]))

    def nextstart(self) -> None:
        self.next()

    def next(self) -> None:
        self.rows.append((self.vwap[0], self.rv[0], self.bv[0], self.jr.jump[0]))


def run(df: pd.DataFrame, *, runonce: bool, **params: Any) -> np.ndarray:
    cerebro = bt.Cerebro(stdstats=False, runonce=runonce, preload=True)
    cerebro.adddata(bt.feeds.PandasData(dataname=df))
    cerebro.addstrategy(Recorder, **params)
    strategy = cerebro.run()[0]
    return np.array(strategy.rows, dtype=float)


def hand_rv(close: list[float], t: int, n: int) -> float:
    total = 0.0
    for i in range(t - n + 1, t + 1):
        r = math.log(close[i] / close[i - 1])
        total += r * r
    return total


def hand_bv(close: list[float], t: int, n: int) -> float:
    total = 0.0
    for i in range(t - n + 2, t + 1):
        total += abs(math.log(close[i] / close[i - 1])) * abs(math.log(close[i - 1] / close[i - 2]))
    return total * math.pi / 2  # mu1 ** -2 with mu1 = sqrt(2 / pi)


def hand_vwap(t: int, n: int) -> float:
    num = den = 0.0
    for i in range(t - n + 1, t + 1):
        typical = (HIGH[i] + LOW[i] + CLOSE[i]) / 3
        num += typical * VOLUME[i]
        den += VOLUME[i]
    return num / den


@pytest.mark.parametrize("runonce", [True, False])
def test_against_hand_computation(runonce: bool) -> None:
    n = 3
    rows = run(frame(CLOSE, HIGH, LOW, VOLUME), runonce=runonce, period=n)
    assert rows.shape == (len(CLOSE), 4)
    for t in range(len(CLOSE)):
        vwap, rv, bv, jump = rows[t]
        if t >= n - 1:
            assert vwap == pytest.approx(hand_vwap(t, n), rel=1e-12)
        else:
            assert math.isnan(vwap)
        if t >= n:  # n returns need n + 1 prices
            assert rv == pytest.approx(hand_rv(CLOSE, t, n), rel=1e-12)
            assert bv == pytest.approx(hand_bv(CLOSE, t, n), rel=1e-12)
            want = (hand_rv(CLOSE, t, n) - hand_bv(CLOSE, t, n)) / hand_rv(CLOSE, t, n)
            assert jump == pytest.approx(want, rel=1e-9)
        else:
            assert math.isnan(rv) and math.isnan(bv) and math.isnan(jump)


def test_a_jump_shows_in_the_ratio() -> None:
    # the 98 -> 120 bar (t=5) is a jump: RV takes its square, BV only products with neighbours
    rows = run(frame(CLOSE), runonce=True, period=3)
    assert rows[5, 3] > 0.5 and rows[5, 1] > rows[5, 2]


def test_no_volume_gives_nan_vwap_and_flat_prices_nan_ratio() -> None:
    rows = run(frame([50.0] * 6, volume=[0.0] * 6), runonce=True, period=3)
    assert np.isnan(rows[:, 0]).all()
    assert rows[4, 1] == 0 and rows[4, 2] == 0 and math.isnan(rows[4, 3])


def test_bad_periods_are_refused() -> None:
    for ind, period in ((VWAP, 0), (RealizedVariance, 1), (BipowerVariation, 1)):
        cerebro = bt.Cerebro(stdstats=False)
        cerebro.adddata(bt.feeds.PandasData(dataname=frame(CLOSE)))

        class S(bt.Strategy):  # type: ignore[misc]
            def __init__(self) -> None:
                ind(self.data, period=period)  # noqa: B023

        cerebro.addstrategy(S)
        with pytest.raises(ValueError, match="period"):
            cerebro.run()


prices = st.lists(st.floats(min_value=-0.3, max_value=0.3), min_size=6, max_size=60).map(
    lambda rs: list(100.0 * np.exp(np.cumsum(rs)))
)


@settings(max_examples=60, deadline=None)
@given(prices, st.integers(min_value=2, max_value=5))
def test_once_equals_next_and_bounds(close: list[float], n: int) -> None:
    df = frame(close)
    once = run(df, runonce=True, period=n, floor=True)
    nxt = run(df, runonce=False, period=n, floor=True)
    np.testing.assert_allclose(once, nxt, rtol=1e-12, equal_nan=True)
    rv, bv, jump = once[n:, 1], once[n:, 2], once[n:, 3]
    assert (rv >= 0).all() and (bv >= 0).all()
    ok = ~np.isnan(jump)
    assert ((jump[ok] >= 0) & (jump[ok] <= 1)).all()  # floor=True: in [0, 1]


@settings(max_examples=30, deadline=None)
@given(st.floats(min_value=0.001, max_value=0.2), st.lists(st.booleans(), min_size=6, max_size=30))
def test_equal_size_moves_closed_form(size: float, ups: list[bool]) -> None:
    # |r| constant: RV = n r^2, BV = (pi/2)(n - 1) r^2 (BV > RV here: the finite-sample bias
    # that floor=True truncates)
    close = list(100.0 * np.exp(np.cumsum([size if u else -size for u in ups])))
    n = 4
    rows = run(frame(close), runonce=True, period=n)
    t = len(close) - 1
    assert rows[t, 1] == pytest.approx(n * size * size, rel=1e-9)
    assert rows[t, 2] == pytest.approx(math.pi / 2 * (n - 1) * size * size, rel=1e-9)
