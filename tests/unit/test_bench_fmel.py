"""``benchmarks/bench_fmel.py``'s arithmetic: ratios are paired round by round.

The benchmark itself is not run here (timings belong in ``benchmarks/``); this checks that a
machine that runs twice as fast in one round as in another does not move the ratios."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fmel.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_fmel_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(wall: float, cpu: float, reads: int = 0, read_cpu: float = 0.0) -> dict[str, float]:
    return {
        "read_cpu_s": read_cpu,
        "wall_s": wall,
        "main_cpu_s": cpu,
        "bars": 100,
        "reads": reads,
        "flush_s": 0.1,
        "left_at_end": 0,
        "rss_mb": 100,
        "value": 1.0,
    }


def test_ratios_pair_each_round_with_its_own_plain_run(bench: ModuleType) -> None:
    # rounds at speeds 1x, 2x, 0.5x; FMEL always costs 1.2x (wall) and 1.1x (main CPU) of the
    # plain run beside it; with the store 1.5x wall, of which 0.4x the bar loop did not run
    speeds = [1.0, 2.0, 0.5]
    results = {
        "plain": [run(1.0 / k, 1.0 / k) for k in speeds],
        "fmel": [run(1.2 / k, 1.1 / k, reads=1000) for k in speeds],
        "fmel+duckdb": [run(1.5 / k, 1.1 / k) for k in speeds],
        "plain+busy": [run(1.3 / k, 1.25 / k) for k in speeds],
    }
    s = bench.summarise(results)
    assert s["busy_time"] == pytest.approx(1.3)
    assert s["busy_cpu"] == pytest.approx(1.25)
    assert s["time_fmel"] == pytest.approx(1.2)
    assert s["time_duckdb"] == pytest.approx(1.5)
    assert s["cpu_fmel"] == pytest.approx(1.1)
    assert s["writer_share"] == pytest.approx(0.4)
    # (1.1 - 1.0) s per 1000 reads at the median round (speed 1x): 100 us a read
    assert s["us_per_read_duckdb"] == pytest.approx(100.0)
    # a ratio of medians would mix the rounds: 1.5 / 1.0 here only because the medians
    # happen to come from the same round; shuffle fmel+duckdb's rounds and it is not
    results["fmel+duckdb"] = [run(1.5 / k, 1.1 / k) for k in (2.0, 0.5, 1.0)]
    assert bench.summarise(results)["time_duckdb"] != pytest.approx(1.5)


def test_the_writer_share_is_split_into_flush_run_queue_and_sleep(bench: ModuleType) -> None:
    # fmel+duckdb: 1.5 s wall, 1.1 s on a core; of the 0.4 s it did not run, 0.1 s was the
    # final flush and 0.05 s waiting for a core: 0.25 s asleep in the bar loop (plain: 1 s)
    results = {
        "plain": [run(1.0, 1.0) for _ in range(3)],
        "fmel": [run(1.2, 1.1, reads=1000) for _ in range(3)],
        "fmel+duckdb": [{**run(1.5, 1.1), "run_queue_s": 0.05} for _ in range(3)],
        "plain+busy": [run(1.3, 1.25) for _ in range(3)],
    }
    s = bench.summarise(results)
    assert s["writer_share"] == pytest.approx(0.4)
    assert s["share_flush"] == pytest.approx(0.1)
    assert s["share_queue"] == pytest.approx(0.05)
    assert s["share_asleep"] == pytest.approx(0.25)
    assert "final flush 0.100, run queue 0.050, asleep in the bar loop 0.250" in "\n".join(
        bench.table("sma", s, 3)
    )


def test_the_benchmark_runs_the_writer_as_the_runner_does(bench: ModuleType) -> None:
    from analyzers.sinks.writer import SWITCH_INTERVAL_S

    assert bench.SWITCH_DEFAULT == SWITCH_INTERVAL_S
    from analyzers.config import LOCAL_BATCH_SIZE

    assert bench.BATCH_DEFAULT == LOCAL_BATCH_SIZE


def test_the_added_cpu_is_split_between_the_reads_and_the_bars(bench: ModuleType) -> None:
    # plain: 1.0 s of main CPU, 0.2 s of it in the agent's read loop; FMEL + store: 1.5 s, 0.5 s
    # in the read loop. 1000 reads, 100 bars: 300 us a read inside the loop, the other 0.2 s
    # is 2000 us a bar
    results = {
        "plain": [run(1.0, 1.0, read_cpu=0.2)],
        "fmel": [run(1.6, 1.6, reads=1000, read_cpu=0.5)],
        "fmel+duckdb": [run(1.6, 1.5, read_cpu=0.5)],
        "plain+busy": [run(1.0, 1.0, read_cpu=0.2)],
    }
    s = bench.summarise(results)
    assert s["us_in_reads_duckdb"] == pytest.approx(300.0)
    assert s["us_per_bar_duckdb"] == pytest.approx(2000.0)
    assert s["us_per_read_duckdb"] == pytest.approx(500.0)
    assert "300.00 us per read inside" in "\n".join(bench.table("heavy", s, 1))


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_the_busy_process_ends_with_the_run_however_it_ends(
    bench: ModuleType, tmp_path: Path, signal_name: str
) -> None:
    """``plain+busy``'s CPU-bound process must not outlive the benchmark's child: a signal at
    the child alone (no finally runs after SIGKILL or an unhandled SIGTERM; SIGINT could land
    before the try) left it spinning at 100 % and holding the child's pipes open."""
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "FMEL_HASH_CACHE_DIR": str(tmp_path / "hc")}
    child = subprocess.Popen(
        [sys.executable, str(BENCH), "--child", "plain+busy", "--agent", "sma"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    kids = Path(f"/proc/{child.pid}/task/{child.pid}/children")
    busy = 0
    deadline = time.monotonic() + 60
    while not busy and time.monotonic() < deadline and child.poll() is None:
        pids = [int(p) for p in kids.read_text().split()] if kids.exists() else []
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if bench.BUSY_LOOP.encode() in cmdline:
                busy = pid
        time.sleep(0.002)
    assert busy, "the busy process never started"
    os.kill(child.pid, getattr(signal, signal_name))
    child.communicate(timeout=60)  # returns: nothing else holds the pipe
    gone = time.monotonic() + 10
    while time.monotonic() < gone and Path(f"/proc/{busy}").exists():
        stat = Path(f"/proc/{busy}/stat").read_text() if Path(f"/proc/{busy}").exists() else ""
        if stat.split(") ", 1)[-1].startswith("Z"):  # exited, not reaped yet
            break
        time.sleep(0.01)
    else:
        assert not Path(f"/proc/{busy}").exists(), "the busy process outlived the run"
