"""Alpaca broker latency: order call -> request leaving, and server fill -> ``notify_order``.

A real Cerebro run in next-by-next mode (queue-fed live feed, ``quicknotify``) trades through
:class:`runtime.brokers.alpaca.broker.AlpacaPaperTradingBroker` against the local Alpaca server
(``tests/alpaca_server.py``, same process, so one ``time.perf_counter`` clock serves both ends):

1. **order call -> request leaving**: from the agent's ``buy()`` to the POST /v2/orders arriving
   at the server. Baseline, same run: a bare alpaca-py ``TradingClient.submit_order`` from a
   plain thread to its arrival (the HTTP client alone).
2. **server fill -> notify_order**: from the server filling a resting order to the agent's
   ``notify_order(Completed)``, (a) polling every ``--poll`` seconds, (b) the trade-updates
   websocket. Baselines, same run: (a) the poll interval itself (a poll lands on average half an
   interval after a fill), (b) a bare alpaca-py ``TradingStream`` handler receiving the same
   kind of fill.

Backtrader only looks at the broker between bars or every ``qcheck`` seconds while it waits for
one (here the feed's qcheck, ``--qcheck``; live Pub/Sub feeds use ``PUBSUB_QCHECK_S``), so that
bounds the notification latency too.

3. **request budget** (``--budget``): requests per minute with ``--brackets`` (50) open
   brackets whose entries filled (Alpaca lists their take-profit legs; the stop legs are held
   and listed nowhere), at the broker's *default* intervals (poll 2 s, or 10 s while the
   trade-updates stream is connected; account every 30 s), in real time for
   ``--budget-seconds`` (60), polling only and with the stream. Baseline: Alpaca's limit, 200
   requests per minute per account, which the server enforces.

Run: ``PYTHONPATH=. .venv/bin/python benchmarks/bench_broker.py [--orders 200] [--poll 0.05]``
(latencies; the server's rate limit is off for them) or ``... --budget``.
Prints a markdown table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import backtrader as bt
import numpy as np
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderSide, TimeInForce
from alpaca.trading.requests import LimitOrderRequest, MarketOrderRequest
from alpaca.trading.stream import TradingStream

from core.secret import Secret
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from tests.alpaca_harness import Run, bar, build_run, drive, fast_config, wait_until
from tests.alpaca_server import AlpacaServer


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000.0, q))


def arrival_of(server: AlpacaServer, coid: str) -> float | None:
    for r in list(server.requests):
        if (
            r.method == "POST"
            and isinstance(r.body, dict)
            and r.body.get("client_order_id") == coid
        ):
            return r.t
    return None


def bench_submit(orders: int, qcheck: float) -> list[float]:
    """Agent buy() -> POST arrival, seconds."""
    with AlpacaServer(
        fill_mode="immediate", prices={"AAPL": 100.0}, rate_limit_per_min=None
    ) as server:
        calls: dict[int, float] = {}

        def buy(s: Any) -> None:
            t = time.perf_counter()
            o = s.buy(size=1)
            calls[o.ref] = t

        script = {i: buy for i in range(1, orders + 1)}
        run = build_run(server, ("AAPL",), script, config=fast_config(server, use_stream=False))
        run.feeds["AAPL"].p.qcheck = qcheck
        steps = []
        for _ in range(orders):
            steps.append(_bar_and_wait_sent(run, server))
        drive(run, steps, timeout_s=600)
        out = []
        for ref, t in calls.items():
            arrived = arrival_of(server, f"{run.broker.session_id}-{ref}")
            assert arrived is not None
            out.append(arrived - t)
        return out


def _bar_and_wait_sent(run: Run, server: AlpacaServer) -> Callable[[], None]:
    def step() -> None:
        before = server.count("POST", "/v2/orders")
        seen = run.log.bars
        run.feeds["AAPL"].put(100.0)
        wait_until(
            lambda: run.log.bars > seen and server.count("POST", "/v2/orders") > before,
            what="order sent",
        )

    return step


def bench_submit_baseline(orders: int) -> list[float]:
    with AlpacaServer(
        fill_mode="immediate", prices={"AAPL": 100.0}, rate_limit_per_min=None
    ) as server:
        client = TradingClient(server.api_key, server.secret_key, url_override=server.url)
        out = []
        for i in range(orders):
            req = MarketOrderRequest(
                symbol="AAPL",
                qty=1,
                side=OrderSide.BUY,
                time_in_force=TimeInForce.DAY,
                client_order_id=f"b-{i}",
            )
            t = time.perf_counter()
            client.submit_order(req)
            arrived = arrival_of(server, f"b-{i}")
            assert arrived is not None
            out.append(arrived - t)
        return out


def bench_fill(orders: int, poll_s: float, qcheck: float, stream: bool) -> list[float]:
    """Server fill -> agent notify_order(Completed), seconds."""
    with AlpacaServer(prices={"AAPL": 100.0}, rate_limit_per_min=None) as server:
        over: dict[str, Any] = {"poll_interval_s": poll_s, "use_stream": False}
        if stream:
            over.update(
                use_stream=True,
                poll_interval_s=60.0,
                stream_poll_interval_s=60.0,
                refresh_interval_s=60.0,
            )
        refs: list[int] = []

        def buy(s: Any) -> None:
            refs.append(s.buy(size=1, exectype=bt.Order.Limit, price=90.0).ref)

        run = build_run(
            server,
            ("AAPL",),
            {i: buy for i in range(1, orders + 1)},
            config=fast_config(server, **over),
        )
        run.feeds["AAPL"].p.qcheck = qcheck
        fills: dict[int, float] = {}
        rng = random.Random(7)

        def one(i: int) -> Callable[[], None]:
            def step() -> None:
                seen = run.log.bars
                run.feeds["AAPL"].put(100.0)
                wait_until(lambda: run.log.bars > seen and len(refs) > i, what="bar")
                ref = refs[i]
                wait_until(
                    lambda: run.log.has(lambda n: n.ref == ref and n.status == "Accepted"),
                    what="accepted",
                )
                if stream:
                    wait_until(lambda: server.stream_clients() > 0, what="stream")
                coid = f"{run.broker.session_id}-{ref}"
                o = server.order_by_coid(coid)
                assert o is not None
                # fill at a random phase of the poll cycle (else every fill lands just after
                # a poll and waits a whole interval)
                time.sleep(rng.uniform(0.0, poll_s))
                fills[ref] = time.perf_counter()
                server.fill(o["id"], 1, 90.0)
                wait_until(
                    lambda: run.log.has(lambda n: n.ref == ref and n.status == "Completed"),
                    what="completed",
                    timeout_s=30,
                )

            return step

        drive(run, [one(i) for i in range(orders)], timeout_s=900)
        out = []
        for ref, t in fills.items():
            got = [n.t for n in run.log.notes if n.ref == ref and n.status == "Completed"]
            out.append(got[0] - t)
        return out


def bench_stream_baseline(orders: int) -> list[float]:
    """Server fill -> a bare alpaca-py TradingStream handler, seconds."""
    with AlpacaServer(prices={"AAPL": 100.0}, rate_limit_per_min=None) as server:
        client = TradingClient(server.api_key, server.secret_key, url_override=server.url)
        got: dict[str, float] = {}
        stream = TradingStream(server.api_key, server.secret_key, url_override=server.ws_url)

        async def handler(update: Any) -> None:
            if str(getattr(update.event, "value", update.event)) == "fill":
                got[str(update.order.id)] = time.perf_counter()

        stream.subscribe_trade_updates(handler)
        t = threading.Thread(target=stream.run, daemon=True)
        t.start()
        wait_until(lambda: server.stream_clients() > 0, what="stream")
        out = []
        for i in range(orders):
            o = client.submit_order(
                LimitOrderRequest(
                    symbol="AAPL",
                    qty=1,
                    side=OrderSide.BUY,
                    limit_price=90,
                    time_in_force=TimeInForce.DAY,
                    client_order_id=f"s-{i}",
                )
            )
            oid = str(o.id)  # type: ignore[union-attr]
            t0 = time.perf_counter()
            server.fill(oid, 1, 90.0)
            wait_until(functools.partial(got.__contains__, oid), what="stream fill")
            out.append(got[oid] - t0)
        loop = stream._loop
        assert loop is not None
        asyncio.run_coroutine_threadsafe(stream.stop_ws(), loop).result(timeout=5)
        asyncio.run_coroutine_threadsafe(stream.close(), loop).result(timeout=5)
        t.join(timeout=10)
        return out


def bench_budget(brackets: int, seconds: float, stream: bool) -> dict[str, Any]:
    """Requests per minute with ``brackets`` open brackets at the default intervals."""
    with AlpacaServer(prices={"AAPL": 100.0}, cash_usd=10_000_000.0) as server:
        config = AlpacaBrokerConfig(  # Alpaca's defaults but the endpoint
            api_key=Secret(server.api_key, source="bench"),
            secret_key=Secret(server.secret_key, source="bench"),
            base_url=server.url,
            use_stream=stream,
        )
        entries: list[Any] = []

        def open_brackets(s: Any) -> None:
            for i in range(brackets):
                o, _, _ = s.buy_bracket(
                    size=1, price=99.0, stopprice=80.0 - i * 0.01, limitprice=150.0 + i
                )
                entries.append(o)

        run = build_run(server, ("AAPL",), {1: open_brackets}, config=config)
        window: dict[str, Any] = {}

        def measure() -> None:
            wait_until(lambda: len(server.orders) == 3 * brackets, timeout_s=120, what="sent")
            server.set_price("AAPL", 98.0)  # every entry fills: take profits new, stops held
            wait_until(
                lambda: all(o.status == bt.Order.Completed for o in entries),
                timeout_s=120,
                what="entries filled",
            )
            t0, n0 = time.perf_counter(), len(server.requests)
            time.sleep(seconds)  # the measured window (a benchmark, not a test)
            reqs = server.requests[n0:]
            window["minutes"] = (time.perf_counter() - t0) / 60.0
            window["kinds"] = {
                k: sum(1 for r in reqs if r.kind == k) for k in sorted({r.kind for r in reqs})
            }
            window["count"] = len(reqs)
            window["429"] = sum(1 for r in reqs if r.status == 429)

        drive(run, [bar(run, "AAPL", 100.0), measure], timeout_s=seconds + 300)
        per_min = window["count"] / window["minutes"]
        return {
            "brackets": brackets,
            "stream": stream,
            "seconds": seconds,
            "requests_per_min": round(per_min, 1),
            "by_kind_per_min": {
                k: round(v / window["minutes"], 1) for k, v in window["kinds"].items()
            },
            "rate_limited_429": window["429"],
        }


def main_budget(brackets: int, seconds: float) -> None:
    results = [bench_budget(brackets, seconds, stream) for stream in (False, True)]
    print(f"\n{brackets} open brackets (entries filled), default intervals, {seconds:g} s each\n")
    print("| order events from | requests/min | by kind | 429s | / Alpaca's 200 |")
    print("|---|---:|---|---:|---:|")
    for r in results:
        kinds = ", ".join(f"{k} {v:g}" for k, v in r["by_kind_per_min"].items())
        source = "trade-updates stream + polls every 10 s" if r["stream"] else "polling (2 s)"
        ratio = r["requests_per_min"] / 200.0
        print(
            f"| {source} | {r['requests_per_min']:g} | {kinds} | {r['rate_limited_429']} | "
            f"{ratio:.2f} |"
        )
    print(json.dumps(results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orders", type=int, default=200, help="orders per measurement")
    ap.add_argument("--poll", type=float, default=0.05, help="broker poll interval, s")
    ap.add_argument("--qcheck", type=float, default=0.02, help="feed qcheck, s")
    ap.add_argument("--budget", action="store_true", help="measure the request budget instead")
    ap.add_argument("--brackets", type=int, default=50, help="open brackets (--budget)")
    ap.add_argument("--budget-seconds", type=float, default=60.0, help="window (--budget), s")
    args = ap.parse_args()
    if args.budget:
        main_budget(args.brackets, args.budget_seconds)
        return
    n = args.orders
    rows: list[tuple[str, list[float], str, float]] = []
    base_submit = bench_submit_baseline(n)
    submit = bench_submit(n, args.qcheck)
    rows.append(
        (
            "order call -> request at server",
            submit,
            "bare alpaca-py submit_order",
            statistics.median(base_submit),
        )
    )
    rows.append(("  baseline: bare alpaca-py submit_order", base_submit, "", 0.0))
    poll = bench_fill(n, args.poll, args.qcheck, stream=False)
    rows.append(
        (
            f"server fill -> notify_order, polling {args.poll:g} s",
            poll,
            f"poll interval {args.poll:g} s",
            args.poll,
        )
    )
    base_stream = bench_stream_baseline(n)
    stream = bench_fill(n, args.poll, args.qcheck, stream=True)
    rows.append(
        (
            "server fill -> notify_order, trade-updates stream",
            stream,
            "bare alpaca-py TradingStream handler",
            statistics.median(base_stream),
        )
    )
    rows.append(("  baseline: bare alpaca-py TradingStream handler", base_stream, "", 0.0))
    print(f"\n{n} orders per row, feed qcheck {args.qcheck:g} s\n")
    print("| path | p50 ms | p99 ms | p50 / baseline |")
    print("|---|---:|---:|---|")
    summary: dict[str, Any] = {"orders": n, "poll_s": args.poll, "qcheck_s": args.qcheck}
    for name, values, base_name, base in rows:
        ratio = f"{statistics.median(values) / base:.2f}x {base_name}" if base else ""
        print(f"| {name} | {pct(values, 50):.2f} | {pct(values, 99):.2f} | {ratio} |")
        summary[name.strip()] = {
            "p50_ms": round(pct(values, 50), 3),
            "p99_ms": round(pct(values, 99), 3),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
