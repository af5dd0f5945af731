"""Where the decision writer's time goes: its thread's CPU per bar, split by phase.

``bench_fmel.py`` says how much the default run (FMEL + the decision writer + the local DuckDB
store) costs over plain backtrader; this says what the writer thread spends it on, to decide
what to work on next (issue 14). Each round runs ``plain`` and ``fmel+duckdb`` in fresh
subprocesses with ``bench_fmel.child`` (the same set-up, agents, data and warm hash cache), the
FMEL one with the writer's phases wrapped in thread-CPU timers (``time.thread_time``):

* settle: :func:`analyzers.deferred.settle_batch` (the batch's raw reads resolved: bar times,
  data hashes, groups by symbol; numpy, holds the GIL);
* table: :func:`analyzers.sinks.columnar.records_table` without settle (the Arrow table built
  from the records; holds the GIL);
* insert: :meth:`analyzers.sinks.duckdb.LocalDuckDBSink.write_records` without the table
  (DuckDB's scan of the Arrow table and its write to the file, which releases the GIL; plus the
  run's cut into parts by weight and the stored ids);
* other: the rest of the writer thread's CPU (queue, batching, accounting).

Also the garbage collector's time on each thread during ``cerebro.run()`` (``gc.callbacks``,
wall time of each collection, counted on the thread that triggered it; the writer thread's
whole life). Figures are microseconds per bar (all
bars of the run, those without reads included), medians over the rounds. Because every phase
but the insert holds the GIL, (writer CPU - insert) per bar is the bar loop's lost time the
writer causes directly; on this 2-core machine the insert, running beside the bar loop, slows it
too (``plain+busy`` in ``bench_fmel.py``).

The timers add a few Python calls a batch (not a bar): negligible beside the phases. A
benchmark, not a test; run it on a quiet machine.

Run: ``python benchmarks/bench_writer.py [--rounds 3] [--agents sma,heavy]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_fmel  # noqa: E402  (beside this file)

PHASES = ("settle", "table", "insert", "other")


def _timed(totals: collections.defaultdict[str, float], key: str, fn: Callable[..., Any]) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        c0 = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[key] += time.thread_time() - c0

    return call


def child(mode: str, agent: str) -> dict[str, float]:
    """One run (``bench_fmel.child``), with the writer's phases timed in ``fmel+duckdb``."""
    sys.path.insert(0, str(bench_fmel.REPO))
    import gc

    from analyzers.sinks import columnar, duckdb
    from analyzers.sinks.writer import DecisionWriter

    totals: collections.defaultdict[str, float] = collections.defaultdict(float)
    if mode == "fmel+duckdb":
        # records_table is imported by name into the sink's module; settle_batch into columnar's
        for module, name, key in (
            (columnar, "settle_batch", "settle"),
            (duckdb, "records_table", "settle+table"),
        ):
            setattr(module, name, _timed(totals, key, getattr(module, name)))
        sink = duckdb.LocalDuckDBSink
        sink.write_records = _timed(totals, "write", sink.write_records)  # type: ignore[method-assign]
        run = DecisionWriter._run

        def writer_run(self: DecisionWriter) -> None:
            try:
                run(self)
            finally:
                totals["writer"] += time.thread_time()  # the thread's whole CPU time

        DecisionWriter._run = writer_run  # type: ignore[method-assign]
    import backtrader as bt

    # the collector's time during cerebro.run() only (and on the writer thread, which runs
    # during it and the final flush): the imports and the CSV reading before it are not the run
    running = threading.Event()
    run_cerebro = bt.Cerebro.run

    def cerebro_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        running.set()
        try:
            return run_cerebro(self, *args, **kwargs)
        finally:
            running.clear()

    bt.Cerebro.run = cerebro_run
    started: dict[int, float] = {}

    def collected(phase: str, info: dict[str, Any]) -> None:
        ident = threading.get_ident()
        main = ident == threading.main_thread().ident
        if phase == "start":
            if running.is_set() or not main:
                started[ident] = time.perf_counter()
        elif ident in started:
            totals["gc_main" if main else "gc_other"] += time.perf_counter() - started.pop(ident)

    gc.callbacks.append(collected)
    out = bench_fmel.child(mode, agent, bench_fmel.SYMBOLS.split(","), gc_freeze=True)
    gc.callbacks.remove(collected)
    out.update({k: float(v) for k, v in totals.items()})
    return out


def summarise(runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Medians over the rounds, microseconds per bar."""
    bars = runs["plain"][0]["bars"]

    def med(mode: str, fn: Callable[[dict[str, float]], float]) -> float:
        return statistics.median(fn(r) for r in runs[mode]) / bars * 1e6

    def g(r: dict[str, float], key: str) -> float:
        return r.get(key, 0.0)

    return {
        "plain_main": med("plain", lambda r: r["main_cpu_s"]),
        "fmel_main": med("fmel+duckdb", lambda r: r["main_cpu_s"]),
        "wall_plain": med("plain", lambda r: r["wall_s"]),
        "wall_fmel": med("fmel+duckdb", lambda r: r["wall_s"]),
        "writer": med("fmel+duckdb", lambda r: g(r, "writer")),
        "settle": med("fmel+duckdb", lambda r: g(r, "settle")),
        "table": med("fmel+duckdb", lambda r: g(r, "settle+table") - g(r, "settle")),
        "insert": med("fmel+duckdb", lambda r: g(r, "write") - g(r, "settle+table")),
        "other": med("fmel+duckdb", lambda r: g(r, "writer") - g(r, "write")),
        "gc_main_plain": med("plain", lambda r: g(r, "gc_main")),
        "gc_main": med("fmel+duckdb", lambda r: g(r, "gc_main")),
        "gc_writer": med("fmel+duckdb", lambda r: g(r, "gc_other")),
    }


def table(agent: str, s: dict[str, float], rounds: int) -> list[str]:
    name = "SMA-cross" if agent == "sma" else "read-heavy"
    held = s["writer"] - s["insert"]
    return [
        f"**{name}** agent, us per bar, medians of {rounds} rounds; plain main thread "
        f"{s['plain_main']:.1f} us CPU ({s['wall_plain']:.1f} us wall); FMEL + local store "
        f"{s['fmel_main']:.1f} us ({s['wall_fmel']:.1f} us wall)",
        "",
        "| writer thread | us per bar | over plain's main-thread CPU |",
        "|---|---:|---:|",
        *(
            f"| {p} | {s[p]:.2f} | {s[p] / s['plain_main']:.3f} |"
            for p in ("settle", "table", "insert", "other", "writer")
        ),
        f"| writer, GIL held (all but insert) | {held:.2f} | {held / s['plain_main']:.3f} |",
        "",
        f"Garbage collector: main thread {s['gc_main']:.2f} us per bar ({s['gc_main_plain']:.2f} "
        f"in plain), writer thread {s['gc_writer']:.2f}.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agents", default=",".join(bench_fmel.AGENTS))
    parser.add_argument("--child", choices=("plain", "fmel+duckdb"))
    parser.add_argument("--agent", choices=bench_fmel.AGENTS, default="sma")
    args = parser.parse_args()
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, args.agent)))
        return
    cache = tempfile.mkdtemp(prefix="bench-hashes-")
    bench_fmel.fill_hash_cache(bench_fmel.SYMBOLS.split(","), Path(cache))
    env = dict(os.environ, FMEL_HASH_CACHE_DIR=cache)
    lines: list[str] = []
    for agent in args.agents.split(","):
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "fmel+duckdb": []}
        for i in range(args.rounds):
            for mode in ("plain", "fmel+duckdb") if i % 2 else ("fmel+duckdb", "plain"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", mode, "--agent", agent],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                runs[mode].append(json.loads(out.stdout))
        values = {round(r["value"], 6) for rs in runs.values() for r in rs}
        if len(values) != 1:
            raise SystemExit(f"{agent}: results differ between modes: {values}")
        lines += [*table(agent, summarise(runs), args.rounds), ""]
    sys.stdout.write("\n".join(lines))


if __name__ == "__main__":
    main()
