"""The live Pub/Sub feed against the real emulator: subscription lifecycle, fields, malformed and
redelivered messages, back-pressure from a slow agent, and a server restart mid-stream."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import backtrader as bt
import pytest

from core.errors import ConfigError
from feeds.pubsub import (
    PubSubBarSubscriber,
    publisher_client,
    subscriber_client,
)
from tests.pubsub_emulator import PubSubEmulator
from tests.pubsub_live import FAST, T0, bar, config, publish, run_live, topic, wait_for

__all__ = ["topic"]
# fixtures used by this module

# -- subscriptions ------------------------------------------------------------------------------


def test_subscription_has_expiry_and_filter_and_outlives_the_runner(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic, subscription_ttl_s=172_800),
        symbols=["GOOG", "SP500"],
        deployment="life-1",
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
        # No server-side ordering: the hub orders bars (the emulator blocks an ordering key for
        # good after a broken stream; see docs/pubsub.md).
        assert not got.enable_message_ordering
    finally:
        sub.close()
    # Kept for the next start of the same deployment (it expires when the deployment is gone).
    assert path in pubsub_emulator.subscriptions()
    again = PubSubBarSubscriber(
        config(pubsub_emulator, topic, delete_subscription=True),
        symbols=["GOOG", "SP500"],
        deployment="life-1",
        settings=FAST,
    )
    again.start()
    assert again.subscription_paths == [path]
    again.close()
    assert path not in pubsub_emulator.subscriptions()  # PUBSUB_DELETE_SUBSCRIPTION


def test_existing_subscriptions_are_reused(pubsub_emulator: PubSubEmulator, topic: str) -> None:
    emu = pubsub_emulator
    client = subscriber_client(emu.host)
    # Our own name already exists (a restarted pod of the same deployment): reused and kept.
    own = f"projects/{emu.project}/subscriptions/test-reuse-1"
    client.create_subscription(request={"name": own, "topic": topic})
    sub = PubSubBarSubscriber(
        config(emu, topic), symbols=["AAA"], deployment="reuse-1", settings=FAST
    )
    sub.start()
    sub.close()
    assert own in emu.subscriptions()
    # Filtered for other symbols (SYMBOLS changed since): Pub/Sub would hold back the new ones.
    filtered = f"projects/{emu.project}/subscriptions/test-reuse-6"
    client.create_subscription(
        request={"name": filtered, "topic": topic, "filter": 'attributes.symbol = "OLD"'}
    )
    with pytest.raises(ConfigError, match="filter"):
        PubSubBarSubscriber(
            config(emu, topic), symbols=["AAA"], deployment="reuse-6", settings=FAST
        ).start()
    # A named one (PUBSUB_SUBSCRIPTION) is used as is and left in place.
    named = f"projects/{emu.project}/subscriptions/shared-{uuid.uuid4().hex[:6]}"
    client.create_subscription(request={"name": named, "topic": topic})
    sub = PubSubBarSubscriber(
        config(emu, topic, subscription=named.rsplit("/", 1)[-1]),
        symbols=["AAA"],
        deployment="reuse-2",
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
            deployment="reuse-3",
            settings=FAST,
        ).start()
    with pytest.raises(ConfigError, match="does not exist"):
        PubSubBarSubscriber(
            config(emu, topic, subscription="missing-sub"),
            symbols=["AAA"],
            deployment="reuse-4",
            settings=FAST,
        ).start()
    with pytest.raises(ConfigError, match=r"topic .*no-such-topic does not exist"):
        PubSubBarSubscriber(
            config(emu, "no-such-topic"), symbols=["AAA"], deployment="reuse-5", settings=FAST
        ).start()
    for path in (own, filtered):
        client.delete_subscription(request={"subscription": path})
    client.close()
    assert not [s for s in emu.subscriptions() if "reuse" in s]  # nothing else was created


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
        deployment=f"fields-{uuid.uuid4().hex[:6]}",
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
        ("stale_timestamp", {"symbol": "AAA"}, b""),  # bar -1 - k, made below
    ]
    burst = [
        (attrs, body or bar("AAA", -1 - k, volume=5))
        for k in range(15)
        for _, attrs, body in bad_kinds
    ]
    items = good[:5] + burst + good[5:]

    def scenario(sub: PubSubBarSubscriber) -> None:
        # The first bars are served before the burst, so its old bar (-1) is stale: before
        # that it would simply be the earliest bar (bars are ordered by the hub).
        publish(pubsub_emulator, topic, good[:5])
        wait_for(lambda: sub.hub.steps >= 5, what="5 steps")
        publish(pubsub_emulator, topic, burst + good[5:])
        wait_for(lambda: sub.handler.stats.received == len(items), what="all messages")

    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic),
        symbols=["AAA"],
        deployment=f"bad-{uuid.uuid4().hex[:6]}",
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
        assert "refused" in logged[0].getMessage()
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
        deployment=f"dup-{uuid.uuid4().hex[:6]}",
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
        config(emu, topics[0], topics=tuple(topics), delete_subscription=True),
        symbols=["AAA", "BBB"],
        deployment=session,
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
        deployment=f"slow-{uuid.uuid4().hex[:6]}",
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
        wait_for(lambda: sub.hub.status == "CONNECTED", what="reconnected")
        publish(emu, topic, second)
        wait_for(lambda: sub.handler.stats.delivered == 40, what="all 40 bars")

    sub = PubSubBarSubscriber(
        config(emu, topic), symbols=["AAA"], deployment="restart", settings=FAST
    )
    strategy = run_live(sub, scenario)
    assert strategy.statuses == ["DELAYED", "LIVE", "DISCONNECTED", "LIVE"]
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(40)]
    stats = sub.stats()
    assert stats["duplicates"] == 5 and stats["disconnects"] >= 1 and stats["reconnects"] >= 1
    assert stats["malformed_total"] == 0
    assert emu.subscriptions() == sub.subscription_paths  # recreated, kept for the next start


def test_bars_with_the_ingestors_ordering_keys_are_delivered_in_order(
    pubsub_emulator: PubSubEmulator, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ingestor publishes with ``ordering_key=symbol`` through the batching client
    (``feeds.ingest.publisher.BarPublisher``); the feed's subscription has no message ordering,
    so the keys change nothing: every bar arrives, in order, and nothing is logged as wrong."""
    from feeds.ingest.messages import build_message
    from feeds.ingest.publisher import BarPublisher

    client = publisher_client(pubsub_emulator.host)  # message ordering on, as the ingestor's
    publisher = BarPublisher(client, topic)
    bars = [
        build_message(
            s,
            T0 + timedelta(minutes=i),
            {
                "open": 100.0 + i,
                "high": 101.0 + i,
                "low": 99.0 + i,
                "close": 100.5 + i,
                "volume": 10.0 * i,
            },
            {},
            source="live",
        )
        for i in range(30)
        for s in ("AAA", "BBB")
    ]

    def scenario(sub: PubSubBarSubscriber) -> None:
        for b in bars:
            publisher.publish(b)
        assert len(publisher.flush(30.0)) == len(bars)
        wait_for(lambda: sub.handler.stats.delivered == len(bars), what="every bar")

    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic),
        symbols=["AAA", "BBB"],
        deployment=f"keys-{uuid.uuid4().hex[:6]}",
        settings=FAST,
    )
    with caplog.at_level(logging.INFO, logger="feeds.pubsub"):
        strategy = run_live(sub, scenario)
    client.stop()
    for s in ("AAA", "BBB"):
        assert [c for name, _, c in strategy.bars if name == s] == [100.5 + i for i in range(30)]
    assert sub.stats()["malformed_total"] == 0 and sub.stats()["duplicates"] == 0
    assert any(
        "carry ordering keys ('AAA'" in r.getMessage()
        or "carry ordering keys ('BBB'" in r.getMessage()
        for r in caplog.records
    )  # the keys did reach the subscriber
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
