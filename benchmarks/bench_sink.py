"""BigQuery decision sink: row size, records per second into bqemulator, and bar-loop cost.

1. Row size of a read-heavy decision record (~130 reads over six daily feeds,
   :mod:`tests.bq_read_heavy`): the full JSON row, the row a row-per-read table gets (null fields
   left out, :func:`analyzers.sinks.bigquery.rows.compact_row`), and the compact row of
   ``<table>_compact`` (reads grouped per bar, :func:`analyzers.sinks.bigquery.compact.pack_row`).
   And the client's CPU per record on the writer thread (build the row, check it, encode it) for a
   row-per-read table and for compact rows (packed straight from the record's reads), best of 5
   passes each, as a ratio.
2. Records per second of read-heavy records into the emulator, each measured in the same run as
   the baseline and given as a ratio to it:

   * baseline: ``insert_rows_json`` called as the sink called it before (full rows,
     ``skipInvalidRows``, one request at a time, requests up to 9 MB);
   * ``BigQuerySink.write_records`` into a row-per-read table (a deployment made before compact
     rows: null fields left out, requests sized by bytes, 4 in flight);
   * ``BigQuerySink.write_records`` into a new deployment (compact rows, requests sized by
     bytes) with 1 request in flight and with 4 (the default);
   * a :class:`~analyzers.sinks.writer.DecisionWriter` draining a spill file of those rows left
     by an earlier run (each row looked up by insert id first, then written).

   Each mode writes the same rows into its own table, every row once (checked by a count).
3. The bar loop with the BigQuery sink against the same loop with a sink that does nothing (the
   FMEL analyzer and the writer thread in both): the ratio is what BigQuery I/O adds to
   ``cerebro.run()``. The final flush (``writer.stop()``) is reported apart. Rounds alternate
   the modes so machine noise hits all alike. Also as ratios: the bar loop's main-thread CPU
   time (the client's Python on the writer thread shows in the wall time, as the GIL, not
   here) and its wall time less the time it waited for a core (the run queue: mostly the
   emulator's own work, which BigQuery does on Google's side).
   And the sink's client CPU a decision: this process's CPU (every thread, run and final flush)
   less the null sink's, over the decisions; the emulator's CPU, in its own process, is not in
   it. Of the three, the least noisy here: the bar loop's ratio moves with how far behind the
   emulator lets the writer fall, which moves rows into the final flush.

The emulator shares the machine's cores with the client here, and converts every nested row in
Python: its own ceiling, far below BigQuery's (per project 1 GB/s in the US and EU
multi-regions, "Quotas and limits", streaming inserts). Against BigQuery, requests in flight
overlap network round trips instead.

Run: ``python benchmarks/bench_sink.py [--rows 300] [--rounds 3] [--loop-only]`` (needs the
emulator venv: ``bash tests/bqemu/setup.sh``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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


def backtest(writer: Any) -> tuple[float, float, int, float, float, float]:
    """SMA-cross on GOOG, SP500, NASDAQ (full files); returns (run_s, flush_s, decisions,
    main-thread CPU s, run-queue s, process CPU s) of ``cerebro.run()``: the run queue is the
    time the bar loop was runnable but waited for a core (the emulator's own work on this
    machine, which BigQuery does on Google's side; bench_fmel's ``_run_queue_s``); the process
    CPU is every thread of this process (not the emulator's) from the start to the end of the
    final flush."""
    import backtrader as bt
    from bench_fmel import _run_queue_s

    from agents.sma_cross import SmaCrossAgent
    from analyzers.fmel import FMELAnalyzer
    from feeds.csv import CSVFeedConfig, make_csv_feed
    from runtime.config import BUNDLED_DATA_DIR

    cerebro = bt.Cerebro(stdstats=False)
    for sym in ("GOOG", "SP500", "NASDAQ"):
        cerebro.adddata(
            make_csv_feed(CSVFeedConfig(path=BUNDLED_DATA_DIR / f"{sym}.csv", symbol=sym)), name=sym
        )
    cerebro.addstrategy(SmaCrossAgent)
    cerebro.broker.setcash(100_000)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer)
    writer.start()
    t0, c0, q0 = time.perf_counter(), time.thread_time(), _run_queue_s()
    p0 = time.process_time()
    strategy = cerebro.run()[0]
    t1, cpu, queued = time.perf_counter(), time.thread_time() - c0, _run_queue_s() - q0
    stats = writer.stop(timeout_s=600)
    t2, process_s = time.perf_counter(), time.process_time() - p0
    decisions = strategy.analyzers.fmel.decisions
    if stats.written != decisions:
        raise SystemExit(f"writer wrote {stats.written} of {decisions} decisions: {stats}")
    return t1 - t0, t2 - t1, decisions, cpu, queued, process_s


def main(argv: list[str] | None = None) -> int:
    from analyzers.schema import DECISION_SCHEMA, bigquery_schema, to_row
    from analyzers.sinks.bigquery.compact import pack_reads, pack_row
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig
    from analyzers.sinks.bigquery.rows import compact_row, encode_entry, validate_row
    from analyzers.sinks.bigquery.sink import BigQuerySink, _light
    from analyzers.sinks.spill import SpillFile
    from analyzers.sinks.writer import DecisionWriter
    from tests.bq_read_heavy import read_heavy_records
    from tests.bqemu_harness import BigQueryEmulator, unique_dataset

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=300, help="read-heavy rows per mode")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each part")
    parser.add_argument(
        "--batch", type=int, default=10, help="the bar loop's writer batch (FMEL_BATCH_SIZE)"
    )
    parser.add_argument(
        "--loop-only", action="store_true", help="only part 3 (the bar loop), not parts 1 and 2"
    )
    args = parser.parse_args(argv)

    records: list[Any] = []
    rows: list[dict[str, Any]] = []
    full: list[int] = []
    if not args.loop_only:  # parts 1 and 2 (their records: a four-year backtest)
        records = read_heavy_records("bench", start="2015-01-01", end="2018-12-31")
        records = [r for r in records if r.reads >= 120][: args.rows]
        rows = [to_row(r) for r in records]
        full = [len(json.dumps(r, separators=(",", ":"))) for r in rows]
        compact = [len(json.dumps(compact_row(r), separators=(",", ":"))) for r in rows]
        reads, full_kb = statistics.median(r.reads for r in records), statistics.median(full) / 1e3
        packed = [len(json.dumps(pack_row(compact_row(r)), separators=(",", ":"))) for r in rows]
        compact_kb = statistics.median(compact) / 1e3
        packed_kb = statistics.median(packed) / 1e3
        print(
            f"row size, read-heavy record ({reads:.0f} reads): full {full_kb:.1f} kB; sent to a "
            f"row-per-read table {compact_kb:.1f} kB ({compact_kb / full_kb:.2f}x); sent as a "
            f"compact row {packed_kb:.1f} kB ({packed_kb / full_kb:.2f}x, "
            f"{packed_kb / compact_kb:.2f}x the row-per-read row)"
        )

        light = _light(DECISION_SCHEMA)

        def cpu_per_read() -> None:  # the sink's path into a row-per-read table
            for r in records:
                row = to_row(r)
                validate_row(row, light)
                encode_entry(compact_row(row))

        def cpu_compact() -> None:  # the sink's path for fresh records into compact rows
            for r in records:
                row = to_row(r._replace(data_accessed=()))  # plain records here
                row["data_accessed"] = pack_reads(r.data_accessed)
                validate_row(row, light)
                encode_entry(compact_row(row))

        def best_ms(fn: Callable[[], None]) -> float:
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            return min(times) / len(records) * 1e3

        per_read_ms, compact_ms = best_ms(cpu_per_read), best_ms(cpu_compact)
        print(
            "client CPU per read-heavy record (build, check, encode): row-per-read "
            f"{per_read_ms:.2f} ms, compact {compact_ms:.2f} ms (x{compact_ms / per_read_ms:.2f})"
        )

    emu = BigQueryEmulator()
    emu.start()
    try:

        def sink(*, per_read: bool = False, **kw: Any) -> BigQuerySink:
            """A sink on a new dataset; ``per_read``: the dataset already has a row-per-read
            ``decisions`` table (a deployment made before compact rows)."""
            from google.cloud import bigquery

            dataset = unique_dataset("bench")
            if per_read:
                client = emu.client()
                try:
                    client.create_dataset(f"{emu.project}.{dataset}")
                    # As the sink made it before compact rows: partitioned, clustered.
                    table = bigquery.Table(
                        f"{emu.project}.{dataset}.decisions", schema=bigquery_schema()
                    )
                    table.time_partitioning = bigquery.TimePartitioning(
                        type_=bigquery.TimePartitioningType.DAY, field="bar_time"
                    )
                    table.clustering_fields = ["agent_id", "session_id"]
                    client.create_table(table)
                finally:
                    client.close()
            return BigQuerySink(
                BigQuerySinkConfig(
                    project=emu.project,
                    dataset=dataset,
                    api_endpoint=emu.endpoint,
                    timeout_s=600,
                ),
                **kw,
            )

        def count(s: BigQuerySink) -> int:
            got = emu.query(
                f"SELECT COUNT(DISTINCT decision_id) AS d, COUNT(*) AS n FROM `{s.table_id}`"
            )
            if got[0]["d"] != got[0]["n"]:
                raise SystemExit(f"duplicates in {s.table_id}: {got}")
            return int(got[0]["n"])

        def baseline(s: BigQuerySink) -> None:
            i = 0
            while i < len(rows):  # the old catch-up path: full rows, up to 9 MB a request
                size, j = 0, i
                while j < len(rows) and size + full[j] < 9_000_000 and j - i < 500:
                    size += full[j]
                    j += 1
                part = rows[i:j]
                errors = s._client.insert_rows_json(
                    s.insert_id,
                    part,
                    row_ids=[r["decision_id"] for r in part],
                    skip_invalid_rows=True,
                    retry=None,
                    timeout=600,
                )
                if errors:
                    raise SystemExit(f"baseline refused rows: {errors[:2]}")
                i = j

        def direct(s: BigQuerySink) -> None:
            _check(s.write_records(records))

        def drain(s: BigQuerySink) -> None:
            spill = Path(tempfile.mkdtemp())
            SpillFile(spill / "spill-bigquery.jsonl").append(rows)
            writer = DecisionWriter(s, spill_dir=spill)
            writer.start()
            if not writer.wait_drained(3600):
                raise SystemExit(f"drain did not finish: {writer.stats}")
            writer.stop(timeout_s=60)

        if not args.loop_only:
            base_label = "baseline: full rows, skipInvalidRows, 1 in flight"
            # label -> (what runs, requests in flight, into a row-per-read table)
            throughput: dict[str, tuple[Callable[[BigQuerySink], None], int, bool]] = {
                base_label: (baseline, 1, True),
                "sink: row-per-read table, 4 in flight": (direct, 4, True),
                "sink: compact rows, 1 in flight": (direct, 1, False),
                "sink: compact rows, 4 in flight": (direct, 4, False),
                "writer draining an earlier run's spill, 4 in flight": (drain, 4, False),
            }
            rates: dict[str, list[float]] = {m: [] for m in throughput}
            for _ in range(args.rounds):  # modes alternate, so machine noise hits all alike
                for label, (fn, in_flight, per_read) in throughput.items():
                    s = sink(max_in_flight=in_flight, per_read=per_read)
                    s.open()
                    if s.compact == per_read:
                        raise SystemExit(f"{label}: wrong layout ({s.insert_id})")
                    t0 = time.perf_counter()
                    fn(s)
                    rates[label].append(len(rows) / (time.perf_counter() - t0))
                    if count(s) != len(rows):
                        raise SystemExit(f"{label}: not every row stored once")
                    s.close()
            b = statistics.median(rates[base_label])
            print(
                f"records/s into the emulator, {len(rows)} read-heavy records per mode, median of "
                f"{args.rounds} rounds:"
            )
            for label, values in rates.items():
                rate = statistics.median(values)
                print(f"  {label:<54} {rate:7.1f} records/s  x{rate / b:.2f}")
        tmp = Path(tempfile.mkdtemp())

        print(f"bar loop (SMA-cross, 3 symbols x 5031 bars, FMEL on), {args.rounds} rounds:")
        modes = {"null sink": args.batch, "bigquery": args.batch}  # mode -> FMEL_BATCH_SIZE
        runs: dict[str, list[float]] = {m: [] for m in modes}
        flush: dict[str, list[float]] = {m: [] for m in modes}
        cpus: dict[str, list[float]] = {m: [] for m in modes}
        on_core: dict[str, list[float]] = {m: [] for m in modes}  # run time less the run queue
        process: dict[str, list[float]] = {m: [] for m in modes}  # this process's CPU
        decisions = 0
        for r in range(args.rounds):
            for mode in runs:
                target: Any = NullSink() if mode == "null sink" else sink()
                w = DecisionWriter(
                    target,
                    batch_size=modes[mode],
                    flush_interval_s=5.0,
                    spill_dir=tmp / f"spill-{mode}-{r}",
                )
                run_s, flush_s, decisions, cpu_s, queued_s, process_s = backtest(w)
                process[mode].append(process_s)
                runs[mode].append(run_s)
                flush[mode].append(flush_s)
                cpus[mode].append(cpu_s)
                on_core[mode].append(run_s - queued_s)
        base_s = statistics.median(runs["null sink"])
        base_cpu = statistics.median(cpus["null sink"])
        base_on = statistics.median(on_core["null sink"])
        for mode in runs:
            med = statistics.median(runs[mode])
            print(
                f"  {mode:>12} (batch {modes[mode]:>3}): run {med:6.2f} s "
                f"({decisions / med:7.0f} decisions/s), "
                f"x{med / base_s:.2f} vs null sink (main-thread CPU "
                f"x{statistics.median(cpus[mode]) / base_cpu:.2f}; less the run queue "
                f"x{statistics.median(on_core[mode]) / base_on:.2f}); final flush "
                f"{statistics.median(flush[mode]):.2f} s"
            )
        extra = statistics.median(process["bigquery"]) - statistics.median(process["null sink"])
        print(
            "  the sink's client CPU (this process's, run and final flush, less the null "
            f"sink's): {extra / decisions * 1e6:.0f} us a decision"
        )
    finally:
        emu.close()
    return 0


def _check(errors: Sequence[Any]) -> None:
    if errors:
        raise SystemExit(f"rows refused: {list(errors)[:2]}")


if __name__ == "__main__":
    raise SystemExit(main())
