"""The operations endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` over plain HTTP.

* ``GET /healthz``: 200 while the process serves requests (and every registered liveness check
  passes); the Kubernetes liveness probe. Body: JSON ``{"status": "ok", "uptime_s": ...}``.
* ``GET /readyz``: 200 when every readiness check passes, else 503; the body lists each check
  with ``ok`` and a short ``detail``. The Runner registers: ``running`` (started, not
  draining), ``feeds`` (every live feed LIVE), ``broker`` (reachable), ``sink`` (decision writer
  not spilling).
* ``GET /metrics``: the run's :class:`~runtime.metrics.RunMetrics` in the Prometheus text format.

The server runs on one daemon thread owned by :class:`HealthServer` (``ThreadingHTTPServer``
spawns a short-lived thread per request); :meth:`HealthServer.stop` shuts it down and joins it.
Checks are called on request threads: they must be cheap and only read thread-safe state
(flags, counters), never touch backtrader objects' internals in a way that mutates them.
A check that raises counts as failed with the exception's type as detail (never its text,
which could carry a value from a request).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from prometheus_client import CONTENT_TYPE_LATEST

from runtime.metrics import RunMetrics

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 512  # served at once (~30 kB a thread); probes and a scraper need a few
IDLE_TIMEOUT_S = 10.0  # a silent connection is closed after this, seconds

CheckResult = bool | tuple[bool, str]
Check = Callable[[], CheckResult]


def _run_check(fn: Check) -> tuple[bool, str]:
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - a failing probe is "not ready", never a crash
        return False, f"check raised {type(e).__name__}"
    if isinstance(result, tuple):
        return bool(result[0]), str(result[1])
    return bool(result), "ok" if result else "failing"


class HealthServer:
    """HTTP server for probes and metrics.

    Args:
        port: TCP port; 0 binds a free one (tests; read :attr:`port` after :meth:`start`).
        host: address to bind (``HEALTH_HOST``): an IPv4 or IPv6 literal or a host name;
            ``0.0.0.0`` in a pod (the kubelet probes the pod IP), ``::`` for IPv6.
        metrics: what ``/metrics`` serves; ``None`` serves an empty page.

    Thread context: :meth:`add_check`, :meth:`set_draining`, :meth:`start` and :meth:`stop`
    from the owning (main) thread; checks run on request threads.
    """

    def __init__(
        self, *, port: int, host: str = "0.0.0.0", metrics: RunMetrics | None = None
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"health port must be 0..65535, got {port}")
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self._ready_checks: dict[str, Check] = {}
        self._live_checks: dict[str, Check] = {}
        self._draining = False
        self._started_at = time.monotonic()
        self._server: _BoundedServer | None = None
        self._thread: threading.Thread | None = None

    # -- checks -------------------------------------------------------------------------------

    def add_check(self, name: str, fn: Check, *, liveness: bool = False) -> None:
        """Register a readiness check (or a liveness one); same name replaces."""
        (self._live_checks if liveness else self._ready_checks)[name] = fn

    def set_draining(self) -> None:
        """From now on ``/readyz`` answers 503 (shutdown in progress)."""
        self._draining = True

    def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Run the readiness checks: ``(all ok, {name: {"ok": bool, "detail": str}})``."""
        results: dict[str, dict[str, Any]] = {}
        if self._draining:
            results["draining"] = {"ok": False, "detail": "shutting down"}
        for name, fn in list(self._ready_checks.items()):
            ok, detail = _run_check(fn)
            results[name] = {"ok": ok, "detail": detail}
        return all(r["ok"] for r in results.values()), results

    def liveness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Run the liveness checks (none by default: answering at all means alive)."""
        results = {}
        for name, fn in list(self._live_checks.items()):
            ok, detail = _run_check(fn)
            results[name] = {"ok": ok, "detail": detail}
        return all(r["ok"] for r in results.values()), results

    # -- server -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`), else the requested one."""
        if self._server is not None:
            return int(self._server.server_address[1])
        return self.requested_port

    def start(self) -> None:
        """Bind and serve on a background thread. Idempotent.

        Raises:
            OSError: the port is taken, or the host is not an address of this machine or does
                not resolve (``socket.gaierror``).
        """
        if self._server is not None:
            return
        owner = self

        class Handler(_Handler):
            server_owner = owner

        server_class = _Http6Server if ":" in self.host else _BoundedServer
        self._server = server_class((self.host, self.requested_port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            name="health-http",
            kwargs={"poll_interval": 0.2},
            daemon=True,
        )
        self._thread.start()
        logger.info(
            "health endpoint on http://%s:%d (/healthz /readyz /metrics)", self.host, self.port
        )

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, close the socket, join the thread. Idempotent."""
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _BoundedServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` with at most :data:`MAX_CONNECTIONS` connections served at once;
    one more is closed at once. With :attr:`_Handler.timeout` it bounds what idle or slow
    clients can hold (a fresh-context attack: 3,000 idle half-requests held 3,000 threads and
    80 MB for good; the NetworkPolicy lets any pod of the namespace reach the port)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: dict[Any, float] = {}  # connection -> monotonic start (insertion order)
        self._open_lock = threading.Lock()
        self.refused = 0
        self.evicted = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # Full: the oldest connection makes room (helper-84: 512 connections sending a
            # byte every 4 s never went silent for 10 s, and locked the probes out for good;
            # a probe is answered in milliseconds, so the oldest is never a live probe).
            self._evict_oldest()
            if not self._slots.acquire(timeout=1.0):
                self.refused += 1
                self.shutdown_request(request)
                return
        with self._open_lock:
            self._open[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._open_lock:
                self._open.pop(request, None)
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed (closed to make room, reset by its client): a debug line,
        not socketserver's traceback on stderr."""
        import sys

        logger.debug(
            "health endpoint: connection from %s ended: %r", client_address, sys.exc_info()[1]
        )

    def _evict_oldest(self) -> None:
        with self._open_lock:
            oldest = next(iter(self._open), None)
            if oldest is None:
                return
            self._open.pop(oldest)
        self.evicted += 1
        try:
            oldest.shutdown(socket.SHUT_RDWR)  # its handler's read ends; its thread returns
        except OSError:
            pass

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)
            self._slots.release()


class _Http6Server(_BoundedServer):
    """The same server on an IPv6 socket (``HEALTH_HOST=::``; the stdlib's is IPv4 only)."""

    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_owner: HealthServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # seconds a connection may stay silent (between requests, or in one) before it is closed;
    # a kubelet probe sends its request at once
    timeout = IDLE_TIMEOUT_S

    def do_GET(self) -> None:
        owner = self.server_owner
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            ok, checks = owner.liveness()
            body: dict[str, Any] = {
                "status": "ok" if ok else "failing",
                "uptime_s": round(time.monotonic() - owner._started_at, 3),
            }
            if checks:
                body["checks"] = checks
            self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
        elif path == "/readyz":
            ok, checks = owner.readiness()
            body = {"status": "ready" if ok else "not ready", "checks": checks}
            self._send(200 if ok else 503, json.dumps(body).encode(), "application/json")
        elif path == "/metrics":
            data = owner.metrics.render() if owner.metrics is not None else b""
            self._send(200, data, CONTENT_TYPE_LATEST)
        else:
            self._send(404, b'{"error": "not found"}', "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit every few seconds: keep them out of the INFO log.
        logger.debug("health %s", format % args)
