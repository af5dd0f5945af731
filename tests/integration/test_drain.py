"""``python -m runtime.drain`` against real stores: a torn spill line is counted, and an
unreachable store ends the drain at its default time limit with exit code 1 (issue 17, findings
8 and 9).

Runs the command as a subprocess (its signal handlers and logging are the real ones); the spill
files are written with :class:`~analyzers.sinks.spill.SpillFile`, as a run writes them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import duckdb

from analyzers.schema import to_row
from analyzers.sinks.spill import SpillFile
from tests.conftest import REPO, clean_env
from tests.unit.test_writer import record

# The command with its default --timeout-s shortened (the shipped default, 900 s, is what an
# operator gets; the test checks that the default path ends, not its length).
_DRAIN = "import sys, runtime.drain as d; d.DEFAULT_TIMEOUT_S = {t}; sys.exit(d.main([]))"


def _spill(path: Path, n: int, torn: bool) -> None:
    SpillFile(path).append([to_row(record(i)) for i in range(n)])
    if torn:  # a crash during an append: half a line, no newline
        line = json.dumps(to_row(record(n)))
        with open(path, "a", encoding="utf-8") as f:
            f.write(line[: len(line) // 2])


def _run(env: dict[str, str], timeout_default_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _DRAIN.format(t=timeout_default_s)],
        cwd=REPO,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_torn_spill_line_is_counted_in_the_drains_output(tmp_path: Path) -> None:
    spill_dir = tmp_path / "spill"
    _spill(spill_dir / "spill-local.jsonl", 5, torn=True)
    env = {"FMEL_SPILL_DIR": str(spill_dir), "FMEL_LOCAL_PATH": str(tmp_path / "d.duckdb")}
    done = _run(env, 60.0)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["drained"], result["rejected"], result["torn"], result["left"]) == (5, 0, 1, 0)
    with duckdb.connect(str(tmp_path / "d.duckdb"), read_only=True) as con:
        row = con.execute("SELECT COUNT(*) FROM decisions").fetchone()
    assert row is not None and row[0] == 5


def test_an_unreachable_store_ends_the_drain_at_its_default_limit_with_exit_1(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spill_dir = tmp_path / "spill"
    _spill(spill_dir / "spill-bigquery.jsonl", 7, torn=False)
    env = {
        "FMEL_SINK": "bigquery",
        "FMEL_SPILL_DIR": str(spill_dir),
        "GOOGLE_CLOUD_PROJECT": "test",
        "BIGQUERY_EMULATOR_HOST": f"http://127.0.0.1:{port}",
        "FMEL_BQ_TIMEOUT_S": "1",
        "SHUTDOWN_TIMEOUT_S": "2",
    }
    done = _run(env, 1.0)
    assert done.returncode == 1, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["drained"], result["torn"], result["left"]) == (0, 0, 7)
    assert "7 decision records are still in" in done.stderr
    assert SpillFile(spill_dir / "spill-bigquery.jsonl").pending() == 7


def test_a_signal_as_the_drain_prints_its_result_keeps_its_exit_code(tmp_path: Path) -> None:
    """``python -m runtime.drain`` as an operator runs it: once its result is printed, a SIGTERM
    (the process exiting) does not turn exit 0 into 143 (an attack's finding: CPython's
    finalization restores the default handlers; the entry point blocks the signals first)."""
    import select
    import signal

    spill_dir = tmp_path / "spill"
    _spill(spill_dir / "spill-local.jsonl", 50, torn=False)
    env = {"FMEL_SPILL_DIR": str(spill_dir), "FMEL_LOCAL_PATH": str(tmp_path / "d.duckdb")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.drain"],
        cwd=REPO,
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert select.select([proc.stdout], [], [], 120)[0], "no result"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])["left"] == 0
