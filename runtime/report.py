"""The portfolio report printed at the end of every run, and the progress indicator.

Performance numbers come from backtrader's own analyzers (``SharpeRatio``, ``DrawDown``,
``TradeAnalyzer``); see backtrader's analyzer reference for their formulas:
Sharpe is annualised from daily returns with a zero risk-free rate (252 periods a year), max
drawdown is the largest peak-to-trough fall of portfolio value in percent.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import backtrader as bt

logger = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class RunReport:
    """What a run did. Units in names; ``None`` where undefined (e.g. Sharpe of a flat run)."""

    session_id: str
    agent: str
    mode: str
    symbols: tuple[str, ...]
    start_value_usd: float
    end_value_usd: float
    sharpe: float | None
    max_drawdown_pct: float | None
    trades: int
    trades_won: int
    bars: int
    decisions: int
    lookahead_reads: int
    stored_at: str
    example_query: str
    records_written: int = 0
    records_spilled: int = 0
    records_rejected: int = 0
    records_replayed: int = 0
    skipped_rows: dict[str, int] = field(default_factory=dict)
    feed_counters: dict[str, dict[str, int]] = field(default_factory=dict)
    broker_note: str = "simulated (backtrader BackBroker)"
    interrupted: bool = False
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def return_pct(self) -> float:
        return (self.end_value_usd / self.start_value_usd - 1.0) * 100.0

    @property
    def win_rate_pct(self) -> float | None:
        return self.trades_won / self.trades * 100.0 if self.trades else None

    def render(self) -> str:
        """Human-readable text, one fact per line."""

        def num(x: float | None, fmt: str) -> str:
            return "n/a" if x is None else format(x, fmt)

        lines = [
            "",
            "=" * 64,
            f"Portfolio report  session {self.session_id}"
            + ("  (INTERRUPTED)" if self.interrupted else ""),
            "=" * 64,
            f"agent            {self.agent}  mode={self.mode}  broker={self.broker_note}",
            f"symbols          {', '.join(self.symbols)}",
            f"bars             {self.bars}  in {self.elapsed_s:.1f} s",
            f"start value      {self.start_value_usd:,.2f} USD",
            f"end value        {self.end_value_usd:,.2f} USD",
            f"return           {self.return_pct:+.2f} %",
            f"sharpe (annual)  {num(self.sharpe, '.3f')}",
            f"max drawdown     {num(self.max_drawdown_pct, '.2f')} %",
            f"trades           {self.trades} closed, win rate {num(self.win_rate_pct, '.1f')} %",
            f"decisions        {self.decisions} recorded ({self.records_written} written, "
            f"{self.records_spilled} spilled, {self.records_rejected} rejected)",
        ]
        if self.records_replayed:
            lines.append(f"replayed         {self.records_replayed} records from an earlier spill")
        if self.lookahead_reads:
            lines.append(
                f"look-ahead       {self.lookahead_reads} reads of future bars (see "
                "lookahead_reads)"
            )
        for name, count in self.skipped_rows.items():
            if count:
                lines.append(f"skipped rows     {name}: {count} (CSV_ON_BAD_ROWS=skip)")
        for feed, counters in self.feed_counters.items():
            shown = ", ".join(f"{k}={v}" for k, v in counters.items())
            lines.append(f"feed {feed:<11} {shown}")
        for key, value in self.extra.items():
            lines.append(f"{key:<16} {value}")
        lines += [
            f"stored at        {self.stored_at}",
            "look at them     " + self.example_query,
            "=" * 64,
            "",
        ]
        return "\n".join(lines)


def performance(strategy: Any) -> tuple[float | None, float | None, int, int]:
    """(sharpe, max_drawdown_pct, closed trades, won trades) from the analyzers the runner adds
    under the names ``sharpe``, ``drawdown`` and ``trades``."""
    an = strategy.analyzers
    sharpe = an.sharpe.get_analysis().get("sharperatio")
    dd = an.drawdown.get_analysis()
    max_dd = dd.get("max", {}).get("drawdown")
    ta = an.trades.get_analysis()
    closed = int(ta.get("total", {}).get("closed", 0) or 0)
    won = int(ta.get("won", {}).get("total", 0) or 0) if closed else 0
    return (
        float(sharpe) if sharpe is not None else None,
        float(max_dd) if max_dd is not None else None,
        closed,
        won,
    )


class ProgressAnalyzer(bt.Analyzer):  # type: ignore[misc]
    """Progress of a long backtest: a tqdm bar on a terminal, else an INFO log line every 10 %.

    Params:
        total (int): expected bars (0 = unknown: log every 1,000 bars).
        bar (bool): draw a tqdm bar (stderr) instead of log lines.
    """

    params = (("total", 0), ("bar", False))

    def start(self) -> None:
        self.count = 0
        self._next_pct = 10
        self._t0 = time.perf_counter()
        self._tqdm: Any = None
        if self.p.bar:
            from tqdm import tqdm

            self._tqdm = tqdm(
                total=self.p.total or None,
                unit="bar",
                file=sys.stderr,
                mininterval=0.5,
                leave=False,
            )

    def _tick(self) -> None:
        self.count += 1
        if self._tqdm is not None:
            self._tqdm.update(1)
            return
        total = self.p.total
        if total:
            pct = self.count * 100 // total
            if pct >= self._next_pct:
                self._next_pct = pct - pct % 10 + 10
                rate = self.count / max(time.perf_counter() - self._t0, 1e-9)
                logger.info("progress %d%% (%d/%d bars, %.0f bars/s)", pct, self.count, total, rate)
        elif self.count % 1000 == 0:
            logger.info("progress: %d bars", self.count)

    def prenext(self) -> None:
        self._tick()

    def nextstart(self) -> None:
        self._tick()

    def next(self) -> None:
        self._tick()

    def stop(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
