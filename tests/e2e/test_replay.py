"""The replay publisher: CSV bars -> Pub/Sub messages of the live contract, interleaved in time
order, paced by the speed factor, with the CSV feed's data hashes; the CLI against the real
emulator."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from core.errors import TransientError
from core.retry import RetryPolicy
from feeds.csv import CSVFeedConfig, read_csv_bars
from feeds.pubsub import decode_message, publisher_client, subscriber_client
from feeds.replay import PublishFailedError, bar_messages, publish
from tests.conftest import DATA, REPO, clean_env
from tests.pubsub_emulator import PubSubEmulator


def _csv(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / f"{name}.csv"
    path.write_text(text)
    return path


def test_messages_interleave_in_time_order_with_extras_and_csv_hashes(tmp_path: Path) -> None:
    a = read_csv_bars(
        CSVFeedConfig(
            path=_csv(
                tmp_path,
                "A",
                (
                    "Date,Open,High,Low,Close,Volume,Sentiment,Headline\n"
                    "2024-01-02,10,11,9,10.5,100,0.5,up\n"
                    "2024-01-04,10.5,12,10,11.5,,-0.25,\n"
                    "2024-01-05,11.5,12,11,11.8,300,0.1,flat\n"
                ),
            ),
            symbol="A",
        )
    )
    b = read_csv_bars(
        CSVFeedConfig(
            path=_csv(
                tmp_path,
                "B",
                (
                    ",Open,High,Low,Close\n"
                    "2024-01-02,5,6,4,5.5\n"
                    "2024-01-03,5.5,6,5,5.8\n"
                    "2024-01-05,5.8,6.1,5.6,6\n"
                ),
            ),
            symbol="B/USD",
        )
    )
    messages = list(bar_messages([b, a]))
    assert [(m.ts.day, m.symbol) for m in messages] == [
        (2, "A"),
        (2, "B/USD"),
        (3, "B/USD"),
        (4, "A"),
        (5, "A"),
        (5, "B/USD"),
    ]
    bodies = [json.loads(m.body) for m in messages]
    assert bodies[0] == {
        "symbol": "A",
        "timestamp": "2024-01-02T00:00:00Z",
        "open": 10.0,
        "high": 11.0,
        "low": 9.0,
        "close": 10.5,
        "volume": 100.0,
        "sentiment": 0.5,
        "headline": "up",
        "data_hash": a.hashes[0],
    }
    assert "volume" not in bodies[3] and "headline" not in bodies[3]  # empty cells left out
    assert "volume" not in bodies[1]  # the file has no volume column
    expected = {"A": iter(a.hashes), "B/USD": iter(b.hashes)}
    for m in messages:
        bar = decode_message(m.body, {"symbol": m.symbol})
        assert bar.verified and bar.data_hash == m.data_hash == next(expected[m.symbol])


class FakePublisher:
    """Records batches; the batch calls numbered in ``fail`` (0-based) raise, as a failed
    Publish request does (``OrderedPublisher.publish_batch``: nothing of it published)."""

    def __init__(self, fail: set[int] | None = None) -> None:
        self.published: list[tuple[str, str]] = []
        self.batches: list[int] = []
        self.fail = fail or set()
        self.calls = 0
        self.times: list[float] = []
        self.replay_clocks: list[float] = []
        self.clock: Any = None

    def publish_batch(
        self, topic_path: str, messages: Sequence[tuple[bytes, Mapping[str, str]]]
    ) -> list[str]:
        n, self.calls = self.calls, self.calls + 1
        if n in self.fail:
            raise RuntimeError("unavailable")
        self.batches.append(len(messages))
        for body, attrs in messages:
            # Pub/Sub attributes are text; no ordering key (the live feed orders bars itself).
            assert all(isinstance(v, str) for v in attrs.values())
            if "replay_clock" in attrs:
                self.replay_clocks.append(float(attrs["replay_clock"]))
            self.published.append((attrs["symbol"], json.loads(body)["timestamp"]))
            if self.clock is not None:
                self.times.append(self.clock.now)
        return [str(i) for i in range(len(messages))]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


def test_speed_paces_by_bar_time() -> None:
    bars = read_csv_bars(CSVFeedConfig(path=DATA / "EURUSD.csv", symbol="EURUSD"))  # hourly
    clock = FakeClock()
    pub = FakePublisher()
    pub.clock = clock
    msgs = list(bar_messages([bars]))[:24]
    result = publish(pub, "t", iter(msgs), speed=3600.0, sleep=clock.sleep, clock=clock)
    assert result.published == 24
    # One simulated hour per wall second: each message goes out at its bar's offset / 3600.
    offsets = [(m.ts - msgs[0].ts).total_seconds() / 3600.0 for m in msgs]
    assert pub.times == pytest.approx(offsets)
    # Each message carries the replay's own clock: the time it plays (here its bar's time).
    assert pub.replay_clocks == pytest.approx([m.ts.timestamp() for m in msgs])
    fast = FakePublisher()
    publish(fast, "t", iter(msgs), speed=0.0, sleep=clock.sleep, clock=clock)
    assert len(fast.published) == 24 and clock.now == pytest.approx(offsets[-1])  # no sleeping
    assert fast.replay_clocks == []  # as fast as possible: no clock of its own


def test_failed_batches_are_sent_again_whole_and_in_order(tmp_path: Path) -> None:
    a = read_csv_bars(CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG"))
    msgs = list(bar_messages([a]))[:2100]
    pub = FakePublisher(fail={1})  # the second batch fails once
    clock = FakeClock()
    fast_retry = RetryPolicy(initial_s=0.001, max_s=0.001)
    result = publish(pub, "t", iter(msgs), sleep=clock.sleep, clock=clock, retry=fast_retry)
    assert result.published == 2100 and result.retries == 1000
    assert pub.batches == [1000, 1000, 100]  # Pub/Sub's 1,000 messages per request
    assert [p[1] for p in pub.published] == [json.loads(m.body)["timestamp"] for m in msgs]


def test_publishing_gives_up_after_the_policy_attempts() -> None:
    a = read_csv_bars(CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG"))
    msgs = list(bar_messages([a]))[:3]
    pub = FakePublisher(fail=set(range(100)))
    retry = RetryPolicy(attempts=3, initial_s=0.001, max_s=0.001)
    with pytest.raises(TransientError, match="still failing after 3 attempts") as info:
        publish(pub, "t", iter(msgs), retry=retry)
    assert pub.calls == 3 and pub.published == []
    assert isinstance(info.value.__cause__, PublishFailedError)
    assert isinstance(info.value.__cause__.__cause__, RuntimeError)


def test_cli_publishes_real_data_to_the_emulator(pubsub_emulator: PubSubEmulator) -> None:
    emu = pubsub_emulator
    topic = f"projects/{emu.project}/topics/replay-{uuid.uuid4().hex[:6]}"
    publisher_client(emu.host).create_topic(request={"name": topic})
    client = subscriber_client(emu.host)
    sub = f"projects/{emu.project}/subscriptions/replay-{uuid.uuid4().hex[:6]}"
    client.create_subscription(
        request={"name": sub, "topic": topic, "enable_message_ordering": True}
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.replay",
            "--topic",
            topic.rsplit("/", 1)[-1],
            "--csv",
            f"{DATA / 'GOOG.csv'}:GOOG",
            str(DATA / "SP500.csv"),
            "--start",
            "2005-01-01",
            "--limit",
            "30",
        ],
        cwd=REPO,
        env=clean_env(emu.env()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["published"] == 60
    assert summary["per_symbol"] == {"GOOG": 30, "SP500": 30}
    got: dict[str, list[Any]] = defaultdict(list)
    while sum(len(v) for v in got.values()) < 60:
        resp = client.pull(request={"subscription": sub, "max_messages": 100}, timeout=30)
        for rm in resp.received_messages:
            m = rm.message
            bar = decode_message(m.data, m.attributes, message_id=m.message_id)
            assert bar.verified and m.ordering_key == ""  # the feed orders bars itself
            got[bar.symbol].append(bar)
        client.acknowledge(
            request={"subscription": sub, "ack_ids": [rm.ack_id for rm in resp.received_messages]}
        )
    client.close()
    start = datetime(2005, 1, 1, tzinfo=UTC)
    for symbol in ("GOOG", "SP500"):
        csv = read_csv_bars(CSVFeedConfig(path=DATA / f"{symbol}.csv", symbol=symbol, start=start))
        assert [b.data_hash for b in got[symbol]] == csv.hashes[:30]  # in order, same hashes
    assert not math.isnan(got["SP500"][0].values["adj_close"])  # extra column carried


def test_cli_creates_a_missing_topic_and_refuses_bad_input(pubsub_emulator: PubSubEmulator) -> None:
    emu = pubsub_emulator
    name = f"fresh-{uuid.uuid4().hex[:6]}"
    run = [sys.executable, "-m", "runtime.replay", "--topic", name, "--limit", "3"]
    ok = subprocess.run(
        [*run, "--csv", str(DATA / "BTCUSD.csv")],
        cwd=REPO,
        env=clean_env(emu.env()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["per_symbol"] == {"BTCUSD": 3}
    pub = publisher_client(emu.host)
    assert pub.get_topic(request={"topic": f"projects/{emu.project}/topics/{name}"})
    missing = subprocess.run(
        [*run, "--csv", "nope.csv:X"],
        cwd=REPO,
        env=clean_env(emu.env()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "no such file" in missing.stderr
    bad_speed = subprocess.run(
        [*run, "--csv", str(DATA / "GOOG.csv"), "--speed", "-2"],
        cwd=REPO,
        env=clean_env(emu.env()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_speed.returncode == 2 and "speed" in bad_speed.stderr
    bad_topic = subprocess.run(
        [sys.executable, "-m", "runtime.replay", "--topic", "goog-bars", "--csv", "x.csv"],
        cwd=REPO,
        env=clean_env(emu.env()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad_topic.returncode == 2 and "not a valid Pub/Sub id" in bad_topic.stderr
