"""runtime.research.space: OPTIMIZE_SPACE parsing, the grid, and Optuna's proposals."""

from __future__ import annotations

import itertools
import math
from typing import Any

import backtrader as bt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import ConfigError
from runtime.research.cli import check_space
from runtime.research.config import OptimizeConfig
from runtime.research.space import (
    MAX_GRID_POINTS,
    Choice,
    GridSearch,
    OptunaSearch,
    Range,
    grid_points,
    grid_size,
    parse_space,
)

ISSUE_SPACE = {"fast": [5, 10, 20], "slow": {"low": 30, "high": 120, "step": 10}}


def test_the_issue_example_is_a_30_point_grid_in_key_order() -> None:
    space = parse_space(ISSUE_SPACE, grid=True)
    assert space == (
        Choice("fast", (5, 10, 20)),
        Range("slow", 30, 120, 10, log=False, integer=True),
    )
    points = list(grid_points(space))
    assert grid_size(space) == len(points) == 30
    assert points[0] == {"fast": 5, "slow": 30}
    assert points[1] == {"fast": 5, "slow": 40}  # the last param varies fastest
    assert points[-1] == {"fast": 20, "slow": 120}
    assert all(isinstance(p["slow"], int) for p in points)


def test_ranges_keep_their_type_and_stop_at_the_last_step() -> None:
    (r,) = parse_space({"x": {"low": 1, "high": 10, "step": 4}}, grid=True)
    assert isinstance(r, Range) and r.high == 9 and r.values() == (1, 5, 9)
    (f,) = parse_space({"a": {"low": 0.1, "high": 0.9, "step": 0.2}}, grid=True)
    assert isinstance(f, Range) and f.values() == (
        0.1,
        0.3,
        0.5,
        0.7,
        0.9,
    )  # no 0.30000000000000004
    (i,) = parse_space({"n": {"low": 3, "high": 5}}, grid=True)
    assert isinstance(i, Range) and i.values() == (3, 4, 5)


def test_a_scalar_is_a_constant_and_lists_take_any_json_scalar() -> None:
    raw = {"allocation": 0.5, "mode": ["a", "b"], "flag": [True, False, None]}
    space = parse_space(raw, grid=True)
    assert grid_size(space) == 6
    assert {p["allocation"] for p in grid_points(space)} == {0.5}


@pytest.mark.parametrize(
    ("raw", "grid", "message"),
    [
        ({"fast": []}, True, "empty list"),
        ({"fast": [5, 5]}, True, "twice"),
        ({"fast": [[1]]}, True, "numbers, strings"),
        ({"fast": [math.inf]}, True, "finite"),
        ({"x": {"low": 5}}, True, "both low and high"),
        ({"x": {"low": 5, "high": 1}}, True, "low 5 > high 1"),
        ({"x": {"low": 1, "high": 5, "step": 0}}, True, "step must be > 0"),
        ({"x": {"low": 1, "high": 5, "by": 1}}, True, "unknown key"),
        ({"x": {"low": 0.5, "high": 2.5}}, True, "continuous range"),
        ({"x": {"low": 1, "high": 5, "log": True}}, True, "log range"),
        ({"x": {"low": 0, "high": 5, "log": True}}, False, "needs low > 0"),
        ({"x": {"low": 1, "high": 5, "log": True, "step": 1}}, False, "cannot be combined"),
        ({"x": {"low": True, "high": 5}}, True, "finite number"),
        ({"1x": [1]}, True, "identifiers"),
        # helper-74: OverflowError out of Optuna's sampler; TPE's TypeError beyond 2**53
        ({"x": {"low": -1e308, "high": 1e308}}, False, "beyond the largest float"),
        ({"x": {"low": -(10**20), "high": 10**20}}, False, "within +-2**53"),
    ],
)
def test_bad_spaces_fail_naming_the_variable(raw: dict[str, Any], grid: bool, message: str) -> None:
    with pytest.raises(ConfigError, match="OPTIMIZE_SPACE") as err:
        parse_space(raw, grid=grid)
    assert message in str(err.value)


def test_sampled_search_accepts_continuous_and_log_ranges() -> None:
    space = parse_space(
        {"x": {"low": 0.5, "high": 2.5}, "y": {"low": 1e-3, "high": 1.0, "log": True}}, grid=False
    )
    assert [type(p) for p in space] == [Range, Range]


def test_the_config_refuses_a_bad_space_at_construction() -> None:
    with pytest.raises(ConfigError, match="OPTIMIZE_SPACE"):
        OptimizeConfig(space={"x": {"low": 0.5, "high": 2.5}})  # grid by default
    assert OptimizeConfig(space={"x": {"low": 0.5, "high": 2.5}}, sampler="tpe").parameters


def test_the_grid_search_proposes_every_point_once_then_none() -> None:
    search = GridSearch(parse_space(ISSUE_SPACE, grid=True))
    seen = []
    while (p := search.ask()) is not None:
        seen.append((p.number, tuple(p.params.items())))
    assert [n for n, _ in seen] == list(range(30))
    assert len({params for _, params in seen}) == 30 == search.total


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_optuna_proposes_inside_the_space_and_learns_from_any_order(sampler: str) -> None:
    space = parse_space(
        {
            "fast": [5, 10, 20],
            "slow": {"low": 30, "high": 120, "step": 10},
            "w": {"low": 0.1, "high": 0.9},
        },
        grid=False,
    )
    search = OptunaSearch(space, sampler=sampler, trials=12, seed=7)  # type: ignore[arg-type]
    proposals = []
    while (p := search.ask()) is not None:
        proposals.append(p)
        if len(proposals) % 3 == 0:  # tell in reverse order of asking, as parallel trials do
            for q in reversed(proposals[-3:]):
                search.tell(q.number, float(q.params["slow"]), "complete")  # type: ignore[arg-type]
    assert len(proposals) == 12
    for p in proposals:
        assert p.params["fast"] in (5, 10, 20)
        assert p.params["slow"] in range(30, 121, 10) and isinstance(p.params["slow"], int)
        assert 0.1 <= p.params["w"] <= 0.9  # type: ignore[operator]


def test_optuna_is_reproducible_with_a_seed() -> None:
    space = parse_space({"slow": {"low": 30, "high": 120, "step": 10}}, grid=False)

    def run() -> list[Any]:
        s = OptunaSearch(space, sampler="tpe", trials=8, seed=3)
        out = []
        while (p := s.ask()) is not None:
            out.append(p.params["slow"])
            s.tell(p.number, -abs(float(p.params["slow"]) - 70.0), "complete")  # type: ignore[arg-type]
        return out

    assert run() == run()


def test_failed_and_pruned_trials_are_told_as_such() -> None:
    import optuna

    search = OptunaSearch(
        parse_space({"x": [1, 2, 3]}, grid=False), sampler="random", trials=3, seed=0
    )
    a, b, c = search.ask(), search.ask(), search.ask()
    assert a and b and c
    search.tell(a.number, None, "complete")  # undefined objective: a failure to Optuna
    search.tell(b.number, 1.0, "pruned")
    search.tell(c.number, 2.0, "complete")
    states = [t.state for t in search.study.trials]
    assert states == [
        optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.COMPLETE,
    ]


# -- properties ---------------------------------------------------------------------------------

whole = st.integers(-1000, 1000)


@settings(max_examples=200, deadline=None)
@given(low=whole, span=st.integers(0, 500), step=st.integers(1, 60))
def test_integer_grids_stay_in_bounds_on_the_step(low: int, span: int, step: int) -> None:
    (r,) = parse_space({"x": {"low": low, "high": low + span, "step": step}}, grid=True)
    assert isinstance(r, Range)
    values = r.values()
    assert values[0] == low and all(low <= v <= low + span for v in values)
    assert all(b - a == step for a, b in itertools.pairwise(values))
    assert values[-1] + step > low + span  # nothing left out at the top
    assert len(values) == span // step + 1


@settings(max_examples=200, deadline=None)
@given(
    low=st.floats(-100, 100, allow_nan=False),
    span=st.floats(0, 100, allow_nan=False),
    step=st.floats(0.01, 50, allow_nan=False),
)
def test_float_grids_stay_in_bounds(low: float, span: float, step: float) -> None:
    (r,) = parse_space({"x": {"low": low, "high": low + span, "step": step}}, grid=True)
    assert isinstance(r, Range)
    values = r.values()
    assert len(values) >= 1
    tol = 1e-9 * max(1.0, abs(low) + span)
    assert all(low - tol <= v <= low + span + tol for v in values)  # type: ignore[operator]
    assert len(set(values)) == len(values)


@settings(max_examples=300, deadline=None)
@given(
    low=st.floats(-1e17, 1e17, allow_nan=False),
    span=st.floats(0, 1e3, allow_nan=False),
    step=st.floats(1e-20, 10, allow_nan=False),
)
def test_a_float_grid_has_distinct_points_or_is_refused(
    low: float, span: float, step: float
) -> None:
    """A step finer than floats near the range made two grid points one number (the same
    trial ran twice): refused at start naming OPTIMIZE_SPACE, or every point distinct."""
    try:
        (r,) = parse_space({"x": {"low": low, "high": low + span, "step": step}}, grid=True)
    except ConfigError as e:
        assert "OPTIMIZE_SPACE" in str(e)
        return
    assert isinstance(r, Range)
    values = r.values()
    assert len(set(values)) == len(values)


def test_a_step_floats_cannot_tell_apart_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"finer than a float can tell apart near 1e[+]16"):
        parse_space({"x": {"low": 1e16, "high": 1e16 + 10, "step": 0.5}}, grid=True)
    with pytest.raises(ConfigError, match=r"finer than a float can tell apart near 0\.1 "):
        parse_space({"x": {"low": 0.1, "high": 0.100000000000001, "step": 1e-17}}, grid=True)


json_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(raw=st.dictionaries(st.text(max_size=6), json_value, max_size=4), grid=st.booleans())
def test_any_json_gives_a_space_or_a_config_error(raw: dict[str, Any], grid: bool) -> None:
    try:
        space = parse_space(raw, grid=grid)
    except ConfigError as e:
        assert "OPTIMIZE_SPACE" in str(e)
        return
    assert [p.name for p in space] == list(raw)
    if grid:
        assert sum(1 for _ in grid_points(space)) == grid_size(space) >= 1


@pytest.mark.parametrize(
    "raw",
    [
        {"x": {"low": 0, "high": 10**12}},
        {"x": {"low": 0, "high": 10**40, "step": 1}},
        {"x": {"low": 0.0, "high": 1e300, "step": 1e-300}},
        {"x": {"low": 0, "high": 999}, "y": {"low": 0, "high": 999}, "z": [1, 2]},
    ],
)
def test_a_grid_above_the_cap_is_refused_without_materialising_it(raw: dict) -> None:
    """attack15 huge/: counted by arithmetic, refused at start naming OPTIMIZE_SPACE."""
    with pytest.raises(ConfigError, match="OPTIMIZE_SPACE"):
        parse_space(raw, grid=True)


def test_a_grid_at_the_cap_is_counted_not_built() -> None:
    space = parse_space({"x": {"low": 1, "high": 1000}, "y": {"low": 1, "high": 1000}}, grid=True)
    assert grid_size(space) == MAX_GRID_POINTS
    assert next(grid_points(space)) == {"x": 1, "y": 1}
    # sampled search never enumerates: any size is fine
    assert parse_space({"x": {"low": 0, "high": 10**12}}, grid=False)[0].high == 10**12


class _TypedParams(bt.Strategy):
    """An agent with one param of each kind JSON can spell (for ``check_space``)."""

    params = (
        ("n", 10),
        ("x", 0.5),
        ("flag", False),
        ("name", "equal"),
        ("anything", None),
        ("lst", [1, 2]),
    )


@pytest.mark.parametrize(
    ("space", "sampler", "message"),
    [
        # accepted: each proposes values the param's type takes
        ({"n": {"low": 1, "high": 100, "log": True}}, "tpe", None),
        ({"x": {"low": 1, "high": 3}}, "tpe", None),
        ({"x": {"low": 0.1, "high": 0.9}}, "tpe", None),
        ({"flag": [True, False]}, "grid", None),
        ({"name": ["equal", "inverse_vol"]}, "grid", None),
        ({"anything": {"low": 0.1, "high": 0.5}}, "tpe", None),
        # refused (helper-73: a range of whole numbers for a text, true/false or list param
        # passed the check, then every trial failed in the agent)
        ({"name": {"low": 1, "high": 3}}, "grid", "param 'name' of _TypedParams expects a string"),
        (
            {"flag": {"low": 0, "high": 1}},
            "grid",
            "param 'flag' of _TypedParams expects true/false",
        ),
        ({"lst": {"low": 1, "high": 3}}, "grid", "param 'lst' of _TypedParams expects a list"),
        ({"n": {"low": 10.0, "high": 20.0}}, "tpe", "whole numbers need low, high and step"),
        ({"x": [0.5, 1, 1.0]}, "grid", "param 'x' of _TypedParams is a number; 1.0 is given twice"),
        ({"x": [0.5, 0.5000000000000001]}, "grid", None),  # two doubles: two values
        (
            {"flag": {"low": 0.0, "high": 1.0}},
            "tpe",
            "expects true/false (default False), got a range of numbers",
        ),
    ],
)
def test_check_space_takes_a_range_only_for_a_param_that_takes_its_numbers(
    space: dict[str, Any], sampler: str, message: str | None
) -> None:
    opt = OptimizeConfig(space=space, sampler=sampler)
    if message is None:
        check_space(opt, _TypedParams)
        return
    with pytest.raises(ConfigError, match="OPTIMIZE_SPACE") as raised:
        check_space(opt, _TypedParams)
    assert message in str(raised.value)
    if "whole numbers need" not in message:
        assert "whole numbers need" not in str(raised.value), "a hint that cannot help"
