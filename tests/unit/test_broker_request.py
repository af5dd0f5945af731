"""Pure parts of the Alpaca broker: order requests, ids, quantities, fill increments, status
table, the config (settings, retry policy, validation)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import backtrader as bt
import pytest
from alpaca.trading.enums import OrderClass, OrderStatus, OrderType, TimeInForce

from core.errors import ConfigError, OrderRejectedError
from core.retry import RetryPolicy
from core.secret import Secret
from core.settings import declared
from runtime.brokers.alpaca.broker import AlpacaPaperTradingBroker
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.orders import (
    STATUS_MAP,
    client_order_id,
    fill_increment,
    position_key,
    price_for,
    quantity,
    to_order_request,
)
from runtime.config import SETTINGS, load_config


def order(
    side: str = "buy",
    size: float = 10,
    exectype: int = bt.Order.Market,
    price: float | None = None,
    plimit: float | None = None,
    **kw: Any,
) -> Any:
    cls = bt.BuyOrder if side == "buy" else bt.SellOrder
    # simulated=True builds the order without reading a feed (pure test)
    o = cls(
        data=None,
        size=size,
        price=price,
        pricelimit=plimit,
        exectype=exectype,
        simulated=True,
        **kw,
    )
    return o


def fields(req: Any) -> dict[str, Any]:
    return dict(req.to_request_fields())


def test_market_order_equity_defaults_to_day() -> None:
    req = to_order_request(order(size=10), "AAPL", client_order_id="s-1")
    f = fields(req)
    assert f == {
        "symbol": "AAPL",
        "qty": 10.0,
        "side": "buy",
        "type": "market",
        "time_in_force": "day",
        "client_order_id": "s-1",
    }


def test_crypto_defaults_to_gtc_and_keeps_fractions() -> None:
    req = to_order_request(order("sell", size=0.0125), "BTC/USD", client_order_id="s-2")
    f = fields(req)
    assert f["time_in_force"] == "gtc" and f["qty"] == 0.0125 and f["side"] == "sell"


def test_crypto_refuses_day() -> None:
    with pytest.raises(OrderRejectedError, match="gtc or ioc"):
        to_order_request(order(), "BTC/USD", time_in_force="day")


def test_time_in_force_override_order_info_wins_over_run_setting() -> None:
    o = order()
    assert fields(to_order_request(o, "AAPL", time_in_force="gtc"))["time_in_force"] == "gtc"
    o.addinfo(time_in_force="ioc")
    assert fields(to_order_request(o, "AAPL", time_in_force="gtc"))["time_in_force"] == "ioc"


@pytest.mark.parametrize(
    ("exectype", "price", "plimit", "expected"),
    [
        # a buy limit rounds down: never pays more than asked (issue 13, finding 6)
        (bt.Order.Limit, 187.256, None, {"type": "limit", "limit_price": 187.25}),
        (bt.Order.Limit, 0.51234, None, {"type": "limit", "limit_price": 0.5123}),
        (bt.Order.Stop, 180.0, None, {"type": "stop", "stop_price": 180.0}),
        (
            bt.Order.StopLimit,
            180.0,
            179.5,
            {"type": "stop_limit", "stop_price": 180.0, "limit_price": 179.5},
        ),
    ],
)
def test_priced_orders(
    exectype: int, price: float, plimit: float | None, expected: dict[str, Any]
) -> None:
    f = fields(to_order_request(order(exectype=exectype, price=price, plimit=plimit), "AAPL"))
    for k, v in expected.items():
        assert f[k] == v


def test_trailing_stop_amount_and_percent() -> None:
    f = fields(
        to_order_request(
            order("sell", exectype=bt.Order.StopTrail, price=100.0, trailamount=2.5), "AAPL"
        )
    )
    assert f["type"] == "trailing_stop" and f["trail_price"] == 2.5
    # backtrader's trailpercent is a fraction; Alpaca's trail_percent is percent
    f = fields(
        to_order_request(
            order("sell", exectype=bt.Order.StopTrail, price=100.0, trailpercent=0.015), "AAPL"
        )
    )
    assert f["trail_percent"] == 1.5 and "trail_price" not in f


def test_market_on_close_is_cls_and_equities_only() -> None:
    f = fields(to_order_request(order(exectype=bt.Order.Close), "AAPL"))
    assert f["type"] == "market" and f["time_in_force"] == "cls"
    with pytest.raises(OrderRejectedError, match="equities only"):
        to_order_request(order(exectype=bt.Order.Close), "BTC/USD")


@pytest.mark.parametrize("exectype", [bt.Order.StopTrailLimit, bt.Order.Historical])
def test_types_alpaca_lacks_are_refused(exectype: int) -> None:
    with pytest.raises(OrderRejectedError, match=r"no \w+ order type|trailing"):
        to_order_request(order(exectype=exectype, price=10.0, plimit=9.0, trailamount=1.0), "AAPL")


def test_bracket_and_oto() -> None:
    parent = order(exectype=bt.Order.Limit, price=185.0, size=5)
    stop = order("sell", exectype=bt.Order.Stop, price=180.0, size=5)
    take = order("sell", exectype=bt.Order.Limit, price=195.0, size=5)
    req = to_order_request(parent, "AAPL", client_order_id="s-9", children=[stop, take])
    assert req.order_class == OrderClass.BRACKET and req.type == OrderType.LIMIT
    f = fields(req)
    assert f["take_profit"] == {"limit_price": 195.0}
    assert f["stop_loss"] == {"stop_price": 180.0}
    stop_limit = order("sell", exectype=bt.Order.StopLimit, price=180.0, plimit=179.0)
    f = fields(to_order_request(parent, "AAPL", children=[stop_limit]))
    assert f["order_class"] == "oto"
    assert f["stop_loss"] == {"stop_price": 180.0, "limit_price": 179.0}
    with pytest.raises(OrderRejectedError, match="bracket exit"):
        to_order_request(parent, "AAPL", children=[order("sell", exectype=bt.Order.Market)])


def test_zero_size_refused() -> None:
    with pytest.raises(OrderRejectedError, match="rounds to zero"):
        to_order_request(order(size=1e-12), "AAPL")


def test_quantity_is_exact_decimal() -> None:
    assert quantity(0.1) == Decimal("0.1")
    assert quantity(-3) == Decimal(3)
    assert quantity(0.0125) + quantity(0.0045) == Decimal("0.017")


def test_price_for_rounds_to_accepted_increments() -> None:
    assert price_for("AAPL", 187.2549) == 187.25
    assert price_for("PENNY", 0.123456) == 0.1235
    assert price_for("BTC/USD", 91432.123456789123) == pytest.approx(91432.123456789)


def test_client_order_id_is_deterministic_and_bounded() -> None:
    assert client_order_id("20261121T051502Z-3f9a1c2e", 7) == "20261121T051502Z-3f9a1c2e-7"
    assert client_order_id("s", 7) == client_order_id("s", 7)
    with pytest.raises(ValueError, match="128"):
        client_order_id("x" * 130, 1)


def test_position_key() -> None:
    assert position_key("BTC/USD") == "BTCUSD" and position_key("aapl") == "AAPL"


def test_status_map_covers_every_alpaca_status_once() -> None:
    assert set(STATUS_MAP) == {s.value for s in OrderStatus}
    assert STATUS_MAP["canceled"] == bt.Order.Canceled != STATUS_MAP["rejected"]
    assert STATUS_MAP["expired"] == bt.Order.Expired
    assert STATUS_MAP["held"] == bt.Order.Accepted
    assert STATUS_MAP["partially_filled"] == bt.Order.Partial
    assert STATUS_MAP["filled"] == bt.Order.Completed


def cfg(**kw: Any) -> AlpacaBrokerConfig:
    return AlpacaBrokerConfig(
        api_key=Secret("AKTESTKEY123"), secret_key=Secret("SECRETabc987"), **kw
    )


def test_retries_follow_the_config_with_the_project_policy() -> None:
    policy = cfg(max_attempts=4, backoff_base_s=0.25, backoff_max_s=2.0).retry_policy
    assert policy == RetryPolicy(attempts=4, initial_s=0.25, max_s=2.0)
    for attempt, cap in ((1, 0.25), (2, 0.5), (3, 1.0), (4, 2.0), (9, 2.0)):
        waits = [policy.delay_s(attempt) for _ in range(200)]
        assert all(0 <= w <= cap for w in waits)
        assert max(waits) - min(waits) > cap / 4  # jittered, not constant


def test_fill_increments_sum_exactly_and_price_each_slice() -> None:
    z = Decimal(0)
    first = fill_increment(
        applied_cum=z,
        applied_value_usd=z,
        base_cum=z,
        base_value_usd=z,
        filled_qty=Decimal("0.005"),
        filled_avg_price=Decimal(100),
    )
    assert first is not None and (first.size, first.price_usd) == (Decimal("0.005"), 100.0)
    second = fill_increment(
        applied_cum=first.cum,
        applied_value_usd=first.value_usd,
        base_cum=z,
        base_value_usd=z,
        filled_qty=Decimal("0.0125"),
        filled_avg_price=Decimal(106),  # cumulative average: the new 0.0075 filled at 110
    )
    assert second is not None and second.size == Decimal("0.0075")
    assert second.price_usd == pytest.approx(110.0)
    assert first.size + second.size == second.cum == Decimal("0.0125")
    stale = {
        "applied_cum": second.cum,
        "applied_value_usd": second.value_usd,
        "base_cum": z,
        "base_value_usd": z,
        "filled_avg_price": Decimal(100),
    }
    assert fill_increment(filled_qty=Decimal("0.0125"), **stale) is None  # repeated
    assert fill_increment(filled_qty=Decimal("0.005"), **stale) is None  # older


def test_open_order_policy_typo_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"ALPACA_OPEN_ORDER_POLICY.*'adpot'"):
        cfg(open_order_policy="adpot")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="ALPACA_TIME_IN_FORCE"):
        cfg(time_in_force="week")  # type: ignore[arg-type]


def test_settings_declared_on_the_config_match_the_settings_table() -> None:
    for s in declared(AlpacaBrokerConfig):
        listed = SETTINGS[s.name]
        assert (s.default, s.help, s.secret, s.alternatives) == (
            listed.default,
            listed.help,
            listed.secret,
            listed.alternatives,
        ), s.name


def test_live_endpoint_needs_explicit_opt_in() -> None:
    with pytest.raises(ConfigError, match="ALPACA_LIVE_TRADING=true"):
        cfg(base_url="https://api.alpaca.markets")
    assert cfg(base_url="https://api.alpaca.markets", live_trading=True).points_at_live
    assert not cfg().points_at_live
    assert not cfg(base_url="https://paper-api.alpaca.markets").points_at_live


def test_default_endpoint_is_paper_and_keys_never_in_reprs() -> None:
    broker = AlpacaPaperTradingBroker(cfg(), session_id="s1")
    assert broker.endpoint == "https://paper-api.alpaca.markets" and not broker.live
    text = repr(broker) + repr(broker.config) + broker.describe()
    assert "AKTESTKEY123" not in text and "SECRETabc987" not in text
    live = AlpacaPaperTradingBroker(cfg(live_trading=True), session_id="s1")
    assert live.live and "LIVE" in live.describe()


def test_env_settings_reach_the_config() -> None:
    env = {
        "MODE": "paper",
        "BROKER": "alpaca",
        "SYMBOLS": "AAPL,BTC/USD",
        "GOOGLE_CLOUD_PROJECT": "p",
        "PUBSUB_TOPIC": "bars",
        "APCA_API_KEY_ID": "k",
        "ALPACA_SECRET_KEY": "s",
        "ALPACA_BASE_URL": "http://127.0.0.1:9",
        "ALPACA_POLL_INTERVAL_S": "0.5",
        "ALPACA_OPEN_ORDER_POLICY": "adopt",
        "ALPACA_REQUEST_TIMEOUT_S": "3",
        "ALPACA_MAX_RETRIES": "4",
        "ALPACA_STREAM_URL": "ws://127.0.0.1:10/stream",
        "ALPACA_WAIT_FOR_MARKET_OPEN": "no",
        "RISK_MAX_ORDER_NOTIONAL_USD": "5000",
    }
    c = load_config(env)
    a = c.alpaca
    assert a is not None
    assert (
        a.base_url,
        a.poll_interval_s,
        a.open_order_policy,
        a.request_timeout_s,
        a.max_attempts,
        a.stream_url,
        a.wait_for_market_open,
    ) == ("http://127.0.0.1:9", 0.5, "adopt", 3.0, 4, "ws://127.0.0.1:10/stream", False)
    assert a.api_key.reveal() == "k" and c.risk.max_order_notional_usd == 5000.0
    with pytest.raises(ConfigError, match="ALPACA_MAX_RETRIES"):
        load_config({**env, "ALPACA_MAX_RETRIES": "0"})
    assert TimeInForce("gtc")  # the enum the requests use


def test_account_id_selects_the_broker_api() -> None:
    env = {
        "MODE": "paper",
        "BROKER": "alpaca",
        "SYMBOLS": "AAPL",
        "GOOGLE_CLOUD_PROJECT": "p",
        "PUBSUB_TOPIC": "bars",
        "ALPACA_API_KEY": "broker-key",
        "ALPACA_SECRET_KEY": "broker-secret",
        "ALPACA_ACCOUNT_ID": "7b3c2a10-5d4e-4f6a-9b8c-1d2e3f4a5b6c",
    }
    a = load_config(env).alpaca
    assert a is not None and a.broker_api
    assert a.account_id == "7b3c2a10-5d4e-4f6a-9b8c-1d2e3f4a5b6c"
    assert a.endpoint == "https://broker-api.sandbox.alpaca.markets"  # paper: the sandbox
    assert a.stream_endpoint == a.endpoint  # its trade events SSE lives on the REST host
    assert not a.points_at_live
    with pytest.raises(ConfigError, match="ALPACA_ACCOUNT_ID"):
        load_config({**env, "ALPACA_ACCOUNT_ID": "not-a-uuid"})
    with pytest.raises(ConfigError, match="ALPACA_LIVE_TRADING=true"):
        load_config({**env, "ALPACA_BASE_URL": "https://broker-api.alpaca.markets"})
    trading = load_config({k: v for k, v in env.items() if k != "ALPACA_ACCOUNT_ID"}).alpaca
    assert trading is not None and not trading.broker_api  # the Trading API stays the default
    assert trading.use_stream  # trade updates from the stream by default, polling as fallback
