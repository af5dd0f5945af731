"""Alpaca's order rules the broker follows before sending (pure, property-tested): a reversal
is split into a closing and an opening quantity (Alpaca refuses one order through zero,
Alpaca-API #90), prices are never sub-penny (SEC Rule 612 as Alpaca applies it), fractional
equity quantities go only in day simple orders, brackets only day/gtc. The sub-penny rule is
checked against the local server's own rule (``tests/alpaca_server.py``), so the two cannot
drift apart."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import backtrader as bt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import OrderRejectedError
from runtime.brokers.alpaca.orders import (
    ZERO,
    is_fractional,
    limit_price_for,
    price_for,
    split_reversal,
    stop_price_for,
    to_order_request,
)
from tests.alpaca_server import _sub_penny

QTY = st.decimals(min_value=Decimal("0.000000001"), max_value=Decimal(10_000), places=9)
POSITION = st.decimals(min_value=Decimal(-10_000), max_value=Decimal(10_000), places=9)


@given(POSITION, st.booleans(), QTY)
def test_split_reversal_closes_then_opens_and_sums_to_the_order(
    position: Decimal, buy: bool, qty: Decimal
) -> None:
    closing, opening = split_reversal(position, buy, qty)
    assert closing + opening == qty and closing > 0 and opening >= 0
    reduces = (position < 0) if buy else (position > 0)
    if opening:
        # only an order that goes through zero is split, and its first part is exactly the
        # position: after it, the account is flat
        assert reduces and closing == abs(position) and qty > abs(position)
    else:
        assert not reduces or qty <= abs(position)
    after_close = position + (closing if buy else -closing)
    assert after_close == 0 or not opening


def test_split_reversal_examples() -> None:
    assert split_reversal(Decimal(10), False, Decimal(20)) == (Decimal(10), Decimal(10))
    assert split_reversal(Decimal(-3), True, Decimal(5)) == (Decimal(3), Decimal(2))
    assert split_reversal(Decimal(10), False, Decimal(10)) == (Decimal(10), ZERO)  # a close
    assert split_reversal(Decimal(10), True, Decimal(5)) == (Decimal(5), ZERO)  # adds
    assert split_reversal(ZERO, False, Decimal(5)) == (Decimal(5), ZERO)  # opens a short


@given(st.floats(min_value=0.0001, max_value=1_000_000, allow_nan=False, allow_infinity=False))
def test_equity_prices_are_never_sub_penny(price: float) -> None:
    sent = price_for("AAPL", price)
    assert sent > 0 or price < 0.00005
    if sent > 0:
        assert not _sub_penny(Decimal(repr(sent)))
        assert abs(sent - price) <= (0.005 if price >= 1.0 else 0.00005) + 1e-9


@given(
    st.floats(min_value=0.001, max_value=1_000_000, allow_nan=False, allow_infinity=False),
    st.booleans(),
)
def test_rounded_prices_never_work_against_the_agent(price: float, buy: bool) -> None:
    """Issue 13, finding 6: a buy limit never above, a sell limit never below the price
    asked; a buy stop never below (triggers no earlier), a sell stop never above; all on
    Alpaca's increments."""
    lim = limit_price_for("AAPL", price, buy)
    stp = stop_price_for("AAPL", price, buy)
    for sent in (lim, stp):
        assert not _sub_penny(Decimal(repr(sent)))
        assert abs(sent - price) < (0.01 if price >= 1.0 else 0.0001) + 1e-9
    if buy:
        assert lim <= price + 1e-9 and stp >= price - 1e-9
    else:
        assert lim >= price - 1e-9 and stp <= price + 1e-9


def test_bracket_stop_never_rounds_onto_the_entry_price() -> None:
    parent = bt.BuyOrder(data=None, simulated=True, size=10, exectype=bt.Order.Limit, price=100.006)
    stop = bt.SellOrder(
        data=None, simulated=True, size=10, exectype=bt.Order.Stop, price=100.004, parent=parent
    )
    take = bt.SellOrder(
        data=None, simulated=True, size=10, exectype=bt.Order.Limit, price=110.0, parent=parent
    )
    req = to_order_request(parent, "AAPL", children=(stop, take))
    assert getattr(req, "limit_price", None) == 100.0
    assert req.stop_loss is not None and req.stop_loss.stop_price == 99.99
    assert req.take_profit is not None and req.take_profit.limit_price == 110.0


def test_sub_penny_rule_examples() -> None:
    # alpaca-trade-api-csharp #497: 11.055 refused, 0.6013 accepted
    assert _sub_penny(Decimal("11.055")) and not _sub_penny(Decimal("0.6013"))
    assert not _sub_penny(Decimal("1.00")) and _sub_penny(Decimal("0.00001"))


def order(**kw: Any) -> Any:
    kw.setdefault("size", 0.5)
    return bt.BuyOrder(data=None, simulated=True, **kw)


@pytest.mark.parametrize(
    ("kw", "tif", "message"),
    [
        ({}, "gtc", "time in force day"),
        ({"exectype": bt.Order.Limit, "price": 10.0}, "ioc", "time in force day"),
        ({"exectype": bt.Order.Close}, None, "time in force day"),  # cls
        (
            {"exectype": bt.Order.StopTrail, "price": 10.0, "trailamount": 1.0},
            "day",
            "simple market, limit, stop",
        ),
    ],
)
def test_fractional_equity_orders_alpaca_refuses_fail_before_sending(
    kw: dict[str, Any], tif: str | None, message: str
) -> None:
    with pytest.raises(OrderRejectedError, match=message):
        to_order_request(order(**kw), "AAPL", time_in_force=tif)


@given(
    st.sampled_from([bt.Order.Market, bt.Order.Limit, bt.Order.Stop, bt.Order.StopLimit]),
    st.decimals(min_value=Decimal("0.001"), max_value=Decimal(1000), places=3),
)
def test_fractional_day_orders_are_sent(exectype: int, size: Decimal) -> None:
    o = order(size=float(size), exectype=exectype, price=10.0, pricelimit=9.5)
    fields = dict(to_order_request(o, "AAPL", time_in_force="day").to_request_fields())
    assert Decimal(repr(fields["qty"])) == size
    assert is_fractional(size) or size == size.to_integral_value()


def test_qty_override_sends_one_part_of_a_split() -> None:
    o = bt.SellOrder(data=None, size=20, simulated=True)
    fields = dict(to_order_request(o, "AAPL", qty=Decimal(10)).to_request_fields())
    assert fields["qty"] == 10.0 and fields["side"] == "sell"


@pytest.mark.parametrize("tif", ["ioc", "fok", "opg"])
def test_bracket_time_in_force_must_be_day_or_gtc(tif: str) -> None:
    entry = bt.BuyOrder(data=None, size=5, price=99.0, exectype=bt.Order.Limit, simulated=True)
    stop = bt.SellOrder(data=None, size=5, price=95.0, exectype=bt.Order.Stop, simulated=True)
    take = bt.SellOrder(data=None, size=5, price=110.0, exectype=bt.Order.Limit, simulated=True)
    with pytest.raises(OrderRejectedError, match="day or gtc"):
        to_order_request(entry, "AAPL", time_in_force=tif, children=[stop, take])
    fields = dict(
        to_order_request(
            entry, "AAPL", time_in_force="gtc", children=[stop, take]
        ).to_request_fields()
    )
    assert fields["order_class"] == "bracket"


@pytest.mark.parametrize("tif", ["opg", "cls"])
@pytest.mark.parametrize(
    "kw",
    [
        {"exectype": bt.Order.Stop, "price": 95.0},
        {"exectype": bt.Order.StopLimit, "price": 95.0, "pricelimit": 94.0},
        {"exectype": bt.Order.StopTrail, "price": 95.0, "trailamount": 1.0},
    ],
)
def test_auction_orders_are_market_or_limit_only(tif: str, kw: dict[str, Any]) -> None:
    """docs "Orders at Alpaca", time in force: opg/cls make market/limit on open/close orders
    (helper-75: a stop with opg was sent, and Alpaca answers 422)."""
    with pytest.raises(
        OrderRejectedError, match=f"{tif} \\(auction\\) orders must be market or limit"
    ):
        to_order_request(order(size=5, **kw), "AAPL", time_in_force=tif)
    for ok in ({}, {"exectype": bt.Order.Limit, "price": 99.0}):
        fields = dict(
            to_order_request(order(size=5, **ok), "AAPL", time_in_force=tif).to_request_fields()
        )
        assert fields["time_in_force"] == tif
