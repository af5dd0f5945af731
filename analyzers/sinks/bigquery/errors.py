"""What a BigQuery failure means: retry it, reject the row, or stop for a human.

* Transient (retried by the writer, then spilled): transport errors (refused, reset, timeouts),
  HTTP 408/429/5xx, 403 with a rate-limit reason, and per-row ``insertErrors`` whose reasons
  are all in :data:`RETRY_REASONS`.
* A poison row (:class:`PoisonRowError`): one row answered with a server error while the server
  answers other calls (the emulator's HTTP 500 on some bad values); the sink isolates and
  rejects it.
* Anything else from a request is the row's fault (rejected) or the setup's
  (:class:`~core.errors.SinkError`: credentials, permissions).
"""

from __future__ import annotations

from collections.abc import Mapping

# BigQuery reasons (error objects of a failed request or of insertErrors) that mean "try again".
RETRY_REASONS = frozenset(
    {"backendError", "internalError", "rateLimitExceeded", "timeout", "stopped", "quotaExceeded"}
)

POISON_PREFIX = "server error for this row"


class PoisonRowError(Exception):
    """One row the server refuses with a server error while it answers other calls."""


class UnreadableAnswerError(Exception):
    """An insertAll answered 2xx with a body that does not say which rows were stored (not a
    JSON object, or ``insertErrors`` naming rows the request did not have): the rows' outcome
    is unknown, as after a dropped connection (:func:`is_transport`)."""


def reasons(exc: BaseException) -> set[str]:
    """The ``reason`` of each error object a Google API error carries (``rateLimitExceeded``,
    ``backendError``, ...)."""
    errors = getattr(exc, "errors", None) or []
    return {str(e.get("reason")) for e in errors if isinstance(e, Mapping)}


def is_transient(exc: BaseException) -> bool:
    """True for failures that may pass when retried: transport errors (refused, reset,
    timeouts), HTTP 408/429/5xx, and 403 with a rate-limit reason (BigQuery's
    ``rateLimitExceeded``/``quotaExceeded``)."""
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if is_transport(exc) or isinstance(exc, auth_exc.TransportError | gexc.RetryError):
        return True
    if isinstance(exc, gexc.GoogleAPICallError):
        code = exc.code or 0
        if code in (408, 429) or code >= 500:
            return True
        return code == 403 and bool(reasons(exc) & RETRY_REASONS)
    return False


def is_transport(exc: BaseException) -> bool:
    """True when the request may never have reached BigQuery, or its answer never came back
    or could not be read (refused, reset, timed out, :class:`UnreadableAnswerError`): its
    outcome is unknown."""
    import requests

    return isinstance(
        exc,
        requests.exceptions.RequestException
        | ConnectionError
        | TimeoutError
        | UnreadableAnswerError,
    )


def describe(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"``, at most about 300 characters, for logs and
    errors."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"
