"""The local Alpaca server speaks Alpaca's documented shapes (the recorded example responses
parse with alpaca-py's own models, the server renders exactly those keys, errors come back as
``APIError`` with Alpaca's code and message, faults are injected at the configured rate) and is
as strict as Alpaca where Alpaca is strict: ``pending_cancel`` before ``canceled``, held stop
legs, stop-leg replacement on trigger, the open listing's omissions, shares and buying power
held by open orders, crypto rules and fees in the coin, the rate limit, the Broker API's auth,
paths and trade events SSE (sources cited in ``tests/alpaca_server.py``)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from uuid import UUID

import pytest
from alpaca.broker.client import BrokerClient
from alpaca.broker.requests import GetEventsRequest
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import (
    OrderClass,
    OrderSide,
    OrderStatus,
    OrderType,
    QueryOrderStatus,
    TimeInForce,
)
from alpaca.trading.models import Clock, Order, Position, TradeAccount, TradeUpdate
from alpaca.trading.requests import (
    GetOrderByIdRequest,
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    StopLossRequest,
    TakeProfitRequest,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.alpaca_server import DATA_DIR, ORDER_KEYS, AlpacaServer, FaultPlan

RECORDED = DATA_DIR


def load(name: str) -> object:
    return json.loads((RECORDED / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in Path(RECORDED).glob("order_*.json")))
def test_recorded_orders_parse(name: str) -> None:
    o = Order(**load(name))  # type: ignore[arg-type]
    assert o.client_order_id and o.status in OrderStatus


def test_recorded_bracket_has_held_legs() -> None:
    o = Order(**load("order_bracket_held.json"))  # type: ignore[arg-type]
    assert o.order_class == OrderClass.BRACKET
    assert [leg.status for leg in o.legs or []] == [OrderStatus.HELD, OrderStatus.HELD]


def test_recorded_account_positions_clock_stream() -> None:
    acct = TradeAccount(**load("account.json"))  # type: ignore[arg-type]
    assert acct.cash == "97187.3"
    rows = load("positions.json")
    assert isinstance(rows, list)
    positions = [Position(**p) for p in rows]
    assert [p.symbol for p in positions] == ["AAPL", "BTCUSD"]  # crypto keyed without slash
    assert Clock(**load("clock.json")).is_open  # type: ignore[arg-type]
    msg = load("trade_update_partial_fill.json")
    update = TradeUpdate(**msg["data"])  # type: ignore[index]
    assert update.order.filled_qty == "6" and update.qty == 6.0


@pytest.mark.parametrize("name", sorted(p.name for p in Path(RECORDED).glob("error_*.json")))
def test_recorded_errors_have_alpaca_shape(name: str) -> None:
    err = load(name)
    assert isinstance(err, dict) and 400 <= err["status"] < 600
    assert set(err["body"]) == {"code", "message"}


@pytest.fixture
def server() -> Iterator[AlpacaServer]:
    with AlpacaServer(prices={"AAPL": 187.5, "BTC/USD": 91000.0}) as s:
        yield s


@pytest.fixture
def client(server: AlpacaServer) -> TradingClient:
    c = TradingClient(server.api_key, server.secret_key, paper=True, url_override=server.url)
    c._retry = 0
    return c


def test_rendered_order_keys_match_recording(server: AlpacaServer, client: TradingClient) -> None:
    o = client.submit_order(
        LimitOrderRequest(
            symbol="AAPL",
            qty=5,
            side=OrderSide.BUY,
            limit_price=185,
            time_in_force=TimeInForce.GTC,
            order_class=OrderClass.BRACKET,
            take_profit=TakeProfitRequest(limit_price=195),
            stop_loss=StopLossRequest(stop_price=180),
            client_order_id="k-1",
        )
    )
    assert isinstance(o, Order)
    raw = server.order_by_coid("k-1")
    assert raw is not None and tuple(raw) == ORDER_KEYS
    assert tuple(raw["legs"][0]) == ORDER_KEYS
    assert [leg.status for leg in o.legs or []] == [OrderStatus.HELD, OrderStatus.HELD]
    server.set_price("AAPL", 184.0)  # the entry fills: the take profit goes live
    parent = client.get_order_by_id(o.id, GetOrderByIdRequest(nested=True))
    assert isinstance(parent, Order) and parent.status == OrderStatus.FILLED
    # alpaca-py #198: the stop-loss leg stays held after the entry fills
    assert [leg.status for leg in parent.legs or []] == [OrderStatus.NEW, OrderStatus.HELD]
    nested = client.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=True))
    assert nested == []  # alpaca-trade-api-js #87: nothing of a bracket whose entry filled
    flat = client.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=False))
    assert isinstance(flat, list)
    # ... flat, only the take profit: held legs are not listed open (alpaca-trade-api-python #322)
    assert [(x.type, x.status) for x in flat] == [(OrderType.LIMIT, OrderStatus.NEW)]  # type: ignore[union-attr]
    server.set_price("AAPL", 196.0)  # take profit fills, the stop leg is canceled
    statuses = sorted(str(leg["status"]) for leg in server.order_by_coid("k-1")["legs"])  # type: ignore[index]
    assert statuses == ["canceled", "filled"]
    assert server.position_qty() == {}


def test_partial_fills_are_exact(server: AlpacaServer, client: TradingClient) -> None:
    o = client.submit_order(
        MarketOrderRequest(
            symbol="BTC/USD",
            qty=0.0125,
            side=OrderSide.BUY,
            time_in_force=TimeInForce.GTC,
            client_order_id="k-2",
        )
    )
    assert isinstance(o, Order)
    for q in ("0.005", "0.0045"):
        server.fill(str(o.id), Decimal(q), Decimal("91000.5"))
    mid = client.get_order_by_id(o.id)
    assert isinstance(mid, Order) and mid.status == OrderStatus.PARTIALLY_FILLED
    assert mid.filled_qty == "0.0095"
    server.fill(str(o.id))
    done = client.get_order_by_id(o.id)
    assert isinstance(done, Order) and done.filled_qty == "0.0125"
    # the 0.25% taker fee comes out of the coins bought (docs "Crypto Fees")
    assert server.position_qty() == {"BTCUSD": Decimal("0.01246875")}
    pos = client.get_all_positions()
    assert [(p.symbol, p.qty) for p in pos] == [("BTCUSD", "0.01246875")]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (
            {
                "symbol": "AAPL",
                "qty": 100000,
                "side": "buy",
                "type": "market",
                "time_in_force": "day",
            },
            403,
            "insufficient buying power",
        ),
        (
            {
                "symbol": "BTC/USD",
                "qty": 1,
                "side": "sell",
                "type": "market",
                "time_in_force": "gtc",
            },
            403,
            "insufficient balance for BTC",
        ),
        (
            {
                "symbol": "BTC/USD",
                "qty": 0.01,
                "side": "buy",
                "type": "market",
                "time_in_force": "day",
            },
            422,
            "invalid crypto time_in_force",
        ),
        (
            {"symbol": "NOPE", "qty": 1, "side": "buy", "type": "market", "time_in_force": "day"},
            422,
            "not found",
        ),
    ],
)
def test_errors_come_back_as_api_errors(
    client: TradingClient, body: dict[str, object], status: int, message: str
) -> None:
    with pytest.raises(APIError) as info:
        client.post("/orders", body)
    assert info.value.status_code == status and message in info.value.message


def test_duplicate_client_order_id_and_cancel_rules(client: TradingClient) -> None:
    req = MarketOrderRequest(
        symbol="AAPL",
        qty=1,
        side=OrderSide.BUY,
        time_in_force=TimeInForce.DAY,
        client_order_id="k-3",
    )
    o = client.submit_order(req)
    with pytest.raises(APIError) as info:
        client.submit_order(req)
    assert info.value.status_code == 422 and "client_order_id must be unique" in info.value.message
    client.cancel_order_by_id(o.id)  # type: ignore[union-attr]
    with pytest.raises(APIError) as info:
        client.cancel_order_by_id(o.id)  # type: ignore[union-attr]
    assert info.value.status_code == 422 and info.value.message == "order is not cancelable"


def test_wrong_keys_are_refused(server: AlpacaServer) -> None:
    c = TradingClient("nope", "nope", paper=True, url_override=server.url)
    with pytest.raises(APIError) as info:
        c.get_account()
    assert info.value.status_code == 401


def test_faults_are_injected_at_the_configured_rate() -> None:
    plan = FaultPlan(rate=0.5, kinds=("500", "429"), seed=3)
    with AlpacaServer(faults=plan) as s:
        c = TradingClient(s.api_key, s.secret_key, paper=True, url_override=s.url)
        c._retry = 0
        failures = 0
        for _ in range(200):
            try:
                c.get_clock()
            except APIError as e:
                assert e.status_code in (500, 429)
                failures += 1
    assert 70 <= failures <= 130  # binomial(200, 0.5): far outside 6 sigma otherwise


# -- where Alpaca is strict, the server is (sources in tests/alpaca_server.py) -----------------


def bracket_body(coid: str, qty: int = 5, **kw: object) -> dict[str, object]:
    body: dict[str, object] = {
        "symbol": "AAPL",
        "qty": qty,
        "side": "buy",
        "type": "limit",
        "limit_price": 185,
        "time_in_force": "gtc",
        "order_class": "bracket",
        "take_profit": {"limit_price": 195},
        "stop_loss": {"stop_price": 180},
        "client_order_id": coid,
    }
    body.update(kw)
    return body


def market(symbol: str, qty: float | str, side: str, tif: str = "day") -> dict[str, object]:
    return {"symbol": symbol, "qty": qty, "side": side, "type": "market", "time_in_force": tif}


def refused(client: TradingClient, body: dict[str, object]) -> tuple[int | None, str]:
    with pytest.raises(APIError) as info:
        client.post("/orders", body)
    return info.value.status_code, info.value.message


def test_cancel_passes_through_pending_cancel_and_can_still_fill(client: TradingClient) -> None:
    with AlpacaServer(prices={"AAPL": 100.0}, cancel_latency_s=None) as server:
        c = TradingClient(server.api_key, server.secret_key, url_override=server.url)
        c._retry = 0
        o = server.place({**market("AAPL", 10, "buy"), "type": "limit", "limit_price": 90})
        c.cancel_order_by_id(o["id"])
        assert server.orders[o["id"]].status == "pending_cancel"  # [forum-cancel]
        with pytest.raises(APIError) as info:
            c.cancel_order_by_id(o["id"])
        assert info.value.status_code == 422
        server.fill(o["id"], 4, 90)  # a pending cancel may still fill
        assert server.settle_cancels() == 1
        done = server.orders[o["id"]]
        assert (done.status, done.filled_qty) == ("canceled", Decimal(4))
        assert [e["event"] for e in server.events][-3:] == [
            "pending_cancel",
            "partial_fill",
            "canceled",
        ]


@pytest.mark.parametrize("hidden", [False, True])
def test_triggered_stop_leg_is_replaced_by_an_order_that_fills(
    server: AlpacaServer, client: TradingClient, hidden: bool
) -> None:
    server.hide_replaced_by = hidden
    server.place(bracket_body("k-9"))
    server.set_price("AAPL", 184.0)  # entry fills: take profit new, stop leg held
    root = server.order_by_coid("k-9")
    assert root is not None
    take, stop = root["legs"]
    assert (take["status"], stop["status"]) == ("new", "held")
    server.set_price("AAPL", 179.0)  # the stop triggers
    stop_now = client.get_order_by_id(stop["id"])
    assert isinstance(stop_now, Order) and stop_now.status == OrderStatus.REPLACED
    successor = next(o for o in server.orders.values() if o.replaces == stop["id"])
    assert stop_now.replaced_by == (None if hidden else UUID(successor.id))
    assert (successor.status, successor.filled_qty) == ("filled", Decimal(5))
    assert server.orders[take["id"]].status == "canceled"
    assert server.position_qty() == {}


def test_stop_trigger_may_replace_the_take_profit_instead(server: AlpacaServer) -> None:
    server.stop_trigger = "replace_take_profit"  # the variant alpaca-py #198 reports
    server.place(bracket_body("k-10"))
    server.set_price("AAPL", 184.0)
    server.set_price("AAPL", 179.0)
    root = server.order_by_coid("k-10")
    assert root is not None
    take, stop = root["legs"]
    assert (take["status"], take["replaced_by"], stop["status"]) == (
        "replaced",
        stop["id"],
        "filled",
    )


def test_held_leg_cancel_is_not_streamed_when_the_take_profit_fills(server: AlpacaServer) -> None:
    server.place(bracket_body("k-11"))
    server.set_price("AAPL", 184.0)
    root = server.order_by_coid("k-11")
    assert root is not None
    stop_id = root["legs"][1]["id"]
    server.set_price("AAPL", 196.0)  # take profit fills; Alpaca cancels the held stop leg
    assert server.orders[stop_id].status == "canceled"
    assert not [e for e in server.events if e["order"]["id"] == stop_id]  # [py-198]


def test_held_legs_are_listed_closed(server: AlpacaServer, client: TradingClient) -> None:
    server.place(bracket_body("k-12"))
    server.set_price("AAPL", 184.0)
    closed = client.get_orders(GetOrdersRequest(status=QueryOrderStatus.CLOSED, nested=False))
    assert isinstance(closed, list)
    kinds = sorted((str(o.order_class.value), o.status.value) for o in closed)  # type: ignore[union-attr]
    assert kinds == [("bracket", "filled"), ("bracket", "held")]  # [py-322]
    nested = client.get_orders(GetOrdersRequest(status=QueryOrderStatus.CLOSED, nested=True))
    assert isinstance(nested, list) and len(nested) == 1
    assert {leg.status for leg in nested[0].legs or []} == {OrderStatus.NEW, OrderStatus.HELD}  # type: ignore[union-attr]


def test_shares_held_by_open_orders_cannot_be_sold_again(client: TradingClient) -> None:
    with AlpacaServer(prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=None) as s:
        c = TradingClient(s.api_key, s.secret_key, url_override=s.url)
        c._retry = 0
        s.place(
            bracket_body(
                "k-13",
                qty=10,
                type="market",
                limit_price=None,
                take_profit={"limit_price": 120},
                stop_loss={"stop_price": 90},
            )
        )
        assert s.position_qty() == {"AAPL": Decimal(10)}
        status, message = refused(c, market("AAPL", 10, "sell"))
        assert (status, message) == (
            403,
            "insufficient qty available for order (requested: 10, available: 0)",
        )
        root = s.order_by_coid("k-13")
        assert root is not None
        c.cancel_order_by_id(root["legs"][0]["id"])  # cancels both legs: pending_cancel
        assert refused(c, market("AAPL", 10, "sell"))[0] == 403  # still held while pending
        s.settle_cancels()
        c.post("/orders", market("AAPL", 10, "sell"))
        assert s.position_qty() == {}


def test_open_buys_hold_buying_power(client: TradingClient) -> None:
    with AlpacaServer(prices={"AAPL": 100.0}, cash_usd=10_000.0) as s:
        c = TradingClient(s.api_key, s.secret_key, url_override=s.url)
        c._retry = 0
        c.post("/orders", {**market("AAPL", 60, "buy"), "type": "limit", "limit_price": 100})
        status, message = refused(
            c, {**market("AAPL", 50, "buy"), "type": "limit", "limit_price": 100}
        )
        assert (status, message) == (403, "insufficient buying power")  # 6,000 USD held


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**market("BTC/USD", 0.1, "buy", "gtc"), "type": "stop", "stop_price": 1}, "order type"),
        (market("BTC/USD", 0.1, "buy", "day"), "invalid crypto time_in_force"),
        (market("BTC/USD", 0.00005, "buy", "gtc"), "qty must be >= 0.0001"),
        (
            {**bracket_body("k-14"), "symbol": "BTC/USD", "qty": 0.1},
            "crypto orders must be simple",
        ),
        (
            {**market("AAPL", 1, "buy"), "extended_hours": True},
            "extended hours order must be DAY limit orders",
        ),
    ],
)
def test_order_rules(client: TradingClient, body: dict[str, object], message: str) -> None:
    status, got = refused(client, body)
    assert status == 422 and message in got


def test_crypto_fees_are_taken_in_the_coin_received(server: AlpacaServer) -> None:
    server.fill_mode = "immediate"
    server.place(market("BTC/USD", 1, "buy", "gtc"))  # taker: 0.25% of the coins
    assert server.position_qty() == {"BTCUSD": Decimal("0.9975")}
    cash = server.cash
    server.place(market("BTC/USD", "0.9975", "sell", "gtc"))  # the fee comes out of the USD
    assert server.position_qty() == {}
    fee = (Decimal("0.9975") * Decimal(91000) * Decimal("0.0025")).quantize(Decimal("0.01"))
    assert server.cash == cash + Decimal("0.9975") * 91000 - fee
    status, message = refused_raw(server, market("BTC/USD", 0.5, "sell", "gtc"))
    assert status == 403 and "insufficient balance for BTC" in message


def refused_raw(server: AlpacaServer, body: dict[str, object]) -> tuple[int, str]:
    from tests.alpaca_server import ApiError

    with pytest.raises(ApiError) as info:
        server.place(body)
    return info.value.status, info.value.message


def test_rate_limit_is_200_a_minute_per_account_with_reset_headers() -> None:
    with AlpacaServer(time_scale=30.0) as s:  # a 2 s "minute"
        c = TradingClient(s.api_key, s.secret_key, url_override=s.url)
        c._retry = 0
        got = []
        for _ in range(450):
            try:
                c.get_clock()
                got.append(200)
            except APIError as e:
                got.append(e.status_code)
                headers = e.response.headers
                assert headers["X-Ratelimit-Limit"] == "200"
                assert headers["X-Ratelimit-Remaining"] == "0"
                assert float(headers["X-Ratelimit-Reset"]) >= time.time() - 1
        assert 429 in got and got.count(200) >= 200  # one window (or two) filled up


# -- the Broker API ----------------------------------------------------------------------------


def test_broker_api_basic_auth_on_one_account(server: AlpacaServer) -> None:
    b = BrokerClient(server.broker_key, server.broker_secret, url_override=server.url)
    b._retry = 0
    acct = b.get_trade_account_by_id(server.account_id)
    assert str(getattr(acct, "id", "")) == server.account_id
    o = b.submit_order_for_account(
        server.account_id,
        # a Trading API request: the Broker API's request classes only add ``commission``
        MarketOrderRequest(  # type: ignore[arg-type]
            symbol="AAPL", qty=1, side=OrderSide.BUY, time_in_force=TimeInForce.DAY
        ),
    )
    assert server.requests[-1].path == f"/v1/trading/accounts/{server.account_id}/orders"
    assert b.get_order_for_account_by_id(server.account_id, o.id).id == o.id  # type: ignore[union-attr]
    assert b.get_clock().is_open  # type: ignore[union-attr]
    trading_on_broker = BrokerClient(server.api_key, server.secret_key, url_override=server.url)
    trading_on_broker._retry = 0
    with pytest.raises(APIError) as info:
        trading_on_broker.get_trade_account_by_id(server.account_id)
    assert info.value.status_code == 401  # Trading API keys are not Broker API keys
    broker_on_trading = TradingClient(
        server.broker_key, server.broker_secret, url_override=server.url
    )
    with pytest.raises(APIError) as info:
        broker_on_trading.get_account()
    assert info.value.status_code == 401
    with pytest.raises(APIError) as info:
        b.get_all_positions_for_account("00000000-0000-4000-8000-000000000000")
    assert info.value.status_code == 404


def test_broker_trade_events_sse_replays_from_since_id(server: AlpacaServer) -> None:
    server.fill_mode = "immediate"
    server.place(market("AAPL", 1, "buy"))  # two events: new, fill
    b = BrokerClient(server.broker_key, server.broker_secret, url_override=server.url)
    events = b.get_trade_events(GetEventsRequest(since_id=0))
    first = json.loads(next(events))
    second = json.loads(next(events))
    assert (first["event"], second["event"]) == ("new", "fill")
    assert (first["event_id"], second["event_id"]) == (1, 2)
    assert first["account_id"] == server.account_id
    update = TradeUpdate(**second)
    assert update.order.filled_qty == "1"
    recorded = load("trade_event_fill.json")
    assert isinstance(recorded, dict) and set(recorded) == set(second)


BODIES = st.fixed_dictionaries(
    {
        "symbol": st.sampled_from(["AAPL", "BTC/USD", "NOPE", ""]),
        "side": st.sampled_from(["buy", "sell", "hold"]),
        "type": st.sampled_from(["market", "limit", "stop", "stop_limit", "trailing_stop", "x"]),
        "time_in_force": st.sampled_from(["day", "gtc", "ioc", "fok", "opg", "cls", "week"]),
    },
    optional={
        "qty": st.one_of(
            st.integers(min_value=-5, max_value=10**6).map(str),
            st.decimals(min_value=0, max_value=100, places=6).map(str),
        ),
        "limit_price": st.decimals(min_value=1, max_value=500, places=2).map(str),
        "stop_price": st.decimals(min_value=1, max_value=500, places=2).map(str),
        "order_class": st.sampled_from(["simple", "bracket", "oco", "oto", ""]),
        "take_profit": st.fixed_dictionaries(
            {"limit_price": st.decimals(min_value=1, max_value=500, places=2).map(str)}
        ),
        "stop_loss": st.fixed_dictionaries(
            {"stop_price": st.decimals(min_value=1, max_value=500, places=2).map(str)}
        ),
        "extended_hours": st.booleans(),
    },
)


@settings(max_examples=300, deadline=None)
@given(BODIES)
def test_any_order_body_is_accepted_or_refused_as_alpaca_refuses(body: dict[str, object]) -> None:
    """Whatever the body, the server answers as Alpaca does: an order, or a 4xx with Alpaca's
    error shape; never a crash; the account stays consistent (no negative crypto balance)."""
    from tests.alpaca_server import ApiError

    server = AlpacaServer(prices={"AAPL": 150.0, "BTC/USD": 90000.0}, fill_mode="immediate")
    try:
        out = server.place(dict(body))
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message
        return
    assert out["status"] in ("new", "filled", "accepted", "canceled", "held")
    assert all(q >= 0 for k, q in server.positions.items() if k in server.crypto)
