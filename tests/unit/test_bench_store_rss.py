"""``benchmarks/bench_store_rss.py`` runs end to end on a tiny store (its numbers are not
checked: timings and memory belong in ``benchmarks/``); what it reports is what it was asked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_store_memory_benchmark_measures_each_config_asked() -> None:
    args = [sys.executable, str(ROOT / "benchmarks" / "bench_store_rss.py"), "--symbols", "3"]
    args += ["--decisions", "105", "--batch", "10", "--configs", "2048:0:512,4096:100:0"]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [
        (r["row_group_size"], r["max_vacuum_tasks"], r["memory_limit_mb"]) for r in results
    ] == [(2048, 0, 512), (4096, 100, 0)]
    for r in results:
        assert r["decisions"] == 100 and r["reads"] == 100 * 2 * 3  # whole batches only
        assert r["malloc_conf"] == "dirty_decay_ms:0,muzzy_decay_ms:0"  # the image's
        assert r["peak_rss_mb"] >= r["rss_end_mb"] > 0 and r["file_mb"] > 0
        assert r["row_groups"] >= 1
    assert "| 2,048 | 0 | 512 |" in out.stdout and "| 4,096 | 100 | DuckDB |" in out.stdout
