"""Hold SIGINT/SIGTERM from a process's first lines until its real handlers are installed.

An entry point calls :func:`hold_early` before its heavy imports (backtrader, pyarrow, scipy:
seconds on a loaded machine): a signal in that window is kept, not fatal, and
:class:`core.signals.StopSignals` handles it once installed (an attack found SIGTERM during
start-up ended the process with 143, and SIGINT printed a ``KeyboardInterrupt`` traceback).

This module imports only ``os`` (already loaded by the interpreter's start-up) and the C module
``_signal``: ``signal`` pulls in ``enum`` (~11 ms here) and ``core.signals`` pulls in ``logging``
and ``threading`` (~25 ms), and every millisecond before the handler is set is a window in which
a signal still kills the process (a second attack hit it at 0-60 ms).

:func:`ignore_for_exit` covers the other end: once a process's outcome is decided and
printed, CPython's finalization puts the default handlers back before it tears the modules down
(0.4 s and more), and a signal then would turn exit code 0 (or 1, 2) into 128 + N.
"""

import _signal
import os

_STOP_SIGNALS = (_signal.SIGINT, _signal.SIGTERM)
_HELD: list[int] = []  # signals taken by hold_early's handler, not yet handled


def hold_early() -> None:
    """Hold SIGINT/SIGTERM from now until a :class:`~core.signals.StopSignals` (or
    :func:`take_held`) takes them: the first is kept, a second exits at once (``128 +
    signal``, as a second signal does later). Main thread only; call it first thing in a
    process's entry point, never from library code."""
    for sig in _STOP_SIGNALS:
        _signal.signal(sig, _hold)


def _hold(signum: int, frame: object) -> None:
    _HELD.append(signum)
    if len(_HELD) > 1:
        try:
            os.write(2, b"second signal during start-up: exiting\n")
        except OSError:
            pass
        os._exit(128 + signum)


def pending() -> bool:
    """A signal is held (by :func:`hold_early`'s handler) and not yet taken: a start-up step that
    waits (a secret read) can end early instead of holding the stop for its whole wait."""
    return bool(_HELD)


def take_held() -> list[int]:
    """The signal numbers :func:`hold_early` held and nobody took yet (then forgotten)."""
    held = _HELD[:]
    del _HELD[: len(held)]
    return held


def ignore_for_exit() -> None:
    """Ignore SIGINT/SIGTERM for the rest of the process: its outcome is decided (the report
    printed, the exit code known) and a signal during the interpreter's finalization must not
    change it. Call it as the entry point returns; only SIGKILL ends a finalization that hangs
    from here on.

    Ignored, not blocked: a signal mask is per thread, and the kernel hands a process-directed
    signal to any thread that does not block it (DuckDB's, gRPC's, the relay), where the default
    action CPython's finalization puts back would kill the process (CI found a blocked SIGTERM
    still ended it with 143). Finalization leaves an ignored signal ignored (CPython
    ``_PySignal_Fini`` resets only signals with a Python handler)."""
    for sig in _STOP_SIGNALS:
        _signal.signal(sig, _signal.SIG_IGN)
