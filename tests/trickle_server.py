"""A TCP server that answers HTTP a byte at a time, forever: a request never gets a whole
answer, yet every read of the socket gets a byte within any client timeout (``requests``'
timeout is per read of the socket, so it never fires). What a stalled proxy or an overloaded
endpoint can do; used against Secret Manager's and Alpaca's clients."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Trickle:
    """The running server: ``port`` on 127.0.0.1, ``accepted`` its connections so far."""

    port: int
    accepted: list[socket.socket] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextmanager
def trickling_server(every_s: float = 0.1) -> Iterator[Trickle]:
    """Serve until the block ends: a status line and one header, then a byte each
    ``every_s`` seconds on every connection (one thread each)."""
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = Trickle(listener.getsockname()[1])

    def trickle(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                while not stop.wait(every_s):  # a header byte at a time: never a whole answer
                    conn.sendall(b"X")
            except OSError:
                pass

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            server.accepted.append(conn)
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server
    finally:
        stop.set()
        listener.close()
