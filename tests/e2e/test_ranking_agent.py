"""The ranking agent runs on the bundled data through runner.py, and FMEL records the window
risk indicators it reads and the ranking it notes."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from tests.conftest import run_runner

pytestmark = pytest.mark.e2e


def test_ranking_agent_on_the_bundled_data(workdir: Path) -> None:
    proc = run_runner(
        workdir,
        {"SYMBOLS": "GOOG,SP500,NASDAQ", "AGENT": "agents.ranking_agent:RankingAgent"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decisions        5031 recorded" in proc.stdout
    con = duckdb.connect(str(workdir / "fmel.duckdb"), read_only=True)
    try:
        fields = {r[0] for r in con.sql("SELECT DISTINCT field FROM decision_reads").fetchall()}
        lookahead = con.sql("SELECT count(*) FROM decision_reads WHERE lookahead").fetchall()
        notes = con.sql(
            "SELECT notes FROM decisions WHERE notes IS NOT NULL ORDER BY decision_point"
        ).fetchall()
        filled = con.sql(
            "SELECT count(*) FROM decisions d, UNNEST(d.actions) t(a) WHERE a.event = 'COMPLETED'"
        ).fetchall()
    finally:
        con.close()
    assert {"momentum", "rv", "jump.jump", "vwap", "close"} <= fields, fields
    assert lookahead == [(0,)]
    assert filled[0][0] > 100
    first = json.loads(notes[0][0])
    assert len(first["ranking"]) >= 2 and set(first["weights"]) <= set(first["ranking"])
    # GOOG starts in 2004: it enters the ranking once it has enough history
    assert any("GOOG" in json.loads(n[0])["ranking"] for n in notes)
