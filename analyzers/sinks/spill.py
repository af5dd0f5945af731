"""The writer's files: rows a sink could not take yet, and rows it refused for good.

Both are JSON lines (one row per line), appended and fsynced before the call returns, so a crash
loses nothing that reached them:

* :class:`SpillFile` (``spill-<sink>.jsonl``): rows waiting for their sink, in submission order;
  replayed first when the sink answers again, or at the next start.
* :class:`RejectedFile` (``rejected-<sink>.jsonl``): ``{"reason": ..., "row": ...}`` for each
  row a sink refused for good (a bad value); kept for a human, never replayed.

Thread context: the writer thread, and :meth:`DecisionWriter.stop
<analyzers.sinks.writer.DecisionWriter.stop>` on its owner's thread for what is left at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analyzers.sinks.base import Row


def append_lines(path: Path, lines: Sequence[str]) -> None:
    """Append text lines to ``path`` (folder created when missing) and fsync the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())


def _line(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


class SpillFile:
    """Rows waiting for their sink, oldest first.

    Args:
        path: the JSON-lines file (created with its folder on the first append).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.exists()

    def append(self, rows: Sequence[Row]) -> None:
        """Add rows at the end (fsynced).

        Raises:
            ValueError: a row holds NaN or infinity (not JSON).
        """
        append_lines(self.path, [_line(r) for r in rows])

    def read(self) -> list[dict[str, Any]]:
        """Every row in the file, in order."""
        return [
            json.loads(line)
            for line in self.path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]

    def keep(self, rows: Sequence[Row]) -> None:
        """Replace the content by ``rows`` (what is still to replay), atomically: written to a
        temporary file that then replaces this one, so a crash leaves the old or the new list."""
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows), encoding="utf-8"
        )
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink()


class RejectedFile:
    """Rows a sink refused for good, each with the reason.

    Args:
        path: the JSON-lines file (created with its folder on the first append).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, items: Sequence[tuple[Row, str]]) -> None:
        """Add ``(row, reason)`` pairs (fsynced)."""
        append_lines(self.path, [_line({"reason": reason, "row": row}) for row, reason in items])
