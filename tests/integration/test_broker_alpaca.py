"""The Alpaca broker against Alpaca's real behaviour as the local server models it (sources
cited in ``tests/alpaca_server.py``), on both APIs (Trading API, Broker API): bracket stop legs
that are held and replaced, cancels that pass through ``pending_cancel``, shares reserved by
open orders, restarts with open legs, a clock outage, lost submits, the request budget, crypto
fees, ``valid=``/``oco=``/extended hours, shutdown, and one consistent account per bar.

Each test names the item of issue 13 it checks.
"""

from __future__ import annotations

import time
from datetime import timedelta
from decimal import Decimal
from typing import Any

import backtrader as bt
import pytest

from core.errors import BrokerError
from runtime.brokers.alpaca.broker import AlpacaPaperTradingBroker
from runtime.brokers.risk import RiskConfig
from tests.alpaca_harness import (
    TIME_SCALE,
    Run,
    alpaca_threads,
    api,
    bar,
    bracket,
    bt_positions,
    buy,
    drive,
    fast_config,
    make_server,
    new_session,
    now,
    order_of,
    run_on,
    sell,
    server_order,
    statuses,
    wait_until,
)
from tests.alpaca_server import AlpacaServer, FaultPlan

__all__ = ["api"]
# fixture: every test runs on both Alpaca APIs


def leg_statuses(server: AlpacaServer, run: Run, name: str = "parent") -> dict[str, str]:
    """The server's legs of a bracket: order type -> status."""
    o = server_order(server, run, name)
    return {str(leg["type"]): str(leg["status"]) for leg in o["legs"] or []}


def ended(run: Run, name: str, status: str) -> bool:
    o = run.log.orders.get(name)
    return o is not None and status in run.log.statuses(o.ref)


# -- item 1: bracket stop-loss exits under polling ----------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        "replace_stop",  # alpaca-backtrader-api #80: the stop leg is replaced by a new order
        "replace_stop_unnamed",  # ... and the replaced leg does not name its successor
        "replace_take_profit",  # alpaca-py #198: the take profit is replaced by the stop leg
    ],
)
def test_bracket_stop_loss_exit_is_followed_under_polling(api: str, variant: str) -> None:
    server_kw: dict[str, Any] = {
        "stop_trigger": "replace_take_profit"
        if variant == "replace_take_profit"
        else "replace_stop",
        "hide_replaced_by": variant == "replace_stop_unnamed",
    }
    with make_server(prices={"AAPL": 100.0}, **server_kw) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket(size=5, price=99.0, stopprice=95.0, limitprice=110.0)},
            config=fast_config(server, api, use_stream=False),
        )

        def play() -> None:
            server_order(server, run, "parent")
            server.set_price("AAPL", 98.5)  # the entry fills at its limit
            wait_until(lambda: ended(run, "parent", "Completed"), what="entry filled")
            # Alpaca: the take profit goes live, the stop-loss leg stays held (alpaca-py #198)
            assert leg_statuses(server, run) == {"limit": "new", "stop": "held"}
            server.set_price("AAPL", 94.0)  # the stop triggers
            wait_until(
                lambda: ended(run, "stop", "Completed") and ended(run, "take", "Canceled"),
                what="stop-loss exit",
            )

        drive(run, [bar(run, "AAPL", 100.0), play])
        stop, take = order_of(run, "stop"), order_of(run, "take")
        assert statuses(run, stop.ref) == ["Submitted", "Accepted", "Completed"]
        assert statuses(run, take.ref) == ["Submitted", "Accepted", "Canceled"]
        assert (stop.executed.size, stop.executed.price) == (-5.0, 94.0)
        assert bt_positions(run) == server.position_qty() == {}
        trades = run.strategy._trades[run.feeds["AAPL"]][0]
        assert len(trades) == 1 and trades[0].isclosed
        assert trades[0].pnl == pytest.approx(5 * (94.0 - 99.0))


def test_replaced_leg_without_a_findable_successor_ends_and_the_account_decides(api: str) -> None:
    """A leg Alpaca shows ``replaced`` with no successor to be found is not polled forever:
    after a few searches it ends (Canceled, with the reason) and the position is the
    account's."""
    with make_server(prices={"AAPL": 100.0}, hide_replaced_by=True) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket(size=5, price=99.0, stopprice=95.0, limitprice=110.0)},
            config=fast_config(server, api, use_stream=False, refresh_interval_s=0.1),
        )
        lookups: dict[str, int] = {}

        def play() -> None:
            server_order(server, run, "parent")
            server.set_price("AAPL", 98.5)
            wait_until(lambda: ended(run, "parent", "Completed"), what="entry filled")
            stop_leg = next(o for o in server.orders.values() if o.type == "stop")
            server.set_price("AAPL", 94.0)
            successor = next(o for o in server.orders.values() if o.replaces == stop_leg.id)
            server.vanish(successor.id)  # the API never shows the order that replaced it
            wait_until(lambda: ended(run, "stop", "Canceled"), what="stop leg given up")
            wait_until(
                lambda: run.broker.ledger.qty.get("AAPL") == 0, what="position from the account"
            )
            lookups["at_end"] = server.count_kind("order")
            reads = server.count_kind("account")
            wait_until(lambda: server.count_kind("account") >= reads + 3, what="3 more refreshes")
            lookups["after"] = server.count_kind("order")

        drive(run, [bar(run, "AAPL", 100.0), play])
        reason = order_of(run, "stop").info["reason"]
        assert "replacement could not be found" in reason
        assert bt_positions(run) == server.position_qty() == {}
        # no lookup of the lost leg once it ended (nothing is followed any more)
        assert lookups["after"] == lookups["at_end"]


# -- item 2: flatten on a bracketed position ------------------------------------------------------


def test_kill_switch_flatten_waits_for_the_legs_cancels(api: str) -> None:
    """The legs' shares stay reserved while their cancels are pending (Alpaca answers a close
    with 403 "insufficient qty available"): the close waits until they settle, then fills."""
    risk = RiskConfig(max_daily_loss_usd=100.0, kill_action="flatten")
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=0.2) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket(size=50, exectype=bt.Order.Market, stopprice=90.0, limitprice=120.0)},
            risk=risk,
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "parent", "Completed"), what="entry"),
                bar(run, "AAPL", 97.0),  # 50 x 3 USD lost: the kill switch trips, flattens
                lambda: wait_until(lambda: server.position_qty() == {}, what="flat at Alpaca"),
                bar(run, "AAPL", 97.0),
            ],
        )
        submits = [r for r in server.requests if r.kind == "submit"]
        assert [r.status for r in submits] == [200, 200]  # the bracket, then the close: no 403
        assert statuses(run, order_of(run, "stop").ref)[-1] == "Canceled"
        assert statuses(run, order_of(run, "take").ref)[-1] == "Canceled"
        closes = [n for n in run.log.notes if n.reason and n.reason.startswith("risk: flatten")]
        assert closes and closes[-1].status == "Completed"
        assert bt_positions(run) == server.position_qty() == {}


def test_close_after_cancels_retries_while_shares_stay_reserved(api: str) -> None:
    """A cancel that stays ``pending_cancel`` (outside market hours it can for minutes): the
    close goes after a while, is refused 403 "insufficient qty available" while the shares are
    still held, and is retried until the cancel settles."""
    with make_server(
        prices={"AAPL": 100.0}, fill_mode="immediate", cancel_latency_s=None
    ) as server:

        def cancel_then_close(s: Any) -> None:
            s.cancel(s.p.log.orders["stop"])
            s.p.log.orders["close"] = s.close()

        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("entry", size=10),
                2: sell("stop", size=10, exectype=bt.Order.Stop, price=80.0),
                3: cancel_then_close,
            },
        )

        def settle_after_a_refusal() -> None:
            wait_until(
                lambda: any(r.kind == "submit" and r.status == 403 for r in server.requests),
                what="the close refused while the cancel is pending",
            )
            server.settle_cancels()
            wait_until(lambda: ended(run, "close", "Completed"), what="close filled")

        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "stop", "Accepted"), what="stop working"),
                bar(run, "AAPL", 100.0),
                settle_after_a_refusal,
            ],
        )
        assert statuses(run, order_of(run, "stop").ref)[-1] == "Canceled"
        assert statuses(run, order_of(run, "close").ref) == ["Submitted", "Accepted", "Completed"]
        assert bt_positions(run) == server.position_qty() == {}


# -- item 3: the Broker API -------------------------------------------------------------------


def test_trading_keys_are_refused_by_the_broker_api() -> None:
    with make_server() as server:
        cfg = fast_config(server, "broker")
        wrong = AlpacaPaperTradingBroker(
            fast_config(server, "broker", api_key=cfg.api_key.__class__(server.api_key)),
            session_id=new_session(),
        )
        with pytest.raises(BrokerError, match=r"cannot read the Alpaca account.*401"):
            wrong.connect()
        assert [r.status for r in server.requests] == [401]  # not retried: a 4xx
        assert server.requests[0].path == f"/v1/trading/accounts/{server.account_id}/account"
        other = AlpacaPaperTradingBroker(
            fast_config(server, "broker", account_id="00000000-0000-4000-8000-000000000000"),
            session_id=new_session(),
        )
        with pytest.raises(BrokerError, match="account not found"):
            other.connect()


# -- item 4: an outage of the clock ---------------------------------------------------------------


def test_clock_outage_keeps_a_closed_market_order_waiting_and_the_run_alive(api: str) -> None:
    with make_server(market_open=False, fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        server.set_clock(is_open=False, next_open=now() + timedelta(hours=1))
        run = run_on(api, server, ("AAPL",), {1: buy("eq", size=1)})

        def outage() -> None:
            wait_until(lambda: ended(run, "eq", "Submitted"), what="submitted")
            server.fail_clock = True  # 503 on every clock read from now
            failed = sum(1 for r in server.requests if r.kind == "clock" and r.status == 503)
            wait_until(
                lambda: (
                    sum(1 for r in server.requests if r.kind == "clock" and r.status == 503)
                    >= failed + 5
                ),
                what="5 failed clock reads",
            )
            assert server.count_kind("submit") == 0  # the last read still proves it closed
            assert run.broker.healthy
            server.fail_clock = False
            server.set_clock(is_open=True, next_close=now() + timedelta(hours=6))
            wait_until(lambda: ended(run, "eq", "Completed"), what="filled after the open")

        drive(run, [bar(run, "AAPL", 100.0), outage])
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(1)}


def test_clock_outage_when_the_last_read_said_open_sends_the_order(api: str) -> None:
    with make_server(fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        # the market closes in 0.1 s by the clock read at start: the next order needs a read
        server.set_clock(is_open=True, next_close=now() + timedelta(seconds=0.1))
        run = run_on(api, server, ("AAPL",), {2: buy("eq", size=2)})

        def outage() -> None:
            server.fail_clock = True

        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                outage,
                lambda: time.sleep(0.15),  # past the clock's next_close (a wall-clock rule)
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "eq", "Completed"), what="filled"),
            ],
        )
        assert any(r.kind == "clock" and r.status == 503 for r in server.requests)
        # sent anyway (Alpaca queues orders placed while closed); the run did not end
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(2)}


# -- item 5: a lost submit answered 4xx on its retry --------------------------------------------


def test_lost_submit_whose_retry_is_refused_is_looked_up_not_rejected(api: str) -> None:
    # the first POST is carried out and its answer lost; the retry then finds the buying
    # power used by that very order: 403 insufficient buying power
    plan = FaultPlan(forced=(("submit", "reset", True),))
    with make_server(faults=plan, fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        run = run_on(api, server, ("AAPL",), {1: buy("b", size=600)})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "b", "Completed"), what="fill"),
            ],
        )
        posts = [(r.fault, r.status) for r in server.requests if r.kind == "submit"]
        assert posts == [("reset", 0), (None, 403)]
        assert server.count_kind("by_coid") == 1
        assert len(server.orders) == 1
        assert statuses(run, order_of(run, "b").ref) == ["Submitted", "Accepted", "Completed"]
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(600)}


def test_retry_refused_and_no_order_landed_is_rejected_with_alpacas_message(api: str) -> None:
    plan = FaultPlan(forced=(("submit", "reset", False),))
    with make_server(faults=plan, cash_usd=1000.0, prices={"AAPL": 100.0}) as server:
        run = run_on(api, server, ("AAPL",), {1: buy("b", size=50)})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "b", "Rejected"), what="rejected"),
            ],
        )
        reason = order_of(run, "b").info["reason"]
        assert "insufficient buying power" in reason and "no order with this" in reason
        assert server.orders == {}


# -- item 6: the request budget -----------------------------------------------------------------


@pytest.mark.parametrize("use_stream", [False, True])
def test_fifty_open_brackets_stay_within_the_rate_limit(api: str, use_stream: bool) -> None:
    """50 brackets whose entries filled: Alpaca lists only their take-profit legs, the stop
    legs are held. A poll is still one request; the rate (scaled to Alpaca's 2 s poll period)
    stays far under 200 requests per minute, and the server never answers 429."""
    n = 50
    with make_server(prices={"AAPL": 100.0}, cash_usd=1_000_000.0) as server:

        def open_brackets(s: Any) -> None:
            for i in range(n):
                o, _stop, _take = s.buy_bracket(
                    size=1, price=99.0, stopprice=80.0 - i * 0.1, limitprice=150.0 + i
                )
                s.p.log.orders[f"p{i}"] = o

        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: open_brackets},
            config=fast_config(server, api, use_stream=use_stream),
        )
        rate: dict[str, float] = {}

        def measure() -> None:
            wait_until(
                lambda: sum(1 for k in range(n) if ended(run, f"p{k}", "Accepted")) == n,
                timeout_s=20,
                what="brackets accepted",
            )
            server.set_price("AAPL", 98.0)  # every entry fills
            wait_until(
                lambda: sum(1 for k in range(n) if ended(run, f"p{k}", "Completed")) == n,
                timeout_s=20,
                what="entries filled",
            )
            # count over the next 20 polls (after the account read that follows the fills)
            reads = server.count_kind("account")
            wait_until(lambda: server.count_kind("account") > reads, what="account read")
            t0, c0 = time.perf_counter(), len(server.requests)
            lists0, lookups0 = server.count_kind("list"), server.count_kind("order")
            wait_until(
                lambda: server.count_kind("list") >= lists0 + 20, timeout_s=20, what="20 polls"
            )
            elapsed, count = time.perf_counter() - t0, len(server.requests) - c0
            rate["per_min"] = count / (elapsed * TIME_SCALE / 60.0)
            rate["lookups"] = server.count_kind("order") - lookups0

        drive(run, [bar(run, "AAPL", 100.0), measure], timeout_s=60)
        assert server.rate.rejected == 0
        assert rate["lookups"] == 0  # a poll is the list call alone, however many brackets
        assert rate["per_min"] < 100  # Alpaca allows 200
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(n)}


def test_rate_limit_answers_are_waited_out(api: str) -> None:
    """A tight limit (10 requests per scaled minute, against a poll every 30 ms while an order
    rests): 429s come back and are retried after a wait; nothing is lost."""
    with make_server(
        prices={"AAPL": 100.0}, fill_mode="immediate", rate_limit_per_min=10
    ) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                # a resting trailing buy stop: trailing stops are exempt from the wash-trade
                # check (docs "User Protection"); a resting buy limit or stop would make the
                # market sell below a potential wash trade, which Alpaca refuses
                1: buy("rest", size=1, exectype=bt.Order.StopTrail, trailpercent=0.5),
                2: buy("a", size=1),
                3: buy("b", size=2),
                4: sell("c", size=3),
            },
            config=fast_config(server, api, use_stream=False, max_attempts=30),
        )

        def limit_hit() -> None:
            wait_until(lambda: server.rate.rejected > 0, what="a 429")

        def filled() -> None:
            wait_until(lambda: all(ended(run, k, "Completed") for k in "abc"), what="all filled")

        drive(run, [bar(run, "AAPL", 100.0), limit_hit] + [bar(run, "AAPL", 100.0)] * 3 + [filled])
        assert server.rate.rejected > 0  # the run met the limit
        assert any(r.status == 429 for r in server.requests)
        assert bt_positions(run) == server.position_qty() == {}


# -- item 7: a restart with open bracket legs ---------------------------------------------------


def open_legs(server: AlpacaServer) -> None:
    """An account as a previous run left it: a bracket and a stop-only OTO whose entries filled
    (take profit working, stop legs held), 8 shares."""
    server.place(
        {
            "symbol": "AAPL",
            "qty": 5,
            "side": "buy",
            "type": "limit",
            "limit_price": 99,
            "time_in_force": "gtc",
            "order_class": "bracket",
            "take_profit": {"limit_price": 110},
            "stop_loss": {"stop_price": 95},
        }
    )
    server.place(
        {
            "symbol": "AAPL",
            "qty": 3,
            "side": "buy",
            "type": "limit",
            "limit_price": 99,
            "time_in_force": "gtc",
            "order_class": "oto",
            "stop_loss": {"stop_price": 90},
        }
    )
    server.set_price("AAPL", 98.5)


def test_restart_halt_sees_held_legs(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        open_legs(server)
        broker = AlpacaPaperTradingBroker(fast_config(server, api), session_id=new_session())
        with pytest.raises(BrokerError, match=r"ALPACA_OPEN_ORDER_POLICY=halt") as err:
            broker.connect()
        assert str(err.value).count("held") == 2  # both stop legs, which no open listing shows


def test_restart_cancel_cancels_held_legs(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        open_legs(server)
        run = run_on(
            api, server, ("AAPL",), {}, config=fast_config(server, api, open_order_policy="cancel")
        )
        drive(run, [bar(run, "AAPL", 98.5)])
        assert server.open_orders() == []  # held legs included
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(8)}


def test_restart_adopt_follows_held_legs_to_their_exits(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        open_legs(server)
        run = run_on(
            api,
            server,
            ("AAPL",),
            {},
            config=fast_config(server, api, open_order_policy="adopt", use_stream=False),
        )

        def exits() -> None:
            wait_until(
                lambda: len([n for n in run.log.notes if n.status == "Accepted"]) == 3,
                what="3 legs adopted",
            )
            server.set_price("AAPL", 94.0)  # the bracket's stop triggers
            wait_until(
                lambda: [n.status for n in run.log.notes].count("Completed") == 1,
                what="bracket stop filled",
            )
            server.set_price("AAPL", 89.0)  # the OTO's stop triggers (no order of it listed)
            wait_until(
                lambda: [n.status for n in run.log.notes].count("Completed") == 2,
                what="oto stop filled",
            )

        drive(run, [bar(run, "AAPL", 98.5), exits])
        final = {n.ref: n.status for n in run.log.notes}
        assert sorted(final.values()) == ["Canceled", "Completed", "Completed"]
        assert bt_positions(run) == server.position_qty() == {}
        assert server.open_orders() == []


# -- item 8: crypto fees and rules -----------------------------------------------------------


def test_crypto_fee_in_the_coin_is_commission_and_close_sells_what_is_held(api: str) -> None:
    """Alpaca keeps a buy's fee out of the coins (0.25% taker, docs "Crypto Fees"): the
    position is what Alpaca holds, the fee is the order's commission, and ``close()`` sells
    exactly that (more would be refused for insufficient balance)."""
    with make_server(fill_mode="immediate", prices={"BTC/USD": 90000.0}) as server:

        def close(s: Any) -> None:
            s.p.log.orders["c"] = s.close()

        run = run_on(api, server, ("BTC/USD",), {1: buy("b", size=0.5), 3: close})
        drive(
            run,
            [
                bar(run, "BTC/USD", 90000.0),
                lambda: wait_until(lambda: ended(run, "b", "Completed"), what="buy"),
                bar(run, "BTC/USD", 90000.0),
                bar(run, "BTC/USD", 90000.0),
                lambda: wait_until(lambda: ended(run, "c", "Completed"), what="close"),
            ],
        )
        b, c = order_of(run, "b"), order_of(run, "c")
        assert b.executed.comm == pytest.approx(0.5 * 0.0025 * 90000.0)  # 0.00125 BTC
        assert c.created.size == pytest.approx(-(0.5 - 0.00125))  # the coins Alpaca holds
        assert c.executed.comm == pytest.approx(112.22)  # a sale pays its fee in USD
        assert not any(r.status == 403 for r in server.requests)
        assert bt_positions(run) == server.position_qty() == {}
        assert run.broker.getcash() == pytest.approx(float(server.cash))


def test_crypto_maker_fee_is_corrected_by_the_account(api: str) -> None:
    """A resting limit pays the maker fee (0.15%), less than the taker fee booked at the fill:
    the account read brings the position to Alpaca's, and the close sells all of it."""
    with make_server(prices={"BTC/USD": 90000.0}, tick_interval_s=0.02) as server:

        def close(s: Any) -> None:
            s.p.log.orders["c"] = s.close()

        run = run_on(
            api,
            server,
            ("BTC/USD",),
            {1: buy("b", size=0.5, exectype=bt.Order.Limit, price=89000.0), 3: close},
        )

        def fill_then_settle() -> None:
            server_order(server, run, "b")
            server.set_price("BTC/USD", 88900.0)  # the resting limit fills: maker fee
            wait_until(lambda: ended(run, "b", "Completed"), what="buy filled")
            assert run.broker.ledger.qty["BTCUSD"] == Decimal("0.49875")  # taker estimate
            wait_until(
                lambda: run.broker.ledger.qty["BTCUSD"] == Decimal("0.49925"),
                what="Alpaca's position",
            )
            server.set_price("BTC/USD", 90000.0)

        drive(
            run,
            [
                bar(run, "BTC/USD", 90000.0),
                fill_then_settle,
                bar(run, "BTC/USD", 90000.0),
                bar(run, "BTC/USD", 90000.0),
                lambda: wait_until(lambda: ended(run, "c", "Completed"), what="close"),
            ],
        )
        assert order_of(run, "c").created.size == pytest.approx(-0.49925)
        assert bt_positions(run) == server.position_qty() == {}


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (sell("s", size=0.1, exectype=bt.Order.Stop, price=80000.0), "stop-limit crypto orders"),
        (
            bracket(size=0.1, price=89000.0, stopprice=85000.0, limitprice=95000.0),
            "no bracket, OTO or OCO crypto orders",
        ),
    ],
)
def test_crypto_orders_alpaca_refuses_are_rejected_before_sending(
    api: str, action: Any, message: str
) -> None:
    with make_server(prices={"BTC/USD": 90000.0}) as server:
        server.add_position("BTC/USD", 0.5, 80000.0)
        run = run_on(api, server, ("BTC/USD",), {1: action})
        drive(
            run,
            [
                bar(run, "BTC/USD", 90000.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Rejected"), what="rejected"
                ),
            ],
        )
        reasons = [n.reason for n in run.log.notes if n.status == "Rejected"]
        assert reasons and message in str(reasons[0])
        assert server.count_kind("submit") == 0


# -- item 9: valid=, oco=, extended hours ---------------------------------------------------------


def test_valid_day_and_good_till_date(api: str) -> None:
    def orders(s: Any) -> None:
        t = s.datas[0].datetime.datetime(0)
        buy("day", size=1, exectype=bt.Order.Limit, price=90.0, valid=bt.Order.DAY)(s)
        buy("gtd", size=1, exectype=bt.Order.Limit, price=91.0, valid=t + timedelta(minutes=2))(s)
        buy("later", size=1, exectype=bt.Order.Limit, price=89.0, valid=t + timedelta(days=3))(s)

    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(api, server, ("AAPL",), {1: orders})
        steps = [bar(run, "AAPL", 100.0) for _ in range(5)]  # one minute apart
        steps.append(lambda: wait_until(lambda: ended(run, "gtd", "Expired"), what="expired"))
        drive(run, steps)
        day, gtd, later = (server_order(server, run, k) for k in ("day", "gtd", "later"))
        assert day["time_in_force"] == "day"  # Alpaca's own day order
        # Alpaca has no good-till-date: a day order expired here when a bar passes valid=
        assert gtd["time_in_force"] == "day" and gtd["status"] == "canceled"
        assert later["time_in_force"] == "gtc"  # past today: gtc, expired here in 3 days
        assert statuses(run, order_of(run, "gtd").ref) == ["Submitted", "Accepted", "Expired"]
        assert statuses(run, order_of(run, "day").ref)[:2] == ["Submitted", "Accepted"]


def test_oco_pair_is_one_alpaca_oco_order(api: str) -> None:
    def exits(s: Any) -> None:
        take = s.sell(size=5, exectype=bt.Order.Limit, price=110.0, transmit=False)
        stop = s.sell(size=5, exectype=bt.Order.Stop, price=95.0, oco=take)
        s.p.log.orders.update(take=take, stop=stop)

    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("entry", size=5), 2: exits},
            config=fast_config(server, api, use_stream=False),
        )

        def trigger() -> None:
            wait_until(lambda: ended(run, "stop", "Accepted"), what="oco working")
            server.set_price("AAPL", 94.0)
            wait_until(
                lambda: ended(run, "stop", "Completed") and ended(run, "take", "Canceled"),
                what="stop exit",
            )

        drive(run, [bar(run, "AAPL", 100.0), bar(run, "AAPL", 100.0), trigger])
        posts = [r.body for r in server.requests if r.kind == "submit"]
        assert len(posts) == 2 and posts[1]["order_class"] == "oco"  # one request for the pair
        assert posts[1]["take_profit"] == {"limit_price": 110.0}
        assert posts[1]["stop_loss"] == {"stop_price": 95.0}
        assert bt_positions(run) == server.position_qty() == {}


def test_oco_group_alpaca_cannot_take_is_kept_by_the_broker(api: str) -> None:
    """Two entry limits in one ``oco=`` group (Alpaca's OCO is for exits): sent apart, and when
    one fills this broker cancels the other."""

    def entries(s: Any) -> None:
        a = s.buy(size=1, exectype=bt.Order.Limit, price=91.0)
        b = s.buy(size=1, exectype=bt.Order.Limit, price=90.0, oco=a)
        s.p.log.orders.update(a=a, b=b)

    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(api, server, ("AAPL",), {1: entries})

        def fill_one() -> None:
            wait_until(lambda: ended(run, "b", "Accepted"), what="both working")
            server.set_price("AAPL", 90.5)  # crosses 91 only
            wait_until(lambda: ended(run, "b", "Canceled"), what="the other canceled")

        drive(run, [bar(run, "AAPL", 100.0), fill_one])
        assert statuses(run, order_of(run, "a").ref)[-1] == "Completed"
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(1)}


def test_extended_hours_order_is_sent_while_the_market_is_closed(api: str) -> None:
    with make_server(market_open=False, fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        server.set_clock(is_open=False, next_open=now() + timedelta(hours=1))

        def orders(s: Any) -> None:
            buy("ext", size=1, exectype=bt.Order.Limit, price=101.0, extended_hours=True)(s)
            buy("plain", size=1, exectype=bt.Order.Limit, price=101.0)(s)

        run = run_on(api, server, ("AAPL",), {1: orders})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "ext", "Completed"), what="ext filled"),
            ],
        )
        posts = [r.body for r in server.requests if r.kind == "submit"]
        assert len(posts) == 1 and posts[0]["extended_hours"] is True
        assert statuses(run, order_of(run, "plain").ref) == ["Submitted", "Canceled"]  # at stop
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(1)}


# -- item 10: shutdown --------------------------------------------------------------------------


def test_cancel_on_stop_waits_out_the_rate_limit_and_reaches_agent_and_record(api: str) -> None:
    """At stop the cancel meets 429s (a tight rate limit): it waits for the counter's reset
    instead of burning its attempts; the Canceled made at stop reaches ``notify_order`` and a
    last decision record (stage STOP)."""
    from analyzers.fmel import FMELAnalyzer

    with make_server(prices={"AAPL": 100.0}, rate_limit_per_min=12) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("lim", size=1, exectype=bt.Order.Limit, price=80.0)},
            config=fast_config(
                server, api, cancel_on_stop=True, use_stream=False, stop_timeout_s=10.0
            ),
            analyzers=((FMELAnalyzer, {"_name": "fmel"}),),
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(lambda: ended(run, "lim", "Accepted"), what="accepted"),
                lambda: wait_until(lambda: server.rate.rejected > 0, what="rate limited"),
            ],
        )
        assert server.open_orders() == []
        assert statuses(run, order_of(run, "lim").ref) == ["Submitted", "Accepted", "Canceled"]
        records = run.strategy.analyzers.fmel.records
        assert records[-1].stage == "STOP"
        assert [a.event for a in records[-1].actions][-1] == "CANCELED"
        report = run.broker.report
        assert report is not None and report.open_orders_left == 0


def test_fill_seen_at_stop_reaches_agent_and_record(api: str) -> None:
    from analyzers.fmel import FMELAnalyzer

    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("lim", size=3, exectype=bt.Order.Limit, price=99.0)},
            config=fast_config(server, api, use_stream=False, poll_interval_s=30.0),
            analyzers=((FMELAnalyzer, {"_name": "fmel"}),),
        )

        def fill_late() -> None:
            server_order(server, run, "lim")
            server.set_price("AAPL", 98.0)  # fills; the next poll is 30 s away: only stop sees it

        drive(run, [bar(run, "AAPL", 100.0), fill_late])
        assert statuses(run, order_of(run, "lim").ref)[-1] == "Completed"
        last = run.strategy.analyzers.fmel.records[-1]
        assert last.stage == "STOP" and [a.event for a in last.actions][-1] == "COMPLETED"
        assert last.positions[0].size == 3.0 and last.portfolio_cash == pytest.approx(
            100_000 - 3 * 99.0
        )
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(3)}


# -- item 11: one consistent account per decision record ------------------------------------------


def test_every_decision_record_has_cash_value_and_positions_of_one_moment(api: str) -> None:
    """The record of the bar that first shows a new position also shows the cash it cost, and
    value = cash + positions at the bar's close, in every record."""
    from analyzers.fmel import FMELAnalyzer

    closes = [100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("a", size=10), 3: buy("b", size=5), 5: sell("c", size=15)},
            config=fast_config(server, api, refresh_interval_s=0.05),
            quicknotify=False,
            analyzers=((FMELAnalyzer, {"_name": "fmel"}),),
        )

        def bar_after_fills(close: float) -> Any:
            step = bar(run, "AAPL", close)

            def go() -> None:
                step()
                sent = list(run.log.orders.values())
                wait_until(
                    lambda: all(not o.alive() for o in sent) or server.count_kind("submit") == 0,
                    what="orders done",
                )

            return go

        drive(run, [bar_after_fills(c) for c in closes])
        records = run.strategy.analyzers.fmel.records
        bars = [r for r in records if r.stage != "STOP"]
        assert len(bars) == len(closes)
        for rec, close in zip(bars, closes, strict=True):
            held = sum(p.size for p in rec.positions)
            assert rec.portfolio_value == pytest.approx(rec.portfolio_cash + held * close), rec
        cash_before = 100_000.0
        for rec in bars:
            held = sum(p.size for p in rec.positions)
            if held:
                assert rec.portfolio_cash < cash_before  # the position and its cost together
                break


def test_a_stalled_alpaca_does_not_hold_the_stop_past_its_budget(api: str) -> None:
    """helper-82: with every request stalled, the stop joined each thread for
    ``request_timeout_s + 5`` s in turn (a SIGTERM took 24 s with SHUTDOWN_TIMEOUT_S=3). The
    threads' stop and the final sync now share ALPACA_STOP_TIMEOUT_S."""
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {},
            config=fast_config(server, api, request_timeout_s=3.0, stop_timeout_s=1.0),
        )
        marks: list[float] = []

        def stall() -> None:
            server.faults = FaultPlan(rate=1.0, kinds=("timeout",), stall_s=30.0)
            time.sleep(0.5)  # the threads are now inside stalled requests
            marks.append(time.monotonic())

        drive(run, [bar(run, "AAPL", 100.0), stall], timeout_s=60)
        elapsed = time.monotonic() - marks[0]
        # the 1 s budget (before: 3 + 5 s a thread; a request is never begun past it)
        assert elapsed < 1.0 + 2.0, elapsed


@pytest.mark.parametrize(
    ("stream_api", "when", "latency_s"),
    [
        ("broker", "reconnect", 0.5),
        ("broker", "reconnect", 5.0),
        ("broker", "first connect", 5.0),
        ("trading", "reconnect", 5.0),
    ],
)
def test_a_stop_while_the_stream_connects_keeps_the_budget_for_the_final_sync(
    caplog: pytest.LogCaptureFixture, stream_api: str, when: str, latency_s: float
) -> None:
    """A CI run (2026-12-06): the stop came while the Broker API's events stream was
    connecting, so it found no response to interrupt; the stream thread then read heartbeats
    until its 60 s read timeout, spent the stop's budget (3 s here), and the final sync was
    skipped (an order left open at Alpaca). Now the stream checks the stop once it has an
    answer, and a stream still waiting for one (helper-96: 5 s, longer than the budget; the
    Trading API's websocket too) is left behind after ``STREAM_STOP_S`` with a warning; the
    final sync runs either way."""
    from runtime.brokers.alpaca.worker import STREAM_STOP_S

    with make_server(prices={"AAPL": 100.0}) as server:
        kind = "events" if stream_api == "broker" else "stream"
        if when == "first connect":
            server.stream_connect_latency_s = latency_s
        run = run_on(stream_api, server, ("AAPL",), {})
        connects: list[int] = []

        def reconnect_slowly() -> None:
            if when == "first connect":
                wait_until(lambda: server.count_kind(kind) > 0, what="the stream's connect")
                return
            wait_until(lambda: server.stream_clients() == 1, what="the stream")
            connects.append(server.count_kind(kind))
            server.stream_connect_latency_s = latency_s  # the next connect answers late
            server.drop_streams()
            wait_until(lambda: server.count_kind(kind) > connects[0], what="the reconnect")
            # the run now stops while that request waits for its answer

        t0 = time.monotonic()
        drive(run, [bar(run, "AAPL", 100.0), reconnect_slowly])
        elapsed = time.monotonic() - t0
        messages = [r.getMessage() for r in caplog.records]
        assert not [m for m in messages if "did not stop" in m]
        assert not [m for m in messages if "final sync" in m]
        left = [m for m in messages if "left behind (a daemon)" in m]
        assert elapsed < min(latency_s, STREAM_STOP_S) + 2.0, elapsed
        if latency_s < STREAM_STOP_S:
            assert not left and "alpaca-stream" not in alpaca_threads()
        else:
            assert len(left) == 1
            # once answered, the thread sees the stop and ends (not a thread for good)
            wait_until(
                lambda: "alpaca-stream" not in alpaca_threads(),
                timeout_s=latency_s + 5,
                what="the stream thread's end",
            )


def test_a_stop_with_a_frozen_websocket_keeps_the_budget_for_the_final_sync(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """helper-96: the websocket's path froze (a dead NAT or load balancer: nothing forwarded,
    nothing closed) and the run stopped. The stop waited 5 s for the websocket's close
    handshake before joining anything, past the 3 s budget, and the final sync was skipped.
    The stream's stop now has ``STREAM_STOP_S`` of the budget."""
    from runtime.brokers.alpaca.worker import STREAM_STOP_S
    from tests.tcp_proxy import TcpProxy

    with make_server(prices={"AAPL": 100.0}) as server:
        proxy = TcpProxy(server.url.split("://", 1)[1].split("/", 1)[0])
        try:
            config = fast_config(server, "trading", stream_url=f"ws://{proxy.address}/stream")
            run = run_on("trading", server, ("AAPL",), {}, config=config)

            def freeze() -> None:
                wait_until(lambda: server.stream_clients() == 1, what="the websocket")
                proxy.cut("blackhole")

            t0 = time.monotonic()
            drive(run, [bar(run, "AAPL", 100.0), freeze])
            elapsed = time.monotonic() - t0
        finally:
            proxy.close()
        messages = [r.getMessage() for r in caplog.records]
        assert not [m for m in messages if "did not stop" in m or "final sync" in m]
        assert len([m for m in messages if "left behind (a daemon)" in m]) == 1
        assert elapsed < STREAM_STOP_S + 2.0, elapsed


def test_a_stop_before_the_websocket_stream_exists_ends_its_thread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The Trading API's stream thread makes its ``TradingStream`` first; a stop that comes
    before it exists finds nothing to stop. The thread then checks the stop before running
    the stream, instead of running it past the stop's budget. The thread is held in the
    stream's construction here (a slow start of the thread, as under load) until the stop
    has begun."""
    import threading

    from runtime.brokers.alpaca import worker as worker_module

    release = threading.Event()
    making = threading.Event()
    make = worker_module._TradeStream.__init__

    def slow_make(self: Any, *args: Any, **kw: Any) -> None:
        making.set()
        release.wait(10)
        make(self, *args, **kw)

    monkeypatch.setattr(worker_module._TradeStream, "__init__", slow_make)
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on("trading", server, ("AAPL",), {})

        def release_once_stopping() -> None:
            assert making.wait(10)
            # the feeds end when this step returns; the stop begins a few ms later
            threading.Timer(0.5, release.set).start()

        t0 = time.monotonic()
        drive(run, [bar(run, "AAPL", 100.0), release_once_stopping])
        assert release.is_set()
        assert "alpaca-stream" not in alpaca_threads()
        assert not [r for r in caplog.records if "did not stop" in r.getMessage()]
        assert not [r for r in caplog.records if "final sync" in r.getMessage()]
        assert time.monotonic() - t0 < 0.5 + 2.5


def test_a_stalled_alpaca_turns_readiness_off_within_a_request_timeout(api: str) -> None:
    """helper-82: while every request stalled, ``healthy`` (readiness's ``broker`` check) said
    reachable until a poll had failed every retry (here 40 attempts of 0.5 s: 20 s and more).
    Now a monitor pass overdue by a request's timeout and a second turns it off; it is back
    on after the next pass that gets answers."""
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {},
            config=fast_config(server, api, request_timeout_s=0.5, max_attempts=40),
        )
        seen: list[float] = []

        def stall_then_recover() -> None:
            assert run.broker.healthy
            server.faults = FaultPlan(rate=1.0, kinds=("timeout",), stall_s=2.0)
            t0 = time.monotonic()
            wait_until(lambda: not run.broker.healthy, what="unhealthy", timeout_s=15)
            seen.append(time.monotonic() - t0)
            server.faults = FaultPlan()  # none
            wait_until(lambda: run.broker.healthy, what="healthy again", timeout_s=30)

        drive(run, [bar(run, "AAPL", 100.0), stall_then_recover], timeout_s=90)
        # the pass limit (poll interval + 0.5 s + 1 s) and the wait's own polling
        assert seen and seen[0] < 5.0, seen


def test_a_stop_ends_a_start_up_read_that_trickles() -> None:
    """helper-86 F1: an Alpaca answering a byte at a time (each within the request timeout,
    which applies per read of the socket) held a SIGTERM during the broker's start-up reads
    for good. The stop now ends the wait for the read in flight at once."""
    import threading

    from core.errors import RetryInterruptedError
    from core.secret import Secret
    from runtime.brokers.alpaca.config import AlpacaBrokerConfig
    from tests.trickle_server import trickling_server

    with trickling_server() as server:
        config = AlpacaBrokerConfig(
            api_key=Secret("PKTESTKEY0123456789X", source="test"),
            secret_key=Secret("test-secret-0123456789abcdefghij", source="test"),
            base_url=server.url,
            request_timeout_s=1.0,
            max_attempts=3,
        )
        broker = AlpacaPaperTradingBroker(config, session_id="trickle")
        errors: list[BaseException] = []

        def connect() -> None:
            try:
                broker.connect()
            except BaseException as e:  # checked below
                errors.append(e)

        worker = threading.Thread(target=connect, daemon=True)
        worker.start()
        wait_until(lambda: bool(server.accepted), timeout_s=10.0, what="a connection")
        # past one request timeout and a second the answer is still trickling in: readiness
        # says so already during the start-up reads (helper-86 F7)
        assert broker.healthy
        wait_until(lambda: not broker.healthy, timeout_s=5.0, what="unreachable")
        t0 = time.monotonic()
        broker.interrupt_connect()
        worker.join(5.0)
        elapsed = time.monotonic() - t0
    assert not worker.is_alive(), "connect() still waits after the stop"
    assert len(errors) == 1 and isinstance(errors[0], RetryInterruptedError), errors
    assert elapsed < 1.0, elapsed


def test_a_slow_alpaca_that_answers_stays_ready(api: str) -> None:
    """helper-86 F6: readiness judged by a whole monitor pass (several requests) flapped to
    "unreachable" on an Alpaca answering every request in 2-4 s, within the timeout. It now
    judges requests: one answered within its timeout is reachable, however long a pass."""
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {},
            config=fast_config(server, api, request_timeout_s=1.0, refresh_interval_s=0.2),
        )
        flaps: list[float] = []

        def slow() -> None:
            # each answer within the 1 s timeout; a pass (orders, account, positions, account)
            # takes 3.2 s, past the old rule's interval + 1 s + 1 s
            server.answer_latency_s = 0.8
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8.0:  # passes of several slow requests each
                if not run.broker.healthy:
                    flaps.append(time.monotonic() - t0)
                time.sleep(0.01)
            server.answer_latency_s = 0.0

        drive(run, [bar(run, "AAPL", 100.0), slow], timeout_s=60)
        assert not flaps, f"unreachable at {flaps[:5]} s"
