"""What recording every read costs: the same agent on the same real data, with and without FMEL.

Modes, each run in a fresh subprocess (so peak RSS is its own), interleaved round by round so
machine noise hits every mode alike:

* ``plain``: backtrader alone (the baseline).
* ``fmel``: + the FMEL analyzer, records kept in memory (tracking + record building only).
* ``fmel+duckdb``: + the decision writer thread and the local DuckDB store (the default run).

Reported: median wall time of ``cerebro.run()`` (+ the final flush) -> bars/s, the ratio to
``plain`` measured in the same run, and peak RSS. Target (issue 2): ``fmel+duckdb`` <= 1.25x.

Run: ``python benchmarks/bench_fmel.py [--rounds 5] [--symbols GOOG,SP500,NASDAQ]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("plain", "fmel", "fmel+duckdb")


def child(mode: str, symbols: list[str]) -> dict[str, float]:
    sys.path.insert(0, str(REPO))
    import backtrader as bt

    from agents.sma_cross import SmaCrossAgent
    from analyzers.fmel import FMELAnalyzer
    from analyzers.sinks.duckdb import LocalDuckDBSink
    from analyzers.sinks.writer import DecisionWriter
    from feeds.csv import make_csv_feed, read_csv_bars
    from runtime.config import CSVFeedConfig, find_csv

    configs = [CSVFeedConfig(path=find_csv(REPO / "data", s), symbol=s) for s in symbols]
    bars = [read_csv_bars(c) for c in configs]
    cerebro = bt.Cerebro(stdstats=False)
    for c, b in zip(configs, bars, strict=True):
        cerebro.adddata(make_csv_feed(c, b), name=c.symbol)
    cerebro.addstrategy(SmaCrossAgent)
    cerebro.broker.setcash(100_000)
    writer = None
    tmp = tempfile.mkdtemp()
    if mode == "fmel":
        cerebro.addanalyzer(FMELAnalyzer)
    elif mode == "fmel+duckdb":
        writer = DecisionWriter(
            LocalDuckDBSink(Path(tmp) / "fmel.duckdb"),
            batch_size=500,
            spill_dir=Path(tmp) / "spill",
        )
        writer.start()
        cerebro.addanalyzer(FMELAnalyzer, writer=writer)
    t0, c0 = time.perf_counter(), time.thread_time()
    strategy = cerebro.run()[0]
    if writer is not None:
        writer.stop()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    return {
        "wall_s": wall,
        "main_cpu_s": cpu,
        "bars": len(strategy),
        "value": cerebro.broker.getvalue(),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--symbols", default="GOOG,SP500,NASDAQ")
    parser.add_argument("--child", choices=MODES)
    args = parser.parse_args()
    symbols = args.symbols.split(",")
    if args.child:
        sys.stdout.write(json.dumps(child(args.child, symbols)))
        return
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--symbols", args.symbols],
                capture_output=True,
                text=True,
                check=True,
            )
            results[mode].append(json.loads(out.stdout))
    values = {r["value"] for m in MODES for r in results[m]}
    if len(values) != 1:
        raise SystemExit(f"results differ between modes: {values}")
    base = statistics.median(r["wall_s"] for r in results["plain"])
    base_cpu = statistics.median(r["main_cpu_s"] for r in results["plain"])
    bars = results["plain"][0]["bars"]
    lines = [
        f"SMA-cross agent, {len(symbols)} feeds ({', '.join(symbols)}), {bars:.0f} bars, "
        f"median of {args.rounds} interleaved rounds; same final value in every mode",
        "",
        "| mode | bars/s | time vs plain | main-thread CPU vs plain | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        wall = statistics.median(r["wall_s"] for r in results[mode])
        cpu = statistics.median(r["main_cpu_s"] for r in results[mode])
        rss = max(r["rss_mb"] for r in results[mode])
        lines.append(
            f"| {mode} | {bars / wall:,.0f} | {wall / base:.2f}x | "
            f"{cpu / base_cpu:.2f}x | {rss:.0f} |"
        )
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
