"""CSV data hashes computed by the helper process (``core.hash_worker``) are the hashes the
run's own thread computes, bar for bar; when the helper cannot help (no interpreter, a failing
process), the run hashes in-thread, says why once, and nothing changes in the hashes."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import core.hash_worker as hash_worker
from core.bars import bar_hash
from core.hash_worker import BarHashJob, hash_series
from feeds.csv import CSVBars, CSVFeedConfig, RowHashes, prefetch_hashes, read_csv_bars
from tests.conftest import DATA

_EPOCH = datetime(1970, 1, 1)
SYMBOLS = ("GOOG", "SP500", "NASDAQ")


def _bars() -> list[CSVBars]:
    """Fresh bars (their hashes computed by nothing yet)."""
    return [read_csv_bars(CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s)) for s in SYMBOLS]


def _in_thread(bars: list[CSVBars]) -> list[list[str]]:
    return [list(b.hashes) for b in bars]


@pytest.fixture(scope="module")
def expected() -> list[list[str]]:
    return _in_thread(_bars())


def test_prefetched_hashes_are_the_threads_own(expected: list[list[str]]) -> None:
    bars = _bars()
    job = prefetch_hashes([b.hashes for b in bars])
    assert job is not None
    assert _in_thread(bars) == expected
    assert job._results is not None  # they came from the helper, not from a fallback


def test_one_job_for_all_and_none_for_what_has_started(expected: list[list[str]]) -> None:
    bars = _bars()
    bars[0].hashes[0]
    job = prefetch_hashes([b.hashes for b in bars] + [bars[1].hashes, None, ["x"]])
    assert job is not None and job._lengths == [len(bars[1]), len(bars[2])]
    assert prefetch_hashes([b.hashes for b in bars]) is None  # nothing left to prefetch
    assert _in_thread(bars) == expected


def test_small_series_are_hashed_in_thread() -> None:
    bars = _bars()
    small = bars[0].hashes[:100]
    assert isinstance(small, RowHashes)
    assert prefetch_hashes([small]) is None
    assert list(small) == list(bars[0].hashes)[:100]


@pytest.mark.parametrize("executable", ["/nonexistent/python", "/bin/false", None, ""])
def test_a_helper_that_cannot_help_changes_nothing(
    executable: str | None,
    expected: list[list[str]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(hash_worker.sys, "executable", executable)
    bars = _bars()
    with caplog.at_level(logging.WARNING, logger="core.hash_worker"):
        job = prefetch_hashes([b.hashes for b in bars])
        assert _in_thread(bars) == expected
    assert job is not None and job._results is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "core.hash_worker"]
    assert len(warnings) == 1 and "computed in this process instead" in warnings[0]
    assert not Path(job._dir).exists()  # its temporary folder is gone


def test_the_temporary_folder_goes_when_the_job_is_collected(expected: list[list[str]]) -> None:
    bars = _bars()
    job = prefetch_hashes([b.hashes for b in bars])
    assert job is not None
    folder = Path(job._dir)
    _in_thread(bars)
    assert not folder.exists()


def test_an_unused_job_ends_its_process() -> None:
    job = BarHashJob([("X", np.arange(5_000, dtype=np.int64), {"close": np.ones(5_000)}, {})])
    proc, folder = job._proc, Path(job._dir)
    assert proc is not None
    del job  # never asked: the finalizer stops the process and removes the folder
    assert proc.poll() is not None and not folder.exists()


def _one(symbol: str, us: int, values: dict[str, object]) -> str:
    return bar_hash(symbol, _EPOCH + timedelta(microseconds=us), values)


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=600),
    bad=st.lists(st.integers(min_value=0, max_value=599), max_size=3),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_the_helpers_rule_is_the_one_bar_rule(n: int, bad: list[int], seed: int) -> None:
    """Every hash the helper gives is :func:`bar_hash`'s; a block holding a value the rule
    refuses (infinite) is left to the caller (``None``), whose one-bar path raises as before."""
    rng = np.random.default_rng(seed)
    times = np.sort(rng.choice(10**15, size=n, replace=False)).astype(np.int64)
    close = rng.uniform(-1e6, 1e6, size=n).round(rng.integers(0, 8))
    close[rng.random(n) < 0.05] = np.nan
    for i in bad:
        if i < n:
            close[i] = np.inf
    text = [None if rng.random() < 0.3 else str(rng.integers(100)) for _ in range(n)]
    got = hash_series("S", times, {"close": close}, {"note": text})
    refused_blocks = {i // hash_worker.BLOCK for i in bad if i < n}
    for i, h in enumerate(got):
        if i // hash_worker.BLOCK in refused_blocks:
            assert h is None
            continue
        values: dict[str, object] = {"note": text[i]} if text[i] is not None else {}
        if close[i] == close[i]:
            values["close"] = float(close[i])
        assert h == _one("S", int(times[i]), values)


def test_a_refused_bar_still_raises_and_its_neighbours_come_from_the_helper() -> None:
    n = 3_000
    times = (np.arange(n, dtype=np.int64) + 1_600_000_000) * 86_400 * 10**9 // 86_400
    close = np.linspace(1.0, 2.0, n)
    close[1_000] = np.inf
    hashes = RowHashes("S", times.astype("datetime64[ns]"), {"close": close}, {})
    job = prefetch_hashes([hashes])
    assert job is not None
    assert hashes[0] == _one("S", int(times[0]) // 1000, {"close": 1.0})
    with pytest.raises(ValueError):
        hashes[1_000]
    assert hashes[1_001] == _one("S", int(times[1_001]) // 1000, {"close": float(close[1_001])})
    assert job._results is not None


def test_the_helper_runs_without_the_callers_path(tmp_path: Path) -> None:
    """The helper finds our ``core`` whatever the working folder, even one holding a ``core``
    package of the user's own (``python -m`` would import that one first)."""
    import os

    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "__init__.py").write_text("raise ImportError('the user s core')\n")
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        job = BarHashJob([("X", np.arange(3, dtype=np.int64), {"close": np.ones(3)}, {})])
        assert job.result(0) == hash_series("X", np.arange(3), {"close": np.ones(3)}, {})
    finally:
        os.chdir(here)


def test_a_backtest_with_a_writer_hashes_in_the_helper(
    tmp_path: Path, expected: list[list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the analyzer: the feeds wrap their file's hashes (``BarHashes`` over a
    ``RowHashes``), the analyzer finds them, one job hashes all three files, and the stored
    reads carry the in-thread hashes."""
    import backtrader as bt
    import duckdb

    import feeds.csv.reader as reader
    from analyzers.fmel import FMELAnalyzer
    from analyzers.sinks.duckdb import LocalDuckDBSink
    from analyzers.sinks.writer import DecisionWriter
    from feeds.csv import make_csv_feed

    jobs: list[BarHashJob] = []

    class Counted(BarHashJob):
        def __init__(self, series: list[hash_worker.Series]) -> None:
            super().__init__(series)
            jobs.append(self)

    monkeypatch.setattr(reader, "BarHashJob", Counted)
    bars = _bars()
    cerebro = bt.Cerebro(stdstats=False)
    for b in bars:
        cerebro.adddata(make_csv_feed(CSVFeedConfig(path=b.path, symbol=b.symbol), b))

    class Reader(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            for d in self.datas:
                d.close[0]

    cerebro.addstrategy(Reader)
    writer = DecisionWriter(LocalDuckDBSink(tmp_path / "f.duckdb"), spill_dir=tmp_path / "s")
    writer.start()
    cerebro.addanalyzer(FMELAnalyzer, writer=writer)
    cerebro.run()
    assert writer.stop(timeout_s=300).written > 0
    assert len(jobs) == 1 and jobs[0]._lengths == [len(b) for b in bars]
    assert jobs[0]._results is not None
    con = duckdb.connect(str(tmp_path / "f.duckdb"), read_only=True)
    try:
        stored = con.execute(
            "SELECT symbol, bar_index, data_hash FROM decision_reads WHERE data_hash IS NOT NULL"
        ).fetchall()
    finally:
        con.close()
    want = {b.symbol: h for b, h in zip(bars, expected, strict=True)}
    assert len(stored) > 10_000
    assert all(h == want[s][i] for s, i, h in stored)
