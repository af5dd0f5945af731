"""Chronos forecasting agent: foundation-model forecasts as decisions, batched and explainable.

Every ``every`` bars the agent takes the last ``context_length`` values of one line (``close``
by default) of each of its symbols and forecasts the next ``horizon`` bars of all of them with
ONE batched call to a Chronos / Chronos-Bolt / Chronos-2 model
(:meth:`runtime.models.chronos.ChronosModel.forecast`, i.e. chronos-forecasting's
``predict_quantiles``). It then trades each symbol on the forecast at the last horizon step
(:func:`decide`), long only:

- flat and the LOW quantile's return clears ``entry_return``: buy. Size: the symbol's share of
  ``allocation`` x portfolio value, scaled down by ``target_spread / spread`` when the forecast
  spread (high quantile minus low quantile, as a fraction of the last value) is wider than
  ``target_spread``: the less sure the model, the smaller the position;
- long and the MEDIAN's return falls below ``exit_return``: close the position;
- otherwise hold.

A symbol with an order still in flight, or with fewer than ``min_context`` bars, sits the
forecast out.

Every forecast is attached to the decision record (:func:`analyzers.fmel.attach_note`, key
``forecast``): model id and revision, family, device, dtype, horizon, quantile levels, the call's
latency, and per symbol the context length actually used, the last value, the quantiles at the
horizon and their returns, and the action. The context window is read with one
``line.get(size=n)`` per symbol, so FMEL records one compact access (``size=n``) per symbol rather
than ``n`` single reads (plus one ``len`` read: how much history exists).

The model is loaded once per process and shared: the runner sees ``requires_model = True``,
loads ``CHRONOS_MODEL`` with :func:`runtime.models.chronos.get_model` and passes it as the
``model`` param; used on its own the agent asks :func:`~runtime.models.chronos.get_model` itself,
which returns the cached instance. Runs unchanged on CSV backtests and live Pub/Sub bars
(next-by-next).

Params (units in brackets):
    model (ChronosModel | ChronosConfig | str | None): the forecaster. ``None``: the default
        :class:`~runtime.config.ChronosConfig` (``amazon/chronos-bolt-tiny`` on cpu); a str: a
        hub id or local folder. Injected by the runner.
    line (str): the line forecast, e.g. ``close`` or an extra numeric CSV/Pub/Sub field.
    context_length (int): most history given to the model [bars]; also capped by the model's
        own maximum (Bolt 2048, Chronos-2 8192, Chronos 512).
    min_context (int): fewest bars of history before a symbol is forecast [bars].
    horizon (int): steps forecast; the rule reads the last one [bars].
    every (int): forecast and decide every this many bars [bars].
    quantiles (tuple[float, ...]): levels asked for, ascending, in (0, 1), containing 0.5; the
        first is the "low", the last the "high" quantile.
    entry_return (float): buy when the low quantile's return exceeds this [fraction; 0.01 = 1%].
    exit_return (float): exit when the median's return is below this [fraction].
    target_spread (float): forecast spread at or under which a full slot is bought [fraction].
    allocation (float): fraction of portfolio value committed across all symbols [0..1].
    note_path (bool): also record the quantiles of every horizon step, not just the last.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, NamedTuple

import backtrader as bt

from analyzers.fmel import attach_note
from core.errors import ConfigError
from runtime.models.chronos import ChronosModel, get_model
from runtime.models.config import ChronosConfig

logger = logging.getLogger(__name__)


class Signal(NamedTuple):
    """What :func:`decide` chose for one symbol.

    Attributes:
        action: ``BUY``, ``EXIT`` or ``HOLD``.
        size: shares to buy (``BUY``), else 0.
        low_return, median_return, high_return: forecast returns at the horizon versus the last
            value [fraction].
        reason: one line for the decision record.
    """

    action: Literal["BUY", "EXIT", "HOLD"]
    size: int
    low_return: float
    median_return: float
    high_return: float
    reason: str


def decide(
    *,
    position: float,
    last: float,
    low: float,
    median: float,
    high: float,
    entry_return: float,
    exit_return: float,
    target_spread: float,
    budget_usd: float,
) -> Signal:
    """The trading rule, pure: a forecast and a position in, an action out.

    Args:
        position: current position [shares]; > 0 long, 0 flat.
        last: last observed value of the forecast line [price, USD].
        low, median, high: forecast quantiles at the horizon [price, USD].
        entry_return: buy when ``low / last - 1`` exceeds this [fraction].
        exit_return: exit a long when ``median / last - 1`` is below this [fraction].
        target_spread: spread ``|high - low| / last`` up to which the whole budget is used; a
            wider one scales the budget by ``target_spread / spread`` [fraction].
        budget_usd: most to spend on this symbol [USD].

    Returns:
        The :class:`Signal`; ``HOLD`` for a non-finite forecast or a non-positive last value.
    """
    if not (math.isfinite(last) and last > 0):
        return Signal("HOLD", 0, math.nan, math.nan, math.nan, f"last value {last} not usable")
    r_low, r_med, r_high = low / last - 1.0, median / last - 1.0, high / last - 1.0
    if not all(math.isfinite(r) for r in (r_low, r_med, r_high)):
        return Signal("HOLD", 0, r_low, r_med, r_high, "non-finite forecast")
    if position > 0:
        if r_med < exit_return:
            return Signal(
                "EXIT",
                0,
                r_low,
                r_med,
                r_high,
                f"median return {r_med:+.2%} < exit {exit_return:+.2%}",
            )
        return Signal("HOLD", 0, r_low, r_med, r_high, f"long, median return {r_med:+.2%}")
    if position < 0 or r_low <= entry_return:
        return Signal(
            "HOLD", 0, r_low, r_med, r_high, f"low return {r_low:+.2%} <= entry {entry_return:+.2%}"
        )
    spread = abs(r_high - r_low)
    scale = 1.0 if spread <= target_spread else target_spread / spread
    size = math.floor(budget_usd * scale / last) if budget_usd > 0 else 0
    if size <= 0:
        return Signal("HOLD", 0, r_low, r_med, r_high, "budget buys no share")
    return Signal(
        "BUY",
        size,
        r_low,
        r_med,
        r_high,
        f"low return {r_low:+.2%} > entry {entry_return:+.2%}, spread {spread:.2%}, "
        f"{scale:.0%} of slot",
    )


class ChronosAgent(bt.Strategy):  # type: ignore[misc]
    """See the module docstring for the rule, the params and what is recorded."""

    # The runner loads CHRONOS_MODEL once (runtime.models.chronos.get_model) and passes it as
    # `model`.
    requires_model = True

    params = (
        ("model", None),
        ("line", "close"),
        ("context_length", 512),
        ("min_context", 32),
        ("horizon", 16),
        ("every", 1),
        ("quantiles", (0.1, 0.5, 0.9)),
        ("entry_return", 0.0),
        ("exit_return", 0.0),
        ("target_spread", 0.10),
        ("allocation", 0.9),
        ("note_path", False),
    )

    def __init__(self) -> None:
        p = self.p
        self.levels = tuple(float(q) for q in p.quantiles)
        if (
            len(self.levels) < 2
            or 0.5 not in self.levels
            or list(self.levels) != sorted(set(self.levels))
            or not all(0 < q < 1 for q in self.levels)
        ):
            raise ConfigError(
                f"AGENT_PARAMS quantiles: expected ascending levels in (0, 1) "
                f"including 0.5, got {list(p.quantiles)}"
            )
        for name in ("context_length", "min_context", "horizon", "every"):
            value = getattr(p, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"AGENT_PARAMS {name}: expected a whole number of bars >= 1, got {value!r}"
                )
        if p.min_context > p.context_length:
            raise ConfigError(
                f"AGENT_PARAMS: min_context {p.min_context} > context_length {p.context_length}"
            )
        if not 0 < p.allocation <= 1:
            raise ConfigError(
                f"AGENT_PARAMS allocation: expected a fraction in (0, 1], got {p.allocation}"
            )
        if p.target_spread <= 0:
            raise ConfigError(f"AGENT_PARAMS target_spread: expected > 0, got {p.target_spread}")
        for data in self.datas:
            aliases = data.lines.getlinealiases()
            if p.line not in aliases or p.line == "datetime":
                raise ConfigError(
                    f"AGENT_PARAMS line={p.line!r}: {data._name} has no such "
                    f"numeric line; expected one of "
                    f"{', '.join(a for a in aliases if a != 'datetime')}"
                )
        self.model: ChronosModel = _resolve_model(p.model)
        self.context_cap = min(int(p.context_length), self.model.max_context_length)
        if self.context_cap < p.context_length:
            logger.info(
                "context_length %d > %s's maximum: using %d bars",
                p.context_length,
                self.model.model_id,
                self.context_cap,
            )
        trained = self.model.prediction_length
        if trained is not None and p.horizon > trained:
            logger.warning(
                "horizon %d > the %d bars %s was trained for: forecasts are rolled out and degrade",
                p.horizon,
                trained,
                self.model.model_id,
            )
        self.pending: dict[str, Any] = {}
        self.bars = 0
        self.forecasts = 0

    def notify_order(self, order: Any) -> None:
        if order.status in (
            order.Completed,
            order.Canceled,
            order.Margin,
            order.Rejected,
            order.Expired,
        ):
            self.pending.pop(order.data._name, None)

    def next(self) -> None:
        self.bars += 1
        if (self.bars - 1) % self.p.every:
            return
        symbols: list[str] = []
        datas: list[Any] = []
        windows: list[Any] = []
        for data in self.datas:
            name = data._name
            if name in self.pending:
                continue
            line = getattr(data.lines, self.p.line)
            # buflen() bounds what a live feed with a bounded lookback still holds in memory.
            n = min(self.context_cap, len(line), line.buflen())
            if n < self.p.min_context:
                continue
            symbols.append(name)
            datas.append(data)
            windows.append(line.get(size=n))  # one tracked access of size n
        if not windows:
            return
        fc = self.model.forecast(windows, self.p.horizon, self.levels)
        self.forecasts += 1
        budget = self.broker.getvalue() * self.p.allocation / len(self.datas)
        mid = self.levels.index(0.5)
        per_symbol: dict[str, Any] = {}
        reasons: list[str] = []
        for i, (name, data, window) in enumerate(zip(symbols, datas, windows, strict=True)):
            q = fc.quantiles[i, -1, :]
            last = float(window[-1])
            sig = decide(
                position=self.getposition(data).size,
                last=last,
                low=float(q[0]),
                median=float(q[mid]),
                high=float(q[-1]),
                entry_return=self.p.entry_return,
                exit_return=self.p.exit_return,
                target_spread=self.p.target_spread,
                budget_usd=budget,
            )
            if sig.action == "BUY":
                self.pending[name] = self.buy(data=data, size=sig.size)
            elif sig.action == "EXIT":
                self.pending[name] = self.close(data=data)
            if sig.action != "HOLD":
                reasons.append(f"{name} {sig.action}: {sig.reason}")
            entry: dict[str, Any] = {
                "context_length": fc.context_lengths[i],
                "last": _finite(last),
                "quantiles": [_finite(x) for x in q.tolist()],
                "returns": [
                    _finite(sig.low_return),
                    _finite(sig.median_return),
                    _finite(sig.high_return),
                ],
                "action": sig.action,
                "size": sig.size,
            }
            if self.p.note_path:
                entry["path"] = [[_finite(x) for x in step] for step in fc.quantiles[i].tolist()]
            per_symbol[name] = entry
        attach_note(
            self,
            reasoning="; ".join(reasons) or f"hold: no entry or exit on {len(symbols)} forecasts",
            forecast={
                **self.model.describe(),
                "line": self.p.line,
                "horizon_bars": self.p.horizon,
                "levels": list(fc.levels),
                "latency_ms": fc.latency_s * 1e3,
                "batch_size": len(symbols),
                "symbols": per_symbol,
            },
        )


def _finite(x: float) -> float | None:
    """JSON-safe number: NaN/inf (a broken forecast) become ``null`` in the record's notes."""
    return x if math.isfinite(x) else None


def _resolve_model(model: Any) -> ChronosModel:
    """The ``model`` param as a loaded, shared model (see the module docstring)."""
    if isinstance(model, ChronosModel):
        return model
    if model is None:
        return get_model(ChronosConfig())
    if isinstance(model, ChronosConfig):
        return get_model(model)
    if isinstance(model, str):
        return get_model(ChronosConfig(model=model))
    raise ConfigError(
        f"AGENT_PARAMS model: expected a ChronosModel, ChronosConfig, hub id or "
        f"path, got {type(model).__name__}"
    )
