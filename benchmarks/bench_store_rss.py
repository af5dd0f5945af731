"""Peak memory of the local decision store over a long live run, by row group size and merge.

A live agent that reads many symbols each step makes large decision records (``--symbols`` x 2
reads: a close and an SMA per symbol). :class:`~analyzers.sinks.duckdb.LocalDuckDBSink` writes
them in batches (``--batch`` records, as the decision writer hands them over) for
``--decisions`` decisions. At its checkpoints DuckDB's vacuum merges small row groups into
groups of up to the row group size, reading every nested read of them into memory; this
measures what that costs for each of ``--configs``, ``ROWS:VACUUM:MEMORY`` triples: the row
group size (DuckDB's own is 122,880; the sink's 2,048), DuckDB's ``max_vacuum_tasks`` (DuckDB's
own is 100; the sink's 0, no merge) and DuckDB's ``memory_limit`` in MiB (0: DuckDB's own, 80 %
of the machine's memory; the sink's 512), which bounds DuckDB's cache of the blocks it wrote.

Each configuration runs in a fresh process with DuckDB's allocator set as the image sets it
(``DUCKDB_JE_MALLOC_CONF=dirty_decay_ms:0,muzzy_decay_ms:0``, the Dockerfile; override with
``--malloc-conf``). Reported per configuration: peak RSS of writing and closing
(``ru_maxrss`` read before the scan below: every spike, also between samples), RSS at the end
before the close, the batch at which RSS peaked (sampled every
2 ms from a thread), seconds writing and closing, the file's size, its row groups, and the
seconds one scan of every read takes afterwards (``SELECT count(*), sum(value) FROM
decision_reads`` on a fresh read-only connection with the same memory limit: what small row
groups cost a reader). The
baseline in the same run is DuckDB's own settings (``122880:100:0``).

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_store_rss.py [--symbols 100]
[--decisions 20000] [--batch 10] [--configs 2048:0:512,2048:0:0,2048:100:0,122880:100:0]``.
Prints a markdown table and JSON.
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


def child(
    symbols: int,
    decisions: int,
    batch: int,
    row_group_size: int,
    max_vacuum_tasks: int,
    memory_limit_mb: int,
) -> dict[str, Any]:
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
        sink._con.execute(f"SET max_vacuum_tasks = {max_vacuum_tasks}")
        if memory_limit_mb == 0:
            sink._con.execute("RESET memory_limit")  # DuckDB's own
        else:
            sink._con.execute(f"SET memory_limit = '{memory_limit_mb}MiB'")
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
        # before the scan below: its connection's memory is not the store's (until 2026-12-02
        # this was read after it, and the scan, then with DuckDB's own limit, made the peak)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        size_mb = path.stat().st_size / 2**20
        import duckdb

        limit = {} if not memory_limit_mb else {"memory_limit": f"{memory_limit_mb}MiB"}
        with duckdb.connect(str(path), read_only=True, config=limit) as con:
            got = con.execute(
                "SELECT count(DISTINCT row_group_id) FROM pragma_storage_info('decisions')"
            ).fetchone()
            row_groups = int(got[0]) if got else 0
            tq = time.perf_counter()  # what small row groups cost a reader: one scan of every read
            con.execute("SELECT count(*), sum(value) FROM decision_reads").fetchall()
            query_s = time.perf_counter() - tq
    return {
        "row_group_size": row_group_size,
        "max_vacuum_tasks": max_vacuum_tasks,
        "memory_limit_mb": memory_limit_mb,
        "row_groups": row_groups,
        "symbols": symbols,
        "decisions": decisions // batch * batch,
        "reads": decisions // batch * batch * 2 * symbols,
        "rss_start_mb": round(start_rss, 1),
        "rss_end_mb": round(end_rss, 1),
        "peak_rss_mb": round(peak_mb, 1),
        "peak_sampled_at_decision": peak_at[1] * batch,
        "write_s": round(t1 - t0, 2),
        "close_s": round(t2 - t1, 2),
        "query_s": round(query_s, 3),
        "file_mb": round(size_mb, 1),
        "malloc_conf": os.environ.get("DUCKDB_JE_MALLOC_CONF", ""),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--symbols", type=int, default=100)
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument(
        "--configs",
        default="2048:0:512,2048:0:0,2048:100:0,122880:100:0",
        help="ROWS:VACUUM:MEMORY triples: row group size, DuckDB max_vacuum_tasks, "
        "memory_limit MiB (0: DuckDB's own)",
    )
    p.add_argument("--malloc-conf", default=IMAGE_MALLOC_CONF)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        rows, vacuum, memory = (int(x) for x in a.child.split(":"))
        print(json.dumps(child(a.symbols, a.decisions, a.batch, rows, vacuum, memory)))
        return
    env = os.environ | {"DUCKDB_JE_MALLOC_CONF": a.malloc_conf}
    results = []
    for config in a.configs.split(","):
        args = [sys.executable, __file__, "--child", config]
        args += ["--symbols", str(a.symbols), "--decisions", str(a.decisions)]
        args += ["--batch", str(a.batch)]
        out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"{a.symbols} symbols x 2 reads, {a.decisions:,} decisions in batches of {a.batch}, "
        f"DUCKDB_JE_MALLOC_CONF={a.malloc_conf}\n"
    )
    print(
        "| row group size | max_vacuum_tasks | memory_limit MiB | peak RSS MB | peak at decision "
        "| RSS at the end MB | write s | close s | file MB | row groups | query s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['row_group_size']:,} | {r['max_vacuum_tasks']} | "
            f"{r['memory_limit_mb'] or 'DuckDB'} | {r['peak_rss_mb']:,.0f} | "
            f"{r['peak_sampled_at_decision']:,} | {r['rss_end_mb']:,.0f} | {r['write_s']} | "
            f"{r['close_s']} | {r['file_mb']} | {r['row_groups']:,} | {r['query_s']} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
