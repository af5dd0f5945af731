"""The local Alpaca server speaks Alpaca's documented shapes: the recorded example responses
parse with alpaca-py's own models, the server renders exactly those keys, errors come back as
``APIError`` with Alpaca's code and message, faults are injected at the configured rate."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from alpaca.common.exceptions import APIError
from alpaca.trading.client import TradingClient
from alpaca.trading.enums import OrderClass, OrderSide, OrderStatus, QueryOrderStatus, TimeInForce
from alpaca.trading.models import Clock, Order, Position, TradeAccount, TradeUpdate
from alpaca.trading.requests import (
    GetOrdersRequest,
    LimitOrderRequest,
    MarketOrderRequest,
    StopLossRequest,
    TakeProfitRequest,
)

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
    server.set_price("AAPL", 184.0)  # the entry fills, its legs go live
    parent = client.get_order_by_id(o.id)
    assert isinstance(parent, Order) and parent.status == OrderStatus.FILLED
    nested = client.get_orders(GetOrdersRequest(status=QueryOrderStatus.OPEN, nested=True))
    assert isinstance(nested, list) and isinstance(nested[0], Order)
    assert [str(x.id) for x in nested] == [str(o.id)]  # filled parent listed with open legs
    assert {leg.status for leg in nested[0].legs or []} == {OrderStatus.NEW}
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
    assert server.position_qty() == {"BTCUSD": Decimal("0.0125")}
    pos = client.get_all_positions()
    assert [(p.symbol, p.qty) for p in pos] == [("BTCUSD", "0.0125")]  # type: ignore[union-attr]


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
