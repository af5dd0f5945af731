"""The Chronos agent: the rule, the FMEL record of each forecast, batching, the runner wiring.

The rule is checked deterministically with a stand-in pipeline whose forecast the test controls
(:class:`Scripted`); the wiring runs tiny random Chronos-Bolt / Chronos-2 checkpoints built
locally (tests/chronos_models.py) on the bundled real data. Nothing downloads.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import backtrader as bt
import duckdb
import numpy as np
import pytest
import torch

from agents.chronos_agent import ChronosAgent, Signal, decide
from analyzers.fmel import FMELAnalyzer
from analyzers.schema import DecisionRecord
from core.errors import ConfigError
from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
from runtime.config import BUNDLED_DATA_DIR, load_config
from runtime.models.chronos import ChronosModel, get_model
from runtime.models.config import ChronosConfig
from runtime.runner import Runner
from tests.chronos_models import count_loads

pytestmark = pytest.mark.usefixtures("offline_hub", "fresh_models")

Returns = tuple[float, float, float]


def utc(y: int, m: int, d: int) -> datetime:
    return datetime(y, m, d, tzinfo=UTC)


@functools.cache
def bar_times(symbol: str) -> np.ndarray:
    return read_csv_bars(csv_cfg(symbol)).times


def csv_cfg(
    symbol: str, start: datetime | None = None, end: datetime | None = None
) -> CSVFeedConfig:
    return CSVFeedConfig(
        path=BUNDLED_DATA_DIR / f"{symbol}.csv", symbol=symbol, start=start, end=end
    )


class Scripted:
    """A pipeline whose forecast the test controls: quantile k of every step is
    ``last * (1 + script(n)[k])``, where ``n`` is the history length the agent passed."""

    model_context_length = 10_000
    model_prediction_length = 64

    def __init__(self, script: Callable[[int], Returns]) -> None:
        self.script = script
        self.batches: list[int] = []

    def predict_quantiles(
        self, inputs: torch.Tensor, prediction_length: int, quantile_levels: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert len(quantile_levels) == 3
        self.batches.append(int(inputs.shape[0]))
        n = (~torch.isnan(inputs)).sum(dim=-1)
        rets = torch.tensor([self.script(int(k)) for k in n], dtype=torch.float32)
        q = (inputs[:, -1, None, None] * (1 + rets[:, None, :])).expand(-1, prediction_length, -1)
        return q, q[..., 1]


def run(
    model: Any,
    symbols: tuple[str, ...] = ("GOOG",),
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    fmel: bool = True,
    cash: float = 100_000.0,
    cerebro_kw: dict[str, Any] | None = None,
    **params: Any,
) -> Any:
    cerebro = bt.Cerebro(stdstats=False, **(cerebro_kw or {}))
    for s in symbols:
        cerebro.adddata(make_csv_feed(csv_cfg(s, start, end)), name=s)
    cerebro.broker.setcash(cash)
    cerebro.addstrategy(ChronosAgent, model=model, **params)
    if fmel:
        cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    cerebro.addanalyzer(bt.analyzers.Transactions, _name="tx")
    return cerebro.run()[0]


def forecast_records(strategy: Any) -> list[tuple[DecisionRecord, dict[str, Any]]]:
    out = []
    for rec in strategy.analyzers.fmel.records:
        if rec.notes:
            out.append((rec, json.loads(rec.notes)["forecast"]))
    return out


def created(rec: DecisionRecord) -> list[tuple[str, str | None, float | None]]:
    return [(a.side or "", a.symbol, a.size) for a in rec.actions if a.event == "CREATED"]


def transactions(strategy: Any) -> list[tuple[str, float, float]]:
    return [
        (str(dt), float(tx[0][0]), float(tx[0][1]))
        for dt, tx in strategy.analyzers.tx.get_analysis().items()
    ]


# -- the rule, pure ----------------------------------------------------------------------------

RULE = {"entry_return": 0.01, "exit_return": 0.0, "target_spread": 0.10, "budget_usd": 10_000.0}


@pytest.mark.parametrize(
    "position, low, median, high, expected",
    [
        (0, 102.0, 105.0, 108.0, Signal("BUY", 100, 0.02, 0.05, 0.08, "")),  # narrow: full slot
        (0, 102.0, 110.0, 122.0, Signal("BUY", 50, 0.02, 0.10, 0.22, "")),  # spread 20%: half
        (0, 100.5, 105.0, 108.0, Signal("HOLD", 0, 0.005, 0.05, 0.08, "")),  # low under entry
        (0, 99.0, 105.0, 108.0, Signal("HOLD", 0, -0.01, 0.05, 0.08, "")),
        (10, 95.0, 99.9, 103.0, Signal("EXIT", 0, -0.05, -0.001, 0.03, "")),
        (10, 95.0, 100.0, 103.0, Signal("HOLD", 0, -0.05, 0.0, 0.03, "")),  # median == exit: hold
        (-5, 120.0, 130.0, 140.0, Signal("HOLD", 0, 0.2, 0.3, 0.4, "")),  # short: not ours
    ],
)
def test_decide(position: float, low: float, median: float, high: float, expected: Signal) -> None:
    sig = decide(position=position, last=100.0, low=low, median=median, high=high, **RULE)
    assert (sig.action, sig.size) == (expected.action, expected.size)
    assert sig.low_return == pytest.approx(expected.low_return, abs=1e-9)
    assert sig.median_return == pytest.approx(expected.median_return, abs=1e-9)
    assert sig.high_return == pytest.approx(expected.high_return, abs=1e-9)
    assert sig.reason


def test_decide_refuses_broken_input() -> None:
    nan = math.nan
    assert (
        decide(position=0, last=100.0, low=nan, median=101.0, high=102.0, **RULE).action == "HOLD"
    )
    assert decide(position=0, last=0.0, low=1.0, median=2.0, high=3.0, **RULE).action == "HOLD"
    small = {**RULE, "budget_usd": 50.0}
    sig = decide(position=0, last=100.0, low=105.0, median=106.0, high=107.0, **small)
    assert (sig.action, sig.reason) == ("HOLD", "budget buys no share")


# -- orders follow the rule given the forecast --------------------------------------------------


def script(n: int) -> Returns:
    if n < 20:
        return (-0.01, 0.01, 0.03)  # low below entry: hold
    if n < 30:
        return (0.02, 0.04, 0.06)  # low clears entry: buy at n == 20
    if n < 40:
        return (-0.10, 0.01, 0.30)  # long, median positive: hold
    return (-0.05, -0.01, 0.01)  # median negative: exit at n == 40


def test_orders_follow_the_forecast() -> None:
    pipeline = Scripted(script)
    model = ChronosModel(pipeline, model_id="scripted", revision="r1")
    strategy = run(
        model, end=utc(2004, 11, 30), min_context=10, context_length=1000, entry_return=0.01
    )
    closes = read_csv_bars(csv_cfg("GOOG")).numeric["close"]
    orders = []
    for rec, note in forecast_records(strategy):
        sym = note["symbols"]["GOOG"]
        n = sym["context_length"]
        assert sym["last"] == closes[n - 1]  # the newest bar of the window is the current bar
        assert sym["returns"] == pytest.approx(list(script(n)), rel=1e-5)
        for side, symbol, size in created(rec):
            orders.append((n, side, symbol, size))
            if side == "BUY":
                assert rec.portfolio_value is not None
                assert size == math.floor(rec.portfolio_value * 0.9 / sym["last"])
                assert sym["action"] == "BUY" and sym["size"] == size
    assert [o[:3] for o in orders] == [(20, "BUY", "GOOG"), (40, "SELL", "GOOG")]
    assert orders[0][3] == orders[1][3]  # the exit closes the whole position
    assert strategy.getposition(strategy.datas[0]).size == 0
    assert set(pipeline.batches) == {1}


def test_wide_forecast_buys_a_smaller_position() -> None:
    model = ChronosModel(Scripted(lambda n: (0.01, 0.05, 0.41)), model_id="s", revision="r")
    strategy = run(model, end=utc(2004, 10, 30), min_context=10, target_spread=0.10)
    rec, note = next((r, n) for r, n in forecast_records(strategy) if created(r))
    size = created(rec)[0][2]
    last = note["symbols"]["GOOG"]["last"]
    assert rec.portfolio_value is not None
    assert note["symbols"]["GOOG"]["context_length"] == 10
    assert size == math.floor(rec.portfolio_value * 0.9 * 0.25 / last)  # 0.10 / 0.40 spread


def test_entry_threshold_keeps_the_agent_out() -> None:
    model = ChronosModel(Scripted(script), model_id="s", revision="r")
    strategy = run(model, end=utc(2004, 11, 30), min_context=10, entry_return=0.025)
    assert forecast_records(strategy)
    assert not any(created(rec) for rec, _ in forecast_records(strategy))


# -- the real model on real data: the record holds the forecast ---------------------------------


def test_fmel_record_holds_the_forecast_and_one_access_per_window(bolt_dir: Path) -> None:
    model = get_model(ChronosConfig(model=str(bolt_dir)))
    symbols = ("GOOG", "SP500", "NASDAQ")
    calls: list[tuple[int, ...]] = []
    real = model.pipeline.predict_quantiles

    def spy(inputs: torch.Tensor, **kw: Any) -> Any:
        calls.append(tuple(inputs.shape))
        return real(inputs, **kw)

    model.pipeline.predict_quantiles = spy
    try:
        strategy = run(
            model,
            symbols,
            start=utc(2010, 1, 1),
            end=utc(2011, 12, 31),
            every=5,
            min_context=32,
            context_length=512,
            horizon=8,
        )
    finally:
        del model.pipeline.predict_quantiles
    records = forecast_records(strategy)
    assert len(records) == strategy.forecasts == len(calls) > 10
    assert all(shape[0] == 3 for shape in calls)  # ONE call per decision, all symbols batched
    lengths = [note["symbols"]["GOOG"]["context_length"] for _, note in records]
    assert lengths[0] == 36  # first forecast bar (1 + 5k) with >= 32 bars of history
    assert max(lengths) == 256 == model.max_context_length  # capped by the model
    for rec, note in records:
        assert note["model"] == str(bolt_dir) and note["revision"] == model.revision
        assert note["kind"] == "chronos-bolt" and note["device"] == "cpu"
        assert note["levels"] == [0.1, 0.5, 0.9] and note["horizon_bars"] == 8
        assert note["latency_ms"] > 0 and note["batch_size"] == 3
        assert rec.reads == 2 * 3  # per symbol: one len, one window
        by_symbol = {d.symbol: d for d in rec.data_accessed}
        for symbol in symbols:
            sym = note["symbols"][symbol]
            assert len(sym["quantiles"]) == 3 and all(math.isfinite(x) for x in sym["quantiles"])
            windows = [a for a in by_symbol[symbol].access_patterns if a.field == "close"]
            assert len(windows) == 1
            (w,) = windows
            assert (w.size, w.index, w.lookahead) == (sym["context_length"], 0, False)
            assert w.value == sym["last"]
            # bar_index counts the feed's bars (from its 2010-01-01 start): the current bar.
            bar_time = np.datetime64(int(rec.bar_time), "s")
            assert w.bar_index == bar_number(symbol, bar_time) - bar_number(symbol, FIRST)
            assert w.data_hash == by_symbol[symbol].data_hash  # the current bar's hash
            assert sym["context_length"] == min(256, w.bar_index + 1)
    # Bars between forecasts read nothing; bars before min_context only checked the length.
    between = [r for r in strategy.analyzers.fmel.records if not r.notes]
    assert any(r.reads == 0 for r in between)
    assert {a.field for r in between for d in r.data_accessed for a in d.access_patterns} == {"len"}


FIRST = np.datetime64("2010-01-01")


def bar_number(symbol: str, when: np.datetime64) -> int:
    """Position of the first bar at or after ``when`` in the whole file."""
    return int(np.searchsorted(bar_times(symbol), when))


def test_chronos2_agent_on_real_data(chronos2_dir: Path) -> None:
    model = get_model(ChronosConfig(model=str(chronos2_dir)))
    strategy = run(
        model,
        ("GOOG", "SP500"),
        start=utc(2012, 1, 1),
        end=utc(2012, 8, 1),
        every=3,
        min_context=20,
        horizon=5,
        quantiles=(0.2, 0.5, 0.8),
        note_path=True,
    )
    records = forecast_records(strategy)
    assert records
    for _, note in records:
        assert note["kind"] == "chronos-2" and note["levels"] == [0.2, 0.5, 0.8]
        for sym in note["symbols"].values():
            path = np.array(sym["path"], dtype=float)
            assert path.shape == (5, 3) and np.isfinite(path).all()
            assert sym["quantiles"] == path[-1].tolist()


def test_forecast_another_line(bolt_dir: Path) -> None:
    model = get_model(ChronosConfig(model=str(bolt_dir)))
    strategy = run(
        model, start=utc(2013, 1, 1), end=utc(2013, 4, 1), line="open", min_context=16, every=4
    )
    rec, note = forecast_records(strategy)[0]
    fields = {a.field: a for d in rec.data_accessed for a in d.access_patterns}
    assert set(fields) == {"len", "open"}
    assert fields["open"].size == note["symbols"]["GOOG"]["context_length"]
    assert note["line"] == "open"


# -- same results with and without tracking, preloaded or next-by-next (live) ------------------


def test_tracking_and_next_by_next_change_no_result(bolt_dir: Path) -> None:
    model = get_model(ChronosConfig(model=str(bolt_dir)))
    kw: dict[str, Any] = {
        "start": utc(2008, 1, 1),
        "end": utc(2008, 12, 31),
        "every": 3,
        "min_context": 32,
        "entry_return": -0.02,
        "exit_return": -0.01,
    }
    base = run(model, ("GOOG", "SP500"), fmel=False, **kw)
    tracked = run(model, ("GOOG", "SP500"), **kw)
    live_like = run(model, ("GOOG", "SP500"), cerebro_kw={"preload": False, "runonce": False}, **kw)
    assert transactions(base), "the scenario must trade to compare anything"
    assert transactions(tracked) == transactions(base) == transactions(live_like)
    values = {s.broker.getvalue() for s in (base, tracked, live_like)}
    assert len(values) == 1


def test_bounded_memory_feed_uses_only_what_it_holds(bolt_dir: Path) -> None:
    # exactbars=1 keeps one bar per line (as a live feed with a tiny lookback would): the agent
    # must forecast from what is in memory, never slice past it.
    model = get_model(ChronosConfig(model=str(bolt_dir)))
    strategy = run(
        model,
        start=utc(2012, 1, 1),
        end=utc(2012, 3, 1),
        min_context=1,
        cerebro_kw={"preload": False, "runonce": False, "exactbars": 1},
    )
    lengths = {n["symbols"]["GOOG"]["context_length"] for _, n in forecast_records(strategy)}
    assert lengths == {1}


# -- params ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, message",
    [
        ({"quantiles": (0.1, 0.9)}, "including 0.5"),
        ({"quantiles": (0.9, 0.5, 0.1)}, "ascending"),
        ({"line": "rsi"}, "line='rsi'"),
        ({"min_context": 600, "context_length": 512}, "min_context 600 > context_length"),
        ({"horizon": 0}, "horizon"),
        ({"allocation": 1.5}, "allocation"),
        ({"model": 3}, "model: expected"),
    ],
)
def test_bad_params_are_config_errors(params: dict[str, Any], message: str, bolt_dir: Path) -> None:
    params = {"model": str(bolt_dir), **params}
    with pytest.raises(ConfigError, match=message):
        run(end=utc(2004, 9, 30), fmel=False, **params)


# -- loaded once: optimisation and the runner ---------------------------------------------------


def test_optimisation_runs_share_one_model(bolt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = count_loads(monkeypatch)
    cerebro = bt.Cerebro(stdstats=False, maxcpus=1, optreturn=False)
    cerebro.adddata(make_csv_feed(csv_cfg("GOOG", utc(2012, 1, 1), utc(2012, 6, 1))), name="GOOG")
    cerebro.optstrategy(ChronosAgent, model=[str(bolt_dir)], every=[2, 5], min_context=[16])
    results = cerebro.run()
    strategies = [r[0] for r in results]
    assert len(strategies) == 2 and all(s.forecasts > 0 for s in strategies)
    assert strategies[0].model is strategies[1].model
    assert loads == [str(bolt_dir)]


def runner_env(tmp_path: Path, model: str, name: str) -> dict[str, str]:
    return {
        "AGENT": "agents.chronos_agent:ChronosAgent",
        "CHRONOS_MODEL": model,
        "AGENT_PARAMS": json.dumps({"every": 10, "min_context": 32, "horizon": 8}),
        "SYMBOLS": "GOOG,SP500",
        "BACKTEST_START": "2011-01-01",
        "BACKTEST_END": "2011-12-31",
        "FMEL_LOCAL_PATH": str(tmp_path / f"{name}.duckdb"),
        "FMEL_FLUSH_INTERVAL_S": "0.2",
        "FMEL_SPILL_DIR": str(tmp_path / "spill"),
        "PROGRESS": "off",
    }


def test_runner_loads_the_model_once_and_records_forecasts(
    tmp_path: Path, bolt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = count_loads(monkeypatch)
    reports = [
        Runner(load_config(runner_env(tmp_path, str(bolt_dir), name))).run() for name in ("a", "b")
    ]
    assert loads == [str(bolt_dir)]
    assert all(r.decisions > 0 and r.records_written == r.decisions for r in reports)
    con = duckdb.connect(str(tmp_path / "a.duckdb"), read_only=True)
    try:
        notes = [
            json.loads(n)["forecast"]
            for (n,) in con.execute(
                "SELECT notes FROM decisions WHERE notes IS NOT NULL ORDER BY decision_point"
            ).fetchall()
        ]
        windows = con.execute(
            "SELECT count(*) FROM decisions, unnest(data_accessed) AS d(d), "
            "unnest(d.access_patterns) AS a(a) WHERE a.field = 'close'"
        ).fetchone()
    finally:
        con.close()
    assert notes and all(
        n["model"] == str(bolt_dir) and set(n["symbols"]) == {"GOOG", "SP500"} for n in notes
    )
    assert windows is not None and windows[0] == 2 * len(notes)


def test_runner_fails_fast_when_the_model_is_missing(tmp_path: Path) -> None:
    cfg = load_config(runner_env(tmp_path, str(tmp_path / "no-model"), "x"))
    runner = Runner(cfg)
    with pytest.raises(ConfigError, match="no such folder"):
        runner.build()
    assert runner.cerebro is None  # nothing built
    assert not (tmp_path / "x.duckdb").exists()
