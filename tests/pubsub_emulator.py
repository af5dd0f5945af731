"""The real Google Pub/Sub emulator for tests: started on a free port, stopped by process group.

The emulator binary is started directly (not through ``gcloud beta emulators pubsub start``,
which leaves its Java child behind when killed), in its own session so that the whole process
group can be ended by PID at teardown. Ready when ``GET http://127.0.0.1:PORT/`` answers ``Ok``
(see ``docs/field-notes.md``, "Google Pub/Sub emulator").

The ``pubsub_emulator`` fixture of tests/conftest.py (one emulator per test module) or
``emulator_factory`` (one per test, for tests that kill and restart it) starts it. Nothing is left
running: every process started here is killed at teardown, also when the test fails.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 60.0


@functools.cache
def emulator_binary() -> Path:
    """Path of ``cloud-pubsub-emulator`` under the Cloud SDK root (``gcloud info``).

    Raises:
        RuntimeError: when gcloud or the emulator component is missing.
    """
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise RuntimeError(
            "gcloud is not on PATH; install the Cloud SDK with the pubsub-emulator component"
        )
    root = subprocess.run(
        [gcloud, "info", "--format=value(installation.sdk_root)"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()
    binary = Path(root) / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    if not binary.is_file():
        raise RuntimeError(
            f"Pub/Sub emulator not found at {binary}; run `gcloud components "
            "install pubsub-emulator` (or apt install "
            "google-cloud-cli-pubsub-emulator)"
        )
    return binary


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PubSubEmulator:
    """One emulator process.

    Attributes:
        port: its port (kept across :meth:`restart`, so clients reconnect to the same address).
        host: ``127.0.0.1:PORT``, the value of ``PUBSUB_EMULATOR_HOST``.
        project: the project id tests use (the emulator accepts any).
    """

    def __init__(self, port: int | None = None, project: str = "test-project") -> None:
        self.port = port or free_port()
        self.project = project
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_dir = Path(tempfile.mkdtemp(prefix="pubsub-emu-"))
        self._starts = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that talks to this emulator."""
        return {"PUBSUB_EMULATOR_HOST": self.host, "GOOGLE_CLOUD_PROJECT": self.project}

    def start(self) -> None:
        """Start the process and wait until it answers ``Ok``.

        Raises:
            RuntimeError: when it exits or does not answer within ``START_TIMEOUT_S``; the
                message carries the tail of its log.
        """
        self._starts += 1
        log = open(self._log_dir / f"emulator-{self._starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(emulator_binary()), "--host=127.0.0.1", f"--port={self.port}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Pub/Sub emulator exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"Pub/Sub emulator not ready after {START_TIMEOUT_S}s: {self.log_tail()}"
        )

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}/", timeout=1) as r:
                return bool(r.read().strip() == b"Ok")
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        """Kill the process group (SIGTERM, then SIGKILL after 5 s) and wait for it. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # The port must be free again before a restart binds it.
        deadline = time.monotonic() + 10
        while self.ready() and time.monotonic() < deadline:
            time.sleep(0.05)

    def kill(self) -> None:
        """Kill hard (SIGKILL to the group), like a crashed server. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

    def restart(self) -> None:
        """Stop (if running) and start again on the same port. State (topics, subscriptions,
        messages) is lost, as with a real restart of the emulator."""
        self.kill()
        self.start()

    def subscriptions(self) -> list[str]:
        """Paths of every subscription the emulator holds (in the test project)."""
        from feeds.pubsub import subscriber_client

        client = subscriber_client(self.host)
        try:
            request = {"project": f"projects/{self.project}"}
            return [s.name for s in client.list_subscriptions(request=request)]
        finally:
            client.close()

    def log_tail(self, n: int = 2000) -> str:
        logs = sorted(self._log_dir.glob("emulator-*.log"))
        return logs[-1].read_bytes()[-n:].decode(errors="replace") if logs else ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)
