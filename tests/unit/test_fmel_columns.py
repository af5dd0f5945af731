"""Reads resolved in columns (analyzers.tracking.columns) and stored as Arrow equal the per-read
path, value for value.

Every idiom of the corpus runs with a decision writer whose sink stores each batch twice in one
DuckDB file: ``decisions`` through the real fast path (:func:`~analyzers.sinks.columnar.
records_table`, the batch's reads resolved vectorised) and ``expected`` through JSON text of the
same records resolved read by read (:meth:`~analyzers.tracking.AccessTracker.resolve`, cast by
DuckDB as ``LocalDuckDBSink.write`` does). Both tables must hold the same rows, every column. The
reads resolved in columns must also equal the agent's own independent log (as
``test_fmel_deferred.py`` checks for the per-read path).
"""

from __future__ import annotations

import decimal
import struct
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import backtrader as bt
import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from analyzers.deferred import DeferredRecord
from analyzers.schema import Action, DecisionRecord, RunInfo
from analyzers.sinks import columnar
from analyzers.sinks import duckdb as duckdb_sink
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.columnar import records_table
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from analyzers.tracking.columns import (
    one_offset_per_feed,
    posix_us,
    posix_us_array,
    round_ms,
    unique_first,
)
from analyzers.tracking.model import state_rows
from tests.expected_records import create_expected, insert_expected
from tests.idioms.corpus import CASES
from tests.idioms.runs import Case, flatten, run_case


class TwoWaySink(LocalDuckDBSink):
    """The real local sink, plus each batch resolved read by read and stored as JSON text in
    table ``expected`` (the reference)."""

    name = "twoway"

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.columns = 0  # records whose reads were resolved in columns
        self.records: list[DecisionRecord] = []
        self.callers: set[int] = set()

    def open(self) -> None:
        super().open()
        create_expected(self._con)

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        raise AssertionError("fresh records take write_records")

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        self.callers.add(threading.get_ident())
        reference = [_per_read(r) for r in records]  # before the fast path resolves them
        errors = super().write_records(records)
        self.columns += sum(
            1 for r in records if isinstance(r, DeferredRecord) and r.pending.columns()
        )
        self.records += [r.resolved() if isinstance(r, DeferredRecord) else r for r in records]
        insert_expected(self._con, reference)
        return errors


@pytest.fixture(autouse=True)
def _raw_reads_reach_the_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sinks here compare the columns with the per-read resolution of the raw reads they
    are given (or keep those raw reads): the stop's own settling, which resolves the records
    still queued at ``stop()`` before the writer takes them (a race: CI saw a sink get none),
    is left out, so every record reaches the sink unresolved. That settling is checked
    against the agents' own logs in ``test_fmel_deferred.py``."""
    monkeypatch.setattr(DecisionWriter, "_settle_waiting", lambda self, until: None)


def _per_read(rec: DecisionRecord) -> DecisionRecord:
    """``rec`` with its reads resolved read by read, leaving ``rec`` itself unresolved."""
    if not isinstance(rec, DeferredRecord):
        return rec
    pending = rec.pending
    tracker = pending.tracker
    with tracker.resolve_lock:
        raw = pending._reads, pending._state
    if raw[0] is None:  # resolved already (a look-ahead count asked for on the main thread)
        return rec.resolved()
    assert raw[1] is not None
    with tracker.resolve_lock:
        accessed, lookaheads = tracker.resolve(list(raw[0]), count=False, state=raw[1])
    fields = list(tuple.__iter__(rec))
    fields[DecisionRecord._fields.index("data_accessed")] = accessed
    fields[DecisionRecord._fields.index("lookahead_reads")] = lookaheads
    return DecisionRecord._make(fields)


def _rows(con: Any, table: str) -> list[tuple[Any, ...]]:
    return list(con.execute(f"SELECT * FROM {table} ORDER BY decision_point").fetchall())


class PoolCheck:
    """What the writer's tables took from pyarrow's default pool, which ``records_table``
    must not use (:data:`analyzers.sinks.columnar.POOL`). Counted two ways, each call in turn:
    a counting proxy of the default pool is set as pyarrow's default (what pyarrow's Python
    calls allocate from when given no pool), and the default pool's own count of allocations
    is read before and after (C++ code that asks Arrow for its default directly; helper-123).
    The second needs a default other than the system pool, which ``POOL`` itself counts in: with
    ``ARROW_DEFAULT_MEMORY_POOL=system`` only the first is made."""

    def __init__(self) -> None:
        self.base = pa.default_memory_pool()
        self.count_base = self.base.backend_name != "system"
        self.default = pa.proxy_memory_pool(self.base)
        self.own = pa.proxy_memory_pool(columnar.POOL)  # counts what the tables took
        self.calls = 0
        self.base_allocations = 0

    def wrap(self, fn: Any) -> Any:
        def call(records: Sequence[DecisionRecord]) -> pa.Table:
            before = pa.default_memory_pool()
            pa.set_memory_pool(self.default)
            n0 = self.base.num_allocations()
            try:
                self.calls += 1
                return fn(records)
            finally:
                if self.count_base:
                    self.base_allocations += self.base.num_allocations() - n0
                pa.set_memory_pool(before)

        return call

    def took_from_default(self) -> tuple[int, int]:
        """(bytes through the proxy at most at once, allocations counted by the pool)."""
        return self.default.max_memory(), self.base_allocations


@pytest.fixture
def pool_check(monkeypatch: pytest.MonkeyPatch) -> PoolCheck:
    assert columnar.POOL.backend_name == "system"
    check = PoolCheck()
    monkeypatch.setattr(columnar, "POOL", check.own)
    monkeypatch.setattr(duckdb_sink, "records_table", check.wrap(duckdb_sink.records_table))
    return check


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_columns_and_arrow_equal_the_per_read_path(
    case: Case, tmp_path: Path, pool_check: PoolCheck
) -> None:
    """Also: every Arrow buffer of the tables came from the writer's pool, none from
    pyarrow's default (measured twice as slow on the writer's thread: ``columnar.POOL``)."""
    sink = TwoWaySink(tmp_path / "fmel.duckdb")
    writer = DecisionWriter(sink, batch_size=64, spill_dir=tmp_path / "spill")
    writer.start()
    try:
        out = run_case(case, fmel=True, writer=writer)
    finally:
        stats = writer.stop(timeout_s=300)  # a loaded machine must not spill
    assert stats.written == stats.submitted > 0
    assert threading.get_ident() not in sink.callers
    con = duckdb.connect(str(tmp_path / "fmel.duckdb"), read_only=True)
    try:
        got, want = _rows(con, "decisions"), _rows(con, "expected")
    finally:
        con.close()
    assert len(got) == len(want) == stats.submitted
    for g, w in zip(got, want, strict=True):
        assert g == w
    recorded = flatten(sink.records)
    assert recorded == out.expected
    fmel: Any = out.strategy.analyzers.fmel
    assert fmel.lookahead_total == sum(r.lookahead_reads for r in sink.records)
    assert pool_check.calls > 0
    assert pool_check.took_from_default() == (0, 0)
    assert pool_check.own.max_memory() > 0


def test_the_common_reads_are_resolved_in_columns(tmp_path: Path) -> None:
    """The fast path is taken (the test above would pass with every bar read by read)."""
    case = next(c for c in CASES if c.runonce)
    sink = TwoWaySink(tmp_path / "fmel.duckdb")
    writer = DecisionWriter(sink, batch_size=64, spill_dir=tmp_path / "spill")
    writer.start()
    try:
        run_case(case, fmel=True, writer=writer)
    finally:
        writer.stop(timeout_s=300)  # a loaded machine must not spill
    with_reads = sum(1 for r in sink.records if r.reads)
    assert with_reads and sink.columns >= with_reads // 2, (sink.columns, with_reads)


def test_an_empty_batch_and_records_without_reads_make_a_table(pool_check: PoolCheck) -> None:
    assert duckdb_sink.records_table([]).num_rows == 0
    assert pool_check.calls == 1 and pool_check.took_from_default() == (0, 0)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.floats(min_value=-6e10, max_value=2.5e11, allow_nan=False),
        st.integers(min_value=-(10**13), max_value=25 * 10**13).map(lambda ms: ms / 1000),
    )
)
def test_posix_us_rounds_as_datetime_does(t: float) -> None:
    """The stored microseconds are those of the ISO text ``to_row`` writes."""
    dt = datetime.fromtimestamp(t, UTC)
    assert datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=posix_us(t)) == dt


_TIMES = st.one_of(
    st.floats(min_value=-6e10, max_value=2.5e11, allow_nan=False),
    st.integers(min_value=-(10**13), max_value=25 * 10**13).map(lambda ms: ms / 1000),
    st.integers(min_value=-(10**10), max_value=10**11).map(lambda s: s + 0.0005),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_TIMES, min_size=1, max_size=20))
def test_the_vectorised_roundings_equal_pythons(times: list[float]) -> None:
    arr = np.array(times, dtype=np.float64)
    assert posix_us_array(arr).tolist() == [posix_us(t) for t in times]
    assert round_ms(arr).tolist() == [round(t, 3) for t in times]


def test_a_batch_mixing_runs_and_sharing_positions_converts_each_record() -> None:
    """Run-level columns and positions are converted once per distinct object: a batch of two
    sessions, with one positions tuple shared by several records, still gives each record its
    own values (as :func:`~analyzers.schema.to_row` does)."""
    from analyzers.schema import Position, RunInfo, to_row

    runs = [
        RunInfo("s1", "a1", "backtest", "m.A", "{}", "h1"),
        RunInfo("s2", "a2", "live", "m.B", "{}", None, "[]"),
    ]
    held = (Position("AAPL", 3.0, 10.5), Position("MSFT", -1.0, 20.0))
    positions = [held, (), held, (Position("AAPL", 4.0, 11.0),), held, ()]
    records = [
        DecisionRecord(
            runs[i % 2],
            i,
            1.7e9 + i,
            1.6e9 + i,
            "NEXT",
            "HOLD",
            (),
            (),
            0,
            0,
            1e5,
            5e4,
            p,
            None,
            None,
            None,
        )
        for i, p in enumerate(positions)
    ]
    got = records_table(records).to_pylist()
    for rec, row in zip(records, got, strict=True):
        want = to_row(rec)
        for key in ("decision_id", "session_id", "agent_id", "mode", "agent_class",
                    "agent_source_hash", "tracking_gaps", "positions"):  # fmt: skip
            assert row[key] == want[key], key
    same_run = records_table(records[::2]).to_pylist()  # one session: the shared path
    assert [r["positions"] for r in same_run] == [to_row(r)["positions"] for r in records[::2]]
    assert {r["session_id"] for r in same_run} == {"s1"}


_NUMBERS = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**60), 2**60),
    st.booleans(),
    st.text(max_size=3),
)
_ACTIONS = st.lists(
    st.builds(
        Action,
        st.integers(0, 9),
        st.sampled_from(["submitted", "completed", "canceled"]),
        st.one_of(st.none(), st.sampled_from(["buy", "sell"])),
        st.one_of(st.none(), st.text(max_size=4)),
        st.one_of(st.none(), st.integers(0, 2**40)),
        st.one_of(st.none(), st.sampled_from(["Market", "Limit"])),
        _NUMBERS,
        _NUMBERS,
        _NUMBERS,
        _NUMBERS,
        _NUMBERS,
        st.one_of(st.none(), st.text(max_size=5)),
    ),
    max_size=3,
).map(tuple)


@settings(max_examples=300, deadline=None)
@given(
    actions=st.lists(st.one_of(_ACTIONS, st.just(()), st.none()), min_size=1, max_size=12),
    shared=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    points=st.lists(st.integers(-(2**63), 2**63 - 1), min_size=12),
)
def test_actions_positions_and_ids_convert_as_to_row(
    actions: list[tuple[Action, ...] | None], shared: list[int], points: list[int]
) -> None:
    """The ``actions`` column converted field by field, the ``positions`` column once per
    distinct tuple (found by id with numpy) and the decision ids joined in Arrow give what
    :func:`~analyzers.schema.to_row` gives, record by record; what ``to_row``'s rows cannot be
    converted from (a text as a size, an int past a double's exact range) is refused the same
    way. Actions of ``None`` (not a tuple) are stored as no event, as before."""
    import pyarrow as pa

    from analyzers.schema import Position, RunInfo, action_rows, position_rows
    from analyzers.sinks.columnar import ARROW_SCHEMA

    run = RunInfo("s1", "a1", "backtest", "m.A", "{}", "h1")
    pool = [(), (Position("AAPL", 3.0, 10.5),), (Position("X", -1.0, float("nan")),), ()]
    n = len(actions)
    records = [
        DecisionRecord(
            run,
            points[i],
            1.7e9,
            1.6e9,
            "NEXT",
            "HOLD",
            a,
            (),
            0,
            0,
            1e5,
            5e4,
            pool[shared[i % len(shared)]],
            None,
            None,
            None,
        )
        for i, a in enumerate(actions)
    ]
    try:
        want_actions = pa.array(
            [action_rows(a) if a else [] for a in actions], ARROW_SCHEMA.field("actions").type
        )
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        event(f"refused: {type(e).__name__}")
        with pytest.raises(type(e)):
            records_table(records)
        return
    event("converted")
    table = records_table(records)
    assert table.column("actions").combine_chunks().equals(want_actions)
    want_positions = [position_rows(r.positions) for r in records]
    assert table.column("positions").to_pylist() == want_positions
    assert table.column("decision_id").to_pylist() == [r.decision_id for r in records]
    assert table.num_rows == n


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda slots: st.tuples(
            st.just(slots),
            st.lists(
                st.lists(
                    st.tuples(*[st.integers(-(2**40), 2**40)] * 4), min_size=0, max_size=slots
                ).map(tuple),
                min_size=1,
                max_size=30,
            ),
        )
    )
)
def test_the_batch_states_array_is_the_row_by_row_one(
    case: tuple[int, list[tuple[tuple[int, int, int, int], ...]]],
) -> None:
    """``_states``: one pass when every bar captured every feed, row by row otherwise; the
    same array as filling each bar's rows (zeros past its own feeds)."""
    from analyzers.tracking.columns import _states

    slots, states = case
    want = np.zeros((len(states), slots, 4), dtype=np.int64)
    for i, s in enumerate(states):
        for j, row in enumerate(s):
            want[i, j] = row
    got = _states([([], s) for s in states], len(states), slots)
    assert got.dtype == np.int64 and got.shape == want.shape
    assert np.array_equal(got, want)


@given(
    st.lists(st.integers(-3, 40), max_size=60)
    | st.lists(st.integers(0, 10**9), max_size=12)  # spread wide: np.unique's own path
)
def test_unique_first_is_numpys_unique(keys: list[int]) -> None:
    arr = np.array(keys, dtype=np.int64)
    expected = np.unique(arr, return_index=True, return_inverse=True)
    got = unique_first(arr)
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(e.reshape(-1), g)
        assert g.dtype.kind == "i"


@given(
    st.integers(1, 5).flatmap(
        lambda bars: st.integers(1, 3).flatmap(
            lambda slots: st.tuples(
                st.lists(
                    st.lists(st.integers(-2, 2), min_size=slots, max_size=slots),
                    min_size=bars,
                    max_size=bars,
                ),
                st.lists(
                    st.tuples(st.integers(0, bars - 1), st.integers(0, slots - 1)), max_size=20
                ),
            )
        )
    )
)
def test_one_offset_per_feed_sends_every_bar_reading_a_spread_feed_to_the_per_read_path(
    case: tuple[list[list[int]], list[tuple[int, int]]],
) -> None:
    off_rows, reads = case
    off = np.array(off_rows, dtype=np.int64)
    bar_of = np.array([b for b, _ in reads], dtype=np.int64)
    slot = np.array([s for _, s in reads], dtype=np.int64)
    # the rule read by read, as the docstring says it
    want = np.ones(len(off_rows), dtype=bool)
    for s in set(slot.tolist()):
        bars_of_s = {b for b, t in reads if t == s}
        if len({off_rows[b][s] for b in bars_of_s}) > 1:
            want[list(bars_of_s)] = False
    assert np.array_equal(one_offset_per_feed(bar_of, slot, off), want)


class _Alternating(bt.Strategy):  # type: ignore[misc]
    """Reads the first feed's close when ``len(self)`` is even, the second's when odd."""

    def next(self) -> None:
        _ = self.datas[len(self) % 2].close[0]


class _CapturingSink(LocalDuckDBSink):
    """The local sink, keeping each batch's raw reads as the writer got them."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.raw: list[tuple[Any, Any]] = []
        self.tracker: Any = None

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        for r in records:
            if isinstance(r, DeferredRecord) and r.pending._reads:
                self.tracker = r.pending.tracker
                self.raw.append((list(r.pending._reads), r.pending._state))
        return super().write_records(records)


def test_a_feed_whose_offset_moves_within_a_batch_sends_its_bars_to_the_per_read_path(
    tmp_path: Path,
) -> None:
    """Growing buffers keep one offset a feed, so the guard is only reached with a state
    changed here: the bars reading that feed leave the columns, the others stay."""
    from analyzers.fmel import FMELAnalyzer
    from analyzers.tracking.columns import resolve_columns

    index = pd.date_range("2024-01-01", periods=40, freq="D")
    frame = pd.DataFrame(
        {c: np.linspace(10, 20, 40) for c in ("open", "high", "low", "close", "volume")},
        index=index,
    )
    cerebro = bt.Cerebro(stdstats=False)
    for name in ("A", "B"):
        cerebro.adddata(bt.feeds.PandasData(dataname=frame), name=name)
    cerebro.addstrategy(_Alternating)
    sink = _CapturingSink(tmp_path / "fmel.duckdb")
    writer = DecisionWriter(sink, batch_size=1000, spill_dir=tmp_path / "spill")
    writer.start()
    try:
        cerebro.addanalyzer(FMELAnalyzer, writer=writer)
        cerebro.run()
    finally:
        writer.stop(timeout_s=300)
    bars = sink.raw
    assert len(bars) == 40
    tracker = sink.tracker
    with tracker.resolve_lock:
        cols = resolve_columns(tracker, bars)
        assert cols is not None and cols.done == list(range(40))
        # bar 11 (len(self) 12: feed A) as if A's array had been shifted by one at that bar
        rows = state_rows(bars[11][1])
        count, idx, held, known = rows[0]
        moved = list(bars)
        moved[11] = (bars[11][0], ((count, idx - 1, held, known), *rows[1:]))
        cols = resolve_columns(tracker, moved)
    reads_a = [i for i in range(40) if i % 2 == 1]  # len(self) is i + 1 at bar i
    assert cols is not None
    assert cols.done == [i for i in range(40) if i not in reads_a]


# ---- the compiled per-read resolution (_fastread.resolve_buffers) against numpy's ----

_KernelArgs = tuple[Any, ...]
_NOT_NUMBERS = st.sampled_from([None, "x", 1, True, np.float64(2.5)])


@st.composite
def _kernel_inputs(draw: st.DrawFn) -> _KernelArgs:
    """Arguments of ``columns._kernel_buffers`` as ``resolve_columns`` builds them (each bar's
    reads as 5-tuples here, packed by the test): feeds whose positions grow bar by bar and
    reads of bars they hold, so that most bars resolve, with every way a read or a bar can
    fail mixed in (a value that is not a float, a window, a tag without a source, a
    look-ahead, a bar before the buffer, a feed whose offset moves, huge and negative
    numbers)."""
    n_bars = draw(st.integers(1, 6))
    n_slots = draw(st.integers(1, 4))
    n_tags = draw(st.integers(1, 6))
    n_syms = draw(st.integers(1, 3))
    n_fields = draw(st.integers(1, 4))
    odd = draw(st.sampled_from([0.0, 0.0, 0.02, 0.3]))  # how often a value is an odd one

    def maybe(normal: st.SearchStrategy[Any], unusual: st.SearchStrategy[Any]) -> Any:
        return draw(unusual if draw(st.floats(0, 1)) < odd else normal)

    huge = st.sampled_from([-(2**63), -(2**62), -1, 2**62, 2**63 - 1, 70_000, 300_000])
    slot_st = st.integers(0, n_slots - 1)
    tags = [
        (
            maybe(slot_st, st.just(-1)),
            maybe(slot_st, st.just(-1)),
            draw(st.integers(0, n_fields - 1)),
        )
        for _ in range(n_tags)
    ]
    offsets = [draw(st.sampled_from([0, 0, 0, 2])) for _ in range(n_slots)]
    counts = [draw(st.integers(0, 6)) for _ in range(n_slots)]
    state: list[list[list[int]]] = []
    normal: list[list[tuple[int, int]]] = []  # per bar and feed: (current index, offset)
    for _ in range(n_bars):
        row = []
        normal.append([])
        for s in range(n_slots):
            counts[s] += draw(st.integers(0, 2))
            off = maybe(st.just(offsets[s]), st.integers(-1, 3))
            cur = counts[s] - 1
            normal[-1].append((cur, off))
            row.append(
                [
                    maybe(st.just(counts[s]), huge),
                    cur - off,
                    maybe(st.integers(cur - off + 1, cur - off + 3), huge | st.just(cur - off - 1)),
                    maybe(st.integers(0, counts[s] + 1), huge),
                ]
            )
        state.append(row)
    per_bar: list[list[tuple[int, int, int, int, Any]]] = []
    for b in range(n_bars):
        reads = []
        for _ in range(draw(st.integers(0, 8))):
            tid = draw(st.integers(0, n_tags - 1))
            src = tags[tid][0] if tags[tid][0] >= 0 else 0
            tid = maybe(st.just(tid), st.sampled_from([-1, -n_tags, n_tags, 2**40]))
            cur, off = normal[b][src]
            low = max(cur - 6, off, 0)
            size = maybe(st.sampled_from([1, 1, 1, 0]), st.sampled_from([2, 0, -1]))
            reads.append(
                (
                    tid,
                    draw(st.integers(-3, 1)),
                    size,
                    maybe(st.integers(low, max(cur, low)), huge | st.just(cur + 1)),
                    None
                    if size == 0 and draw(st.booleans())  # len() reads carry None
                    else maybe(
                        st.floats(allow_nan=True, allow_infinity=True) | st.just(-0.0),
                        _NOT_NUMBERS,
                    ),
                )
            )
        per_bar.append(reads)
    dense = st.integers(0, min(n_syms, n_slots) - 1)  # as resolve_columns numbers them
    syms = [maybe(dense, st.integers(0, n_syms - 1)) for _ in range(n_slots)]

    def ints(values: Sequence[int]) -> Any:
        return np.array(values, dtype=np.int64)

    # as capture() gives them: a tuple per feed, or (the compiled capture) the same numbers
    # packed as int64 bytes when each fits; sometimes a bar captured fewer feeds
    states: list[Any] = [
        tuple(tuple(cell) for cell in row[: maybe(st.just(n_slots), slot_st)]) for row in state
    ]
    for i, rows in enumerate(states):
        numbers = [v for r in rows for v in r]
        if all(-(2**63) <= v < 2**63 for v in numbers) and draw(st.booleans()):
            states[i] = struct.pack(f"={len(numbers)}q", *numbers)
    return (
        list(zip(per_bar, states, strict=True)),
        n_slots,
        ints([t[0] for t in tags]),
        ints([t[1] for t in tags]),
        ints([t[2] for t in tags]),
        ints(syms),
        # counts larger than the codes used are allowed (the tables follow the codes)
        n_syms + maybe(st.just(0), st.sampled_from([1, 2**40])),
        n_fields + maybe(st.just(0), st.sampled_from([1, 2**40])),
    )


def _numpy_kernel(args: _KernelArgs) -> Any:
    """``columns._kernel_np`` of the same reads, unpacked from their tuples in Python."""
    from analyzers.tracking import columns

    bars, n_slots, *rest = args
    flat = [r for reads, _ in bars for r in reads]
    lens = np.array([len(reads) for reads, _ in bars], dtype=np.int64)
    if not flat:
        return None
    state = columns._states(bars, len(bars), n_slots)
    return columns._kernel_np(lens, *columns._unpack_py(flat), state, *rest)


def _packed(args: _KernelArgs) -> _KernelArgs:
    from analyzers.tracking._fastread import ReadBuffer

    return ([(ReadBuffer(reads), st) for reads, st in args[0]], *args[1:])


def _c_args(args: _KernelArgs) -> _KernelArgs:
    """``_fastread.resolve_buffers``'s arguments for ``_kernel_buffers``' (packed first)."""
    bars, *rest = _packed(args)
    return ([r for r, _ in bars], [st for _, st in bars], *rest)


def _same_kernel(got: Any, want: Any) -> None:
    assert (got is None) == (want is None)
    if want is None:
        return
    assert len(got) == len(want) == 20
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        g, w = np.asarray(g), np.asarray(w)
        assert g.dtype.itemsize == 8 and g.shape == w.reshape(-1).shape, i
        # bit for bit (NaN payloads and -0.0 included): the value column is copied, not computed
        assert np.array_equal(g.view(np.int64), w.reshape(-1).astype(w.dtype).view(np.int64)), i


@settings(max_examples=600, deadline=None)
@given(_kernel_inputs())
def test_the_compiled_resolution_equals_numpys(args: _KernelArgs) -> None:
    """``_fastread.resolve_buffers`` over the bars' packed buffers (through
    ``_kernel_buffers``, which hands a batch C declines to numpy) gives numpy's arrays for
    any batch: which bars resolve, their groups, fields, accesses and distinct bars."""
    from analyzers.tracking import _fastread, columns

    assert _fastread.resolve_buffers is not None, "the C extension is not built"
    packed = _packed(args)
    want = _numpy_kernel(args)
    _same_kernel(columns._kernel_buffers(*packed), want)
    # C itself took it (none of these batches is too spread for its table) unless its codes
    # are sparser than resolve_columns numbers them (a symbol a feed, a field a tag)
    _, n_slots, src, _, fcode, sym, *_ = args
    dense = int(sym.max()) < n_slots and int(fcode.max()) <= len(src)
    assert (_fastread.resolve_buffers(*_c_args(args)) is not NotImplemented) or not dense

    # the buffers are read in place, not changed (floats compared bit for bit: NaN)
    def bits(reads: Any) -> list[Any]:
        return [
            tuple(struct.pack("<d", v) if type(v) is float else (type(v), v) for v in r)
            for r in reads
        ]

    assert [bits(b) for b, _ in packed[0]] == [bits(r) for r, _ in args[0]]


def _one_feed(reads: list[tuple[int, int, int, int, Any]], count: int) -> _KernelArgs:
    """One bar of ``reads`` of tag 0 (field 1) on one feed holding ``count`` bars."""
    i64 = np.int64
    return (
        [(reads, ((count, count - 1, count, count),))],
        1,
        np.array([0], i64),
        np.array([0], i64),
        np.array([1], i64),
        np.array([0], i64),
        1,
        2,
    )


def test_the_compiled_resolution_declines_a_batch_too_spread_for_its_table() -> None:
    """A feed read at bar 0 and at bar 10**6 in a batch of two reads: C returns
    NotImplemented (its table would be 10**6 long), and ``_kernel_buffers`` gives numpy's
    result; a little less spread, C resolves it."""
    from analyzers.tracking import _fastread, columns

    far = _one_feed([(0, 0, 1, 0, 1.0), (0, -1, 1, 10**6, 2.0)], 10**6 + 1)
    assert _fastread.resolve_buffers(*_c_args(far)) is NotImplemented
    want = _numpy_kernel(far)
    assert want is not None
    _same_kernel(columns._kernel_buffers(*_packed(far)), want)
    near = _one_feed([(0, 0, 1, 0, 1.0), (0, -1, 1, 60_000, 2.0)], 60_001)
    assert _fastread.resolve_buffers(*_c_args(near)) not in (None, NotImplemented)
    _same_kernel(columns._kernel_buffers(*_packed(near)), _numpy_kernel(near))


def test_the_compiled_resolution_refuses_what_it_cannot_read() -> None:
    """Not a list of packed ReadBuffers (a list of tuples, a read kept whole) or positions not
    as ``capture()`` gives them: TypeError, and ``_kernel_buffers`` unpacks them for numpy;
    arrays of the wrong type or length and codes out of range: a clear error before anything
    is read."""
    from analyzers.tracking import _fastread, columns
    from analyzers.tracking._fastread import ReadBuffer

    one = _one_feed([(0, 0, 1, 3, 1.0), (0, -1, 1, 2, 2.0)], 4)
    good = _c_args(one)
    assert _fastread.resolve_buffers(*good) is not None

    def refused(at: int, value: Any, error: type[Exception], text: str) -> None:
        args = list(good)
        args[at] = value
        with pytest.raises(error, match=text):
            _fastread.resolve_buffers(*args)

    not_packed = "bar 0 is not a ReadBuffer of packed reads"
    refused(0, [[(0, 0, 1, 3, 1.0)]], TypeError, not_packed)
    refused(0, [ReadBuffer([(0, 0, 1, 3, 1.0), ("not", "a", "read")])], TypeError, not_packed)
    refused(0, (good[0][0],), TypeError, "must be list")
    positions = "captured positions are not at most n_slots tuples of 4 int64-sized ints"
    refused(1, [((4, 3, 4),)], TypeError, positions)
    refused(1, [((4, 3, 4, 4), (4, 3, 4, 4))], TypeError, positions)  # 2 feeds, n_slots 1
    refused(1, [((4, 3, 4, 2**63),)], TypeError, positions)
    refused(1, [((4, 3, 4, 4.0),)], TypeError, positions)
    refused(1, [[(4, 3, 4, 4)]], TypeError, positions)
    refused(1, [], ValueError, "one captured state a bar")
    refused(2, 0, ValueError, "one captured state a bar, and n_slots >= 1")
    refused(3, np.array([0], np.int32), TypeError, "src is not a C-contiguous int64")
    refused(3, np.zeros(4, np.int64)[::2], ValueError, "contiguous")
    refused(4, np.array([0, 0], np.int64), ValueError, "lengths do not agree")
    refused(6, np.array([0, 0], np.int64), ValueError, "lengths do not agree")
    refused(6, np.array([1], np.int64), ValueError, "symbol code is out of range")
    refused(5, np.array([2], np.int64), ValueError, "field code is out of range")
    refused(7, 0, ValueError, "lengths do not agree")
    # numpy takes what C refused, the same as from the tuples
    _same_kernel(columns._kernel_buffers(*one), _numpy_kernel(one))
    # a read of a tag that does not exist sends its bar elsewhere (numpy would raise)
    buffers, states, *rest = good
    two = ([buffers[0], ReadBuffer([(7, 0, 1, 3, 1.0)])], states * 2, *rest)
    out = _fastread.resolve_buffers(*two)
    assert isinstance(out, tuple)
    assert np.frombuffer(out[0], dtype=np.int64).tolist() == [0]  # only the first bar resolves


def test_a_buffer_being_resolved_cannot_change() -> None:
    """While ``resolve_buffers`` reads a buffer without the GIL, another thread's append to it
    raises BufferError (its arrays are not moved under the reader; clear and take check the
    same pin); between the calls appends go in, and after, the buffer works as before."""
    import time

    from analyzers.tracking import _fastread

    reads = [(0, -(i % 20), 1, 4_000 - (i % 20), float(i)) for i in range(200_000)]
    args = _c_args(_one_feed(reads, 4_001))
    victim = args[0][0]
    refused: list[str] = []
    appended = 0
    stop = threading.Event()

    def poke() -> None:
        nonlocal appended
        while not stop.is_set():
            try:
                victim.append((0, 0, 1, 4_000, 1.0))
            except BufferError as e:
                refused.append(str(e))
            else:
                appended += 1
            time.sleep(0)

    t = threading.Thread(target=poke)
    t.start()
    deadline = time.monotonic() + 20
    try:
        while not refused and time.monotonic() < deadline:
            assert _fastread.resolve_buffers(*args) is not None
    finally:
        stop.set()
        t.join()
    assert refused and "being read by the decision writer" in refused[0]
    assert len(victim) == len(reads) + appended  # each append either went in or was refused
    victim.clear()  # free again
    assert len(victim) == 0


def test_the_compiled_resolution_agrees_on_the_odd_reads_an_attack_found() -> None:
    """helper-91's cases: a bar index near 2**62 (numpy's feed-times-index keys overflowed
    and paired the wrong bars), a negative tag id (numpy wrapped it to the last tag, C sent
    the bar elsewhere) and symbol and field counts of 2**40 (C allocated tables that long).
    Now both send the first two to the per-read path and size their tables by the codes used."""
    from analyzers.tracking import _fastread, columns

    i64 = np.int64
    huge = (
        [([(0, 0, 1, 0, 1.0), (1, 0, 0, 2**62, None)], ((1, 0, 1, 1), (2**62 + 1, 0, 1, 0)))],
        2,
        np.array([0, -1], i64),
        np.array([-1, 1], i64),
        np.array([1, 0], i64),
        np.array([0, 1], i64),
        2,
        2,
    )
    assert _numpy_kernel(huge) is None  # the bar's len() read is past MAX_BAR_INDEX
    _same_kernel(columns._kernel_buffers(*_packed(huge)), None)
    negative = _one_feed([(-1, 0, 1, 3, 1.0)], 4)
    assert _numpy_kernel(negative) is None
    _same_kernel(columns._kernel_buffers(*_packed(negative)), None)
    wide = list(_one_feed([(0, 0, 1, 3, 1.0), (0, -1, 1, 2, 2.0)], 4))
    wide[-2:] = [2**40, 2**40]
    want = _numpy_kernel(tuple(wide))
    assert want is not None
    _same_kernel(columns._kernel_buffers(*_packed(tuple(wide))), want)
    assert _fastread.resolve_buffers(*_c_args(tuple(wide))) is not None


def test_the_compiled_resolution_reads_copies_of_the_small_arrays() -> None:
    """Another thread writing out-of-range codes into ``sym_of_slot``, ``src`` or
    ``field_code_of_tag`` while C runs without the GIL (helper-91: writes out of bounds and a
    segmentation fault): C works on copies taken under the GIL and checked, so each call either
    refuses the codes it copied (ValueError) or resolves with the ones it copied; no crash."""
    import time

    from analyzers.tracking import _fastread

    reads = [(0, -(i % 20), 1, 4_000 - (i % 20), float(i)) for i in range(50_000)]
    args = list(_c_args(_one_feed(reads, 4_001)))
    first = _fastread.resolve_buffers(*args)
    for at in (3, 5, 6):  # src, field_code_of_tag, sym_of_slot
        arr = args[at]
        stop = threading.Event()

        def flip(arr: Any = arr, stop: threading.Event = stop) -> None:
            while not stop.is_set():
                arr[0] = 1 << 40
                arr[0] = 0 if arr is not args[5] else 1

        t = threading.Thread(target=flip)
        t.start()
        outcomes = set()
        try:
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                try:
                    out = _fastread.resolve_buffers(*args)
                except ValueError as e:
                    outcomes.add(str(e).split(":")[1].strip())
                else:  # src 2**40 copied: the bar is not the common read (None)
                    assert out == first or out is None
                    outcomes.add("resolved" if out is not None else "none")
        finally:
            stop.set()
            t.join()
        assert outcomes <= {"resolved", "none", "a symbol code is out of range",
                            "a field code is out of range"}  # fmt: skip


def test_a_take_that_collected_finds_the_buffer_pinned_again() -> None:
    """helper-92: ``take()`` checked the pin, then allocated; the allocation collected, a
    finalizer released the GIL, and another thread pinned the buffer and read its arrays, which
    ``take()`` then freed. Now ``take()`` checks again after its allocation: BufferError, and
    the buffer and the resolving are intact."""
    import gc
    import time

    from analyzers.tracking import _fastread
    from analyzers.tracking._fastread import ReadBuffer

    # ~0.1 s of resolving: the take() below resumes while it runs
    victim = ReadBuffer((0, -(i % 20), 1, 4_000 - (i % 20), float(i)) for i in range(2_000_000))
    args = _c_args(_one_feed([], 4_001))
    args = ([victim], *args[1:])
    want = _fastread.resolve_buffers(*args)
    in_finalizer, pinning = threading.Event(), threading.Event()
    armed = [True]
    got: list[Any] = []

    class Trap:
        def __del__(self) -> None:
            if armed[0]:
                armed[0] = False
                in_finalizer.set()
                pinning.wait(5)
                time.sleep(0.002)  # releases the GIL: the other thread pins and reads

    def resolve() -> None:
        in_finalizer.wait(5)
        pinning.set()
        got.append(_fastread.resolve_buffers(*args))

    t = threading.Thread(target=resolve)
    t.start()
    take = victim.take  # bound before: the call itself allocates nothing else first
    threshold = gc.get_threshold()
    gc.collect()
    gc.disable()
    try:
        trap: list[Any] = [Trap()]
        trap.append(trap)
        del trap  # garbage with a finalizer, for the next collection: take()'s allocation
        with pytest.raises(BufferError, match="being read by the decision writer"):
            gc.set_threshold(1)
            gc.enable()
            take()
    finally:
        gc.enable()
        gc.set_threshold(*threshold)
        armed[0] = False
        in_finalizer.set()
        t.join()
    assert got == [want]
    assert len(victim) == 2_000_000


def test_sparse_codes_and_too_many_feeds_are_left_to_numpy() -> None:
    """helper-92: a symbol or field code of 2**40 (C filled tables that long: MemoryError, or
    GBs for 2**28) goes to numpy, which gives the answer; more feeds than MAX_SLOTS (numpy's
    keys would overflow) resolve nothing as columns, in C and numpy alike."""
    from analyzers.tracking import _fastread, columns

    base = _one_feed([(0, 0, 1, 3, 1.0), (0, -1, 1, 2, 2.0)], 4)
    for at, code in ((5, 2**40), (4, 2**40), (5, 2**28)):
        odd = list(base)
        odd[at] = np.array([code], np.int64)
        odd[-2:] = [2**40 + 1, 2**40 + 1]
        assert _fastread.resolve_buffers(*_c_args(tuple(odd))) is NotImplemented
        want = _numpy_kernel(tuple(odd))
        assert want is not None
        _same_kernel(columns._kernel_buffers(*_packed(tuple(odd))), want)
    many = list(base)
    many[1] = columns.MAX_SLOTS + 1
    many[5] = np.zeros(columns.MAX_SLOTS + 1, np.int64)  # sym_of_slot: one a feed
    assert _fastread.resolve_buffers(*_c_args(tuple(many))) is None
    lens = np.array([2], np.int64)
    flat = base[0][0][0]
    state = np.zeros((1, columns.MAX_SLOTS + 1, 4), np.int64)
    state[0, 0] = base[0][0][1][0]
    assert columns._kernel_np(lens, *columns._unpack_py(flat), state, *many[2:]) is None


def test_the_positions_array_refuses_rows_that_are_not_four_numbers() -> None:
    """helper-92: ``_states``' one-pass path took the first four numbers of a row of five and
    shifted the rest; such a row now takes the row-by-row path, which refuses it."""
    from analyzers.tracking import columns

    for row in ((1, 2, 3, 4, 5), (1, 2, 3)):
        with pytest.raises(ValueError):
            columns._states([([], (row, (1, 2, 3, 4)))], 1, 2)


def _actions_outcome(records: list[DecisionRecord]) -> tuple[str, Any]:
    try:
        return "ok", records_table(records).column("actions").to_pylist()
    except Exception as e:  # compared by type
        return "raised", type(e)


def _per_record_outcome(records: list[DecisionRecord]) -> tuple[str, Any]:
    """The ``actions`` column as the per-record conversion (``to_row``'s rows) gives it."""
    import pyarrow as pa

    from analyzers.schema import action_rows
    from analyzers.sinks.columnar import ARROW_SCHEMA

    try:
        rows = [action_rows(r.actions) if r.actions else [] for r in records]
        return "ok", pa.array(rows, ARROW_SCHEMA.field("actions").type).to_pylist()
    except Exception as e:  # compared by type
        return "raised", type(e)


class _LenZero(tuple):  # type: ignore[type-arg]
    """Truthy events whose ``len()`` says 0 (a sequence whose length and items disagree)."""

    def __len__(self) -> int:
        return 0

    def __bool__(self) -> bool:
        return True


def _event(**kw: Any) -> Action:
    base: dict[str, Any] = dict(
        seq=1, event="submitted", side="buy", symbol="A", order_ref=1, order_type="Market",
        size=1.0, price=2.0,
    )  # fmt: skip
    return Action(**{**base, **kw})


@pytest.mark.parametrize(
    "events",
    [
        # helper-96: refused by the per-record conversion with ArrowInvalid (the Decimal, first
        # in row order); by field, the bool seq's column came first (ArrowTypeError)
        [(_event(size=decimal.Decimal("1.25")),), (_event(seq=True),)],
        # _num refuses a signalling NaN (InvalidOperation) before any Arrow conversion
        [(_event(seq="x", size=decimal.Decimal("sNaN")),)],
        # an Action of 13 elements (tuple.__new__): converted by its 12 named fields
        [(tuple.__new__(Action, (*_event(), "extra")),)],
        # len() 0 but one event, then two: by offsets the third event was lost silently
        [_LenZero((_event(seq=10),)), (_event(seq=20), _event(seq=30))],
    ],
    ids=["decimal-then-bool", "snan", "extra-element", "len-disagrees"],
)
def test_odd_actions_give_what_the_per_record_conversion_gives(events: list[Any]) -> None:
    run = RunInfo("s1", "a1", "backtest", "m.A", "{}", "h1")
    records = [
        DecisionRecord(
            run, i, 1.7e9, 1.6e9, "NEXT", "HOLD", a, (), 0, 0, 1e5, 5e4, (), None, None, None
        )
        for i, a in enumerate(events)
    ]
    assert _actions_outcome(records) == _per_record_outcome(records)


def test_a_decision_point_past_int64_fails_where_it_failed() -> None:
    """helper-96: an int session id and a decision point past int64 raised the session id
    column's ArrowTypeError, then the decision point's OverflowError once the decision ids
    converted the points first; the ids fall back to their text and the columns convert in
    the same order as before."""
    import pyarrow as pa

    run = RunInfo(5, "a1", "backtest", "m.A", "{}", "h1")  # type: ignore[arg-type]
    record = DecisionRecord(run, 2**64, 1.7e9, 1.6e9, "NEXT", "HOLD", (), (), 0, 0, 1e5, 5e4,
                            (), None, None, None)  # fmt: skip
    with pytest.raises(pa.ArrowTypeError):
        records_table([record])
