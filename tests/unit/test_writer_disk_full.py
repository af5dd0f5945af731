"""The decision writer when its local disk fails (FMEL_SPILL_DIR full).

Real ``ENOSPC`` without root: Linux's ``/dev/full`` answers every write with "No space left on
device" (full(4)); the journal or spill file is made a symlink to it after the writer started
(so the start's reads of those files see no file). Stores are real DuckDB files.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import pytest

from analyzers.schema import to_row
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.spill import SpillFile
from analyzers.sinks.writer import ABANDONED_JOIN_S, DecisionWriter
from core.errors import SinkError
from tests.unit.test_writer import FAST, WAIT_S, FakeClock, Flaky, record, stored, writer

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full")


class Failures:
    """The writer's failure listener: remembers the reasons, lets a test await the first."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.told = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.told.set()


def _full(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink("/dev/full", path)


def test_a_full_journal_stops_the_run_and_the_store_still_gets_every_record(
    tmp_path: Path,
) -> None:
    sink = LocalDuckDBSink(tmp_path / "fmel.duckdb")
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", batch_size=2, retry=FAST, journal=True)
    durable: list[int] = []
    w.add_durable_listener(lambda recs: durable.append(len(recs)))
    failures = Failures()
    w.add_failure_listener(failures)
    w.start()
    _full(tmp_path / "spill" / f"journal-{sink.name}.jsonl")
    for i in range(5):
        w.submit(record(i))
    assert failures.told.wait(WAIT_S)
    assert not w.wait_durable(WAIT_S)  # returns at once: nothing is durable any more
    for i in range(5, 8):
        w.submit(record(i))
    stats = w.stop(timeout_s=WAIT_S)  # never raises
    assert durable == []  # no bar may be acknowledged on a record that is not on disk
    assert isinstance(w.disk_error, OSError) and w.disk_error.errno == errno.ENOSPC
    assert failures.reasons == [w.failure]
    assert "journal-" in failures.reasons[0] and "Errno 28" in failures.reasons[0]
    assert (stats.written, stats.spilled, stats.rejected, stats.lost) == (8, 0, 0, 0)
    assert stored(tmp_path / "fmel.duckdb") == list(range(8))
    assert not w.healthy


def test_a_full_spill_while_the_store_is_down_counts_what_is_lost_and_stop_does_not_raise(
    tmp_path: Path,
) -> None:
    sink = Flaky(tmp_path / "f.duckdb")  # real clock: the stop's budget must run out
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", batch_size=2, retry=FAST)
    failures = Failures()
    w.add_failure_listener(failures)
    w.start()
    w.submit(record(0))
    assert w.flush(WAIT_S) and sink.calls == [1]  # the thread is past its start-up replay
    sink.down.set()
    _full(w.spill_path)
    for i in range(1, 7):
        w.submit(record(i))
    assert failures.told.wait(WAIT_S)
    stats = w.stop(timeout_s=1.0)
    assert (stats.written, stats.spilled, stats.rejected, stats.lost) == (1, 0, 0, 6)
    assert "spill-" in stats.lost_reason and "Errno 28" in stats.lost_reason
    assert stats.written + stats.spilled + stats.rejected + stats.lost == stats.submitted
    assert w.snapshot()[1] == 0  # nothing counted as still waiting


def test_records_held_in_memory_reach_the_store_when_it_answers_again(tmp_path: Path) -> None:
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path / "spill", clock, batch_size=2, probe_interval_s=5.0)
    failures = Failures()
    w.add_failure_listener(failures)
    w.start()
    w.submit(record(0))
    assert w.flush(WAIT_S)  # the thread is past its start-up replay
    sink.down.set()
    _full(w.spill_path)
    for i in range(1, 4):
        w.submit(record(i))
    assert failures.told.wait(WAIT_S)
    sink.down.clear()
    for i in range(4, 6):
        w.submit(record(i))
    stats = w.stop(timeout_s=WAIT_S)
    assert (stats.written, stats.spilled, stats.lost) == (6, 0, 0)
    assert stored(tmp_path / "f.duckdb") == list(range(6))


def test_a_spill_folder_that_is_a_file_is_an_error_with_its_path(tmp_path: Path) -> None:
    """ENOTDIR: FMEL_SPILL_DIR names a file; the store is down, so the rows cannot go anywhere."""
    (tmp_path / "afile").write_text("x")
    sink = Flaky(tmp_path / "f.duckdb")  # real clock: the stop's budget must run out
    w = DecisionWriter(sink, spill_dir=tmp_path / "afile" / "spill", batch_size=1, retry=FAST)
    failures = Failures()
    w.add_failure_listener(failures)
    w.start()
    sink.down.set()
    w.submit(record(0))
    assert failures.told.wait(WAIT_S)
    stats = w.stop(timeout_s=1.0)
    assert stats.lost == 1
    assert str(tmp_path / "afile") in stats.lost_reason and "ENOTDIR" in stats.lost_reason
    with duckdb.connect(str(tmp_path / "f.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchone() == (0,)


def test_a_record_submitted_after_stop_with_a_full_spill_is_counted_lost(tmp_path: Path) -> None:
    """Found by the attack on this change: the late record was handed to the closed sink on
    the caller's thread (blocking it, or raising the sink's error). It is counted lost."""
    sink = Flaky(tmp_path / "f.duckdb")
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", retry=FAST)
    w.start()
    w.submit(record(0))
    stats = w.stop(WAIT_S)
    calls = list(sink.calls)
    _full(w.spill_path)
    sink.gate.clear()  # a write now would block the caller until WAIT_S
    w.submit(record(1))  # the sink is closed and the spill cannot be written
    w.submit(record(2))
    assert (stats.submitted, stats.written, stats.spilled, stats.lost) == (3, 1, 0, 2)
    assert "No space left" in str(stats.lost_reason)
    assert sink.calls == calls and stored(tmp_path / "f.duckdb") == [0]


def test_a_writer_thread_that_outlives_stop_closes_its_store_when_it_ends(tmp_path: Path) -> None:
    """Found by a flaky run of the test above: a writer thread still in the store when stop()'s
    budget ran out never closed it, so the DuckDB file stayed attached in the process and the
    next open of it (a second run in a notebook) failed with a file handle conflict."""
    sink = Flaky(tmp_path / "f.duckdb")
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", batch_size=1, retry=FAST)
    w.start()
    w.submit(record(0))
    sink.wait_calls(1)
    deadline = time.monotonic() + WAIT_S
    while w.stats.written < 1 and time.monotonic() < deadline:  # out of DuckDB again
        time.sleep(0.01)
    sink.gate.clear()  # the next write blocks, in Python: the thread outlives stop()
    w.submit(record(1))
    w.stop(timeout_s=0.3)  # interrupts the sink: nothing to cut in a Python wait
    assert sink._con is not None  # the thread is still in it
    sink.gate.set()
    assert w._thread is not None
    w._thread.join(WAIT_S)
    assert not w._thread.is_alive() and sink._con is None
    again = LocalDuckDBSink(tmp_path / "f.duckdb")  # the same file, in the same process
    again.open()
    again.close()
    assert stored(tmp_path / "f.duckdb")[:1] == [0]


class InDuckDB(LocalDuckDBSink):
    """The local sink, each write (records, or JSON rows: the spill's replay at start)
    spending (up to) 100 s inside one DuckDB statement first: a thread in C++ with the GIL
    released, as a large insert or the close's checkpoint is."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.entered = threading.Event()

    def _hold(self) -> None:
        self._check_interrupted()
        self.entered.set()
        assert self._con is not None
        self._con.execute("SELECT count(*) FROM range(100_000_000_000)")

    def write_records(self, records: Any) -> Any:
        self._hold()
        return super().write_records(records)

    def write(self, rows: Any) -> Any:
        self._hold()
        return super().write(rows)


def test_a_writer_thread_inside_duckdb_at_the_stop_is_interrupted_and_ended(
    tmp_path: Path,
) -> None:
    """Found measuring the stop of a read-heavy run (5,031 records queued, ``stop(0.2)``): the
    writer thread was still inside DuckDB when the stop returned, and the process aborted at
    exit ("FATAL: exception not rethrown", exit code 134). The stop now interrupts the sink's
    statement after spilling, and waits for the thread to end."""
    sink = InDuckDB(tmp_path / "f.duckdb")
    w = DecisionWriter(sink, batch_size=4, max_batch=4, spill_dir=tmp_path / "spill", retry=FAST)
    w.start()
    for i in range(10):
        w.submit(record(i))
    assert sink.entered.wait(WAIT_S)
    t0 = time.monotonic()
    stats = w.stop(timeout_s=0.3)
    took = time.monotonic() - t0
    assert w._thread is not None and not w._thread.is_alive()  # not left inside DuckDB
    assert took < 0.3 + ABANDONED_JOIN_S  # the statement was cut, not waited out
    assert (stats.written, stats.spilled, stats.rejected, stats.lost) == (0, 10, 0, 0)
    assert sink._con is None  # the ended thread closed the file
    again = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "spill")
    again.start()
    assert again.stop(WAIT_S).replayed == 10
    assert stored(tmp_path / "f.duckdb") == list(range(10))  # each once


def test_an_interrupted_local_store_refuses_writes_until_it_is_opened_again(
    tmp_path: Path,
) -> None:
    """interrupt() lands between two statements as well (DuckDB's own flag is cleared when
    the next statement starts): no write starts after it, JSON rows or records, and no row is
    called bad for it."""
    sink = LocalDuckDBSink(tmp_path / "f.duckdb")
    sink.open()
    sink.interrupt()
    with pytest.raises(SinkError, match="interrupted: the decision writer's stop ran out"):
        sink.write([to_row(record(0))])
    with pytest.raises(SinkError, match="interrupted"):
        sink.write_records([record(1)])
    sink.close()
    sink.interrupt()  # closed: nothing to cut, no error
    sink.open()
    assert sink.write([to_row(record(2))]) == [] and sink.write_records([record(3)]) == []
    sink.close()
    assert stored(tmp_path / "f.duckdb") == [2, 3]


def test_a_stop_that_outlives_its_budget_exits_the_process_cleanly(tmp_path: Path) -> None:
    """The measured case end to end, in a process of its own: read-heavy records queued, a
    stop with a budget far too short, then the interpreter exits. Before the fix it aborted
    (exit code 134) in most runs: the writer thread, waiting for the stop to finish spilling,
    went on into DuckDB's close as the process exited."""
    script = tmp_path / "run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(REPO)!r})
            from pathlib import Path
            from analyzers.sinks.duckdb import LocalDuckDBSink
            from analyzers.sinks.writer import DecisionWriter
            from tests.unit.test_writer import record_with_reads
            tmp = Path({str(tmp_path)!r})
            w = DecisionWriter(LocalDuckDBSink(tmp / "f.duckdb"), batch_size=4000,
                               max_batch=4000, flush_interval_s=3600, spill_dir=tmp / "spill")
            w.start()
            for i in range(3000):
                w.submit(record_with_reads(i, 60))
            st = w.stop(timeout_s=0.05)
            print(st.submitted, st.written + st.spilled + st.rejected + st.lost)
            """
        )
    )
    for _ in range(3):
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.split() == ["3000", "3000"]
        for f in tmp_path.glob("f.duckdb*"):
            f.unlink()
        shutil.rmtree(tmp_path / "spill", ignore_errors=True)


class Refusing(LocalDuckDBSink):
    def write_records(self, records: Any) -> Any:
        raise duckdb.IOException("disk gone")

    def write(self, rows: Any) -> Any:
        raise duckdb.IOException("disk gone")


def test_a_replay_cut_by_the_stop_is_no_failure_and_stays_in_the_spill_once(
    tmp_path: Path,
) -> None:
    """helper-98: a stop that ran out of time during the start's replay of a spill interrupted
    it, and the thread's end was reported as the writer failing (the runner's "DECISIONS
    FAILED"); and the replay's rows, in the spill already, were spilled again (20 lines for 10
    records, in_spill 20)."""
    first = DecisionWriter(Refusing(tmp_path / "f.duckdb"), spill_dir=tmp_path / "spill")
    first.start()
    for i in range(10):
        first.submit(record(i))
    assert first.stop(WAIT_S).spilled == 10
    sink = InDuckDB(tmp_path / "f.duckdb")
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", retry=FAST)
    told: list[str] = []
    w.add_failure_listener(told.append)
    w.start()
    assert sink.entered.wait(WAIT_S)
    stats = w.stop(timeout_s=0.3)
    assert w._thread is not None and not w._thread.is_alive()
    assert told == [] and w.failure is None
    assert (stats.earlier_left, stats.in_spill, stats.unsure_in_spill) == (10, 10, 10)
    lines = [r["decision_point"] for r in SpillFile(w.spill_path).read()]
    assert sorted(lines) == list(range(10))  # each once
    again = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "spill")
    again.start()
    assert again.stop(WAIT_S).replayed == 10
    assert stored(tmp_path / "f.duckdb") == list(range(10))


def test_a_stop_called_on_the_writer_thread_asks_it_to_stop_and_returns(tmp_path: Path) -> None:
    """helper-98: a failure listener (run on the writer's thread) that called stop() got
    "cannot join current thread". It now tells the thread to stop; the owner's stop() ends it."""
    got: list[object] = []

    class StopsItsWriter(LocalDuckDBSink):
        def write_records(self, records: Any) -> Any:
            got.append(w.stop(timeout_s=0.1))  # on the writer thread
            return super().write_records(records)

    w = DecisionWriter(
        StopsItsWriter(tmp_path / "f.duckdb"), batch_size=2, spill_dir=tmp_path / "spill"
    )
    w.start()
    for i in range(4):
        w.submit(record(i))
    stats = w.stop(WAIT_S)
    assert got and got[0] is w.stats
    assert stats.written + stats.spilled == 4 and stats.rejected == stats.lost == 0
    assert w.failure is None
    if stats.spilled:
        again = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "spill")
        again.start()
        again.stop(WAIT_S)
    assert stored(tmp_path / "f.duckdb") == list(range(4))
