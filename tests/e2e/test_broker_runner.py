"""``python runner.py`` with ``MODE=paper BROKER=alpaca``: real GOOG bars replayed to the real
Pub/Sub emulator, the SMA-cross agent, the Alpaca broker against the local Alpaca server (in
this process), decisions in the local DuckDB store. Checks the run reports the paper endpoint,
every order the agent made reached Alpaca exactly once and filled, the recorded fills are the
server's, and the positions recorded at the end are the account's."""

from __future__ import annotations

import ast
import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from feeds.csv import CSVFeedConfig, read_csv_bars
from feeds.pubsub import subscriber_client
from feeds.pubsub.clients import OrderedPublisher
from feeds.replay import bar_messages, ensure_topic, publish
from runtime.config import BUNDLED_DATA_DIR
from tests.alpaca_server import AlpacaServer
from tests.conftest import run_runner
from tests.pubsub_emulator import PubSubEmulator

# fixture used by this module
pytestmark = pytest.mark.slow


def test_runner_paper_mode_trades_through_alpaca(
    workdir: Path, pubsub_emulator: PubSubEmulator
) -> None:
    emu = pubsub_emulator
    topic = f"projects/{emu.project}/topics/bars-alpaca-{uuid.uuid4().hex[:8]}"
    sub_path = f"projects/{emu.project}/subscriptions/alpaca-e2e-{uuid.uuid4().hex[:8]}"
    bars = read_csv_bars(
        CSVFeedConfig(
            path=BUNDLED_DATA_DIR / "GOOG.csv",
            symbol="GOOG",
            start=datetime(2012, 1, 1, tzinfo=UTC),
            end=datetime(2012, 6, 30, tzinfo=UTC),
        )
    )
    publisher = OrderedPublisher(emu.host)
    subscriber = subscriber_client(emu.host)
    try:
        ensure_topic(publisher, topic)
        subscriber.create_subscription(
            request={"name": sub_path, "topic": topic, "enable_message_ordering": True}
        )
        published = publish(publisher, topic, bar_messages([bars]))
    finally:
        publisher.stop()
        subscriber.close()
    assert published.published == len(bars)

    with AlpacaServer(fill_mode="immediate", prices={"GOOG": 300.0}) as server:
        proc = run_runner(
            workdir,
            {
                "MODE": "paper",
                "BROKER": "alpaca",
                "SYMBOLS": "GOOG",
                "AGENT_PARAMS": json.dumps({"fast": 3, "slow": 8}),
                "GOOGLE_CLOUD_PROJECT": emu.project,
                "PUBSUB_EMULATOR_HOST": emu.host,
                "PUBSUB_TOPIC": topic,
                "PUBSUB_SUBSCRIPTION": sub_path,
                "PUBSUB_DISCOVERY_S": "0",
                "PUBSUB_IDLE_TIMEOUT_S": "3",
                "ALPACA_API_KEY": server.api_key,
                "ALPACA_SECRET_KEY": server.secret_key,
                "ALPACA_BASE_URL": server.url,
                "ALPACA_POLL_INTERVAL_S": "0.2",
                "ALPACA_REFRESH_INTERVAL_S": "1",
                "FMEL_FLUSH_INTERVAL_S": "0.2",
            },
            timeout_s=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"broker=alpaca paper at {server.url}" in proc.stdout
        assert "Alpaca paper trading endpoint" in proc.stderr
        orders = [o for o in server.orders.values()]
        final_positions = server.position_qty()

    assert orders, "the agent traded"
    coids = [o.client_order_id for o in orders]
    assert len(set(coids)) == len(coids)
    assert all(o.status == "filled" for o in orders)
    con = duckdb.connect(str(workdir / "fmel.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT actions, positions, stage FROM decisions ORDER BY decision_point"
        ).fetchall()
    finally:
        con.close()
    # one record per bar, plus one (stage STOP) when order events came at the broker's stop
    assert len([r for r in rows if r[2] != "STOP"]) == len(bars)
    assert [r[2] for r in rows].count("STOP") <= 1 and (rows[-1][2] == "STOP") == (
        len(rows) == len(bars) + 1
    )
    actions = [a for acts, _, _ in rows for a in acts]
    created = [a for a in actions if a["event"] == "CREATED"]
    completed = [a for a in actions if a["event"] == "COMPLETED"]
    assert len(created) == len(orders)  # every order reached Alpaca exactly once
    # the recorded fills are the server's: every order's, the last one's in the STOP record if
    # it filled after the last bar
    assert len(completed) == len(orders)
    by_coid = {o.client_order_id.rsplit("-", 1)[1]: o for o in orders}
    for a in completed:
        o = by_coid[str(a["order_ref"])]
        assert Decimal(repr(a["exec_size"])) == o.filled_qty
        assert a["exec_price"] == pytest.approx(float(o.avg_price or 0))
    # backtrader's positions after the broker's final sync (its stop log line) = the account's
    stopped = [
        json.loads(line)["message"]
        for line in proc.stderr.splitlines()
        if "Alpaca broker stopped" in line
    ]
    assert len(stopped) == 1
    shown = re.search(r"positions (\{.*?\})", stopped[0])
    assert shown is not None
    assert ast.literal_eval(shown.group(1)) == {k: float(v) for k, v in final_positions.items()}
    # the agent buys only when flat and sells only when long, so its orders alternate from a
    # buy, and the account holds shares exactly when the last was a buy (how many round trips
    # depends on how fast fills came back: a cross the agent met while an order was still
    # pending is skipped, so under load a run may end after a single buy)
    sides = [o.side for o in sorted(orders, key=lambda o: int(o.client_order_id.rsplit("-", 1)[1]))]
    assert sides == ["buy", "sell"] * (len(sides) // 2) + ["buy"] * (len(sides) % 2)
    assert bool(final_positions) == (sides[-1] == "buy")


def test_runner_refuses_to_start_when_the_account_cannot_be_read(
    workdir: Path, pubsub_emulator: PubSubEmulator
) -> None:
    emu = pubsub_emulator
    topic = f"projects/{emu.project}/topics/bars-alpaca-{uuid.uuid4().hex[:8]}"
    publisher = OrderedPublisher(emu.host)
    try:
        ensure_topic(publisher, topic)
    finally:
        publisher.stop()
    with AlpacaServer() as server:
        proc = run_runner(
            workdir,
            {
                "MODE": "paper",
                "BROKER": "alpaca",
                "SYMBOLS": "GOOG",
                "GOOGLE_CLOUD_PROJECT": emu.project,
                "PUBSUB_EMULATOR_HOST": emu.host,
                "PUBSUB_TOPIC": topic,
                "PUBSUB_DISCOVERY_S": "0",
                "ALPACA_API_KEY": server.api_key,
                "ALPACA_SECRET_KEY": "wrong-secret",
                "ALPACA_BASE_URL": server.url,
                "ALPACA_MAX_RETRIES": "2",
            },
            timeout_s=120,
        )
        assert [r.status for r in server.requests] == [401]  # not retried: a 4xx
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "cannot read the Alpaca account" in proc.stderr
    assert "refusing to run on an unknown portfolio" in proc.stderr
    assert "wrong-secret" not in proc.stderr + proc.stdout


def test_a_stop_while_alpaca_stalls_at_start_ends_the_account_read(
    workdir: Path, pubsub_emulator: PubSubEmulator
) -> None:
    """helper-84 F6: SIGTERM while the broker's start-up reads met a stalled Alpaca took 49-60 s
    (every read's retries ran out first: they ignored the stop). Now the stop ends them: no
    request begins after it, and the one in flight is the last (exit 0, nothing ran)."""
    from tests.alpaca_server import FaultPlan
    from tests.conftest import REPO, sigterm_when_ready

    emu = pubsub_emulator
    topic = f"projects/{emu.project}/topics/bars-alpaca-{uuid.uuid4().hex[:8]}"
    # its own subscription: the default name is the agent's, taken by other tests
    sub_path = f"projects/{emu.project}/subscriptions/stall-{uuid.uuid4().hex[:8]}"
    publisher = OrderedPublisher(emu.host)
    subscriber = subscriber_client(emu.host)
    try:
        ensure_topic(publisher, topic)
        subscriber.create_subscription(request={"name": sub_path, "topic": topic})
    finally:
        publisher.stop()
        subscriber.close()
    with AlpacaServer() as server:
        # every answer stalls past the client's timeout (FaultPlan: a "timeout" fault sleeps)
        server.faults = FaultPlan(rate=1.0, kinds=("timeout",), stall_s=30.0)
        env = {
            "MODE": "paper",
            "BROKER": "alpaca",
            "SYMBOLS": "GOOG",
            "GOOGLE_CLOUD_PROJECT": emu.project,
            "PUBSUB_EMULATOR_HOST": emu.host,
            "PUBSUB_TOPIC": topic,
            "PUBSUB_SUBSCRIPTION": sub_path,
            "PUBSUB_DISCOVERY_S": "0",
            "ALPACA_API_KEY": server.api_key,
            "ALPACA_SECRET_KEY": server.secret_key,
            "ALPACA_BASE_URL": server.url,
            "ALPACA_REQUEST_TIMEOUT_S": "2",
            "ALPACA_MAX_RETRIES": "20",
        }
        # inside a stalled request when the signal comes
        code, stderr, elapsed = sigterm_when_ready(
            [str(REPO / "runner.py")], workdir, env, lambda: bool(server.requests), settle_s=0.5
        )
        sent = len(server.requests)
    assert code == 0, stderr[-2000:]
    assert "stopped while connecting to Alpaca" in stderr
    # one request in flight (2 s) and the exit; before, 20 attempts of every read
    assert elapsed < 2.0 + 6.0, elapsed
    assert sent <= 3, sent
