"""Error hierarchy shared by every component (bottom layer: imports nothing of ours).

Classified as in freqtrade / google-api-core: what is retried (``TransientError``) is kept apart
from what needs a human (``ConfigError``) and from what is surfaced to the agent and never retried
(``OrderRejectedError``). Always ``raise ... from e`` so the cause survives.
"""

from __future__ import annotations


class AppError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(AppError, ValueError):
    """A setting is missing, unknown or invalid. Raised at start; the message names the variable
    and what was expected."""


class DataError(AppError, ValueError):
    """Input market data is invalid (bad CSV row, malformed message). The message names the source
    (file and line, or message id) and the reason."""


class TransientError(AppError):
    """A failure that may succeed when retried (HTTP 429/5xx, timeouts, connection resets)."""


class SinkError(AppError):
    """A decision sink failed in a way retrying will not fix (bad schema, permission denied)."""


class OrderRejectedError(AppError):
    """The broker or the risk guard refused an order. Surfaced to the agent as a Rejected order;
    never retried."""


class BrokerError(AppError):
    """The broker could not be read or driven (account, positions, orders); never an empty
    portfolio in its place."""


class LookAheadError(AppError):
    """An agent read a bar from the future (positive index) while strict look-ahead checking was
    on."""


class RetryInterruptedError(TransientError):
    """A retry loop gave up early because its stop event was set (shutdown)."""


class StopRequestedError(AppError):
    """A stop signal (SIGTERM, SIGINT) came while the process was still starting (reading its
    configuration's secrets): it ends without running; entry points exit 0."""
