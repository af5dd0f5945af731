"""Alpaca REST: client construction, error classification, retries.

* :func:`make_client` builds an alpaca-py ``TradingClient`` and :func:`prepare_client` makes it
  ours: alpaca-py's own retries off (it sleeps 3 s per 429/504) and a timeout on every request
  (alpaca-py sets none).
* Errors are classified: :data:`TRANSIENT_HTTP` statuses, timeouts and connection errors are
  retried (:func:`is_transient`); any other HTTP error becomes :class:`AlpacaAPIError` at once
  (a 4xx on submit is a rejected order, never retried).
* :class:`AlpacaCaller` runs each call under the project's one
  :class:`~core.retry.RetryPolicy` (capped exponential backoff, full jitter), interruptible by
  the broker's stop event, and counts calls, retries and failures.
* Typed calls (:func:`get_account` ...): alpaca-py annotates every answer as
  ``Model | RawData``; raw data is off here.

Alpaca behaviour relied on (docs.alpaca.markets, Trading API v2): error bodies are
``{"code", "message"}``; 429 is the rate limit (~200 requests/min).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

import requests
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import QueryOrderStatus
from alpaca.trading.models import Clock, TradeAccount
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import Position as AlpacaPosition
from alpaca.trading.requests import GetOrderByIdRequest, GetOrdersRequest, OrderRequest

from core.errors import BrokerError
from core.retry import RetryPolicy
from runtime.brokers.alpaca.config import AlpacaBrokerConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (requests.Timeout, requests.ConnectionError)
# Once the broker is stopping, the final sync cannot sit out a full backoff: its calls keep
# their attempts but wait at most this long between them, seconds.
STOPPING_WAIT_S = 0.05

CallHook = Callable[[str, BaseException], None]
"""``hook(operation, error)``; ``operation`` is a short fixed name (``"submit"``,
``"account"``), fit for a metric label."""


class AlpacaAPIError(BrokerError):
    """Alpaca answered with a status that retrying will not change (4xx other than 429).

    Attributes:
        status: HTTP status.
        code: Alpaca's error code (``None`` if the body was not Alpaca JSON).
        message: Alpaca's message.
        attempt: which attempt got this answer (``> 1`` means an earlier attempt may have
            landed).
    """

    def __init__(
        self, what: str, status: int | None, code: int | None, message: str, attempt: int
    ) -> None:
        super().__init__(f"{what}: HTTP {status} code {code}: {message}")
        self.status, self.code, self.message, self.attempt = status, code, message, attempt


def api_error_parts(e: APIError) -> tuple[int | None, int | None, str]:
    """``(HTTP status, Alpaca code, Alpaca message)`` of an alpaca-py ``APIError``."""
    status = e.status_code
    try:
        body = json.loads(str(e))
        return status, body.get("code"), str(body.get("message", ""))
    except (ValueError, AttributeError):
        return status, None, str(e)[:300]


def is_transient(e: BaseException) -> bool:
    """True for what a retry may fix: HTTP 429/5xx, timeouts, connection errors."""
    if isinstance(e, APIError):
        return e.status_code in TRANSIENT_HTTP
    return isinstance(e, TRANSIENT_ERRORS)


# -- clients ----------------------------------------------------------------------------------


class _TimeoutSession(requests.Session):
    """alpaca-py sends requests without a timeout; every request here gets one."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(  # type: ignore[override]
        self,
        method: str,
        url: str,
        *args: Any,
        **kwargs: Any,
    ) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(method, url, *args, **kwargs)


def make_client(config: AlpacaBrokerConfig) -> TradingClient:
    """An alpaca-py ``TradingClient`` for ``config``'s keys and endpoint (no request made)."""
    return TradingClient(
        config.api_key.reveal(),
        config.secret_key.reveal(),
        paper=not config.live_trading,
        url_override=config.base_url,
    )


def prepare_client(client: TradingClient, timeout_s: float) -> TradingClient:
    """Hand ``client``'s retries to :class:`AlpacaCaller` and give every request a timeout.

    Returns:
        ``client`` itself. Use one client per thread (``requests.Session`` is not shared).
    """
    client._retry = 0
    client._session = _TimeoutSession(timeout_s)
    return client


# -- retries ----------------------------------------------------------------------------------


class AlpacaCaller:
    """Runs Alpaca calls with retries, error classification and counters.

    Args:
        policy: attempts and waits (``AlpacaBrokerConfig.retry_policy``).
        stop: the broker's stop event: a wait of an interruptible call ends at once when it is
            set (:class:`~core.errors.RetryInterruptedError`); after it is set, calls that must
            finish (the final sync) wait at most :data:`STOPPING_WAIT_S` between attempts.
        on_retry: ``(operation, error)`` before each retry (metrics: retries).
        on_error: ``(operation, error)`` once per call that failed for good: every attempt
            failed, or Alpaca answered with a non-retryable status (metrics: errors). Not called
            when stopping interrupted the call.

    Attributes:
        calls: HTTP requests made (every attempt counts).
        retries: attempts that were retried.

    Thread context: any thread; hooks run on the calling thread (the orders, monitor or main
    thread), so they must be thread-safe.
    """

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        stop: threading.Event,
        on_retry: CallHook | None = None,
        on_error: CallHook | None = None,
    ) -> None:
        self.policy = policy
        self.stopping_policy = dataclasses.replace(
            policy,
            initial_s=min(policy.initial_s, STOPPING_WAIT_S),
            max_s=min(policy.max_s, STOPPING_WAIT_S),
        )
        self.stop = stop
        self.on_retry = on_retry
        self.on_error = on_error
        self.calls = 0
        self.retries = 0
        self._lock = threading.Lock()

    def call(
        self,
        operation: str,
        fn: Callable[..., T],
        *args: Any,
        what: str | None = None,
        interruptible: bool = True,
    ) -> T:
        """Call ``fn(*args)`` with retries on transient errors.

        Args:
            operation: short fixed name for logs and metrics (``"submit"``).
            what: names this call in logs and errors (``"submit s-42"``); default ``operation``.
            interruptible: give up when the stop event is set while waiting to retry; False
                for calls that must complete (start-up reads, the final sync at stop).

        Raises:
            AlpacaAPIError: a non-retryable answer (4xx other than 429).
            RetryInterruptedError: stopping while waiting to retry (interruptible calls).
            TransientError: still failing after the policy's attempts.
        """
        label = what or operation
        attempt = 0

        def once() -> T:
            nonlocal attempt
            attempt += 1
            with self._lock:
                self.calls += 1
            try:
                return fn(*args)
            except APIError as e:
                status, code, message = api_error_parts(e)
                if status in TRANSIENT_HTTP:
                    raise
                raise AlpacaAPIError(label, status, code, message, attempt) from e

        def retried(e: BaseException) -> None:
            with self._lock:
                self.retries += 1
            if self.on_retry is not None:
                self.on_retry(operation, e)

        def failed(e: BaseException) -> None:
            if self.on_error is not None:
                self.on_error(operation, e)

        stopping = self.stop.is_set()
        policy = self.stopping_policy if stopping and not interruptible else self.policy
        try:
            return policy.call(
                label,
                once,
                retry_on=is_transient,
                stop=self.stop if interruptible else None,
                on_retry=retried,
                on_give_up=failed,
            )
        except AlpacaAPIError as e:
            failed(e)
            raise


# -- typed calls ------------------------------------------------------------------------------


def get_account(c: TradingClient) -> TradeAccount:
    """``GET /v2/account``."""
    return cast(TradeAccount, c.get_account())


def get_positions(c: TradingClient) -> list[AlpacaPosition]:
    """``GET /v2/positions``."""
    return cast(list[AlpacaPosition], c.get_all_positions())


def get_open_orders(c: TradingClient) -> list[AlpacaOrder]:
    """Every open order, bracket legs nested under their parent (one request, up to 500)."""
    return cast(
        list[AlpacaOrder],
        c.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=True, limit=500)),
    )


def get_order(c: TradingClient, alpaca_id: str) -> AlpacaOrder:
    """``GET /v2/orders/{id}?nested=true``."""
    return cast(AlpacaOrder, c.get_order_by_id(alpaca_id, GetOrderByIdRequest(nested=True)))


def get_order_by_coid(c: TradingClient, coid: str) -> AlpacaOrder:
    """``GET /v2/orders:by_client_order_id``."""
    return cast(AlpacaOrder, c.get_order_by_client_id(coid))


def get_clock(c: TradingClient) -> Clock:
    """``GET /v2/clock``."""
    return cast(Clock, c.get_clock())


def submit_order(c: TradingClient, request: OrderRequest) -> AlpacaOrder:
    """``POST /v2/orders``."""
    return cast(AlpacaOrder, c.submit_order(request))


def cancel_order(c: TradingClient, alpaca_id: str) -> None:
    """``DELETE /v2/orders/{id}``."""
    c.cancel_order_by_id(alpaca_id)
