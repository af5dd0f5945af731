"""``runner.py`` when FMEL_SPILL_DIR cannot be written (issue 12): the run stops with one ERROR
naming the file and the errno, the report prints with every record accounted for, exit code 3.

A real OS error without root: FMEL_SPILL_DIR below a regular file (``ENOTDIR``). Backtest with
the store down too (BigQuery at a closed local port), so the spill is the only place left;
paper run on the Pub/Sub emulator, where the journal is written first.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest

from runtime.runner import EXIT_DECISIONS_FAILED
from tests.conftest import run_runner
from tests.e2e.test_pubsub_e2e import new_topic, paper_runner, replay, subscription
from tests.e2e.test_shutdown import RunnerProcess
from tests.pubsub_emulator import PubSubEmulator, free_port

pytestmark = pytest.mark.slow


def _errors(stderr_lines: list[str]) -> list[str]:
    return [
        rec["message"]
        for rec in (json.loads(line) for line in stderr_lines if line.startswith("{"))
        if rec["level"] in ("ERROR", "CRITICAL")
    ]


def test_a_backtest_whose_spill_and_store_both_fail_reports_what_is_lost(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder")
    spill = tmp_path / "afile" / "spill"
    done = run_runner(
        tmp_path,
        {
            "MODE": "backtest",
            "SYMBOLS": "GOOG,SP500",
            "BACKTEST_START": "2005-01-01",
            "BACKTEST_END": "2005-12-31",
            "FMEL_SINK": "bigquery",
            "GOOGLE_CLOUD_PROJECT": "local",
            "BIGQUERY_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}",  # nobody listens
            "FMEL_BQ_TIMEOUT_S": "1",
            "FMEL_SPILL_DIR": str(spill),
            "SHUTDOWN_TIMEOUT_S": "3",
            "LOG_FORMAT": "json",
            "PROGRESS": "off",
        },
        timeout_s=120,
    )
    assert done.returncode == EXIT_DECISIONS_FAILED, done.stderr[-3000:]
    errors = _errors(done.stderr.splitlines())
    disk = [m for m in errors if "cannot be kept on local disk" in m]
    assert len(disk) == 1 and str(spill) in disk[0] and "ENOTDIR" in disk[0], errors
    assert not [m for m in errors if "uncaught" in m], errors
    decided = int(re.search(r"^decisions\s+(\d+) recorded", done.stdout, re.M).group(1))  # type: ignore[union-attr]
    lost = int(re.search(r"^lost\s+(\d+) records", done.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert 0 < lost == decided, done.stdout  # nothing stored, nothing on disk: all counted lost
    assert "(0 written, 0 spilled, 0 rejected)" in done.stdout
    assert "DECISIONS FAILED" in done.stdout and "(INTERRUPTED)" in done.stdout


def test_a_paper_run_whose_journal_fails_stops_and_stores_what_it_decided(
    tmp_path: Path, pubsub_emulator: PubSubEmulator
) -> None:
    emu = pubsub_emulator
    topic = new_topic(emu)
    (tmp_path / "afile").write_text("not a folder")
    spill = tmp_path / "afile" / "spill"
    runner: RunnerProcess = paper_runner(
        tmp_path / "paper", emu, topic, SYMBOLS="GOOG,SP500", FMEL_SPILL_DIR=str(spill)
    )
    try:
        runner.wait_for("the subscription", lambda: subscription(emu, topic) in emu.subscriptions())
        pub = replay(emu, topic, "--start", "2005-01-01", "--end", "2005-03-31")
        pub.communicate(timeout=120)
        code = runner.finish(timeout_s=60)
    finally:
        runner.kill()
    assert code == EXIT_DECISIONS_FAILED, "".join(runner.err_lines[-30:])
    errors = _errors(runner.err_lines)
    disk = [m for m in errors if "cannot be kept on local disk" in m]
    assert len(disk) == 1 and "journal-local.jsonl" in disk[0] and "ENOTDIR" in disk[0], errors
    decided = int(re.search(r"^decisions\s+(\d+) recorded", runner.stdout, re.M).group(1))  # type: ignore[union-attr]
    assert decided > 0 and f"({decided} written, 0 spilled, 0 rejected)" in runner.stdout
    assert "DECISIONS FAILED" in runner.stdout and "lost " not in runner.stdout
    with duckdb.connect(str(tmp_path / "paper" / "fmel.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM decisions").fetchone() == (decided,)
