"""The portfolio report, the progress indicator and the query CLI."""

from __future__ import annotations

import logging
from pathlib import Path

import backtrader as bt
import pytest

from analyzers.query import main as query_main
from analyzers.schema import DecisionRecord, RunInfo
from analyzers.sinks.duckdb import LocalDuckDBSink
from feeds.csv import CSVFeedConfig, make_csv_feed
from runtime.report import ProgressAnalyzer, RunReport
from runtime.stats import PerformanceStats
from tests.conftest import DATA


def report(**kw: object) -> RunReport:
    base: dict[str, object] = dict(
        session_id="s",
        agent="a:B",
        mode="backtest",
        symbols=("GOOG",),
        start_value_usd=100.0,
        end_value_usd=110.0,
        stats=PerformanceStats(
            bars=10,
            periods_per_year=252,
            start_value_usd=100.0,
            end_value_usd=110.0,
            total_return_pct=10.0,
            cagr_pct=1234.5,
            volatility_pct=20.0,
            sharpe=None,
            sortino=1.5,
            calmar=None,
            max_drawdown_pct=3.5,
        ),
        trades=4,
        trades_won=1,
        bars=10,
        decisions=10,
        lookahead_reads=0,
        stored_at="duckdb:/x",
        example_query="q",
    )
    base.update(kw)
    return RunReport(**base)  # type: ignore[arg-type]


def test_report_units_and_undefined_values() -> None:
    r = report()
    assert r.return_pct == pytest.approx(10.0) and r.win_rate_pct == 25.0
    text = r.render()
    assert "return           +10.00 %" in text and "sharpe (annual)  n/a" in text
    assert "trades           4 closed, win rate 25.0 %" in text
    assert "sortino (annual)  1.500" in text and "calmar           n/a" in text
    assert "cagr             +1234.50 %" in text and "max drawdown     3.50 %" in text
    assert "annualised from  252 bars a year" in text
    assert "html report" not in text
    assert "html report      /x/report.html" in report(html_report="/x/report.html").render()
    assert "sharpe (annual)  n/a" in report(stats=None).render()
    assert report(trades=0, trades_won=0).win_rate_pct is None
    assert "INTERRUPTED" in report(interrupted=True).render()
    assert "skipped rows     GOOG.csv: 3" in report(skipped_rows={"GOOG.csv": 3}).render()


def test_progress_logs_every_ten_percent(caplog: pytest.LogCaptureFixture) -> None:
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(make_csv_feed(CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG")))
    cerebro.addstrategy(bt.Strategy)
    cerebro.addanalyzer(ProgressAnalyzer, total=2148)
    with caplog.at_level(logging.INFO, logger="runtime.report"):
        cerebro.run()
    lines = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
    assert [line.split()[1] for line in lines] == [f"{p}%" for p in range(10, 101, 10)]


def test_query_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sink = LocalDuckDBSink(tmp_path / "f.duckdb")
    sink.open()
    run = RunInfo("sess", "agent", "backtest", "m.C", "{}", None)
    sink.write_records(
        [
            DecisionRecord(
                run, i, 0.0, 0.0, "NEXT", "HOLD", (), (), 0, 0, 1.0, 1.0, (), None, None, None
            )
            for i in range(3)
        ]
    )
    sink.close()
    assert query_main(["--db", str(tmp_path / "f.duckdb")]) == 0
    assert "sess" in capsys.readouterr().out
    assert query_main(["--db", str(tmp_path / "f.duckdb"), "SELECT nope FROM decisions"]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        ([], None, "512.0 MiB"),
        ([], "128", "128.0 MiB"),
        (["--memory-limit-mb", "96"], "128", "96.0 MiB"),
        ([], "63", None),
        ([], "1_024", None),
        ([], "١٢٨", None),
        ([], "lots", None),
        (["--memory-limit-mb", "0"], None, None),
        (["--memory-limit-mb", "١٢٨"], None, None),
        (["--memory-limit-mb", "1_024"], None, None),
        (["--memory-limit-mb", "512.0"], None, None),
        (["--memory-limit-mb", " 256 "], None, "256.0 MiB"),
        ([], " 256 ", "256.0 MiB"),
        ([], "", "512.0 MiB"),
    ],
)
def test_the_query_cli_gives_duckdb_the_stores_memory_limit(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: str | None,
    shown: str | None,
) -> None:
    """A query over the store runs within ``FMEL_LOCAL_MEMORY_LIMIT_MB`` (or the flag), not
    DuckDB's 80 % of the machine; a bad value exits 2 naming where it came from."""
    db = tmp_path / "f.duckdb"
    sink = LocalDuckDBSink(db)
    sink.open()
    sink.close()
    if env is None:
        monkeypatch.delenv("FMEL_LOCAL_MEMORY_LIMIT_MB", raising=False)
    else:
        monkeypatch.setenv("FMEL_LOCAL_MEMORY_LIMIT_MB", env)
    sql = "SELECT current_setting('memory_limit') AS m"
    code = query_main([*args, "--db", str(db), sql])
    out, err = capsys.readouterr()
    if shown is None:
        assert code == 2
        assert ("--memory-limit-mb" if args else "FMEL_LOCAL_MEMORY_LIMIT_MB") in err
        assert "expected a whole number" in err and "from 64 to" in err
    else:
        assert code == 0 and shown in out, err


def test_orders_not_filled_when_the_run_ends_are_reported(tmp_path: Path) -> None:
    # Found by an attack (helper-59): an order on a feed that had ended stayed accepted and the
    # report said nothing; it names each such order now.
    from runtime.config import load_config
    from runtime.runner import Runner

    env = {
        "SYMBOLS": "GOOG,SP500",
        "BACKTEST_START": "2013-01-15",
        "BACKTEST_END": "2013-03-29",  # GOOG.csv ends 2013-03-01, SP500.csv goes on
        "AGENT": "tests.agents_for_tests:UnfilledOrders",
        "FMEL_LOCAL_PATH": str(tmp_path / "f.duckdb"),
        "FMEL_SPILL_DIR": str(tmp_path / "spill"),
        "PROGRESS": "off",
    }
    report = Runner(load_config(env)).run()
    assert report.open_orders == ["GOOG buy 3", "GOOG buy 2"]
    assert "open orders      2 not filled when the run ended (GOOG buy 3, GOOG buy 2)" in (
        report.render()
    )


def test_a_curve_that_does_not_end_at_the_broker_value_is_shown() -> None:
    """helper-84: an Alpaca paper run reported start and end 100,000.00 USD, return +0.00 %,
    beside a CAGR of +108 % (the end value was the account after the final sync; the
    statistics the per-bar values). The report now says where the two differ, and by what."""
    stats = report().stats
    assert stats is not None
    import dataclasses

    curve = dataclasses.replace(
        stats, start_value_usd=100_000.0, end_value_usd=208_000.0, total_return_pct=108.0
    )
    text = report(start_value_usd=100_000.0, end_value_usd=100_000.0, stats=curve).render()
    assert "return           +0.00 %" in text
    assert "equity curve     100,000.00 -> 208,000.00 USD (+108.00 %)" in text
    assert "by +0.00 USD and its end by -108,000.00 USD" in text
    # the same within a cent: no line
    same = dataclasses.replace(stats, start_value_usd=100.0, end_value_usd=110.006)
    assert "equity curve" not in report(stats=same).render()  # under a cent (helper-86 F9)
    cent = dataclasses.replace(stats, start_value_usd=100.0, end_value_usd=110.011)
    assert "its end by -0.01 USD" in report(stats=cent).render()
    nan = dataclasses.replace(stats, end_value_usd=float("nan"))
    assert "equity curve" not in report(stats=nan).render()
    assert "equity curve" not in report().render()


def test_an_empty_account_has_no_return() -> None:
    """A start value of 0 (an empty paper account) has no return, not a ZeroDivisionError."""
    r = report(start_value_usd=0.0, end_value_usd=0.0, stats=None)
    assert r.return_pct is None
    assert "return           n/a\n" in r.render()
