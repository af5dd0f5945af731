"""agents.ranking_agent: ranking by combined factors, holding the top N with weights,
cancelling open orders before each rebalance (in-process backtests on synthetic data)."""

from __future__ import annotations

from typing import Any

import backtrader as bt
import numpy as np
import pandas as pd
import pytest

from agents.ranking_agent import RankingAgent


def feed(drift: float, vol: float, seed: int, n: int = 150, start: str = "2020-01-01") -> Any:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(drift + vol * rng.standard_normal(n)))
    df = pd.DataFrame(
        {
            "open": close,
            "high": close * 1.005,
            "low": close * 0.995,
            "close": close,
            "volume": 1000.0,
        },
        index=pd.bdate_range(start, periods=n),
    )
    return bt.feeds.PandasData(dataname=df)


def run(agent: type, universe: dict[str, Any], **params: Any) -> Any:
    cerebro = bt.Cerebro(stdstats=False)
    for name, data in universe.items():
        cerebro.adddata(data, name=name)
    cerebro.broker.setcash(1_000_000)
    cerebro.addstrategy(agent, **params)
    return cerebro.run()[0]


def test_holds_the_top_n_by_combined_score_with_equal_weights() -> None:
    universe = {
        "UP": feed(0.004, 0.005, 1),  # strong steady trend: best momentum, low volatility
        "UP2": feed(0.002, 0.006, 2),
        "FLAT": feed(0.0, 0.006, 3),
        "DOWN": feed(-0.003, 0.02, 4),  # falling and volatile
    }
    s = run(RankingAgent, universe, top_n=2, lookback=20, window=10, rebalance_every=5)
    held = {d._name for d in s.datas if s.getposition(d).size > 0}
    assert held == {"UP", "UP2"}
    value = s.broker.getvalue()
    for d in s.datas:
        if d._name in held:
            weight = s.getposition(d).size * d.close[0] / value
            assert weight == pytest.approx(0.95 / 2, abs=0.05)


def test_inverse_vol_weights_favour_the_calmer_symbol() -> None:
    universe = {
        "CALM": feed(0.003, 0.004, 5),
        "WILD": feed(0.004, 0.02, 6),
        "DOWN": feed(-0.004, 0.01, 7),
    }
    s = run(
        RankingAgent,
        universe,
        top_n=2,
        lookback=20,
        window=10,
        weighting="inverse_vol",
        w_volatility=0.0,
        w_jump=0.0,
    )
    value = s.broker.getvalue()
    w = {d._name: s.getposition(d).size * d.close[0] / value for d in s.datas}
    assert w["CALM"] > w["WILD"] > 0 and w["DOWN"] == 0


class LimitRanking(RankingAgent):
    """Rebalances with limit orders that never fill, so orders are open at every rebalance;
    logs order events in order."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, str, int]] = []

    def place(self, orders: list[tuple[Any, float]]) -> None:
        for d, target in orders:
            side = self.buy if target > 0 else self.sell
            order = side(
                data=d,
                size=1,
                exectype=bt.Order.Limit,
                price=d.close[0] * 0.5 if target > 0 else d.close[0] * 2,
            )
            self.open_orders[order.ref] = order
            self.log.append((len(self), "placed", order.ref))

    def cancel(self, order: Any) -> Any:
        self.log.append((len(self), "cancel", order.ref))
        return super().cancel(order)

    def notify_order(self, order: Any) -> None:
        if order.status == order.Canceled:
            self.log.append((len(self), "canceled", order.ref))
        super().notify_order(order)


def test_open_orders_are_cancelled_before_each_rebalance() -> None:
    universe = {"A": feed(0.002, 0.01, 8), "B": feed(0.001, 0.01, 9), "C": feed(0.0, 0.01, 10)}
    s = run(LimitRanking, universe, top_n=1, lookback=10, window=5, rebalance_every=3)
    log: list[tuple[int, str, int]] = s.log
    rebalances = sorted({bar for bar, kind, _ in log if kind == "placed"})
    assert len(rebalances) >= 5
    open_refs: set[int] = set()
    requested: set[int] = set()
    for bar, kind, ref in log:
        if kind == "placed":
            # every order placed at an earlier bar was asked to cancel before this one
            assert {r for r in open_refs if r not in placed_at(log, bar)} <= requested
            open_refs.add(ref)
        elif kind == "cancel":
            requested.add(ref)
        elif kind == "canceled":
            open_refs.discard(ref)
    # and the broker confirmed every cancel asked for before the last bar
    last = len(s)
    confirmed = {ref for _, kind, ref in log if kind == "canceled"}
    assert {ref for bar, kind, ref in log if kind == "cancel" and bar < last} <= confirmed
    assert confirmed


def placed_at(log: list[tuple[int, str, int]], bar: int) -> set[int]:
    return {ref for b, kind, ref in log if kind == "placed" and b == bar}


def test_feeds_that_start_late_are_ranked_once_they_have_history() -> None:
    universe = {
        "EARLY": feed(0.001, 0.01, 11, n=200),
        "LATE": feed(0.006, 0.004, 12, n=100, start="2020-05-01"),
    }
    s = run(RankingAgent, universe, top_n=1, lookback=20, window=10)
    # the late feed's strong trend wins once it has lookback bars
    assert s.getposition(s.getdatabyname("LATE")).size > 0


@pytest.mark.parametrize(
    "params",
    [{"top_n": 0}, {"window": 1}, {"weighting": "score"}, {"allocation": 1.5}],
)
def test_bad_params_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        run(RankingAgent, {"A": feed(0.0, 0.01, 1)}, **params)
