"""HTTP plumbing shared by the Alpaca clients (the broker's and the ingestor's history calls).

* :class:`TimeoutSession`: alpaca-py sends its REST requests through a ``requests.Session``
  without a timeout; this one gives every request a timeout, can refuse the next request once a
  stop is requested (alpaca-py follows ``next_page_token`` itself, one request per page, so a
  long history download stops between pages), and keeps the ``Date`` header of the last answer
  (the server's clock, RFC 9110 section 6.6.1).
* :func:`is_transient`: what a retry may fix: HTTP 429 and 5xx answers (alpaca-py's
  ``APIError``), timeouts and connection errors. Alpaca documents 429 for its rate limit
  (docs.alpaca.markets/docs/about-market-data-api and /reference, "Rate limit").

Thread context: one session per thread (``requests.Session`` is not shared).
"""

from __future__ import annotations

import contextlib
import email.utils
import threading
import time
from datetime import UTC, datetime
from typing import Any

import requests

from core.errors import RetryInterruptedError

__all__ = ["TRANSIENT_ERRORS", "TRANSIENT_HTTP", "TimeoutSession", "is_transient"]

TRANSIENT_HTTP = frozenset({429, 500, 502, 503, 504})
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (requests.Timeout, requests.ConnectionError)


def is_transient(e: BaseException) -> bool:
    """True for what a retry may fix: HTTP 429/5xx (alpaca-py ``APIError``), timeouts,
    connection errors."""
    from alpaca.common.exceptions import APIError

    if isinstance(e, APIError):
        return e.status_code in TRANSIENT_HTTP
    return isinstance(e, TRANSIENT_ERRORS)


class TimeoutSession(requests.Session):
    """A ``requests.Session`` whose every request has a timeout.

    Args:
        timeout_s: per request (connect and read), seconds.
        stop: when set, the next request raises :class:`~core.errors.RetryInterruptedError`
            instead of being sent.

    Attributes:
        server_date: ``(Date header as UTC, time.monotonic() when it arrived)`` of the last
            answer that had one, else None.
    """

    def __init__(self, timeout_s: float, stop: threading.Event | None = None) -> None:
        super().__init__()
        self.timeout_s = timeout_s
        self.stop = stop
        self.server_date: tuple[datetime, float] | None = None

    def request(  # type: ignore[override]
        self, method: str, url: str, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if self.stop is not None and self.stop.is_set():
            raise RetryInterruptedError("stopping: the next request is not sent")
        kwargs.setdefault("timeout", self.timeout_s)
        response = super().request(method, url, *args, **kwargs)
        date = response.headers.get("Date")
        if date:
            with contextlib.suppress(TypeError, ValueError, IndexError):
                when = email.utils.parsedate_to_datetime(date)
                if when.tzinfo is not None:
                    self.server_date = (when.astimezone(UTC), time.monotonic())
        return response
