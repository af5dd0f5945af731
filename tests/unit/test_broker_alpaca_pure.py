"""Pure parts of the Alpaca broker, property-tested: fill increments, the crypto fee booked in
the coin received, ``valid=`` as a time in force, the rate-limit wait, the family book (which
Alpaca order belongs to which family, when a family is done, the fill marker), the cancel
targets, and the ledger (value = cash + positions at their marks)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import uuid4

import backtrader as bt
import pytest
import requests
from alpaca.common.exceptions import APIError
from alpaca.trading.models import Order as AlpacaOrder
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import OrderRejectedError, RetryInterruptedError
from core.retry import RetryPolicy
from runtime.brokers.alpaca.http import AlpacaCaller, rate_limit_wait_s
from runtime.brokers.alpaca.orders import (
    ZERO,
    crypto_fee,
    fill_increment,
    to_order_request,
    validity,
)
from runtime.brokers.alpaca.state import FlightBook, Ledger

QTY = st.decimals(min_value=Decimal("0.000000001"), max_value=Decimal(10_000), places=9)
PRICE = st.decimals(min_value=Decimal("0.01"), max_value=Decimal(200_000), places=2)


# -- fills -------------------------------------------------------------------------------------


@given(st.lists(st.tuples(QTY, PRICE), min_size=1, max_size=8), st.randoms())
def test_fill_increments_sum_exactly_whatever_the_snapshot_order(
    slices: list[tuple[Decimal, Decimal]], rnd: Any
) -> None:
    """Cumulative snapshots applied in any order (stale ones repeated) add up to the total,
    and each increment's price is its slice's."""
    snaps = []
    cum = value = ZERO
    for q, p in slices:
        cum += q
        value += q * p
        snaps.append((cum, value / cum))
    shuffled = snaps + rnd.sample(snaps, len(snaps))
    applied_cum = applied_value = ZERO
    got = ZERO
    for filled, avg in sorted(shuffled[: len(snaps)], key=lambda s: s[0]) + shuffled:
        inc = fill_increment(
            applied_cum=applied_cum,
            applied_value_usd=applied_value,
            base_cum=ZERO,
            base_value_usd=ZERO,
            filled_qty=filled,
            filled_avg_price=avg,
        )
        if inc is not None:
            got += inc.size
            applied_cum, applied_value = inc.cum, inc.value_usd
    assert got == cum


# -- crypto fees ---------------------------------------------------------------------------------


@given(QTY, PRICE, st.floats(min_value=0, max_value=100, allow_subnormal=False))
def test_crypto_fee_is_in_the_coin_received_and_never_understated(
    size: Decimal, price: Decimal, bps: float
) -> None:
    coins, usd = crypto_fee(True, size, float(price), bps)
    exact = size * Decimal(repr(bps)) / 10_000
    assert coins >= exact and coins - exact <= Decimal("0.000000001")  # rounded up to 1e-9
    assert usd == coins * Decimal(repr(float(price)))
    coins, usd = crypto_fee(False, size, float(price), bps)
    assert coins == ZERO  # a sale pays in USD
    assert usd >= size * Decimal(repr(float(price))) * Decimal(repr(bps)) / 10_000
    assert usd == usd.quantize(Decimal("0.01"))


def test_crypto_fee_matches_alpacas_tier_one_taker() -> None:
    assert crypto_fee(True, Decimal("0.5"), 90000.0, 25.0) == (
        Decimal("0.00125"),
        Decimal("0.00125") * Decimal("90000.0"),
    )
    assert crypto_fee(False, Decimal("0.49875"), 90000.0, 25.0)[1] == Decimal("112.22")


# -- valid= ------------------------------------------------------------------------------------


def order(**kw: Any) -> Any:
    return bt.BuyOrder(data=None, size=1, price=10.0, exectype=bt.Order.Limit, simulated=True, **kw)


BAR = datetime(2026, 11, 20, 15, 0)
BAR_NUM = float(bt.date2num(BAR))


def test_valid_none_is_the_default_time_in_force() -> None:
    assert validity(order(), "AAPL", BAR_NUM) == (None, None)


@given(st.integers(min_value=0, max_value=8 * 60))
def test_valid_today_is_a_day_order_expired_here_at_valid(minutes: int) -> None:
    when = BAR + timedelta(minutes=minutes)
    o = order()
    o.valid = float(bt.date2num(when))
    tif, expiry = validity(o, "AAPL", BAR_NUM)
    assert tif == "day" and expiry == pytest.approx(o.valid)


@given(st.integers(min_value=1, max_value=400))
def test_valid_after_today_is_gtc_expired_here(days: int) -> None:
    o = order()
    o.valid = float(bt.date2num(BAR + timedelta(days=days)))
    tif, expiry = validity(o, "AAPL", BAR_NUM)
    assert tif == "gtc" and expiry == pytest.approx(o.valid)
    assert validity(o, "BTC/USD", BAR_NUM)[0] == "gtc"


def test_valid_day_constant_and_crypto() -> None:
    o = order()
    o.valid = 0.0  # Order.DAY given as a number, which backtrader leaves as is
    assert validity(o, "AAPL", BAR_NUM) == ("day", None)
    tif, expiry = validity(o, "BTC/USD", BAR_NUM)  # crypto has no day orders
    assert tif == "gtc" and expiry is not None and bt.num2date(expiry).date() == BAR.date()
    o.valid = 2.0  # days, left unconverted by backtrader
    tif, expiry = validity(o, "AAPL", BAR_NUM)
    assert tif == "gtc" and expiry == pytest.approx(BAR_NUM + 2.0)


# -- order rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "symbol", "message"),
    [
        ({"exectype": bt.Order.Stop, "price": 1.0}, "BTC/USD", "stop-limit crypto"),
        (
            {"exectype": bt.Order.StopTrail, "price": 1.0, "trailamount": 1.0},
            "BTC/USD",
            "stop-limit crypto",
        ),
        ({"exectype": bt.Order.Market}, "AAPL", "extended-hours"),
    ],
)
def test_orders_alpaca_refuses_fail_before_sending(
    kw: dict[str, Any], symbol: str, message: str
) -> None:
    o = bt.BuyOrder(data=None, size=1, simulated=True, **kw)
    if message == "extended-hours":
        o.addinfo(extended_hours=True)
    with pytest.raises(OrderRejectedError, match=message):
        to_order_request(o, symbol)


def test_oco_pair_request() -> None:
    take = bt.SellOrder(data=None, size=5, price=110.0, exectype=bt.Order.Limit, simulated=True)
    stop = bt.SellOrder(
        data=None, size=5, price=95.0, pricelimit=94.0, exectype=bt.Order.StopLimit, simulated=True
    )
    fields = dict(to_order_request(take, "AAPL", oco_stop=stop).to_request_fields())
    assert fields["order_class"] == "oco" and "limit_price" not in fields
    assert fields["take_profit"] == {"limit_price": 110.0}
    assert fields["stop_loss"] == {"stop_price": 95.0, "limit_price": 94.0}
    uneven = bt.SellOrder(data=None, size=4, price=95.0, exectype=bt.Order.Stop, simulated=True)
    with pytest.raises(OrderRejectedError, match="same side and size"):
        to_order_request(take, "AAPL", oco_stop=uneven)


# -- rate limit ----------------------------------------------------------------------------------


def api_error(status: int, headers: dict[str, str]) -> APIError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers)
    return APIError(
        '{"code": 42910000, "message": "rate limit exceeded"}',
        requests.HTTPError(response=response),
    )


@given(st.floats(min_value=0, max_value=120))
def test_rate_limit_wait_is_until_the_reset_capped(ahead: float) -> None:
    now = 1_800_000_000.0
    e = api_error(429, {"X-Ratelimit-Reset": str(now + ahead)})
    assert rate_limit_wait_s(e, now) == pytest.approx(min(ahead, 60.0), abs=1e-6)
    assert rate_limit_wait_s(api_error(429, {}), now) == 0.0


def test_a_429_waits_for_the_reset_and_stop_interrupts_it() -> None:
    stop = threading.Event()
    caller = AlpacaCaller(RetryPolicy(attempts=3, initial_s=0.001, max_s=0.002), stop=stop)
    calls = []

    def limited() -> str:
        calls.append(datetime.now(UTC))
        if len(calls) == 1:
            raise api_error(429, {"X-Ratelimit-Reset": str(datetime.now(UTC).timestamp() + 0.2)})
        return "ok"

    assert caller.call("x", limited) == "ok"
    assert (calls[1] - calls[0]).total_seconds() >= 0.15  # waited for the reset, not 2 ms
    calls.clear()
    stop.set()
    with pytest.raises(RetryInterruptedError):
        caller.call("x", limited)


# -- the family book -------------------------------------------------------------------------------


def snap(
    coid: str,
    status: str,
    filled: str = "0",
    legs: list[AlpacaOrder] | None = None,
    replaces: str | None = None,
    replaced_by: str | None = None,
    oid: str | None = None,
    typ: str = "limit",
) -> AlpacaOrder:
    now = datetime.now(UTC).isoformat()
    return AlpacaOrder(
        id=oid or str(uuid4()),
        client_order_id=coid,
        created_at=now,
        updated_at=now,
        submitted_at=now,
        symbol="AAPL",
        qty="5",
        filled_qty=filled,
        order_class="bracket" if legs else "",
        type=typ,
        side="buy",
        time_in_force="gtc",
        status=status,
        extended_hours=False,
        legs=legs,
        replaces=replaces,
        replaced_by=replaced_by,
    )


def test_family_follows_legs_and_replacements_and_ends() -> None:
    book = FlightBook()
    book.add_sent("s-1", "AAPL", "AAPL")
    take, stop = snap("x", "new"), snap("y", "held", typ="stop")
    seen: list[str | None] = []
    assert book.observe(snap("s-1", "filled", "5", legs=[take, stop]), seen.append) == "s-1"
    book.mark_sent("s-1")
    fl = book.snapshot().flights["s-1"]
    assert len(fl.members) == 3 and not fl.done
    assert book.cancel_targets("s-1") == [str(take.id)]  # the working leg; its sibling follows
    before = book.marker()
    replaced = snap("y", "replaced", oid=str(stop.id), typ="stop")
    book.observe(replaced, seen.append)
    assert [m.id for m in book.snapshot().flights["s-1"].unresolved()] == [str(stop.id)]
    successor = snap("z", "filled", "5", replaces=str(stop.id), typ="stop")
    assert book.observe(successor, seen.append) == "s-1"  # found through ``replaces``
    book.observe(snap("x", "canceled", oid=str(take.id)), seen.append)
    fl = book.snapshot().flights["s-1"]
    assert fl.done and not fl.unresolved()
    assert book.marker() != before  # the successor's fill moved the marker
    assert book.observe(snap("other", "new"), seen.append) is None
    assert seen[-1] is None


def test_a_replaced_member_given_up_ends_the_family() -> None:
    book = FlightBook()
    book.add_sent("s-2", "AAPL", "AAPL")
    leg = snap("y", "replaced", typ="stop")
    book.observe(snap("s-2", "filled", "5", legs=[leg]), lambda _: None)
    book.mark_sent("s-2")
    assert not book.snapshot().flights["s-2"].done
    assert [book.missed("s-2", str(leg.id)) for _ in range(3)] == [1, 2, 3]
    book.lost_successor("s-2", str(leg.id))
    assert book.snapshot().flights["s-2"].done
    assert book.settled(frozenset({"s-2"}))


# -- the ledger ------------------------------------------------------------------------------------


@given(
    st.decimals(min_value=Decimal(-(10**6)), max_value=Decimal(10**6), places=2),
    st.dictionaries(
        st.sampled_from(["AAPL", "MSFT", "BTCUSD"]),
        st.tuples(
            st.decimals(min_value=Decimal(-1000), max_value=Decimal(1000), places=4),
            st.floats(min_value=0.01, max_value=1e5),
        ),
    ),
)
@settings(max_examples=50)
def test_ledger_value_is_cash_plus_positions_at_marks(
    cash: Decimal, positions: dict[str, tuple[Decimal, float]]
) -> None:
    ledger = Ledger()
    marks = {k: p for k, (_, p) in positions.items()}
    ledger.sync(cash, {k: (q, p) for k, (q, p) in positions.items()}, marks)
    expected = cash + sum((q * Decimal(repr(p)) for q, p in positions.values()), Decimal(0))
    assert ledger.value_usd() == pytest.approx(float(expected), abs=1e-6)
    for key, (qty, _) in positions.items():
        if qty:
            assert ledger.qty[key] == qty and ledger.pos[key].size == float(qty)
