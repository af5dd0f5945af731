"""Where trials run: in this process, on a local process pool, or on a Ray cluster.

Every engine has the same small surface, driven by :class:`runtime.research.study.Study` from
the main thread: :meth:`~Engine.submit` a task while :meth:`~Engine.in_flight` is below
:attr:`~Engine.capacity`, :meth:`~Engine.wait` for finished results, :meth:`~Engine.drain` on a
stop (no new task; what is running finishes and is returned; what has not started is dropped),
:meth:`~Engine.close`. The study never holds more than ``capacity`` tasks in an engine, so
nothing piles up in memory however large the search.

=================  ===========================================================================
engine             how
=================  ===========================================================================
``InlineEngine``   ``OPTIMIZE_WORKERS=1``: each trial runs in this process when waited for
``PoolEngine``     ``concurrent.futures.ProcessPoolExecutor`` (``spawn``), one worker per core;
                   each worker reads the CSV files once, in its initializer, and ignores SIGINT
                   (the driver decides when to stop; running trials finish)
``RayEngine``      ``RAY_ADDRESS``: one Ray actor per cluster CPU (``ray.util.ActorPool``); the
                   bars go to Ray's object store once (``ray.put``) and every actor maps them,
                   so nodes need no copy of the CSV files, only the project's code and venv
=================  ===========================================================================

Ray is the scheduler on a cluster (placement, node failure); nothing here reschedules work.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from core.errors import AppError, ConfigError
from feeds.csv import CSVBars, read_csv_bars
from runtime.research.trial import Backtester, StudyJob, TrialResult, TrialTask

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class EngineError(AppError):
    """A worker died or the cluster went away: the study stops (what finished is stored)."""


class Engine(Protocol):
    """Runs trials; driven from the main thread only."""

    #: parallel workers
    workers: int
    #: most tasks the study keeps submitted at once
    capacity: int
    #: what it is, for logs and the report (``process pool, 2 workers``)
    description: str

    def submit(self, task: TrialTask) -> None: ...

    def in_flight(self) -> int: ...

    def wait(self, timeout_s: float) -> list[TrialResult]:
        """Results finished so far, waiting up to ``timeout_s`` for at least one.

        Raises:
            EngineError: a worker died.
        """
        ...

    def drain(self) -> list[TrialResult]:
        """Stop: drop tasks not started, return the results of those running (they finish)."""
        ...

    def close(self) -> None:
        """Release the workers (idempotent)."""
        ...


# -- this process -----------------------------------------------------------------------------


class InlineEngine:
    """Sequential, in the runner's own process (the baseline of the benchmarks)."""

    def __init__(self, job: StudyJob, bars: Mapping[str, CSVBars]) -> None:
        self.workers = 1
        self.capacity = 1
        self.description = "this process (sequential)"
        self._backtester = Backtester(job, bars)
        self._queue: deque[TrialTask] = deque()

    def submit(self, task: TrialTask) -> None:
        self._queue.append(task)

    def in_flight(self) -> int:
        return len(self._queue)

    def wait(self, timeout_s: float) -> list[TrialResult]:
        return [self._backtester.run(self._queue.popleft())] if self._queue else []

    def drain(self) -> list[TrialResult]:
        self._queue.clear()  # nothing runs between calls
        return []

    def close(self) -> None:
        self._queue.clear()


# -- a local process pool ---------------------------------------------------------------------

_WORKER: Backtester | None = None


def _init_worker(job: StudyJob) -> None:
    """Pool initializer: read every CSV once, keep a :class:`Backtester` for this process."""
    global _WORKER
    # Ctrl-C reaches the whole foreground process group: the driver owns the stop, running
    # trials finish and are stored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=job.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    bars = {fc.symbol: read_csv_bars(fc) for fc in job.feeds}
    _WORKER = Backtester(job, bars)


def _run_in_worker(task: TrialTask) -> TrialResult:
    assert _WORKER is not None, "pool worker used before its initializer ran"
    return _WORKER.run(task)


class PoolEngine:
    """A ``ProcessPoolExecutor`` of ``workers`` processes (``spawn``: no inherited threads or
    open DuckDB handles).

    Args:
        job: the study (sent once to each worker).
        workers: processes.
    """

    def __init__(self, job: StudyJob, workers: int) -> None:
        self.workers = workers
        self.capacity = workers + 1  # one queued: a worker never waits for the driver
        self.description = f"process pool, {workers} workers"
        self._pool = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(job,),
        )
        self._futures: set[cf.Future[TrialResult]] = set()
        self._spawn_ignoring_sigint()

    def _spawn_ignoring_sigint(self) -> None:
        """Start every worker now, with SIGINT and SIGTERM ignored in this process meanwhile:
        an ignored signal stays ignored across exec, and CPython installs its KeyboardInterrupt
        handler only where SIGINT is not ignored (signal module docs, "SIG_IGN ... inherited"),
        so a Ctrl-C during start-up never reaches a worker's import or initializer (attack15
        sig_exact/), and a SIGTERM to the whole process group (``kill -TERM -PGID``, systemd)
        reaches only this driver, which lets the running trials finish (a worker that died of
        it failed the study: an attack's finding). A second signal still ends the workers
        (:meth:`kill`: SIGKILL).

        Both are also blocked meanwhile, so one that comes during the spawn waits and reaches
        this process's own handler afterwards instead of being dropped (Linux queues a blocked
        signal even while it is ignored; ``man 7 signal``). The pool spawns one worker per
        submit while none is idle (``spawn`` context, CPython 3.11
        ``ProcessPoolExecutor._adjust_process_count``): ``workers`` no-op tasks start them all.
        Main thread only; elsewhere the workers start lazily."""
        if threading.current_thread() is not threading.main_thread():
            return
        stops = {signal.SIGINT, signal.SIGTERM}
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops}
        try:
            for _ in range(self.workers):
                self._pool.submit(os.getpid)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def submit(self, task: TrialTask) -> None:
        self._futures.add(self._pool.submit(_run_in_worker, task))

    def in_flight(self) -> int:
        return len(self._futures)

    def _collect(self, done: set[cf.Future[TrialResult]]) -> list[TrialResult]:
        out = []
        for fut in done:
            self._futures.discard(fut)
            if fut.cancelled():
                continue
            try:
                out.append(fut.result())
            except cf.process.BrokenProcessPool as e:
                raise EngineError(
                    "a worker process died (out of memory, or killed); the study stops"
                ) from e
        return out

    def wait(self, timeout_s: float) -> list[TrialResult]:
        if not self._futures:
            return []
        done, _ = cf.wait(self._futures, timeout=timeout_s, return_when=cf.FIRST_COMPLETED)
        return self._collect(done)

    def drain(self) -> list[TrialResult]:
        for fut in list(self._futures):
            if fut.cancel():  # not started yet
                self._futures.discard(fut)
        done, _ = cf.wait(self._futures)
        return self._collect(done)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def kill(self) -> None:
        """Forced stop (a second signal): end the worker processes now."""
        # ProcessPoolExecutor has no public terminate before Python 3.14 (terminate_workers).
        for proc in list(getattr(self._pool, "_processes", {}).values()):
            proc.kill()
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- a Ray cluster ----------------------------------------------------------------------------


class TrialActor:
    """A Ray actor holding one :class:`Backtester` (the bars come from the object store)."""

    def __init__(self, job: StudyJob, bars: Mapping[str, CSVBars]) -> None:
        self._backtester = Backtester(job, bars)

    def run(self, task: TrialTask) -> TrialResult:
        return self._backtester.run(task)


#: Deadline of the TCP probe of ``RAY_ADDRESS`` before ``ray.init`` (which has no timeout and
#: retries an unreachable GCS for minutes), seconds.
RAY_PROBE_TIMEOUT_S = 5.0


def probe_ray_address(address: str, timeout_s: float = RAY_PROBE_TIMEOUT_S) -> None:
    """Open and close one TCP connection to ``host:port`` of ``RAY_ADDRESS`` (``host:port``
    of the GCS, or ``ray://host:port`` of the Ray Client server) within ``timeout_s``.

    ``auto``, ``local`` and addresses without a numeric port are left to ``ray.init``.

    Raises:
        ConfigError: naming RAY_ADDRESS when nothing accepts the connection in time.
    """
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    host = host.strip("[]")  # [::1]:6379
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(
            f"RAY_ADDRESS={address}: cannot connect to Ray at {host}:{port} within "
            f"{timeout_s:g} s ({e})"
        ) from e


class RayEngine:
    """Trials on a Ray cluster: one actor per CPU (or ``workers``), at most one task each.

    Args:
        job: the study.
        bars: every symbol's bars, put in the object store once.
        address: ``RAY_ADDRESS`` (``host:port``, ``ray://host:10001``, ``auto``, ``local``).
        workers: actors; 0 = the cluster's CPU count.

    Raises:
        ConfigError: the cluster cannot be reached.
    """

    def __init__(
        self, job: StudyJob, bars: Mapping[str, CSVBars], *, address: str, workers: int
    ) -> None:
        import ray
        from ray.util import ActorPool

        self._ray = ray
        probe_ray_address(address)
        # Ray expands ${PYTHONPATH} to the worker's own value (runtime_env env_vars).
        pythonpath = f"{PROJECT_ROOT}{os.pathsep}${{PYTHONPATH}}"
        try:
            self._start(ray, ActorPool, job, bars, address, workers, pythonpath)
        except BaseException:
            # a failure or a signal (KeyboardInterrupt, a stop) half-way through start-up: no
            # Ray processes (RAY_ADDRESS=local starts a whole node) outlive the study
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise

    def _start(
        self,
        ray: Any,
        actor_pool: Any,
        job: StudyJob,
        bars: Mapping[str, CSVBars],
        address: str,
        workers: int,
        pythonpath: str,
    ) -> None:
        try:
            ray.init(
                address=address,
                # Workers import the agent and this package like the driver does; on a real
                # cluster the nodes run the project's image, where this path holds the code.
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                log_to_driver=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"RAY_ADDRESS={address}: cannot connect to Ray ({e})") from e
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        self.capacity = self.workers
        self.description = f"Ray cluster at {address}, {self.workers} actors ({cpus} CPUs)"
        bars_ref = ray.put(dict(bars))
        actor = ray.remote(num_cpus=1, max_restarts=0)(TrialActor)
        self._actors: list[Any] = [actor.remote(job, bars_ref) for _ in range(self.workers)]
        self._pool = actor_pool(self._actors)
        self._in_flight = 0
        self._closed = False

    def submit(self, task: TrialTask) -> None:
        self._pool.submit(lambda a, t: a.run.remote(t), task)
        self._in_flight += 1

    def in_flight(self) -> int:
        return self._in_flight

    def _next(self, timeout_s: float | None) -> TrialResult | None:
        from ray.exceptions import RayError

        try:
            result: TrialResult = self._pool.get_next_unordered(timeout=timeout_s)
        except TimeoutError:
            return None
        except RayError as e:
            self._in_flight -= 1
            raise EngineError(f"a Ray worker failed; the study stops ({e})") from e
        self._in_flight -= 1
        return result

    def wait(self, timeout_s: float) -> list[TrialResult]:
        out: list[TrialResult] = []
        if not self._pool.has_next():
            return out
        first = self._next(timeout_s)
        if first is None:
            return out
        out.append(first)
        while self._pool.has_next():  # whatever else is already done
            more = self._next(0)
            if more is None:
                break
            out.append(more)
        return out

    def drain(self) -> list[TrialResult]:
        # capacity == actors, so the ActorPool never queues a task: all in flight are running.
        out: list[TrialResult] = []
        while self._pool.has_next():
            result = self._next(None)
            if result is not None:
                out.append(result)
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for a in self._actors:
            self._ray.kill(a)
        self._ray.shutdown()


def cpu_workers() -> int:
    """One worker per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_engine(
    job: StudyJob,
    bars: Mapping[str, CSVBars],
    *,
    workers: int,
    ray_address: str | None,
) -> Engine:
    """The engine the settings ask for: Ray with ``RAY_ADDRESS``, else inline for one worker,
    else a process pool of ``workers`` (0 = one per core)."""
    if ray_address:
        return RayEngine(job, bars, address=ray_address, workers=workers)
    n = workers or cpu_workers()
    if n == 1:
        return InlineEngine(job, bars)
    return PoolEngine(job, n)
