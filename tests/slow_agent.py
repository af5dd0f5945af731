"""A deliberately slow copy of the SMA-cross agent, for shutdown tests that need a run to be
in progress (or stuck in its stop) when a signal arrives. Used as
``AGENT=tests.slow_agent:SlowAgent`` by subprocess tests.

Params:
    sleep_s (float): pause in every ``next()``, seconds.
    stop_sleep_s (float): pause in ``stop()`` (a slow teardown), seconds; logs ``slow stop``.
"""

from __future__ import annotations

import logging
import time

from agents.sma_cross import SmaCrossAgent

logger = logging.getLogger(__name__)


class SlowAgent(SmaCrossAgent):
    params = (("sleep_s", 0.002), ("stop_sleep_s", 0.0))  # type: ignore[assignment]

    def next(self) -> None:
        time.sleep(self.p.sleep_s)
        super().next()

    def stop(self) -> None:
        if self.p.stop_sleep_s > 0:
            logger.warning("slow stop: %.0f s", self.p.stop_sleep_s)
            time.sleep(self.p.stop_sleep_s)


class SlowStartAgent(SmaCrossAgent):
    """The SMA-cross agent under another name; ``tests.slow_start`` imports it slowly."""
