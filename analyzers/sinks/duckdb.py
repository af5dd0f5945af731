"""The local decision store: an embedded DuckDB file with BigQuery's nested schema.

:class:`LocalDuckDBSink` is the default sink (``FMEL_SINK=local``). It implements
:class:`~analyzers.sinks.base.DecisionSink` plus the writer's fast path ``write_records`` and
creates the ``decision_reads`` view from ``sql/duckdb/decision_reads_view.sql``. Read the file
with ``python -m analyzers.query``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Sequence
from itertools import compress, repeat
from operator import is_, itemgetter
from pathlib import Path
from typing import Any, TypeVar

from analyzers.deferred import DeferredRecord, PendingReads
from analyzers.schema import (
    DECISION_SCHEMA,
    Access,
    DecisionRecord,
    duckdb_columns,
    duckdb_ddl,
    duckdb_struct_type,
)
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.columnar import records_table
from analyzers.sinks.views import duckdb_view_sql
from core.errors import ConfigError, SinkError

# The sink's table among DuckDB's catalog functions (duckdb_tables(), duckdb_constraints(),
# ...), its name a parameter: the current catalog and schema, the name compared as DuckDB
# compares identifiers (case-insensitively); system.main.*: the file's own macros cannot stand
# in for DuckDB's functions
_THIS_TABLE = (
    "database_name = system.main.current_database() "
    "AND schema_name = system.main.current_schema() "
    "AND system.main.lower(table_name) = system.main.lower(?)"
)
_BATCH_VIEW = "fmel_arrow_batch"  # the Arrow table of one write_records() call
_CATALOG = "fmel"  # the attached file's name inside the connection
_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # md:, s3://, http://... (not C:)
# DuckDB checkpoints its write-ahead log into the file once the log passes ``wal_autocheckpoint``
# (16 MiB by default). The default is kept: a small limit (256 KiB) made the final flush of a
# backtest shorter (read-heavy agent: 0.23-0.32 s -> 0.15-0.19 s), but a live run that
# checkpoints after every few writes kept more memory (100 live symbols, 1,500 steps: RSS
# 392 MB before the store closed, 276 MB with the default; docs/benchmarks.md, seventh pass).
MAX_WAL_CHECKPOINT_BYTES = 2**40  # 1 TiB: past it DuckDB refuses the setting
MAX_THREADS = 1024  # DuckDB starts every thread at open: far more hangs the start
# Rows (decisions) per row group of the file. DuckDB's checkpoints merge small row groups into
# groups of up to this many rows (vacuum, below), reading every nested read of them into memory
# (about 200-270 bytes a read, measured): with DuckDB's 122,880 rows that grew for as long as a
# live run lasted (100 symbols read every step: 741 MB peak after 20,000 decisions, against
# 340 MB with 2,048; docs/benchmarks.md, eighth pass). The store now turns that merge off
# (MAX_VACUUM_TASKS); the small size still bounds it for a connection that writes the file with
# DuckDB's defaults. DuckDB requires a multiple of its vector size, 2,048, which is also its
# smallest row group.
ROW_GROUP_SIZE = 2048
DUCKDB_VECTOR_SIZE = 2048
# DuckDB's ``max_vacuum_tasks`` for the store: 0, no row groups merged at checkpoints. After
# each checkpoint DuckDB starts a new row group for the next append (it no longer rewrites the
# last one), and at the next checkpoint its vacuum merges the small groups back, up to
# ``ROW_GROUP_SIZE`` decisions, reading every nested read of them into memory again
# (``RowGroupCollection::ScheduleVacuumTasks``, duckdb/duckdb#18829). A commit of more than
# ``auto_checkpoint_skip_wal_threshold`` (100 kB of log) checkpoints at once, so wide decisions
# (10,000 symbols read a step: ~4 MB of reads each) got merged at every batch, up to 2,048 x
# 4 MB. Without the merge a checkpoint writes only what came since the last one: 10,000
# symbols x 2 reads, 400 decisions, peak RSS 710 MB against 3,038 MB, written in 63 s against
# 156 s, file 216 MB against 407 MB (docs/benchmarks.md, ninth pass). The cost: groups stay as
# small as one checkpoint's rows (a batch of wide decisions); the store never deletes rows, so
# vacuum has nothing else to do in it.
MAX_VACUUM_TASKS = 0
# DuckDB's buffer pool for the store, MiB (DuckDB's ``memory_limit``; its own default is 80 % of
# the machine's memory). DuckDB keeps the blocks it wrote cached in the pool, so without a
# limit the process grows with the file: 10,000 symbols x 2 reads, 1,200 decisions, RSS at the
# end 955 MB (file 646 MB) against 438 MB with 256 MiB (docs/benchmarks.md, ninth pass). What
# one write needs must fit in it: the sink commits a batch in runs of reads (READS_PER_MB).
MEMORY_LIMIT_MB = 512
MIN_MEMORY_LIMIT_MB = 64
MAX_MEMORY_LIMIT_MB = 2**30  # 1 PiB
# Stored reads per statement of a write, per MiB of the memory limit (each statement committed):
# a batch of wide decisions in one insert needs them all in DuckDB's pool at once (100
# decisions of 10,000 symbols: out of memory at 256 MiB). Measured (DuckDB 2.0.0, decisions of
# 2 x 5,000 and 2 x 50 reads, one statement): 200,000 reads went in at 64 MiB and 300,000 did
# not; 1,600,000 went in at 512 MiB; an earlier shape (a fresh-context attack) failed at
# 200,000 at 64 MiB. 780 a MiB (~400,000 at the default, ~50,000 at the least limit) keeps a
# margin of two below the lowest failure, and lets a row group of decisions of up to 195 reads
# go in as one statement: DuckDB writes a commit that fills whole row groups straight into the
# file and logs a smaller one first (a read-heavy batch of 2,048 decisions of ~98 reads, cut
# at 2,017 by 390 a MiB: 416-497 ms of the writer's thread against 188-243 ms whole;
# docs/benchmarks.md, twenty-seventh pass). Rows replayed as JSON text take about twice as
# much (DuckDB parses and casts the text): 100,000 reads went in at 512 MiB and 10,000 at
# 64 MiB, where 200,000 and 20,000 did not; 150 a MiB.
READS_PER_MB = 780
JSON_READS_PER_MB = 150
# What else a record holds counts as reads too (fresh-context attack: batches of 500 decisions
# with 100 kB of reasoning each, or of 20,000 symbols read nothing, ran out of 64 MiB as one
# statement): each symbol group one read, and its texts (reasoning, notes, agent_params) one
# read per TEXT_BYTES_PER_READ bytes. A JSON row counts by its text: JSON_BYTES_PER_READ is a
# read's JSON (235 bytes with the keys).
TEXT_BYTES_PER_READ = 100
JSON_BYTES_PER_READ = 235
# Decision ids of failed writes remembered as stored (is_stored), newest kept.
STORED_PART_KEPT = 100_000
MAX_ROW_GROUP_SIZE = 2**30


# The files this process has attached, under each of their keys (resolved path, and device and
# inode: hard links) -> [the connection that attached it, the connections handed out, keys].
# DuckDB lets a file be attached once per process, so a second user (the trial store and a
# recorder in an optimize run, a report after a run) gets a cursor of the same database
# (DuckDB's ``cursor()``: a connection to the same instance).
_ATTACHED: dict[str, list[Any]] = {}
_ATTACHED_LOCK = threading.Lock()
_SETUP_LOCK = threading.Lock()  # LocalDuckDBSink.open()'s tables and views
_SHARED_BY: dict[int, str] = {}  # id() of a handed-out connection -> its file's key
# the schema's column types as DuckDB spells them (pragma_table_info's ``type``), asked of
# DuckDB once per process: LocalDuckDBSink._check_columns compares a table's types with them
_EXPECTED_TYPES: list[str] = []


def _file_keys(path: Path) -> list[str]:
    """The keys of a file: its resolved path, and its device and inode when it exists (the
    same for every name of it, hard links included)."""
    keys = [str(path.resolve())]
    try:
        st = path.stat()
    except OSError:
        return keys
    return [*keys, f"{st.st_dev}:{st.st_ino}"]


def open_store(
    path: Path, row_group_size: int = ROW_GROUP_SIZE, memory_limit_mb: int = MEMORY_LIMIT_MB
) -> Any:
    """A read-write DuckDB connection to the local store file ``path`` (created with its
    folder when missing), writing row groups of at most ``row_group_size`` decisions, with a
    buffer pool of ``memory_limit_mb`` MiB (:data:`MEMORY_LIMIT_MB`).

    The file is attached to an in-memory DuckDB (``ROW_GROUP_SIZE`` is an option of ``ATTACH``
    only) and made the default catalog (``USE``), so statements name tables as with
    ``duckdb.connect(path)``; DuckDB's spill folder stays beside it (``<path>.tmp``); row groups
    are not merged at checkpoints (:data:`MAX_VACUUM_TASKS`: what bounds a checkpoint's memory
    for wide decisions). When this process already holds the file through a plain
    ``duckdb.connect(path)`` (DuckDB attaches a file once per process), that database is
    shared instead, with its own row groups and
    memory limit (the first opener's settings hold for all). Close the connection with
    :func:`close_store`.

    Thread context: any thread; the connection is then used by one thread at a time.

    Raises:
        SinkError: the file cannot be created or opened (not a DuckDB file, another process
            holds it, a folder in the way...), with DuckDB's reason.
    """
    import duckdb

    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SinkError(f"cannot create the local decision store {path}: {e}") from e
    with _ATTACHED_LOCK:
        keys = _file_keys(path)
        held = next((_ATTACHED[k] for k in keys if k in _ATTACHED), None)
        if held is not None:
            shared = held[0].cursor()
            shared.execute(f"USE {_CATALOG}")
            held[1] += 1
            _SHARED_BY[id(shared)] = held[2][0]
            return shared
        con = _idle_engine()
        if con is None:
            con = duckdb.connect()
            if not _PRISTINE:  # a fresh engine's settings, once a process (~8 ms)
                _PRISTINE.append(con.execute(_SETTINGS_SQL).fetchall())
        quoted = str(path).replace("'", "''")
        try:
            con.execute(
                f"ATTACH '{quoted}' AS {_CATALOG} (TYPE duckdb, ROW_GROUP_SIZE {row_group_size})"
            )
            con.execute(f"USE {_CATALOG}")
            con.execute(f"SET temp_directory = '{quoted}.tmp'")
            con.execute(f"SET max_vacuum_tasks = {MAX_VACUUM_TASKS}")
            con.execute(f"SET memory_limit = '{int(memory_limit_mb)}MiB'")
        except duckdb.ResourceInUseException as e:
            con.close()
            if "already attached" not in str(e):
                raise SinkError(f"cannot open the local decision store {path}: {e}") from e
            try:  # a plain connect(path) of this process holds it: share that database
                plain = duckdb.connect(str(path))
            except duckdb.Error as e2:
                raise SinkError(f"cannot open the local decision store {path}: {e2}") from e2
            _log.debug("%s is already open in this process: sharing its connection", path)
            return plain
        except duckdb.Error as e:
            con.close()
            hint = " (is another process holding it open?)" if "lock" in str(e).lower() else ""
            raise SinkError(f"cannot open the local decision store {path}: {e}{hint}") from e
        except BaseException:
            con.close()
            raise
        keys = _file_keys(path)  # the file exists now
        shared = con.cursor()
        shared.execute(f"USE {_CATALOG}")
        entry = [con, 1, keys]
        for k in keys:
            _ATTACHED[k] = entry
        _SHARED_BY[id(shared)] = keys[0]
        return shared


_DATA_ACCESSED = DecisionRecord._fields.index("data_accessed")


_TEXT_VALUE = itemgetter(Access._fields.index("text_value"))


def _record_cost(rec: DecisionRecord) -> int:
    """What ``rec`` weighs in a write, in reads: the rows it stores in ``data_accessed``
    (counted when resolved: a read of an indicator over several feeds is listed under each;
    else the reads the bar loop recorded, as counting would resolve a deferred record here,
    read by read), one per symbol group, and its texts (:data:`TEXT_BYTES_PER_READ`: the
    reasoning, notes and parameters, and the texts resolved reads returned)."""
    groups: Any = tuple.__getitem__(rec, _DATA_ACCESSED)
    chars = 0
    if isinstance(groups, tuple):
        n = sum(len(g.access_patterns) for g in groups) + len(groups) if groups else 0
        # the text a read returned (a text line's value: helper-97, 2 kB headlines)
        for g in groups:
            for text in map(_TEXT_VALUE, g.access_patterns):
                if isinstance(text, str):
                    chars += len(text)
    else:
        n = int(rec.reads)
    for text in (rec.reasoning, rec.notes, rec.run.agent_params):  # a loop, not a generator
        if isinstance(text, str):
            chars += len(text)
    return 1 + n + chars // TEXT_BYTES_PER_READ


_READS = DecisionRecord._fields.index("reads")
_REASONING = DecisionRecord._fields.index("reasoning")
_NOTES = DecisionRecord._fields.index("notes")


def _cost_bound(records: Sequence[DecisionRecord]) -> int | None:
    """At least ``sum(_record_cost(r) for r in records)``, counted without a Python call per
    record, for the writer's usual batch: records of one run (one ``RunInfo`` object) whose
    reads are still a :class:`~analyzers.deferred.PendingReads` (a
    :class:`~analyzers.deferred.DeferredRecord`: cost ``1 + reads`` and its texts' share) or
    none at all (a bar without reads: ``1`` and its texts' share), ``reads`` ints >= 0 (an
    upper bound of the second kind's 0), the texts' shares summed before dividing (at least
    their sum). ``None`` for any other batch (counted record by record)."""
    if not records or set(map(type, records)) - {DeferredRecord, DecisionRecord}:
        return None
    accessed = list(map(itemgetter(_DATA_ACCESSED), records))
    kinds = list(map(type, accessed))
    if set(kinds) - {PendingReads, tuple}:
        return None
    if any(compress(accessed, map(is_, kinds, repeat(tuple)))):  # a tuple of reads
        return None
    reads = list(map(itemgetter(_READS), records))
    runs = list(map(itemgetter(0), records))
    # one RunInfo object (not equal ones: an odd agent_params can equal another text,
    # helper-96)
    if set(map(type, reads)) != {int} or min(reads) < 0 or not all(map(is_, runs, repeat(runs[0]))):
        return None
    chars = 0
    for field in (_REASONING, _NOTES):
        texts = list(filter(None, map(itemgetter(field), records)))  # (most are None)
        if set(map(type, texts)) - {str}:
            return None
        chars += sum(map(len, texts))
    params = runs[0].agent_params
    if isinstance(params, str):
        chars += len(params) * len(records)
    total: int = len(records) + sum(reads) + chars // TEXT_BYTES_PER_READ
    return total


def record_runs(records: Sequence[DecisionRecord], most: int) -> list[range]:
    """:func:`cut_runs` of the records' :func:`_record_cost`, each counted only when the
    batch's :func:`_cost_bound` passes ``most`` (a batch that fits is one run either way)."""
    bound = _cost_bound(records)
    if bound is not None and bound <= most:
        return [range(len(records))]
    return cut_runs([_record_cost(r) for r in records], most)


# DuckDB shows memory_limit in binary units ("512.0 MiB", "18.8 GiB")
_UNITS = {"bytes": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50}


def memory_limit_of(con: Any, asked: int) -> float:
    """The memory limit of the database ``con`` writes to, MiB (the first opener of a shared
    file set it: it may not be what this sink asked); ``asked`` when DuckDB's text is not
    understood."""
    got = con.execute("SELECT current_setting('memory_limit')").fetchall()
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]+)\s*", str(got[0][0]) if got else "")
    unit = _UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        return float(asked)
    return float(match.group(1)) * unit / 2**20


def cut_runs(sizes: Sequence[int], most: int) -> list[range]:
    """Positions ``0..len(sizes)`` cut into consecutive runs of at most ``most`` in total (an
    item larger than that stands alone); one run when all fit (the usual batch)."""
    if sum(sizes) <= most:
        return [range(len(sizes))] if sizes else []
    runs: list[range] = []
    start, n = 0, 0
    for i, size in enumerate(sizes):
        if n and n + size > most:
            runs.append(range(start, i))
            start, n = i, 0
        n += size
    runs.append(range(start, len(sizes)))
    return runs


def in_halves(items: Sequence[_T], insert: Callable[[Sequence[_T]], int]) -> int:
    """``insert(items)`` (one committed statement; returns what it stored); when DuckDB runs
    out of its memory limit all the same (the weights that cut the runs understated what the
    items store), each half the same way, down to one item, which then raises. Any other
    error raises at once (a persistent failure is not tried once per item). Used by the
    local store's writes and the study store's merges."""
    import duckdb

    try:
        return insert(items)
    except (duckdb.OutOfMemoryException, duckdb.TransactionException) as e:
        # in the statement, or at its commit ("Failed to commit: failed to pin block ...")
        text = str(e).lower()
        if len(items) == 1 or not any(w in text for w in ("memory", "pin block", "allocate")):
            raise
        _log.info("a DuckDB statement of %d rows ran out of memory: written in halves", len(items))
        half = len(items) // 2
        return in_halves(items[:half], insert) + in_halves(items[half:], insert)


def sole_user(con: Any) -> bool:
    """Whether ``con`` (from :func:`open_store`) is the only connection to its file in this
    process: no other handed-out connection shares its database (settings of that database
    are then this connection's alone)."""
    with _ATTACHED_LOCK:
        key = _SHARED_BY.get(id(con))
        held = _ATTACHED.get(key) if key is not None else None
        return held is not None and held[1] == 1


def close_store(con: Any) -> None:
    """Close a connection from :func:`open_store`; the last one of a file detaches it (DuckDB
    checkpoints the file then). Closing twice does nothing more."""
    with _ATTACHED_LOCK:
        key = _SHARED_BY.pop(id(con), None)
        con.close()
        if key is None:
            return
        held = _ATTACHED[key]
        held[1] -= 1
        if held[1] == 0:
            for k in held[2]:
                _ATTACHED.pop(k, None)
            _release_engine(held[0])


# An in-memory DuckDB with nothing attached, kept after the last store of a file closed, for
# the next open_store of this process: (the process id it was made in, the connection). Making
# one (duckdb.connect()) costs 16-30 ms here and closing one 4-14 ms (its worker threads end,
# its buffer pool is freed), against ~1 ms to detach the file: a backtest's writer.stop() and
# each later open in the process (the run's report, optimisation trials, a notebook's next run)
# skip them (docs/benchmarks.md, thirty-seventh pass). At most one; under _ATTACHED_LOCK.
_IDLE: list[tuple[int, Any]] = []
# what open_store, the sinks and USE set on an engine (this module's code is the only user of
# its connections): put back before the engine is kept
_ENGINE_SETTINGS = (
    "temp_directory",
    "max_vacuum_tasks",
    "memory_limit",
    "threads",
    "wal_autocheckpoint",
    "search_path",
    "allocator_bulk_deallocation_flush_threshold",
)
_RESET_SQL = "; ".join(f"RESET {name}" for name in _ENGINE_SETTINGS)
# anything a user of the engine left in it: tables, views (a registered DataFrame is a view),
# sequences, types, schemas, and databases still attached (a research store's ``part``), none
# of them DuckDB's own; its macros are not looked for (listing them takes ~30 ms)
_LEFT_SQL = (
    "SELECT (SELECT count(*) FROM duckdb_tables() WHERE NOT internal) "
    "+ (SELECT count(*) FROM duckdb_views() WHERE NOT internal) "
    "+ (SELECT count(*) FROM duckdb_sequences()) "
    "+ (SELECT count(*) FROM duckdb_types() WHERE NOT internal) "
    "+ (SELECT count(*) FROM duckdb_schemas() WHERE NOT internal) "
    "+ (SELECT count(*) FROM duckdb_databases() WHERE NOT internal AND database_name <> 'memory')"
)
# every setting of the engine, compared with a fresh engine's (_PRISTINE, taken once a process
# from the first engine this module makes, before it sets anything): a setting someone else
# changed (a user writing through open_store) closes the engine instead of passing it on
_SETTINGS_SQL = "SELECT name, value FROM duckdb_settings() ORDER BY name"
_PRISTINE: list[list[tuple[str, str]]] = []
_FORKED: list[Any] = []  # engines inherited through fork: kept, never used or closed


def _idle_engine() -> Any:
    """The kept engine (:data:`_IDLE`), its settings put back (:data:`_ENGINE_SETTINGS`),
    when it was made in this process, nothing is left in it (:data:`_LEFT_SQL`) and every
    setting is a fresh engine's (:data:`_SETTINGS_SQL`); else None
    (an engine with something left is closed; one inherited through ``fork`` is never used:
    its worker threads are the parent's, and the parent closes it before forking,
    :func:`_before_fork`). _ATTACHED_LOCK held."""
    import duckdb

    while _IDLE:
        pid, con = _IDLE.pop()
        if pid != os.getpid():
            _FORKED.append(con)  # not closed either: closing would wait for threads not here
            continue
        try:
            con.execute(_RESET_SQL)
            if (
                con.execute(_LEFT_SQL).fetchone() == (0,)
                and _PRISTINE
                and con.execute(_SETTINGS_SQL).fetchall() == _PRISTINE[0]
            ):
                return con
        except duckdb.Error:
            _log.debug("a kept DuckDB engine could not be reused; closed", exc_info=True)
        with contextlib.suppress(duckdb.Error):
            con.close()
    return None


def _release_engine(con: Any) -> None:
    """The last store of the engine's file closed: detach the file (DuckDB checkpoints it and
    lets go of it: another process may open it once this returns) and keep the engine for
    the next :func:`open_store` (which puts its settings back: :func:`_idle_engine`) when none
    is kept yet and it never spilled to disk; else, or when the detach fails, close it (as
    before the engine was kept: the close detaches the file and removes the spill folder).
    Closing raises what DuckDB's ``close()`` raises. _ATTACHED_LOCK held."""
    import duckdb

    try:
        con.execute("USE memory")
        con.execute(f"DETACH {_CATALOG}")
    except duckdb.Error:
        con.close()
        return
    with contextlib.suppress(duckdb.Error):
        # the memory the file's buffers held given back to the system now, as a close gives
        # it (else DuckDB's allocator keeps it: ~65 MB after the read-heavy benchmark's run);
        # set after the detach: before it, every deallocation of the detach's checkpoint
        # flushed (that close took 30 ms against 15)
        con.execute("SET allocator_bulk_deallocation_flush_threshold = '1B'")
        con.execute("SELECT 1")
    try:
        # an engine that spilled to disk keeps its temporary folder (<file>.tmp) until it is
        # closed, and cannot be given another one: closed, which removes the folder
        (spill,) = con.execute("SELECT current_setting('temp_directory')").fetchone()
    except duckdb.Error:
        spill = None
    if _IDLE or _EXITING or spill is None or (spill and os.path.lexists(spill)):
        con.close()
    else:
        _IDLE.append((os.getpid(), con))


def _close_idle() -> None:
    """Close the kept engine (at exit)."""
    with _ATTACHED_LOCK:
        _close_idle_locked()


def _close_idle_locked() -> None:
    while _IDLE:
        pid, con = _IDLE.pop()
        if pid == os.getpid():
            con.close()
        else:
            _FORKED.append(con)


def _before_fork() -> None:
    """In the parent before a ``fork``: take this module's lock, held until the fork is done
    (:func:`_after_fork_in_parent`), so that no thread is inside :func:`open_store` or
    :func:`close_store` when the child is made, and close the kept engine (a child must not
    inherit an engine whose worker threads it does not have). helper-126: a child forked
    while another thread held the lock hung in its exit handler (:func:`_at_exit`)."""
    _ATTACHED_LOCK.acquire()
    try:
        _close_idle_locked()
    except BaseException:
        _ATTACHED_LOCK.release()
        raise


def _after_fork_in_parent() -> None:
    _ATTACHED_LOCK.release()


def _after_fork_in_child() -> None:
    """The child's locks are new ones: its copies are held (this module's, by the parent's
    thread that forked) or may be (``_SETUP_LOCK``, by a thread that is not in the child)."""
    global _ATTACHED_LOCK, _SETUP_LOCK
    _ATTACHED_LOCK = threading.Lock()
    _SETUP_LOCK = threading.Lock()


def _at_exit() -> None:
    """From here on no engine is kept (a writer thread that outlived its stop closes its store
    when it ends, maybe after this: that engine is closed, not left to the interpreter's
    teardown), and the kept one is closed."""
    _EXITING.append(True)
    _close_idle()


_EXITING: list[bool] = []  # the interpreter is exiting (_at_exit ran)
atexit.register(_at_exit)
os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)


class LocalDuckDBSink:
    """Decision rows in an embedded DuckDB database file, same nested schema as BigQuery.

    Fresh records from the analyzer arrive as one Arrow table per batch (:meth:`write_records`,
    scanned by DuckDB without Python per row); rows of a replay (spill files, journals) as JSON
    text cast to the table's STRUCT type inside DuckDB in one statement per batch (much faster
    than binding Python objects). ``decision_id`` is the key of replays: a replayed row that is
    already stored is skipped.

    Thread context: :meth:`open` runs on the thread that starts the writer, every other method
    on the writer thread.

    Args:
        path: database file (created with its folder when missing).
        table: table name (the ``decision_reads`` view is created for ``decisions`` only).
        threads: DuckDB worker threads (1: the other core belongs to the bar loop).
        wal_checkpoint_bytes: DuckDB's ``wal_autocheckpoint``, bytes (see
            the note above the class); ``None`` (default) keeps DuckDB's own (16 MiB).
        row_group_size: decisions per row group of what this sink writes (DuckDB's
            ``ROW_GROUP_SIZE`` of the attached file; see :data:`ROW_GROUP_SIZE` for why it is
            small). Rows already in the file keep their groups; other connections opening the
            file read it as usual.
        memory_limit_mb: DuckDB's buffer pool for the file, MiB (see :data:`MEMORY_LIMIT_MB`;
            ``FMEL_LOCAL_MEMORY_LIMIT_MB``).

    Raises:
        ConfigError: ``threads``, ``wal_checkpoint_bytes``, ``row_group_size`` or
            ``memory_limit_mb`` is not an int within its bounds (:data:`MAX_THREADS`,
            :data:`MAX_WAL_CHECKPOINT_BYTES`, a multiple of 2,048 up to
            :data:`MAX_ROW_GROUP_SIZE`, at least :data:`MIN_MEMORY_LIMIT_MB`).
    """

    name = "local"

    def __init__(
        self,
        path: Path,
        table: str = "decisions",
        threads: int = 1,
        wal_checkpoint_bytes: int | None = None,
        row_group_size: int = ROW_GROUP_SIZE,
        memory_limit_mb: int = MEMORY_LIMIT_MB,
    ) -> None:
        for name, value, most in (
            ("threads", threads, MAX_THREADS),
            ("wal_checkpoint_bytes", wal_checkpoint_bytes, MAX_WAL_CHECKPOINT_BYTES),
        ):
            if value is None and name == "wal_checkpoint_bytes":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise ConfigError(
                    f"LocalDuckDBSink {name}: expected an int from 1 to {most}, got {value!r}"
                )
        if (
            isinstance(row_group_size, bool)
            or not isinstance(row_group_size, int)
            or not DUCKDB_VECTOR_SIZE <= row_group_size <= MAX_ROW_GROUP_SIZE
            or row_group_size % DUCKDB_VECTOR_SIZE
        ):
            raise ConfigError(
                f"LocalDuckDBSink row_group_size: expected a multiple of {DUCKDB_VECTOR_SIZE} "
                f"(DuckDB's vector size) up to {MAX_ROW_GROUP_SIZE}, got {row_group_size!r}"
            )
        self.row_group_size = row_group_size
        if (
            isinstance(memory_limit_mb, bool)
            or not isinstance(memory_limit_mb, int)
            or not MIN_MEMORY_LIMIT_MB <= memory_limit_mb <= MAX_MEMORY_LIMIT_MB
        ):
            raise ConfigError(
                f"LocalDuckDBSink memory_limit_mb: expected an int from {MIN_MEMORY_LIMIT_MB} "
                f"to {MAX_MEMORY_LIMIT_MB} (MiB), got {memory_limit_mb!r}"
            )
        self.memory_limit_mb = memory_limit_mb
        self._size_runs(memory_limit_mb)  # again at open(), from the database's own limit
        # decision ids stored by a write that failed part-way (is_stored; later calls of
        # write_records skip them)
        self._stored_part: dict[str, None] = {}
        if _URL.match(str(path)):
            raise ConfigError(
                f"LocalDuckDBSink path: expected a local file path, got {str(path)!r} (DuckDB "
                "URLs such as md: or s3:// are not a local store)"
            )
        self.path = Path(path).expanduser()
        if not isinstance(table, str) or not table or '"' in table or not table.isprintable():
            # the statements quote the name as one identifier: a quote in it would name another
            raise ConfigError(f"table must be a printable name without '\"', got {table!r}")
        self.table = table
        self.threads = threads
        self._finishing = False  # finishing() was called: the last writes commit into the file
        # interrupt() was called: no statement starts until the next open()
        self._interrupted = threading.Event()
        # the store's own log threshold, set back after each of those commits
        self._wal_setting_sql = (
            "RESET wal_autocheckpoint"
            if wal_checkpoint_bytes is None
            else f"SET wal_autocheckpoint = '{wal_checkpoint_bytes}B'"
        )
        self.wal_checkpoint_bytes = wal_checkpoint_bytes
        self._con: Any = None
        # Replays (spill files) may resend rows already stored: skip those ids. Fresh records
        # take the plain append of an Arrow table (no primary key: its index would double the
        # insert cost).
        cast = f"unnest(CAST(j::JSON AS {duckdb_struct_type()}))"
        self._arrow_sql = f'INSERT INTO "{table}" SELECT * FROM {_BATCH_VIEW}'
        self._insert_sql = (
            f'INSERT INTO "{table}" SELECT r.* FROM (SELECT {cast} FROM '
            f"(SELECT unnest($1::VARCHAR[]) AS j)) AS r WHERE r.decision_id NOT IN "
            f'(SELECT decision_id FROM "{table}")'
        )

    def open(self) -> None:
        """Open (or create) the file and the table, and check a table that was there.

        Raises:
            SinkError: the file cannot be opened (:func:`open_store`); the table's columns are
                not the schema's names in its order, or have other types (as DuckDB spells
                them: ``pragma_table_info`` against ``typeof`` of the schema's types); a view
                or another object holds the name; a constraint a valid record can break (a CHECK,
                NOT NULL on a nullable column, a key on other columns than ``decision_id``).
                The file is left as it was.
        """
        import duckdb

        self._con = open_store(self.path, self.row_group_size, self.memory_limit_mb)
        self._finishing = False
        self._interrupted.clear()
        try:
            # one setup at a time: sinks opening the same (shared) file from several threads
            # would otherwise conflict on replacing the view
            with _SETUP_LOCK:
                # One DuckDB thread: the other core belongs to the bar loop.
                self._con.execute(f"SET threads = {self.threads}")
                if self.wal_checkpoint_bytes is not None:
                    self._con.execute(f"SET wal_autocheckpoint = '{self.wal_checkpoint_bytes}B'")
                self._con.execute(duckdb_ddl(self.table))
                self._check_columns()
                # runs sized for the limit the (maybe shared) database has
                self._size_runs(memory_limit_of(self._con, self.memory_limit_mb))
                if self.table == "decisions":
                    self._con.execute(duckdb_view_sql())
        except BaseException as e:
            close_store(self._con)  # or the file stays locked by this process
            self._con = None
            if isinstance(e, duckdb.Error):
                raise SinkError(f"cannot set up the local decision store {self.path}: {e}") from e
            raise

    def _size_runs(self, limit_mb: float) -> None:
        """The weight of one statement of a write for a memory limit of ``limit_mb`` MiB: in
        reads (:data:`READS_PER_MB`), and in bytes of JSON for rows."""
        self.run_reads = max(1, int(READS_PER_MB * limit_mb))
        self.json_run_bytes = max(1, int(JSON_READS_PER_MB * JSON_BYTES_PER_READ * limit_mb))

    def _check_columns(self) -> None:
        # pragma_table_info resolves the name as the statements do (the current catalog and
        # schema); information_schema.columns lists every column of every catalog first: 13 ms
        # of each open against 0.7 ms (docs/benchmarks.md, twelfth pass)
        # system.main.*: the file's own macros cannot stand in for DuckDB's functions here
        (tables,) = self._con.execute(
            f"SELECT count(*) FROM system.main.duckdb_tables() WHERE {_THIS_TABLE}",
            [self.table],
        ).fetchone() or (0,)
        if not tables:  # CREATE TABLE IF NOT EXISTS found the name taken (a view)
            raise SinkError(
                f"{self.path}: {self.table} is not a table (a view of that name?); move the "
                "old file away or set FMEL_LOCAL_PATH"
            )
        rows = self._con.execute(  # the constructor refused names with a double quote
            "SELECT name, type FROM system.main.pragma_table_info(?) ORDER BY cid",
            [f'"{self.table}"'],
        ).fetchall()
        have = [r[0] for r in rows]
        want = [f.name for f in DECISION_SCHEMA]
        if have != want:
            missing = [n for n in want if n not in have]
            extra = [n for n in have if n not in want]
            if missing or extra:
                what = f"missing {missing}, not in the schema {extra}"
            else:
                at = next(i for i, (h, w) in enumerate(zip(have, want, strict=True)) if h != w)
                what = (
                    f"the schema's columns in another order ({have[at]} where {want[at]} belongs)"
                )
            raise SinkError(
                f"{self.path}: table {self.table} does not have the decision schema's columns: "
                f"{what}; move the old file away or set FMEL_LOCAL_PATH"
            )
        if not _EXPECTED_TYPES:
            # DuckDB's own spelling of each type (typeof() and pragma_table_info both print
            # the LogicalType), so the comparison does not depend on how the DDL is written
            cast = ", ".join(f"system.main.typeof(NULL::{typ})" for _, typ in duckdb_columns())
            _EXPECTED_TYPES[:] = self._con.execute(f"SELECT {cast}").fetchone() or ()
        wrong = [
            f"{name} is {typ}, expected {exp}"
            for (name, typ), exp in zip(rows, _EXPECTED_TYPES, strict=True)
            if typ != exp
        ]
        if wrong:
            raise SinkError(
                f"{self.path}: table {self.table} has other column types: "
                + "; ".join(wrong)[:2000]
                + "; move the old file away or set FMEL_LOCAL_PATH"
            )
        self._check_constraints()

    def _check_constraints(self) -> None:
        # a constraint a valid record can break would reject rows at every write (the run
        # going on with its records spilled and rejected): refused here instead. Allowed: NOT
        # NULL where the schema is REQUIRED, a key on decision_id alone (unique anyway).
        required = {f.name for f in DECISION_SCHEMA if f.mode == "REQUIRED"}
        found = self._con.execute(
            "SELECT constraint_type, constraint_column_names, constraint_text "
            "FROM system.main.duckdb_constraints() "
            f"WHERE {_THIS_TABLE}",
            [self.table],
        ).fetchall()
        bad = [
            f"{kind} on {', '.join(cols)}" + (f" ({text})" if kind == "CHECK" else "")
            for kind, cols, text in found
            if not (
                (kind == "NOT NULL" and set(cols) <= required)
                or (kind in ("PRIMARY KEY", "UNIQUE") and list(cols) == ["decision_id"])
            )
        ]
        indexes = self._con.execute(
            "SELECT index_name, expressions FROM system.main.duckdb_indexes() "
            "WHERE is_unique AND NOT is_primary "
            f"AND {_THIS_TABLE}",
            [self.table],
        ).fetchall()
        bad += [
            f"UNIQUE INDEX {name} on {exprs}"
            for name, exprs in indexes
            if str(exprs).strip("[]") != "decision_id"
        ]
        (generated,) = self._con.execute(
            "SELECT count(*) FROM system.main.duckdb_columns() WHERE is_generated "
            f"AND {_THIS_TABLE}",
            [self.table],
        ).fetchone() or (0,)
        if generated:
            bad.append(f"{generated} generated column(s) (an insert cannot set them)")
        if bad:
            raise SinkError(
                f"{self.path}: table {self.table} has constraints valid records can break: "
                + "; ".join(bad)[:2000]
                + "; move the old file away or set FMEL_LOCAL_PATH"
            )

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        """Write JSON-shaped rows (spill replays, journaled runs); see :func:`to_row`.

        Rows whose ``decision_id`` is stored already are skipped. Inserted in runs of at most
        ``json_run_bytes`` of JSON (:data:`JSON_READS_PER_MB` reads of
        :data:`JSON_BYTES_PER_READ` per MiB of the database's memory limit), each committed
        (as :meth:`write_records`); a run that holds a bad value is written row by row and
        each bad row is returned as a :class:`RowError`.

        Raises:
            SinkError: before :meth:`open`.
            duckdb.Error: DuckDB failed otherwise (out of memory, I/O); the runs before it are
                stored (:meth:`is_stored`).
        """
        import duckdb

        if self._con is None:
            raise SinkError("LocalDuckDBSink.write() before open()")
        self._check_interrupted()
        # One statement checks the table, not its own rows: an id repeated in ``rows`` (a
        # journal and a spill holding the same decision after a crash) is written once; when
        # a copy is refused, the next copy of that id is tried. A row that is not an object,
        # has no text id or is not JSON (NaN) is refused here: the id check would drop it.
        copies: dict[str, list[tuple[int, str]]] = {}
        errors: list[RowError] = []
        for i, r in enumerate(rows):
            did = r.get("decision_id") if isinstance(r, dict) else None
            if not isinstance(r, dict):
                errors.append(RowError(i, f"not a JSON object: {type(r).__name__}"))
            elif not isinstance(did, str) or not did:
                errors.append(RowError(i, f"decision_id must be a non-empty string, got {did!r}"))
            else:
                try:
                    text = json.dumps(r, separators=(",", ":"), allow_nan=False)
                except (TypeError, ValueError) as e:
                    errors.append(RowError(i, f"not JSON: {e}"))
                    continue
                copies.setdefault(did, []).append((i, text))
        # In runs of at most ``json_run_bytes`` of JSON, each committed (what one statement
        # needs must fit in DuckDB's memory limit); a run with a bad value goes row by row.
        ids = list(copies.items())
        stored: list[str] = []
        try:
            for run in cut_runs([len(c[0][1]) for _, c in ids], self.json_run_bytes):
                part = [ids[k] for k in run]
                self._check_interrupted()
                try:
                    self._con.execute(self._insert_sql, [[c[0][1] for _, c in part]])
                    stored += [did for did, _ in part]
                    continue
                except (duckdb.ConversionException, duckdb.ConstraintException):
                    pass  # a bad value somewhere (a type, a NULL in a NOT NULL column)
                for did, copies_of_id in part:  # row by row
                    for i, text in copies_of_id:
                        try:
                            self._con.execute(self._insert_sql, [[text]])
                        except (
                            duckdb.OutOfMemoryException,
                            duckdb.IOException,
                            duckdb.TransactionException,  # a commit out of memory
                            duckdb.InterruptException,  # interrupt(): not the row's fault
                        ):
                            raise  # not the row's fault: the writer keeps the batch
                        except duckdb.Error as e:
                            errors.append(RowError(i, str(e).splitlines()[0]))
                            continue
                        stored.append(did)
                        break  # stored: the copies after it are repeats, written once
        except BaseException:
            self._remember(stored)
            raise
        return sorted(errors)

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        """Fast path for fresh records from the analyzer: Arrow tables
        (:func:`~analyzers.sinks.columnar.records_table`, which also resolves the deferred
        reads, vectorised), scanned by DuckDB without Python per row and without the GIL. No
        duplicate check: these ids were never written.

        A batch is inserted in runs of whole records weighing at most ``run_reads`` reads
        (:func:`_record_cost`; :data:`READS_PER_MB` per MiB of the database's memory limit),
        each committed, so one write needs little of DuckDB's memory whatever the batch. When
        a run fails after others were stored, the stored ids are kept: :meth:`is_stored` names
        them and a later call skips them (a retry of the batch stores each once).

        Raises:
            SinkError: before :meth:`open`.
            duckdb.Error: DuckDB refused an insert (the batch is the writer's to keep).
        """
        if self._con is None:
            raise SinkError("LocalDuckDBSink.write_records() before open()")
        if self._stored_part:
            records = [r for r in records if r.decision_id not in self._stored_part]
        stored: list[Sequence[DecisionRecord]] = []  # their ids are made only when one fails
        try:
            for run in record_runs(records, self.run_reads):
                part = records if len(run) == len(records) else [records[k] for k in run]
                # a run that does not fit after all (the text of reads not resolved yet, many
                # order events or fields are not weighed; helper-97) goes in halves
                in_halves(part, lambda rows: self._insert(rows, stored))
        except BaseException:
            self._remember([r.decision_id for part in stored for r in part])
            raise
        return []

    def _insert(
        self, part: Sequence[DecisionRecord], stored: list[Sequence[DecisionRecord]]
    ) -> int:
        """One committed insert of ``part``'s Arrow table, appended to ``stored`` once in;
        returns its length. After :meth:`finishing`, committed
        into the file when this is its only connection. That check and the log setting around
        the insert hold the lock other sinks' ``open()`` takes before setting up a connection
        (helper-97: a sink opening the file meanwhile had its setting switched), so a sink
        that opens the file during it sets its own value after it."""
        con = self._con
        table = records_table(part)
        self._check_interrupted()  # between runs: interrupt() may have come while tabling
        con.register(_BATCH_VIEW, table)
        try:
            if not self._finishing:
                con.execute(self._arrow_sql)
            else:
                with _SETUP_LOCK:
                    if not sole_user(con):
                        con.execute(self._arrow_sql)
                    else:
                        con.execute("SET wal_autocheckpoint = '1B'")
                        try:
                            con.execute(self._arrow_sql)
                        finally:
                            con.execute(self._wal_setting_sql)
        finally:
            con.unregister(_BATCH_VIEW)
        stored.append(part)
        return len(part)

    def interrupt(self) -> None:
        """Cut short the write another thread has in progress: DuckDB's statement in flight
        ends with ``duckdb.InterruptException`` (``DuckDBPyConnection.interrupt``) and no
        statement of a write starts after this one (:class:`~core.errors.SinkError`) until the
        next :meth:`open`. What a cut write committed before stays stored (:meth:`is_stored`).

        Called by :meth:`DecisionWriter.stop` on a writer thread that outlived the stop's
        budget, after the records it held were spilled: the thread then ends (and closes the
        file) before the interpreter exits. A thread still inside DuckDB at exit aborts the
        process ("FATAL: exception not rethrown", exit code 134: the interpreter ends daemon
        threads with a forced unwind that DuckDB's C++ does not let through). Any thread;
        never raises."""
        import duckdb

        self._interrupted.set()
        con = self._con
        if con is not None:
            try:
                con.interrupt()
            except duckdb.Error:  # closed meanwhile by the writer thread: nothing to cut
                _log.debug("interrupt of %s found no open connection", self.path)

    def _check_interrupted(self) -> None:
        """Raises SinkError once :meth:`interrupt` was called (until the next open())."""
        if self._interrupted.is_set():
            raise SinkError(
                f"the write to {self.path} was interrupted: the decision writer's stop ran out "
                "of time (its records are in the spill file)"
            )

    def finishing(self) -> None:
        """The writer is stopping: its writes from here on are the last before :meth:`close`.

        From now on each run of :meth:`write_records` is committed with DuckDB checkpointing
        at that commit (``wal_autocheckpoint`` of one byte, set back after it), when this is
        the file's only connection in the process (:func:`sole_user`). A commit that does not
        fill whole row groups (the run's last, partial batch) is otherwise logged to the
        write-ahead log first and written into the file again by the close's checkpoint; one
        whose log would pass DuckDB's ``auto_checkpoint_skip_wal_threshold`` (100 kB) is now
        written into the file without the log (DuckDB's documented meaning of that setting).
        The last 935 decisions of the read-heavy benchmark: insert and close 130 ms -> 75-96 ms
        (docs/benchmarks.md, twenty-seventh pass). Replays of JSON rows (:meth:`write`), which
        may commit row by row, keep the log. Writer thread."""
        self._finishing = True

    def _remember(self, stored: list[str]) -> None:
        """Keep the ids a failed write stored (the newest :data:`STORED_PART_KEPT`)."""
        for did in stored:
            self._stored_part[did] = None
        while len(self._stored_part) > STORED_PART_KEPT:
            del self._stored_part[next(iter(self._stored_part))]

    def is_stored(self, decision_id: object) -> bool:
        """Whether a write that then failed stored ``decision_id`` (the newest
        :data:`STORED_PART_KEPT` such ids are kept). Writer thread."""
        return isinstance(decision_id, str) and decision_id in self._stored_part

    def close(self) -> None:
        if self._con is not None:
            close_store(self._con)
            self._con = None

    @property
    def destination(self) -> str:
        """Where rows go (the file), for a spill file to remember (DecisionWriter)."""
        return f"duckdb:{self.path.resolve()}"

    def describe(self) -> str:
        return self.destination

    def example_query(self) -> str:
        return (
            f'python -m analyzers.query --db {self.path} "SELECT decision_point, bar_time, '
            "action, reasoning, reads, portfolio_value FROM decisions WHERE action <> 'HOLD' "
            'ORDER BY bar_time LIMIT 20"'
        )
