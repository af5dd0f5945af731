"""The idiom corpus: agents written from backtrader's documentation, each run on the bundled real
data with and without FMEL.

Checks, per case: the same orders and final value with and without recording; the agent's own
log of its reads (kept by the harness, independently of FMEL: see :mod:`tests.idioms.harness`)
equals the recorded reads, read by read (field, index, size, value, and for every source feed
the bar returned: bar index, bar time, data hash, look-ahead flag).
"""

from __future__ import annotations

import pytest

from analyzers.tracking import proxies
from tests.idioms.corpus import CASES
from tests.idioms.runs import Case, Outcome, run_case


@pytest.fixture(scope="module")
def outcomes() -> dict[str, tuple[Outcome, Outcome]]:
    return {}


def _runs(case: Case, cache: dict[str, tuple[Outcome, Outcome]]) -> tuple[Outcome, Outcome]:
    if case.id not in cache:
        cache[case.id] = (run_case(case, fmel=False), run_case(case, fmel=True))
    return cache[case.id]


def test_the_corpus_is_large_enough() -> None:
    assert len({c.agent for c in CASES}) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_recording_changes_no_order_and_no_value(
    case: Case, outcomes: dict[str, tuple[Outcome, Outcome]]
) -> None:
    plain, tracked = _runs(case, outcomes)
    assert tracked.events == plain.events
    assert (tracked.value, tracked.cash) == (plain.value, plain.cash)
    # the agent read the same values in both runs
    assert tracked.expected == plain.expected


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_recorded_reads_equal_the_agents_own_log(
    case: Case, outcomes: dict[str, tuple[Outcome, Outcome]]
) -> None:
    _, tracked = _runs(case, outcomes)
    assert tracked.expected, "the agent read nothing: the case tests nothing"
    expected, recorded = tracked.expected, tracked.recorded
    for i, (want, got) in enumerate(zip(expected, recorded, strict=False)):
        assert got == want, f"read {i} differs:\n  want {want}\n  got  {got}"
    assert len(recorded) == len(expected)
    # reads per decision match too (a read is counted once, whatever its source feeds)
    per_step = {r.bar_time: r.reads for r in tracked.records if r.reads}
    want_steps: dict[float, set[int]] = {}
    for e in expected:
        want_steps.setdefault(e[0], set()).add(e[1])
    assert per_step == {t: len(s) for t, s in want_steps.items()}
    flagged = {r.bar_time: r.lookahead_reads for r in tracked.records if r.lookahead_reads}
    want_flagged: dict[float, set[int]] = {}
    for e in expected:
        if e[10]:
            want_flagged.setdefault(e[0], set()).add(e[1])
    assert flagged == {t: len(s) for t, s in want_flagged.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_compiled_reads_record_what_the_python_ones_do(
    case: Case, outcomes: dict[str, tuple[Outcome, Outcome]]
) -> None:
    """The same run with the tracked classes' pure-Python ``__getitem__``/``__len__``
    (:func:`analyzers.tracking.proxies.use_compiled`) records the same reads, records and
    orders as with the compiled ones the other tests use."""
    assert proxies.COMPILED, "the C extension is not built (make builds it)"
    _, compiled = _runs(case, outcomes)
    was = proxies.use_compiled(False)
    try:
        pure = run_case(case, fmel=True)
    finally:
        proxies.use_compiled(was)
    assert pure.recorded == compiled.recorded
    assert [r.reads for r in pure.records] == [r.reads for r in compiled.records]
    assert [r.lookahead_reads for r in pure.records] == [
        r.lookahead_reads for r in compiled.records
    ]
    assert pure.events == compiled.events
    assert pure.gaps == compiled.gaps
