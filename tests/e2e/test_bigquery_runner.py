"""A real ``runner.py`` session writing its decisions to BigQuery (bqemulator).

* The main job (the example agent on the bundled real data) runs as a subprocess with
  ``FMEL_SINK=bigquery`` and ``BIGQUERY_EMULATOR_HOST``; the same job with the local store is the
  reference: BigQuery must hold exactly the decisions the run reported, each once, bar for bar
  equal to what the local store recorded.
* An outage, with the network to the emulator going through a loopback TCP proxy
  (:mod:`tests.tcp_proxy`) and read-heavy decisions (~130 reads each, six feeds): cut mid-run,
  cut from the start, and cut until the run ends (then ``python -m runtime.drain``). Each time
  the report's counts add up (written + spilled + rejected = decisions), the spill is drained as
  soon as BigQuery answers again, and afterwards every decision is in BigQuery exactly once
  (rows per decision id counted: no duplicate, none missing).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from google.cloud import bigquery

from analyzers.sinks.spill import SpillFile
from tests.bq_read_heavy import six_feed_data_dir
from tests.bqemu_harness import BigQueryEmulator, unique_dataset
from tests.conftest import REPO, clean_env, run_runner
from tests.e2e.test_shutdown import RunnerProcess, report_numbers
from tests.tcp_proxy import TcpProxy

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


# ---------------------------------------------------------------------------------------------
# Outages through a loopback TCP proxy
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def proxy(bq_emulator: BigQueryEmulator) -> Iterator[TcpProxy]:
    p = TcpProxy(f"127.0.0.1:{bq_emulator.port}")
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def runners() -> Iterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for r in started:
        r.kill()


def heavy_env(tmp: Path, emu: BigQueryEmulator, proxy: TcpProxy, dataset: str) -> dict[str, str]:
    """A read-heavy backtest (six daily feeds, 2016: 252 decisions of ~130 reads) paced to
    last about 20 s, writing to the emulator through the proxy."""
    data_dir, symbols = six_feed_data_dir(tmp / "data")
    return {
        "BIGQUERY_EMULATOR_HOST": f"http://{proxy.address}",
        "GOOGLE_CLOUD_PROJECT": emu.project,
        "FMEL_SINK": "bigquery",
        "FMEL_DATASET": dataset,
        "FMEL_FLUSH_INTERVAL_S": "0.5",
        "FMEL_BQ_TIMEOUT_S": "10",
        "DATA_DIR": str(data_dir),
        "SYMBOLS": symbols,
        "BACKTEST_START": "2016-01-01",
        "BACKTEST_END": "2016-12-31",
        "AGENT": "tests.bq_read_heavy:ReadHeavyAgent",
        "AGENT_PARAMS": '{"sleep_s": 0.08}',
        "SHUTDOWN_TIMEOUT_S": "120",
    }


def once_each(emu: BigQueryEmulator, dataset: str, session: str) -> tuple[int, int, list[int]]:
    """(rows, distinct decision ids, sorted decision points) of a session in BigQuery."""
    table = f"{emu.project}.{dataset}.decisions"
    param = [bigquery.ScalarQueryParameter("s", "STRING", session)]
    got = emu.query(
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT decision_id) AS d FROM `{table}` "
        "WHERE session_id = @s",
        param,
    )
    points = emu.query(
        f"SELECT decision_point FROM `{table}` WHERE session_id = @s ORDER BY 1", param
    )
    return int(got[0]["n"]), int(got[0]["d"]), [int(r["decision_point"]) for r in points]


def metric(run: RunnerProcess, name: str) -> float:
    return run.metric(f"runner_decision_{name}") or 0.0


def test_a_cut_mid_run_is_drained_during_the_run_and_each_decision_stored_once(
    tmp_path: Path,
    bq_emulator: BigQueryEmulator,
    proxy: TcpProxy,
    runners: list[RunnerProcess],
) -> None:
    dataset = unique_dataset("cut")
    run = RunnerProcess(tmp_path, **heavy_env(tmp_path, bq_emulator, proxy, dataset))
    runners.append(run)
    run.wait_for("decisions written", lambda: metric(run, "records_written_total") >= 20)
    proxy.cut("reset")
    run.wait_for("decisions spilled", lambda: metric(run, "records_in_spill") >= 10)
    proxy.restore()
    # Drained while the run goes on (wait_for fails if the runner exits first).
    run.wait_for(
        "the spill drained",
        lambda: metric(run, "records_spilled_total") > 0 and metric(run, "records_in_spill") == 0,
    )
    assert run.finish(timeout_s=300) == 0, "".join(run.err_lines[-20:])
    rep = report_numbers(run.stdout)
    assert rep["written"] + rep["spilled"] + rep["rejected"] == rep["decisions"] > 200
    assert (rep["written"], rep["spilled"], rep["rejected"]) == (rep["decisions"], 0, 0)
    assert "spill left" not in run.stdout
    n, distinct, points = once_each(bq_emulator, dataset, rep["session"])
    assert n == distinct == rep["decisions"] and points == list(range(rep["decisions"]))


def test_a_cut_from_the_start_then_every_decision_once(
    tmp_path: Path,
    bq_emulator: BigQueryEmulator,
    proxy: TcpProxy,
    runners: list[RunnerProcess],
) -> None:
    dataset = unique_dataset("cut0")
    proxy.cut("reset")  # BigQuery unreachable before the run starts: no table yet either
    run = RunnerProcess(tmp_path, **heavy_env(tmp_path, bq_emulator, proxy, dataset))
    runners.append(run)
    run.wait_for("decisions spilled", lambda: metric(run, "records_in_spill") >= 30)
    assert metric(run, "records_written_total") == 0 and metric(run, "sink_healthy") == 0
    proxy.restore()
    run.wait_for("the spill drained", lambda: metric(run, "records_in_spill") == 0)
    assert run.finish(timeout_s=300) == 0, "".join(run.err_lines[-20:])
    rep = report_numbers(run.stdout)
    assert (rep["written"], rep["spilled"], rep["rejected"]) == (rep["decisions"], 0, 0)
    n, distinct, points = once_each(bq_emulator, dataset, rep["session"])
    assert n == distinct == rep["decisions"] and points == list(range(rep["decisions"]))


def test_a_run_that_ends_cut_off_keeps_its_spill_and_the_drain_command_writes_it_once(
    tmp_path: Path,
    bq_emulator: BigQueryEmulator,
    proxy: TcpProxy,
    runners: list[RunnerProcess],
) -> None:
    dataset = unique_dataset("cutend")
    env = heavy_env(tmp_path, bq_emulator, proxy, dataset)
    env["AGENT_PARAMS"] = '{"sleep_s": 0.02}'
    env["SHUTDOWN_TIMEOUT_S"] = "5"
    run = RunnerProcess(tmp_path, **env)
    runners.append(run)
    run.wait_for("decisions written", lambda: metric(run, "records_written_total") >= 20)
    proxy.cut("answers")  # requests arrive, answers are lost: outcomes unknown to the runner
    run.wait_for(
        "the writer's last count",
        lambda: any("decisions: " in str(e.get("message")) for e in run.log),
        timeout_s=120,
    )
    proxy.restore()  # the HTML report after the flush reads BigQuery: let it
    assert run.finish(timeout_s=300) == 0, "".join(run.err_lines[-20:])
    rep = report_numbers(run.stdout)
    assert rep["written"] + rep["spilled"] + rep["rejected"] == rep["decisions"]
    assert rep["spilled"] > 0
    spill = tmp_path / "spill" / "spill-bigquery.jsonl"
    assert SpillFile(spill).pending() == rep["spilled"]
    assert f"spill left       {rep['spilled']} records in {spill}" in run.stdout
    # Some of those requests reached BigQuery before their answers were lost: the drain finds
    # them by insert id and writes only the others.
    drain_env = {k: v for k, v in env.items() if not k.startswith(("AGENT", "BACKTEST"))}
    done = subprocess.run(
        [sys.executable, "-m", "runtime.drain"],
        cwd=tmp_path,
        env=clean_env(
            {**drain_env, "FMEL_SPILL_DIR": str(tmp_path / "spill"), "LOG_FORMAT": "json"}
        ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Rows the store held already are found by insert id, and each was named in doubt by the
    # run's report (its answer was lost): the counts say what happened.
    already = result.pop("already_stored")
    print("in doubt:", rep["unsure"], "already stored:", already, "spilled:", rep["spilled"])
    assert already <= rep["unsure"] <= rep["spilled"]
    assert result == {
        "drained": rep["spilled"],
        "rejected": 0,
        "torn": 0,
        "left": 0,
        "spill": str(spill),
    }
    assert not spill.exists()
    n, distinct, points = once_each(bq_emulator, dataset, rep["session"])
    assert n == distinct == rep["decisions"] and points == list(range(rep["decisions"]))
    # Nothing left: a second drain has nothing to do.
    again = subprocess.run(
        [sys.executable, "-m", "runtime.drain"],
        cwd=REPO,
        env=clean_env({**drain_env, "FMEL_SPILL_DIR": str(tmp_path / "spill")}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert again.returncode == 0 and json.loads(again.stdout)["left"] == 0


def test_the_drain_command_refuses_a_bad_configuration(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "runtime.drain"],
        cwd=tmp_path,
        env=clean_env({"FMEL_SINK": "bigquery", "FMEL_SPILL_DIR": str(tmp_path)}),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "GOOGLE_CLOUD_PROJECT" in done.stderr
