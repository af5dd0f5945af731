"""Alpaca's order rules, on the local server (as strict as Alpaca: sources cited in
``tests/alpaca_server.py``) and through the broker (issue 13, the fresh-context review):

1. one order cannot take a position through zero: the broker sends a closing order, then an
   opening order, as one backtrader order;
2. wash-trade protection: an order that could fill against an opposite working order is
   refused, and the agent sees Rejected with Alpaca's message;
3. short sales need a shortable asset and buying power; fractional quantities are never sold
   short and go only in day simple orders;
4. bracket rules: day/gtc, exits on the right side of the base price, entries only;
5. sub-penny prices are refused (the broker rounds); qty and notional are exclusive;
6. ``PATCH`` is refused before Alpaca routed the order, when nothing changes, and below what
   filled;
7. the findings of the independent attacker (issue 13, at the end of this file): closes sized
   when sent, exits sharing one allocation, the wash-trade table, crypto trades, sizes and
   dust, snapshot consistency, rounding direction, execution prices, listing filters.

The server-level checks drive the real ``alpaca-py`` ``TradingClient``; the broker-level ones
run on both APIs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import backtrader as bt
import pytest
import requests
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderClass, OrderSide, OrderType, TimeInForce
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.requests import (
    LimitOrderRequest,
    MarketOrderRequest,
    ReplaceOrderRequest,
    StopLimitOrderRequest,
    StopLossRequest,
    StopOrderRequest,
    TakeProfitRequest,
    TrailingStopOrderRequest,
)

from runtime.brokers.risk import RiskConfig
from tests.alpaca_harness import (
    Run,
    api,
    bar,
    bracket,
    bt_positions,
    buy,
    drive,
    fast_config,
    make_server,
    order_of,
    run_on,
    sell,
    server_order,
    statuses,
    wait_until,
)
from tests.alpaca_server import AlpacaServer

__all__ = ["api"]
# fixture: the broker-level tests run on both Alpaca APIs


@pytest.fixture
def server() -> Iterator[AlpacaServer]:
    with make_server(prices={"AAPL": 100.0, "HTB": 50.0, "PENNY": 0.6}) as s:
        yield s


@pytest.fixture
def client(server: AlpacaServer) -> TradingClient:
    return TradingClient(server.api_key, server.secret_key, paper=True, url_override=server.url)


def refused(call: Callable[[], Any], status: int, message: str) -> None:
    with pytest.raises(APIError) as info:
        call()
    assert info.value.status_code == status
    assert message in info.value.message, info.value.message


def market(side: OrderSide, qty: float, symbol: str = "AAPL", **kw: Any) -> MarketOrderRequest:
    return MarketOrderRequest(
        symbol=symbol, qty=qty, side=side, time_in_force=kw.pop("tif", TimeInForce.DAY), **kw
    )


def limit(side: OrderSide, qty: float, price: float, **kw: Any) -> LimitOrderRequest:
    return LimitOrderRequest(
        symbol=kw.pop("symbol", "AAPL"),
        qty=qty,
        side=side,
        limit_price=price,
        time_in_force=kw.pop("tif", TimeInForce.DAY),
        **kw,
    )


# -- the server is as strict as Alpaca (real alpaca-py client) ---------------------------------


def test_server_refuses_one_order_through_zero(server: AlpacaServer, client: Any) -> None:
    server.add_position("AAPL", 10, 100.0)
    refused(
        lambda: client.submit_order(market(OrderSide.SELL, 20)),
        403,
        "insufficient qty available for order (requested: 20, available: 10)",
    )
    client.submit_order(market(OrderSide.SELL, 10))  # a close is fine
    server.add_position("HTB", -3, 50.0)
    refused(lambda: client.submit_order(market(OrderSide.BUY, 5, "HTB")), 403, "insufficient qty")


def test_server_refuses_potential_wash_trades(server: AlpacaServer, client: Any) -> None:
    client.submit_order(limit(OrderSide.BUY, 1, 90.0))  # rests (price 100)
    wash = "potential wash trade detected. use complex orders"
    refused(lambda: client.submit_order(market(OrderSide.SELL, 1)), 403, wash)
    refused(lambda: client.submit_order(limit(OrderSide.SELL, 1, 89.0)), 403, wash)
    client.submit_order(limit(OrderSide.SELL, 1, 95.0))  # cannot meet the buy at 90
    refused(lambda: client.submit_order(limit(OrderSide.BUY, 1, 96.0)), 403, wash)


def test_server_wash_table_counts_stops_and_exempts_complex_and_trailing(
    server: AlpacaServer, client: Any
) -> None:
    """Finding 3, the table of docs "User Protection": a working stop sell makes a market buy
    "always rejected"; stop-limits compare limit prices; trailing stops and complex orders
    are the exceptions."""
    wash = "potential wash trade detected. use complex orders"
    server.add_position("AAPL", 10, 100.0)
    stop = client.submit_order(
        StopOrderRequest(
            symbol="AAPL", qty=10, side=OrderSide.SELL, stop_price=90.0, time_in_force="day"
        )
    )
    refused(lambda: client.submit_order(market(OrderSide.BUY, 5)), 403, wash)
    refused(lambda: client.submit_order(limit(OrderSide.BUY, 5, 80.0)), 403, wash)
    client.cancel_order_by_id(stop.id)
    server.settle_cancels()
    client.submit_order(
        StopLimitOrderRequest(
            symbol="AAPL",
            qty=10,
            side=OrderSide.SELL,
            stop_price=90.0,
            limit_price=89.0,
            time_in_force="day",
        )
    )
    client.submit_order(limit(OrderSide.BUY, 1, 88.0))  # 88 < 89: cannot meet
    refused(lambda: client.submit_order(limit(OrderSide.BUY, 1, 89.5)), 403, wash)
    # the exceptions: a trailing stop, and a bracket, against the working opposite orders
    client.submit_order(
        TrailingStopOrderRequest(
            symbol="AAPL", qty=1, side=OrderSide.BUY, trail_percent=5.0, time_in_force="day"
        )
    )
    client.submit_order(
        market(
            OrderSide.BUY,
            1,
            order_class=OrderClass.BRACKET,
            take_profit=TakeProfitRequest(limit_price=120.0),
            stop_loss=StopLossRequest(stop_price=95.0),
        )
    )


def test_server_short_sale_rules(server: AlpacaServer, client: Any) -> None:
    refused(
        lambda: client.submit_order(market(OrderSide.SELL, 5, "HTB")), 403, "cannot be sold short"
    )
    refused(
        lambda: client.submit_order(market(OrderSide.SELL, 0.5)),
        403,
        "fractional orders are not allowed to short",
    )
    # 1,000 shares at 100 * 1.03 = 103,000 > 100,000 of buying power
    refused(
        lambda: client.submit_order(market(OrderSide.SELL, 1000)), 403, "insufficient buying power"
    )
    client.submit_order(market(OrderSide.SELL, 900))  # 92,700: fits, and now holds it
    refused(
        lambda: client.submit_order(limit(OrderSide.SELL, 100, 120.0)),
        403,
        "insufficient buying power",
    )


def test_server_fractional_rules(server: AlpacaServer, client: Any) -> None:
    refused(
        lambda: client.submit_order(market(OrderSide.BUY, 0.5, tif=TimeInForce.GTC)),
        422,
        "fractional orders must be DAY orders",
    )
    client.submit_order(limit(OrderSide.BUY, 0.5, 99.0))  # a day limit is fine
    both = {"symbol": "AAPL", "qty": "1", "notional": "100", "side": "buy"}
    refused(
        lambda: client.post("/orders", {**both, "type": "market", "time_in_force": "day"}),
        422,
        "mutually exclusive",
    )


def test_server_bracket_rules(server: AlpacaServer, client: Any) -> None:
    def br(tp: float, sl: float, side: OrderSide = OrderSide.BUY, **kw: Any) -> Any:
        return limit(
            side,
            5,
            99.0,
            order_class=OrderClass.BRACKET,
            take_profit=TakeProfitRequest(limit_price=tp),
            stop_loss=StopLossRequest(stop_price=sl),
            **kw,
        )

    refused(lambda: client.submit_order(br(110.0, 95.0, tif=TimeInForce.IOC)), 422, "day or gtc")
    refused(
        lambda: client.submit_order(br(98.0, 95.0)),
        422,
        "take_profit.limit_price must be >= base_price + 0.01",
    )
    refused(
        lambda: client.submit_order(br(110.0, 99.0)),
        422,
        "stop_loss.stop_price must be <= base_price - 0.01",
    )
    refused(
        lambda: client.submit_order(br(110.0, 95.0, OrderSide.SELL)),
        422,
        "take_profit.limit_price must be <= base_price - 0.01",
    )
    client.submit_order(br(110.0, 95.0, tif=TimeInForce.GTC))
    server.add_position("HTB", 10, 50.0)
    refused(
        lambda: client.submit_order(
            limit(
                OrderSide.SELL,
                5,
                55.0,
                symbol="HTB",
                order_class=OrderClass.BRACKET,
                take_profit=TakeProfitRequest(limit_price=50.0),
                stop_loss=StopLossRequest(stop_price=60.0),
            )
        ),
        422,
        "bracket orders must be entry orders",
    )


def test_server_refuses_sub_penny_prices(server: AlpacaServer, client: Any) -> None:
    refused(
        lambda: client.submit_order(limit(OrderSide.BUY, 1, 11.055)),
        422,
        "invalid limit_price 11.055. sub-penny increment does not fulfill minimum pricing",
    )
    client.submit_order(limit(OrderSide.BUY, 1, 0.6013, symbol="PENNY"))
    refused(
        lambda: client.submit_order(limit(OrderSide.BUY, 1, 0.60125, symbol="PENNY")),
        422,
        "sub-penny",
    )


def test_server_replace_rules(server: AlpacaServer, client: Any) -> None:
    server.set_clock(is_open=False)
    queued = client.submit_order(limit(OrderSide.BUY, 2, 90.0))
    assert queued.status.value == "accepted"
    refused(
        lambda: client.replace_order_by_id(queued.id, ReplaceOrderRequest(limit_price=91.0)),
        422,
        "isn't sent to exchange yet",
    )
    server.set_clock(is_open=True)
    working = client.submit_order(limit(OrderSide.BUY, 4, 91.0))
    refused(
        lambda: client.replace_order_by_id(working.id, ReplaceOrderRequest(limit_price=91.0)),
        403,
        "order parameters are not changed",
    )
    server.fill(str(working.id), 2)
    refused(
        lambda: client.replace_order_by_id(working.id, ReplaceOrderRequest(qty=2)),
        422,
        "qty must be > filled_qty",
    )
    new = client.replace_order_by_id(working.id, ReplaceOrderRequest(limit_price=92.0))
    assert new.replaces == working.id and float(new.limit_price) == 92.0


# -- the broker follows the rules -------------------------------------------------------------


def rejected_reason(run: Run, name: str) -> str:
    ref = order_of(run, name).ref
    notes = [n for n in run.log.notes if n.ref == ref and n.status == "Rejected"]
    assert notes, statuses(run, ref)
    return str(notes[0].reason)


def ended(run: Run, name: str, status: str) -> bool:
    o = run.log.orders.get(name)
    return o is not None and status in run.log.statuses(o.ref)


@pytest.mark.parametrize(
    ("start", "size", "after"),
    [(10, -20, -10), (-3, 5, 2)],
    ids=["long_to_short", "short_to_long"],
)
def test_reversal_is_one_backtrader_order_and_two_alpaca_orders(
    api: str, start: int, size: int, after: int
) -> None:
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        server.add_position("AAPL", start, 100.0)
        action = sell("flip", size=-size) if size < 0 else buy("flip", size=size)
        run = run_on(api, server, ("AAPL",), {1: action})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "flip", "Completed"), what="flip filled"),
            ],
        )
        flip = order_of(run, "flip")
        assert statuses(run, flip.ref) == ["Submitted", "Accepted", "Partial", "Completed"]
        assert flip.executed.size == pytest.approx(size)
        coid = f"{run.broker.session_id}-{flip.ref}"
        submits = [r for r in server.requests if r.kind == "submit"]
        assert [(r.body["client_order_id"], r.status) for r in submits] == [
            (coid, 200),
            (f"{coid}-open", 200),
        ]
        assert [float(r.body["qty"]) for r in submits] == [abs(start), abs(after)]
        assert bt_positions(run) == server.position_qty() == {"AAPL": after}
        assert run.broker.getcash() == pytest.approx(float(server.cash))


def test_limit_reversal_opens_after_the_close_fills(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        server.add_position("AAPL", 10, 100.0)
        run = run_on(
            api, server, ("AAPL",), {1: sell("flip", size=20, exectype=bt.Order.Limit, price=101.0)}
        )

        def play() -> None:
            coid = server_order(server, run, "flip")["client_order_id"]
            server.set_price("AAPL", 101.0)  # the closing limit fills
            wait_until(lambda: ended(run, "flip", "Partial"), what="close filled")
            wait_until(lambda: server.order_by_coid(f"{coid}-open") is not None, what="opening")
            assert not ended(run, "flip", "Completed")
            server.set_price("AAPL", 101.5)  # the opening limit fills
            wait_until(lambda: ended(run, "flip", "Completed"), what="open filled")

        drive(run, [bar(run, "AAPL", 100.0), play])
        flip = order_of(run, "flip")
        assert flip.executed.size == pytest.approx(-20)
        assert bt_positions(run) == server.position_qty() == {"AAPL": -10}


def test_wash_trade_is_rejected_with_alpacas_reason(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("rest", size=1, exectype=bt.Order.Limit, price=90.0), 2: sell("wash", size=1)},
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "rest", "Accepted"), what="resting"),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "wash", "Rejected"), what="refused"),
            ],
        )
        assert "potential wash trade detected" in rejected_reason(run, "wash")
        assert [o["side"] for o in server.open_orders()] == ["buy"]


@pytest.mark.parametrize(
    ("symbol", "action", "message", "sent"),
    [
        ("AAPL", sell("x", size=0.5), "does not sell fractional quantities short", 0),
        ("HTB", sell("x", size=5), "cannot be sold short", 1),
        ("AAPL", sell("x", size=2000), "insufficient buying power", 1),
        ("AAPL", buy("x", size=0.5, valid=None, time_in_force="gtc"), "time in force day", 0),
        (
            "AAPL",
            bracket(size=5, price=99.0, limitprice=98.0, stopprice=95.0),
            "take_profit.limit_price must be >= base_price + 0.01",
            1,
        ),
    ],
    ids=["fractional_short", "not_shortable", "short_buying_power", "fractional_gtc", "bracket"],
)
def test_orders_alpaca_refuses_are_rejected_with_the_reason(
    api: str, symbol: str, action: Any, message: str, sent: int
) -> None:
    with make_server(prices={symbol: 100.0}) as server:
        run = run_on(api, server, (symbol,), {1: action})
        drive(
            run,
            [
                bar(run, symbol, 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Rejected"), what="rejected"
                ),
            ],
        )
        reasons = [n.reason for n in run.log.notes if n.status == "Rejected"]
        assert reasons and message in str(reasons[0])
        assert server.count_kind("submit") == sent  # 0: refused before sending


def test_sell_bracket_on_a_long_position_is_rejected_as_not_an_entry(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        server.add_position("AAPL", 10, 100.0)
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket("sell_bracket", size=5, price=101.0, limitprice=95.0, stopprice=105.0)},
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "parent", "Rejected"), what="rejected"),
            ],
        )
        assert "bracket orders must be entry orders" in rejected_reason(run, "parent")
        assert all(ended(run, k, "Rejected") for k in ("stop", "take"))


def test_prices_are_sent_without_sub_pennies(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api, server, ("AAPL",), {1: buy("b", size=1, exectype=bt.Order.Limit, price=99.123)}
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "b", "Accepted"), what="accepted"),
            ],
        )
        assert server_order(server, run, "b")["limit_price"] == "99.12"


def test_opposite_order_waits_for_a_working_market_order(api: str) -> None:
    """A sell sent while the agent's market buy still works would be a potential wash trade:
    it waits until the buy filled, then goes (no 403)."""
    with make_server(prices={"AAPL": 100.0}) as server:  # market orders fill on tick()

        def both(s: Any) -> None:
            buy("a", size=5)(s)
            sell("b", size=2)(s)

        run = run_on(api, server, ("AAPL",), {1: both})

        def play() -> None:
            server_order(server, run, "a")
            polls = server.count_kind("list")
            wait_until(lambda: server.count_kind("list") >= polls + 3, what="three polls")
            assert server.count_kind("submit") == 1  # b waits while a works
            server.tick()  # a fills; b goes
            server_order(server, run, "b")
            server.tick()
            wait_until(lambda: ended(run, "b", "Completed"), what="b filled")

        drive(run, [bar(run, "AAPL", 100.0), play])
        assert not any(r.status == 403 for r in server.requests)
        assert bt_positions(run) == server.position_qty() == {"AAPL": 3}


def test_reversal_whose_close_fills_at_stop_ends_canceled_with_what_filled(api: str) -> None:
    """The run stops right after the closing order filled: the opening order is not sent, the
    agent's order ends Canceled with the closed part executed, and positions agree."""
    with make_server(prices={"AAPL": 100.0}) as server:
        server.add_position("AAPL", 10, 100.0)
        run = run_on(
            api, server, ("AAPL",), {1: sell("flip", size=20, exectype=bt.Order.Limit, price=101.0)}
        )

        def fill_close_and_stop() -> None:
            server_order(server, run, "flip")
            server.set_price("AAPL", 101.0)  # the close fills; the feeds end at once

        drive(run, [bar(run, "AAPL", 100.0), fill_close_and_stop])
        flip = order_of(run, "flip")
        assert statuses(run, flip.ref)[-1] == "Canceled"
        assert "not sent" in str(flip.info["reason"])
        assert flip.executed.size == pytest.approx(-10)
        assert bt_positions(run) == server.position_qty() == {}
        assert server.open_orders() == []


@pytest.mark.parametrize("how", ["cancel", "valid"])
def test_reversal_cancelled_while_its_close_fills_does_not_open(api: str, how: str) -> None:
    """The agent cancels a reversal (or its ``valid=`` runs out) and the closing order fills
    at Alpaca before the cancel gets there: Alpaca answers the cancel 422, the order being
    filled ("Orders at Alpaca", cancel an order). backtrader's cancel of a partly executed
    order keeps what executed and ends the rest: the order ends Canceled (Expired) with the
    close executed, and no opening order is sent (fresh-context attack: a short was opened
    after the agent's cancel)."""
    with make_server(prices={"AAPL": 100.0}) as server:
        server.add_position("AAPL", 10, 100.0)

        def place(s: Any) -> None:
            kw: dict[str, Any] = {}
            if how == "valid":  # expires once a bar is stamped after it
                kw["valid"] = s.datas[0].datetime.datetime(0) + timedelta(seconds=30)
            s.p.log.orders["flip"] = s.sell(size=20, exectype=bt.Order.Limit, price=101.0, **kw)

        def cancel(s: Any) -> None:
            s.cancel(s.p.log.orders["flip"])

        # polling only, and slowly: the fill is learnt after the cancel was asked for
        config = fast_config(server, api, use_stream=False, poll_interval_s=2.0)
        actions = {1: place, 2: cancel} if how == "cancel" else {1: place}
        run = run_on(api, server, ("AAPL",), actions, config=config)

        def fill_close() -> None:
            order = server_order(server, run, "flip")
            server.fill(order["id"], None, 101.0)  # the closing sell of 10, at the venue

        end = "Canceled" if how == "cancel" else "Expired"
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                fill_close,
                bar(run, "AAPL", 101.0),
                lambda: wait_until(lambda: ended(run, "flip", end), what=end, timeout_s=10),
                bar(run, "AAPL", 101.0),
            ],
        )
        flip = order_of(run, "flip")
        assert statuses(run, flip.ref)[-1] == end
        assert "was not sent" in str(flip.info["reason"])
        assert flip.executed.size == pytest.approx(-10)
        assert not any(
            r.kind == "submit" and str(r.body.get("client_order_id", "")).endswith("-open")
            for r in server.requests
        )
        assert bt_positions(run) == server.position_qty() == {}
        assert run.broker.getcash() == pytest.approx(float(server.cash))


def test_wash_refusal_while_our_market_order_works_is_retried(api: str) -> None:
    """The opposite market order still works when the settle wait runs out (a slow venue):
    Alpaca refuses the new order as a potential wash trade; the broker retries it, and it goes
    once the market order filled."""
    with make_server(prices={"AAPL": 100.0}) as server:  # market orders fill on tick()

        def both(s: Any) -> None:
            buy("a", size=5)(s)
            sell("b", size=2)(s)

        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: both},
            config=fast_config(server, api, backoff_base_s=0.2, backoff_max_s=0.4),
        )

        def play() -> None:
            wait_until(
                lambda: any(r.kind == "submit" and r.status == 403 for r in server.requests),
                what="b refused as a potential wash trade",
            )
            server.tick()  # a fills; b's retry goes
            server_order(server, run, "b")
            server.tick()
            wait_until(lambda: ended(run, "b", "Completed"), what="b filled")

        drive(run, [bar(run, "AAPL", 100.0), play])
        assert statuses(run, order_of(run, "b").ref) == ["Submitted", "Accepted", "Completed"]
        assert bt_positions(run) == server.position_qty() == {"AAPL": 3}


# -- issue 13, the attacker's findings -----------------------------------------------------------


def _flat_reason(run: Run, name: str) -> str:
    ref = order_of(run, name).ref
    notes = [n for n in run.log.notes if n.ref == ref and n.status == "Canceled"]
    assert notes, statuses(run, ref)
    return str(notes[-1].reason)


def test_flatten_after_an_unseen_stop_fill_sends_nothing(api: str) -> None:
    """Finding 1: the stop leg fills at Alpaca just before the bar on which the kill switch
    trips; the flatten close is sized against Alpaca's position when sent, so it opens no
    short (it ends Canceled with the reason)."""
    risk = RiskConfig(max_daily_loss_usd=100.0, kill_action="flatten")
    with make_server(
        prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=0.02
    ) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket(size=50, exectype=bt.Order.Market, stopprice=96.0, limitprice=120.0)},
            risk=risk,
            config=fast_config(server, api, use_stream=False, poll_interval_s=0.5),
        )

        def crash_then_bar() -> None:
            server.set_price("AAPL", 95.0)  # the stop fills at Alpaca now
            bar(run, "AAPL", 97.0)()  # the bar reaches the agent before a poll saw it

        def flattened() -> bool:
            return any(
                n.status == "Canceled" and "only reduces" in str(n.reason) for n in run.log.notes
            )

        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "parent", "Completed"), what="entry"),
                crash_then_bar,
                lambda: wait_until(flattened, what="flatten close canceled"),
                bar(run, "AAPL", 95.0),
            ],
        )
        sells = [r for r in server.requests if r.kind == "submit" and r.body["side"] == "sell"]
        assert sells == []  # the bracket's legs came with the entry; no close was sent
        assert server.position_qty() == {}
        assert bt_positions(run) == {}


def test_flatten_while_the_stop_fills_during_pending_cancels_opens_no_short(api: str) -> None:
    """Finding 1: the kill switch cancels the bracket legs; while the cancels are pending the
    stop leg fills; the flatten close, held until they settle, is then not sent."""
    risk = RiskConfig(max_daily_loss_usd=100.0, kill_action="flatten")
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=0.3) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket(size=50, exectype=bt.Order.Market, stopprice=96.0, limitprice=120.0)},
            risk=risk,
        )

        def crash() -> None:
            wait_until(
                lambda: any(o.status == "pending_cancel" for o in server.orders.values()),
                what="cancels pending",
            )
            server.set_price("AAPL", 95.0)

        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "parent", "Completed"), what="entry"),
                bar(run, "AAPL", 97.0),
                crash,
                lambda: wait_until(lambda: ended(run, "stop", "Completed"), what="stop filled"),
                bar(run, "AAPL", 95.0),
                lambda: wait_until(
                    lambda: all(not o.alive() for o in run.broker.book.alive_orders()),
                    what="all ended",
                ),
                bar(run, "AAPL", 95.0),
            ],
        )
        assert server.position_qty() == {}
        assert bt_positions(run) == {}
        assert not run.broker.get_orders_open()


def test_cancel_then_close_after_the_stop_filled_opens_no_short(api: str) -> None:
    """Finding 1, the agent's ``cancel(stop); close()``: the close waits for the cancel; the
    stop fills meanwhile; the close ends Canceled with the reason instead of selling short."""
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=0.3) as server:

        def cancel_then_close(s: Any) -> None:
            s.cancel(s.p.log.orders["stop"])
            s.p.log.orders["close"] = s.close()

        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("entry", size=10),
                2: sell("stop", size=10, exectype=bt.Order.Stop, price=95.0),
                3: cancel_then_close,
            },
        )

        def crash() -> None:
            wait_until(
                lambda: any(o.status == "pending_cancel" for o in server.orders.values()),
                what="pending cancel",
            )
            server.set_price("AAPL", 94.0)

        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "stop", "Accepted"), what="stop working"),
                bar(run, "AAPL", 96.0),
                crash,
                lambda: wait_until(lambda: ended(run, "close", "Canceled"), what="close ended"),
            ],
        )
        assert "only reduces AAPL" in _flat_reason(run, "close")
        assert order_of(run, "close").executed.size == 0
        assert server.position_qty() == {}
        assert bt_positions(run) == {}


def test_close_held_behind_a_cancel_is_resized_to_the_position_left(api: str) -> None:
    """Finding 1: a partial fill of the canceled order leaves part of the position; the held
    close sells only what is left."""
    with make_server(
        prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=None
    ) as server:

        def cancel_then_close(s: Any) -> None:
            s.cancel(s.p.log.orders["tp"])
            s.p.log.orders["close"] = s.close()

        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("entry", size=10),
                2: sell("tp", size=10, exectype=bt.Order.Limit, price=110.0),
                3: cancel_then_close,
            },
        )

        def partial_then_settle() -> None:
            so = server_order(server, run, "tp")
            wait_until(
                lambda: server.orders[so["id"]].status == "pending_cancel", what="pending cancel"
            )
            server.fill(so["id"], qty=4, price=110.0)
            server.settle_cancels()

        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "tp", "Accepted"), what="tp working"),
                bar(run, "AAPL", 100.0),
                partial_then_settle,
                lambda: wait_until(lambda: ended(run, "close", "Completed"), what="close filled"),
                bar(run, "AAPL", 100.0),
            ],
        )
        closes = [r for r in server.requests if r.kind == "submit" and r.status == 200]
        assert float(closes[-1].body["qty"]) == 6
        assert order_of(run, "close").executed.size == pytest.approx(-6)
        assert server.position_qty() == {}
        assert bt_positions(run) == {}


def test_limit_prices_round_in_the_agents_favour(api: str) -> None:
    """Finding 6: a buy limit at 100.006 must not become 100.01 (above what the agent would
    pay; at a price of 100.01 it would fill); a sell limit at 100.014 must not become 100.01."""
    with make_server(prices={"AAPL": 100.01}, fill_mode="immediate") as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("a", size=10, exectype=bt.Order.Limit, price=100.006),
                2: sell("b", size=10, exectype=bt.Order.Limit, price=100.014),
            },
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.01),
                lambda: wait_until(lambda: ended(run, "a", "Accepted"), what="a working"),
                bar(run, "AAPL", 100.01),
                lambda: wait_until(lambda: ended(run, "b", "Accepted"), what="b working"),
            ],
        )
        assert float(server_order(server, run, "a")["limit_price"]) == 100.0
        assert float(server_order(server, run, "b")["limit_price"]) == 100.02
        assert order_of(run, "a").executed.size == 0  # 100.01 is above the agent's limit


def test_crypto_target_orders_are_fractional(api: str) -> None:
    """Finding 7: ``order_target_percent``/``order_target_value`` on crypto place fractional
    orders (backtrader's default commission info rounds 0.04 BTC down to 0)."""

    def target_percent(s: Any) -> None:
        s.p.log.orders["pct"] = s.order_target_percent(target=0.01)

    def target_value(s: Any) -> None:
        s.p.log.orders["val"] = s.order_target_value(target=3000.0)

    with make_server(prices={"BTC/USD": 50000.0}, fill_mode="immediate") as server:
        run = run_on(api, server, ("BTC/USD",), {1: target_percent, 2: target_value})
        drive(
            run,
            [
                bar(run, "BTC/USD", 50000.0),
                lambda: wait_until(lambda: ended(run, "pct", "Completed"), what="pct filled"),
                bar(run, "BTC/USD", 50000.0),
                lambda: wait_until(lambda: ended(run, "val", "Completed"), what="val filled"),
            ],
        )
        # 1% of 100,000 USD is 0.02 BTC; the position gains it less the 25 bps fee in BTC
        assert order_of(run, "pct").created.size == pytest.approx(0.02)
        assert order_of(run, "pct").executed.size == pytest.approx(0.02 * (1 - 0.0025))
        assert float(run.broker.getposition(run.feeds["BTC/USD"]).size) * 50000.0 == (
            pytest.approx(3000.0, rel=0.01)
        )


def test_crypto_round_trip_closes_the_trade(api: str) -> None:
    """Finding 4: the buy's executed size is net of the fee Alpaca takes in the coin, so
    ``close()`` ends backtrader's trade (``isclosed``) and its commission holds both fees."""

    def close(s: Any) -> None:
        s.p.log.orders["c"] = s.close()

    with make_server(prices={"BTC/USD": 50000.0}, fill_mode="immediate") as server:
        run = run_on(api, server, ("BTC/USD",), {1: buy("a", size=0.03), 3: close})
        drive(
            run,
            [
                bar(run, "BTC/USD", 50000.0),
                lambda: wait_until(lambda: ended(run, "a", "Completed"), what="bought"),
                lambda: server.set_price("BTC/USD", 51000.0),
                bar(run, "BTC/USD", 51000.0),
                bar(run, "BTC/USD", 51000.0),
                lambda: wait_until(lambda: ended(run, "c", "Completed"), what="closed"),
                bar(run, "BTC/USD", 51000.0),
            ],
        )
        bought = order_of(run, "a")
        assert bought.executed.size == pytest.approx(0.03 * (1 - 0.0025))  # 25 bps in BTC
        assert bought.executed.comm == pytest.approx(0.03 * 0.0025 * 50000.0)
        trades = run.strategy._trades[run.feeds["BTC/USD"]][0]
        assert len(trades) == 1 and trades[0].isclosed
        cash_change = run.broker.getcash() - 100_000.0
        assert trades[0].pnlcomm == pytest.approx(cash_change)
        assert float(server.cash) == pytest.approx(run.broker.getcash())
        assert bt_positions(run) == server.position_qty() == {}


def test_standalone_stop_then_scale_in_is_rejected_with_alpacas_reason(api: str) -> None:
    """Finding 3: a market buy while the agent's own stop-loss sell works is refused by Alpaca
    (wash-trade table: "stop sell | market buy"); the agent sees Rejected with the reason,
    the stop keeps working."""
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("a", size=10),
                2: sell("sl", size=10, exectype=bt.Order.Stop, price=90.0),
                3: buy("b", size=5),
            },
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "sl", "Accepted"), what="stop working"),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "b", "Rejected"), what="refused"),
            ],
        )
        assert "potential wash trade detected" in rejected_reason(run, "b")
        assert order_of(run, "sl").alive()
        assert bt_positions(run) == server.position_qty() == {"AAPL": 10}


def test_oco_breakout_straddle_second_stop_is_rejected_and_its_partner_canceled(
    api: str,
) -> None:
    """Finding 3: a buy stop and a sell stop joined by ``oco=`` are two Alpaca orders (Alpaca's
    OCO is a limit plus a stop exit); the second is refused as a potential wash trade: the
    agent sees it Rejected with Alpaca's reason and, as backtrader's oco rule says, its
    partner Canceled."""

    def straddle(s: Any) -> None:
        up = s.buy(exectype=bt.Order.Stop, price=105.0, size=10)
        down = s.sell(exectype=bt.Order.Stop, price=95.0, size=10, oco=up)
        s.p.log.orders.update(up=up, down=down)

    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        run = run_on(api, server, ("AAPL",), {1: straddle})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "up", "Canceled"), what="partner canceled"),
            ],
        )
        assert "potential wash trade detected" in rejected_reason(run, "down")
        assert server.open_orders() == []


@pytest.mark.parametrize("variant", ["replace_stop", "replace_take_profit"])
def test_server_stop_leg_after_a_partial_take_profit_sells_only_whats_left(variant: str) -> None:
    """Finding 2: the exits of a bracket share one allocation; after the take profit filled 3
    of 5, the triggered stop leg sells 2 and the account ends flat (never short)."""
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate", stop_trigger=variant) as s:
        client = TradingClient(s.api_key, s.secret_key, paper=True, url_override=s.url)
        entry = client.submit_order(
            market(
                OrderSide.BUY,
                5,
                tif=TimeInForce.GTC,
                order_class=OrderClass.BRACKET,
                take_profit=TakeProfitRequest(limit_price=110.0),
                stop_loss=StopLossRequest(stop_price=95.0),
            )
        )
        assert isinstance(entry, AlpacaOrder)
        take = next(leg for leg in entry.legs or () if leg.type == OrderType.LIMIT)
        s.fill(str(take.id), qty=3, price=110.0)
        assert s.position_qty() == {"AAPL": 2}
        s.set_price("AAPL", 94.0)
        assert s.position_qty() == {}
        stops = [o for o in s.orders.values() if o.type == "stop" and o.status == "filled"]
        assert [o.filled_qty for o in stops] == [2]


def test_bracket_stop_after_a_partial_take_profit_closes_exactly(api: str) -> None:
    """Finding 2 through the broker: take profit Partial (3), then Canceled; the stop
    Completed with 2; flat on both sides."""
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket(size=5, exectype=bt.Order.Market, stopprice=95.0, limitprice=110.0)},
        )

        def play() -> None:
            wait_until(lambda: ended(run, "parent", "Completed"), what="entry")
            so = server_order(server, run, "parent")
            take = next(leg for leg in so["legs"] if leg["type"] == "limit")
            server.fill(take["id"], qty=3, price=110.0)
            wait_until(lambda: ended(run, "take", "Partial"), what="tp partial")
            server.set_price("AAPL", 94.0)
            wait_until(lambda: ended(run, "stop", "Completed"), what="stop filled")

        drive(run, [bar(run, "AAPL", 100.0), play, bar(run, "AAPL", 94.0)])
        assert order_of(run, "stop").executed.size == pytest.approx(-2)
        assert order_of(run, "take").executed.size == pytest.approx(-3)
        assert bt_positions(run) == server.position_qty() == {}
        assert run.broker.getcash() == pytest.approx(float(server.cash))


def test_server_stop_limit_rests_as_a_limit_once_elected(server: AlpacaServer, client: Any) -> None:
    """Finding 9: a buy stop 105 limit 106; 107 elects it (above the limit: no fill); at 104
    the limit buy at 106 fills."""
    o = client.submit_order(
        StopLimitOrderRequest(
            symbol="AAPL",
            qty=1,
            side=OrderSide.BUY,
            stop_price=105.0,
            limit_price=106.0,
            time_in_force=TimeInForce.GTC,
        )
    )
    server.set_price("AAPL", 107.0)
    server.tick()
    assert client.get_order_by_id(o.id).filled_qty == "0"
    server.set_price("AAPL", 104.0)
    server.tick()
    assert client.get_order_by_id(o.id).filled_qty == "1"


@pytest.mark.parametrize(
    "query", ["status=bogus", "direction=sideways", "after=notadate", "until=x", "limit=ten"]
)
def test_server_refuses_bad_order_list_filters(server: AlpacaServer, query: str) -> None:
    """Finding 9: Alpaca answers 422 to a bad filter of ``GET /v2/orders`` (never 200 with
    the filter ignored, never 500)."""
    headers = {"APCA-API-KEY-ID": server.api_key, "APCA-API-SECRET-KEY": server.secret_key}
    r = requests.get(f"{server.url}/v2/orders?{query}", headers=headers, timeout=5)
    assert r.status_code == 422, r.text
    assert set(r.json()) == {"code", "message"}


def test_server_trailing_stops_are_day_or_gtc(server: AlpacaServer, client: Any) -> None:
    server.add_position("AAPL", 10, 100.0)
    refused(
        lambda: client.submit_order(
            TrailingStopOrderRequest(
                symbol="AAPL", qty=1, side=OrderSide.SELL, trail_percent=1.0, time_in_force="ioc"
            )
        ),
        422,
        "trailing stop orders must be DAY or GTC",
    )


def test_server_whole_share_orders_fill_in_whole_shares() -> None:
    """Finding 9: partial fills of a 10-share order are whole shares (3, 3, 4), never
    3.333333333."""
    with make_server(prices={"AAPL": 100.0}, partial_steps=3) as s:
        o = s.place(
            {"symbol": "AAPL", "qty": 10, "side": "buy", "type": "market", "time_in_force": "day"}
        )
        while s.orders[o["id"]].status != "filled":
            s.tick()
        assert [q for q, _ in s.orders[o["id"]].fills] == [3, 3, 4]


def test_partial_fill_prices_are_each_executions_own(api: str) -> None:
    """Finding 8: 4 at 95, then 3 at 94: the second Partial is priced 94 exactly (from the
    trade update), not 93.999999999 derived from Alpaca's rounded average."""
    with make_server(prices={"AAPL": 100.0}, cancel_latency_s=None) as server:
        # no timed poll during the test: the fills come from the stream (a poll that saw a
        # fill first would price it from the averages, the fallback)
        config = fast_config(server, api, stream_poll_interval_s=30.0, refresh_interval_s=30.0)
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("a", size=10, exectype=bt.Order.Limit, price=95.0)},
            config=config,
        )

        def fills() -> list[tuple[float, float]]:
            ref = order_of(run, "a").ref
            return [f for n in run.log.notes if n.ref == ref for f in n.fills]

        def play() -> None:
            wait_until(run.broker._worker.stream_connected.is_set, what="stream")
            so = server_order(server, run, "a")
            server.fill(so["id"], qty=4, price=95.0)
            wait_until(lambda: len(fills()) == 1, what="first partial")
            server.fill(so["id"], qty=3, price=94.0)
            wait_until(lambda: len(fills()) == 2, what="second partial")

        drive(run, [bar(run, "AAPL", 100.0), play, bar(run, "AAPL", 100.0)])
        assert fills() == [(4.0, 95.0), (3.0, 94.0)]
        assert run.broker.getcash() == pytest.approx(float(server.cash))


def test_outside_fill_between_account_and_positions_reads_is_never_half_recorded(
    api: str,
) -> None:
    """Finding 5: an order this run does not follow fills between ``GET /account`` and
    ``GET /positions``; no decision record pairs the new position with the old cash (every
    trade at 100 and every close at 100: each record's value stays 100,000)."""
    from analyzers.fmel import FMELAnalyzer

    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("a", size=10)},
            config=fast_config(server, api, refresh_interval_s=0.1),
            quicknotify=False,
            analyzers=((FMELAnalyzer, {"_name": "fmel"}),),
        )
        state = {"armed": False, "done": 0}
        original = server.handle

        def handle(method: str, path: str, query: Any, body: Any) -> Any:
            _, kind, _ = server.route(method, path)
            if kind == "positions" and state["armed"] and not state["done"]:
                state["done"] = 1  # the outside order fills just before positions are read
                server.place(
                    {
                        "symbol": "AAPL",
                        "qty": 5,
                        "side": "buy",
                        "type": "market",
                        "time_in_force": "day",
                    }
                )
            return original(method, path, query, body)

        server.handle = handle  # type: ignore[method-assign]

        def arm() -> None:
            wait_until(lambda: server.position_qty() == {"AAPL": 10}, what="bought")
            state["armed"] = True
            wait_until(lambda: bool(state["done"]), what="outside fill")

        steps: list[Callable[[], None]] = [bar(run, "AAPL", 100.0), arm]
        for _ in range(5):
            steps.append(bar(run, "AAPL", 100.0))
        steps.append(lambda: wait_until(lambda: bt_positions(run) == {"AAPL": 15}, what="sync"))
        steps.append(bar(run, "AAPL", 100.0))
        drive(run, steps)
        records = run.strategy.analyzers.fmel.records
        assert len(records) >= 7
        for r in records:
            held = sum(p.size for p in r.positions)
            assert r.portfolio_value == pytest.approx(100_000.0), (r.portfolio_cash, held)
            assert r.portfolio_value == pytest.approx(r.portfolio_cash + 100.0 * held)
        assert sum(p.size for p in records[-1].positions) == 15


def test_crypto_close_after_a_maker_fill_leaves_no_dust(api: str) -> None:
    """Finding 10: a resting limit buy pays the maker fee (lower than the taker fee the broker
    books as its estimate); ``close()`` sells Alpaca's whole position, so no dust below the
    minimum order size (0.0001 BTC) is left that no order could ever close."""

    def close(s: Any) -> None:
        s.p.log.orders["c"] = s.close()

    with make_server(prices={"BTC/USD": 50000.0}, fill_mode="immediate") as server:
        run = run_on(
            api,
            server,
            ("BTC/USD",),
            {1: buy("a", size=0.03, exectype=bt.Order.Limit, price=49000.0), 3: close},
            config=fast_config(server, api, refresh_interval_s=30.0),
        )

        def maker_fill() -> None:
            wait_until(lambda: ended(run, "a", "Accepted"), what="resting")
            server.set_price("BTC/USD", 48900.0)
            wait_until(lambda: ended(run, "a", "Completed"), what="bought")

        drive(
            run,
            [
                bar(run, "BTC/USD", 50000.0),
                maker_fill,
                bar(run, "BTC/USD", 48900.0),
                bar(run, "BTC/USD", 48900.0),
                lambda: wait_until(lambda: ended(run, "c", "Completed"), what="closed"),
            ],
        )
        assert server.position_qty() == {}
        sold = [r for r in server.requests if r.kind == "submit" and r.body["side"] == "sell"]
        assert float(sold[-1].body["qty"]) > 0.03 * (1 - 0.0025)  # Alpaca's, not the estimate


def test_crypto_order_below_the_minimum_is_rejected_with_the_reason(api: str) -> None:
    """Finding 10: an order below Alpaca's minimum order size is Rejected once, with Alpaca's
    reason (what the agent sees for dust it cannot close; docs/alpaca.md)."""
    with make_server(prices={"BTC/USD": 50000.0}, fill_mode="immediate") as server:
        run = run_on(api, server, ("BTC/USD",), {1: buy("tiny", size=0.00005)})
        drive(
            run,
            [
                bar(run, "BTC/USD", 50000.0),
                lambda: wait_until(lambda: ended(run, "tiny", "Rejected"), what="refused"),
            ],
        )
        assert "qty must be >= 0.0001" in rejected_reason(run, "tiny")


def test_close_after_cancelling_the_stop_passes_a_tripped_kill_switch(api: str) -> None:
    """Finding 1 (risk): with the kill switch tripped (``stop``: only orders that reduce pass),
    the agent's ``cancel(stop); close()`` is a reducing order: the stop being canceled is not
    counted as a short still to come, so the close is not refused; it is sized when sent."""
    risk = RiskConfig(max_daily_loss_usd=30.0, kill_action="stop")
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=0.1) as server:

        def cancel_then_close(s: Any) -> None:
            s.cancel(s.p.log.orders["stop"])
            s.p.log.orders["close"] = s.close()

        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("entry", size=10),
                2: sell("stop", size=10, exectype=bt.Order.Stop, price=90.0),
                3: cancel_then_close,
            },
            risk=risk,
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "stop", "Accepted"), what="stop working"),
                lambda: server.set_price("AAPL", 96.0),
                bar(run, "AAPL", 96.0),  # 40 USD lost: the kill switch trips on this bar
                lambda: wait_until(lambda: ended(run, "close", "Completed"), what="closed"),
            ],
        )
        assert run.broker.guard is not None and run.broker.guard.tripped is not None
        assert not ended(run, "close", "Rejected")
        assert server.position_qty() == {}
        assert bt_positions(run) == {}
