"""What a trial scores: the objective's orientation, the in-sample/out-of-sample split of the
equity curve, the annualisation of a study, and the fold windows cut from preloaded bars."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DataError
from feeds.csv import CSVFeedConfig, read_csv_bars
from runtime.research.cli import annualisation, common_span
from runtime.research.folds import Fold
from runtime.research.study import better
from runtime.research.trial import TrialResult, objective_of, slice_bars, split_curve
from runtime.stats import performance_stats
from tests.conftest import DATA


def curve(values: list[float], start: str = "2020-01-01") -> pd.Series:
    idx = pd.date_range(start, periods=len(values), freq="D", tz="UTC")
    return pd.Series(values, index=idx, dtype=float)


def test_the_objective_is_higher_is_better_for_every_metric() -> None:
    up_down = performance_stats(curve([100, 110, 99, 120, 118]), periods_per_year=252)
    assert objective_of(up_down, "sharpe") == up_down.sharpe
    assert objective_of(up_down, "sortino") == up_down.sortino
    assert objective_of(up_down, "calmar") == up_down.calmar
    assert objective_of(up_down, "return") == pytest.approx(18.0)
    assert up_down.max_drawdown_pct == pytest.approx(10.0)
    assert objective_of(up_down, "max_drawdown") == pytest.approx(-10.0)  # minimised
    flat = performance_stats(curve([100, 100, 100]), periods_per_year=252)
    assert objective_of(flat, "sharpe") is None  # undefined, never "best"
    assert objective_of(None, "sharpe") is None


def test_out_of_sample_starts_from_the_last_in_sample_value() -> None:
    equity = curve([100, 101, 102, 104, 103, 110])  # 2020-01-01 .. 2020-01-06
    fold = Fold(
        0,
        datetime(2020, 1, 1, tzinfo=UTC),
        datetime(2020, 1, 4, tzinfo=UTC),
        datetime(2020, 1, 7, tzinfo=UTC),
    )
    in_sample, out = split_curve(equity, fold)
    assert list(in_sample) == [100, 101, 102]
    assert out is not None and list(out) == [102, 104, 103, 110]  # the 3 test bars' returns
    oos = performance_stats(out, periods_per_year=252)
    assert oos.total_return_pct == pytest.approx((110 / 102 - 1) * 100)
    whole = Fold(0, fold.train_start, datetime(2020, 1, 7, tzinfo=UTC), None)
    all_in, none = split_curve(equity, whole)
    assert len(all_in) == 6 and none is None


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.floats(1.0, 1e6), min_size=2, max_size=60),
    cut=st.integers(1, 59),
)
def test_the_split_loses_no_return_and_shares_only_the_boundary(
    values: list[float], cut: int
) -> None:
    equity = curve(values)
    cut = min(cut, len(values) - 1)
    boundary = equity.index[cut].to_pydatetime()
    fold = Fold(0, equity.index[0].to_pydatetime(), boundary, datetime(2100, 1, 1, tzinfo=UTC))
    a, b = split_curve(equity, fold)
    assert b is not None
    assert len(a) + len(b) == len(equity) + 1 and a.index[-1] == b.index[0]
    # chaining the two windows' growth gives the whole curve's
    growth = (a.iloc[-1] / a.iloc[0]) * (b.iloc[-1] / b.iloc[0])
    assert math.isclose(growth, values[-1] / values[0], rel_tol=1e-9)


def test_ties_go_to_the_lower_trial_number_whatever_the_arrival_order() -> None:
    def r(number: int, objective: float | None) -> TrialResult:
        return TrialResult(
            fold=0,
            number=number,
            params={},
            session_id=str(number),
            record=False,
            status="complete",
            objective=objective,
            in_sample=None,
            out_of_sample=None,
        )

    assert better(r(3, 1.0), None)
    assert better(r(2, 1.0), r(3, 1.0)) and not better(r(3, 1.0), r(2, 1.0))
    assert better(r(9, 1.5), r(2, 1.0))
    assert not better(r(1, None), r(2, -5.0))


def goog() -> CSVFeedConfig:
    return CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG")


def test_a_fold_window_of_preloaded_bars_is_what_the_reader_gives_for_that_range() -> None:
    cfg = goog()
    bars = read_csv_bars(cfg)
    start, end = datetime(2006, 2, 19, tzinfo=UTC), datetime(2008, 8, 19, tzinfo=UTC)
    window = slice_bars(bars, start, end)
    # the reader's end is inclusive: the last microsecond before the window's end
    direct = read_csv_bars(
        replace(cfg, start=start, end=datetime(2008, 8, 18, 23, 59, 59, 999999, tzinfo=UTC))
    )
    assert np.array_equal(window.times, direct.times)
    assert window.hashes == direct.hashes
    for name in direct.numeric:
        assert np.array_equal(window.numeric[name], direct.numeric[name], equal_nan=True)
    assert np.shares_memory(window.times, bars.times)  # a view: nothing copied per trial
    with pytest.raises(DataError, match="GOOG: no bars"):
        slice_bars(bars, datetime(2020, 1, 1, tzinfo=UTC), datetime(2021, 1, 1, tzinfo=UTC))


def test_a_study_of_the_bundled_daily_files_spans_their_common_dates_at_252_a_year() -> None:
    bars = {
        s: read_csv_bars(CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s))
        for s in ("GOOG", "SP500", "NASDAQ")
    }
    first, last = common_span(bars)
    assert (first, last) == (pd.Timestamp("2004-08-19"), pd.Timestamp("2013-03-01"))
    assert annualisation(bars, first, last) == 252
    eurusd = {"EURUSD": read_csv_bars(CSVFeedConfig(path=DATA / "EURUSD.csv", symbol="EURUSD"))}
    f, la = common_span(eurusd)
    assert annualisation(eurusd, f, la) == 252 * 24  # hourly FX: 24 bars a trading day


def test_symbols_that_never_overlap_are_refused() -> None:
    bars = {
        "BTC/USD": read_csv_bars(CSVFeedConfig(path=DATA / "BTCUSD.csv", symbol="BTC/USD")),
        "EURUSD": read_csv_bars(CSVFeedConfig(path=DATA / "EURUSD.csv", symbol="EURUSD")),
    }
    bars["EURUSD"] = slice_bars(
        bars["EURUSD"], datetime(2017, 4, 1, tzinfo=UTC), datetime(2017, 5, 1, tzinfo=UTC)
    )
    bars["BTC/USD"] = slice_bars(
        bars["BTC/USD"], datetime(2012, 1, 1, tzinfo=UTC), datetime(2013, 1, 1, tzinfo=UTC)
    )
    with pytest.raises(DataError, match="do not overlap"):
        common_span(bars)


def test_a_dominant_curve_has_the_best_sortino_and_calmar() -> None:
    """No losing bar and a gain: Sortino and Calmar divide by zero risk, +inf, and that trial
    beats every finite one (attack15 undef_sortino / undef_calmar)."""
    dominant = performance_stats(curve([100, 101, 103, 103, 110]), periods_per_year=252)
    assert dominant.sortino is None and dominant.calmar is None  # stats: undefined ratio
    for metric in ("sortino", "calmar"):
        assert objective_of(dominant, metric) == math.inf  # type: ignore[arg-type]
    flat = performance_stats(curve([100, 100, 100]), periods_per_year=252)
    assert objective_of(flat, "sortino") is None  # no gain, no risk: still undefined
    finite = performance_stats(curve([100, 110, 99, 120, 118]), periods_per_year=252)
    good = TrialResult(
        number=1,
        fold=0,
        params={},
        status="complete",
        session_id="b",
        record=False,
        objective=objective_of(finite, "sortino"),
        in_sample=finite,
        out_of_sample=None,
    )
    best = replace(good, number=2, session_id="c", objective=objective_of(dominant, "sortino"))
    assert better(best, good) and not better(good, best)


@pytest.mark.parametrize("lead", [math.inf, 2.0])
def test_the_median_pruner_stops_a_trailing_trial_when_leaders_score_inf(lead: float) -> None:
    """helper-74: Sortino/Calmar of a gain without drawdown are +inf; the median of values with
    +inf was NaN and nothing trails NaN, so no trial was pruned (and numpy warned each step)."""
    import warnings

    from runtime.research.trial import PruneSnapshot, _LocalPruner

    snapshot = PruneSnapshot(tuple((lead, (lead,) * 5) for _ in range(6)))
    pruner = _LocalPruner(snapshot, "sortino", 252.0)
    days = pd.date_range("2020-01-01", periods=60, freq="D", tz="UTC")
    losing = pd.Series(np.linspace(100_000.0, 90_000.0, 60), index=days)
    losing.iloc[10] += 500.0  # one up day: a finite, negative Sortino
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no RuntimeWarning either
        verdicts = [pruner(step, losing) for step in range(5)]
    assert any(verdicts), pruner.values
    assert all(v is not None and math.isfinite(v) and v < 0 for v in pruner.values)


@pytest.mark.parametrize("metric", ["calmar", "sortino"])
def test_a_gain_ranks_lower_the_deeper_its_one_drawdown(metric: str) -> None:
    """helper-74: a gain whose one drawdown was between 1e-12 and 1e-9 of equity scored None
    (the stats called it noise, the +inf rule did not) and lost to a worse trial; the ranking
    went +inf, None, huge as the drawdown grew. Now it never increases with the drawdown."""
    days = pd.date_range("2020-01-01", periods=60, freq="D", tz="UTC")
    values = []
    for dip in (0.0, 1e-13, 1e-11, 1e-10, 5e-10, 1e-9, 2e-9, 1e-8, 1e-6, 1e-3):
        curve = pd.Series(100_000.0 + 100.0 * np.arange(60), index=days)
        curve.iloc[30] = curve.iloc[29] * (1.0 - dip)
        value = objective_of(performance_stats(curve, periods_per_year=252.0), metric)
        assert value is not None, (dip, metric)
        values.append(value)
    assert values == sorted(values, reverse=True), values
    assert values[0] == math.inf and math.isfinite(values[-1])
