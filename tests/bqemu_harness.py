"""bqemulator (a BigQuery emulator speaking the REST API) run for tests, from its own venv.

bqemulator is never installed in the project venv (it downgrades protobuf there and its pytest
plugin aborts every run): ``tests/bqemu/setup.sh`` builds ``.venv-bqemu`` (override with
``BQEMU_VENV``), and the emulator runs as a subprocess through ``tests/bqemu/launch.py``, which
turns off its download of DuckDB's spatial extension (no network here). See
docs/field-notes.md, "BigQuery".

Every process is started in its own session and ended by process group at teardown, also when
the test fails. Ports are picked free on 127.0.0.1.

The fixtures that start and stop it (``bq_emulator``, ``bq_emulator_factory``) are in
``tests/conftest.py``; benchmarks use :class:`BigQueryEmulator` directly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from tests.conftest import REPO

BQEMU_DIR = REPO / "tests" / "bqemu"
START_TIMEOUT_S = 60.0
_setup_lock = threading.Lock()
logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bqemu_python() -> Path:
    """Python of the emulator's venv; created by ``tests/bqemu/setup.sh`` when missing.

    Raises:
        RuntimeError: when the venv cannot be created (the message has setup.sh's output).
    """
    venv = Path(os.environ.get("BQEMU_VENV") or REPO / ".venv-bqemu")
    python = venv / "bin" / "python"
    with _setup_lock:
        stamp = venv / ".side-venv-pins"
        pins = BQEMU_DIR / "requirements.txt"
        if not (python.is_file() and stamp.is_file() and stamp.read_bytes() == pins.read_bytes()):
            done = subprocess.run(
                ["bash", str(BQEMU_DIR / "setup.sh"), str(venv)],
                capture_output=True,
                text=True,
                timeout=900,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"tests/bqemu/setup.sh failed ({done.returncode}):\n"
                    f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
                )
    return python


class BigQueryEmulator:
    """One bqemulator process.

    Attributes:
        port: REST port (kept across :meth:`restart`, so clients reconnect to the same address).
        endpoint: ``http://127.0.0.1:PORT`` (the value of ``BIGQUERY_EMULATOR_HOST``).
        project: project id used by tests.
        data_dir: DuckDB storage folder when persistent (survives :meth:`restart`), else None.
    """

    def __init__(self, *, project: str = "test", persistent: bool = False) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.project = project
        self._tmp = Path(tempfile.mkdtemp(prefix="bqemu-"))
        self.data_dir: Path | None = self._tmp / "data" if persistent else None
        self.proc: subprocess.Popen[bytes] | None = None
        self._starts = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment for a runner subprocess that writes to this emulator."""
        return {"BIGQUERY_EMULATOR_HOST": self.endpoint, "GOOGLE_CLOUD_PROJECT": self.project}

    def start(self) -> None:
        """Start the process and wait until ``/readyz`` answers ok.

        Raises:
            RuntimeError: when it exits or is not ready within ``START_TIMEOUT_S``; the message
                carries the tail of its log.
        """
        python = bqemu_python()
        self._starts += 1
        cmd = [
            str(python),
            str(BQEMU_DIR / "launch.py"),
            "start",
            "--rest-host",
            "127.0.0.1",
            "--rest-port",
            str(self.port),
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--project",
            self.project,
            "--log-level",
            "warning",
            "--log-format",
            "json",
        ]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            cmd += ["--data-dir", str(self.data_dir)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BQEMU_", "PYTHON"))}
        log = open(self._tmp / f"emulator-{self._starts}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self._tmp,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"bqemulator exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if self.ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"bqemulator not ready after {START_TIMEOUT_S}s: {self.log_tail()}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/readyz", timeout=1) as r:
                return bool(json.loads(r.read()).get("status") == "ok")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _signal(self, sig: int, wait_s: float) -> bool:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return True
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return True
        try:
            proc.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after 5 s; wait. Idempotent."""
        if not self._signal(signal.SIGTERM, 5.0):
            self._signal(signal.SIGKILL, 10.0)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the process group, like a crash. Idempotent."""
        self._signal(signal.SIGKILL, 10.0)
        self.proc = None

    def restart(self) -> None:
        """Kill and start again on the same ports (data kept only when persistent)."""
        self.kill()
        self.start()

    def client(self) -> Any:
        """A real ``google.cloud.bigquery.Client`` on this emulator (anonymous credentials)."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(
            project=self.project,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.endpoint),
        )

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Run one query (no client retries, 60 s timeout); rows as dicts."""
        from google.cloud import bigquery

        client = self.client()
        try:
            job = client.query(
                sql,
                job_config=bigquery.QueryJobConfig(query_parameters=params or []),
                retry=None,
                timeout=60,
                job_retry=None,
            )
            return [dict(r.items()) for r in job.result(timeout=60, retry=None, job_retry=None)]
        finally:
            client.close()

    def log_tail(self, n: int = 3000) -> str:
        logs = sorted(self._tmp.glob("emulator-*.log"))
        return logs[-1].read_bytes()[-n:].decode(errors="replace") if logs else ""

    def server_errors(self, n: int = 3000) -> str:
        """The first log record holding a server-side traceback in this emulator's logs (one
        log per start; JSON lines), its start and its last ``n`` characters (where the error
        is), or ``""``: why it answered HTTP 500, for a failing test's report. A client that
        hung up (``ClientDisconnect``: our request timeouts) is not counted."""
        for log in sorted(self._tmp.glob("emulator-*.log")):
            for line in log.read_bytes().decode(errors="replace").splitlines():
                if "Traceback" in line and "ClientDisconnect" not in line:
                    cut = line if len(line) <= n + 300 else f"{line[:300]} ... {line[-n:]}"
                    return f"{log.name}: {cut}"
        return ""

    def close(self) -> None:
        """Stop the process; a server-side traceback in its logs is logged (WARNING, so a
        failing test's report carries it); remove its files."""
        self.stop()
        errors = self.server_errors()
        if errors:
            logger.warning("bqemulator on port %d logged a server error: %s", self.port, errors)
        shutil.rmtree(self._tmp, ignore_errors=True)


def unique_dataset(prefix: str = "t") -> str:
    """A dataset name no other test uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"
