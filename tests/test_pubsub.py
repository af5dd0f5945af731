"""The live Pub/Sub feed against the real emulator: subscription lifecycle, fields, malformed and
redelivered messages, back-pressure from a slow agent, and a server restart mid-stream."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import backtrader as bt
import pytest

from analyzers.fmel import FMELAnalyzer
from core.errors import ConfigError
from core.retry import RetryPolicy
from feeds.pubsub import (
    PubSubBarSubscriber,
    PubSubFeedConfig,
    StreamSettings,
    publisher_client,
    subscriber_client,
)
from tests.fixtures_pubsub import PubSubEmulator, emulator_factory, pubsub_emulator

__all__ = ["emulator_factory", "pubsub_emulator"]  # fixtures used by this module

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
FAST = StreamSettings(
    health_interval_s=0.3, probe_timeout_s=1.0, reconnect=RetryPolicy(initial_s=0.2, max_s=1.0)
)


def bar(symbol: str, i: int, **extra: Any) -> bytes:
    doc: dict[str, Any] = {
        "symbol": symbol,
        "timestamp": (T0 + timedelta(minutes=i)).isoformat(),
        "open": 100.0 + i,
        "high": 101.0 + i,
        "low": 99.0 + i,
        "close": 100.5 + i,
        "volume": 10 * i,
    }
    doc.update(extra)
    return json.dumps(doc).encode()


@pytest.fixture
def topic(pubsub_emulator: PubSubEmulator) -> Iterator[str]:
    pub = publisher_client(pubsub_emulator.host)
    path = f"projects/{pubsub_emulator.project}/topics/bars-{uuid.uuid4().hex[:8]}"
    pub.create_topic(request={"name": path})
    yield path
    pub.stop()


def publish(emu: PubSubEmulator, topic: str, items: list[tuple[dict[str, str], bytes]]) -> None:
    """Publish in order (ordering key = the symbol attribute, as the contract asks)."""
    pub = publisher_client(emu.host)
    futures = [
        pub.publish(topic, body, ordering_key=attrs.get("symbol", "none"), **attrs)
        for attrs, body in items
    ]
    for f in futures:
        f.result(timeout=30)
    pub.stop()


def config(emu: PubSubEmulator, topic: str, **over: Any) -> PubSubFeedConfig:
    base: dict[str, Any] = dict(
        project=emu.project,
        topics=(topic,),
        emulator_host=emu.host,
        qcheck_s=0.05,
        discovery_s=0.0,
        align_wait_s=0.2,
        subscription_prefix="test",
    )
    base.update(over)
    return PubSubFeedConfig(**base)


def wait_for(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Recorder(bt.Strategy):  # type: ignore[misc]
    """Records every bar it is given, the statuses it is told, the hub depth; may be slow."""

    params = (("sleep_s", 0.0), ("hub", None))

    def __init__(self) -> None:
        self.bars: list[tuple[str, datetime, float]] = []
        self.statuses: list[str] = []
        self.depths: list[int] = []
        self._lens = [0] * len(self.datas)

    def notify_data(self, data: Any, status: int, *args: Any, **kwargs: Any) -> None:
        self.statuses.append(data._getstatusname(status))

    def prenext(self) -> None:
        self.next()

    def next(self) -> None:
        for i, d in enumerate(self.datas):
            if len(d) > self._lens[i]:
                self._lens[i] = len(d)
                self.bars.append((d._name, bt.num2date(d.datetime[0]), d.close[0]))
        if self.p.hub is not None:
            self.depths.append(max(self.p.hub.depth(s) for s in self.p.hub.symbols))
        if self.p.sleep_s:
            time.sleep(self.p.sleep_s)


def run_live(
    sub: PubSubBarSubscriber,
    scenario: Callable[[PubSubBarSubscriber], None],
    *,
    agent: type = Recorder,
    fmel: bool = False,
    **agent_params: Any,
) -> Any:
    """Start ``sub``, run ``scenario`` (publishing, then ``request_stop``) on a thread while
    cerebro runs on this one; close the subscriber whatever happens."""
    errors: list[BaseException] = []

    def drive() -> None:
        try:
            scenario(sub)
        except BaseException as e:  # re-raised on the test thread
            errors.append(e)
        finally:
            sub.request_stop(5.0)

    try:
        sub.start()
        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        sub.discover_fields()
        cerebro = bt.Cerebro(stdstats=False)
        for feed in sub.make_feeds():
            cerebro.adddata(feed, name=feed.symbol)
        cerebro.addstrategy(agent, **agent_params)
        if fmel:
            cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
        strategy = cerebro.run()[0]
        driver.join(30)
    finally:
        sub.close()
    if errors:
        raise errors[0]
    return strategy


# -- subscriptions ------------------------------------------------------------------------------


def test_subscription_has_expiry_filter_and_ordering_and_is_deleted(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic, subscription_ttl_s=172_800),
        symbols=["GOOG", "SP500"],
        session_id="life-1",
        settings=FAST,
    )
    sub.start()
    try:
        path = f"projects/{pubsub_emulator.project}/subscriptions/test-life-1"
        assert path in pubsub_emulator.subscriptions()
        client = subscriber_client(pubsub_emulator.host)
        got = client.get_subscription(request={"subscription": path})
        client.close()
        assert got.topic == topic
        assert got.expiration_policy.ttl.total_seconds() == 172_800
        assert got.filter == 'attributes.symbol = "GOOG" OR attributes.symbol = "SP500"'
        assert got.enable_message_ordering
    finally:
        sub.close()
    assert path not in pubsub_emulator.subscriptions()


def test_existing_subscriptions_are_reused(pubsub_emulator: PubSubEmulator, topic: str) -> None:
    emu = pubsub_emulator
    client = subscriber_client(emu.host)
    # Our own name already exists (a restarted pod of the same session): reused, then deleted.
    own = f"projects/{emu.project}/subscriptions/test-reuse-1"
    client.create_subscription(request={"name": own, "topic": topic})
    sub = PubSubBarSubscriber(
        config(emu, topic), symbols=["AAA"], session_id="reuse-1", settings=FAST
    )
    sub.start()
    sub.close()
    assert own not in emu.subscriptions()
    # A named one (PUBSUB_SUBSCRIPTION) is used as is and left in place.
    named = f"projects/{emu.project}/subscriptions/shared-{uuid.uuid4().hex[:6]}"
    client.create_subscription(request={"name": named, "topic": topic})
    sub = PubSubBarSubscriber(
        config(emu, topic, subscription=named.rsplit("/", 1)[-1]),
        symbols=["AAA"],
        session_id="reuse-2",
        settings=FAST,
    )
    sub.start()
    sub.close()
    assert named in emu.subscriptions()
    other = f"projects/{emu.project}/topics/other-{uuid.uuid4().hex[:6]}"
    publisher_client(emu.host).create_topic(request={"name": other})
    with pytest.raises(ConfigError, match="attached to"):
        PubSubBarSubscriber(
            config(emu, other, subscription=named),
            symbols=["AAA"],
            session_id="reuse-3",
            settings=FAST,
        ).start()
    with pytest.raises(ConfigError, match="does not exist"):
        PubSubBarSubscriber(
            config(emu, topic, subscription="missing-sub"),
            symbols=["AAA"],
            session_id="reuse-4",
            settings=FAST,
        ).start()
    with pytest.raises(ConfigError, match=r"topic .*no-such-topic does not exist"):
        PubSubBarSubscriber(
            config(emu, "no-such-topic"), symbols=["AAA"], session_id="reuse-5", settings=FAST
        ).start()
    client.close()
    assert not [s for s in emu.subscriptions() if "reuse" in s]  # nothing left behind


# -- bars, fields, malformed, duplicates --------------------------------------------------------


def test_nested_and_text_fields_reach_the_agent_and_fmel(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    class Reader(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            self.last = (
                self.data.latest_news_sentiment[0],
                self.data.headline[0],
                self.data.close[0],
            )

    items = [
        (
            {"symbol": "NEWS"},
            bar(
                "NEWS",
                i,
                latest_news={"sentiment": i / 10, "relevance": 1},
                headline=f"headline {i}",
            ),
        )
        for i in range(5)
    ]
    # A field only later messages carry is reported, not silently lost.
    items.append(
        (
            {"symbol": "NEWS"},
            bar("NEWS", 5, latest_news={"sentiment": 0.5}, headline="late", rating="buy"),
        )
    )

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(pubsub_emulator, topic, items)
        wait_for(lambda: sub.handler.stats.delivered == 6, what="6 bars")

    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic, discovery_s=20.0),
        symbols=["NEWS"],
        session_id=f"fields-{uuid.uuid4().hex[:6]}",
        settings=FAST,
    )
    strategy = run_live(sub, scenario, agent=Reader, fmel=True)
    assert sub.fields["NEWS"].numeric == ("latest_news_sentiment", "latest_news_relevance")
    assert sub.fields["NEWS"].text == ("headline",)
    assert strategy.last == (0.5, "late", 105.5)
    assert sub.stats()["late_fields"] == {"NEWS": {"rating": 1}}
    record = strategy.analyzers.fmel.records[-1]
    reads = {a.field: a for d in record.data_accessed for a in d.access_patterns}
    assert reads["headline"].text_value == "late"
    assert reads["latest_news_sentiment"].value == 0.5
    assert reads["headline"].data_hash == strategy.data.bar_hashes.at(5)


def test_malformed_burst_is_counted_logged_once_and_kept_from_the_agent(
    pubsub_emulator: PubSubEmulator, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="feeds.pubsub")
    good = [({"symbol": "AAA"}, bar("AAA", i)) for i in range(10)]
    bad_kinds: list[tuple[str, dict[str, str], bytes]] = [
        ("bad_json", {"symbol": "AAA"}, b"{oops"),
        ("missing_symbol", {}, bar("AAA", 50)),
        ("unknown_symbol", {"symbol": "ZZZ"}, bar("ZZZ", 50)),
        ("invalid_bar", {"symbol": "AAA"}, bar("AAA", 50, high=1.0)),
        ("non_numeric_price", {"symbol": "AAA"}, bar("AAA", 50, close="n/a")),
        ("hash_mismatch", {"symbol": "AAA"}, bar("AAA", 50, data_hash="f" * 32)),
        ("stale_timestamp", {"symbol": "AAA"}, bar("AAA", -1, volume=5)),
    ]
    burst = [(attrs, body) for _ in range(15) for _, attrs, body in bad_kinds]
    items = good[:5] + burst + good[5:]

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(pubsub_emulator, topic, items)
        wait_for(lambda: sub.handler.stats.received == len(items), what="all messages")

    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic),
        symbols=["AAA"],
        session_id=f"bad-{uuid.uuid4().hex[:6]}",
        settings=FAST,
    )
    strategy = run_live(sub, scenario)
    stats = sub.stats()
    assert stats["malformed"] == {kind: 15 for kind, _, _ in bad_kinds}
    assert stats["delivered"] == 10 and stats["duplicates"] == 0
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(10)]
    for kind, _, _ in bad_kinds:
        logged = [r for r in caplog.records if f"({kind})" in r.getMessage()]
        assert len(logged) == 1, kind
        assert "malformed message" in logged[0].getMessage()
    assert sub.feed_counters()["all"]["malformed"] == 15 * len(bad_kinds)


class NackFirst(PubSubBarSubscriber):
    """Nacks the first delivery of every third message after handling it, so the real server
    redelivers it (same message id)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nacked: set[str] = set()
        self.deliveries: dict[str, int] = {}

    def _callback(self, message: Any) -> None:
        mid = message.message_id
        self.deliveries[mid] = self.deliveries.get(mid, 0) + 1
        if int(mid) % 3 == 0 and mid not in self.nacked:
            self.handler.handle(message.data, message.attributes, message_id=mid)
            self.nacked.add(mid)
            message.nack()
            return
        super()._callback(message)


def test_redelivered_and_republished_bars_are_dropped_once(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    items = [({"symbol": "AAA"}, bar("AAA", i)) for i in range(12)]
    republished = [({"symbol": "AAA"}, bar("AAA", i)) for i in range(9, 12)]

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(pubsub_emulator, topic, items)
        assert isinstance(sub, NackFirst)
        wait_for(
            lambda: len(sub.nacked) >= 1 and all(sub.deliveries.get(m, 0) >= 2 for m in sub.nacked),
            what="redeliveries",
        )
        wait_for(lambda: sub.handler.stats.delivered == 12, what="12 bars")
        publish(pubsub_emulator, topic, republished)
        wait_for(lambda: sub.handler.stats.duplicates == len(sub.nacked) + 3, what="duplicates")

    sub = NackFirst(
        config(pubsub_emulator, topic),
        symbols=["AAA"],
        session_id=f"dup-{uuid.uuid4().hex[:6]}",
        settings=FAST,
    )
    strategy = run_live(sub, scenario)
    assert sub.nacked and all(sub.deliveries[m] >= 2 for m in sub.nacked)
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(12)]
    assert sub.stats()["malformed_total"] == 0


def test_one_subscription_per_topic(pubsub_emulator: PubSubEmulator) -> None:
    emu = pubsub_emulator
    pub = publisher_client(emu.host)
    topics = [f"projects/{emu.project}/topics/multi-{i}-{uuid.uuid4().hex[:6]}" for i in (1, 2)]
    for t in topics:
        pub.create_topic(request={"name": t})
    session = f"multi-{uuid.uuid4().hex[:6]}"

    def scenario(sub: PubSubBarSubscriber) -> None:
        assert len(sub.stats()["subscriptions"]) == 2
        publish(emu, topics[0], [({"symbol": "AAA"}, bar("AAA", i)) for i in range(5)])
        publish(emu, topics[1], [({"symbol": "BBB"}, bar("BBB", i)) for i in range(5)])
        wait_for(lambda: sub.handler.stats.delivered == 10, what="10 bars")

    sub = PubSubBarSubscriber(
        config(emu, topics[0], topics=tuple(topics)),
        symbols=["AAA", "BBB"],
        session_id=session,
        settings=FAST,
    )
    strategy = run_live(sub, scenario)
    names = sorted(p.rsplit("/", 1)[-1] for p in sub.stats()["subscriptions"])
    assert names == sorted(f"test-{session}-{t.rsplit('/', 1)[-1]}" for t in topics)
    assert sorted((b[0], b[2]) for b in strategy.bars) == [
        (s, 100.5 + i) for s in ("AAA", "BBB") for i in range(5)
    ]
    assert not [s for s in emu.subscriptions() if session in s]


def test_slow_agent_gets_back_pressure_and_every_bar(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    n = 60
    items = [({"symbol": s}, bar(s, i)) for i in range(n) for s in ("AAA", "BBB")]

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(pubsub_emulator, topic, items)
        wait_for(lambda: sub.handler.stats.delivered == 2 * n, timeout_s=60, what="all bars")

    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic, max_buffered_bars=4),
        symbols=["AAA", "BBB"],
        session_id=f"slow-{uuid.uuid4().hex[:6]}",
        settings=FAST,
    )
    strategy = run_live(sub, scenario, sleep_s=0.05, hub=sub.hub)
    assert sub.hub.backpressure_waits > 0
    assert max(strategy.depths) <= 4
    expected = [
        (s, (T0 + timedelta(minutes=i)).replace(tzinfo=None), 100.5 + i)
        for i in range(n)
        for s in ("AAA", "BBB")
    ]
    assert strategy.bars == expected  # in time order, every bar once, both symbols per step
    assert sub.stats()["duplicates"] == 0 and sub.stats()["undelivered_at_stop"] == 0


# -- server failure -----------------------------------------------------------------------------


def test_server_restart_mid_stream(emulator_factory: Callable[[], PubSubEmulator]) -> None:
    emu = emulator_factory()
    topic = f"projects/{emu.project}/topics/bars-restart"
    publisher_client(emu.host).create_topic(request={"name": topic})
    first = [({"symbol": "AAA"}, bar("AAA", i)) for i in range(20)]
    # After the restart the publisher resends from bar 15: 15..19 are duplicates.
    second = [({"symbol": "AAA"}, bar("AAA", i)) for i in range(15, 40)]

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, first)
        wait_for(lambda: sub.handler.stats.delivered == 20, what="first 20 bars")
        emu.kill()
        wait_for(lambda: sub.hub.status == "DISCONNECTED", what="DISCONNECTED")
        emu.start()  # same port, empty state: topic and subscription are gone
        publisher_client(emu.host).create_topic(request={"name": topic})
        wait_for(lambda: sub.hub.status == "LIVE", what="reconnected")
        publish(emu, topic, second)
        wait_for(lambda: sub.handler.stats.delivered == 40, what="all 40 bars")

    sub = PubSubBarSubscriber(
        config(emu, topic), symbols=["AAA"], session_id="restart", settings=FAST
    )
    strategy = run_live(sub, scenario)
    assert strategy.statuses == ["DELAYED", "LIVE", "DISCONNECTED", "LIVE"]
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(40)]
    stats = sub.stats()
    assert stats["duplicates"] == 5 and stats["disconnects"] >= 1 and stats["reconnects"] >= 1
    assert stats["malformed_total"] == 0
    assert emu.subscriptions() == []  # the recreated subscription was deleted too
