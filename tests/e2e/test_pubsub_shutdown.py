"""SIGTERM honoured at once in every phase of a paper run, against the real Pub/Sub emulator:
during field discovery (``PUBSUB_DISCOVERY_S`` of two minutes), during the CSV backfill (12
files of 200,000 bars), while Pub/Sub is unreachable (the subscriber waiting between attempts),
and mid-stream (``tests/e2e/test_pubsub_e2e.py``). Each time ``runner.py`` exits 0 with its
report well inside a pod's grace period (the wait's timeout is the contract), and the phase
ends within one second of the signal by the runner's own log timestamps.

An invalid topic name is a configuration error (exit 2), not a transient one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from feeds.pubsub.clients import OrderedPublisher
from tests.conftest import run_runner
from tests.e2e.test_shutdown import RunnerProcess
from tests.pubsub_emulator import PubSubEmulator

pytestmark = pytest.mark.slow

# Exit within this after SIGTERM: stopping, flushing decisions, the report (Python's own exit
# included). The discovery wait alone used to be PUBSUB_DISCOVERY_S.
EXIT_WITHIN_S = 8.0


@pytest.fixture
def runners() -> Iterator[list[RunnerProcess]]:
    started: list[RunnerProcess] = []
    yield started
    for r in started:
        r.kill()


def paper(work: Path, emu: PubSubEmulator, topic: str, **env: str) -> RunnerProcess:
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        **emu.env(),
        "MODE": "paper",
        "SYMBOLS": "AAA,BBB",
        "PUBSUB_TOPIC": topic,
        "PUBSUB_SUBSCRIPTION_PREFIX": f"t-{topic}",
        "PUBSUB_QCHECK_S": "0.1",
        "PUBSUB_DISCOVERY_S": "0",
    }
    settings.update(env)
    return RunnerProcess(work, **settings)


def new_topic(emu: PubSubEmulator) -> str:
    name = f"bars-{uuid.uuid4().hex[:8]}"
    pub = OrderedPublisher(emu.host)
    pub.create_topic(request={"name": f"projects/{emu.project}/topics/{name}"})
    pub.stop()
    return name


def logged(runner: RunnerProcess, text: str) -> bool:
    return any(text in line for line in runner.err_lines)


def seconds_between(runner: RunnerProcess, first: str, then: str) -> float:
    """Seconds from the JSON log line holding ``first`` to the next one holding ``then`` (the
    runner's own timestamps, so the test's scheduling does not count)."""
    stamps: list[tuple[str, datetime]] = []
    for line in runner.err_lines:
        with contextlib.suppress(ValueError, KeyError):
            rec = json.loads(line)
            stamps.append((rec["message"], datetime.fromisoformat(rec["timestamp"])))
    start = next(i for i, (m, _) in enumerate(stamps) if first in m)
    end = next(t for m, t in stamps[start:] if then in m)
    return (end - stamps[start][1]).total_seconds()


def test_sigterm_during_field_discovery(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    emu = pubsub_emulator
    topic = new_topic(emu)
    r = paper(tmp_path, emu, topic, PUBSUB_DISCOVERY_S="120")
    runners.append(r)
    r.wait_for("the subscription", lambda: logged(r, "pulling bars-"))
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish(timeout_s=EXIT_WITHIN_S) == 0, "".join(r.err_lines[-20:])
    assert "(INTERRUPTED)" in r.stdout
    # The two-minute discovery wait ended within a second of the signal.
    assert seconds_between(r, "stopping: SIGTERM", "live fields:") < 1.0


def test_sigterm_while_pubsub_is_unreachable(
    tmp_path: Path, emulator_factory: object, runners: list[RunnerProcess]
) -> None:
    emu = emulator_factory()  # type: ignore[operator]
    topic = new_topic(emu)
    r = paper(tmp_path, emu, topic)
    runners.append(r)
    r.wait_for("the subscription", lambda: logged(r, "pulling bars-"))
    emu.kill()
    r.wait_for("the outage", lambda: logged(r, "Pub/Sub unreachable"), timeout_s=30)
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish(timeout_s=EXIT_WITHIN_S) == 0, "".join(r.err_lines[-20:])
    assert "(INTERRUPTED)" in r.stdout
    assert "disconnects=1" in r.stdout
    # The pull thread left its wait between attempts at once: the subscriber's close (which
    # joins it) and the decisions' flush are done within a second of the signal.
    assert seconds_between(r, "stopping: SIGTERM", "decisions:") < 1.0


def test_sigterm_during_the_csv_backfill(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    # 12 symbols whose CSV files take ~0.2 s each to read (200,000 one-minute bars; copies of
    # one file, as links would be refused as one file): a backfill of seconds, checked between
    # files.
    data = tmp_path / "data"
    data.mkdir()
    lines = ["Date,Open,High,Low,Close,Volume"]
    t0 = datetime(1990, 1, 1)
    for i in range(200_000):
        price = 100 + (i % 1000) / 100
        stamp = (t0 + timedelta(minutes=i)).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"{stamp},{price},{price + 1},{price - 1},{price},1000")
    first = data / "S00.csv"
    first.write_text("\n".join(lines) + "\n")
    symbols = [f"S{i:02d}" for i in range(12)]
    for sym in symbols[1:]:
        shutil.copyfile(first, data / f"{sym}.csv")
    emu = pubsub_emulator
    topic = new_topic(emu)
    r = paper(
        tmp_path / "work",
        emu,
        topic,
        SYMBOLS=",".join(symbols),
        DATA_DIR=str(data),
        PUBSUB_BACKFILL_BARS="100",
    )
    runners.append(r)
    r.wait_for("the backfill", lambda: logged(r, "backfill S00:"), timeout_s=60)
    r.proc.send_signal(signal.SIGTERM)
    assert r.finish(timeout_s=EXIT_WITHIN_S) == 0, "".join(r.err_lines[-20:])
    assert "(INTERRUPTED)" in r.stdout
    read = sum(1 for line in r.err_lines if '"backfill S' in line)
    assert read < len(symbols)  # the rest of the files were never read
    assert seconds_between(r, "stopping: SIGTERM", "live fields:") < 1.0


def test_invalid_topic_name_is_a_configuration_error(tmp_path: Path) -> None:
    done = run_runner(
        tmp_path,
        {
            "MODE": "paper",
            "SYMBOLS": "AAA",
            "GOOGLE_CLOUD_PROJECT": "p",
            "PUBSUB_EMULATOR_HOST": "127.0.0.1:1",
            "PUBSUB_TOPIC": "goog-bars",
        },
        timeout_s=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "PUBSUB_TOPIC" in done.stderr and "not a valid Pub/Sub id" in done.stderr


def test_sigterm_with_a_backlog_decides_nothing_more(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    """A stop ends the run after the current step: bars buffered but not yet given to the agent
    are neither decided nor traded after the signal; they go back to Pub/Sub (found by an
    attack: a slow agent went on deciding, and could place orders, for 5 s after SIGTERM)."""
    import duckdb

    emu = pubsub_emulator
    topic = new_topic(emu)
    pub = OrderedPublisher(emu.host)
    t0 = datetime(2024, 3, 1, 14, 30)
    runner = paper(
        tmp_path,
        emu,
        topic,
        SYMBOLS="AAA",
        AGENT="tests.slow_agent:SlowAgent",
        AGENT_PARAMS='{"sleep_s": 0.2}',
        PUBSUB_BAR_SIZE="1min",
        PUBSUB_IDLE_TIMEOUT_S="0",
    )
    runners.append(runner)
    runner.wait_for("pulling", lambda: logged(runner, "pulling "))
    bars = []
    for i in range(300):  # a backlog: 60 s of the slow agent's work
        p = 100.0 + (i % 17)
        ts = (t0 + timedelta(minutes=i)).isoformat() + "Z"
        doc = {"timestamp": ts, "open": p, "high": p + 1, "low": p - 1, "close": p}
        bars.append((json.dumps(doc).encode(), {"symbol": "AAA"}))
    pub.publish_batch(f"projects/{emu.project}/topics/{topic}", bars)
    pub.stop()
    store = tmp_path / "fmel.duckdb"
    runner.wait_for(
        "decisions on a backlog",
        lambda: (runner.metric("runner_bars_processed_total", feed="AAA") or 0) >= 10,
        timeout_s=120,
    )
    signalled = datetime.now().astimezone()
    runner.proc.send_signal(signal.SIGTERM)
    assert runner.finish(timeout_s=30) == 0, "".join(runner.err_lines[-20:])
    with duckdb.connect(str(store), read_only=True) as con:
        after, total = con.execute(
            "SELECT count(*) FILTER (WHERE ts > ?), count(*) FROM decisions",
            [signalled + timedelta(seconds=0.5)],
        ).fetchone() or (None, None)
    assert total is not None and 10 <= total < 300
    assert after == 0  # at most the step in progress, which ends within the slow agent's 0.2 s
    assert "undelivered=" in runner.stdout


def test_sigterm_while_the_start_up_call_hangs(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    """Pub/Sub's address drops traffic (a firewall): the first admin call blocks for its whole
    timeout. A blocking gRPC call on the main thread would hold back the signal handler until
    it returns (found by an attack: 6-7 s); the call runs on a helper thread instead."""
    from tests.tcp_proxy import TcpProxy

    emu = pubsub_emulator
    topic = new_topic(emu)
    proxy = TcpProxy(emu.host)
    try:
        proxy.cut("blackhole")
        r = paper(tmp_path, emu, topic, PUBSUB_EMULATOR_HOST=proxy.address)
        runners.append(r)
        # The client connected through the proxy, which swallows its request: the call blocks.
        r.wait_for("the start-up call", lambda: proxy.connections >= 1, timeout_s=30.0)
        r.proc.send_signal(signal.SIGTERM)
        assert r.finish(timeout_s=EXIT_WITHIN_S) == 0, "".join(r.err_lines[-20:])
        assert logged(r, "stop requested while the subscription was being opened")
        assert seconds_between(r, "stopping: SIGTERM", "decisions:") < 1.0
    finally:
        proxy.close()


def test_waiting_for_bars_that_do_not_come_is_alive(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    """helper-84: with ``PUBSUB_QCHECK_S`` (the feed's wait for a bar) above ``HEALTH_STALL_S``,
    /healthz said 503 while the run only waited on an empty topic. A wait for bars is alive."""
    emu = pubsub_emulator
    runner = paper(
        tmp_path,
        emu,
        new_topic(emu),
        SYMBOLS="AAA",
        PUBSUB_IDLE_TIMEOUT_S="0",
        HEALTH_STALL_S="1",
        PUBSUB_QCHECK_S="10",
    )
    runners.append(runner)
    runner.wait_for("pulling", lambda: logged(runner, "pulling "))
    codes = []
    for _ in range(12):  # 6 s: far beyond the 1 s stall limit
        codes.append(runner.status("/healthz"))
        time.sleep(0.5)
    assert codes == [200] * 12
