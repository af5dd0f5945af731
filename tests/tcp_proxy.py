"""A TCP proxy on loopback that can cut the network between a client and a server.

Clients connect to ``127.0.0.1:<proxy.port>``; every connection is piped to the upstream
address by two threads. :meth:`TcpProxy.cut` simulates a network cut:

* ``mode="reset"``: every open connection is closed at once (the client sees a reset) and new
  connections are refused (the listening socket is closed) until :meth:`TcpProxy.restore`;
* ``mode="blackhole"``: connections stay open but nothing is forwarded either way, and new
  connections are accepted and left silent (the client sees a hang, then its own timeouts).
* ``mode="answers"``: requests still reach the server but its answers are dropped (a one-way
  partition, or a response lost after the server acted): the client times out although the
  server did the work, so the outcome of every request made during the cut is unknown to it.

Used by the Pub/Sub fault tests and the soak benchmark, between the runner (or a subscriber) and
the emulator. Every thread it starts is a daemon owned by the proxy and joined by
:meth:`TcpProxy.close`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal

CutMode = Literal["reset", "blackhole", "answers"]


class TcpProxy:
    """Forward ``127.0.0.1:port`` to ``upstream`` (``host:port``), with cuts on demand.

    Args:
        upstream: ``host:port`` of the server.
        port: port to listen on (0: a free one; kept across :meth:`cut`/:meth:`restore`).
    """

    def __init__(self, upstream: str, port: int = 0) -> None:
        host, _, p = upstream.rpartition(":")
        self.upstream = (host, int(p))
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._cut: CutMode | None = None
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = port
        self.cuts = 0
        self._listen()

    @property
    def connections(self) -> int:
        """Client connections accepted and still held (each also has an upstream socket)."""
        with self._lock:
            return len(self._conns) // 2

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``: what clients use instead of the upstream address."""
        return f"127.0.0.1:{self.port}"

    def _listen(self) -> None:
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self.port = srv.getsockname()[1]
        self._listener = srv
        self._start(self._accept, srv)

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return  # listener closed (cut or close)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()  # upstream down: the client sees the connection end
                continue
            server.settimeout(None)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            self._start(self._pipe, client, server, False)
            self._start(self._pipe, server, client, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, answers: bool) -> None:
        """Copy ``src`` to ``dst`` (``answers``: the server-to-client direction)."""
        lost = False  # once part of an answer was dropped, the rest of the stream is too
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if answers and (lost or self._cut == "answers"):
                    lost = True
                    continue  # the server's answer is lost
                self._forwarding.wait()  # a blackhole holds the bytes (and the sender)
                if self._cut == "blackhole":
                    continue  # dropped
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def cut(self, mode: CutMode = "reset") -> None:
        """Cut the network (see the module docstring). Idempotent until :meth:`restore`."""
        with self._lock:
            if self._cut is not None:
                return
            self._cut = mode
            self.cuts += 1
            conns, self._conns = self._conns, []
            listener = self._listener
            if mode == "reset":
                self._listener = None
        if mode == "reset":
            if listener is not None:
                _close_listener(listener)
            for s in conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        else:
            with self._lock:
                self._conns = conns + self._conns
            if mode == "blackhole":
                self._forwarding.clear()

    def restore(self) -> None:
        """End the cut: new connections are forwarded again (connections cut by a blackhole or
        by lost answers are closed, as a real partition's connections usually end up)."""
        with self._lock:
            mode, self._cut = self._cut, None
            partial = mode in ("blackhole", "answers")
            conns = self._conns if partial else []
            if partial:
                self._conns = []
        if mode == "reset":
            self._listen()
        elif partial:
            for s in conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._forwarding.set()

    def close(self) -> None:
        """Close every socket and join every thread. Idempotent."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
            listener, self._listener = self._listener, None
            threads = list(self._threads)
        self._forwarding.set()
        if listener is not None:
            _close_listener(listener)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in threads:
            t.join(5)


def _close_listener(listener: socket.socket) -> None:
    """Close a listening socket and wake its blocked ``accept()``: on Linux a plain ``close()``
    leaves the thread blocked and the socket still accepting; ``shutdown()`` ends it."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)
    listener.close()
