"""A sweep on a real local Ray cluster (a head node with two worker processes, started with
``ray start``) gives the same trials, the same choices and the same recorded decisions as the
local process pool.

The cluster: ``ray start --head --block --num-cpus=2`` (a head node whose two worker processes run
the trials) as a child in its own session, with its own temp folder, ended by its process group
id. One node, not two: a second node would need Ray's cluster mode, which binds the machine's
network address instead of loopback. Ray resolves ``--node-ip-address=127.0.0.1`` to this
machine's network address (``ray._private.services.resolve_ip_for_localhost``) unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (``ray_constants.ENABLE_RAY_CLUSTER``; then
``get_node_ip_address`` answers the loopback address, ray-project/ray#18730): set for the nodes
and the driver, so every byte of the cluster stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import duckdb
import pytest

from runtime.config import load_config
from runtime.research.cli import run_optimize

RAY = str(Path(sys.executable).parent / "ray")
SPACE = '{"fast": [5, 10], "slow": [30, 60]}'
WALK = '{"train": "3y", "test": "1y"}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 60
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray head exited: {log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            # The GCS is not listening yet: nothing to await but the socket itself.
            time.sleep(0.05)
    raise TimeoutError(f"ray head not listening on {port}: {log.read_text()[-2000:]}")


def end(proc: subprocess.Popen[bytes]) -> None:
    """End a ``ray start --block`` and everything it started, by its process group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):  # children left in the group
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """A head node with 2 CPUs (two worker processes); yields the address ``127.0.0.1:<port>``."""
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]
    # Nothing to drain at teardown: stop at once instead of Ray's 30 s drain on SIGTERM. No
    # token auth: Ray 2.60 would otherwise use (or write) ~/.ray/auth_token, shared by every
    # Ray user of this machine; the cluster is this test's alone.
    auth = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env = {**os.environ, **auth, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_AUTH_MODE", "disabled")  # the driver (this process) alike
    patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from ray._private import ray_constants

    patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # read at import: set it too
    procs: list[subprocess.Popen[bytes]] = []
    head_log = tmp / "head.log"
    try:
        with head_log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                     f"--temp-dir={tmp}", *common],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env,
                )
            )  # fmt: skip
        wait_for_port(port, procs[0], head_log)
        address = f"127.0.0.1:{port}"
        # Its two worker processes registered: ask the cluster.
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        try:
            deadline = time.monotonic() + 60
            while ray.cluster_resources().get("CPU", 0) < 2:
                if time.monotonic() > deadline:
                    raise TimeoutError("the head node did not offer its 2 CPUs")
                time.sleep(0.1)
        finally:
            ray.shutdown()
        yield address
    finally:
        for proc in reversed(procs):
            end(proc)
        shutil.rmtree(tmp, ignore_errors=True)
        patch.undo()


def sweep(tmp_path: Path, name: str, **extra: str) -> tuple[int, str, Path]:
    db = tmp_path / f"{name}.duckdb"
    env = {
        "MODE": "optimize",
        "OPTIMIZE_SPACE": SPACE,
        "WALK_FORWARD": WALK,
        "FMEL_LOCAL_PATH": str(db),
        "FMEL_SPILL_DIR": str(tmp_path / f"{name}-spill"),
        "PROGRESS": "off",
        **extra,
    }
    out = StringIO()
    rc = run_optimize(load_config(env), session_id=name, out=out)
    return rc, out.getvalue(), db


TRIALS_SQL = """
SELECT fold, trial, status, params, objective, is_bars, is_total_return_pct, is_sharpe,
       is_sortino, is_calmar, is_max_drawdown_pct, is_end_value_usd, oos_bars,
       oos_total_return_pct, oos_sharpe, oos_sortino, oos_calmar, oos_max_drawdown_pct,
       oos_end_value_usd
FROM trials ORDER BY fold, trial
"""
FOLDS_SQL = """
SELECT fold, complete, trials, best_trial, best_params, objective, oos_sharpe, recorded, decisions
FROM folds ORDER BY fold
"""
DECISIONS_SQL = """
SELECT regexp_replace(session_id, '^[a-z]+-', ''), count(*), sum(portfolio_value)
FROM decisions GROUP BY 1 ORDER BY 1
"""


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_a_sweep_on_a_ray_cluster_equals_the_process_pool(ray_cluster: str, tmp_path: Path) -> None:
    rc_pool, report_pool, pool_db = sweep(tmp_path, "pool", OPTIMIZE_WORKERS="2")
    rc_ray, report_ray, ray_db = sweep(tmp_path, "ray", RAY_ADDRESS=ray_cluster)
    assert rc_pool == rc_ray == 0, report_pool + report_ray
    assert "process pool, 2 workers" in report_pool
    assert f"Ray cluster at {ray_cluster}, 2 actors (2 CPUs)" in report_ray

    trials = query(pool_db, TRIALS_SQL)
    assert len(trials) == 6 * 4  # 6 folds of 3y + 1y over 2004-08..2013-03, 4 points each
    assert query(ray_db, TRIALS_SQL) == trials  # the same numbers, to the last bit
    folds = query(pool_db, FOLDS_SQL)
    assert query(ray_db, FOLDS_SQL) == folds
    assert all(f[1] and f[7] and f[8] > 0 for f in folds)  # complete, best recorded
    # the recorded decisions of each fold's best: same sessions (study prefix aside), same values
    assert query(ray_db, DECISIONS_SQL) == query(pool_db, DECISIONS_SQL)
    # both nodes worked
    workers = query(ray_db, "SELECT count(DISTINCT worker) FROM trials")[0][0]
    assert workers == 2


def test_record_all_with_a_ray_cluster_and_a_local_store_is_refused(
    ray_cluster: str, tmp_path: Path
) -> None:
    rc, _, db = sweep(tmp_path, "refused", RAY_ADDRESS=ray_cluster, OPTIMIZE_RECORD="all")
    assert rc == 2 and not db.exists()
