"""Rows on their way to BigQuery, pure parts: compact rows and requests sized by bytes.

Property tests (Hypothesis): a compact row reads back as the full row (an absent NULLABLE field
is NULL); requests keep every row once, in order, under the byte and row limits, and a write
spread over requests in flight leaves no tiny last request.
"""

from __future__ import annotations

import collections
import copy
import http.server
import json
import threading
import types
from collections.abc import Mapping
from typing import Any, ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st

from analyzers.schema import DECISION_SCHEMA, to_row
from analyzers.sinks.bigquery.rows import (
    MIN_SPLIT_BYTES,
    REQUEST_ENVELOPE_BYTES,
    Pending,
    chunks,
    compact_row,
    row_size,
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


def _compact_before(value: Any) -> Any:
    """compact_row as it was before its exact-type fast paths (thirty-second pass)."""
    if isinstance(value, Mapping):
        return {
            k: _compact_before(v) if isinstance(v, Mapping | list) else v
            for k, v in value.items()
            if v is not None
        }
    if isinstance(value, list):
        return [_compact_before(v) if isinstance(v, Mapping | list) else v for v in value]
    return value


class _Text(str):
    pass


class _Items(list):  # type: ignore[type-arg]
    pass


_ODD = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=3)
    | st.text(max_size=3).map(_Text)
    | st.tuples(st.integers(), st.none()),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.lists(inner, max_size=3).map(_Items)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(collections.OrderedDict)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3).map(types.MappingProxyType)
    ),
    max_leaves=12,
)


@settings(max_examples=400)
@given(value=_ODD)
def test_compact_row_s_fast_paths_give_what_it_gave_before(value: Any) -> None:
    """Subclasses of str and list, other mappings, tuples, bools: each takes the path it took
    before the exact-type checks, and the result is the same, of the same types."""
    got, want = compact_row(value), _compact_before(value)
    assert got == want
    assert repr(got) == repr(want)  # the same types all the way down (OrderedDict vs dict...)


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
    items: list[Pending] = [(i, {}, s) for i, s in enumerate(sizes)]
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


class _CaptureHandler(http.server.BaseHTTPRequestHandler):
    """Keeps each POST body and answers as tabledata.insertAll does when every row was taken:
    a 200 with no ``insertErrors`` member ("Method: tabledata.insertAll", response body:
    insertErrors is present only for rows that failed;
    https://cloud.google.com/bigquery/docs/reference/rest/v2/tabledata/insertAll)."""

    bodies: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append(body)
        answer = b'{"kind": "bigquery#tableDataInsertAllResponse"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40)  # any text, non-ASCII too


@settings(max_examples=25, deadline=None)
@given(
    texts=st.lists(_TEXT, min_size=1, max_size=30),
    budget=st.integers(2_000, 20_000),
)
def test_a_request_body_as_the_client_sends_it_never_exceeds_the_budget(
    texts: list[str], budget: int
) -> None:
    """Finding 3 of issue 17: rows are sized as google-cloud-core sends them (json.dumps with
    default separators and ASCII escapes), so every insertAll body built from a chunk, by the
    real client, fits the byte budget."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    rows = []
    for i, text in enumerate(texts):
        row = compact_row(to_row(record(i)))
        row["agent_name"] = text  # a free-text field, any Unicode
        rows.append(row)
    sizes = [row_size(r) for r in rows]
    if max(sizes) + REQUEST_ENVELOPE_BYTES > budget:
        budget = max(sizes) + REQUEST_ENVELOPE_BYTES  # the sink refuses larger rows first
    items = [(i, r, s) for i, (r, s) in enumerate(zip(rows, sizes, strict=True))]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CaptureHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _CaptureHandler.bodies = []
    try:
        client: Any = bigquery.Client(
            project="p",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=f"http://127.0.0.1:{server.server_port}"),
        )
        requests = list(chunks(items, budget - REQUEST_ENVELOPE_BYTES, 500))
        for chunk in requests:
            errors = client.insert_rows_json(
                "p.d.t",
                [r for _, r, _ in chunk],
                row_ids=[str(r["decision_id"]) for _, r, _ in chunk],
                skip_invalid_rows=False,
                retry=None,
            )
            assert errors == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert len(_CaptureHandler.bodies) == len(requests)
    for chunk, body in zip(requests, _CaptureHandler.bodies, strict=True):
        assert len(body) <= budget
        # the measure is exact: the rows' sizes plus the envelope, no more
        assert len(body) == sum(s for _, _, s in chunk) - len(", ") + len(
            '{"rows": [], "skipInvalidRows": false}'
        )
