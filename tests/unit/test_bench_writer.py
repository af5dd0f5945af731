"""``benchmarks/bench_writer.py``: its timers still wrap the writer's phases, and the split adds up.

The benchmark's figures are not checked (timings belong in ``benchmarks/``). What is: one real
run of its child (the SMA-cross agent on the bundled data, FMEL and the local store) finds every
phase it wraps (a renamed function would leave a phase at zero, and the table would say the
writer spends nothing there), and the phases nest as the table subtracts them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench_writer.py"


@pytest.fixture(scope="module")
def phases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    env = {"FMEL_HASH_CACHE_DIR": "off", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, str(BENCH), "--child", "fmel+duckdb", "--agent", "sma"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=tmp_path_factory.mktemp("bench"),
        timeout=300,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def test_every_wrapped_phase_is_timed_and_they_nest(phases: dict[str, float]) -> None:
    assert phases["bars"] == 5031
    assert 0 < phases["settle"] < phases["settle+table"] < phases["write"] < phases["writer"]
    assert phases["writer"] < phases["wall_s"]


def test_the_split_subtracts_nested_phases() -> None:
    sys.path.insert(0, str(BENCH.parent))
    import bench_writer

    plain = {"main_cpu_s": 1.0, "wall_s": 1.0, "bars": 1_000_000}
    fmel = {
        "main_cpu_s": 1.2,
        "wall_s": 1.4,
        "bars": 1_000_000,
        "settle": 0.05,
        "settle+table": 0.08,
        "write": 0.2,
        "writer": 0.25,
    }
    s = bench_writer.summarise({"plain": [plain], "fmel+duckdb": [fmel]})
    assert s["settle"] == pytest.approx(0.05)
    assert s["table"] == pytest.approx(0.03)
    assert s["insert"] == pytest.approx(0.12)
    assert s["other"] == pytest.approx(0.05)
    assert s["writer"] == pytest.approx(0.25)
