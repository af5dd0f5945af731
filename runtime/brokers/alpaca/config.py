"""Alpaca broker settings: :class:`AlpacaBrokerConfig` (no ``alpaca-py`` import here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Literal

from core.errors import ConfigError
from core.retry import RetryPolicy
from core.secret import Secret, check_token
from core.settings import setting

PAPER_URL = "https://paper-api.alpaca.markets"
LIVE_URL = "https://api.alpaca.markets"
PAPER_STREAM_URL = "wss://paper-api.alpaca.markets/stream"
LIVE_STREAM_URL = "wss://api.alpaca.markets/stream"
BROKER_SANDBOX_URL = "https://broker-api.sandbox.alpaca.markets"
BROKER_LIVE_URL = "https://broker-api.alpaca.markets"
LIVE_HOSTS = frozenset({"api.alpaca.markets", "broker-api.alpaca.markets"})

OpenOrderPolicy = Literal["cancel", "adopt", "halt"]
TimeInForceName = Literal["day", "gtc", "ioc", "fok", "opg", "cls"]
_POLICIES: tuple[str, ...] = ("cancel", "adopt", "halt")
_TIME_IN_FORCE: tuple[str, ...] = ("day", "gtc", "ioc", "fok", "opg", "cls")


@dataclass(frozen=True, slots=True, kw_only=True)
class AlpacaBrokerConfig:
    """Alpaca broker. Paper endpoint unless ``live_trading`` is explicitly true.

    Two APIs reach an account: the Trading API (the default: ``APCA-API-KEY-ID`` headers,
    ``/v2/...``) and, with ``account_id``, the Broker API (HTTP Basic auth with the broker's
    keys, ``/v1/trading/accounts/{account_id}/...``; alpaca-py's ``BrokerClient``).

    Attributes:
        api_key, secret_key: credentials (never logged; ``repr`` is ``****``): Trading API keys,
            or the Broker API's key and secret with ``account_id``.
        account_id: the Broker API account to trade (a UUID); ``None`` = the Trading API.
        base_url: REST endpoint override without ``/v2`` or ``/v1`` (tests, proxies); ``None`` =
            Alpaca's paper endpoint (Broker API: sandbox), or the live one when
            ``live_trading``.
        live_trading: explicit opt-in to a real-money endpoint.
        poll_interval_s: order status poll period while no trade-updates stream is connected,
            seconds (one list call per poll).
        stream_poll_interval_s: order poll period while the stream is connected, seconds (the
            polls catch what a stream leaves out).
        use_stream: follow trade updates on Alpaca's stream (Trading API: the websocket;
            Broker API: the trade events SSE); polling is the fallback.
        open_order_policy: open orders found at start: ``cancel``, ``adopt`` or ``halt``.
        cancel_on_stop: cancel this session's open orders on shutdown.
        refresh_interval_s: account/positions refresh period, seconds (also refreshed after
            fills).
        time_in_force: override of the per-asset-class default (equities ``day``, crypto
            ``gtc``).
        stream_url: websocket override; ``None`` = derived from ``base_url`` or Alpaca's.
        request_timeout_s: timeout of one HTTP request, seconds.
        max_attempts: attempts per call on 429/5xx/timeouts before giving up.
        backoff_base_s, backoff_max_s: scale of the first and largest retry wait, seconds
            (:class:`~core.retry.RetryPolicy`: capped exponential, full jitter).
        wait_for_market_open: hold equity orders until the Alpaca clock says open (orders
            with ``extended_hours`` and crypto are never held).
        crypto_fee_bps: crypto fee booked at each fill until the account says otherwise, basis
            points of the fill, taken in the coin received (Alpaca's highest fee, tier 1 taker:
            a position is never overstated, so closing it is never refused).
        stop_timeout_s: longest the final sync at stop (cancels, final fills, the account)
            may take, seconds.

    Raises:
        ConfigError: at construction, naming the variable: a non-positive period or timeout,
            an unknown time in force or open-order policy, a URL without a scheme, an account
            id that is not a UUID, or Alpaca's live endpoint without ``live_trading``.
    """

    api_key: Secret = setting(
        env="ALPACA_API_KEY",
        help="Alpaca API key id",
        secret=True,
        alternatives=("APCA_API_KEY_ID",),
    )
    secret_key: Secret = setting(
        env="ALPACA_SECRET_KEY",
        help="Alpaca API secret key",
        secret=True,
        alternatives=("APCA_API_SECRET_KEY",),
    )
    account_id: str | None = setting(
        None,
        env="ALPACA_ACCOUNT_ID",
        help="Broker API account id: trade it through Alpaca's Broker API with the broker's "
        "keys; default: the Trading API",
    )
    base_url: str | None = setting(
        None,
        env="ALPACA_BASE_URL",
        help="endpoint override (tests, proxies); default: Alpaca paper",
        alternatives=("APCA_API_BASE_URL",),
    )
    live_trading: bool = setting(
        False, env="ALPACA_LIVE_TRADING", help="true to allow a live (real money) endpoint"
    )
    poll_interval_s: float = setting(
        2.0,
        env="ALPACA_POLL_INTERVAL_S",
        help="order status poll period while no trade-updates stream is connected, seconds",
        gt=0,
    )
    stream_poll_interval_s: float = setting(
        10.0,
        env="ALPACA_STREAM_POLL_INTERVAL_S",
        help="order status poll period while the trade-updates stream is connected, seconds",
        gt=0,
    )
    use_stream: bool = setting(
        True,
        env="ALPACA_USE_STREAM",
        help="follow trade updates on Alpaca's stream (polling is the fallback)",
    )
    open_order_policy: OpenOrderPolicy = setting(
        "halt",
        env="ALPACA_OPEN_ORDER_POLICY",
        help="open orders found at start: cancel, adopt or halt",
    )
    cancel_on_stop: bool = setting(
        False, env="ALPACA_CANCEL_ON_STOP", help="cancel open orders on shutdown"
    )
    refresh_interval_s: float = setting(
        30.0,
        env="ALPACA_REFRESH_INTERVAL_S",
        help="account/positions refresh period, seconds",
        gt=0,
    )
    time_in_force: TimeInForceName | None = setting(
        None,
        env="ALPACA_TIME_IN_FORCE",
        help="override time in force (day, gtc, ioc, fok, opg, cls)",
    )
    stream_url: str | None = setting(
        None,
        env="ALPACA_STREAM_URL",
        help="trade-updates stream override; default: derived from "
        "ALPACA_BASE_URL (ws(s)://host/stream; Broker API: its events SSE) or Alpaca's",
    )
    request_timeout_s: float = setting(
        10.0,
        env="ALPACA_REQUEST_TIMEOUT_S",
        help="timeout of one Alpaca HTTP request, seconds",
        gt=0,
    )
    max_attempts: int = setting(
        6,
        env="ALPACA_MAX_RETRIES",
        help="attempts per Alpaca call on 429/5xx/timeouts "
        "(capped exponential backoff with jitter)",
        minimum=1,
    )
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    wait_for_market_open: bool = setting(
        True,
        env="ALPACA_WAIT_FOR_MARKET_OPEN",
        help="hold equity orders until the Alpaca clock "
        "says the market is open (crypto is never held)",
    )
    crypto_fee_bps: float = setting(
        25.0,
        env="ALPACA_CRYPTO_FEE_BPS",
        help="crypto fee booked per fill until the account refresh, basis points, in the "
        "coin received",
        minimum=0,
    )
    stop_timeout_s: float = setting(
        8.0,
        env="ALPACA_STOP_TIMEOUT_S",
        help="longest the broker's stop (its threads, cancels, final fills, the account) may "
        "take, seconds",
        gt=0,
    )

    def __post_init__(self) -> None:
        check_token("ALPACA_API_KEY", self.api_key)
        check_token("ALPACA_SECRET_KEY", self.secret_key)
        if self.poll_interval_s <= 0:
            raise ConfigError(f"ALPACA_POLL_INTERVAL_S must be > 0, got {self.poll_interval_s}")
        if self.stream_poll_interval_s <= 0:
            raise ConfigError(
                f"ALPACA_STREAM_POLL_INTERVAL_S must be > 0, got {self.stream_poll_interval_s}"
            )
        if self.stop_timeout_s <= 0:
            raise ConfigError(f"ALPACA_STOP_TIMEOUT_S must be > 0, got {self.stop_timeout_s}")
        if self.crypto_fee_bps < 0:
            raise ConfigError(f"ALPACA_CRYPTO_FEE_BPS must be >= 0, got {self.crypto_fee_bps}")
        if self.account_id is not None:
            try:
                uuid.UUID(self.account_id)
            except ValueError as e:
                raise ConfigError(
                    f"ALPACA_ACCOUNT_ID={self.account_id!r}: expected the Broker API account "
                    "id, a UUID such as 7b3c2a10-5d4e-4f6a-9b8c-1d2e3f4a5b6c"
                ) from e
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
        if self.open_order_policy not in _POLICIES:
            raise ConfigError(
                "ALPACA_OPEN_ORDER_POLICY must be cancel, adopt or halt, got "
                f"{self.open_order_policy!r}"
            )
        if self.time_in_force is not None and self.time_in_force not in _TIME_IN_FORCE:
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
    def broker_api(self) -> bool:
        """True when the account is traded through the Broker API (``account_id`` set)."""
        return self.account_id is not None

    @property
    def points_at_live(self) -> bool:
        """True when ``base_url`` is an Alpaca live host (``api.alpaca.markets``,
        ``broker-api.alpaca.markets``)."""
        if self.base_url is None:
            return self.live_trading
        host = self.base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
        return host in LIVE_HOSTS

    @property
    def endpoint(self) -> str:
        """The REST endpoint the broker trades: ``base_url``, else Alpaca's paper (Broker API:
        sandbox) or live one."""
        if self.base_url:
            return self.base_url
        if self.broker_api:
            return BROKER_LIVE_URL if self.live_trading else BROKER_SANDBOX_URL
        return LIVE_URL if self.live_trading else PAPER_URL

    @property
    def stream_endpoint(self) -> str:
        """Where trade updates stream from: ``stream_url``; else, Trading API:
        ``ws(s)://<base_url host>/stream`` or Alpaca's paper/live websocket; Broker API: the
        REST endpoint (its events SSE lives there)."""
        if self.stream_url:
            return self.stream_url
        if self.broker_api:
            return self.endpoint
        if self.base_url:
            scheme, rest = self.base_url.split("://", 1)
            return f"{'wss' if scheme == 'https' else 'ws'}://{rest.rstrip('/')}/stream"
        return LIVE_STREAM_URL if self.live_trading else PAPER_STREAM_URL

    @property
    def retry_policy(self) -> RetryPolicy:
        """How each Alpaca call is retried: ``max_attempts`` calls, waits from
        ``backoff_base_s`` up to ``backoff_max_s`` (the project's one jitter rule)."""
        return RetryPolicy(
            attempts=self.max_attempts, initial_s=self.backoff_base_s, max_s=self.backoff_max_s
        )
