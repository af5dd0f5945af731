"""``benchmarks/bench_stages.py``: each stage still does what its table row says.

The benchmark counts instructions under valgrind (its figures are not checked: timings and
counts belong in ``benchmarks/``). Its stages cut parts of FMEL out by replacing functions by
name; a renamed or moved function would leave a stage doing more or less than its row says,
and the table would put that cost in the wrong place. So each stage's child runs once, without
valgrind (the SMA-cross agent on the bundled data), and reports what happened: the lines
tracked, the reads that reached the bars' buffers, the records submitted, made into Arrow
tables and stored."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "bench_stages.py"
STAGES = ("plain", "analyzer", "lines", "reads", "record", "settle", "duckdb")


@pytest.fixture(scope="module")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"}
    out = {}
    for stage in STAGES:
        done = subprocess.run(
            [sys.executable, str(BENCH), "--child", stage, "sma", "--facts"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            cwd=tmp_path_factory.mktemp("bench"),
            timeout=300,
        )
        out[stage] = json.loads(done.stdout.splitlines()[-1])
    return out


def test_the_stages_are_the_benchmarks_own(facts: dict[str, dict[str, Any]]) -> None:
    sys.path.insert(0, str(BENCH.parent))
    import bench_stages

    assert tuple(facts) == bench_stages.STAGES


def test_each_stage_adds_its_part(facts: dict[str, dict[str, Any]]) -> None:
    bars = {f["bars"] for f in facts.values()}
    assert bars == {5031}
    total = facts["duckdb"]["reads_stored"]  # the default run's own reads
    assert total > 5031
    assert facts["plain"] == {"bars": 5031, "submitted": 0, "rows_stored": 0, "reads_stored": 0}
    # stage: (lines tracked, reads recorded, submitted, tabled, stored, recorded in Python);
    # the compiled record leaves the first bar (PRENEXT, before its callbacks are known) to
    # Python
    expected = {
        "analyzer": (False, 0, 0, 0, 0, 0),
        "lines": (True, 0, 0, 0, 0, 0),
        "reads": (True, total, 0, 0, 0, 0),
        "record": (True, total, 5031, 0, 0, 1),
        "settle": (True, total, 5031, 5031, 0, 1),
        "duckdb": (True, total, 5031, 5031, 5031, 1),
    }
    for stage, want in expected.items():
        assert _row(facts[stage]) == want, stage


def _row(f: dict[str, Any]) -> tuple[Any, ...]:
    return (
        f["lines_tracked"] > 0,
        f["reads_recorded"],
        f["submitted"],
        f["records_tabled"],
        f["rows_stored"],
        f["python_records"],
    )


def test_python_record_records_every_bar_in_python(
    facts: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """``--python-record``: the same run, every bar recorded by ``_record_py``."""
    done = subprocess.run(
        [sys.executable, str(BENCH), "--child", "duckdb", "sma", "--facts", "--python-record"],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
        cwd=tmp_path,
        timeout=300,
    )
    got = _row(json.loads(done.stdout.splitlines()[-1]))
    assert got == (*_row(facts["duckdb"])[:-1], 5031)
    # the feeds' lines and the agent's indicators (3 feeds of 7 lines, and more)
    assert facts["lines"]["lines_tracked"] > 21
    assert facts["lines"]["lines_tracked"] == facts["duckdb"]["lines_tracked"]
