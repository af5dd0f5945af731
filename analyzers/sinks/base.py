"""What a decision store implements: :class:`DecisionSink`, its rows and its per-row refusals.

A sink receives rows in the :func:`analyzers.schema.to_row` shape (a JSON-ready mapping per
decision) from the :class:`~analyzers.sinks.writer.DecisionWriter` thread and answers with the
rows it refused for good (:class:`RowError`); a failure that may pass is raised as
:class:`~core.errors.TransientError` and retried by the writer.

Optional members the writer looks up (``getattr``), each with a safe default when missing:

* ``write_records(records)``: a fast path for fresh :class:`~analyzers.schema.DecisionRecord`
  values;
* ``before_replay(rows)``: called before rows of an earlier run's spill are sent (they may be
  stored already: a sink that cannot de-duplicate by ``decision_id`` looks them up);
* ``is_stored(decision_id) -> bool``: whether the sink confirmed that row stored, asked after a
  write failed part-way, so stored rows are counted written and not spilled;
* ``probe()``: a cheap call that raises :class:`~core.errors.TransientError` while the store
  does not answer, made before a large batch is sent after an outage;
* ``max_batch`` (int attribute): records per write when catching up (default 500);
* ``finishing()``: called once, before the first write after :meth:`~analyzers.sinks.writer.
  DecisionWriter.stop` began (the drain): the writes from there on are the last before
  ``close()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

Row = Mapping[str, Any]


class RowError(NamedTuple):
    """A row a sink refused for good: its position in the batch and why (field and message)."""

    index: int  # type: ignore[assignment]  # position in the batch; shadows tuple.index
    reason: str


class DecisionSink(Protocol):
    """A store of decision rows (the :func:`analyzers.schema.to_row` shape).

    Every method is called from the writer thread only.
    """

    name: str

    def open(self) -> None:
        """Create what is missing (dataset, table, views).

        Raises:
            TransientError: the store is unreachable now (the writer retries and spills).
            SinkError: the store can never take our rows (incompatible schema, no permission).
        """

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        """Write rows; return the ones refused for good (empty when all were written).

        Must be idempotent per ``decision_id`` where the store allows it (replays after a
        partial failure may resend rows).

        Raises:
            TransientError: nothing (or not everything) was written; the whole batch is retried.
        """
        ...

    def close(self) -> None:
        """Release connections. Idempotent."""

    def describe(self) -> str:
        """Where the rows go, for the report (``duckdb:/path/fmel.duckdb``)."""
        ...

    def example_query(self) -> str:
        """One SQL query users can paste to look at this run's decisions."""
        ...
