"""Peak memory of the local decision store over a long live run, by row group size.

A live agent that reads many symbols each step makes large decision records (``--symbols`` x 2
reads: a close and an SMA per symbol). :class:`~analyzers.sinks.duckdb.LocalDuckDBSink` writes
them in batches (``--batch`` records, as the decision writer hands them over) for
``--decisions`` decisions. At each checkpoint DuckDB writes the table's open row group again,
with every nested read in it; this measures what that costs in memory for each
``--row-group-sizes`` value (DuckDB's own is 122,880; the sink's default 2,048).

Each size runs in a fresh process with DuckDB's allocator set as the image sets it
(``DUCKDB_JE_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0``, the Dockerfile; override with
``--malloc-conf``). Reported per size: peak RSS (``ru_maxrss``: every spike, also between
samples), RSS at the end before the close, the batch at which RSS peaked (sampled every 2 ms
from a thread), seconds writing and closing, and the file's size. The baseline in the same run
is DuckDB's own row group size.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_store_rss.py [--symbols 100]
[--decisions 20000] [--batch 10] [--row-group-sizes 2048,122880]``. Prints a markdown table and
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

IMAGE_MALLOC_CONF = "dirty_decay_ms:0,muzzy_decay_ms:0"  # as the Dockerfile's runtime stage


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(symbols: int, decisions: int, batch: int, row_group_size: int) -> dict[str, Any]:
    """One size in this process: the measurements of the module docstring, as a dict."""
    from analyzers.schema import Access, DataAccess, DecisionRecord, RunInfo
    from analyzers.sinks.duckdb import LocalDuckDBSink

    rnd = random.Random(7)
    run = RunInfo("bench", "agent", "live", "Reader", "{}", None)
    records: list[DecisionRecord] = []
    for i in range(batch):  # one batch of records, reused with new decision points
        groups = []
        for s in range(symbols):
            h = f"{rnd.getrandbits(128):032x}"
            reads = (
                Access(2 * s, "close", 0, 1, i, h, 100 + rnd.random(), None, False),
                Access(2 * s + 1, "sma", 0, 1, i, h, 100 + rnd.random(), None, False),
            )
            groups.append(DataAccess(f"SYM{s:05d}", h, ("close", "sma"), reads))
        records.append(
            DecisionRecord(
                run,
                i,
                1.7e9 + i,
                1.7e9 + 60 * i,
                "NEXT",
                "HOLD",
                (),
                tuple(groups),
                2 * symbols,
                0,
                1e5,
                1e5,
                (),
                None,
                None,
                None,
            )
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fmel.duckdb"
        sink = LocalDuckDBSink(path, row_group_size=row_group_size)
        sink.open()
        at = [0]
        peak_at: list[Any] = [0.0, 0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                r = _rss_mb()
                if r > peak_at[0]:
                    peak_at[:] = [r, at[0]]
                time.sleep(0.002)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start_rss = _rss_mb()
        t0 = time.perf_counter()
        for b in range(decisions // batch):
            at[0] = b
            base = b * batch
            sink.write_records([r._replace(decision_point=base + i) for i, r in enumerate(records)])
        t1 = time.perf_counter()
        end_rss = _rss_mb()
        sink.close()
        t2 = time.perf_counter()
        done.set()
        sampler.join()
        size_mb = path.stat().st_size / 2**20
    return {
        "row_group_size": row_group_size,
        "symbols": symbols,
        "decisions": decisions // batch * batch,
        "reads": decisions // batch * batch * 2 * symbols,
        "rss_start_mb": round(start_rss, 1),
        "rss_end_mb": round(end_rss, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_sampled_at_decision": peak_at[1] * batch,
        "write_s": round(t1 - t0, 2),
        "close_s": round(t2 - t1, 2),
        "file_mb": round(size_mb, 1),
        "malloc_conf": os.environ.get("DUCKDB_JE_MALLOC_CONF", ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--symbols", type=int, default=100)
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--row-group-sizes", default="2048,122880")
    p.add_argument("--malloc-conf", default=IMAGE_MALLOC_CONF)
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.symbols, a.decisions, a.batch, a.child)))
        return
    env = os.environ | {"DUCKDB_JE_MALLOC_CONF": a.malloc_conf}
    results = []
    for size in (int(s) for s in a.row_group_sizes.split(",")):
        args = [sys.executable, __file__, "--child", str(size)]
        args += ["--symbols", str(a.symbols), "--decisions", str(a.decisions)]
        args += ["--batch", str(a.batch)]
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"{a.symbols} symbols x 2 reads, {a.decisions:,} decisions in batches of {a.batch}, "
        f"DUCKDB_JE_MALLOC_CONF={a.malloc_conf}\n"
    )
    print(
        "| row group size | peak RSS MB | peak at decision | RSS at the end MB | write s "
        "| close s | file MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['row_group_size']:,} | {r['peak_rss_mb']:,.0f} | "
            f"{r['peak_sampled_at_decision']:,} | {r['rss_end_mb']:,.0f} | {r['write_s']} | "
            f"{r['close_s']} | {r['file_mb']} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
