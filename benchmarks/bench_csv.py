"""Loading a large CSV file: ``read_csv_bars`` against a plain ``pandas.read_csv`` of the same file.

Generates a minute-bar file (``datetime,open,high,low,close,volume``, ISO times, valid OHLCV;
3,000,000 rows ~ 200 MB by default, the size of the issue's file), then measures, each in its
own fresh subprocess so peak memory is that step's alone, interleaved for ``--rounds``:

* ``pandas``: ``pandas.read_csv(path)`` with its defaults (the C parser), nothing else: the
  baseline the target is stated against (within 2x in time and in peak RSS);
* ``read_csv_bars``: the project's loader (pyarrow reading, vectorised parsing and checks; data
  hashes are computed on first use, so none here);
* ``read_csv_bars + hash all``: the same, then every bar's data hash (what eager hashing at load
  time used to cost; a run computes only the hashes of bars it reads or reports).

Wall time is measured inside the child from just before the read to just after it (imports
excluded); peak RSS is the child's ``ru_maxrss`` (imports included, as a user sees it).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_csv.py [--rows 3000000] [--rounds 3]
[--hash-rounds 1] [--file PATH]``;
prints a markdown table for docs/csv.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
mode, path = sys.argv[1], Path(sys.argv[2])
if mode == "pandas":
    import pandas as pd
    t0 = time.perf_counter()
    df = pd.read_csv(path)
    n = len(df)
else:
    from feeds.csv import CSVFeedConfig, read_csv_bars
    cfg = CSVFeedConfig(path=path, symbol="BENCH", bar_size="1min")
    t0 = time.perf_counter()
    bars = read_csv_bars(cfg)
    n = len(bars)
    if mode == "hash_all":
        for _ in bars.hashes:
            pass
elapsed = time.perf_counter() - t0
rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"s": elapsed, "rss_mb": rss_mb, "rows": n}))
"""


def make_file(path: Path, rows: int, seed: int = 7) -> None:
    """Write ``rows`` valid minute bars (a random walk) to ``path``, in 500k-row chunks."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2015-01-01T00:00:00", "s")
    price = 100.0
    with path.open("w") as f:
        f.write("datetime,open,high,low,close,volume\n")
        for lo in range(0, rows, 500_000):
            k = min(500_000, rows - lo)
            steps = rng.normal(0, 0.0005, k)
            close = price * np.exp(np.cumsum(steps))
            open_ = np.concatenate([[price], close[:-1]])
            high = np.maximum(open_, close) * (1 + rng.uniform(0, 0.0003, k))
            low = np.minimum(open_, close) * (1 - rng.uniform(0, 0.0003, k))
            vol = rng.integers(1, 5000, k)
            stamps = np.datetime_as_string(start + np.arange(lo, lo + k) * np.timedelta64(60, "s"))
            block = "\n".join(
                f"{t.replace('T', ' ')},{o:.5f},{h:.5f},{lw:.5f},{c:.5f},{v}"
                for t, o, h, lw, c, v in zip(stamps, open_, high, low, close, vol, strict=True)
            )
            f.write(block + "\n")
            price = float(close[-1])


def measure(mode: str, path: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--hash-rounds", type=int, default=1, help="rounds of the (slow) hash-everything step"
    )
    ap.add_argument("--file", type=Path, default=None, help="reuse this generated file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "MINUTES.csv"
        if not path.exists():
            make_file(path, args.rows)
        size_mb = path.stat().st_size / 1e6
        modes = ("pandas", "bars", "hash_all")
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for r in range(args.rounds):
            for m in modes:
                if m != "hash_all" or r < args.hash_rounds:
                    runs[m].append(measure(m, path))
        rows = int(runs["bars"][0]["rows"])
        assert all(r["rows"] == rows for rs in runs.values() for r in rs), "row counts differ"
        base_s = statistics.median(r["s"] for r in runs["pandas"])
        base_mb = statistics.median(r["rss_mb"] for r in runs["pandas"])
        names = {
            "pandas": "`pandas.read_csv` (baseline)",
            "bars": "`read_csv_bars`",
            "hash_all": "`read_csv_bars` + every data hash",
        }
        print(
            f"{rows:,} rows, {size_mb:.0f} MB, median of {args.rounds} interleaved rounds "
            f"({args.hash_rounds} for the hash step), each step in its own process:\n"
        )
        print("| step | seconds | time vs pandas | peak RSS MB | RSS vs pandas |")
        print("|---|---:|---:|---:|---:|")
        for m in modes:
            s = statistics.median(r["s"] for r in runs[m])
            mb = statistics.median(r["rss_mb"] for r in runs[m])
            print(f"| {names[m]} | {s:.2f} | {s / base_s:.2f}x | {mb:.0f} | {mb / base_mb:.2f}x |")


if __name__ == "__main__":
    main()
