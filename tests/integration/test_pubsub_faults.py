"""Faults a production feed sees, against the real Pub/Sub emulator (a subscriber and live
backtrader feeds in this process):

* bursts of large messages (100 kB text fields, several MB in flight): all delivered, no stall;
  a message over the size limit is refused as ``oversized`` and the stream goes on;
* a network cut through a TCP proxy on loopback: DISCONNECTED, and LIVE (readiness) only once
  bars flow again; nothing lost;
* the server restarted empty: the subscription is re-created within seconds, and the bars
  published before it existed show as missing bar times;
* acknowledgement on disk: a bar is acknowledged only through ``ack_through``; what is not is
  returned at close and delivered to the next subscriber of the same deployment; a copy
  redelivered while its bar is held is settled with it;
* ``request_stop`` ends a discovery wait at once;
* while steps wait for missing bar times, pulling goes on past the flow control limit, so the
  bars that fill the gap are received even when newer ones fill the leases.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, timedelta

import backtrader as bt
import pytest

from core.errors import ConfigError
from core.retry import RetryPolicy
from core.time import utc_to_bt_num
from feeds.pubsub import (
    PubSubBarSubscriber,
    PubSubFeedConfig,
    StreamSettings,
    publisher_client,
    subscriber_client,
)
from feeds.pubsub.clients import OrderedPublisher
from feeds.pubsub.config import MAX_MESSAGE_BYTES
from tests.pubsub_emulator import PubSubEmulator
from tests.pubsub_live import FAST, T0, bar, config, publish, run_live, topic, wait_for
from tests.tcp_proxy import TcpProxy

__all__ = ["topic"]
# fixtures used by this module

# Redelivery after a broken stream waits for the stream's ack deadline (10 s, the default
# lease extension): waits below allow for it.
REDELIVERY_S = 40.0


def deployment() -> str:
    return f"d-{uuid.uuid4().hex[:8]}"


def test_bursts_of_large_messages_are_all_delivered(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    # 120 bars with a 100 kB headline each: 12 MB in flight, three times gRPC's 4 MB default.
    big = "x" * 100_000
    items = [({"symbol": "AAA"}, bar("AAA", i, headline=f"{i}{big}")) for i in range(120)]

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(pubsub_emulator, topic, items)
        wait_for(lambda: sub.handler.stats.delivered == 120, timeout_s=60, what="120 bars")

    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic, fields=("headline:text",)),
        symbols=["AAA"],
        deployment=deployment(),
        settings=FAST,
    )
    strategy = run_live(sub, scenario)
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(120)]
    assert sub.stats()["malformed_total"] == 0 and sub.disconnects == 0


def test_an_oversized_message_is_refused_and_the_stream_goes_on(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    items = [({"symbol": "AAA"}, bar("AAA", i)) for i in range(5)]
    items.append(({"symbol": "AAA"}, bar("AAA", 5, headline="y" * 200_000)))
    items += [({"symbol": "AAA"}, bar("AAA", i)) for i in range(6, 10)]

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(pubsub_emulator, topic, items)
        wait_for(lambda: sub.handler.stats.received == 10, what="10 messages")

    settings = StreamSettings(
        pull_timeout_s=2.0,
        probe_timeout_s=1.0,
        reconnect=RetryPolicy(initial_s=0.2, max_s=1.0),
        max_message_bytes=100_000,
    )
    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic), symbols=["AAA"], deployment=deployment(), settings=settings
    )
    strategy = run_live(sub, scenario)
    assert sub.stats()["malformed"] == {"oversized": 1}
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(10) if i != 5]
    # Bar time 5 is missing for the agent; the gap count says so.
    assert sub.stats()["missing_bars"] == {"AAA": 1}


def test_a_message_at_pubsubs_limit_is_delivered_and_one_over_it_is_refused(
    pubsub_emulator: PubSubEmulator, topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Pub/Sub takes a message of up to 10,000,000 bytes (google-cloud-pubsub's
    ``_SERVER_PUBLISH_MAX_BYTES``, https://cloud.google.com/pubsub/quotas#resource_limits): one
    just under it reaches the agent with the default settings (a pull response then carries
    more than 10 MB, so the channel must not cap it). The emulator also accepts a little more
    (measured: up to about 10.4 MB), which the real service refuses: such a message is refused
    as ``oversized`` with a WARNING, and the bars after it flow on."""

    def padded(i: int, total_bytes: int) -> bytes:
        body = bar("AAA", i, headline="")
        return bar("AAA", i, headline="x" * (total_bytes - len(body)))

    at_limit, over_limit = padded(3, MAX_MESSAGE_BYTES - 100), padded(7, MAX_MESSAGE_BYTES + 50)
    assert len(at_limit) == MAX_MESSAGE_BYTES - 100 and len(over_limit) == MAX_MESSAGE_BYTES + 50
    bodies = [bar("AAA", i) for i in range(3)] + [at_limit] + [bar("AAA", i) for i in range(4, 7)]
    bodies += [over_limit] + [bar("AAA", i) for i in range(8, 11)]

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(pubsub_emulator, topic, [({"symbol": "AAA"}, b) for b in bodies])
        wait_for(lambda: sub.handler.stats.received == len(bodies), 60, "every message")

    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic, fields=("headline:text",)),
        symbols=["AAA"],
        deployment=deployment(),
        settings=FAST,
    )
    with caplog.at_level(logging.WARNING, logger="feeds.pubsub"):
        strategy = run_live(sub, scenario)
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(11) if i != 7]
    assert sub.stats()["malformed"] == {"oversized": 1} and sub.disconnects == 0
    refused = [r.getMessage() for r in caplog.records if "refused (oversized)" in r.getMessage()]
    assert len(refused) == 1 and f"body of {MAX_MESSAGE_BYTES + 50} bytes" in refused[0]
    assert len(refused[0]) < 1000  # a bounded excerpt, not the 10 MB body


@pytest.fixture
def proxied(pubsub_emulator: PubSubEmulator) -> Iterator[TcpProxy]:
    proxy = TcpProxy(pubsub_emulator.host)
    yield proxy
    proxy.close()


@pytest.mark.parametrize("mode", ["reset", "blackhole"])
def test_after_a_network_cut_live_comes_back_only_with_bars(
    pubsub_emulator: PubSubEmulator, topic: str, proxied: TcpProxy, mode: str
) -> None:
    emu = pubsub_emulator
    stop = threading.Event()
    published: list[int] = []

    def publisher() -> None:  # 10 bars a second straight to the emulator, through the cut
        pub = OrderedPublisher(emu.host)
        i = 0
        while not stop.is_set():
            pub.publish_batch(topic, [(bar("AAA", i), {"symbol": "AAA"})])
            published.append(i)
            i += 1
            stop.wait(0.1)
        pub.stop()

    seen: list[tuple[str, int]] = []  # (status, messages received) at each status change

    def scenario(sub: PubSubBarSubscriber) -> None:
        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        try:
            wait_for(lambda: sub.hub.status == "LIVE" and sub.handler.stats.delivered >= 5)
            proxied.cut(mode)  # type: ignore[arg-type]
            wait_for(lambda: sub.hub.status == "DISCONNECTED", what="DISCONNECTED")
            seen.append(("DISCONNECTED", sub.handler.stats.received))
            time.sleep(2.0)  # the cut lasts 2 s of publishing (a duration, not a wait)
            proxied.restore()
            wait_for(lambda: sub.hub.status != "DISCONNECTED", REDELIVERY_S, "reconnect")
            seen.append((sub.hub.status, sub.handler.stats.received))
            wait_for(lambda: sub.hub.status == "LIVE", REDELIVERY_S, "LIVE again")
            seen.append(("LIVE", sub.handler.stats.received))
        finally:
            stop.set()
            thread.join(30)
        wait_for(lambda: sub.handler.stats.delivered >= len(published), REDELIVERY_S, "every bar")

    cfg = PubSubFeedConfig(
        project=emu.project,
        topics=(topic,),
        emulator_host=proxied.address,
        qcheck_s=0.05,
        discovery_s=0.0,
        align_wait_s=0.2,
        subscription_prefix="cut",
    )
    sub = PubSubBarSubscriber(cfg, symbols=["AAA"], deployment=deployment(), settings=FAST)
    strategy = run_live(sub, scenario)
    # Readiness comes back with bars, not with the connection: the stream is open again
    # (CONNECTED, not ready) before a bar arrives; LIVE is set by the first bar received.
    assert seen[1][0] in ("CONNECTED", "LIVE")
    if seen[1][0] == "CONNECTED":
        assert seen[2][1] > seen[1][1]
    assert strategy.statuses[:3] == ["DELAYED", "LIVE", "DISCONNECTED"]
    assert strategy.statuses[-1] == "LIVE"
    # Nothing lost: every bar published during the cut was delivered after it, in order.
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in published]
    assert sub.disconnects >= 1 and sub.reconnects >= 1


def test_a_server_restarted_empty_shows_the_gap(
    emulator_factory: Callable[[], PubSubEmulator],
) -> None:
    emu = emulator_factory()
    topic = f"projects/{emu.project}/topics/bars-gap"
    publisher_client(emu.host).create_topic(request={"name": topic})
    # The subscriber reaches the emulator through a proxy, cut while the emulator restarts, so
    # bars 10..14 are surely published before it can re-create its subscription (without the
    # cut, it may re-create it first and receive them: a race, not the behaviour under test).
    proxy = TcpProxy(emu.host)

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(10)])
        wait_for(lambda: sub.handler.stats.delivered == 10, what="first 10 bars")
        proxy.cut("reset")
        wait_for(lambda: sub.hub.status == "DISCONNECTED", what="DISCONNECTED")
        emu.kill()
        emu.start()  # same port, empty: topic and subscription are gone
        publisher_client(emu.host).create_topic(request={"name": topic})
        # Bars 10..14 are published before the subscription exists again: lost with Pub/Sub.
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(10, 15)])
        proxy.restore()
        wait_for(lambda: sub.hub.status == "CONNECTED", what="subscription re-created")
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(15, 20)])
        wait_for(lambda: sub.handler.stats.delivered == 15, what="bars after the restart")

    sub = PubSubBarSubscriber(
        config(emu, topic, bar_size="1min", emulator_host=proxy.address),
        symbols=["AAA"],
        deployment="gap",
        settings=FAST,
    )
    try:
        strategy = run_live(sub, scenario)
    finally:
        proxy.close()
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in (*range(10), *range(15, 20))]
    stats = sub.stats()
    assert stats["missing_bars"] == {"AAA": 5} and stats["gap_events"] == 1
    assert sub.feed_counters()["AAA"]["missing"] == 5


def test_bars_are_acknowledged_only_on_disk_and_the_rest_go_to_the_next_start(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    emu = pubsub_emulator
    name = deployment()
    acked: list[float] = []

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(10)])
        wait_for(lambda: sub.hub.steps >= 10, what="10 steps taken")
        # The decisions on the first 6 bars are on disk: their messages are acknowledged.
        acked.append(sub.ack_through((T0 + timedelta(minutes=5)).timestamp()))

    first = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0),
        symbols=["AAA"],
        deployment=name,
        settings=FAST,
        durable_acks=True,
    )
    first.set_durability_barrier(lambda timeout_s: True)
    run_live(first, scenario)
    assert acked == [6]
    assert first.returned == 4 and first.acked == 6  # 6..9 were taken, not on disk: returned

    # The next start of the same deployment gets exactly the four returned bars.
    def rest(sub: PubSubBarSubscriber) -> None:
        wait_for(lambda: sub.handler.stats.delivered == 4, REDELIVERY_S, "4 redelivered bars")

    second = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0),
        symbols=["AAA"],
        deployment=name,
        settings=FAST,
        durable_acks=True,
    )
    strategy = run_live(second, rest)
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(6, 10)]


def test_request_stop_ends_the_discovery_wait_at_once(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    sub = PubSubBarSubscriber(
        config(pubsub_emulator, topic, discovery_s=120.0),
        symbols=["AAA"],
        deployment=deployment(),
        settings=FAST,
    )
    sub.start()
    try:
        done = threading.Event()

        def discover() -> None:
            sub.discover_fields()
            done.set()

        t = threading.Thread(target=discover)
        t.start()
        sub.request_stop(0.0)
        assert done.wait(5.0)  # well inside the 120 s window
        t.join(5)
    finally:
        sub.close()


def test_invalid_topic_names_are_configuration_errors(pubsub_emulator: PubSubEmulator) -> None:
    for bad in ("goog-bars", "1bars", "ba", "bars/x", "projects/p/subscriptions/s"):
        with pytest.raises(ConfigError, match="PUBSUB_TOPIC"):
            config(pubsub_emulator, bad)
    assert config(pubsub_emulator, "bars.v1~x%2B").topics == ("bars.v1~x%2B",)


def test_a_copy_redelivered_while_its_bar_is_held_is_settled_with_it(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    emu = pubsub_emulator
    name = deployment()
    seen: list[int] = []

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", 0))])
        wait_for(lambda: sub.hub.steps >= 1, what="the bar taken")
        # Its lease runs out while it waits for its decision (a stalled process): Pub/Sub
        # hands it out again, as a copy with a new ack id.
        (original,) = list(sub._leases.values())
        client = sub._client
        client.modify_ack_deadline(
            request={
                "subscription": original.subscription,
                "ack_ids": [original.ack_id],
                "ack_deadline_seconds": 0,
            }
        )
        wait_for(lambda: sub.handler.stats.duplicates == 1, REDELIVERY_S, "the copy")
        seen.append(sub.outstanding)  # the copy is held too, not acknowledged on its own
        assert sub.ack_through(T0.timestamp()) == 1  # sent by the ack thread
        wait_for(lambda: sub.outstanding == 0, what="the original and its copy settled")
        seen.append(sub.outstanding)

    first = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0),
        symbols=["AAA"],
        deployment=name,
        settings=FAST,
        durable_acks=True,
    )
    first.set_durability_barrier(lambda timeout_s: True)
    run_live(first, scenario)
    assert seen == [2, 0] and first.returned == 0
    # Nothing is left in the subscription: the next start of the deployment gets nothing.
    client = subscriber_client(emu.host)
    try:
        left = client.pull(
            request={"subscription": first.subscription_paths[0], "max_messages": 10},
            timeout=3,
            retry=None,
        )
    finally:
        client.close()
    assert list(left.received_messages) == []


def test_bars_that_fill_a_gap_are_pulled_although_newer_ones_fill_the_leases(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    """Found by the 30-minute soak: a restarted runner waited for the bar times after its
    resume point, leased 1,000 newer bars (its flow control limit), stopped pulling, and the
    older bars queued behind them came only after its gap hold ran out: refused as late, a
    bar time lost. Here 10 leases, 49 newer bars published first, the 2 missing ones after."""
    emu = pubsub_emulator

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(12, 61)])
        wait_for(lambda: sub.outstanding >= 10, what="the leases full of newer bars")
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in (10, 11)])
        wait_for(lambda: sub.handler.stats.delivered == 51, 15.0, "every bar delivered")

    sub = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0, bar_size="1min", gap_hold_s=60.0),
        symbols=["AAA"],
        deployment=deployment(),
        settings=replace(FAST, max_outstanding_messages=10, backlog_quiet_s=0.2),
        durable_acks=True,  # as the runner: leased until the decision is on disk
    )
    sub.set_durability_barrier(lambda timeout_s: True)
    assert sub.max_outstanding == 10
    # As a restart does: an earlier run decided through bar 9; the reconnect's hold begins.
    sub.hub.resume_after(utc_to_bt_num(T0 + timedelta(minutes=9)))
    sub.hub.hold_steps(0.2)
    strategy = run_live(sub, scenario)
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(10, 61)]
    assert sum(sub.hub.late.values()) == 0 and sub.stats()["missing_bars"] == {}


def test_a_republished_copy_of_an_undecided_bar_is_settled_with_its_decision(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    """Found by the CI soak: a publisher's backfill republished bars (new message ids) that
    the runner held undecided; it acknowledged the copies at once as duplicates, then died
    with the originals lost in an emulator restart: 31 bar times gone. A copy now waits for
    the decision on its bar time, and goes back to Pub/Sub when there is none."""
    emu = pubsub_emulator
    name = deployment()
    counts: list[int] = []

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(6)])
        wait_for(lambda: sub.hub.steps >= 6, what="6 steps taken")
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(6)])  # backfill
        wait_for(lambda: sub.handler.stats.duplicates == 6, what="the 6 copies")
        # Decisions through bar 2 on disk: bars 0..2 and their copies are acknowledged.
        counts.append(sub.ack_through((T0 + timedelta(minutes=2)).timestamp()))
        wait_for(lambda: sub.outstanding == 6, what="6 left leased (bars 3..5 and copies)")

    first = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0),
        symbols=["AAA"],
        deployment=name,
        settings=FAST,
        durable_acks=True,
    )
    first.set_durability_barrier(lambda timeout_s: True)
    run_live(first, scenario)
    assert counts == [6]  # bars 0..2 and their 3 copies acknowledged
    assert first.returned == 6  # bars 3..5 and their copies go back, none acknowledged


def test_a_backlog_larger_than_the_buffer_coming_newest_first_loses_no_bar(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    """Left alone in an earlier session: a backlog larger than PUBSUB_MAX_BUFFERED_BARS that
    came out of order filled the buffer with the newest bars, the pull thread waited for room
    behind them, the hold ran out, and the older bars came after their steps: refused as
    late, lost. Here a buffer of 5 bars, 40 bars published newest first during a reconnect's
    hold: every bar is decided, in order, none late; the ones handed back came again."""
    emu = pubsub_emulator

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": "AAA"}, bar("AAA", i)) for i in range(39, -1, -1)])
        wait_for(lambda: sub.handler.stats.delivered == 40, 60.0, "every bar delivered")
        wait_for(lambda: sub.hub.buffered == 0, 30.0, "every bar taken")

    sub = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0, max_buffered_bars=5),
        symbols=["AAA"],
        deployment=deployment(),
        settings=replace(FAST, backlog_quiet_s=1.0),
        durable_acks=True,  # as the runner: leased until the decision is on disk
    )
    sub.set_durability_barrier(lambda timeout_s: True)
    sub.hub.hold_steps(1.0)  # as a (re)connect does
    strategy = run_live(sub, scenario)
    assert [b[2] for b in strategy.bars] == [100.5 + i for i in range(40)]
    stats = sub.stats()
    assert sum(sub.hub.late.values()) == 0 and stats["late"] == {}
    assert stats["delivered"] == 40 and stats["malformed"] == {}
    assert sub.returned_backlog > 0 and stats["returned_backlog"]["AAA"] > 0


def test_a_shuffled_backlog_of_several_symbols_with_copies_comes_once_each_in_order(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    """The backlog above across three symbols, shuffled, with republished copies, through a
    buffer of 2 bars: each symbol's bars reach the agent once each, in time order, none
    late; the copies are counted as duplicates. (Measured: the bars beyond the buffer come
    back one return delay later, so a backlog of N bars a symbol takes about N / buffer x
    RETURN_DELAY_S: docs/pubsub.md.)"""
    emu = pubsub_emulator
    syms, n = ["AAA", "BBB", "CCC"], 8
    rng = random.Random(7)
    items = [(s, i) for s in syms for i in range(n)]
    rng.shuffle(items)
    copies = rng.sample(items, 4)
    items += copies

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": s}, bar(s, i)) for s, i in items])
        wait_for(lambda: sub.handler.stats.delivered == len(syms) * n, 120.0, "every bar")
        wait_for(lambda: sub.hub.buffered == 0, 30.0, "every bar taken")

    sub = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0, max_buffered_bars=2),
        symbols=syms,
        deployment=deployment(),
        settings=replace(FAST, backlog_quiet_s=1.0),
        durable_acks=True,
    )
    sub.set_durability_barrier(lambda timeout_s: True)
    sub.hub.hold_steps(1.0)
    strategy = run_live(sub, scenario)
    for s in syms:
        assert [c for name, _, c in strategy.bars if name == s] == [100.5 + i for i in range(n)]
    stats = sub.stats()
    assert stats["late"] == {} and stats["delivered"] == len(syms) * n
    assert sum(stats["returned_backlog"].values()) > 0
    assert stats["duplicates"] <= len(copies)


def test_a_backlog_beyond_the_lease_limit_coming_newest_first_loses_no_bar(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    """helper-78 F2: pulling stops at ten times the flow-control limit of leased messages
    (HELD_PULL_FACTOR). A backlog larger than that, arriving newest first, filled the leases
    with the newest bars while no symbol's buffer was full: nothing went back, the pull
    stopped, the hold ran out, and the oldest bars came after their steps (late, lost). Here
    the limit is 12 (3 symbols x 4), so 120 leased while held, and 3 x 60 bars come newest
    first with a buffer of 1,000 bars a symbol: every bar is decided, in order, none late."""
    emu = pubsub_emulator
    syms, n = ["AAA", "BBB", "CCC"], 60
    items = [(s, i) for i in range(n - 1, -1, -1) for s in syms]

    def decided() -> bool:
        # as the runner's decision writer: taken bars acknowledged once decided (they count
        # against the lease limit until then)
        served = sub.hub._served  # the last step served: its decisions are made
        if served > 0:
            sub.ack_through(bt.num2date(served).replace(tzinfo=UTC).timestamp() - 60)
        time.sleep(0.05)
        return sub.handler.stats.delivered == len(items) and sub.hub.buffered == 0

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, [({"symbol": s}, bar(s, i)) for s, i in items])
        wait_for(decided, 180.0, "every bar delivered and taken")

    sub = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0, max_buffered_bars=1000),
        symbols=syms,
        deployment=deployment(),
        settings=replace(FAST, backlog_quiet_s=1.0, max_outstanding_messages=4),
        durable_acks=True,
    )
    sub.set_durability_barrier(lambda timeout_s: True)
    sub.hub.hold_steps(1.0)
    assert sub.max_outstanding_held == 120  # the backlog is beyond it
    strategy = run_live(sub, scenario)
    for s in syms:
        assert [c for name, _, c in strategy.bars if name == s] == [100.5 + i for i in range(n)]
    stats = sub.stats()
    assert stats["late"] == {} and stats["delivered"] == len(items)


def test_a_backlog_of_bars_that_came_twice_beyond_the_lease_limit_loses_no_bar(
    pubsub_emulator: PubSubEmulator, topic: str
) -> None:
    """helper-83: each bar of a newest-first backlog published twice (two message ids, as a
    publisher's retry or a second publisher sends them). Copies of undecided bars stay leased;
    at the lease limit only buffered bars went back, so the leases filled with copies, the
    pull stopped for good, and the oldest bar was later decided out of order or refused as
    stale. The kept copies now go back first. Lease limit 40 (1 symbol: 4 x 10)."""
    emu = pubsub_emulator
    n = 40
    items = [({"symbol": "AAA"}, bar("AAA", i)) for i in range(n - 1, -1, -1) for _ in (0, 1)]

    def decided() -> bool:
        served = sub.hub._served  # as the runner's writer: acknowledged once decided
        if served > 0:
            sub.ack_through(bt.num2date(served).replace(tzinfo=UTC).timestamp() - 60)
        time.sleep(0.05)
        return sub.handler.stats.delivered == n and sub.hub.buffered == 0

    def scenario(sub: PubSubBarSubscriber) -> None:
        publish(emu, topic, items)
        wait_for(decided, 120.0, "every bar delivered and taken")

    sub = PubSubBarSubscriber(
        config(emu, topic, align_wait_s=0.0, max_buffered_bars=1000),
        symbols=["AAA"],
        deployment=deployment(),
        settings=replace(FAST, backlog_quiet_s=1.0, max_outstanding_messages=4),
        durable_acks=True,
    )
    sub.set_durability_barrier(lambda timeout_s: True)
    sub.hub.hold_steps(1.0)
    assert sub.max_outstanding_held == 40
    strategy = run_live(sub, scenario)
    assert [c for _, _, c in strategy.bars] == [100.5 + i for i in range(n)]
    stats = sub.stats()
    assert stats["late"] == {} and stats["delivered"] == n
