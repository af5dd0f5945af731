"""Compact BigQuery rows, pure parts: packing the reads of a record and reading them back.

Property tests (Hypothesis) over records with any reads (seq in any order, repeated bars,
absent bars and times, NaN and infinite values, microsecond times, text values, look-ahead
flags, fields not listed in ``fields_accessed``): the packed row reads back as the full row
exactly, as the view rebuilds it (:func:`unpack_row` mirrors :func:`decisions_view_query`; the
emulator tests check the view itself), and is valid for :data:`COMPACT_SCHEMA`; packing a
record straight from its reads gives the same row. The size test pins what compaction is for.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from analyzers.schema import (
    DECISION_SCHEMA,
    Access,
    DataAccess,
    DecisionRecord,
    to_row,
)
from analyzers.sinks.bigquery.compact import (
    COMPACT_SCHEMA,
    compact_table_id,
    decisions_view_query,
    pack_reads,
    pack_row,
    unpack_row,
)
from analyzers.sinks.bigquery.rows import compact_row, validate_row
from tests.unit.test_writer import record

_FIELDS = st.sampled_from(["close", "open", "len", "smas[0]", "macd.signal", "é"])
_HASHES = st.sampled_from([None, "5386f609f6efe109805f96800b1a42b2", "14ab59549a99ef77"])
# Bar times from 1970 to 2100 with microseconds (records keep milliseconds; any microsecond
# must survive too).
_TIMES = st.one_of(
    st.none(),
    st.integers(0, 4_102_444_800 * 1_000_000).map(lambda us: us / 1_000_000),
)


@st.composite
def accesses(draw: st.DrawFn) -> tuple[Access, ...]:
    bars = draw(st.lists(st.tuples(st.integers(-1, 5_000), _HASHES, _TIMES), min_size=1))
    n = draw(st.integers(0, 30))
    seqs = draw(
        st.one_of(
            st.just(list(range(n))),  # the tracker's order
            st.lists(st.integers(0, 50), min_size=n, max_size=n),  # any order, repeats
        )
    )
    out = []
    for seq in seqs:
        bar_index, data_hash, bar_time = draw(st.sampled_from(bars))
        out.append(
            Access(
                seq,
                draw(_FIELDS),
                draw(st.integers(-300, 3)),
                draw(st.sampled_from([1, 1, 1, 5, 20])),
                bar_index,
                data_hash,
                draw(st.one_of(st.none(), st.floats())),  # NaN/inf: stored as null
                draw(st.one_of(st.none(), st.text(max_size=6))),
                draw(st.booleans()),
                bar_time,
            )
        )
    return tuple(out)


@st.composite
def records(draw: st.DrawFn) -> DecisionRecord:
    symbols = draw(st.lists(st.sampled_from(["A", "B", "C"]), max_size=3))
    data = tuple(
        DataAccess(
            s,
            draw(_HASHES),
            tuple(draw(st.lists(_FIELDS, max_size=3, unique=True))),
            draw(accesses()),
        )
        for s in symbols
    )
    reads = sum(len(d.access_patterns) for d in data)
    return record(draw(st.integers(0, 10_000)))._replace(data_accessed=data, reads=reads)


@settings(max_examples=300, deadline=None)
@given(rec=records())
def test_a_packed_row_reads_back_as_the_full_row(rec: DecisionRecord) -> None:
    row = json.loads(json.dumps(to_row(rec)))  # what the sink holds: JSON values
    packed = pack_row(compact_row(row))
    back = unpack_row(packed)
    # A column left out (null) reads as NULL, as BigQuery reads an absent NULLABLE field.
    assert set(back) <= set(row)
    assert {k: back.get(k) for k in row} == row
    assert validate_row(packed, COMPACT_SCHEMA) == []
    # Nothing is lost when the same row comes without its nulls first (the spill's rows).
    assert unpack_row(pack_row(row)) == row


@settings(max_examples=300, deadline=None)
@given(rec=records())
def test_packing_a_record_gives_the_packed_row(rec: DecisionRecord) -> None:
    """The sink's path for fresh records (straight from the reads) and for rows (a spill's)
    store the same."""
    assert pack_reads(rec.data_accessed) == pack_row(compact_row(to_row(rec)))["data_accessed"]


@settings(max_examples=100, deadline=None)
@given(rec=records())
def test_packing_keeps_every_other_column(rec: DecisionRecord) -> None:
    row = to_row(rec)
    packed = pack_row(row)
    assert {k: v for k, v in packed.items() if k != "data_accessed"} == {
        k: v for k, v in row.items() if k != "data_accessed"
    }
    assert sum(len(b["r"]) for d in packed["data_accessed"] for b in d["bars"]) == rec.reads


def test_the_compact_schema_is_the_decision_schema_but_the_reads() -> None:
    assert [f.name for f in COMPACT_SCHEMA] == [f.name for f in DECISION_SCHEMA]
    changed = [f.name for f, g in zip(COMPACT_SCHEMA, DECISION_SCHEMA, strict=True) if f != g]
    assert changed == ["data_accessed"]
    assert compact_table_id("p.d.decisions") == "p.d.decisions_compact"


def test_the_view_presents_the_columns_in_the_table_order() -> None:
    query = decisions_view_query("p.d.decisions_compact")
    assert query.endswith("FROM `p.d.decisions_compact` AS d")
    positions = [query.find(f"d.`{f.name}`") for f in DECISION_SCHEMA if f.name != "data_accessed"]
    assert -1 not in positions and positions == sorted(positions)
    for name in ("seq", "field", "`index`", "size", "bar_index", "data_hash", "value"):
        assert f" AS {name}" in query


def read_heavy_row() -> dict[str, Any]:
    """A record like tests.bq_read_heavy's: six symbols x (len + 20 closes back + an SMA)."""
    data = []
    seq = 0
    for s in ("SP500", "NASDAQ", "SPXA", "NDXA", "SPXB", "NDXB"):
        aps = []
        for back in range(21):
            aps.append(
                Access(
                    seq,
                    "len" if back == 0 and seq % 22 == 0 else "close",
                    -back,
                    1,
                    1_000 - back,
                    f"{back:032x}",
                    2041.51001 + back,
                    None,
                    False,
                    1_423_008_000.0 - 86_400 * back,
                )
            )
            seq += 1
        aps.append(
            Access(seq, "smas[0]", 0, 1, 1_000, f"{0:032x}", 2033.24, None, False, 1_423_008_000)
        )
        seq += 1
        data.append(DataAccess(s, f"{0:032x}", ("len", "close", "smas[0]"), tuple(aps)))
    return to_row(record(7)._replace(data_accessed=tuple(data), reads=seq))


def test_a_read_heavy_row_is_about_forty_percent_smaller() -> None:
    row = compact_row(read_heavy_row())
    full = len(json.dumps(row, separators=(",", ":")))
    packed = len(json.dumps(pack_row(row), separators=(",", ":")))
    assert packed < 0.65 * full, (full, packed)
