"""Multi-symbol ranking agent: rank the universe every bar on a combination of factors, hold the
top N with weights, cancel open orders before each rebalance.

Factors, per symbol, from indicators FMEL records when the agent reads them:

* momentum: ``close / close[-lookback] - 1`` (``bt.ind.RateOfChange``); higher is better.
* volatility: ``sqrt(RV)`` over ``window`` log returns (:class:`agents.indicators
  .RealizedVariance`); lower is better.
* jump ratio: ``(RV - BV) / RV`` floored at 0 (:class:`agents.indicators.JumpRatio`); lower is
  better (moves made of jumps are less likely to persist).
* trend: ``close / VWAP - 1`` over ``window`` bars (:class:`agents.indicators.VWAP`); higher
  is better.

Each factor is standardised across the symbols ranked at this bar (z-score; 0 when all are
equal or only one symbol is ranked) and the score is
``w_momentum * z(momentum) - w_volatility * z(volatility) - w_jump * z(jump) + w_trend *
z(trend)``. A symbol is ranked once it has ``max(lookback, window) + 1`` bars and while its
feed delivers bars (a feed that has ended, or not started, is neither read nor traded).

Rebalancing: when the top-N set changes, and every ``rebalance_every`` bars to bring weights
back to target. Before each rebalance every open order (and any buy still waiting) is
cancelled; then positions that shrink are ordered, and those that grow are ordered at the next
bar once the sells have filled (backtrader's broker checks cash when an order is submitted,
so a buy sent beside the sell that pays for it would be rejected for margin). Weights: ``equal``
(``allocation / N`` each) or ``inverse_vol`` (proportional to 1 / volatility, summing to
``allocation``). Changes smaller than ``min_trade`` of the portfolio are skipped. Buys are
scaled down to the cash the sells leave: a position in a feed that has ended (GOOG.csv stops in
2013) cannot be sold in a backtest and keeps its last value.

Params:
    top_n (int): symbols held (>= 1). Default 2.
    lookback (int): momentum lookback, bars. Default 60.
    window (int): window of the volatility, jump and VWAP factors, bars. Default 20.
    w_momentum, w_volatility, w_jump, w_trend (float): factor weights. Defaults 1, 0.5,
        0.25, 0.25.
    weighting (str): ``"equal"`` or ``"inverse_vol"``. Default ``"equal"``.
    allocation (float): fraction of the portfolio invested (0..1]. Default 0.95.
    rebalance_every (int): bars between rebalances when the top N does not change. Default 20.
    min_trade (float): smallest weight change traded, fraction of the portfolio. Default 0.01.

Run on the bundled data:
``SYMBOLS=GOOG,SP500,NASDAQ AGENT=agents.ranking_agent:RankingAgent python runner.py``.
"""

from __future__ import annotations

import math
from typing import Any

import backtrader as bt
import numpy as np

from agents.indicators import VWAP, JumpRatio, RealizedVariance
from analyzers.fmel import attach_note


class RankingAgent(bt.Strategy):  # type: ignore[misc]
    params = (
        ("top_n", 2),
        ("lookback", 60),
        ("window", 20),
        ("w_momentum", 1.0),
        ("w_volatility", 0.5),
        ("w_jump", 0.25),
        ("w_trend", 0.25),
        ("weighting", "equal"),
        ("allocation", 0.95),
        ("rebalance_every", 20),
        ("min_trade", 0.01),
    )

    def __init__(self) -> None:
        p = self.p
        if p.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {p.top_n}")
        if p.lookback < 1 or p.window < 2:
            raise ValueError(f"need lookback >= 1 and window >= 2, got {p.lookback}, {p.window}")
        if p.weighting not in ("equal", "inverse_vol"):
            raise ValueError(f"weighting must be 'equal' or 'inverse_vol', got {p.weighting!r}")
        if not 0 < p.allocation <= 1:
            raise ValueError(f"allocation must be in (0, 1], got {p.allocation}")
        self.momentum = {
            d._name: bt.ind.RateOfChange(d.close, period=p.lookback) for d in self.datas
        }
        self.rv = {d._name: RealizedVariance(d.close, period=p.window) for d in self.datas}
        self.jump = {d._name: JumpRatio(d.close, period=p.window, floor=True) for d in self.datas}
        self.vwap = {d._name: VWAP(d, period=p.window) for d in self.datas}
        self.need = max(p.lookback, p.window) + 1
        self.open_orders: dict[int, Any] = {}
        self.pending_buys: list[tuple[Any, float]] = []
        self.held: tuple[str, ...] = ()
        self.since_rebalance = 0
        self._seen: dict[str, int] = {d._name: 0 for d in self.datas}

    # -- orders -----------------------------------------------------------------------------

    def notify_order(self, order: Any) -> None:
        if not order.alive():
            self.open_orders.pop(order.ref, None)

    def cancel_open_orders(self) -> int:
        """Cancel every order still open; returns how many were asked to cancel."""
        orders = list(self.open_orders.values())
        for order in orders:
            self.cancel(order)
        return len(orders)

    # -- every bar --------------------------------------------------------------------------

    def prenext(self) -> None:
        # Feeds start on different dates: rank what has started instead of waiting for all.
        self.next()

    def nextstart(self) -> None:
        self.next()

    def current(self) -> list[Any]:
        """Feeds that delivered a bar at this step and have enough history."""
        out = []
        for d in self.datas:
            n = len(d)
            fresh = n > self._seen[d._name]
            self._seen[d._name] = n
            if fresh and n >= self.need:
                out.append(d)
        return out

    def factors(self, datas: list[Any]) -> dict[str, dict[str, float]]:
        """Raw factor values of each feed whose indicators are defined at this bar."""
        out: dict[str, dict[str, float]] = {}
        for d in datas:
            name = d._name
            values = {
                "momentum": float(self.momentum[name][0]),
                "volatility": math.sqrt(max(float(self.rv[name][0]), 0.0)),
                "jump": float(self.jump[name][0]),
                "trend": float(d.close[0]) / float(self.vwap[name][0]) - 1.0,
            }
            if all(math.isfinite(v) for v in values.values()):
                out[name] = values
        return out

    def scores(self, factors: dict[str, dict[str, float]]) -> dict[str, float]:
        """Combined score per symbol (z-scores across symbols, weighted; see module doc)."""
        names = list(factors)
        signs = {
            "momentum": self.p.w_momentum,
            "volatility": -self.p.w_volatility,
            "jump": -self.p.w_jump,
            "trend": self.p.w_trend,
        }
        total = np.zeros(len(names))
        for factor, weight in signs.items():
            x = np.array([factors[n][factor] for n in names])
            sd = float(x.std())
            if weight and sd > 0:
                total += weight * (x - x.mean()) / sd
        return {n: float(s) for n, s in zip(names, total)}

    def targets(self, top: list[str], factors: dict[str, dict[str, float]]) -> dict[str, float]:
        """Target weight per held symbol (fractions of the portfolio, summing to allocation)."""
        if not top:
            return {}
        if self.p.weighting == "inverse_vol":
            inv = {n: 1.0 / factors[n]["volatility"] for n in top if factors[n]["volatility"] > 0}
            if len(inv) == len(top):
                s = sum(inv.values())
                return {n: self.p.allocation * v / s for n, v in inv.items()}
        return {n: self.p.allocation / len(top) for n in top}

    def place(self, orders: list[tuple[Any, float]]) -> None:
        """``order_target_percent`` for each ``(feed, target weight)``, remembered as open."""
        for d, target in orders:
            order = self.order_target_percent(d, target=target)
            if order is not None:
                self.open_orders[order.ref] = order

    def next(self) -> None:
        datas = self.current()
        factors = self.factors(datas)
        if factors:
            scores = self.scores(factors)
            ranking = sorted(scores, key=lambda n: (-scores[n], n))
            top = ranking[: self.p.top_n]
            self.since_rebalance += 1
            changed = tuple(sorted(top)) != tuple(sorted(self.held))
            if changed or self.since_rebalance >= self.p.rebalance_every:
                self.rebalance(datas, factors, scores, ranking, top)
                return
        if self.pending_buys and not self.open_orders:
            # the sells of the last rebalance have filled: now the buys they paid for
            fresh = {id(d) for d in datas}
            self.place([(d, t) for d, t in self.pending_buys if id(d) in fresh])
            self.pending_buys = []

    def rebalance(
        self,
        datas: list[Any],
        factors: dict[str, dict[str, float]],
        scores: dict[str, float],
        ranking: list[str],
        top: list[str],
    ) -> None:
        """Cancel what is open, then order toward the target weights of ``top``. Orders are
        only ever cancelled a bar or more after they were placed (backtrader cannot cancel an
        order in the bar that created it: it is not with the broker yet)."""
        cancelled = self.cancel_open_orders()
        weights = self.targets(top, factors)
        value = float(self.broker.getvalue())
        by_name = {d._name: d for d in datas}
        plan: list[tuple[float, Any, float]] = []
        for name, d in by_name.items():
            target = weights.get(name, 0.0)
            current = self.getposition(d).size * float(d.close[0]) / value if value > 0 else 0.0
            if abs(target - current) >= self.p.min_trade or (target == 0 and current != 0):
                plan.append((target - current, d, target))
        # Shrinking positions now; growing ones once those sells have filled (next bar): the
        # broker checks cash when an order is submitted, before any sell has freed it.
        sells = [(d, t) for delta, d, t in plan if delta < 0]
        # Buys never spend more than the cash the sells leave (a position in a feed that has
        # ended cannot be sold and still counts in the portfolio value): scale them down.
        spend = sum(delta for delta, _, _ in plan if delta > 0)
        free = (float(self.broker.getcash()) / value if value > 0 else 0.0) - sum(
            delta for delta, _, _ in plan if delta < 0
        )
        scale = min(1.0, max(0.0, 0.99 * free) / spend) if spend > 0 else 1.0
        buys = [(d, t - delta * (1.0 - scale)) for delta, d, t in plan if delta > 0]
        self.pending_buys = buys if sells else []
        self.place(sells if sells else buys)
        attach_note(
            self,
            reasoning=(
                f"rank {' > '.join(ranking)}; hold {', '.join(top)}"
                + (f"; cancelled {cancelled} open" if cancelled else "")
            ),
            ranking=ranking,
            scores={n: round(s, 6) for n, s in scores.items()},
            factors={n: {k: round(v, 6) for k, v in f.items()} for n, f in factors.items()},
            weights={n: round(w, 6) for n, w in weights.items()},
        )
        self.held = tuple(top)
        self.since_rebalance = 0
