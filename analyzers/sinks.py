"""Decision sinks and the writer thread that feeds them.

* :class:`DecisionSink` is what a store implements: ``open``, ``write`` a batch of rows,
  ``close``. :class:`LocalDuckDBSink` (the default, an embedded DuckDB file) lives here;
  ``analyzers.bigquery.BigQuerySink`` implements the same protocol for production.
* :class:`DecisionWriter` owns one background thread. ``submit()`` is called on the main thread
  from the analyzer and only appends to a bounded buffer (waits when it is full: back-pressure,
  never a drop). The thread writes when ``batch_size`` records are waiting or
  ``flush_interval_s`` has passed, whichever comes first; when it is behind it catches up in
  writes of up to ``max_batch`` records.
* Failures: :class:`~runtime.errors.TransientError` from a sink is retried with capped
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
    SCHEMA_VERSION,
    DecisionRecord,
    RunInfo,
    duckdb_columns,
    duckdb_ddl,
    duckdb_struct_type,
    to_row,
)
from runtime.errors import SinkError, TransientError

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
    primary key; a replayed row that is already stored is ignored.

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
        self._insert_sql = (
            f'INSERT OR IGNORE INTO "{table}" SELECT unnest(CAST(j::JSON AS '
            f"{duckdb_struct_type()})) FROM (SELECT unnest($1::VARCHAR[]) AS j)"
        )
        self._columnar_sql = _columnar_insert_sql(table)

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
        ddl = duckdb_ddl(self.table).replace(
            '"decision_id" VARCHAR NOT NULL', '"decision_id" VARCHAR PRIMARY KEY'
        )
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
        """Fast path for records straight from the analyzer: the batch goes to DuckDB as a few
        flat column lists and is assembled into nested rows by SQL inside DuckDB (which runs
        without the GIL), so the bar loop barely notices the writer thread."""
        if self._con is None:
            raise SinkError("LocalDuckDBSink.write_records() before open()")
        errors: list[RowError] = []
        by_run: dict[RunInfo, list[int]] = {}
        for i, rec in enumerate(records):
            by_run.setdefault(rec.run, []).append(i)
        for run, idx in by_run.items():
            payload = json.dumps(
                _columns(run, [records[i] for i in idx]), separators=(",", ":"), allow_nan=False
            )
            self._con.execute(self._columnar_sql, [payload])
        return errors

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


def _finite(x: float | None) -> float | None:
    """NaN/inf -> None (JSON has neither; both stores take null)."""
    if x is None or x != x or x in (_INF, -_INF):
        return None
    return x


_INF = float("inf")


def _columns(run: RunInfo, records: Sequence[DecisionRecord]) -> dict[str, Any]:
    """Flatten records into column lists (one pass, plain list appends)."""
    r_i, r_dp, r_ts, r_bt, r_stage, r_action, r_reads, r_la = [], [], [], [], [], [], [], []
    r_pv, r_cash, r_reason, r_conf, r_notes = [], [], [], [], []
    a_cols: list[list[Any]] = [[] for _ in range(13)]
    d_i, d_seq, d_sym, d_hash, d_fields = [], [], [], [], []
    p_cols: list[list[Any]] = [[] for _ in range(11)]
    q_i, q_sym, q_size, q_price = [], [], [], []
    for i, rec in enumerate(records):
        r_i.append(i)
        r_dp.append(rec.decision_point)
        r_ts.append(rec.ts)
        r_bt.append(rec.bar_time)
        r_stage.append(rec.stage)
        r_action.append(rec.action)
        r_reads.append(rec.reads)
        r_la.append(rec.lookahead_reads)
        r_pv.append(_finite(rec.portfolio_value))
        r_cash.append(_finite(rec.portfolio_cash))
        r_reason.append(rec.reasoning)
        r_conf.append(_finite(rec.confidence))
        r_notes.append(rec.notes)
        for a in rec.actions:
            a_cols[0].append(i)
            for col, value in zip(a_cols[1:], a, strict=True):
                col.append(_finite(value) if value.__class__ is float else value)
        for k, da in enumerate(rec.data_accessed):
            d_i.append(i)
            d_seq.append(k)
            d_sym.append(da.symbol)
            d_hash.append(da.data_hash)
            d_fields.append(list(da.fields_accessed))
            for ap in da.access_patterns:
                p_cols[0].append(i)
                p_cols[1].append(da.symbol)
                p_cols[2].append(ap.seq)
                p_cols[3].append(ap.field)
                p_cols[4].append(ap.index)
                p_cols[5].append(ap.size)
                p_cols[6].append(ap.bar_index)
                p_cols[7].append(ap.data_hash)
                p_cols[8].append(_finite(ap.value))
                p_cols[9].append(ap.text_value)
                p_cols[10].append(ap.lookahead)
        for pos in rec.positions:
            q_i.append(i)
            q_sym.append(pos.symbol)
            q_size.append(_finite(pos.size))
            q_price.append(_finite(pos.price))
    params: dict[str, Any] = {
        "sid": run.session_id,
        "agent": run.agent_id,
        "mode": run.mode,
        "aclass": run.agent_class,
        "aparams": run.agent_params,
        "ahash": run.agent_source_hash,
        "r_i": r_i,
        "r_dp": r_dp,
        "r_ts": r_ts,
        "r_bt": r_bt,
        "r_stage": r_stage,
        "r_action": r_action,
        "r_reads": r_reads,
        "r_la": r_la,
        "r_pv": r_pv,
        "r_cash": r_cash,
        "r_reason": r_reason,
        "r_conf": r_conf,
        "r_notes": r_notes,
        "d_i": d_i,
        "d_seq": d_seq,
        "d_sym": d_sym,
        "d_hash": d_hash,
        "d_fields": d_fields,
        "q_i": q_i,
        "q_sym": q_sym,
        "q_size": q_size,
        "q_price": q_price,
    }
    for name, col in zip(_A_NAMES, a_cols, strict=True):
        params["a_" + name] = col
    for name, col in zip(_P_NAMES, p_cols, strict=True):
        params["p_" + name] = col
    return params


_A_NAMES = (
    "i",
    "seq",
    "event",
    "side",
    "symbol",
    "order_ref",
    "order_type",
    "size",
    "price",
    "exec_size",
    "exec_price",
    "commission",
    "reason",
)
_A_TYPES = (
    "BIGINT",
    "BIGINT",
    "VARCHAR",
    "VARCHAR",
    "VARCHAR",
    "BIGINT",
    "VARCHAR",
    "DOUBLE",
    "DOUBLE",
    "DOUBLE",
    "DOUBLE",
    "DOUBLE",
    "VARCHAR",
)
_P_NAMES = (
    "i",
    "sym",
    "seq",
    "field",
    "index",
    "size",
    "bar_index",
    "data_hash",
    "value",
    "text_value",
    "lookahead",
)
_P_TYPES = (
    "BIGINT",
    "VARCHAR",
    "BIGINT",
    "VARCHAR",
    "BIGINT",
    "BIGINT",
    "BIGINT",
    "VARCHAR",
    "DOUBLE",
    "VARCHAR",
    "BOOLEAN",
)


_PAYLOAD_FIELDS: list[tuple[str, str]] = []


def _unnest(prefix: str, names: Sequence[str], types: Sequence[str]) -> str:
    for n, t in zip(names, types, strict=True):
        if (f"{prefix}_{n}", f"{t}[]") not in _PAYLOAD_FIELDS:
            _PAYLOAD_FIELDS.append((f"{prefix}_{n}", f"{t}[]"))
    return ", ".join(f'unnest(src.s."{prefix}_{n}") AS "{n}"' for n in names)


def _columnar_insert_sql(table: str) -> str:
    """One INSERT that rebuilds nested rows from the column lists of :func:`_columns`."""
    types = dict(duckdb_columns())
    actions_t, accessed_t, positions_t = (
        types["actions"],
        types["data_accessed"],
        types["positions"],
    )
    access_t = accessed_t.removesuffix("[]").split('"access_patterns" ', 1)[1]
    access_t = access_t.removesuffix(")").removesuffix("[]")
    a_struct = ", ".join(f'"{n}": a."{n}"' for n in _A_NAMES[1:])
    p_struct = ", ".join(
        f'"{n}": p."{n}"'
        for n in (
            "seq",
            "field",
            "index",
            "size",
            "bar_index",
            "data_hash",
            "value",
            "text_value",
            "lookahead",
        )
    )
    r_names = (
        "i",
        "dp",
        "ts",
        "bt",
        "stage",
        "action",
        "reads",
        "la",
        "pv",
        "cash",
        "reason",
        "conf",
        "notes",
    )
    r_types = (
        "BIGINT",
        "BIGINT",
        "DOUBLE",
        "DOUBLE",
        "VARCHAR",
        "VARCHAR",
        "BIGINT",
        "BIGINT",
        "DOUBLE",
        "DOUBLE",
        "VARCHAR",
        "DOUBLE",
        "VARCHAR",
    )
    body = f"""
r AS (SELECT {_unnest("r", r_names, r_types)} FROM src),
a AS (SELECT a."i", list(CAST({{{a_struct}}} AS {actions_t.removesuffix("[]")})
                     ORDER BY a."seq") AS actions
      FROM (SELECT {_unnest("a", _A_NAMES, _A_TYPES)} FROM src) a GROUP BY a."i"),
p AS (SELECT p."i", p."sym", list(CAST({{{p_struct}}} AS {access_t}) ORDER BY p."seq") AS aps
      FROM (SELECT {_unnest("p", _P_NAMES, _P_TYPES)} FROM src) p GROUP BY p."i", p."sym"),
d AS (SELECT d."i", list(CAST({{"symbol": d."sym", "data_hash": d."hash",
                                "fields_accessed": d."fields",
                                "access_patterns": coalesce(p.aps, [])}}
                              AS {accessed_t.removesuffix("[]")}) ORDER BY d."seq")
                   AS data_accessed
      FROM (SELECT {
        _unnest(
            "d",
            ("i", "seq", "sym", "hash", "fields"),
            ("BIGINT", "BIGINT", "VARCHAR", "VARCHAR", "VARCHAR[]"),
        )
    }
            FROM src) d
      LEFT JOIN p ON p."i" = d."i" AND p."sym" = d."sym"
      GROUP BY d."i"),
q AS (SELECT q."i", list(CAST({{"symbol": q."sym", "size": q."size", "price": q."price"}}
                              AS {positions_t.removesuffix("[]")})) AS positions
      FROM (SELECT {
        _unnest("q", ("i", "sym", "size", "price"), ("BIGINT", "VARCHAR", "DOUBLE", "DOUBLE"))
    } FROM src) q
      GROUP BY q."i")
SELECT run.sid || ':' || r.dp, run.sid, run.agent, run.mode, r.dp, to_timestamp(r.ts),
       to_timestamp(r.bt), r.stage, r.action, coalesce(a.actions, []),
       coalesce(d.data_accessed, []), r.reads, r.la, r.pv, r.cash, coalesce(q.positions, []),
       r.reason, r.conf, r.notes, run.aclass, run.aparams, run.ahash, {SCHEMA_VERSION}
FROM (SELECT src.s.sid, src.s.agent, src.s.mode, src.s.aclass, src.s.aparams, src.s.ahash
      FROM src) run, r
LEFT JOIN a ON a."i" = r."i" LEFT JOIN d ON d."i" = r."i" LEFT JOIN q ON q."i" = r."i"
ORDER BY r."i"
"""
    scalars = [(n, "VARCHAR") for n in ("sid", "agent", "mode", "aclass", "aparams", "ahash")]
    payload_t = ", ".join(f'"{n}" {t}' for n, t in scalars + _PAYLOAD_FIELDS)
    # The payload JSON is parsed once, into one STRUCT; everything else is columnar SQL.
    return (
        f'INSERT OR IGNORE INTO "{table}"\n'
        f"WITH src AS MATERIALIZED (SELECT CAST(CAST($1 AS JSON) AS STRUCT({payload_t})) "
        f"AS s),{body}"
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

    # -- main thread ------------------------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (it opens the sink and replays old spill files first)."""
        if self._thread is not None:
            return
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
        # Whatever is still buffered (thread stuck or dead) goes to disk, never lost.
        with self._cond:
            left = [self._as_row(r) for r in self._buf]
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
                    self._deliver(batch)
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
        try:
            self._call_with_retry(self.sink.open)
            self._opened = True
        except TransientError as e:
            self._enter_spill(f"sink unreachable at start: {e}")
            return
        if self.spill_path.exists():
            self._replay()

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
            logger.exception("sink %s failed on a batch of %d; keeping it in %s", self.sink.name,
                             len(batch), self.spill_path)
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
            tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rest),
                           encoding="utf-8")
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
