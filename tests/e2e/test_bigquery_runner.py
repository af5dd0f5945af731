"""A real ``runner.py`` session writing its decisions to BigQuery (bqemulator).

The main job (the example agent on the bundled real data) runs as a subprocess with
``FMEL_SINK=bigquery`` and ``BIGQUERY_EMULATOR_HOST``; the same job with the local store is the
reference: BigQuery must hold exactly the decisions the run reported, each once, bar for bar
equal to what the local store recorded.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from google.cloud import bigquery

from tests.bqemu_harness import BigQueryEmulator, unique_dataset
from tests.conftest import run_runner
from tests.test_shutdown import report_numbers

pytestmark = pytest.mark.slow


def test_runner_session_writes_every_decision_once(
    tmp_path: Path, bq_emulator: BigQueryEmulator
) -> None:
    dataset = unique_dataset("runner")
    bq_dir, local_dir = tmp_path / "bq", tmp_path / "local"
    bq_dir.mkdir()
    local_dir.mkdir()
    done = run_runner(
        bq_dir,
        {
            **bq_emulator.env(),
            "FMEL_SINK": "bigquery",
            "FMEL_DATASET": dataset,
            "LOG_FORMAT": "json",
        },
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rep = report_numbers(done.stdout)
    assert not rep["interrupted"] and rep["decisions"] > 5000
    assert rep["written"] == rep["decisions"] and rep["spilled"] == rep["rejected"] == 0
    table = f"{bq_emulator.project}.{dataset}.decisions"
    assert f"bigquery:{table}" in done.stdout  # the report says where the rows went
    got = bq_emulator.query(
        f"SELECT decision_point, bar_time, stage, action, reads, portfolio_value, "
        f"ARRAY_LENGTH(actions) AS events FROM `{table}` WHERE session_id = @s "
        "ORDER BY decision_point",
        [bigquery.ScalarQueryParameter("s", "STRING", rep["session"])],
    )
    assert [r["decision_point"] for r in got] == list(range(rep["decisions"]))

    ref = run_runner(local_dir, {"FMEL_SINK": "local"})
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_rep = report_numbers(ref.stdout)
    with duckdb.connect(str(local_dir / "fmel.duckdb"), read_only=True) as con:
        want = con.execute(
            "SELECT decision_point, bar_time, stage, action, reads, portfolio_value, "
            "len(actions) FROM decisions WHERE session_id = ? ORDER BY decision_point",
            [ref_rep["session"]],
        ).fetchall()
    assert len(want) == len(got)
    mismatches = [
        (g["decision_point"], w)
        for g, w in zip(got, want, strict=True)
        if (
            g["decision_point"],
            g["bar_time"],
            g["stage"],
            g["action"],
            g["reads"],
            round(g["portfolio_value"], 6),
            g["events"],
        )
        != (w[0], w[1], w[2], w[3], w[4], round(w[5], 6), w[6])
    ]
    assert mismatches == []
    assert sum(1 for g in got if g["action"] != "HOLD") > 20
