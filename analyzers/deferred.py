"""Decision records whose reads are resolved later, off the bar loop.

The bar loop (main thread) only hands over a bar's raw reads and the feeds' positions
(:meth:`~analyzers.tracking.AccessTracker.capture`, a few ints per feed). The decision writer's
thread resolves them (bar index -> bar time, data hash, look-ahead; grouped by symbol) for a
whole batch at once (:func:`settle_batch`, vectorised for the common read); a thread that reads
the record's ``data_accessed`` or ``lookahead_reads`` before that resolves that one record.
The record is then complete and never changes: reading it twice, or from two threads, gives the
same tuple.

Only used when every buffer resolution looks at only grows
(:attr:`~analyzers.tracking.AccessTracker.deferrable`: preloaded backtests), so resolving later
gives exactly what resolving at the bar would have given.

Thread context: :class:`PendingReads` is made on the main thread; :meth:`PendingReads.result` is
safe from any thread (serialised by the tracker's ``resolve_lock``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from analyzers.schema import DataAccess, DecisionRecord
from analyzers.tracking.columns import Columns, resolve_columns

if TYPE_CHECKING:
    from analyzers.tracking import AccessTracker, Read
    from analyzers.tracking.model import State

_DATA_ACCESSED = DecisionRecord._fields.index("data_accessed")
_LOOKAHEAD_READS = DecisionRecord._fields.index("lookahead_reads")


def _pending(record: tuple[Any, ...]) -> PendingReads:
    found: PendingReads = tuple.__getitem__(record, _DATA_ACCESSED)
    return found


class PendingReads:
    """One bar's raw reads and the feeds' positions at that bar, resolved once.

    Resolved either by the decision writer with a whole batch (:func:`settle_batch`: columns,
    vectorised) or, when something reads the record's ``data_accessed`` first, by
    :meth:`result` (per read). Whichever comes first fixes the bar's reads; the tuples
    :meth:`result` gives afterwards are built from that, so they never change.

    Args:
        tracker: the tracker that recorded the reads.
        reads: the bar's raw reads (a :class:`~analyzers.tracking._fastread.ReadBuffer` taken
            from the tracker's, or a list in pure Python; handed over: not used by the caller
            after).
        state: :meth:`~analyzers.tracking.AccessTracker.capture` at the end of the bar (its
            tuples, or the same numbers packed: :data:`~analyzers.tracking.model.State`).
    """

    __slots__ = ("_cols", "_lookaheads", "_reads", "_result", "_state", "_tracker")

    def __init__(
        self,
        tracker: AccessTracker,
        reads: Sequence[Read],
        state: State,
    ) -> None:
        self._tracker = tracker
        self._reads: Sequence[Read] | None = reads
        self._state: State | None = state
        self._result: tuple[tuple[DataAccess, ...], int] | None = None
        self._cols: tuple[Columns, int] | None = None  # resolved by settle_batch: (batch, bar)
        self._lookaheads: int | None = None

    @property
    def done(self) -> bool:
        """Resolved (its reads are fixed and counted)."""
        return self._lookaheads is not None

    @property
    def tracker(self) -> AccessTracker:
        return self._tracker

    def lookaheads(self) -> int:
        """Look-ahead reads of the bar (resolves it per read when nothing did yet)."""
        n = self._lookaheads
        return self.result()[1] if n is None else n

    def columns(self) -> tuple[Columns, int] | None:
        """``(batch columns, bar position in them)`` when :func:`settle_batch` resolved it."""
        return self._cols

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
                    cols = self._cols
                    if cols is not None:
                        result = (cols[0].data_accessed(cols[1]), 0)
                    else:
                        assert self._reads is not None and self._state is not None
                        result = tracker.resolve(self._reads, state=self._state)
                        self._reads = self._state = None  # free the raw reads
                    self._result = result
                    self._lookaheads = result[1]
        return result


def _by_tracker(pending: Sequence[PendingReads]) -> list[list[PendingReads]]:
    """The bars not resolved yet, grouped by the tracker that recorded them (slots read
    directly: once a record on the writer's thread)."""
    by_tracker: dict[int, list[PendingReads]] = {}
    last: AccessTracker | None = None
    bars: list[PendingReads] = []
    for p in pending:
        if p._lookaheads is None:  # not done
            tracker = p._tracker
            if tracker is not last:
                bars = by_tracker.setdefault(id(tracker), [])
                last = tracker
            bars.append(p)
    return list(by_tracker.values())


def _settle_columns(tracker: AccessTracker, group: list[PendingReads]) -> None:
    """Resolve as columns the bars of ``group`` that can be (``tracker.resolve_lock`` held)."""
    todo = [p for p in group if p._lookaheads is None]  # another thread may have resolved some
    raw = [(p._reads, p._state) for p in todo]
    cols = resolve_columns(tracker, raw) if raw else None  # type: ignore[arg-type]
    if cols is not None:
        for b, i in enumerate(cols.done):
            p = todo[i]
            p._cols = (cols, b)
            p._lookaheads = 0
            p._reads = p._state = None


def settle_batch(pending: Sequence[PendingReads]) -> None:
    """Resolve a batch of bars at once (the decision writer's thread, before it stores them):
    the common reads vectorised (:func:`~analyzers.tracking.columns.resolve_columns`), every
    other bar per read. Afterwards each is :attr:`~PendingReads.done`; those resolved as
    columns answer :meth:`PendingReads.columns`."""
    for group in _by_tracker(pending):
        tracker = group[0].tracker
        with tracker.resolve_lock:
            _settle_columns(tracker, group)
        for p in group:
            if p._lookaheads is None:
                p.result()


def settle_columns(pending: Sequence[PendingReads], wait_s: float) -> bool:
    """:func:`settle_batch` without its per-read part, and waiting at most ``wait_s`` seconds
    for each tracker's ``resolve_lock``: only the bars that resolve as columns (vectorised,
    about 0.3 us a read) are resolved; the others stay pending for whoever resolves them next.
    Returns False when a lock was not had in time (the rest of ``pending`` is left as it was).
    For a thread that must stay within a budget (:meth:`DecisionWriter.stop
    <analyzers.sinks.writer.DecisionWriter.stop>`)."""
    for group in _by_tracker(pending):
        tracker = group[0].tracker
        if not tracker.resolve_lock.acquire(timeout=max(wait_s, 0.0)):
            return False
        try:
            _settle_columns(tracker, group)
        finally:
            tracker.resolve_lock.release()
    return True


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
        return _pending(self).lookaheads()

    @property
    def pending(self) -> PendingReads:
        """The bar's reads, resolved or not (:func:`settle_batch`)."""
        return _pending(self)

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
