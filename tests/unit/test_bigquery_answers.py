"""The BigQuery sink against answers and rows it should not take at their word (helper-112's
attack on the body sent as encoded, issue 14).

A local HTTP server plays BigQuery's REST API with scripted answers, in the shapes the docs
give: ``tables.get`` answers a Table resource; ``tabledata.insertAll`` answers a JSON object
whose ``insertErrors`` is present only for rows that failed, each ``{"index", "errors"}``
("Method: tabledata.insertAll", https://cloud.google.com/bigquery/docs/reference/rest/v2/tabledata/insertAll);
an error answer carries ``{"error": {"code", "message", "errors": [{"reason", ...}]}}``, with
``rateLimitExceeded``/``quotaExceeded`` as 403, ``backendError`` as 500 or 503, and 429 for too
many requests ("Troubleshoot errors", https://cloud.google.com/bigquery/docs/error-messages).
The real client (google-cloud-bigquery) talks to it; nothing is mocked inside the sink.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import threading
import types
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from analyzers.schema import Access, DataAccess, to_row
from analyzers.sinks.bigquery.compact import pack_row
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.bigquery.rows import compact_row, timestamp_from_text, validate_row
from analyzers.sinks.bigquery.sink import BigQuerySink
from analyzers.sinks.bigquery.topic import DecisionTopic
from core.errors import TransientError
from tests.unit.test_writer import record


class _BigQuery(http.server.BaseHTTPRequestHandler):
    """``GET`` (tables.get) answers a Table resource; each ``POST`` (insertAll) takes the next
    scripted ``(status, body)``, then ``200 {}`` (every row taken)."""

    protocol_version = "HTTP/1.1"
    script: ClassVar[list[tuple[int, bytes]]] = []
    bodies: ClassVar[list[bytes]] = []

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        table = {"tableReference": {"projectId": "p", "datasetId": "d", "tableId": "decisions"}}
        self._reply(200, json.dumps(table).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).bodies.append(body)
        judge = getattr(type(self), "judge", None)
        if type(self).script:
            status, answer = type(self).script.pop(0)
        elif judge is not None:
            status, answer = judge(body)
        else:
            status, answer = 200, b"{}"
        self._reply(status, answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[type[_BigQuery], str]]:
    handler = type("Handler", (_BigQuery,), {"script": [], "bodies": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(10)


class _NoSetUp(BigQuerySink):
    """The sink without its dataset, table and view set-up (the server plays insertAll and
    tables.get only): what ``open`` leaves, a table of the layout asked for."""

    def open(self) -> None:
        self._opened = True


def _sink(endpoint: str, *, compact: bool = False) -> BigQuerySink:
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    client = bigquery.Client(
        project="p",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options=ClientOptions(api_endpoint=endpoint),
    )
    sink = _NoSetUp(
        BigQuerySinkConfig(project="p", dataset="d", api_endpoint=endpoint, timeout_s=5.0),
        client=client,
        max_in_flight=1,
    )
    sink.insert_id = "p.d.decisions_compact" if compact else "p.d.decisions"
    sink.compact = compact
    return sink


def _error(status: int, reason: str) -> tuple[int, bytes]:
    body = {"error": {"code": status, "message": reason, "errors": [{"reason": reason}]}}
    return status, json.dumps(body).encode()


@pytest.mark.parametrize(
    "answer",
    [
        b"",
        b"null",
        b"[]",
        b'{"insertErrors": null}',
        b'{"insertErrors": [{"index": 7, "errors": [{"reason": "invalid"}]}]}',
        b'{"insertErrors": [{"index": -1, "errors": [{"reason": "invalid"}]}]}',
        b'{"insertErrors": [{"errors": [{"reason": "invalid"}]}]}',
        b'{"insertErrors": [{"index": 0}]}',
        b'{"insertErrors": [{"index": 1, "errors": ["boom"]}]}',
        b'{"insertErrors": [{"index": 1, "errors": [null]}]}',
        b'{"insertErrors": [{"index": 1, "errors": [["invalid"]]}]}',
        b'{"insertErrors": [{"index": 1, "errors": []}]}',
        b'{"insertErrors": [{"index": true, "errors": [{"reason": "invalid"}]}]}',
        '{"insertErrors": [{"index": "\u0661", "errors": [{"reason": "invalid"}]}]}'.encode(),
        b'{"error": {"code": 400, "message": "bad", "errors": [{"reason": "invalid"}]}}',
        b'{"insertErrors": [{"index": 0, "errors": [{}]}]}',
    ],
    ids=["empty", "null", "array", "null errors", "index past", "negative", "no index",
         "no errors", "text error", "null error", "list error", "empty errors", "index true",
         "arabic index", "an error object", "no reason"],
)  # fmt: skip
def test_an_answer_that_does_not_say_which_rows_were_stored_leaves_them_unsure(
    server: tuple[type[_BigQuery], str], answer: bytes
) -> None:
    """helper-112 N3 and O2: a 200 with an empty, ``null`` or ``[]`` body counted every row
    stored (a proxy's answer, say), and so did an insert error naming a row the request did not
    have. helper-113 F1: an error that is not an object raised AttributeError after the rows
    before it were counted stored, and the rest were sent again without a look-up (stored
    twice on the emulator). Their outcome is unknown: the write fails for now and the rows are
    looked up before they are sent again, as after a dropped connection."""
    handler, endpoint = server
    handler.script = [(200, answer)]
    sink = _sink(endpoint)
    rows = [to_row(record(i)) for i in range(3)]
    try:
        with pytest.raises(TransientError, match="insertAll answered"):
            sink.write(rows)
        assert not any(sink.is_stored(r["decision_id"]) for r in rows)
        assert sink.unsure_ids() == {r["decision_id"] for r in rows}
    finally:
        sink.close()


@pytest.mark.parametrize(
    "answer",
    [_error(429, "rateLimitExceeded"), _error(403, "quotaExceeded"), _error(503, "backendError"),
     _error(500, "backendError"), _error(500, "timeout")],
    ids=["429", "403 quota", "503", "500 backend", "500 timeout"],
)  # fmt: skip
def test_a_lone_row_under_quota_or_backend_errors_is_retried_not_rejected(
    server: tuple[type[_BigQuery], str], answer: tuple[int, bytes]
) -> None:
    """helper-112 O1 (older than the change): a one-row write answered 429, 403 quota or 503
    while tables.get still answered was taken for a poison row and rejected for good. BigQuery
    says to retry those; the write fails for now and the writer retries it."""
    handler, endpoint = server
    handler.script = [answer] * 4
    sink = _sink(endpoint)
    try:
        with pytest.raises(TransientError):
            sink.write([to_row(record(0))])
        assert not sink.is_stored(to_row(record(0))["decision_id"])
    finally:
        sink.close()


def test_a_row_answered_500_among_rows_stored_is_isolated_and_refused(
    server: tuple[type[_BigQuery], str],
) -> None:
    """bqemulator answers a whole request with a value it cannot read with HTTP 500
    ``internalError`` (tests/integration/test_bigquery.py checks that on the emulator). The
    request is halved: the other row is stored, the row alone gets two tries, then is refused.
    """
    handler, endpoint = server
    poison = _error(500, "internalError")
    handler.script = [poison, poison, poison]  # both rows, the first alone twice; then 200
    sink = _sink(endpoint)
    try:
        errors = sink.write([to_row(record(0)), to_row(record(1))])
        assert [e.index for e in errors] == [0] and "server error for this row" in errors[0].reason
        assert sink.is_stored(to_row(record(1))["decision_id"])
    finally:
        sink.close()


@pytest.mark.parametrize("answer", [_error(500, "internalError"), (500, b"")], ids=["500", "bare"])
def test_a_request_whose_every_row_gets_a_500_is_retried_as_an_outage(
    server: tuple[type[_BigQuery], str], answer: tuple[int, bytes]
) -> None:
    """helper-113 F2: a write of one row answered 500 ``internalError`` twice was refused for
    good, but BigQuery says to retry it, and nothing tells it from bqemulator's answer to a bad
    value. When no row of the request was stored, the write fails for now: several rows as an
    outage, a row alone as a strike (see the next test)."""
    handler, endpoint = server
    handler.script = [answer] * 7  # one row: two tries; two rows: both, then each twice
    sink = _sink(endpoint)
    try:
        with pytest.raises(TransientError, match="strike 1 of 3"):
            sink.write([to_row(record(0))])
        with pytest.raises(TransientError, match="retrying it as an outage"):
            sink.write([to_row(record(1)), to_row(record(2))])
        assert not any(sink.is_stored(to_row(record(i))["decision_id"]) for i in range(3))
    finally:
        sink.close()


def _poison_server(handler: type[_BigQuery]) -> None:
    """Answer 500 ``internalError`` to any request holding the row with ``reasoning`` "poison"
    (as bqemulator answers a request with a value it cannot read), 200 to the others."""

    def answer(body: bytes) -> tuple[int, bytes]:
        return _error(500, "internalError") if b'"poison"' in body else (200, b"{}")

    handler.judge = staticmethod(answer)  # type: ignore[attr-defined]


def test_a_row_failing_alone_is_refused_after_three_writes_over_the_span(
    server: tuple[type[_BigQuery], str],
) -> None:
    """helper-114 F1/F2: with a one-row request always retried, a row the server cannot read
    that is alone (too large to share a request, or a spill's last row) was retried forever and
    the writer never left its spill. It is refused once it failed alone in three writes over
    ``poison_span_s``; three quick writes are not enough (a burst of BigQuery's own
    internalError), and a row stored in between forgets its strikes."""
    handler, endpoint = server
    _poison_server(handler)
    row = dict(to_row(record(0)), reasoning="poison")
    sink = _sink(endpoint)
    try:
        for n in (1, 2, 3, 4):
            with pytest.raises(TransientError, match=f"strike {n} of 3"):
                sink.write([row])  # quick: under the 30 s span
        sink.poison_span_s = 0.0
        errors = sink.write([row])
        assert [e.index for e in errors] == [0] and "server error for this row" in errors[0].reason
    finally:
        sink.close()


def test_a_good_row_in_a_burst_of_internal_errors_is_not_refused(
    server: tuple[type[_BigQuery], str],
) -> None:
    """helper-114 F4: rows [good, invalid], insertAll answering 500 ``internalError`` three
    times, then naming the invalid row: the good row was refused for good, as poison, though
    nothing of its request was stored. It is retried, and stored."""
    handler, endpoint = server

    def invalid(i: int) -> tuple[int, bytes]:
        errors = [{"index": i, "errors": [{"reason": "invalid", "message": "x"}]}]
        return 200, json.dumps({"insertErrors": errors}).encode()

    # both rows, then the good one alone twice: 500; the invalid one alone: named; the second
    # write, both rows at once: the invalid one named
    handler.script = [_error(500, "internalError")] * 3 + [invalid(0), invalid(1)]
    sink = _sink(endpoint)
    good, bad = to_row(record(0)), to_row(record(1))
    try:
        with pytest.raises(TransientError):
            sink.write([good, bad])
        errors = sink.write([good, bad])
        assert [e.index for e in errors] == [1] and "invalid" in errors[0].reason
        assert sink.is_stored(good["decision_id"])
    finally:
        sink.close()


def test_a_writer_over_a_row_the_server_cannot_read_refuses_it_and_drains(
    server: tuple[type[_BigQuery], str], tmp_path: Any
) -> None:
    """helper-114 F2 through the writer: a spill whose only row the server cannot read drained
    never (retried at every probe). With the span passed, it is refused and kept in the
    rejected file; the rest is stored."""
    from analyzers.sinks.writer import DecisionWriter
    from core.retry import RetryPolicy

    handler, endpoint = server
    _poison_server(handler)
    sink = _sink(endpoint)
    sink.poison_span_s = 0.0
    w = DecisionWriter(
        sink,
        spill_dir=tmp_path,
        batch_size=1,
        retry=RetryPolicy(attempts=4, initial_s=0.01, max_s=0.02),
        probe_interval_s=0.05,
    )
    w.start()
    for i in range(3):
        w.submit(record(i))
    assert w.flush(10)
    w.submit(record(3)._replace(reasoning="poison"))  # alone: no other row in its requests
    assert w.wait_drained(30) and w.flush(10)
    assert w.healthy  # not left spilling
    stats = w.stop()
    assert (stats.written, stats.rejected) == (3, 1)
    (kept,) = [json.loads(x) for x in w.rejected_path.read_text().splitlines()]
    assert "server error for this row" in kept["reason"]
    assert kept["row"]["decision_id"] == record(3).decision_id


def _nan_read_record(i: int) -> Any:
    bad = Access(0, "close", float("nan"), float("inf"), 5, "h", 1.0, None, False, 1e9)
    return record(i)._replace(data_accessed=(DataAccess("GOOG", "h", ("close",), (bad,)),), reads=1)


@pytest.mark.parametrize(
    ("compact", "where"),
    [(False, "data_accessed[0].access_patterns[0].index"),
     (True, "data_accessed[0].bars[0].r[0].x")],
    ids=["row per read", "compact"],
)  # fmt: skip
def test_a_nan_in_reads_the_sink_does_not_check_is_refused_not_sent_as_null(
    server: tuple[type[_BigQuery], str], compact: bool, where: str
) -> None:
    """helper-112 N1: a fresh record's reads are not checked field by field, and orjson writes
    NaN as null, so a NaN index went as null (read back as index 0 on a compact table). It is
    refused, naming the field; the other rows of the write are sent."""
    handler, endpoint = server
    sink = _sink(endpoint, compact=compact)
    try:
        errors = sink.write_records([record(0), _nan_read_record(1), record(2)])
        assert [e.index for e in errors] == [1]
        assert errors[0].reason.startswith(f"row has no JSON form: ValueError: {where}: nan ")
        sent = [e["json"]["decision_id"] for b in handler.bodies for e in json.loads(b)["rows"]]
        assert sent == [record(0).decision_id, record(2).decision_id]
        assert b"null" not in b"".join(handler.bodies)
    finally:
        sink.close()


def test_every_row_stored_is_published_to_the_decisions_topic(
    server: tuple[type[_BigQuery], str],
) -> None:
    """helper-112 N2: with a decisions topic, a row orjson encoded (NaN as null) but the topic's
    ``json.dumps`` refused raised after the rows were stored, and the retry skipped them as
    stored: their messages were lost. Now that row is refused before anything is sent, and an
    encoding failure in the topic is a counted publish failure, not an error of the write."""
    handler, endpoint = server
    published: list[str] = []

    class Publisher:
        def publish(self, path: str, data: bytes, **attrs: str) -> Any:
            published.append(json.loads(data)["decision_id"])
            future: concurrent.futures.Future[str] = concurrent.futures.Future()
            future.set_result("1")
            return future

    sink = _sink(endpoint)
    sink.topic = DecisionTopic("t", "p", publisher=Publisher(), count=sink._count_publish)
    try:
        errors = sink.write_records([record(0), _nan_read_record(1), record(2)])
        assert [e.index for e in errors] == [1]
        stored = [e["json"]["decision_id"] for b in handler.bodies for e in json.loads(b)["rows"]]
        assert published == stored == [record(0).decision_id, record(2).decision_id]
        # a row the topic cannot encode after it was stored: counted, the write goes on
        assert sink.topic is not None
        sink.topic.publish([{"decision_id": "x", "value": float("nan")}])
        assert sink.stats.publish_errors == 1
    finally:
        sink.close()


@pytest.mark.parametrize(
    "text",
    ["2001-09-09 01:46:40 UTC", "2001-09-09T01:46:40", "2001-09-09T01:46:40Z",
     "2001-09-09T03:46:40+02:00", "2001-09-09T01:46:40.000000Z", "2001-9-9 1:46:40.0 UTC",
     "2001-09-08T23:46:40-2:00", "2001-09-09T03:46:40+02", "2001-09-09T07:16:40+5:30"],
)  # fmt: skip
def test_timestamp_text_the_check_takes_is_read_the_same_everywhere(text: str) -> None:
    """helper-112 O3 (older): text the check took (``... UTC``, no zone) raised in the compact
    row's bar times and in the look-up of unsure rows, so the batch was spilled and failed again
    at each replay. One reading now serves the three."""
    row = to_row(_nan_read_record(0)._replace(data_accessed=()))
    read = {"seq": 0, "field": "close", "index": 0, "size": 1, "bar_index": 0, "data_hash": "h"}
    row["data_accessed"] = [
        {
            "symbol": "GOOG",
            "data_hash": "h",
            "fields_accessed": ["close"],
            "access_patterns": [{**read, "value": 1.0, "lookahead": False, "bar_time": text}],
        }
    ]
    row["bar_time"] = text
    assert validate_row(row, _schema()) == []
    assert pack_row(compact_row(row))["data_accessed"][0]["bars"][0]["t"] == 1_000_000_000
    assert timestamp_from_text(text) == timestamp_from_text("2001-09-09T01:46:40Z")
    assert {timestamp_from_text(text), timestamp_from_text("2001-09-09T01:46:40Z")} == {
        timestamp_from_text(text)
    }


def _schema() -> Any:
    from analyzers.schema import DECISION_SCHEMA

    return DECISION_SCHEMA


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        ("reads", "١٢", "expected INT64"),
        ("reads", "99999999999999999999", "expected INT64"),
        ("portfolio_value", "1_000", "expected FLOAT64"),
        ("portfolio_value", "١٢", "expected FLOAT64"),
        ("bar_time", "2001-09-09T01:46:40 UTC+1", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T01:46:40Z UTC", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T03:46:40+02:00 UTC", "expected TIMESTAMP"),
        ("bar_time", " 2001-09-09T01:46:40Z", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T01:46:40Z\u3000", "expected TIMESTAMP"),
        ("bar_time", "2001-W36-7", "expected TIMESTAMP"),
        ("bar_time", "20010909T014640Z", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09X01:46:40", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T01:46:40,5Z", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T01:46:40+02:00:15", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T01:46:40.1234567Z", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09t01:46:40z", "expected TIMESTAMP"),
        ("bar_time", "0001-01-01T00:30:00+01:00", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T03:04:05+05:75", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T03:04:05-00:60", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T03:04:05+24:00", "expected TIMESTAMP"),
        ("bar_time", "2001-09-09T03:04:05+0200", "expected TIMESTAMP"),
    ],
)
def test_text_python_reads_as_a_number_but_bigquery_does_not_is_refused(
    column: str, value: str, says: str
) -> None:
    """helper-112 O5: ``\\d`` took other scripts' digits, Python's ``float`` takes ``1_000``, and
    an INT64 text past 64 bits passed. helper-113 F3: TIMESTAMP text Python's ``fromisoformat``
    reads but BigQuery refuses or reads otherwise (the emulator answered several with HTTP 500,
    so the row was refused as a server error, naming no field)."""
    row = to_row(record(0))
    row[column] = value
    problems = validate_row(row, _schema())
    assert problems and problems[0].startswith(f"{column}: {says}")
    row[column] = {
        "reads": "12",
        "portfolio_value": "1000.5",
        "bar_time": "2001-09-09 01:46:40 UTC",
    }[column]
    assert validate_row(row, _schema()) == []


def test_a_mapping_inside_a_tuple_is_made_a_json_object() -> None:
    """helper-112 O4: a valid ``actions`` element given as a mapping that is not a dict, inside
    a tuple, passed the check but reached the encoder unconverted, which refused the row naming
    no field. Tuples are taken like lists now."""
    action = {"seq": 0, "event": "submitted", "side": "BUY", "symbol": "GOOG", "size": 1.0}
    row = to_row(record(0))
    row["actions"] = (types.MappingProxyType(action),)
    assert validate_row(row, _schema()) == []
    assert compact_row(row)["actions"] == [action]


def test_a_decision_id_that_is_not_text_is_refused(server: tuple[type[_BigQuery], str]) -> None:
    """helper-113 F4: a number passed as STRING, was kept unsure as text and never looked up
    (compared as the number): after an unknown outcome it was sent again, stored twice. And
    helper-114: an empty one went as ``insertId: ""`` (no de-duplication by BigQuery), and a
    second row with it was taken for a repeat of the first, given its outcome, never sent."""
    handler, endpoint = server
    sink = _sink(endpoint)
    row = to_row(record(0))
    row["decision_id"] = 123
    empty = [dict(to_row(record(i)), decision_id="") for i in (2, 3)]
    try:
        errors = sink.write([row, to_row(record(1)), *empty])
        assert [(e.index, e.reason) for e in errors] == [
            (0, "decision_id: expected non-empty text, got 123"),
            (2, "decision_id: expected non-empty text, got ''"),
            (3, "decision_id: expected non-empty text, got ''"),
        ]
        assert [len(json.loads(b)["rows"]) for b in handler.bodies] == [1]
    finally:
        sink.close()


def test_null_as_text_is_sent_as_orjson_wrote_it() -> None:
    """helper-113 F5: every row whose text held "null" (an agent's parameters as JSON) took
    ``json.dumps``; only a bare null (NaN written as null by orjson, or a null in a list) does."""
    import orjson

    from analyzers.sinks.bigquery.rows import _has_null_token, encode_entry

    row = compact_row(to_row(record(0)))
    row["agent_params"] = '{"stop": null, "q": "\\"null\\""}'
    row["reasoning"] = 'said "null", then \\null'
    entry = encode_entry(row)
    assert entry == orjson.dumps({"json": row, "insertId": row["decision_id"]})
    assert not _has_null_token(entry)
    assert _has_null_token(orjson.dumps({"a": ["x", None]}))
    assert _has_null_token(orjson.dumps({"a": 'x"', "b": float("nan")}))
    assert json.loads(encode_entry({"decision_id": "d", "a": ["x", None]})) == {
        "json": {"decision_id": "d", "a": ["x", None]},
        "insertId": "d",
    }
