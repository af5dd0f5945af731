"""DecisionWriter: batching, back-pressure, retries, spill and replay, rejected rows.

The failing sinks here are small hand-written fakes wrapping the real local DuckDB sink, so what
is finally stored is checked in a real store.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pytest

from analyzers.schema import DecisionRecord, RunInfo
from analyzers.sinks import DecisionWriter, LocalDuckDBSink, RetryPolicy, Row, RowError
from core.errors import TransientError

RUN = RunInfo("sess", "agent", "backtest", "agents.X", "{}", None)
FAST = RetryPolicy(attempts=2, base_s=0.001, cap_s=0.002, probe_interval_s=0.05)


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


class Flaky(LocalDuckDBSink):
    """The local sink, failing (transiently) while ``down`` is set; records every call."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down = threading.Event()
        self.calls: list[int] = []
        self.delay_s = 0.0

    def open(self) -> None:
        if self.down.is_set():
            raise TransientError("connection refused")
        super().open()

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        self._gate(len(rows))
        return super().write(rows)

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        self._gate(len(records))
        return super().write_records(records)

    def _gate(self, n: int) -> None:
        time.sleep(self.delay_s)
        if self.down.is_set():
            raise TransientError("503 backend unavailable")
        self.calls.append(n)


def stored(path: Path) -> list[int]:
    with duckdb.connect(str(path), read_only=True) as con:
        return [
            r[0]
            for r in con.execute(
                "SELECT decision_point FROM decisions ORDER BY decision_point"
            ).fetchall()
        ]


def test_batches_by_size_and_by_interval(tmp_path: Path) -> None:
    sink = Flaky(tmp_path / "f.duckdb")
    w = DecisionWriter(sink, batch_size=10, flush_interval_s=0.2, spill_dir=tmp_path, retry=FAST)
    w.start()
    for i in range(10):
        w.submit(record(i))
    deadline = time.monotonic() + 5
    while not sink.calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.calls == [10]
    for i in range(10, 13):
        w.submit(record(i))
    time.sleep(0.5)  # fewer than batch_size: the interval sends them
    assert sink.calls == [10, 3]
    stats = w.stop()
    assert stats.written == 13 and stats.spilled == 0
    assert stored(sink.path) == list(range(13))


def test_full_queue_blocks_the_producer_and_loses_nothing(tmp_path: Path) -> None:
    sink = Flaky(tmp_path / "f.duckdb")
    sink.delay_s = 0.05
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
    t0 = time.monotonic()
    for i in range(20):
        w.submit(record(i))
        assert w.queue_depth <= 3
    waited = time.monotonic() - t0
    stats = w.stop()
    assert waited >= 0.2  # submit() had to wait for the slow sink
    assert stats.written == 20 and stored(sink.path) == list(range(20))


def test_outage_spills_then_replays_in_order_without_duplicates(tmp_path: Path) -> None:
    sink = Flaky(tmp_path / "f.duckdb")
    w = DecisionWriter(
        sink, batch_size=5, flush_interval_s=0.02, spill_dir=tmp_path / "spill", retry=FAST
    )
    w.start()
    for i in range(5):
        w.submit(record(i))
    time.sleep(0.3)
    sink.down.set()
    for i in range(5, 20):
        w.submit(record(i))
    time.sleep(0.3)
    assert w.spill_path.exists() and not w.healthy
    spilled = [json.loads(x)["decision_point"] for x in w.spill_path.read_text().splitlines()]
    assert spilled == list(range(5, len(spilled) + 5))
    sink.down.clear()
    for i in range(20, 25):
        w.submit(record(i))
    stats = w.stop()
    assert not w.spill_path.exists()
    assert stats.spilled >= 15 and stats.replayed >= 15
    assert stored(sink.path) == list(range(25))


def test_sink_down_at_start_and_spill_replayed_by_the_next_run(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    sink = Flaky(tmp_path / "f.duckdb")
    sink.down.set()
    w = DecisionWriter(sink, batch_size=3, flush_interval_s=0.02, spill_dir=spill, retry=FAST)
    w.start()
    for i in range(7):
        w.submit(record(i))
    stats = w.stop()
    assert stats.written == 0 and stats.spilled == 7 and w.spill_path.exists()
    # the next start (sink healthy) replays the file first
    sink2 = Flaky(tmp_path / "f.duckdb")
    w2 = DecisionWriter(sink2, batch_size=3, flush_interval_s=0.02, spill_dir=spill, retry=FAST)
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
    w = DecisionWriter(sink, batch_size=10, spill_dir=tmp_path, retry=FAST)
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
    w = DecisionWriter(sink, batch_size=4, spill_dir=tmp_path, retry=FAST)
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


def test_incompatible_existing_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE decisions (decision_id VARCHAR, something INT)")
    from core.errors import SinkError

    with pytest.raises(SinkError, match="expected"):
        LocalDuckDBSink(path).open()
