"""The idiom corpus: agents written the way backtrader's documentation and samples write them.

Sources (mementum/backtrader and backtrader.com/docu): the Quickstart guide (consecutive down
closes, SMA filter, ``bar_executed``), "Platform concepts" and "Indicators - usage" (lines
operations in ``__init__``: ``close > sma``, ``close(-1)``, ``bt.And/Or/If/Max/Min``, indicators
of indicators, multi-line indicators), samples/order_target, samples/bracket, samples/oco,
samples/order-execution ("Order Management and Execution": every execution type),
samples/multidata-strategy and the multi-data blog post (``self.inds[d][...]``),
samples/mixing-timeframes (couplers ``data1.close()``), samples/cheat-on-open, "Timers"
(``add_timer`` + ``notify_timer``), "Sizers" (``LongOnly``, ``PercentSizer``,
``FixedReverser``), "Indicator development" (custom indicators), Ichimoku and Donchian channels.

The only change to the documented code: every read of a line goes through the harness helpers
(``self.r(x, ago)`` for ``x[ago]``, ``self.r_cmp(x, ">", 0)`` for ``x > 0`` in ``next``...),
which log what FMEL must record (see :mod:`tests.idioms.harness`); ``self.spec`` declares how an
indicator's reads are labelled and which feeds and bar offsets they come from.
"""

from __future__ import annotations

import datetime
import math
from typing import Any, ClassVar

import backtrader as bt
import numpy as np

from tests.idioms.harness import IdiomAgent

# ---------------------------------------------------------------------------------------------
# Quickstart
# ---------------------------------------------------------------------------------------------


class QuickstartDowns(IdiomAgent):
    """Quickstart: buy after two consecutive lower closes, sell 5 bars after the fill. Its first
    bar reads ``close[-1]`` and ``close[-2]`` before there are such bars: backtrader wraps around
    to the last bars of the file (look-ahead)."""

    params: ClassVar[Any] = (("exitbars", 5),)

    def __init__(self) -> None:
        self.dataclose = self.datas[0].close
        self.order = None
        self.bar_executed = 0

    def notify_order(self, order: Any) -> None:
        if order.status in [order.Submitted, order.Accepted]:
            return
        if order.status in [order.Completed]:
            self.bar_executed = len(self)
        self.order = None

    def next(self) -> None:
        if self.order:
            return
        if not self.position:
            if self.r(self.dataclose, 0) < self.r(self.dataclose, -1):  # noqa: SIM102 (as the docs)
                if self.r(self.dataclose, -1) < self.r(self.dataclose, -2):
                    self.order = self.buy()
        elif len(self) >= (self.bar_executed + self.params.exitbars):
            self.order = self.sell()


class QuickstartSma(IdiomAgent):
    """Quickstart with an SMA: buy above it, sell below it."""

    params: ClassVar[Any] = (("maperiod", 15),)

    def __init__(self) -> None:
        self.dataclose = self.datas[0].close
        self.order = None
        self.sma = bt.indicators.SimpleMovingAverage(self.datas[0], period=self.params.maperiod)
        self.spec(self.sma, "sma")

    def notify_order(self, order: Any) -> None:
        if not order.alive():
            self.order = None

    def next(self) -> None:
        if self.order:
            return
        if not self.position:
            if self.r(self.dataclose) > self.r(self.sma):
                self.order = self.buy(size=20)
        elif self.r(self.dataclose) < self.r(self.sma):
            self.order = self.sell(size=20)


class SmaCross(IdiomAgent):
    """The home page example: ``CrossOver`` of two SMAs compared in ``next``."""

    params: ClassVar[Any] = dict(pfast=10, pslow=30)

    def __init__(self) -> None:
        sma1 = bt.ind.SMA(period=self.p.pfast)
        sma2 = bt.ind.SMA(period=self.p.pslow)
        self.crossover = self.spec(bt.ind.CrossOver(sma1, sma2), "crossover")

    def next(self) -> None:
        if not self.position:
            if self.r_cmp(self.crossover, ">", 0):
                self.buy(size=10)
        elif self.r_cmp(self.crossover, "<", 0):
            self.close()


# ---------------------------------------------------------------------------------------------
# Lines operations
# ---------------------------------------------------------------------------------------------


class LinesOpSignal(IdiomAgent):
    """Platform concepts: signals as lines operations declared in ``__init__``."""

    def __init__(self) -> None:
        self.sma = bt.ind.SimpleMovingAverage(self.data, period=20)
        self.buysig = self.spec(self.data.close > self.sma, "buysig")
        self.sellsig = self.spec(self.data.close < self.sma(-1), "sellsig")

    def next(self) -> None:
        if self.r_bool(self.buysig) and not self.position:
            self.buy(size=10)
        elif self.position and self.r(self.sellsig):
            self.sell(size=10)


class DeltaLines(IdiomAgent):
    """Arithmetic on lines and delayed lines: ``close - open``, ``close(-1)``, momentum."""

    def __init__(self) -> None:
        d = self.data
        self.body = self.spec(d.close - d.open, "body")
        self.prev_close = self.spec(d.close(-1), "prev_close", (d, -1), equals="close")
        self.mom = self.spec(d.close - d.close(-5), "mom")
        self.range_pct = self.spec((d.high - d.low) / d.close * 100.0, "range_pct")

    def next(self) -> None:
        body, mom = self.r(self.body), self.r(self.mom)
        if not self.position and body > 0 and mom > 0 and self.r(self.range_pct) < 3.0:
            self.buy(size=5)
        elif self.position and self.r(self.prev_close) > self.r(self.data.close):
            self.close()


class LogicLines(IdiomAgent):
    """``bt.And``, ``bt.Or``, ``bt.If``, ``bt.Max``, ``bt.Min`` over lines."""

    def __init__(self) -> None:
        d = self.data
        sma = bt.ind.SMA(d, period=10)
        self.both = self.spec(bt.And(d.close > sma, d.close > d.open), "both")
        self.either = self.spec(bt.Or(d.close < sma, d.close < d.open), "either")
        self.pick = self.spec(bt.If(d.close > d.open, d.close, d.open), "pick")
        self.top = self.spec(bt.Max(d.open, d.close, sma), "top")
        self.bottom = self.spec(bt.Min(d.low, d.close(-1)), "bottom")

    def next(self) -> None:
        if not self.position and self.r(self.both):
            self.buy(size=10, exectype=bt.Order.Limit, price=self.r(self.pick))
        elif self.position and self.r(self.either) and self.r(self.top) > self.r(self.bottom):
            self.close()


# ---------------------------------------------------------------------------------------------
# Indicators
# ---------------------------------------------------------------------------------------------


class MacdLines(IdiomAgent):
    """A multi-line indicator read line by line; a line kept of an indicator not kept."""

    def __init__(self) -> None:
        self.macd = bt.ind.MACD(self.data)
        self.spec(self.macd.macd, "macd.macd")
        self.spec(self.macd.signal, "macd.signal")
        self.histo = self.spec(bt.ind.MACDHisto(self.data).lines.histo, "histo")

    def next(self) -> None:
        macd, signal = self.r(self.macd.macd), self.r(self.macd.lines.signal)
        if not self.position and macd > signal and self.r(self.histo) > self.r(self.histo, -1):
            self.buy(size=10)
        elif self.position and macd < signal:
            self.close()


class Bollinger(IdiomAgent):
    """Bollinger bands: buy below the bottom band, exit above the top one."""

    def __init__(self) -> None:
        self.boll = bt.ind.BollingerBands(period=20, devfactor=2.0)
        for name in ("top", "mid", "bot"):
            self.spec(getattr(self.boll.lines, name), f"boll.{name}")

    def next(self) -> None:
        close = self.r(self.data.close)
        if not self.position and close < self.r(self.boll.lines.bot):
            self.buy(size=10)
        elif self.position and close > self.r(self.boll.lines.mid):
            self.close()


class Oscillators(IdiomAgent):
    """Stochastic, RSI, an SMA of the RSI (indicator of an indicator) and the RSI's slope."""

    def __init__(self) -> None:
        self.stoch = bt.ind.Stochastic(self.data, period=14)
        self.spec(self.stoch.percK, "stoch.percK")
        self.spec(self.stoch.percD, "stoch.percD")
        self.rsi = self.spec(bt.ind.RSI(self.data.close, period=14), "rsi")
        self.rsi_sma = self.spec(bt.ind.SMA(self.rsi, period=5), "rsi_sma")
        self.rsi_slope = self.spec(self.rsi - self.rsi(-3), "rsi_slope")

    def next(self) -> None:
        k, d = self.r(self.stoch.percK), self.r(self.stoch.percD)
        if not self.position and k > d and self.r(self.rsi) < self.r(self.rsi_sma):
            self.buy(size=10)
        elif self.position and self.r(self.rsi_slope) < 0:
            self.close()


class AtrStop(IdiomAgent):
    """The MACD/ATR sample of the docs: enter on a MACD cross while the SMA points down, trail a
    stop ``atrdist`` ATRs below the close."""

    params: ClassVar[Any] = dict(atrdist=3.0, smaperiod=30, dirperiod=10)

    def __init__(self) -> None:
        self.macd = bt.ind.MACD(self.data)
        self.mcross = self.spec(bt.ind.CrossOver(self.macd.macd, self.macd.signal), "mcross")
        self.atr = self.spec(bt.ind.ATR(self.data, period=14), "atr")
        self.sma = bt.ind.SMA(self.data, period=self.p.smaperiod)
        self.smadir = self.spec(self.sma - self.sma(-self.p.dirperiod), "smadir")
        self.pstop = 0.0

    def next(self) -> None:
        if not self.position:
            if self.r(self.mcross) > 0.0 and self.r(self.smadir) < 0.0:
                self.buy(size=10)
                self.pstop = self.r(self.data.close) - self.p.atrdist * self.r(self.atr)
        else:
            pclose = self.r(self.data.close)
            if pclose < self.pstop:
                self.close()
            else:
                self.pstop = max(self.pstop, pclose - self.p.atrdist * self.r(self.atr))


class IchimokuCloud(IdiomAgent):
    """Ichimoku: the senkou spans are shifted back 26 bars (past), the chikou span forward 26
    bars (``close(26)``): reading it reads the future."""

    def __init__(self) -> None:
        d = self.data
        self.ichi = bt.ind.Ichimoku(d)
        self.spec(self.ichi.tenkan_sen, "ichi.tenkan_sen")
        self.spec(self.ichi.kijun_sen, "ichi.kijun_sen")
        self.spec(self.ichi.senkou_span_a, "ichi.senkou_span_a", (d, -26))
        self.spec(self.ichi.senkou_span_b, "ichi.senkou_span_b", (d, -26))
        self.spec(self.ichi.chikou_span, "ichi.chikou_span", (d, 26), equals="close")

    def next(self) -> None:
        close = self.r(self.data.close)
        cloud = max(self.r(self.ichi.senkou_span_a), self.r(self.ichi.senkou_span_b))
        lagging = self.r(self.ichi.chikou_span)
        if (
            not self.position
            and close > cloud
            and self.r(self.ichi.tenkan_sen) > self.r(self.ichi.kijun_sen)
        ):
            self.buy(size=10)
        elif self.position and (close < cloud or (not math.isnan(lagging) and lagging < close)):
            self.close()


class Donchian(IdiomAgent):
    """Donchian breakout: ``Highest(high(-1), 20)``, an indicator over a delayed line."""

    def __init__(self) -> None:
        d = self.data
        self.upper = self.spec(bt.ind.Highest(d.high(-1), period=20), "upper", (d, -1))
        self.lower = self.spec(bt.ind.Lowest(d.low(-1), period=20), "lower", (d, -1))

    def next(self) -> None:
        close = self.r(self.data.close)
        if not self.position and close > self.r(self.upper):
            self.buy(size=10)
        elif self.position and close < self.r(self.lower):
            self.close()


class OverUnderMovAv(bt.Indicator):  # type: ignore[misc]
    """Indicator development: a custom indicator declared in ``__init__``."""

    lines: Any = ("overunder",)
    params: ClassVar[Any] = dict(period=20, movav=bt.indicators.MovAv.Simple)

    def __init__(self) -> None:
        movav = self.p.movav(self.data, period=self.p.period)
        self.l.overunder = bt.Cmp(movav, self.data)


class DummyDifferenceDivider(bt.Indicator):  # type: ignore[misc]
    """A custom indicator computed in ``next``."""

    lines: Any = ("diffdiv",)
    params: ClassVar[Any] = (("period", 5),)

    def __init__(self) -> None:
        self.addminperiod(self.p.period + 1)

    def next(self) -> None:
        self.lines.diffdiv[0] = (self.data.close[0] - self.data.close[-self.p.period]) / 2.0


class Tomorrow(bt.Indicator):  # type: ignore[misc]
    """A custom indicator that reads the next bar in its own code (look-ahead)."""

    lines: Any = ("tomorrow",)

    def next(self) -> None:
        if len(self.data) < self.data.buflen():
            self.lines.tomorrow[0] = self.data.close[1]


class CustomIndicators(IdiomAgent):
    """Custom indicators, one of which looks at the future in its own ``next``."""

    def __init__(self) -> None:
        d = self.data
        self.ou = self.spec(OverUnderMovAv(d), "ou")  # type: ignore[call-arg]
        self.dd = self.spec(DummyDifferenceDivider(d, period=5), "dd")  # type: ignore[call-arg]
        self.tomorrow = self.spec(Tomorrow(d), "tomorrow", (d, 1, False), equals="close")

    def next(self) -> None:
        t = self.r(self.tomorrow)
        if not self.position and self.r(self.ou) < 0 and self.r(self.dd) > 0:
            self.buy(size=10)
        elif self.position and not math.isnan(t) and t < self.r(self.data.close):
            self.close()


class PeekAhead(IdiomAgent):
    """Forward-shifted lines: ``close(1)`` and ``SMA(close(1), period=1)``."""

    def __init__(self) -> None:
        d = self.data
        self.tomorrow = self.spec(d.close(1), "tomorrow", (d, 1), equals="close")
        self.fsma = self.spec(bt.ind.SMA(d.close(1), period=1), "fsma", (d, 1))

    def next(self) -> None:
        future, close = self.r(self.fsma), self.r(self.data.close)
        self.r(self.tomorrow)
        if not self.position and not math.isnan(future) and future > close:
            self.buy(size=10)
        elif self.position and not math.isnan(future) and future < close:
            self.close()


class HiddenHelper:
    """A helper object of the agent holding indicators."""

    def __init__(self, data: Any) -> None:
        self.fast = bt.ind.EMA(data, period=5)
        self.slow = bt.ind.EMA(data, period=20)


class HiddenIndicators(IdiomAgent):
    """Indicators kept as ``_private`` attributes, in nested containers, in a helper object
    and in a dict keyed by the data feed."""

    def __init__(self) -> None:
        d = self.data
        self._fast = self.spec(bt.ind.SMA(d, period=5), "_fast")
        self.book = {"trend": {"sma": self.spec(bt.ind.SMA(d, period=10), "book[trend][sma]")}}
        self.pairs = [
            (
                self.spec(bt.ind.RSI(d, period=7), "pairs[0][0]"),
                self.spec(bt.ind.ROC(d, period=5), "pairs[0][1]"),
            )
        ]
        self.helper = HiddenHelper(d)
        self.spec(self.helper.fast, "helper.fast")
        self.spec(self.helper.slow, "helper.slow")
        self.by_data = {
            x: self.spec(bt.ind.Momentum(x, period=5), "by_data", x) for x in self.datas
        }

    def next(self) -> None:
        fast, trend = self.r(self._fast), self.r(self.book["trend"]["sma"])
        rsi, roc = (self.r(x) for x in self.pairs[0])
        moms = [self.r(self.by_data[d]) for d in self.datas]
        if not self.position and fast > trend and rsi < 70 and roc > 0 and moms[0] > 0:
            self.buy(size=10)
        elif self.position and self.r(self.helper.fast) < self.r(self.helper.slow):
            self.close()


# ---------------------------------------------------------------------------------------------
# Reading data in every form
# ---------------------------------------------------------------------------------------------


class ItemForms(IdiomAgent):
    """``data[0]``, ``data.lines.close``, ``datas[0].lines[3]``, ``getdatabyname``, an extra
    column, ``len(data)``, windows with ``get``."""

    def next(self) -> None:
        close = self.r(self.data, 0)
        prev = self.r(self.data.lines.close, -1)
        third = self.r(self.datas[0].lines[3])
        high2 = self.r(self.data0.high, -2)
        low = self.r(self.getdatabyname("NASDAQ").low)
        adj = self.r(self.data1.adj_close)
        n = self.r_len(self.data1)
        window = self.r_get(self.data.close, ago=-1, size=5)
        if not self.position and n > 10 and close > prev and len(window) == 5:
            self.buy(size=10 if third < high2 else 5)
        elif self.position and low > adj * 2:
            self.close()


class Windows(IdiomAgent):
    """Windows as numpy arrays, extra numeric fields and text fields (``get(size=n)`` on the
    text field ``regime``) of the enriched GOOG file."""

    def next(self) -> None:
        closes = np.array(self.r_get(self.data.close, size=10))
        regimes = self.r_get(self.data.regime, size=3)
        rsi = self.r(self.data.rsi)
        mom = self.r(self.data.signals_momentum_20)
        regime = self.r(self.data.regime)
        if len(closes) < 10 or math.isnan(rsi):
            return
        if not self.position and rsi < 45 and regime == "up" and regimes[0] is not None:
            self.buy(size=5)
        elif self.position and (rsi > 60 or mom < 0) and closes[-1] > closes.mean():
            self.close()


class PrenextUnstarted(IdiomAgent):
    """Two feeds with different first bars: in ``prenext`` the agent reads the feed that has
    not started (backtrader returns that feed's LAST bar) and, on the first bar, ``close[-1]``
    (the last bar of the file). Both are look-ahead."""

    params: ClassVar[Any] = (("read_indicator", True),)

    def __init__(self) -> None:
        self.gsma = self.spec(bt.ind.SMA(self.data1, period=3), "gsma", self.data1)

    def prenext(self) -> None:
        self.r(self.data0.close, -1)
        self.r(self.data1.close)
        self.r_len(self.data1)
        self.r(self.data1.regime)
        if self.p.read_indicator:
            self.r(self.gsma)

    def next(self) -> None:
        if not self.position and self.r(self.data1.close) > self.r(self.gsma):
            self.buy(data=self.data1, size=10)
        elif self.position and self.r(self.data1.close) < self.r(self.gsma):
            self.close(data=self.data1)


# ---------------------------------------------------------------------------------------------
# Orders
# ---------------------------------------------------------------------------------------------


class OrderTarget(IdiomAgent):
    """samples/order_target: ``order_target_size/value/percent`` and ``get_value([data])``;
    the prices those calls read are backtrader's reads, not the agent's."""

    params: ClassVar[Any] = (("kind", "size"),)

    def notify_order(self, order: Any) -> None:
        if not order.alive():
            self.order = None

    def start(self) -> None:
        self.order = None

    def next(self) -> None:
        dt = self.data.datetime.date()
        self.broker.get_value([self.data])
        self.broker.getvalue(datas=[self.data])
        self.r(self.data.close)
        if self.order:
            return
        size = dt.day
        if (dt.month % 2) == 0:
            size = 31 - size
        if self.p.kind == "size":
            self.order = self.order_target_size(target=size)
        elif self.p.kind == "value":
            self.order = self.order_target_value(target=size * 1000)
        else:
            self.order = self.order_target_percent(target=size / 100.0)


class LongOnly(bt.Sizer):  # type: ignore[misc]
    """Sizers: a sizer that never goes short; it reads the price itself (not the agent)."""

    params: ClassVar[Any] = (("stake", 10),)

    def _getsizing(self, comminfo: Any, cash: float, data: Any, isbuy: bool) -> float:
        if isbuy:
            return float(min(self.p.stake, math.floor(cash * 0.5 / data.close[0])))
        position = self.broker.getposition(data)
        if not position.size:
            return 0
        return float(self.p.stake)


class SizerCloseSma(IdiomAgent):
    """Sizers: ``CloseSMA`` buys and sells on the cross; the sizer decides the size."""

    params: ClassVar[Any] = (("period", 15),)

    def __init__(self) -> None:
        sma = bt.indicators.SMA(self.data, period=self.p.period)
        self.crossover = self.spec(bt.indicators.CrossOver(self.data, sma), "crossover")

    def next(self) -> None:
        if self.r_cmp(self.crossover, ">", 0):
            self.buy()
        elif self.r_cmp(self.crossover, "<", 0):
            self.sell()


class OrderExecution(IdiomAgent):
    """Order Management and Execution: one execution type per run (Market, Close, Limit,
    Stop, StopLimit, StopTrail, StopTrailLimit)."""

    params: ClassVar[Any] = dict(exectype="Market", perc1=1.0, perc2=1.0, valid=4, smaperiod=15)

    def __init__(self) -> None:
        sma = bt.ind.SMA(period=self.p.smaperiod)
        self.buysell = self.spec(bt.ind.CrossOver(self.data.close, sma), "buysell")
        self.order = None

    def notify_order(self, order: Any) -> None:
        if not order.alive():
            self.order = None

    def next(self) -> None:
        if self.order:
            return
        if self.position:
            if self.r_cmp(self.buysell, "<", 0):
                self.order = self.sell(size=self.position.size)
            return
        if not self.r_cmp(self.buysell, ">", 0):
            return
        close = self.r(self.data.close)
        valid = datetime.timedelta(self.p.valid)
        kind = self.p.exectype
        if kind == "Market":
            self.order = self.buy(size=10, exectype=bt.Order.Market)
        elif kind == "Close":
            self.order = self.buy(size=10, exectype=bt.Order.Close)
        elif kind == "Limit":
            price = close * (1.0 - self.p.perc1 / 100.0)
            self.order = self.buy(size=10, exectype=bt.Order.Limit, price=price, valid=valid)
        elif kind == "Stop":
            price = close * (1.0 + self.p.perc1 / 100.0)
            self.order = self.buy(size=10, exectype=bt.Order.Stop, price=price, valid=valid)
        elif kind == "StopLimit":
            price = close * (1.0 + self.p.perc1 / 100.0)
            plimit = close * (1.0 + self.p.perc2 / 100.0)
            self.order = self.buy(
                size=10, exectype=bt.Order.StopLimit, price=price, valid=valid, plimit=plimit
            )
        elif kind == "StopTrail":
            self.order = self.sell(size=10, exectype=bt.Order.StopTrail, trailpercent=0.02)
        elif kind == "StopTrailLimit":
            self.order = self.sell(
                size=10,
                exectype=bt.Order.StopTrailLimit,
                price=close,
                plimit=close * 0.99,
                trailamount=5.0,
            )


class Bracket(IdiomAgent):
    """samples/bracket: ``buy_bracket`` or the three orders by hand (``transmit=False``)."""

    params: ClassVar[Any] = dict(
        p1=5, p2=15, limit=0.005, limdays=3, limdays2=1000, usebracket=True
    )

    def __init__(self) -> None:
        ma1, ma2 = bt.ind.SMA(period=self.p.p1), bt.ind.SMA(period=self.p.p2)
        self.cross = self.spec(bt.ind.CrossOver(ma1, ma2), "cross")
        self.orefs: list[int] = []

    def notify_order(self, order: Any) -> None:
        if not order.alive() and order.ref in self.orefs:
            self.orefs.remove(order.ref)

    def next(self) -> None:
        if self.orefs:
            return
        if self.position or not self.r_cmp(self.cross, ">", 0.0):
            return
        close = self.r(self.data.close)
        p1 = close * (1.0 - self.p.limit)
        p2 = p1 - 0.02 * close
        p3 = p1 + 0.02 * close
        valid1 = datetime.timedelta(self.p.limdays)
        valid2 = valid3 = datetime.timedelta(self.p.limdays2)
        if self.p.usebracket:
            orders = self.buy_bracket(
                size=10,
                price=p1,
                valid=valid1,
                stopprice=p2,
                stopargs=dict(valid=valid2),
                limitprice=p3,
                limitargs=dict(valid=valid3),
            )
            self.orefs = [o.ref for o in orders]
            return
        o1 = self.buy(size=10, exectype=bt.Order.Limit, price=p1, valid=valid1, transmit=False)
        o2 = self.sell(
            size=10, exectype=bt.Order.Stop, price=p2, valid=valid2, parent=o1, transmit=False
        )
        o3 = self.sell(
            size=10, exectype=bt.Order.Limit, price=p3, valid=valid3, parent=o1, transmit=True
        )
        self.orefs = [o1.ref, o2.ref, o3.ref]


class Oco(IdiomAgent):
    """samples/oco: three limit orders, the 2nd and 3rd cancelled when the 1st executes."""

    def __init__(self) -> None:
        self.cross = self.spec(
            bt.ind.CrossOver(bt.ind.SMA(period=5), bt.ind.SMA(period=15)), "cross"
        )
        self.orefs: list[int] = []

    def notify_order(self, order: Any) -> None:
        if not order.alive() and order.ref in self.orefs:
            self.orefs.remove(order.ref)

    def next(self) -> None:
        if self.orefs:
            return
        if self.position:
            if self.r_cmp(self.cross, "<", 0):
                self.close()
            return
        if self.r_cmp(self.cross, ">", 0):
            close = self.r(self.data.close)
            valid = datetime.timedelta(5)
            o1 = self.buy(size=10, exectype=bt.Order.Limit, price=close * 0.995, valid=valid)
            o2 = self.buy(size=10, exectype=bt.Order.Limit, price=close * 0.99, valid=valid, oco=o1)
            o3 = self.buy(
                size=10, exectype=bt.Order.Limit, price=close * 0.985, valid=valid, oco=o1
            )
            self.orefs = [o1.ref, o2.ref, o3.ref]


class CancelStale(IdiomAgent):
    """A limit order far below the market, cancelled after 3 bars (``self.cancel``)."""

    def __init__(self) -> None:
        self.order = None
        self.placed = 0

    def notify_order(self, order: Any) -> None:
        if not order.alive():
            self.order = None

    def next(self) -> None:
        if self.order is not None:
            if len(self) - self.placed >= 3:
                self.cancel(self.order)
            return
        if len(self) % 7 == 0:
            low = self.r(self.data.low)
            self.order = self.buy(size=5, exectype=bt.Order.Limit, price=low * 0.97)
            self.placed = len(self)


class TradeNotes(IdiomAgent):
    """Reads in ``notify_order`` and ``notify_trade`` (the price when a fill or trade is
    notified)."""

    def __init__(self) -> None:
        self.sma = self.spec(bt.ind.SMA(period=10), "sma")
        self.fills: list[float] = []

    def notify_order(self, order: Any) -> None:
        if order.status == order.Completed:
            self.fills.append(self.r(self.data.close) - order.executed.price)

    def notify_trade(self, trade: Any) -> None:
        if trade.isclosed:
            self.fills.append(self.r(self.data.open))

    def next(self) -> None:
        if not self.position and self.r(self.data.close) > self.r(self.sma):
            self.buy(size=10)
        elif self.position and self.r(self.data.close) < self.r(self.sma):
            self.close()


class CheatOnOpen(IdiomAgent):
    """samples/cheat-on-open: with ``cheat_on_open=True`` the agent decides in ``next_open``
    (reading the open) and its order fills at that open."""

    params: ClassVar[Any] = dict(periods=[10, 30])

    def __init__(self) -> None:
        self.cheating = self.cerebro.p.cheat_on_open
        mas = [bt.ind.SMA(period=x) for x in self.p.periods]
        self.signal = self.spec(bt.ind.CrossOver(*mas), "signal")
        self.order = None

    def notify_order(self, order: Any) -> None:
        if order.status != order.Completed:
            return
        self.order = None

    def operate(self) -> None:
        if self.order is not None:
            return
        if self.position:
            if self.r_cmp(self.signal, "<", 0):
                self.order = self.close()
        elif self.r_cmp(self.signal, ">", 0):
            self.order = self.buy(size=10)

    def next(self) -> None:
        self.r(self.data.close)
        if self.cheating:
            return
        self.operate()

    def next_open(self) -> None:
        if not self.cheating:
            return
        self.r(self.data.open)
        self.p.reads.lag = 1  # harness: the indicators are one bar behind the feeds here
        self.operate()
        self.p.reads.lag = 0


class MonthlyTimer(IdiomAgent):
    """Timers: rebalance on the first trading day of each month from ``notify_timer``."""

    def __init__(self) -> None:
        self.add_timer(when=bt.timer.SESSION_START, monthdays=[1], monthcarry=True)

    def notify_timer(self, timer: Any, when: Any, *args: Any, **kwargs: Any) -> None:
        close = self.r(self.data.close)
        self.order_target_value(target=20 * close if not self.position else 0.0)

    def next(self) -> None:
        pass


class WithAnalyzers(IdiomAgent):
    """Analyzers beside the agent (Sharpe, drawdown, trades, returns), the agent consulting
    the drawdown analyzer in ``next``."""

    def __init__(self) -> None:
        self.sma = self.spec(bt.ind.SMA(period=20), "sma")

    def next(self) -> None:
        dd = self.analyzers.dd.get_analysis()
        if dd.get("drawdown", 0.0) > 20:
            return
        if not self.position and self.r(self.data.close) > self.r(self.sma):
            self.buy(size=10)
        elif self.position and self.r(self.data.close) < self.r(self.sma):
            self.close()


# ---------------------------------------------------------------------------------------------
# Several feeds
# ---------------------------------------------------------------------------------------------


class MultiDataInds(IdiomAgent):
    """The multi-data blog post: ``self.inds[d]["sma1"]`` for every data feed ``d``."""

    def __init__(self) -> None:
        self.inds: dict[Any, dict[str, Any]] = dict()
        for d in self.datas:
            self.inds[d] = dict()
            self.inds[d]["sma1"] = bt.indicators.SimpleMovingAverage(d.close, period=10)
            self.inds[d]["sma2"] = bt.indicators.SimpleMovingAverage(d.close, period=20)
            self.inds[d]["cross"] = bt.indicators.CrossOver(
                self.inds[d]["sma1"], self.inds[d]["sma2"]
            )
            for key in ("sma1", "sma2", "cross"):
                self.spec(self.inds[d][key], f"inds[{key}]", d)

    def next(self) -> None:
        for d in self.datas:
            pos = self.getposition(d).size
            if not pos:
                if self.r(self.inds[d]["cross"]) == 1:
                    self.buy(data=d, size=10)
            elif self.r(self.inds[d]["cross"]) == -1:
                self.close(data=d)


class MultiDataSignal(IdiomAgent):
    """samples/multidata-strategy: signals from data1, orders on data0."""

    params: ClassVar[Any] = dict(period=15, stake=10)

    def __init__(self) -> None:
        self.orderid = None
        sma = bt.indicators.MovAv.SMA(self.data1, period=self.p.period)
        self.signal = self.spec(
            bt.indicators.CrossOver(self.data1.close, sma), "signal", self.data1
        )

    def notify_order(self, order: Any) -> None:
        if order.status in [bt.Order.Submitted, bt.Order.Accepted]:
            return
        self.orderid = None

    def next(self) -> None:
        if self.orderid:
            return
        self.r_len(self.data0)
        self.r_len(self.data1)
        if not self.position:
            if self.r_cmp(self.signal, ">", 0.0):
                self.r(self.data1.close)
                self.orderid = self.buy(size=self.p.stake)
        elif self.r_cmp(self.signal, "<", 0.0):
            self.orderid = self.sell(size=self.p.stake)


class PairsSpread(IdiomAgent):
    """A spread of two feeds and its z-score: every read comes from both feeds' bars."""

    def __init__(self) -> None:
        d0, d1 = self.data0, self.data1
        self.spread = self.spec(d0.close - 0.5 * d1.close, "spread", d0, d1)
        self.mean = self.spec(bt.ind.SMA(self.spread, period=20), "mean", d0, d1)
        self.std = self.spec(bt.ind.StdDev(self.spread, period=20), "std", d0, d1)
        self.zscore = self.spec((self.spread - self.mean) / self.std, "zscore", d0, d1)

    def next(self) -> None:
        z = self.r(self.zscore)
        if not self.position and z < -1.0:
            self.buy(data=self.data0, size=5)
            self.sell(data=self.data1, size=10)
        elif self.position and z > 0.0:
            self.close(data=self.data0)
            self.close(data=self.data1)


class UnalignedSpread(IdiomAgent):
    """A spread of a feed and one that starts later, read bar by bar: until the later feed
    starts, backtrader computes the spread from its LAST bar (look-ahead)."""

    def __init__(self) -> None:
        d0, d1 = self.data0, self.data1
        self.ratio = self.spec(d1.close / d0.close * 1000.0, "ratio", d1, d0)
        self.spread = self.spec(d0.close - d1.close, "spread", d0, d1)

    def prenext(self) -> None:
        self.r(self.spread)

    def next(self) -> None:
        self.r(self.spread)
        if not self.position and self.r(self.ratio) > 100:
            self.buy(data=self.data1, size=5)


class MonthlyFilter(IdiomAgent):
    """samples/mixing-timeframes: a monthly feed coupled to a daily one with ``data1.close()``
    (needs ``runonce=False``)."""

    def __init__(self) -> None:
        d1 = self.data1
        self.btc = self.spec(d1.close(), "btc", d1, clock="steps")
        self.btc_sma = bt.ind.SMA(d1, period=3)
        self.trend = self.spec(self.btc_sma.sma(), "trend", d1, clock="steps")
        self.up = self.spec(self.btc - self.trend, "up", d1, clock="steps")

    def next(self) -> None:
        if not self.position and self.r(self.up) > 0:
            self.buy(size=5)
        elif self.position and self.r(self.btc) < self.r(self.trend):
            self.close()


class HourlyFX(IdiomAgent):
    """Hourly EUR/USD: an SMA cross on a 24-bar window."""

    def __init__(self) -> None:
        self.sma = self.spec(bt.ind.SMA(period=24), "sma")

    def next(self) -> None:
        day = self.r_get(self.data.close, size=24)
        close = self.r(self.data.close)
        if not self.position and close > self.r(self.sma) and close >= max(day):
            self.buy(size=1000)
        elif self.position and close < self.r(self.sma, -1):
            self.close()


class MonthlyMomentum(IdiomAgent):
    """Monthly BTC/USD: 12-month rate of change."""

    def __init__(self) -> None:
        self.roc = self.spec(bt.ind.ROC(self.data, period=12), "roc")

    def next(self) -> None:
        if not self.position and self.r(self.roc) > 0:
            self.buy(size=0.5)
        elif self.position and self.r(self.roc) < 0:
            self.close()


class LenAndStages(IdiomAgent):
    """``len()`` of feeds and indicators, and reads in ``prenext`` and ``nextstart``."""

    def __init__(self) -> None:
        self.sma = self.spec(bt.ind.SMA(period=10), "sma")

    def prenext(self) -> None:
        self.r_len(self.data)
        self.r_len(self.sma)

    def nextstart(self) -> None:
        self.r(self.sma)
        self.next()

    def next(self) -> None:
        if self.r_len(self.sma) % 5 == 0 and not self.position:
            self.buy(size=1)
        elif self.position and self.r(self.data.close) < self.r(self.sma):
            self.close()
