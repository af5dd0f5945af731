"""Chronos decision latency: one batched call for all symbols versus one call per symbol.

For 1, 10 and 100 symbols, milliseconds per decision (forecasting every symbol once) with
:meth:`runtime.models.chronos.ChronosModel.forecast` given all windows at once (what
ChronosAgent does)
versus a loop of one call per symbol (the baseline, measured in the same run). Two random
Chronos-Bolt checkpoints built locally with chronos-forecasting's own classes and loaded through
the production path (``runtime.models.chronos.get_model``): a tiny one and one of the real
``amazon/chronos-bolt-tiny`` size (~9 M parameters). Windows are real closes from the bundled
data (context 512 bars, horizon 16, quantiles 0.1/0.5/0.9). A last row times the whole agent in
a backtest with FMEL recording (3 real symbols, tiny model). Nothing downloads.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_chronos.py [--reps 5] [--threads N]``;
prints a markdown table for the README. Run it on a quiet machine: with other processes busy,
torch's default of one thread per core oversubscribes the CPU and small calls slow down several
fold (``--threads 1`` is then the steadier setting).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from feeds.csv import CSVFeedConfig, read_csv_bars
from runtime.config import BUNDLED_DATA_DIR
from runtime.models.chronos import ChronosModel, get_model
from runtime.models.config import ChronosConfig
from tests.chronos_models import BOLT_TINY_SIZE, build_bolt

CONTEXT = 512
HORIZON = 16
LEVELS = (0.1, 0.5, 0.9)
SYMBOL_COUNTS = (1, 10, 100)


def real_windows(count: int, length: int) -> list[np.ndarray]:
    """``count`` real close windows of ``length`` bars from the bundled files, staggered."""
    series = [
        read_csv_bars(CSVFeedConfig(path=p, symbol=p.stem)).numeric["close"]
        for p in sorted(BUNDLED_DATA_DIR.glob("*.csv"))
    ]
    series = [s for s in series if len(s) >= length + count]
    out = []
    for i in range(count):
        s = series[i % len(series)]
        end = len(s) - (i // len(series)) * 7
        out.append(s[end - length : end])
    return out


def best_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Best-of-``reps`` wall time of each function, ms. Runs are interleaved (a, b, a, b, ...)
    so that load from other processes hits both sides alike; the minimum is the least disturbed
    run (as ``timeit`` recommends)."""
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: min(ts) * 1e3 for name, ts in times.items()}


def bench_model(model: ChronosModel, reps: int) -> list[tuple[int, float, float]]:
    """(symbols, batched ms, one-call-per-symbol ms) per symbol count."""
    rows = []
    windows = real_windows(max(SYMBOL_COUNTS), CONTEXT)
    for n in SYMBOL_COUNTS:
        ctx = windows[:n]

        def batched(ctx: list[np.ndarray] = ctx) -> object:
            return model.forecast(ctx, HORIZON, LEVELS)

        def looped(ctx: list[np.ndarray] = ctx) -> object:
            return [model.forecast([c], HORIZON, LEVELS) for c in ctx]

        ms = best_ms({"batched": batched, "looped": looped}, reps)
        rows.append((n, ms["batched"], ms["looped"]))
    return rows


def bench_agent(model: ChronosModel) -> tuple[int, float, float]:
    """The agent in a backtest with FMEL: (decisions, ms per decision, of which model ms)."""
    import backtrader as bt

    from agents.chronos_agent import ChronosAgent
    from analyzers.fmel import FMELAnalyzer
    from feeds.csv import make_csv_feed

    cerebro = bt.Cerebro(stdstats=False)
    for s in ("GOOG", "SP500", "NASDAQ"):
        cfg = CSVFeedConfig(
            path=BUNDLED_DATA_DIR / f"{s}.csv",
            symbol=s,
            start=datetime(2010, 1, 1, tzinfo=UTC),
            end=datetime(2011, 12, 31, tzinfo=UTC),
        )
        cerebro.adddata(make_csv_feed(cfg), name=s)
    cerebro.addstrategy(
        ChronosAgent, model=model, context_length=CONTEXT, horizon=HORIZON, min_context=32
    )
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    t0 = time.perf_counter()
    strategy = cerebro.run()[0]
    elapsed = time.perf_counter() - t0
    import json

    model_s = sum(
        json.loads(r.notes)["forecast"]["latency_ms"] / 1e3
        for r in strategy.analyzers.fmel.records
        if r.notes
    )
    n = strategy.forecasts
    return n, elapsed / n * 1e3, model_s / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per cell")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: torch's default, one per core)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-chronos-") as tmp:
        specs = {
            "tiny random Bolt": build_bolt(
                Path(tmp) / "tiny", context_length=2048, prediction_length=64, patch=16
            ),
            "random Bolt, bolt-tiny size": build_bolt(
                Path(tmp) / "bolt-tiny-size",
                context_length=2048,
                prediction_length=64,
                patch=16,
                size=BOLT_TINY_SIZE,
            ),
        }
        models = {name: get_model(ChronosConfig(model=str(path))) for name, path in specs.items()}
        print(
            f"CPU threads: torch {torch.get_num_threads()}, os {os.cpu_count()}; torch "
            f"{torch.__version__}; context {CONTEXT} bars, horizon {HORIZON}, levels "
            f"{list(LEVELS)}; best of {args.reps} interleaved runs\n"
        )
        print(
            "| model | params | symbols | batched, ms/decision | one call per symbol, "
            "ms/decision | batched speed-up |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for name, model in models.items():
            params = sum(p.numel() for p in model.pipeline.inner_model.parameters())
            for n, batched, looped in bench_model(model, args.reps):
                print(
                    f"| {name} | {params / 1e6:.2f} M | {n} | {batched:.1f} | {looped:.1f} | "
                    f"{looped / batched:.1f}x |"
                )
        decisions, per_decision, model_ms = bench_agent(models["tiny random Bolt"])
        print(
            f"\nChronosAgent backtest with FMEL, 3 real symbols, tiny model: {decisions} "
            f"decisions, {per_decision:.1f} ms per decision, of which the batched forecast "
            f"call {model_ms:.1f} ms ({model_ms / per_decision:.0%})."
        )


if __name__ == "__main__":
    main()
