"""The writer thread between the FMEL analyzer and a decision sink.

:class:`DecisionWriter` owns one background thread. ``submit()`` is called on the main thread
from the analyzer and only appends to a bounded buffer (waits when it is full: back-pressure,
never a drop). The thread writes when ``batch_size`` records are waiting or ``flush_interval_s``
has passed, whichever comes first; when it is behind it catches up in writes of up to
``max_batch`` records.

Failures: :class:`~core.errors.TransientError` from a sink is retried with the project's
:class:`~core.retry.RetryPolicy`; when the sink stays down the batch is appended to the spill
file (:class:`~analyzers.sinks.spill.SpillFile`) and later batches follow it there, in order;
every ``probe_interval_s`` the sink is tried again (its optional ``probe()``, a cheap call) and,
when it answers, the spill is drained to the end first, oldest rows first, in writes sized to
about ``replay_write_s`` seconds each. Spill files left by an earlier run are drained at the next
start, before this run's records. Rows a sink rejects for good (a bad value) are kept in
``rejected-<sink>.jsonl`` with the reason and counted; they are never dropped.

Counts (:class:`WriterStats`): every record submitted to this writer is, at any time, in exactly
one of: waiting (buffered or being written), ``written`` (stored), ``spilled`` (in the spill file
now), ``rejected``, ``lost`` (after a disk error, at stop; or a record that cannot be
converted to a row, logged); after
:meth:`DecisionWriter.stop` nothing is waiting, so ``written + spilled + rejected + lost ==
submitted``. Rows of earlier runs found in the spill at start are counted apart
(``replayed`` once stored, ``earlier_rejected``, ``earlier_left`` still waiting). A batch the
sink stored in part before failing is split: the sink's optional ``is_stored(decision_id)`` names
what it stored (counted written, not spilled). At stop, draining and writing go on until the
stop's budget is nearly spent; what is left stays in the spill file and is counted there.

Time comes from an injected monotonic ``clock`` and ``wait`` primitive, so tests drive batch age
and probe timing without sleeping.

Journal (``journal=True``, paper runs): every record is first appended to the journal and
fsynced (:class:`~analyzers.sinks.journal.DecisionJournal`), as soon as the thread wakes, then
the durable listeners hear of it (:meth:`DecisionWriter.add_durable_listener`); records are then
written with the sink's ``write`` (de-duplicating by ``decision_id``: a restarted runner may
decide a redelivered bar again under the same id).

Local disk failing (a full disk or a folder that cannot be written under ``spill_dir``): the
first ``OSError`` of the journal, the spill or the rejected file is logged once at ERROR naming
the file and the errno, kept in :attr:`DecisionWriter.disk_error`, and the failure listeners are
told (:meth:`DecisionWriter.add_failure_listener`: the Runner stops the run). The writer goes on:
nothing more is journaled (so no further bar is acknowledged: Pub/Sub redelivers them), records
go straight to the sink, and those it cannot take are held in memory and tried again until the
stop; what is still held then is counted ``lost`` with the reason. :meth:`DecisionWriter.stop`
never raises for a disk error.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import json
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from analyzers.deferred import DeferredRecord, PendingReads, settle_columns
from analyzers.schema import DecisionRecord, row_json, to_row
from analyzers.sinks.base import DecisionSink, Row, RowError
from analyzers.sinks.journal import DecisionJournal
from analyzers.sinks.spill import Head, RejectedFile, SpillFile, json_problems
from core.errors import AppError, ConfigError, SinkError, TransientError
from core.retry import RetryPolicy

logger = logging.getLogger(__name__)

# At stop, the reads of queued records are resolved on the stopping thread in chunks of at most
# this many reads (about 20 ms each: only the vectorised part, ~0.3 us a read, is done there;
# docs/benchmarks.md), so the stop's budget is checked between chunks.
SETTLE_AT_STOP_READS = 65_536

# How long stop() waits, after spilling, for a writer thread that outlived its budget to end
# once the sink was interrupted (a sink with ``interrupt()``), seconds: the cut statement ends
# in milliseconds, the store's close (a checkpoint) in ~0.02-0.1 s here. See stop().
ABANDONED_JOIN_S = 2.0

# Attempts of one sink call, then spill. Waits of 0.2, 0.4, 0.8 s at most between them.
DEFAULT_RETRY = RetryPolicy(attempts=4, initial_s=0.2, max_s=5.0)
# Records in a catch-up or drain write before the sink's rate was measured.
FIRST_WRITE_ROWS = 100

# The interpreter's thread switch interval while a writer runs (sys.setswitchinterval), s.
SWITCH_INTERVAL_S = 0.0002

Item = DecisionRecord | Row
Wait = Callable[[threading.Condition, float], object]
"""``wait(cond, timeout_s)``: block on ``cond`` (held by the caller) until it is notified or about
``timeout_s`` seconds of the writer's clock have passed; spurious returns are allowed."""


@dataclass(slots=True)
class WriterStats:
    """Counters of one writer (written from its thread; read anywhere).

    Attributes:
        submitted: records this writer was given.
        written: of those, stored by the sink (also when they went through the spill file).
        spilled: of those, in the spill file now (goes down as the spill is drained).
        rejected: of those, refused for good (kept in the rejected file).
        spilled_total: of those, how many were put in the spill file (never goes down).
        recovered: of those, stored from the spill file.
        replayed: rows of earlier runs (in the spill at start) stored by this writer.
        earlier_rejected: rows of earlier runs refused for good.
        earlier_left: rows of earlier runs still in the spill file.
        earlier_torn: lines of earlier runs dropped from the spill file as torn (cut by a crash
            during an append: not a readable row; logged when read).
        lost: of those, neither stored nor kept on disk: the spill folder could not be written
            (a full disk) and the sink did not take them before the stop, or the record could
            not be made a row (its reads could not be resolved: logged; ``lost_reason``).
        lost_reason: why records were lost ("" when none were).
        unsure_in_spill: of the rows in the spill (``in_spill``: this run's and earlier
            runs'), those the store may hold all the same, set at :meth:`DecisionWriter.stop`:
            their write (or replay) was in flight when the stop took over from a stuck writer
            thread, or the sink got no answer for them (a timeout, a dropped connection: its
            optional ``unsure_ids()``). The spill keeps them; a sink with ``before_replay``
            looks each up by ``decision_id`` before sending it again, so none is stored twice,
            and the drain reports how many it found already stored.
        batches / retries / queue_depth: sink writes, retried sink calls, records buffered.
    """

    submitted: int = 0
    written: int = 0
    spilled: int = 0
    replayed: int = 0
    rejected: int = 0
    batches: int = 0
    retries: int = 0
    queue_depth: int = 0
    spilled_total: int = 0
    recovered: int = 0
    earlier_rejected: int = 0
    earlier_left: int = 0
    earlier_torn: int = 0
    lost: int = 0
    lost_reason: str = ""
    unsure_in_spill: int = 0

    @property
    def in_spill(self) -> int:
        """Rows waiting in the spill file: this run's and earlier runs'."""
        return self.spilled + self.earlier_left


class _SwitchInterval:
    """Lowers the interpreter's thread switch interval while at least one writer runs.

    Why: the writer's thread gives up the GIL inside every C call that releases it (each
    DuckDB task, large numpy and Arrow operations) and must then get it back from the bar
    loop, a thread that never waits: CPython makes a thread that wants the GIL wait one
    switch interval (5 ms by default) before it asks the holder to drop it (Python docs,
    ``sys.setswitchinterval``). Measured in a backtest (SMA-cross, 3 daily feeds, batches of
    500): a write of 500 records took 360-500 ms of wall time while the bar loop ran and
    17-20 ms once it had ended, so the writer fell behind and 3,531 of 5,031 records were
    left to the final flush. At 0.2 ms it kept up (531 left; final flush 0.07 s instead of
    0.2 s) and the run with its flush took less wall time (``docs/benchmarks.md``, sixth
    pass). Process-wide: the first writer to lower it saves the interval it found; the lowest
    any running writer asks for is used (until the last one stops); the last to stop puts the
    saved one back, unless someone else changed it meanwhile (a change seen when a writer
    starts becomes the one to put back). A writer that is never stopped keeps it lowered, as
    its thread keeps running. Holders are counted once each (a second ``leave`` of the same
    writer does nothing). Any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders: set[int] = set()  # id() of the writers holding it
        self._saved: float | None = None  # the interval to put back after the last holder
        self._ours: float | None = None  # what sys.getswitchinterval() read after we set it

    def enter(self, holder: object, interval_s: float) -> None:
        """``holder`` runs and wants at most ``interval_s`` seconds (> 0, checked by the
        caller)."""
        with self._lock:
            current = sys.getswitchinterval()
            if self._saved is not None and current != self._ours:
                self._saved = self._ours = None  # someone else set it meanwhile: theirs now
            if interval_s < current:
                sys.setswitchinterval(interval_s)
                if self._saved is None:
                    self._saved = current
                self._ours = sys.getswitchinterval()
            self._holders.add(id(holder))

    def leave(self, holder: object) -> None:
        """``holder`` stopped (again: nothing happens)."""
        with self._lock:
            if id(holder) not in self._holders:
                return
            self._holders.discard(id(holder))
            if not self._holders and self._saved is not None:
                if sys.getswitchinterval() == self._ours:  # nobody else changed it since
                    sys.setswitchinterval(self._saved)
                self._saved = self._ours = None


_SWITCH = _SwitchInterval()


def _whole(name: str, value: object) -> None:
    """ConfigError unless ``value`` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")


def _seconds(name: str, value: object) -> None:
    """ConfigError unless ``value`` is a positive, finite number of seconds (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")


class DecisionWriter:
    """Batches decision records to a sink from one background thread.

    Thread context: :meth:`submit` is called from the main (backtrader) thread; every sink call
    happens on the writer thread (except ``open`` in :meth:`start`); :meth:`start`,
    :meth:`flush` and :meth:`stop` from the thread that owns the writer.

    Args:
        sink: where rows go.
        batch_size: a write is triggered when this many records wait (at most ``queue_size``).
        batch_reads: ...or when the waiting records hold this many reads (their ``reads``), so
            a large ``batch_size`` keeps few wide decisions waiting (default: the sink's
            ``run_reads`` attribute once it is open, the reads it takes in one statement, when
            it has one; else none).
        flush_interval_s: ...or when the oldest waiting record is this old, seconds.
        queue_size: records buffered before :meth:`submit` blocks.
        spill_dir: folder for spill and rejected files.
        max_batch: largest single write when catching up (default: the sink's ``max_batch``
            attribute when it has one, else 500); writes are sized down to about
            ``replay_write_s`` seconds of the sink's measured rate.
        retry: attempts and backoff of one sink call before its batch is spilled.
        probe_interval_s: while spilling, how often the sink is tried again, seconds.
        clock: monotonic seconds (tests pass a fake).
        wait: how the writer thread waits for records (see :data:`Wait`; tests pass one that
            returns when their fake clock moves).
        journal: journal every record on local disk first (``journal-<sink>.jsonl`` in
            ``spill_dir``) and report it durable to the listeners.
        replay_write_s: target duration of one write when catching up or draining the spill,
            seconds (so a stop is never long behind one write).
        switch_interval_s: the interpreter's thread switch interval while the writer runs
            (from :meth:`start` to :meth:`stop`), seconds, when lower than the current one
            (:class:`_SwitchInterval`: a writer that keeps up with the bar loop instead of
            waiting 5 ms for the GIL after every C call); ``None`` leaves it alone.

    Raises:
        ConfigError: ``switch_interval_s`` is not a positive, finite number of seconds (or
            None); ``flush_interval_s``, ``probe_interval_s`` or ``replay_write_s`` is not
            one; ``queue_size``, ``batch_size``, ``batch_reads`` or ``max_batch`` (when given)
            is not a whole number >= 1.
    """

    def __init__(
        self,
        sink: DecisionSink,
        *,
        batch_size: int = 10,
        batch_reads: int | None = None,
        flush_interval_s: float = 5.0,
        queue_size: int = 10_000,
        spill_dir: Path = Path(".fmel_spill"),
        max_batch: int | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        probe_interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wait: Wait = threading.Condition.wait,
        journal: bool = False,
        replay_write_s: float = 2.0,
        switch_interval_s: float | None = SWITCH_INTERVAL_S,
    ) -> None:
        if switch_interval_s is not None:
            _seconds("switch_interval_s", switch_interval_s)
        _whole("queue_size", queue_size)
        _whole("batch_size", batch_size)
        if max_batch is not None:
            _whole("max_batch", max_batch)
        for name, seconds in (
            ("flush_interval_s", flush_interval_s),
            ("probe_interval_s", probe_interval_s),
            ("replay_write_s", replay_write_s),
        ):
            _seconds(name, seconds)
        self.sink = sink
        self.switch_interval_s = switch_interval_s
        # a batch larger than the queue would never fill: the queue's size is the most a
        # batch can wait for (else a full queue waits out the flush interval)
        self.batch_size = max(1, min(batch_size, queue_size))
        if batch_reads is not None:
            _whole("batch_reads", batch_reads)
        self.batch_reads = batch_reads
        self._batch_reads_given = batch_reads is not None
        self._buf_reads = 0  # reads held by the records in _buf (DecisionRecord.reads)
        self.flush_interval_s = flush_interval_s
        self.queue_size = queue_size
        if max_batch is None:
            max_batch = int(getattr(sink, "max_batch", 500))
        self.max_batch = max(max_batch, self.batch_size)
        self.replay_write_s = replay_write_s
        self._rate = Rate()  # the sink's measured rows/s, sizes catch-up and drain writes
        self.retry = retry
        self.probe_interval_s = probe_interval_s
        self.spill_dir = Path(spill_dir)
        self.spill = SpillFile(self.spill_dir / f"spill-{sink.name}.jsonl")
        self.rejected = RejectedFile(self.spill_dir / f"rejected-{sink.name}.jsonl")
        self.stats = WriterStats()
        self._clock = clock
        self._wait = wait
        self._buf: collections.deque[Item] = collections.deque()
        # submit() takes the lock itself (a C call); waiting and waking go through the condition
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._stopping = False
        self._told_finishing = False  # the sink's finishing() called (once, at the drain)
        self._closed = False  # stop() took the buffer over: a later submit() spills at once
        self._late_logged = False
        self._stop = threading.Event()  # ends retry waits at once when stopping
        self._flush_wanted = False
        self._writer_waits = False  # the writer thread waits in _take (lock held to read)
        self._thread: threading.Thread | None = None
        self._opened = False
        self._spilling = False
        self._next_probe = 0.0
        self._fatal: BaseException | None = None
        # decision id prefix -> (who writes it, the analyzer) (claim_ids)
        self._claimed: dict[str, tuple[str, weakref.ref[Any] | None]] = {}
        # claimed prefixes no record was submitted under yet (claim_ids, submit)
        self._fresh_claims: set[str] = set()
        self._inflight: list[Item] | None = None
        self.journal = (
            DecisionJournal(self.spill_dir / f"journal-{sink.name}.jsonl") if journal else None
        )
        self._listeners: list[Callable[[Sequence[Item]], None]] = []
        self._unjournaled = 0  # newest records of _buf not journaled yet
        self._journaled = 0  # records journaled so far
        self._earlier = 0  # rows of earlier runs at the head of the spill file
        self._io_lock = threading.Lock()  # spill file and counts: writer thread vs stop()
        self._abandoned = False  # stop() took over from a stuck writer thread
        self._exited = False  # the writer thread is past its work (io lock)
        self._inflight_on_disk = False  # the in-flight batch is already in the spill file
        self._inflight_rows: Sequence[Row] | None = None  # a replay (or held rows) being written
        self._deadline = float("inf")  # clock time by which a stopping writer must be done
        self.disk_error: OSError | None = None  # first failed write under spill_dir
        self.failure: str | None = None  # why the records are no longer safe (told once)
        self._failure_listeners: list[Callable[[str], None]] = []
        self._held: list[Row] = []  # rows the spill could not take (disk error), oldest first

    @property
    def spill_path(self) -> Path:
        """The spill file (``<spill_dir>/spill-<sink>.jsonl``)."""
        return self.spill.path

    @property
    def rejected_path(self) -> Path:
        """The file of rows refused for good (``<spill_dir>/rejected-<sink>.jsonl``)."""
        return self.rejected.path

    # -- owner and main thread --------------------------------------------------------------

    def __reduce__(self) -> NoReturn:
        # A writer is one thread and one open store: it cannot be in two processes. Where it
        # gets pickled: backtrader's optimisation with maxcpus > 1 sends the Cerebro (with
        # the analyzers' params) to its worker processes.
        raise TypeError(
            "a DecisionWriter cannot be pickled (one writer thread and store per process): "
            "with cerebro.optstrategy use maxcpus=1, or give each process its own writer "
            "(MODE=optimize does: each trial records into its own part of the store)"
        )

    def start(self) -> None:
        """Open the sink and start the writer thread (which replays old spill files first).

        The sink is opened here, on the caller's thread, so a store that can never work (an
        incompatible table, a database file locked by another process) fails the run at
        start. A store that is only unreachable for now is not fatal: records are spilled
        until it answers.

        Raises:
            SinkError: the sink cannot be used; or this writer was stopped already (a writer
                runs once: make a new one, which replays the spill file this one left).
        """
        if self._thread is not None:
            return
        if self._stopping:
            # its counts and the spill's accounting end at stop(); a second run would count
            # its own spilled records again as replayed
            raise SinkError(
                "this DecisionWriter was stopped; make a new one (it replays the spill file "
                f"{self.spill_path})"
            )
        if self.journal is not None:
            self.journal.recover(self.spill)  # a killed run's journal: replayed with the spill
        self._earlier = self.stats.earlier_left = self.spill.pending()
        self._check_destination()
        if self._earlier:
            logger.info(
                "%d decision records of earlier runs wait in %s; they are written first",
                self._earlier,
                self.spill_path,
            )
        try:
            self._call_with_retry("open", self.sink.open)
            self._opened = True
        except TransientError as e:
            self._enter_spill(f"sink unreachable at start: {e}")
        if self._opened:
            self._take_sink_sizes()
        self._thread = threading.Thread(
            target=self._run, name=f"fmel-writer-{self.sink.name}", daemon=True
        )
        with self._cond:  # not once stop() has begun: its leave() may have come already
            if self.switch_interval_s is not None and not self._stopping:
                _SWITCH.enter(self, self.switch_interval_s)
        self._thread.start()

    def submit(self, record: Item) -> None:
        """Queue one record (main thread). Blocks while the buffer is full; never drops. After
        :meth:`stop` nothing drains the queue: the record goes to the spill file at once
        (written at the next start, or by ``python -m runtime.drain``), with a warning.

        Raises:
            SinkError: the writer died on an error that needs a human (see the log), or the
                queue is full and :meth:`start` was never called.
        """
        cond = self._cond
        with self._lock:
            # the check and the append under one lock: stop() takes the queue over (and sets
            # _closed) under it too, so a record is either in the queue it takes or late
            while len(self._buf) >= self.queue_size and not (self._stopping or self._closed):
                if self._fatal is not None:
                    raise SinkError(f"decision writer stopped: {self._fatal}") from self._fatal
                if self._thread is None:  # nothing will ever make room
                    raise SinkError(
                        f"decision writer never started: {len(self._buf)} records wait "
                        "(queue_size); call start() before submitting"
                    )
                cond.wait(0.5)
            self.stats.submitted += 1
            if self._fresh_claims:  # until each claimed run's first record
                run = record[0] if isinstance(record, tuple) and record else None
                prefix = getattr(run, "decision_scope", None) or getattr(run, "session_id", None)
                self._fresh_claims.discard(prefix)  # type: ignore[arg-type]
            if not self._closed:
                self._buf.append(record)
                if isinstance(record, tuple):
                    self._buf_reads += record.reads
                if self.journal is not None and self.disk_error is None:
                    self._unjournaled += 1
                    cond.notify_all()  # journal it now, whatever the batch size
                elif self._writer_waits and self._batch_ready():
                    # only when the writer waits for a batch (a busy one finds it); all:
                    # flush(), wait_durable() and wait_drained() wait on the same condition,
                    # and a single notify could wake one of them instead of the writer
                    cond.notify_all()
                return
        self._spill_late(record)

    def _spill_late(self, record: Item) -> None:
        """A record submitted after :meth:`stop` took the queue over: straight to the spill
        file (caller's thread; the sink, closed, is not touched), counted as spilled; the
        first is logged. When it cannot be kept (the spill folder cannot be written, or the
        record is not JSON) it is counted ``lost`` and logged with the reason."""
        reason = ""
        with self._io_lock:
            if self.disk_error is not None:
                reason = f"the spill folder cannot be written ({self.disk_error})"
            else:
                try:
                    self.spill.append([self._as_row(record)])
                except OSError as e:
                    self._disk_failed(e, self.spill.path)
                    reason = f"the spill folder cannot be written ({e})"
                except (ValueError, TypeError) as e:
                    reason = f"the record cannot be written as JSON ({e})"
                except Exception as e:  # noqa: BLE001 - reads not resolvable: counted, logged
                    reason = f"the record could not be converted ({type(e).__name__}: {e})"
            if reason:
                self.stats.lost += 1
                self.stats.lost_reason = reason
            else:
                self.stats.spilled += 1
                self.stats.spilled_total += 1
            first = not reason and not self._late_logged
            self._late_logged = self._late_logged or first
        decision = getattr(record, "decision_id", None) or (
            record.get("decision_id") if isinstance(record, dict) else None
        )
        if reason:
            logger.error(
                "decision %s was submitted after the writer stopped and is lost: %s",
                decision,
                reason,
            )
        elif first:
            logger.warning(
                "decision records submitted after the writer stopped go to %s (written at the "
                "next start, or by python -m runtime.drain)",
                self.spill_path,
            )

    def add_durable_listener(self, fn: Callable[[Sequence[Item]], None]) -> None:
        """``fn(records)`` is called on the writer thread with each group of records just
        journaled (fsynced), in submission order. Needs ``journal=True``; a listener that
        raises is logged and otherwise ignored. Owner thread, before :meth:`start`."""
        if self.journal is None:
            raise SinkError("durable listeners need a writer with journal=True")
        self._listeners.append(fn)

    def add_failure_listener(self, fn: Callable[[str], None]) -> None:
        """``fn(reason)`` is called once when records are no longer safe: the journal or spill
        folder cannot be written (``reason`` names the file and the errno) or the writer
        thread died. Called on the writer thread (or the caller of :meth:`stop`); it must
        only set flags (the Runner requests a stop). A listener that raises is logged and
        otherwise ignored. Owner thread, before :meth:`start`."""
        self._failure_listeners.append(fn)

    def wait_durable(self, timeout_s: float) -> bool:
        """Wait until every record submitted so far is journaled and its listeners were told
        (True), or ``timeout_s`` passed / the writer thread is gone / the journal cannot be
        written (False). Owner thread."""
        with self._cond:
            target = self.stats.submitted
            self._cond.notify_all()
            return (
                self._cond.wait_for(
                    lambda: (
                        self._journaled >= target
                        or not self._alive()
                        or self.disk_error is not None
                    ),
                    timeout_s,
                )
                and self._journaled >= target
            )

    @property
    def running(self) -> bool:
        """The writer thread runs: started, not stopped, not dead on an error."""
        return self._alive() and not self._stopping

    def claim_ids(
        self,
        prefix: str,
        who: str,
        owner: object = None,
        stale: Callable[[object], bool] | None = None,
    ) -> None:
        """Reserve the decision ids ``<prefix>:...`` (a session id, or a paper run's decision
        scope) for one analyzer, ``who`` naming it in errors. Main thread, at the analyzer's
        start. Stores write a batch's fresh records without looking their ids up, and skip
        the ids they hold when a batch stored in part is written again: two runs writing the
        same ids through one writer would leave duplicates, or drop one run's decisions.

        A reservation whose ``owner`` (the analyzer) is alive and ``stale(owner)`` says it
        wrote nothing and never will (a run refused or failed before its first bar) is taken
        over.

        Raises:
            ValueError: ``prefix`` was reserved before through this writer (another strategy
                of the Cerebro, or an earlier run given the same ``run``); names both.
        """
        held = self._claimed.get(prefix)
        if held is not None:
            earlier, ref = held
            before = ref() if ref is not None else None
            if before is not None and stale is not None and stale(before):
                held = None
            elif before is None and ref is not None and prefix in self._fresh_claims:
                # its analyzer is gone (collected) without a record under it: a run refused
                # or failed at start, as stale() says of a live one (the garbage collector's
                # timing decided which, and a refused run's session was refused for good)
                held = None
        if held is not None:
            raise ValueError(
                f"FMELAnalyzer: {who} would write the same decision ids ({prefix}:...) as "
                f"{earlier} did through this writer: give each run its own session (leave run "
                "unset for a new one each, or make_run_info(..., session_id=...))"
            )
        self._claimed[prefix] = (who, weakref.ref(owner) if owner is not None else None)
        self._fresh_claims.add(prefix)

    def _alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive() and self._fatal is None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Write what is buffered now, without waiting for ``batch_size`` or the interval.

        Returns ``True`` when every record submitted before the call was written, spilled or
        rejected, waiting at most ``timeout_s`` seconds; ``False`` on timeout, or at once when
        records wait and no writer thread runs to take them (not started yet, stopped, or died:
        see :attr:`failure`). Owner thread.
        """
        with self._cond:
            self._flush_wanted = True
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._idle() or not self._alive(), timeout_s)
            return self._idle()

    def _idle(self) -> bool:
        """Nothing waits: no record buffered, no write in flight (condition held)."""
        return not self._buf and self._inflight is None

    @property
    def healthy(self) -> bool:
        """False while records are being spilled, the writer died or its disk failed."""
        return self._fatal is None and not self._spilling and self.disk_error is None

    @property
    def queue_depth(self) -> int:
        """Records buffered (not yet taken into a write)."""
        return len(self._buf)

    def snapshot(self) -> tuple[WriterStats, int]:
        """A consistent copy of the counters and the records of this run still waiting
        (buffered, in a write in flight or held in memory after a disk error): ``submitted ==
        written + spilled + rejected + lost + waiting`` holds for the pair at every moment
        (metrics read it at each scrape). Any thread."""
        with self._io_lock:  # every move out of "waiting" is counted under this lock
            st = dataclasses.replace(self.stats)
        return st, st.submitted - st.written - st.spilled - st.rejected - st.lost

    def stop(self, timeout_s: float = 10.0) -> WriterStats:
        """Flush everything and stop the thread; records not written by then are spilled.

        A thread that outlives ``timeout_s`` (seconds) leaves what it held to this call, which
        spills it with the queue (the calling thread converts them to JSON rows: ~10 us a
        read, so a large backlog of read-heavy records takes longer than the budget), then
        interrupts the sink (its optional ``interrupt()``) and waits up to
        :data:`ABANDONED_JOIN_S` more for the thread to end. Called on the writer's own
        thread (a listener), it only tells the thread to stop and returns the counters; the
        owner's call does the rest.

        Idempotent. Returns the final counters. Thread: the owner's (any but the writer's).
        """
        with self._cond:
            if not self._stopping:
                # The thread drains and writes until 80 % of the budget is spent, then keeps
                # the rest in the spill file; the rest of the budget is for that.
                self._deadline = self._clock() + 0.8 * timeout_s
            self._stopping = True
            self._stop.set()
            self._cond.notify_all()
        if self._thread is not None and self._thread is threading.current_thread():
            # a listener called on the writer's own thread (helper-98: join() raised
            # "cannot join current thread"): the thread is told to stop; the owner's stop()
            # does the rest
            return self.stats
        if self._thread is not None:
            began = time.monotonic()
            self._settle_waiting(began + 0.5 * timeout_s)
            self._thread.join(max(0.0, timeout_s - (time.monotonic() - began)))
            if self._thread.is_alive():
                logger.error(
                    "decision writer did not finish within %.1f s; spilling what is left", timeout_s
                )
        # Whatever is still buffered (thread stuck or dead) goes to disk, never lost; so does
        # the batch a stuck thread holds (it may yet land too: stores dedupe by decision_id).
        # From here on a stuck thread's results are ignored (it touches no file or count).
        with self._io_lock:
            taken_over = self._abandoned  # an earlier stop() spilled the stuck batch already
            self._abandoned = (
                self._thread is not None and self._thread.is_alive() and not self._exited
            )
            # a thread that died on an error (``_fatal``) leaves its batch in flight too
            held_by_thread = self._abandoned or self._fatal is not None
            if self._abandoned and not taken_over:
                self._interrupt_sink()  # it ends while the rows it held are spilled below
            with self._cond:
                on_disk = self._inflight_on_disk or taken_over
                in_flight = list(self._inflight or []) if held_by_thread else []
                # the rows of a replay (in the spill file already) or of the rows held in
                # memory (settled below) stay where they are, named in doubt only (helper-98:
                # a replay's rows were spilled a second time and counted twice)
                elsewhere = list(self._inflight_rows or []) if held_by_thread else []
                if held_by_thread:
                    self._inflight = self._inflight_rows = None
                stuck = [] if on_disk else in_flight
                left = self._rows([*stuck, *self._buf], owner=True)
                self._buf.clear()
                self._buf_reads = 0
                self._closed = True
            if left:
                self._spill(left, owner=True)
            if not taken_over:
                self.stats.unsure_in_spill = self._count_unsure([*in_flight, *elsewhere])
        self._settle_held()
        self._join_abandoned()
        self.stats.queue_depth = 0
        if self.stats.in_spill:
            logger.warning(
                "%d decision records wait in %s (%d of this run, %d of earlier runs): they are "
                "written at the next start, or by python -m runtime.drain",
                self.stats.in_spill,
                self.spill_path,
                self.stats.spilled,
                self.stats.earlier_left,
            )
        if self.stats.unsure_in_spill:
            logger.warning(
                "%d of them may be stored already (their write was cut short or got no "
                "answer); they are looked up by decision_id before they are sent again",
                self.stats.unsure_in_spill,
            )
        with self._io_lock:
            # a thread stopped in time closes nothing: here; one that outlived the stop's
            # budget closes the sink itself when it ends (_run), or a DuckDB file stayed
            # attached in the process (the next run's open failed; found by a flaky test)
            close = self._thread is not None and (not self._abandoned or self._exited)
        if close:
            with contextlib.suppress(Exception):
                self.sink.close()
        _SWITCH.leave(self)  # once: a second stop(), or one racing it, finds it gone
        return self.stats

    def _interrupt_sink(self) -> None:
        """The sink's optional ``interrupt()`` (:meth:`LocalDuckDBSink.interrupt`): cut short
        the write of a writer thread that outlived the stop's budget (io lock held; the sink
        must not block). A sink without it is left to finish or time out on its own."""
        interrupt = getattr(self.sink, "interrupt", None)
        if interrupt is None:
            return
        try:
            interrupt()
        except Exception:
            logger.exception("sink %s failed in interrupt() (ignored)", self.sink.name)

    def _join_abandoned(self) -> None:
        """After the stop spilled what an outliving writer thread held: wait up to
        :data:`ABANDONED_JOIN_S` for it to end, when its sink was interrupted (a sink with
        ``interrupt()``). Measured (a read-heavy run's 5,031 records queued, ``stop(0.2)``):
        the thread, inside DuckDB's insert or close when the stop returned, was still there
        when the interpreter exited, and the process aborted with exit code 134 (see
        :meth:`LocalDuckDBSink.interrupt`). A thread that does not end in time is logged and
        left (a daemon thread)."""
        thread = self._thread
        if thread is None or not self._abandoned or getattr(self.sink, "interrupt", None) is None:
            return  # (never the writer's own thread: stop() returned early there)
        thread.join(ABANDONED_JOIN_S)
        if thread.is_alive():
            logger.warning(
                "decision writer thread still running %.1f s after its sink %s was "
                "interrupted (a call that cannot be cut); it is left to end on its own",
                ABANDONED_JOIN_S,
                self.sink.name,
            )

    def _settle_waiting(self, until: float) -> None:
        """At :meth:`stop`, on the caller's thread (the bar loop's, idle from now on): resolve
        the deferred reads of the records still queued behind the batch the writer thread
        holds, while that thread writes it (a store's insert releases the GIL: the two overlap
        on two cores). The writer then finds them resolved; the rows are the same either way
        (resolving is done once, under the tracker's lock, whoever comes first).

        Bounded by ``until`` (``time.monotonic()``): only the vectorised part is done here
        (:func:`~analyzers.deferred.settle_columns`: bars with windows, text, look-aheads are
        left to the writer thread, which resolves them read by read), in chunks of at most
        ``batch_size`` records and :data:`SETTLE_AT_STOP_READS` reads, a record with more reads
        than that is left too, and a tracker's lock held by the writer is waited for only
        until ``until``. Stops at ``until``, when the writer thread is gone, or at a chunk
        that fails (left to the writer thread, which reports it). Live runs queue no
        deferred record."""
        thread = self._thread
        if time.monotonic() >= until or thread is None or not thread.is_alive():
            return
        with self._lock:
            waiting = [r for r in self._buf if type(r) is DeferredRecord]
        chunks: list[list[PendingReads]] = []
        chunk: list[PendingReads] = []
        reads = 0
        for rec in waiting:
            if rec.reads > SETTLE_AT_STOP_READS:
                continue  # one record too wide for a chunk: the writer's
            if chunk and (
                len(chunk) >= self.batch_size or reads + rec.reads > SETTLE_AT_STOP_READS
            ):
                chunks.append(chunk)
                chunk, reads = [], 0
            chunk.append(rec.pending)
            reads += rec.reads
        if chunk:
            chunks.append(chunk)
        for chunk in chunks:
            left = until - time.monotonic()
            if left <= 0 or not thread.is_alive():
                return
            try:
                if not settle_columns(chunk, left):
                    return
            except Exception:  # the writer thread resolves it and reports the error
                logger.debug("settling at stop failed; left to the writer", exc_info=True)
                return

    def _check_destination(self) -> None:
        """A spill is written to the store it was meant for: its destination is kept beside it
        (``<spill>.dest``); rows of earlier runs meant for another table or file are refused
        at start, not written to this one (found by the attack on issue 17: a run with another
        ``FMEL_DATASET`` replayed them into its own dataset). Spills without the note (older
        versions) are taken as they are.

        Raises:
            ConfigError: the spill holds rows for another destination.
        """
        dest = getattr(self.sink, "destination", None)
        if not isinstance(dest, str):
            return
        note = self.spill.path.with_name(self.spill.path.name + ".dest")
        if self._earlier:
            try:
                theirs = note.read_text(encoding="utf-8").strip()
            except FileNotFoundError:
                theirs = dest
            if theirs != dest:
                raise ConfigError(
                    f"FMEL_SPILL_DIR={self.spill_dir}: {self._earlier} decision records in "
                    f"{self.spill_path} are for {theirs}, not for {dest}; write them there "
                    "first (python -m runtime.drain with that run's FMEL_* settings), or use "
                    "another FMEL_SPILL_DIR"
                )
        try:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            note.write_text(dest + "\n", encoding="utf-8")
        except OSError as e:  # the spill itself reports a disk that cannot be written
            logger.debug("cannot write %s: %s", note, e)

    def _count_unsure(self, in_flight: Sequence[Item]) -> int:
        """Records in the spill (this run's or earlier runs') that the store may hold all the
        same (see :attr:`WriterStats.unsure_in_spill`): the write or replay a stuck thread
        still has in flight, and the rows the sink had no answer for. Owner thread, io lock
        held."""
        if not self.stats.in_spill:
            return 0
        ids: set[object] = {
            r.decision_id if isinstance(r, DecisionRecord) else r.get("decision_id")
            for r in in_flight
        }
        unsure_ids = getattr(self.sink, "unsure_ids", None)
        if unsure_ids is not None:
            try:
                ids.update(unsure_ids())
            except Exception:  # a stuck sink's state is only advisory here
                logger.debug("sink %s: unsure_ids() failed", self.sink.name, exc_info=True)
        ids.discard(None)
        return min(len(ids), self.stats.in_spill)

    def _settle_held(self) -> None:
        """At stop (owner thread): rows held in memory because the spill folder failed get
        one last write to the sink when the writer thread has ended (a stuck thread may still
        be in the sink); what is still held is counted ``lost`` and logged with the reason."""
        with self._io_lock:  # a stuck writer thread no longer touches _held (abandoned)
            self._settle_held_locked()

    def _settle_held_locked(self) -> None:
        held = self._held
        if not held:
            return
        if self._thread is None or self._exited or not self._thread.is_alive():
            try:
                if not self._opened:
                    self.sink.open()
                    self._opened = True
                errors = self.sink.write(list(held))
            except (AppError, OSError) as e:
                logger.error(
                    "sink %s did not take the %d decision records held in memory: %s: %s",
                    self.sink.name,
                    len(held),
                    type(e).__name__,
                    e,
                )
            else:
                self._account(held, errors)
                held.clear()
        if held:
            reason = self.failure or "the spill folder could not be written"
            self.stats.lost += len(held)
            self.stats.lost_reason = reason
            logger.error(
                "%d decision records lost (%s; the sink did not take them): decision ids %s .. %s",
                len(held),
                reason,
                held[0].get("decision_id"),
                held[-1].get("decision_id"),
            )
            held.clear()

    def _failed(self, reason: str) -> None:
        """Tell the failure listeners, once (see :meth:`add_failure_listener`)."""
        if self.failure is not None:
            return
        self.failure = reason
        for fn in self._failure_listeners:
            try:
                fn(reason)
            except Exception:
                logger.exception("decision writer failure listener failed")

    def _disk_failed(self, e: OSError, path: Path) -> None:
        """A file under ``spill_dir`` could not be written: journal no more (no further bar is
        acknowledged), hold unstored rows in memory, log once, tell the listeners."""
        with self._cond:
            first = self.disk_error is None
            if first:
                self.disk_error = e
                self._unjournaled = 0
            self._cond.notify_all()  # wait_durable() returns False at once
        if not first:
            return
        code = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
        reason = f"cannot write {path}: [Errno {e.errno} {code}] {e.strerror or e}"
        logger.error(
            "decision records cannot be kept on local disk (%s); stopping the run: %srecords "
            "go straight to sink %s and what it cannot take is held in memory until the stop",
            reason,
            "no further bar is acknowledged, " if self.journal is not None else "",
            self.sink.name,
        )
        self._failed(reason)

    # -- writer thread ----------------------------------------------------------------------

    @staticmethod
    def _as_row(record: Item) -> Row:
        return to_row(record) if isinstance(record, DecisionRecord) else record

    def _rows(self, records: Sequence[Item], owner: bool = False) -> list[Row]:
        """``records`` as JSON-shaped rows (:func:`to_row` resolves reads not resolved yet).
        A record that cannot be converted (its reads cannot be resolved: a bug, or a feed
        changed under a record still waiting) is counted ``lost`` with the reason, logged
        once per call with the first id; the others are kept. Writer thread (counts nothing
        once stop() took over), or ``owner``: stop() on its thread, io lock held."""
        rows: list[Row] = []
        failed: list[tuple[Item, Exception]] = []
        for r in records:
            try:
                rows.append(self._as_row(r))
            except Exception as e:  # noqa: BLE001 - counted and logged below
                failed.append((r, e))
        if failed:
            record, error = failed[0]
            reason = f"the record could not be converted ({type(error).__name__}: {error})"
            with contextlib.nullcontext() if owner else self._io_lock:
                if not owner and self._abandoned:
                    return rows
                self.stats.lost += len(failed)
                self.stats.lost_reason = reason[:500]
            logger.error(
                "%d decision records lost: %s; first decision id %s",
                len(failed),
                reason[:500],
                getattr(record, "decision_id", None),
                exc_info=error,
            )
        return rows

    def _take(self) -> list[Item] | None:
        """Wait for a batch; [] when the interval passed with nothing to write; None when
        stopping and empty. With a journal, new records are journaled while waiting, and a
        batch holds only journaled records."""
        deadline = self._clock() + self.flush_interval_s
        while True:
            with self._cond:
                while (
                    not self._batch_ready()
                    and not (self._stopping or self._flush_wanted)
                    and not self._unjournaled
                ):
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._writer_waits = True
                    try:
                        self._wait(self._cond, remaining)
                    finally:
                        self._writer_waits = False
                if not self._unjournaled:
                    return self._batch_locked()
                new = list(self._buf)[len(self._buf) - self._unjournaled :]
                self._unjournaled = 0
            self._journal_write(new)

    def _batch_ready(self) -> bool:
        """A full batch waits: ``batch_size`` records, or ``batch_reads`` reads (lock held)."""
        return len(self._buf) >= self.batch_size or (
            self.batch_reads is not None and self._buf_reads >= self.batch_reads
        )

    def _journal_write(self, records: list[Item]) -> None:
        """Append ``records`` to the journal (fsynced), then tell the listeners (writer
        thread, without the lock: submit() goes on meanwhile)."""
        assert self.journal is not None
        if self.disk_error is None:
            try:
                self.journal.append(
                    [row_json(r) if isinstance(r, DecisionRecord) else _json(r) for r in records]
                )
            except OSError as e:
                self._disk_failed(e, self.journal.path)
        if self.disk_error is not None:
            return  # not durable: the listeners are not told (their bars are redelivered)
        for fn in self._listeners:
            try:
                fn(records)
            except Exception:
                logger.exception("durable listener failed (the records are journaled)")
        with self._cond:  # after the listeners: wait_durable() returns once they were told
            self._journaled += len(records)
            self._cond.notify_all()

    def _batch_locked(self) -> list[Item] | None:
        """The next batch (lock held); see :meth:`_take`."""
        if not self._buf:
            self._flush_wanted = False
            return None if self._stopping else []
        n = min(len(self._buf), self._write_rows())
        batch = [self._buf.popleft() for _ in range(n)]
        self._buf_reads -= sum(r.reads for r in batch if isinstance(r, tuple))
        self._inflight = batch
        self._inflight_on_disk = False
        self.stats.queue_depth = len(self._buf)
        self._cond.notify_all()  # wake a blocked submit()
        return batch

    def _done(self) -> None:
        with self._cond:
            batch = self._inflight
            self._inflight = None
            self._cond.notify_all()  # wake flush()
        if self.journal is not None and batch:
            try:
                self.journal.settle(len(batch))  # written, spilled or rejected: settled
            except OSError as e:  # compacting needs room; the records themselves are settled
                self._disk_failed(e, self.journal.path)

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
            self._recover_until_deadline()
        except BaseException as e:
            if self._abandoned and isinstance(e, Exception):
                # stop() took over and interrupted the sink (a replay or a probe cut short
                # too: helper-98 found that reported as the writer failing); what the thread
                # held is spilled
                logger.info("decision writer thread ended after the stop took over: %s", e)
            else:
                self._fatal = e
                logger.exception("decision writer failed; records go to %s", self.spill_path)
                self._failed(f"decision writer failed: {type(e).__name__}: {e}")
        finally:
            with self._cond:
                self._cond.notify_all()  # wake flush() and submit()
            with self._io_lock:
                self._exited = True
                if self._abandoned:  # stop() gave up waiting: nobody else closes the sink
                    with contextlib.suppress(Exception):
                        self.sink.close()
                    self._opened = False  # stop() opens it again for rows held in memory

    def _recover_until_deadline(self) -> None:
        """Stopping with rows in the spill: try the sink again and again, waiting the retry
        policy's backoff (:meth:`core.retry.RetryPolicy.delay_s`) between tries, until the
        spill is drained or the stop's budget is spent (what is left stays on disk). Writer
        thread."""
        attempt = 0
        while self._spilling and not self._out_of_time():
            self._maybe_recover(force=True)
            if not self._spilling:
                return
            attempt += 1
            until = min(self._clock() + self.retry.delay_s(attempt), self._deadline)
            with self._cond:
                while self._clock() < until:
                    self._wait(self._cond, until - self._clock())

    def _take_sink_sizes(self) -> None:
        """``batch_reads`` from the sink, which sized its statements at ``open()`` (its
        ``run_reads``), unless one was given. Any thread that opened the sink."""
        if self._batch_reads_given:
            return
        run_reads = getattr(self.sink, "run_reads", None)
        if isinstance(run_reads, int) and not isinstance(run_reads, bool) and run_reads > 0:
            self.batch_reads = run_reads

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
        if self._spilling or self._out_of_time():
            self._spill(self._rows(batch))
            self._maybe_recover()
            return
        if self._stopping and not self._told_finishing:
            self._told_finishing = True
            finishing = getattr(self.sink, "finishing", None)
            if finishing is not None:
                try:
                    finishing()
                except Exception:
                    logger.exception("sink %s failed in finishing() (ignored)", self.sink.name)
        # With a journal, ids may repeat across restarts: the de-duplicating write.
        fast = getattr(self.sink, "write_records", None) if self.journal is None else None
        t0 = self._clock()
        try:
            if fast is not None and all(isinstance(r, DecisionRecord) for r in batch):
                errors = self._call_with_retry("write", fast, batch)
            else:
                batch = [self._as_row(r) for r in batch]
                errors = self._call_with_retry("write", self.sink.write, batch)
        except TransientError as e:
            self._enter_spill(str(e))
            self._spill_unstored(batch)
            return
        except Exception as e:  # a sink bug must not lose the batch: keep it on disk
            if self._abandoned:  # stop() spilled this batch and interrupted the sink
                logger.info("sink %s: the abandoned write ended (%s)", self.sink.name, e)
                return
            logger.exception(
                "sink %s failed on a batch of %d; keeping it in %s",
                self.sink.name,
                len(batch),
                self.spill_path,
            )
            self._enter_spill(f"{type(e).__name__}: {e}")
            self._spill_unstored(batch)  # what the sink stored before failing is written
            return
        self._rate.add(len(batch), self._clock() - t0)
        with self._io_lock:
            if self._abandoned:
                return  # stop() took over and counted this batch spilled
            self._account(batch, errors)

    def _account(self, rows: Sequence[Item], errors: list[RowError], replay: bool = False) -> None:
        self.stats.batches += 1
        if errors:
            # a row is rejected once, whatever the sink said (one error per row, in range)
            first: dict[int, RowError] = {}
            for e in errors:
                if isinstance(e.index, int) and 0 <= e.index < len(rows):
                    first.setdefault(e.index, e)
            if len(first) != len(errors):
                logger.error(
                    "sink %s returned %d row errors for %d distinct rows of a batch of %d (a "
                    "repeated or out-of-range index): each row counted once",
                    self.sink.name,
                    len(errors),
                    len(first),
                    len(rows),
                )
            errors = list(first.values())
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
        if self._out_of_time():
            return
        try:
            if not self._opened:
                self.sink.open()
                self._opened = True
                self._take_sink_sizes()  # a sink unreachable at start
            probe = getattr(self.sink, "probe", None)
            if probe is not None:
                probe()  # a cheap call before sending a large batch into an outage
            self._write_held()
            self._replay()
        except TransientError as e:
            logger.info("sink %s still unavailable: %s", self.sink.name, e)

    def _write_held(self) -> None:
        """Write the rows held in memory (the spill folder failed) to the sink, oldest first.

        Raises:
            TransientError: the sink failed again (the rows stay held).
        """
        while self._held and not self._out_of_time():
            rows = self._held[: self._write_rows()]
            self._inflight_rows = rows
            try:
                errors = self._call_with_retry("write", self.sink.write, rows)
            finally:
                self._inflight_rows = None
            with self._io_lock:
                if self._abandoned:
                    return
                del self._held[: len(rows)]
                self._account(rows, errors)

    def _replay(self) -> None:
        """Drain the spill file, oldest rows first, in writes of about ``replay_write_s``
        seconds; leave spill mode when it is empty. Stops early (keeping the rest) when a
        stopping writer runs out of time.

        Rows of earlier runs may have been stored already (a process that died after a write
        but before the spill's head moved, or whose request timed out after the store took it):
        the sink's optional ``before_replay(rows)`` is told about them first (a sink that cannot
        de-duplicate by ``decision_id`` looks them up). Rows of this run whose outcome is
        unknown are known to the sink already.

        Raises:
            TransientError: the sink failed again (what it did store is taken out of the file).
        """
        pending = self.spill.pending()
        if pending:
            logger.info("draining %d spilled decision records from %s", pending, self.spill_path)
        before_replay = getattr(self.sink, "before_replay", None)
        while True:
            if self._out_of_time():
                logger.warning(
                    "stopping: %d decision records left in %s",
                    self.spill.pending(),
                    self.spill_path,
                )
                self._spilling = True  # what comes now queues behind them
                return
            # pending() is kept by this object: no read of a file known to hold nothing
            head = self.spill.head(self._write_rows()) if self.spill.pending() else Head([], 0, 0)
            if not head.lines:
                break
            rows = head.rows
            earlier = self._earlier_rows(head)
            if before_replay is not None and earlier:
                before_replay(rows[:earlier])
            t0 = self._clock()
            self._inflight_rows = rows  # stop() names them in doubt if it takes over now
            try:
                errors = self._call_with_retry("replay", self.sink.write, rows)
            except (TransientError, SinkError):
                # SinkError: needs a human (permission withdrawn), as from probe() or open()
                self._settle_stored(head, earlier)
                raise
            except Exception as e:
                # A sink bug, as on the write path: the rows stay in the file and the replay is
                # tried again later (helper-113: an unexpected error here ended the writer)
                if self._abandoned:
                    return
                logger.exception(
                    "sink %s failed replaying %d rows; they stay in %s",
                    self.sink.name,
                    len(rows),
                    self.spill_path,
                )
                self._settle_stored(head, earlier)
                raise TransientError(f"replay: {type(e).__name__}: {e}") from e
            finally:
                self._inflight_rows = None
            self._rate.add(len(rows), self._clock() - t0)
            consume_failed: OSError | None = None
            with self._io_lock:
                if self._abandoned:
                    return
                self._count_replayed(head, errors, earlier)
                try:
                    self.spill.consume(head)
                except OSError as e:
                    consume_failed = e
            if consume_failed is not None:
                # The head cannot move on: the rest stays for the next start (the rows just
                # stored are sent again then; stores keep one row per decision_id).
                self._disk_failed(consume_failed, self.spill.pos_path)
                self._spilling = bool(self._held)
                return
            with self._cond:
                self._cond.notify_all()  # wait_drained()
        if self.spill.exists() and not self.spill.pending():
            self.spill.remove()
        self._spilling = False
        logger.info("sink %s: spill drained", self.sink.name)

    def _earlier_rows(self, head: Head) -> int:
        """How many rows of ``head`` (from the front) come from earlier runs. Torn lines can
        only be an earlier run's (this process's appends complete), so they are counted in
        that part of the file."""
        torn = head.lines - len(head.rows)
        return max(0, min(self._earlier, head.lines) - torn)

    def _forget_earlier(self, lines: int) -> None:
        self._earlier -= min(self._earlier, lines)
        self.stats.earlier_left = self._earlier

    def _count_replayed(self, head: Head, errors: Sequence[RowError], earlier: int) -> None:
        """Counts after the rows of ``head`` (``earlier`` of them, at the front, from earlier
        runs) left the spill file (io lock held)."""
        rows = head.rows
        self.stats.batches += 1
        if errors:
            self._keep_rejected([(rows[e.index], e.reason) for e in errors])
        bad_earlier = sum(1 for e in errors if e.index < earlier)
        mine = len(rows) - earlier
        bad_mine = len(errors) - bad_earlier
        self.stats.replayed += earlier - bad_earlier
        self.stats.earlier_rejected += bad_earlier
        self.stats.written += mine - bad_mine
        self.stats.recovered += mine - bad_mine
        self.stats.rejected += bad_mine
        self.stats.spilled -= mine
        self.stats.earlier_torn += head.lines - len(rows)
        self._forget_earlier(head.lines - mine)

    def _settle_stored(self, head: Head, earlier: int) -> None:
        """After a failed write of the spill's head: take out of the file what the sink says
        it stored anyway (a write made of several requests, some of which succeeded)."""
        is_stored = getattr(self.sink, "is_stored", None)
        if is_stored is None:
            return
        stored = [i for i, r in enumerate(head.rows) if is_stored(r.get("decision_id"))]
        if not stored:
            return
        gone = set(stored)
        keep = [r for i, r in enumerate(head.rows) if i not in gone]
        with self._io_lock:
            if self._abandoned:
                return
            self.spill.replace_head(head, keep)  # torn lines are dropped too
            self.stats.earlier_torn += head.lines - len(head.rows)
            n_earlier = sum(1 for i in stored if i < earlier)
            self.stats.replayed += n_earlier
            self._forget_earlier(n_earlier + head.lines - len(head.rows))
            mine = len(stored) - n_earlier
            self.stats.written += mine
            self.stats.recovered += mine
            self.stats.spilled -= mine

    def _spill_unstored(self, batch: Sequence[Item]) -> None:
        """Spill a failed batch, except the records the sink says it stored anyway (counted
        written)."""
        if self._abandoned:  # stop() took this batch over: no conversion for nothing
            return
        is_stored = getattr(self.sink, "is_stored", None)
        rows = self._rows(batch)
        if is_stored is not None:
            left = [r for r in rows if not is_stored(r.get("decision_id"))]
            with self._io_lock:
                if self._abandoned:
                    return
                self.stats.written += len(rows) - len(left)
            rows = left
        self._spill(rows)

    def _write_rows(self) -> int:
        """Rows of one write: as many as the sink's measured rate takes in ``replay_write_s``,
        between ``batch_size`` and ``max_batch`` (:data:`FIRST_WRITE_ROWS` before any
        measurement, so a first large write cannot outlast a request timeout)."""
        per_s = self._rate.per_s()
        rows = FIRST_WRITE_ROWS if per_s is None else int(per_s * self.replay_write_s)
        return max(self.batch_size, min(self.max_batch, rows))

    def _out_of_time(self) -> bool:
        """True once a stopping writer has used its share of the stop's budget."""
        return self._stopping and self._clock() >= self._deadline

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until no row of an earlier run is left in the spill file (True), or
        ``timeout_s`` passed / the writer thread is gone (False). Owner thread (the drain
        command)."""
        with self._cond:
            return (
                self._cond.wait_for(lambda: self._earlier == 0 or not self._alive(), timeout_s)
                and self._earlier == 0
            )

    def _spill(self, rows: Sequence[Row], owner: bool = False) -> None:
        """Append to the spill file and count (``owner``: stop() on its thread, io lock held;
        otherwise the writer thread, which does nothing once stop() took over)."""
        failed: OSError | None = None
        with contextlib.nullcontext() if owner else self._io_lock:
            if self._abandoned and not owner:
                return
            if rows and self.disk_error is None:
                try:
                    self.spill.append(rows)
                except OSError as e:
                    failed = e
                except (TypeError, ValueError):
                    # a row with a value JSON has no form for: kept in the rejected file
                    # (written with repr) and counted rejected; the others spilled
                    bad = dict(json_problems(rows))
                    self._reject([(r, bad[i]) for i, r in enumerate(rows) if i in bad])
                    rows = [r for i, r in enumerate(rows) if i not in bad]
                    try:
                        self.spill.append(rows)
                    except OSError as e:
                        failed = e
            if rows and (failed is not None or self.disk_error is not None):
                self._held.extend(rows)  # not on disk: the sink is tried again, else lost
            else:
                self.stats.spilled += len(rows)
                self.stats.spilled_total += len(rows)
            if not owner:
                with self._cond:
                    self._inflight_on_disk = self._inflight is not None
        self._spilling = True
        if failed is not None:
            self._disk_failed(failed, self.spill.path)

    def _reject(self, items: list[tuple[Row, str]]) -> None:
        self._keep_rejected(items)
        self.stats.rejected += len(items)

    def _keep_rejected(self, items: Sequence[tuple[Row, str]]) -> None:
        """Log each refused row and keep it in the rejected file (not counted here)."""
        for row, reason in items:
            logger.error(
                "sink %s rejected decision %s: %s (kept in %s)",
                self.sink.name,
                row.get("decision_id"),
                reason,
                self.rejected_path,
            )
        if self.disk_error is not None:
            return  # logged above with their ids; the folder cannot be written
        try:
            self.rejected.append(items)
        except OSError as e:
            self._disk_failed(e, self.rejected.path)


def _json(row: Row) -> str:
    return json.dumps(row, separators=(",", ":"), allow_nan=False)


class Rate:
    """Rows per second of recent sink writes (exponential average over writes of at least
    ``min_s`` seconds; shorter ones say little about throughput). Writer thread only."""

    def __init__(self, weight: float = 0.3, min_s: float = 0.05) -> None:
        self.weight = weight
        self.min_s = min_s
        self._per_s: float | None = None

    def add(self, rows: int, seconds: float) -> None:
        if rows <= 0 or seconds < self.min_s:
            return
        now = rows / seconds
        prev = self._per_s
        self._per_s = now if prev is None else prev + self.weight * (now - prev)

    def per_s(self) -> float | None:
        return self._per_s
