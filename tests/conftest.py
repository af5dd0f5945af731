"""Shared fixtures: repository paths and a helper that runs ``runner.py`` as a subprocess.

Component-specific fixtures (emulators, fake servers) live in ``tests/fixtures_*.py`` and are
imported by the test modules that need them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
TEST_DATA = REPO / "tests" / "data"

# Variables of ours that must not leak from the developer's shell into subprocess runs.
_OURS = (
    "MODE",
    "SYMBOLS",
    "AGENT",
    "AGENT_PARAMS",
    "AGENT_ID",
    "CASH",
    "COMMISSION",
    "BROKER",
    "PROGRESS",
    "DATA_DIR",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "HEALTH_PORT",
    "GOOGLE_CLOUD_PROJECT",
    "PROJECT_ID",
    "BIGQUERY_EMULATOR_HOST",
    "PUBSUB_EMULATOR_HOST",
)
_PREFIXES = (
    "FMEL_",
    "ALPACA_",
    "APCA_",
    "CSV_",
    "RISK_",
    "CHRONOS_",
    "BACKTEST_",
    "PUBSUB_",
    "SHUTDOWN_",
)


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any of our settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _OURS and not k.startswith(_PREFIXES)}
    env["PYTHONPATH"] = str(REPO)
    env.setdefault("PROGRESS", "off")
    env.update(extra or {})
    return env


def run_runner(
    cwd: Path,
    extra: Mapping[str, str] | None = None,
    timeout_s: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run ``python runner.py`` in ``cwd`` with a clean environment plus ``extra``."""
    return subprocess.run(
        [sys.executable, str(REPO / "runner.py")],
        cwd=cwd,
        env=clean_env(extra),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty working directory for a run (its fmel.duckdb and spill folder land here)."""
    d = tmp_path / "work"
    d.mkdir()
    return d
