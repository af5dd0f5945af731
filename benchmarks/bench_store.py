"""What the store costs the default run, and what another file format would: issue 14's next step.

``bench_fmel.py`` measures the default run (FMEL + the decision writer + the local DuckDB store)
against plain backtrader; ``bench_writer.py`` splits the writer thread's CPU. This says how much
of the whole run's time vs plain each stage of the writer is, by cutting the writer short, and
what the run would cost if its store step wrote another file format instead of DuckDB's insert.
Each round runs, in fresh subprocesses (``bench_fmel.child``: the same agents, data, warm hash
cache, ``gc_freeze`` on as the runner's backtests), ``plain`` and the default run with its
sink's ``write_records`` replaced by:

* ``drop``: nothing (the batch is taken and dropped): the bar loop's own recording and hand-over;
* ``settle``: :func:`analyzers.sinks.columnar.records_table` only (the reads resolved, the Arrow
  table built) and the table dropped: the writer's Python work without a store;
* ``duckdb``: the shipped store, unchanged (the default run);
* ``parquet``: the same table written as a Parquet file a write (``pyarrow.parquet``, zstd, row
  groups of 2,048: what DuckDB's ``read_parquet`` can query under a view);
* ``ipc``: the same table written as an Arrow IPC file a write (no encoding: the least a store
  that writes the table to disk can cost).

The ``parquet`` and ``ipc`` modes are measurements, not stores: nothing reads their files back
here, and the DuckDB file is still opened and closed (empty). Reported per mode, paired with the
round's ``plain`` run, medians over rounds: time vs plain (wall of ``cerebro.run()`` plus the
writer's final flush), main-thread CPU vs plain, the final flush and the records not yet
written when the bar loop ended.

With ``--formats``, also the store step alone on the run's own batches (the Arrow tables the
default run's writer built, kept from one ``settle`` run): thread CPU per decision of DuckDB's
insert (the store's own statement, into a new file, close included) against writing the same
tables as Parquet (zstd, snappy, none) and Arrow IPC files, and the bytes on disk.

A benchmark, not a test: run it on a quiet machine.

Run: ``python benchmarks/bench_store.py [--rounds 3] [--agents sma,heavy] [--formats]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_fmel  # noqa: E402  (beside this file)

STORES = ("drop", "settle", "duckdb", "parquet", "ipc")
MODES = ("plain", *STORES)
ROW_GROUP = 2048  # the local store's row group (analyzers.sinks.duckdb.ROW_GROUP_SIZE)


def _patch_store(store: str, keep: list[Any] | None = None) -> None:
    """Replace the local store's ``write_records`` for this process (``store`` as above);
    ``keep``: where the ``settle`` mode puts the tables it built."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    from analyzers.sinks import duckdb as store_module
    from analyzers.sinks.columnar import records_table

    if store == "duckdb":
        return
    base = store_module.LocalDuckDBSink
    count = itertools.count()

    class Measured(base):  # type: ignore[misc, valid-type]
        def write_records(self, records: Any) -> list[Any]:
            if store == "drop":
                return []
            table = records_table(records)
            path = f"{self.path}.{next(count)}"
            if store == "settle":
                if keep is not None:
                    keep.append(table)
            elif store == "parquet":
                pq.write_table(
                    table, f"{path}.parquet", compression="zstd", row_group_size=ROW_GROUP
                )
            else:
                with ipc.new_file(f"{path}.arrow", table.schema) as out:
                    out.write_table(table)
            return []

    store_module.LocalDuckDBSink = Measured  # type: ignore[misc]


def child(mode: str, agent: str) -> dict[str, float]:
    """One run of ``mode`` in this process (``bench_fmel.child``)."""
    sys.path.insert(0, str(bench_fmel.REPO))
    symbols = bench_fmel.SYMBOLS.split(",")
    if mode == "plain":
        return bench_fmel.child("plain", agent, symbols)
    _patch_store(mode)
    return bench_fmel.child("fmel+duckdb", agent, symbols, gc_freeze=True)


def formats(agent: str, rounds: int) -> dict[str, Any]:
    """The store step alone on the run's batches (see the module docstring): thread CPU per
    decision (best of ``rounds``) and bytes on disk, per format."""
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    sys.path.insert(0, str(bench_fmel.REPO))
    from analyzers.sinks import duckdb as store_module

    tables: list[Any] = []
    _patch_store("settle", keep=tables)
    bench_fmel.child("fmel+duckdb", agent, bench_fmel.SYMBOLS.split(","), gc_freeze=True)
    shipped: Any = store_module.LocalDuckDBSink.__mro__[1]
    store_module.LocalDuckDBSink = shipped  # type: ignore[misc]
    decisions = sum(t.num_rows for t in tables)

    opened: dict[Path, Any] = {}  # opened before the clock starts: a run opens it at start

    def duckdb_open(folder: Path) -> None:
        opened[folder] = store_module.LocalDuckDBSink(folder / "fmel.duckdb")
        opened[folder].open()

    def duckdb_insert(folder: Path) -> None:
        sink = opened.pop(folder)
        con = sink._con
        for table in tables:  # the statement write_records runs, on the same tables
            con.register(store_module._BATCH_VIEW, table)
            try:
                con.execute(sink._arrow_sql)
            finally:
                con.unregister(store_module._BATCH_VIEW)
        sink.close()

    def parquet(compression: str) -> Any:
        def write(folder: Path) -> None:
            for i, table in enumerate(tables):
                pq.write_table(
                    table,
                    folder / f"{i}.parquet",
                    compression=compression,
                    row_group_size=ROW_GROUP,
                )

        return write

    def arrow_ipc(folder: Path) -> None:
        for i, table in enumerate(tables):
            with ipc.new_file(folder / f"{i}.arrow", table.schema) as out:
                out.write_table(table)

    steps = {
        "duckdb insert + close": duckdb_insert,
        "parquet, zstd": parquet("zstd"),
        "parquet, snappy": parquet("snappy"),
        "parquet, none": parquet("none"),
        "arrow ipc": arrow_ipc,
    }
    out: dict[str, Any] = {"decisions": decisions}
    for name, step in steps.items():
        best, size = float("inf"), 0
        for _ in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp)
                if step is duckdb_insert:
                    duckdb_open(folder)
                c0 = time.thread_time()
                step(folder)
                best = min(best, time.thread_time() - c0)
                size = sum(f.stat().st_size for f in folder.iterdir())
        out[name] = {"us_per_decision": best / decisions * 1e6, "bytes": size}
    return out


def _run_child(mode: str, agent: str, env: dict[str, str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, "--agent", agent],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agents", default=",".join(bench_fmel.AGENTS))
    parser.add_argument("--formats", action="store_true", help="also the store step alone")
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--child-formats", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--agent", choices=bench_fmel.AGENTS, default="sma")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.agent)))
        return
    if args.child_formats:
        print(json.dumps(formats(args.agent, args.rounds)))
        return
    agents = args.agents.split(",")
    with tempfile.TemporaryDirectory() as cache:
        symbols = bench_fmel.SYMBOLS.split(",")
        bench_fmel.fill_hash_cache(symbols, Path(cache))
        env = {**os.environ, "FMEL_HASH_CACHE_DIR": cache}
        for agent in agents:
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
            for r in range(args.rounds):
                stores = STORES[r % len(STORES) :] + STORES[: r % len(STORES)]  # rotated
                for mode in ("plain", *stores):
                    runs[mode].append(_run_child(mode, agent, env))
            print(f"\n**{agent}**, {args.rounds} rounds (ratios paired with the round's plain)\n")
            print("| store step | time vs plain | main-thread CPU vs plain | final flush s "
                  "| records left at the end |")  # fmt: skip
            print("|---|---:|---:|---:|---:|")
            for mode in STORES:
                pairs = list(zip(runs[mode], runs["plain"], strict=True))
                t = statistics.median(a["wall_s"] / b["wall_s"] for a, b in pairs)
                c = statistics.median(a["main_cpu_s"] / b["main_cpu_s"] for a, b in pairs)
                f = statistics.median(a["flush_s"] for a, _ in pairs)
                left = statistics.median(a["left_at_end"] for a, _ in pairs)
                print(f"| {mode} | {t:.2f}x | {c:.2f}x | {f:.3f} | {left:,.0f} |")
            if args.formats:
                argv = ["--child-formats", "--agent", agent, "--rounds", str(args.rounds)]
                done = subprocess.run(
                    [sys.executable, __file__, *argv],
                    capture_output=True,
                    text=True,
                    env=env,
                    check=True,
                )
                fmt = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"\nstore step alone, {fmt.pop('decisions'):,} decisions, best of "
                      f"{args.rounds}:\n")  # fmt: skip
                print("| format | thread CPU us a decision | MB on disk |")
                print("|---|---:|---:|")
                for name, m in fmt.items():
                    print(f"| {name} | {m['us_per_decision']:.1f} | {m['bytes'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
