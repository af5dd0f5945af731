"""End to end: local Alpaca market-data server -> ``python -m runtime.ingest`` -> the real Pub/Sub
emulator -> ``runner.py`` (``MODE=paper BROKER=sim``) -> decision store, with a disconnect in the
middle; then a backtest on the very bars that reached the topic decides exactly alike.

Also: SIGTERM stops the ingestor within its budget with every sent bar confirmed; a second
ingestor on the same key exits with code 3 (Alpaca's 406).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from feeds.ingest.enrich import ALPACA_FIELDS, RISK_FIELDS
from feeds.pubsub.clients import publisher_client, subscriber_client
from feeds.pubsub.messages import LiveBar, decode_message
from tests.alpaca_market_server import AlpacaMarketServer, ScriptedMarket, rfc3339
from tests.conftest import REPO, clean_env, run_runner
from tests.e2e.test_pubsub_e2e import decisions
from tests.e2e.test_shutdown import RunnerProcess
from tests.pubsub_emulator import PubSubEmulator, free_port

pytestmark = [
    pytest.mark.slow,
    # The audit pulls use return_immediately (the emulator honours it; a waiting pull costs 1 s).
    pytest.mark.filterwarnings("ignore:The return_immediately flag is deprecated"),
]

SYMBOLS = ("AAA", "BBB")
MINUTES = 150
SHUTDOWN_TIMEOUT_S = 10.0


class IngestorProcess:
    """``python -m runtime.ingest`` in its own process group; stderr collected by a thread."""

    def __init__(
        self, work: Path, srv: AlpacaMarketServer, emu: PubSubEmulator, topic: str, **env: str
    ) -> None:
        self.port = free_port()
        settings = clean_env(
            {
                **emu.env(),
                "SYMBOLS": ",".join(SYMBOLS),
                "PUBSUB_TOPIC": topic,
                "ALPACA_API_KEY": srv.key,
                "ALPACA_SECRET_KEY": srv.secret,
                "INGEST_STREAM_URL": srv.stock_url,
                "INGEST_DATA_URL": srv.rest_url,
                "INGEST_STATE_PATH": str(work / "ingest-state.json"),
                "INGEST_MAX_BACKFILL_S": "1e9",  # the scripted market lives in 2024
                "HEALTH_PORT": str(self.port),
                "LOG_FORMAT": "json",
                "SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
                **env,
            }
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.ingest"],
            cwd=REPO,
            env=settings,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.err_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stdout = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err_lines.append(line)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` matching ``labels`` (0 when unreachable)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0.0
        return sum(
            s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def ready(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def finish(self, timeout_s: float) -> tuple[int, dict[str, Any]]:
        code = self.proc.wait(timeout=timeout_s)
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()
        self._reader.join(5)
        lines = [line for line in self.stdout.splitlines() if line.strip()]
        return int(code), json.loads(lines[-1]) if lines else {}

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_until(
    what: str, predicate: Callable[[], bool], timeout_s: float = 60.0, procs: tuple[Any, ...] = ()
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise AssertionError(
                    f"process exited ({p.proc.returncode}) before {what}:\n"
                    + "".join(p.err_lines[-20:])
                )
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for p in started:
        p.kill()


def audit_subscription(emu: PubSubEmulator, topic: str) -> str:
    """A subscription that sees every message published to ``topic`` from now on."""
    sub = subscriber_client(emu.host)
    path = f"projects/{emu.project}/subscriptions/audit-{topic}"
    sub.create_subscription(
        request={
            "name": path,
            "topic": f"projects/{emu.project}/topics/{topic}",
            "enable_message_ordering": True,
        }
    )
    sub.close()
    return path


def pull_all(emu: PubSubEmulator, path: str) -> list[tuple[LiveBar, dict[str, str]]]:
    """Every message waiting on ``path`` (redeliveries of one message id counted once)."""
    sub = subscriber_client(emu.host)
    out: dict[str | None, tuple[LiveBar, dict[str, str]]] = {}
    try:
        while True:
            r = sub.pull(
                request={"subscription": path, "max_messages": 1000, "return_immediately": True},
                timeout=10,
            )
            if not r.received_messages:
                return list(out.values())
            for m in r.received_messages:
                attrs = dict(m.message.attributes)
                bar = decode_message(m.message.data, attrs, message_id=m.message.message_id)
                out[bar.message_id] = (bar, attrs)
            sub.acknowledge(
                request={"subscription": path, "ack_ids": [m.ack_id for m in r.received_messages]}
            )
    finally:
        sub.close()


def write_csvs(bars: list[LiveBar], folder: Path) -> None:
    """The published bars as one CSV file per symbol (null fields as empty cells)."""
    folder.mkdir()
    columns = ("open", "high", "low", "close", "volume", *ALPACA_FIELDS, *RISK_FIELDS)
    for s in SYMBOLS:
        rows = sorted((b for b in bars if b.symbol == s), key=lambda b: b.ts)
        lines = ["datetime," + ",".join(columns)]
        for b in rows:
            cells = ["" if b.values[c] is None else repr(b.values[c]) for c in columns]
            lines.append(b.ts.strftime("%Y-%m-%d %H:%M:%S") + "," + ",".join(cells))
        (folder / f"{s}.csv").write_text("\n".join(lines) + "\n")


def new_topic(emu: PubSubEmulator) -> str:
    name = f"bars-{uuid.uuid4().hex[:8]}"
    pub = publisher_client(emu.host)
    pub.create_topic(request={"name": f"projects/{emu.project}/topics/{name}"})
    pub.stop()
    return name


def test_alpaca_to_decisions_through_a_disconnect_equals_a_backtest(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, procs: list[Any]
) -> None:
    emu = pubsub_emulator
    topic = new_topic(emu)
    audit = audit_subscription(emu, topic)
    with AlpacaMarketServer(ScriptedMarket(SYMBOLS, MINUTES)) as srv:
        (tmp_path / "paper").mkdir()
        runner = RunnerProcess(
            tmp_path / "paper",
            **emu.env(),
            MODE="paper",
            BROKER="sim",
            SYMBOLS=",".join(SYMBOLS),
            PUBSUB_TOPIC=topic,
            PUBSUB_SUBSCRIPTION_PREFIX=f"t-{topic}",
            PUBSUB_QCHECK_S="0.1",
            PUBSUB_DISCOVERY_S="30",
            PUBSUB_IDLE_TIMEOUT_S="4",
        )
        procs.append(runner)
        wait_until(
            "the runner's subscription", lambda: len(emu.subscriptions()) == 2, procs=(runner,)
        )
        ingest = IngestorProcess(tmp_path, srv, emu, topic)
        procs.append(ingest)
        srv.wait_subscribed()
        wait_until("readiness", lambda: ingest.ready() == 200, procs=(ingest,))
        srv.advance(60)
        wait_until(
            "60 minutes published",
            lambda: ingest.metric("ingest_bars_published_total") == 120,
            procs=(ingest,),
        )
        srv.disconnect(missed=25)  # minutes 60..84 are streamed to nobody
        srv.wait_subscribed()
        wait_until(
            "the catch-up from history",
            lambda: ingest.metric("ingest_bars_published_total", source="backfill") == 50,
            procs=(ingest,),
        )
        srv.advance(MINUTES - 85)
        wait_until(
            "every minute published",
            lambda: ingest.metric("ingest_bars_published_total") == 2 * MINUTES,
            procs=(ingest,),
        )
        assert ingest.metric("ingest_bars_published_total", source="backfill") == 50
        assert ingest.metric("ingest_connection_events_total", event="connected") == 2
        ingest.proc.send_signal(signal.SIGTERM)
        code, report = ingest.finish(timeout_s=SHUTDOWN_TIMEOUT_S + 5)
        assert code == 0, "".join(ingest.err_lines[-20:])
        assert report["reconnects"] == 1 and report["gaps_unfilled"] == 0
        assert report["unconfirmed"] == 0
        assert report["bars_live"] + report["bars_backfilled"] == 2 * MINUTES
        assert runner.finish(timeout_s=120) == 0, "".join(runner.err_lines[-30:])

    # What reached the topic: every scripted minute of every symbol once, in order.
    published = pull_all(emu, audit)
    bars = [b for b, _ in published]
    for s in SYMBOLS:
        times = [b.ts for b in bars if b.symbol == s]
        assert times == sorted(times)
        assert [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in times] == [
            rfc3339(m.start_ns) for m in srv.market.data[s]
        ]
    assert all(b.verified for b in bars)

    # A backtest on those bars (as CSV files) decides exactly like the paper run.
    write_csvs(bars, tmp_path / "data")
    back = run_runner(
        tmp_path,
        {
            "MODE": "backtest",
            "SYMBOLS": ",".join(SYMBOLS),
            "DATA_DIR": str(tmp_path / "data"),
            "FMEL_LOCAL_PATH": str(tmp_path / "bt.duckdb"),
            "FMEL_SPILL_DIR": str(tmp_path / "bt-spill"),
        },
    )
    assert back.returncode == 0, back.stderr[-3000:]
    live_rows = decisions(tmp_path / "paper" / "fmel.duckdb")
    back_rows = decisions(tmp_path / "bt.duckdb")
    assert len(back_rows) == MINUTES
    assert sum(r["action"] != "HOLD" for r in back_rows) >= 2, "the agent traded"
    assert live_rows == back_rows


def test_second_ingestor_on_the_same_key_exits_with_code_3(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, procs: list[Any]
) -> None:
    emu = pubsub_emulator
    topic = new_topic(emu)
    with AlpacaMarketServer(ScriptedMarket(SYMBOLS, 5)) as srv:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first = IngestorProcess(tmp_path / "a", srv, emu, topic)
        procs.append(first)
        srv.wait_subscribed()
        second = IngestorProcess(tmp_path / "b", srv, emu, topic)
        procs.append(second)
        code, report = second.finish(timeout_s=60)
        assert code == 3
        assert report["auth_errors"] == {"connection limit exceeded": 1}
        assert any(
            "406" in line and "INGEST_ON_CONNECTION_LIMIT" in line for line in second.err_lines
        )
        assert first.proc.poll() is None and first.ready() == 200
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish(timeout_s=SHUTDOWN_TIMEOUT_S + 5)[0] == 0


def unreachable_pubsub_env(tmp_path: Path) -> dict[str, str]:
    """An ingestor's settings with Pub/Sub on a port nothing listens on."""
    return {
        "PUBSUB_EMULATOR_HOST": f"127.0.0.1:{free_port()}",
        "GOOGLE_CLOUD_PROJECT": "p",
        "SYMBOLS": "AAA",
        "PUBSUB_TOPIC": "ticks",
        "ALPACA_API_KEY": "k",
        "ALPACA_SECRET_KEY": "s",
        "INGEST_STATE_PATH": str(tmp_path / "state.json"),
    }


def test_pubsub_unreachable_at_start_is_not_healthy_and_stops_on_one_sigterm(
    tmp_path: Path,
) -> None:
    """Attack 16 #1: Pub/Sub unreachable at start. /healthz and /readyz say 503 while the topic
    is being reached, and one SIGTERM stops the process within SHUTDOWN_TIMEOUT_S (exit 0)."""
    port = free_port()
    settings = clean_env(
        {
            **unreachable_pubsub_env(tmp_path),
            "HEALTH_PORT": str(port),
            "SHUTDOWN_TIMEOUT_S": "3",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.ingest"],
        cwd=REPO,
        env=settings,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        codes: dict[str, int] = {}

        def answered() -> bool:
            for path in ("healthz", "readyz"):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=2) as r:
                        codes[path] = int(r.status)
                except urllib.error.HTTPError as e:
                    codes[path] = int(e.code)
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    return False
            return True

        deadline = time.monotonic() + 30
        while not answered() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert codes == {"healthz": 503, "readyz": 503}
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        assert time.monotonic() - t0 < 3.0 + 1.0
        assert code == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.parametrize(
    "indicators, named",
    [("no_such_module_xyz:factory", "cannot import"), ("json:no_such_factory", "not a callable")],
)
def test_a_bad_indicator_exits_2_before_pubsub_is_reached(
    tmp_path: Path, indicators: str, named: str
) -> None:
    """helper-79 F5: ``INGEST_INDICATORS`` was checked after the topic was reached (and created):
    with Pub/Sub unreachable the configuration error waited 30 s behind the transient one and
    exited 1. It is checked first: exit 2 naming the variable, before any Pub/Sub call."""
    settings = clean_env(
        {
            **unreachable_pubsub_env(tmp_path),
            "INGEST_INDICATORS": indicators,
        }
    )
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "runtime.ingest"],
        cwd=REPO,
        env=settings,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - t0 < 15  # not the 30 s topic deadline
    assert "INGEST_INDICATORS" in done.stderr and named in done.stderr
    assert "Pub/Sub" not in done.stderr
