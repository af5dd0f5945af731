"""Small agents used by end-to-end tests (``AGENT=tests.agents_for_tests:...``)."""

from __future__ import annotations

import backtrader as bt


class LookbackAgent(bt.Strategy):  # type: ignore[misc]
    """Every ``every`` bars reads ``close[-depth]`` and a ``window``-bar window; once, at its
    ``peek_at``-th next(), reads the next bar (a look-ahead, only possible in a preloaded
    backtest). Buys one share on that bar so there is an action to query."""

    params = (("every", 10), ("depth", 10), ("window", 20), ("peek_at", 100))

    def __init__(self) -> None:
        self.calls = 0

    def next(self) -> None:
        self.calls += 1
        if self.calls % self.p.every == 0 and self.calls > self.p.window:
            _ = self.data.close[-self.p.depth]
            _ = self.data.close.get(size=self.p.window)
        if self.calls == self.p.peek_at:
            _ = self.data.close[1]
            self.buy(size=1)
