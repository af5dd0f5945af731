"""The writer's files: rows a sink could not take yet, and rows it refused for good.

Both are JSON lines (one row per line), appended and fsynced before the call returns, so a crash
loses nothing that reached them:

* :class:`SpillFile` (``spill-<sink>.jsonl``): rows waiting for their sink, oldest first. It is a
  queue on disk: rows are appended at the end and consumed from the head; the byte offset of the
  first row not yet consumed is kept beside it in ``spill-<sink>.jsonl.pos`` (replaced
  atomically), so draining a large spill costs one read of each row, not a rewrite of the file
  per batch. A crash between a write to the sink and the update of the offset leaves those rows
  in the queue: the next drain sends them again, and the sink recognises them by insert id
  (``decision_id``) and does not store them twice.
* :class:`RejectedFile` (``rejected-<sink>.jsonl``): ``{"reason": ..., "row": ...}`` for each
  row a sink refused for good (a bad value); kept for a human, never replayed.

Thread context: the writer thread, and :meth:`DecisionWriter.stop
<analyzers.sinks.writer.DecisionWriter.stop>` on its owner's thread for what is left at the end
(every method of :class:`SpillFile` holds the file's lock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from analyzers.sinks.base import Row

logger = logging.getLogger(__name__)


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append text lines to ``path`` (folder created when missing) and fsync the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _line(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False, default=_scalar)


def _scalar(value: Any) -> Any:
    """A numpy scalar (``np.int64``, ``np.float64``, ``np.bool_``) as its Python value (what
    ``json`` cannot write itself); anything else is refused as ``json`` would."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "shape", None) == ():
        return item()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_problems(rows: Sequence[Row]) -> list[tuple[int, str]]:
    """``(position, reason)`` of each row :meth:`SpillFile.append` cannot write as JSON."""
    out = []
    for i, row in enumerate(rows):
        try:
            _line(row)
        except (TypeError, ValueError) as e:
            out.append((i, f"not JSON: {type(e).__name__}: {e}"[:300]))
    return out


def _replace(tmp: Path, path: Path) -> None:
    """``os.replace`` after an fsync of ``tmp``, so a crash leaves the old or the new file."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Head(NamedTuple):
    """What :meth:`SpillFile.head` read: the rows, the byte offset just after them, and how many
    lines that covered (the rows plus any torn line skipped)."""

    rows: list[dict[str, Any]]
    end: int
    lines: int


class SpillFile:
    """Rows waiting for their sink, oldest first: a queue of JSON lines on disk.

    Args:
        path: the JSON-lines file (created with its folder on the first append); its consumed
            offset lives in ``<path>.pos``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.pos_path = self.path.with_name(self.path.name + ".pos")
        self._lock = threading.RLock()
        self._pending: int | None = None  # rows after the offset; counted on first use
        self._ends_clean = False  # the file ends with a newline (checked before the 1st append)

    def exists(self) -> bool:
        """Whether the file exists (it is removed once every row was consumed)."""
        return self.path.exists()

    # -- the head offset --------------------------------------------------------------------

    def _offset(self) -> int:
        try:
            text = self.pos_path.read_text(encoding="ascii").strip()
            return max(0, int(text))
        except (FileNotFoundError, ValueError):
            return 0

    def _set_offset(self, offset: int) -> None:
        tmp = self.pos_path.with_name(self.pos_path.name + ".tmp")
        tmp.write_text(str(offset), encoding="ascii")
        _replace(tmp, self.pos_path)

    # -- queue operations -------------------------------------------------------------------

    def append(self, rows: Sequence[Row]) -> None:
        """Add rows at the end (fsynced before returning).

        Raises:
            ValueError: a row holds NaN or infinity (not JSON).
            TypeError: a row holds a value JSON has no form for (numpy scalars are written as
                their Python values).
        """
        lines = [_line(r) for r in rows]
        with self._lock:
            if not self._ends_clean and self._torn_end():
                # An append cut short by a crash: end that line, or our first row would be
                # glued to it (the torn line is skipped when read).
                lines[0] = "\n" + lines[0]
            append_lines(self.path, lines)
            self._ends_clean = True
            if self._pending is not None:
                self._pending += len(rows)

    def _torn_end(self) -> bool:
        """Whether the file ends in the middle of a line."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return False
                f.seek(-1, os.SEEK_END)
                return f.read(1) != b"\n"
        except FileNotFoundError:
            return False

    def pending(self) -> int:
        """Rows not consumed yet (0 when there is no file). Counted by a scan of the file on
        the first call, then kept up to date by this object."""
        with self._lock:
            if self._pending is None:
                self._pending = 0
                if self.path.exists():
                    with open(self.path, "rb") as f:
                        f.seek(self._offset())
                        self._pending = sum(1 for line in f if line.strip())
            return self._pending

    def head(self, n: int) -> Head:
        """The first ``n`` rows not consumed yet and where they end (pass the :class:`Head` to
        :meth:`consume` once they are stored). A line that is not JSON (torn by a crash during
        its append, which therefore never returned), or is JSON but not an object (written by
        something else), is skipped with a warning."""
        rows: list[dict[str, Any]] = []
        lines = 0
        with self._lock:
            if not self.path.exists():
                return Head(rows, 0, 0)
            with open(self.path, "rb") as f:
                f.seek(self._offset())
                while len(rows) < n:
                    raw = f.readline()
                    if not raw:
                        break
                    if not raw.strip():
                        continue
                    lines += 1
                    try:
                        row = json.loads(raw)
                    except ValueError:
                        logger.warning(
                            "spill %s: skipping a torn line (%d bytes)", self.path, len(raw)
                        )
                        continue
                    if isinstance(row, dict):
                        rows.append(row)
                    else:  # JSON, but no decision row (42, null, a list): skipped as torn
                        logger.warning(
                            "spill %s: skipping a line that is not a JSON object: %.80r",
                            self.path,
                            raw,
                        )
                end = f.tell()
            return Head(rows, end, lines)

    def consume(self, head: Head) -> None:
        """The rows of ``head`` were stored: move the queue's head past them; remove the file
        (and its offset) when nothing is left."""
        end = head.end
        with self._lock:
            if self._pending is not None:
                self._pending = max(0, self._pending - head.lines)
            if not self.path.exists():
                return
            if end >= self.path.stat().st_size:
                self.remove()
            else:
                self._set_offset(end)

    def replace_head(self, head: Head, keep: Sequence[Row]) -> None:
        """Replace the rows of ``head`` by ``keep`` (those of them still waiting). Rewrites the
        file: rare, after a batch that was partly stored."""
        end = head.end
        with self._lock:
            if not self.path.exists():
                return
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as out, open(self.path, "rb") as src:
                out.write("".join(_line(r) + "\n" for r in keep).encode("utf-8"))
                src.seek(end)
                shutil.copyfileobj(src, out)
            _replace(tmp, self.path)
            self._ends_clean = False
            with contextlib.suppress(FileNotFoundError):
                self.pos_path.unlink()
            if self._pending is not None:
                self._pending = max(0, self._pending - head.lines + len(keep))
            if self.path.stat().st_size == 0:
                self.remove()

    def read(self) -> list[dict[str, Any]]:
        """Every row not consumed yet, in order (tests and tools; the writer reads by
        :meth:`head`)."""
        return self.head(2**62).rows

    def remove(self) -> None:
        """Delete the file and its offset (nothing is waiting any more)."""
        with self._lock:
            for p in (self.path, self.pos_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            self._pending = 0
            self._ends_clean = False


class RejectedFile:
    """Rows a sink refused for good, each with the reason.

    Args:
        path: the JSON-lines file (created with its folder on the first append).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, items: Sequence[tuple[Row, str]]) -> None:
        """Add ``(row, reason)`` pairs (fsynced)."""
        # NaN and infinities kept as written (Python's json reads them back): a row refused
        # for one must still land here, or its replay is retried at every start
        append_lines(
            self.path,
            [
                json.dumps({"reason": reason, "row": row}, separators=(",", ":"), default=repr)
                for row, reason in items
            ],
        )


class SpillDirInUseError(OSError):
    """Another live process holds the spill folder (:class:`SpillDirClaim`)."""


class SpillDirClaim:
    """An exclusive claim on a spill folder for the life of a process: ``flock`` on
    ``<folder>/.claim`` (released by the kernel when the process ends, also on ``kill -9``).

    A spill folder holds one process's journal, spill and its read position; two runners (or
    a runner and ``python -m runtime.drain``) sharing one stored an earlier run's decisions
    twice and stopped each other (attack on issue 17). The runner and the drain claim the
    folder at start. Thread context: the owner's thread.

    Raises:
        SpillDirInUseError: another process holds the claim (its pid in the message).
        OSError: the folder cannot be made or the file opened.
    """

    def __init__(self, folder: Path) -> None:
        import fcntl

        self._fd: int | None = None
        self.path = Path(folder) / ".claim"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SpillDirInUseError(
                f"{folder} is in use by another runner or drain (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the folder up (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        self.release()
