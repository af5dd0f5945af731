"""AlpacaPaperTradingBroker against the local Alpaca server, driven by a real Cerebro run in
next-by-next mode with queue-fed live feeds (tests/alpaca_harness.py), on both Alpaca APIs
(the Trading API and the Broker API on one account: every test runs on each).

Every scenario checks what the agent saw (notifications, in order, each once) and that
backtrader's positions equal the server's at the end.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from decimal import Decimal
from typing import Any

import backtrader as bt
import pytest

from core.errors import BrokerError
from runtime.brokers.alpaca.broker import AlpacaPaperTradingBroker
from runtime.config import load_config
from runtime.runner import Runner
from tests.alpaca_harness import (
    alpaca_threads,
    api,
    bar,
    bars,
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
# fixture: every scenario runs on both Alpaca APIs


# -- the basic lifecycle --------------------------------------------------------------------


def test_market_order_fills_and_notifies_once_each(api: str) -> None:
    with make_server(fill_mode="immediate", prices={"AAPL": 101.25}) as server:
        run = run_on(api, server, ("AAPL",), {1: buy("b", size=10)})
        drive(
            run,
            [
                bar(run, "AAPL", 101.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Completed"), what="fill"
                ),
            ],
        )
        ref = order_of(run, "b").ref
        assert statuses(run, ref) == ["Submitted", "Accepted", "Completed"]
        fills = [f for n in run.log.notes if n.ref == ref for f in n.fills]
        assert fills == [(10.0, 101.25)]
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(10)}
        assert run.broker.getcash() == pytest.approx(100_000 - 1012.5)
        assert run.broker.getvalue() == pytest.approx(100_000)
        assert server.order_by_coid(f"{run.broker.session_id}-{ref}") is not None
    assert alpaca_threads() == []


def test_partial_fills_sum_exactly_fractional_crypto(api: str) -> None:
    parts = [Decimal("0.005"), Decimal("0.0045"), Decimal("0.003")]
    with make_server(prices={"BTC/USD": 91000.0}) as server:
        run = run_on(api, server, ("BTC/USD",), {1: buy("b", size=0.0125)})

        def fill_in_parts() -> None:
            o = server_order(server, run, "b")
            for i, (q, px) in enumerate(
                zip(parts, ("91000.5", "91001.25", "90999.75"), strict=True)
            ):
                server.fill(o["id"], q, Decimal(px))

                def seen(i: int = i) -> bool:
                    return len([n for n in run.log.notes if n.fills]) == i + 1

                wait_until(seen, what=f"fill {i}")

        drive(run, [bar(run, "BTC/USD", 91000.0), fill_in_parts])
        ref = order_of(run, "b").ref
        assert statuses(run, ref) == ["Submitted", "Accepted", "Partial", "Partial", "Completed"]
        sizes = [Decimal(repr(f[0])) for n in run.log.notes if n.ref == ref for f in n.fills]
        prices = [f[1] for n in run.log.notes if n.ref == ref for f in n.fills]
        assert prices == pytest.approx([91000.5, 91001.25, 90999.75])
        # Alpaca keeps its 0.25% taker fee out of the coins bought (docs "Crypto Fees"); each
        # executed size is what the position gained (issue 13, finding 4)
        fee = sum((q * Decimal("0.0025") for q in parts), Decimal(0))
        held = Decimal("0.0125") - fee
        assert sizes == [q * Decimal("0.9975") for q in parts] and sum(sizes) == held
        assert bt_positions(run) == server.position_qty() == {"BTCUSD": held}
        assert run.broker.getposition(run.feeds["BTC/USD"]).size == float(held)  # no drift
        comm = order_of(run, "b").executed.comm
        assert comm == pytest.approx(float(fee) * 91000.5, rel=1e-4)  # the fee, as commission


def test_cancel_is_canceled_not_rejected_and_keeps_partial_fill(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("lim", size=10, exectype=bt.Order.Limit, price=99.0),
                3: lambda s: s.cancel(s.p.log.orders["lim"]),
            },
        )

        def partial() -> None:
            o = server_order(server, run, "lim")
            server.fill(o["id"], 4, 99.0)
            wait_until(lambda: run.log.has(lambda n: n.status == "Partial"), what="partial")

        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                partial,
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Canceled"), what="cancel"
                ),
            ],
        )
        ref = order_of(run, "lim").ref
        assert statuses(run, ref) == ["Submitted", "Accepted", "Partial", "Canceled"]
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(4)}


def test_alpaca_rejection_becomes_rejected_with_alpacas_message(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}, cash_usd=1000.0) as server:
        run = run_on(api, server, ("AAPL",), {1: buy("big", size=50)})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Rejected"), what="reject"
                ),
            ],
        )
        ref = order_of(run, "big").ref
        assert statuses(run, ref) == ["Submitted", "Rejected"]
        reason = next(n.reason for n in run.log.notes if n.status == "Rejected")
        assert reason is not None and "insufficient buying power" in reason
        assert "HTTP 403" in reason and server.count_kind("submit") == 1  # not retried
        assert bt_positions(run) == server.position_qty() == {}


def test_expired_and_venue_rejected(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: buy("a", size=1, exectype=bt.Order.Limit, price=90.0),
                2: buy("b", size=1, exectype=bt.Order.Limit, price=91.0),
            },
        )

        def venue() -> None:
            server.expire(server_order(server, run, "a")["id"])
            server.reject(server_order(server, run, "b")["id"])
            wait_until(
                lambda: (
                    run.log.has(lambda n: n.status == "Expired")
                    and run.log.has(lambda n: n.status == "Rejected")
                ),
                what="expire+reject",
            )

        drive(run, [bar(run, "AAPL", 100.0), bar(run, "AAPL", 100.0), venue])
        assert statuses(run, order_of(run, "a").ref) == ["Submitted", "Accepted", "Expired"]
        assert statuses(run, order_of(run, "b").ref) == ["Submitted", "Accepted", "Rejected"]


def test_replaced_order_is_followed_to_its_replacement(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api, server, ("AAPL",), {1: buy("lim", size=5, exectype=bt.Order.Limit, price=95.0)}
        )

        def replace_then_fill() -> None:
            o = server_order(server, run, "lim")
            wait_until(lambda: run.log.has(lambda n: n.status == "Accepted"), what="accept")
            new_id = server.replace(o["id"], limit_price="97")
            server.set_price("AAPL", 96.5)  # crosses the new limit only
            assert server.order_by_coid(o["client_order_id"])["status"] == "replaced"  # type: ignore[index]
            assert server.orders[new_id].status == "filled"
            wait_until(lambda: run.log.has(lambda n: n.status == "Completed"), what="fill")

        drive(run, [bar(run, "AAPL", 100.0), replace_then_fill])
        assert statuses(run, order_of(run, "lim").ref) == ["Submitted", "Accepted", "Completed"]
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(5)}


# -- brackets ---------------------------------------------------------------------------------


def test_bracket_legs_are_backtrader_children(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket(size=5, price=99.0, stopprice=95.0, limitprice=105.0)},
        )

        def play() -> None:
            o = server_order(server, run, "parent")
            assert o["order_class"] == "bracket" and len(o["legs"]) == 2
            wait_until(
                lambda: len([n for n in run.log.notes if n.status == "Accepted"]) == 3,
                what="3 accepted",
            )
            server.set_price("AAPL", 98.5)  # entry fills; legs go from held to new
            wait_until(lambda: run.log.has(lambda n: n.status == "Completed"), what="entry")
            server.set_price("AAPL", 105.5)  # take profit fills, stop canceled
            wait_until(
                lambda: (
                    len([n for n in run.log.notes if n.status in ("Completed", "Canceled")]) == 3
                ),
                what="exits",
            )

        drive(run, [bar(run, "AAPL", 100.0), play])
        parent, stop, take = (order_of(run, k) for k in ("parent", "stop", "take"))
        assert statuses(run, parent.ref) == ["Submitted", "Accepted", "Completed"]
        assert statuses(run, take.ref) == ["Submitted", "Accepted", "Completed"]
        assert statuses(run, stop.ref) == ["Submitted", "Accepted", "Canceled"]
        assert stop.parent is parent and take.parent is parent
        assert server.count_kind("submit") == 1  # one bracket request, not three
        assert bt_positions(run) == server.position_qty() == {}
        trades = run.strategy._trades[run.feeds["AAPL"]][0]
        assert len(trades) == 1 and trades[0].isclosed
        assert trades[0].pnl == pytest.approx(5 * (105.0 - 99.0))


def test_cancel_of_a_bracket_child_cancels_the_bracket(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: bracket(size=2, price=90.0, stopprice=85.0, limitprice=95.0),
                3: lambda s: s.cancel(s.p.log.orders["take"]),
            },
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: len([n for n in run.log.notes if n.status == "Canceled"]) == 3,
                    what="3 canceled",
                ),
            ],
        )
        for k in ("parent", "stop", "take"):
            assert statuses(run, order_of(run, k).ref)[-1] == "Canceled"
        assert server.open_orders() == []


# -- start-up reconciliation ------------------------------------------------------------------


def test_existing_positions_become_backtrader_positions(api: str) -> None:
    with make_server(fill_mode="immediate", prices={"AAPL": 100.0, "BTC/USD": 90000.0}) as server:
        server.add_position("AAPL", 7, 95.0)
        server.add_position("BTC/USD", 0.25, 80000.0)
        server.add_position("MSFT", 3, 400.0)  # not traded by this run: kept, not shown
        seen: dict[str, float] = {}

        def look_then_close(s: Any) -> None:
            seen.update({d._name: s.getposition(d).size for d in s.datas})
            seen["price"] = s.getposition(s.datas[0]).price
            s.p.log.orders["s"] = s.close(data=s.datas[0])

        run = run_on(api, server, ("AAPL", "BTC/USD"), {1: look_then_close})
        drive(
            run,
            [
                bars(run, {"AAPL": 100.0, "BTC/USD": 90000.0}),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Completed"), what="close"
                ),
            ],
        )
        assert seen == {"AAPL": 7.0, "BTC/USD": 0.25, "price": 95.0}
        assert order_of(run, "s").size == -7
        assert bt_positions(run) == {"BTCUSD": Decimal("0.25")}
        assert server.position_qty() == {"BTCUSD": Decimal("0.25"), "MSFT": Decimal(3)}


def test_open_orders_halt_is_a_clear_error(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        server.place(
            {
                "symbol": "AAPL",
                "qty": 3,
                "side": "buy",
                "type": "limit",
                "limit_price": 90,
                "time_in_force": "gtc",
            }
        )
        run = run_on(api, server, ("AAPL",), {})
        with pytest.raises(BrokerError, match="ALPACA_OPEN_ORDER_POLICY=halt"):
            run.cerebro.run()
    assert alpaca_threads() == []


def test_open_orders_cancel_policy(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        placed = server.place(
            {
                "symbol": "AAPL",
                "qty": 3,
                "side": "buy",
                "type": "limit",
                "limit_price": 90,
                "time_in_force": "gtc",
            }
        )
        server.fill(placed["id"], 1, 90.0)
        run = run_on(
            api, server, ("AAPL",), {}, config=fast_config(server, api, open_order_policy="cancel")
        )
        drive(run, [bar(run, "AAPL", 100.0)])
        assert server.open_orders() == []
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(1)}


def test_open_orders_adopt_policy_tracks_them(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        placed = server.place(
            {
                "symbol": "AAPL",
                "qty": 3,
                "side": "buy",
                "type": "limit",
                "limit_price": 90,
                "time_in_force": "gtc",
            }
        )
        run = run_on(
            api, server, ("AAPL",), {}, config=fast_config(server, api, open_order_policy="adopt")
        )

        def fill() -> None:
            wait_until(lambda: run.log.has(lambda n: n.status == "Accepted"), what="adopted")
            server.fill(placed["id"], 3, 90.0)
            wait_until(lambda: run.log.has(lambda n: n.status == "Completed"), what="fill")

        drive(run, [bar(run, "AAPL", 100.0), fill])
        assert [n.status for n in run.log.notes] == ["Accepted", "Completed"]
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(3)}


@pytest.mark.parametrize("trail", [{"trail_price": "4.5"}, {"trail_percent": "5"}])
def test_adopt_follows_an_open_trailing_stop(api: str, trail: dict[str, str]) -> None:
    """An open trailing stop protecting the position (placed by hand or by an earlier run):
    adopted as a backtrader ``StopTrail`` whose trail and stop are Alpaca's (``trail_price``
    USD, or ``trail_percent`` percent as backtrader's fraction; the stop from ``hwm``, docs
    "Orders at Alpaca", trailing stop orders), then followed to its fill. Before, building it
    raised ``TypeError`` out of the first bar (fresh-context attack)."""
    with make_server(prices={"AAPL": 100.0}) as server:
        server.add_position("AAPL", 10, 90.0)
        placed = server.place(
            {"symbol": "AAPL", "qty": "10", "side": "sell", "type": "trailing_stop"}
            | trail
            | {"time_in_force": "gtc"}
        )
        run = run_on(
            api, server, ("AAPL",), {}, config=fast_config(server, api, open_order_policy="adopt")
        )
        adopted: list[Any] = []

        def check_then_trigger() -> None:
            wait_until(lambda: run.log.has(lambda n: n.status == "Accepted"), what="adopted")
            tr = next(iter(run.broker.book.by_ref.values()))
            adopted.append(tr.order)
            server.set_price("AAPL", 94.0)  # below the stop (95.5 or 95): it triggers
            wait_until(lambda: run.log.has(lambda n: n.status == "Completed"), what="fill")

        drive(run, [bar(run, "AAPL", 100.0), check_then_trigger])
        (order,) = adopted
        assert order.exectype == bt.Order.StopTrail and order.info["alpaca_id"] == placed["id"]
        if "trail_price" in trail:
            assert order.trailamount == pytest.approx(4.5)
            assert order.created.price == pytest.approx(95.5)
        else:
            assert order.trailpercent == pytest.approx(0.05)
            assert order.created.price == pytest.approx(95.0)
        assert bt_positions(run) == server.position_qty() == {}


def test_adopt_needs_a_feed_for_the_symbol(api: str) -> None:
    with make_server(prices={"TSLA": 100.0}) as server:
        server.place(
            {
                "symbol": "TSLA",
                "qty": 1,
                "side": "buy",
                "type": "limit",
                "limit_price": 90,
                "time_in_force": "gtc",
            }
        )
        run = run_on(
            api, server, ("AAPL",), {}, config=fast_config(server, api, open_order_policy="adopt")
        )
        with pytest.raises(BrokerError, match="cannot adopt open orders for TSLA"):
            run.cerebro.run()


def test_unreadable_account_is_an_error_not_an_empty_portfolio(api: str) -> None:
    with make_server() as server:
        server.fail_account = True
        run = run_on(api, server, ("AAPL",), {}, config=fast_config(server, api, max_attempts=3))
        with pytest.raises(BrokerError, match="cannot read the Alpaca account"):
            run.cerebro.run()
        # three attempts (max_attempts), each answered 500, then the error
        assert [r.status for r in server.requests if r.kind == "account"] == [500] * 3
    assert alpaca_threads() == []


def test_blocked_account_refuses_to_start(api: str) -> None:
    with make_server() as server:
        server.account_blocked = True
        run = run_on(api, server, ("AAPL",), {})
        with pytest.raises(BrokerError, match="cannot trade"):
            run.cerebro.run()


# -- market hours -----------------------------------------------------------------------------


def test_equities_wait_for_the_open_crypto_does_not(api: str) -> None:
    with make_server(
        fill_mode="immediate", market_open=False, prices={"AAPL": 100.0, "BTC/USD": 90000.0}
    ) as server:
        server.set_clock(is_open=False, next_open=now() + timedelta(hours=1))
        run = run_on(
            api,
            server,
            ("AAPL", "BTC/USD"),
            {1: lambda s: (buy("eq", size=1)(s), buy("cx", size=0.01, data=s.datas[1])(s))},
        )

        def open_market() -> None:
            wait_until(
                lambda: run.log.has(lambda n: n.symbol == "BTC/USD" and n.status == "Completed"),
                what="crypto fill",
            )
            assert server.count_kind("submit") == 1  # the equity order waits
            eq = order_of(run, "eq").ref
            assert statuses(run, eq) == ["Submitted"]
            server.set_clock(is_open=True, next_close=now() + timedelta(hours=6))
            wait_until(
                lambda: run.log.has(lambda n: n.ref == eq and n.status == "Completed"),
                what="equity fill after the open",
            )

        drive(run, [bars(run, {"AAPL": 100.0, "BTC/USD": 90000.0}), open_market])
        assert (
            bt_positions(run)
            == server.position_qty()
            == {"AAPL": Decimal(1), "BTCUSD": Decimal("0.01") * Decimal("0.9975")}  # the fee
        )


@pytest.mark.parametrize("tif", ["opg", "cls"])
def test_auction_orders_are_sent_while_the_market_is_closed(api: str, tif: str) -> None:
    """A market-on-open (``opg``) order must reach Alpaca before 9:28 ET, and Alpaca rejects
    one sent from then until 19:00 (docs "Orders at Alpaca", time in force): held until the
    open, as regular-session orders are, it could never run (a fresh-context attack). ``cls``
    orders are taken while closed too."""
    with make_server(market_open=False, prices={"AAPL": 100.0}) as server:
        server.set_clock(is_open=False, next_open=now() + timedelta(hours=1))
        run = run_on(api, server, ("AAPL",), {1: buy("auction", size=1, time_in_force=tif)})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: server.count_kind("submit") == 1, what="sent while closed"
                ),
            ],
        )
        sent = server_order(server, run, "auction")
        assert sent["time_in_force"] == tif


def test_waiting_order_is_not_sent_when_run_stops(api: str) -> None:
    with make_server(fill_mode="immediate", market_open=False, prices={"AAPL": 100.0}) as server:
        run = run_on(api, server, ("AAPL",), {1: buy("eq", size=1)})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Submitted"), what="submitted"
                ),
            ],
        )
        assert server.count_kind("submit") == 0
        # the cancel made at stop still reaches the agent (delivered before strategies stop)
        assert statuses(run, order_of(run, "eq").ref) == ["Submitted", "Canceled"]
        assert not order_of(run, "eq").alive()
        assert order_of(run, "eq").info["reason"] == "not sent: broker stopped"


# -- faults: nothing lost, nothing duplicated, positions equal ----------------------------------


@pytest.mark.parametrize("seed", [10, 11])
def test_under_faults_no_order_lost_or_duplicated_positions_equal(seed: int, api: str) -> None:
    plan = FaultPlan(
        rate=0.3,
        kinds=("429", "500", "503", "timeout", "reset"),
        seed=seed,
        stall_s=0.3,
        # besides the random faults: two submits carried out whose answers are lost
        forced=(("submit", "reset", True), ("submit", "timeout", True)),
    )
    prices = {"AAPL": 100.0, "MSFT": 50.0, "BTC/USD": 1000.0}
    # per symbol, the signed sizes sent on bars 1, 3, 5, ...; market orders filled by the
    # server's ticker in 3 exact slices each
    sizes: dict[str, list[float]] = {
        "AAPL": [3, 7, -4, 5],
        "MSFT": [10, -10, 2],
        "BTC/USD": [0.3, 0.0125, -0.1],
    }
    script: dict[int, list[tuple[str, str, float]]] = {}
    for sym, seq in sizes.items():
        for i, size in enumerate(seq):
            script.setdefault(1 + 2 * i, []).append((f"{sym}#{i}", sym, size))

    def act(actions: list[tuple[str, str, float]]) -> Any:
        def run_actions(s: Any) -> None:
            by_name = {d._name: d for d in s.datas}
            for name, sym, size in actions:
                side = buy if size > 0 else sell
                side(name, size=abs(size), data=by_name[sym])(s)

        return run_actions

    with make_server(faults=plan, prices=prices, partial_steps=3, tick_interval_s=0.01) as server:
        run = run_on(
            api,
            server,
            tuple(prices),
            {k: act(v) for k, v in script.items()},
            # polling only: every order event goes through the faulty REST calls
            config=fast_config(server, api, max_attempts=12, use_stream=False),
        )

        def all_done() -> None:
            wait_until(
                lambda: all(not o.alive() for o in list(run.log.orders.values())),
                timeout_s=30,
                what="every order done",
            )

        # each bar's orders end before the next bar: a sell sent while the last buy still fills
        # would, like on Alpaca, be split at the position known then and its opening part
        # refused as a potential wash trade (a full-suite run under load once did exactly that)
        steps = [s for _ in range(8) for s in (bars(run, prices), all_done)]
        drive(run, steps, timeout_s=120)
        posts = [r for r in server.requests if r.method == "POST"]
        assert sum(1 for r in server.requests if r.fault) > 5  # the run went through faults
        # a submit whose answer was lost had landed; its retry met it (422 duplicate) or was
        # refused otherwise, and the order was looked up rather than called rejected
        assert any(r.processed for r in posts)
        n = sum(len(v) for v in sizes.values())
        coids = {f"{run.broker.session_id}-{o.ref}" for o in run.log.orders.values()}
        at_server = {c for c in server.by_coid if c.startswith(run.broker.session_id)}
        assert at_server == coids and len(coids) == n  # none lost, none duplicated
        for name, o in run.log.orders.items():
            srv = server.order_by_coid(f"{run.broker.session_id}-{o.ref}")
            assert srv is not None and srv["status"] == "filled", name
            got = [
                Decimal(repr(f[0]))
                for note in run.log.notes
                if note.ref == o.ref
                for f in note.fills
            ]
            want = Decimal(srv["filled_qty"]) * (1 if o.isbuy() else -1)
            if o.isbuy() and "/" in srv["symbol"]:
                # a crypto buy's executed size is net of the fee Alpaca keeps in the coin
                # (25 bps, rounded up per fill to 1e-9; issue 13, finding 4)
                want *= Decimal("0.9975")
            assert abs(sum(got) - want) <= Decimal("0.00000001"), name
            assert statuses(run, o.ref).count("Completed") == 1, name
        assert bt_positions(run) == server.position_qty()


def test_submit_whose_answer_was_lost_is_followed_not_duplicated(api: str) -> None:
    # the first POST is processed by the server but its answer never arrives
    plan = FaultPlan(rate=1.0, kinds=("reset",), methods=("POST",), limit=1, processed=True)
    with make_server(faults=plan, fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        run = run_on(api, server, ("AAPL",), {1: buy("b", size=3)})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Completed"), what="fill"
                ),
            ],
        )
        posts = [(r.fault, r.status) for r in server.requests if r.method == "POST"]
        # The retry (refused as a duplicate client_order_id, 422, then looked up) may not come
        # at all: the order's fill can reach the broker by the stream or a poll while the retry
        # waits its backoff, the run ends, and the stop resolves the submit at the final sync
        # (seen once in a full run under load). Either way: one order, followed, not repeated.
        assert posts in ([("reset", 0), (None, 422)], [("reset", 0)])
        assert server.count_kind("by_coid") <= 1
        assert len(server.orders) == 1
        assert statuses(run, order_of(run, "b").ref) == ["Submitted", "Accepted", "Completed"]
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(3)}


def test_submit_that_never_landed_is_rejected_after_a_lookup(api: str) -> None:
    plan = FaultPlan(rate=1.0, kinds=("503", "reset"), methods=("POST",), processed=False)
    with make_server(faults=plan, fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("b", size=3)},
            config=fast_config(server, api, max_attempts=3),
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Rejected"), what="reject"
                ),
            ],
        )
        assert len([r for r in server.requests if r.method == "POST"]) == 3
        assert server.orders == {}
        reason = order_of(run, "b").info["reason"]
        assert "no order with this client_order_id" in reason
        assert bt_positions(run) == server.position_qty() == {}


def test_one_list_call_per_poll_for_all_open_orders(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {
                1: lambda s: [
                    buy(f"l{i}", size=1, exectype=bt.Order.Limit, price=90.0 + i)(s)
                    for i in range(5)
                ]
            },
            config=fast_config(server, api, use_stream=False),
        )
        window: dict[str, int] = {}

        def measure() -> None:
            wait_until(
                lambda: len([n for n in run.log.notes if n.status == "Accepted"]) == 5,
                what="5 accepted",
            )
            lists0 = server.count_kind("list")
            singles0 = server.count_kind("order")
            wait_until(lambda: server.count_kind("list") >= lists0 + 10, what="10 polls")
            window["singles"] = server.count_kind("order") - singles0

        drive(run, [bar(run, "AAPL", 100.0), measure])
        assert window["singles"] == 0  # open orders are followed by the list call alone


def test_keys_never_appear_in_logs(caplog: pytest.LogCaptureFixture, api: str) -> None:
    key, secret = "AKLEAKCHECK0001", "SKLEAKCHECKsecret0002"
    caplog.set_level(logging.DEBUG)
    plan = FaultPlan(rate=0.3, kinds=("500", "429", "reset"), seed=5)
    with make_server(
        api_key=key,
        secret_key=secret,
        broker_key=key,
        broker_secret=secret,
        faults=plan,
        fill_mode="immediate",
        prices={"AAPL": 100.0},
    ) as server:
        run = run_on(api, server, ("AAPL",), {1: buy("b", size=1), 2: buy("c", size=10**6)})
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Rejected"), what="reject"
                ),
            ],
        )
    text = "\n".join(r.getMessage() for r in caplog.records) + repr(run.broker)
    assert "Alpaca paper trading endpoint" in text
    assert key not in text and secret not in text


def test_stop_cancels_open_orders_when_asked_and_joins_threads(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("lim", size=1, exectype=bt.Order.Limit, price=80.0)},
            config=fast_config(server, api, cancel_on_stop=True),
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Accepted"), what="accepted"
                ),
            ],
        )
        assert server.open_orders() == []
        assert not order_of(run, "lim").alive()
        report = run.broker.report
        assert report is not None and report.orders_canceled == 1 and report.open_orders_left == 0
    assert alpaca_threads() == []


@pytest.mark.parametrize("monitor_delay_s", [0.0, 0.01, 0.02])
def test_trade_updates_stream_delivers_without_polling(
    api: str, monitor_delay_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # monitor_delay_s: each monitor poll starts that late, as on a loaded machine (the
    # catch-up poll of the connect then runs after the order exists; 10-20 ms did it here
    # every time before the test waited for that poll)
    if monitor_delay_s:
        import time

        from runtime.brokers.alpaca.worker import AlpacaWorker

        poll_once = AlpacaWorker.poll_once

        def late(self: AlpacaWorker, *args: Any, **kwargs: Any) -> bool:
            time.sleep(monitor_delay_s)
            return poll_once(self, *args, **kwargs)

        monkeypatch.setattr(AlpacaWorker, "poll_once", late)
    with make_server(prices={"AAPL": 100.0}) as server:
        # polling every 60 s: within this test only the stream (the Trading API's websocket,
        # the Broker API's events SSE) can bring the fill
        cfg = fast_config(
            server,
            api,
            use_stream=True,
            poll_interval_s=60.0,
            stream_poll_interval_s=60.0,
            refresh_interval_s=60.0,
        )
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("lim", size=2, exectype=bt.Order.Limit, price=99.0)},
            config=cfg,
        )

        polls: list[int] = []
        worker = run.broker._worker
        connects: list[int] = []

        def connected() -> None:  # before the order exists, so the catch-up poll is free
            wait_until(worker.stream_connected.is_set, what="stream connected")
            connects.append(worker.stream_connects)
            # ... once it has run: under load the monitor took it up after the order existed,
            # and its list call fell inside the window below (a clean-clone run, 2026-12-04)
            wait_until(
                lambda: not worker._poll_due.is_set() and worker.monitor_idle.is_set(),
                what="the connect's catch-up poll",
            )

        def fill() -> None:
            o = server_order(server, run, "lim")
            polls.append(server.count_kind("list"))
            server.fill(o["id"], 1, 99.0)
            server.fill(o["id"], 1, 98.0)
            wait_until(lambda: run.log.has(lambda n: n.status == "Completed"), what="fill")
            polls.append(server.count_kind("list"))
            connects.append(worker.stream_connects)

        drive(run, [connected, bar(run, "AAPL", 100.0), fill])
        ref = order_of(run, "lim").ref
        assert statuses(run, ref) == ["Submitted", "Accepted", "Partial", "Completed"]
        # no order poll while the fills came in, but the one catch-up poll a reconnect makes (in
        # two full-suite runs of 1,450 tests the client once closed the socket mid-test, cause
        # unknown; a reconnect is then the documented way back and its poll is expected)
        assert polls[1] - polls[0] <= connects[1] - connects[0]
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(2)}
    assert alpaca_threads() == []


def test_polling_covers_a_stream_that_cannot_connect(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}, fill_mode="immediate") as server:
        nowhere = "http://127.0.0.1:9" if api == "broker" else "ws://127.0.0.1:9/stream"
        cfg = fast_config(server, api, use_stream=True, stream_url=nowhere)
        run = run_on(api, server, ("AAPL",), {1: buy("b", size=1)}, config=cfg)
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: run.log.has(lambda n: n.status == "Completed"), what="fill"
                ),
            ],
        )
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(1)}
    assert alpaca_threads() == []


def test_broker_without_start_stops_cleanly() -> None:
    with AlpacaServer() as server:
        broker = AlpacaPaperTradingBroker(fast_config(server), session_id=new_session())
        broker.stop()
        broker.stop()
        assert broker.report is None


def test_sell_bracket_stop_loss_fills_and_cancels_take_profit(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}, shorting=True) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: bracket("sell_bracket", size=3, price=101.0, stopprice=106.0, limitprice=95.0)},
        )

        def play() -> None:
            server_order(server, run, "parent")
            server.set_price("AAPL", 101.5)  # short entry fills
            wait_until(lambda: run.log.has(lambda n: n.status == "Completed"), what="entry")
            server.set_price("AAPL", 107.0)  # stop loss (a buy stop) triggers
            wait_until(
                lambda: (
                    len([n for n in run.log.notes if n.status in ("Completed", "Canceled")]) == 3
                ),
                what="exits",
            )

        drive(run, [bar(run, "AAPL", 100.0), play])
        assert statuses(run, order_of(run, "stop").ref)[-1] == "Completed"
        assert statuses(run, order_of(run, "take").ref)[-1] == "Canceled"
        assert order_of(run, "stop").isbuy() and order_of(run, "parent").issell()
        assert bt_positions(run) == server.position_qty() == {}


def test_positions_changed_outside_the_run_are_taken_from_the_account(api: str) -> None:
    with make_server(fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("b", size=2)},
            config=fast_config(server, api, refresh_interval_s=0.05),
        )

        def outside_trade() -> None:
            wait_until(lambda: run.log.has(lambda n: n.status == "Completed"), what="fill")
            server.place(
                {
                    "symbol": "AAPL",
                    "qty": 5,
                    "side": "buy",
                    "type": "market",
                    "time_in_force": "day",
                }
            )  # another client of the same account
            wait_until(
                lambda: run.broker.ledger.qty.get("AAPL") == Decimal(7), what="reconciled position"
            )

        drive(run, [bar(run, "AAPL", 100.0), outside_trade])
        assert bt_positions(run) == server.position_qty() == {"AAPL": Decimal(7)}


def test_persistent_api_failure_stops_the_run_with_an_error(api: str) -> None:
    with make_server(prices={"AAPL": 100.0}) as server:
        run = run_on(
            api,
            server,
            ("AAPL",),
            {1: buy("lim", size=1, exectype=bt.Order.Limit, price=90.0)},
            config=fast_config(server, api, max_attempts=2),
        )

        def outage() -> None:
            server_order(server, run, "lim")
            server.faults = FaultPlan(rate=1.0, kinds=("503",))  # every call fails from now
            wait_until(lambda: not run.broker.healthy, what="unhealthy")
            # the monitor gives up after 10 failed polls; the bar loop then raises
            wait_until(
                lambda: not any(t.name == "alpaca-monitor" for t in threading.enumerate()),
                what="monitor gave up",
            )
            wait_until(run.broker._events.empty, what="error handed to the main thread")

        with pytest.raises(BrokerError, match="Alpaca broker failed"):
            drive(run, [bar(run, "AAPL", 100.0), outage])
        run.broker.stop()  # what the runner's closer does when cerebro raised
    assert alpaca_threads() == []


# -- metrics ----------------------------------------------------------------------------------


def test_runner_counts_broker_retries_and_errors() -> None:
    """The runner wires the broker's retry and error hooks to RunMetrics: a 429 on the account
    read is one retry; wrong keys (401, not retried) are one error."""
    plan = FaultPlan(rate=1.0, kinds=("429",), paths=("/v2/account",), limit=1)
    with AlpacaServer(faults=plan) as server:
        env = {
            "MODE": "paper",
            "BROKER": "alpaca",
            "SYMBOLS": "AAPL",
            "GOOGLE_CLOUD_PROJECT": "p",
            "PUBSUB_TOPIC": "bars",
            "ALPACA_API_KEY": server.api_key,
            "ALPACA_SECRET_KEY": server.secret_key,
            "ALPACA_BASE_URL": server.url,
        }
        runner = Runner(load_config(env))
        runner.cerebro = bt.Cerebro()
        runner._build_broker()  # connects: reads the account, the 429 is retried
        runner.cerebro.getbroker().stop()
        m = runner.metrics
        assert [r.status for r in server.requests if r.path == "/v2/account"] == [429, 200]
        assert m.value("runner_broker_api_retries_total", operation="account") == 1.0
        assert m.value("runner_broker_api_errors_total", operation="account") is None

        wrong = Runner(load_config({**env, "ALPACA_SECRET_KEY": "wrong"}))
        wrong.cerebro = bt.Cerebro()
        with pytest.raises(BrokerError, match="cannot read the Alpaca account"):
            wrong._build_broker()
        assert wrong.metrics.value("runner_broker_api_errors_total", operation="account") == 1.0
        assert wrong.metrics.value("runner_broker_api_retries_total", operation="account") is None
