"""Rows on their way to BigQuery, pure parts: compact rows and requests sized by bytes.

Property tests (Hypothesis): a compact row reads back as the full row (an absent NULLABLE field
is NULL); requests keep every row once, in order, under the byte and row limits, and a write
spread over requests in flight leaves no tiny last request.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from analyzers.schema import DECISION_SCHEMA, to_row
from analyzers.sinks.bigquery.rows import (
    MIN_SPLIT_BYTES,
    chunks,
    compact_row,
    split_bytes,
    validate_row,
)
from tests.unit.test_writer import record

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=5)
    ),
    max_leaves=30,
)


def _read(value: Any, path: tuple[Any, ...]) -> Any:
    """The value at ``path``; None where a member is absent (how BigQuery reads a JSON row)."""
    for step in path:
        if isinstance(value, dict):
            value = value.get(step)
        elif isinstance(value, list) and isinstance(step, int) and step < len(value):
            value = value[step]
        else:
            return None
    return value


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths(v, (*prefix, k))] or [prefix]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _paths(v, (*prefix, i))] or [prefix]
    return [prefix]


def _no_null_members(value: Any) -> bool:
    if isinstance(value, dict):
        return all(v is not None and _no_null_members(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_null_members(v) for v in value)
    return True


@settings(max_examples=300)
@given(row=st.dictionaries(st.text(max_size=5), _JSON, max_size=6))
def test_a_compact_row_reads_as_the_full_row(row: dict[str, Any]) -> None:
    before = copy.deepcopy(row)
    compact = compact_row(row)
    assert row == before  # the input is not changed
    assert _no_null_members(compact)
    for path in _paths(row):
        assert _read(compact, path) == _read(row, path)
    assert len(json.dumps(compact)) <= len(json.dumps(row))


def test_a_decision_row_stays_valid_when_compact_and_loses_its_null_reads() -> None:
    from analyzers.schema import Access, DataAccess

    reads = tuple(
        Access(s, "close", -s, 1, 9 - s, "h" * 32, 1.0 + s, None, False) for s in range(5)
    )
    rec = record(0)._replace(data_accessed=(DataAccess("X", "h" * 32, ("close",), reads),))
    full = to_row(rec)
    compact = compact_row(full)
    assert validate_row(compact, DECISION_SCHEMA) == []
    assert "text_value" not in compact["data_accessed"][0]["access_patterns"][0]
    assert compact["actions"] == [] and "reasoning" not in compact


@settings(max_examples=300)
@given(
    sizes=st.lists(st.integers(1, 3_000_000), max_size=60),
    in_flight=st.integers(1, 8),
    max_bytes=st.integers(1_000_000, 9_000_000),
    max_rows=st.integers(1, 500),
)
def test_requests_keep_every_row_once_under_the_limits(
    sizes: list[int], in_flight: int, max_bytes: int, max_rows: int
) -> None:
    total = sum(sizes)
    per = split_bytes(total, in_flight, max_bytes, largest=max(sizes, default=0))
    assert 1 <= per <= max_bytes
    items = [(i, None, s) for i, s in enumerate(sizes)]
    requests = list(chunks(items, per, max_rows))
    assert [i for r in requests for i, _, _ in r] == list(range(len(sizes)))
    for r in requests:
        assert 1 <= len(r) <= max_rows
        assert len(r) == 1 or sum(s for _, _, s in r) <= per
    if max_rows >= len(sizes) and sizes:
        # Spread evenly: a write needing n requests (by bytes, or to fill the requests in
        # flight) gets at most n of them, none left over small, when the even share plus the
        # largest row fits in a request.
        n = max(-(-total // max_bytes), min(in_flight, total // MIN_SPLIT_BYTES), 1)
        if -(-total // n) + max(sizes) <= max_bytes:
            assert len(requests) <= n
