"""Agents that live tests load by name in a runner subprocess
(``AGENT=tests.live_agents:ReadAllAgent``); imports nothing but backtrader."""

from __future__ import annotations

import backtrader as bt


class ReadAllAgent(bt.Strategy):  # type: ignore[misc]
    """Reads the close of every feed at every step (so each decision record names the data hash
    of every symbol's current bar), buys one unit of the first feed every ``every`` steps and
    sells it ``every`` steps later (orders and fills in the records)."""

    params = (("every", 20),)

    def __init__(self) -> None:
        self.steps = 0

    def prenext(self) -> None:
        self.next()

    def next(self) -> None:
        self.steps += 1
        for d in self.datas:
            if len(d):
                _ = d.close[0]
        if self.steps % self.p.every == 0:
            if self.getposition(self.datas[0]).size:
                self.sell(data=self.datas[0], size=1)
            else:
                self.buy(data=self.datas[0], size=1)
