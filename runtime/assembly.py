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
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import backtrader as bt

from analyzers.fmel import FMELAnalyzer, make_run_info
from analyzers.schema import new_session_id as new_session_id  # re-exported: its old home
from analyzers.sinks.base import DecisionSink
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.spill import SpillDirClaim, SpillDirInUseError
from analyzers.sinks.writer import DecisionWriter
from core.errors import ConfigError

if TYPE_CHECKING:
    from analyzers.config import FMELConfig
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig
    from runtime.brokers.risk import RiskConfig

logger = logging.getLogger(__name__)


def load_agent(spec: str, params: dict[str, Any]) -> type:
    """Import ``module:Class`` and check it is a ``bt.Strategy`` taking ``params``.

    Raises:
        ConfigError: naming AGENT (and the file and line of a module that fails to import:
            a syntax error, a failed import inside it, an error raised while it runs) or
            AGENT_PARAMS (an unknown param, or a value whose type does not fit the param's
            default) and what was expected.
    """
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and module_name.startswith(e.name):
            raise ConfigError(
                f"AGENT={spec!r}: no module named {e.name!r} (looked on the Python path from "
                f"{Path.cwd()})"
            ) from e
        raise ConfigError(
            f"AGENT={spec!r}: module {module_name!r} fails to import at {_error_site(e)}: {e}"
        ) from e
    except SyntaxError as e:
        raise ConfigError(
            f"AGENT={spec!r}: syntax error in {e.filename}, line {e.lineno}: {e.msg}"
        ) from e
    except Exception as e:  # whatever the module raised while it ran
        raise ConfigError(
            f"AGENT={spec!r}: module {module_name!r} fails to import at {_error_site(e)}: "
            f"{type(e).__name__}: {e}"
        ) from e
    where = getattr(module, "__file__", None) or module_name
    cls = getattr(module, class_name, None)
    if cls is None:
        strategies = sorted(
            name
            for name, obj in vars(module).items()
            if isinstance(obj, type) and issubclass(obj, bt.Strategy) and obj is not bt.Strategy
        )
        raise ConfigError(
            f"AGENT={spec!r}: {where} has no {class_name!r}; its Strategy classes: "
            f"{', '.join(strategies) or '(none)'}"
        )
    if not (isinstance(cls, type) and issubclass(cls, bt.Strategy)):
        raise ConfigError(
            f"AGENT={spec!r}: {class_name} in {where} is not a backtrader Strategy subclass"
        )
    known = agent_param_names(cls)
    unknown = [k for k in params if k not in known]
    if unknown:
        raise ConfigError(
            f"AGENT_PARAMS: unknown param(s) {', '.join(unknown)} for "
            f"{class_name}; expected some of: {', '.join(known) or '(none)'}"
        )
    defaults = dict(cls.params._getitems())  # type: ignore[attr-defined]
    for name, value in params.items():
        problem = param_type_problem(defaults.get(name), value)
        if problem:
            raise ConfigError(
                f"AGENT_PARAMS: param {name!r} of {class_name} {problem}, got {value!r} "
                f"({json_kind(value)})"
            )
    return cls


def _error_site(e: BaseException) -> str:
    """``<file>, line <n>`` where ``e`` was raised (the innermost frame outside importlib)."""
    site = None
    tb = e.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not filename.startswith("<frozen"):
            site = f"{filename}, line {tb.tb_lineno}"
        tb = tb.tb_next
    return site or "(unknown file)"


def json_kind(value: Any) -> str:
    names = {bool: "true/false", int: "a whole number", float: "a number", str: "a string"}
    for tp, name in names.items():
        if type(value) is tp:
            return name
    if value is None:
        return "null"
    return "a list" if isinstance(value, list) else "an object"


def param_type_problem(default: Any, value: Any) -> str | None:
    """Why ``value`` (from JSON) does not fit a param whose default is ``default``; None when
    it fits. A default of None (or of a type JSON cannot spell) accepts anything; a whole number
    fits a float param; true/false fits only a bool param (bool is not a number here)."""
    if default is None or value is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"expects true/false (default {default!r})"
    if isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expects a whole number (default {default!r})"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expects a number (default {default!r})"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"expects a string (default {default!r})"
    if isinstance(default, (list, tuple)):
        return None if isinstance(value, list) else f"expects a list (default {default!r})"
    if isinstance(default, dict):
        return None if isinstance(value, dict) else f"expects an object (default {default!r})"
    return None


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
        return LocalDuckDBSink(fmel.local_path, memory_limit_mb=fmel.local_memory_limit_mb)
    if fmel.sink == "bigquery" and bigquery is not None:
        from analyzers.sinks.bigquery.sink import BigQuerySink

        return BigQuerySink(bigquery)
    raise ConfigError(f"FMEL_SINK={fmel.sink}: not wired into this build")


def claim_spill_dir(folder: Path) -> SpillDirClaim | None:
    """Claim ``FMEL_SPILL_DIR`` for this process (:class:`SpillDirClaim`): one runner or drain
    per folder, since it holds that process's journal, spill and read position. A folder
    that cannot be written is not refused here: the decision writer's disk-failure rule
    applies to it (records go straight to the store; the run ends with exit 3); None then.

    Raises:
        ConfigError: another runner or drain holds it.
    """
    try:
        return SpillDirClaim(folder)
    except SpillDirInUseError as e:
        raise ConfigError(
            f"FMEL_SPILL_DIR={folder}: {e}; give each runner (and a drain) a folder of its own, "
            "or stop the other first"
        ) from e
    except OSError as e:
        logger.warning("FMEL_SPILL_DIR=%s cannot be claimed (%s)", folder, e)
        return None


def make_writer(
    fmel: FMELConfig, sink: DecisionSink, *, spill_dir: Path | None = None, journal: bool = False
) -> DecisionWriter:
    """The decision writer (owns the sink's thread) with the ``FMEL_*`` batching settings;
    ``journal``: every decision on local disk first (paper runs acknowledge bars on it)."""
    return DecisionWriter(
        sink,
        batch_size=fmel.batch_size,
        flush_interval_s=fmel.flush_interval_s,
        queue_size=fmel.queue_size,
        spill_dir=spill_dir if spill_dir is not None else fmel.spill_dir,
        journal=journal,
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
    decision_scope: str | None = None,
) -> None:
    """Add the FMEL analyzer (name ``fmel``) recording every decision of ``agent_cls`` into
    ``writer`` under ``session_id`` (paper runs: ids ``<decision_scope>:<bar time>``).

    A backtest (``mode="backtest"``: the runner's process ends with its run) tunes the garbage
    collector for the run (the analyzer's ``gc_freeze``); live runs, which last days, and
    optimize trials, whose workers run many trials, leave it alone."""
    run_info = make_run_info(
        agent_cls,
        session_id=session_id,
        agent_id=agent_id,
        mode=mode,
        params_json=agent_params_json(agent_cls, agent_params),
        decision_scope=decision_scope,
    )
    cerebro.addanalyzer(
        FMELAnalyzer,
        _name="fmel",
        writer=writer,
        run=run_info,
        strict_lookahead=strict_lookahead,
        gc_freeze=mode == "backtest",
    )
