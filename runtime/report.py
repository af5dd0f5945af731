"""The portfolio report printed at the end of every run, the equity curve it is computed
from, and the progress indicator.

Performance numbers (return, CAGR, Sharpe, Sortino, Calmar, max drawdown) come from
:mod:`runtime.stats` (empyrical-reloaded) over the portfolio value at every bar, recorded by
:class:`EquityCurve`, annualised from the bar size of the run's finest feed
(:func:`runtime.stats.periods_per_year`). Trade counts come from backtrader's ``TradeAnalyzer``.
The HTML report (:mod:`runtime.reporting`) uses the same statistics.

Thread context: analyzers run on the main (backtrader) thread.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import backtrader as bt
import pandas as pd

from core.bars import feed_symbol
from core.time import BT_EPOCH_DAYS, SECONDS_PER_DAY
from runtime.stats import PerformanceStats

logger = logging.getLogger(__name__)


@dataclass(slots=True, kw_only=True)
class RunReport:
    """What a run did. Units in names; ``None`` where undefined (e.g. Sharpe of a flat run).

    ``stats`` holds the performance statistics of the run's equity curve (``None`` when no bar
    ran); ``html_report`` the path of the HTML report when one was written.
    """

    session_id: str
    agent: str
    mode: str
    symbols: tuple[str, ...]
    start_value_usd: float
    end_value_usd: float
    stats: PerformanceStats | None
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
    spill_left: int = 0  # rows waiting in the spill file at the end (this run's and earlier)
    spill_earlier_left: int = 0  # of those, rows of earlier runs
    spill_path: str = ""
    records_lost: int = 0  # neither stored nor on disk (the spill folder failed); see below
    spill_unsure: int = 0  # of spill_left (any run's): the store may hold them already
    # Why the decision records stopped being safe (the spill folder could not be written, or
    # the writer died): the run was stopped and exits with code 3. "" when nothing failed.
    decisions_failure: str = ""
    skipped_rows: dict[str, int] = field(default_factory=dict)
    feed_counters: dict[str, dict[str, int]] = field(default_factory=dict)
    broker_note: str = "simulated (backtrader BackBroker)"
    interrupted: bool = False
    elapsed_s: float = 0.0
    html_report: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # orders still alive when the run ended (submitted or accepted, not filled: a feed ended
    # before they could fill, a limit was not reached), as "<symbol> <buy|sell> <size>"
    open_orders: list[str] = field(default_factory=list)

    @property
    def sharpe(self) -> float | None:
        return self.stats.sharpe if self.stats else None

    @property
    def max_drawdown_pct(self) -> float | None:
        return self.stats.max_drawdown_pct if self.stats else None

    @property
    def return_pct(self) -> float | None:
        """``(end / start - 1) * 100``; ``None`` when the start value is not positive (an
        empty account)."""
        if not self.start_value_usd > 0:
            return None
        return (self.end_value_usd / self.start_value_usd - 1.0) * 100.0

    @property
    def win_rate_pct(self) -> float | None:
        return self.trades_won / self.trades * 100.0 if self.trades else None

    def _curve_lines(self) -> list[str]:
        """A line when the equity curve (the portfolio value at each bar, which CAGR, Sharpe,
        drawdown and the HTML report come from) does not end where the broker's values do
        (start before the run, end after its stop), by a cent or more: with Alpaca the end
        value is the account after the final sync, so fills or account changes after the last
        bar, or an account that does not match the run's own fills, show here instead of as a
        return that contradicts the statistics (helper-84: +0.00 % beside a CAGR of +108 %)."""
        st = self.stats
        if st is None or st.start_value_usd is None or st.end_value_usd is None:
            return []
        off_end = self.end_value_usd - st.end_value_usd
        off_start = self.start_value_usd - st.start_value_usd
        if not (math.isfinite(off_end) and math.isfinite(off_start)):
            return []  # a value that is not a number: nothing to compare (printed above)
        if abs(off_end) < 0.01 and abs(off_start) < 0.01:
            return []
        ret = "n/a" if st.total_return_pct is None else f"{st.total_return_pct:+.2f} %"
        return [
            f"equity curve     {st.start_value_usd:,.2f} -> {st.end_value_usd:,.2f} USD "
            f"({ret}) over the bars: the statistics below are computed from it",
            f"  differs        from the broker's start by {off_start:+,.2f} USD and its end by "
            f"{off_end:+,.2f} USD (fills or account changes outside the bars, or an account "
            "that does not match this run's fills)",
        ]

    def render(self) -> str:
        """Human-readable text, one fact per line."""

        def num(x: float | None, fmt: str, unit: str = "") -> str:
            return "n/a" if x is None else format(x, fmt) + unit

        st = self.stats
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
            f"return           {num(self.return_pct, '+.2f', ' %')}",
            *self._curve_lines(),
            f"cagr             {num(st.cagr_pct if st else None, '+.2f')} %",
            f"sharpe (annual)  {num(self.sharpe, '.3f')}",
            f"sortino (annual)  {num(st.sortino if st else None, '.3f')}",
            f"calmar           {num(st.calmar if st else None, '.3f')}",
            f"max drawdown     {num(self.max_drawdown_pct, '.2f')} %",
            f"annualised from  {num(st.periods_per_year if st else None, '.6g')} bars a year",
            f"trades           {self.trades} closed, win rate {num(self.win_rate_pct, '.1f')} %",
            f"decisions        {self.decisions} recorded ({self.records_written} written, "
            f"{self.records_spilled} spilled, {self.records_rejected} rejected)",
        ]
        if self.open_orders:
            shown = ", ".join(self.open_orders[:5])
            more = f" and {len(self.open_orders) - 5} more" if len(self.open_orders) > 5 else ""
            lines.append(
                f"open orders      {len(self.open_orders)} not filled when the run ended "
                f"({shown}{more})"
            )
        if self.decisions_failure:
            lines.append(f"DECISIONS FAILED {self.decisions_failure}; the run was stopped")
        if self.spill_unsure:
            lines.append(
                f"in doubt         {self.spill_unsure} of the records in the spill may be "
                "stored already (their write was cut short or got no answer); each is looked "
                "up by decision_id before it is sent again"
            )
        if self.records_lost:
            lines.append(
                f"lost             {self.records_lost} records neither stored nor on disk "
                "(see the ERROR log for their decision ids)"
            )
        if self.records_replayed:
            lines.append(f"replayed         {self.records_replayed} records from an earlier spill")
        if self.spill_left:
            lines.append(
                f"spill left       {self.spill_left} records in {self.spill_path} "
                f"({self.spill_left - self.spill_earlier_left} of this run, "
                f"{self.spill_earlier_left} of earlier runs): written at the next start or by "
                "python -m runtime.drain"
            )
        lines.append(
            f"look-ahead       {self.lookahead_reads} reads of bars not in the past (future, "
            "wrapped-around or not-started feed; see sql/*/lookahead_reads.sql)"
            if self.lookahead_reads
            else "look-ahead       0 reads of bars not in the past"
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
        ]
        if self.html_report:
            lines.append(f"html report      {self.html_report}")
        lines += [
            "=" * 64,
            "",
        ]
        return "\n".join(lines)


def open_orders(broker: Any) -> list[str]:
    """The broker's orders still alive (backtrader's ``get_orders_open()``: submitted,
    accepted or partially filled), each as ``"<symbol> <buy|sell> <size>"`` (shares);
    ``[]`` for a broker without that call."""
    get = getattr(broker, "get_orders_open", None)
    if get is None:
        return []
    out = []
    for order in get():
        side = "buy" if order.isbuy() else "sell"
        out.append(f"{feed_symbol(order.data)} {side} {abs(order.created.size):g}")
    return out


def trade_counts(strategy: Any) -> tuple[int, int]:
    """(closed trades, won trades) from the ``TradeAnalyzer`` the runner adds as ``trades``."""
    ta = strategy.analyzers.trades.get_analysis()
    closed = int(ta.get("total", {}).get("closed", 0) or 0)
    won = int(ta.get("won", {}).get("total", 0) or 0) if closed else 0
    return closed, won


class EquityCurve(bt.Analyzer):  # type: ignore[misc]
    """Portfolio value at the end of every bar the strategy sees (``prenext``, ``nextstart``,
    ``next``): the same points FMEL records as ``portfolio_value``.

    Memory: 16 bytes a bar (two ``array('d')``).
    """

    def start(self) -> None:
        self._times = array("d")
        self._values = array("d")

    def _point(self) -> None:
        self._times.append(self.strategy.datetime[0])
        self._values.append(float(self.strategy.broker.getvalue()))

    def prenext(self) -> None:
        self._point()

    def nextstart(self) -> None:
        self._point()

    def next(self) -> None:
        self._point()

    def series(self) -> pd.Series:
        """Portfolio value (USD) indexed by aware UTC bar time, millisecond resolution like the
        decision store's ``bar_time``; shape (bars,)."""
        posix_ms = [round((t - BT_EPOCH_DAYS) * SECONDS_PER_DAY * 1000.0) for t in self._times]
        index = pd.to_datetime(posix_ms, unit="ms", utc=True)
        return pd.Series(list(self._values), index=index, name="portfolio_value", dtype=float)

    def get_analysis(self) -> dict[str, Any]:
        return {"bars": len(self._values)}


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
