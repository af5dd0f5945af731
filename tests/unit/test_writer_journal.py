"""The decision writer's journal (paper runs): a record is on local disk, fsynced, before its
listeners hear it is durable; a killed writer's journal is replayed at the next start; stores
keep one row per decision id, so a bar decided again after a restart is not stored twice.

The sinks are the real local DuckDB sink, wrapped by a small fake that can hold a write (to look
at the journal while the write has not happened) or fail every write (a killed process that never
got to write).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb

from analyzers.schema import DecisionRecord, RunInfo
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.journal import DecisionJournal
from analyzers.sinks.spill import SpillFile
from analyzers.sinks.writer import DecisionWriter

WAIT_S = 10.0


def run(session: str) -> RunInfo:
    return RunInfo(session, "agent", "paper", "agents.X", "{}", None, decision_scope="dep-1")


def record(i: int, session: str = "s1", value: float = 100.0) -> DecisionRecord:
    return DecisionRecord(
        run(session),
        i,
        1_700_000_000.0 + i,
        1_000_000_000.0 + 60 * i,
        "NEXT",
        "HOLD",
        (),
        (),
        0,
        0,
        value + i,
        50.0,
        (),
        None,
        None,
        None,
    )


class HeldSink(LocalDuckDBSink):
    """The local sink whose writes wait until :attr:`release` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        self.writing.set()
        assert self.release.wait(WAIT_S)
        return super().write(rows)


def stored(path: Path) -> list[tuple[str, float]]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(
            "SELECT decision_id, portfolio_value FROM decisions ORDER BY decision_id"
        ).fetchall()


def test_records_are_on_disk_before_they_are_reported_durable(tmp_path: Path) -> None:
    sink = HeldSink(tmp_path / "fmel.duckdb")
    w = DecisionWriter(sink, spill_dir=tmp_path / "spill", batch_size=100, journal=True)
    heard: list[list[str]] = []
    journal_at_report: list[int] = []

    def listener(records: Sequence[Any]) -> None:
        journal_at_report.append(len(w.journal.path.read_text().splitlines()))  # type: ignore[union-attr]
        heard.append([r.decision_id for r in records])

    w.add_durable_listener(listener)
    w.start()
    for i in range(3):
        w.submit(record(i))
    assert w.wait_durable(WAIT_S)  # journaled although the batch (100) is far from full
    assert [d for group in heard for d in group] == [record(i).decision_id for i in range(3)]
    assert journal_at_report[-1] == 3
    lines = [json.loads(x) for x in w.journal.path.read_text().splitlines()]  # type: ignore[union-attr]
    assert [x["decision_id"] for x in lines] == [record(i).decision_id for i in range(3)]
    assert record(0).decision_id == "dep-1:2001-09-09T01:46:40Z"  # scope and bar time
    sink.release.set()
    stats = w.stop(WAIT_S)
    assert stats.written == 3
    assert w.journal.path.read_text() == ""  # type: ignore[union-attr]  # all settled
    assert len(stored(tmp_path / "fmel.duckdb")) == 3


def test_a_killed_writers_journal_is_replayed_and_ids_stay_unique(tmp_path: Path) -> None:
    store = tmp_path / "fmel.duckdb"
    # First run: decisions 0..4 journaled, the write never happens (the process is killed).
    dead = HeldSink(store)
    w1 = DecisionWriter(dead, spill_dir=tmp_path / "spill", batch_size=1, journal=True)
    w1.start()
    for i in range(5):
        w1.submit(record(i, "s1"))
    assert w1.wait_durable(WAIT_S) and dead.writing.wait(WAIT_S)
    journal = (tmp_path / "spill" / "journal-local.jsonl").read_text()
    assert len(journal.splitlines()) == 5
    from analyzers.sinks.duckdb import close_store

    close_store(dead._con)  # the "killed" process lets go of the file
    dead._con = None

    # Second run (new session): replays the journal, then decides bars 3..6 again (redelivered)
    # with other values; the store keeps the first decision of each bar time, once.
    sink = LocalDuckDBSink(store)
    w2 = DecisionWriter(sink, spill_dir=tmp_path / "spill", batch_size=2, journal=True)
    w2.start()
    for i in range(3, 7):
        w2.submit(record(i, "s2", value=500.0))
    stats = w2.stop(WAIT_S)
    assert stats.replayed == 5
    rows = stored(store)
    assert [r[0] for r in rows] == sorted(record(i).decision_id for i in range(7))
    values = dict(rows)
    assert values[record(3).decision_id] == 103.0  # the journaled first decision was kept
    assert values[record(6).decision_id] == 506.0
    dead.release.set()  # let the abandoned thread end (its write fails on the closed store)


def test_wait_durable_is_false_without_a_running_writer(tmp_path: Path) -> None:
    w = DecisionWriter(LocalDuckDBSink(tmp_path / "x.duckdb"), spill_dir=tmp_path, journal=True)
    w.submit(record(0))
    assert not w.wait_durable(0.1)


def test_a_line_torn_by_a_kill_is_skipped(tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    whole = json.dumps({"decision_id": "dep-1:x", "n": 1})
    (spill / "journal-local.jsonl").write_text(whole + "\n" + whole[:17])  # killed mid-append
    journal = DecisionJournal(spill / "journal-local.jsonl")
    assert journal.recover(SpillFile(spill / "spill-local.jsonl")) == 1
    assert SpillFile(spill / "spill-local.jsonl").read() == [json.loads(whole)]
    assert not journal.path.exists()
