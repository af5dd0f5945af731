"""The HTML report with the BigQuery sink (bqemulator, real ``google-cloud-bigquery`` client): the
run stores its bars in ``session_bars`` beside its decisions and writes the page; the CLI
writes the same page later from BigQuery alone; and the page equals the one the same run
gives on the local DuckDB store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from google.cloud import bigquery

from tests.bqemu_harness import BigQueryEmulator, unique_dataset
from tests.conftest import DATA, REPO, clean_env, run_runner

pytestmark = pytest.mark.slow

SMALL_RUN = {"SYMBOLS": "GOOG,SP500", "BACKTEST_START": "2005-01-01", "BACKTEST_END": "2006-06-30"}


def rows_in_range(name: str) -> int:
    times = pd.to_datetime(pd.read_csv(DATA / name).iloc[:, 0], format="mixed")
    return int(
        ((times >= SMALL_RUN["BACKTEST_START"]) & (times <= SMALL_RUN["BACKTEST_END"])).sum()
    )


def page_parts(path: Path) -> tuple[dict[str, Any], str]:
    text = path.read_text(encoding="utf-8")
    data = re.search(
        r'<script id="explorer-data" type="application/json">(.*?)</script>', text, re.S
    )
    stats = re.search(r'<table id="stats">.*?</table>', text, re.S)
    assert data and stats
    payload = json.loads(data.group(1))
    payload.pop("session_id")
    return payload, stats.group(0)


def html_path(stdout: str) -> Path:
    m = re.search(r"^html report\s+(\S+)$", stdout, re.M)
    assert m, stdout
    return Path(m.group(1))


def test_report_from_bigquery_equals_the_local_one(
    tmp_path: Path, bq_emulator: BigQueryEmulator
) -> None:
    dataset = unique_dataset("report")
    bq_dir, local_dir = tmp_path / "bq", tmp_path / "local"
    bq_dir.mkdir()
    local_dir.mkdir()
    done = run_runner(
        bq_dir, {**SMALL_RUN, **bq_emulator.env(), "FMEL_SINK": "bigquery", "FMEL_DATASET": dataset}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    session = re.search(r"Portfolio report\s+session (\S+)", done.stdout)
    assert session
    bq_page = html_path(done.stdout)
    assert bq_page.parent == bq_dir

    bars = bq_emulator.query(
        f"SELECT symbol, count(*) AS n FROM `{bq_emulator.project}.{dataset}.session_bars` "
        "WHERE session_id = @s GROUP BY symbol ORDER BY symbol",
        [bigquery.ScalarQueryParameter("s", "STRING", session.group(1))],
    )
    assert [(r["symbol"], r["n"]) for r in bars] == [
        ("GOOG", rows_in_range("GOOG.csv")),
        ("SP500", rows_in_range("SP500.csv")),
    ]

    local = run_runner(local_dir, {**SMALL_RUN, "FMEL_SINK": "local"})
    assert local.returncode == 0, local.stderr[-3000:]
    want = page_parts(html_path(local.stdout))
    got = page_parts(bq_page)
    assert got[1] == want[1]  # the statistics
    assert got[0] == want[0]  # orders, decisions, reads, bars of the explorer
    assert len(got[0]["orders"]) > 3

    later = tmp_path / "later.html"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.reporting",
            "--bigquery-project",
            bq_emulator.project,
            "--bigquery-dataset",
            dataset,
            "--bigquery-endpoint",
            bq_emulator.endpoint,
            "--session",
            session.group(1),
            "--out",
            str(later),
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert page_parts(later) == got
