"""The Chronos agent live on Pub/Sub bars (real emulator) decides as it does in a backtest.

The same half-year of real GOOG and SP500 bars is replayed to a topic of the real Pub/Sub
emulator and run by the Runner in ``MODE=paper`` (next-by-next, bounded live buffers), then run
as a CSV backtest. Same code path: the forecasts (context length, quantiles), the bars they read
(data hashes) and the orders must be the same.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pytest

from feeds.csv import CSVFeedConfig, read_csv_bars
from feeds.pubsub.clients import OrderedPublisher
from feeds.replay import bar_messages, ensure_topic, publish
from runtime.config import BUNDLED_DATA_DIR, load_config
from runtime.runner import Runner

if TYPE_CHECKING:
    from tests.pubsub_emulator import PubSubEmulator

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("offline_hub", "fresh_models")]

SYMBOLS = ("GOOG", "SP500")
START, END = "2012-01-01", "2012-06-30"


def common_env(tmp_path: Path, model: Path, name: str) -> dict[str, str]:
    return {
        "SYMBOLS": ",".join(SYMBOLS),
        "AGENT": "agents.chronos_agent:ChronosAgent",
        "CHRONOS_MODEL": str(model),
        "AGENT_PARAMS": json.dumps(
            {"every": 5, "min_context": 16, "horizon": 8, "entry_return": -0.01}
        ),
        "FMEL_LOCAL_PATH": str(tmp_path / f"{name}.duckdb"),
        "FMEL_FLUSH_INTERVAL_S": "0.2",
        "FMEL_SPILL_DIR": str(tmp_path / f"spill-{name}"),
        "PROGRESS": "off",
    }


def decisions(db: Path) -> list[dict[str, Any]]:
    """Forecast decisions: bar time, orders created, the forecast, the window hashes."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute(
            "SELECT bar_time, notes, actions, data_accessed FROM decisions "
            "WHERE notes IS NOT NULL ORDER BY bar_time"
        ).fetchall()
    finally:
        con.close()
    out = []
    for bar_time, notes, actions, accessed in rows:
        fc = json.loads(notes)["forecast"]
        out.append(
            {
                "bar_time": bar_time,
                "orders": [
                    (a["side"], a["symbol"], a["size"]) for a in actions if a["event"] == "CREATED"
                ],
                "windows": sorted(
                    (d["symbol"], p["data_hash"], p["size"])
                    for d in accessed
                    for p in d["access_patterns"]
                    if p["field"] == "close"
                ),
                "symbols": {
                    sym: (v["context_length"], [round(q, 3) for q in v["quantiles"]])
                    for sym, v in fc["symbols"].items()
                },
            }
        )
    return out


def test_live_pubsub_run_decides_like_the_backtest(
    tmp_path: Path, bolt_dir: Path, pubsub_emulator: PubSubEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    topic = f"bars-chronos-{uuid.uuid4().hex[:8]}"
    live_env = {
        **common_env(tmp_path, bolt_dir, "live"),
        "MODE": "paper",
        "PUBSUB_TOPIC": topic,
        "GOOGLE_CLOUD_PROJECT": pubsub_emulator.project,
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        "PUBSUB_IDLE_TIMEOUT_S": "3",
        "PUBSUB_DISCOVERY_S": "0",
    }
    publisher = OrderedPublisher(pubsub_emulator.host)
    topic_path = f"projects/{pubsub_emulator.project}/topics/{topic}"
    try:
        ensure_topic(publisher, topic_path)
        runner = Runner(load_config(live_env))
        runner.build()  # subscribes before anything is published
        sources = [
            read_csv_bars(
                CSVFeedConfig(
                    path=BUNDLED_DATA_DIR / f"{s}.csv",
                    symbol=s,
                    start=datetime.fromisoformat(START).replace(tzinfo=UTC),
                    end=datetime.fromisoformat(END).replace(tzinfo=UTC),
                )
            )
            for s in SYMBOLS
        ]
        published = publish(publisher, topic_path, bar_messages(sources))
    finally:
        publisher.stop()
    assert published.published == sum(len(s) for s in sources)
    live_report = runner.run()
    backtest_report = Runner(
        load_config(
            {
                **common_env(tmp_path, bolt_dir, "backtest"),
                "BACKTEST_START": START,
                "BACKTEST_END": END,
            }
        )
    ).run()

    assert live_report.bars == backtest_report.bars == len(sources[0])
    live, backtest = decisions(tmp_path / "live.duckdb"), decisions(tmp_path / "backtest.duckdb")
    assert len(live) > 10 and any(d["orders"] for d in live)
    assert live == backtest
    assert live_report.end_value_usd == pytest.approx(backtest_report.end_value_usd, abs=1e-6)
