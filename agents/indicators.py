"""Window risk metrics as backtrader indicators: VWAP, realized variance, bipower variation and
the jump ratio. Agents read them like any indicator (``self.rv[0]``) and FMEL records those
reads.

Formulas, over the window of the last ``n`` bars ending at the current bar ``t``, with log
returns ``r_i = ln(C_i / C_{i-1})``:

* **VWAP** (volume-weighted average price; Berkowitz, Logue & Noser, "The Total Cost of
  Transactions on the NYSE", Journal of Finance 43(1), 1988):
  ``VWAP_t = sum(P_i * V_i) / sum(V_i)`` over the ``n`` bars, with ``P_i`` the typical price
  ``(H_i + L_i + C_i) / 3`` (or the close, ``price="close"``). NaN when the window traded no
  volume.
* **Realized variance** (Andersen & Bollerslev, "Answering the Skeptics: Yes, Standard
  Volatility Models Do Provide Accurate Forecasts", International Economic Review 39(4), 1998;
  Andersen, Bollerslev, Diebold & Labys, Econometrica 71(2), 2003):
  ``RV_t = sum(r_i ** 2)`` over the ``n`` returns ``i = t-n+1 .. t``.
* **Bipower variation** (Barndorff-Nielsen & Shephard, "Power and Bipower Variation with
  Stochastic Volatility and Jumps", Journal of Financial Econometrics 2(1), 2004, eq. (1)):
  ``BV_t = mu1 ** -2 * sum(|r_i| * |r_{i-1}|)`` over ``i = t-n+2 .. t`` (the ``n - 1``
  adjacent pairs of the same ``n`` returns), ``mu1 = E|Z| = sqrt(2 / pi)`` for a standard
  normal ``Z``. BV estimates the continuous part of the quadratic variation; RV also contains
  the squared jumps.
* **Jump ratio** (relative jump measure, Huang & Tauchen, "The Relative Contribution of Jumps
  to Total Price Variance", Journal of Financial Econometrics 3(4), 2005):
  ``J_t = (RV_t - BV_t) / RV_t``; NaN when ``RV_t = 0``. It can be negative in finite samples
  (Barndorff-Nielsen & Shephard truncate ``RV - BV`` at zero; ``floor=True`` does that here).

Each indicator computes the same values in backtrader's two modes: ``once`` (vectorised,
backtests with ``runonce``) and ``next`` (live feeds); the tests check that they agree.
Window lengths are in bars; returns are not annualised.

Thread context: backtrader's main thread, like every indicator.
"""

from __future__ import annotations

import math
from typing import Any

import backtrader as bt
import numpy as np

MU1 = math.sqrt(2.0 / math.pi)  # E|Z| for Z ~ N(0, 1) (Barndorff-Nielsen & Shephard 2004)
NAN = float("nan")


def _log_returns(prices: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(np.diff(np.log(prices)), dtype=float)


def realized_variance(prices: np.ndarray) -> float:
    """RV of one window: sum of squared log returns of ``prices`` (shape (n + 1,))."""
    r = _log_returns(prices)
    return float(np.sum(r * r))


def bipower_variation(prices: np.ndarray) -> float:
    """BV of one window: ``mu1 ** -2 * sum(|r_i| |r_{i-1}|)`` over the log returns of
    ``prices`` (shape (n + 1,): n returns, n - 1 pairs)."""
    a = np.abs(_log_returns(prices))
    return float(np.sum(a[1:] * a[:-1]) / (MU1 * MU1))


class VWAP(bt.Indicator):  # type: ignore[misc]
    """Volume-weighted average price of the last ``period`` bars (formula in the module
    docstring). Input: a data feed (uses high, low, close, volume).

    Params:
        period (int): window, bars (>= 1). Default 20.
        price (str): ``"typical"`` ((H + L + C) / 3) or ``"close"``.
    """

    lines: Any = ("vwap",)
    params = (("period", 20), ("price", "typical"))

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # data, params: see backtrader
        if self.p.period < 1:
            raise ValueError(f"VWAP period must be >= 1, got {self.p.period}")
        if self.p.price not in ("typical", "close"):
            raise ValueError(f"VWAP price must be 'typical' or 'close', got {self.p.price!r}")
        self.addminperiod(self.p.period)

    def _value(self, h: Any, lo: Any, c: Any, v: Any) -> float:
        price = c if self.p.price == "close" else (h + lo + c) / 3.0
        volume = float(np.sum(v))
        return float(np.sum(price * v)) / volume if volume > 0 else NAN

    def next(self) -> None:
        n = self.p.period
        d = self.data
        self.lines.vwap[0] = self._value(
            np.asarray(d.high.get(size=n)),
            np.asarray(d.low.get(size=n)),
            np.asarray(d.close.get(size=n)),
            np.asarray(d.volume.get(size=n)),
        )

    def once(self, start: int, end: int) -> None:
        n = self.p.period
        d = self.data
        h, lo, c, v = (np.asarray(x.array[:end]) for x in (d.high, d.low, d.close, d.volume))
        dst = self.lines.vwap.array
        for i in range(max(start, n - 1), end):
            s = slice(i - n + 1, i + 1)
            dst[i] = self._value(h[s], lo[s], c[s], v[s])


class _WindowOfReturns(bt.Indicator):  # type: ignore[misc]
    """Base: one value from the last ``period`` log returns of the input line (``period + 1``
    prices). Input: a line or a data feed (its close)."""

    params = (("period", 20),)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if self.p.period < 2:
            raise ValueError(f"{type(self).__name__} period must be >= 2, got {self.p.period}")
        self.addminperiod(self.p.period + 1)

    @staticmethod
    def window(prices: np.ndarray) -> float:
        raise NotImplementedError

    def next(self) -> None:
        self.lines[0][0] = self.window(np.asarray(self.data.get(size=self.p.period + 1)))

    def once(self, start: int, end: int) -> None:
        m = self.p.period + 1
        src = np.asarray(self.data.array[:end])
        dst = self.lines[0].array
        for i in range(max(start, m - 1), end):
            dst[i] = self.window(src[i - m + 1 : i + 1])


class RealizedVariance(_WindowOfReturns):
    """Realized variance of the last ``period`` log returns (Andersen & Bollerslev 1998).

    Params:
        period (int): returns in the window (>= 2). Default 20.
    """

    lines: Any = ("rv",)

    @staticmethod
    def window(prices: np.ndarray) -> float:
        return realized_variance(prices)


class BipowerVariation(_WindowOfReturns):
    """Bipower variation of the last ``period`` log returns (Barndorff-Nielsen & Shephard 2004,
    ``mu1 = sqrt(2 / pi)``).

    Params:
        period (int): returns in the window (>= 2). Default 20.
    """

    lines: Any = ("bv",)

    @staticmethod
    def window(prices: np.ndarray) -> float:
        return bipower_variation(prices)


class JumpRatio(bt.Indicator):  # type: ignore[misc]
    """Share of the realized variance due to jumps, ``(RV - BV) / RV`` (Huang & Tauchen 2005).

    Lines: ``jump`` (the ratio), ``rv``, ``bv``.

    Params:
        period (int): returns in the window (>= 2). Default 20.
        floor (bool): truncate ``RV - BV`` at zero (Barndorff-Nielsen & Shephard 2004), so the
            ratio is in [0, 1]. Default False.
    """

    lines: Any = ("jump", "rv", "bv")
    params = (("period", 20), ("floor", False))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        rv = RealizedVariance(self.data, period=self.p.period)
        bv = BipowerVariation(self.data, period=self.p.period)
        self.lines.rv = rv.rv
        self.lines.bv = bv.bv
        excess = bt.Max(rv - bv, 0.0) if self.p.floor else rv - bv
        self.lines.jump = bt.DivByZero(excess, rv, zero=NAN)
