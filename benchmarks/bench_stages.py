"""Where the default run's added instructions go, stage by stage (deterministic).

``bench_fmel.py`` measures the default run's time against plain backtrader, and its ratios move
by +-0.05x from run to run here; ``bench_store.py`` splits the writer's part by cutting it short.
This splits the whole of it, the bar loop's part included, in instructions counted by
valgrind's callgrind (``--separate-threads=yes``), with the hash seed fixed
(``PYTHONHASHSEED=0``) and address space randomisation off (``setarch -R``): what the
interpreter does depends on dict and set orders, of strings by their hashes and of objects by
their addresses. With neither, two runs of the SMA-cross agent's FMEL run counted 5.430 and
5.486 G instructions on the main thread (1 % apart); with the seed alone, two runs of plain
1,071.1 and 1,088.7 k a bar (1.6 %); with both, two runs of plain 1,071.99 and 1,072.07 k a
bar, of ``record`` 1,142.86 and 1,143.88 (the writer thread's timing is what is left), but
other pairs of plain runs 1,072.9 and 1,084.4: the run's temporary folder had a random name,
and its path is in strings the run hashes. It has a fixed name now (``bench-stages-<agent>-
<stage>-<uid>`` in the temporary directory): plain 1,073.0 and 1,072.7.

Each stage runs once in a fresh process, the same run as ``bench_instructions.py``'s (the
agent of ``bench_fmel.py`` on the three real daily feeds, the FMEL analyzer with
``gc_freeze`` on and the decision writer of the local store, its default batch size); the
window counted is ``cerebro.run()`` plus the writer's final flush (``os.getppid()`` on either
side, ``--dump-before=os_getppid``). Each stage adds one part of FMEL to the one before, by
replacing the parts not yet added (in that process only):

* ``plain``: backtrader alone;
* ``analyzer``: the analyzer attached and the writer started, nothing tracked
  (``AccessTracker.track_strategy`` and ``FMELAnalyzer._wrap_agent`` do nothing, and once a bar
  ``FMELAnalyzer._record`` only drops the bar's order events): backtrader's calls into an
  analyzer, its order notices made into events, ``gc_freeze`` (plain runs without it: fewer
  collections from here on), an idle writer;
* ``lines``: + the tracker's line classes (the feeds' lines and the agent's indicators
  tracked) and what the analyzer's start does with them (the CSV files' data hashes read
  from the disk cache); the agent's calls not wrapped, so nothing is recorded; once a bar
  the tracker's ``sync()``;
* ``reads``: + the agent's calls wrapped: every read goes into the bar's buffer; once a bar
  the buffer is emptied (``sync()`` and ``clear()``), no record;
* ``record``: + the record built once a bar and handed to the writer, whose store drops each
  batch (``bench_store.py``'s ``drop``);
* ``settle``: + the writer resolves the reads and builds the Arrow table, then drops it
  (``bench_store.py``'s ``settle``);
* ``duckdb``: + DuckDB's insert: the default run, unchanged.

Two things are the same in every stage, so that stages differ only by their part: the writer
writes only full batches until its stop (``flush_interval_s`` of an hour: valgrind runs ~50x
slower, and the default 5 s of wall time would cut batches of a different size in each
stage), and the stop does not resolve the queued records on the stopping thread
(``DecisionWriter._settle_waiting`` off: it races the writer's thread, 0 to 935 bars of
SMA-cross resolved on the main thread in runs with the same seed): the writer's thread
resolves them.

``--time ROUNDS`` times the same stages instead (no valgrind; :func:`timed_stages`).

Reported per agent: the main thread's instructions per bar over plain's, the step each stage
adds, and the other threads' instructions per bar (the writer; DuckDB's own threads; each
thread's whole life, from before the window: the writer's thread starts in set-up). After
``record`` the writer's work is in the last column, except the store's close at the stop
(DuckDB's checkpoint), which runs on the stopping thread: the main thread's ``duckdb`` step.
A step can be negative: a tracked line's reads are compiled (``_fastread``), so in ``lines``
the agent's own reads, not recorded there, cost fewer instructions than in backtrader's
Python ``LineBuffer.__getitem__``.
Instructions are not time (a cache miss costs more than an add, and the writer's work runs on
the other core): use it to see which part a change moved, and ``bench_fmel.py`` for what a run
takes. A benchmark, not a test.

``--python-record``: every FMEL stage records its bars with ``FMELAnalyzer._record_py`` (the
Python record) instead of the compiled one (``_fastread.record_bar``, ``analyzers/tracking/
_record.c``): run it beside a run without it to see what the compiled record saves.

Run: ``python benchmarks/bench_stages.py [--agents sma,heavy] [--stages plain,...,duckdb]
[--python-record]``
(valgrind and util-linux's ``setarch`` must be installed; about two minutes a stage, two at
a time).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
STAGES = ("plain", "analyzer", "lines", "reads", "record", "settle", "duckdb")
SYMBOLS = "GOOG,SP500,NASDAQ"


def _events_only(self: Any, stage: str) -> None:
    """``FMELAnalyzer._record`` of the ``analyzer`` stage: the bar's order events dropped."""
    self._events = []


def _reads_only(self: Any, stage: str) -> None:
    """``FMELAnalyzer._record`` of the ``lines`` and ``reads`` stages: the tracker's once-a-bar
    ``sync()``, the bar's reads and order events dropped."""
    tracker = self.tracker
    tracker.sync()
    tracker.reads.clear()
    self._events = []


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def python_record() -> None:
    """FMEL analyzers made from now on record their bars in Python (``_record_py``)."""
    sys.path.insert(0, str(REPO))
    from analyzers import fmel

    if not hasattr(fmel, "_record_bar"):
        sys.exit("analyzers.fmel has no _record_bar: --python-record needs updating")
    fmel._record_bar = None


def _patch(stage: str) -> None:
    """Replace, in this process, the parts of FMEL ``stage`` does not have yet."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_store

    from analyzers.fmel import FMELAnalyzer
    from analyzers.sinks.writer import DecisionWriter
    from analyzers.tracking.tracker import AccessTracker

    # every stage (the module docstring)
    DecisionWriter._settle_waiting = _nothing  # type: ignore[method-assign]
    before = STAGES.index(stage)
    if before < STAGES.index("lines"):
        AccessTracker.track_strategy = _nothing  # type: ignore[method-assign]
    if before < STAGES.index("reads"):
        FMELAnalyzer._wrap_agent = _nothing  # type: ignore[method-assign]
    if before < STAGES.index("lines"):
        FMELAnalyzer._record = _events_only  # type: ignore[method-assign]
    elif before < STAGES.index("record"):
        FMELAnalyzer._record = _reads_only  # type: ignore[method-assign]
    if before < STAGES.index("settle"):
        bench_store._patch_store("drop")
    elif before < STAGES.index("duckdb"):
        bench_store._patch_store("settle")


def _instrument(facts: dict[str, int]) -> None:
    """Count, into ``facts``, what the run does (``--facts``; not under valgrind): the lines the
    tracker swapped, the reads in the bars' buffers, the records made into Arrow tables, the
    bars recorded by the Python record (``_record_py``: the compiled one's fallback). Before
    :func:`_patch`: the stores it patches take ``records_table`` as wrapped here."""
    from analyzers.fmel import FMELAnalyzer
    from analyzers.sinks import columnar
    from analyzers.sinks import duckdb as store_module
    from analyzers.tracking.tracker import AccessTracker

    facts.update(lines_tracked=0, reads_recorded=0, records_tabled=0, python_records=0)
    untrack, table = AccessTracker.untrack_all, columnar.records_table
    record_py = FMELAnalyzer._record_py

    def counted_py(self: Any, stage: str) -> None:
        facts["python_records"] += 1
        record_py(self, stage)

    FMELAnalyzer._record_py = counted_py  # type: ignore[method-assign]

    def untrack_all(self: Any) -> None:
        facts["lines_tracked"] = max(facts["lines_tracked"], len(self._tracked))
        untrack(self)

    def records_table(records: Any) -> Any:
        facts["records_tabled"] += len(records)
        return table(records)

    AccessTracker.untrack_all = untrack_all  # type: ignore[method-assign]
    columnar.records_table = records_table
    store_module.records_table = records_table  # type: ignore[attr-defined]


def _count_reads(facts: dict[str, int]) -> None:
    """Wrap the once-a-bar ``FMELAnalyzer._record`` (after :func:`_patch`) to add up the reads
    in the bar's buffer before it is taken or dropped."""
    from analyzers.fmel import FMELAnalyzer

    record = FMELAnalyzer._record

    def counted(self: Any, stage: str) -> None:
        facts["reads_recorded"] += len(self.tracker.reads)
        record(self, stage)

    FMELAnalyzer._record = counted  # type: ignore[method-assign]


def child(
    stage: str,
    agent: str,
    facts: dict[str, int] | None = None,
    python: bool = False,
    timed: bool = False,
) -> None:
    """One run of ``stage`` in this process, the run between two ``os.getppid()`` calls; prints
    the bars, or with ``facts`` (a dict) what :func:`_instrument` counted and what the store
    holds, as JSON. ``python``: the bars recorded in Python (:func:`python_record`).
    ``timed`` (``--time``): prints the window's wall time, the main thread's CPU time and the
    writer's final flush (seconds), with the bars, as JSON."""
    if python:
        python_record()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_fmel import fill_hash_cache, make_cerebro

    from analyzers.config import LOCAL_BATCH_SIZE
    from analyzers.fmel import FMELAnalyzer
    from analyzers.sinks import duckdb as store_module
    from analyzers.sinks.writer import DecisionWriter
    from analyzers.tracking import proxies
    from core import bar_hash_cache

    if stage != "plain":
        if not proxies.COMPILED:
            sys.exit("the C extension is not built: run make ext")
        if facts is not None:
            _instrument(facts)
        _patch(stage)
        if facts is not None:
            _count_reads(facts)
    # a folder of the same name in every run, --python-record or not: its path is in strings
    # the run hashes (the store's, the hash cache's), and a random name moved plain's count by
    # ~1 % between runs. Two invocations at once would share it (one deleting the other's
    # store): a lock beside it refuses the second (give each its own TMPDIR to run both)
    tmp = Path(tempfile.gettempdir()) / f"bench-stages-{agent}-{stage}-{os.getuid()}"
    lock = open(tmp.with_name(tmp.name + ".lock"), "w")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"{tmp} is in use by another bench_stages run: run one at a time, or give "
                 "each its own TMPDIR (of the same length, for comparable counts)")  # fmt: skip
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    symbols = SYMBOLS.split(",")
    # the CSV files' data hashes from the disk cache, as every run after the first has them
    fill_hash_cache(symbols, tmp / "hashes")
    bar_hash_cache.configure(str(tmp / "hashes"))
    cerebro = make_cerebro(agent, symbols)
    writer = None
    if stage != "plain":
        writer = DecisionWriter(
            store_module.LocalDuckDBSink(tmp / "fmel.duckdb"),
            batch_size=LOCAL_BATCH_SIZE,  # the runner's default for the local store
            flush_interval_s=3600.0,  # full batches only, as natively (the module docstring)
            spill_dir=tmp / "spill",
        )
        writer.start()
        cerebro.addanalyzer(FMELAnalyzer, writer=writer, gc_freeze=True)
    os.getppid()  # callgrind dumps here: what came before is set-up
    t0, c0 = time.perf_counter(), time.thread_time()
    strategy = cerebro.run()[0]
    t1 = time.perf_counter()
    if writer is not None:
        # valgrind runs ~50x slower: with the default 10 s budget the final flush would be cut
        # short and the rest spilled as JSON on this (main) thread, a different path
        writer.stop(timeout_s=3600)
    t2, c2 = time.perf_counter(), time.thread_time()
    os.getppid()  # ...and here: the window is the run and its final flush
    if timed:
        times = {"wall_s": t2 - t0, "main_cpu_s": c2 - c0, "flush_s": t2 - t1}
        print(json.dumps({"bars": len(strategy), **times}))
    elif facts is None:
        print(len(strategy))  # bars: the parent divides by it
    else:
        import duckdb

        facts["bars"] = len(strategy)
        facts["submitted"] = writer.stats.submitted if writer is not None else 0
        facts["rows_stored"] = facts["reads_stored"] = 0
        if writer is not None:
            with duckdb.connect(str(tmp / "fmel.duckdb"), read_only=True) as con:
                row = con.execute("SELECT count(*), coalesce(sum(reads), 0) FROM decisions")
                facts["rows_stored"], facts["reads_stored"] = row.fetchone() or (0, 0)
        print(json.dumps(facts))
    shutil.rmtree(tmp, ignore_errors=True)


def measure(stage: str, agent: str, out: Path, python_record: bool = False) -> tuple[int, int, int]:
    """(main thread, other threads) instructions of the window, and the bars, one run."""
    from bench_instructions import callgrind  # beside this file

    extra = ["--python-record"] if python_record else []
    main, other, stdout = callgrind(
        [sys.executable, __file__, "--child", stage, agent, *extra],
        out / f"{agent}-{stage}",
        env={**os.environ, "PYTHONHASHSEED": "0"},
        fixed=True,
    )
    return main, other, int(stdout.split()[-1])


def _paired(
    runs: list[dict[str, float]], plain: list[dict[str, float]], key: str, over: str
) -> float:
    """The median over the rounds of a run's ``key`` over the same round's plain ``over``."""
    return statistics.median(r[key] / p[over] for r, p in zip(runs, plain, strict=True))


def timed_stages(agents: list[str], stages: list[str], rounds: int, python: bool) -> None:
    """``--time``: each stage run ``rounds`` times in fresh processes, the stages in turn
    (the order reversed every other round), and printed as paired ratios over the same
    round's ``plain`` run (medians over the rounds): the window's wall time, the main
    thread's CPU time (``time.thread_time``), and the final flush (``writer.stop()``) as a
    share of plain's wall time. Time, unlike instructions, includes cache misses and the
    writer thread holding the GIL; it moves with this host's speed (docs/benchmarks.md,
    twenty-ninth pass), so read the ratios of one run together."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or "plain" not in stages or rounds < 1:
        sys.exit(f"--stages: from {', '.join(STAGES)}, plain included; --time >= 1")
    stages.sort(key=STAGES.index)
    extra = ["--python-record"] if python else []
    for agent in agents:
        runs: dict[str, list[dict[str, float]]] = {s: [] for s in stages}
        for i in range(rounds):
            for stage in stages if i % 2 == 0 else stages[::-1]:
                out = subprocess.run(
                    [sys.executable, __file__, "--child", stage, agent, "--timed", *extra],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs[stage].append(json.loads(out.stdout.strip().splitlines()[-1]))

        wall = statistics.median(r["wall_s"] for r in runs["plain"])
        bars = int(runs["plain"][0]["bars"])
        print(f"**{agent}**, {bars:,} bars, {rounds} rounds; plain: {wall:.3f} s\n")
        print("| stage | time over plain | main-thread CPU over plain | final flush, of plain |")
        print("|---|---:|---:|---:|")
        for stage in stages:
            row = [
                _paired(runs[stage], runs["plain"], key, over)
                for key, over in (("wall_s", "wall_s"), ("main_cpu_s", "main_cpu_s"))
            ]
            flush = _paired(runs[stage], runs["plain"], "flush_s", "wall_s")
            print(f"| {stage} | {row[0]:.3f}x | {row[1]:.3f}x | {flush:.3f} |")
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", default="sma,heavy")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--child", nargs=2, metavar=("STAGE", "AGENT"), help=argparse.SUPPRESS)
    ap.add_argument("--facts", action="store_true", help=argparse.SUPPRESS)  # tests
    ap.add_argument("--timed", action="store_true", help=argparse.SUPPRESS)  # --time's child
    ap.add_argument(
        "--time",
        type=int,
        metavar="ROUNDS",
        help="time the stages instead of counting instructions: ROUNDS runs of each, "
        "alternated (no valgrind)",
    )
    ap.add_argument(
        "--python-record",
        action="store_true",
        help="record the bars with the Python record, not the compiled one",
    )
    args = ap.parse_args()
    if args.child:
        stage, agent = args.child
        child(
            stage,
            agent,
            facts={} if args.facts else None,
            python=args.python_record,
            timed=args.timed,
        )
        return
    if args.time is not None:
        timed_stages(args.agents.split(","), args.stages.split(","), args.time, args.python_record)
        return
    for tool, package in (("valgrind", "valgrind"), ("setarch", "util-linux")):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install {package})")
    agents = args.agents.split(",")
    stages = args.stages.split(",")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or "plain" not in stages:
        sys.exit(f"--stages: from {', '.join(STAGES)}, plain included; got {args.stages}")
    stages.sort(key=STAGES.index)
    with tempfile.TemporaryDirectory() as d, ThreadPoolExecutor(max_workers=2) as pool:
        out = Path(d)
        jobs = {
            (a, s): pool.submit(measure, s, a, out, args.python_record)
            for a in agents
            for s in stages
        }
        results = {k: f.result() for k, f in jobs.items()}
    print(
        f"Feeds: {SYMBOLS.replace(',', ', ')}; instructions counted by callgrind "
        "(PYTHONHASHSEED=0, setarch -R), one run a stage; the "
        f"{'Python' if args.python_record else 'compiled'} record\n"
    )
    for agent in agents:
        base, _, bars = results[(agent, "plain")]
        print(f"**{agent}**, {bars:,} bars; plain: {base / bars / 1e3:,.1f} k a bar\n")
        print("| stage | main thread over plain, k a bar | step | other threads, k a bar |")
        print("|---|---:|---:|---:|")
        last = base
        for stage in stages:
            main_n, other_n, _ = results[(agent, stage)]
            print(
                f"| {stage} | {(main_n - base) / bars / 1e3:+,.1f} "
                f"({main_n / base:.3f}x) | {(main_n - last) / bars / 1e3:+,.1f} "
                f"| {other_n / bars / 1e3:,.1f} |"
            )
            last = main_n
        print()


if __name__ == "__main__":
    main()
