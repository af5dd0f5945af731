"""The decision writer when its local disk fails (FMEL_SPILL_DIR full).

Real ``ENOSPC`` without root: Linux's ``/dev/full`` answers every write with "No space left on
device" (full(4)); the journal or spill file is made a symlink to it after the writer started
(so the start's reads of those files see no file). Stores are real DuckDB files.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import duckdb
import pytest

from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from tests.unit.test_writer import FAST, WAIT_S, FakeClock, Flaky, record, stored, writer

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
    sink.gate.clear()  # the next write blocks: the thread outlives stop()
    w.submit(record(1))
    w.stop(timeout_s=0.3)
    assert sink._con is not None  # the thread is still in it
    sink.gate.set()
    assert w._thread is not None
    w._thread.join(WAIT_S)
    assert not w._thread.is_alive() and sink._con is None
    again = LocalDuckDBSink(tmp_path / "f.duckdb")  # the same file, in the same process
    again.open()
    again.close()
    assert stored(tmp_path / "f.duckdb")[:1] == [0]
