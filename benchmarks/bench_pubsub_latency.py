"""Pub/Sub live feed latency: publish -> agent ``next()``, next to the emulator's own publish ->
callback, measured in the same run on the same messages.

The real emulator (started like the tests start it) gets one topic with two subscriptions:

* **baseline**: a bare ``SubscriberClient`` whose callback only records the time and acks: the
  emulator + client's own publish -> callback latency;
* **ours**: :class:`feeds.pubsub.PubSubBarSubscriber` feeding live backtrader feeds; the agent
  records, per bar, publish -> our callback (decode, validate, hash, buffer) and publish ->
  ``next()``.

Both subscriptions receive every message a publisher thread sends at ``--rate`` messages per
second per symbol (ordering key = symbol, as the replay tool publishes). Times are measured from
the server's ``publish_time`` on one machine's clock. "Added by our path" = p(publish -> next)
minus the baseline's p(publish -> callback). Target: at most 5 ms at p99.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_pubsub_latency.py [--messages 500]
[--symbols 1] [--rate 50]``. Prints a markdown table (ms) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import backtrader as bt
import numpy as np

from feeds.pubsub import (
    PubSubBarSubscriber,
    PubSubFeedConfig,
    StreamSettings,
    publisher_client,
    subscriber_client,
)
from tests.fixtures_pubsub import PubSubEmulator

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


class LatencyAgent(bt.Strategy):  # type: ignore[misc]
    """Per delivered bar: (publish -> callback, publish -> next) in seconds."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._lens = [0] * len(self.datas)

    def next(self) -> None:
        now = time.time()
        for i, d in enumerate(self.datas):
            if len(d) > self._lens[i]:
                self._lens[i] = len(d)
                bar = d.last_bar
                if bar is not None and bar.publish_time_s is not None:
                    self.samples.append(
                        (bar.received_s - bar.publish_time_s, now - bar.publish_time_s)
                    )

    prenext = next


def run(messages: int, symbols: int, rate: float, align_wait_s: float = 1.0) -> dict[str, Any]:
    emu = PubSubEmulator()
    emu.start()
    try:
        project = emu.project
        topic = f"projects/{project}/topics/latency"
        pub = publisher_client(emu.host)
        pub.create_topic(request={"name": topic})
        # Baseline: a bare client on its own subscription of the same topic.
        base_client = subscriber_client(emu.host)
        base_sub = f"projects/{project}/subscriptions/baseline"
        base_client.create_subscription(
            request={"name": base_sub, "topic": topic, "enable_message_ordering": True}
        )
        baseline: list[float] = []

        def base_cb(message: Any) -> None:
            baseline.append(time.time() - message.publish_time.timestamp())
            message.ack()

        base_future = base_client.subscribe(base_sub, base_cb)
        names = [f"SYM{i:03d}" for i in range(symbols)]
        cfg = PubSubFeedConfig(
            project=project,
            topics=(topic,),
            emulator_host=emu.host,
            qcheck_s=0.5,
            discovery_s=0.0,
            subscription_prefix="bench",
            align_wait_s=align_wait_s,
        )
        sub = PubSubBarSubscriber(
            cfg, symbols=names, session_id="latency", settings=StreamSettings()
        )
        sub.start()
        sub.discover_fields()
        per_symbol = max(1, messages // symbols)

        def publish() -> None:
            time.sleep(0.5)
            for i in range(per_symbol):
                t_next = time.perf_counter() + 1.0 / rate
                ts = (T0 + timedelta(minutes=i)).isoformat()
                for s in names:
                    body = json.dumps(
                        {
                            "symbol": s,
                            "timestamp": ts,
                            "open": 100.0 + i,
                            "high": 101.0 + i,
                            "low": 99.0 + i,
                            "close": 100.5 + i,
                            "volume": 1000,
                        }
                    ).encode()
                    pub.publish(topic, body, ordering_key=s, symbol=s)
                time.sleep(max(0.0, t_next - time.perf_counter()))
            deadline = time.monotonic() + 30
            while (
                sub.handler.stats.delivered < per_symbol * symbols
                or len(baseline) < per_symbol * symbols
            ) and time.monotonic() < deadline:
                time.sleep(0.05)
            sub.request_stop(5.0)

        publisher = threading.Thread(target=publish, daemon=True)
        publisher.start()
        cerebro = bt.Cerebro(stdstats=False)
        for feed in sub.make_feeds():
            cerebro.adddata(feed, name=feed.symbol)
        cerebro.addstrategy(LatencyAgent)
        agent = cerebro.run()[0]
        publisher.join(60)
        sub.close()
        base_future.cancel()
        base_future.result(timeout=10)
        base_client.delete_subscription(request={"subscription": base_sub})
        base_client.close()
        pub.stop()
    finally:
        emu.close()
    cb = [s[0] for s in agent.samples]
    nxt = [s[1] for s in agent.samples]
    ours = [s[1] - s[0] for s in agent.samples]
    return {
        "messages": len(nxt),
        "symbols": symbols,
        "align_wait_s": align_wait_s,
        "rate_per_symbol": rate,
        "baseline_p50_ms": pct(baseline, 50),
        "baseline_p99_ms": pct(baseline, 99),
        "callback_p50_ms": pct(cb, 50),
        "callback_p99_ms": pct(cb, 99),
        "next_p50_ms": pct(nxt, 50),
        "next_p99_ms": pct(nxt, 99),
        "ours_p50_ms": pct(ours, 50),
        "ours_p99_ms": pct(ours, 99),
        "added_p50_ms": pct(nxt, 50) - pct(baseline, 50),
        "added_p99_ms": pct(nxt, 99) - pct(baseline, 99),
        "stats": {
            k: v
            for k, v in sub.stats().items()
            if k in ("delivered", "duplicates", "malformed_total")
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--messages", type=int, default=500)
    p.add_argument("--symbols", type=int, default=1)
    p.add_argument("--rate", type=float, default=50.0, help="bars per second per symbol")
    p.add_argument(
        "--align-wait",
        type=float,
        default=1.0,
        help="PUBSUB_ALIGN_WAIT_S: with several symbols a step waits for the last symbol's bar",
    )
    args = p.parse_args()
    r = run(args.messages, args.symbols, args.rate, args.align_wait)
    print(
        f"Pub/Sub latency, {r['messages']} bars, {r['symbols']} symbol(s), "
        f"{r['rate_per_symbol']:g} bars/s per symbol, PUBSUB_ALIGN_WAIT_S={r['align_wait_s']:g} "
        "(ms)\n"
    )
    print("| path | p50 | p99 |")
    print("|---|---:|---:|")
    print(
        f"| baseline: emulator publish -> bare client callback | {r['baseline_p50_ms']:.2f} | "
        f"{r['baseline_p99_ms']:.2f} |"
    )
    print(
        f"| ours: publish -> our callback (decoded, hashed, buffered) | "
        f"{r['callback_p50_ms']:.2f} | {r['callback_p99_ms']:.2f} |"
    )
    print(f"| ours: publish -> agent next() | {r['next_p50_ms']:.2f} | {r['next_p99_ms']:.2f} |")
    print(f"| ours: callback -> agent next() | {r['ours_p50_ms']:.2f} | {r['ours_p99_ms']:.2f} |")
    print(
        f"| **added by our path** (publish -> next minus baseline) | "
        f"{r['added_p50_ms']:.2f} | {r['added_p99_ms']:.2f} |"
    )
    print()
    print(json.dumps(r))


if __name__ == "__main__":
    main()
