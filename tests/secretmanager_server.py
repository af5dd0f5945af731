"""A local Google Secret Manager server speaking the v1 REST API (stdlib ``http.server``).

Enough of ``secretmanager.googleapis.com`` for the real ``google-cloud-secret-manager`` client
with ``transport="rest"``: ``GET /v1/projects/{p}/secrets/{s}/versions/{v}:access`` answers
``AccessSecretVersionResponse`` JSON (``name`` with the resolved version number, ``payload.data``
base64, ``payload.dataCrc32c`` as a decimal string, as proto3 JSON renders int64). ``latest``
resolves to the highest enabled version. Errors follow Google's JSON error shape
``{"error": {"code", "message", "status"}}`` with the HTTP status, which the client maps to
``NotFound`` / ``PermissionDenied`` / ``ServiceUnavailable``.

Test controls: :meth:`add` (versions), :meth:`deny` (403), :meth:`fail_next` (503 for the next
N reads of a secret), ``bad_crc`` (a wrong checksum). Every request is kept in
:attr:`SecretManagerServer.requests`.

Thread context: one handler thread per connection; state changes hold one lock.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import google_crc32c

ACCESS_RE = re.compile(r"^/v1/projects/([^/]+)/secrets/([^/]+)/versions/([^/:]+):access$")


class SecretManagerServer:
    """Start with :meth:`start` (binds a free port on 127.0.0.1), stop with :meth:`stop`."""

    def __init__(self) -> None:
        self._versions: dict[tuple[str, str], list[bytes]] = {}
        self._denied: set[tuple[str, str]] = set()
        self._failures: dict[tuple[str, str], int] = {}
        self.bad_crc: set[tuple[str, str]] = set()
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control ------------------------------------------------------------------------------

    def add(self, project: str, secret: str, value: str | bytes) -> int:
        """Add a version; returns its number (1, 2, ...)."""
        data = value.encode() if isinstance(value, str) else value
        with self._lock:
            versions = self._versions.setdefault((project, secret), [])
            versions.append(data)
            return len(versions)

    def deny(self, project: str, secret: str) -> None:
        with self._lock:
            self._denied.add((project, secret))

    def fail_next(self, project: str, secret: str, n: int) -> None:
        with self._lock:
            self._failures[(project, secret)] = n

    def reads(self, secret: str) -> int:
        """How many access calls named ``secret``."""
        return sum(1 for _, p in self.requests if f"/secrets/{secret}/" in p)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def client(self) -> Any:
        """A real ``SecretManagerServiceClient`` pointed here (REST, anonymous credentials)."""
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import secretmanager

        return secretmanager.SecretManagerServiceClient(
            transport="rest",
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=self.url),
        )

    # -- serving ------------------------------------------------------------------------------

    def start(self) -> SecretManagerServer:
        owner = self

        class Handler(_Handler):
            server_owner = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            daemon=True,
            kwargs={"poll_interval": 0.1},
            name="fake-secretmanager",
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = None

    def _answer(self, path: str) -> tuple[int, dict[str, Any]]:
        m = ACCESS_RE.match(path)
        if m is None:
            return 404, _error(404, f"no route for {path}", "NOT_FOUND")
        project, secret, version = m.groups()
        key = (project, secret)
        with self._lock:
            if self._failures.get(key, 0) > 0:
                self._failures[key] -= 1
                return 503, _error(503, "The service is currently unavailable.", "UNAVAILABLE")
            if key in self._denied:
                return 403, _error(
                    403,
                    "Permission 'secretmanager.versions.access' denied for "
                    f"resource '{path[4:-7]}' (or it may not exist).",
                    "PERMISSION_DENIED",
                )
            versions = self._versions.get(key)
            if not versions:
                return 404, _error(
                    404,
                    f"Secret [projects/{project}/secrets/{secret}] not found or has no versions.",
                    "NOT_FOUND",
                )
            number = len(versions) if version == "latest" else int(version)
            if not 1 <= number <= len(versions):
                return 404, _error(
                    404,
                    f"Secret Version [projects/{project}/secrets/{secret}/"
                    f"versions/{version}] not found.",
                    "NOT_FOUND",
                )
            data = versions[number - 1]
            crc = int(google_crc32c.value(data)) + (1 if key in self.bad_crc else 0)
        return 200, {
            "name": f"projects/{project}/secrets/{secret}/versions/{number}",
            "payload": {"data": base64.b64encode(data).decode(), "dataCrc32c": str(crc)},
        }


def _error(code: int, message: str, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


class _Handler(BaseHTTPRequestHandler):
    server_owner: SecretManagerServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        owner = self.server_owner
        path = self.path.split("?", 1)[0]
        with owner._lock:
            owner.requests.append(("GET", path))
        status, body = owner._answer(path)
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass
