"""Pre-trade risk guard, the same for the Alpaca broker and backtrader's simulated broker.

Rules (each off when its :class:`RiskConfig` limit is ``None``):

* ``max_order_notional_usd``: ``|size| * price`` of one order.
* ``max_position_value_usd``: ``|position + working orders + this order| * price`` per symbol.
* ``max_open_symbols``: symbols with a position or a working opening order.
* kill switch: ``max_daily_loss_usd`` (the last value of the previous day minus the value now,
  like Alpaca's ``last_equity - equity``; on the first day, the first value) or
  ``max_drawdown_pct`` (from the highest value seen). Once tripped it stays tripped for the run
  (a human decides when to trade again). ``kill_action="stop"`` refuses every order that would
  add exposure; ``"flatten"`` also cancels working orders and closes every position once.

Orders that only reduce exposure always pass: a guard must never stop an agent from getting
out. Prices are the order's price, or the feed's last close for market orders (what backtrader
stores in ``order.created.price``), in USD.

A refused order becomes a backtrader ``Rejected`` order with ``order.info["reason"]`` set to
``"risk: <rule>: <numbers>"``; the agent sees it in ``notify_order`` and FMEL records the reason.

Thread context: main (backtrader) thread only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any, Literal

import backtrader as bt

from core.bars import feed_symbol
from core.errors import ConfigError
from core.settings import setting

logger = logging.getLogger(__name__)

_EPS = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskConfig:
    """Pre-trade risk limits; ``None`` = no limit. Works with every broker.

    Attributes:
        max_position_value_usd: largest ``|position| * price`` per symbol after an order, USD.
        max_open_symbols: most symbols with a position or a working opening order.
        max_order_notional_usd: largest ``|size| * price`` of one order, USD.
        max_daily_loss_usd: loss since the previous day's last value that trips the kill
            switch, USD.
        max_drawdown_pct: drop from the highest value seen that trips the kill switch, percent.
        kill_action: ``stop`` (refuse orders that add exposure) or ``flatten`` (also cancel
            working orders and close every position, once).

    Raises:
        ConfigError: at construction, for an unknown ``kill_action``.
    """

    max_position_value_usd: float | None = setting(
        None,
        env="RISK_MAX_POSITION_VALUE_USD",
        help="largest position value per symbol, USD",
        gt=0,
    )
    max_open_symbols: int | None = setting(
        None, env="RISK_MAX_OPEN_SYMBOLS", help="most symbols with an open position", minimum=1
    )
    max_order_notional_usd: float | None = setting(
        None,
        env="RISK_MAX_ORDER_NOTIONAL_USD",
        help="largest single order notional, USD",
        gt=0,
    )
    max_daily_loss_usd: float | None = setting(
        None,
        env="RISK_MAX_DAILY_LOSS_USD",
        help="daily loss that trips the kill switch, USD",
        gt=0,
    )
    max_drawdown_pct: float | None = setting(
        None,
        env="RISK_MAX_DRAWDOWN_PCT",
        help="drawdown from peak that trips the kill switch, %",
        gt=0,
    )
    kill_action: Literal["stop", "flatten"] = setting(
        "stop",
        env="RISK_KILL_ACTION",
        help="on kill switch: stop (reject new orders) or flatten",
    )

    def __post_init__(self) -> None:
        if self.kill_action not in ("stop", "flatten"):
            raise ConfigError(f"RISK_KILL_ACTION={self.kill_action!r}: expected stop or flatten")

    @property
    def enabled(self) -> bool:
        """True when any limit is set (else the guard is not installed at all)."""
        return any(
            v is not None
            for v in (
                self.max_position_value_usd,
                self.max_open_symbols,
                self.max_order_notional_usd,
                self.max_daily_loss_usd,
                self.max_drawdown_pct,
            )
        )


@dataclass(slots=True)
class KillState:
    """Kill-switch bookkeeping (USD)."""

    peak_value_usd: float | None = None
    day: date | None = None
    day_start_value_usd: float | None = None  # the previous day's last value
    last_value_usd: float | None = None
    tripped: str | None = None


class RiskGuard:
    """Checks orders against a :class:`RiskConfig` and runs the kill switch.

    Args:
        config: the limits.

    Attributes:
        state: kill-switch state; ``state.tripped`` holds the reason once tripped.
        refused: how many orders were refused, per rule.
    """

    def __init__(self, config: RiskConfig) -> None:
        self.config = config
        self.state = KillState()
        self.refused: dict[str, int] = {}
        self._flattened = False

    @property
    def tripped(self) -> str | None:
        return self.state.tripped

    # -- pre-trade ----------------------------------------------------------------------------

    def check(self, order: Any, broker: Any) -> str | None:
        """Return ``"risk: <rule>: ..."`` when ``order`` must be refused, else ``None``.

        Args:
            order: a backtrader order not yet sent (the parent of a bracket; exits are not
                checked).
            broker: the broker it goes to (``getposition``, ``get_orders_open``,
                ``positions``).
        """
        cfg = self.config
        data = order.data
        size = float(order.created.size)  # signed: negative sells
        price = float(order.created.price or 0.0) or _last_close(data)
        position = float(broker.getposition(data).size)
        before = position + _working(broker, data, exclude=order, position=position)
        after = before + size
        if abs(after) <= abs(before) + _EPS and (before == 0 or after * before >= 0):
            return None  # reduces (or keeps) exposure: always allowed
        rule = reason = None
        if self.state.tripped is not None:
            rule = "kill_switch"
            reason = f"{self.state.tripped}; only orders that reduce a position are accepted"
        elif (
            cfg.max_order_notional_usd is not None
            and abs(size) * price > cfg.max_order_notional_usd + _EPS
        ):
            rule = "max_order_notional_usd"
            reason = (
                f"order notional {abs(size) * price:.2f} USD > limit "
                f"{cfg.max_order_notional_usd:.2f} USD"
            )
        elif (
            cfg.max_position_value_usd is not None
            and abs(after) * price > cfg.max_position_value_usd + _EPS
        ):
            rule = "max_position_value_usd"
            reason = (
                f"position value after the order {abs(after) * price:.2f} USD > limit "
                f"{cfg.max_position_value_usd:.2f} USD"
            )
        elif cfg.max_open_symbols is not None and abs(before) <= _EPS:
            open_symbols = _open_symbols(broker, exclude=order)
            if feed_symbol(data) not in open_symbols and len(open_symbols) >= cfg.max_open_symbols:
                rule = "max_open_symbols"
                reason = (
                    f"{len(open_symbols)} symbols already open "
                    f"({', '.join(sorted(open_symbols))}) >= limit {cfg.max_open_symbols}"
                )
        if rule is None:
            return None
        self.refused[rule] = self.refused.get(rule, 0) + 1
        text = f"risk: {rule}: {reason}"
        logger.warning(
            "order %d %s %s refused: %s",
            order.ref,
            "BUY" if order.isbuy() else "SELL",
            feed_symbol(data),
            text,
        )
        return text

    # -- kill switch --------------------------------------------------------------------------

    def observe(self, value_usd: float, day: date) -> str | None:
        """Feed the portfolio value; returns the reason when the kill switch trips now.

        Args:
            value_usd: portfolio value, USD.
            day: the trading day of this observation (bar date).
        """
        st, cfg = self.state, self.config
        if value_usd != value_usd:  # NaN: nothing to learn
            return None
        if st.day != day:
            st.day = day
            st.day_start_value_usd = value_usd if st.last_value_usd is None else st.last_value_usd
        st.last_value_usd = value_usd
        st.peak_value_usd = (
            value_usd if st.peak_value_usd is None else max(st.peak_value_usd, value_usd)
        )
        if st.tripped is not None:
            return None
        reason = None
        assert st.day_start_value_usd is not None
        loss = st.day_start_value_usd - value_usd
        if cfg.max_daily_loss_usd is not None and loss >= cfg.max_daily_loss_usd:
            reason = (
                f"daily loss {loss:.2f} USD >= limit {cfg.max_daily_loss_usd:.2f} USD "
                f"on {day.isoformat()}"
            )
        elif cfg.max_drawdown_pct is not None and st.peak_value_usd > 0:
            dd = (st.peak_value_usd - value_usd) / st.peak_value_usd * 100.0
            if dd >= cfg.max_drawdown_pct:
                reason = (
                    f"drawdown {dd:.2f}% from peak {st.peak_value_usd:.2f} USD >= limit "
                    f"{cfg.max_drawdown_pct:.2f}%"
                )
        if reason is not None:
            st.tripped = f"kill switch tripped: {reason}"
            logger.error("RISK %s (action: %s)", st.tripped, cfg.kill_action)
        return reason

    def after_bar(self, broker: Any) -> None:
        """Run the kill switch for ``broker`` (call from the broker's ``next()``): observe the
        value and, when it trips with ``kill_action="flatten"``, flatten once."""
        if (
            self.observe(float(broker.getvalue()), current_day(broker)) is not None
            and self.config.kill_action == "flatten"
            and not self._flattened
        ):
            self._flattened = True
            flatten(broker, self.state.tripped or "kill switch")


def flatten(broker: Any, why: str) -> int:
    """Cancel every working order and send market orders closing every position.

    Returns:
        Closing orders sent. Their ``info["reason"]`` is ``"risk: flatten: <why>"``.
    """
    for order in list(broker.get_orders_open()):
        broker.cancel(order)
    sent = 0
    for data, pos in list(broker.positions.items()):
        size = float(pos.size)
        if abs(size) <= _EPS or not len(data):
            continue
        side = broker.sell if size > 0 else broker.buy
        side(None, data, size=abs(size), exectype=bt.Order.Market, reason=f"risk: flatten: {why}")
        sent += 1
    logger.error("RISK flatten: %d closing order(s) sent (%s)", sent, why)
    return sent


def current_day(broker: Any) -> date:
    """The trading day: the latest bar date among the broker's feeds (UTC), else today."""
    cerebro = getattr(broker, "cerebro", None)
    latest = None
    for data in getattr(cerebro, "datas", ()) or ():
        if len(data):
            num = data.datetime[0]
            latest = num if latest is None else max(latest, num)
    if latest is None:
        return datetime.now(UTC).date()
    day: date = bt.num2date(latest).date()
    return day


def _last_close(data: Any) -> float:
    try:
        return float(data.close[0]) if len(data) else 0.0
    except IndexError:
        return 0.0


def _open_orders(broker: Any) -> list[Any]:
    orders = list(broker.get_orders_open())
    # backtrader's BackBroker keeps just-submitted orders apart until its next(): count them.
    seen = {o.ref for o in orders}
    orders += [o for o in getattr(broker, "submitted", ()) if o.ref not in seen and o.alive()]
    return orders


def _working(broker: Any, data: Any, exclude: Any, position: float = 0.0) -> float:
    """Signed size still to fill of working opening orders on ``data``: orders that add to
    ``position`` (all of them when flat). Exits are left out: bracket legs, and working orders
    against the position (a protective stop-loss, ``oco=`` exits), so a ``close()`` beside a
    stop still counts as reducing."""
    total = 0.0
    # an order whose cancel is under way (the Alpaca broker cancels asynchronously) adds
    # nothing: counting it would make the close that follows a cancel look like a new position
    canceling = getattr(broker, "cancel_requested", None)
    for o in _open_orders(broker):
        if canceling is not None and canceling(o):
            continue
        if o.data is data and o.ref != exclude.ref and o.parent is None:
            rest = float(o.created.size) - float(o.executed.size)
            if abs(position) > _EPS and rest * position < 0:
                continue  # an exit of the position, not exposure to come
            total += rest
    return total


def _open_symbols(broker: Any, exclude: Any) -> set[str]:
    out = {feed_symbol(d) for d, p in list(broker.positions.items()) if abs(float(p.size)) > _EPS}
    for o in _open_orders(broker):
        if o.ref != exclude.ref and o.parent is None:
            out.add(feed_symbol(o.data))
    return out


class GuardedBackBroker(bt.brokers.BackBroker):  # type: ignore[misc]
    """backtrader's simulated broker with the :class:`RiskGuard` in front of it.

    Params:
        risk (RiskConfig): the limits; ``None`` or no limit set = plain ``BackBroker``.

    A refused order is ``Rejected`` at submission with ``info["reason"]``; the children of a
    refused bracket parent are rejected with the same reason.
    """

    params = (("risk", None),)

    def __init__(self, risk: RiskConfig | None = None) -> None:
        # ``risk`` is consumed by backtrader's params metaclass (read as ``self.p.risk``); it is
        # named here so type checkers accept ``GuardedBackBroker(risk=...)``.
        super().__init__()
        cfg: RiskConfig | None = self.p.risk
        self.guard: RiskGuard | None = RiskGuard(cfg) if cfg is not None and cfg.enabled else None

    def submit(self, order: Any, check: bool = True) -> Any:
        if self.guard is not None:
            parent = order.parent
            if parent is None:
                reason = self.guard.check(order, self)
                if reason is not None:
                    order.addinfo(reason=reason)
                    order.reject(self)
                    self.notify(order)
                    return order
            elif parent.status == bt.Order.Rejected and parent.info.get("reason"):
                order.addinfo(reason=f"{parent.info['reason']} (parent order {parent.ref})")
        return super().submit(order, check)

    def next(self) -> None:
        super().next()
        if self.guard is not None:
            self.guard.after_bar(self)
