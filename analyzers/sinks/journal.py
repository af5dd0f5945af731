"""The writer's journal: decisions on local disk before anything else happens to them.

With a journal (paper runs), the writer thread appends every submitted record to
``journal-<sink>.jsonl`` and fsyncs it as soon as it wakes (a group commit of whatever came in
since), before the record is batched for its sink; then it tells its listeners that these records
are durable (the runtime acknowledges the Pub/Sub messages of their bars). Once a record has been
written to its sink, spilled or rejected, it is settled: the journal is emptied when nothing in it
is unsettled, and rewritten without the settled lines when they pile up. A journal left by a
killed process is moved into the spill file at the next start and replayed with it (stores keep
one row per ``decision_id``, so a record that had reached its sink is not stored twice).

Thread context: the writer thread; :meth:`DecisionJournal.recover` from the writer's owner at
start.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from analyzers.sinks.spill import SpillFile, append_lines

__all__ = ["DecisionJournal"]

logger = logging.getLogger(__name__)

# Settled lines kept in the file before it is rewritten with only the unsettled ones.
COMPACT_AFTER = 5_000


class DecisionJournal:
    """Append-only JSON lines of records that are durable but not yet settled.

    Args:
        path: the journal file (created with its folder on the first append).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._unsettled: collections.deque[str] = collections.deque()
        self._settled_in_file = 0

    def append(self, lines: Sequence[str]) -> None:
        """Append JSON rows (one text per record) and fsync: they are durable on return."""
        append_lines(self.path, lines)
        self._unsettled.extend(lines)

    def settle(self, n: int) -> None:
        """The ``n`` oldest unsettled records reached their sink (or the spill, or the rejected
        file): forget them; empty the file when nothing is left, compact it now and then."""
        n = min(n, len(self._unsettled))
        for _ in range(n):
            self._unsettled.popleft()
        self._settled_in_file += n
        if not self._unsettled:
            if self._settled_in_file:
                with open(self.path, "w", encoding="utf-8"):
                    pass  # truncated; losing this on a crash only replays settled rows again
                self._settled_in_file = 0
        elif self._settled_in_file >= COMPACT_AFTER:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in self._unsettled), encoding="utf-8")
            os.replace(tmp, self.path)
            self._settled_in_file = 0

    @property
    def unsettled(self) -> int:
        return len(self._unsettled)

    def recover(self, spill: SpillFile) -> int:
        """Move what a previous process left in the journal into ``spill`` (replayed with it),
        then delete the journal. Returns how many rows moved."""
        if not self.path.exists():
            return 0
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                # A line torn by a kill during its append: it never became durable (the
                # append had not returned), so no bar was acknowledged on it.
                logger.warning("journal %s: skipping a torn line (%d chars)", self.path, len(line))
        if rows:
            spill.append(rows)
            logger.warning(
                "%d decision records journaled by an earlier run were not confirmed stored; "
                "they are replayed from %s (stores keep one row per decision_id)",
                len(rows),
                spill.path,
            )
        self.path.unlink()
        return len(rows)
