"""The risk guard on backtests (GuardedBackBroker, real daily data from data/) and on the
Alpaca broker (local server): refused orders become Rejected with ``risk: <rule>`` reasons that
the agent sees and FMEL records; reducing orders always pass; the kill switch stops or
flattens; no limits = the plain simulated broker's exact results."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import backtrader as bt
import duckdb
import pytest

from agents.sma_cross import SmaCrossAgent
from analyzers.fmel import FMELAnalyzer
from core.errors import ConfigError
from core.settings import declared
from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
from runtime.brokers.risk import GuardedBackBroker, RiskConfig, RiskGuard
from runtime.config import PROJECT_ROOT, SETTINGS
from tests.alpaca_harness import Log, Scripted, bar, build_run, drive, wait_until
from tests.alpaca_server import AlpacaServer

DATA = PROJECT_ROOT / "data"


def feed(symbol: str, start: str, end: str) -> Any:
    cfg = CSVFeedConfig(
        path=DATA / f"{symbol}.csv",
        symbol=symbol,
        start=datetime.fromisoformat(start).replace(tzinfo=UTC),
        end=datetime.fromisoformat(end).replace(tzinfo=UTC),
    )
    return make_csv_feed(cfg, read_csv_bars(cfg))


def cerebro(
    broker: Any,
    symbols: tuple[str, ...] = ("GOOG",),
    start: str = "2007-01-01",
    end: str = "2009-12-31",
) -> Any:
    c = bt.Cerebro(stdstats=False)
    c.setbroker(broker)
    broker.setcash(100_000.0)
    for sym in symbols:
        c.adddata(feed(sym, start, end), name=sym)
    return c


def scripted(broker: Any, script: dict[int, Any], **kw: Any) -> tuple[Any, Log]:
    c = cerebro(broker, **kw)
    log = Log()
    c.addstrategy(Scripted, script=script, log=log)
    c.addanalyzer(FMELAnalyzer, _name="fmel")
    strat = c.run()[0]
    return strat, log


def rejected(log: Log) -> list[tuple[int, str | None]]:
    return [(n.ref, n.reason) for n in log.notes if n.status == "Rejected"]


def test_no_limits_gives_exactly_the_simulated_brokers_results() -> None:
    values = []
    for broker in (
        bt.brokers.BackBroker(),
        GuardedBackBroker(risk=RiskConfig()),
        GuardedBackBroker(risk=None),
    ):
        c = cerebro(broker, symbols=("GOOG", "SP500"), start="2005-01-01", end="2010-12-31")
        c.addstrategy(SmaCrossAgent)
        c.run()
        values.append((broker.getvalue(), broker.getcash()))
    assert values[0] == values[1] == values[2]
    assert values[0][0] != 100_000.0  # the agent did trade


def test_max_order_notional_refuses_and_fmel_records_the_reason() -> None:
    broker = GuardedBackBroker(risk=RiskConfig(max_order_notional_usd=50_000.0))
    c = cerebro(broker)
    c.addstrategy(SmaCrossAgent, allocation=0.9)  # ~90k USD entries
    c.addanalyzer(FMELAnalyzer, _name="fmel")
    strat = c.run()[0]
    actions = [a for r in strat.analyzers.fmel.records for a in r.actions]
    refused = [a for a in actions if a.event == "REJECTED"]
    assert refused and all(
        a.reason and a.reason.startswith("risk: max_order_notional_usd: order notional")
        for a in refused
    )
    assert not [a for a in actions if a.event == "COMPLETED"]
    assert broker.getvalue() == 100_000.0
    assert broker.guard is not None and broker.guard.refused == {
        "max_order_notional_usd": len(refused)
    }


def test_max_position_value_allows_reducing_orders() -> None:
    broker = GuardedBackBroker(risk=RiskConfig(max_position_value_usd=20_000.0))
    # GOOG traded near 460-480 USD in January 2007: 30 shares ~ 14k, 50 more ~ 37k in total
    _, log = scripted(
        broker,
        {
            1: lambda s: s.buy(size=30),
            3: lambda s: s.buy(size=50),  # refused: position would exceed 20k
            5: lambda s: s.sell(size=10),  # reduces: allowed
            7: lambda s: s.buy(size=5),  # 25 shares ~ 12k: allowed
        },
        start="2007-01-01",
        end="2007-02-28",
    )
    refused = rejected(log)
    assert len(refused) == 1 and refused[0][1] is not None
    assert refused[0][1].startswith("risk: max_position_value_usd: position value after")
    assert broker.getposition(broker.cerebro.datas[0]).size == 25


def test_max_open_symbols() -> None:
    broker = GuardedBackBroker(risk=RiskConfig(max_open_symbols=1))
    _, log = scripted(
        broker,
        {
            1: lambda s: s.buy(data=s.datas[0], size=10),
            3: lambda s: s.buy(data=s.datas[1], size=1),  # a second symbol: refused
            5: lambda s: s.close(data=s.datas[0]),
            7: lambda s: s.buy(data=s.datas[1], size=1),  # the first one is closed now: allowed
        },
        symbols=("GOOG", "SP500"),
        start="2007-01-01",
        end="2007-02-28",
    )
    refused = rejected(log)
    assert len(refused) == 1 and "max_open_symbols: 1 symbols already open (GOOG)" in str(
        refused[0][1]
    )
    datas = broker.cerebro.datas
    assert broker.getposition(datas[0]).size == 0 and broker.getposition(datas[1]).size == 1


def test_drawdown_kill_switch_stops_new_exposure_but_not_exits() -> None:
    broker = GuardedBackBroker(risk=RiskConfig(max_drawdown_pct=15.0))
    buys = {i: (lambda s: s.buy(size=5)) for i in range(20, 400, 20)}
    buys[390] = lambda s: s.close()
    strat, log = scripted(
        broker, {1: lambda s: s.buy(size=100), **buys}, start="2007-10-01", end="2009-06-30"
    )  # GOOG fell ~50% in 2008
    guard = broker.guard
    assert guard is not None and guard.tripped is not None
    assert "drawdown" in guard.tripped
    refused = rejected(log)
    assert refused and all(
        "risk: kill_switch: kill switch tripped: drawdown" in str(r) for _, r in refused
    )
    completed_sells = [n for n in log.notes if n.status == "Completed" and n.side == "SELL"]
    assert len(completed_sells) == 1  # the exit went through
    assert broker.getposition(broker.cerebro.datas[0]).size == 0
    records = strat.analyzers.fmel.records
    assert any(
        a.event == "REJECTED" and a.reason and "kill_switch" in a.reason
        for r in records
        for a in r.actions
    )


def test_daily_loss_kill_switch_flattens_once() -> None:
    broker = GuardedBackBroker(risk=RiskConfig(max_daily_loss_usd=1_500.0, kill_action="flatten"))
    _, log = scripted(broker, {1: lambda s: s.buy(size=120)}, start="2008-01-01", end="2008-12-31")
    guard = broker.guard
    assert guard is not None and guard.tripped is not None and "daily loss" in guard.tripped
    closing = [n for n in log.notes if n.reason and n.reason.startswith("risk: flatten")]
    assert [n.status for n in closing] == ["Submitted", "Accepted", "Completed"]
    assert broker.getposition(broker.cerebro.datas[0]).size == 0


def test_refused_bracket_parent_rejects_its_children_with_the_reason() -> None:
    broker = GuardedBackBroker(risk=RiskConfig(max_order_notional_usd=1_000.0))
    _, log = scripted(
        broker,
        {1: lambda s: s.buy_bracket(size=10, price=470.0, stopprice=440.0, limitprice=500.0)},
        start="2007-01-01",
        end="2007-01-31",
    )
    refused = rejected(log)
    assert len(refused) == 3
    assert all(str(r).startswith("risk: max_order_notional_usd") for _, r in refused)


def test_observe_daily_loss_uses_previous_days_last_value() -> None:
    g = RiskGuard(RiskConfig(max_daily_loss_usd=100.0))
    assert g.observe(1000.0, date(2026, 1, 2)) is None
    assert g.observe(1050.0, date(2026, 1, 2)) is None  # intraday up
    assert g.observe(960.0, date(2026, 1, 3)) is None  # 90 below yesterday's last 1050
    reason = g.observe(949.0, date(2026, 1, 3))
    assert reason is not None and "daily loss 101.00 USD" in reason
    assert g.observe(0.0, date(2026, 1, 4)) is None  # tripped once, stays tripped
    assert g.tripped is not None


@pytest.mark.parametrize(
    ("cfg", "rule"),
    [
        (RiskConfig(max_order_notional_usd=500.0), "max_order_notional_usd"),
        (RiskConfig(max_position_value_usd=500.0), "max_position_value_usd"),
    ],
)
def test_guard_works_the_same_with_the_alpaca_broker(cfg: RiskConfig, rule: str) -> None:
    with AlpacaServer(fill_mode="immediate", prices={"AAPL": 100.0}) as server:
        run = build_run(
            server,
            ("AAPL",),
            {
                1: lambda s: s.buy(size=4),
                2: lambda s: s.buy(size=6),  # 600 USD: over either limit
                3: lambda s: s.sell(size=4),
            },  # reduces: allowed
            risk=cfg,
            analyzers=((FMELAnalyzer, {"_name": "fmel"}),),
        )
        drive(
            run,
            [
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                bar(run, "AAPL", 100.0),
                lambda: wait_until(
                    lambda: len([n for n in run.log.notes if n.status == "Completed"]) == 2,
                    what="2 fills",
                ),
                bar(run, "AAPL", 100.0),
            ],
        )
        refused = rejected(run.log)
        assert len(refused) == 1 and str(refused[0][1]).startswith(f"risk: {rule}")
        assert server.count("POST", "/v2/orders") == 2  # the refused one never left
        assert server.position_qty() == {}
        records = run.strategy.analyzers.fmel.records
        reasons = [a.reason for r in records for a in r.actions if a.event == "REJECTED"]
        assert len(reasons) == 1 and str(reasons[0]).startswith(f"risk: {rule}")
        assert Decimal(0) == sum(
            (Decimal(repr(p.size)) for r in records[-1:] for p in r.positions), Decimal(0)
        )


def test_runner_backtest_applies_risk_settings(tmp_path: Path) -> None:
    from runtime.config import load_config
    from runtime.runner import Runner

    env = {
        "SYMBOLS": "GOOG",
        "BACKTEST_START": "2007-01-01",
        "BACKTEST_END": "2008-12-31",
        "AGENT_PARAMS": '{"fast": 5, "slow": 20}',
        "PROGRESS": "off",
        "FMEL_LOCAL_PATH": str(tmp_path / "fmel.duckdb"),
        "FMEL_SPILL_DIR": str(tmp_path / "spill"),
        "RISK_MAX_ORDER_NOTIONAL_USD": "1000",
    }
    report = Runner(load_config(env)).run()
    assert report.trades == 0 and report.end_value_usd == 100_000.0
    con = duckdb.connect(str(tmp_path / "fmel.duckdb"), read_only=True)
    try:
        reasons = [
            r[0]
            for r in con.execute(
                "SELECT a.reason FROM decisions, UNNEST(actions) AS t(a) WHERE a.event = 'REJECTED'"
            ).fetchall()
        ]
    finally:
        con.close()
    assert reasons and all(r.startswith("risk: max_order_notional_usd") for r in reasons)


def test_risk_settings_declared_on_the_config_match_the_settings_table() -> None:
    names = []
    for s in declared(RiskConfig):
        listed = SETTINGS[s.name]
        assert (s.default, s.help) == (listed.default, listed.help), s.name
        names.append(s.name)
    assert names == [n for n in SETTINGS if n.startswith("RISK_")]
    with pytest.raises(ConfigError, match="RISK_KILL_ACTION"):
        RiskConfig(kill_action="pause")  # type: ignore[arg-type]


def test_close_beside_a_protective_stop_counts_as_reducing() -> None:
    """A working stop-loss against the position is an exit, not exposure to come: ``close()``
    passes a tripped kill switch (found by an attack: the stop made the close look like a new
    short, and the agent could not get out)."""
    import pandas as pd

    closes = [100.0, 100.0, 100.0, 100.0, 92.0, 92.0, 92.0, 92.0]
    df = pd.DataFrame(
        {"open": closes, "high": closes, "low": closes, "close": closes, "volume": 1000},
        index=pd.date_range("2024-01-02", periods=len(closes), freq="D"),
    )
    seen: list[tuple[str, str, float, Any]] = []

    class StopThenClose(bt.Strategy):  # type: ignore[misc]
        def next(self) -> None:
            n = len(self)
            if n == 1:
                self.buy(size=10)
            elif n == 2:
                self.sell(size=10, exectype=bt.Order.Stop, price=80.0, name="stop")
            elif n == 6:
                self.close()

        def notify_order(self, order: Any) -> None:
            if order.status in (order.Completed, order.Rejected):
                seen.append(
                    (
                        "buy" if order.isbuy() else "sell",
                        order.getstatusname(),
                        float(order.executed.size),
                        order.info.get("reason"),
                    )
                )

    for cfg in (RiskConfig(max_daily_loss_usd=50.0, kill_action="stop"),):
        seen.clear()
        cerebro = bt.Cerebro(stdstats=False)
        cerebro.setbroker(GuardedBackBroker(risk=cfg))
        cerebro.adddata(bt.feeds.PandasData(dataname=df))
        cerebro.addstrategy(StopThenClose)
        cerebro.run()
        assert ("sell", "Completed", -10.0, None) in seen, (cfg, seen)
        assert float(cerebro.broker.getposition(cerebro.datas[0]).size) == 0.0
