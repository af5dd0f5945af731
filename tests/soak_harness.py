"""A soak of the live path with the faults a production feed sees, end to end.

``runner.py`` (``MODE=paper``, the read-everything agent of :mod:`tests.live_agents`) runs as a
subprocess against the real Pub/Sub emulator, reached through a TCP proxy on loopback
(:class:`tests.tcp_proxy.TcpProxy`). A publisher thread sends one bar per symbol per bar time at
a fixed rate, in order, without ordering keys (:class:`feeds.pubsub.clients.OrderedPublisher`),
as the ingestor does. At random moments (seeded) the harness injects:

* **emulator restarts**: the emulator is killed and started empty on the same port; the
  harness then does what the infrastructure and the ingestor do: creates the topic and the
  runner's subscription again and republishes the last ``republish_s`` seconds of bars (the
  ingestor's gap backfill; the runner drops the copies);
* **network cuts** between runner and emulator, 2 to 8 s, the proxy resetting every connection
  or swallowing every byte;
* **malformed bursts**: non-JSON, deep nesting, a 400-digit price, year 1 with an offset,
  ``Infinity``, a 1 MB price, a bar ten minutes in the future, unknown symbols;
* **kill -9 of the runner**, restarted at once with the same settings and files.

At the end the publisher stops, the last runner ends on its idle timeout, and the decision
store says whether anything was lost: every bar time must have exactly one decision, and each
decision must name, for every symbol, the data hash of that symbol's bar at that time (the
agent reads every symbol each step). RSS of each runner is sampled from ``/proc``.

Used by ``benchmarks/bench_soak.py`` (30 minutes) and ``tests/e2e/test_pubsub_soak.py``
(3 minutes in CI). Every process it starts is ended by PID (process group) at the end.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from feeds.pubsub import decode_message, subscriber_client
from feeds.pubsub.clients import OrderedPublisher
from tests.conftest import REPO, clean_env
from tests.pubsub_emulator import PubSubEmulator
from tests.tcp_proxy import TcpProxy

logger = logging.getLogger(__name__)

AGENT = "tests.live_agents:ReadAllAgent"
PREFIX = "soak"


@dataclass(slots=True)
class SoakConfig:
    """What to run.

    Attributes:
        duration_s: publishing time, seconds (the drain at the end comes on top).
        symbols: number of symbols (``S000``...).
        rate_hz: bar times per second (each carries one bar per symbol).
        emulator_restarts, network_cuts, malformed_bursts, kills: faults, spread at random.
        seed: of the fault schedule.
        work: folder of the runners' store, spill, journal and logs.
        republish_s: bar times republished after an emulator restart, seconds.
        idle_timeout_s: PUBSUB_IDLE_TIMEOUT_S of the runners (the last one ends on it).
    """

    duration_s: float
    work: Path
    symbols: int = 50
    rate_hz: float = 1.0
    emulator_restarts: int = 1
    network_cuts: int = 2
    malformed_bursts: int = 2
    kills: int = 2
    seed: int = 12
    republish_s: float = 180.0
    idle_timeout_s: float = 30.0


@dataclass(slots=True)
class SoakResult:
    """What happened and what the store holds.

    Attributes:
        bar_times: bar times published.
        decisions: decision rows stored; ``distinct_bar_times``: their distinct bar times.
        missing_decisions: bar times without a decision (lost).
        duplicate_decisions: rows beyond one per bar time (duplicated).
        lost_bars: ``(symbol, bar time index)`` whose bar no decision names.
        events: the faults, with their time from the start, seconds.
        runners: one entry per runner process: start, end, exit code, RSS samples (MB).
        malformed_sent: malformed messages published.
    """

    bar_times: int = 0
    decisions: int = 0
    distinct_bar_times: int = 0
    missing_decisions: list[int] = field(default_factory=list)
    duplicate_decisions: int = 0
    lost_bars: list[tuple[str, int]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    runners: list[dict[str, Any]] = field(default_factory=list)
    malformed_sent: int = 0
    elapsed_s: float = 0.0

    def rss_growth(self) -> float | None:
        """Relative RSS growth of the longest-lived runner: median of the last third of its
        samples over the median of its second third (None with too few samples)."""
        samples: list[float] = max((r["rss_mb"] for r in self.runners), key=len, default=[])
        if len(samples) < 9:
            return None
        n = len(samples) // 3
        mid = sorted(samples[n : 2 * n])[n // 2]
        last = sorted(samples[2 * n :])[len(samples[2 * n :]) // 2]
        return float(last / mid - 1.0)

    def as_dict(self) -> dict[str, Any]:
        growth = self.rss_growth()
        return {
            "bar_times": self.bar_times,
            "decisions": self.decisions,
            "distinct_bar_times": self.distinct_bar_times,
            "missing_decisions": len(self.missing_decisions),
            "duplicate_decisions": self.duplicate_decisions,
            "lost_bars": len(self.lost_bars),
            "malformed_sent": self.malformed_sent,
            "events": self.events,
            "runners": [
                {k: v for k, v in r.items() if k != "rss_mb"}
                | {"rss_max_mb": max(r["rss_mb"], default=0.0)}
                for r in self.runners
            ],
            "rss_growth_longest_runner": None if growth is None else round(growth, 4),
            "elapsed_s": round(self.elapsed_s, 1),
        }


class _Runner:
    """``python runner.py`` in its own process group; stderr to a log file."""

    def __init__(self, work: Path, env: dict[str, str], n: int) -> None:
        self.log_path = work / f"runner-{n}.log"
        self.out_path = work / f"runner-{n}.out"
        log = open(self.log_path, "wb")  # noqa: SIM115 - owned by the child
        out = open(self.out_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "runner.py")],
            cwd=work,
            env=env,
            stdout=out,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        out.close()
        self.info: dict[str, Any] = {
            "n": n,
            "pid": self.proc.pid,
            "started_s": 0.0,
            "ended_s": None,
            "exit": None,
            "rss_mb": [],
        }

    def rss_mb(self) -> float | None:
        try:
            with open(f"/proc/{self.proc.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024.0
        except OSError:
            return None
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)


def _bar(symbol: str, ts: datetime, i: int) -> bytes:
    price = 100.0 + (i % 50) * 0.1 + (hash(symbol) % 7)
    return json.dumps(
        {
            "symbol": symbol,
            "timestamp": ts.isoformat().replace("+00:00", "Z"),
            "open": price,
            "high": price + 0.5,
            "low": price - 0.5,
            "close": price + 0.25,
            "volume": 100 + i,
        }
    ).encode()


def _malformed(symbols: list[str], now: datetime) -> list[tuple[bytes, dict[str, str]]]:
    """One burst of hostile messages: each is refused with a reason, none reaches a decision."""
    s = symbols[0]
    base = json.loads(_bar(s, now, 0))
    out: list[tuple[bytes, dict[str, str]]] = [
        (b"{not json", {"symbol": s}),
        (b"[" * 100_000, {"symbol": s}),
        (json.dumps({**base, "close": int("9" * 400)}).encode(), {"symbol": s}),
        (json.dumps({**base, "timestamp": "0001-01-01T00:30:00+01:00"}).encode(), {"symbol": s}),
        (json.dumps(base).replace('"volume"', '"x": Infinity, "volume"').encode(), {"symbol": s}),
        (json.dumps({**base, "close": "9" * 1_000_000}).encode(), {"symbol": s}),
        (
            json.dumps({**base, "timestamp": (now + timedelta(minutes=10)).isoformat()}).encode(),
            {"symbol": s},
        ),
        (_bar("NOPE", now, 0), {"symbol": "NOPE"}),
        (_bar(s, now, 0), {}),
    ]
    return out * 5


def run_soak(cfg: SoakConfig, *, progress: Callable[[str], None] = logger.info) -> SoakResult:
    """Run the soak (see the module docstring); returns what the store says.

    Raises:
        RuntimeError: the emulator or a runner could not be started.
    """
    rng = random.Random(cfg.seed)
    work = cfg.work
    work.mkdir(parents=True, exist_ok=True)
    result = SoakResult()
    symbols = [f"S{i:03d}" for i in range(cfg.symbols)]
    n_times = int(cfg.duration_s * cfg.rate_hz)
    result.bar_times = n_times
    emu = PubSubEmulator()
    emu.start()
    proxy = TcpProxy(emu.host)
    topic = f"projects/{emu.project}/topics/soak-bars"
    sub_path = f"projects/{emu.project}/subscriptions/{PREFIX}-ReadAllAgent"
    publisher_box = [OrderedPublisher(emu.host)]  # replaced after an emulator restart
    publisher_box[0].create_topic(request={"name": topic})
    _create_subscription(emu.host, sub_path, topic)  # infrastructure's part: before any bar
    env = clean_env(
        {
            "MODE": "paper",
            "SYMBOLS": ",".join(symbols),
            "AGENT": AGENT,
            "GOOGLE_CLOUD_PROJECT": emu.project,
            "PUBSUB_EMULATOR_HOST": proxy.address,
            "PUBSUB_TOPIC": topic.rsplit("/", 1)[-1],
            "PUBSUB_SUBSCRIPTION_PREFIX": PREFIX,
            "PUBSUB_BAR_SIZE": "1s",
            "PUBSUB_DISCOVERY_S": "0",
            "PUBSUB_ALIGN_WAIT_S": "2",
            "PUBSUB_QCHECK_S": "0.1",
            "PUBSUB_IDLE_TIMEOUT_S": f"{cfg.idle_timeout_s:g}",
            "FMEL_LOCAL_PATH": str(work / "fmel.duckdb"),
            "FMEL_SPILL_DIR": str(work / "spill"),
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
        }
    )
    expected: dict[tuple[str, int], str] = {}
    bodies: list[list[tuple[bytes, dict[str, str]]]] = []
    t_bar0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=2)
    if cfg.rate_hz > 1:
        # Several bar "seconds" a second, as a paced replay of history plays them: bar times
        # stay behind the wall clock (a replay clock ahead of it is not believed).
        t_bar0 -= timedelta(seconds=n_times)
    step_s = 1.0 / cfg.rate_hz
    for i in range(n_times):
        ts = t_bar0 + timedelta(seconds=i)  # one-second bars
        batch = []
        for s in symbols:
            body = _bar(s, ts, i)
            expected[(s, i)] = decode_message(body, {"symbol": s}).data_hash
            batch.append((body, {"symbol": s}))
        bodies.append(batch)
    # With rate_hz > 1 (several "seconds" a second) bars are published with a replay clock, as
    # a paced replay would be.
    faults: list[tuple[float, str]] = []
    for kind, count in (
        ("emulator_restart", cfg.emulator_restarts),
        ("network_cut", cfg.network_cuts),
        ("malformed_burst", cfg.malformed_bursts),
        ("kill", cfg.kills),
    ):
        faults += [(rng.uniform(0.1, 0.8) * cfg.duration_s, kind) for _ in range(count)]
    faults.sort()
    runners: list[_Runner] = []
    lock = threading.RLock()  # held by a restart's backfill: live bars wait, as in the ingestor
    published = [0]
    stop = threading.Event()
    t0 = time.monotonic()

    def now_s() -> float:
        return time.monotonic() - t0

    def start_runner() -> _Runner:
        r = _Runner(work, env, len(runners))
        r.info["started_s"] = round(now_s(), 1)
        runners.append(r)
        return r

    def send(batch: list[tuple[bytes, dict[str, str]]], i: int | None) -> None:
        """Publish one batch, retrying while the emulator restarts (whole batches: the runner
        drops copies)."""
        while not stop.is_set():
            try:
                with lock:
                    clock = (
                        {"replay_clock": f"{(t_bar0 + timedelta(seconds=i)).timestamp():.3f}"}
                        if i is not None and cfg.rate_hz > 1
                        else {}
                    )
                    publisher_box[0].publish_batch(topic, [(b, {**a, **clock}) for b, a in batch])
                return
            except Exception as e:
                logger.debug("publish failed (%s); retrying", e)
                time.sleep(0.2)

    def publisher() -> None:
        for i in range(n_times):
            due = i * step_s
            delay = due - now_s()
            if delay > 0 and stop.wait(delay):
                return
            with lock:  # a restart's backfill sees every bar sent so far counted
                send(bodies[i], i)
                published[0] = i + 1

    def sampler() -> None:
        while not stop.wait(5.0):
            for r in list(runners):
                if r.proc.poll() is None:
                    rss = r.rss_mb()
                    if rss is not None:
                        r.info["rss_mb"].append(round(rss, 1))

    runner = start_runner()
    threads = [
        threading.Thread(target=publisher, name="soak-publisher", daemon=True),
        threading.Thread(target=sampler, name="soak-rss", daemon=True),
    ]
    for t in threads:
        t.start()
    try:
        for at, kind in faults:
            while now_s() < at:
                time.sleep(min(0.5, at - now_s()))
                if runner.proc.poll() is not None:  # ended on its own: note it, start again
                    runner.info["ended_s"], runner.info["exit"] = (
                        round(now_s(), 1),
                        (runner.proc.returncode),
                    )
                    result.events.append(
                        (round(now_s(), 1), f"runner exited {runner.proc.returncode}")
                    )
                    runner = start_runner()
            result.events.append((round(now_s(), 1), kind))
            progress(f"{now_s():6.1f} s: {kind}")
            if kind == "kill":
                runner.kill()
                runner.info["ended_s"], runner.info["exit"] = round(now_s(), 1), -9
                runner = start_runner()
            elif kind == "network_cut":
                proxy.cut(rng.choice(["reset", "blackhole"]))
                time.sleep(rng.uniform(2.0, 8.0))
                proxy.restore()
            elif kind == "malformed_burst":
                burst = _malformed(symbols, datetime.now(UTC))
                for k in range(0, len(burst), 10):
                    send(burst[k : k + 10], None)
                result.malformed_sent += len(burst)
            elif kind == "emulator_restart":
                with lock:
                    emu.restart()
                    publisher_box[0].stop()
                    publisher_box[0] = OrderedPublisher(emu.host)
                    publisher_box[0].create_topic(request={"name": topic})
                    _create_subscription(emu.host, sub_path, topic)
                    # The ingestor's gap backfill: the last republish_s seconds again, before
                    # any further live bar (the ingestor's loop is single-threaded: a catch-up
                    # backfill is published before the live bars queued behind it). Bars the
                    # restart lost would otherwise arrive after later ones and be refused late.
                    last = published[0]
                    first = max(0, last - int(cfg.republish_s * cfg.rate_hz))
                    for i in range(first, last):
                        send(bodies[i], i)
        threads[0].join()
        result.events.append((round(now_s(), 1), "publishing done"))
        progress(f"{now_s():6.1f} s: publishing done; waiting for the runner's idle timeout")
        deadline = time.monotonic() + 600
        while runner.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        runner.info["ended_s"], runner.info["exit"] = round(now_s(), 1), runner.proc.poll()
    finally:
        stop.set()
        for r in runners:
            r.kill()
        for t in threads:
            t.join(10)
        publisher_box[0].stop()
        proxy.close()
        emu.close()
    result.runners = [r.info for r in runners]
    result.elapsed_s = now_s()
    _verify(result, work / "fmel.duckdb", symbols, expected, t_bar0)
    return result


def _create_subscription(host: str, path: str, topic: str) -> None:
    """The runner's subscription, as the deployment's infrastructure creates it (the runner
    reuses it; it would create it itself, but only once it runs)."""
    client = subscriber_client(host)
    try:
        client.create_subscription(
            request={"name": path, "topic": topic, "ack_deadline_seconds": 10}
        )
    except Exception as e:
        logger.debug("subscription %s: %s", path, e)
    finally:
        client.close()


def _verify(
    result: SoakResult,
    store: Path,
    symbols: list[str],
    expected: dict[tuple[str, int], str],
    t_bar0: datetime,
) -> None:
    with duckdb.connect(str(store), read_only=True) as con:
        rows = con.execute(
            "SELECT decision_id, bar_time, data_accessed FROM decisions ORDER BY bar_time"
        ).fetchall()
    result.decisions = len(rows)
    index = {
        (t_bar0 + timedelta(seconds=i)).replace(tzinfo=None): i for i in range(result.bar_times)
    }
    seen: dict[int, list[Any]] = {}
    for _, bar_time, accessed in rows:
        naive = bar_time.astimezone(UTC).replace(tzinfo=None) if bar_time.tzinfo else bar_time
        i = index.get(naive)
        if i is not None:
            seen.setdefault(i, []).append(accessed)
    result.distinct_bar_times = len(seen)
    result.missing_decisions = [i for i in range(result.bar_times) if i not in seen]
    result.duplicate_decisions = sum(len(v) - 1 for v in seen.values())
    for i, decisions in seen.items():
        hashes = {d["symbol"]: d["data_hash"] for d in decisions[0]}
        for s in symbols:
            if hashes.get(s) != expected[(s, i)]:
                result.lost_bars.append((s, i))
