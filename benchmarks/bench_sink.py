"""BigQuery decision sink throughput and what it costs the bar loop (bqemulator, real client).

1. Records per second through :class:`analyzers.sinks.bigquery.sink.BigQuerySink` in batches of
   10 and 500 (``write()`` called directly, real decision rows of a real backtest, each written
   once; every batch is one insertAll request at these sizes).
2. The bar loop with the BigQuery sink (writer batches of 10, the default, and 500) against
   the same loop with a sink that does nothing (the FMEL analyzer and the writer thread in
   both): the ratio is what BigQuery I/O adds to ``cerebro.run()``. The final flush
   (``writer.stop()``) is reported apart. Rounds alternate the modes so machine noise hits
   all alike. The emulator shares the 2 cores with the
   loop here; against real BigQuery the I/O waits on the network instead.

Run: ``python benchmarks/bench_sink.py [--rounds 3] [--rows 3000]`` (needs the emulator venv:
``bash tests/bqemu/setup.sh``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


class NullSink:
    """Takes every row and does nothing (the baseline of the bar-loop cost)."""

    name = "null"

    def open(self) -> None:
        pass

    def write(self, rows: Sequence[Any]) -> list[Any]:
        return []

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "null"

    def example_query(self) -> str:
        return ""


def backtest(writer: Any) -> tuple[float, float, int]:
    """SMA-cross on GOOG, SP500, NASDAQ (full files); returns (run_s, flush_s, decisions)."""
    import backtrader as bt

    from agents.sma_cross import SmaCrossAgent
    from analyzers.fmel import FMELAnalyzer
    from feeds.csv import make_csv_feed
    from runtime.config import BUNDLED_DATA_DIR, CSVFeedConfig

    cerebro = bt.Cerebro(stdstats=False)
    for sym in ("GOOG", "SP500", "NASDAQ"):
        cerebro.adddata(
            make_csv_feed(CSVFeedConfig(path=BUNDLED_DATA_DIR / f"{sym}.csv", symbol=sym)), name=sym
        )
    cerebro.addstrategy(SmaCrossAgent)
    cerebro.broker.setcash(100_000)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer)
    writer.start()
    t0 = time.perf_counter()
    strategy = cerebro.run()[0]
    t1 = time.perf_counter()
    stats = writer.stop(timeout_s=600)
    t2 = time.perf_counter()
    decisions = strategy.analyzers.fmel.decisions
    if stats.written != decisions:
        raise SystemExit(f"writer wrote {stats.written} of {decisions} decisions: {stats}")
    return t1 - t0, t2 - t1, decisions


def main(argv: list[str] | None = None) -> int:
    from analyzers.schema import to_row
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig
    from analyzers.sinks.bigquery.sink import BigQuerySink
    from analyzers.sinks.writer import DecisionWriter
    from tests.bq_agents import real_records
    from tests.bqemu_harness import BigQueryEmulator, unique_dataset

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=3000, help="rows per throughput test")
    args = parser.parse_args(argv)

    emu = BigQueryEmulator()
    emu.start()
    try:

        def sink() -> BigQuerySink:
            return BigQuerySink(
                BigQuerySinkConfig(
                    project=emu.project,
                    dataset=unique_dataset("bench"),
                    api_endpoint=emu.endpoint,
                    timeout_s=60,
                )
            )

        base = [
            to_row(r)
            for r in real_records("bench", start="1999-01-01", end="2018-12-31", symbols=("SP500",))
        ]
        rows = [
            dict(base[i % len(base)], decision_id=f"bench:{i}", decision_point=i)
            for i in range(args.rows)
        ]
        print(
            f"throughput: {len(rows)} real decision rows "
            f"(~{sum(len(str(r)) for r in rows) // len(rows)} bytes each)"
        )
        for batch in (10, 500):
            s = sink()
            s.open()
            t0 = time.perf_counter()
            for i in range(0, len(rows), batch):
                if s.write(rows[i : i + batch]):
                    raise SystemExit("rows refused")
            dt = time.perf_counter() - t0
            print(
                f"  batch {batch:>3}: {len(rows) / dt:8.0f} records/s "
                f"({s.stats.requests} requests, {dt:.2f} s)"
            )
            s.close()

        print(f"bar loop (SMA-cross, 3 symbols x 5031 bars, FMEL on), {args.rounds} rounds:")
        modes = {"null sink": 10, "bigquery": 10, "bigquery 500": 500}  # mode -> batch size
        runs: dict[str, list[float]] = {m: [] for m in modes}
        flush: dict[str, list[float]] = {m: [] for m in modes}
        decisions = 0
        tmp = Path(tempfile.mkdtemp())
        for r in range(args.rounds):
            for mode in runs:
                target: Any = NullSink() if mode == "null sink" else sink()
                writer = DecisionWriter(
                    target,
                    batch_size=modes[mode],
                    flush_interval_s=5.0,
                    spill_dir=tmp / f"spill-{mode}-{r}",
                )
                run_s, flush_s, decisions = backtest(writer)
                runs[mode].append(run_s)
                flush[mode].append(flush_s)
        base_s = statistics.median(runs["null sink"])
        for mode in runs:
            med = statistics.median(runs[mode])
            print(
                f"  {mode:>12} (batch {modes[mode]:>3}): run {med:6.2f} s "
                f"({decisions / med:7.0f} decisions/s), "
                f"x{med / base_s:.2f} vs null sink; final flush "
                f"{statistics.median(flush[mode]):.2f} s"
            )
    finally:
        emu.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
