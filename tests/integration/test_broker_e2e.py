"""End to end: Cerebro in next-by-next mode, a queue-fed live feed, the Alpaca broker against
the local server and the FMEL analyzer: every order event (fills, Alpaca's rejection with its
message, a cancel that is not a reject) lands in the decision records, and the recorded
portfolio matches the account."""

from __future__ import annotations

from typing import Any

import backtrader as bt

from analyzers.fmel import FMELAnalyzer
from tests.alpaca_harness import bar, build_run, drive, wait_until
from tests.alpaca_server import AlpacaServer


def test_fmel_records_alpaca_order_events() -> None:
    def limit_then_cancel(s: Any) -> None:
        s.p.log.orders["lim"] = s.buy(size=2, exectype=bt.Order.Limit, price=80.0)

    with AlpacaServer(fill_mode="immediate", prices={"AAPL": 100.0}, cash_usd=20_000.0) as server:
        run = build_run(
            server,
            ("AAPL",),
            {
                1: lambda s: s.p.log.orders.__setitem__("mkt", s.buy(size=10)),
                2: lambda s: s.p.log.orders.__setitem__("big", s.buy(size=1000)),
                3: limit_then_cancel,
                5: lambda s: s.cancel(s.p.log.orders["lim"]),
                7: lambda s: s.p.log.orders.__setitem__("exit", s.close()),
            },
            quicknotify=False,
            analyzers=((FMELAnalyzer, {"_name": "fmel"}),),
        )

        def settle() -> None:  # notifications reach the agent with the next bar
            wait_until(
                lambda: any(r.status == 403 for r in server.requests), what="Alpaca's rejection"
            )

        def sent(name: str) -> bool:  # the submit's answer is queued for the main thread
            coid = f"{run.broker.session_id}-{run.log.orders[name].ref}"
            flight = run.broker.flights.snapshot().flights.get(coid)
            return flight is None or flight.submit_done

        steps = [bar(run, "AAPL", 100.0 + i) for i in range(8)]
        steps.insert(3, lambda: wait_until(lambda: sent("lim"), what="limit order sent"))
        steps.insert(3, settle)
        steps.append(lambda: wait_until(lambda: sent("exit"), what="exit sent and filled"))
        # the refresh that follows a fill (a float read from this thread; no bt object)
        steps.append(
            lambda: wait_until(
                lambda: run.broker.getcash() == float(server.cash), what="account refresh"
            )
        )
        steps += [bar(run, "AAPL", 108.0), bar(run, "AAPL", 109.0)]
        drive(run, steps)

        records = run.strategy.analyzers.fmel.records
        events = [(a.order_ref, a.event) for r in records for a in r.actions]
        ref = {k: o.ref for k, o in run.log.orders.items()}
        assert [e for r, e in events if r == ref["mkt"]] == [
            "CREATED",
            "SUBMITTED",
            "ACCEPTED",
            "COMPLETED",
        ]
        assert [e for r, e in events if r == ref["big"]] == ["CREATED", "SUBMITTED", "REJECTED"]
        assert [e for r, e in events if r == ref["lim"]] == [
            "CREATED",
            "SUBMITTED",
            "ACCEPTED",
            "CANCEL_REQUEST",
            "CANCELED",
        ]
        assert [e for r, e in events if r == ref["exit"]] == [
            "CREATED",
            "SUBMITTED",
            "ACCEPTED",
            "COMPLETED",
        ]
        by_event = {(a.order_ref, a.event): a for r in records for a in r.actions}
        rejected = by_event[(ref["big"], "REJECTED")]
        assert rejected.reason is not None and "insufficient buying power" in rejected.reason
        filled = by_event[(ref["mkt"], "COMPLETED")]
        assert (filled.exec_size, filled.exec_price) == (10.0, 100.0)
        assert by_event[(ref["lim"], "CANCELED")].reason is None
        last = records[-1]
        assert last.positions == ()
        assert last.portfolio_cash == run.broker.getcash() == float(server.cash)
        assert last.portfolio_value == run.broker.getvalue()
        held = [r for r in records if r.positions]
        assert held and held[0].positions[0].symbol == "AAPL" and held[0].positions[0].size == 10
