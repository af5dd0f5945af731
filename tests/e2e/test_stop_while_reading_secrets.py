"""A SIGTERM while an entry point still reads its secrets from Secret Manager.

Before, the signal was held (``core.held_signals``) until every secret read had ended: each may
retry for ``deadline + timeout`` (30 s and more), so a pod being stopped waited that long, or
was killed. Now the read's wait ends when a signal is held, and the entry point exits 0 having
run nothing. Secret Manager here is a socket that accepts and never answers (as a stalled
endpoint does), so the read is in flight when the signal comes.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO, sigterm_when_ready

pytestmark = pytest.mark.slow

ENTRY_POINTS = {
    "runner": [str(REPO / "runner.py")],
    "ingest": ["-m", "runtime.ingest"],
    "drain": ["-m", "runtime.drain"],
}


@pytest.mark.parametrize(
    ("entry", "stalled"),
    [*((e, "secret manager") for e in sorted(ENTRY_POINTS)), ("runner", "metadata server")],
)
def test_a_sigterm_while_a_secret_is_read_ends_the_start_at_once(
    workdir: Path, entry: str, stalled: str
) -> None:
    """``stalled``: what never answers. ``metadata server``: a short secret name without
    GOOGLE_CLOUD_PROJECT makes the runner ask Application Default Credentials for the project,
    which probes the GCE metadata server (helper-86 F5: exit 2 after 14 s)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(conn)  # held open, never answered

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    env = {
        "MODE": "paper",
        "BROKER": "alpaca",
        "SYMBOLS": "GOOG",
        "GOOGLE_CLOUD_PROJECT": "test-project",
        "PUBSUB_TOPIC": "bars",
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",  # never reached: the secrets come first
        "ALPACA_API_KEY_SECRET": "alpaca-key",
        "ALPACA_SECRET_KEY": "not-read-0123456789",
        "SECRET_MANAGER_ENDPOINT": f"http://127.0.0.1:{port}",
    }
    if stalled == "metadata server":  # a backtest whose LOG_LEVEL is a short secret name
        env = {
            "LOG_LEVEL_SECRET": "log-level",
            "SECRET_MANAGER_ENDPOINT": "http://127.0.0.1:1",  # not reached: the project first
            "GCE_METADATA_HOST": f"127.0.0.1:{port}",
            "GCE_METADATA_IP": f"127.0.0.1:{port}",
        }
    try:
        code, stderr, elapsed = sigterm_when_ready(
            ENTRY_POINTS[entry], workdir, env, lambda: bool(accepted), ready_timeout_s=90
        )
    finally:
        listener.close()
        for conn in accepted:
            conn.close()
    assert code == 0, stderr[-2000:]
    want = "reading projects/" if stalled == "secret manager" else "finding the project"
    assert f"stopped (a signal) while {want}" in stderr, stderr[-2000:]
    assert elapsed < 5.0, elapsed  # before: the read's 10 s timeout, then its retries (30 s)
