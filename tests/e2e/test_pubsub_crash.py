"""Crash durability, proven on the real Pub/Sub emulator: ``runner.py`` (paper mode) killed with
SIGKILL at five random moments and restarted at once each time, while bars keep coming. A bar's
message is acknowledged only once the decision made on it is in the writer's journal on disk;
the restarted runner reuses the deployment's subscription (so it gets what was not
acknowledged), replays the journal, and decision ids are ``<deployment>:<bar time>``. So at the
end: no bar lost (every decision names every symbol's bar of its time), no decision lost (one
per bar time), none duplicated (one row per id, one per bar time)."""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import pytest

from tests.soak_harness import SoakConfig, run_soak

pytestmark = pytest.mark.slow


def test_five_kills_at_random_moments_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    cfg = SoakConfig(
        duration_s=120.0,
        work=tmp_path,
        symbols=3,
        rate_hz=5.0,  # 600 bar times of one-second bars, five a second
        emulator_restarts=0,
        network_cuts=0,
        malformed_bursts=0,
        kills=5,
        seed=2026,
    )
    result = run_soak(cfg, progress=logging.getLogger(__name__).info)
    summary = result.as_dict()
    kills = [t for t, kind in result.events if kind == "kill"]
    assert len(kills) == 5 and len(result.runners) == 6, summary
    assert sum(r["exit"] == -9 for r in result.runners) == 5, summary
    assert result.missing_decisions == [], summary
    assert result.duplicate_decisions == 0 and result.decisions == 600, summary
    assert result.lost_bars == [], summary
    with duckdb.connect(str(tmp_path / "fmel.duckdb"), read_only=True) as con:
        ids, rows, sessions = con.execute(
            "SELECT count(DISTINCT decision_id), count(*), count(DISTINCT session_id) "
            "FROM decisions"
        ).fetchone() or (0, 0, 0)
    assert ids == rows == 600, summary
    assert sessions >= 2, summary  # decisions of several runner processes, ids still unique
