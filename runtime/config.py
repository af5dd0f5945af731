"""Environment -> typed configuration, in exactly one place.

Nothing else in the project reads ``os.environ``: :func:`load_config` takes a ``Mapping[str, str]``
(``os.environ`` in production, a plain dict in tests) and returns one frozen :class:`AppConfig`.

Every setting is declared once in :data:`SETTINGS` (name, default, meaning); that table is what the
README and ``.env.example`` list. A variable that starts with one of our prefixes but is not
declared is refused with a did-you-mean hint, so a typo (``FMEL_SINKS=local``) fails at start
instead of being silently ignored. Invalid values raise :class:`~core.errors.ConfigError`
naming the variable and what was expected.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from core.errors import ConfigError
from core.secret import Secret
from runtime.secrets import (
    SecretManagerResolver,
    SecretSource,
    resolve_setting,
    tried_places,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DATA_DIR = PROJECT_ROOT / "data"
# The bundled daily files that share a calendar; the main job's default universe.
DEFAULT_SYMBOLS = ("GOOG", "SP500", "NASDAQ")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Setting:
    """One environment variable: its default (``None`` = unset) and its meaning."""

    name: str
    default: str | None
    help: str
    secret: bool = False
    alternatives: tuple[str, ...] = ()


def _s(name: str, default: str | None, help: str, **kw: Any) -> Setting:
    return Setting(name, default, help, **kw)


# The one table of settings. Sections follow the components; defaults are strings as they would
# appear in the environment.
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        # --- run ---------------------------------------------------------------------------
        _s(
            "MODE",
            "backtest",
            "backtest (CSV files, simulated broker) or paper (live Pub/Sub bars)",
        ),
        _s(
            "SYMBOLS",
            None,
            "comma list of symbols, e.g. GOOG,SP500 or BTC/USD; default: "
            "GOOG,SP500,NASDAQ on the bundled data, else every CSV in DATA_DIR",
        ),
        _s("AGENT", "agents.sma_cross:SmaCrossAgent", "the agent to run, as module:Class"),
        _s("AGENT_PARAMS", "{}", 'JSON object of the agent\'s params, e.g. {"fast": 10}'),
        _s(
            "AGENT_ID", None, "stable id of this agent in decision records; default: the class name"
        ),
        _s("CASH", "100000", "starting cash of the simulated broker, USD"),
        _s("COMMISSION", "0.001", "simulated commission as a fraction of notional (0.001 = 0.1%)"),
        _s("BROKER", None, "sim (backtrader's simulated broker) or alpaca; default sim"),
        _s("PROGRESS", "auto", "progress indicator for backtests: auto (on a terminal), on, off"),
        _s("BACKTEST_START", None, "first bar time to use (ISO date), inclusive"),
        _s("BACKTEST_END", None, "last bar time to use (ISO date), inclusive"),
        # --- historical CSV feed -------------------------------------------------------------
        _s("DATA_DIR", None, "folder of <SYMBOL>.csv files; default: the bundled real data"),
        _s(
            "CSV_DATETIME_COLUMN",
            None,
            "datetime column name or 0-based index; default: the first column",
        ),
        _s("CSV_DATETIME_FORMAT", None, "strftime format of that column; default: inferred"),
        _s("CSV_TIMEZONE", "UTC", "IANA timezone of naive timestamps in the files"),
        _s(
            "CSV_BAR_SIZE",
            None,
            "bar size, e.g. 1min, 5min, 1h, 1d, 1w, 1mo; default: inferred from the median spacing",
        ),
        _s(
            "CSV_COLUMNS",
            None,
            'JSON object mapping our names to the file\'s, e.g. {"close": "Adj Close"}',
        ),
        _s(
            "CSV_ON_BAD_ROWS",
            "raise",
            "raise (stop with file and line) or skip (skip, count, report)",
        ),
        # --- FMEL recording ------------------------------------------------------------------
        _s("FMEL_SINK", "local", "where decision records go: local (DuckDB file) or bigquery"),
        _s("FMEL_LOCAL_PATH", "fmel.duckdb", "DuckDB file of the local decision store"),
        _s(
            "FMEL_BATCH_SIZE",
            None,
            "records per sink write; default 10 for bigquery, 500 for local",
        ),
        _s("FMEL_FLUSH_INTERVAL_S", "5", "longest a record waits before it is written, seconds"),
        _s("FMEL_QUEUE_SIZE", "10000", "records buffered before next() waits (back-pressure)"),
        _s(
            "FMEL_SPILL_DIR",
            ".fmel_spill",
            "folder for records a sink could not take; replayed at the next start",
        ),
        _s(
            "FMEL_STRICT_LOOKAHEAD",
            "false",
            "raise LookAheadError when an agent reads a future bar (otherwise flag and warn)",
        ),
        _s("FMEL_DATASET", "fmel", "BigQuery dataset of decision records"),
        _s("FMEL_TABLE", "decisions", "BigQuery table of decision records"),
        _s("FMEL_BQ_LOCATION", None, "BigQuery dataset location, e.g. US or EU"),
        _s("FMEL_BQ_TIMEOUT_S", "30", "timeout of one BigQuery request, seconds"),
        _s("FMEL_PUBSUB_TOPIC", None, "optional Pub/Sub topic that also receives every decision"),
        # --- GCP -----------------------------------------------------------------------------
        _s(
            "GOOGLE_CLOUD_PROJECT",
            None,
            "GCP project id",
            alternatives=("PROJECT_ID", "GCLOUD_PROJECT"),
        ),
        _s(
            "SECRET_MANAGER_ENDPOINT",
            None,
            "Secret Manager API endpoint override (tests, "
            "private endpoints); http:// = no credentials; default: Google's, with ADC",
        ),
        # --- live Pub/Sub feed ---------------------------------------------------------------
        _s(
            "PUBSUB_TOPIC",
            None,
            "topic(s) of live bars, comma list; short names or projects/<p>/topics/<t>",
        ),
        _s(
            "PUBSUB_SUBSCRIPTION_PREFIX",
            "bt-runner",
            "prefix of the subscription this runner creates (suffixed with the session id)",
        ),
        _s("PUBSUB_SUBSCRIPTION", None, "reuse this existing subscription instead of creating one"),
        _s("PUBSUB_QCHECK_S", "0.5", "longest the feed blocks waiting for a bar, seconds"),
        _s(
            "PUBSUB_MAX_BUFFERED_BARS",
            "10000",
            "bars buffered per symbol before flow control holds the stream",
        ),
        _s(
            "PUBSUB_FIELDS",
            None,
            "comma list of extra fields to expect, name or name:text "
            "(else discovered from each symbol's first message)",
        ),
        _s("PUBSUB_DISCOVERY_S", "5", "start-up window to discover extra fields, seconds"),
        _s("PUBSUB_BACKFILL_BARS", "0", "bars of CSV history loaded before going live"),
        _s("PUBSUB_LOOKBACK_BARS", "5000", "bars kept in memory per live line (bounded)"),
        _s("PUBSUB_SUBSCRIPTION_TTL_S", "86400", "subscription expires after this idle time, s"),
        _s(
            "PUBSUB_IDLE_TIMEOUT_S", "0", "stop the live run after this long with no bar (0: never)"
        ),
        _s(
            "PUBSUB_ALIGN_WAIT_S",
            "1",
            "longest a bar waits for the other symbols' bars of the "
            "same time before it is delivered alone, seconds (0: never wait)",
        ),
        # --- Alpaca broker -------------------------------------------------------------------
        _s(
            "ALPACA_API_KEY",
            None,
            "Alpaca API key id",
            secret=True,
            alternatives=("APCA_API_KEY_ID",),
        ),
        _s(
            "ALPACA_SECRET_KEY",
            None,
            "Alpaca API secret key",
            secret=True,
            alternatives=("APCA_API_SECRET_KEY",),
        ),
        _s(
            "ALPACA_BASE_URL",
            None,
            "endpoint override (tests, proxies); default: Alpaca paper",
            alternatives=("APCA_API_BASE_URL",),
        ),
        _s("ALPACA_LIVE_TRADING", "false", "true to allow a live (real money) endpoint"),
        _s("ALPACA_POLL_INTERVAL_S", "2", "order status poll period, seconds"),
        _s("ALPACA_USE_STREAM", "false", "also follow the trade-updates websocket"),
        _s("ALPACA_OPEN_ORDER_POLICY", "halt", "open orders found at start: cancel, adopt or halt"),
        _s("ALPACA_CANCEL_ON_STOP", "false", "cancel open orders on shutdown"),
        _s("ALPACA_REFRESH_INTERVAL_S", "30", "account/positions refresh period, seconds"),
        _s("ALPACA_TIME_IN_FORCE", None, "override time in force (day, gtc, ioc, fok, opg, cls)"),
        _s(
            "ALPACA_STREAM_URL",
            None,
            "trade-updates websocket override; default: derived from "
            "ALPACA_BASE_URL (ws(s)://host/stream) or Alpaca's paper stream",
        ),
        _s("ALPACA_REQUEST_TIMEOUT_S", "10", "timeout of one Alpaca HTTP request, seconds"),
        _s(
            "ALPACA_MAX_RETRIES",
            "6",
            "attempts per Alpaca call on 429/5xx/timeouts (capped exponential backoff with jitter)",
        ),
        _s(
            "ALPACA_WAIT_FOR_MARKET_OPEN",
            "true",
            "hold equity orders until the Alpaca clock "
            "says the market is open (crypto is never held)",
        ),
        # --- risk guard ----------------------------------------------------------------------
        _s("RISK_MAX_POSITION_VALUE_USD", None, "largest position value per symbol, USD"),
        _s("RISK_MAX_OPEN_SYMBOLS", None, "most symbols with an open position"),
        _s("RISK_MAX_ORDER_NOTIONAL_USD", None, "largest single order notional, USD"),
        _s("RISK_MAX_DAILY_LOSS_USD", None, "daily loss that trips the kill switch, USD"),
        _s("RISK_MAX_DRAWDOWN_PCT", None, "drawdown from peak that trips the kill switch, %"),
        _s("RISK_KILL_ACTION", "stop", "on kill switch: stop (reject new orders) or flatten"),
        # --- Chronos ---------------------------------------------------------------------------
        _s("CHRONOS_MODEL", "amazon/chronos-bolt-tiny", "Chronos checkpoint id or local path"),
        _s("CHRONOS_DEVICE", "cpu", "cpu, cuda or auto"),
        _s("CHRONOS_DTYPE", "float32", "float32, bfloat16 or float16"),
        _s(
            "CHRONOS_REVISION",
            None,
            "Hub revision (branch, tag or commit) of CHRONOS_MODEL; "
            "default: main; ignored for a local path",
        ),
        _s(
            "CHRONOS_CACHE_DIR",
            None,
            "Hugging Face cache folder to load hub ids from; default: "
            "the Hugging Face default (HF_HUB_CACHE / HF_HOME)",
        ),
        # --- operations ------------------------------------------------------------------------
        _s("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING, ERROR"),
        _s("LOG_FORMAT", "auto", "auto (text on a terminal, JSON otherwise), text or json"),
        _s("HEALTH_PORT", "0", "port of /healthz, /readyz, /metrics (0: off)"),
        _s("SHUTDOWN_TIMEOUT_S", "10", "graceful shutdown budget after SIGTERM, seconds"),
    )
}

# Variables with these prefixes are ours: an undeclared one is a typo and fails at start.
OWNED_PREFIXES = ("FMEL_", "ALPACA_", "CSV_", "AGENT_", "RISK_", "CHRONOS_", "BACKTEST_", "PUBSUB_")
# Set by other tools (the Google client honours them) that share our prefixes.
FOREIGN_NAMES = frozenset({"PUBSUB_EMULATOR_HOST", "PUBSUB_PROJECT_ID"})
# `*_SECRET` variables name a Secret Manager secret for the setting without the suffix.
SECRET_REF_SUFFIX = "_SECRET"


# --------------------------------------------------------------------------------------------
# Component configs. Frozen, typed, validated at construction; units in names.
# --------------------------------------------------------------------------------------------

BAR_SIZE_RE = re.compile(r"^(\d+)\s*(s|sec|min|m|h|d|w|mo)$")


@dataclass(frozen=True, slots=True, kw_only=True)
class CSVFeedConfig:
    """How to read one historical CSV file.

    Attributes:
        path: the file.
        symbol: the symbol its bars belong to (``BTC/USD`` style allowed); part of each data hash.
        datetime_column: column name, or 0-based position as an int; ``None`` = the first column.
        datetime_format: ``strftime`` format; ``None`` = inferred by pandas from the first value.
        timezone: IANA zone of naive timestamps (aware ones are converted to UTC regardless).
        bar_size: ``"1d"``, ``"1h"``, ``"5min"``, ...; ``None`` = inferred (median spacing).
        columns: our field name -> the file's column name, for OHLCV and extras
            (e.g. ``{"close": "Adj Close"}``).
        on_bad_rows: ``"raise"``: stop at the first bad row with file and line; ``"skip"``: skip
            it, count it and report the count.
        start, end: optional inclusive bar-time bounds (aware UTC).
    """

    path: Path
    symbol: str
    datetime_column: str | int | None = None
    datetime_format: str | None = None
    timezone: str = "UTC"
    bar_size: str | None = None
    columns: Mapping[str, str] = field(default_factory=dict)
    on_bad_rows: Literal["raise", "skip"] = "raise"
    start: datetime | None = None
    end: datetime | None = None

    def __post_init__(self) -> None:
        if not self.symbol:
            raise ConfigError("CSVFeedConfig.symbol must not be empty")
        if self.on_bad_rows not in ("raise", "skip"):
            raise ConfigError(f"on_bad_rows must be 'raise' or 'skip', got {self.on_bad_rows!r}")
        if self.bar_size is not None and not BAR_SIZE_RE.match(self.bar_size.strip().lower()):
            raise ConfigError(
                f"bar_size must look like 1min, 5min, 1h, 1d, 1w or 1mo, got {self.bar_size!r}"
            )
        _check_timezone("timezone", self.timezone)


@dataclass(frozen=True, slots=True, kw_only=True)
class FMELConfig:
    """Decision recording.

    Attributes:
        sink: ``"local"`` (DuckDB file) or ``"bigquery"``.
        local_path: DuckDB database file of the local store.
        batch_size: records per sink write.
        flush_interval_s: longest a record waits in the writer before a write, seconds.
        queue_size: records buffered between ``next()`` and the writer; when full, ``next()``
            waits (back-pressure), nothing is dropped.
        spill_dir: records a sink could not take are kept here and replayed at the next start.
        strict_lookahead: raise :class:`~core.errors.LookAheadError` on a future read.
    """

    sink: Literal["local", "bigquery"] = "local"
    local_path: Path = Path("fmel.duckdb")
    batch_size: int = 10
    flush_interval_s: float = 5.0
    queue_size: int = 10_000
    spill_dir: Path = Path(".fmel_spill")
    strict_lookahead: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"FMEL batch_size must be >= 1, got {self.batch_size}")
        if self.flush_interval_s <= 0:
            raise ConfigError(f"FMEL flush_interval_s must be > 0, got {self.flush_interval_s}")
        if self.queue_size < 1:
            raise ConfigError(f"FMEL queue_size must be >= 1, got {self.queue_size}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BigQuerySinkConfig:
    """BigQuery decision sink. ``api_endpoint`` is set from ``BIGQUERY_EMULATOR_HOST`` (with
    scheme) for the emulator; ``None`` uses Google's endpoint with Application Default
    Credentials."""

    project: str
    dataset: str = "fmel"
    table: str = "decisions"
    location: str | None = None
    api_endpoint: str | None = None
    timeout_s: float = 30.0
    decisions_topic: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.dataset):
            raise ConfigError(f"FMEL_DATASET must be letters, digits, _; got {self.dataset!r}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.table):
            raise ConfigError(f"FMEL_TABLE must be letters, digits, _; got {self.table!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"FMEL_BQ_TIMEOUT_S must be > 0, got {self.timeout_s}")


@dataclass(frozen=True, slots=True, kw_only=True)
class PubSubFeedConfig:
    """Live Pub/Sub bars.

    Attributes:
        project: GCP project of the topics and the subscription.
        topics: topic ids or full paths.
        subscription_prefix: the runner creates ``<prefix>-<session>`` (one per runner and topic).
        subscription: reuse this existing subscription (id or path) instead of creating one.
        qcheck_s: longest ``_load()`` blocks waiting for a bar, seconds (backtrader's qcheck).
        max_buffered_bars: bars buffered per symbol; flow control holds the stream beyond that.
        fields: extra fields declared up front; empty = discovered from the first messages.
        discovery_s: start-up window for field discovery, seconds.
        backfill_bars: CSV bars loaded before going live (indicator warm-up).
        lookback_bars: bars kept in memory per live line.
        subscription_ttl_s: expiration policy of created subscriptions, seconds (>= 86400 on GCP).
        idle_timeout_s: end the run after this long without a bar; 0 = run until stopped.
        align_wait_s: longest a bar waits for the other symbols' bars of the same time (so
            the agent sees them in one step, as in a backtest), seconds; 0 = never wait.
    """

    project: str
    topics: tuple[str, ...]
    subscription_prefix: str = "bt-runner"
    subscription: str | None = None
    emulator_host: str | None = None
    qcheck_s: float = 0.5
    max_buffered_bars: int = 10_000
    fields: tuple[str, ...] = ()
    discovery_s: float = 5.0
    backfill_bars: int = 0
    lookback_bars: int = 5_000
    subscription_ttl_s: int = 86_400
    idle_timeout_s: float = 0.0
    align_wait_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.topics:
            raise ConfigError("PUBSUB_TOPIC is required in MODE=paper: expected a topic name")
        if self.qcheck_s <= 0:
            raise ConfigError(f"PUBSUB_QCHECK_S must be > 0, got {self.qcheck_s}")
        if self.max_buffered_bars < 1:
            raise ConfigError(
                f"PUBSUB_MAX_BUFFERED_BARS must be >= 1, got {self.max_buffered_bars}"
            )
        if self.lookback_bars < 1:
            raise ConfigError(f"PUBSUB_LOOKBACK_BARS must be >= 1, got {self.lookback_bars}")
        if self.align_wait_s < 0:
            raise ConfigError(f"PUBSUB_ALIGN_WAIT_S must be >= 0, got {self.align_wait_s}")
        for spec in self.fields:
            name, _, kind = spec.partition(":")
            if not name.strip() or kind.strip().lower() not in ("", "number", "text"):
                raise ConfigError(
                    f"PUBSUB_FIELDS: {spec!r}: expected name, name:number or name:text"
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class AlpacaBrokerConfig:
    """Alpaca broker. Paper endpoint unless ``live_trading`` is explicitly true.

    Attributes:
        api_key, secret_key: credentials (never logged; ``repr`` is ``****``).
        base_url: REST endpoint override without ``/v2`` (tests, proxies); ``None`` = Alpaca's
            paper endpoint, or the live one when ``live_trading``.
        live_trading: explicit opt-in to a real-money endpoint.
        poll_interval_s: order status poll period, seconds (one list call per poll).
        use_stream: also follow the trade-updates websocket (polling stays as the fallback).
        open_order_policy: open orders found at start: ``cancel``, ``adopt`` or ``halt``.
        cancel_on_stop: cancel this session's open orders on shutdown.
        refresh_interval_s: account/positions refresh period, seconds (also refreshed after
            fills).
        time_in_force: override of the per-asset-class default (equities ``day``, crypto
            ``gtc``).
        stream_url: websocket override; ``None`` = derived from ``base_url`` or Alpaca's.
        request_timeout_s: timeout of one HTTP request, seconds.
        max_attempts: attempts per call on 429/5xx/timeouts before giving up.
        backoff_base_s, backoff_max_s: first and largest retry delay, seconds (exponential,
            equal jitter).
        wait_for_market_open: hold equity orders until the Alpaca clock says open.
    """

    api_key: Secret
    secret_key: Secret
    base_url: str | None = None
    live_trading: bool = False
    poll_interval_s: float = 2.0
    use_stream: bool = False
    open_order_policy: Literal["cancel", "adopt", "halt"] = "halt"
    cancel_on_stop: bool = False
    refresh_interval_s: float = 30.0
    time_in_force: str | None = None
    stream_url: str | None = None
    request_timeout_s: float = 10.0
    max_attempts: int = 6
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    wait_for_market_open: bool = True

    def __post_init__(self) -> None:
        if self.poll_interval_s <= 0:
            raise ConfigError(f"ALPACA_POLL_INTERVAL_S must be > 0, got {self.poll_interval_s}")
        if self.refresh_interval_s <= 0:
            raise ConfigError(
                f"ALPACA_REFRESH_INTERVAL_S must be > 0, got {self.refresh_interval_s}"
            )
        if self.request_timeout_s <= 0:
            raise ConfigError(f"ALPACA_REQUEST_TIMEOUT_S must be > 0, got {self.request_timeout_s}")
        if self.max_attempts < 1:
            raise ConfigError(f"ALPACA_MAX_RETRIES must be >= 1, got {self.max_attempts}")
        if not 0 < self.backoff_base_s <= self.backoff_max_s:
            raise ConfigError(
                "Alpaca backoff: need 0 < backoff_base_s <= backoff_max_s, got "
                f"{self.backoff_base_s} and {self.backoff_max_s}"
            )
        if self.time_in_force is not None and self.time_in_force not in (
            "day",
            "gtc",
            "ioc",
            "fok",
            "opg",
            "cls",
        ):
            raise ConfigError(
                "ALPACA_TIME_IN_FORCE must be day, gtc, ioc, fok, opg or cls, got "
                f"{self.time_in_force!r}"
            )
        for name, url in (
            ("ALPACA_BASE_URL", self.base_url),
            ("ALPACA_STREAM_URL", self.stream_url),
        ):
            if url is not None and "://" not in url:
                raise ConfigError(
                    f"{name}={url!r}: expected a URL with a scheme, e.g. "
                    "https://paper-api.alpaca.markets"
                )
        if self.points_at_live and not self.live_trading:
            raise ConfigError(
                f"ALPACA_BASE_URL={self.base_url} is Alpaca's live (real money) "
                "endpoint: set ALPACA_LIVE_TRADING=true to trade it on purpose"
            )

    @property
    def points_at_live(self) -> bool:
        """True when ``base_url`` is Alpaca's live trading host (``api.alpaca.markets``)."""
        if self.base_url is None:
            return self.live_trading
        host = self.base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
        return host == "api.alpaca.markets"
        if self.open_order_policy not in ("cancel", "adopt", "halt"):
            raise ConfigError(
                "ALPACA_OPEN_ORDER_POLICY must be cancel, adopt or halt, got "
                f"{self.open_order_policy!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class RiskConfig:
    """Pre-trade risk limits; ``None`` = no limit. Works with every broker."""

    max_position_value_usd: float | None = None
    max_open_symbols: int | None = None
    max_order_notional_usd: float | None = None
    max_daily_loss_usd: float | None = None
    max_drawdown_pct: float | None = None
    kill_action: Literal["stop", "flatten"] = "stop"

    @property
    def enabled(self) -> bool:
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ChronosConfig:
    """Chronos model shared by every agent that asks for one (loaded once by the runner).

    Attributes:
        model: Hugging Face Hub id (``amazon/chronos-bolt-tiny``) or local checkpoint folder.
        device: ``cpu``, ``cuda`` or ``auto`` (cuda when available, else cpu).
        dtype: weights dtype.
        revision: hub branch, tag or commit; ``None`` = ``main``. Ignored for a local path.
        cache_dir: Hugging Face cache folder for hub ids; ``None`` = the library default.
    """

    model: str = "amazon/chronos-bolt-tiny"
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: str | None = None
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("CHRONOS_MODEL must not be empty: expected a hub id or a path")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"CHRONOS_DEVICE={self.device!r}: expected cpu, cuda or auto")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(
                f"CHRONOS_DTYPE={self.dtype!r}: expected float32, bfloat16 or float16"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class OpsConfig:
    """Logging, health endpoint and shutdown."""

    log_level: str = "INFO"
    log_format: Literal["auto", "text", "json"] = "auto"
    health_port: int = 0
    shutdown_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """What to run: mode, symbols, agent and the simulated broker's money."""

    mode: Literal["backtest", "paper"] = "backtest"
    symbols: tuple[str, ...]
    agent: str = "agents.sma_cross:SmaCrossAgent"
    agent_params: Mapping[str, Any] = field(default_factory=dict)
    agent_id: str | None = None
    broker: Literal["sim", "alpaca"] = "sim"
    cash_usd: float = 100_000.0
    commission: float = 0.001
    progress: Literal["auto", "on", "off"] = "auto"

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ConfigError("SYMBOLS: expected at least one symbol")
        if self.cash_usd <= 0:
            raise ConfigError(f"CASH must be > 0 USD, got {self.cash_usd}")
        if not 0 <= self.commission < 1:
            raise ConfigError(f"COMMISSION must be a fraction in [0, 1), got {self.commission}")
        if ":" not in self.agent:
            raise ConfigError(f"AGENT must be module:Class, got {self.agent!r}")


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
    secret_refs: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Parsing helpers: each error names the variable and what was expected.
# --------------------------------------------------------------------------------------------


class _Env:
    """Typed reads of one environment mapping: the variable, its alternatives, Secret Manager
    (``<NAME>_SECRET``, through ``source``), then the default from SETTINGS."""

    def __init__(self, env: Mapping[str, str], source: SecretSource | None = None) -> None:
        self.env = env
        self.source = source

    def plain(self, name: str) -> str | None:
        """The variable or an alternative, never Secret Manager (what Secret Manager needs)."""
        found = resolve_setting(name, self.env, alternatives=SETTINGS[name].alternatives)
        return found[0] if found else None

    def lookup(self, name: str) -> tuple[str, str] | None:
        return resolve_setting(
            name,
            self.env,
            alternatives=SETTINGS[name].alternatives,
            source=self.source,
            project=self.plain("GOOGLE_CLOUD_PROJECT"),
        )

    def raw(self, name: str) -> str | None:
        found = self.lookup(name)
        return found[0] if found else SETTINGS[name].default

    def text(self, name: str) -> str | None:
        return self.raw(name)

    def required(self, name: str, why: str) -> str:
        value = self.raw(name)
        if value is None:
            tried = tried_places(name, SETTINGS[name].alternatives)
            raise ConfigError(f"{name} is required {why}; tried: {tried}")
        return value

    def parse(self, name: str, conv: Callable[[str], T], expected: str) -> T | None:
        value = self.raw(name)
        if value is None:
            return None
        try:
            return conv(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{name}={value!r}: expected {expected}") from e

    def number(
        self, name: str, *, minimum: float | None = None, positive: bool = False
    ) -> float | None:
        value = self.parse(name, float, "a number")
        if value is not None:
            if value != value:  # NaN
                raise ConfigError(f"{name}=nan: expected a number")
            if positive and value <= 0:
                raise ConfigError(f"{name}={value}: expected a number > 0")
            if minimum is not None and value < minimum:
                raise ConfigError(f"{name}={value}: expected a number >= {minimum}")
        return value

    def whole(self, name: str, *, minimum: int | None = None) -> int | None:
        value = self.parse(name, int, "a whole number")
        if value is not None and minimum is not None and value < minimum:
            raise ConfigError(f"{name}={value}: expected a whole number >= {minimum}")
        return value

    def flag(self, name: str) -> bool:
        value = self.raw(name)
        if value is None:
            return False
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r}: expected true or false")

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.raw(name)
        if value is None:
            return None
        if value.lower() not in choices:
            raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        return value.lower()

    def json_object(self, name: str) -> dict[str, Any]:
        value = self.raw(name) or "{}"
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{name}: expected a JSON object, got invalid JSON ({e.msg} at position {e.pos})"
            ) from e
        if not isinstance(parsed, dict):
            raise ConfigError(f"{name}: expected a JSON object, got {type(parsed).__name__}")
        return parsed

    def csv_list(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        return tuple(part.strip() for part in value.split(",") if part.strip())

    def date(self, name: str) -> datetime | None:
        return self.parse(name, _parse_utc, "an ISO date or datetime, e.g. 2010-01-31")

    def secret(self, name: str) -> Secret | None:
        found = self.lookup(name)
        return Secret(found[0], source=found[1]) if found else None


def _default(value: float | None, default: float) -> float:
    """``value`` unless unset (an explicit 0 stays 0, unlike ``value or default``)."""
    return default if value is None else value


def _parse_utc(text: str) -> datetime:
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def _check_timezone(name: str, tz: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ConfigError(
            f"{name}={tz!r}: expected an IANA timezone such as UTC or America/New_York"
        ) from e


def check_unknown(env: Mapping[str, str]) -> None:
    """Refuse variables with our prefixes that are not declared.

    Raises:
        ConfigError: naming the variable and the closest known names.
    """
    known = set(SETTINGS) | FOREIGN_NAMES
    for alt in (a for s in SETTINGS.values() for a in s.alternatives):
        known.add(alt)
    for key in sorted(env):
        if not key.startswith(OWNED_PREFIXES) or key in known:
            continue
        if key.endswith(SECRET_REF_SUFFIX) and key[: -len(SECRET_REF_SUFFIX)] in SETTINGS:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ConfigError(f"{key} is not a known setting{hint} (see README, Configuration)")


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

    mode = e.choice("MODE", ("backtest", "paper")) or "backtest"
    data_dir_raw = e.text("DATA_DIR")
    data_dir = Path(data_dir_raw) if data_dir_raw else BUNDLED_DATA_DIR
    symbols = e.csv_list("SYMBOLS")
    if not symbols and data_dir_raw is None and mode == "backtest":
        symbols = DEFAULT_SYMBOLS
    if not symbols:
        if mode == "paper":
            raise ConfigError("SYMBOLS is required in MODE=paper: expected a comma list")
        if not data_dir.is_dir():
            raise ConfigError(f"DATA_DIR={data_dir}: expected a folder of <SYMBOL>.csv files")
        symbols = tuple(sorted(p.stem for p in data_dir.glob("*.csv")))
        if not symbols:
            raise ConfigError(f"DATA_DIR={data_dir}: no .csv files found")
    if len(set(symbols)) != len(symbols):
        raise ConfigError(f"SYMBOLS={','.join(symbols)}: expected each symbol once")

    broker = e.choice("BROKER", ("sim", "alpaca")) or "sim"
    if mode == "backtest" and broker != "sim":
        raise ConfigError("BROKER=alpaca needs MODE=paper: a backtest uses the simulated broker")

    run = RunConfig(
        mode=mode,  # type: ignore[arg-type]
        symbols=symbols,
        agent=e.text("AGENT") or "agents.sma_cross:SmaCrossAgent",
        agent_params=e.json_object("AGENT_PARAMS"),
        agent_id=e.text("AGENT_ID"),
        broker=broker,  # type: ignore[arg-type]
        cash_usd=e.number("CASH", positive=True) or 100_000.0,
        commission=e.number("COMMISSION", minimum=0.0) or 0.0,
        progress=e.choice("PROGRESS", ("auto", "on", "off")) or "auto",  # type: ignore[arg-type]
    )

    dt_col_raw = e.text("CSV_DATETIME_COLUMN")
    dt_col: str | int | None = (
        int(dt_col_raw) if dt_col_raw and dt_col_raw.isdigit() else dt_col_raw
    )
    columns_raw = e.json_object("CSV_COLUMNS")
    for k, v in columns_raw.items():
        if not isinstance(v, str):
            raise ConfigError(f"CSV_COLUMNS: expected string column names, got {k}={v!r}")
    tz = e.text("CSV_TIMEZONE") or "UTC"
    _check_timezone("CSV_TIMEZONE", tz)
    bar_size = e.text("CSV_BAR_SIZE")
    if bar_size is not None and not BAR_SIZE_RE.match(bar_size.lower()):
        raise ConfigError(f"CSV_BAR_SIZE={bar_size!r}: expected 1min, 5min, 1h, 1d, 1w or 1mo")
    on_bad = e.choice("CSV_ON_BAD_ROWS", ("raise", "skip")) or "raise"
    start, end = e.date("BACKTEST_START"), e.date("BACKTEST_END")
    if start and end and end < start:
        raise ConfigError(f"BACKTEST_END={end.date()} is before BACKTEST_START={start.date()}")
    csv_feeds: tuple[CSVFeedConfig, ...] = ()
    if mode == "backtest" or (e.whole("PUBSUB_BACKFILL_BARS", minimum=0) or 0) > 0:
        csv_feeds = tuple(
            CSVFeedConfig(
                path=find_csv(data_dir, sym),
                symbol=sym,
                datetime_column=dt_col,
                datetime_format=e.text("CSV_DATETIME_FORMAT"),
                timezone=tz,
                bar_size=bar_size,
                columns=columns_raw,
                on_bad_rows=on_bad,  # type: ignore[arg-type]
                start=start,
                end=end,
            )
            for sym in symbols
        )

    sink_kind = e.choice("FMEL_SINK", ("local", "bigquery")) or "local"
    fmel = FMELConfig(
        sink=sink_kind,  # type: ignore[arg-type]
        local_path=Path(e.text("FMEL_LOCAL_PATH") or "fmel.duckdb"),
        batch_size=e.whole("FMEL_BATCH_SIZE", minimum=1) or (500 if sink_kind == "local" else 10),
        flush_interval_s=e.number("FMEL_FLUSH_INTERVAL_S", positive=True) or 5.0,
        queue_size=e.whole("FMEL_QUEUE_SIZE", minimum=1) or 10_000,
        spill_dir=Path(e.text("FMEL_SPILL_DIR") or ".fmel_spill"),
        strict_lookahead=e.flag("FMEL_STRICT_LOOKAHEAD"),
    )

    bigquery = None
    if fmel.sink == "bigquery":
        bq_host = env.get("BIGQUERY_EMULATOR_HOST")
        if bq_host and "://" not in bq_host:
            bq_host = f"http://{bq_host}"
        bigquery = BigQuerySinkConfig(
            project=e.required("GOOGLE_CLOUD_PROJECT", "when FMEL_SINK=bigquery"),
            dataset=e.text("FMEL_DATASET") or "fmel",
            table=e.text("FMEL_TABLE") or "decisions",
            location=e.text("FMEL_BQ_LOCATION"),
            api_endpoint=bq_host,
            timeout_s=e.number("FMEL_BQ_TIMEOUT_S", positive=True) or 30.0,
            decisions_topic=e.text("FMEL_PUBSUB_TOPIC"),
        )

    pubsub = None
    if mode == "paper":
        pubsub = PubSubFeedConfig(
            project=e.required("GOOGLE_CLOUD_PROJECT", "in MODE=paper"),
            topics=e.csv_list("PUBSUB_TOPIC"),
            subscription_prefix=e.text("PUBSUB_SUBSCRIPTION_PREFIX") or "bt-runner",
            subscription=e.text("PUBSUB_SUBSCRIPTION"),
            emulator_host=env.get("PUBSUB_EMULATOR_HOST") or None,
            qcheck_s=e.number("PUBSUB_QCHECK_S", positive=True) or 0.5,
            max_buffered_bars=e.whole("PUBSUB_MAX_BUFFERED_BARS", minimum=1) or 10_000,
            fields=e.csv_list("PUBSUB_FIELDS"),
            discovery_s=e.number("PUBSUB_DISCOVERY_S", minimum=0.0) or 0.0,
            backfill_bars=e.whole("PUBSUB_BACKFILL_BARS", minimum=0) or 0,
            lookback_bars=e.whole("PUBSUB_LOOKBACK_BARS", minimum=1) or 5_000,
            subscription_ttl_s=e.whole("PUBSUB_SUBSCRIPTION_TTL_S", minimum=86_400) or 86_400,
            idle_timeout_s=e.number("PUBSUB_IDLE_TIMEOUT_S", minimum=0.0) or 0.0,
            align_wait_s=_default(e.number("PUBSUB_ALIGN_WAIT_S", minimum=0.0), 1.0),
        )

    alpaca = None
    if broker == "alpaca":
        key, secret = e.secret("ALPACA_API_KEY"), e.secret("ALPACA_SECRET_KEY")
        if key is None or secret is None:
            missing = "ALPACA_API_KEY" if key is None else "ALPACA_SECRET_KEY"
            tried = tried_places(missing, SETTINGS[missing].alternatives)
            raise ConfigError(f"{missing} is required when BROKER=alpaca; tried: {tried}")
        alpaca = AlpacaBrokerConfig(
            api_key=key,
            secret_key=secret,
            base_url=e.text("ALPACA_BASE_URL"),
            live_trading=e.flag("ALPACA_LIVE_TRADING"),
            poll_interval_s=e.number("ALPACA_POLL_INTERVAL_S", positive=True) or 2.0,
            use_stream=e.flag("ALPACA_USE_STREAM"),
            open_order_policy=e.choice(
                "ALPACA_OPEN_ORDER_POLICY",  # type: ignore[arg-type]
                ("cancel", "adopt", "halt"),
            )
            or "halt",
            cancel_on_stop=e.flag("ALPACA_CANCEL_ON_STOP"),
            refresh_interval_s=e.number("ALPACA_REFRESH_INTERVAL_S", positive=True) or 30.0,
            time_in_force=e.choice(
                "ALPACA_TIME_IN_FORCE", ("day", "gtc", "ioc", "fok", "opg", "cls")
            ),
            stream_url=e.text("ALPACA_STREAM_URL"),
            request_timeout_s=e.number("ALPACA_REQUEST_TIMEOUT_S", positive=True) or 10.0,
            max_attempts=e.whole("ALPACA_MAX_RETRIES", minimum=1) or 6,
            wait_for_market_open=e.flag("ALPACA_WAIT_FOR_MARKET_OPEN"),
        )

    risk = RiskConfig(
        max_position_value_usd=e.number("RISK_MAX_POSITION_VALUE_USD", positive=True),
        max_open_symbols=e.whole("RISK_MAX_OPEN_SYMBOLS", minimum=1),
        max_order_notional_usd=e.number("RISK_MAX_ORDER_NOTIONAL_USD", positive=True),
        max_daily_loss_usd=e.number("RISK_MAX_DAILY_LOSS_USD", positive=True),
        max_drawdown_pct=e.number("RISK_MAX_DRAWDOWN_PCT", positive=True),
        kill_action=e.choice("RISK_KILL_ACTION", ("stop", "flatten")) or "stop",  # type: ignore[arg-type]
    )
    chronos = ChronosConfig(
        model=e.text("CHRONOS_MODEL") or "amazon/chronos-bolt-tiny",
        device=e.choice("CHRONOS_DEVICE", ("cpu", "cuda", "auto")) or "cpu",  # type: ignore[arg-type]
        dtype=e.choice("CHRONOS_DTYPE", ("float32", "bfloat16", "float16")) or "float32",  # type: ignore[arg-type]
        revision=e.text("CHRONOS_REVISION"),
        cache_dir=Path(cd) if (cd := e.text("CHRONOS_CACHE_DIR")) else None,
    )
    level = (e.text("LOG_LEVEL") or "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"LOG_LEVEL={level!r}: expected DEBUG, INFO, WARNING or ERROR")
    ops = OpsConfig(
        log_level=level,
        log_format=e.choice("LOG_FORMAT", ("auto", "text", "json")) or "auto",  # type: ignore[arg-type]
        health_port=e.whole("HEALTH_PORT", minimum=0) or 0,
        shutdown_timeout_s=e.number("SHUTDOWN_TIMEOUT_S", positive=True) or 10.0,
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
        ops=ops,
        risk=risk,
        chronos=chronos,
        bigquery=bigquery,
        pubsub=pubsub,
        alpaca=alpaca,
        secret_refs=secret_refs,
    )


def pubsub_target(env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """``(GOOGLE_CLOUD_PROJECT or an alternative, PUBSUB_EMULATOR_HOST)`` for tools that talk to
    Pub/Sub without a run configuration (the replay publisher, ``python -m feeds.replay``)."""
    return _Env(env).text("GOOGLE_CLOUD_PROJECT"), env.get("PUBSUB_EMULATOR_HOST") or None


def process_pubsub_target() -> tuple[str | None, str | None]:
    """:func:`pubsub_target` over this process's environment."""
    import os

    return pubsub_target(os.environ)


def load_process_config() -> AppConfig:
    """:func:`load_config` over this process's environment (the only ``os.environ`` read)."""
    import os

    return load_config(os.environ)


# --------------------------------------------------------------------------------------------
# .env.example, generated from SETTINGS (`python -m runtime.config --env-example`)
# --------------------------------------------------------------------------------------------

# Section headings of .env.example, keyed by the first setting of each section in SETTINGS.
_ENV_SECTIONS = {
    "MODE": "run",
    "DATA_DIR": "historical CSV feed",
    "FMEL_SINK": "FMEL recording",
    "GOOGLE_CLOUD_PROJECT": "GCP",
    "PUBSUB_TOPIC": "live Pub/Sub feed",
    "ALPACA_API_KEY": "Alpaca broker",
    "RISK_MAX_POSITION_VALUE_USD": "risk guard",
    "CHRONOS_MODEL": "Chronos",
    "LOG_LEVEL": "operations",
}


def env_example() -> str:
    """The text of ``.env.example``: every setting with its default and meaning, commented out.

    ``tests/test_deploy.py`` checks the committed file equals this text.
    """
    out = [
        "# Every setting of `python runner.py`, with its default and meaning.",
        "# Generated by `python -m runtime.config --env-example > .env.example`: edit",
        "# runtime/config.py SETTINGS, not this file.",
        "# Use: cp .env.example .env && chmod 600 .env, uncomment what you need, then",
        "#      source load_env.sh .env   (or: ./load_env.sh .env -- python runner.py)",
        "# Each setting resolves in order: the variable itself, its alternative names, Google",
        "# Secret Manager when <NAME>_SECRET names a secret (e.g. ALPACA_API_KEY_SECRET=alpaca-key",
        "# or projects/<p>/secrets/<s>/versions/<v>; read with Application Default Credentials),",
        "# then the default. Empty means unset.",
    ]
    import textwrap

    for s in SETTINGS.values():
        if s.name in _ENV_SECTIONS:
            title = _ENV_SECTIONS[s.name]
            out += ["", f"# --- {title} " + "-" * (80 - 7 - len(title))]
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
