"""Soak of the live path: 30 minutes (``--minutes``) of 50 symbols at one bar per second each,
through ``runner.py`` in paper mode, the real Pub/Sub emulator and a TCP proxy, with emulator
restarts, network cuts, malformed bursts and kill -9 of the runner with restarts, at random
moments (``--seed``). See :mod:`tests.soak_harness` for what each fault does and how the store
is checked.

Pass criteria: every bar time decided exactly once (nothing lost, nothing duplicated), every
decision names every symbol's bar of its time, the runner's RSS flat (the longest-lived runner's
median RSS over the last third of its life within 10 % of the second third's). CI runs a
3-minute version: ``tests/e2e/test_pubsub_soak.py``.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_soak.py [--minutes 30] [--symbols 50]
[--seed 12] [--work DIR]``. Prints a markdown table and one JSON line; exit code 1 when a
criterion fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from tests.soak_harness import SoakConfig, run_soak


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--symbols", type=int, default=50)
    p.add_argument("--rate", type=float, default=1.0, help="bar times per second")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--work", type=Path, default=None, help="folder for the runners' files")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    minutes = args.minutes
    # About one fault of each kind every 6 minutes (at least one of each).
    per = max(1, round(minutes / 6))
    cfg = SoakConfig(
        duration_s=minutes * 60,
        work=args.work or Path(tempfile.mkdtemp(prefix="bench-soak-")),
        symbols=args.symbols,
        rate_hz=args.rate,
        emulator_restarts=per,
        network_cuts=2 * per,
        malformed_bursts=2 * per,
        kills=2 * per,
        seed=args.seed,
    )
    result = run_soak(cfg)
    r = result.as_dict()
    growth = result.rss_growth()
    ok = (
        not result.missing_decisions
        and result.duplicate_decisions == 0
        and not result.lost_bars
        and growth is not None
        and growth < 0.10
    )
    print(
        f"Soak: {minutes:g} min, {args.symbols} symbols, {args.rate:g} bar times/s, seed "
        f"{args.seed}\n"
    )
    print("| measure | value |")
    print("|---|---:|")
    for label, value in (
        ("bar times published", r["bar_times"]),
        ("decisions stored", r["decisions"]),
        ("bar times without a decision (lost)", r["missing_decisions"]),
        ("extra decisions (duplicated)", r["duplicate_decisions"]),
        ("bars no decision names (lost)", r["lost_bars"]),
        ("malformed messages sent", r["malformed_sent"]),
        ("runner processes (kills + 1)", len(r["runners"])),
        ("max RSS of a runner, MB", max(x["rss_max_mb"] for x in r["runners"])),
        ("RSS growth, longest-lived runner", r["rss_growth_longest_runner"]),
        ("wall time, s", r["elapsed_s"]),
    ):
        print(f"| {label} | {value} |")
    print("\nfaults: " + ", ".join(f"{t:g} s {k}" for t, k in r["events"]))
    print(json.dumps(r))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
