"""Clean shutdown and restart of a real ``runner.py`` process.

* SIGTERM mid-run: the run stops after the current bar, every decision it reports is in the
  store (contiguous decision points, nothing missing), the report still prints, exit code 0,
  within the pod's termination grace period (30 s, the wait's timeout).
* A second signal forces the exit at once (exit code 128 + SIGTERM) even while a slow
  teardown is running.
* A restart resumes cleanly: same agent and symbols, a new session id, spilled records of the
  earlier run replayed into the store.

The health endpoint of the running process is used to know the run is in progress (its
``/metrics``), so the tests wait for facts, not for fixed sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import backtrader as bt
import duckdb
import pytest
from prometheus_client.parser import text_string_to_metric_families

from analyzers.fmel import FMELAnalyzer, make_run_info
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.writer import DecisionWriter
from core.errors import TransientError
from core.retry import RetryPolicy
from feeds.csv import CSVFeedConfig, make_csv_feed
from runtime.config import BUNDLED_DATA_DIR
from tests.conftest import clean_env
from tests.pubsub_emulator import free_port
from tests.slow_agent import SlowAgent

ROOT = Path(__file__).resolve().parents[2]
GRACE_PERIOD_S = 30.0  # k8s.yaml terminationGracePeriodSeconds

pytestmark = pytest.mark.slow


class RunnerProcess:
    """``python runner.py`` in its own process group; stderr collected by a reader thread."""

    def __init__(self, tmp: Path, **env: str) -> None:
        self.port = free_port()
        full = clean_env(
            {
                "FMEL_LOCAL_PATH": str(tmp / "fmel.duckdb"),
                "FMEL_SPILL_DIR": str(tmp / "spill"),
                "HEALTH_PORT": str(self.port),
                "LOG_FORMAT": "json",
                # A wait that times out sends SIGABRT (finish): every thread's stack goes to
                # stderr, into the failure message.
                "PYTHONFAULTHANDLER": "1",
            }
        )
        full.update(env)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "runner.py")],
            cwd=tmp,
            env=full,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.err_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_err, daemon=True)
        self._reader.start()
        self.stdout = ""

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err_lines.append(line)

    def metric(self, name: str, **labels: str) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        for fam in text_string_to_metric_families(text):
            for sample in fam.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return None

    def status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def wait_for(self, what: str, predicate: Any, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"runner exited ({self.proc.returncode}) before {what}:\n"
                    + "".join(self.err_lines[-20:])
                )
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def finish(self, timeout_s: float) -> int:
        """Wait for the exit; returns the exit code (stdout kept in :attr:`stdout`)."""
        # stdout holds only the report (small: no pipe back-pressure before the exit).
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # faulthandler: all threads' stacks
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self._reader.join(5)
            stacks = "".join(self.err_lines[-200:])
            raise AssertionError(f"no exit {timeout_s} s after asked; stderr:\n{stacks}") from None
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()
        self._reader.join(5)
        return int(code)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    @property
    def log(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.err_lines if line.strip()]


@pytest.fixture
def runners() -> Iterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for r in started:
        r.kill()


def report_numbers(stdout: str) -> dict[str, Any]:
    session = re.search(r"Portfolio report  session (\S+)", stdout)
    dec = re.search(
        r"decisions\s+(\d+) recorded \((\d+) written, (\d+) spilled, (\d+) rejected", stdout
    )
    assert session and dec, stdout
    replayed = re.search(r"replayed\s+(\d+) records", stdout)
    unsure = re.search(r"in doubt\s+(\d+) of the records in the spill", stdout)
    return {
        "unsure": int(unsure.group(1)) if unsure else 0,
        "session": session.group(1),
        "interrupted": "(INTERRUPTED)" in stdout,
        "decisions": int(dec.group(1)),
        "written": int(dec.group(2)),
        "spilled": int(dec.group(3)),
        "rejected": int(dec.group(4)),
        "replayed": int(replayed.group(1)) if replayed else 0,
    }


def stored_points(store: Path, session: str) -> list[int]:
    with duckdb.connect(str(store), read_only=True) as con:
        rows = con.execute(
            "SELECT decision_point FROM decisions WHERE session_id = ? ORDER BY 1", [session]
        ).fetchall()
    return [r[0] for r in rows]


def test_sigterm_mid_run_loses_nothing_and_a_restart_resumes(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    env = {"AGENT": "tests.slow_agent:SlowAgent", "AGENT_PARAMS": '{"sleep_s": 0.003}'}
    first = RunnerProcess(tmp_path, **env)
    runners.append(first)
    first.wait_for(
        "300 bars processed",
        lambda: (first.metric("runner_bars_processed_total", feed="GOOG") or 0) >= 300,
    )
    assert first.status("/healthz") == 200
    assert first.status("/readyz") == 200
    first.proc.send_signal(signal.SIGTERM)
    assert first.finish(timeout_s=GRACE_PERIOD_S) == 0
    rep = report_numbers(first.stdout)
    assert rep["interrupted"]
    total_bars = 5031  # the bundled GOOG/SP500/NASDAQ calendar
    assert 300 <= rep["decisions"] < total_bars
    assert rep["written"] == rep["decisions"] and rep["spilled"] == rep["rejected"] == 0
    # Every decision the run reported is in the store, with no gap.
    assert stored_points(tmp_path / "fmel.duckdb", rep["session"]) == list(range(rep["decisions"]))
    messages = [e["message"] for e in first.log]
    assert any("stopping: SIGTERM" in m for m in messages)
    assert all(e["session"] == rep["session"] for e in first.log if e["session"])

    # Restart with the same settings: a new session, the old one untouched.
    second = RunnerProcess(
        tmp_path, AGENT="tests.slow_agent:SlowAgent", AGENT_PARAMS='{"sleep_s": 0.0}'
    )
    runners.append(second)
    assert second.finish(timeout_s=120) == 0
    rep2 = report_numbers(second.stdout)
    assert rep2["session"] != rep["session"]
    assert not rep2["interrupted"] and rep2["decisions"] == total_bars
    store = tmp_path / "fmel.duckdb"
    assert stored_points(store, rep2["session"]) == list(range(total_bars))
    assert stored_points(store, rep["session"]) == list(range(rep["decisions"]))
    with duckdb.connect(str(store), read_only=True) as con:
        symbols = con.execute(
            "SELECT DISTINCT session_id, agent_id FROM decisions ORDER BY session_id"
        ).fetchall()
    assert [s for s, _ in symbols] == sorted([rep["session"], rep2["session"]])
    assert len({a for _, a in symbols}) == 1  # same agent


def test_second_signal_forces_exit(tmp_path: Path, runners: list[RunnerProcess]) -> None:
    slow = RunnerProcess(
        tmp_path,
        AGENT="tests.slow_agent:SlowAgent",
        AGENT_PARAMS='{"sleep_s": 0.003, "stop_sleep_s": 120}',
    )
    runners.append(slow)
    slow.wait_for(
        "100 bars processed",
        lambda: (slow.metric("runner_bars_processed_total", feed="GOOG") or 0) >= 100,
    )
    slow.proc.send_signal(signal.SIGTERM)
    slow.wait_for("the slow teardown", lambda: any("slow stop" in ln for ln in slow.err_lines))
    assert slow.status("/readyz") == 503  # draining
    slow.proc.send_signal(signal.SIGTERM)
    # Far less than the 120 s teardown: the second signal does not wait for it.
    assert slow.finish(timeout_s=GRACE_PERIOD_S) == 128 + signal.SIGTERM
    assert any("forcing exit" in e["message"] for e in slow.log)
    assert "Portfolio report" not in slow.stdout


class DownSink:
    """A store that is unreachable: every call raises TransientError (spill path)."""

    name = "local"  # the runner's local sink replays spill-local.jsonl

    def open(self) -> None:
        raise TransientError("store unreachable")

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        raise TransientError("store unreachable")

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "down"

    def example_query(self) -> str:
        return ""


def test_restart_replays_records_spilled_by_an_earlier_run(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    # An earlier run whose store was down: the real analyzer and writer spill every record.
    writer = DecisionWriter(
        DownSink(),
        batch_size=10,
        flush_interval_s=0.05,
        spill_dir=tmp_path / "spill",
        retry=RetryPolicy(attempts=1, initial_s=0.01, max_s=0.01),
    )
    cerebro = bt.Cerebro(stdstats=False)
    cfg = CSVFeedConfig(path=BUNDLED_DATA_DIR / "GOOG.csv", symbol="GOOG", end=None)
    cerebro.adddata(make_csv_feed(cfg), name="GOOG")
    cerebro.addstrategy(SlowAgent, sleep_s=0.0)
    run = make_run_info(
        SlowAgent, session_id="earlier-session", agent_id=None, mode="backtest", params_json="{}"
    )
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel", writer=writer, run=run)
    writer.start()
    strat = cerebro.run()[0]
    stats = writer.stop()
    spilled = strat.analyzers.fmel.decisions
    assert stats.spilled == spilled > 0 and stats.written == 0
    assert (tmp_path / "spill" / "spill-local.jsonl").exists()

    restarted = RunnerProcess(tmp_path, SYMBOLS="GOOG")
    runners.append(restarted)
    assert restarted.finish(timeout_s=120) == 0
    rep = report_numbers(restarted.stdout)
    assert rep["replayed"] == spilled
    assert rep["session"] != "earlier-session"
    store = tmp_path / "fmel.duckdb"
    assert stored_points(store, "earlier-session") == list(range(spilled))
    assert stored_points(store, rep["session"]) == list(range(rep["decisions"]))
    spill = tmp_path / "spill" / "spill-local.jsonl"
    assert not spill.exists() or spill.stat().st_size == 0


def test_sigterm_during_the_build_does_not_start_the_run(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    # The health endpoint answers before the (3 s) build; a signal then must stop the run
    # before its first bar (backtrader's run() would otherwise forget it).
    starting = RunnerProcess(tmp_path, AGENT="tests.slow_start:SlowStartAgent")
    runners.append(starting)
    starting.wait_for("/healthz", lambda: starting.status("/healthz") == 200)
    assert starting.status("/readyz") == 503  # not running yet
    starting.proc.send_signal(signal.SIGTERM)
    assert starting.finish(timeout_s=GRACE_PERIOD_S) == 0
    rep = report_numbers(starting.stdout)
    assert rep["interrupted"] and rep["decisions"] == 0
    assert any("before the first bar" in e["message"] for e in starting.log)


def test_sigterm_while_a_large_csv_is_read_exits_cleanly(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    """pyarrow's CSV reader checks for signals while it reads and cancels the read
    (``ArrowCancelled``) once the handler has run: that is the stop, not a crash."""
    import numpy as np

    n = 1_500_000
    minutes = np.arange(n, dtype="int64")
    stamps = np.datetime_as_string(
        np.datetime64("2000-01-03T00:00") + minutes.astype("timedelta64[m]"), unit="s"
    )
    price = 100.0 + (minutes % 500) * 0.01
    with open(tmp_path / "BIG.csv", "w", encoding="ascii") as f:
        f.write("Date,Open,High,Low,Close,Volume\n")
        for k in range(0, n, 100_000):
            sl = slice(k, k + 100_000)
            p = price[sl]
            f.writelines(
                f"{t},{a:.2f},{a + 0.05:.2f},{a - 0.05:.2f},{a:.2f},100\n"
                for t, a in zip(stamps[sl], p, strict=True)
            )
    big = RunnerProcess(tmp_path, SYMBOLS="BIG", DATA_DIR=str(tmp_path))
    runners.append(big)
    big.wait_for(
        "the read to start",
        lambda: any("reading BIG.csv" in line for line in big.err_lines),
    )
    big.proc.send_signal(signal.SIGTERM)
    assert big.finish(timeout_s=GRACE_PERIOD_S) == 0, "".join(big.err_lines[-10:])
    rep = report_numbers(big.stdout)
    assert rep["interrupted"] and rep["decisions"] == 0
    assert not any("Traceback" in line for line in big.err_lines)
    # pyarrow cancels the read when the signal comes while it reads blocks, not while it
    # converts columns: either way the run does not start.
    assert any(
        "cancelled by the stop request" in e["message"] or "before the first bar" in e["message"]
        for e in big.log
    )


def _catches(pid: int, sig: signal.Signals) -> bool:
    """The process has a handler for ``sig`` (Linux: the ``SigCgt`` mask of /proc/PID/status)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = re.search(r"^SigCgt:\s*([0-9a-f]+)", text, re.M)
    return bool(mask and int(mask.group(1), 16) >> (sig.value - 1) & 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_is_held_then_stops_the_run(
    tmp_path: Path, runners: list[RunnerProcess], sig: signal.Signals
) -> None:
    """From runner.py's first lines, before backtrader, pyarrow and scipy are imported (seconds
    on a loaded machine), a signal is held and becomes a clean stop once the runner can act on
    it (an attack found SIGTERM there ended the process with 143, SIGINT with a traceback)."""
    r = RunnerProcess(tmp_path)
    runners.append(r)
    deadline = time.monotonic() + 30
    # SIGTERM caught: hold_early() ran (SIGINT's handler was set just before it)
    while not _catches(r.proc.pid, signal.SIGTERM) and time.monotonic() < deadline:
        time.sleep(0.001)
    r.proc.send_signal(sig)
    assert r.finish(timeout_s=GRACE_PERIOD_S) == 0, "".join(r.err_lines[-20:])
    rep = report_numbers(r.stdout)
    assert rep["interrupted"] and rep["decisions"] == 0
    messages = [e["message"] for e in r.log]
    assert f"{sig.name} came during start-up; handled now" in messages
    assert any("before the first bar" in m for m in messages)
    assert not any("Traceback" in line for line in r.err_lines)


def test_a_signal_while_the_report_prints_keeps_the_exit_code(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    """The run ended and its report is printing (the process about to exit): a signal then
    changes nothing (it used to kill the clean run with 143: the handlers were restored)."""
    import select

    r = RunnerProcess(tmp_path)
    runners.append(r)
    assert r.proc.stdout is not None
    assert select.select([r.proc.stdout], [], [], 180)[0], "no report"
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish(timeout_s=GRACE_PERIOD_S) == 0, "".join(r.err_lines[-20:])
    rep = report_numbers(r.stdout)
    assert not rep["interrupted"] and rep["decisions"] == 5031


def test_a_signal_after_the_last_bar_is_not_an_interruption(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    """Every bar was decided and flushed; a signal while the report is built does not mark the
    run INTERRUPTED (an attack's finding: "5031 of 5031, INTERRUPTED")."""
    r = RunnerProcess(tmp_path)
    runners.append(r)
    r.wait_for(
        "the final flush",
        lambda: any('"decisions: ' in line for line in r.err_lines),
        timeout_s=180,
    )
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish(timeout_s=GRACE_PERIOD_S) == 0, "".join(r.err_lines[-20:])
    rep = report_numbers(r.stdout)
    assert not rep["interrupted"] and rep["decisions"] == rep["written"] == 5031


def test_a_backtest_starts_no_bar_after_the_signal(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    """``cerebro.runstop()`` is set in the signal handler itself (one attribute, no lock): a fast
    backtest went on for 20-40 bars while the stop waited for the relay thread's turn at the
    GIL (an attack's finding)."""
    stamps = tmp_path / "stamps.txt"
    r = RunnerProcess(
        tmp_path,
        AGENT="tests.slow_agent:StampingAgent",
        AGENT_PARAMS=json.dumps({"path": str(stamps)}),
    )
    runners.append(r)
    r.wait_for(
        "100 bars",
        lambda: (r.metric("runner_bars_processed_total", feed="GOOG") or 0) >= 100,
        timeout_s=120,
    )
    r.proc.send_signal(signal.SIGTERM)
    # Read the clock once kill(2) has returned: the signal is pending in the child by then, so a
    # later stamp is a bar started after it. Read before the call (as this test first did), a
    # loaded CI host that descheduled this process between the two counted the child's bars
    # from before the signal (5 "after" it in one CI run).
    sent = time.monotonic_ns()
    assert r.finish(timeout_s=GRACE_PERIOD_S) == 0, "".join(r.err_lines[-20:])
    assert report_numbers(r.stdout)["interrupted"]
    started = [int(t) for t in stamps.read_text().split()]
    assert started and min(started) < sent
    assert sum(t > sent for t in started) <= 1  # the bar the signal may have met


def test_a_stuck_agent_fails_the_liveness_probe(
    tmp_path: Path, runners: list[RunnerProcess]
) -> None:
    """helper-82: an agent stuck in its ``next()`` kept /healthz and /readyz at 200: its pod was
    never restarted. With ``HEALTH_STALL_S`` passed without a step, /healthz says 503 naming
    the bar loop; it is 200 while steps go on."""
    p = RunnerProcess(
        tmp_path,
        AGENT="tests.slow_agent:SlowAgent",
        AGENT_PARAMS='{"sleep_s": 0.5}',
        HEALTH_STALL_S="2",
    )
    runners.append(p)
    p.wait_for("the bar loop", lambda: (p.metric("runner_bar_loop_seconds_count") or 0) >= 2)
    assert p.status("/healthz") == 200  # a step every 0.5 s: alive
    p.kill()
    (tmp_path / "stuck").mkdir()
    stuck = RunnerProcess(
        tmp_path / "stuck",
        AGENT="tests.slow_agent:SlowAgent",
        AGENT_PARAMS='{"sleep_s": 3600}',
        HEALTH_STALL_S="2",
    )
    runners.append(stuck)
    stuck.wait_for("/healthz to fail", lambda: stuck.status("/healthz") == 503, timeout_s=90)
    with urllib.request.urlopen(f"http://127.0.0.1:{stuck.port}/readyz", timeout=2) as r:
        assert r.status == 200  # readiness says nothing of it: the liveness probe restarts
    body = ""
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{stuck.port}/healthz", timeout=2)
    except urllib.error.HTTPError as e:
        body = e.read().decode()
    assert "bar_loop" in body and "HEALTH_STALL_S=2" in body
