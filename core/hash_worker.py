"""Data hashes of whole bar series computed in a helper process, off the GIL of the run.

Hashing a bar (:func:`core.bars.bar_hashes`) is Python work: about 4 us a bar, most of it the
shortest ``repr`` of each float. A backtest of 3 daily files of 5,000 bars asks for 15,000 of
them, on the decision writer's thread, and that thread shares the GIL with the bar loop. A
:class:`BarHashJob` hands the series to one helper process (:func:`main`) that hashes them on
the other core while the run goes on; :meth:`BarHashJob.result` collects them when first
needed.

The helper process is started with :mod:`subprocess`, not :mod:`multiprocessing`: a spawned
``multiprocessing`` child imports the parent's ``__main__`` again, and a user's script without
an ``if __name__ == "__main__"`` guard would run its backtest a second time. Its command
(``python -c``, :data:`_BOOT`) puts this project's folder first on the helper's path: a
``core`` package in the working folder must not shadow ours. Input and output go through
files in a private temporary folder (pickle, written and read by this module only).

Whatever goes wrong (no interpreter to start, the process fails, times out or returns the
wrong number of hashes), :meth:`BarHashJob.result` returns ``None``, logs why once, and the
caller hashes in its own thread as before: the same hashes either way
(``tests/unit/test_hash_worker.py``).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from core.bars import bar_hashes

logger = logging.getLogger(__name__)

# Bars hashed together in the helper; a block holding a bar the hash refuses (an infinite
# value) is left to the caller, whose one-bar path raises the error itself.
BLOCK = 256
# The helper's budget: TIMEOUT_S plus this per bar (it hashes ~100,000 bars a second here);
# past it the caller hashes in-thread
TIMEOUT_S = 120.0
TIMEOUT_PER_BAR_S = 1e-4
_ROOT = str(Path(__file__).resolve().parent.parent)  # the folder holding the ``core`` package
# The helper's command (``python -c``): this project's ``core`` first on the path, ahead of
# the working folder (a user's own ``core`` package there must not shadow it).
_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from core.hash_worker import main; sys.exit(main(sys.argv[2:]))"
)

Series = tuple[str, np.ndarray, Mapping[str, np.ndarray], Mapping[str, Sequence[str | None]]]
"""``(symbol, times in int64 microseconds since 1970 UTC, numeric columns, text columns)``:
the arguments of :func:`core.bars.bar_hashes`."""


def hash_series(
    symbol: str,
    times_us: np.ndarray,
    numeric: Mapping[str, np.ndarray],
    text: Mapping[str, Sequence[str | None]],
) -> list[str | None]:
    """:func:`core.bars.bar_hashes` of one series, ``None`` for every bar of a block it
    refuses (``ValueError``: an infinite value)."""
    out: list[str | None] = []
    for lo in range(0, len(times_us), BLOCK):
        hi = min(lo + BLOCK, len(times_us))
        try:
            out += bar_hashes(
                symbol,
                times_us[lo:hi],
                {k: v[lo:hi] for k, v in numeric.items()},
                {k: v[lo:hi] for k, v in text.items()},
            )
        except ValueError:
            out += [None] * (hi - lo)
    return out


class BarHashJob:
    """Hashes of some series, computed by one helper process started at construction.

    Args:
        series: the series to hash (see :data:`Series`).

    Thread context: any; :meth:`result` may be called from several threads (one waits, the
    others get the same answer). Construction never raises: a process that cannot start makes
    every :meth:`result` ``None``.
    """

    def __init__(self, series: Sequence[Series]) -> None:
        self._lengths = [len(s[1]) for s in series]
        self._timeout_s = TIMEOUT_S + TIMEOUT_PER_BAR_S * sum(self._lengths)
        self._lock = threading.Lock()
        self._results: list[list[str | None]] | None = None
        self._failed = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="fmel-hash-")
        self._cleanup = weakref.finalize(self, _cleanup, self._dir, [None])
        try:
            src = Path(self._dir, "in.pkl")
            with src.open("wb") as f:
                pickle.dump(list(series), f, protocol=pickle.HIGHEST_PROTOCOL)
            if not sys.executable:  # Python could not tell its own path (embedded)
                raise OSError("sys.executable is not set")
            with open(Path(self._dir, "stderr"), "wb") as err:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _BOOT, _ROOT, str(src), self._out],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    close_fds=True,
                )
            self._cleanup.detach()
            self._cleanup = weakref.finalize(self, _cleanup, self._dir, [self._proc])
        except (OSError, ValueError, TypeError, pickle.PicklingError) as e:
            self._fail(f"cannot start the helper process: {e}")

    @property
    def _out(self) -> str:
        return str(Path(self._dir, "out.pkl"))

    def result(self, k: int) -> list[str | None] | None:
        """Hashes of series ``k`` (``None`` where the helper left a bar to the caller), or
        ``None`` when the helper failed (logged once). Blocks until the helper is done, at
        most :data:`TIMEOUT_S` + :data:`TIMEOUT_PER_BAR_S` a bar, without holding the GIL."""
        with self._lock:
            if self._results is None and not self._failed:
                self._collect()
            return None if self._results is None else self._results[k]

    def _collect(self) -> None:
        proc = self._proc
        assert proc is not None
        try:
            code = proc.wait(timeout=self._timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self._fail(f"the helper process took more than {self._timeout_s:.0f} s")
            return
        try:
            if code != 0:
                err = Path(self._dir, "stderr").read_bytes()[-2000:].decode(errors="replace")
                self._fail(f"the helper process exited with {code}: {err.strip()[-500:]}")
                return
            with open(self._out, "rb") as f:
                results = pickle.load(f)
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self._fail(f"cannot read the helper's hashes: {e}")
            return
        finally:
            self._cleanup()
        if not isinstance(results, list) or [len(r) for r in results] != self._lengths:
            self._fail("the helper returned the wrong number of hashes")
            return
        self._results = results

    def _fail(self, why: str) -> None:
        self._failed = True
        self._cleanup()
        logger.warning("data hashes are computed in this process instead: %s", why)


def _cleanup(folder: str, procs: list[subprocess.Popen[bytes] | None]) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """The helper process: read the series from ``argv[0]``, write their hashes to
    ``argv[1]`` (atomically: a partial file is never read)."""
    src, dst = argv
    with open(src, "rb") as f:
        series: list[Series] = pickle.load(f)
    os.unlink(src)  # read: the parent may keep the folder a while
    results = [hash_series(*s) for s in series]
    tmp = dst + ".part"
    with open(tmp, "wb") as f:
        pickle.dump(results, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
