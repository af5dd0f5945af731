"""Building blocks of one backtrader run, shared by the Runner and the research workers.

The Runner (``runtime.runner``) composes a whole run from these; an optimisation trial
(``runtime.research.trial``) composes a lighter one from the same pieces, so a trial and a
backtest with the same params build the engine, the broker and FMEL the same way and give the
same orders and the same final value.

No thread of its own; every function runs on the calling (main) thread.
"""

from __future__ import annotations

import importlib
import json
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import backtrader as bt

from analyzers.fmel import FMELAnalyzer, make_run_info
from analyzers.sinks.base import DecisionSink
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from core.errors import ConfigError

if TYPE_CHECKING:
    from analyzers.config import FMELConfig
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig
    from runtime.brokers.risk import RiskConfig


def new_session_id() -> str:
    """``20261121T051502Z-3f9a1c2e``: sortable by start time, unique per run."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(4)}"


def load_agent(spec: str, params: dict[str, Any]) -> type:
    """Import ``module:Class`` and check it is a ``bt.Strategy`` taking ``params``.

    Raises:
        ConfigError: naming AGENT or AGENT_PARAMS and what was expected.
    """
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"AGENT={spec!r}: cannot import module {module_name!r} ({e})") from e
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(f"AGENT={spec!r}: module {module_name!r} has no {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, bt.Strategy)):
        raise ConfigError(f"AGENT={spec!r}: expected a backtrader Strategy subclass")
    known = agent_param_names(cls)
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ConfigError(
            f"AGENT_PARAMS: unknown param(s) {', '.join(unknown)} for "
            f"{class_name}; expected some of: {', '.join(known) or '(none)'}"
        )
    return cls


def agent_param_names(cls: type) -> tuple[str, ...]:
    """The backtrader params an agent class declares."""
    return tuple(cls.params._getkeys())  # type: ignore[attr-defined]


def agent_params_json(cls: type, params: dict[str, Any]) -> str:
    """The agent's effective params (class defaults overlaid with ``params``) as JSON text."""
    merged = {**dict(cls.params._getitems()), **params}  # type: ignore[attr-defined]
    return json.dumps(merged, sort_keys=True, default=str)


def make_cerebro(*, live: bool, quicknotify: bool = False) -> Any:
    """The engine: preloaded, vectorised (``runonce``) for historical data; bar by bar for live
    feeds. No default observers (``stdstats=False``): the runtime adds what it reports."""
    return bt.Cerebro(
        stdstats=False,
        preload=not live,
        runonce=not live,
        exactbars=False,
        quicknotify=quicknotify,
    )


def setup_sim_broker(
    cerebro: Any, *, cash_usd: float, commission: float, risk: RiskConfig | None
) -> None:
    """backtrader's simulated broker with starting cash and commission (a fraction of notional);
    with any ``RISK_*`` limit set, the same risk guard as the Alpaca broker's in front of it."""
    if risk is not None and risk.enabled:
        from runtime.brokers.risk import GuardedBackBroker

        cerebro.setbroker(GuardedBackBroker(risk=risk))
    broker = cerebro.getbroker()
    broker.setcash(cash_usd)
    broker.setcommission(commission=commission)


def make_sink(fmel: FMELConfig, bigquery: BigQuerySinkConfig | None) -> DecisionSink:
    """The decision sink ``FMEL_SINK`` names.

    Raises:
        ConfigError: an unknown sink, or BigQuery without its configuration.
    """
    if fmel.sink == "local":
        return LocalDuckDBSink(fmel.local_path)
    if fmel.sink == "bigquery" and bigquery is not None:
        from analyzers.sinks.bigquery.sink import BigQuerySink

        return BigQuerySink(bigquery)
    raise ConfigError(f"FMEL_SINK={fmel.sink}: not wired into this build")


def make_writer(
    fmel: FMELConfig, sink: DecisionSink, *, spill_dir: Path | None = None
) -> DecisionWriter:
    """The decision writer (owns the sink's thread) with the ``FMEL_*`` batching settings."""
    return DecisionWriter(
        sink,
        batch_size=fmel.batch_size,
        flush_interval_s=fmel.flush_interval_s,
        queue_size=fmel.queue_size,
        spill_dir=spill_dir if spill_dir is not None else fmel.spill_dir,
    )


def add_fmel(
    cerebro: Any,
    agent_cls: type,
    *,
    agent_params: dict[str, Any],
    writer: DecisionWriter,
    session_id: str,
    agent_id: str | None,
    mode: str,
    strict_lookahead: bool,
) -> None:
    """Add the FMEL analyzer (name ``fmel``) recording every decision of ``agent_cls`` into
    ``writer`` under ``session_id``."""
    run_info = make_run_info(
        agent_cls,
        session_id=session_id,
        agent_id=agent_id,
        mode=mode,
        params_json=agent_params_json(agent_cls, agent_params),
    )
    cerebro.addanalyzer(
        FMELAnalyzer,
        _name="fmel",
        writer=writer,
        run=run_info,
        strict_lookahead=strict_lookahead,
    )
