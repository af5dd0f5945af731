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

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from analyzers.schema import DECISION_SCHEMA, to_row
from analyzers.sinks.bigquery.rows import (
    MIN_SPLIT_BYTES,
    REQUEST_ENVELOPE_BYTES,
    Pending,
    chunks,
    compact_row,
    encode_entry,
    entry_size,
    request_body,
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
    """compact_row as it was before its exact-type fast paths (thirty-second pass), with
    tuples taken like lists (thirty-third pass, helper-112: a mapping inside a tuple was left
    for the encoder)."""
    if isinstance(value, Mapping):
        return {
            k: _compact_before(v) if isinstance(v, Mapping | list | tuple) else v
            for k, v in value.items()
            if v is not None
        }
    if isinstance(value, list | tuple):
        return [_compact_before(v) if isinstance(v, Mapping | list | tuple) else v for v in value]
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
    | st.tuples(st.integers(), st.none())
    | st.tuples(
        st.dictionaries(st.text(max_size=3), st.none() | st.integers(), max_size=2).map(
            types.MappingProxyType
        )
    ),
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
    before the exact-type checks, and the result is the same, of the same types (a tuple
    becomes a list, as JSON writes it)."""
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
    items: list[Pending] = [(i, {}, s, b"") for i, s in enumerate(sizes)]
    requests = list(chunks(items, per, max_rows))
    assert [p[0] for r in requests for p in r] == list(range(len(sizes)))
    for r in requests:
        assert 1 <= len(r) <= max_rows
        assert len(r) == 1 or sum(p[2] for p in r) <= per
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


def _capture_client(port: int) -> Any:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(
        project="p",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=f"http://127.0.0.1:{port}"),
    )


@settings(max_examples=25, deadline=None)
@given(
    texts=st.lists(_TEXT, min_size=1, max_size=30),
    budget=st.integers(2_000, 20_000),
)
def test_the_sink_s_request_bodies_fit_the_budget_and_say_what_the_client_would(
    texts: list[str], budget: int
) -> None:
    """Finding 3 of issue 17, and the body sent as encoded (issue 14): every insertAll body the
    sink sends fits its byte budget, its size is exactly the rows' sizes plus the envelope, and
    it parses to what ``insert_rows_json`` sends for the same rows (its own ``json.dumps``
    body), non-ASCII text included."""
    from analyzers.sinks.bigquery.config import BigQuerySinkConfig
    from analyzers.sinks.bigquery.sink import BigQuerySink

    rows = []
    for i, text in enumerate(texts):
        row = compact_row(to_row(record(i)))
        row["agent_id"] = text  # a free-text field, any Unicode
        rows.append(row)
    largest = max(entry_size(encode_entry(r)) for r in rows)
    budget = max(budget, largest + REQUEST_ENVELOPE_BYTES)  # the sink refuses larger rows
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CaptureHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = _capture_client(server.server_port)
        sink = BigQuerySink(
            BigQuerySinkConfig(project="p", dataset="d", table="t"),
            client=client,
            max_request_bytes=budget,
            max_in_flight=1,
        )
        sink._opened = True  # the capturing server answers insertAll only (no table calls)
        _CaptureHandler.bodies = []
        assert sink.write(rows) == []
        ours = list(_CaptureHandler.bodies)
        _CaptureHandler.bodies = []
        sent = [json.loads(b)["rows"] for b in ours]
        for batch in sent:
            assert (
                client.insert_rows_json(
                    "p.d.t",
                    [e["json"] for e in batch],
                    row_ids=[e["insertId"] for e in batch],
                    skip_invalid_rows=False,
                    retry=None,
                )
                == []
            )
        theirs = list(_CaptureHandler.bodies)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert [e["json"] for batch in sent for e in batch] == json.loads(json.dumps(rows))
    assert [json.loads(b) for b in ours] == [json.loads(b) for b in theirs]
    for body in ours:
        entries = [json.dumps(e, separators=(",", ":")) for e in json.loads(body)["rows"]]
        assert len(body) <= budget
        # the measure is exact: the rows' sizes plus the envelope, no more
        sizes = sum(entry_size(encode_entry(e["json"])) for e in json.loads(body)["rows"])
        assert len(body) == sizes - 1 + len(request_body([]))
        assert entries  # never an empty request


_ODD = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),  # past 64 bits too: orjson refuses those, json.dumps takes them
        st.floats(),  # NaN and infinities: refused by both paths, never written as null
        st.text(),  # lone surrogates too: orjson refuses those
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=5), st.integers(0, 9)), inner, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=400)
@given(value=_ODD)
def test_an_entry_is_the_client_s_json_or_refused(value: Any) -> None:
    """``encode_entry`` gives the JSON ``json.dumps`` gives (parsed, the same value), or raises
    where ``json.dumps(..., allow_nan=False)`` raises: orjson never writes a NaN as null or drops
    anything silently."""
    row = {"decision_id": "d", "notes": value}
    try:
        expected = json.loads(json.dumps({"json": row, "insertId": "d"}, allow_nan=False))
    except ValueError:
        expected = None
    try:
        got = json.loads(encode_entry(row))
    except ValueError:
        got = None
    if expected is None:
        # orjson writes NaN and infinities as null: validate_row refuses them before this,
        # for every column type
        assert got is None or _has_non_finite(value)
    else:
        assert got == expected


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_has_non_finite(v) for v in value)
    return False


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("column", ["portfolio_value", "agent_id", "reads"])
def test_a_non_finite_float_is_refused_by_name_in_any_column(bad: float, column: str) -> None:
    row = compact_row(to_row(record(0)))
    row[column] = bad
    problems = validate_row(row, DECISION_SCHEMA)
    assert problems and problems[0].startswith(f"{column}: ") and "NaN or infinity" in problems[0]
