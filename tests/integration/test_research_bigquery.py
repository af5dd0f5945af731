"""With the BigQuery sink, a study streams its ``trials`` and ``folds`` rows to BigQuery
(bqemulator, the real client) and each fold's best decisions land in the decisions table."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import duckdb
import pytest

from runtime.config import load_config
from runtime.research.cli import run_optimize
from tests.bqemu_harness import BigQueryEmulator, unique_dataset

pytestmark = pytest.mark.slow

ENV = {
    "MODE": "optimize",
    "OPTIMIZE_SPACE": '{"fast": [5, 10], "slow": [30, 60]}',
    "WALK_FORWARD": '{"train": "4y", "test": "2y"}',
    "OPTIMIZE_WORKERS": "2",
    "PROGRESS": "off",
}


def test_trials_and_folds_stream_to_bigquery_like_to_duckdb(
    tmp_path: Path, bq_emulator: BigQueryEmulator
) -> None:
    dataset = unique_dataset("optimize")
    out = StringIO()
    env = {
        **ENV,
        **bq_emulator.env(),
        "FMEL_SINK": "bigquery",
        "FMEL_DATASET": dataset,
        "FMEL_SPILL_DIR": str(tmp_path / "spill"),
    }
    assert run_optimize(load_config(env), session_id="bq", out=out) == 0, out.getvalue()
    assert f"BigQuery {bq_emulator.project}.{dataset} (tables trials, folds)" in out.getvalue()

    local = tmp_path / "local.duckdb"
    ref = {**ENV, "FMEL_LOCAL_PATH": str(local), "FMEL_SPILL_DIR": str(tmp_path / "spill2")}
    assert run_optimize(load_config(ref), session_id="local", out=StringIO()) == 0

    t = f"`{bq_emulator.project}.{dataset}"
    got = bq_emulator.query(
        f"SELECT fold, trial, status, params, objective, oos_sharpe FROM {t}.trials` "
        "WHERE study_id = 'bq' ORDER BY fold, trial"
    )
    with duckdb.connect(str(local), read_only=True) as con:
        want = con.execute(
            "SELECT fold, trial, status, params, objective, oos_sharpe FROM trials "
            "ORDER BY fold, trial"
        ).fetchall()
        want_folds = con.execute(
            "SELECT fold, best_trial, decisions FROM folds ORDER BY fold"
        ).fetchall()
    assert len(want) == 4 * 2  # 2 folds of 4y + 2y over 2004-08..2013-03 (a 3rd: too short)
    assert [tuple(r.values()) for r in got] == [
        (f, n, s, p, pytest.approx(o), pytest.approx(x)) for f, n, s, p, o, x in want
    ]
    folds = bq_emulator.query(
        f"SELECT fold, best_trial, best_session_id, decisions, recorded FROM {t}.folds` "
        "WHERE study_id = 'bq' ORDER BY fold"
    )
    assert [(r["fold"], r["best_trial"], r["decisions"]) for r in folds] == want_folds
    assert all(r["recorded"] for r in folds)
    counts = bq_emulator.query(
        f"SELECT session_id, COUNT(*) AS n FROM {t}.decisions` GROUP BY session_id"
    )
    assert {r["session_id"]: r["n"] for r in counts} == {
        r["best_session_id"]: r["decisions"] for r in folds
    }
