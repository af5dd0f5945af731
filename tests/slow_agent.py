"""A deliberately slow copy of the SMA-cross agent, for shutdown tests that need a run to be
in progress (or stuck in its stop) when a signal arrives. Used as
``AGENT=tests.slow_agent:SlowAgent`` by subprocess tests.

``StampingAgent`` notes when each bar started, for a test of how soon a stop lands.

Params (SlowAgent):
    sleep_s (float): pause in every ``next()``, seconds.
    stop_sleep_s (float): pause in ``stop()`` (a slow teardown), seconds; logs ``slow stop``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

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


class StampingAgent(SmaCrossAgent):
    """The SMA-cross agent, noting ``time.monotonic_ns()`` (one clock for every process of the
    host) at each ``next()``; writes them, one a line, to ``path`` at ``stop()``."""

    params = (("path", ""),)  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.stamps: list[int] = []

    def next(self) -> None:
        self.stamps.append(time.monotonic_ns())
        super().next()

    def stop(self) -> None:
        Path(self.p.path).write_text("\n".join(map(str, self.stamps)), encoding="ascii")
