"""runtime.reporting.html: the numbers behind the pictures, checked by hand; the page is
self-contained and safe with any recorded text; the optimisation page from a hand-made trials
frame (the shape of runtime.research.store's ``trials`` table)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from feeds.csv.reader import bar_size_text, parse_bar_size_text
from runtime.reporting.bars import BAR_COLUMNS
from runtime.reporting.html import (
    best_per_fold,
    buy_and_hold,
    drawdown_pct,
    explorer_payload,
    monthly_returns_pct,
    render_run,
    render_study,
    run_periods_per_year,
    surface_figure,
    thin,
)
from runtime.reporting.store import ReportData

UTC = "UTC"


def ts(*days: str) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(list(days)), tz=UTC)


def bars_frame(rows: list[tuple[str, str, float, str]]) -> pd.DataFrame:
    """(symbol, day, close, hash) -> a session_bars frame."""
    out = []
    counters: dict[str, int] = {}
    for symbol, day, close, digest in rows:
        i = counters.get(symbol, 0)
        counters[symbol] = i + 1
        out.append(
            {
                "session_id": "s",
                "symbol": symbol,
                "bar_size": "1d",
                "bar_index": i,
                "bar_time": pd.Timestamp(day, tz=UTC),
                "open": close,
                "high": close,
                "low": close,
                "close": close,
                "volume": 100.0,
                "data_hash": digest,
            }
        )
    return pd.DataFrame(out, columns=list(BAR_COLUMNS))


def test_buy_and_hold_splits_the_start_value_and_waits_for_late_symbols() -> None:
    bars = bars_frame(
        [
            ("A", "2024-01-01", 10.0, "a0"),
            ("A", "2024-01-02", 12.0, "a1"),
            ("A", "2024-01-03", 11.0, "a2"),
            ("B", "2024-01-02", 50.0, "b0"),
            ("B", "2024-01-03", 40.0, "b1"),
        ]
    )
    idx = ts("2024-01-01", "2024-01-02", "2024-01-03")
    got = buy_and_hold(bars, idx, 1000.0)
    # A: 500 USD at 10 -> 50 shares; B: 500 USD cash until its first close 50 -> 10 shares
    assert got.tolist() == pytest.approx([500 + 500, 50 * 12 + 500, 50 * 11 + 10 * 40])
    assert buy_and_hold(bars.iloc[0:0], idx, 1000.0).empty
    # two steps in one millisecond (feeds less than 1 ms apart; found by an attack,
    # helper-66: float() of a Series stopped the report)
    twice = ts("2024-01-01", "2024-01-01", "2024-01-02", "2024-01-03")
    got = buy_and_hold(bars, twice, 1000.0)
    assert got.tolist() == pytest.approx([1000, 1000, 50 * 12 + 500, 50 * 11 + 10 * 40])


def test_drawdown_and_monthly_returns_by_hand() -> None:
    idx = ts("2024-01-02", "2024-01-31", "2024-02-15", "2024-02-29", "2024-04-01")
    equity = pd.Series([100.0, 110.0, 99.0, 121.0, 108.9], index=idx)
    assert drawdown_pct(equity).tolist() == pytest.approx([0, 0, -10, 0, -10])
    table = monthly_returns_pct(equity)
    assert table.loc[2024, 1] == pytest.approx(10.0)  # 100 -> 110 (from the first value)
    assert table.loc[2024, 2] == pytest.approx(10.0)  # 110 -> 121
    assert np.isnan(table.loc[2024, 3])  # no bar in March
    assert table.loc[2024, 4] == pytest.approx(-10.0)  # 121 -> 108.9
    assert list(table.columns) == list(range(1, 13))


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=30_000), st.integers(min_value=2, max_value=6_000))
def test_thin_keeps_the_ends_and_the_bound(n: int, cap: int) -> None:
    s = pd.Series(np.arange(n, dtype=float))
    t = thin(s, cap)
    assert len(t) <= cap + 1 and t.iloc[0] == 0 and t.iloc[-1] == n - 1
    assert (len(t) == n) == (n <= cap)


def test_bar_size_text_round_trip() -> None:
    import backtrader as bt

    for tf, comp in [
        (bt.TimeFrame.Days, 1),
        (bt.TimeFrame.Minutes, 60),
        (bt.TimeFrame.Minutes, 5),
        (bt.TimeFrame.Months, 1),
        (bt.TimeFrame.Weeks, 1),
        (bt.TimeFrame.Years, 1),
        (bt.TimeFrame.MicroSeconds, 500_000),
        (bt.TimeFrame.MicroSeconds, 250),
    ]:
        assert parse_bar_size_text(bar_size_text(tf, comp)) == (tf, comp)
    assert bar_size_text(bt.TimeFrame.Minutes, 60) == "1h"
    assert bar_size_text(bt.TimeFrame.MicroSeconds, 500_000) == "500ms"


EVIL = "</script><script>window.PWNED=1</script><!--"


def sample_data(bars: pd.DataFrame | None = None) -> ReportData:
    idx = ts("2024-01-01", "2024-01-02", "2024-01-03")
    actions = pd.DataFrame(
        [
            (1, idx[1], 0, "CREATED", "BUY", "A", 7, "Market", 10.0, None, None, None, None, None),
            (2, idx[2], 0, "COMPLETED", "BUY", "A", 7, "Market", 10.0, None, 10.0, 11.0, 0.1, None),
        ],
        columns=[
            "decision_point",
            "bar_time",
            "seq",
            "event",
            "side",
            "symbol",
            "order_ref",
            "order_type",
            "size",
            "price",
            "exec_size",
            "exec_price",
            "commission",
            "reason",
        ],
    )
    decisions = pd.DataFrame(
        [(1, idx[1], "NEXT", "BUY", EVIL, 0.5, json.dumps({"why": EVIL}), 1, 0, 1000.0, 1000.0)],
        columns=[
            "decision_point",
            "bar_time",
            "stage",
            "action",
            "reasoning",
            "confidence",
            "notes",
            "reads",
            "lookahead_reads",
            "portfolio_value",
            "portfolio_cash",
        ],
    )
    reads = pd.DataFrame(
        [(1, "A", 0, "close", 0, 1, 1, "a1", 12.0, None, False)],
        columns=[
            "decision_point",
            "symbol",
            "seq",
            "field",
            "idx",
            "size",
            "bar_index",
            "data_hash",
            "value",
            "text_value",
            "lookahead",
        ],
    )
    return ReportData(
        session_id="s",
        agent_id="agent",
        agent_class="m.C",
        agent_params="{}",
        mode="backtest",
        equity=pd.Series([1000.0, 1000.0, 1010.0], index=idx),
        bars=bars
        if bars is not None
        else bars_frame(
            [
                ("A", "2024-01-01", 10.0, "a0"),
                ("A", "2024-01-02", 12.0, "a1"),
                ("A", "2024-01-03", 11.0, "a2"),
            ]
        ),
        actions=actions,
        decisions=decisions,
        reads=reads,
        source="test",
    )


def test_explorer_payload_links_orders_decisions_reads_and_bars() -> None:
    p = explorer_payload(sample_data())
    assert [o["ref"] for o in p["orders"]] == [7]
    assert [e["event"] for e in p["orders"][0]["events"]] == ["CREATED", "COMPLETED"]
    assert p["orders"][0]["final"] == "COMPLETED"
    d = p["decisions"]["1"]
    assert d["reasoning"] == EVIL and d["reads"][0][:3] == [0, "A", "close"]
    assert p["bars"]["a1"]["close"] == 12.0 and p["bars"]["a1"]["bar_index"] == 1


def test_recorded_text_cannot_break_out_of_the_page() -> None:
    page = render_run(sample_data())
    assert "window.PWNED" in page  # present as data...
    assert EVIL not in page and "<script>window.PWNED" not in page  # ...never as markup
    data = re.search(
        r'<script id="explorer-data" type="application/json">(.*?)</script>', page, re.S
    )
    assert data and json.loads(data.group(1))["decisions"]["1"]["reasoning"] == EVIL
    assert not re.search(r"<script[^>]+src=", page)  # self-contained


def test_a_run_without_stored_bars_still_renders() -> None:
    page = render_run(sample_data(bars=pd.DataFrame(columns=list(BAR_COLUMNS))))
    assert "No bars for this session" in page and 'id="equity-chart"' in page
    assert "price-chart-0" not in page
    assert run_periods_per_year(sample_data()) == 252


def trials_frame(n_params: int = 2) -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(3)
    for fold in range(3):
        t = 0
        for fast in (5, 10, 20):
            for slow in (30, 60):
                params = {"fast": fast, "slow": slow}
                if n_params == 3:
                    params["allocation"] = 0.5 + 0.1 * t
                objective = fast / 10 - slow / 100 + fold  # best: fast=20, slow=30
                rows.append(
                    {
                        "study_id": "study-1",
                        "fold": fold,
                        "trial": t,
                        "session_id": f"study-1-f{fold}-t{t}",
                        "status": "complete",
                        "params": json.dumps(params),
                        "metric": "sharpe",
                        "objective": objective,
                        "is_sharpe": objective,
                        "oos_sharpe": objective / 2 + rng.normal(0, 0.01),
                    }
                )
                t += 1
    return pd.DataFrame(rows)


def test_best_per_fold_is_the_highest_objective_unless_folds_say_otherwise() -> None:
    trials = trials_frame()
    best = best_per_fold(trials, None)
    assert best["fold"].tolist() == [0, 1, 2]
    assert [json.loads(p) for p in best["params"]] == [{"fast": 20, "slow": 30}] * 3
    folds = pd.DataFrame({"fold": [0, 1, 2], "best_trial": [0, 0, 0]})
    assert best_per_fold(trials, folds)["trial"].tolist() == [0, 0, 0]
    failed = trials.assign(status="failed")
    assert best_per_fold(failed, None).empty


def test_surface_is_a_heatmap_for_two_params_and_parallel_coordinates_otherwise() -> None:
    from runtime.reporting.html import params_frame

    two = trials_frame(2)
    fig = surface_figure(two, params_frame(two), "sharpe")
    assert fig["data"][0]["type"] == "heatmap"
    z = np.asarray(fig["data"][0]["z"], dtype=float)
    # mean over the three folds (objective + 0, + 1, + 2): fast=20, slow=30 -> 2 - 0.3 + 1
    assert z.shape == (2, 3) and z[0, 2] == pytest.approx(2.7)
    three = trials_frame(3)
    assert surface_figure(three, params_frame(three), "sharpe")["data"][0]["type"] == "parcoords"


def test_study_page_from_a_hand_made_frame() -> None:
    page = render_study(trials_frame())
    for div in ("folds-chart", "surface-chart", "is-oos-chart"):
        assert f'id="{div}"' in page
    table = re.search(r'<table id="folds">.*?</table>', page, re.S)
    assert table and table.group(0).count("<tr>") == 4
    assert "{&quot;fast&quot;: 20, &quot;slow&quot;: 30}" in table.group(0)
    with pytest.raises(ValueError, match="objective"):
        render_study(trials_frame().drop(columns=["objective"]))
    with pytest.raises(ValueError, match="no rows"):
        render_study(trials_frame().iloc[0:0])


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_any_recorded_text_round_trips_as_data(reasoning: str, note: str) -> None:
    data = sample_data()
    decisions = data.decisions.assign(reasoning=reasoning, notes=json.dumps({"n": note}))
    page = render_run(
        ReportData(
            **{**{f: getattr(data, f) for f in data.__dataclass_fields__}, "decisions": decisions}
        )
    )
    body = re.search(
        r'<script id="explorer-data" type="application/json">(.*?)</script>', page, re.S
    )
    assert body and "<" not in body.group(1)  # nothing in the data can open or close a tag
    d = json.loads(body.group(1))["decisions"]["1"]
    assert d["reasoning"] == reasoning and json.loads(d["notes"]) == {"n": note}


@pytest.mark.parametrize("metric", ["sortino", "calmar"])
def test_a_gain_without_drawdown_is_inf_in_the_folds_table_not_na(metric: str) -> None:
    """Sortino and Calmar of a window that gained without any drawdown are +inf, stored NULL
    (docs/research.md, "The objective": reports print ``inf``). The page printed ``n/a``
    (undefined) for the dominant trial (a fresh-context attack); a flat window stays n/a."""
    trials = trials_frame().assign(
        metric=metric,
        objective=math.inf,
        is_total_return_pct=5.0,
        is_max_drawdown_pct=0.0,
        oos_total_return_pct=[2.0 if t % 2 else 0.0 for t in range(18)],
        oos_max_drawdown_pct=0.0,
    )
    trials[f"is_{metric}"] = None
    trials[f"oos_{metric}"] = None
    trials.loc[trials["trial"] != 5, "objective"] = 1.0  # trial 5 (odd: OOS gained) is best
    table = re.search(r'<table id="folds">.*?</table>', render_study(trials), re.S)
    assert table is not None
    cells = re.findall(r'<td class="num">([^<]*)</td>', table.group(0))
    assert cells == ["inf", "inf"] * 3
    flat = trials.assign(oos_total_return_pct=0.0)
    table = re.search(r'<table id="folds">.*?</table>', render_study(flat), re.S)
    assert table is not None
    assert re.findall(r'<td class="num">([^<]*)</td>', table.group(0)) == ["inf", "n/a"] * 3
