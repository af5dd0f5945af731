"""The study page's figures with awkward trials (attack15 objparam/, undef_sortino/)."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from runtime.reporting.html import params_frame, surface_figure


def frame(name: str, objective: list[float]) -> pd.DataFrame:
    params = [{name: a, "y": b} for a in (1, 2) for b in (1, 2)]
    return pd.DataFrame(
        {
            "fold": 0,
            "trial": range(4),
            "status": "complete",
            "params": [json.dumps(p) for p in params],
            "objective": objective,
        }
    )


def test_a_param_named_objective_does_not_replace_the_objective() -> None:
    trials = frame("objective", [10.0, 20.0, 30.0, 40.0])
    fig = surface_figure(trials, params_frame(trials), "sharpe")
    trace = fig["data"][0]
    assert trace["type"] == "heatmap"
    assert trace["x"] == ["1", "2"] and trace["y"] == ["1", "2"]
    # rows y, columns objective(param): z[y][x] is the trial's objective, not the param
    assert trace["z"] == [[10.0, 30.0], [20.0, 40.0]]


def test_an_infinite_objective_is_no_number_in_the_figure() -> None:
    trials = frame("x", [1.0, math.inf, 3.0, 4.0])
    z = surface_figure(trials, params_frame(trials), "sortino")["data"][0]["z"]
    assert z == [[1.0, 3.0], [None, 4.0]]
    json.dumps(z, allow_nan=False)  # valid JSON for the page


@pytest.mark.parametrize("n", [1, 3])
def test_other_param_counts_still_draw(n: int) -> None:
    trials = frame("x", [1.0, 2.0, 3.0, 4.0])
    params = params_frame(trials).iloc[:, :n] if n == 1 else params_frame(trials).assign(z=1)
    assert surface_figure(trials, params, "sharpe")["data"][0]["type"] == "parcoords"


def test_the_study_page_marks_interrupted_and_undefined_folds() -> None:
    """attack15 sig_d19/: a stopped study's page says so; a fold where nothing was chosen too."""
    from runtime.reporting.html import render_study

    trials = pd.concat(
        [frame("x", [1.0, 2.0, 3.0, 4.0]), frame("x", [math.nan] * 4).assign(fold=1)]
    )
    folds = pd.DataFrame(
        {"fold": [0, 1, 2], "complete": [True, True, False], "best_trial": [3, None, None]}
    )
    page = render_study(trials, folds, study_id="S", metric="sharpe")
    assert "Interrupted: fold(s) 2 did not finish" in page
    assert "No defined objective: fold(s) 1, 2" in page
    whole = render_study(trials.iloc[:4], folds.iloc[:1], study_id="S", metric="sharpe")
    assert "Interrupted: fold" not in whole and "No defined objective:" not in whole


def test_the_max_drawdown_surface_is_a_positive_percent() -> None:
    trials = frame("x", [-1.0, -2.0, -3.0, -4.0])  # objective = -drawdown
    z = surface_figure(trials, params_frame(trials), "max_drawdown")["data"][0]["z"]
    assert z == [[1.0, 3.0], [2.0, 4.0]]
