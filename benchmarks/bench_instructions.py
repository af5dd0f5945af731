"""What recording costs, counted in instructions instead of seconds (deterministic).

The wall-clock ratios of ``bench_fmel.py`` move by a factor of two from run to run on a shared
2-core machine; instruction counts do not. Each mode runs once in a fresh process under
valgrind's callgrind (``--separate-threads=yes``), which counts the instructions every thread
executes; ``os.getppid()`` is called right before ``cerebro.run()`` and right after the writer's
final flush, and callgrind dumps its counters at each call (``--dump-before=os_getppid``), so
imports, reading the CSV files and opening the store are left out.

Reported per agent (``sma``, ``heavy``: the agents of ``bench_fmel.py``) and mode:

* main thread: instructions of the bar loop, over plain backtrader's (the cost the run pays
  whatever the machine);
* other threads: instructions of every other thread of the process (the decision writer:
  resolving reads, building Arrow tables, DuckDB's insert), over plain's main thread. Part of
  it runs without the GIL (DuckDB), so it is an upper bound of what competes with the bar loop.
  The helper process that hashes CSV bars (``core.hash_worker``) is not counted: valgrind does
  not follow child processes, and it holds no GIL of the run.

Instructions are not time: a cache miss costs more than an add. Use this to decide between two
versions of the code, and ``bench_fmel.py`` for what a run takes.

Run: ``python benchmarks/bench_instructions.py [--agents sma,heavy]`` (valgrind must be
installed; each run takes about 100 times as long as without it: ~2 minutes a mode here).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# "-py": the tracked lines' reads in pure Python (proxies.use_compiled(False)), not the C
# extension the other FMEL modes use
MODES = ("plain", "fmel-py", "fmel", "fmel+duckdb-py", "fmel+duckdb")
SYMBOLS = "GOOG,SP500,NASDAQ"


def child(mode: str, agent: str) -> None:
    """One run in this process, the run between two ``os.getppid()`` calls."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fmel import make_cerebro

    from analyzers.config import LOCAL_BATCH_SIZE
    from analyzers.fmel import FMELAnalyzer
    from analyzers.sinks.duckdb import LocalDuckDBSink
    from analyzers.sinks.writer import DecisionWriter
    from analyzers.tracking import proxies

    cerebro = make_cerebro(agent, SYMBOLS.split(","))
    writer = None
    tmp = Path(tempfile.mkdtemp())
    if mode.endswith("-py"):
        proxies.use_compiled(False)
        mode = mode.removesuffix("-py")
    elif mode != "plain" and not proxies.COMPILED:
        sys.exit("the C extension is not built: run make ext")
    if mode == "fmel":
        cerebro.addanalyzer(FMELAnalyzer)
    elif mode == "fmel+duckdb":
        writer = DecisionWriter(
            LocalDuckDBSink(tmp / "fmel.duckdb"),
            batch_size=LOCAL_BATCH_SIZE,  # the runner's default for the local store
            spill_dir=tmp / "spill",
        )
        writer.start()
        cerebro.addanalyzer(FMELAnalyzer, writer=writer)
    os.getppid()  # callgrind dumps here: what came before is set-up
    cerebro.run()
    if writer is not None:
        # valgrind runs ~50x slower: with the default 10 s budget the final flush would be cut
        # short and the rest spilled as JSON on this (main) thread, a different path, by timing
        writer.stop(timeout_s=3600)
    os.getppid()  # ...and here: the window is the run and its final flush
    shutil.rmtree(tmp, ignore_errors=True)


def _summary(path: Path) -> int:
    match = re.search(r"^(?:summary|totals): (\d+)", path.read_text(), re.M)
    return int(match.group(1)) if match else 0


def callgrind(
    argv: list[str], prefix: Path, env: dict[str, str] | None = None, fixed: bool = False
) -> tuple[int, int, str]:
    """Run ``argv`` (a Python child that calls ``os.getppid()`` around its window) under
    callgrind, its files at ``prefix``: (main thread instructions of the window, every other
    thread's, the child's stdout). ``fixed``: with address space randomisation off
    (``setarch -R``, util-linux), so objects' ids, and the orders of what is keyed by them,
    are the same in every run."""
    fix = ["setarch", platform.machine(), "-R"] if fixed else []
    done = subprocess.run(
        [
            *fix,
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            "--dump-before=os_getppid",
            f"--callgrind-out-file={prefix}.%p",
            *argv,
        ],
        check=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    main = other = 0
    for path in prefix.parent.glob(f"{prefix.name}.*"):
        n = _summary(path)
        if path.name.endswith(".2-01"):  # the main thread's part 2: the window
            main += n
        elif not path.name.endswith("-01"):
            # another thread: callgrind dumps the counters of the thread calling getppid only,
            # so the others' are in the final file (their whole lives: they start in set-up)
            other += n
    return main, other, done.stdout


def measure(mode: str, agent: str, out: Path) -> tuple[int, int]:
    """(main thread, other threads) instructions of the window, one callgrind run."""
    main, other, _ = callgrind(
        [sys.executable, __file__, "--child", mode, agent], out / f"{agent}-{mode}"
    )
    return main, other


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default="sma,heavy")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "AGENT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    agents = args.agents.split(",")
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(max_workers=2) as pool:
        out = Path(d)
        jobs = {(a, m): pool.submit(measure, m, a, out) for a in agents for m in MODES}
        results = {k: f.result() for k, f in jobs.items()}
    print(f"Feeds: {SYMBOLS.replace(',', ', ')}; instructions counted by callgrind, one run each\n")
    for agent in agents:
        base = results[(agent, "plain")][0]
        print(f"**{agent}**\n")
        print("| mode | main thread | vs plain | other threads vs plain main |")
        print("|---|---:|---:|---:|")
        for mode in MODES:
            main_n, other_n = results[(agent, mode)]
            print(
                f"| {mode} | {main_n / 1e9:.3f} G | {main_n / base:.3f}x | {other_n / base:.3f}x |"
            )
        print()


if __name__ == "__main__":
    main()
