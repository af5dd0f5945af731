"""``MODE=optimize python runner.py`` as a user runs it: the report, the tables, the recorded
decisions, bad settings, and a clean stop on SIGINT that keeps every finished trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.conftest import REPO, clean_env, run_runner

pytestmark = pytest.mark.e2e

_FOREIGN = ("OPTIMIZE_", "WALK_FORWARD", "RAY_ADDRESS")


def env(extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in clean_env().items() if not k.startswith(_FOREIGN)}
    return {**base, **extra}


def runner(cwd: Path, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # run_runner's clean_env keeps OPTIMIZE_*/RAY_ADDRESS of the caller's shell: drop them.
    clear = {k: "" for k in clean_env() if k.startswith(_FOREIGN)}
    return run_runner(cwd, {**clear, **extra})


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_walk_forward_reports_folds_side_by_side_and_records_each_best(workdir: Path) -> None:
    proc = runner(
        workdir,
        {
            "MODE": "optimize",
            "OPTIMIZE_SPACE": '{"fast": [5, 10], "slow": {"low": 30, "high": 60, "step": 30}}',
            "WALK_FORWARD": '{"train": "3y", "test": "1y"}',
            "OPTIMIZE_WORKERS": "2",
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Optimisation report  study" in out and "INTERRUPTED" not in out
    assert "train 3y, test 1y, step 1y: 6 fold(s)" in out
    assert "24 of 24 run (0 failed, 0 pruned)" in out and "process pool, 2 workers" in out
    header = next(line for line in out.splitlines() if line.startswith("fold"))
    for column in ("train", "test", "best params", "IS sharpe", "OOS sharpe", "OOS ret %"):
        assert column in header
    assert "out-of-sample  6 test windows chained:" in out

    db = workdir / "fmel.duckdb"
    assert query(db, "SELECT count(*), count(DISTINCT session_id) FROM trials") == [(24, 24)]
    folds = query(
        db,
        "SELECT fold, complete, best_session_id, decisions, is_sharpe, oos_sharpe "
        "FROM folds ORDER BY fold",
    )
    assert [f[0] for f in folds] == list(range(6)) and all(f[1] for f in folds)
    # each fold's best ran again with FMEL on, under the best trial's session id
    recorded = dict(query(db, "SELECT session_id, count(*) FROM decisions GROUP BY 1"))
    assert recorded == {f[2]: f[3] for f in folds}
    assert set(query(db, "SELECT DISTINCT mode FROM decisions")) == {("optimize",)}
    # the fold's numbers are its best trial's
    for fold, _, session, _, is_sharpe, oos_sharpe in folds:
        assert query(
            db, f"SELECT is_sharpe, oos_sharpe FROM trials WHERE session_id = '{session}'"
        ) == [(is_sharpe, oos_sharpe)]
        assert query(
            db, f"SELECT max(objective) FROM trials WHERE fold = {fold} AND status = 'complete'"
        ) == [(is_sharpe,)]


def test_one_point_without_walk_forward_is_the_backtest(workdir: Path, tmp_path: Path) -> None:
    """The same building blocks: an optimisation of the default params over the whole data ends
    where ``MODE=backtest`` ends, bar for bar."""
    common = {"SYMBOLS": "SP500"}
    back = runner(workdir, common)
    assert back.returncode == 0, back.stderr[-3000:]
    opt_dir = tmp_path / "opt"
    opt_dir.mkdir()
    opt = runner(
        opt_dir,
        {**common, "MODE": "optimize", "OPTIMIZE_SPACE": '{"fast": 10, "slow": [30]}'},
    )
    assert opt.returncode == 0, opt.stderr[-3000:]
    assert "none: one in-sample fold over the common span" in opt.stdout
    (bars, end_value) = query(
        workdir / "fmel.duckdb",
        "SELECT count(*), arg_max(portfolio_value, decision_point) FROM decisions",
    )[0]
    trial = query(opt_dir / "fmel.duckdb", "SELECT is_bars, is_end_value_usd FROM trials")
    assert trial == [(bars, pytest.approx(end_value, rel=1e-12))]
    assert bars == 5031


def test_record_all_merges_every_trials_decisions_into_the_local_store(workdir: Path) -> None:
    """Workers cannot share the DuckDB file: each writes its own, the runner merges it."""
    proc = runner(
        workdir,
        {
            "MODE": "optimize",
            "SYMBOLS": "GOOG",
            "OPTIMIZE_SPACE": '{"fast": [5, 10, 40], "slow": [30]}',
            "OPTIMIZE_RECORD": "all",
            "OPTIMIZE_WORKERS": "2",
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 of 3 run (1 failed, 0 pruned)" in proc.stdout  # fast=40 > slow=30: refused
    # helper-74: it said "recorded for 1 session(s)", counting the folds' bests
    assert "recorded for each of the 3 trial(s), one session each (OPTIMIZE_RECORD=all)" in (
        proc.stdout
    )
    db = workdir / "fmel.duckdb"
    trials = dict(query(db, "SELECT session_id, decisions FROM trials WHERE status = 'complete'"))
    decisions = dict(query(db, "SELECT session_id, count(*) FROM decisions GROUP BY 1"))
    assert decisions == trials and len(trials) == 2
    assert set(trials.values()) == {2148}  # every GOOG bar, for each trial
    assert not (workdir / ".fmel.duckdb.parts").exists()  # merged and removed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"OPTIMIZE_SPACE": '{"fastt": [5]}'},
            "OPTIMIZE_SPACE: SmaCrossAgent has no param(s) fastt",
        ),
        ({}, "OPTIMIZE_SPACE is required in MODE=optimize"),
        (
            {"OPTIMIZE_SPACE": '{"fast": [5]}', "WALK_FORWARD": '{"train": "20y", "test": "1y"}'},
            "does not fit",
        ),
        (
            {"OPTIMIZE_SPACE": '{"fast": [5]}', "OPTIMIZE_METRIC": "profit"},
            "OPTIMIZE_METRIC='profit'",
        ),
        (
            {"OPTIMIZE_SPACE": '{"fast": [5]}', "OPTIMIZE_SAMPLE": "tpe"},
            "did you mean OPTIMIZE_SAMPLER",
        ),
        # a fresh-context attack: each ran (true as SMA(1), and won), or failed every trial
        (
            {"OPTIMIZE_SPACE": '{"fast": [true, 5]}'},
            "OPTIMIZE_SPACE: param 'fast' of SmaCrossAgent expects a whole number",
        ),
        (
            {"OPTIMIZE_SPACE": '{"slow": {"low": 30, "high": 60, "step": 10.0}}'},
            "got a range of numbers",
        ),
        ({"OPTIMIZE_SPACE": '{"fast": [5]}', "OPTIMIZE_SEED": "-3"}, "OPTIMIZE_SEED"),
        (
            {
                "OPTIMIZE_SPACE": '{"fast": [5, 10]}',
                "OPTIMIZE_SAMPLER": "random",
                "OPTIMIZE_TRIALS": "2",
                "OPTIMIZE_SEED": "4294967295",
                "WALK_FORWARD": '{"train": "4y", "test": "1y"}',
            },
            "OPTIMIZE_SEED=4294967295: fold k uses seed + k",
        ),
        ({"OPTIMIZE_SPACE": '{"fast": [5]}', "RAY_ADDRESS": "127.0.0.1:1"}, "RAY_ADDRESS"),
        ({"OPTIMIZE_SPACE": '{"fast": [5]}', "FMEL_LOCAL_PATH": "."}, "FMEL_LOCAL_PATH=."),
        # helper-74: a refused connection ended in a traceback (ConnectionError, exit 1)
        (
            {
                "OPTIMIZE_SPACE": '{"fast": [5]}',
                "FMEL_SINK": "bigquery",
                "GOOGLE_CLOUD_PROJECT": "p",
                "BIGQUERY_EMULATOR_HOST": "http://127.0.0.1:1",
            },
            "FMEL_SINK=bigquery: cannot create or open the study tables in p.fmel",
        ),
    ],
)
def test_bad_settings_fail_at_start_with_exit_2(
    workdir: Path, extra: dict[str, str], message: str
) -> None:
    proc = runner(workdir, {"MODE": "optimize", **extra})
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (workdir / "fmel.duckdb").exists()  # refused before anything was written


@pytest.mark.parametrize("sig, group", [(signal.SIGINT, False), (signal.SIGTERM, True)])
def test_a_signal_stops_cleanly_and_keeps_every_finished_trial(
    workdir: Path, sig: signal.Signals, group: bool
) -> None:
    """SIGINT to the driver (Ctrl-C), or SIGTERM to the whole process group (``kill -TERM
    -PGID``, systemd): the workers ignore both (an attack found the group's SIGTERM killed
    them and failed the study with exit 1); the driver lets the running trials finish."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "runner.py")],
        cwd=workdir,
        start_new_session=True,
        env=env(
            {
                "MODE": "optimize",
                "OPTIMIZE_SPACE": (
                    '{"fast": {"low": 2, "high": 20}, "slow": {"low": 30, "high": 200, "step": 10}}'
                ),
                "WALK_FORWARD": '{"train": "2y", "test": "6m"}',
                "OPTIMIZE_WORKERS": "2",
                "LOG_LEVEL": "DEBUG",
                "LOG_FORMAT": "json",
            }
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stored = 0
    lines: list[str] = []
    assert proc.stderr is not None
    try:
        for line in proc.stderr:  # blocks until the runner logs: nothing to sleep on
            lines.append(line)
            if "stored:" in line and json.loads(line).get("logger") == "runtime.research.study":
                stored += 1
                if stored == 3:
                    if group:
                        os.killpg(proc.pid, sig)
                    else:
                        proc.send_signal(sig)
                    break
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += err.splitlines(keepends=True)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert "(INTERRUPTED)" in out
    messages = [json.loads(x).get("message", "") for x in lines if x.startswith("{")]
    stored_total = sum(1 for m in messages if " stored: " in m)
    assert any(f"{sig.name}: finishing the running trials" in m for m in messages)
    db = workdir / "fmel.duckdb"
    (rows,) = query(db, "SELECT count(*) FROM trials")[0]
    assert rows == stored_total >= 3
    assert rows < 19 * 18 * 13  # far from the planned sweep
    # the fold being searched is stored as incomplete, with its best so far
    assert query(db, "SELECT count(*) FROM folds WHERE NOT complete") == [(1,)]
    assert f"{rows} of {19 * 18 * 13} run" in out


@pytest.mark.parametrize("record", ["none", "best"])
def test_strict_lookahead_fails_every_trial_that_reads_ahead(workdir: Path, record: str) -> None:
    """helper-74: with FMEL_STRICT_LOOKAHEAD=true, trials ran without FMEL (only recorded ones
    were checked), so a look-ahead agent won every fold (+197 % out of sample, exit 0); with
    OPTIMIZE_RECORD=all the same study chose the other params. Now every trial is checked."""
    proc = runner(
        workdir,
        {
            "MODE": "optimize",
            "SYMBOLS": "GOOG",
            "AGENT": "tests.agents_for_tests:PeekAgent",
            "OPTIMIZE_SPACE": '{"peek": [false, true]}',
            "OPTIMIZE_RECORD": record,
            "OPTIMIZE_WORKERS": "1",
            "FMEL_STRICT_LOOKAHEAD": "true",
            "WALK_FORWARD": '{"train": "3y", "test": "1y"}',
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = workdir / "fmel.duckdb"
    rows = query(db, "SELECT params, status, error FROM trials ORDER BY fold, trial")
    assert rows, proc.stdout
    for params, status, error in rows:
        if json.loads(params)["peek"]:
            assert status == "failed" and "LookAheadError" in error, (params, status, error)
        else:
            assert status == "complete", (params, status, error)
    best = query(db, "SELECT DISTINCT best_params FROM folds")
    assert [json.loads(b)["peek"] for (b,) in best] == [False]


def test_a_trial_that_fails_only_out_of_sample_keeps_its_in_sample_objective(
    workdir: Path, tmp_path: Path
) -> None:
    """helper-74: params are chosen on the in-sample objective only (docs/research.md), but a
    trial that raised in its test window was left out of the choice, so the test window chose
    (another period won, and its out-of-sample return was reported)."""
    common = {
        "MODE": "optimize",
        "SYMBOLS": "GOOG",
        "AGENT": "tests.agents_for_tests:OutOfSampleBug",
        "OPTIMIZE_SPACE": '{"period": [5, 10, 20, 40]}',
        "OPTIMIZE_RECORD": "none",
        "OPTIMIZE_WORKERS": "1",
        "BACKTEST_END": "2007-08-18",
        "WALK_FORWARD": '{"train": "2y", "test": "1y"}',
    }
    runs = {}
    for bug in (0, 20):
        where = tmp_path / f"bug{bug}"
        where.mkdir()
        proc = runner(
            where,
            {**common, "AGENT_PARAMS": json.dumps({"bug_period": bug, "bug_from": "2007-01-01"})},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        db = where / "fmel.duckdb"
        runs[bug] = (
            proc.stdout,
            dict(query(db, "SELECT params, objective FROM trials")),
            query(db, "SELECT best_params FROM folds"),
            query(db, "SELECT status, error, is_bars FROM trials WHERE params LIKE '%20}'"),
        )
    clean, buggy = runs[0], runs[20]
    assert buggy[1] == clean[1]  # the same in-sample objectives, the failed trial's too
    assert buggy[2] == clean[2] == [('{"period": 20}',)]  # so the same choice
    [(status, error, is_bars)] = buggy[3]
    assert status == "failed" and "ZeroDivisionError" in error and is_bars > 400
    assert "failed OOS     fold(s) 0: the params chosen in-sample failed" in buggy[0]
    assert "failed OOS" not in clean[0]


def test_skipped_csv_rows_are_counted_in_the_report(workdir: Path, tmp_path: Path) -> None:
    """helper-74: CSV_ON_BAD_ROWS=skip counts and reports skipped rows (docs/csv.md); the
    optimisation report did not say them (only a log line on stderr did)."""
    data = tmp_path / "data"
    data.mkdir()
    lines = (REPO / "data" / "GOOG.csv").read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + ",oops,1,1,1,1"  # one bad row
    (data / "GOOG.csv").write_text("\n".join(lines) + "\n")
    proc = runner(
        workdir,
        {
            "MODE": "optimize",
            "SYMBOLS": "GOOG",
            "DATA_DIR": str(data),
            "CSV_ON_BAD_ROWS": "skip",
            "OPTIMIZE_SPACE": '{"fast": [5], "slow": [30]}',
            "OPTIMIZE_WORKERS": "1",
            "OPTIMIZE_RECORD": "none",
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped rows   GOOG.csv: 1 (CSV_ON_BAD_ROWS=skip)" in proc.stdout


def test_record_all_keeps_a_trials_decisions_it_cannot_merge(workdir: Path) -> None:
    """helper-74: a trial whose notes outgrew FMEL_LOCAL_MEMORY_LIMIT_MB (DuckDB reads 2,048
    decisions at a time, here 2,048 x 60 kB) ended the study with an uncaught
    OutOfMemoryException while merging, and its decision file was removed with the parts.
    Now the study stops with exit 1 and a report that says why, and the file is kept."""
    proc = runner(
        workdir,
        {
            "MODE": "optimize",
            "SYMBOLS": "GOOG",
            "AGENT": "tests.agents_for_tests:LongNotes",
            "OPTIMIZE_SPACE": '{"kb": [60], "every": [10, 20]}',
            "OPTIMIZE_RECORD": "all",
            "OPTIMIZE_WORKERS": "1",
            "FMEL_LOCAL_MEMORY_LIMIT_MB": "64",
        },
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "uncaught" not in proc.stderr
    assert "(FAILED)" in proc.stdout and "larger FMEL_LOCAL_MEMORY_LIMIT_MB" in proc.stdout
    [kept] = (workdir / "fmel.duckdb.unmerged").iterdir()
    con = duckdb.connect(str(kept), read_only=True)
    try:
        [(n, sessions)] = con.execute(
            "SELECT count(*), count(DISTINCT session_id) FROM decisions"
        ).fetchall()
    finally:
        con.close()
    assert (n, sessions) == (2148, 1)  # every GOOG bar of the trial, nothing lost
