"""The one retry policy: capped exponential backoff with full jitter, on tenacity.

Every retry loop of the project (Alpaca calls, BigQuery inserts, Pub/Sub reconnects, Secret
Manager reads) uses :class:`RetryPolicy`, so there is one jitter rule: attempt ``n`` (1-based)
waits ``uniform(0, min(max_s, initial_s * 2**(n-1)))`` seconds (AWS architecture blog,
"Exponential Backoff And Jitter", full jitter; tenacity's ``wait_random_exponential``). Waits are
interruptible by a stop event, and every retry and every final failure can be counted.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

from core.errors import ConfigError, RetryInterruptedError, TransientError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry.

    Attributes:
        attempts: calls in all, the first included (>= 1).
        initial_s: scale of the first wait, seconds.
        max_s: largest wait, seconds.
    """

    attempts: int = 6
    initial_s: float = 0.5
    max_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"retry attempts must be >= 1, got {self.attempts}")
        if not 0 < self.initial_s <= self.max_s:
            raise ConfigError(
                f"retry waits: need 0 < initial_s <= max_s, got {self.initial_s} and {self.max_s}"
            )

    def wait(self) -> tenacity.wait.wait_base:
        """tenacity's full-jitter exponential wait for this policy."""
        return tenacity.wait_random_exponential(multiplier=self.initial_s, max=self.max_s)

    def delay_s(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based), for loops that retry
        forever (reconnects, probes) rather than calling :meth:`call`."""
        state = tenacity.RetryCallState(tenacity.Retrying(), None, (), {})
        state.attempt_number = max(1, min(attempt, 64))
        return float(self.wait()(state))

    def call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        retry_on: Callable[[BaseException], bool],
        stop: threading.Event | None = None,
        on_retry: Callable[[BaseException], None] | None = None,
        on_give_up: Callable[[BaseException], None] | None = None,
        **kwargs: Any,
    ) -> T:
        """Call ``fn(*args, **kwargs)``, retrying failures for which ``retry_on`` is true.

        Args:
            what: names the call in logs and errors (``"submit order 42"``).
            retry_on: which exceptions are transient; any other propagates at once, unchanged.
            stop: when set during a wait, the wait ends and
                :class:`RetryInterruptedError` is raised.
            on_retry: called with the error before each wait (metrics: retries).
            on_give_up: called with the last error when every attempt failed (metrics: errors).

        Returns:
            What ``fn`` returned.

        Raises:
            TransientError: every attempt failed with a retryable error (``from`` the last one).
            RetryInterruptedError: ``stop`` was set while waiting.
            Exception: a non-retryable error from ``fn``, unchanged.

        Thread context: any thread; the policy holds no state.
        """

        def _sleep(seconds: float) -> None:
            if stop is not None and stop.wait(seconds):
                raise RetryInterruptedError(f"{what}: stopping while waiting to retry")
            if stop is None:
                threading.Event().wait(seconds)

        def _before_sleep(state: tenacity.RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            if err is not None:
                logger.debug(
                    "%s: attempt %d failed (%s); retrying", what, state.attempt_number, _brief(err)
                )
                if on_retry is not None:
                    on_retry(err)

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=self.wait(),
            retry=tenacity.retry_if_exception(retry_on),
            sleep=_sleep,
            before_sleep=_before_sleep,
            reraise=False,
        )
        try:
            return retrying(fn, *args, **kwargs)
        except tenacity.RetryError as e:
            last = e.last_attempt.exception()
            if on_give_up is not None and last is not None:
                on_give_up(last)
            raise TransientError(
                f"{what}: still failing after {self.attempts} attempts: {_brief(last)}"
            ) from last


def _brief(err: BaseException | None) -> str:
    if err is None:
        return "?"
    text = str(err)
    return f"{type(err).__name__}: {text[:200]}" if text else type(err).__name__
