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


class UnfilledOrders(bt.Strategy):  # type: ignore[misc]
    """On its first bar, a limit buy of 3 shares of the first feed far below the market (never
    fills); on the last bar of that feed, a market buy of 2 (the feed ends before it can fill,
    while the run goes on with the other feeds)."""

    def __init__(self) -> None:
        self.sent_last = False

    def next(self) -> None:
        first = self.datas[0]
        if len(self) == 1:
            self.buy(data=first, size=3, exectype=bt.Order.Limit, price=0.01)
        if not self.sent_last and first.datetime[0] >= first.last_num:
            self.buy(data=first, size=2)
            self.sent_last = True


class PeekAgent(bt.Strategy):  # type: ignore[misc]
    """``peek=True``: buys when the next bar's open is above this bar's close (a look-ahead
    read, ``open[1]``: only possible in a preloaded backtest), sells the bar after; it wins any
    search it is let into. ``peek=False``: the same on yesterday's move (helper-74's agent)."""

    params = (("peek", False), ("size", 100))

    def next(self) -> None:
        if self.position:
            self.close()
            return
        if len(self.data) < 2 or len(self.data) + 1 > self.data.buflen():
            return
        if self.p.peek:
            up = self.data.open[1] > self.data.close[0]
        else:
            up = self.data.close[0] > self.data.close[-1]
        if up:
            self.buy(size=self.p.size)


class OutOfSampleBug(bt.Strategy):  # type: ignore[misc]
    """An SMA trend follower that raises ``ZeroDivisionError`` on every bar from ``bug_from``
    (ISO date) when ``period == bug_period``: a bug only the test window meets (helper-74)."""

    params = (("period", 10), ("bug_period", 0), ("bug_from", "2100-01-01"))

    def __init__(self) -> None:
        self.sma = bt.ind.SMA(self.data.close, period=self.p.period)

    def next(self) -> None:
        if self.p.period == self.p.bug_period and self.data.datetime.date(0).isoformat() >= (
            self.p.bug_from
        ):
            _ = 1 / 0
        if not self.position and self.data.close[0] > self.sma[0]:
            self.buy(size=int(0.9 * self.broker.getvalue() / self.data.close[0]))
        elif self.position and self.data.close[0] < self.sma[0]:
            self.close()


class LongNotes(bt.Strategy):  # type: ignore[misc]
    """Attaches a ``kb``-kilobyte ``reasoning`` to every decision (text far beyond the store's
    memory limit over a run) and trades now and then (helper-74)."""

    params = (("kb", 50), ("every", 10))

    def next(self) -> None:
        from analyzers.fmel import attach_note

        attach_note(self, reasoning="x" * (self.p.kb * 1000))
        if len(self) % self.p.every == 0:
            self.close() if self.position else self.buy(size=1)
