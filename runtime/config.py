"""Environment -> typed configuration, in exactly one place.

Nothing else in the project reads ``os.environ``: :func:`load_config` takes a ``Mapping[str, str]``
(``os.environ`` in production, a plain dict in tests) and returns one frozen :class:`AppConfig`.

Each setting is declared once, on the field of the component config it configures
(:func:`core.settings.setting`: variable, meaning, default, bounds), beside its component:
``feeds/csv/config.py``, ``feeds/pubsub/config.py``, ``analyzers/config.py``,
``analyzers/sinks/bigquery/config.py``, ``runtime/brokers/alpaca/config.py``,
``runtime/brokers/risk.py``, ``runtime/models/config.py``, and the run's own configs below.
:data:`SETTINGS` is derived from those fields; it is what the docs and ``.env.example`` list. A
variable that starts with one of our prefixes but is not declared is refused with a did-you-mean
hint, so a typo (``FMEL_SINKS=local``) fails at start instead of being silently ignored. Invalid
values raise :class:`~core.errors.ConfigError` naming the variable and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import re
import textwrap
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from analyzers.config import LOCAL_BATCH_SIZE, FMELConfig
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from core.errors import ConfigError
from core.secret import Secret
from core.settings import DeclaredSetting, build, declared, parse, setting, spec_of
from feeds.csv import CSVFeedConfig
from feeds.ingest.config import IngestConfig
from feeds.pubsub.config import PubSubFeedConfig
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.risk import RiskConfig
from runtime.models.config import ChronosConfig
from runtime.research.config import OptimizeConfig
from runtime.secrets import SecretManagerResolver, SecretSource, resolve_setting, tried_places

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DATA_DIR = PROJECT_ROOT / "data"
# The bundled daily files that share a calendar; the main job's default universe.
DEFAULT_SYMBOLS = ("GOOG", "SP500", "NASDAQ")

# Variables with these prefixes are ours: an undeclared one is a typo and fails at start.
OWNED_PREFIXES = (
    "FMEL_",
    "ALPACA_",
    "CSV_",
    "AGENT_",
    "RISK_",
    "CHRONOS_",
    "BACKTEST_",
    "PUBSUB_",
    "INGEST_",
    "OPTIMIZE_",
)
# Set by other tools (the Google client honours them) that share our prefixes.
FOREIGN_NAMES = frozenset({"PUBSUB_EMULATOR_HOST", "PUBSUB_PROJECT_ID"})
# `*_SECRET` variables name a Secret Manager secret for the setting without the suffix.
SECRET_REF_SUFFIX = "_SECRET"

Setting = DeclaredSetting


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """What to run: mode, symbols, agent and the simulated broker's money.

    Raises:
        ConfigError: at construction, for no symbols, a symbol listed twice, cash <= 0, a
            commission outside [0, 1), an agent that is not ``module:Class``, or the Alpaca
            broker in a backtest.
    """

    mode: Literal["backtest", "paper", "optimize"] = setting(
        "backtest",
        env="MODE",
        help="backtest (CSV files, simulated broker), paper (live Pub/Sub bars) or optimize "
        "(parameter search over CSV files, OPTIMIZE_*)",
    )
    symbols: tuple[str, ...] = setting(
        (),
        env="SYMBOLS",
        help="comma list of symbols, e.g. GOOG,SP500 or BTC/USD; default: GOOG,SP500,NASDAQ on "
        "the bundled data, else every CSV in DATA_DIR",
    )
    agent: str = setting(
        "agents.sma_cross:SmaCrossAgent", env="AGENT", help="the agent to run, as module:Class"
    )
    agent_params: Mapping[str, Any] = setting(
        env="AGENT_PARAMS",
        help='JSON object of the agent\'s params, e.g. {"fast": 10}',
        default_factory=dict,
    )
    agent_id: str | None = setting(
        None,
        env="AGENT_ID",
        help="stable id of this agent in decision records; default: the class name",
    )
    cash_usd: float = setting(
        100_000.0, env="CASH", gt=0, help="starting cash of the simulated broker, USD"
    )
    commission: float = setting(
        0.001,
        env="COMMISSION",
        minimum=0,
        help="simulated commission as a fraction of notional (0.001 = 0.1%)",
    )
    broker: Literal["sim", "alpaca"] = setting(
        "sim", env="BROKER", help="sim (backtrader's simulated broker) or alpaca"
    )
    progress: Literal["auto", "on", "off"] = setting(
        "auto",
        env="PROGRESS",
        help="progress indicator for backtests: auto (on a terminal), on, off",
    )
    data_dir: Path = setting(
        BUNDLED_DATA_DIR,
        env="DATA_DIR",
        help="folder of <SYMBOL>.csv files; default: the bundled real data",
        default_text="",
    )

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ConfigError("SYMBOLS: expected at least one symbol")
        if len(set(self.symbols)) != len(self.symbols):
            raise ConfigError(f"SYMBOLS={','.join(self.symbols)}: expected each symbol once")
        if self.cash_usd <= 0:
            raise ConfigError(f"CASH must be > 0 USD, got {self.cash_usd}")
        if not 0 <= self.commission < 1:
            raise ConfigError(f"COMMISSION must be a fraction in [0, 1), got {self.commission}")
        if ":" not in self.agent:
            raise ConfigError(f"AGENT must be module:Class, got {self.agent!r}")
        if self.mode in ("backtest", "optimize") and self.broker != "sim":
            raise ConfigError(
                "BROKER=alpaca needs MODE=paper: a backtest uses the simulated broker"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class GCPConfig:
    """The Google Cloud project and the Secret Manager endpoint, shared by every GCP client."""

    project: str | None = setting(
        None,
        env="GOOGLE_CLOUD_PROJECT",
        help="GCP project id",
        alternatives=("PROJECT_ID", "GCLOUD_PROJECT"),
    )
    secret_manager_endpoint: str | None = setting(
        None,
        env="SECRET_MANAGER_ENDPOINT",
        help="Secret Manager API endpoint override (tests, private endpoints); http:// = no "
        "credentials; default: Google's, with ADC",
    )


# RFC 1123 section 2.1 host name label: letters, digits, hyphens; 1..63; no hyphen at an end.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_bind_host(value: str) -> bool:
    """Whether ``value`` can name an address to bind: an IPv4 or IPv6 literal, or a host name
    (RFC 1123 section 2.1: dot-separated labels of letters, digits and hyphens, at most 253
    characters, one trailing dot allowed; the last label not all digits, RFC 3696 section 2, so
    ``999.1.1.1`` is a bad IP rather than a name).

    Args:
        value: the text of ``HEALTH_HOST``.

    Returns:
        True for a literal or a well-formed name (whether it resolves is checked when binding).
    """
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return True
    name = value[:-1] if value.endswith(".") else value
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    return all(_HOST_LABEL.fullmatch(label) for label in labels) and not labels[-1].isdigit()


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsConfig:
    """Logging, health endpoint and shutdown.

    Raises:
        ConfigError: at construction, for an unknown log level, a port outside 0..65535 or a
            ``HEALTH_HOST`` that is neither an IP address nor a host name.
    """

    log_level: str = setting("INFO", env="LOG_LEVEL", help="DEBUG, INFO, WARNING, ERROR")
    log_format: Literal["auto", "text", "json"] = setting(
        "auto", env="LOG_FORMAT", help="auto (text on a terminal, JSON otherwise), text or json"
    )
    health_port: int = setting(
        0, env="HEALTH_PORT", minimum=0, help="port of /healthz, /readyz, /metrics (0: off)"
    )
    health_host: str = setting(
        "0.0.0.0",
        env="HEALTH_HOST",
        help="address the health endpoint binds: an IP (0.0.0.0 all IPv4, :: all IPv6, "
        "127.0.0.1 this host only) or a host name; a pod needs 0.0.0.0 (the kubelet probes the "
        "pod IP)",
    )
    shutdown_timeout_s: float = setting(
        10.0,
        env="SHUTDOWN_TIMEOUT_S",
        gt=0,
        help="graceful shutdown budget after SIGTERM, seconds",
    )
    health_stall_s: float = setting(
        300.0,
        env="HEALTH_STALL_S",
        minimum=0,
        help="/healthz fails when the bar loop has neither finished a step nor asked a live "
        "feed for a bar for this long (an agent stuck in its code), seconds; 0: never",
    )

    def __post_init__(self) -> None:
        if not 0 <= self.health_port <= 65_535:
            raise ConfigError(f"HEALTH_PORT={self.health_port}: expected a port, 0 to 65535")
        if not is_bind_host(self.health_host):
            raise ConfigError(
                f"HEALTH_HOST={self.health_host!r}: expected an IP address (0.0.0.0, ::, "
                "127.0.0.1) or a host name (letters, digits, hyphens and dots)"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"LOG_LEVEL={self.log_level!r}: expected DEBUG, INFO, WARNING or ERROR"
            )
        object.__setattr__(self, "log_level", self.log_level.upper())


@dataclass(frozen=True, slots=True, kw_only=True)
class AppConfig:
    """Everything a run needs, built by :func:`load_config`."""

    run: RunConfig
    csv_feeds: tuple[CSVFeedConfig, ...]
    fmel: FMELConfig
    ops: OpsConfig
    risk: RiskConfig
    chronos: ChronosConfig
    bigquery: BigQuerySinkConfig | None = None
    pubsub: PubSubFeedConfig | None = None
    alpaca: AlpacaBrokerConfig | None = None
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    # not in the repr (logged at DEBUG): a key put in a *_SECRET variable by mistake stays out
    secret_refs: Mapping[str, str] = field(default_factory=dict, repr=False)


# The configs whose fields are settings, in the order (and under the headings) .env.example
# lists them.
SECTIONS: tuple[tuple[str, type], ...] = (
    ("run", RunConfig),
    ("historical CSV feed", CSVFeedConfig),
    ("FMEL recording", FMELConfig),
    ("BigQuery decision sink", BigQuerySinkConfig),
    ("GCP", GCPConfig),
    ("live Pub/Sub feed", PubSubFeedConfig),
    ("Alpaca broker", AlpacaBrokerConfig),
    ("risk guard", RiskConfig),
    ("Chronos", ChronosConfig),
    ("optimisation (MODE=optimize)", OptimizeConfig),
    ("operations", OpsConfig),
    ("market-data ingestor (python -m runtime.ingest)", IngestConfig),
)


def _table() -> dict[str, DeclaredSetting]:
    out: dict[str, DeclaredSetting] = {}
    for _, cls in SECTIONS:
        for s in declared(cls):
            if s.name in out:
                raise AssertionError(f"{s.name} is declared twice")  # a programming error
            out[s.name] = s
    return out


# The one table of settings, derived from the component configs' fields.
SETTINGS: dict[str, DeclaredSetting] = _table()


class _Env:
    """Reads of one environment mapping: the variable, its alternatives, then Secret Manager
    (``<NAME>_SECRET``, through ``source``). Unset -> ``None`` (the field default applies)."""

    def __init__(self, env: Mapping[str, str], source: SecretSource | None = None) -> None:
        self.env = env
        self.source = source

    def plain(self, name: str) -> str | None:
        """The variable or an alternative, never Secret Manager (what Secret Manager needs)."""
        found = resolve_setting(name, self.env, alternatives=SETTINGS[name].alternatives)
        return found[0] if found else None

    def lookup(self, name: str) -> tuple[str, str] | None:
        """``(text, source)`` of setting ``name``, or ``None`` when unset."""
        return resolve_setting(
            name,
            self.env,
            alternatives=SETTINGS[name].alternatives,
            source=self.source,
            project=self.plain("GOOGLE_CLOUD_PROJECT"),
        )

    def read(self, cls: type, name: str) -> Any:
        """Field ``name`` of config ``cls`` as the environment sets it, else its default."""
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        spec = spec_of(f)
        found = self.lookup(spec.env) if spec is not None else None
        if spec is None or found is None:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            return None
        value = parse(spec.env, found[0], typing.get_type_hints(cls)[name], spec)
        return Secret(found[0], source=found[1]) if isinstance(value, Secret) else value

    def required(self, name: str, why: str) -> str:
        found = self.lookup(name)
        if found is None:
            tried = tried_places(name, SETTINGS[name].alternatives)
            raise ConfigError(f"{name} is required {why}; tried: {tried}")
        return found[0]

    def required_secret(self, name: str, why: str) -> Secret:
        found = self.lookup(name)
        if found is None:
            tried = tried_places(name, SETTINGS[name].alternatives)
            raise ConfigError(f"{name} is required {why}; tried: {tried}")
        return Secret(found[0], source=found[1])


def check_unknown(env: Mapping[str, str]) -> None:
    """Refuse variables with our prefixes that are not settings (typos), with a hint.

    Raises:
        ConfigError: naming the variable and the closest known names.
    """
    known = set(SETTINGS) | FOREIGN_NAMES
    for s in SETTINGS.values():
        known.update(s.alternatives)
    for key in sorted(env):
        if not key.startswith(OWNED_PREFIXES) or key in known:
            continue
        if key.endswith(SECRET_REF_SUFFIX) and key[: -len(SECRET_REF_SUFFIX)] in SETTINGS:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"{key} is not a known setting{hint} (see docs/configuration.md)")


def symbol_file_stem(symbol: str) -> tuple[str, ...]:
    """File stems tried for a symbol: ``BTC/USD`` -> ``BTC-USD``, ``BTC_USD``, ``BTCUSD``."""
    if "/" not in symbol:
        return (symbol,)
    a, b = symbol.split("/", 1)
    return (f"{a}-{b}", f"{a}_{b}", f"{a}{b}")


def find_csv(data_dir: Path, symbol: str) -> Path:
    """The CSV file of ``symbol`` in ``data_dir``.

    Raises:
        ConfigError: when no candidate file exists (the message lists every name tried).
    """
    tried = []
    for stem in symbol_file_stem(symbol):
        for cand in (data_dir / f"{stem}.csv", data_dir / f"{stem.upper()}.csv"):
            tried.append(cand.name)
            if cand.is_file():
                return cand
    raise ConfigError(
        f"SYMBOLS: no CSV for {symbol!r} in DATA_DIR={data_dir} (tried "
        f"{', '.join(dict.fromkeys(tried))})"
    )


def check_one_file_per_symbol(feeds: tuple[CSVFeedConfig, ...]) -> None:
    """Refuse two symbols that resolve to one file (``SYMBOLS=GOOG,goog`` both find GOOG.csv):
    the same bars would be loaded twice under two names.

    Raises:
        ConfigError: naming SYMBOLS, both symbols and the file.
    """
    seen: dict[tuple[int, int], str] = {}
    for fc in feeds:
        st = fc.path.stat()  # the same file however it is reached (case, links)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise ConfigError(
                f"SYMBOLS: {seen[key]!r} and {fc.symbol!r} both resolve to {fc.path.name}; list "
                "each file once"
            )
        seen[key] = fc.symbol


def _symbols(e: _Env, mode: str, data_dir: Path) -> tuple[str, ...]:
    symbols: tuple[str, ...] = e.read(RunConfig, "symbols")
    if symbols:
        return symbols
    if e.lookup("DATA_DIR") is None and mode in ("backtest", "optimize"):
        return DEFAULT_SYMBOLS
    if mode == "paper":
        raise ConfigError("SYMBOLS is required in MODE=paper: expected a comma list")
    if not data_dir.is_dir():
        raise ConfigError(f"DATA_DIR={data_dir}: expected a folder of <SYMBOL>.csv files")
    found = tuple(sorted(p.stem for p in data_dir.glob("*.csv")))
    if not found:
        raise ConfigError(f"DATA_DIR={data_dir}: no .csv files found")
    return found


def load_config(
    env: Mapping[str, str], *, secret_resolver: SecretSource | None = None
) -> AppConfig:
    """Build the whole configuration from an environment mapping.

    Args:
        env: ``os.environ`` or a dict (tests).
        secret_resolver: reads ``<NAME>_SECRET`` references; default a
            :class:`~runtime.secrets.SecretManagerResolver` (ADC, ``SECRET_MANAGER_ENDPOINT``),
            which only connects when a reference is actually needed.

    Returns:
        A frozen :class:`AppConfig`.

    Raises:
        ConfigError: on an unknown variable with one of our prefixes, a missing required one, or
            an invalid value; the message names the variable and what was expected.
    """
    check_unknown(env)
    e = _Env(env)
    e.source = secret_resolver or SecretManagerResolver(endpoint=e.plain("SECRET_MANAGER_ENDPOINT"))
    get = e.lookup

    mode: str = e.read(RunConfig, "mode")
    data_dir: Path = e.read(RunConfig, "data_dir")
    run: RunConfig = build(RunConfig, get, symbols=_symbols(e, mode, data_dir))

    csv_feeds: tuple[CSVFeedConfig, ...] = ()
    if mode in ("backtest", "optimize") or e.read(PubSubFeedConfig, "backfill_bars") > 0:
        csv_feeds = tuple(
            build(CSVFeedConfig, get, path=find_csv(data_dir, sym), symbol=sym)
            for sym in run.symbols
        )
        check_one_file_per_symbol(csv_feeds)

    sink = e.read(FMELConfig, "sink")
    batch = (
        {}
        if e.lookup("FMEL_BATCH_SIZE")
        else {"batch_size": LOCAL_BATCH_SIZE if sink == "local" else 10}
    )
    fmel: FMELConfig = build(FMELConfig, get, **batch)

    bigquery = None
    if fmel.sink == "bigquery":
        bq_host = env.get("BIGQUERY_EMULATOR_HOST")
        if bq_host and "://" not in bq_host:
            bq_host = f"http://{bq_host}"
        bigquery = build(
            BigQuerySinkConfig,
            get,
            project=e.required("GOOGLE_CLOUD_PROJECT", "when FMEL_SINK=bigquery"),
            api_endpoint=bq_host,
        )

    pubsub = None
    if mode == "paper":
        pubsub = build(
            PubSubFeedConfig,
            get,
            project=e.required("GOOGLE_CLOUD_PROJECT", "in MODE=paper"),
            emulator_host=env.get("PUBSUB_EMULATOR_HOST") or None,
        )

    alpaca = None
    if run.broker == "alpaca":
        alpaca = build(
            AlpacaBrokerConfig,
            get,
            api_key=e.required_secret("ALPACA_API_KEY", "when BROKER=alpaca"),
            secret_key=e.required_secret("ALPACA_SECRET_KEY", "when BROKER=alpaca"),
        )

    secret_refs = {
        k[: -len(SECRET_REF_SUFFIX)]: v
        for k, v in env.items()
        if k.endswith(SECRET_REF_SUFFIX) and k[: -len(SECRET_REF_SUFFIX)] in SETTINGS
    }
    return AppConfig(
        run=run,
        csv_feeds=csv_feeds,
        fmel=fmel,
        ops=build(OpsConfig, get),
        risk=build(RiskConfig, get),
        chronos=build(ChronosConfig, get),
        bigquery=bigquery,
        pubsub=pubsub,
        alpaca=alpaca,
        optimize=build(OptimizeConfig, get),
        secret_refs=secret_refs,
    )


def pubsub_target(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(GOOGLE_CLOUD_PROJECT or an alternative, PUBSUB_EMULATOR_HOST)`` for tools that talk to
    Pub/Sub without a run configuration (the replay publisher)."""
    return _Env(env).plain("GOOGLE_CLOUD_PROJECT"), env.get("PUBSUB_EMULATOR_HOST") or None


def process_pubsub_target() -> tuple[str | None, str | None]:
    """:func:`pubsub_target` over this process's environment."""
    import os

    return pubsub_target(os.environ)


def process_log_format() -> Literal["auto", "text", "json"]:
    """``LOG_FORMAT`` of this process's environment, read as :class:`OpsConfig` reads it, or
    ``auto`` when it is missing or invalid: for the one error line of a configuration that
    failed to load (a fresh-context attack found it printed as JSON under LOG_FORMAT=text)."""
    import os

    try:
        fmt: Literal["auto", "text", "json"] = _Env(os.environ).read(OpsConfig, "log_format")
        return fmt
    except ConfigError:
        return "auto"


def load_process_config() -> AppConfig:
    """:func:`load_config` over this process's environment (the only ``os.environ`` read)."""
    import os

    return load_config(os.environ)


def load_ingest_config(
    env: Mapping[str, str], *, secret_resolver: SecretSource | None = None
) -> tuple[IngestConfig, OpsConfig]:
    """The configuration of ``python -m runtime.ingest`` from an environment mapping: the
    ingestor's own ``INGEST_*`` settings plus the shared ``SYMBOLS``, ``PUBSUB_TOPIC`` (exactly
    one topic), ``GOOGLE_CLOUD_PROJECT``, ``ALPACA_API_KEY``/``ALPACA_SECRET_KEY`` (same
    resolution chain and Secret handling as the broker's) and the operations settings.

    Raises:
        ConfigError: an unknown variable with one of our prefixes, a missing key, an invalid
            value; the message names the variable.
    """
    check_unknown(env)
    e = _Env(env)
    e.source = secret_resolver or SecretManagerResolver(endpoint=e.plain("SECRET_MANAGER_ENDPOINT"))
    topics: tuple[str, ...] = e.read(PubSubFeedConfig, "topics")
    ingest = build(
        IngestConfig,
        e.lookup,
        symbols=e.read(RunConfig, "symbols"),
        project=e.plain("GOOGLE_CLOUD_PROJECT"),
        topic=",".join(topics),
        api_key=e.required_secret("ALPACA_API_KEY", "by the ingestor"),
        secret_key=e.required_secret("ALPACA_SECRET_KEY", "by the ingestor"),
        emulator_host=env.get("PUBSUB_EMULATOR_HOST") or None,
    )
    return ingest, build(OpsConfig, e.lookup)


def load_process_ingest_config() -> tuple[IngestConfig, OpsConfig]:
    """:func:`load_ingest_config` over this process's environment."""
    import os

    return load_ingest_config(os.environ)


def env_example() -> str:
    """The text of ``.env.example``: every setting with its default and meaning, commented out.

    ``tests`` check the committed file equals this text.
    """
    out = [
        "# Every setting of `python runner.py`, with its default and meaning.",
        "# Generated by `python -m runtime.config --env-example > .env.example`: edit the",
        "# setting() declarations on the component configs (see docs/configuration.md), not",
        "# this file.",
        "# Use: cp .env.example .env && chmod 600 .env, uncomment what you need, then",
        "#      source load_env.sh .env   (or: ./load_env.sh .env -- python runner.py)",
        "# Each setting resolves in order: the variable itself, its alternative names, Google",
        "# Secret Manager when <NAME>_SECRET names a secret (e.g. ALPACA_API_KEY_SECRET=alpaca-key",
        "# or projects/<p>/secrets/<s>/versions/<v>; read with Application Default Credentials),",
        "# then the default. Empty means unset.",
    ]
    for title, cls in SECTIONS:
        out += ["", f"# --- {title} " + "-" * (80 - 7 - len(title))]
        for s in declared(cls):
            out.append("")
            out += textwrap.wrap(s.help, 98, initial_indent="# ", subsequent_indent="#   ")
            if s.alternatives:
                out.append(f"# also read from: {', '.join(s.alternatives)}")
            if s.secret:
                out.append(
                    f"# secret: never logged; or set {s.name}{SECRET_REF_SUFFIX}=<Secret Manager "
                    "secret>"
                )
            out.append(f"#{s.name}={s.default if s.default is not None else ''}")
    out += [
        "",
        "# --- read by the Google clients, not by SETTINGS " + "-" * 31,
        "",
        "# Pub/Sub emulator host:port (tests, local runs)",
        "#PUBSUB_EMULATOR_HOST=",
        "# BigQuery emulator endpoint, e.g. http://127.0.0.1:9050",
        "#BIGQUERY_EMULATOR_HOST=",
        "# service account key file; prefer Workload Identity or gcloud ADC",
        "#GOOGLE_APPLICATION_CREDENTIALS=",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--env-example"]:
        sys.exit("usage: python -m runtime.config --env-example")
    sys.stdout.write(env_example())
