"""The writer thread between the FMEL analyzer and a decision sink.

:class:`DecisionWriter` owns one background thread. ``submit()`` is called on the main thread
from the analyzer and only appends to a bounded buffer (waits when it is full: back-pressure,
never a drop). The thread writes when ``batch_size`` records are waiting or ``flush_interval_s``
has passed, whichever comes first; when it is behind it catches up in writes of up to
``max_batch`` records.

Failures: :class:`~core.errors.TransientError` from a sink is retried with the project's
:class:`~core.retry.RetryPolicy`; when the sink stays down the batch is appended to the spill
file (:class:`~analyzers.sinks.spill.SpillFile`) and later batches follow it there, in order;
every ``probe_interval_s`` the sink is tried again and, when it answers, the spill is replayed
first. Spill files left by an earlier run are replayed at the next start. Rows a sink rejects
for good (a bad value) are kept in ``rejected-<sink>.jsonl`` with the reason and counted; they
are never dropped.

Time comes from an injected monotonic ``clock`` and ``wait`` primitive, so tests drive batch age
and probe timing without sleeping.

Journal (``journal=True``, paper runs): every record is first appended to the journal and
fsynced (:class:`~analyzers.sinks.journal.DecisionJournal`), as soon as the thread wakes, then
the durable listeners hear of it (:meth:`DecisionWriter.add_durable_listener`); records are then
written with the sink's ``write`` (de-duplicating by ``decision_id``: a restarted runner may
decide a redelivered bar again under the same id).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analyzers.schema import DecisionRecord, row_json, to_row
from analyzers.sinks.base import DecisionSink, Row, RowError
from analyzers.sinks.journal import DecisionJournal
from analyzers.sinks.spill import RejectedFile, SpillFile
from core.errors import SinkError, TransientError
from core.retry import RetryPolicy

logger = logging.getLogger(__name__)

# Attempts of one sink call, then spill. Waits of 0.2, 0.4, 0.8 s at most between them.
DEFAULT_RETRY = RetryPolicy(attempts=4, initial_s=0.2, max_s=5.0)

Item = DecisionRecord | Row
Wait = Callable[[threading.Condition, float], object]
"""``wait(cond, timeout_s)``: block on ``cond`` (held by the caller) until it is notified or about
``timeout_s`` seconds of the writer's clock have passed; spurious returns are allowed."""


@dataclass(slots=True)
class WriterStats:
    """Counters of one writer (written from its thread; read anywhere)."""

    submitted: int = 0
    written: int = 0
    spilled: int = 0
    replayed: int = 0
    rejected: int = 0
    batches: int = 0
    retries: int = 0
    queue_depth: int = 0


class DecisionWriter:
    """Batches decision records to a sink from one background thread.

    Thread context: :meth:`submit` is called from the main (backtrader) thread; every sink call
    happens on the writer thread (except ``open`` in :meth:`start`); :meth:`start`,
    :meth:`flush` and :meth:`stop` from the thread that owns the writer.

    Args:
        sink: where rows go.
        batch_size: a write is triggered when this many records wait.
        flush_interval_s: ...or when the oldest waiting record is this old, seconds.
        queue_size: records buffered before :meth:`submit` blocks.
        spill_dir: folder for spill and rejected files.
        max_batch: largest single write when catching up.
        retry: attempts and backoff of one sink call before its batch is spilled.
        probe_interval_s: while spilling, how often the sink is tried again, seconds.
        clock: monotonic seconds (tests pass a fake).
        wait: how the writer thread waits for records (see :data:`Wait`; tests pass one that
            returns when their fake clock moves).
        journal: journal every record on local disk first (``journal-<sink>.jsonl`` in
            ``spill_dir``) and report it durable to the listeners.
    """

    def __init__(
        self,
        sink: DecisionSink,
        *,
        batch_size: int = 10,
        flush_interval_s: float = 5.0,
        queue_size: int = 10_000,
        spill_dir: Path = Path(".fmel_spill"),
        max_batch: int = 500,
        retry: RetryPolicy = DEFAULT_RETRY,
        probe_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = threading.Condition.wait,
        journal: bool = False,
    ) -> None:
        self.sink = sink
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue_size = queue_size
        self.max_batch = max(max_batch, batch_size)
        self.retry = retry
        self.probe_interval_s = probe_interval_s
        self.spill_dir = Path(spill_dir)
        self.spill = SpillFile(self.spill_dir / f"spill-{sink.name}.jsonl")
        self.rejected = RejectedFile(self.spill_dir / f"rejected-{sink.name}.jsonl")
        self.stats = WriterStats()
        self._clock = clock
        self._wait = wait
        self._buf: collections.deque[Item] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._stop = threading.Event()  # ends retry waits at once when stopping
        self._flush_wanted = False
        self._thread: threading.Thread | None = None
        self._opened = False
        self._spilling = False
        self._next_probe = 0.0
        self._fatal: BaseException | None = None
        self._inflight: list[Item] | None = None
        self.journal = (
            DecisionJournal(self.spill_dir / f"journal-{sink.name}.jsonl") if journal else None
        )
        self._listeners: list[Callable[[Sequence[Item]], None]] = []
        self._unjournaled = 0  # newest records of _buf not journaled yet
        self._journaled = 0  # records journaled so far

    @property
    def spill_path(self) -> Path:
        """The spill file (``<spill_dir>/spill-<sink>.jsonl``)."""
        return self.spill.path

    @property
    def rejected_path(self) -> Path:
        """The file of rows refused for good (``<spill_dir>/rejected-<sink>.jsonl``)."""
        return self.rejected.path

    # -- owner and main thread --------------------------------------------------------------

    def start(self) -> None:
        """Open the sink and start the writer thread (which replays old spill files first).

        The sink is opened here, on the caller's thread, so a store that can never work (an
        incompatible table, a database file locked by another process) fails the run at
        start. A store that is only unreachable for now is not fatal: records are spilled
        until it answers.

        Raises:
            SinkError: the sink cannot be used.
        """
        if self._thread is not None:
            return
        if self.journal is not None:
            self.journal.recover(self.spill)  # a killed run's journal: replayed with the spill
        try:
            self._call_with_retry("open", self.sink.open)
            self._opened = True
        except TransientError as e:
            self._enter_spill(f"sink unreachable at start: {e}")
        self._thread = threading.Thread(
            target=self._run, name=f"fmel-writer-{self.sink.name}", daemon=True
        )
        self._thread.start()

    def submit(self, record: Item) -> None:
        """Queue one record (main thread). Blocks while the buffer is full; never drops.

        Raises:
            SinkError: the writer died on an error that needs a human (see the log).
        """
        cond = self._cond
        with cond:
            while len(self._buf) >= self.queue_size and not self._stopping:
                if self._fatal is not None:
                    raise SinkError(f"decision writer stopped: {self._fatal}") from self._fatal
                cond.wait(0.5)
            self._buf.append(record)
            self.stats.submitted += 1
            if self.journal is not None:
                self._unjournaled += 1
                cond.notify()  # journal it now, whatever the batch size
            elif len(self._buf) >= self.batch_size:
                cond.notify()

    def add_durable_listener(self, fn: Callable[[Sequence[Item]], None]) -> None:
        """``fn(records)`` is called on the writer thread with each group of records just
        journaled (fsynced), in submission order. Needs ``journal=True``; a listener that
        raises is logged and otherwise ignored. Owner thread, before :meth:`start`."""
        if self.journal is None:
            raise SinkError("durable listeners need a writer with journal=True")
        self._listeners.append(fn)

    def wait_durable(self, timeout_s: float) -> bool:
        """Wait until every record submitted so far is journaled and its listeners were told
        (True), or ``timeout_s`` passed / the writer thread is gone (False). Owner thread."""
        with self._cond:
            target = self.stats.submitted
            self._cond.notify_all()
            return (
                self._cond.wait_for(
                    lambda: self._journaled >= target or not self._alive(), timeout_s
                )
                and self._journaled >= target
            )

    def _alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._fatal is None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Write what is buffered now, without waiting for ``batch_size`` or the interval.

        Returns when every record submitted before the call was written, spilled or rejected
        (or the writer thread is gone), waiting at most ``timeout_s`` seconds; ``False`` on
        timeout. Owner thread.
        """
        with self._cond:
            self._flush_wanted = True
            self._cond.notify_all()
            return self._cond.wait_for(self._idle, timeout_s)

    def _idle(self) -> bool:
        thread = self._thread
        if thread is None or not thread.is_alive() or self._fatal is not None:
            return True
        return not self._buf and self._inflight is None

    @property
    def healthy(self) -> bool:
        """False while records are being spilled or the writer died."""
        return self._fatal is None and not self._spilling

    @property
    def queue_depth(self) -> int:
        return len(self._buf)

    def stop(self, timeout_s: float = 10.0) -> WriterStats:
        """Flush everything and stop the thread; records not written by then are spilled.

        Idempotent. Returns the final counters.
        """
        with self._cond:
            self._stopping = True
            self._stop.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error(
                    "decision writer did not finish within %.1f s; spilling what is left", timeout_s
                )
        # Whatever is still buffered (thread stuck or dead) goes to disk, never lost; so does
        # the batch a stuck thread holds (it may yet land too: stores dedupe by decision_id).
        with self._cond:
            stuck = list(self._inflight or [])
            left = [self._as_row(r) for r in [*stuck, *self._buf]]
            self._buf.clear()
        if left:
            self._spill(left)
        self.stats.queue_depth = 0
        if self._thread is not None and not self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.sink.close()
        return self.stats

    # -- writer thread ----------------------------------------------------------------------

    @staticmethod
    def _as_row(record: Item) -> Row:
        return to_row(record) if isinstance(record, DecisionRecord) else record

    def _take(self) -> list[Item] | None:
        """Wait for a batch; [] when the interval passed with nothing to write; None when
        stopping and empty. With a journal, new records are journaled while waiting, and a
        batch holds only journaled records."""
        deadline = self._clock() + self.flush_interval_s
        while True:
            with self._cond:
                while (
                    len(self._buf) < self.batch_size
                    and not (self._stopping or self._flush_wanted)
                    and not self._unjournaled
                ):
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._wait(self._cond, remaining)
                if not self._unjournaled:
                    return self._batch_locked()
                new = list(self._buf)[len(self._buf) - self._unjournaled :]
                self._unjournaled = 0
            self._journal_write(new)

    def _journal_write(self, records: list[Item]) -> None:
        """Append ``records`` to the journal (fsynced), then tell the listeners (writer
        thread, without the lock: submit() goes on meanwhile)."""
        assert self.journal is not None
        self.journal.append(
            [row_json(r) if isinstance(r, DecisionRecord) else _json(r) for r in records]
        )
        with self._cond:
            self._journaled += len(records)
            self._cond.notify_all()  # wait_durable()
        for fn in self._listeners:
            try:
                fn(records)
            except Exception:
                logger.exception("durable listener failed (the records are journaled)")

    def _batch_locked(self) -> list[Item] | None:
        """The next batch (lock held); see :meth:`_take`."""
        if not self._buf:
            self._flush_wanted = False
            return None if self._stopping else []
        n = min(len(self._buf), self.max_batch)
        batch = [self._buf.popleft() for _ in range(n)]
        self._inflight = batch
        self.stats.queue_depth = len(self._buf)
        self._cond.notify_all()  # wake a blocked submit()
        return batch

    def _done(self) -> None:
        with self._cond:
            batch = self._inflight
            self._inflight = None
            self._cond.notify_all()  # wake flush()
        if self.journal is not None and batch:
            self.journal.settle(len(batch))  # written, spilled or rejected: settled

    def _run(self) -> None:
        try:
            self._open_and_replay()
            while True:
                batch = self._take()
                if batch is None:
                    break
                if batch:
                    self._deliver(batch)
                    self._done()
                elif self._spilling:
                    self._maybe_recover()
            if self._spilling:  # one last try before giving the spill to the next start
                self._maybe_recover(force=True)
        except BaseException as e:
            self._fatal = e
            logger.exception("decision writer failed; records go to %s", self.spill_path)
        finally:
            if self._spilling:
                logger.warning(
                    "%d decision records are in %s; they are replayed at the next start",
                    self.stats.spilled,
                    self.spill_path,
                )
            with self._cond:
                self._cond.notify_all()  # wake flush() and submit()

    def _open_and_replay(self) -> None:
        if not self._opened:
            return  # unreachable at start: _maybe_recover opens it and replays later
        if self.spill.exists():
            try:
                self._replay()
            except TransientError as e:
                self._enter_spill(f"replay of {self.spill_path} failed: {e}")

    def _call_with_retry(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` under the retry policy; no further attempt once stopping.

        Raises:
            TransientError: every attempt failed transiently (or stop interrupted the wait).
        """

        def count(err: BaseException) -> None:
            if self._stop.is_set():
                return  # the wait that follows ends at once: no retry
            self.stats.retries += 1
            logger.warning("sink %s: %s; retrying", self.sink.name, err)

        return self.retry.call(
            f"sink {self.sink.name} {what}",
            fn,
            *args,
            retry_on=lambda e: isinstance(e, TransientError),
            stop=self._stop,
            on_retry=count,
        )

    def _deliver(self, batch: list[Item]) -> None:
        if self._spilling:
            self._spill([self._as_row(r) for r in batch])
            self._maybe_recover()
            return
        # With a journal, ids may repeat across restarts: the de-duplicating write.
        fast = getattr(self.sink, "write_records", None) if self.journal is None else None
        try:
            if fast is not None and all(isinstance(r, DecisionRecord) for r in batch):
                errors = self._call_with_retry("write", fast, batch)
            else:
                batch = [self._as_row(r) for r in batch]
                errors = self._call_with_retry("write", self.sink.write, batch)
        except TransientError as e:
            self._enter_spill(str(e))
            self._spill([self._as_row(r) for r in batch])
            return
        except Exception as e:  # a sink bug must not lose the batch: keep it on disk
            logger.exception(
                "sink %s failed on a batch of %d; keeping it in %s",
                self.sink.name,
                len(batch),
                self.spill_path,
            )
            self._enter_spill(f"{type(e).__name__}: {e}")
            self._spill([self._as_row(r) for r in batch])
            return
        self._account(batch, errors)

    def _account(self, rows: Sequence[Item], errors: list[RowError], replay: bool = False) -> None:
        self.stats.batches += 1
        if errors:
            self._reject([(self._as_row(rows[e.index]), e.reason) for e in errors])
        ok = len(rows) - len(errors)
        self.stats.written += ok
        if replay:
            self.stats.replayed += ok

    def _enter_spill(self, why: str) -> None:
        if not self._spilling:
            logger.error(
                "sink %s unavailable (%s): spilling decision records to %s",
                self.sink.name,
                why,
                self.spill_path,
            )
        self._spilling = True
        self._next_probe = self._clock() + self.probe_interval_s

    def _maybe_recover(self, force: bool = False) -> None:
        if not force and self._clock() < self._next_probe:
            return
        self._next_probe = self._clock() + self.probe_interval_s
        try:
            if not self._opened:
                self.sink.open()
                self._opened = True
            self._replay()
        except TransientError as e:
            logger.info("sink %s still unavailable: %s", self.sink.name, e)

    def _replay(self) -> None:
        """Write the spill file in order; on success delete it and leave spill mode.

        Raises:
            TransientError: the sink failed again (the file is kept as it was).
        """
        rows = self.spill.read()
        logger.info("replaying %d spilled decision records from %s", len(rows), self.spill_path)
        # Optional sink hook: spilled rows may be half-written already (a store that cannot
        # de-duplicate by decision_id looks them up first).
        before_replay = getattr(self.sink, "before_replay", None)
        if before_replay is not None:
            before_replay(rows)
        for i in range(0, len(rows), self.max_batch):
            chunk = rows[i : i + self.max_batch]
            errors = self._call_with_retry("replay", self.sink.write, chunk)
            self._account(chunk, errors, replay=True)
            # what is written leaves the file at once: a failure later resends nothing twice
            self.spill.keep(rows[i + self.max_batch :])
        self.spill.remove()
        self._spilling = False
        logger.info("sink %s recovered; spill replayed", self.sink.name)

    def _spill(self, rows: Sequence[Row]) -> None:
        self.spill.append(rows)
        self.stats.spilled += len(rows)
        self._spilling = True

    def _reject(self, items: list[tuple[Row, str]]) -> None:
        for row, reason in items:
            logger.error(
                "sink %s rejected decision %s: %s (kept in %s)",
                self.sink.name,
                row.get("decision_id"),
                reason,
                self.rejected_path,
            )
        self.rejected.append(items)
        self.stats.rejected += len(items)


def _json(row: Row) -> str:
    return json.dumps(row, separators=(",", ":"), allow_nan=False)
