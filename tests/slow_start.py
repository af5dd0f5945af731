"""An agent module that takes 3 s to import, like an agent loading a large model at build time:
``AGENT=tests.slow_start:SlowStartAgent``. Only subprocess tests import it."""

from __future__ import annotations

import time

from tests.slow_agent import SlowStartAgent

time.sleep(3.0)

__all__ = ["SlowStartAgent"]
