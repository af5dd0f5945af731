"""Decision sinks and the writer thread that feeds them.

* :class:`DecisionSink` is what a store implements: ``open``, ``write`` a batch of rows,
  ``close``. :class:`LocalDuckDBSink` (the default, an embedded DuckDB file) lives here;
  ``analyzers.bigquery.BigQuerySink`` implements the same protocol for production.
* :class:`DecisionWriter` owns one background thread. ``submit()`` is called on the main thread
  from the analyzer and only appends to a bounded buffer (waits when it is full: back-pressure,
  never a drop). The thread writes when ``batch_size`` records are waiting or
  ``flush_interval_s`` has passed, whichever comes first; when it is behind it catches up in
  writes of up to ``max_batch`` records.
* Failures: :class:`~core.errors.TransientError` from a sink is retried with capped
  exponential backoff and jitter; when the sink stays down the batch is appended to a spill file
  (JSON lines, fsynced) and later batches follow it there, in order, until the sink answers
  again; then the spill is replayed first. Spill files left by an earlier run are replayed at
  the next start. Rows a sink rejects for good (a bad value) are kept in
  ``rejected-<sink>.jsonl`` with the reason and counted; they are never dropped.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from analyzers.schema import (
    DECISION_SCHEMA,
    DecisionRecord,
    duckdb_ddl,
    duckdb_struct_type,
    row_json,
    to_row,
)
from core.errors import SinkError, TransientError

logger = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------
# Local embedded store
# ---------------------------------------------------------------------------------------------

# A flat view of every read, for BI tools and quick SQL (one row per access pattern).
ACCESS_VIEW_SQL = """
CREATE OR REPLACE VIEW decision_reads AS
SELECT d.decision_id, d.session_id, d.agent_id, d.decision_point, d.bar_time, d.stage, d.action,
       da.symbol, ap.seq, ap.field, ap."index", ap.size, ap.bar_index, ap.data_hash, ap.value,
       ap.text_value, ap.lookahead
FROM decisions d, UNNEST(d.data_accessed) AS t(da), UNNEST(da.access_patterns) AS u(ap)
"""


class LocalDuckDBSink:
    """Decision rows in an embedded DuckDB database file, same nested schema as BigQuery.

    Rows arrive as JSON text and are cast to the table's STRUCT type inside DuckDB in one
    statement per batch (much faster than binding Python objects). ``decision_id`` is the
    key of replays: a replayed row that is already stored is skipped.

    Args:
        path: database file (created with its folder when missing).
        table: table name.
    """

    name = "local"

    def __init__(self, path: Path, table: str = "decisions", threads: int = 1) -> None:
        self.path = Path(path)
        self.table = table
        self.threads = threads
        self._con: Any = None
        # Replays (spill files) may resend rows already stored: skip those ids. Fresh records
        # take the plain append (no primary key: its index would double the insert cost).
        cast = f"unnest(CAST(j::JSON AS {duckdb_struct_type()}))"
        self._append_sql = (
            f'INSERT INTO "{table}" SELECT {cast} FROM (SELECT unnest($1::VARCHAR[]) AS j)'
        )
        self._insert_sql = (
            f'INSERT INTO "{table}" SELECT r.* FROM (SELECT {cast} FROM '
            f"(SELECT unnest($1::VARCHAR[]) AS j)) AS r WHERE r.decision_id NOT IN "
            f'(SELECT decision_id FROM "{table}")'
        )

    def open(self) -> None:
        import duckdb

        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._con = duckdb.connect(str(self.path))
        except duckdb.IOException as e:
            raise SinkError(
                f"cannot open the local decision store {self.path}: {e} (is another "
                "process holding it open?)"
            ) from e
        # One DuckDB thread: the other core belongs to the bar loop.
        self._con.execute(f"SET threads = {self.threads}")
        ddl = duckdb_ddl(self.table)
        self._con.execute(ddl)
        self._check_columns()
        if self.table == "decisions":
            self._con.execute(ACCESS_VIEW_SQL)

    def _check_columns(self) -> None:
        have = [
            r[0]
            for r in self._con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position",
                [self.table],
            ).fetchall()
        ]
        want = [f.name for f in DECISION_SCHEMA]
        if have != want:
            raise SinkError(
                f"{self.path}: table {self.table} has columns {have}, expected "
                f"{want}; move the old file away or set FMEL_LOCAL_PATH"
            )

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        """Write JSON-shaped rows (spill replays, other producers); see :func:`to_row`."""
        import duckdb

        if self._con is None:
            raise SinkError("LocalDuckDBSink.write() before open()")
        texts = [json.dumps(r, separators=(",", ":"), allow_nan=False) for r in rows]
        try:
            self._con.execute(self._insert_sql, [texts])
            return []
        except duckdb.ConversionException:
            pass  # a bad value somewhere: find it row by row so the rest is written
        errors: list[RowError] = []
        for i, text in enumerate(texts):
            try:
                self._con.execute(self._insert_sql, [[text]])
            except duckdb.Error as e:
                errors.append(RowError(i, str(e).splitlines()[0]))
        return errors

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        """Fast path for fresh records from the analyzer: JSON text written directly
        (:func:`~analyzers.schema.row_json`) and cast to the table's STRUCT inside DuckDB,
        which runs without the GIL. No duplicate check: these ids were never written."""
        if self._con is None:
            raise SinkError("LocalDuckDBSink.write_records() before open()")
        self._con.execute(self._append_sql, [[row_json(r) for r in records]])
        return []

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def describe(self) -> str:
        return f"duckdb:{self.path.resolve()}"

    def example_query(self) -> str:
        return (
            f'python -m analyzers.query --db {self.path} "SELECT decision_point, bar_time, '
            "action, reasoning, reads, portfolio_value FROM decisions WHERE action <> 'HOLD' "
            'ORDER BY bar_time LIMIT 20"'
        )


# ---------------------------------------------------------------------------------------------
# Writer thread
# ---------------------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Capped exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff
    And Jitter"): attempt n sleeps ``uniform(0, min(cap_s, base_s * 2**n))`` seconds."""

    attempts: int = 4
    base_s: float = 0.2
    cap_s: float = 5.0
    probe_interval_s: float = 5.0  # while spilling: how often to try the sink again

    def delay_s(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * (2**attempt)))


class DecisionWriter:
    """Batches decision records to a sink from one background thread.

    Thread context: :meth:`submit` is called from the main (backtrader) thread; every sink call
    happens on the writer thread; :meth:`start`/:meth:`stop` from the thread that owns the
    writer.

    Args:
        sink: where rows go.
        batch_size: a write is triggered when this many records wait.
        flush_interval_s: ...or when the oldest waiting record is this old, seconds.
        queue_size: records buffered before :meth:`submit` blocks.
        spill_dir: folder for spill and rejected files.
        max_batch: largest single write when catching up.
        retry: backoff policy for transient failures.
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
        retry: RetryPolicy | None = None,
    ) -> None:
        self.sink = sink
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.queue_size = queue_size
        self.max_batch = max(max_batch, batch_size)
        self.retry = retry or RetryPolicy()
        self.spill_dir = Path(spill_dir)
        self.spill_path = self.spill_dir / f"spill-{sink.name}.jsonl"
        self.rejected_path = self.spill_dir / f"rejected-{sink.name}.jsonl"
        self.stats = WriterStats()
        self._buf: collections.deque[DecisionRecord | Row] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._opened = False
        self._spilling = False
        self._next_probe = 0.0
        self._last_error: str | None = None
        self._fatal: BaseException | None = None
        self._inflight: list[DecisionRecord | Row] | None = None

    # -- main thread ------------------------------------------------------------------------

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
        try:
            self._call_with_retry(self.sink.open)
            self._opened = True
        except TransientError as e:
            self._enter_spill(f"sink unreachable at start: {e}")
        self._thread = threading.Thread(
            target=self._run, name=f"fmel-writer-{self.sink.name}", daemon=True
        )
        self._thread.start()

    def submit(self, record: DecisionRecord | Row) -> None:
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
            if len(self._buf) >= self.batch_size:
                cond.notify()

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
    def _as_row(record: DecisionRecord | Row) -> Row:
        return to_row(record) if isinstance(record, DecisionRecord) else record

    def _take(self) -> list[DecisionRecord | Row] | None:
        """Wait for a batch; None when stopping and empty."""
        with self._cond:
            deadline = time.monotonic() + self.flush_interval_s
            while len(self._buf) < self.batch_size and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            if not self._buf:
                return None if self._stopping else []
            n = min(len(self._buf), self.max_batch)
            batch = [self._buf.popleft() for _ in range(n)]
            self.stats.queue_depth = len(self._buf)
            self._cond.notify_all()  # wake a blocked submit()
            return batch

    def _run(self) -> None:
        try:
            self._open_and_replay()
            while True:
                batch = self._take()
                if batch is None:
                    break
                if batch:
                    self._inflight = batch
                    self._deliver(batch)
                    self._inflight = None
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

    def _open_and_replay(self) -> None:
        if not self._opened:
            return  # unreachable at start: _maybe_recover opens it and replays later
        if self.spill_path.exists():
            try:
                self._replay()
            except TransientError as e:
                self._enter_spill(f"replay of {self.spill_path} failed: {e}")

    def _call_with_retry(self, fn: Any, *args: Any) -> Any:
        attempt = 0
        while True:
            try:
                return fn(*args)
            except TransientError as e:
                self._last_error = str(e)
                if attempt + 1 >= self.retry.attempts or self._stopping:
                    raise
                self.stats.retries += 1
                delay = self.retry.delay_s(attempt)
                logger.warning(
                    "sink %s: %s; retry %d in %.2f s", self.sink.name, e, attempt + 1, delay
                )
                time.sleep(delay)
                attempt += 1

    def _deliver(self, batch: list[DecisionRecord | Row]) -> None:
        if self._spilling:
            self._spill([self._as_row(r) for r in batch])
            self._maybe_recover()
            return
        fast = getattr(self.sink, "write_records", None)
        try:
            if fast is not None and all(isinstance(r, DecisionRecord) for r in batch):
                errors = self._call_with_retry(fast, batch)
            else:
                batch = [self._as_row(r) for r in batch]
                errors = self._call_with_retry(self.sink.write, batch)
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

    def _account(
        self, rows: Sequence[DecisionRecord | Row], errors: list[RowError], replay: bool = False
    ) -> None:
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
        self._next_probe = time.monotonic() + self.retry.probe_interval_s

    def _maybe_recover(self, force: bool = False) -> None:
        if not force and time.monotonic() < self._next_probe:
            return
        self._next_probe = time.monotonic() + self.retry.probe_interval_s
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
        rows = [
            json.loads(line)
            for line in self.spill_path.read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        logger.info("replaying %d spilled decision records from %s", len(rows), self.spill_path)
        # Optional sink hook: spilled rows may be half-written already (a store that cannot
        # de-duplicate by decision_id looks them up first).
        before_replay = getattr(self.sink, "before_replay", None)
        if before_replay is not None:
            before_replay(rows)
        for i in range(0, len(rows), self.max_batch):
            chunk = rows[i : i + self.max_batch]
            errors = self._call_with_retry(self.sink.write, chunk)
            self._account(chunk, errors, replay=True)
            # what is written leaves the file at once: a failure later resends nothing twice
            rest = rows[i + self.max_batch :]
            tmp = self.spill_path.with_suffix(".tmp")
            tmp.write_text(
                "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rest), encoding="utf-8"
            )
            os.replace(tmp, self.spill_path)
        self.spill_path.unlink()
        self._spilling = False
        logger.info("sink %s recovered; spill replayed", self.sink.name)

    def _append_lines(self, path: Path, lines: Sequence[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())

    def _spill(self, rows: Sequence[Row]) -> None:
        self._append_lines(
            self.spill_path, [json.dumps(r, separators=(",", ":"), allow_nan=False) for r in rows]
        )
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
        self._append_lines(
            self.rejected_path,
            [
                json.dumps({"reason": reason, "row": row}, separators=(",", ":"), allow_nan=False)
                for row, reason in items
            ],
        )
        self.stats.rejected += len(items)
