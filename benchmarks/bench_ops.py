"""Operations costs: metrics in the bar loop, a /metrics scrape, and SIGTERM-to-exit time.

1. Bar loop with and without :class:`runtime.metrics.MetricsAnalyzer` (the SMA-cross agent on
   the 3 bundled real daily series, backtrader's runonce mode), interleaved, median of
   ``--reps``: the ratio is what metrics cost a backtest.
2. ``GET /metrics`` latency on a live endpoint after that run (median of 200 scrapes), against
   ``GET /healthz`` on the same server (the baseline: the HTTP round trip alone).
3. ``python runner.py`` stopped by SIGTERM mid-run (slow agent, health endpoint on): seconds
   from the signal to the process exit, against the seconds from spawn to the end of a run
   with an invalid setting (the baseline: interpreter start, imports and exit alone); the
   Kubernetes budget is ``SHUTDOWN_TIMEOUT_S`` (10 s target) inside the pod's 30 s grace period.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_ops.py [--reps 5]``; prints a markdown
table for the README.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import backtrader as bt

from agents.sma_cross import SmaCrossAgent
from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
from runtime.config import BUNDLED_DATA_DIR
from runtime.health import HealthServer
from runtime.metrics import MetricsAnalyzer, RunMetrics
from tests.conftest import clean_env
from tests.pubsub_emulator import free_port

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = ("GOOG", "SP500", "NASDAQ")


def bar_loop(reps: int) -> tuple[float, float, int, RunMetrics]:
    cfgs = [CSVFeedConfig(path=BUNDLED_DATA_DIR / f"{s}.csv", symbol=s) for s in SYMBOLS]
    bars = [read_csv_bars(c) for c in cfgs]
    last = RunMetrics()

    def run(with_metrics: bool) -> tuple[float, int]:
        nonlocal last
        cerebro = bt.Cerebro(stdstats=False)
        for c, b in zip(cfgs, bars, strict=True):
            cerebro.adddata(make_csv_feed(c, b), name=c.symbol)
        cerebro.addstrategy(SmaCrossAgent)
        if with_metrics:
            last = RunMetrics()
            cerebro.addanalyzer(MetricsAnalyzer, metrics=last)
        t0 = time.perf_counter()
        strat = cerebro.run()[0]
        return time.perf_counter() - t0, len(strat)

    run(False)  # warm-up (imports, caches)
    plain, timed = [], []
    n = 0
    for _ in range(reps):
        t, n = run(False)
        plain.append(t)
        t, n = run(True)
        timed.append(t)
    return statistics.median(plain), statistics.median(timed), n, last


def scrape(metrics: RunMetrics, count: int = 200) -> tuple[float, float]:
    with HealthServer(port=0, host="127.0.0.1", metrics=metrics) as hs:

        def median_ms(path: str) -> float:
            times = []
            for _ in range(count):
                t0 = time.perf_counter()
                with urllib.request.urlopen(f"http://127.0.0.1:{hs.port}{path}", timeout=5) as r:
                    r.read()
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1000

        median_ms("/healthz")  # warm-up
        return median_ms("/healthz"), median_ms("/metrics")


def runner_env(tmp: Path, **extra: str) -> dict[str, str]:
    return clean_env(
        {
            "FMEL_LOCAL_PATH": str(tmp / "fmel.duckdb"),
            "FMEL_SPILL_DIR": str(tmp / "spill"),
            "LOG_FORMAT": "json",
            **extra,
        }
    )


def sigterm_exit_s(reps: int) -> tuple[float, float]:
    stops, bases = [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            t0 = time.perf_counter()
            subprocess.run(
                [sys.executable, str(ROOT / "runner.py")],
                cwd=tmp,
                timeout=120,
                env=runner_env(tmp, MODE="nonsense"),
                capture_output=True,
                check=False,
            )
            bases.append(time.perf_counter() - t0)
            port = free_port()
            proc = subprocess.Popen(
                [sys.executable, str(ROOT / "runner.py")],
                cwd=tmp,
                env=runner_env(
                    tmp,
                    HEALTH_PORT=str(port),
                    AGENT="tests.slow_agent:SlowAgent",
                    AGENT_PARAMS='{"sleep_s": 0.003}',
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        with urllib.request.urlopen(
                            f"http://127.0.0.1:{port}/metrics", timeout=2
                        ) as r:
                            m = re.search(rb'bars_processed_total\{feed="GOOG"\} (\d+)', r.read())
                            if m and int(m.group(1)) >= 500:
                                break
                    except OSError:
                        pass
                    time.sleep(0.05)
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
                stops.append(time.perf_counter() - t0)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    return statistics.median(stops), statistics.median(bases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    plain, timed, n, metrics = bar_loop(args.reps)
    healthz_ms, metrics_ms = scrape(metrics)
    stop_s, base_s = sigterm_exit_s(max(1, args.reps // 2))
    print("| measure | value | baseline (same run) | ratio |")
    print("|---|---|---|---|")
    print(
        f"| SMA-cross backtest, {n} bars x 3 feeds, with metrics | {n / timed:,.0f} bars/s | "
        f"{n / plain:,.0f} bars/s without | {timed / plain:.3f} x time |"
    )
    print(
        f"| GET /metrics (full registry) | {metrics_ms:.2f} ms | GET /healthz "
        f"{healthz_ms:.2f} ms | {metrics_ms / healthz_ms:.2f} x |"
    )
    print(
        f"| SIGTERM mid-run to exit (flush, report) | {stop_s:.2f} s | process start to exit "
        f"{base_s:.2f} s | {stop_s / base_s:.2f} x; target 10 s, grace 30 s |"
    )


if __name__ == "__main__":
    main()
