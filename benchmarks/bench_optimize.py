"""Optimisation throughput: trials per minute sequential vs process pool vs local Ray, and the
peak memory of each worker.

The same study three times (SMA cross on the bundled daily files GOOG, SP500, NASDAQ, a grid
walk-forward, ``OPTIMIZE_RECORD=none`` so only trials are timed):

1. sequential: ``OPTIMIZE_WORKERS=1``, every trial in this process (the baseline);
2. pool: ``OPTIMIZE_WORKERS=<workers>`` processes (default: one per core);
3. Ray: ``RAY_ADDRESS=local`` (``ray.init`` starts a local cluster in this process's session
   with ``<workers>`` CPUs; its start-up is timed apart).

For each: trials/min over the study loop (``StudySummary.elapsed_s``), the wall time including
start-up (spawning workers, reading the CSVs in each, starting Ray), the ratio to the
sequential run, and the peak RSS of each worker (``ru_maxrss`` reported by the worker with each
result). The three runs must agree on every trial's objective (checked).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_optimize.py [--workers N]
[--space JSON] [--walk-forward JSON]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPACE = '{"fast": [5, 10, 20], "slow": [30, 60, 90]}'
WALK = '{"train": "3y", "test": "1y"}'


def run(name: str, tmp: Path, space: str, walk: str, **extra: str) -> dict[str, Any]:
    import duckdb

    from runtime.config import load_config
    from runtime.research.cli import optimize

    db = tmp / f"{name}.duckdb"
    env = {
        "MODE": "optimize",
        "OPTIMIZE_SPACE": space,
        "WALK_FORWARD": walk,
        "OPTIMIZE_RECORD": "none",
        "FMEL_LOCAL_PATH": str(db),
        "PROGRESS": "off",
        "LOG_LEVEL": "WARNING",
        **extra,
    }
    t0 = time.perf_counter()
    outcome = optimize(load_config(env), session_id=name)
    wall = time.perf_counter() - t0
    summary = outcome.summary
    if outcome.exit_code != 0 or summary is None:
        raise SystemExit(f"{name}: exit code {outcome.exit_code}")
    con = duckdb.connect(str(db), read_only=True)
    objectives = con.execute("SELECT fold, trial, objective FROM trials ORDER BY 1, 2").fetchall()
    con.close()
    return {
        "name": name,
        "engine": summary.engine,
        "trials": summary.trials,
        "loop_s": summary.elapsed_s,
        "wall_s": wall,
        "rss": sorted(summary.peak_rss_mb.values()),
        "objectives": objectives,
    }


def main() -> None:
    from runtime.research.engine import cpu_workers

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=cpu_workers())
    ap.add_argument("--space", default=SPACE)
    ap.add_argument("--walk-forward", default=WALK)
    args = ap.parse_args()
    w = str(args.workers)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = [
            run("sequential", tmp, args.space, args.walk_forward, OPTIMIZE_WORKERS="1"),
            run("pool", tmp, args.space, args.walk_forward, OPTIMIZE_WORKERS=w),
        ]
        # A new local cluster would turn on token auth and write ~/.ray/auth_token, which every
        # Ray user of the machine then shares: this cluster is ours alone, no auth. Loopback
        # only: read by ray_constants.ENABLE_RAY_CLUSTER at import (ray-project/ray#18730).
        os.environ["RAY_AUTH_MODE"] = "disabled"
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t0
        ray.shutdown()  # RayEngine connects again with address=local below: a fresh cluster
        results.append(
            run("ray", tmp, args.space, args.walk_forward, RAY_ADDRESS="local", OPTIMIZE_WORKERS=w)
        )
    base = results[0]
    for r in results[1:]:
        if r["objectives"] != base["objectives"]:
            raise SystemExit(f"{r['name']}: different trial results from the sequential run")
    print(f"{base['trials']} trials a run; space {args.space}; walk-forward {args.walk_forward}")
    print(f"(a bare local Ray start + shutdown took {ray_start:.1f} s)")
    print()
    print(
        f"{'engine':<38} {'trials/min':>10} {'x seq':>6} {'wall s':>7} {'x seq':>6}  "
        "peak RSS per worker (MiB)"
    )
    for r in results:
        rate = r["trials"] / r["loop_s"] * 60
        base_rate = base["trials"] / base["loop_s"] * 60
        rss = ", ".join(f"{x:.0f}" for x in r["rss"])
        print(
            f"{r['engine'][:38]:<38} {rate:>10.0f} {rate / base_rate:>6.2f} {r['wall_s']:>7.1f} "
            f"{base['wall_s'] / r['wall_s']:>6.2f}  {rss}"
        )


if __name__ == "__main__":
    main()
