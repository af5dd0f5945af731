"""Reads resolved on the writer thread (analyzers.deferred) equal the agent's own log.

With a decision writer and preloaded feeds, the bar loop only hands each bar's raw reads and
the feeds' positions over; the writer thread resolves them when it serialises the record. This
runs the whole idiom corpus that way and checks every recorded read against the agent's own
independent log (as tests/unit/test_idiom_corpus.py does for records kept in memory), plus the
look-ahead counts, and that the resolution happened off the main thread.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from analyzers.deferred import DeferredRecord, settle_columns
from analyzers.schema import DecisionRecord, row_json
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.writer import DecisionWriter
from tests.idioms.corpus import CASES
from tests.idioms.runs import Case, flatten, run_case


class CollectSink:
    """A decision sink that keeps each record's resolved form, made on the writer thread the
    way the real sinks read records (attribute access: :func:`row_json`)."""

    name = "collect"

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []
        self.deferred = 0
        self.threads: set[int] = set()

    def open(self) -> None:
        pass

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        raise AssertionError("fresh records take write_records")

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        self.threads.add(threading.get_ident())
        for rec in records:
            row_json(rec)  # resolves a deferred record here, as the DuckDB sink does
            if isinstance(rec, DeferredRecord):
                self.deferred += 1
                rec = rec.resolved()
            self.records.append(rec)
        return []

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "collect"

    def example_query(self) -> str:
        return ""


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_deferred_reads_equal_the_agents_own_log(case: Case, tmp_path: Path) -> None:
    sink = CollectSink()
    writer = DecisionWriter(sink, batch_size=64, spill_dir=tmp_path / "spill")  # type: ignore[arg-type]
    writer.start()
    try:
        out = run_case(case, fmel=True, writer=writer)
    finally:
        writer.stop(timeout_s=300)  # a loaded machine must not spill: the test reads them all
    fmel: Any = out.strategy.analyzers.fmel
    assert out.expected, "the agent read nothing: the case tests nothing"
    assert sink.deferred > 0, "no record was deferred: the case tests nothing"
    assert threading.get_ident() not in sink.threads
    recorded = flatten(sink.records)
    for i, (want, got) in enumerate(zip(out.expected, recorded, strict=False)):
        assert got == want, f"read {i} differs:\n  want {want}\n  got  {got}"
    assert len(recorded) == len(out.expected)
    flagged = {r.bar_time: r.lookahead_reads for r in sink.records if r.lookahead_reads}
    want_flagged: dict[float, set[int]] = {}
    for e in out.expected:
        if e[10]:
            want_flagged.setdefault(e[0], set()).add(e[1])
    assert flagged == {t: len(s) for t, s in want_flagged.items()}
    assert fmel.lookahead_total == sum(len(s) for s in want_flagged.values())


def test_a_deferred_record_pickles_as_the_resolved_record(tmp_path: Path) -> None:
    sink = CollectSink()
    writer = DecisionWriter(sink, batch_size=64, spill_dir=tmp_path / "spill")  # type: ignore[arg-type]
    writer.start()
    held: list[DecisionRecord] = []
    real_submit = writer.submit

    def keep(rec: Any) -> None:
        held.append(rec)
        real_submit(rec)

    writer.submit = keep  # type: ignore[method-assign,assignment]
    try:
        run_case(CASES[0], fmel=True, writer=writer)
    finally:
        writer.stop(timeout_s=300)  # a loaded machine must not spill: the test reads them all
    deferred = [r for r in held if isinstance(r, DeferredRecord)]
    assert deferred
    for rec in deferred[:50]:
        back = pickle.loads(pickle.dumps(rec))
        assert type(back) is DecisionRecord
        assert back == rec.resolved()
        assert back.data_accessed == rec.data_accessed


class _HoldFirstWrite(CollectSink):
    """Holds its first write until every deferred record queued behind it is resolved (or
    ``limit_s`` passes), then notes, at each later write, whether its records came resolved."""

    def __init__(self, limit_s: float = 20.0) -> None:
        super().__init__()
        self.writer: DecisionWriter | None = None
        self.limit_s = limit_s
        self.calls = 0
        self.resolved_on_arrival: list[bool] = []

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        self.calls += 1
        if self.calls == 1:
            assert self.writer is not None
            end = time.monotonic() + self.limit_s
            while time.monotonic() < end:
                with self.writer._lock:
                    queued = [r for r in self.writer._buf if isinstance(r, DeferredRecord)]
                if self.writer._stopping and all(r.pending.done for r in queued):
                    break
                time.sleep(0.01)
        else:
            self.resolved_on_arrival += [
                r.pending.done for r in records if isinstance(r, DeferredRecord)
            ]
        return super().write_records(records)


def test_records_queued_at_stop_are_resolved_by_the_stopping_thread_while_the_writer_writes(
    tmp_path: Path,
) -> None:
    """At ``stop()`` the bar loop's thread, idle from then on, resolves the reads of the
    records still queued behind the batch the writer thread is writing (issue 14: the final
    flush of a read-heavy backtest). The writer finds them resolved, and what is stored is
    still exactly what the agent read."""
    sink = _HoldFirstWrite()
    writer = DecisionWriter(sink, batch_size=16, spill_dir=tmp_path / "spill")  # type: ignore[arg-type]
    sink.writer = writer
    writer.start()
    try:
        out = run_case(CASES[0], fmel=True, writer=writer)
    finally:
        writer.stop(timeout_s=300)
    assert sink.resolved_on_arrival, "no write after the held one: the case tests nothing"
    assert all(sink.resolved_on_arrival)
    assert writer.stats.written == writer.stats.submitted
    recorded = flatten(sink.records)
    assert recorded == out.expected


class _KeepSink(CollectSink):
    """Keeps the records as given: nothing resolves them here."""

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        self.records.extend(records)
        return []


@pytest.mark.parametrize("agent", ["SmaCross", "Windows"])
def test_settle_columns_resolves_only_the_vectorised_bars_and_waits_for_the_lock_only_so_long(
    agent: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``stop()`` resolves on the stopping thread (:func:`settle_columns`) stays within
    its budget (fresh-context attack, helper-90: bars read by read cost ~10x a vectorised one,
    and the lock may be held by the writer thread for a whole batch): bars with windows are
    left pending, and a lock held elsewhere is waited for only ``wait_s``."""
    case = next(c for c in CASES if c.agent.__name__ == agent and c.runonce)
    monkeypatch.setattr(DecisionWriter, "_settle_waiting", lambda self, until: None)
    sink = _KeepSink()
    writer = DecisionWriter(sink, batch_size=64, spill_dir=tmp_path / "spill")  # type: ignore[arg-type]
    writer.start()
    try:
        run_case(case, fmel=True, writer=writer)
    finally:
        writer.stop(timeout_s=300)
    pending = [r.pending for r in sink.records if isinstance(r, DeferredRecord)]
    assert pending and not any(p.done for p in pending)
    lock = pending[0].tracker.resolve_lock
    with lock:
        began = time.monotonic()
        assert not settle_columns(pending, 0.05)
        assert 0.04 <= time.monotonic() - began < 2.0
    assert not any(p.done for p in pending)
    assert settle_columns(pending, 1.0)
    done = [p for p in pending if p.done]
    if agent == "Windows":  # every bar reads a window: read by read, later
        assert not done
    else:
        assert len(done) > len(pending) // 2
    for p in pending:  # the rest resolve read by read, when asked
        p.result()
    assert all(p.done for p in pending)


def test_settling_at_stop_does_not_wait_for_the_queue_once_its_time_is_up(
    tmp_path: Path,
) -> None:
    """Past its ``until`` (or with the writer thread gone) the stop's settling returns without
    taking the writer's lock to copy the queue (helper-90 F3)."""
    writer = DecisionWriter(CollectSink(), spill_dir=tmp_path / "spill")  # type: ignore[arg-type]
    writer.start()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with writer._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        began = time.monotonic()
        writer._settle_waiting(time.monotonic() - 1.0)
        assert time.monotonic() - began < 1.0
    finally:
        release.set()
        holder.join()
        writer.stop()
