"""The packed read buffer (``_fastread.ReadBuffer``) against the list of 5-tuples it replaces.

Whatever is appended (the common read, odd values, objects that are not reads at all), the
buffer gives back through iteration, indexing, slicing and ``take`` what a list would: equal
ints, floats of the same bits, and every other object itself. Its columns
(``_fastread.unpack_buffers``, via ``columns._unpack_bars``) are ``_unpack_py`` of the same
tuples. The compiled reads appending into one are compared with the Python ones in
``test_fastread.py``; whole runs in ``test_idiom_corpus.py`` and ``test_fmel_columns.py``."""

from __future__ import annotations

import gc
import itertools
import pickle
import struct
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzers.tracking import AccessTracker, columns, proxies
from tests.unit.test_fastread import _outcome, assert_same_columns

_fastread = pytest.importorskip("analyzers.tracking._fastread")
ReadBuffer = _fastread.ReadBuffer

_I64 = (-(2**63), 2**63 - 1)


class _Float(float):
    pass


_ints = st.one_of(
    st.integers(-3, 300),
    st.integers(*_I64),
    st.sampled_from([2**63, -(2**63) - 1, 2**70]),  # beyond int64: kept whole
    st.booleans(),  # an int subclass: kept whole
    st.integers(-5, 5).map(np.int64),
)
_values = st.one_of(
    st.floats(),  # NaN, infinities, -0.0 included
    st.sampled_from([float("nan"), -0.0, 0.0, float("-inf")]),
    st.none(),
    st.text(max_size=3),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False).map(_Float),
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),  # a float subclass
    st.integers(-5, 5).map(np.int64),
    st.builds(list),
)
_common = st.tuples(
    st.integers(0, 50), st.integers(-5, 5), st.integers(0, 1), st.integers(0, 10**6), _values
)
_item = st.one_of(
    _common,
    _common,
    st.tuples(_ints, _ints, _ints, _ints, _values),
    # not a read the trackers make: kept and given back as they are
    st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3)),
    st.sampled_from([None, "x", 7, (1, 2, 3, 4, 5, 6)]),
)
_items = st.lists(_item, max_size=30)


def _packable(x: Any) -> bool:
    return (
        type(x) is tuple
        and len(x) == 5
        and all(type(i) is int and _I64[0] <= i <= _I64[1] for i in x[:4])
    )


def _bits(f: float) -> bytes:
    return struct.pack("<d", f)


def _assert_same(got: Any, want: Any) -> None:
    """``got`` is what a list holding ``want`` gives back: for a packable read, a tuple of equal
    exact ints and the value itself (a float: an exact float of the same bits, NaN's sign and
    payload and -0.0 included); for anything else, the very object appended."""
    if not _packable(want):
        assert got is want
        return
    assert type(got) is tuple and len(got) == 5
    assert [type(i) for i in got[:4]] == [int] * 4 and got[:4] == want[:4]
    if type(want[4]) is float:
        assert type(got[4]) is float and _bits(got[4]) == _bits(want[4])
    else:
        assert got[4] is want[4]


def _assert_all_same(got: Sequence[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)


@settings(max_examples=300, deadline=None)
@given(
    items=_items,
    more=_items,
    index=st.integers(-40, 40),
    bounds=st.tuples(
        st.none() | st.integers(-40, 40),
        st.none() | st.integers(-40, 40),
        st.none() | st.integers(-5, 5).filter(bool),
    ),
)
def test_a_read_buffer_gives_back_what_a_list_would(
    items: list[Any], more: list[Any], index: int, bounds: tuple[Any, Any, Any]
) -> None:
    buf = ReadBuffer()
    for x in items:
        buf.append(x)
    assert len(buf) == len(items)
    _assert_all_same(list(buf), items)  # iteration
    _assert_all_same([buf[i] for i in range(len(items))], items)
    if -len(items) <= index < len(items):
        _assert_same(buf[index], items[index])
    else:
        with pytest.raises(IndexError):
            buf[index]
    sl = slice(*bounds)
    got = buf[sl]
    assert type(got) is list
    _assert_all_same(got, items[sl])
    _assert_all_same(ReadBuffer(items), items)  # built from an iterable
    copied = pickle.loads(pickle.dumps(buf))  # as the list of its reads (new objects)
    assert repr(copied) == f"ReadBuffer({pickle.loads(pickle.dumps(items))!r})"
    # == as a list's: equal when every read is (a NaN is not equal to a new NaN)
    assert (buf == items) == (list(buf) == items) != (buf != items)

    taken = buf.take()  # what fmel._record does once a bar
    assert type(taken) is ReadBuffer and len(buf) == 0 and list(buf) == []
    _assert_all_same(taken, items)
    for x in more:  # the emptied buffer records the next bar; the taken one is unchanged
        buf.append(x)
    _assert_all_same(buf, more)
    _assert_all_same(taken, items)
    buf.clear()
    assert len(buf) == 0 and buf == []


@settings(max_examples=300, deadline=None)
@given(bars=st.lists(_items, max_size=6))
def test_the_columns_of_read_buffers_are_numpys(bars: list[list[Any]]) -> None:
    """``columns._unpack_bars`` of packed buffers (one C pass over their arrays when every read
    is packed, else the tuples) against ``_unpack_py`` of the same tuples chained."""
    # the columns only ever see 5-tuples (a resolved bar's reads): other objects are for the
    # container tests above
    bars = [[r for r in b if type(r) is tuple and len(r) == 5] for b in bars]
    bufs = [ReadBuffer(b) for b in bars]
    flat = list(itertools.chain.from_iterable(bars))
    if all(_packable(r) for r in flat):
        _fastread.unpack_buffers(bufs)  # no fallback: the C pass takes every packed read
    assert_same_columns(
        _outcome(columns._unpack_bars, bufs), _outcome(columns._unpack_py, flat), bits=True
    )


def test_unpack_buffers_refuses_what_it_cannot_copy() -> None:
    """A list entry that is not a buffer, or a buffer holding a read kept whole: TypeError (the
    caller then unpacks the tuples); not a list: TypeError."""
    ok = ReadBuffer([(0, 1, 1, 5, 2.5)])
    with pytest.raises(TypeError, match="not a ReadBuffer"):
        _fastread.unpack_buffers([ok, [(0, 1, 1, 5, 2.5)]])
    with pytest.raises(TypeError, match="not packed"):
        _fastread.unpack_buffers([ok, ReadBuffer([(True, 1, 1, 5, 2.5)])])
    with pytest.raises(TypeError, match="list"):
        _fastread.unpack_buffers((ok,))
    ints, vals, isf = _fastread.unpack_buffers([ok, ReadBuffer(), ok])
    assert np.frombuffer(ints, dtype=np.int64).tolist() == [0, 1, 1, 5] * 2
    assert np.frombuffer(vals).tolist() == [2.5, 2.5] and isf == b"\x01\x01"


def test_a_cycle_through_a_kept_value_is_collected() -> None:
    """Values kept by reference are visible to the garbage collector (tp_traverse): a buffer
    holding an object that holds the buffer is freed once unreachable."""

    class Holder:
        buf: Any = None

    h = Holder()
    h.buf = ReadBuffer()
    h.buf.append((0, 0, 1, 0, h))
    gone = weakref.ref(h)
    del h
    gc.collect()
    assert gone() is None


def test_a_read_buffer_is_not_hashable_and_compares_only_with_sequences_of_reads() -> None:
    buf = ReadBuffer([(0, 0, 0, 3, None)])
    with pytest.raises(TypeError):
        hash(buf)
    assert buf == ReadBuffer([(0, 0, 0, 3, None)]) and buf != [(0, 0, 0, 4, None)]
    assert buf != ((0, 0, 0, 3, None),)  # a tuple is not a list, as for a list
    assert isinstance(buf, Sequence)
    assert repr(buf) == "ReadBuffer([(0, 0, 0, 3, None)])"
    with pytest.raises(TypeError, match="integers or slices"):
        buf["0"]  # type: ignore[call-overload]


def test_the_tracker_packs_its_reads_only_with_the_compiled_reads() -> None:
    """The compiled reads append packed; pure Python keeps its list (a Python append into a
    buffer would cost more than into a list)."""
    assert type(AccessTracker().reads) is ReadBuffer
    was = proxies.use_compiled(False)
    try:
        assert type(AccessTracker().reads) is list
    finally:
        proxies.use_compiled(was)


# -- re-entrancy: Python code run by a collection inside the buffer's own allocations ---------
# helper-87: a finalizer run by a collection that the buffer's C code started (a tuple or list
# allocation) and that changed the same buffer crashed the process (reads of freed arrays, a
# NULL objs list), wrote past the arrays (AddressSanitizer: heap-buffer-overflow) or lost a read.
# Each test arms one such finalizer, and makes the next allocation of a tracked object collect.


def _arm(action: Any) -> None:
    """Leave a cyclic object whose ``__del__`` runs ``action()`` for the next collection, and
    make the next allocation of a tracked object collect (undone by :func:`_disarm`)."""

    class Bomb:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

        def __del__(self) -> None:
            action()

    gc.collect()
    gc.disable()
    Bomb()
    gc.enable()
    gc.set_threshold(1, 1, 1)


def _disarm() -> None:
    gc.set_threshold(700, 10, 10)
    gc.collect()


@pytest.mark.parametrize("big", [False, True])
def test_a_finalizer_that_clears_the_buffer_while_a_read_is_built(big: bool) -> None:
    buf = ReadBuffer()
    for i in range(70_000 if big else 10):  # big: past 64K reads, clear() frees the arrays
        buf.append((1, 0, 1, i, f"text{i}"))
    _arm(buf.clear)
    try:
        read = buf[3]
    finally:
        _disarm()
    assert read == (1, 0, 1, 3, "text3")  # copied out before anything was allocated
    assert len(buf) == 0


@pytest.mark.parametrize("big", [False, True])
def test_a_finalizer_that_clears_the_buffer_while_it_is_sliced(big: bool) -> None:
    buf = ReadBuffer()
    for i in range(70_000 if big else 10):
        buf.append((1, 0, 1, i, float(i)))

    def clear_and_refill() -> None:
        buf.clear()
        buf.append((9, 0, 1, 0, 0.5))

    with pytest.raises(RuntimeError, match="changed size during slicing"):
        _arm(clear_and_refill)  # armed last: pytest.raises itself allocates
        try:
            buf[0:10]
        finally:
            _disarm()
    assert list(buf) == [(9, 0, 1, 0, 0.5)]


@pytest.mark.parametrize("nested", [1.5, "nested", None])
@pytest.mark.parametrize("outer", ["outer", (1, np.int64(-1), 1, 5, 2.5)])
def test_a_finalizer_that_appends_while_a_read_is_appended_loses_nothing(
    nested: Any, outer: Any
) -> None:
    """The outer append keeps an object (a text value, or a read kept whole): the finalizer's
    read lands beside it, never over it. Which comes first depends on which allocation the
    collection starts at (the objs list inside the append, or an object of the test's own
    around it: CI saw both), so the order of the two is not checked."""
    buf = ReadBuffer([(0, 0, 1, i, float(i)) for i in range(63)])  # one slot left of 64
    read = (1, 0, 1, 5, outer) if isinstance(outer, str) else outer
    _arm(lambda: buf.append((2, 0, 1, 7, nested)))
    try:
        buf.append(read)
    finally:
        _disarm()
    got = list(buf)
    assert len(got) == 65
    assert got[:63] == [(0, 0, 1, i, float(i)) for i in range(63)]
    assert got[63:] in ([(2, 0, 1, 7, nested), read], [read, (2, 0, 1, 7, nested)])


def test_a_slice_with_the_largest_step() -> None:
    """No index past the last is computed (a signed overflow, UBSan: helper-87)."""
    import sys

    buf = ReadBuffer([(1, 0, 1, 1, 1.0), (1, 0, 1, 2, 2.0)])
    assert buf[:: sys.maxsize] == [(1, 0, 1, 1, 1.0)]
    assert buf[1 :: sys.maxsize] == [(1, 0, 1, 2, 2.0)]
    assert buf[:: -sys.maxsize] == [(1, 0, 1, 2, 2.0)]


def test_a_taken_buffer_is_exactly_sized() -> None:
    """A bar of few reads waits in the writer's queue as a few dozen bytes, not 64 reads'
    worth (helper-87: 2.7 KB a bar of one read)."""
    buf = ReadBuffer([(1, 0, 1, 1, 1.0)])
    small = buf.take()
    assert list(small) == [(1, 0, 1, 1, 1.0)] and len(buf) == 0
    assert sys_getsizeof_arrays(small) <= 64
    big = ReadBuffer([(1, 0, 1, i, 1.0) for i in range(100)])
    assert sys_getsizeof_arrays(big) >= 100 * 41  # the size counts the arrays
    small.append((1, 0, 1, 2, 2.0))  # it can still grow
    assert list(small) == [(1, 0, 1, 1, 1.0), (1, 0, 1, 2, 2.0)]


def sys_getsizeof_arrays(buf: Any) -> int:
    """Bytes of a buffer's read arrays, as its ``__sizeof__`` reports them beyond the object."""
    import sys

    return sys.getsizeof(buf) - sys.getsizeof(ReadBuffer())
