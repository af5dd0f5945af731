"""RSI mean-reversion agent that uses a dynamic field when the feed has one.

If a symbol's feed carries an ``rsi`` field (a CSV column or a Pub/Sub message field), the agent
reads it directly (``data.rsi[0]``); otherwise it computes a 14-bar RSI itself. A text field
``regime`` (``up``/``down``), when present, asks for a deeper dip (``low - 5``) in a down
regime. Every read lands in the
decision record, so SQL can tell which decisions used the feed's RSI and which the computed one.

Params:
    low (float): buy when RSI falls below this (0..100). Default 35.
    high (float): exit when RSI rises above this (0..100). Default 65.
    stake (float): fraction of portfolio value per position (0..1). Default 0.3.
"""

from __future__ import annotations

import math
from typing import Any

import backtrader as bt

from analyzers.fmel import attach_note


class RsiAgent(bt.Strategy):  # type: ignore[misc]
    params = (("low", 35.0), ("high", 65.0), ("stake", 0.3))

    def __init__(self) -> None:
        self.computed_rsi: dict[str, Any] = {}
        for d in self.datas:
            if "rsi" not in d.lines.getlinealiases():
                self.computed_rsi[d._name] = bt.ind.RSI(d.close, period=14)

    def rsi(self, data: Any) -> float:
        """The feed's rsi field when it has one, else the computed RSI."""
        if data._name in self.computed_rsi:
            return float(self.computed_rsi[data._name][0])
        return float(data.rsi[0])

    def next(self) -> None:
        for data in self.datas:
            value = self.rsi(data)
            if math.isnan(value):
                continue
            regime = data.regime[0] if "regime" in getattr(data, "text_lines", {}) else None
            position = self.getposition(data).size
            threshold = self.p.low - 5 if regime == "down" else self.p.low
            if position == 0 and value < threshold:
                size = math.floor(self.broker.getvalue() * self.p.stake / data.close[0])
                if size > 0:
                    attach_note(
                        self,
                        reasoning=f"{data._name}: RSI {value:.1f} < {threshold}",
                        confidence=(threshold - value) / threshold,
                        regime=regime,
                    )
                    self.buy(data=data, size=size)
            elif position > 0 and value > self.p.high:
                attach_note(self, reasoning=f"{data._name}: RSI {value:.1f} > {self.p.high}")
                self.close(data=data)
