"""Canary secrets: a unique value set as every credential must appear in no log line, decision
record, report or exception text.

1. A full ``runner.py`` backtest subprocess with DEBUG logs and the canary in every Alpaca
   credential variable (and behind a Secret Manager reference): stdout, stderr, the DuckDB store
   and the spill folder are searched.
2. A full ``runner.py`` paper run (MODE=paper, BROKER=alpaca) with DEBUG logs: real bars through
   the Pub/Sub emulator, the key read from Secret Manager (local server, real client), the
   secret from the environment, orders placed at the local Alpaca server that accepts exactly
   those keys. The runner's log redactor marks what it had to mask (``****[redacted]``), so the
   test also fails when the code logged a secret that the redactor then hid.
3. The paths that really carry credentials, in process: the configuration chain (the key read
   from Secret Manager through the real client, the secret from the environment), the Alpaca
   broker trading against the local Alpaca server that demands exactly those keys, FMEL
   records of that run, DEBUG logs of every library (captured WITHOUT the redactor, so a leak
   cannot be hidden), and the exception of a broker refused with a wrong key.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import traceback
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from analyzers.fmel import FMELAnalyzer, make_run_info
from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from core.secret import Secret
from feeds.csv import CSVFeedConfig, read_csv_bars
from feeds.pubsub import subscriber_client
from feeds.pubsub.clients import OrderedPublisher
from feeds.replay import bar_messages, ensure_topic, publish
from runtime.brokers.alpaca.broker import AlpacaPaperTradingBroker
from runtime.config import BUNDLED_DATA_DIR, load_config
from runtime.logs import REDACTED, JsonFormatter
from tests.alpaca_harness import Scripted, bar, build_run, drive, fast_config
from tests.alpaca_server import AlpacaServer
from tests.conftest import run_runner
from tests.pubsub_emulator import PubSubEmulator
from tests.secretmanager_server import SecretManagerServer

CANARY_KEY = f"PKCANARY{uuid.uuid4().hex[:12].upper()}"
CANARY_SECRET = f"canary-secret-{uuid.uuid4().hex}"
PROJECT = "canary-project"


# fixture used by this module


def assert_clean(where: str, text: str) -> None:
    for canary in (CANARY_KEY, CANARY_SECRET):
        assert canary not in text, f"canary secret leaked into {where}"
    assert REDACTED not in text, f"a secret reached {where} and had to be redacted"


def dump_store(path: Path) -> str:
    with duckdb.connect(str(path), read_only=True) as con:
        rows = con.execute("SELECT * FROM decisions").fetchall()
    assert rows, "the run recorded no decisions"
    return "\n".join(repr(r) for r in rows)


def dump_folder(path: Path) -> str:
    if not path.exists():
        return ""
    return "\n".join(p.read_text(errors="replace") for p in path.rglob("*") if p.is_file())


def test_canary_never_leaves_a_backtest_run(workdir: Path, sm: SecretManagerServer) -> None:
    sm.add(PROJECT, "alpaca-key", CANARY_KEY)
    proc = run_runner(
        workdir,
        {
            "LOG_LEVEL": "DEBUG",
            "LOG_FORMAT": "json",
            "SYMBOLS": "GOOG,SP500",
            "ALPACA_API_KEY": CANARY_KEY,
            "ALPACA_SECRET_KEY": CANARY_SECRET,
            "APCA_API_KEY_ID": CANARY_KEY,
            "APCA_API_SECRET_KEY": CANARY_SECRET,
            "ALPACA_API_KEY_SECRET": "alpaca-key",
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "SECRET_MANAGER_ENDPOINT": sm.url,
        },
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '"level": "DEBUG"' in proc.stderr  # DEBUG logging really was on
    assert "Portfolio report" in proc.stdout
    assert_clean("the report (stdout)", proc.stdout)
    assert_clean("the log (stderr)", proc.stderr)
    assert_clean("the decision store", dump_store(workdir / "fmel.duckdb"))
    assert_clean("the spill folder", dump_folder(workdir / ".fmel_spill"))


@pytest.mark.slow
def test_canary_never_leaves_a_paper_run(
    workdir: Path, sm: SecretManagerServer, pubsub_emulator: PubSubEmulator
) -> None:
    emu = pubsub_emulator
    topic = f"projects/{emu.project}/topics/canary-{uuid.uuid4().hex[:8]}"
    sub_path = f"projects/{emu.project}/subscriptions/canary-{uuid.uuid4().hex[:8]}"
    bars = read_csv_bars(
        CSVFeedConfig(
            path=BUNDLED_DATA_DIR / "GOOG.csv",
            symbol="GOOG",
            start=datetime(2012, 1, 1, tzinfo=UTC),
            end=datetime(2012, 3, 31, tzinfo=UTC),
        )
    )
    publisher = OrderedPublisher(emu.host)
    subscriber = subscriber_client(emu.host)
    try:
        ensure_topic(publisher, topic)
        subscriber.create_subscription(
            request={"name": sub_path, "topic": topic, "enable_message_ordering": True}
        )
        assert publish(publisher, topic, bar_messages([bars])).published == len(bars)
    finally:
        publisher.stop()
        subscriber.close()
    sm.add(emu.project, "alpaca-key", CANARY_KEY)
    with AlpacaServer(
        api_key=CANARY_KEY, secret_key=CANARY_SECRET, fill_mode="immediate", prices={"GOOG": 300.0}
    ) as server:
        proc = run_runner(
            workdir,
            {
                "MODE": "paper",
                "BROKER": "alpaca",
                "SYMBOLS": "GOOG",
                "LOG_LEVEL": "DEBUG",
                "LOG_FORMAT": "json",
                "AGENT_PARAMS": '{"fast": 3, "slow": 8}',
                "GOOGLE_CLOUD_PROJECT": emu.project,
                "PUBSUB_EMULATOR_HOST": emu.host,
                "PUBSUB_TOPIC": topic,
                "PUBSUB_SUBSCRIPTION": sub_path,
                "PUBSUB_DISCOVERY_S": "0",
                "PUBSUB_IDLE_TIMEOUT_S": "3",
                "SECRET_MANAGER_ENDPOINT": sm.url,
                "ALPACA_API_KEY_SECRET": "alpaca-key",
                "ALPACA_SECRET_KEY": CANARY_SECRET,
                "ALPACA_BASE_URL": server.url,
                "ALPACA_POLL_INTERVAL_S": "0.2",
                "ALPACA_REFRESH_INTERVAL_S": "1",
                "FMEL_FLUSH_INTERVAL_S": "0.2",
            },
            timeout_s=180,
        )
        orders = list(server.orders.values())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert orders, "the agent traded: the canary keys were used"
    assert sm.reads("alpaca-key") == 1
    assert '"level": "DEBUG"' in proc.stderr
    assert_clean("the report (stdout)", proc.stdout)
    assert_clean("the log (stderr)", proc.stderr)
    assert_clean("the decision store", dump_store(workdir / "fmel.duckdb"))
    assert_clean("the spill folder", dump_folder(workdir / ".fmel_spill"))


@pytest.fixture
def debug_log() -> Iterator[io.StringIO]:
    """Every library's DEBUG records as JSON lines, with no redaction."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_canary_through_config_broker_and_records(
    tmp_path: Path, sm: SecretManagerServer, debug_log: io.StringIO
) -> None:
    sm.add(PROJECT, "alpaca-key", CANARY_KEY + "\n")
    with AlpacaServer(
        api_key=CANARY_KEY,
        secret_key=CANARY_SECRET,
        prices={"AAPL": 100.0},
        fill_mode="immediate",
    ) as server:
        env = {
            "MODE": "paper",
            "BROKER": "alpaca",
            "SYMBOLS": "AAPL",
            "PUBSUB_TOPIC": "bars",
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "SECRET_MANAGER_ENDPOINT": sm.url,
            "ALPACA_API_KEY_SECRET": "alpaca-key",
            "ALPACA_SECRET_KEY": CANARY_SECRET,
            "ALPACA_BASE_URL": server.url,
            "LOG_LEVEL": "DEBUG",
        }
        cfg = load_config(env)
        assert cfg.alpaca is not None
        assert cfg.alpaca.api_key.source.startswith("secretmanager:")
        config = dataclasses.replace(
            fast_config(server), api_key=cfg.alpaca.api_key, secret_key=cfg.alpaca.secret_key
        )
        writer = DecisionWriter(
            LocalDuckDBSink(tmp_path / "fmel.duckdb"),
            flush_interval_s=0.05,
            spill_dir=tmp_path / "spill",
        )
        info = make_run_info(
            Scripted, session_id="canary", agent_id=None, mode="paper", params_json="{}"
        )
        run = build_run(
            server,
            ("AAPL",),
            {1: lambda s: s.buy(size=2), 3: lambda s: s.close()},
            config=config,
            analyzers=((FMELAnalyzer, {"_name": "fmel", "writer": writer, "run": info}),),
        )
        writer.start()
        drive(run, [bar(run, "AAPL", 100.0 + i) for i in range(5)])
        writer.stop()
        statuses = [n.status for n in run.log.notes]
        assert "Completed" in statuses  # the keys really were used: the orders filled

        # The same key with a wrong secret: refused, and the error must not quote either.
        wrong = dataclasses.replace(config, secret_key=Secret(CANARY_SECRET + "-rotated"))
        refused = AlpacaPaperTradingBroker(wrong, session_id="canary-wrong")
        with pytest.raises(Exception) as err:
            refused.start()
        refused.stop()

    texts: dict[str, Any] = {
        "the DEBUG log": debug_log.getvalue(),
        "the configuration repr": repr(cfg),
        "the broker config repr": repr(config),
        "the decision store": dump_store(tmp_path / "fmel.duckdb"),
        "the spill folder": dump_folder(tmp_path / "spill"),
        "the exception text": "".join(traceback.format_exception(err.value)) + repr(err.value),
    }
    for where, text in texts.items():
        assert_clean(where, text)
    assert "401" in texts["the exception text"] or "authoriz" in texts["the exception text"]
