"""Market-data ingestor: bars per second and Alpaca message -> Pub/Sub publish latency, next to a
bare alpaca-py handler measured in the same run on the same market.

Each mode gets a fresh local Alpaca server (``tests/alpaca_market_server.py``: one connection per
key, as Alpaca) over the same scripted market, and a fresh topic on the real Pub/Sub emulator:

* **bare**: an alpaca-py ``StockDataStream`` (``raw_data=True``) whose bar handler publishes the
  raw bar as JSON with ``ordering_key=symbol`` -- the least an ingestor can do;
* **ingest (none)**: :class:`feeds.ingest.Ingestor` with ``INGEST_ENRICH=none`` (bars, Alpaca's
  ``n``/``vw``, the data hash, de-duplication, state file, confirmations);
* **ingest (risk)**: the default: also the trade stream and the risk metrics per bar.

Two phases per mode: **burst** (every minute released at once: throughput, bars/s from the first
message to the last Pub/Sub confirmation) and **paced** (one minute every ``--pace-ms``: latency
without a backlog). Latency is from the handler's receipt of the Alpaca message
(``perf_counter_ns``) to the publish future's completion. The emulator's own publish cost is in
both columns; the ratio is what the ingestor adds.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_ingest.py [--symbols 20] [--minutes 100]
[--paced 100] [--pace-ms 20]``. Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from alpaca.data.live.stock import StockDataStream

from core.secret import Secret
from feeds.ingest import IngestConfig, Ingestor, IngestTuning
from feeds.pubsub.clients import publisher_client
from tests.alpaca_market_server import AlpacaMarketServer, ScriptedMarket
from tests.pubsub_emulator import PubSubEmulator


def wait_until(predicate: Callable[[], bool], timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark stalled")
        time.sleep(0.002)


class Bare:
    """The baseline: alpaca-py's stream, a handler that publishes the raw bar."""

    def __init__(self, srv: AlpacaMarketServer, publisher: Any, topic: str) -> None:
        self.publisher, self.topic = publisher, topic
        self.latencies: list[int] = []
        self.done = 0
        self._lock = threading.Lock()
        self.stream = StockDataStream(
            srv.key, srv.secret, raw_data=True, url_override=srv.stock_url
        )
        self.stream.subscribe_bars(self.on_bar, *srv.market.symbols)
        self.thread = threading.Thread(target=self.stream.run, daemon=True)

    async def on_bar(self, raw: Any) -> None:
        t0 = time.perf_counter_ns()
        body = {k: v for k, v in raw.items() if k != "t"}
        body["t"] = raw["t"].to_unix_nano()
        fut = self.publisher.publish(
            self.topic, json.dumps(body).encode(), ordering_key=raw["S"], symbol=raw["S"]
        )

        def done(f: Any) -> None:
            with self._lock:
                self.latencies.append(time.perf_counter_ns() - t0)
                self.done += 1

        fut.add_done_callback(done)

    def start(self) -> None:
        self.thread.start()

    def confirmed(self) -> int:
        return self.done

    def stop(self) -> None:
        loop = self.stream._loop
        if loop is not None and loop.is_running():

            async def halt() -> None:
                await self.stream.stop_ws()
                await self.stream.close()

            asyncio.run_coroutine_threadsafe(halt(), loop).result(timeout=10)
        self.thread.join(10)


def run_mode(
    mode: str, emu: PubSubEmulator, market: ScriptedMarket, burst: int, paced: int, pace_s: float
) -> dict[str, Any]:
    topic = f"projects/{emu.project}/topics/bench-{uuid.uuid4().hex[:8]}"
    publisher = publisher_client(emu.host)
    publisher.create_topic(request={"name": topic})
    n_sym = len(market.symbols)
    with AlpacaMarketServer(market) as srv, tempfile.TemporaryDirectory() as tmp:
        if mode == "bare":
            client: Any = Bare(srv, publisher, topic)
            confirmed: Callable[[], int] = client.confirmed
            latencies: Callable[[], list[int]] = lambda: client.latencies  # noqa: E731
        else:
            client = Ingestor(
                IngestConfig(
                    symbols=market.symbols,
                    project=emu.project,
                    topic=topic,
                    api_key=Secret(srv.key),
                    secret_key=Secret(srv.secret),
                    stream_url=srv.stock_url,
                    data_url=srv.rest_url,
                    state_path=Path(tmp) / "state.json",
                    max_backfill_s=1e10,
                    enrich=("risk",) if mode == "ingest (risk)" else (),
                ),
                publisher,
                topic,
                tuning=IngestTuning(poll_s=0.005),
            )
            confirmed = lambda: client.stats.confirmed  # noqa: E731
            latencies = lambda: list(client.publisher.stats.latencies_ns)  # noqa: E731
        client.start()
        srv.wait_subscribed()
        # warm-up minute (the ingestor's first bar per symbol asks history for its trades)
        srv.advance(1)
        wait_until(lambda: confirmed() >= n_sym)
        warm = len(latencies())
        t0 = time.perf_counter()
        srv.advance(burst)
        wait_until(lambda: confirmed() >= n_sym * (1 + burst))
        burst_s = time.perf_counter() - t0
        burst_lat = np.array(latencies()[warm:], dtype=np.float64) / 1e6
        mark = len(latencies())
        for _ in range(paced):
            srv.advance(1)
            time.sleep(pace_s)
        wait_until(lambda: confirmed() >= n_sym * (1 + burst + paced))
        paced_lat = np.array(latencies()[mark:], dtype=np.float64) / 1e6
        client.stop()
    publisher.stop()
    return {
        "mode": mode,
        "bars": n_sym * burst,
        "bars_per_s": n_sym * burst / burst_s,
        "burst_p50_ms": float(np.percentile(burst_lat, 50)),
        "burst_p99_ms": float(np.percentile(burst_lat, 99)),
        "paced_p50_ms": float(np.percentile(paced_lat, 50)),
        "paced_p99_ms": float(np.percentile(paced_lat, 99)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--symbols", type=int, default=20)
    p.add_argument("--minutes", type=int, default=100, help="burst minutes")
    p.add_argument("--paced", type=int, default=100, help="paced minutes")
    p.add_argument("--pace-ms", type=float, default=20.0)
    p.add_argument("--trades", default="2,6", help="trades per minute, min,max")
    args = p.parse_args()
    lo, hi = (int(x) for x in args.trades.split(","))
    symbols = tuple(f"S{i:03d}" for i in range(args.symbols))
    market = ScriptedMarket(symbols, 1 + args.minutes + args.paced, trades_per_minute=(lo, hi))
    emu = PubSubEmulator()
    emu.start()
    try:
        rows = [
            run_mode(m, emu, market, args.minutes, args.paced, args.pace_ms / 1000)
            for m in ("bare", "ingest (none)", "ingest (risk)")
        ]
    finally:
        emu.close()
    base = rows[0]
    print(
        f"{args.symbols} symbols, burst {args.minutes} minutes "
        f"({args.symbols * args.minutes} bars), paced {args.paced} minutes every "
        f"{args.pace_ms:g} ms, {lo}-{hi} trades a minute"
    )
    print()
    print(
        "| mode | bars/s (burst) | vs bare | burst p50 ms | burst p99 ms | paced p50 ms | "
        "paced p99 ms | paced p99 vs bare |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['bars_per_s']:,.0f} | {r['bars_per_s'] / base['bars_per_s']:.2f}x"
            f" | {r['burst_p50_ms']:.1f} | {r['burst_p99_ms']:.1f} | {r['paced_p50_ms']:.1f} |"
            f" {r['paced_p99_ms']:.1f} | {r['paced_p99_ms'] / base['paced_p99_ms']:.2f}x |"
        )
    print()
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
