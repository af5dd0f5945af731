"""Decision records whose reads are resolved later, off the bar loop.

The bar loop (main thread) only hands over a bar's raw reads and the feeds' positions
(:meth:`~analyzers.tracking.AccessTracker.capture`, a few ints per feed); the first thread that
asks for the record's ``data_accessed`` or ``lookahead_reads`` resolves them (bar index -> bar
time, data hash, look-ahead; grouped by symbol): normally the decision writer's thread when it
serialises the record. The record is then complete and never changes: reading it twice, or from
two threads, gives the same tuple.

Only used when every buffer resolution looks at only grows
(:attr:`~analyzers.tracking.AccessTracker.deferrable`: preloaded backtests), so resolving later
gives exactly what resolving at the bar would have given.

Thread context: :class:`PendingReads` is made on the main thread; :meth:`PendingReads.result` is
safe from any thread (serialised by the tracker's ``resolve_lock``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from analyzers.schema import DataAccess, DecisionRecord

if TYPE_CHECKING:
    from analyzers.tracking import AccessTracker, Read

_DATA_ACCESSED = DecisionRecord._fields.index("data_accessed")
_LOOKAHEAD_READS = DecisionRecord._fields.index("lookahead_reads")


def _pending(record: tuple[Any, ...]) -> PendingReads:
    found: PendingReads = tuple.__getitem__(record, _DATA_ACCESSED)
    return found


class PendingReads:
    """One bar's raw reads and the feeds' positions at that bar, resolved on first use.

    Args:
        tracker: the tracker that recorded the reads.
        reads: the bar's raw reads (the list is handed over: not used by the caller after).
        state: :meth:`~analyzers.tracking.AccessTracker.capture` at the end of the bar.
    """

    __slots__ = ("_reads", "_result", "_state", "_tracker")

    def __init__(
        self,
        tracker: AccessTracker,
        reads: list[Read],
        state: tuple[tuple[int, int, int, int], ...],
    ) -> None:
        self._tracker = tracker
        self._reads: list[Read] | None = reads
        self._state: tuple[tuple[int, int, int, int], ...] | None = state
        self._result: tuple[tuple[DataAccess, ...], int] | None = None

    @property
    def done(self) -> bool:
        return self._result is not None

    def result(self) -> tuple[tuple[DataAccess, ...], int]:
        """``(data_accessed, look-ahead reads)``, resolved once (any thread).

        Raises:
            LookAheadError: never here (strict mode is not deferred).
        """
        result = self._result
        if result is None:
            tracker = self._tracker
            with tracker.resolve_lock:
                result = self._result
                if result is None:
                    assert self._reads is not None and self._state is not None
                    result = tracker.resolve(self._reads, state=self._state)
                    self._result = result
                    self._reads = self._state = None  # free the raw reads
        return result


class DeferredRecord(DecisionRecord):
    """A :class:`~analyzers.schema.DecisionRecord` whose ``data_accessed`` and
    ``lookahead_reads`` fields hold a :class:`PendingReads`; reading either attribute resolves
    it (once). Pickles as the plain, resolved record. Serialise with attribute access
    (:func:`~analyzers.schema.to_row`, :func:`~analyzers.schema.row_json`) or
    :meth:`resolved`."""

    __slots__ = ()

    @property  # type: ignore[misc]
    def data_accessed(self) -> tuple[DataAccess, ...]:  # type: ignore[override]
        return _pending(self).result()[0]

    @property  # type: ignore[misc]
    def lookahead_reads(self) -> int:  # type: ignore[override]
        return _pending(self).result()[1]

    def resolved(self) -> DecisionRecord:
        """The same record as a plain :class:`~analyzers.schema.DecisionRecord`."""
        fields: list[Any] = list(self)
        pending: PendingReads = fields[_DATA_ACCESSED]
        data_accessed, lookaheads = pending.result()
        fields[_DATA_ACCESSED] = data_accessed
        fields[_LOOKAHEAD_READS] = lookaheads
        return DecisionRecord._make(fields)

    def __reduce__(self) -> tuple[Any, ...]:
        return (DecisionRecord._make, (tuple(self.resolved()),))
