"""The bar loop's ``round(x, 3)`` without decimal text (:func:`analyzers.fmel._round_ms`)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from analyzers.fmel import _round_ms


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_equals_pythons_round_to_milliseconds_for_any_float(x: float) -> None:
    got, want = _round_ms(x), round(x, 3)
    assert (math.isnan(got) and math.isnan(want)) or (got == want and str(got) == str(want))


@given(
    st.integers(min_value=-(2**40), max_value=2**40),
    st.sampled_from([0.0, 0.5, 0.0005, 0.0015, 0.9995, 0.25, 0.125, 1e-9]),
)
def test_equals_pythons_round_at_halves_and_bar_times(whole: int, frac: float) -> None:
    x = whole + frac
    assert _round_ms(x) == round(x, 3)
    assert str(_round_ms(x)) == str(round(x, 3))
