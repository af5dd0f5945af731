"""What recording every read costs: the same agent on the same real data, with and without FMEL.

Modes, each run in a fresh subprocess (so peak RSS is its own), interleaved round by round so
machine noise hits every mode alike:

* ``plain``: backtrader alone (the baseline).
* ``fmel``: + the FMEL analyzer, records kept in memory (tracking + record building only).
* ``fmel+duckdb``: + the decision writer thread and the local DuckDB store (the default run).
* ``plain+busy``: ``plain`` with a CPU-bound process running beside it (a Python busy loop, its
  own process: no GIL shared). Not FMEL: it measures what work on the other core costs the bar
  loop on this machine (cores that share a physical core or its caches slow each other), the
  floor under any writer that runs in parallel, in the same rounds.

FMEL runs with ``gc_freeze`` on (``--gc-freeze on``, as the runner's backtests run it), and
with the CSV files' data hashes in the disk cache (``--hash-cache warm``: filled once before the
rounds, as it is for every run after the first over the same files; ``cold``: the cache off,
every run hashes its files as a first run does). See :mod:`core.bar_hash_cache`.

Agents: ``sma`` (:class:`agents.sma_cross.SmaCrossAgent`, 3 real daily feeds) and ``heavy``
(``ReadHeavyAgent``: ``close[0..-29]``, ``high[0]``, ``low[0]`` of every feed per step,
96 reads a step on 3 feeds, about 70 on average as GOOG starts later; issue 14 asks >= 60).

Reported per agent and mode (peak RSS: the largest). Every ratio is paired: each round's run
of the mode over the same round's ``plain`` run (plain runs in the middle of its round, the two
FMEL modes on either side, swapped every round), then the median over the rounds. Absolute
figures (bars/s, final flush) are medians over the rounds.

* time vs plain: wall time of ``cerebro.run()`` plus the writer's final flush, over ``plain``'s.
* final flush: wall time of ``writer.stop()`` after ``cerebro.run()`` (included in the time
  above), and how many records the writer had not written when the run ended.
* main CPU vs plain: CPU time of the main (bar loop) thread (``time.thread_time``) over plain's.
* added cost per read: (main-thread CPU of the mode - plain's) / reads recorded, microseconds.
  Read-heavy agent: also split into the part inside the agent's read loop (its thread CPU time
  there, mode minus plain, per read: what a tracked read itself adds) and the rest per bar
  (recording the bar, the wrappers, the hand-over to the writer).
* writer GIL share: (wall - main-thread CPU time of ``fmel+duckdb``) / wall of ``plain``: the
  time the bar loop's thread did not run while it had work, lost to the writer thread (which
  holds the GIL) or to the other threads and processes of the run taking its core. (Until
  2026-12-02 this was wall of ``fmel+duckdb`` - wall of ``fmel``, over plain's: negative once
  ``fmel``, which resolves reads on the bar loop, became slower than ``fmel+duckdb``.)
  Split in the header line (Linux: the main thread's ``/proc/thread-self/schedstat``, time
  runnable but waiting for a core): the final flush (the bar loop waits for the writer's last
  writes), the run queue (other threads or processes had the cores; on a quiet machine ~0)
  and the rest, the bar loop's thread asleep during the run (mostly waiting for the GIL).

Goals (issue 14) checked by ``--check`` (exit 1 above a goal): SMA-cross ``fmel+duckdb`` <= 1.10x,
read-heavy ``fmel+duckdb`` <= 1.30x, added main-thread cost per read in ``fmel+duckdb`` (the
default run) <= 0.3 us, writer GIL share <= 0.03. The BigQuery goal is measured by
``bench_sink.py``.
A benchmark, not a test: run it on a quiet machine (``make bench`` / ``make bench-check``).

Run: ``python benchmarks/bench_fmel.py [--rounds 5] [--agents sma,heavy] [--check]
[--switch-interval off] [--gc-freeze on|off] [--hash-cache warm|cold]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODES = ("plain", "fmel", "fmel+duckdb", "plain+busy")
# a CPU-bound process beside the bar loop (mode plain+busy): pure Python, nothing imported
# CPU-bound until its parent (the benchmark's child, whose pid it is given: one that died
# while this one started is seen too) is gone, however that ends (SIGKILL included: no
# finally runs then); its parent looked up every ~100,000 iterations
BUSY_LOOP = (
    "import os, sys\n"
    "parent = int(sys.argv[1])\n"
    "while os.getppid() == parent:\n"
    "    for _ in range(100_000):\n"
    "        pass\n"
)
# analyzers.sinks.writer.SWITCH_INTERVAL_S (this script imports the project in child() only)
SWITCH_DEFAULT = 0.0002
# analyzers.config.LOCAL_BATCH_SIZE: the runner's batch for the local store (tests check both)
BATCH_DEFAULT = 2048
AGENTS = ("sma", "heavy")
SYMBOLS = "GOOG,SP500,NASDAQ"
# (agent, metric) -> goal; metric names as in :func:`summarise`
GOALS: dict[tuple[str, str], float] = {
    ("sma", "time_duckdb"): 1.10,
    ("heavy", "time_duckdb"): 1.30,
    ("heavy", "us_per_read_duckdb"): 0.3,  # the default run: reads resolved off the bar loop
    ("sma", "writer_share"): 0.03,
    ("heavy", "writer_share"): 0.03,
}


def _heavy_agent() -> type:
    import backtrader as bt

    class ReadHeavyAgent(bt.Strategy):  # type: ignore[misc]
        """Reads ``close[0]`` .. ``close[-29]``, ``high[0]`` and ``low[0]`` of every feed per
        step (32 reads a feed; fewer in the first 29 bars, never before the first bar), and
        trades the first feed every 50 steps so some records carry orders."""

        def __init__(self) -> None:
            self.steps = 0
            self.read_cpu_s = 0.0  # thread CPU time spent in the read loop (the same in every mode)

        def next(self) -> None:
            self.steps += 1
            total = 0.0
            t0 = time.thread_time()
            for d in self.datas:
                close = d.close
                for i in range(min(30, len(d))):
                    total += close[-i]
                total += d.high[0] - d.low[0]
            self.read_cpu_s += time.thread_time() - t0
            if self.steps % 50 == 0:
                self.buy(data=self.datas[0], size=1)
            elif self.steps % 50 == 10:
                self.sell(data=self.datas[0], size=1)

    return ReadHeavyAgent


def make_cerebro(agent: str, symbols: list[str]) -> Any:
    """The benchmarks' run: ``agent`` (``sma`` or ``heavy``) on the bundled daily files of
    ``symbols``, $100,000 cash, no observers (backtrader's ``stdstats``). Nothing attached."""
    sys.path.insert(0, str(REPO))
    import backtrader as bt

    from agents.sma_cross import SmaCrossAgent
    from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
    from runtime.config import find_csv

    cerebro = bt.Cerebro(stdstats=False)
    for s in symbols:
        config = CSVFeedConfig(path=find_csv(REPO / "data", s), symbol=s)
        cerebro.adddata(make_csv_feed(config, read_csv_bars(config)), name=s)
    cerebro.addstrategy(SmaCrossAgent if agent == "sma" else _heavy_agent())
    cerebro.broker.setcash(100_000)
    return cerebro


def child(
    mode: str,
    agent: str,
    symbols: list[str],
    batch_size: int = BATCH_DEFAULT,
    max_batch: int | None = None,
    switch_interval: float | None = SWITCH_DEFAULT,
    gc_freeze: bool | None = None,
) -> dict[str, float]:
    """One run in this process; returns its measurements (JSON-able). ``switch_interval``:
    the writer's ``switch_interval_s`` (``None``: the interpreter's 5 ms left alone);
    ``gc_freeze``: the analyzer's ``gc_freeze`` (``None``: its default)."""
    sys.path.insert(0, str(REPO))

    from core import bar_hash_cache

    # the hash cache as main() set it for this child (FMEL_HASH_CACHE_DIR), as the runner does
    bar_hash_cache.configure(os.environ.get("FMEL_HASH_CACHE_DIR", ""))
    from analyzers.fmel import FMELAnalyzer
    from analyzers.sinks.duckdb import LocalDuckDBSink
    from analyzers.sinks.writer import DecisionWriter

    cerebro = make_cerebro(agent, symbols)
    writer = None
    tmp = tempfile.mkdtemp()
    gc_param = {} if gc_freeze is None else {"gc_freeze": gc_freeze}
    if mode == "fmel":
        cerebro.addanalyzer(FMELAnalyzer, **gc_param)
    elif mode == "fmel+duckdb":
        writer = DecisionWriter(
            LocalDuckDBSink(Path(tmp) / "fmel.duckdb"),
            batch_size=batch_size,
            max_batch=max_batch,
            queue_size=max(10_000, 2 * batch_size),
            spill_dir=Path(tmp) / "spill",
            switch_interval_s=switch_interval,
        )
        writer.start()
        cerebro.addanalyzer(FMELAnalyzer, writer=writer, **gc_param)
    busy = None
    if mode == "plain+busy":
        # not holding the benchmark's pipes open (a reader of them would wait for it)
        quiet = subprocess.DEVNULL
        busy = subprocess.Popen(
            [sys.executable, "-c", BUSY_LOOP, str(os.getpid())],
            stdin=quiet,
            stdout=quiet,
            stderr=quiet,
        )
    try:
        if busy is not None:
            time.sleep(0.05)  # running before the bar loop starts
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        q0 = _run_queue_s()
        strategy = cerebro.run()[0]
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    t_stop = time.perf_counter()
    left = 0
    if writer is not None:
        left = writer.stats.submitted - writer.stats.written  # not written when the run ended
        writer.stop()
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    queued = _run_queue_s() - q0
    flush = time.perf_counter() - t_stop
    shutil.rmtree(tmp, ignore_errors=True)  # the store and whatever a measured mode wrote
    reads = 0
    if mode == "fmel":
        fmel = next(a for a in strategy.analyzers if isinstance(a, FMELAnalyzer))
        reads = sum(r.reads for r in fmel.records)
    return {
        "read_cpu_s": getattr(strategy, "read_cpu_s", 0.0),
        "wall_s": wall,
        "main_cpu_s": cpu,
        "process_cpu_s": time.process_time() - p0,
        "bars": len(strategy),
        "reads": reads,
        "flush_s": flush,
        "left_at_end": left,
        "value": cerebro.broker.getvalue(),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "run_queue_s": queued,
    }


def _run_queue_s() -> float:
    """Seconds this thread has been runnable but waiting for a core (Linux schedstat's second
    field); 0.0 where the kernel does not say."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def fill_hash_cache(symbols: list[str], folder: Path) -> None:
    """Hash the symbols' files once into ``folder`` (:mod:`core.bar_hash_cache`): the state
    after a first run over them."""
    sys.path.insert(0, str(REPO))
    from core import bar_hash_cache
    from feeds.csv import CSVFeedConfig, read_csv_bars
    from runtime.config import find_csv

    bar_hash_cache.configure(folder)
    for s in symbols:
        list(read_csv_bars(CSVFeedConfig(path=find_csv(REPO / "data", s), symbol=s)).hashes)


def summarise(results: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Medians and ratios of one agent's runs (keys: see the module docstring).

    Ratios are paired: each round's run of a mode over the same round's ``plain`` run (the
    runs of a round follow each other), then the median over the rounds. This machine's speed
    drifts by up to 2x over tens of seconds (a shared virtual machine); a ratio of medians
    taken over the whole benchmark mixes those phases, a paired one mostly does not.
    """

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[mode])

    def paired(mode: str, key: str) -> list[tuple[float, float]]:
        return [(r[key], p[key]) for r, p in zip(results[mode], results["plain"], strict=True)]

    plain_wall = med("plain", "wall_s")
    reads = max(r["reads"] for r in results["fmel"]) or 1.0
    out = {
        "bars": med("plain", "bars"),
        "reads": reads,
        "plain_bars_s": med("plain", "bars") / plain_wall,
        # the bar loop's wall time in which its thread did not run (waiting for the GIL the
        # writer holds, or for a core), over plain's wall time
        "writer_share": statistics.median(
            (r["wall_s"] - r["main_cpu_s"]) / p["wall_s"]
            for r, p in zip(results["fmel+duckdb"], results["plain"], strict=True)
        ),
        "flush_s": med("fmel+duckdb", "flush_s"),
        # its split: the final flush, the run queue, the rest (asleep in the bar loop: the GIL)
        "share_flush": statistics.median(
            r["flush_s"] / p["wall_s"]
            for r, p in zip(results["fmel+duckdb"], results["plain"], strict=True)
        ),
        "share_queue": statistics.median(
            r.get("run_queue_s", 0.0) / p["wall_s"]
            for r, p in zip(results["fmel+duckdb"], results["plain"], strict=True)
        ),
        "share_asleep": statistics.median(
            (r["wall_s"] - r["main_cpu_s"] - r["flush_s"] - r.get("run_queue_s", 0.0)) / p["wall_s"]
            for r, p in zip(results["fmel+duckdb"], results["plain"], strict=True)
        ),
        "left_at_end": med("fmel+duckdb", "left_at_end"),
    }
    for mode, key in (("fmel", "fmel"), ("fmel+duckdb", "duckdb")):
        out[f"time_{key}"] = statistics.median(a / b for a, b in paired(mode, "wall_s"))
        cpu = paired(mode, "main_cpu_s")
        out[f"cpu_{key}"] = statistics.median(a / b for a, b in cpu)
        out[f"us_per_read_{key}"] = statistics.median((a - b) / reads * 1e6 for a, b in cpu)
        # the split of that added CPU: in the agent's read loop (the tracked reads themselves;
        # read-heavy agent only), and the rest per bar (recording the bar, wrappers, hand-over)
        rd = paired(mode, "read_cpu_s")
        out[f"us_in_reads_{key}"] = statistics.median((a - b) / reads * 1e6 for a, b in rd)
        out[f"us_per_bar_{key}"] = statistics.median(
            ((c - d) - (a - b)) / out["bars"] * 1e6 for (a, b), (c, d) in zip(rd, cpu, strict=True)
        )
    busy = paired("plain+busy", "wall_s")
    out["busy_time"] = statistics.median(a / b for a, b in busy)
    out["busy_cpu"] = statistics.median(a / b for a, b in paired("plain+busy", "main_cpu_s"))
    for mode in MODES:
        out[f"rss_{mode}"] = max(r["rss_mb"] for r in results[mode])
        out[f"bars_s_{mode}"] = med(mode, "bars") / med(mode, "wall_s")
    return out


def table(agent: str, s: dict[str, float], rounds: int) -> list[str]:
    name = "SMA-cross" if agent == "sma" else "read-heavy"
    lines = [
        f"**{name}** agent, {s['bars']:.0f} steps, {s['reads']:,.0f} reads "
        f"({s['reads'] / s['bars']:.1f} a step), {rounds} rounds (ratios paired per round); "
        f"writer GIL share {s['writer_share']:.3f} (final flush {s['share_flush']:.3f}, run "
        f"queue {s['share_queue']:.3f}, asleep in the bar loop {s['share_asleep']:.3f}); "
        "final flush (fmel+duckdb) "
        f"{s['flush_s']:.2f} s for {s['left_at_end']:,.0f} records not yet written when the "
        "run ended",
        "",
        "| mode | bars/s | time vs plain | main-thread CPU vs plain | added main-thread us/read "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    if s["us_in_reads_duckdb"]:
        lines[0] += (
            f"; fmel+duckdb's added main-thread CPU split: {s['us_in_reads_duckdb']:.2f} us per "
            f"read inside the agent's read loop, {s['us_per_bar_duckdb']:.1f} us per bar "
            "outside it"
        )
    for mode, key in (("plain", ""), ("fmel", "fmel"), ("fmel+duckdb", "duckdb")):
        t = f"{s[f'time_{key}']:.2f}x" if key else "1.00x"
        c = f"{s[f'cpu_{key}']:.2f}x" if key else "1.00x"
        u = f"{s[f'us_per_read_{key}']:.2f}" if key else "-"
        lines.append(
            f"| {mode} | {s[f'bars_s_{mode}']:,.0f} | {t} | {c} | {u} | {s[f'rss_{mode}']:.0f} |"
        )
    lines.append(
        f"| plain+busy (not FMEL: a CPU-bound process on the other core) "
        f"| {s['bars_s_plain+busy']:,.0f} | {s['busy_time']:.2f}x | {s['busy_cpu']:.2f}x | - "
        f"| {s['rss_plain+busy']:.0f} |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--symbols", default=SYMBOLS)
    parser.add_argument("--agents", default=",".join(AGENTS))
    parser.add_argument("--check", action="store_true", help="exit 1 above a goal (issue 14)")
    parser.add_argument("--child", choices=MODES)
    parser.add_argument("--agent", choices=AGENTS, default="sma")
    parser.add_argument(
        "--batch-size", type=int, default=BATCH_DEFAULT, help="the writer's batch_size"
    )
    parser.add_argument("--max-batch", type=int, default=None, help="the writer's max_batch")
    parser.add_argument(
        "--switch-interval",
        default=str(SWITCH_DEFAULT),
        help="the writer's switch_interval_s, seconds, or 'off' (the interpreter's 5 ms)",
    )
    parser.add_argument(
        "--gc-freeze",
        choices=("default", "on", "off"),
        default="on",
        help="the analyzer's gc_freeze (on: as the runner's backtests run it; default: the "
        "analyzer's own default, off)",
    )
    parser.add_argument(
        "--hash-cache",
        choices=("warm", "cold"),
        default="warm",
        help="the CSV bars' hash cache (core.bar_hash_cache) of the FMEL runs: warm (filled "
        "before the rounds, as on every run after the first over the same files) or cold (off: "
        "every run hashes its files, as the first one does)",
    )
    args = parser.parse_args()
    symbols = args.symbols.split(",")
    freeze = {"default": None, "on": True, "off": False}[args.gc_freeze]
    switch = None if args.switch_interval == "off" else float(args.switch_interval)
    if args.child:
        sys.stdout.write(
            json.dumps(
                child(
                    args.child,
                    args.agent,
                    symbols,
                    args.batch_size,
                    args.max_batch,
                    switch,
                    freeze,
                )
            )
        )
        return
    agents = args.agents.split(",")
    CHILD = (sys.executable, __file__, "--child")  # noqa: N806
    env = dict(os.environ, FMEL_HASH_CACHE_DIR="off")
    if args.hash_cache == "warm":
        env["FMEL_HASH_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="bench-hashes-")
        fill_hash_cache(symbols, Path(cache))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {
        a: {m: [] for m in MODES} for a in agents
    }
    for i in range(args.rounds):
        for agent in agents:
            # plain in the middle of its round, the FMEL modes on either side in turn: each
            # ratio pairs runs made next to each other, neither mode always first
            order: tuple[str, ...] = (
                ("fmel", "plain", "fmel+duckdb") if i % 2 else ("fmel+duckdb", "plain", "fmel")
            )
            order += ("plain+busy",)  # after its plain run, one run apart, every round
            for mode in order:
                out = subprocess.run(
                    [*CHILD, mode, "--agent", agent, "--symbols", args.symbols]
                    + ["--batch-size", str(args.batch_size)]
                    + ["--switch-interval", args.switch_interval, "--gc-freeze", args.gc_freeze]
                    + ([] if args.max_batch is None else ["--max-batch", str(args.max_batch)]),
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                results[agent][mode].append(json.loads(out.stdout))
    lines = [
        f"Feeds: {', '.join(symbols)} (real daily files in data/); bar hash cache "
        f"{args.hash_cache}",
        "",
    ]
    failed = []
    for agent in agents:
        values = {round(r["value"], 6) for m in MODES for r in results[agent][m]}
        if len(values) != 1:
            raise SystemExit(f"{agent}: results differ between modes: {values}")
        s = summarise(results[agent])
        lines += [*table(agent, s, args.rounds), ""]
        for (a, metric), goal in GOALS.items():
            if a == agent and s[metric] > goal:
                failed.append(f"{agent} {metric} = {s[metric]:.3f} > goal {goal}")
    sys.stdout.write("\n".join(lines))
    if failed:
        sys.stdout.write("Above the goals (issue 14):\n" + "\n".join(failed) + "\n")
        if args.check:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
