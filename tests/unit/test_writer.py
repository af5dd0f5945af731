"""DecisionWriter: batching, back-pressure, retries, spill and drain, rejected rows, counts.

The failing sinks here are small hand-written fakes wrapping the real local DuckDB sink, so what
is finally stored is checked in a real store, or an in-memory store that keeps duplicates (as
the BigQuery emulator does) so a row sent twice is seen. Time is a :class:`FakeClock` the tests
move by hand, and the tests wait for facts (a sink call, a flush), never for a fixed sleep.
Property tests (Hypothesis) drive the spill queue and whole writer runs through random outages.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analyzers.schema import (
    DECISION_SCHEMA,
    Access,
    DataAccess,
    DecisionRecord,
    RunInfo,
    to_row,
)
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.spill import SpillFile
from analyzers.sinks.writer import DecisionWriter, WriterStats
from core.errors import ConfigError, SinkError, TransientError
from core.retry import RetryPolicy

RUN = RunInfo("sess", "agent", "backtest", "agents.X", "{}", None)
FAST = RetryPolicy(attempts=2, initial_s=0.001, max_s=0.002)
WAIT_S = 10.0  # bound of every wait for a fact; a test that hits it has failed


def record(i: int) -> DecisionRecord:
    return DecisionRecord(
        RUN,
        i,
        1_700_000_000.0 + i,
        1_000_000_000.0 + 86_400 * i,
        "NEXT",
        "HOLD",
        (),
        (),
        0,
        0,
        100.0 + i,
        50.0,
        (),
        None,
        None,
        None,
    )


def record_with_reads(i: int, n: int) -> DecisionRecord:
    """``record(i)`` with ``n`` reads of ``close[0..-(n-1)]`` of one feed, resolved (as a
    read-heavy agent's, about 60 reads a bar)."""
    bar = 1_000_000_000.0 + 86_400 * i
    reads = tuple(
        Access(k, "close", -k, 1, i - k, f"{i - k:064x}", 100.0 + i - k, None, False, bar - k)
        for k in range(n)
    )
    access = DataAccess("GOOG", f"{i:064x}", ("close",), reads)
    return record(i)._replace(data_accessed=(access,), reads=n)


class FakeClock:
    """Monotonic time moved by :meth:`advance`. The writer's timed waits end when notified (a
    full batch, a flush, stop, or :meth:`advance`), never by real time passing."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0  # waits begun by the writer
        self.sleeping = False
        self._state = threading.Condition()
        self._conds: set[threading.Condition] = set()

    def __call__(self) -> float:
        return self.now

    def wait(self, cond: threading.Condition, timeout_s: float) -> None:
        """The writer's wait, ``cond`` held: returns when ``cond`` is notified."""
        self._conds.add(cond)
        with self._state:
            self.sleeps += 1
            self.sleeping = True
            self._state.notify_all()
        try:
            cond.wait(5.0)  # real bound only against a lost wake-up; the caller loops
        finally:
            with self._state:
                self.sleeping = False

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for cond in list(self._conds):
            with cond:
                cond.notify_all()

    def writer_asleep(self, after: int = -1) -> int:
        """Wait until the writer sleeps in a wait begun after wait number ``after``; returns
        that wait's number."""
        with self._state:
            ok = self._state.wait_for(lambda: self.sleeping and self.sleeps > after, WAIT_S)
            assert ok, "the writer never went back to waiting"
            return self.sleeps


def stop_while_time_passes(
    w: DecisionWriter, clock: FakeClock, on_tick: Any = None, timeout_s: float = WAIT_S
) -> WriterStats:
    """``w.stop()`` while the fake clock moves 1 s each time the writer waits (a stopping
    writer waits its retry backoff on that clock); ``on_tick(now)`` is called after each move."""
    done = threading.Event()

    def tick() -> None:
        seen = [-1]  # the last wait the clock moved for
        while not done.is_set():
            with clock._state:
                if not clock._state.wait_for(
                    lambda: clock.sleeping and clock.sleeps > seen[0], 0.05
                ):
                    continue
                if not w._stopping:
                    continue  # time starts once stop() has set its deadline (at clock.now)
                seen[0] = clock.sleeps
            clock.advance(1.0)
            if on_tick is not None:
                on_tick(clock.now)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        return w.stop(timeout_s)
    finally:
        done.set()
        ticker.join(WAIT_S)


class Flaky(LocalDuckDBSink):
    """The local sink, failing (transiently) while ``down`` is set, blocking while ``gate`` is
    clear; records every call that got through."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[int] = []
        self._called = threading.Condition()

    def open(self) -> None:
        if self.down.is_set():
            raise TransientError("connection refused")
        super().open()

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        self._pass(len(rows))
        return super().write(rows)

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        self._pass(len(records))
        return super().write_records(records)

    def _pass(self, n: int) -> None:
        assert self.gate.wait(WAIT_S), "gate never opened"
        if self.down.is_set():
            raise TransientError("503 backend unavailable")
        with self._called:
            self.calls.append(n)
            self._called.notify_all()

    def wait_calls(self, n: int) -> list[int]:
        with self._called:
            assert self._called.wait_for(lambda: len(self.calls) >= n, WAIT_S), self.calls
            return list(self.calls)


def stored(path: Path) -> list[int]:
    with duckdb.connect(str(path), read_only=True) as con:
        return [
            r[0]
            for r in con.execute(
                "SELECT decision_point FROM decisions ORDER BY decision_point"
            ).fetchall()
        ]


def writer(sink: LocalDuckDBSink, spill_dir: Path, clock: FakeClock, **kw: Any) -> DecisionWriter:
    return DecisionWriter(sink, spill_dir=spill_dir, retry=FAST, clock=clock, wait=clock.wait, **kw)


def test_batches_by_size_and_by_interval(tmp_path: Path) -> None:
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path, clock, batch_size=10, flush_interval_s=0.2)
    w.start()
    for i in range(10):
        w.submit(record(i))
    assert sink.wait_calls(1) == [10]  # a full batch goes at once, whatever the clock says
    for i in range(10, 13):
        w.submit(record(i))
    waiting = clock.writer_asleep()  # three records, fewer than batch_size: wait the interval
    clock.advance(0.15)
    clock.writer_asleep(after=waiting)  # woke, found them too young, waits again
    assert sink.calls == [10]
    clock.advance(0.1)  # now older than flush_interval_s
    assert sink.wait_calls(2) == [10, 3]
    stats = w.stop()
    assert stats.written == 13 and stats.spilled == 0
    assert stored(sink.path) == list(range(13))


def test_a_batch_is_also_full_by_the_reads_its_records_hold(tmp_path: Path) -> None:
    """batch_reads 50: decisions of 20 reads go three at a time although batch_size is 100 (a
    large batch_size keeps few wide decisions waiting); the fake clock never moves."""
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path, clock, batch_size=100, batch_reads=50, flush_interval_s=60.0)
    w.start()
    assert w.batch_reads == 50  # given: not the sink's own
    for i in range(2):
        w.submit(record(i)._replace(reads=20))
    clock.writer_asleep()  # 40 reads: waits
    assert sink.calls == []
    w.submit(record(2)._replace(reads=20))
    assert sink.wait_calls(1) == [3]
    for i in range(3, 5):  # counted again from the batch written: 40 reads wait
        w.submit(record(i)._replace(reads=20))
    waiting = clock.writer_asleep()
    w.submit(record(5)._replace(reads=0))
    clock.writer_asleep(after=waiting)
    assert sink.calls == [3]
    w.submit(record(6)._replace(reads=10))
    assert sink.wait_calls(2) == [3, 4]
    assert w.stop().written == 7
    assert stored(sink.path) == list(range(7))


def test_a_stopped_writer_does_not_start_again(tmp_path: Path) -> None:
    """stop() before start() spills what was submitted; start() after it refuses (it counted
    its own spill again as replayed: spilled 5, replayed 5, "5 wait" in the log while the
    spill was gone), and a new writer stores the spill once."""
    from core.errors import SinkError

    sink = LocalDuckDBSink(tmp_path / "s.duckdb")
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", retry=FAST, batch_size=2)
    for i in range(5):
        w.submit(record(i))
    assert w.stop().spilled == 5
    with pytest.raises(SinkError, match="was stopped; make a new one"):
        w.start()
    again = DecisionWriter(
        LocalDuckDBSink(tmp_path / "s.duckdb"), spill_dir=tmp_path / "spill", retry=FAST
    )
    again.start()
    stats = again.stop()
    assert (stats.replayed, stats.spilled, stats.in_spill) == (5, 0, 0)
    assert stored(tmp_path / "s.duckdb") == list(range(5))


def test_batch_reads_defaults_to_what_the_sink_takes_in_one_statement(tmp_path: Path) -> None:
    sink = LocalDuckDBSink(tmp_path / "s.duckdb", memory_limit_mb=64)
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", batch_size=2048)
    assert w.batch_reads is None
    w.start()
    try:
        assert w.batch_reads == sink.run_reads > 0  # sized at open() from DuckDB's limit
    finally:
        w.stop()
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ConfigError, match="batch_reads"):
            DecisionWriter(sink, spill_dir=tmp_path / "spill", batch_reads=bad)  # type: ignore[arg-type]


def test_batch_reads_comes_from_a_sink_that_opens_late(tmp_path: Path) -> None:
    """A sink unreachable at start() sizes its statements when it opens later: batch_reads
    follows it then (it stayed None); one given explicitly is kept."""
    for explicit in (None, 7):
        sink = Flaky(tmp_path / f"late-{explicit}.duckdb")
        sink.down.set()
        w = DecisionWriter(
            sink,
            spill_dir=tmp_path / f"spill-{explicit}",
            retry=FAST,
            probe_interval_s=0.02,
            flush_interval_s=0.02,
            batch_reads=explicit,
        )
        w.start()
        try:
            assert w.batch_reads == explicit
            sink.down.clear()
            w.submit(record(1))
            deadline = time.monotonic() + WAIT_S
            while w.stats.written < 1 and time.monotonic() < deadline:  # spilled, then replayed
                time.sleep(0.01)
            assert w.stats.written == 1
            assert w.batch_reads == (sink.run_reads if explicit is None else explicit)
        finally:
            w.stop()
        assert stored(sink.path) == [1]


def test_a_batch_larger_than_the_queue_is_written_when_the_queue_is_full(
    tmp_path: Path,
) -> None:
    """batch_size 50 with room for 5: the producer blocks on a full queue, and the writer writes
    it then (a batch can hold no more than the queue), not when the flush interval has passed
    (the fake clock never moves here). Found by a fresh-context attack."""
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path, clock, batch_size=50, queue_size=5, flush_interval_s=60.0)
    w.start()
    done = threading.Event()

    def produce() -> None:
        for i in range(12):
            w.submit(record(i))
        done.set()

    threading.Thread(target=produce, daemon=True).start()
    assert sink.wait_calls(2)[:2] == [5, 5]
    assert done.wait(WAIT_S)
    assert w.stop().written == 12
    assert stored(sink.path) == list(range(12))


def test_flush_writes_a_partial_batch_now(tmp_path: Path) -> None:
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path, clock, batch_size=10, flush_interval_s=60.0)
    w.start()
    for i in range(4):
        w.submit(record(i))
    assert w.flush(WAIT_S)
    assert sink.calls == [4] and w.stats.written == 4 and clock.now == 0.0
    w.stop()


def test_flush_says_false_when_records_wait_and_no_thread_takes_them(tmp_path: Path) -> None:
    sink = LocalDuckDBSink(tmp_path / "f.duckdb")
    w = writer(sink, tmp_path, FakeClock(), batch_size=10, flush_interval_s=60.0)
    assert w.flush(WAIT_S)  # nothing submitted: nothing waits
    w.submit(record(0))
    assert not w.flush(WAIT_S)  # not started: the record waits (was True)
    w.start()
    assert w.flush(WAIT_S) and w.stats.written == 1
    w.stop()
    assert w.flush(WAIT_S)  # stopped with nothing left

    dying = Dying(tmp_path / "g.duckdb")
    w = writer(dying, tmp_path / "g", FakeClock(), batch_size=1)
    w.start()
    w.submit(record(1))
    assert not w.flush(WAIT_S)  # the thread died holding it
    assert w.stop().spilled == 1 and w.failure is not None


def test_a_full_queue_of_a_writer_never_started_raises_instead_of_waiting(
    tmp_path: Path,
) -> None:
    w = writer(LocalDuckDBSink(tmp_path / "f.duckdb"), tmp_path, FakeClock(), queue_size=3)
    for i in range(3):
        w.submit(record(i))
    with pytest.raises(SinkError, match=r"never started: 3 records wait"):
        w.submit(record(3))  # waited forever before (nothing makes room)
    stats = w.stop()
    assert (stats.submitted, stats.spilled) == (3, 3)  # what it took is kept


def test_full_queue_blocks_the_producer_and_loses_nothing(tmp_path: Path) -> None:
    sink = Flaky(tmp_path / "f.duckdb")
    sink.gate.clear()  # the sink hangs until the test opens the gate
    w = DecisionWriter(
        sink,
        batch_size=2,
        flush_interval_s=0.01,
        queue_size=3,
        spill_dir=tmp_path,
        retry=FAST,
        max_batch=2,
    )
    w.start()
    progress, done = threading.Condition(), [0]

    def produce() -> None:
        for i in range(20):
            w.submit(record(i))
            with progress:
                done[0] += 1
                progress.notify_all()

    producer = threading.Thread(target=produce)
    producer.start()
    # Two records are in the writer's hands (stuck in the sink), three fill the queue: the
    # sixth submit() must wait.
    with progress:
        assert progress.wait_for(lambda: done[0] == 5, WAIT_S)
    producer.join(0.2)
    assert producer.is_alive() and done[0] == 5 and w.queue_depth == 3
    sink.gate.set()
    producer.join(WAIT_S)
    assert not producer.is_alive()
    stats = w.stop()
    assert stats.written == 20 and stored(sink.path) == list(range(20))


def test_outage_spills_then_replays_at_the_probe_in_order_without_duplicates(
    tmp_path: Path,
) -> None:
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(
        sink, tmp_path / "spill", clock, batch_size=5, flush_interval_s=1.0, probe_interval_s=10.0
    )
    w.start()
    for i in range(5):
        w.submit(record(i))
    assert w.flush(WAIT_S) and sink.calls == [5]
    sink.down.set()
    for i in range(5, 20):
        w.submit(record(i))
    assert w.flush(WAIT_S)
    assert w.spill_path.exists() and not w.healthy
    spilled = [json.loads(x)["decision_point"] for x in w.spill_path.read_text().splitlines()]
    assert spilled == list(range(5, 20))
    sink.down.clear()  # back, but the next probe is due only at clock 10
    for i in range(20, 25):
        w.submit(record(i))
    assert w.flush(WAIT_S)
    assert not w.healthy and w.stats.spilled == 20 and w.stats.replayed == 0
    clock.advance(10.0)
    for i in range(25, 30):
        w.submit(record(i))
    assert w.flush(WAIT_S)
    assert w.healthy and not w.spill_path.exists()
    stats = w.stop()
    # 25 went through the spill file (20 while down, 5 more before the probe was due), all of
    # this run: counted written (and recovered), none left spilled, nothing "replayed".
    assert (stats.written, stats.spilled, stats.rejected) == (30, 0, 0)
    assert stats.spilled_total == 25 and stats.recovered == 25 and stats.replayed == 0
    assert stored(sink.path) == list(range(30))


def test_sink_down_at_start_and_spill_replayed_by_the_next_run(tmp_path: Path) -> None:
    spill = _spilled_by_a_run(tmp_path, 7)
    # the next start (sink healthy) replays the file first
    sink2 = Flaky(tmp_path / "f.duckdb")
    w2 = writer(sink2, spill, FakeClock(), batch_size=3, flush_interval_s=0.02)
    w2.start()
    w2.submit(record(7))
    stats2 = w2.stop()
    # the earlier run's 7 are counted apart from this run's one record
    assert stats2.replayed == 7 and stats2.earlier_left == 0
    assert (stats2.submitted, stats2.written, stats2.spilled) == (1, 1, 0)
    assert stored(sink2.path) == list(range(8))


class Picky(LocalDuckDBSink):
    """Refuses decision 3 for good, like BigQuery's per-row insert errors."""

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        keep = [r for r in records if r.decision_point != 3]
        super().write_records(keep)
        return [
            RowError(i, "portfolio_value: bad value")
            for i, r in enumerate(records)
            if r.decision_point == 3
        ]


def test_rejected_rows_are_kept_with_the_reason_and_counted(tmp_path: Path) -> None:
    sink = Picky(tmp_path / "f.duckdb")
    w = writer(sink, tmp_path, FakeClock(), batch_size=10)
    w.start()
    for i in range(6):
        w.submit(record(i))
    stats = w.stop()
    assert stats.rejected == 1 and stats.written == 5
    (kept,) = [json.loads(x) for x in w.rejected_path.read_text().splitlines()]
    assert kept["reason"] == "portfolio_value: bad value"
    assert kept["row"]["decision_id"] == "sess:3"
    assert stored(sink.path) == [0, 1, 2, 4, 5]


class Repeats(LocalDuckDBSink):
    """A sink whose row errors repeat an index and name one out of range (a sink bug)."""

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        keep = [r for r in records if r.decision_point != 3]
        super().write_records(keep)
        bad = [i for i, r in enumerate(records) if r.decision_point == 3]
        return [RowError(i, why) for i in bad for why in ("one", "two")] + (
            [RowError(len(records), "beyond")] if bad else []
        )


def test_row_errors_of_a_sink_count_each_row_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = Repeats(tmp_path / "f.duckdb")
    w = writer(sink, tmp_path, FakeClock(), batch_size=6)
    w.start()
    for i in range(6):
        w.submit(record(i))
    stats = w.stop()
    # found by an attack: 2 rejected for 1 row; an index out of range killed the thread
    assert (stats.written, stats.rejected, stats.spilled, stats.lost) == (5, 1, 0, 0)
    assert stored(sink.path) == [0, 1, 2, 4, 5]
    assert "3 row errors for 1 distinct rows" in caplog.text


class Buggy(LocalDuckDBSink):
    def write_records(self, records: Sequence[DecisionRecord]) -> Any:
        raise RuntimeError("a bug in the sink")


def test_unexpected_sink_error_keeps_the_batch(tmp_path: Path) -> None:
    sink = Buggy(tmp_path / "f.duckdb")
    w = writer(sink, tmp_path, FakeClock(), batch_size=4)
    w.start()
    for i in range(4):
        w.submit(record(i))
    stats = w.stop()
    # the failed batch went to the spill file, and the final drain (row path) stored it
    assert stats.spilled_total == 4 and stats.recovered == 4
    assert (stats.written, stats.spilled, stats.rejected, stats.replayed) == (4, 0, 0, 0)
    assert stored(sink.path) == [0, 1, 2, 3]


class _Unresolvable(DecisionRecord):
    """A record whose reads cannot be resolved (as the writer met when a second run over the
    same feeds reset their buffers under records still waiting)."""

    @property
    def data_accessed(self) -> Any:
        raise IndexError("index 1000 is out of bounds for axis 0 with size 1000")


def test_a_record_that_cannot_be_converted_is_counted_lost_and_the_rest_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = LocalDuckDBSink(tmp_path / "f.duckdb")
    w = writer(sink, tmp_path, FakeClock(), batch_size=4)
    w.start()
    for i in range(8):
        w.submit(_Unresolvable(*record(i)) if i in (1, 2) else record(i))
    stats = w.stop()
    # the batch with them failed in the sink and was spilled without them; the writer went on
    assert (stats.written, stats.lost, stats.spilled, stats.rejected) == (6, 2, 0, 0)
    assert stats.submitted == 8 and "IndexError: index 1000" in stats.lost_reason
    assert stored(sink.path) == [0, 3, 4, 5, 6, 7]
    lost = [r for r in caplog.records if "decision records lost" in r.getMessage()]
    assert len(lost) == 1 and "2 decision records lost" in lost[0].getMessage()


class Dying(LocalDuckDBSink):
    def write_records(self, records: Sequence[DecisionRecord]) -> Any:
        raise SystemExit("the writer thread ends here")  # not an Exception: fatal


def test_a_writer_that_died_spills_the_batch_it_held(tmp_path: Path) -> None:
    sink = Dying(tmp_path / "f.duckdb")
    w = writer(sink, tmp_path, FakeClock(), batch_size=4)
    w.start()
    for i in range(6):
        w.submit(record(i))
    stats = w.stop()
    # the batch in flight when the thread died is not forgotten: spilled with the rest
    assert stats.submitted == 6
    assert stats.written + stats.spilled + stats.rejected + stats.lost == 6
    assert stats.lost == 0 and w.failure is not None
    assert sorted(int(r["decision_point"]) for r in SpillFile(w.spill_path).read()) == list(
        range(6)
    )


def test_local_store_paths_agree_and_replays_do_not_duplicate(tmp_path: Path) -> None:
    from analyzers.schema import to_row

    a, b = LocalDuckDBSink(tmp_path / "a.duckdb"), LocalDuckDBSink(tmp_path / "b.duckdb")
    a.open()
    b.open()
    recs = [record(i) for i in range(5)]
    a.write_records(recs)
    a.write([to_row(r) for r in recs])  # a replay of stored rows is skipped by decision_id
    b.write([to_row(r) for r in recs])
    q = "SELECT * FROM decisions ORDER BY decision_point"
    rows_a, rows_b = a._con.execute(q).fetchall(), b._con.execute(q).fetchall()
    assert rows_a == rows_b and len(rows_a) == 5
    a.close()
    b.close()


def test_the_local_store_has_the_reads_view(tmp_path: Path) -> None:
    from analyzers.schema import Access, DataAccess

    reads = tuple(Access(s, "close", -s, 1, 9 - s, "h", 10.0 + s, None, False) for s in range(3))
    rec = record(0)._replace(data_accessed=(DataAccess("GOOG", "h", ("close",), reads),), reads=3)
    sink = LocalDuckDBSink(tmp_path / "v.duckdb")
    sink.open()
    sink.write_records([rec])
    got = sink._con.execute(
        'SELECT symbol, seq, field, "index", value FROM decision_reads ORDER BY seq'
    ).fetchall()
    assert got == [("GOOG", s, "close", -s, 10.0 + s) for s in range(3)]
    sink.close()


def _wal_bytes(db: Path) -> int:
    wal = db.with_name(db.name + ".wal")
    return wal.stat().st_size if wal.exists() else 0


@pytest.mark.parametrize(("limit", "setting"), [(256 * 1024, "256.0 KiB"), (None, "16.0 MiB")])
def test_the_local_store_checkpoints_its_log_while_it_runs(
    tmp_path: Path, limit: int | None, setting: str
) -> None:
    """With the small ``wal_autocheckpoint`` the log is folded into the file as records come
    (so close() at the end of a run has little to do); with DuckDB's default it keeps growing."""
    from analyzers.schema import Access, DataAccess

    reads = tuple(Access(s, "close", -s, 1, 99 - s, "h", 10.0 + s, None, False) for s in range(50))
    access = (DataAccess("GOOG", "h", ("close",), reads),)
    sink = LocalDuckDBSink(tmp_path / "w.duckdb", wal_checkpoint_bytes=limit)
    sink.open()
    assert sink._con.execute("SELECT current_setting('wal_autocheckpoint')").fetchall() == [
        (setting,)
    ]
    largest = 0
    for start in range(0, 4000, 100):
        recs = [
            record(i)._replace(data_accessed=access, reads=50) for i in range(start, start + 100)
        ]
        sink.write_records(recs)
        largest = max(largest, _wal_bytes(sink.path))
    assert sink._con.execute("SELECT count(*) FROM decisions").fetchall() == [(4000,)]
    if limit is None:
        assert largest > 1024 * 1024  # the default lets it pass a megabyte
    else:
        assert largest < 4 * limit  # a write's worth past the limit, then checkpointed
    sink.close()
    with duckdb.connect(str(sink.path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decision_reads").fetchall() == [(4000 * 50,)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "1MB", True, None, 2**40 + 1])
def test_the_local_store_refuses_a_bad_setting(tmp_path: Path, bad: Any) -> None:
    from core.errors import ConfigError

    if bad is not None:  # None: DuckDB's default log size
        with pytest.raises(ConfigError, match="wal_checkpoint_bytes"):
            LocalDuckDBSink(tmp_path / "x.duckdb", wal_checkpoint_bytes=bad)
    with pytest.raises(ConfigError, match="threads"):
        LocalDuckDBSink(tmp_path / "x.duckdb", threads=1025 if bad == 2**40 + 1 else bad)


def test_a_store_that_cannot_be_set_up_is_refused_and_left_unlocked(tmp_path: Path) -> None:
    """A failure after the file is open (here a table where the reads view goes) closes the
    connection: another process may open the file at once."""
    path = tmp_path / "v.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE decision_reads AS SELECT 1 AS x")
    from core.errors import SinkError

    sink = LocalDuckDBSink(path)
    with pytest.raises(SinkError, match="cannot set up"):
        sink.open()
    # another process can open it (DuckDB locks a file per process) while the sink lives
    other = "import duckdb, sys; print(duckdb.connect(sys.argv[1]).sql('SELECT 1').fetchall())"
    out = subprocess.run([sys.executable, "-c", other, str(path)], capture_output=True, text=True)
    assert out.stdout.strip() == "[(1,)]", out.stderr[-500:]
    assert sink._con is None


def _row_groups(path: Path) -> int:
    with duckdb.connect(str(path), read_only=True) as con:
        got = con.execute(
            "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('decisions')"
        ).fetchone()
    assert got is not None
    return int(got[0])


@pytest.mark.parametrize(("size", "groups"), [(None, 3), (4096, 2), (122_880, 1)])
def test_the_local_store_writes_row_groups_of_its_size(
    tmp_path: Path, size: int | None, groups: int
) -> None:
    """5,000 decisions in batches of 100: ceil(5,000 / size) row groups in the file (DuckDB's
    own 122,880 puts them all in one, whose every nested read a checkpoint writes again). A
    replay through the JSON path goes to the same groups; the file reads as usual after."""
    path = tmp_path / "g.duckdb"
    sink = LocalDuckDBSink(path) if size is None else LocalDuckDBSink(path, row_group_size=size)
    sink.open()
    for start in range(0, 4900, 100):
        sink.write_records([record(i) for i in range(start, start + 100)])
    assert sink.write([to_row(record(i)) for i in range(4900, 5000)]) == []
    # DuckDB's spill folder stays beside the file, as with duckdb.connect(path)
    got = sink._con.execute("SELECT current_setting('temp_directory')").fetchall()
    assert got == [(str(path) + ".tmp",)]
    sink.close()
    assert _row_groups(path) == groups
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute(
            "SELECT count(*), count(DISTINCT decision_id) FROM decisions"
        ).fetchall() == [(5000, 5000)]


def test_the_local_store_opens_a_path_with_a_quote_and_appends_to_an_old_file(
    tmp_path: Path,
) -> None:
    """The path is quoted inside ATTACH; a file first written by DuckDB's own defaults keeps its
    rows and takes more."""
    path = tmp_path / "it's here.duckdb"
    sink = LocalDuckDBSink(path, row_group_size=122_880)
    sink.open()
    sink.write_records([record(i) for i in range(10)])
    sink.close()
    again = LocalDuckDBSink(path)
    again.open()
    again.write_records([record(i) for i in range(10, 20)])
    again.close()
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchall() == [(20,)]


def test_a_store_another_process_holds_is_refused_with_the_reason(tmp_path: Path) -> None:
    from core.errors import SinkError

    path = tmp_path / "held.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('open', flush=True);"
            " time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        sink = LocalDuckDBSink(path)
        with pytest.raises(SinkError, match="another process"):
            sink.open()
        assert sink._con is None
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "bad", [0, 1024, 2049, 6143, -2048, True, 2048.0, "2048", None, 2**30 + 2048]
)
def test_the_local_store_refuses_a_bad_row_group_size(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="row_group_size: expected a multiple of 2048"):
        LocalDuckDBSink(tmp_path / "x.duckdb", row_group_size=bad)


def test_a_file_that_is_not_a_duckdb_store_is_refused(tmp_path: Path) -> None:
    from core.errors import SinkError

    path = tmp_path / "notes.duckdb"
    path.write_text("not a database\n" * 100)
    with pytest.raises(SinkError, match="not a valid DuckDB database file"):
        LocalDuckDBSink(path).open()


def test_the_same_file_opened_twice_in_one_process_is_shared(tmp_path: Path) -> None:
    """An optimize run holds the study file (the trial store) while a recorder's sink writes
    to it; a report opens it after a run. DuckDB attaches a file once per process: the second
    user shares the first's database, whichever way the first opened it (fresh-context attack:
    recording the best trial of each fold failed with a file handle conflict)."""
    from analyzers.sinks.duckdb import close_store, open_store

    path = tmp_path / "study.duckdb"
    held = open_store(path)
    a, b = LocalDuckDBSink(path), LocalDuckDBSink(path)
    a.open()
    b.open()
    a.write_records([record(i) for i in range(5)])
    b.write_records([record(i) for i in range(5, 8)])
    assert held.execute("SELECT count(*) FROM decisions").fetchall() == [(8,)]
    a.close()
    b.close()
    held.execute("CREATE TABLE bars AS SELECT 1 AS x")  # the report's write
    close_store(held)
    close_store(held)  # twice: nothing more
    # all closed: another process can open it
    other = "import duckdb, sys; print(duckdb.connect(sys.argv[1]).sql('SELECT count(*) FROM decisions').fetchall())"  # noqa: E501
    out = subprocess.run([sys.executable, "-c", other, str(path)], capture_output=True, text=True)
    assert out.stdout.strip() == "[(8,)]", out.stderr[-500:]
    # a plain duckdb.connect(path) of this process (a user's) holding the file: shared too
    with duckdb.connect(str(path)) as plain:
        sink = LocalDuckDBSink(path)
        sink.open()
        sink.write_records([record(9)])
        assert plain.execute("SELECT count(*) FROM decisions").fetchall() == [(9,)]
        sink.close()


def _wide(i: int, symbols: int = 200) -> DecisionRecord:
    """A decision that read the close and an SMA of ``symbols`` symbols (a live agent over
    many feeds)."""
    from analyzers.schema import Access, DataAccess

    groups = tuple(
        DataAccess(
            f"S{s:04d}",
            f"{s:032x}",
            ("close", "sma"),
            (
                Access(2 * s, "close", 0, 1, i, f"{s:032x}", 100.0 + s, None, False),
                Access(2 * s + 1, "sma", 0, 1, i, f"{s:032x}", 99.0 + s, None, False),
            ),
        )
        for s in range(symbols)
    )
    return record(i)._replace(data_accessed=groups, reads=2 * symbols)


@pytest.mark.parametrize("merge", [False, True], ids=["the store", "DuckDB's vacuum (control)"])
def test_checkpoints_do_not_merge_the_stores_row_groups(tmp_path: Path, merge: bool) -> None:
    """Each checkpoint writes only what came since the last one: after a checkpoint DuckDB
    starts a new row group, and its vacuum would merge the small groups back at the next one,
    reading every nested read of them into memory again (10,000 symbols read a step: 3 GB
    against 0.7 GB, docs/benchmarks.md, ninth pass). Twelve batches of ten wide decisions, a
    checkpoint after each (a batch of wide decisions passes DuckDB's 100 kB log threshold and
    checkpoints at its commit): twelve groups; DuckDB's default ``max_vacuum_tasks`` (the
    control) merges them. Every decision and read is stored either way."""
    path = tmp_path / "w.duckdb"
    sink = LocalDuckDBSink(path)
    sink.open()
    if merge:
        sink._con.execute("SET max_vacuum_tasks = 100")  # DuckDB's default
    for b in range(12):
        sink.write_records([_wide(10 * b + i) for i in range(10)])
        sink._con.execute("CHECKPOINT")
    sink.close()
    groups = _row_groups(path)
    assert groups < 12 if merge else groups == 12
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute(
            "SELECT count(DISTINCT decision_id), count(*) FROM decision_reads"
        ).fetchall() == [(120, 120 * 400)]


def test_the_store_cache_is_bounded_and_a_large_batch_still_fits(tmp_path: Path) -> None:
    """DuckDB's memory for the store is ``memory_limit_mb`` (DuckDB would cache the file up to
    80 % of the machine's memory). A batch larger than that in one insert (30 decisions of
    10,000 reads at 64 MiB) is written in runs of whole records: the control, one insert of the
    same batch, runs out of memory."""
    import analyzers.sinks.duckdb as store

    sink = LocalDuckDBSink(tmp_path / "m.duckdb", memory_limit_mb=64)
    sink.open()
    assert sink._con.execute("SELECT current_setting('memory_limit')").fetchall() == [("64.0 MiB",)]
    batch = [_wide(i, symbols=5000) for i in range(30)]
    assert sink.write_records(batch) == []
    assert sink._con.execute("SELECT count(*) FROM decisions").fetchall() == [(30,)]
    table = store.records_table(batch)
    sink._con.register(store._BATCH_VIEW, table)
    with pytest.raises(duckdb.OutOfMemoryException):
        sink._con.execute(sink._arrow_sql)
    sink.close()
    default = LocalDuckDBSink(tmp_path / "d.duckdb")
    default.open()
    assert default._con.execute("SELECT current_setting('memory_limit')").fetchall() == [
        ("512.0 MiB",)
    ]
    default.close()


@pytest.mark.parametrize("bad", [63, 0, -1, 64.0, "512", True, None])
def test_the_local_store_refuses_a_bad_memory_limit(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="memory_limit_mb: expected an int from 64"):
        LocalDuckDBSink(tmp_path / "x.duckdb", memory_limit_mb=bad)


def test_a_batch_stored_in_part_names_what_it_stored_and_its_retry_skips_it(
    tmp_path: Path,
) -> None:
    """Runs of a batch are committed one by one: when a later run fails, the earlier runs' ids
    are stored, :meth:`is_stored` says so (the writer counts them written, spills the rest) and
    the retry of the whole batch writes each id once."""
    sink = LocalDuckDBSink(tmp_path / "p.duckdb")
    sink.open()
    n = sink.run_reads // 10_000 + 10  # decisions of 10,000 reads: two runs
    good = [_wide(i, symbols=5000) for i in range(n)]
    bad = [*good[: n - 5], good[n - 5]._replace(decision_point=None), *good[n - 4 :]]  # NOT NULL
    with pytest.raises(duckdb.ConstraintException):
        sink.write_records(bad)
    ((first,),) = sink._con.execute("SELECT count(*) FROM decisions").fetchall()
    assert 0 < first < n
    ids = [r.decision_id for r in good]
    assert [sink.is_stored(i) for i in ids] == [True] * first + [False] * (n - first)
    # another batch first, sharing an id with the stored part (fresh-context attack: a write
    # in between made the sink forget, and the retry stored duplicates)
    other = [good[0], *(_wide(i, symbols=10) for i in range(100, 103))]
    assert sink.write_records(other) == []
    assert sink.write_records(good) == []
    assert sink._con.execute(
        "SELECT count(*), count(DISTINCT decision_id) FROM decisions"
    ).fetchall() == [(n + 3, n + 3)]
    assert [sink.is_stored(i) for i in ids] == [True] * first + [False] * (n - first)
    sink.close()


def test_a_replay_of_wide_rows_is_written_in_runs_within_the_memory_limit(
    tmp_path: Path,
) -> None:
    """Replays (spill files, journaled live runs) come as JSON rows: the sink inserts them in
    runs of at most ``json_run_bytes`` of JSON, so eight rows of 10,000 reads go in at
    the least memory limit (64 MiB); the control, one statement for all, runs out of memory
    (fresh-context attack: a replay of wide decisions stopped the writer at every start). A
    failure part-way names what was stored."""
    rows = [to_row(_wide(i, symbols=5000)) for i in range(8)]
    sink = LocalDuckDBSink(tmp_path / "j.duckdb", memory_limit_mb=64)
    sink.open()
    assert sink.write(rows) == []
    assert sink._con.execute("SELECT count(*) FROM decision_reads").fetchall() == [(80_000,)]
    assert sink.write(rows) == []  # replayed again: each id once
    assert sink._con.execute("SELECT count(*) FROM decisions").fetchall() == [(8,)]
    sink.close()
    control = LocalDuckDBSink(tmp_path / "c.duckdb", memory_limit_mb=64)
    control.open()
    control.json_run_bytes = 10**12
    with pytest.raises(duckdb.OutOfMemoryException):
        control.write(rows)
    control.close()


@pytest.mark.parametrize("path", ["write_records", "write"])
@pytest.mark.parametrize("one_statement", [False, True], ids=["runs", "one statement (control)"])
def test_long_texts_weigh_in_the_runs_too(tmp_path: Path, path: str, one_statement: bool) -> None:
    """500 decisions of 20 reads with 200 kB of reasoning each go in at 64 MiB: texts count in
    a run's weight (a JSON row by its length). The control, the batch as one statement, runs
    out of memory (second fresh-context attack: runs counted reads only)."""
    sink = LocalDuckDBSink(tmp_path / "t.duckdb", memory_limit_mb=64)
    sink.open()
    if one_statement:
        sink.run_reads = sink.json_run_bytes = 10**12
    batch = [_wide(i, symbols=10)._replace(reasoning="r" * 200_000) for i in range(500)]
    write = sink.write_records if path == "write_records" else sink.write
    items: Any = batch if path == "write_records" else [to_row(r) for r in batch]
    if one_statement and path == "write_records":
        # one statement of DuckDB itself: write_records would halve it (helper-97)
        import analyzers.sinks.duckdb as store

        sink._con.register(store._BATCH_VIEW, store.records_table(batch))
        with pytest.raises((duckdb.OutOfMemoryException, duckdb.TransactionException)):
            sink._con.execute(sink._arrow_sql)
    elif one_statement:
        with pytest.raises((duckdb.OutOfMemoryException, duckdb.TransactionException)):
            write(items)
    else:
        assert write(items) == []
        assert sink._con.execute("SELECT count(*) FROM decisions").fetchall() == [(500,)]
    sink.close()


def _text_reads(i: int, text: str) -> DecisionRecord:
    """A decision of 100 reads of a text line (a 2 kB headline each)."""
    from analyzers.schema import Access, DataAccess

    accesses = tuple(
        Access(k, "headline", -k, 1, i, f"{k + i:032x}", None, text, False, 1e9 + k)
        for k in range(100)
    )
    return record(i)._replace(
        data_accessed=(DataAccess("NEWS", f"{i:032x}", ("headline",), accesses),), reads=100
    )


@pytest.mark.parametrize("mem", [64, 256])
def test_the_text_reads_return_weigh_in_the_runs(tmp_path: Path, mem: int) -> None:
    """helper-97: reads of a text line (2 kB headlines) were weighed as plain reads, so a run
    the bound kept whole ran out of DuckDB's memory at its commit (64-256 MiB). Their texts
    now count as :data:`TEXT_BYTES_PER_READ` reads each: the batch goes in several runs."""
    from analyzers.sinks.duckdb import record_runs

    sink = LocalDuckDBSink(tmp_path / "t.duckdb", memory_limit_mb=mem)
    sink.open()
    batch = [_text_reads(i, "n" * 2000) for i in range(sink.run_reads // 102)]
    assert len(record_runs(batch, sink.run_reads)) > 1  # was one run
    assert sink.write_records(batch) == []
    assert sink._con.execute("SELECT count(*) FROM decisions").fetchall() == [(len(batch),)]
    sink.close()


def test_a_run_that_does_not_fit_after_all_is_written_in_halves(tmp_path: Path) -> None:
    """A run whose weight understates what DuckDB needs (reads not resolved yet, order events
    and fields are not weighed) is halved and retried when DuckDB runs out of memory, as the
    study store's merge does: 40 decisions of 10,000 reads as one run at 64 MiB go in, each
    once, and the ids of a failure part-way stay remembered."""
    sink = LocalDuckDBSink(tmp_path / "h.duckdb", memory_limit_mb=64)
    sink.open()
    sink.run_reads = 10**12  # the weights say it fits: one run
    batch = [_wide(i, symbols=5000) for i in range(40)]
    assert sink.write_records(batch) == []
    assert sink._con.execute(
        "SELECT count(*), count(DISTINCT decision_id) FROM decisions"
    ).fetchall() == [(40, 40)]
    bad = [_wide(i, symbols=5000) for i in range(100, 140)]
    bad[-1] = bad[-1]._replace(decision_point=None)  # NOT NULL: not a memory failure
    with pytest.raises(duckdb.ConstraintException):
        sink.write_records(bad)
    ((n,),) = sink._con.execute("SELECT count(*) FROM decisions").fetchall()
    assert 40 < n < 80  # the halves before the bad record's went in, and are remembered
    assert [sink.is_stored(r.decision_id) for r in bad] == [True] * (n - 40) + [False] * (80 - n)
    sink.close()


def test_runs_are_sized_for_the_limit_the_shared_database_has(tmp_path: Path) -> None:
    """A sink that shares a file opened first with another limit sizes its runs for the limit
    DuckDB has (second fresh-context attack: it sized them for its own 2 GiB and ran out of the
    first opener's 64 MiB)."""
    from analyzers.sinks.duckdb import READS_PER_MB, close_store, open_store

    path = tmp_path / "s.duckdb"
    held = open_store(path, memory_limit_mb=64)
    sink = LocalDuckDBSink(path, memory_limit_mb=2048)
    sink.open()
    assert sink.run_reads == READS_PER_MB * 64
    assert sink.write_records([_wide(i, symbols=5000) for i in range(20)]) == []
    assert held.execute("SELECT count(*) FROM decisions").fetchall() == [(20,)]
    sink.close()
    close_store(held)


def test_a_study_merges_a_part_of_wide_decisions_in_runs_and_once(tmp_path: Path) -> None:
    """``OPTIMIZE_RECORD=all``: a worker's part file of wide decisions (60 of 10,000 reads) is
    merged into a study store at 64 MiB in committed runs; the control, the part in one
    ``INSERT``, runs out of memory. Merged again (a copy of the part, as after a merge that
    failed part-way), nothing is stored twice."""
    import shutil

    from runtime.research.store import DuckDBTrialStore

    part = tmp_path / "part.duckdb"
    worker = LocalDuckDBSink(part)
    worker.open()
    assert worker.write_records([_wide(i, symbols=5000) for i in range(60)]) == []
    worker.close()
    again = tmp_path / "again.duckdb"
    shutil.copy(part, again)
    store = DuckDBTrialStore(tmp_path / "fmel.duckdb", memory_limit_mb=64)
    store.open()
    try:
        store._con.execute("ATTACH ? AS control (READ_ONLY)", [str(again)])
        # out of memory in the statement or at its commit, by how the pool was used
        with pytest.raises((duckdb.OutOfMemoryException, duckdb.TransactionException)):
            store._con.execute("INSERT INTO decisions BY NAME SELECT * FROM control.decisions")
        store._con.execute("DETACH control")
        assert store._con.execute("SELECT count(*) FROM decisions").fetchall() == [(0,)]
        assert store.merge_part(part) == 60
        assert not part.exists()
        assert store.merge_part(again) == 0
        assert store._con.execute(
            "SELECT count(*), count(DISTINCT decision_id), sum(len(data_accessed)) FROM decisions"
        ).fetchall() == [(60, 60, 60 * 5000)]
    finally:
        store.close()


def test_a_part_whose_read_counts_understate_it_is_merged_by_halving_its_runs(
    tmp_path: Path,
) -> None:
    """Runs are weighed by the ``reads`` column (the lists' lengths would read the nested
    column); a part whose counts understate what it stores (an attack: ``reads`` 0 on wide
    decisions) still goes in: a run out of memory is halved and retried, every row once."""
    from runtime.research.store import DuckDBTrialStore

    part = tmp_path / "part.duckdb"
    worker = LocalDuckDBSink(part)
    worker.open()
    assert worker.write_records([_wide(i, symbols=5000)._replace(reads=0) for i in range(60)]) == []
    worker.close()
    store = DuckDBTrialStore(tmp_path / "fmel.duckdb", memory_limit_mb=64)
    store.open()
    try:
        assert store.merge_part(part) == 60
        assert store._con.execute(
            "SELECT count(*), count(DISTINCT decision_id) FROM decisions"
        ).fetchall() == [(60, 60)]
    finally:
        store.close()


def test_a_merge_stores_an_id_a_part_repeats_once_and_reads_older_parts(tmp_path: Path) -> None:
    """Fresh-context attack on the merge: a part holding one id twice stored both copies (the
    check looked only at committed rows); a part without a column the runs are weighed by
    (``reads``, ``reasoning``) failed on the weighing, not on the merge."""
    from runtime.research.store import DuckDBTrialStore

    part = tmp_path / "dup.duckdb"
    worker = LocalDuckDBSink(part)
    worker.open()
    worker.write_records([record(i) for i in range(5)])
    worker.write_records([record(i)._replace(reasoning="second copy") for i in range(3)])
    worker.close()
    with duckdb.connect(str(part), config={"memory_limit": "256MiB"}) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchall() == [(8,)]
    older = tmp_path / "older.duckdb"
    with duckdb.connect(str(older), config={"memory_limit": "256MiB"}) as con:
        con.execute("ATTACH ? AS src (READ_ONLY)", [str(part)])
        con.execute(
            "CREATE TABLE decisions AS SELECT * EXCLUDE (reads, reasoning)"
            " REPLACE ('older:' || decision_point::VARCHAR AS decision_id,"
            " 'older' AS session_id) FROM src.decisions WHERE reasoning IS NULL"
        )
    store = DuckDBTrialStore(tmp_path / "fmel.duckdb", memory_limit_mb=64)
    store.open()
    try:
        assert store.merge_part(part) == 5
        assert store._con.execute(
            "SELECT count(*), count(DISTINCT decision_id), count(reasoning) FROM decisions"
        ).fetchall() == [(5, 5, 0)]  # the first copy of each id
        assert store.merge_part(older) == 5
        assert store._con.execute(
            "SELECT count(*), count(reads) FROM decisions WHERE session_id = 'older'"
        ).fetchall() == [(5, 0)]
    finally:
        store.close()


def test_a_part_merges_into_a_store_of_millions_of_decisions_at_64_mib(tmp_path: Path) -> None:
    """The skipped ids are looked up in the part's sessions only: the first merge checked
    each row against every id of the store, and a store of 2,000,000 decisions ran out of
    64 MiB on a part of 200,000 (fresh-context attack; its control below)."""
    from runtime.research.store import DuckDBTrialStore

    template = tmp_path / "template.duckdb"
    worker = LocalDuckDBSink(template)
    worker.open()
    worker.write_records([record(0)])
    worker.close()
    path = tmp_path / "fmel.duckdb"
    store = DuckDBTrialStore(path, memory_limit_mb=64)
    store.open()
    store.close()
    part = tmp_path / "part.duckdb"
    with duckdb.connect(str(path), config={"memory_limit": "512MiB"}) as con:
        con.execute("ATTACH ? AS t (READ_ONLY)", [str(template)])
        con.execute(
            "INSERT INTO decisions BY NAME SELECT * EXCLUDE (decision_id, session_id, i),"
            " 'store-' || (i // 1000)::VARCHAR AS session_id,"
            " 'store-' || i::VARCHAR || '-padpadpadpadpadpad' AS decision_id"
            " FROM t.decisions, range(2000000) r(i)"
        )
    with duckdb.connect(str(part), config={"memory_limit": "512MiB"}) as con:
        con.execute("ATTACH ? AS t (READ_ONLY)", [str(template)])
        con.execute(
            "CREATE TABLE decisions AS SELECT * EXCLUDE (i) REPLACE ('trial' AS session_id,"
            " 'trial:' || i::VARCHAR || '-padpadpadpadpadpad' AS decision_id)"
            " FROM t.decisions, range(200000) r(i)"
        )
    store = DuckDBTrialStore(path, memory_limit_mb=64)
    store.open()
    try:
        store._con.execute("ATTACH ? AS part (READ_ONLY)", [str(part)])
        with pytest.raises((duckdb.OutOfMemoryException, duckdb.TransactionException)):
            store._con.execute(  # the control: the first merge's statement
                "INSERT INTO decisions BY NAME SELECT * FROM part.decisions p WHERE NOT EXISTS"
                " (SELECT 1 FROM decisions d WHERE d.decision_id = p.decision_id)"
            )
        store._con.execute("DETACH part")
        assert store.merge_part(part) == 200000
        assert store._con.execute("SELECT count(*) FROM decisions").fetchall() == [(2200000,)]
    finally:
        store.close()


def test_a_report_after_the_run_keeps_the_stores_row_groups(tmp_path: Path) -> None:
    """A plain connection that writes checkpoints the file with DuckDB's own row group size,
    merging the store's small groups (a memory spike as large as the table: fresh-context
    attack); ``open_store`` keeps them."""
    from analyzers.sinks.duckdb import close_store, open_store

    path = tmp_path / "r.duckdb"
    sink = LocalDuckDBSink(path)
    sink.open()
    for start in range(0, 5000, 100):
        sink.write_records([record(i) for i in range(start, start + 100)])
    sink.close()
    assert _row_groups(path) == 3
    con = open_store(path)
    con.execute("CREATE TABLE bars AS SELECT 1 AS x")
    close_store(con)
    assert _row_groups(path) == 3
    with duckdb.connect(str(path)) as plain:  # the control: a plain writer merges them
        plain.execute("CREATE TABLE more AS SELECT 1 AS x")
    assert _row_groups(path) == 1


def test_replayed_rows_that_break_a_column_are_refused_one_by_one(tmp_path: Path) -> None:
    """A NULL in a NOT NULL column, a missing id, a NaN: each such row gets its RowError and
    the rest of the batch is written (before, the NULL failed the whole batch at every replay,
    and a missing id was dropped without an error; fresh-context attack)."""
    sink = LocalDuckDBSink(tmp_path / "bad.duckdb")
    sink.open()
    sink.write([to_row(record(0))])
    rows = [to_row(record(i)) for i in range(1, 7)]
    rows[1]["action"] = None  # NOT NULL
    rows[2]["decision_id"] = None
    rows[3]["portfolio_value"] = float("nan")
    rows[4]["decision_id"] = ""
    errors = sink.write(rows)
    assert [e.index for e in errors] == [1, 2, 3, 4]
    assert "NOT NULL" in errors[0].reason and "decision_id" in errors[1].reason
    assert "not JSON" in errors[2].reason and "decision_id" in errors[3].reason
    got = sink._con.execute("SELECT decision_id FROM decisions ORDER BY decision_point").fetchall()
    assert got == [(to_row(record(i))["decision_id"],) for i in (0, 1, 6)]
    sink.close()


def test_a_home_relative_path_is_expanded_once_and_urls_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sink = LocalDuckDBSink(Path("~/fmel/fmel.duckdb"))
    sink.open()
    sink.close()
    assert (tmp_path / "home" / "fmel" / "fmel.duckdb").exists()
    assert not (tmp_path / "~").exists()
    assert sink.destination == f"duckdb:{tmp_path / 'home' / 'fmel' / 'fmel.duckdb'}"
    for url in ("md:store", "s3://bucket/x.duckdb", "https://host/x.duckdb"):
        with pytest.raises(ConfigError, match="expected a local file path"):
            LocalDuckDBSink(Path(url))


def test_open_failures_name_their_cause(tmp_path: Path) -> None:
    """Only a lock held elsewhere hints at another process; a folder that cannot be made is a
    SinkError too (it was a raw OSError)."""
    from core.errors import SinkError

    text = tmp_path / "t.duckdb"
    text.write_text("x" * 5000)
    with pytest.raises(SinkError, match="not a valid DuckDB") as e:
        LocalDuckDBSink(text).open()
    assert "another process" not in str(e.value)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SinkError, match="cannot create"):
        LocalDuckDBSink(blocker / "sub" / "x.duckdb").open()


def test_a_decisions_table_in_another_schema_does_not_confuse_the_check(tmp_path: Path) -> None:
    path = tmp_path / "s.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE SCHEMA archive")
        con.execute("CREATE TABLE archive.decisions (x INT)")
    sink = LocalDuckDBSink(path)
    sink.open()
    sink.write_records([record(0)])
    sink.close()


def test_a_spill_with_rows_the_store_refuses_is_replayed_once_and_the_rest_stored(
    tmp_path: Path,
) -> None:
    """A spill line that is JSON but not an object, one with a NaN literal (Python's json reads
    it), a NULL in a NOT NULL column, and two copies of an id whose first is bad: the good rows
    are stored, each bad one lands in the rejected file with its reason, and the next start has
    nothing left to replay (before: the writer thread died at every start; second attack)."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    good = [to_row(record(i)) for i in range(4)]
    bad_null = good[1] | {"agent_id": None}
    lines = [
        json.dumps(good[0]),
        json.dumps(bad_null),  # sess:1, bad first copy
        "42",
        json.dumps(good[2] | {"portfolio_value": float("nan")}),  # NaN literal
        json.dumps(good[1]),  # sess:1 again, good
        json.dumps(good[3]),
    ]
    sink = LocalDuckDBSink(tmp_path / "f.duckdb")
    (spill_dir / "spill-local.jsonl").write_text("".join(x + "\n" for x in lines))
    w = DecisionWriter(sink, spill_dir=spill_dir, retry=FAST)
    w.start()
    stats = w.stop(WAIT_S)
    assert w.failure is None
    assert stored(sink.path) == [0, 1, 3]
    kept = [json.loads(x) for x in w.rejected_path.read_text().splitlines()]
    assert sorted(k["row"]["decision_id"] for k in kept) == ["sess:1", "sess:2"]
    assert any("NOT NULL" in k["reason"] for k in kept)
    assert math.isnan(
        next(k for k in kept if k["row"]["decision_id"] == "sess:2")["row"]["portfolio_value"]
    )
    assert stats.replayed == 3 and stats.earlier_rejected == 2
    assert stats.earlier_torn == 1  # the 42: skipped as a torn line
    assert not w.spill_path.exists() or not w.spill_path.read_text().strip()
    again = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=spill_dir, retry=FAST)
    again.start()
    after = again.stop(WAIT_S)
    assert (after.replayed, after.earlier_rejected, again.failure) == (0, 0, None)
    assert len(w.rejected_path.read_text().splitlines()) == 2


def test_a_batch_the_store_took_in_part_is_stored_once_and_its_bad_record_kept(
    tmp_path: Path,
) -> None:
    """A batch of wide decisions goes in two runs; the second fails on a bad record (a sink
    error, not an outage). What the first run stored is not spilled again (``is_stored``); the
    rest is spilled, replayed while the writer recovers: every good record stored once, the
    bad one rejected with its reason, the counts add up."""
    spill_dir = tmp_path / "spill"
    # 256 MiB: runs of ~200,000 reads (READS_PER_MB), 13 of these decisions a run
    sink = LocalDuckDBSink(tmp_path / "f.duckdb", memory_limit_mb=256)
    w = DecisionWriter(sink, spill_dir=spill_dir, retry=FAST, batch_size=30, queue_size=30)
    w.start()
    batch = [_wide(i, symbols=5000) for i in range(30)]
    batch[25] = batch[25]._replace(decision_point=None)  # NOT NULL in the table
    for r in batch:
        w.submit(r)
    stats = w.stop(WAIT_S)
    assert (stats.written, stats.spilled, stats.rejected, stats.lost) == (29, 0, 1, 0)
    with duckdb.connect(str(sink.path), read_only=True) as con:
        assert con.execute(
            "SELECT count(*), count(DISTINCT decision_id) FROM decisions"
        ).fetchall() == [(29, 29)]
    kept = [json.loads(x) for x in w.rejected_path.read_text().splitlines()]
    assert [k["row"]["decision_id"] for k in kept] == ["sess:None"]
    assert "NOT NULL" in kept[0]["reason"]


def test_sinks_opening_one_file_from_threads_at_once_all_open(tmp_path: Path) -> None:
    path = tmp_path / "t.duckdb"
    errors: list[BaseException] = []
    sinks = [LocalDuckDBSink(path) for _ in range(12)]
    go = threading.Barrier(len(sinks))

    def open_one(sink: LocalDuckDBSink) -> None:
        go.wait()
        try:
            sink.open()
        except BaseException as e:  # collected for the assert
            errors.append(e)

    threads = [threading.Thread(target=open_one, args=(s,)) for s in sinks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert errors == []
    for i, sink in enumerate(sinks):
        sink.write_records([record(i)])
        sink.close()
    assert stored(path) == list(range(12))


def test_two_names_of_one_file_share_one_database(tmp_path: Path) -> None:
    """A hard link is the same file under another name: both names share one database, so no
    write is lost at the close (second attack: two instances, one side's rows gone)."""
    import os

    from analyzers.sinks.duckdb import close_store, open_store

    path = tmp_path / "a.duckdb"
    first = open_store(path)
    first.execute("CREATE TABLE t AS SELECT 1 AS x")
    os.link(path, tmp_path / "b.duckdb")
    second = LocalDuckDBSink(tmp_path / "b.duckdb")
    second.open()
    second.write_records([record(1)])
    first.execute("INSERT INTO decisions SELECT * FROM decisions")  # a second copy of row 1
    assert first.execute("SELECT count(*) FROM decisions").fetchall() == [(2,)]  # one database
    close_store(first)
    second.close()
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchall() == [(2,)]


def test_incompatible_existing_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE decisions (decision_id VARCHAR, something INT)")
    from core.errors import SinkError

    # the difference named, not both lists
    with pytest.raises(
        SinkError, match=r"missing \['session_id', .*not in the schema \['something'\]"
    ):
        LocalDuckDBSink(path).open()


def test_a_default_batch_goes_straight_into_the_file(tmp_path: Path) -> None:
    """Why the local store's default batch is one row group (analyzers.config.LOCAL_BATCH_SIZE):
    DuckDB writes a commit of a whole row group into the database file, and logs a smaller one
    (to write it again at the next checkpoint). Checked on DuckDB itself, so an upgrade that
    changes it fails here."""
    from analyzers.config import LOCAL_BATCH_SIZE

    logs = {}
    for n in (LOCAL_BATCH_SIZE - 1, LOCAL_BATCH_SIZE):
        path = tmp_path / f"s{n}.duckdb"
        sink = LocalDuckDBSink(path)
        sink.open()
        sink.write_records([record(i) for i in range(n)])
        wal = path.with_name(path.name + ".wal")
        logs[n] = wal.stat().st_size if wal.exists() else 0
        sink.close()
        with duckdb.connect(str(path), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM decisions").fetchall() == [(n,)]
    assert logs[LOCAL_BATCH_SIZE - 1] > 100_000  # the rows themselves, logged
    assert logs[LOCAL_BATCH_SIZE] < logs[LOCAL_BATCH_SIZE - 1] / 10, logs


@pytest.mark.parametrize("reads", [98, 190])
def test_a_row_group_of_read_heavy_decisions_goes_in_whole(tmp_path: Path, reads: int) -> None:
    """A default batch of decisions of ~100-190 reads (an agent reading a 30-bar window of a
    few feeds) is written as one statement of one row group, straight into the file: the
    statement bound (READS_PER_MB at the default memory limit) holds a row group of them. At
    390 a MiB the writer cut such a batch at 2,017-2,037 records, each write logged first and
    written again at the next checkpoint (twice the writer's time: docs/benchmarks.md,
    twenty-seventh pass)."""
    from analyzers.config import LOCAL_BATCH_SIZE
    from analyzers.schema import Access, DataAccess

    sink, clock = Flaky(tmp_path / "h.duckdb"), FakeClock()
    w = writer(sink, tmp_path, clock, batch_size=LOCAL_BATCH_SIZE, flush_interval_s=60.0)
    w.start()
    accesses = tuple(
        Access(s, "close", -s, 1, 99 - s, "h", 10.0 + s, None, False) for s in range(reads)
    )
    access = (DataAccess("GOOG", "h", ("close",), accesses),)
    for i in range(LOCAL_BATCH_SIZE):
        w.submit(record(i)._replace(data_accessed=access, reads=reads))
    assert w.flush(WAIT_S)  # nothing else waits: the full batch's write is done
    assert sink.calls == [LOCAL_BATCH_SIZE]
    assert w.batch_reads == sink.run_reads >= LOCAL_BATCH_SIZE * reads
    log = _wal_bytes(sink.path)  # before stop(): its close checkpoints whatever was logged
    assert log < 100_000, log
    assert w.stop().written == LOCAL_BATCH_SIZE
    assert stored(sink.path) == list(range(LOCAL_BATCH_SIZE))


class _LogAfterWrites(LocalDuckDBSink):
    """The local sink, noting the size of DuckDB's log after each write (writer thread)."""

    def __init__(self, path: Path, finishing: bool) -> None:
        super().__init__(path)
        self.logs: list[tuple[int, int]] = []
        if not finishing:
            self.finishing = None  # type: ignore[assignment,method-assign]  # the control

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        out = super().write_records(records)
        self.logs.append((len(records), _wal_bytes(self.path)))
        return out


@pytest.mark.parametrize("finishing", [True, False], ids=["finishing", "without (control)"])
def test_the_last_partial_batch_is_not_logged_first(tmp_path: Path, finishing: bool) -> None:
    """At stop(), the sink is told the writes are its last (``finishing``): the run's last
    batch, a part of a row group, goes into the file at its commit instead of into DuckDB's
    log, to be written again by the close's checkpoint. The control, without the call, logs
    it. Every decision is stored either way."""
    from analyzers.schema import Access, DataAccess

    accesses = tuple(
        Access(s, "close", -s, 1, 99 - s, "h", 10.0 + s, None, False) for s in range(60)
    )
    access = (DataAccess("GOOG", "h", ("close",), accesses),)
    sink = _LogAfterWrites(tmp_path / "t.duckdb", finishing)
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", retry=FAST, batch_size=2048)
    w.start()
    for i in range(2048 + 935):
        w.submit(record(i)._replace(data_accessed=access, reads=60))
    assert w.stop().written == 2048 + 935
    assert [n for n, _ in sink.logs] == [2048, 935]
    tail_log = sink.logs[-1][1]
    if finishing:
        assert tail_log < 100_000, sink.logs
    else:
        assert tail_log > 1_000_000, sink.logs
    assert stored(sink.path) == list(range(2048 + 935))


@pytest.mark.parametrize("shared", [False, True], ids=["alone", "shared"])
def test_finishing_commits_into_the_file_and_sets_the_log_back(
    tmp_path: Path, shared: bool
) -> None:
    """After ``finishing()``, a partial row group of read-heavy decisions is committed into
    the file (DuckDB's log stays small) and the store's log threshold is set back after the
    commit, the configured one or DuckDB's. A file shared with another sink (a study's store
    and a recorder) is left as it is: its commits are logged as before."""
    from analyzers.schema import Access, DataAccess

    accesses = tuple(
        Access(s, "close", -s, 1, 99 - s, "h", 10.0 + s, None, False) for s in range(60)
    )
    access = (DataAccess("GOOG", "h", ("close",), accesses),)
    path = tmp_path / "f.duckdb"
    sink = LocalDuckDBSink(path, wal_checkpoint_bytes=None if shared else 8 * 1024 * 1024)
    sink.open()
    other = LocalDuckDBSink(path) if shared else None
    if other is not None:
        other.open()
    assert sink._con is not None

    def setting() -> Any:
        return sink._con.execute("SELECT current_setting('wal_autocheckpoint')").fetchall()

    before = setting()
    sink.finishing()
    assert sink.write_records([record(i)._replace(data_accessed=access, reads=60)
                               for i in range(935)]) == []  # fmt: skip
    assert setting() == before
    if shared:
        assert _wal_bytes(path) > 1_000_000  # logged, as without finishing()
    else:
        assert _wal_bytes(path) < 100_000
    if other is not None:
        other.close()
    sink.close()
    assert stored(path) == list(range(935))


def test_a_sink_opening_the_file_during_a_finishing_write_keeps_its_setting(
    tmp_path: Path,
) -> None:
    """helper-97: sink A, finishing and the file's only user when its write began, switched
    the log setting around every run of that write; sink B, opening the same file from
    another thread meanwhile, found one byte and then DuckDB's default instead of its own.
    B's open now waits for A's run in progress, and A's later runs see a shared file."""
    import threading

    path = tmp_path / "s.duckdb"
    a = LocalDuckDBSink(path, memory_limit_mb=64)
    a.open()
    a.finishing()
    b = LocalDuckDBSink(path, wal_checkpoint_bytes=4 << 20)
    seen: list[str] = []

    def setting() -> str:
        return str(b._con.execute("SELECT current_setting('wal_autocheckpoint')").fetchall()[0][0])

    def open_b() -> None:
        time.sleep(0.3)
        b.open()
        for _ in range(20):
            seen.append(setting())
            time.sleep(0.02)

    batch = [_wide(i, symbols=1000) for i in range(120)]  # several runs at 64 MiB: seconds
    th = threading.Thread(target=open_b)
    th.start()
    assert a.write_records(batch) == []
    th.join()
    try:
        assert set(seen) == {"4.0 MiB"}, seen
        assert setting() == "4.0 MiB"
    finally:
        b.close()
        a.close()
    assert stored(path) == list(range(120))


def test_a_sink_opened_again_forgets_finishing(tmp_path: Path) -> None:
    sink = LocalDuckDBSink(tmp_path / "a.duckdb")
    sink.open()
    sink.finishing()
    sink.close()
    sink.open()
    assert sink._finishing is False
    sink.close()


@pytest.mark.parametrize("table", ["decisions", "my decisions"])
def test_the_column_check_reads_the_store_s_own_table(tmp_path: Path, table: str) -> None:
    """The check at open() names the table's columns in order: a store reopened passes; the
    same columns in another order do not."""
    from core.errors import SinkError

    path = tmp_path / "s.duckdb"
    sink = LocalDuckDBSink(path, table=table)
    sink.open()
    sink.write_records([record(1)])
    sink.close()
    again = LocalDuckDBSink(path, table=table)
    again.open()  # the table it made itself
    again.close()
    swapped = tmp_path / "swapped.duckdb"
    names = [f.name for f in DECISION_SCHEMA]
    with duckdb.connect(str(path), read_only=True) as src:
        types = dict(
            src.execute(f"SELECT name, type FROM pragma_table_info('\"{table}\"')").fetchall()
        )
    cols = ", ".join(f'"{n}" {types[n]}' for n in [names[1], names[0], *names[2:]])
    with duckdb.connect(str(swapped)) as con:
        con.execute(f'CREATE TABLE "{table}" ({cols})')
    with pytest.raises(SinkError, match=r"another order \(session_id where decision_id belongs"):
        LocalDuckDBSink(swapped, table=table).open()


@pytest.mark.parametrize(
    ("column", "other"),
    [
        ("reads", "VARCHAR"),  # a scalar of another type
        ("ts", "TIMESTAMP"),  # without the time zone
        ("notes", "VARCHAR[]"),  # a list where a scalar belongs
        ("data_accessed", None),  # a nested struct without one of its fields
    ],
)
def test_a_table_with_the_right_names_and_other_types_is_refused(
    tmp_path: Path, column: str, other: str | None
) -> None:
    """Right names, wrong type: refused at open() by a SinkError naming the column, its type
    and the expected one (not DuckDB's binder error from the first insert), and the file is
    left as it was."""
    from analyzers.schema import duckdb_columns
    from core.errors import SinkError

    cols = dict(duckdb_columns())
    if other is None:
        other = cols[column].replace(', "data_hash" VARCHAR', "")
        assert other != cols[column]
    cols[column] = other
    path = tmp_path / "typed.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(
            "CREATE TABLE decisions (" + ", ".join(f'"{n}" {t}' for n, t in cols.items()) + ")"
        )
    with pytest.raises(SinkError, match=rf"other column types: {column} is .*, expected") as err:
        LocalDuckDBSink(path).open()
    assert "Binder" not in str(err.value)
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchall() == [(0,)]
    again = LocalDuckDBSink(tmp_path / "fresh.duckdb")  # the types asked once still hold
    again.open()
    again.write_records([record(1)])
    again.close()


@pytest.mark.parametrize(
    ("column", "suffix", "refused"),
    [
        ("reads", "CHECK (reads > 1000000)", "CHECK on reads"),
        ("reasoning", "NOT NULL", "NOT NULL on reasoning"),  # nullable in the schema
        ("session_id", "UNIQUE", "UNIQUE on session_id"),  # one run has many decisions
        ("decision_id", "PRIMARY KEY", None),  # unique anyway
        ("reads", "DEFAULT 0", None),
    ],
)
def test_constraints_valid_records_can_break_are_refused_at_open(
    tmp_path: Path, column: str, suffix: str, refused: str | None
) -> None:
    """Right columns and types, plus a constraint: one a valid record can break is refused at
    open() (it passed, and the run went on with most records spilled and rejected); the
    schema's own NOT NULLs, a key on decision_id and a DEFAULT are not."""
    from analyzers.schema import duckdb_columns
    from core.errors import SinkError

    path = tmp_path / "c.duckdb"
    cols = ", ".join(
        f'"{n}" {t}' + (f" {suffix}" if n == column else "") for n, t in duckdb_columns()
    )
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE TABLE decisions ({cols})")
    sink = LocalDuckDBSink(path)
    if refused:
        with pytest.raises(SinkError, match=f"constraints valid records can break: .*{refused}"):
            sink.open()
        return
    sink.open()
    sink.write_records([record(1), record(2)])
    sink.close()


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ('CREATE UNIQUE INDEX ux ON decisions("session_id")', "UNIQUE INDEX ux"),
        ('CREATE UNIQUE INDEX ue ON decisions(("agent_id" || "mode"))', "UNIQUE INDEX ue"),
        ('CREATE UNIQUE INDEX ok ON decisions("decision_id")', None),
        ('CREATE INDEX plain ON decisions("session_id")', None),
        ("CREATE TABLE other (v INT CHECK (v > 0))", None),  # another table's constraint
    ],
)
def test_indexes_and_other_tables_at_open(tmp_path: Path, extra: str, refused: str | None) -> None:
    """A unique index on other columns than decision_id is a constraint records break (not
    listed by duckdb_constraints(): found by a fresh-context attack); another table's CHECK is
    not this table's, even with a macro named lower in the file."""
    from analyzers.schema import duckdb_columns
    from core.errors import SinkError

    path = tmp_path / "i.duckdb"
    cols = ", ".join(f'"{n}" {t}' for n, t in duckdb_columns())
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE TABLE decisions ({cols})")
        con.execute(extra)
        con.execute("CREATE MACRO lower(x) AS 'zz'")
    sink = LocalDuckDBSink(path)
    if refused:
        with pytest.raises(SinkError, match=refused):
            sink.open()
        return
    sink.open()
    sink.write_records([record(1), record(2)])
    sink.close()


def test_a_generated_column_and_a_view_behind_a_lower_macro_are_refused(tmp_path: Path) -> None:
    """A generated column reads as the schema's type but takes no value (the insert failed
    with a BinderException); a view named decisions was taken for the table when the file
    held a macro named lower (the check's own lower() was the file's)."""
    from analyzers.schema import duckdb_columns
    from core.errors import SinkError

    cols = [f'"{n}" {t}' for n, t in duckdb_columns()]
    gen = tmp_path / "gen.duckdb"
    with duckdb.connect(str(gen)) as con:
        con.execute(
            "CREATE TABLE decisions ("
            + ", ".join(
                c
                if not c.startswith('"confidence"')
                else '"confidence" DOUBLE GENERATED ALWAYS AS (1.5)'
                for c in cols
            )
            + ")"
        )
    with pytest.raises(SinkError, match="generated column"):
        LocalDuckDBSink(gen).open()
    view = tmp_path / "view.duckdb"
    with duckdb.connect(str(view)) as con:
        con.execute(f"CREATE TABLE real ({', '.join(cols)})")
        con.execute("CREATE VIEW decisions AS SELECT * FROM real")
        con.execute("CREATE MACRO lower(x) AS 'zz'")
    with pytest.raises(SinkError, match="decisions is not a table"):
        LocalDuckDBSink(view).open()


@pytest.mark.parametrize("table", ['x""y', 'we"ird', "", "tab\tle"])
def test_a_table_name_the_statements_cannot_quote_is_refused(tmp_path: Path, table: str) -> None:
    """The check quoted the name one way and the inserts another (x""y checked, x"y written):
    names with a double quote or unprintable characters are refused before any file exists."""
    with pytest.raises(ConfigError, match="table must be a printable name"):
        LocalDuckDBSink(tmp_path / "q.duckdb", table=table)
    assert not (tmp_path / "q.duckdb").exists()


def test_a_view_of_the_store_s_name_is_refused_at_open(tmp_path: Path) -> None:
    """A view named ``decisions`` with the schema's very columns is not a table to insert
    into: refused at open() with a SinkError that says so (it passed the column check and
    failed the first write with DuckDB's "is not an table")."""
    from analyzers.schema import duckdb_columns
    from core.errors import SinkError

    path = tmp_path / "view.duckdb"
    cols = ", ".join(f'"{n}" {t}' for n, t in duckdb_columns())
    with duckdb.connect(str(path)) as con:
        con.execute(f"CREATE TABLE base ({cols})")
        con.execute("CREATE VIEW decisions AS SELECT * FROM base")
    with pytest.raises(SinkError, match="decisions is not a table"):
        LocalDuckDBSink(path).open()


def test_the_file_s_macros_do_not_stand_in_for_duckdb_s_functions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Macros stored in the file named ``typeof`` and ``pragma_table_info`` (a user's, or an
    old tool's) neither make a wrong table pass nor a right one fail: the check calls
    DuckDB's own (``system.main``); the expected types are asked anew here (once a process)."""
    import analyzers.sinks.duckdb as store
    from analyzers.schema import duckdb_columns
    from core.errors import SinkError

    monkeypatch.setattr(store, "_EXPECTED_TYPES", [])
    macros = (
        "CREATE MACRO typeof(x) AS 'VARCHAR'",
        "CREATE MACRO pragma_table_info(x) AS TABLE "
        + " UNION ALL ".join(
            f"SELECT {i} AS cid, '{n}' AS name, '{t}' AS type"
            for i, (n, t) in enumerate(duckdb_columns())
        ),
    )
    for name, reads_type in (("wrong", "VARCHAR"), ("right", "BIGINT")):
        path = tmp_path / f"{name}.duckdb"
        cols = ", ".join(f'"{n}" {reads_type if n == "reads" else t}' for n, t in duckdb_columns())
        with duckdb.connect(str(path)) as con:
            for m in macros:
                con.execute(m)
            con.execute(f"CREATE TABLE decisions ({cols})")
        sink = LocalDuckDBSink(path)
        if name == "wrong":
            with pytest.raises(SinkError, match="reads is VARCHAR, expected BIGINT"):
                sink.open()
        else:
            sink.open()
            sink.write_records([record(1)])
            sink.close()
    assert "BIGINT" in store._EXPECTED_TYPES


# ---------------------------------------------------------------------------------------------
# The spill queue
# ---------------------------------------------------------------------------------------------

_QUEUE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 7)),
        st.tuples(st.just("consume"), st.integers(1, 6)),
        st.tuples(st.just("keep_some"), st.integers(1, 6)),  # a head partly stored
        st.tuples(st.just("reopen"), st.just(0)),  # another process opens the same file
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(ops=_QUEUE_OPS)
def test_the_spill_file_is_a_queue_that_survives_reopening(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spill-x.jsonl"
        spill, model, counter = SpillFile(path), [], 0
        for op, n in ops:
            if op == "append":
                rows = [{"decision_id": f"d{counter + k}"} for k in range(n)]
                counter += n
                if rows:
                    spill.append(rows)
                model += rows
            elif op == "consume":
                head = spill.head(n)
                assert head.rows == model[:n]
                spill.consume(head)
                model = model[len(head.rows) :]
            elif op == "keep_some":
                head = spill.head(n)
                keep = head.rows[1::2]  # every other row was stored
                spill.replace_head(head, keep)
                model = keep + model[len(head.rows) :]
            else:
                spill = SpillFile(path)
            assert spill.pending() == len(model)
            assert spill.read() == model
            assert spill.exists() == bool(model) or (spill.exists() and not model)
        assert SpillFile(path).read() == model


def test_a_line_torn_by_a_crash_is_skipped_and_the_next_rows_kept(tmp_path: Path) -> None:
    path = tmp_path / "spill-x.jsonl"
    SpillFile(path).append([{"decision_id": "a"}, {"decision_id": "b"}])
    with open(path, "a", encoding="utf-8") as f:
        f.write('{"decision_id": "c", "val')  # the process died inside this append
    later = SpillFile(path)
    later.append([{"decision_id": "d"}])
    assert [r["decision_id"] for r in later.read()] == ["a", "b", "d"]
    head = later.head(10)
    assert head.lines == 4 and len(head.rows) == 3
    later.consume(head)
    assert not path.exists() and later.pending() == 0


# ---------------------------------------------------------------------------------------------
# Counts: every record ends written, spilled or rejected; nothing stored twice
# ---------------------------------------------------------------------------------------------


class Store:
    """Stored rows, duplicates kept (the BigQuery emulator does not de-duplicate insert ids), so
    a row sent twice shows."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.lock = threading.Lock()

    def ids(self) -> list[str]:
        with self.lock:
            return [str(r["decision_id"]) for r in self.rows]


class MemorySink:
    """A sink over a :class:`Store` with the BigQuery sink's contract: it skips rows it stored
    already (``is_stored``), looks up rows of an earlier run's spill (``before_replay``), refuses
    for good every decision whose point is 3 mod 7; it can be down (TransientError) or fail
    part-way (stores ``partial`` rows of a write, then raises TransientError, as a write split
    into several requests does when one of them fails)."""

    name = "mem"

    def __init__(self, store: Store, clock: FakeClock | None = None, write_s: float = 0.0) -> None:
        self.store = store
        self.down = False
        self.partial: int | None = None
        self.confirmed: set[str] = set()
        self.uncertain: set[str] = set()
        self.clock, self.write_s = clock, write_s

    def open(self) -> None:
        if self.down:
            raise TransientError("connection refused")

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        if self.clock is not None:
            self.clock.now += self.write_s  # a write that takes write_s seconds
        if self.down:
            raise TransientError("503 backend unavailable")
        errors, sent = [], 0
        for i, row in enumerate(rows):
            did = str(row["decision_id"])
            if did in self.uncertain:
                self.uncertain.discard(did)
                if did in self.store.ids():
                    self.confirmed.add(did)
            if did in self.confirmed:
                continue
            if int(row["decision_point"]) % 7 == 3:
                errors.append(RowError(i, "portfolio_value: bad value"))
                continue
            if self.partial is not None and sent >= self.partial:
                raise TransientError("1 of 2 requests failed")
            with self.store.lock:
                self.store.rows.append(row)
            self.confirmed.add(did)
            sent += 1
        return errors

    def is_stored(self, decision_id: object) -> bool:
        return decision_id in self.confirmed

    def before_replay(self, rows: Sequence[Row]) -> None:
        self.uncertain.update(str(r["decision_id"]) for r in rows)

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "memory"

    def example_query(self) -> str:
        return ""


Step = tuple[int, bool, int | None, bool, bool]
_STEPS = st.lists(
    st.tuples(
        st.integers(0, 9),  # records submitted
        st.booleans(),  # sink down during the step
        st.one_of(st.none(), st.integers(0, 3)),  # fails part-way after this many rows
        st.booleans(),  # flush
        st.booleans(),  # the probe interval passes
    ),
    min_size=1,
    max_size=8,
)


def _check_run(
    stats: WriterStats, w: DecisionWriter, store: Store, mine: set[str], earlier: set[str]
) -> None:
    stored = store.ids()
    assert len(stored) == len(set(stored)), "a decision was stored twice"
    in_spill = [str(r["decision_id"]) for r in SpillFile(w.spill_path).read()]
    assert len(in_spill) == len(set(in_spill)) == stats.in_spill
    rejected = set()
    if w.rejected_path.exists():
        rejected = {
            json.loads(x)["row"]["decision_id"] for x in w.rejected_path.read_text().splitlines()
        }
    assert stats.written + stats.spilled + stats.rejected == stats.submitted == len(mine)
    assert len(mine & set(stored)) == stats.written
    assert len(mine & set(in_spill)) == stats.spilled
    assert len(mine & rejected) == stats.rejected
    assert len(earlier & set(stored)) == stats.replayed
    assert len(earlier & set(in_spill)) == stats.earlier_left
    assert len(earlier & rejected) == stats.earlier_rejected
    assert set(in_spill).isdisjoint(stored) and set(in_spill).isdisjoint(rejected)


def _run(steps: list[Step], store: Store, spill: Path, session: str, final_down: bool) -> set[str]:
    clock = FakeClock()
    sink = MemorySink(store)
    w = DecisionWriter(
        sink,
        batch_size=4,
        flush_interval_s=1.0,
        probe_interval_s=5.0,
        max_batch=6,
        spill_dir=spill,
        retry=FAST,
        clock=clock,
        wait=clock.wait,
    )
    earlier = {str(r["decision_id"]) for r in SpillFile(w.spill_path).read()}
    sink.down = steps[0][1]
    w.start()
    mine, n = set(), 0
    for count, down, partial, flush, probe in steps:
        sink.down, sink.partial = down, partial
        for _ in range(count):
            rec = record(n)._replace(run=RUN._replace(session_id=session))
            mine.add(rec.decision_id)
            w.submit(rec)
            n += 1
        if flush:
            assert w.flush(WAIT_S)
        if probe:
            clock.advance(5.0)
    sink.down, sink.partial = final_down, None
    stats = stop_while_time_passes(w, clock)
    _check_run(stats, w, store, mine, earlier)
    return mine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(first=_STEPS, second=_STEPS, down_at_end=st.booleans())
def test_every_record_ends_written_spilled_or_rejected_and_is_stored_once(
    first: list[Step], second: list[Step], down_at_end: bool
) -> None:
    """Two runs through random outages, partial failures and probes, the second starting with
    what the first left in the spill file, and a third that only drains: the counts add up
    after each run and every decision is stored at most once (exactly once at the end, unless
    refused)."""
    store = Store()
    with tempfile.TemporaryDirectory() as tmp:
        spill = Path(tmp)
        a = _run(first, store, spill, "s1", down_at_end)
        b = _run(second, store, spill, "s2", down_at_end)
        _run([(0, False, None, False, False)], store, spill, "s3", False)
        assert not SpillFile(spill / "spill-mem.jsonl").exists()
        refused = {d for d in a | b if int(d.rsplit(":", 1)[1]) % 7 == 3}
        assert sorted(store.ids()) == sorted((a | b) - refused)


def test_a_stop_keeps_what_it_could_not_drain_and_counts_it(tmp_path: Path) -> None:
    """Each write takes 3 s (of the fake clock): a stop with a 10 s budget drains until 8 s are
    used, keeps the rest (earlier rows first, then this run's) and says how many."""
    store = Store()
    spill = tmp_path / "spill"
    earlier = [to_row(record(i)._replace(run=RUN._replace(session_id="old"))) for i in range(40)]
    SpillFile(spill / "spill-mem.jsonl").append(earlier)
    clock = FakeClock()
    sink = MemorySink(store, clock, write_s=3.0)
    sink.down = True  # down at start: this run's records queue behind the earlier ones
    w = DecisionWriter(
        sink,
        batch_size=5,
        max_batch=5,
        spill_dir=spill,
        retry=FAST,
        clock=clock,
        wait=clock.wait,
    )
    w.start()
    for i in range(12):
        w.submit(record(i))
    assert w.flush(WAIT_S) and w.stats.spilled == 12
    sink.down = False
    stats = w.stop(timeout_s=10.0)  # drains writes at clock 0, 3, 6; at 9 the 8 s are used
    drained = [r["decision_id"] for r in earlier[:15] if r["decision_point"] % 7 != 3]
    assert store.ids() == drained and stats.replayed == 13  # 3 and 10 were refused
    assert stats.earlier_rejected == 2 and stats.earlier_left == 40 - 15
    assert (stats.written, stats.spilled) == (0, 12)
    assert SpillFile(w.spill_path).pending() == stats.in_spill == 25 + 12
    # the next start drains the rest, earlier rows first, each once
    later = MemorySink(store)
    w2 = DecisionWriter(later, spill_dir=spill, retry=FAST)
    w2.start()
    stats2 = w2.stop(WAIT_S)
    assert stats2.replayed + stats2.earlier_rejected == 37 and not w2.spill_path.exists()
    assert len(store.ids()) == len(set(store.ids())) == 40 + 12 - 6 - 2


def test_the_local_store_writes_an_id_repeated_in_one_write_once(tmp_path: Path) -> None:
    """A journal and a spill can hold the same decision after a crash; drained together, one
    write carries it twice."""
    sink = LocalDuckDBSink(tmp_path / "d.duckdb")
    sink.open()
    rows = [to_row(record(i)) for i in (0, 1, 0, 2, 1)]
    assert sink.write(rows) == []
    bad = dict(to_row(record(3)), portfolio_value="lots")
    errors = sink.write([bad, to_row(record(4)), bad])
    assert [e.index for e in errors] == [0, 2]
    sink.close()
    assert stored(sink.path) == [0, 1, 2, 4]


def test_a_stuck_write_is_taken_over_by_stop_and_counted_once(tmp_path: Path) -> None:
    """The sink hangs in a write past the stop's budget: stop() spills the batch in flight and
    the buffer itself; when the hung write returns later, it changes no count and no file."""
    sink = Flaky(tmp_path / "f.duckdb")
    sink.gate.clear()
    w = DecisionWriter(sink, batch_size=4, spill_dir=tmp_path / "spill", retry=FAST, max_batch=4)
    w.start()
    for i in range(10):
        w.submit(record(i))
    stats = w.stop(timeout_s=0.3)  # the thread is stuck in its first write of 4
    assert (stats.written, stats.spilled, stats.rejected) == (0, 10, 0)
    assert stats.unsure_in_spill == 4  # the write in flight may yet land: said, not hidden
    assert w.stop(timeout_s=0.1).spilled == 10  # a second stop() spills nothing again
    sink.gate.set()  # the hung write goes through now...
    assert sink.wait_calls(1) == [4]
    w._thread.join(WAIT_S)  # type: ignore[union-attr]
    assert (w.stats.written, w.stats.spilled) == (0, 10)  # ...and is not counted
    spilled = [r["decision_point"] for r in SpillFile(w.spill_path).read()]
    assert spilled == list(range(10))


def test_a_stuck_replay_of_an_earlier_spill_is_named_in_doubt(tmp_path: Path) -> None:
    """Found by the attack on issue 17: the stop took over while the start-up replay of an
    earlier run's spill was in flight; those rows were stored later, yet the report said none
    was in doubt. A replay in flight now counts as a write in flight."""
    earlier = SpillFile(tmp_path / "spill" / "spill-local.jsonl")
    earlier.append([to_row(record(i)) for i in range(6)])
    sink = Flaky(tmp_path / "f.duckdb")
    sink.gate.clear()  # the replay hangs in the store
    w = DecisionWriter(sink, batch_size=4, spill_dir=tmp_path / "spill", retry=FAST, max_batch=4)
    w.start()
    stats = w.stop(timeout_s=0.3)
    assert stats.earlier_left == 6 and stats.unsure_in_spill == 4  # the replay write of 4
    sink.gate.set()
    w._thread.join(WAIT_S)  # type: ignore[union-attr]


def test_a_spill_meant_for_another_store_is_refused_at_start(tmp_path: Path) -> None:
    """Found by the attack on issue 17: a run with another FMEL_DATASET replayed an earlier
    run's spill into its own dataset. The spill remembers its destination."""
    spill_dir = tmp_path / "spill"
    first = DecisionWriter(Flaky(tmp_path / "a.duckdb"), spill_dir=spill_dir, retry=FAST)
    first.start()  # notes its destination beside the spill
    first.stop()
    SpillFile(spill_dir / "spill-local.jsonl").append([to_row(record(i)) for i in range(3)])
    other = DecisionWriter(Flaky(tmp_path / "b.duckdb"), spill_dir=spill_dir, retry=FAST)
    with pytest.raises(ConfigError, match=r"3 decision records .* are for duckdb:.*a\.duckdb"):
        other.start()
    same = DecisionWriter(Flaky(tmp_path / "a.duckdb"), spill_dir=spill_dir, retry=FAST)
    same.start()
    assert same.stop().replayed == 3 and stored(tmp_path / "a.duckdb") == [0, 1, 2]


def test_a_stopping_writer_retries_until_its_budget_is_spent(tmp_path: Path) -> None:
    """Finding 2 of issue 17: at stop the sink is down and comes back 4 s (fake clock) later;
    the writer keeps retrying with backoff within 80 % of the 10 s budget and writes it all,
    instead of one attempt and a spill."""
    store, clock = Store(), FakeClock()
    sink = MemorySink(store)
    sink.down = True
    w = DecisionWriter(
        sink,
        batch_size=100,
        flush_interval_s=60.0,
        probe_interval_s=60.0,
        spill_dir=tmp_path,
        retry=FAST,
        clock=clock,
        wait=clock.wait,
    )
    w.start()
    for i in range(1, 11):
        w.submit(record(i * 7 + 1))  # none refused (decision_point % 7 == 3 is)

    def back_at_4s(now: float) -> None:
        if now >= 4.0:
            sink.down = False

    stats = stop_while_time_passes(w, clock, back_at_4s, timeout_s=10.0)
    assert (stats.written, stats.spilled, stats.in_spill) == (10, 0, 0)
    assert len(store.ids()) == 10 and not w.spill_path.exists()


def test_a_stopping_writer_gives_up_at_its_deadline_and_keeps_the_rest(tmp_path: Path) -> None:
    """The sink stays down: the retries end once 80 % of the budget is spent, rows in the spill."""
    store, clock = Store(), FakeClock()
    sink = MemorySink(store)
    sink.down = True
    tried_at: list[float] = []
    write, open_ = sink.write, sink.open

    def timed_write(rows: Sequence[Row]) -> list[RowError]:
        tried_at.append(clock.now)
        return write(rows)

    def timed_open() -> None:
        tried_at.append(clock.now)
        open_()

    sink.write, sink.open = timed_write, timed_open  # type: ignore[method-assign]
    w = DecisionWriter(sink, spill_dir=tmp_path, retry=FAST, clock=clock, wait=clock.wait)
    w.start()
    for i in range(1, 6):
        w.submit(record(i * 7 + 1))
    stats = stop_while_time_passes(w, clock, timeout_s=10.0)
    assert (stats.written, stats.spilled) == (0, 5)
    # Retried up to the deadline (8 s: 80 % of the budget), not past it. (The clock itself may
    # move once more after the last try: the ticker does not know the writer gave up.)
    assert 7.0 <= tried_at[-1] <= 8.0 and len(tried_at) >= 5, str(tried_at)


def test_the_metrics_sum_holds_while_a_batch_is_in_flight(tmp_path: Path) -> None:
    """Finding 7 of issue 17: a write blocked in the sink holds its batch out of the buffer;
    the queued gauge counts it, so submitted = written + rejected + in_spill + queued."""
    from runtime.metrics import RunMetrics

    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path / "spill", clock, batch_size=4, flush_interval_s=60.0)
    m = RunMetrics()
    m.watch_writer(w)
    w.start()
    for i in range(4):
        w.submit(record(i))
    assert sink.wait_calls(1) == [4]
    sink.gate.clear()  # the next write blocks in the sink, its batch in flight
    for i in range(4, 8):
        w.submit(record(i))
    with w._cond:  # the writer took the batch out of the buffer (it notifies when it does)
        assert w._cond.wait_for(lambda: w.queue_depth == 0, WAIT_S)
    stats, waiting = w.snapshot()

    def gauge(name: str) -> float:
        value = m.value(f"runner_decision_records_{name}")
        assert value is not None
        return value

    assert stats.submitted == 8 and stats.written == 4 and waiting == 4
    assert gauge("queued") == 4
    total = gauge("written_total") + gauge("rejected_total") + gauge("in_spill") + gauge("queued")
    assert total == gauge("submitted_total") == 8
    sink.gate.set()
    assert w.stop(WAIT_S).written == 8
    assert gauge("queued") == 0 and gauge("written_total") == 8


def test_running_writers_lower_the_switch_interval_and_the_last_puts_it_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a writer runs, the interpreter's switch interval is at most its
    ``switch_interval_s``; the last writer to stop restores what it was, unless someone else
    changed it meanwhile; ``None`` leaves it alone."""
    import sys

    from analyzers.sinks import writer as writer_module
    from analyzers.sinks.writer import SWITCH_INTERVAL_S

    # a holder of its own (a writer another test left running would hold the process's) and
    # the interpreter's default interval to start from
    monkeypatch.setattr(writer_module, "_SWITCH", writer_module._SwitchInterval())
    saved = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    try:
        _check_switch_interval(tmp_path, SWITCH_INTERVAL_S)
        _check_switch_interval_races(tmp_path, SWITCH_INTERVAL_S)
    finally:
        sys.setswitchinterval(saved)


def _check_switch_interval_races(tmp_path: Path, lowered: float) -> None:
    """Cases a fresh-context attack found: someone's setting made between two writers'
    starts; two stop() of one writer racing; a stop() that comes before start() holds."""
    import sys

    from analyzers.sinks import writer as writer_module

    before = sys.getswitchinterval()
    clock = FakeClock()
    a = writer(Flaky(tmp_path / "ra.duckdb"), tmp_path / "ra", clock)
    a.start()
    sys.setswitchinterval(0.001)  # someone else's, while a runs
    b = writer(Flaky(tmp_path / "rb.duckdb"), tmp_path / "rb", clock)
    b.start()
    assert sys.getswitchinterval() == pytest.approx(lowered)
    a.stop()
    b.stop()
    assert sys.getswitchinterval() == pytest.approx(0.001)  # theirs, not the one a found
    sys.setswitchinterval(before)

    # one writer stopped from two threads at once while another runs: its hold goes once
    keep = writer(Flaky(tmp_path / "rk.duckdb"), tmp_path / "rk", clock)
    keep.start()
    c = writer(Flaky(tmp_path / "rc.duckdb"), tmp_path / "rc", clock)
    c.start()
    go = threading.Barrier(2)
    threads = [threading.Thread(target=lambda: (go.wait(), c.stop())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    c.stop()
    assert sys.getswitchinterval() == pytest.approx(lowered)  # keep still runs
    keep.stop()
    assert sys.getswitchinterval() == before
    assert not writer_module._SWITCH._holders

    # stop() before start(): the writer never holds it (and does not start after it)
    from core.errors import SinkError

    d = writer(Flaky(tmp_path / "rd.duckdb"), tmp_path / "rd", clock)
    d.stop()
    with pytest.raises(SinkError, match="was stopped"):
        d.start()
    assert sys.getswitchinterval() == before
    d.stop()
    assert not writer_module._SWITCH._holders


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "0.001", True])
def test_a_bad_switch_interval_or_queue_size_is_refused_before_anything_starts(
    tmp_path: Path, bad: Any
) -> None:
    import sys

    before = sys.getswitchinterval()
    with pytest.raises(ConfigError, match="switch_interval_s"):
        writer(Flaky(tmp_path / "f.duckdb"), tmp_path, FakeClock(), switch_interval_s=bad)
    with pytest.raises(ConfigError, match="queue_size"):
        writer(Flaky(tmp_path / "f.duckdb"), tmp_path, FakeClock(), queue_size=0)
    assert sys.getswitchinterval() == before


def test_a_full_batch_wakes_the_writer_when_another_thread_waits_on_its_condition(
    tmp_path: Path,
) -> None:
    """flush(), wait_durable() and wait_drained() wait on the writer's condition too; a full
    batch must wake the writer even when one of them waits ahead of it (a single notify woke
    the first waiter only: found by a fresh-context attack)."""
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path, clock, batch_size=5, flush_interval_s=60.0)
    w.start()
    waiting = clock.writer_asleep()
    other_in = threading.Event()

    def other() -> None:  # as wait_drained() does: a predicate that stays false here
        with w._cond:
            other_in.set()
            w._cond.wait_for(lambda: False, 3.0)

    threading.Thread(target=other, daemon=True).start()
    assert other_in.wait(WAIT_S)
    clock.advance(0.01)  # the writer wakes, finds nothing, waits again: behind `other`
    clock.writer_asleep(after=waiting)
    for i in range(5):
        w.submit(record(i))
    # FakeClock's wait also ends after 5 s of real time: well within that, or it was missed
    deadline = time.monotonic() + 2.0
    while not sink.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.calls == [5]
    w.stop()


def _check_switch_interval(tmp_path: Path, lowered: float) -> None:
    import sys

    before = sys.getswitchinterval()
    clock = FakeClock()
    a = writer(Flaky(tmp_path / "a.duckdb"), tmp_path / "a", clock)
    b = writer(Flaky(tmp_path / "b.duckdb"), tmp_path / "b", clock)
    a.start()
    assert sys.getswitchinterval() == pytest.approx(lowered)
    b.start()
    a.stop()
    assert sys.getswitchinterval() == pytest.approx(lowered)  # b still runs
    b.stop()
    b.stop()  # idempotent: no second restore
    assert sys.getswitchinterval() == before

    # someone else's setting, made while a writer ran, is theirs: left as they set it
    c = writer(Flaky(tmp_path / "c.duckdb"), tmp_path / "c", clock)
    c.start()
    sys.setswitchinterval(0.001)
    try:
        c.stop()
        assert sys.getswitchinterval() == pytest.approx(0.001)
    finally:
        sys.setswitchinterval(before)

    # None, or an interval above the current one: nothing changes
    d = writer(Flaky(tmp_path / "d.duckdb"), tmp_path / "d", clock, switch_interval_s=None)
    e = writer(Flaky(tmp_path / "e.duckdb"), tmp_path / "e", clock, switch_interval_s=1.0)
    d.start()
    e.start()
    assert sys.getswitchinterval() == before
    # a writer that asks for less than the one running: the lower one, restored at the end
    f = writer(Flaky(tmp_path / "f.duckdb"), tmp_path / "f", clock)
    f.start()
    assert sys.getswitchinterval() == pytest.approx(lowered)
    d.stop()
    e.stop()
    assert sys.getswitchinterval() == pytest.approx(lowered)  # f still runs
    f.stop()
    assert sys.getswitchinterval() == before


def test_a_record_submitted_after_stop_is_spilled_and_written_at_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing drains the queue once stop() has taken it over: a later submit() (a bar recorded
    while a signal's stop ran) goes to the spill file at once instead of a queue no one reads."""
    store = Store()
    spill = tmp_path / "spill"
    w = DecisionWriter(MemorySink(store), spill_dir=spill, retry=FAST, queue_size=2)
    w.start()
    w.submit(record(0))
    w.stop(WAIT_S)
    with caplog.at_level("WARNING", logger="analyzers.sinks.writer"):
        for i in (1, 2, 4, 5):  # past queue_size: must not block either
            w.submit(record(i))
    late = [r for r in caplog.records if "after the writer stopped" in r.getMessage()]
    assert len(late) == 1  # once, not per record
    assert (w.stats.submitted, w.stats.written, w.stats.spilled) == (5, 1, 4)
    assert SpillFile(w.spill_path).pending() == 4
    w2 = DecisionWriter(MemorySink(store), spill_dir=spill, retry=FAST)
    w2.start()
    assert w2.stop(WAIT_S).replayed == 4
    assert store.ids() == [record(i).decision_id for i in (0, 1, 2, 4, 5)]


def test_records_submitted_while_another_thread_stops_are_each_kept_once(tmp_path: Path) -> None:
    """Found by the attack on this change: a submit() that saw the writer open, then let the
    lock go, appended after stop() had taken the queue over: counted, never written or spilled
    (10 of 300 trials). The check and the append are now one locked step. Each trial: one
    thread submits 400 records while this one stops the writer somewhere in the middle;
    every record ends up stored or spilled, once, and the counts add up."""
    import random

    rng = random.Random(14)
    for trial in range(150):
        store = Store()
        w = DecisionWriter(
            MemorySink(store),
            spill_dir=tmp_path / f"spill{trial}",
            retry=FAST,
            batch_size=5,
            queue_size=rng.choice([3, 50, 10_000]),
        )
        w.start()
        go = threading.Event()

        def submit_all(w: DecisionWriter = w, go: threading.Event = go) -> None:
            go.wait()
            for i in range(400):
                w.submit(record(i))

        t = threading.Thread(target=submit_all)
        t.start()
        go.set()
        time.sleep(rng.random() * 0.01)
        w.stop(WAIT_S)
        t.join(WAIT_S)
        s = w.stats
        spilled = [r["decision_id"] for r in SpillFile(w.spill_path).read()]
        kept = store.ids() + spilled
        refused = sum(1 for i in range(400) if i % 7 == 3 and record(i).decision_id not in kept)
        assert (s.submitted, w.snapshot()[1]) == (400, 0), trial
        assert s.submitted == s.written + s.spilled + s.rejected + s.lost, trial
        assert len(kept) == len(set(kept)) == 400 - refused, trial


def test_a_late_record_that_is_not_json_is_counted_lost_not_raised(tmp_path: Path) -> None:
    w = DecisionWriter(MemorySink(Store()), spill_dir=tmp_path / "spill", retry=FAST)
    w.start()
    w.stop(WAIT_S)
    w.submit(dict(to_row(record(1)), portfolio_value=float("nan")))  # a raw row with NaN
    w.submit(record(2))
    s = w.stats
    assert (s.submitted, s.lost, s.spilled) == (2, 1, 1)
    assert "JSON" in s.lost_reason
    assert [r["decision_point"] for r in SpillFile(w.spill_path).read()] == [2]


_ARGUMENT_VALUES = st.one_of(
    st.integers(-3, 3),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.none(),
)


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(
        [
            "batch_size",
            "batch_reads",
            "queue_size",
            "max_batch",
            "flush_interval_s",
            "probe_interval_s",
            "replay_write_s",
        ]
    ),
    value=_ARGUMENT_VALUES,
)
def test_every_writer_argument_is_taken_exactly_or_refused(name: str, value: Any) -> None:
    """Any value of a size or interval argument is either taken as given or refused with a
    ConfigError naming it: never clamped (batch_size 0 became 1), never a TypeError from
    inside, never a thread that dies on its first record (flush_interval_s "1") or spins
    (flush_interval_s 0)."""
    whole = name in ("batch_size", "batch_reads", "queue_size", "max_batch")
    if value is None and name in ("batch_reads", "max_batch"):
        ok = True
    elif whole:
        ok = type(value) is int and value >= 1
    else:
        ok = type(value) in (int, float) and 0 < value < math.inf
    sink = LocalDuckDBSink(Path("unused.duckdb"))  # never opened
    kw: dict[str, Any] = {name: value}
    if name == "batch_size" and ok:
        kw["queue_size"] = max(10_000, value)
    if not ok:
        with pytest.raises(ConfigError, match=name):
            DecisionWriter(sink, spill_dir=Path("unused"), **kw)
        return
    w = DecisionWriter(sink, spill_dir=Path("unused"), **kw)
    if value is not None and name != "max_batch":
        assert getattr(w, name) == value


def test_a_spilled_batch_with_numpy_or_unwritable_values_loses_nothing(tmp_path: Path) -> None:
    # Found by an attack (helper-58): a numpy int in a record (an agent indexing with
    # np.int64) made the spill's json.dumps raise; stop() raised it and every record of the
    # run was gone (0 stored, an empty spill). numpy scalars are written as their values; a
    # row JSON has no form for is rejected (kept in the rejected file), the others spilled.
    import numpy as np

    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path / "spill", clock, batch_size=5, flush_interval_s=1.0)
    w.start()
    sink.down.set()
    for i in range(5):
        rec = record(i)
        if i == 1:
            rec = rec._replace(decision_point=np.int64(1), portfolio_value=np.float64(101.0))
        if i == 3:
            rec = rec._replace(portfolio_cash=object())  # no JSON for it
        w.submit(rec)
    assert w.flush(WAIT_S)
    rows = SpillFile(w.spill_path).read()
    assert [r["decision_point"] for r in rows] == [0, 1, 2, 4]
    assert rows[1]["portfolio_value"] == 101.0
    sink.down.clear()
    stats = w.stop()
    assert (stats.written, stats.spilled, stats.rejected, stats.lost) == (4, 0, 1, 0)
    assert stored(sink.path) == [0, 1, 2, 4]
    rejected = w.rejected_path.read_text()
    assert '"decision_point":3' in rejected and "not JSON" in rejected


_TEXTS = st.one_of(st.none(), st.text(max_size=300), st.integers())


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.one_of(st.integers(-3, 10**6), st.just(True), st.floats(0, 10)),  # reads
            _TEXTS,  # reasoning
            _TEXTS,  # notes
            st.sampled_from(["deferred", "resolved", "plain", "other run"]),
        ),
        max_size=30,
    ),
    params=st.one_of(st.none(), st.text(max_size=400)),
    most=st.integers(1, 10**7),
)
def test_a_batch_is_cut_into_runs_as_its_records_costs_say(
    rows: list[tuple[Any, Any, Any, str]], params: str | None, most: int
) -> None:
    """``record_runs`` (the local store's runs of a write) counts the usual batch (deferred
    records of one run) without Python per record, and gives exactly the runs the records'
    own costs give (``cut_runs`` of ``_record_cost``), whatever the batch holds."""
    from analyzers.deferred import DeferredRecord, PendingReads
    from analyzers.schema import Access, DataAccess
    from analyzers.sinks.duckdb import _record_cost, cut_runs, record_runs

    runs = [RunInfo("s1", "a", "backtest", "m.A", params, None), RunInfo("s2", "b", "live", "m.B", "{}", None)]  # fmt: skip  # noqa: E501
    access = Access(0, "close", 0, 1, 3, None, 1.0, None, False, 1.6e9)
    records: list[DecisionRecord] = []
    for i, (reads, reasoning, notes, kind) in enumerate(rows):
        run = runs[1] if kind == "other run" else runs[0]
        if kind in ("deferred", "other run"):
            accessed: Any = PendingReads(None, [], ())  # type: ignore[arg-type]
            cls: Any = DeferredRecord
        elif kind == "resolved":
            accessed, cls = (DataAccess("A", None, ("close",), (access, access)),), DeferredRecord
        else:
            accessed, cls = (), DecisionRecord
        records.append(
            cls(
                run,
                i,
                1.7e9,
                1.6e9,
                "NEXT",
                "HOLD",
                (),
                accessed,
                reads,
                0,
                1e5,
                5e4,
                (),
                reasoning,
                None,
                notes,
            )
        )
    assert record_runs(records, most) == cut_runs([_record_cost(r) for r in records], most)


@pytest.mark.parametrize("odd", ["any", "str subclass"])
def test_runs_that_compare_equal_are_counted_by_their_own_texts(odd: str) -> None:
    """helper-96: the bound took the first record's run for every record when the runs were
    equal, not the same object: a run whose ``agent_params`` equals any text (``mock.ANY``, a
    ``str`` subclass) made a batch of 100,000-character params look light, one run where the
    costs cut two."""
    from unittest import mock

    from analyzers.deferred import DeferredRecord, PendingReads
    from analyzers.sinks.duckdb import _record_cost, cut_runs, record_runs

    class AnyText(str):
        def __eq__(self, other: object) -> bool:
            return isinstance(other, str)

        __hash__ = str.__hash__

    params: Any = mock.ANY if odd == "any" else AnyText("")
    first = RunInfo("s1", "a", "backtest", "m.A", params, None)
    other = RunInfo("s1", "a", "backtest", "m.A", "x" * 100_000, None)
    assert first == other and first is not other
    records = [
        DeferredRecord(
            run,
            i,
            1.7e9,
            1.6e9,
            "NEXT",
            "HOLD",
            (),
            PendingReads(None, [], ()),  # type: ignore[arg-type]
            0,
            0,
            1e5,
            5e4,
            (),
            None,
            None,
            None,
        )
        for i, run in enumerate([first, other, other, other])
    ]
    costs = [_record_cost(r) for r in records]
    most = sum(costs) - 1
    assert len(cut_runs(costs, most)) == 2
    assert record_runs(records, most) == cut_runs(costs, most)


def _spilled_by_a_run(tmp_path: Path, n: int) -> Path:
    """The spill folder of a run whose sink was down: records 0..n-1 in its file."""
    spill = tmp_path / "spill"
    sink = Flaky(tmp_path / "f.duckdb")
    sink.down.set()
    clock = FakeClock()
    w = writer(sink, spill, clock, batch_size=3, flush_interval_s=0.02)
    w.start()
    for i in range(n):
        w.submit(record(i))
    stats = stop_while_time_passes(w, clock)
    assert stats.written == 0 and stats.spilled == n and w.spill_path.exists()
    return spill


class BuggyOnce(Flaky):
    """Raises a non-transient error (a sink bug) on its first replayed write, then works."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.bugs = 1

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        if self.bugs:
            self.bugs -= 1
            raise AttributeError("'str' object has no attribute 'get'")
        return super().write(rows)


def test_a_sink_bug_during_a_replay_keeps_the_rows_and_the_writer(tmp_path: Path) -> None:
    """helper-113: an error other than TransientError raised by the sink while the spill was
    replayed ended the writer ("decision writer failed"). As on the write path, the rows stay in
    the file, the writer goes on in spill mode, and the next probe replays them."""
    spill = _spilled_by_a_run(tmp_path, 7)
    sink2, clock2 = BuggyOnce(tmp_path / "f.duckdb"), FakeClock()
    w2 = writer(sink2, spill, clock2, batch_size=3, flush_interval_s=1.0, probe_interval_s=10.0)
    w2.start()
    for i in range(7, 10):
        w2.submit(record(i))
    assert w2.flush(WAIT_S)
    assert w2.running and not w2.healthy and sink2.bugs == 0
    clock2.advance(10.0)  # the probe: the replay again, then this run's records
    w2.submit(record(10))
    assert w2.flush(WAIT_S) and w2.healthy
    stats = w2.stop()
    assert stats.replayed == 7 and stats.written == 4 and stats.spilled == 0
    assert stored(sink2.path) == list(range(11))


class RevokedOnce(BuggyOnce):
    """Raises SinkError (write permission withdrawn) on its first replayed write."""

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        if self.bugs:
            self.bugs -= 1
            raise SinkError("BigQuery refused writes to p.d.t: Forbidden: 403 access denied")
        return Flaky.write(self, rows)


def test_a_sink_error_during_a_replay_still_stops_the_writer(tmp_path: Path) -> None:
    """helper-114 F3: the replay's catch of sink bugs took SinkError too (permission withdrawn:
    it needs a human), so the writer retried it at every probe and logged a traceback each
    time. As from probe() or open(), it stops the writer (submit() raises once the queue is
    full); the rows stay in the spill file, the queued one joins them at the stop."""
    spill = _spilled_by_a_run(tmp_path, 4)
    w2 = writer(RevokedOnce(tmp_path / "f.duckdb"), spill, FakeClock(), batch_size=3)
    w2.start()
    w2.submit(record(4))
    deadline = time.monotonic() + WAIT_S
    while w2.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not w2.running and not w2.healthy
    w2.stop()
    spilled = [json.loads(x)["decision_point"] for x in w2.spill_path.read_text().splitlines()]
    assert sorted(spilled) == [0, 1, 2, 3, 4]


def test_a_claim_whose_analyzer_is_gone_without_a_record_is_taken_over(tmp_path: Path) -> None:
    """A run refused at its start leaves its claim on the session; a later run of that session
    took it over while the refused analyzer was alive (stale), but was refused for good once
    the garbage collector had taken it (which run of a test suite's order decided). A claim
    whose owner is gone and under which no record was submitted is taken over; one with a
    record is not."""
    import gc

    class Owner:
        pass

    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "s")
    first = Owner()
    writer.claim_ids("sess", "refused run", owner=first)
    del first
    gc.collect()
    second = Owner()
    writer.claim_ids("sess", "next run", owner=second)  # taken over
    writer.start()
    try:
        writer.submit(record(0))  # session "sess": a record under the claim
        del second
        gc.collect()
        with pytest.raises(ValueError, match="would write the same decision ids"):
            writer.claim_ids("sess", "third run", owner=Owner())
    finally:
        writer.stop(timeout_s=30)
