"""The live feeds' compact line buffers behave as backtrader's deque-backed ``QBuffer`` does,
at a quarter of the memory (:mod:`feeds.buffers`)."""

from __future__ import annotations

import collections
import tracemalloc
from itertools import islice

from backtrader.linebuffer import LineBuffer
from hypothesis import given, settings
from hypothesis import strategies as st

from feeds.buffers import BoundedFloats, CompactLineBuffer

_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.floats(allow_nan=False, width=64)),
        st.tuples(st.just("pop"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(maxlen=st.integers(1, 8), ops=_ops)
def test_bounded_floats_answer_as_a_bounded_deque(
    maxlen: int, ops: list[tuple[str, float]]
) -> None:
    arr, ref = BoundedFloats(maxlen), collections.deque(maxlen=maxlen)
    for op, value in ops:
        if op == "append":
            arr.append(value)
            ref.append(value)
        elif ref:
            assert arr.pop() == ref.pop()
        assert len(arr) == len(ref) and list(arr) == list(ref)
        for i in range(-len(ref), len(ref)):
            assert arr[i] == ref[i]
        assert list(islice(arr, 1, 3)) == list(islice(ref, 1, 3))


@settings(max_examples=100, deadline=None)
@given(maxlen=st.integers(1, 6), values=st.lists(st.floats(allow_nan=False), max_size=30))
def test_a_compact_line_reads_as_backtraders_bounded_line(maxlen: int, values: list[float]) -> None:
    """The same forward/set/read sequence on a plain bounded LineBuffer and a compact one."""
    plain, compact = LineBuffer(), LineBuffer()
    compact.__class__ = CompactLineBuffer
    for line in (plain, compact):
        line.qbuffer()
        line.minbuffer(maxlen)
    assert isinstance(compact.array, BoundedFloats) and not isinstance(plain.array, BoundedFloats)
    for v in values:
        for line in (plain, compact):
            line.forward()
            line[0] = v
        for ago in range(0, -min(len(plain), maxlen), -1):
            assert compact[ago] == plain[ago]
        assert len(compact) == len(plain) and compact.buflen() == plain.buflen()
        n = min(len(plain), maxlen)
        assert list(compact.get(size=n)) == list(plain.get(size=n))


def test_a_quarter_of_the_memory() -> None:
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        arrays = [BoundedFloats(5000) for _ in range(20)]
        for a in arrays:
            for i in range(6000):
                a.append(i + 0.5)
        compact = tracemalloc.get_traced_memory()[0] - before
        before = tracemalloc.get_traced_memory()[0]
        deques: list[collections.deque[float]] = [collections.deque(maxlen=5000) for _ in range(20)]
        for d in deques:
            for i in range(6000):
                d.append(i + 0.5)
        boxed = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_value = compact / (20 * 5000)
    assert per_value < 9.0 and boxed / compact > 3.5, (per_value, boxed / compact)
