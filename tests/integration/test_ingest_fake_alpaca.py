"""The local Alpaca market-data server is as strict as the documented service (each case cites
the behaviour in ``tests/alpaca_market_server.py``): a raw websocket client for the protocol, the
real alpaca-py historical client for the REST API."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import msgpack
import pytest
import requests
from alpaca.data.historical.stock import StockHistoricalDataClient
from alpaca.data.requests import StockBarsRequest, StockTradesRequest
from alpaca.data.timeframe import TimeFrame
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from tests.alpaca_market_server import AlpacaMarketServer, ScriptedMarket


@pytest.fixture
def srv() -> Iterator[AlpacaMarketServer]:
    with AlpacaMarketServer(ScriptedMarket(("AAA", "BBB"), 30)) as s:
        yield s


def recv(ws: ClientConnection) -> list[dict[str, Any]]:
    raw = ws.recv(timeout=5)
    return msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)  # type: ignore[no-any-return]


def send(ws: ClientConnection, msg: Any) -> None:
    ws.send(json.dumps(msg))


@contextlib.contextmanager
def authed(srv: AlpacaMarketServer) -> Iterator[ClientConnection]:
    with connect(srv.stock_url) as ws:
        assert recv(ws) == [{"T": "success", "msg": "connected"}]
        send(ws, {"action": "auth", "key": srv.key, "secret": srv.secret})
        assert recv(ws) == [{"T": "success", "msg": "authenticated"}]
        yield ws


def test_protocol_errors_by_code(srv: AlpacaMarketServer) -> None:
    with connect(srv.stock_url) as ws:
        recv(ws)
        send(ws, {"action": "subscribe", "bars": ["AAA"]})
        assert recv(ws) == [{"T": "error", "code": 401, "msg": "not authenticated"}]
        send(ws, {"action": "auth", "key": srv.key, "secret": "nope"})
        assert recv(ws) == [{"T": "error", "code": 402, "msg": "auth failed"}]
        send(ws, ["not", "an", "object"])
        assert recv(ws) == [{"T": "error", "code": 400, "msg": "invalid syntax"}]
        send(ws, {"action": "auth", "key": srv.key, "secret": srv.secret})
        assert recv(ws)[0]["msg"] == "authenticated"
        send(ws, {"action": "auth", "key": srv.key, "secret": srv.secret})
        assert recv(ws) == [{"T": "error", "code": 403, "msg": "already authenticated"}]
        send(ws, {"action": "subscribe", "trades": [f"S{i}" for i in range(31)]})
        assert recv(ws) == [{"T": "error", "code": 405, "msg": "symbol limit exceeded"}]
        send(ws, {"action": "subscribe", "trades": ["*"]})
        assert recv(ws)[0]["code"] == 400  # '*' only for bars


def test_subscription_answers_list_every_channel(srv: AlpacaMarketServer) -> None:
    with authed(srv) as ws:
        send(ws, {"action": "subscribe", "trades": ["AAA"], "bars": ["AAA", "BBB"]})
        ack = recv(ws)[0]
        assert ack["T"] == "subscription"
        assert ack["trades"] == ["AAA"] and ack["bars"] == ["AAA", "BBB"]
        assert ack["quotes"] == [] and ack["corrections"] == ["AAA"]
        send(ws, {"action": "unsubscribe", "bars": ["BBB"]})
        assert recv(ws)[0]["bars"] == ["AAA"]
        srv.advance(1)
        trades = recv(ws)
        bars = recv(ws)
        assert {m["T"] for m in trades} == {"t"} and len(trades) == len(
            srv.market.data["AAA"][0].trades
        )
        assert [(m["T"], m["S"]) for m in bars] == [("b", "AAA")]
        assert bars[0]["t"] == "2024-01-02T14:30:00Z" and bars[0]["n"] == len(trades)


def test_msgpack_when_the_client_asks_for_it(srv: AlpacaMarketServer) -> None:
    with connect(srv.stock_url, additional_headers={"Content-Type": "application/msgpack"}) as ws:
        assert msgpack.unpackb(ws.recv(timeout=5)) == [{"T": "success", "msg": "connected"}]
        ws.send(msgpack.packb({"action": "auth", "key": srv.key, "secret": srv.secret}))
        ws.recv(timeout=5)
        ws.send(msgpack.packb({"action": "subscribe", "bars": ["BBB"]}))
        ws.recv(timeout=5)
        srv.advance(1)
        bar = msgpack.unpackb(ws.recv(timeout=5))[0]
        assert isinstance(bar["t"], msgpack.Timestamp)
        assert bar["t"].to_datetime() == datetime(2024, 1, 2, 14, 30, tzinfo=UTC)


def test_one_connection_per_key_and_auth_timeout(srv: AlpacaMarketServer) -> None:
    with authed(srv), connect(srv.stock_url) as second:
        recv(second)
        send(second, {"action": "auth", "key": srv.key, "secret": srv.secret})
        assert recv(second) == [{"T": "error", "code": 406, "msg": "connection limit exceeded"}]
        with pytest.raises(ConnectionClosed):
            second.recv(timeout=5)
    srv.auth_timeout_s = 0.2
    with connect(srv.stock_url) as ws:
        recv(ws)
        assert recv(ws) == [{"T": "error", "code": 404, "msg": "auth timeout"}]


def test_sip_needs_the_plan_and_unknown_paths_are_404(srv: AlpacaMarketServer) -> None:
    with connect(srv.ws_base + "/v2/sip") as ws:
        recv(ws)
        send(ws, {"action": "auth", "key": srv.key, "secret": srv.secret})
        assert recv(ws)[0]["code"] == 409
    with pytest.raises(InvalidStatus):
        connect(srv.ws_base + "/v2/nope")


def test_history_paginates_and_only_shows_released_minutes(srv: AlpacaMarketServer) -> None:
    srv.advance(12)
    srv.page_cap = 5
    client = StockHistoricalDataClient(
        srv.key, srv.secret, raw_data=True, url_override=srv.rest_url
    )
    raw = client.get_stock_bars(
        StockBarsRequest(
            symbol_or_symbols=["AAA", "BBB"],
            timeframe=TimeFrame.Minute,
            start=datetime(2024, 1, 2, 14, 32, tzinfo=UTC),
        )
    )
    assert [b["t"] for b in raw["AAA"]] == [f"2024-01-02T14:{m}:00Z" for m in range(32, 42)]
    assert len(raw["BBB"]) == 10
    assert sum(p == "/v2/stocks/bars" for p, _ in srv.rest_calls) == 4  # 20 bars, 5 a page
    trades = client.get_stock_trades(
        StockTradesRequest(
            symbol_or_symbols="AAA",
            start=datetime(2024, 1, 2, 14, 30, tzinfo=UTC),
            end=datetime(2024, 1, 2, 14, 30, 59, tzinfo=UTC),
        )
    )
    assert len(trades["AAA"]) == len(srv.market.data["AAA"][0].trades)


@pytest.mark.parametrize(
    ("query", "headers", "status"),
    [
        ("symbols=AAA&timeframe=1Min", {}, 403),
        ("timeframe=1Min", None, 400),
        ("symbols=AAA&timeframe=2Hour", None, 422),
        ("symbols=AAA&timeframe=1Min&limit=10001", None, 422),
        ("symbols=AAA&timeframe=1Min&start=yesterday", None, 400),
        ("symbols=AAA&timeframe=1Min&feed=sip", None, 403),
    ],
)
def test_history_refuses_bad_requests(
    srv: AlpacaMarketServer, query: str, headers: dict[str, str] | None, status: int
) -> None:
    h = (
        {"APCA-API-KEY-ID": srv.key, "APCA-API-SECRET-KEY": srv.secret}
        if headers is None
        else headers
    )
    r = requests.get(f"{srv.rest_url}/v2/stocks/bars?{query}", headers=h, timeout=5)
    assert r.status_code == status and "message" in r.json()
