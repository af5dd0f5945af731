"""Alpaca REST: one account over the Trading API or the Broker API, error classification,
retries.

* :class:`AlpacaApi` is the account's calls (account, positions, orders, clock), whichever API
  reaches it: :class:`TradingApi` on alpaca-py's ``TradingClient`` (``/v2/...``, key headers) or
  :class:`BrokerApi` on its ``BrokerClient`` (``/v1/trading/accounts/{account_id}/...``, HTTP
  Basic auth). :func:`make_api` builds the one ``config`` asks for; alpaca-py's own retries are
  off (it sleeps 3 s per 429/504) and every request gets a timeout (alpaca-py sets none).
* Errors are classified: :data:`TRANSIENT_HTTP` statuses, timeouts and connection errors are
  retried (:func:`is_transient`); any other HTTP error becomes :class:`AlpacaAPIError` at once.
* :class:`AlpacaCaller` runs each call under the project's one
  :class:`~core.retry.RetryPolicy` (capped exponential backoff, full jitter), interruptible by
  the broker's stop event or bounded by a deadline (the final sync at stop), and counts calls,
  retries and failures.

Alpaca behaviour relied on (docs.alpaca.markets, Trading API v2 and Broker API): error bodies
are ``{"code", "message"}``; 429 is the rate limit (200 requests/min per account); the open
orders listing leaves out held bracket legs and, with ``nested=true``, every order of a bracket
whose entry filled (alpacahq/alpaca-trade-api-js #87, alpaca-trade-api-python #322), so
:func:`open_orders` asks for the flat listing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from alpaca.broker.client import BrokerClient
from alpaca.common.enums import Sort
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import QueryOrderStatus
from alpaca.trading.models import Clock, TradeAccount
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import Position as AlpacaPosition
from alpaca.trading.requests import GetOrderByIdRequest, GetOrdersRequest, OrderRequest

from core.errors import BrokerError, RetryInterruptedError
from core.http import TRANSIENT_ERRORS, TRANSIENT_HTTP, TimeoutSession, is_transient
from core.retry import RetryPolicy
from runtime.brokers.alpaca.config import AlpacaBrokerConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

LIST_LIMIT = 500  # Alpaca's largest page of orders
MAX_RATE_WAIT_S = 60.0  # a rate-limit window is one minute
SUCCESSOR_SLACK = timedelta(seconds=5)  # a successor is created at (or just after) the replace

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


def rate_limit_wait_s(e: APIError, now_epoch_s: float, cap_s: float = MAX_RATE_WAIT_S) -> float:
    """Seconds until Alpaca's rate counter resets, from a 429's ``X-Ratelimit-Reset`` (epoch
    seconds; Alpaca staff on forum.alpaca.markets: "pause until that time"); 0 without one."""
    response = e.response
    raw = response.headers.get("X-Ratelimit-Reset") if response is not None else None
    try:
        reset = float(raw) if raw is not None else None
    except ValueError:
        reset = None
    if reset is None:
        return 0.0
    return min(cap_s, max(0.0, reset - now_epoch_s))


# -- the account's calls ----------------------------------------------------------------------


class AlpacaApi:
    """The calls the broker makes on its one account. Subclasses bind them to an API.

    Every method makes exactly one HTTP request and raises alpaca-py's ``APIError`` (or a
    ``requests`` error) as is: :class:`AlpacaCaller` classifies and retries.

    Thread context: one instance per thread (``requests.Session`` is not shared).
    """

    name = "trading"

    def account(self) -> TradeAccount:
        raise NotImplementedError

    def positions(self) -> list[AlpacaPosition]:
        raise NotImplementedError

    def orders(self, request: GetOrdersRequest) -> list[AlpacaOrder]:
        raise NotImplementedError

    def order(self, alpaca_id: str) -> AlpacaOrder:
        """One order with its legs (``nested=true``)."""
        raise NotImplementedError

    def order_by_coid(self, coid: str) -> AlpacaOrder:
        raise NotImplementedError

    def submit(self, request: OrderRequest) -> AlpacaOrder:
        raise NotImplementedError

    def cancel(self, alpaca_id: str) -> None:
        raise NotImplementedError

    def clock(self) -> Clock:
        raise NotImplementedError


class TradingApi(AlpacaApi):
    """The Trading API (``/v2``, ``APCA-API-KEY-ID`` headers) through ``TradingClient``."""

    name = "trading"

    def __init__(self, client: TradingClient) -> None:
        self.client = client

    def account(self) -> TradeAccount:
        return cast(TradeAccount, self.client.get_account())

    def positions(self) -> list[AlpacaPosition]:
        return cast(list[AlpacaPosition], self.client.get_all_positions())

    def orders(self, request: GetOrdersRequest) -> list[AlpacaOrder]:
        return cast(list[AlpacaOrder], self.client.get_orders(request))

    def order(self, alpaca_id: str) -> AlpacaOrder:
        return cast(
            AlpacaOrder, self.client.get_order_by_id(alpaca_id, GetOrderByIdRequest(nested=True))
        )

    def order_by_coid(self, coid: str) -> AlpacaOrder:
        return cast(AlpacaOrder, self.client.get_order_by_client_id(coid))

    def submit(self, request: OrderRequest) -> AlpacaOrder:
        return cast(AlpacaOrder, self.client.submit_order(request))

    def cancel(self, alpaca_id: str) -> None:
        self.client.cancel_order_by_id(alpaca_id)

    def clock(self) -> Clock:
        return cast(Clock, self.client.get_clock())


class BrokerApi(AlpacaApi):
    """The Broker API (``/v1/trading/accounts/{account_id}``, HTTP Basic auth) through
    ``BrokerClient``, on one account."""

    name = "broker"

    def __init__(self, client: BrokerClient, account_id: str) -> None:
        self.client = client
        self.account_id = account_id

    def account(self) -> TradeAccount:
        return cast(TradeAccount, self.client.get_trade_account_by_id(self.account_id))

    def positions(self) -> list[AlpacaPosition]:
        return cast(
            list[AlpacaPosition], self.client.get_all_positions_for_account(self.account_id)
        )

    def orders(self, request: GetOrdersRequest) -> list[AlpacaOrder]:
        return cast(list[AlpacaOrder], self.client.get_orders_for_account(self.account_id, request))

    def order(self, alpaca_id: str) -> AlpacaOrder:
        return cast(
            AlpacaOrder,
            self.client.get_order_for_account_by_id(
                self.account_id, alpaca_id, GetOrderByIdRequest(nested=True)
            ),
        )

    def order_by_coid(self, coid: str) -> AlpacaOrder:
        return cast(
            AlpacaOrder, self.client.get_order_for_account_by_client_id(self.account_id, coid)
        )

    def submit(self, request: OrderRequest) -> AlpacaOrder:
        # alpaca-py types this with its Broker API request classes, which only add an optional
        # ``commission``; a Trading API request serializes the same order fields.
        return cast(
            AlpacaOrder,
            self.client.submit_order_for_account(self.account_id, request),  # type: ignore[arg-type]
        )

    def cancel(self, alpaca_id: str) -> None:
        self.client.cancel_order_for_account_by_id(self.account_id, alpaca_id)

    def clock(self) -> Clock:
        return cast(Clock, self.client.get_clock())

    def sse_headers(self) -> dict[str, str]:
        """Basic auth and SSE headers for the events stream (never logged)."""
        return cast(dict[str, str], self.client._get_sse_headers())


def make_api(config: AlpacaBrokerConfig) -> AlpacaApi:
    """The account's calls on the API ``config`` selects (no request made); alpaca-py's
    retries off, a timeout on every request."""
    key, secret = config.api_key.reveal(), config.secret_key.reveal()
    client: TradingClient | BrokerClient
    api: AlpacaApi
    if config.account_id is not None:
        client = BrokerClient(
            key, secret, sandbox=not config.live_trading, url_override=config.endpoint
        )
        api = BrokerApi(client, config.account_id)
    else:
        client = TradingClient(
            key, secret, paper=not config.live_trading, url_override=config.base_url
        )
        api = TradingApi(client)
    client._retry = 0
    client._session = TimeoutSession(config.request_timeout_s)
    return api


# -- retries ----------------------------------------------------------------------------------


class AlpacaCaller:
    """Runs Alpaca calls with retries, error classification and counters.

    Args:
        policy: attempts and waits (``AlpacaBrokerConfig.retry_policy``).
        stop: the broker's stop event: a wait of an interruptible call ends at once when it is
            set (:class:`~core.errors.RetryInterruptedError`).
        on_retry: ``(operation, error)`` before each retry (metrics: retries).
        on_error: ``(operation, error)`` once per call that failed for good: every attempt
            failed, or Alpaca answered with a non-retryable status (metrics: errors). Not called
            when stopping interrupted the call.

    Attributes:
        calls: HTTP requests made (every attempt counts).
        retries: attempts that were retried.

    Thread context: any thread; hooks run on the calling thread (the orders, monitor, stream
    or main thread), so they must be thread-safe.
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
        self.stop = stop
        self.on_retry = on_retry
        self.on_error = on_error
        self.calls = 0
        self.retries = 0
        self._lock = threading.Lock()
        # reachability (readiness): when each request in flight began, by thread, and since
        # when no request got an answer (monotonic seconds; None while they do)
        self._in_flight: dict[int, float] = {}
        self._failing_since: float | None = None

    def reachable(self, limit_s: float) -> bool:
        """Alpaca answers: no request has been in flight for more than ``limit_s`` seconds,
        and requests have not failed without an answer (timeouts, refused connections, 5xx)
        for more than ``limit_s`` seconds. A slow Alpaca that answers within the request
        timeout stays reachable (helper-86 F6: judging by a whole monitor pass flapped on
        answers of 2-4 s); one that stalls, trickles or fails every attempt does not, long
        before the retries of one call give up. Any thread."""
        now = time.monotonic()
        with self._lock:
            oldest = min(self._in_flight.values(), default=None)
            failing = self._failing_since
        return (oldest is None or now - oldest <= limit_s) and (
            failing is None or now - failing <= limit_s
        )

    def _began(self) -> None:
        with self._lock:
            self.calls += 1
            self._in_flight[threading.get_ident()] = time.monotonic()

    def _ended(self, answered: bool) -> None:
        with self._lock:
            self._in_flight.pop(threading.get_ident(), None)
            if answered:
                self._failing_since = None
            elif self._failing_since is None:
                self._failing_since = time.monotonic()

    def count_request(self) -> None:
        """Count a request made outside :meth:`call` (a stream connection)."""
        with self._lock:
            self.calls += 1

    def call(
        self,
        operation: str,
        fn: Callable[..., T],
        *args: Any,
        what: str | None = None,
        interruptible: bool = True,
        deadline: float | None = None,
        attempts: int | None = None,
    ) -> T:
        """Call ``fn(*args)`` with retries on transient errors.

        Args:
            operation: short fixed name for logs and metrics (``"submit"``).
            what: names this call in logs and errors (``"submit s-42"``); default ``operation``.
            interruptible: give up when the stop event is set while waiting to retry; False
                for calls that must complete (start-up reads, the final sync at stop).
            deadline: ``time.monotonic()`` after which no retry wait goes on and no request
                begins (the final sync's budget): the waits themselves are the policy's, so a
                429 is really waited out.
            attempts: fewer attempts than the policy's (best-effort reads such as the clock).

        Raises:
            AlpacaAPIError: a non-retryable answer (4xx other than 429).
            RetryInterruptedError: stopping (interruptible calls) or the deadline passed while
                waiting to retry.
            TransientError: still failing after the policy's attempts.
        """
        label = what or operation
        attempt = 0
        policy = self.policy
        if attempts is not None:
            policy = dataclasses.replace(policy, attempts=attempts)
        stop: threading.Event | None = self.stop if interruptible else None
        timer: threading.Timer | None = None
        if deadline is not None:
            stop = threading.Event()
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), stop.set)
            timer.daemon = True
            timer.start()

        def once() -> T:
            nonlocal attempt
            if deadline is not None and time.monotonic() >= deadline:
                # no request begins after the budget (one already sent runs to its timeout)
                raise RetryInterruptedError(f"{label}: the stop budget is spent")
            attempt += 1
            self._began()
            try:
                out = fn(*args)
            except APIError as e:
                status, code, message = api_error_parts(e)
                self._ended(status is not None and status < 500)  # 4xx, 429: Alpaca answered
                error = e
            except BaseException as e:
                # an answer that did not parse is an answer; a timeout, a refused or reset
                # connection is not (requests' errors)
                self._ended(not isinstance(e, TRANSIENT_ERRORS))
                raise
            else:
                self._ended(True)
                return out
            if status == 429 and attempt < policy.attempts:
                # Alpaca counts requests per minute: waiting the backoff alone may retry
                # into the same full window; wait for its reset first
                wait_s = rate_limit_wait_s(error, time.time())
                if wait_s > 0:
                    logger.info("%s: rate limited; waiting %.2f s for the reset", label, wait_s)
                    if (stop or threading.Event()).wait(wait_s):
                        raise RetryInterruptedError(
                            f"{label}: stopping while waiting for the rate limit"
                        ) from error
            if status in TRANSIENT_HTTP:
                raise error
            raise AlpacaAPIError(label, status, code, message, attempt) from error

        def retried(e: BaseException) -> None:
            with self._lock:
                self.retries += 1
            if self.on_retry is not None:
                self.on_retry(operation, e)

        def failed(e: BaseException) -> None:
            if self.on_error is not None:
                self.on_error(operation, e)

        try:
            return policy.call(
                label,
                once,
                retry_on=is_transient,
                stop=stop,
                on_retry=retried,
                on_give_up=failed,
            )
        except AlpacaAPIError as e:
            failed(e)
            raise
        except RetryInterruptedError as e:
            if deadline is not None:
                failed(e)
            raise
        finally:
            if timer is not None:
                timer.cancel()


# -- listings ---------------------------------------------------------------------------------


def open_orders(api: AlpacaApi) -> list[AlpacaOrder]:
    """Every listed open order, flat (bracket legs as their own rows): one request.

    Alpaca leaves held legs out of it (alpaca-trade-api-python #322) and, nested, every order
    of a bracket whose entry filled (alpaca-trade-api-js #87); flat, the live take-profit leg
    is there.
    """
    return api.orders(
        GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=False, limit=LIST_LIMIT)
    )


def open_families(api: AlpacaApi) -> list[AlpacaOrder]:
    """Open orders with their legs nested (entries not filled yet, simple orders): one
    request."""
    return api.orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=True, limit=LIST_LIMIT))


def closed_families(
    api: AlpacaApi, after: datetime, max_pages: int
) -> tuple[list[AlpacaOrder], bool]:
    """Orders listed as closed since ``after``, legs nested, newest first, ``max_pages`` pages
    of 500 at most: held legs show up here under their filled entry.

    Returns:
        ``(orders, complete)``; ``complete`` is False when ``max_pages`` ran out first.
    """
    out: list[AlpacaOrder] = []
    seen: set[str] = set()
    until: datetime | None = None
    for _ in range(max_pages):
        page = api.orders(
            GetOrdersRequest(
                status=QueryOrderStatus.CLOSED,
                nested=True,
                limit=LIST_LIMIT,
                after=after,
                until=until,
                direction=Sort.DESC,
            )
        )
        fresh = [o for o in page if str(o.id) not in seen]
        out.extend(fresh)
        seen.update(str(o.id) for o in fresh)
        if len(page) < LIST_LIMIT or not fresh:
            return out, True
        until = min(o.created_at for o in page)
    return out, False


def successor_of(api: AlpacaApi, replaced: AlpacaOrder) -> AlpacaOrder | None:
    """The order that replaced ``replaced`` when Alpaca did not say (``replaced_by`` empty):
    the recent orders of its symbol, searched for ``replaces == replaced.id``. One request."""
    since = replaced.replaced_at or replaced.updated_at
    rows = api.orders(
        GetOrdersRequest(
            status=QueryOrderStatus.ALL,
            nested=False,
            limit=LIST_LIMIT,
            symbols=[str(replaced.symbol)],
            after=since - SUCCESSOR_SLACK,
            direction=Sort.ASC,
        )
    )
    return next(
        (o for o in rows if o.replaces is not None and str(o.replaces) == str(replaced.id)), None
    )
