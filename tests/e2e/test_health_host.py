"""``python runner.py`` with a bad ``HEALTH_HOST``: exit 2 naming the variable, before any bar
is read (a bad value, and an address this machine does not have)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_runner
from tests.pubsub_emulator import free_port


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("bad host!", "HEALTH_HOST='bad host!': expected an IP address"),
        # TEST-NET-3 (RFC 5737): well formed, but not an address of this machine.
        ("203.0.113.7", "HEALTH_HOST=203.0.113.7, HEALTH_PORT="),
    ],
)
def test_bad_health_host_exits_2_naming_it(workdir: Path, host: str, expected: str) -> None:
    proc = run_runner(workdir, {"HEALTH_HOST": host, "HEALTH_PORT": str(free_port())})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (workdir / "fmel.duckdb").exists()
