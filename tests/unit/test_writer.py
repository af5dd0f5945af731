"""DecisionWriter: batching, back-pressure, retries, spill and replay, rejected rows.

The failing sinks here are small hand-written fakes wrapping the real local DuckDB sink, so what
is finally stored is checked in a real store. Time is a :class:`FakeClock` the tests move by
hand, and the tests wait for facts (a sink call, a flush), never for a fixed sleep.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pytest

from analyzers.schema import DecisionRecord, RunInfo
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from core.errors import TransientError
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
            cond.wait(1.0)  # real bound only against a lost wake-up; the caller loops
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


def test_flush_writes_a_partial_batch_now(tmp_path: Path) -> None:
    sink, clock = Flaky(tmp_path / "f.duckdb"), FakeClock()
    w = writer(sink, tmp_path, clock, batch_size=10, flush_interval_s=60.0)
    w.start()
    for i in range(4):
        w.submit(record(i))
    assert w.flush(WAIT_S)
    assert sink.calls == [4] and w.stats.written == 4 and clock.now == 0.0
    w.stop()


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
    assert stats.replayed >= 20 and stats.written == 30
    assert stored(sink.path) == list(range(30))


def test_sink_down_at_start_and_spill_replayed_by_the_next_run(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    sink = Flaky(tmp_path / "f.duckdb")
    sink.down.set()
    w = writer(sink, spill, FakeClock(), batch_size=3, flush_interval_s=0.02)
    w.start()
    for i in range(7):
        w.submit(record(i))
    stats = w.stop()
    assert stats.written == 0 and stats.spilled == 7 and w.spill_path.exists()
    # the next start (sink healthy) replays the file first
    sink2 = Flaky(tmp_path / "f.duckdb")
    w2 = writer(sink2, spill, FakeClock(), batch_size=3, flush_interval_s=0.02)
    w2.start()
    w2.submit(record(7))
    stats2 = w2.stop()
    assert stats2.replayed == 7 and stats2.written == 8
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
    # the failed batch went to the spill file, and the final replay (row path) stored it
    assert stats.spilled == 4 and stats.replayed == 4
    assert stored(sink.path) == [0, 1, 2, 3]


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


def test_incompatible_existing_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE decisions (decision_id VARCHAR, something INT)")
    from core.errors import SinkError

    with pytest.raises(SinkError, match="expected"):
        LocalDuckDBSink(path).open()
