"""Vectorised resolution: many bars' raw reads to the columns of ``data_accessed`` at once.

:meth:`AccessTracker.resolve <analyzers.tracking.AccessTracker.resolve>` resolves one bar's
reads in Python, read by read (about 4 us a read). The decision writer instead hands a whole
batch of deferred bars to :func:`resolve_columns`, which resolves the common read with numpy
over the whole batch: a read of a line whose values follow one source feed bar for bar (a
feed's own number lines, and indicators over one feed: ``close[-3]``, ``sma[0]``,
``crossover[0]``), of size 1, that returned a number from a bar in the past of the current one,
and ``len()`` of such a line. Python then runs once per distinct bar (its data hash, looked up
once for the whole batch) and once per ``(bar, symbol)`` group, not once per read; bar times are
rounded as the per-read path rounds them (:func:`round_ms`, :func:`posix_us_array`).

A bar with any other read (a window, text, an indicator over several feeds, a line shifted
forward, a look-ahead, a bar before the first) is left to the per-read path
(:meth:`~analyzers.tracking.AccessTracker.resolve`), so every bar is resolved by exactly one of
the two. Both give the same rows: ``tests/unit/test_fmel_columns.py`` stores the idiom corpus
both ways and compares every column.

Thread context: the writer thread, under the tracker's ``resolve_lock``, for bars the tracker
could defer (:attr:`~analyzers.tracking.AccessTracker.deferrable`: their buffers only grow).
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from analyzers.schema import Access, DataAccess
from analyzers.tracking.model import State, state_rows
from core.time import BT_EPOCH_DAYS, SECONDS_PER_DAY

if TYPE_CHECKING:
    from analyzers.tracking.model import Read
    from analyzers.tracking.tracker import AccessTracker

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

try:
    from analyzers.tracking import _fastread
except ImportError:  # not built (no C compiler): numpy does the unpacking
    _fastread = None  # type: ignore[assignment]

MAX_BAR_INDEX = 2**40
"""A read of a bar index at or past this (a trillion bars) goes to the per-read path: the
vectorised keys, feed times index, then stay within int64 (``_resolve.c`` the same)."""
MAX_SLOTS = 2**22
"""With more feeds than this (four million), no bar resolves as columns, for the same keys."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def posix_us(posix_s: float) -> int:
    """POSIX seconds as integer microseconds, rounded exactly as
    ``datetime.fromtimestamp(posix_s, UTC)`` rounds them (half to even), so a timestamp stored
    from here equals the ISO-8601 text :func:`analyzers.schema.to_row` writes."""
    return (datetime.fromtimestamp(posix_s, UTC) - _EPOCH) // _US


def posix_us_array(posix_s: npt.NDArray[np.float64]) -> IntArray:
    """:func:`posix_us` of many times at once: CPython's rounding of ``fromtimestamp``
    (``_PyTime_DoubleToDenominator``: ``modf``, fraction times 1e6 rounded half to even, carried
    into the seconds) done with numpy. Shape ``(n,)`` -> ``(n,)``."""
    whole = np.trunc(posix_s)
    frac = np.rint((posix_s - whole) * 1e6)
    over = frac >= 1e6
    under = frac < 0
    frac = np.where(over, frac - 1e6, np.where(under, frac + 1e6, frac))
    whole = np.where(over, whole + 1, np.where(under, whole - 1, whole))
    return whole.astype(np.int64) * 1_000_000 + frac.astype(np.int64)


def round_ms(posix_s: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``round(x, 3)`` of many floats, equal to Python's (correctly rounded): ``rint(x * 1000)
    / 1000`` where ``x * 1000`` is far from a half and small enough to be exact to 0.1, else
    Python's own ``round``. Shape ``(n,)`` -> ``(n,)``."""
    y = posix_s * 1000.0
    k = np.rint(y)
    out = k / 1000.0
    unsure = ~((np.abs(y - k) < 0.4) & (np.abs(y) < 2.0**49))
    for i in np.flatnonzero(unsure).tolist():
        out[i] = round(float(posix_s[i]), 3)
    return out


@dataclass(frozen=True, slots=True)
class Columns:
    """``data_accessed`` of the bars :func:`resolve_columns` resolved, as flat columns.

    ``B`` bars resolved, ``G`` ``(bar, symbol)`` groups, ``A`` accesses (one per read), ``F``
    entries of ``fields_accessed``. Offsets arrays have one more entry than what they split.

    Attributes:
        done: positions (in the input) of the bars resolved here, ascending (``B``).
        group_offsets: groups of each resolved bar (``B + 1``).
        symbol_code: symbol of each group, a position in ``symbols`` (``G``).
        symbols: distinct symbols.
        digest_code: data hash of the symbol's current bar at the bar, per group, a position in
            ``hashes``; -1 for none (``G``).
        fields_offsets: fields of each group (``G + 1``).
        fields: ``fields_accessed``, flattened, positions in ``field_names`` (``F``).
        access_offsets: accesses of each group (``G + 1``).
        seq, index, bar_index: per access (``A``, int64).
        field_code: per access, position in ``field_names`` (``A``).
        field_names: distinct field names.
        hash_code: per access, position in ``hashes``; -1 for a null hash (``A``).
        hashes: distinct data hashes.
        value: number returned, per access (``A``, float64; NaN and infinities stored as null).
        bar_time_us: bar time, POSIX microseconds, per access (``A``, int64).
        bar_time_s: the same as POSIX seconds rounded to the millisecond, as the per-read path
            gives it (``A``, float64).
    """

    done: list[int]
    group_offsets: IntArray
    symbol_code: IntArray
    symbols: list[str]
    digest_code: IntArray
    fields_offsets: IntArray
    fields: IntArray
    access_offsets: IntArray
    seq: IntArray
    index: IntArray
    bar_index: IntArray
    field_code: IntArray
    field_names: list[str]
    hash_code: IntArray
    hashes: list[str]
    value: npt.NDArray[np.float64]
    bar_time_us: IntArray
    bar_time_s: npt.NDArray[np.float64]

    def data_accessed(self, b: int) -> tuple[DataAccess, ...]:
        """Resolved bar ``b`` (a position in :attr:`done`'s order, not the input's) as the
        tuples :meth:`~analyzers.tracking.AccessTracker.resolve` gives (Python per access:
        for whoever reads the record's ``data_accessed`` attribute, not the DuckDB path)."""
        new = tuple.__new__
        names, hashes = self.field_names, self.hashes
        out = []
        for g in range(int(self.group_offsets[b]), int(self.group_offsets[b + 1])):
            lo, hi = int(self.access_offsets[g]), int(self.access_offsets[g + 1])
            accesses = tuple(
                new(
                    Access,
                    (seq, names[f], ago, 1, bar, None if h < 0 else hashes[h], v, None, False, t),
                )
                for seq, f, ago, bar, h, v, t in zip(
                    self.seq[lo:hi].tolist(),
                    self.field_code[lo:hi].tolist(),
                    self.index[lo:hi].tolist(),
                    self.bar_index[lo:hi].tolist(),
                    self.hash_code[lo:hi].tolist(),
                    self.value[lo:hi].tolist(),
                    self.bar_time_s[lo:hi].tolist(),
                    strict=True,
                )
            )
            f_lo, f_hi = int(self.fields_offsets[g]), int(self.fields_offsets[g + 1])
            fields = tuple(names[f] for f in self.fields[f_lo:f_hi].tolist())
            d = int(self.digest_code[g])
            symbol = self.symbols[int(self.symbol_code[g])]
            out.append(new(DataAccess, (symbol, None if d < 0 else hashes[d], fields, accesses)))
        return tuple(out)


def unique_first(keys: IntArray) -> tuple[IntArray, IntArray, IntArray]:
    """``np.unique(keys, return_index=True, return_inverse=True)``: the distinct keys
    ascending, the position of each one's first occurrence, and each key's position among
    them. Shapes ``(n,)`` -> ``(u,)``, ``(u,)``, ``(n,)``.

    The keys here are small non-negative ints (a feed and a bar, a bar and a symbol): then a
    table as long as the largest key marks them in one pass (``np.minimum.at``), where
    ``np.unique`` sorts (0.6 ms against 15 ms for 197,000 keys below 15,000; the read-heavy
    benchmark's batches, ``docs/benchmarks.md``, eighteenth pass). Keys that are negative or
    spread wider than four times their number (many symbols) go to ``np.unique``; the same
    arrays either way (``tests/unit/test_fmel_columns.py``, Hypothesis)."""
    n = len(keys)
    if n == 0 or int(keys.min()) < 0 or int(keys.max()) >= 4 * n + 65_536:
        uniq, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        return uniq, first, inv.reshape(-1)
    first_at = np.full(int(keys.max()) + 1, n, dtype=np.int64)
    np.minimum.at(first_at, keys, np.arange(n, dtype=np.int64))
    present = first_at < n
    uniq = np.flatnonzero(present)
    rank = np.cumsum(present) - 1
    return uniq, first_at[uniq], rank[keys]


def one_offset_per_feed(bar_of: IntArray, slot: IntArray, off: IntArray) -> BoolArray:
    """Which bars may be resolved in columns as far as the feeds' array offsets go: a feed
    (slot) whose offset (``off[bar, slot]``: its count minus its array index) differs between
    the bars that read it sends every bar that reads it to the per-read path.

    Args:
        bar_of, slot: per read, its bar and feed (``(n,)``).
        off: per bar and feed, the offset (``(bars, slots)``).

    Returns:
        ``(bars,)`` bool: False for the bars sent to the per-read path. Worked on the
        ``(bars, slots)`` table of which feeds each bar read, not per read."""
    read_at = np.zeros(off.shape, dtype=bool)
    read_at[bar_of, slot] = True
    high = np.where(read_at, off, np.iinfo(np.int64).min).max(0)
    low = np.where(read_at, off, np.iinfo(np.int64).max).min(0)
    spread = read_at.any(0) & (high != low)
    if not spread.any():
        return np.ones(off.shape[0], dtype=bool)
    out: BoolArray = np.logical_not(read_at[:, spread].any(axis=1))
    return out


def _offsets(counts: IntArray) -> IntArray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _states(bars: Sequence[tuple[Sequence[Read], State]], n_bars: int, n_slots: int) -> IntArray:
    """The bars' captured feed positions as one ``(bars, slots, 4)`` int64 array (zeros past a
    bar's own feeds). The bars' packed bytes joined (read-only) when each bar captured
    ``n_slots`` feeds that way (the compiled capture; the usual batch: feeds are added before
    the run); else one ``np.fromiter`` over every number when each bar captured ``n_slots``
    feeds, else one row at a time; the same array every way
    (``tests/unit/test_fmel_columns.py``)."""
    packed = [st for _, st in bars]
    if all(type(st) is bytes and len(st) == n_slots * 32 for st in packed):
        # capture_packed's int64 rows (model.State): the bars' bytes one after the other
        flat = np.frombuffer(b"".join(packed), dtype=np.int64)  # type: ignore[arg-type]
        return flat.reshape(n_bars, n_slots, 4)
    states = [state_rows(st) for st in packed]
    chain = itertools.chain.from_iterable
    # (a row of another length than 4 takes the row-by-row path, which refuses it: fromiter
    # would take the first numbers and shift the rest, helper-92)
    if all(len(st) == n_slots for st in states) and all(len(r) == 4 for r in chain(states)):
        flat = np.fromiter(chain(chain(states)), dtype=np.int64, count=n_bars * n_slots * 4)
        return flat.reshape(n_bars, n_slots, 4)
    state = np.zeros((n_bars, n_slots, 4), dtype=np.int64)
    for i, st in enumerate(states):
        if st:
            state[i, : len(st)] = st
    return state


Unpacked = tuple[IntArray, IntArray, IntArray, IntArray, FloatArray, BoolArray]


def _from_bytes(ints_b: bytes, vals_b: bytes, isf_b: bytes) -> Unpacked:
    """The columns of ``_fastread.unpack``'s bytes: int64 ``(n, 4)`` split by field, float64
    ``(n,)``, bool ``(n,)`` (views of the bytes, read-only)."""
    ints = np.frombuffer(ints_b, dtype=np.int64).reshape(-1, 4)
    return (
        ints[:, 0],
        ints[:, 1],
        ints[:, 2],
        ints[:, 3],
        np.frombuffer(vals_b, dtype=np.float64),
        np.frombuffer(isf_b, dtype=np.bool_),
    )


def _unpack_bars(per_bar: list[Sequence[Read]]) -> Unpacked:
    """:func:`_unpack` of several bars' reads one after the other. Bars in packed buffers
    (``_fastread.ReadBuffer``, the compiled reads' default) are copied from their arrays in one
    C pass, without a tuple per read (``_fastread.unpack_buffers``); otherwise (lists, or a
    buffer holding a read it could not pack) the reads are chained and unpacked as tuples.
    The same arrays either way (``tests/unit/test_read_buffer.py``)."""
    if _fastread is not None:
        try:
            return _from_bytes(*_fastread.unpack_buffers(per_bar))
        except TypeError:
            pass  # lists (pure Python) or an odd read: as tuples below
    return _unpack(list(itertools.chain.from_iterable(per_bar)))


def _unpack(flat: list[Read]) -> Unpacked:
    """The raw reads as columns: tag id, ago, size, bar index (int64), the value when it is a
    float (else 0.0) and whether it is one. One C pass (``_fastread.unpack``) when the
    extension is built, else one numpy pass per field (:func:`_unpack_py`); the same arrays."""
    if _fastread is not None:
        try:
            return _from_bytes(*_fastread.unpack(flat))
        except (TypeError, OverflowError):
            pass  # an odd read: numpy's conversions decide, as without the extension
    return _unpack_py(flat)


def _unpack_py(flat: list[Read]) -> Unpacked:
    """:func:`_unpack` in Python and numpy."""
    total = len(flat)
    # one C pass per field, no object made per read (zip(*flat) makes one iterator per read,
    # and the garbage collector then walks them all, many times)
    tid, ago_all, size, index = (
        np.fromiter(map(operator.itemgetter(i), flat), dtype=np.int64, count=total)
        for i in range(4)
    )
    value_t = list(map(operator.itemgetter(4), flat))
    types = set(map(type, value_t))
    if types == {float}:
        value = np.array(value_t, dtype=np.float64)
        is_num = np.ones(total, dtype=bool)
    elif types <= {float, type(None)}:  # len() reads carry None
        obj = np.array(value_t, dtype=object)
        is_num = np.asarray(obj != None, dtype=bool)  # noqa: E711 (elementwise)
        obj[~is_num] = 0.0
        value = obj.astype(np.float64)
    else:  # text somewhere: those bars take the per-read path
        is_num = np.fromiter((type(v) is float for v in value_t), dtype=bool, count=total)
        value = np.array([v if f else 0.0 for v, f in zip(value_t, is_num, strict=True)])
    return tid, ago_all, size, index, value, is_num


Kernel = tuple[npt.NDArray[Any], ...]
"""What :func:`_kernel_np` and ``_fastread.resolve_buffers`` return, in this order (``B`` bars
resolved, ``G`` groups, ``A`` accesses, ``F`` fields, ``U`` distinct (feed, bar index) pairs):
``done`` (B: the input bars resolved), ``group_offsets`` (B + 1), per group its input bar,
symbol code, feed slot, the feed's current bar index at that bar (-1 when its data hash is not
known) and that pair's position among the distinct pairs (-1: not among them, or no hash)
(G each), ``access_offsets`` and ``fields_offsets`` (G + 1),
``fields`` (F: field codes), per access in group order its ``seq``, ``ago``, bar index, field
code, value (float64), the feed's known hash count, its pair's position (A each), and per
distinct pair (ascending) its slot, bar index and the feed's array offset (U each)."""


def _kernel_np(
    lens: IntArray,
    tid: IntArray,
    ago_all: IntArray,
    size: IntArray,
    index: IntArray,
    value: FloatArray,
    is_num: BoolArray,
    state: IntArray,
    src: IntArray,
    len_src: IntArray,
    field_code_of_tag: IntArray,
    sym_of_slot: IntArray,
    n_syms: int,
    n_fields: int,
) -> Kernel | None:
    """The per-read part of :func:`resolve_columns` in numpy (see :data:`Kernel`); None when no
    read resolves. ``_fastread.resolve_buffers`` computes the same in C without the GIL
    (:func:`_kernel_buffers`; ``tests/unit/test_fmel_columns.py`` compares them, Hypothesis).

    Args:
        lens: reads of each bar (``(bars,)``).
        tid, ago_all, size, index, value, is_num: per read, :func:`_unpack`'s columns.
        state: the feeds' captured positions, ``(bars, slots, 4)`` (:func:`_states`).
        src, len_src: per tag, the slot its reads (its ``len()``) map to, else -1.
        field_code_of_tag: per tag, its field's code (``len`` is 0).
        sym_of_slot: per slot, its symbol's code (< ``n_syms``); ``n_fields`` field codes."""
    n_bars, total = len(lens), len(tid)
    if state.shape[1] > MAX_SLOTS:
        return None
    counts = size == 0
    value = np.where(counts, index + 1, value).astype(np.float64)  # len() returns a count
    bar_of = np.repeat(np.arange(n_bars, dtype=np.int64), lens)
    # a tag id that is not one (negative, or past the last) sends its bar to the per-read path
    tag_ok = (tid >= 0) & (tid < len(src))
    tid = np.where(tag_ok, tid, 0)
    slot = np.where(tag_ok, np.where(counts, len_src[tid], src[tid]), -1)
    ok = ((size == 1) & is_num | counts) & (slot >= 0)
    slot = np.where(ok, slot, 0)
    # the feeds' positions at each bar: (bars, slots, 4) = (count, array idx, held, known)
    cur = state[:, :, 0] - 1
    off = cur - state[:, :, 1]
    nbuf = state[:, :, 2] + off
    c = cur[bar_of, slot]
    # a len() is never a look-ahead (it returns a count, not a bar's value)
    o = off[bar_of, slot]
    # a bar whose time the feed's datetime buffer no longer holds (bounded buffers): per read
    ok &= (index >= 0) & (index >= o) & ((index <= c) | counts) & (index < nbuf[bar_of, slot])
    ok &= index < MAX_BAR_INDEX
    bar_ok = np.ones(n_bars, dtype=bool)
    bar_ok[bar_of[~ok]] = False
    # one array offset per feed within the batch (always so for growing buffers)
    bar_ok &= one_offset_per_feed(bar_of, slot, off)
    keep = bar_ok[bar_of]
    if not keep.any():
        return None
    starts = np.cumsum(lens) - lens
    seq = np.arange(total, dtype=np.int64) - starts[bar_of]
    bar_of, slot, index, value, seq, o = (
        bar_of[keep],
        slot[keep],
        index[keep],
        value[keep],
        seq[keep],
        o[keep],
    )
    ago = ago_all[keep]
    fcode = np.where(counts, 0, field_code_of_tag[tid])[keep]
    known = state[bar_of, slot, 3]
    done = np.flatnonzero(bar_ok)
    # renumber the bars resolved here 0..B-1
    bar_of = (np.cumsum(bar_ok) - 1)[bar_of]

    # each distinct (feed, bar)
    width = int(index.max()) + 1
    key = slot * width + index
    uniq, first, inv = unique_first(key)
    u_slot, u_index = np.divmod(uniq, width)

    # groups: (bar, symbol) in order of the symbol's first read within the bar (keys spaced by
    # the largest code used, not n_syms: the same groups, and no overflow for a huge count)
    sym = sym_of_slot[slot]
    _, gfirst, ginv = unique_first(bar_of * (int(sym_of_slot.max()) + 1) + sym)
    rank = np.empty(len(gfirst), dtype=np.int64)
    rank[np.argsort(gfirst, kind="stable")] = np.arange(len(gfirst))
    grp = rank[ginv]
    order = np.argsort(grp, kind="stable")
    gfirst_sorted = np.sort(gfirst)
    n_groups = len(gfirst)
    group_offsets = _offsets(np.bincount(bar_of[gfirst_sorted], minlength=len(done)))
    access_offsets = _offsets(np.bincount(grp, minlength=n_groups).astype(np.int64))
    # the group's feed (its first read's) at its current bar, and that pair among the distinct
    g_bar, g_slot = done[bar_of[gfirst_sorted]], slot[gfirst_sorted]
    g_cur = state[g_bar, g_slot, 0] - 1
    g_held = (g_cur >= 0) & (g_cur < state[g_bar, g_slot, 3])  # its data hash is known
    g_key = g_slot * width + g_cur
    g_at = np.minimum(np.searchsorted(uniq, g_key), len(uniq) - 1)
    g_u = np.where(g_held & (g_cur < width) & (uniq[g_at] == g_key), g_at, -1)
    g_cur = np.where(g_held, g_cur, -1)

    # fields_accessed: distinct fields of each group in order of first read
    _, ffirst, _ = unique_first(grp * (int(field_code_of_tag.max(initial=0)) + 1) + fcode)
    ffirst = ffirst[np.lexsort((ffirst, grp[ffirst]))]  # by group, then first read
    fields_offsets = _offsets(np.bincount(grp[ffirst], minlength=n_groups).astype(np.int64))
    return (
        done,
        group_offsets,
        g_bar,
        sym[gfirst_sorted],
        g_slot,
        g_cur,
        g_u,
        access_offsets,
        fields_offsets,
        fcode[ffirst],
        seq[order],
        ago[order],
        index[order],
        fcode[order],
        value[order],
        known[order],
        inv[order],
        u_slot,
        u_index,
        o[first],
    )


def _kernel_buffers(
    bars: Sequence[tuple[Sequence[Read], State]],
    n_slots: int,
    src: IntArray,
    len_src: IntArray,
    field_code_of_tag: IntArray,
    sym_of_slot: IntArray,
    n_syms: int,
    n_fields: int,
) -> Kernel | None:
    """:func:`_kernel_np` of the bars' reads and captured positions: ``_fastread.
    resolve_buffers`` over the bars' ``ReadBuffer`` arrays in place, the GIL released while it
    computes, when the extension is built and every bar's reads are packed; else (lists in pure
    Python, a read kept whole, a batch too spread for the C table) the reads unpacked
    (:func:`_unpack_bars`), the positions as one array (:func:`_states`) and numpy."""
    per_bar = [r for r, _ in bars]
    if _fastread is not None:
        try:
            out = _fastread.resolve_buffers(
                per_bar,
                [st for _, st in bars],
                n_slots,
                src,
                len_src,
                field_code_of_tag,
                sym_of_slot,
                n_syms,
                n_fields,
            )
        except TypeError:
            out = NotImplemented  # not packed buffers: numpy below
        if out is None:
            return None
        if out is not NotImplemented:
            arrays = [np.frombuffer(b, dtype=np.int64) for b in out]
            arrays[14] = arrays[14].view(np.float64)  # value
            return tuple(arrays)
    lens = np.fromiter(map(len, per_bar), dtype=np.int64, count=len(per_bar))
    if int(lens.sum()) == 0:
        return None
    tid, ago, size, index, value, is_num = _unpack_bars(per_bar)
    state = _states(bars, len(bars), n_slots)
    return _kernel_np(
        lens, tid, ago, size, index, value, is_num, state, src, len_src, field_code_of_tag,
        sym_of_slot, n_syms, n_fields,
    )  # fmt: skip


def resolve_columns(
    tracker: AccessTracker, bars: Sequence[tuple[Sequence[Read], State]]
) -> Columns | None:
    """Resolve the bars whose every read is the common read (see the module docstring).

    The per-read work is one call (:func:`_kernel_buffers`: C without the GIL over the reads'
    packed buffers when the extension is built, else numpy); Python and numpy run per tag, per
    bar, per distinct (feed, bar) pair and per (bar, symbol) group around it.

    Args:
        tracker: the tracker that recorded the reads (its ``resolve_lock`` held by the caller).
        bars: per bar, its raw reads (a ``ReadBuffer`` or a list of 5-tuples) and
            :meth:`~analyzers.tracking.AccessTracker.capture`.

    Returns:
        The columns of the bars resolved here (``done``); ``None`` when none was. Their
        look-ahead count is 0 (a look-ahead read sends its bar to the per-read path).
    """
    if not bars:
        return None
    tags = tracker.tags
    infos = tracker._infos
    n_tags, n_slots = len(tags), len(infos)
    # per tag: the one source slot its reads map to bar for bar, else -1
    src = np.full(n_tags, -1, dtype=np.int64)
    # per tag: the slot a len() of it counts the bars of (its clock), else -1
    len_src = np.full(n_tags, -1, dtype=np.int64)
    field_of: dict[str, int] = {"len": 0}
    field_code_of_tag = np.zeros(n_tags, dtype=np.int64)
    for tag in tags:
        pairs = tag.pairs
        if len(pairs) == 1:
            info, offset, aligned, _ = pairs[0]
            if offset == 0 and (tag.direct or aligned) and info.slot >= 0:
                src[tag.id] = info.slot
        clock = tag.clock
        if clock is not None and clock.slot >= 0 and (tag.direct or tag.steps is clock):
            len_src[tag.id] = clock.slot
        field_code_of_tag[tag.id] = field_of.setdefault(tag.field, len(field_of))
    symbol_of: dict[str, int] = {}
    sym_of_slot = np.array(
        [symbol_of.setdefault(info.symbol, len(symbol_of)) for info in infos] or [0],
        dtype=np.int64,
    )
    symbols = list(symbol_of)

    out = _kernel_buffers(
        bars,
        max(n_slots, 1),
        src,
        len_src,
        field_code_of_tag,
        sym_of_slot,
        max(len(symbols), 1),
        len(field_of),
    )
    if out is None:
        return None
    (done, group_offsets, g_bar, g_sym, g_slot, g_cur, g_u, access_offsets, fields_offsets,
     fcodes, seq, ago, bar_index, fcode, value, known, inv, u_slot, u_index, u_off) = out  # fmt: skip  # noqa: E501

    # each distinct (feed, bar): its time and hash, once for the whole batch
    u_pos = u_index - u_off
    u_days = np.empty(len(u_slot), dtype=np.float64)
    u_hash = np.full(len(u_slot), None, dtype=object)
    for s in np.unique(u_slot).tolist():
        in_s = u_slot == s
        info = infos[s]
        # the datetime buffer only grows here (deferrable): copied under the GIL, then read
        times = np.frombuffer(info.dt.array[:], dtype=np.float64)
        u_days[in_s] = times[u_pos[in_s]]
        hashes = info.hashes
        if hashes is not None:
            u_hash[in_s] = hashes.take(u_index[in_s].tolist())
    u_time_s = round_ms((u_days - BT_EPOCH_DAYS) * SECONDS_PER_DAY)
    u_time = posix_us_array(u_time_s)
    # the distinct hashes in order of first appearance; a bar without one: -1
    u_list = u_hash.tolist()
    distinct = dict.fromkeys(u_list)
    distinct.pop(None, None)
    hash_list: list[str] = list(distinct)
    hash_pos: dict[str | None, int] = dict(zip(hash_list, range(len(hash_list)), strict=True))
    hash_pos[None] = -1
    u_code = np.fromiter(map(hash_pos.__getitem__, u_list), dtype=np.int64, count=len(u_list))

    # each group's digest: the hash of its feed's current bar, mostly a bar read in the batch
    g_found = g_u >= 0
    g_digest = np.full(len(g_bar), -1, dtype=np.int64)
    g_digest[g_found] = u_code[g_u[g_found]]
    for k in np.flatnonzero((g_cur >= 0) & ~g_found).tolist():
        hashes = infos[int(g_slot[k])].hashes
        digest = None if hashes is None else hashes.at(int(g_cur[k]))
        if digest is not None:
            at = hash_pos.get(digest)
            if at is None:
                at = hash_pos[digest] = len(hash_list)
                hash_list.append(digest)
            g_digest[k] = at
    return Columns(
        done=done.tolist(),
        group_offsets=group_offsets,
        symbol_code=g_sym,
        symbols=symbols,
        digest_code=g_digest,
        fields_offsets=fields_offsets,
        fields=fcodes,
        access_offsets=access_offsets,
        seq=seq,
        index=ago,
        bar_index=bar_index,
        field_code=fcode,
        field_names=list(field_of),
        hash_code=np.where(bar_index < known, u_code[inv], -1),
        hashes=hash_list,
        value=value,
        bar_time_us=u_time[inv],
        bar_time_s=u_time_s[inv],
    )
