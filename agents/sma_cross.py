"""SMA-cross agent: the template to copy.

For each symbol, buy when the fast simple moving average crosses above the slow one and exit when
it crosses back below. Position size is a fixed fraction of the portfolio value, split across
symbols. Runs unchanged on CSV backtests and live Pub/Sub bars.

Params:
    fast (int): fast SMA period, bars. Default 10.
    slow (int): slow SMA period, bars. Default 30.
    allocation (float): fraction of portfolio value to commit across all symbols (0..1).
"""

from __future__ import annotations

import math
from typing import Any

import backtrader as bt

from analyzers.fmel import attach_note


class SmaCrossAgent(bt.Strategy):  # type: ignore[misc]
    params = (("fast", 10), ("slow", 30), ("allocation", 0.9))

    def __init__(self) -> None:
        if not 0 < self.p.fast < self.p.slow:
            raise ValueError(f"need 0 < fast < slow, got fast={self.p.fast} slow={self.p.slow}")
        # Indicators held as attributes are tracked by FMEL under these names.
        self.fast_sma = {d._name: bt.ind.SMA(d.close, period=self.p.fast) for d in self.datas}
        self.slow_sma = {d._name: bt.ind.SMA(d.close, period=self.p.slow) for d in self.datas}
        self.cross = {
            d._name: bt.ind.CrossOver(self.fast_sma[d._name], self.slow_sma[d._name])
            for d in self.datas
        }
        self.pending: dict[str, Any] = {}

    def notify_order(self, order: Any) -> None:
        if order.status in (order.Completed, order.Canceled, order.Margin, order.Rejected):
            self.pending.pop(order.data._name, None)

    def next(self) -> None:
        budget = self.broker.getvalue() * self.p.allocation / len(self.datas)
        for data in self.datas:
            name = data._name
            if name in self.pending:  # wait for the last order to finish
                continue
            position = self.getposition(data).size
            signal = self.cross[name][0]
            if position == 0 and signal > 0:
                price = data.close[0]
                size = math.floor(budget / price) if price > 0 else 0
                if size > 0:
                    attach_note(self, reasoning=f"{name}: fast SMA crossed above slow SMA")
                    self.pending[name] = self.buy(data=data, size=size)
            elif position > 0 and signal < 0:
                attach_note(self, reasoning=f"{name}: fast SMA crossed below slow SMA")
                self.pending[name] = self.close(data=data)
