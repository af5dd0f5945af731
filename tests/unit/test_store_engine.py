"""The local store's DuckDB engine kept between opens (``analyzers.sinks.duckdb._IDLE``): the
file is let go when its last store closes (another process can open it, read-write), the next
open in the process gets the same engine with nothing of the last one's (settings, tables,
attached files), an engine that spilled to disk or was inherited through ``fork`` is never
used again, and a process that kept one exits cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

import analyzers.sinks.duckdb as store
from analyzers.sinks.duckdb import LocalDuckDBSink, close_store, open_store
from tests.unit.test_writer import record

REPO = Path(__file__).resolve().parents[2]
_SETTINGS = (
    "SELECT name, value FROM duckdb_settings() WHERE name IN ('threads', 'wal_autocheckpoint', "
    "'memory_limit', 'temp_directory', 'allocator_bulk_deallocation_flush_threshold')"
)


@pytest.fixture(autouse=True)
def _no_kept_engine() -> object:
    """Each test starts and ends without a kept engine (another test's must not be reused)."""
    store._close_idle()
    yield
    store._close_idle()


def _engine(con: object) -> object:
    """The engine (root connection) behind a connection from ``open_store``."""
    return store._ATTACHED[store._SHARED_BY[id(con)]][0]


def _write(path: Path, n: int, **kw: object) -> None:
    sink = LocalDuckDBSink(path, **kw)  # type: ignore[arg-type]
    sink.open()
    try:
        assert sink.write_records([record(i) for i in range(n)]) == []
    finally:
        sink.close()


def test_the_next_open_gets_the_engine_the_last_close_kept(tmp_path: Path) -> None:
    a = open_store(tmp_path / "a.duckdb")
    first = _engine(a)
    close_store(a)
    assert [con for _, con in store._IDLE] == [first]
    b = open_store(tmp_path / "b.duckdb")
    try:
        assert _engine(b) is first
        assert store._IDLE == []
        # the cursor is on b's file, and a's is no longer attached to the engine
        assert b.execute("SELECT current_database()").fetchone() == (store._CATALOG,)
        names = {r[0] for r in b.execute("SELECT database_name FROM duckdb_databases()").fetchall()}
        assert names == {store._CATALOG, "memory", "system", "temp"}
        b.execute("CREATE TABLE t (i INTEGER)")
    finally:
        close_store(b)
    assert duckdb.connect(str(tmp_path / "a.duckdb")).execute("SHOW TABLES").fetchall() == []


def test_the_file_is_let_go_when_its_last_store_closes(tmp_path: Path) -> None:
    path = tmp_path / "f.duckdb"
    _write(path, 5)
    assert len(store._IDLE) == 1  # the engine is kept...
    # ...and another process writes the file (DuckDB lets one process hold it read-write)
    code = (
        "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
        "c.execute('CREATE TABLE other (i INTEGER)'); "
        "print(c.execute('SELECT count(*) FROM decisions').fetchone()[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"


def test_a_reused_engine_has_the_settings_of_its_new_opener(tmp_path: Path) -> None:
    fresh = duckdb.connect()
    defaults = dict(fresh.execute(_SETTINGS).fetchall())
    fresh.close()
    sink = LocalDuckDBSink(tmp_path / "a.duckdb", memory_limit_mb=64, wal_checkpoint_bytes=4096)
    sink.open()
    assert dict(sink._con.execute(_SETTINGS).fetchall())["threads"] == "1"
    sink.close()
    assert len(store._IDLE) == 1
    # a research store's open sets no threads or log size: DuckDB's defaults, not the sink's
    con = open_store(tmp_path / "b.duckdb", memory_limit_mb=100)
    try:
        got = dict(con.execute(_SETTINGS).fetchall())
    finally:
        close_store(con)
    assert got["threads"] == defaults["threads"]
    assert got["wal_autocheckpoint"] == defaults["wal_autocheckpoint"]
    assert got["memory_limit"] == "100.0 MiB"
    assert got["temp_directory"] == f"{tmp_path / 'b.duckdb'}.tmp"
    assert (
        got["allocator_bulk_deallocation_flush_threshold"]
        == (defaults["allocator_bulk_deallocation_flush_threshold"])
    )


@pytest.mark.parametrize(
    "left",
    [
        "CREATE TABLE memory.main.left_behind (i INTEGER)",
        "CREATE VIEW memory.main.left_behind AS SELECT 1 AS i",
        "CREATE SEQUENCE memory.main.left_behind",
        "CREATE TYPE memory.main.left_behind AS INTEGER",
        "CREATE SCHEMA memory.left_behind",
        "SET preserve_insertion_order = false",  # a user writing through open_store
        "SET GLOBAL default_order = 'DESC'",
    ],
)
def test_an_engine_with_something_left_in_it_is_not_reused(tmp_path: Path, left: str) -> None:
    a = open_store(tmp_path / "a.duckdb")
    first = _engine(a)
    a.execute(left)
    close_store(a)
    assert len(store._IDLE) == 1
    b = open_store(tmp_path / "b.duckdb")
    try:
        assert _engine(b) is not first
        assert b.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'left_behind'"
        ).fetchone() == (0,)
        assert b.execute("SELECT current_setting('preserve_insertion_order')").fetchone() == (True,)
    finally:
        close_store(b)


def test_an_engine_that_spilled_to_disk_is_closed_and_its_folder_removed(tmp_path: Path) -> None:
    path = tmp_path / "f.duckdb"
    con = open_store(path, memory_limit_mb=64)
    try:
        # a sort larger than the store's memory: DuckDB spills to <file>.tmp
        con.execute(
            "CREATE TEMP TABLE z AS SELECT range::VARCHAR || repeat('x', 50) AS s "
            "FROM range(3000000)"
        )
        con.execute("SELECT s FROM z ORDER BY s DESC LIMIT 1").fetchall()
        con.execute("DROP TABLE z")
        assert Path(f"{path}.tmp").is_dir()
    finally:
        close_store(con)
    assert store._IDLE == []  # DuckDB cannot give it another spill folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.duckdb"]


def test_a_forked_child_opens_with_its_own_engine(tmp_path: Path) -> None:
    _write(tmp_path / "a.duckdb", 3)
    assert len(store._IDLE) == 1
    pid = os.fork()
    if pid == 0:  # the child: no engine of the parent's (its worker threads are not here)
        code = 1
        try:
            if store._IDLE == []:
                _write(tmp_path / "child.duckdb", 4)
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._IDLE == []  # closed before the fork
    con = duckdb.connect(str(tmp_path / "child.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM decisions").fetchone() == (4,)
    con.close()


def _in_python(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter, ``s`` the store module, ``path`` a store file."""
    prelude = (
        "import sys; sys.path.insert(0, sys.argv[2]); from pathlib import Path; "
        "import analyzers.sinks.duckdb as s; path = Path(sys.argv[1]); "
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + code, str(tmp_path / "f.duckdb"), str(REPO)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_process_that_kept_an_engine_exits_cleanly(tmp_path: Path) -> None:
    out = _in_python(
        tmp_path,
        "sink = s.LocalDuckDBSink(path); sink.open(); sink.close(); "
        "assert len(s._IDLE) == 1; print('kept')",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "kept"
    assert out.stderr == ""


def test_a_store_closed_after_the_exit_handlers_closes_its_engine(tmp_path: Path) -> None:
    """A writer thread that outlived its stop closes its store when it ends, maybe after the
    interpreter's exit handlers ran: that engine is closed, not kept for the teardown."""
    # the module's exit handler run by hand, then the store closed (as such a thread would)
    out = _in_python(
        tmp_path, "con = s.open_store(path); s._at_exit(); s.close_store(con); print(len(s._IDLE))"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_children_forked_while_another_thread_opens_and_closes_stores_exit(
    tmp_path: Path,
) -> None:
    """helper-126: a child forked while another thread held the module's lock (inside
    open_store or close_store) hung in its exit handler, which takes that lock; before the
    engine was kept, such a child's own open_store hung instead. Now the fork waits for the
    lock and the child gets new ones: each child takes the lock (exit code 3 if it cannot
    within 5 s) and leaves through ``sys.exit`` (its exit handlers run). (A child that makes a
    DuckDB engine of its own may still hang inside DuckDB, whose worker threads are not in the
    child: fork with DuckDB running is DuckDB's hazard; the optimiser's workers are spawned.)"""
    code = """
import threading, time
stop = False
def churn():
    i = 0
    while not stop:
        c = s.open_store(path.with_name(f"t{i % 3}.duckdb")); s.close_store(c); i += 1
t = threading.Thread(target=churn, daemon=True); t.start()
codes = []
for k in range(40):
    pid = os.fork()
    if pid == 0:
        if not s._ATTACHED_LOCK.acquire(timeout=5):
            os._exit(3)
        s._ATTACHED_LOCK.release()
        sys.exit(0)
    for _ in range(400):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            codes.append(os.waitstatus_to_exitcode(status))
            break
        time.sleep(0.025)
    else:
        os.kill(pid, 9); os.waitpid(pid, 0); codes.append("hung")
    time.sleep(0.005)
stop = True; t.join()
print(sorted(set(map(str, codes))))
"""
    out = _in_python(tmp_path, "import os\n" + code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "['0']"
