"""Helpers shared by the live Pub/Sub tests and benchmarks: bar messages, publishing in order,
a feed config for an emulator, a recording agent and a driver that runs a subscriber with
backtrader on this thread while a scenario publishes on another.

The agent subprocess runs load by name is in :mod:`tests.live_agents` (light to import).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import backtrader as bt
import pytest

from analyzers.fmel import FMELAnalyzer
from core.retry import RetryPolicy
from feeds.pubsub import PubSubBarSubscriber, PubSubFeedConfig, StreamSettings, publisher_client
from feeds.pubsub.clients import MAX_BATCH_BYTES, MAX_BATCH_MESSAGES, OrderedPublisher
from tests.pubsub_emulator import PubSubEmulator

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)
FAST = StreamSettings(
    pull_timeout_s=2.0, probe_timeout_s=1.0, reconnect=RetryPolicy(initial_s=0.2, max_s=1.0)
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
    """Publish in order, one request per 1,000 messages, each confirmed before the next (no
    ordering key, as the contract asks: the feed orders each symbol's bars itself)."""
    pub = OrderedPublisher(emu.host)
    try:
        batch: list[tuple[bytes, dict[str, str]]] = []
        size = 0
        for attrs, body in items:
            if batch and (len(batch) >= MAX_BATCH_MESSAGES or size + len(body) > MAX_BATCH_BYTES):
                pub.publish_batch(topic, batch)
                batch, size = [], 0
            batch.append((body, attrs))
            size += len(body) + 100
        if batch:
            pub.publish_batch(topic, batch)
    finally:
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
