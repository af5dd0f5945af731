"""One process per spill folder (attack on issue 17): two runners sharing ``FMEL_SPILL_DIR``
replayed an earlier run's spill both, storing its decisions twice, and one stopped the other
by moving the spill's read position under it. The folder is now claimed (``flock``) by the
runner and by ``python -m runtime.drain``; a second one exits 2 naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from analyzers.sinks.spill import SpillDirClaim, SpillDirInUseError
from tests.conftest import REPO, clean_env
from tests.e2e.test_shutdown import RunnerProcess, runners

__all__ = ["runners"]  # the fixture, used by this module


def test_a_claimed_folder_is_refused_until_released(tmp_path: Path) -> None:
    first = SpillDirClaim(tmp_path / "spill")
    with pytest.raises(SpillDirInUseError, match=f"pid {os.getpid()}"):
        SpillDirClaim(tmp_path / "spill")
    first.release()
    SpillDirClaim(tmp_path / "spill").release()


def test_a_second_runner_and_a_drain_on_the_same_spill_folder_exit_2(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    env = {
        "AGENT": "tests.slow_agent:SlowAgent",
        "AGENT_PARAMS": '{"sleep_s": 0.02}',
        "SYMBOLS": "GOOG",
    }
    run = RunnerProcess(tmp_path, **env)
    runners.append(run)
    run.wait_for(
        "the run going",
        lambda: (run.metric("runner_bars_processed_total", feed="GOOG") or 0) >= 5,
    )
    other = tmp_path / "other"
    other.mkdir()
    second = RunnerProcess(other, **{**env, "FMEL_SPILL_DIR": str(tmp_path / "spill")})
    runners.append(second)
    assert second.finish(timeout_s=120) == 2
    errors = "".join(second.err_lines)
    assert "FMEL_SPILL_DIR" in errors and f"pid {run.proc.pid}" in errors
    drain = subprocess.run(
        [sys.executable, "-m", "runtime.drain"],
        cwd=REPO,
        env=clean_env(
            {"FMEL_SPILL_DIR": str(tmp_path / "spill"), "FMEL_LOCAL_PATH": str(other / "x.db")}
        ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert drain.returncode == 2 and "FMEL_SPILL_DIR" in drain.stderr, drain.stderr[-2000:]
    run.kill()
    # kill -9 releases the claim (the kernel drops the lock with the process).
    SpillDirClaim(tmp_path / "spill").release()
