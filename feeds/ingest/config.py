"""Configuration of the market-data ingestor: :class:`IngestConfig` (``INGEST_*`` and the shared
``SYMBOLS``, ``PUBSUB_TOPIC``, ``GOOGLE_CLOUD_PROJECT``, ``ALPACA_*`` keys), declared with
:func:`core.settings.setting`; :class:`IngestTuning` (not from the environment; tests shorten it).

Pure: no I/O, nothing of ours but :mod:`core`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from core.errors import ConfigError
from core.retry import RetryPolicy
from core.secret import Secret, check_token
from core.settings import setting

__all__ = ["ENRICHMENTS", "AssetClass", "IngestConfig", "IngestTuning", "OnConnectionLimit"]

AssetClass = Literal["stock", "crypto"]
OnConnectionLimit = Literal["exit", "wait"]
# Built-in enrichments (feeds.ingest.enrich): "risk" = window risk metrics from the bar's trades.
ENRICHMENTS = ("risk",)


MAX_QUEUE_SIZE = 1_000_000  # INGEST_QUEUE_SIZE's bound
# INGEST_HISTORY_LAG_S's bound, s: a live bar arrives a few seconds after its minute ends, and
# the gap check before it asks history for the minute before; a lag near a bar's length (60 s)
# cut that request before that minute, and the bar went out past a hole, uncounted (helper-100:
# 100 s lost a minute of every symbol after a disconnect)
MAX_HISTORY_LAG_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestConfig:
    """Alpaca bars -> Pub/Sub.

    Attributes:
        symbols: what to ingest (``AAPL,MSFT`` or ``BTC/USD,ETH/USD``).
        project: GCP project of the topic.
        topic: one topic id or ``projects/<p>/topics/<t>``; created when missing.
        api_key, secret_key: Alpaca market-data credentials (never logged).
        emulator_host: Pub/Sub emulator ``host:port`` (``PUBSUB_EMULATOR_HOST``, set by the
            loader); ``None`` = Google's endpoint.
        asset_class: ``stock`` (alpaca-py ``StockDataStream``) or ``crypto``
            (``CryptoDataStream``).
        feed: stock feed, ``iex`` (every plan) or ``sip`` (paid plans); crypto uses ``us``.
        stream_url: websocket URL override (tests, proxies), the full path included
            (``ws://127.0.0.1:PORT/v2/iex``); ``None`` = Alpaca's.
        data_url: historical REST base URL override without the version (``http://h:p``);
            ``None`` = ``https://data.alpaca.markets``.
        state_path: JSON file of the last published bar per symbol and the unfilled gaps; read
            at start, rewritten as bars are confirmed (an emptyDir or a volume in Kubernetes).
        enrich: built-in enrichments (:data:`ENRICHMENTS`); ``none`` = Alpaca's fields only.
        indicators: user indicators, ``module:factory`` each (see
            :mod:`feeds.ingest.enrich`).
        start_lookback_s: on the first start (no state file), minutes of the last
            ``start_lookback_s`` seconds are fetched from history before going live; 0 = none.
        history_lag_s: history is asked only for minutes that ended at least this long before
            the local clock, seconds (a clock ahead of Alpaca's must not fetch the minute still
            being built: its partial bar would be published and the complete live one dropped).
        future_tolerance_s: a stream bar, or a state file entry, dated more than this after
            the local clock is refused (it would make every later bar a duplicate), seconds.
        max_backfill_s: longest gap fetched from history, seconds; bars older than that before
            the first missing one are given up and reported as an unfilled gap.
        trades_backfill_max_s: longest span of trades fetched from history to enrich one batch
            of backfilled bars (the most recent ones), seconds; earlier bars of the batch carry
            no trade metrics (null).
        request_timeout_s: timeout of one historical REST request, seconds.
        max_attempts: attempts per historical call on 429/5xx/timeouts.
        on_connection_limit: Alpaca allows one market-data connection per key (error 406):
            ``exit`` stops this ingestor with exit code 3, ``wait`` keeps it as a standby that
            retries with backoff and takes over when the other connection ends.
        queue_size: stream messages buffered between the websocket and the publisher; when full,
            the websocket reader waits (back-pressure; Alpaca then drops a slow client, which
            reconnects and backfills).
    """

    # Shared with the runner, declared once elsewhere (runtime.config builds them in):
    # SYMBOLS (RunConfig), GOOGLE_CLOUD_PROJECT (GCPConfig), PUBSUB_TOPIC (PubSubFeedConfig),
    # ALPACA_API_KEY / ALPACA_SECRET_KEY (AlpacaBrokerConfig).
    symbols: tuple[str, ...]
    project: str | None
    topic: str
    api_key: Secret
    secret_key: Secret
    emulator_host: str | None = None
    asset_class: AssetClass = setting(
        "stock",
        env="INGEST_ASSET_CLASS",
        help="stock (StockDataStream) or crypto (CryptoDataStream)",
    )
    feed: Literal["iex", "sip"] = setting(
        "iex", env="INGEST_FEED", help="stock feed, iex (every plan) or sip (paid)"
    )
    stream_url: str | None = setting(
        None,
        env="INGEST_STREAM_URL",
        help="market-data websocket override with its path, e.g. "
        "ws://127.0.0.1:8765/v2/iex; default: Alpaca's",
    )
    data_url: str | None = setting(
        None,
        env="INGEST_DATA_URL",
        help="historical market-data REST override without the version; "
        "default: https://data.alpaca.markets",
    )
    state_path: Path = setting(
        Path("ingest-state.json"),
        env="INGEST_STATE_PATH",
        help="JSON file of the last published bar per symbol (no gap, no duplicate)",
    )
    enrich: tuple[str, ...] = setting(
        ("risk",),
        env="INGEST_ENRICH",
        help="built-in enrichments, comma list: risk (VWAP, realized variance, "
        "bipower variation, jump ratio from each bar's trades) or none",
    )
    indicators: tuple[str, ...] = setting(
        (),
        env="INGEST_INDICATORS",
        help="user indicators, comma list of module:factory",
    )
    start_lookback_s: float = setting(
        0.0,
        env="INGEST_START_LOOKBACK_S",
        help="on a first start (no state file), seconds of history to publish before going live",
        minimum=0,
    )
    history_lag_s: float = setting(
        5.0,
        env="INGEST_HISTORY_LAG_S",
        help="history is asked only for minutes that ended this many seconds before the local "
        "clock (a clock ahead of Alpaca's would otherwise backfill a minute still being built)",
        minimum=0,
    )
    future_tolerance_s: float = setting(
        120.0,
        env="INGEST_FUTURE_TOLERANCE_S",
        help="a bar (or state file entry) dated more than this after the local clock is refused",
        gt=0,
    )
    max_backfill_s: float = setting(
        7 * 86_400.0,
        env="INGEST_MAX_BACKFILL_S",
        help="longest gap fetched from history, seconds (older: reported unfilled)",
        gt=0,
    )
    trades_backfill_max_s: float = setting(
        3_600.0,
        env="INGEST_TRADES_BACKFILL_MAX_S",
        help="longest span of historical trades fetched to enrich backfilled bars, s",
        minimum=0,
    )
    request_timeout_s: float = setting(
        10.0,
        env="INGEST_REQUEST_TIMEOUT_S",
        help="timeout of one historical REST request, seconds",
        minimum=0.01,  # 1e-300 passed and failed at start as "Pub/Sub not reachable"
    )
    max_attempts: int = setting(
        6,
        env="INGEST_MAX_RETRIES",
        help="attempts per historical call on 429/5xx/timeouts",
        minimum=1,
    )
    on_connection_limit: OnConnectionLimit = setting(
        "exit",
        env="INGEST_ON_CONNECTION_LIMIT",
        help="when Alpaca refuses a second connection on the key (406): exit "
        "(exit code 3) or wait (standby, retries with backoff)",
    )
    queue_size: int = setting(
        100_000,
        env="INGEST_QUEUE_SIZE",
        help="stream messages buffered before the websocket reader waits (at most "
        "1,000,000: about 1 KB each)",
        minimum=1,
    )

    def __post_init__(self) -> None:
        if self.queue_size > MAX_QUEUE_SIZE:
            # a queue that can never fill is no back-pressure: memory runs out first (a
            # fresh-context attack set 10**12)
            raise ConfigError(
                f"INGEST_QUEUE_SIZE must be at most {MAX_QUEUE_SIZE:,} (about 1 KB a queued "
                f"message), got {self.queue_size:,}"
            )
        if self.history_lag_s > MAX_HISTORY_LAG_S:
            raise ConfigError(
                f"INGEST_HISTORY_LAG_S={self.history_lag_s:g}: expected at most "
                f"{MAX_HISTORY_LAG_S:g} s (a live bar's gap check asks history for the minute "
                "before it, which a longer lag would cut)"
            )
        check_token("ALPACA_API_KEY", self.api_key)
        check_token("ALPACA_SECRET_KEY", self.secret_key)
        if not self.symbols:
            raise ConfigError("SYMBOLS is required by the ingestor: expected a comma list")
        if len(set(self.symbols)) != len(self.symbols):
            raise ConfigError(f"SYMBOLS={','.join(self.symbols)}: expected each symbol once")
        if self.asset_class == "crypto":
            bad = [s for s in self.symbols if not _CRYPTO_SYMBOL.fullmatch(s)]
            if bad:
                raise ConfigError(
                    f"SYMBOLS: crypto symbols are upper-case BASE/QUOTE pairs, e.g. BTC/USD; "
                    f"got {bad}"
                )
        else:
            bad = [s for s in self.symbols if not _STOCK_SYMBOL.fullmatch(s)]
            if bad:
                raise ConfigError(
                    f"SYMBOLS: stock symbols are upper-case tickers (letters, digits, '.' for a "
                    f"share class, e.g. BRK.B; no wildcard '*', no spaces, no '/'); got {bad}"
                )
        if not self.topic or "," in self.topic:
            raise ConfigError(
                f"PUBSUB_TOPIC={self.topic!r}: the ingestor publishes to exactly one topic"
            )
        name = self.topic
        if name.startswith("projects/"):
            parts = name.split("/")
            if len(parts) != 4 or parts[2] != "topics" or not parts[1]:
                raise ConfigError(
                    f"PUBSUB_TOPIC={self.topic!r}: expected a topic id or "
                    "projects/<project>/topics/<topic>"
                )
            name = parts[3]
        if not _TOPIC_ID.fullmatch(name) or name.lower().startswith("goog"):
            raise ConfigError(
                f"PUBSUB_TOPIC={self.topic!r}: a topic id is 3-255 characters, starts with a "
                "letter, holds letters, digits and - _ . ~ + % only, and does not start with goog"
            )
        if not self.project and not self.topic.startswith("projects/"):
            raise ConfigError(
                "GOOGLE_CLOUD_PROJECT is required by the ingestor (or a full "
                "PUBSUB_TOPIC=projects/<p>/topics/<t>)"
            )
        if "none" in self.enrich:
            if len(self.enrich) > 1:
                raise ConfigError(f"INGEST_ENRICH={','.join(self.enrich)}: none stands alone")
            object.__setattr__(self, "enrich", ())
        for name in self.enrich:
            if name not in ENRICHMENTS:
                raise ConfigError(
                    f"INGEST_ENRICH: unknown enrichment {name!r}; expected some of "
                    f"{', '.join(ENRICHMENTS)}"
                )
        for spec in self.indicators:
            module, sep, attr = spec.partition(":")
            if not sep or not module or not attr:
                raise ConfigError(f"INGEST_INDICATORS: {spec!r}: expected module:factory")
        for name, url, schemes in (
            ("INGEST_STREAM_URL", self.stream_url, ("ws://", "wss://")),
            ("INGEST_DATA_URL", self.data_url, ("http://", "https://")),
        ):
            if url is not None and (
                not url.startswith(schemes) or not urlsplit(url).hostname
            ):  # "http://" alone has no host (helper-83)
                raise ConfigError(
                    f"{name}={url!r}: expected a URL starting with {schemes[0]} and a host"
                )

    @property
    def retry_policy(self) -> RetryPolicy:
        """Backoff of historical calls: :class:`~core.retry.RetryPolicy` with ``max_attempts``."""
        return RetryPolicy(attempts=self.max_attempts, initial_s=0.5, max_s=8.0)


# Alpaca's stock symbols are upper-case tickers with '.' for share classes (BRK.B); crypto pairs
# are BASE/QUOTE (BTC/USD). A lower-case symbol is refused by Alpaca's subscription answer
# only silently (no data), and '*' subscribes to every symbol, which the per-symbol state
# cannot track; both are refused here.
_STOCK_SYMBOL = re.compile(r"[A-Z][A-Z0-9.]{0,15}")
_CRYPTO_SYMBOL = re.compile(r"[A-Z0-9]{1,15}/[A-Z0-9]{1,15}")
# Pub/Sub resource names (https://cloud.google.com/pubsub/docs/create-topic#resource_names):
# 3-255 characters, starts with a letter, [A-Za-z0-9-_.~+%], not starting with "goog".
_TOPIC_ID = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")


@dataclass(frozen=True, slots=True, kw_only=True)
class IngestTuning:
    """Periods of the ingestor; the defaults suit production, tests shorten them.

    Attributes:
        bar_s: length of one Alpaca stream bar, seconds (the ``bars`` channel is minute bars).
        state_flush_s: longest the state file lags behind confirmed publishes, seconds; a hard
            kill can re-publish the bars confirmed in that window (same key and data hash:
            the runner drops them as duplicates).
        publish_attempts: attempts per message after the Pub/Sub client's own retries gave up
            (resume the ordering key, publish again in order); then the ingestor stops.
        poll_s: longest the worker waits for a stream message before it reaps publishes.
    """

    bar_s: float = 60.0
    state_flush_s: float = 0.2
    publish_attempts: int = 5
    poll_s: float = 0.05
