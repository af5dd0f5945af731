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
   filled.

The server-level checks drive the real ``alpaca-py`` ``TradingClient``; the broker-level ones
run on both APIs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import backtrader as bt
import pytest
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderClass, OrderSide, TimeInForce
from alpaca.trading.requests import (
    LimitOrderRequest,
    MarketOrderRequest,
    ReplaceOrderRequest,
    StopLossRequest,
    TakeProfitRequest,
)

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
