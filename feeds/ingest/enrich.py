"""Dynamic fields computed per bar: the window risk metrics from the bar's trades, and user
indicators.

Window risk metrics (``INGEST_ENRICH=risk``), over the trades ``(p_i, s_i)``, ``i = 0..n-1``, of
one bar in time order, with tick log returns ``r_i = ln(p_i / p_{i-1})``, ``i = 1..n-1``:

=================  =========================================================================
``trades_used``    ``n``: trades the metrics were computed from
``trade_vwap``     ``sum(p_i s_i) / sum(s_i)``: volume-weighted average price (null when no
                   size)
``realized_var``   ``RV = sum r_i^2`` (Andersen & Bollerslev 1998, "Answering the skeptics",
                   Int. Econ. Rev. 39(4); Barndorff-Nielsen & Shephard 2002, JRSS B 64(2));
                   needs ``n >= 2``
``bipower_var``    ``BV = (pi/2) sum_{i=2}^{n-1} |r_i| |r_{i-1}|`` (Barndorff-Nielsen &
                   Shephard 2004, "Power and bipower variation with stochastic volatility
                   and jumps", J. Financial Econometrics 2(1):1-37, eq. (3) with
                   ``mu_1^-2 = pi/2``); robust to jumps; needs ``n >= 3``
``jump_ratio``     ``(RV - BV) / RV``: the relative jump measure of Huang & Tauchen 2005
                   ("The relative contribution of jumps to total price variance", J.
                   Financial Econometrics 3(4):456-499); can be negative in finite
                   samples; null when ``RV = 0`` or BV is undefined
=================  =========================================================================

Undefined values are ``None`` (JSON null): the field is still present, so a runner discovers it
from the first message, and the data hash leaves it out as it does an empty CSV cell.

User indicators: ``INGEST_INDICATORS=module:factory``. ``factory(symbol)`` is called once per
symbol and returns an :class:`Indicator`: an object with ``fields`` (names it produces),
``needs_trades`` and ``__call__(bar, trades) -> {field: float | str | None}``. Bars reach it in
time order per symbol, backfilled ones included, so it may keep state (a rolling window).

Pure: no I/O; called on the ingestor's worker thread only.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from core.bars import OHLCV, field_name
from core.errors import ConfigError, DataError
from feeds.fields import reserved_reason
from feeds.pubsub.config import FEED_ATTRIBUTES

__all__ = [
    "ALPACA_FIELDS",
    "RISK_FIELDS",
    "BarView",
    "Enricher",
    "Indicator",
    "IndicatorFactory",
    "Trades",
    "load_factory",
    "risk_metrics",
]

# Fields every ingested bar carries from Alpaca's bar itself (``n`` and ``vw``).
ALPACA_FIELDS = ("trade_count", "vwap")
RISK_FIELDS = ("trades_used", "trade_vwap", "realized_var", "bipower_var", "jump_ratio")
# mu_1^-2 with mu_1 = E|Z| = sqrt(2/pi) for standard normal Z (Barndorff-Nielsen & Shephard 2004)
BV_SCALE = math.pi / 2.0


@dataclass(frozen=True, slots=True)
class Trades:
    """The trades of one bar, in time order.

    Attributes:
        price: float64 array, shape ``(n,)``, trade prices.
        size: float64 array, shape ``(n,)``, trade sizes (shares or coins).
    """

    price: np.ndarray
    size: np.ndarray

    @classmethod
    def of(cls, rows: Sequence[tuple[float, float]]) -> Trades:
        """From ``[(price, size), ...]`` in time order."""
        arr = np.asarray(rows, dtype=np.float64).reshape(-1, 2)
        return cls(arr[:, 0].copy(), arr[:, 1].copy())

    def __len__(self) -> int:
        return int(self.price.shape[0])


@dataclass(frozen=True, slots=True)
class BarView:
    """What an indicator sees of one bar (OHLCV as Alpaca sent it, time aware UTC)."""

    symbol: str
    ts: datetime
    open: float
    high: float
    low: float
    close: float
    volume: float
    trade_count: float | None
    vwap: float | None


def risk_metrics(trades: Trades | None) -> dict[str, float | None]:
    """The window risk metrics of one bar (formulas in the module docstring).

    Trades with a non-finite or non-positive price, or a non-finite or negative size, are left
    out (a log return needs positive prices).

    Args:
        trades: the bar's trades, or ``None`` when they are unknown (every field ``None``).

    Returns:
        ``{name: value}`` for each of :data:`RISK_FIELDS`, ``None`` where undefined.
    """
    out: dict[str, float | None] = dict.fromkeys(RISK_FIELDS)
    if trades is None:
        return out
    p, s = trades.price, trades.size
    ok = np.isfinite(p) & (p > 0) & np.isfinite(s) & (s >= 0)
    if not ok.all():
        p, s = p[ok], s[ok]
    n = int(p.shape[0])
    out["trades_used"] = float(n)
    volume = float(s.sum()) if n else 0.0
    if volume > 0:
        # Scaled by a power of two (exact: the same bits for ordinary sizes) so that tiny sizes
        # (subnormal, e.g. 5e-324) do not underflow p_i s_i and push the VWAP out of [min p, max p].
        w = np.ldexp(s, -int(np.frexp(s.max())[1]))
        out["trade_vwap"] = float(np.dot(p, w) / w.sum())
    if n >= 2:
        r = np.diff(np.log(p))
        rv = float(np.dot(r, r))
        out["realized_var"] = rv
        if n >= 3:
            a = np.abs(r)
            bv = BV_SCALE * float(np.dot(a[1:], a[:-1]))
            out["bipower_var"] = bv
            if rv > 0:
                out["jump_ratio"] = (rv - bv) / rv
    return out


class Indicator(Protocol):
    """A user indicator of one symbol (see the module docstring)."""

    fields: tuple[str, ...]
    needs_trades: bool

    def __call__(self, bar: BarView, trades: Trades | None) -> Mapping[str, Any]: ...


IndicatorFactory = Callable[[str], Indicator]


def load_factory(spec: str) -> IndicatorFactory:
    """Import ``module:factory``.

    Raises:
        ConfigError: naming ``INGEST_INDICATORS`` when it cannot be imported or is not callable.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"INGEST_INDICATORS: cannot import {module_name!r} ({e})") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"INGEST_INDICATORS: {spec!r} is not a callable in {module_name}")
    return factory  # type: ignore[no-any-return]


def _check_names(where: str, names: Sequence[str], taken: set[str]) -> None:
    for name in names:
        if field_name(name) != name:
            raise ConfigError(
                f"{where}: field {name!r} is not a line name (use {field_name(name)!r})"
            )
        if name in OHLCV:
            raise ConfigError(f"{where}: field {name!r} is reserved (an OHLCV line)")
        # The runner's rule for message fields (it refuses such a bar as reserved_field, so a
        # field named like an attribute of its live feed would cost every bar).
        why = reserved_reason(name) or (
            "an attribute of the runner's live feed" if name in FEED_ATTRIBUTES else None
        )
        if why is not None:
            raise ConfigError(f"{where}: field {name!r} is reserved ({why})")
        if name in taken:
            raise ConfigError(f"{where}: field {name!r} is produced twice")
        taken.add(name)


class Enricher:
    """The dynamic fields of every bar: Alpaca's own extras, the built-in enrichments, the user
    indicators, in that order.

    Args:
        risk: compute :func:`risk_metrics`.
        factories: ``(name, factory)`` of user indicators; each factory is called once per
            symbol.

    Raises:
        ConfigError: a field name that is not a line name, reserved or produced twice.

    Thread context: the ingestor's worker thread only (indicators may keep state).
    """

    def __init__(
        self, *, risk: bool = True, factories: Sequence[tuple[str, IndicatorFactory]] = ()
    ) -> None:
        self.risk = risk
        self._factories = list(factories)
        self._instances: dict[str, list[tuple[str, Indicator]]] = {}
        fields = list(ALPACA_FIELDS) + (list(RISK_FIELDS) if risk else [])
        _check_names("enrichment", fields, set())
        self._base_fields = tuple(fields)
        self._fields: tuple[str, ...] | None = None
        self._needs_trades: bool | None = None

    def _for(self, symbol: str) -> list[tuple[str, Indicator]]:
        inst = self._instances.get(symbol)
        if inst is None:
            inst = []
            for name, factory in self._factories:
                try:
                    inst.append((name, factory(symbol)))
                except Exception as e:
                    raise ConfigError(
                        f"INGEST_INDICATORS {name}: cannot be built for {symbol}: "
                        f"{type(e).__name__}: {e}"
                    ) from e
            self._instances[symbol] = inst
            if self._fields is None:
                taken = set(self._base_fields)
                extra: list[str] = []
                for name, ind in inst:
                    names = tuple(ind.fields)
                    _check_names(f"INGEST_INDICATORS {name}", names, taken)
                    extra += names
                self._fields = self._base_fields + tuple(extra)
                self._needs_trades = self.risk or any(ind.needs_trades for _, ind in inst)
        return inst

    def fields(self, symbol: str) -> tuple[str, ...]:
        """Every dynamic field name, in message order."""
        self._for(symbol)
        assert self._fields is not None
        return self._fields

    def needs_trades(self, symbol: str) -> bool:
        """True when some field is computed from the bar's trades."""
        self._for(symbol)
        return bool(self._needs_trades)

    def enrich(self, bar: BarView, trades: Trades | None) -> dict[str, Any]:
        """The dynamic fields of ``bar`` (``trades`` ``None`` = unknown).

        Raises:
            ValueError: an indicator returned a field it does not declare, or a value that is
                not a finite number, text or ``None``.
            DataError: an indicator raised (any ``Exception``) or returned no mapping.
        """
        out: dict[str, Any] = {"trade_count": bar.trade_count, "vwap": bar.vwap}
        if self.risk:
            out.update(risk_metrics(trades))
        for name, ind in self._for(bar.symbol):
            try:
                values = dict(ind(bar, trades if ind.needs_trades else None))
            except Exception as e:
                # A user indicator failing on one bar refuses that bar (the caller counts and
                # logs it); it must not stop the ingestor -- a restart's catch-up would meet the
                # same bar again and crash in a loop.
                raise DataError(
                    f"indicator {name} failed on {bar.symbol} {bar.ts.isoformat()}: "
                    f"{type(e).__name__}: {e}"
                ) from e
            declared = set(ind.fields)
            for key in ind.fields:
                out[key] = None
            for key, value in values.items():
                if key not in declared:
                    raise ValueError(f"indicator {name}: undeclared field {key!r}")
                out[key] = _value(name, key, value)
        return out


def _value(name: str, key: str, value: Any) -> float | str | None:
    if value is None:
        return value
    if isinstance(value, str):
        # As the CSV reader reads a text cell: surrounding whitespace dropped, an empty cell is
        # null -- so the same value hashes alike from an indicator and from a CSV file.
        text = value.strip()
        return text or None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float, np.floating, np.integer)):
        f = float(value)
        if math.isnan(f):
            return None
        if math.isinf(f):
            raise ValueError(f"indicator {name}: {key} is infinite")
        return f
    raise ValueError(f"indicator {name}: {key}={value!r} is not a number, text or None")
