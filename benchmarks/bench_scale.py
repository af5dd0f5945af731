"""Scale of the live feed: 10 / 100 / 1,000 / 10,000 symbols in one backtrader run, fed through
the feed's queue path without the emulator.

A producer thread plays the Pub/Sub callback: for each 1-minute step it hands one JSON bar per
symbol to :meth:`feeds.pubsub.MessageHandler.handle` (decode, validate, hash, route, buffer, as
the real callback thread does); the main thread runs Cerebro with one
:class:`~feeds.pubsub.PubSubMarketDataFeed` per symbol, the example SMA-cross agent (3 indicators
per symbol) and, with ``--fmel``, the FMEL analyzer writing decision records to a local DuckDB
file through the decision writer, as the runner does in paper mode. Memory is bounded the way
the runner bounds it (``PUBSUB_LOOKBACK_BARS`` per live line, :class:`LiveMemoryBound`).

Per size (each in a fresh process): time per bar step (all symbols; mean and p99 of the time
between two agent steps once warmed up, which includes the callback work sharing the GIL),
bars per second, and peak RSS. Baseline in the same run: backtrader alone on the same kind of
bars (in-memory PandasData, next-by-next as live feeds force, same agent), up to
``--baseline-max`` symbols.
``--long N`` adds a flatness check: RSS sampled along a run of N steps of 100 symbols with an
agent that reads every symbol and an SMA each step but never trades (backtrader's simulated
broker keeps every order of a run, which would grow with trading, not with bars).

Targets: 1,000 symbols of 1-minute bars with a bar step < 1 s; 10,000 symbols < 8 GB RSS;
memory flat over a long run.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_scale.py [--sizes 10,100,1000,10000]
[--steps 300] [--lookback 500] [--fmel] [--long 20000]``. Prints markdown tables and JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import backtrader as bt
import numpy as np

REPO = Path(__file__).resolve().parent.parent
T0 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Reader(bt.Strategy):  # type: ignore[misc]
    """Reads every symbol's close and a 20-bar SMA each step; never trades (so the broker's
    order history, which backtrader keeps for the whole run, does not grow)."""

    def __init__(self) -> None:
        self.sma = {d._name: bt.ind.SMA(d.close, period=20) for d in self.datas}
        self.total = 0.0

    def next(self) -> None:
        for d in self.datas:
            if len(d):
                self.total += d.close[0] - self.sma[d._name][0]


class StepTimer(bt.Analyzer):  # type: ignore[misc]
    """Wall time of each step (after the agent and the analyzers before it) and RSS samples."""

    params = (("sample_every", 0),)

    def start(self) -> None:
        self.stamps: list[float] = []
        self.rss: list[tuple[int, float]] = []

    def next(self) -> None:
        self.stamps.append(time.perf_counter())
        n = len(self.stamps)
        if self.p.sample_every and n % self.p.sample_every == 0:
            self.rss.append((n, rss_mb()))

    prenext = nextstart = next


def one(
    symbols: int, steps: int, lookback: int, fmel: bool, sample_every: int, agent: str = "sma"
) -> dict[str, Any]:
    from agents.sma_cross import SmaCrossAgent
    from feeds.pubsub import BarHub, FieldSet, LiveMemoryBound, MessageHandler, make_pubsub_feed

    names = [f"S{i:05d}" for i in range(symbols)]
    hub = BarHub(names, max_buffered_bars=4, align_wait_s=1.0)
    handler = MessageHandler(hub)
    handler.freeze_fields({s: FieldSet() for s in names})
    rng = random.Random(7)
    prices = [100.0 + rng.random() * 50 for _ in names]
    produce_s = [0.0]

    def produce() -> None:
        for step in range(steps):
            ts = (T0 + timedelta(minutes=step)).isoformat()
            t = time.perf_counter()
            for i, s in enumerate(names):
                p = prices[i] = prices[i] * (1.0 + rng.gauss(0, 0.002))
                body = (
                    f'{{"symbol":"{s}","timestamp":"{ts}","open":{p:.4f},'
                    f'"high":{p * 1.001:.4f},"low":{p * 0.999:.4f},"close":{p:.4f},'
                    f'"volume":{1000 + step}}}'
                ).encode()
                handler.handle(body, {"symbol": s}, message_id=f"{step}:{i}")
            produce_s[0] += time.perf_counter() - t
        hub.close_input("benchmark done")

    cerebro = bt.Cerebro(stdstats=False)
    for s in names:
        cerebro.adddata(make_pubsub_feed(hub, s, lookback=lookback, qcheck_s=0.5), name=s)
    cerebro.addstrategy(Reader if agent == "reader" else SmaCrossAgent)
    cerebro.addanalyzer(LiveMemoryBound, _name="live_memory")
    writer = None
    tmp = tempfile.TemporaryDirectory()
    if fmel:
        from analyzers.fmel import FMELAnalyzer
        from analyzers.sinks.duckdb import LocalDuckDBSink
        from analyzers.sinks.writer import DecisionWriter

        writer = DecisionWriter(
            LocalDuckDBSink(Path(tmp.name) / "fmel.duckdb"),
            batch_size=10,
            flush_interval_s=5.0,
            queue_size=100,
            spill_dir=Path(tmp.name) / "spill",
        )
        writer.start()
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer)
    cerebro.addanalyzer(StepTimer, _name="timer", sample_every=sample_every)
    cerebro.broker.setcash(10_000_000)
    rss_before = rss_mb()
    hub.set_status("LIVE")
    producer = threading.Thread(target=produce, daemon=True)
    t0 = time.perf_counter()
    producer.start()
    strategy = cerebro.run()[0]
    wall = time.perf_counter() - t0
    producer.join(60)
    written = 0
    if writer is not None:
        written = writer.stop(timeout_s=120).written
    tmp.cleanup()
    stamps = np.asarray(strategy.analyzers.timer.stamps)
    warm = max(40, len(stamps) // 5)  # past the SMA warm-up and start-up
    gaps = np.diff(stamps[warm:]) if len(stamps) > warm + 1 else np.asarray([np.nan])
    return {
        "symbols": symbols,
        "steps": len(stamps),
        "lookback": lookback,
        "fmel": fmel,
        "step_mean_s": float(np.mean(gaps)),
        "step_p50_s": float(np.percentile(gaps, 50)),
        "step_p99_s": float(np.percentile(gaps, 99)),
        "bars_per_s": symbols * len(stamps) / wall,
        "wall_s": wall,
        "producer_s_per_step": produce_s[0] / max(1, steps),
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_run_mb": rss_before,
        "rss_samples": strategy.analyzers.timer.rss,
        "decisions_written": written,
        "delivered": handler.stats.delivered,
    }


def baseline(symbols: int, steps: int) -> dict[str, Any]:
    """Backtrader alone on the same kind of bars: in-memory PandasData feeds, next-by-next
    (what live feeds force), same agent, no FMEL."""
    import pandas as pd

    from agents.sma_cross import SmaCrossAgent

    rng = np.random.default_rng(7)
    index = pd.date_range(T0.replace(tzinfo=None), periods=steps, freq="1min")
    cerebro = bt.Cerebro(stdstats=False, preload=True, runonce=False)
    for i in range(symbols):
        close = (100.0 + rng.random() * 50) * np.cumprod(1.0 + rng.normal(0, 0.002, steps))
        df = pd.DataFrame(
            {
                "open": close,
                "high": close * 1.001,
                "low": close * 0.999,
                "close": close,
                "volume": 1000.0 + np.arange(steps),
            },
            index=index,
        )
        cerebro.adddata(
            bt.feeds.PandasData(dataname=df, timeframe=bt.TimeFrame.Minutes), name=f"S{i:05d}"
        )
    cerebro.addstrategy(SmaCrossAgent)
    cerebro.addanalyzer(StepTimer, _name="timer")
    cerebro.broker.setcash(10_000_000)
    t0 = time.perf_counter()
    strategy = cerebro.run()[0]
    wall = time.perf_counter() - t0
    stamps = np.asarray(strategy.analyzers.timer.stamps)
    warm = max(40, len(stamps) // 5)
    gaps = np.diff(stamps[warm:])
    return {
        "symbols": symbols,
        "steps": len(stamps),
        "step_mean_s": float(np.mean(gaps)),
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
    }


def child(
    args: argparse.Namespace,
    symbols: int,
    steps: int,
    sample_every: int,
    base: bool = False,
    agent: str = "sma",
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        str(symbols),
        "--steps",
        str(steps),
        "--lookback",
        str(args.lookback),
        "--sample-every",
        str(sample_every),
    ]
    if args.fmel:
        cmd.append("--fmel")
    if base:
        cmd.append("--baseline")
    cmd += ["--agent", agent]
    out = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10,100,1000,10000")
    p.add_argument("--steps", type=int, default=300, help="1-minute bars per symbol")
    p.add_argument("--lookback", type=int, default=500, help="PUBSUB_LOOKBACK_BARS")
    p.add_argument("--fmel", action="store_true", help="record decisions (FMEL + DuckDB)")
    p.add_argument("--long", type=int, default=0, help="flatness run: steps of 100 symbols")
    p.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--sample-every", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--agent", default="sma", choices=("sma", "reader"), help=argparse.SUPPRESS)
    p.add_argument(
        "--baseline-max",
        type=int,
        default=1000,
        help="largest size also run with backtrader alone (the baseline)",
    )
    args = p.parse_args()
    if args.one:
        result = (
            baseline(args.one, args.steps)
            if args.baseline
            else one(args.one, args.steps, args.lookback, args.fmel, args.sample_every, args.agent)
        )
        print(json.dumps(result))
        return
    sizes = [int(n) for n in args.sizes.split(",")]
    rows = [child(args, n, args.steps, 0) for n in sizes]
    bases = {n: child(args, n, args.steps, 0, base=True) for n in sizes if n <= args.baseline_max}
    print(
        f"Live feed scale: {args.steps} one-minute steps, lookback {args.lookback} bars, "
        f"SMA-cross agent, FMEL {'on (DuckDB)' if args.fmel else 'off'}\n"
    )
    print(
        "| symbols | bar step mean (s) | bar step p99 (s) | backtrader alone, same bars "
        "(s/step) | ratio | bars/s | peak RSS (MB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = bases.get(r["symbols"])
        alone = f"{b['step_mean_s']:.4f}" if b else "n/a"
        ratio = f"{r['step_mean_s'] / b['step_mean_s']:.2f}x" if b else "n/a"
        print(
            f"| {r['symbols']:,} | {r['step_mean_s']:.4f} | {r['step_p99_s']:.4f} | {alone} "
            f"| {ratio} | {r['bars_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |"
        )
    out: dict[str, Any] = {"rows": rows, "baseline": list(bases.values())}
    if args.long:
        every = max(1, args.long // 10)
        r = child(args, 100, args.long, every, agent="reader")
        samples = r["rss_samples"]
        print(
            f"\nMemory over a long run: 100 symbols, {args.long:,} steps, an agent reading "
            f"every symbol and an SMA, not trading (lookback {args.lookback})\n"
        )
        print("| step | RSS (MB) |")
        print("|---:|---:|")
        for step, mb in samples:
            print(f"| {step:,} | {mb:,.0f} |")
        half = [mb for step, mb in samples if step >= args.long // 2]
        growth = (half[-1] - half[0]) if len(half) > 1 else 0.0
        print(f"\nsecond half growth: {growth:+.1f} MB")
        out["long"] = {"steps": args.long, "samples": samples, "second_half_growth_mb": growth}
    print()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
