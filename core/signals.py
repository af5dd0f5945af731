"""SIGINT/SIGTERM handling that takes no lock in the handler: the stop runs on a relay thread.

CPython runs a Python signal handler on the main thread between two bytecodes of whatever the
main thread was doing (Python docs, ``signal``: "Execution of Python signal handlers"). That can
be inside a ``with lock:`` block: the Pub/Sub hub's condition while a feed takes a step, an
``Event``'s own lock while the main thread waits on it. A handler that takes the same
non-reentrant lock waits for itself forever (CPython issue #126434, on ``Event.set`` from a
signal handler; the maintainers' advice is a dedicated thread). A runner stopped by SIGTERM hung
that way in CI: its handler closed the hub's input while the bar loop held the hub's lock.

:class:`StopSignals` keeps the handler to an integer increment and one ``os.write`` of the
signal number on a pipe; a daemon thread reads the pipe and calls ``on_stop`` there, where
taking locks is safe. A later signal calls ``on_force`` in the handler itself (it is expected
to end the process: ``os._exit``), so a stuck stop can still be cut short. ``at_once`` may do
a lock-free part of the stop in the handler itself (the runner's ``cerebro.runstop()``, one
attribute set): relayed, a backtest went on for 20-40 bars (the main thread hands the GIL over
every 5 ms, ``sys.getswitchinterval()``).

An entry point calls :func:`hold_early` (:mod:`core.held_signals`, re-exported here) before its
heavy imports, and :func:`ignore_for_exit` as it returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from core.held_signals import hold_early, ignore_for_exit, take_held

logger = logging.getLogger(__name__)

_END = b"\0"  # not a signal number: tells the relay thread to end

__all__ = ["StopSignals", "hold_early", "ignore_for_exit", "take_held"]


class StopSignals:
    """Relays the first of ``signals`` to ``on_stop(name)`` on a thread; later ones to
    ``on_force(name)`` in the handler (or to ``on_stop`` again when ``on_force`` is None).

    Args:
        on_stop: called on the relay thread with the signal's name (``"SIGTERM"``); may take
            locks, log, join. An exception is logged, not raised.
        on_force: called in the signal handler, on the main thread, for the second and later
            signals; must not take locks (``os._exit`` after flushing logs is the usual body).
        signals: the signals handled, default SIGINT and SIGTERM.
        at_once: called in the handler (main thread) with the first signal's name, before the
            relay; must not take locks: a flag or attribute set.

    Attributes:
        count: signals received so far (read it anywhere; only the handler writes it).
        first: the first signal's name, set in the handler before ``on_stop`` runs: a check on
            the main thread right after a signal sees it at once.

    Thread context: :meth:`install` and :meth:`restore` on the main thread only (Python allows
    ``signal.signal`` nowhere else).
    """

    def __init__(
        self,
        on_stop: Callable[[str], None],
        on_force: Callable[[str], None] | None = None,
        *,
        signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
        at_once: Callable[[str], None] | None = None,
        name: str = "signal-relay",
    ) -> None:
        self._on_stop = on_stop
        self._at_once = at_once
        self._on_force = on_force
        self._signals = tuple(signals)
        self._name = name
        self.count = 0
        self.first: str | None = None
        self._old: dict[int, Any] = {}
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def install(self) -> None:
        """Start the relay thread and install the handlers, then handle the signals
        :func:`hold_early` held. Main thread only; idempotent."""
        if self._pipe is not None:
            return
        r, w = os.pipe()
        os.set_blocking(w, False)  # the handler never blocks: at most a few bytes are queued
        self._pipe = (r, w)
        self._thread = threading.Thread(target=self._relay, args=(r,), name=self._name, daemon=True)
        self._thread.start()
        for sig in self._signals:
            self._old[sig] = signal.signal(sig, self._handle)
        for signum in take_held():
            logger.info("%s came during start-up; handled now", signal.Signals(signum).name)
            self._handle(signum, None)

    def restore(self, timeout_s: float = 5.0) -> None:
        """Put the earlier handlers back, end the relay thread (waiting up to ``timeout_s``
        for an ``on_stop`` in progress), close the pipe. Main thread only; idempotent."""
        for sig, handler in self._old.items():
            with contextlib.suppress(Exception):
                signal.signal(sig, handler)
        self._old.clear()
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        r, w = pipe
        with contextlib.suppress(OSError):
            os.write(w, _END)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():  # its read end stays open: closing it under a read
                os.close(w)  # could hand the descriptor number to someone else's file
                return
        os.close(w)
        os.close(r)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # No lock, no logging, no allocation beyond Python's own: see the module docstring.
        self.count += 1
        name = signal.Signals(signum).name
        if self.count > 1 and self._on_force is not None:
            self._on_force(name)
            return
        if self.first is None:
            self.first = name
            if self._at_once is not None:
                self._at_once(name)
        pipe = self._pipe
        if pipe is not None:
            with contextlib.suppress(OSError):  # EAGAIN: the pipe is full of signals already
                os.write(pipe[1], bytes((signum,)))

    def _relay(self, r: int) -> None:
        while True:
            try:
                data = os.read(r, 1)
            except OSError:
                return
            if not data or data == _END:
                return
            name = signal.Signals(data[0]).name
            try:
                self._on_stop(name)
            except Exception:
                logger.exception("handling %s failed", name)
