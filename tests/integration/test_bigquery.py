"""BigQuerySink against bqemulator with the real google-cloud-bigquery client.

Table creation (partitioning, clustering, the flat view), schema evolution and refusal, row
validation naming the offending field, byte-split requests, insert ids, no duplicate on resend
or replay, a poison row the emulator answers with HTTP 500, and the optional decisions topic
(real Pub/Sub emulator). BigQuery's per-row ``insertErrors`` (which the emulator never returns)
are served by a tiny local HTTP server speaking the documented response shape.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from analyzers.schema import DECISION_SCHEMA, SCHEMA_VERSION, FieldSpec, bigquery_schema, to_row
from analyzers.sinks.bigquery.compact import COMPACT_SCHEMA, pack_row
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.bigquery.errors import is_transient
from analyzers.sinks.bigquery.rows import compact_row, validate_row
from analyzers.sinks.bigquery.schema import ddl_type, plan_schema, spec_of
from analyzers.sinks.bigquery.sink import BigQuerySink
from analyzers.sinks.views import bigquery_view_query
from core.errors import SinkError, TransientError
from runtime.config import load_config
from tests.bq_agents import real_records
from tests.bqemu_harness import BigQueryEmulator, unique_dataset

if TYPE_CHECKING:
    from tests.pubsub_emulator import PubSubEmulator


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    """Rows of a real backtest year (two symbols), in to_row shape."""
    return [to_row(r) for r in real_records("bq-unit")]


def sink_for(emu: BigQueryEmulator, dataset: str | None = None, **kw: Any) -> BigQuerySink:
    cfg = BigQuerySinkConfig(
        project=emu.project,
        dataset=dataset or unique_dataset(),
        api_endpoint=emu.endpoint,
        timeout_s=10.0,
        decisions_topic=kw.pop("decisions_topic", None),
    )
    return BigQuerySink(cfg, **kw)


def make_table(emu: BigQueryEmulator, dataset: str, schema: list[Any]) -> None:
    """Create ``dataset.decisions`` with ``schema`` (``SchemaField`` list) on the emulator."""
    from google.cloud import bigquery

    client = emu.client()
    try:
        client.create_dataset(f"{emu.project}.{dataset}")
        client.create_table(bigquery.Table(f"{emu.project}.{dataset}.decisions", schema=schema))
    finally:
        client.close()


def count(emu: BigQueryEmulator, sink: BigQuerySink) -> tuple[int, int]:
    """(rows, distinct decision ids) in the sink's table."""
    got = emu.query(
        f"SELECT COUNT(*) AS n, COUNT(DISTINCT decision_id) AS d FROM `{sink.table_id}`"
    )
    return int(got[0]["n"]), int(got[0]["d"])


# ---------------------------------------------------------------------------------------------
# Pure parts: schema planning, validation, classification
# ---------------------------------------------------------------------------------------------


def _without(schema: tuple[FieldSpec, ...], *names: str) -> tuple[FieldSpec, ...]:
    return tuple(f for f in schema if f.name not in names)


def test_plan_adds_missing_columns_nested_too_and_relaxes_required() -> None:
    actions = next(f for f in DECISION_SCHEMA if f.name == "actions")
    old_actions = dataclasses.replace(actions, fields=actions.fields[:-1])  # no "reason"
    old = tuple(
        old_actions if f.name == "actions" else f
        for f in _without(DECISION_SCHEMA, "notes", "schema_version")
    )
    old = tuple(
        dataclasses.replace(f, mode="REQUIRED") if f.name == "reasoning" else f for f in old
    )
    plan = plan_schema(old)
    assert not plan.problems
    assert plan.added == ("actions.reason", "notes", "schema_version")
    assert plan.relaxed == ("reasoning",)
    # Table order kept, additions appended (the emulator inserts by position).
    assert [f.name for f in plan.merged] == [f.name for f in old] + ["notes", "schema_version"]
    merged_actions = next(f for f in plan.merged if f.name == "actions")
    assert [f.name for f in merged_actions.fields] == [f.name for f in actions.fields]


def test_plan_names_every_incompatible_column() -> None:
    changed = tuple(
        dataclasses.replace(f, type="STRING")
        if f.name == "decision_point"
        else dataclasses.replace(f, mode="NULLABLE")
        if f.name == "positions"
        else f
        for f in DECISION_SCHEMA
    )
    bad = (*changed, FieldSpec("owner", "STRING", "REQUIRED"))
    plan = plan_schema(bad)
    text = " | ".join(plan.problems)
    assert "decision_point: table has STRING, expected INT64" in text
    assert "positions: table mode NULLABLE, expected REPEATED" in text
    assert "owner: REQUIRED in the table" in text
    assert plan_schema(DECISION_SCHEMA).problems == () and not plan_schema(DECISION_SCHEMA).changes


def test_ddl_type_of_nested_columns() -> None:
    positions = next(f for f in DECISION_SCHEMA if f.name == "positions")
    assert ddl_type(positions) == (
        "ARRAY<STRUCT<`symbol` STRING, `size` FLOAT64, `price` FLOAT64>>"
    )


def test_validation_names_the_offending_field(rows: list[dict[str, Any]]) -> None:
    good = next(r for r in rows if r["actions"] and r["data_accessed"])
    assert validate_row(good, DECISION_SCHEMA) == []
    bad = json.loads(json.dumps(good))
    bad["decision_point"] = "seven"
    bad["actions"][0]["size"] = "abc"
    bad["data_accessed"][0]["access_patterns"][0]["lookahead"] = "maybe"
    bad["bar_time"] = "yesterday"
    bad["ts"] = 1_700_000_000  # a number: BigQuery would take it, the emulator misreads it
    bad["extra"] = 1
    del bad["stage"]
    problems = validate_row(bad, DECISION_SCHEMA)
    assert "decision_point: expected INT64, got str 'seven'" in problems
    assert "actions[0].size: expected FLOAT64, got str 'abc'" in problems
    assert (
        "data_accessed[0].access_patterns[0].lookahead: expected BOOL, got str 'maybe'" in problems
    )
    assert any(p.startswith("bar_time: expected TIMESTAMP") for p in problems)
    assert any(p.startswith("ts: expected TIMESTAMP") for p in problems)
    assert "extra: no such field in the table" in problems
    assert "stage: REQUIRED field is missing or null" in problems
    # BigQuery's JSON forms that are fine: numeric strings, integral floats, "true".
    ok = dict(good, decision_point="12", reads=3.0, portfolio_value="1e3")
    assert validate_row(ok, DECISION_SCHEMA) == []
    assert validate_row(dict(good, reads=2**63), DECISION_SCHEMA) != []


def test_error_classes() -> None:
    import requests
    from google.api_core import exceptions as gexc

    assert is_transient(requests.exceptions.ConnectionError("refused"))
    assert is_transient(gexc.InternalServerError("boom"))
    assert is_transient(gexc.TooManyRequests("slow down"))
    assert is_transient(gexc.Forbidden("quota", errors=[{"reason": "rateLimitExceeded"}]))
    assert not is_transient(gexc.Forbidden("no", errors=[{"reason": "accessDenied"}]))
    assert not is_transient(gexc.BadRequest("bad"))


def test_config_from_the_environment() -> None:
    cfg = load_config(
        {
            "FMEL_SINK": "bigquery",
            "GOOGLE_CLOUD_PROJECT": "p",
            "BIGQUERY_EMULATOR_HOST": "127.0.0.1:9050",
            "FMEL_DATASET": "d1",
        }
    )
    assert cfg.bigquery is not None
    assert cfg.bigquery.api_endpoint == "http://127.0.0.1:9050"
    assert (cfg.bigquery.dataset, cfg.bigquery.table) == ("d1", "decisions")
    sink = BigQuerySink(cfg.bigquery)
    assert sink.describe() == "bigquery:p.d1.decisions (emulator http://127.0.0.1:9050)"
    assert "`p.d1.decisions`" in sink.example_query()


# ---------------------------------------------------------------------------------------------
# Against the emulator
# ---------------------------------------------------------------------------------------------


def test_open_creates_partitioned_clustered_table_and_view(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    from google.cloud import bigquery

    sink = sink_for(bq_emulator)
    sink.open()
    sink.open()  # idempotent
    client = bq_emulator.client()
    try:
        table = client.get_table(sink.insert_id)
        decisions = client.get_table(sink.table_id)
        view = client.get_table(sink.table_id.replace(".decisions", ".decision_reads"))
    finally:
        client.close()
    # A new deployment: compact rows in decisions_compact, the view decisions over it.
    assert sink.compact and sink.insert_id == sink.table_id + "_compact"
    assert table.time_partitioning.field == "bar_time"
    assert table.time_partitioning.type_ == "DAY"
    assert table.clustering_fields == ["agent_id", "session_id"]
    assert [spec_of(f) for f in table.schema] == [
        spec_of(f) for f in bigquery_schema(COMPACT_SCHEMA)
    ]
    assert decisions.table_type == "VIEW"
    assert view.table_type == "VIEW"
    assert sink.write(rows) == []
    assert count(bq_emulator, sink) == (len(rows), len(rows))
    reads = bq_emulator.query(
        f"SELECT COUNT(*) AS n FROM `{view.project}.{view.dataset_id}.decision_reads`"
    )
    assert reads[0]["n"] == sum(r["reads"] for r in rows)
    # Nested values round-trip.
    rec = next(r for r in rows if r["actions"])
    got = bq_emulator.query(
        f"SELECT a.order_ref, a.side, a.size FROM `{sink.table_id}` AS d, UNNEST(d.actions) AS a "
        "WHERE d.decision_id = @id AND a.seq = 0",
        [bigquery.ScalarQueryParameter("id", "STRING", rec["decision_id"])],
    )
    first = rec["actions"][0]
    assert got == [{"order_ref": first["order_ref"], "side": first["side"], "size": first["size"]}]
    sink.close()


def test_an_older_table_is_extended_and_keeps_its_rows(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    from google.cloud import bigquery

    dataset = unique_dataset()
    old = _without(DECISION_SCHEMA, "notes", "agent_source_hash", "schema_version")
    client = bq_emulator.client()
    try:
        client.create_dataset(f"{bq_emulator.project}.{dataset}")
        client.create_table(
            bigquery.Table(
                f"{bq_emulator.project}.{dataset}.decisions", schema=bigquery_schema(old)
            )
        )
        old_row = {k: v for k, v in rows[0].items() if k in {f.name for f in old}}
        assert (
            client.insert_rows_json(
                f"{bq_emulator.project}.{dataset}.decisions", [old_row], retry=None, timeout=10
            )
            == []
        )
    finally:
        client.close()
    sink = sink_for(bq_emulator, dataset)
    sink.open()
    assert sink.write(rows[1:]) == []
    got = bq_emulator.query(
        f"SELECT COUNT(*) AS n, COUNTIF(schema_version = {SCHEMA_VERSION}) AS v1, "
        "COUNTIF(notes IS NOT NULL) "
        f"AS with_notes FROM `{sink.table_id}`"
    )
    assert got == [
        {
            "n": len(rows),
            "v1": len(rows) - 1,
            "with_notes": sum(1 for r in rows[1:] if r["notes"] is not None),
        }
    ]
    sink.close()


def test_an_incompatible_table_is_a_clear_error_at_start(bq_emulator: BigQueryEmulator) -> None:

    dataset = unique_dataset()
    bad = tuple(
        dataclasses.replace(f, type="STRING") if f.name == "decision_point" else f
        for f in DECISION_SCHEMA
    )
    make_table(bq_emulator, dataset, bigquery_schema(bad))
    sink = sink_for(bq_emulator, dataset)
    with pytest.raises(SinkError, match=r"decision_point: table has STRING, expected INT64"):
        sink.open()


def test_bad_rows_are_reported_with_the_field_and_the_rest_written(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    sink = sink_for(bq_emulator)
    batch = [dict(r) for r in rows[:30]]
    batch[3]["decision_point"] = "three"
    batch[17]["portfolio_value"] = "lots"
    errors = sink.write(batch)
    assert [(e.index, e.reason) for e in errors] == [
        (3, "decision_point: expected INT64, got str 'three'"),
        (17, "portfolio_value: expected FLOAT64, got str 'lots'"),
    ]
    assert count(bq_emulator, sink) == (28, 28)
    sink.close()


def test_rows_the_server_refuses_are_isolated(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    """Columns this version does not validate (added by a newer one), with values the emulator
    cannot read. The sink sends without ``skipInvalidRows``, and then the emulator answers HTTP
    500 for the whole request with a bad row in it (bqemulator's insertAll: "without the flag,
    the first bad row aborts the whole request with an internal error"): the sink splits the
    batch until the row is alone, tells it from an outage (the server answers other calls) and
    rejects only that row."""
    from google.cloud import bigquery

    dataset = unique_dataset()
    make_table(
        bq_emulator,
        dataset,
        [
            *bigquery_schema(),
            bigquery.SchemaField("trade_date", "DATE"),
            bigquery.SchemaField("notional", "NUMERIC"),
        ],
    )
    sink = sink_for(bq_emulator, dataset)
    batch = [dict(r, trade_date="2010-01-04", notional="12.5") for r in rows[:20]]
    batch[11]["trade_date"] = "not a date"
    batch[15]["notional"] = "not a number"
    errors = sink.write(batch)
    assert [e.index for e in errors] == [11, 15]
    assert all("server error for this row" in e.reason for e in errors)
    assert count(bq_emulator, sink) == (18, 18)
    sink.close()


def test_requests_are_split_by_bytes_and_an_oversized_row_is_refused(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    sink = sink_for(bq_emulator, max_request_bytes=8_000)
    batch = [dict(r) for r in rows[:60]]
    batch[7] = dict(batch[7], reasoning="x" * 9_000)
    errors = sink.write(batch)
    assert [e.index for e in errors] == [7] and "request limit" in errors[0].reason
    sent = [pack_row(compact_row(r)) for i, r in enumerate(batch) if i != 7]  # compact rows
    sizes = [len(json.dumps(r, separators=(",", ":"))) for r in sent]
    assert sink.stats.requests >= sum(sizes) // 8_000 + 1
    assert sink.stats.rows_sent == 59 and sink.stats.bytes_sent <= 8_000 * sink.stats.requests
    assert count(bq_emulator, sink) == (59, 59)
    sink.close()


def test_resend_and_replay_write_each_decision_once(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    """The emulator does not de-duplicate insert ids: the sink must not send twice. Same sink
    (remembers what it wrote) and a new one replaying a spill (looks the rows up)."""
    sink = sink_for(bq_emulator)
    assert sink.write(rows[:40]) == []
    assert sink.write(rows[:50]) == []  # a retried batch that was half written
    assert sink.stats.skipped_written == 40 and sink.stats.rows_sent == 50
    sink.close()
    again = sink_for(bq_emulator, sink.config.dataset)
    again.open()
    again.before_replay(rows[:80])
    assert again.write(rows[:80]) == []
    assert again.stats.lookups == 1 and again.stats.skipped_written == 50
    assert again.stats.rows_sent == 30
    assert count(bq_emulator, sink) == (80, 80)
    again.close()


def test_decisions_topic_gets_every_written_row(
    bq_emulator: BigQueryEmulator,
    pubsub_emulator: PubSubEmulator,
    rows: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    topic = f"projects/{bq_emulator.project}/topics/decisions-{unique_dataset()}"
    sub = topic.replace("/topics/", "/subscriptions/")
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=sub, topic=topic)
    sink = sink_for(bq_emulator, decisions_topic=topic)
    batch = [dict(r) for r in rows[:25]]
    batch[4]["decision_point"] = "bad"  # not written, so not published
    assert [e.index for e in sink.write(batch)] == [4]
    sink.close()
    assert sink.stats.published == 24 and sink.stats.publish_errors == 0
    got: dict[str, dict[str, str]] = {}
    for _ in range(20):
        resp = subscriber.pull(subscription=sub, max_messages=100, timeout=10)
        for m in resp.received_messages:
            body = json.loads(m.message.data)
            assert m.message.attributes["decision_id"] == body["decision_id"]
            got[body["decision_id"]] = dict(m.message.attributes)
        if resp.received_messages:
            subscriber.acknowledge(
                subscription=sub, ack_ids=[m.ack_id for m in resp.received_messages]
            )
        if len(got) >= 24:
            break
    assert sorted(got) == sorted(r["decision_id"] for i, r in enumerate(batch) if i != 4)
    assert {a["action"] for a in got.values()} <= {"HOLD", "BUY", "SELL", "BUY+SELL", "CANCEL"}
    subscriber.close()


def test_default_sink_publishes_nothing(
    bq_emulator: BigQueryEmulator,
    rows: list[dict[str, Any]],
) -> None:
    sink = sink_for(bq_emulator)
    assert sink.write(rows[:5]) == []
    assert sink.topic is None and sink.stats.published == 0
    sink.close()


# ---------------------------------------------------------------------------------------------
# BigQuery's per-row insertErrors (documented shape; the emulator never sends them)
# ---------------------------------------------------------------------------------------------


class _FakeBigQuery(http.server.BaseHTTPRequestHandler):
    """Just enough of the REST API for open() and insertAll; insertAll answers are scripted."""

    disable_nagle_algorithm = True
    answers: ClassVar[list[dict[str, Any]]] = []
    inserted: ClassVar[list[list[str]]] = []
    old_view: ClassVar[bool] = False  # the view exists with another query
    view_source: ClassVar[str] = "p.d.decisions"  # what decision_reads selects from
    patched: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: dict[str, Any], status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _table(self, table: str) -> dict[str, Any]:
        from google.cloud import bigquery

        ref = {"projectId": "p", "datasetId": "d", "tableId": table}
        if table == "decision_reads":
            query = bigquery_view_query(self.view_source)
            return {
                "tableReference": ref,
                "type": "VIEW",
                "view": {
                    "query": f"SELECT 1 AS older FROM ({query})" if self.old_view else query,
                    "useLegacySql": False,
                },
            }
        t = bigquery.Table("p.d.decisions", schema=bigquery_schema())
        t.time_partitioning = bigquery.TimePartitioning(field="bar_time")
        t.clustering_fields = ["agent_id", "session_id"]
        return {**t.to_api_repr(), "type": "TABLE"}

    def do_GET(self) -> None:
        self._send(self._table(self.path.split("?")[0].rsplit("/", 1)[1]))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        path = self.path.split("?")[0]
        if path.endswith("/datasets"):
            self._send({**body, "id": "p:d"})
        elif path.endswith("/insertAll"):
            type(self).inserted.append([r["insertId"] for r in body["rows"]])
            self._send(type(self).answers.pop(0) if type(self).answers else {})
        else:
            self._send({"error": {"code": 404, "message": path}}, 404)

    def do_PATCH(self) -> None:
        """tables.patch: answered HTTP 500, as bqemulator answered the view's update (issue
        17), in Google's JSON error shape."""
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).patched.append(self.path.split("?")[0].removeprefix("/bigquery/v2"))
        self._send(
            {"error": {"code": 500, "message": "An internal error occurred", "errors": []}}, 500
        )


@pytest.fixture
def fake_bigquery() -> Iterator[tuple[str, type[_FakeBigQuery]]]:
    handler = type(
        "Handler",
        (_FakeBigQuery,),
        {"answers": [], "inserted": [], "patched": [], "old_view": False},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_insert_errors_are_mapped_and_stopped_rows_retried(
    fake_bigquery: tuple[str, type[_FakeBigQuery]], rows: list[dict[str, Any]]
) -> None:
    endpoint, handler = fake_bigquery
    # Response shape: BigQuery REST reference, tabledata.insertAll (insertErrors[].index/errors).
    handler.answers = [
        {
            "kind": "bigquery#tableDataInsertAllResponse",
            "insertErrors": [
                {
                    "index": 1,
                    "errors": [
                        {
                            "reason": "invalid",
                            "location": "actions.size",
                            "message": "Cannot convert value to floating point.",
                        }
                    ],
                },
                {
                    "index": 3,
                    "errors": [{"reason": "backendError", "location": "", "message": "try again"}],
                },
            ],
        },
    ]
    sink = BigQuerySink(
        BigQuerySinkConfig(project="p", dataset="d", api_endpoint=endpoint, timeout_s=5.0)
    )
    batch = rows[:5]
    with pytest.raises(TransientError, match="did not take 1 rows"):
        sink.write(batch)
    # The writer retries the whole batch: only the row that was not taken and the invalid one
    # (BigQuery refused it; sent again, it is refused again) go out again.
    handler.answers = [
        {
            "insertErrors": [
                {
                    "index": 0,
                    "errors": [
                        {
                            "reason": "invalid",
                            "location": "actions.size",
                            "message": "Cannot convert value to floating point.",
                        }
                    ],
                }
            ]
        }
    ]
    errors = sink.write(batch)
    assert [(e.index, e.reason) for e in errors] == [
        (1, "actions.size: invalid: Cannot convert value to floating point.")
    ]
    ids = [r["decision_id"] for r in batch]
    assert handler.inserted == [ids, [ids[1], ids[3]]]
    sink.close()


def test_rows_stopped_by_an_invalid_row_are_sent_again_without_it(
    fake_bigquery: tuple[str, type[_FakeBigQuery]], rows: list[dict[str, Any]]
) -> None:
    """Without ``skipInvalidRows`` BigQuery stores nothing of a request with an invalid row and
    answers ``stopped`` for the others (tabledata.insertAll: "the default value is false, which
    causes the entire request to fail if any invalid rows exist"; insertErrors reason
    ``stopped``, "Troubleshooting errors": the job or row was stopped because of another
    error). The sink sends those again at once, without the invalid row."""
    endpoint, handler = fake_bigquery
    stopped = [{"reason": "stopped", "location": "", "message": ""}]
    handler.answers = [
        {
            "insertErrors": [
                {"index": i, "errors": stopped}
                if i != 2
                else {
                    "index": 2,
                    "errors": [
                        {"reason": "invalid", "location": "reads", "message": "Bad int64 value"}
                    ],
                }
                for i in range(5)
            ]
        },
        {},
    ]
    sink = BigQuerySink(
        BigQuerySinkConfig(project="p", dataset="d", api_endpoint=endpoint, timeout_s=5.0)
    )
    batch = rows[:5]
    errors = sink.write(batch)
    assert [(e.index, e.reason) for e in errors] == [(2, "reads: invalid: Bad int64 value")]
    ids = [r["decision_id"] for r in batch]
    assert handler.inserted == [ids, [ids[0], ids[1], ids[3], ids[4]]]
    assert all(sink.is_stored(d) for i, d in enumerate(ids) if i != 2)
    sink.close()


# ---------------------------------------------------------------------------------------------
# Compact rows, requests in flight
# ---------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A queried value as JSON-row text (timestamps as ISO-8601 UTC with Z)."""
    import datetime as dt

    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def test_compact_rows_are_stored_as_the_full_rows(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    """Null fields are left out of what is sent; what is stored is the full row, nulls and all
    (checked column by column, nested fields included)."""
    sink = sink_for(bq_emulator)
    batch = [r for r in rows if r["actions"]][:5] + rows[:20]
    batch = list({r["decision_id"]: r for r in batch}.values())
    assert sink.write(batch) == []
    got = bq_emulator.query(f"SELECT * FROM `{sink.table_id}` ORDER BY decision_point")
    want = sorted(batch, key=lambda r: r["decision_point"])

    def norm(row: dict[str, Any]) -> dict[str, Any]:  # microseconds: the table's resolution
        text = json.dumps(_plain(row), sort_keys=True)
        out: dict[str, Any] = json.loads(text.replace(".000000Z", "Z").replace("000Z", "Z"))
        return out

    assert [norm(g) for g in got] == [norm(w) for w in want]
    assert sink.stats.bytes_sent < sum(len(json.dumps(r)) for r in batch)
    sink.close()


def test_several_requests_in_flight_store_each_row_once(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    sink = sink_for(bq_emulator, max_request_bytes=25_000, max_in_flight=4)
    batch = rows[:120]
    assert sink.write(batch) == []
    assert sink.stats.requests >= 4
    assert count(bq_emulator, sink) == (120, 120)
    assert all(sink.is_stored(r["decision_id"]) for r in batch)
    # Sent again (a retried batch), nothing is stored twice; repeated ids in one write too.
    assert sink.write(batch[:60] + batch[:10]) == []
    assert count(bq_emulator, sink) == (120, 120) and sink.stats.skipped_written == 60
    sink.close()


# ---------------------------------------------------------------------------------------------
# Schema and view maintenance that fails: a warning naming the object, rows still written
# ---------------------------------------------------------------------------------------------


class _FaultyFront(http.server.BaseHTTPRequestHandler):
    """Forwards every request to the emulator, except those matching ``fail`` (method, path
    substring, body substring), answered with HTTP 500 in Google's JSON error shape
    ({"error": {"code", "message", "errors": [{"reason": "backendError"}]}}, BigQuery
    "Troubleshooting errors").
    The 500 on ``PATCH .../tables/decision_reads`` is what bqemulator answered in the field
    (issue 17)."""

    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"
    upstream: ClassVar[str] = ""
    fail: ClassVar[list[tuple[str, str, str]]] = []
    failed: ClassVar[list[str]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _relay(self) -> None:
        import http.client

        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        path = self.path
        text = (body or b"").decode("utf-8", "replace")
        if any(self.command == m and p in path and b in text for m, p, b in type(self).fail):
            type(self).failed.append(f"{self.command} {path.split('?')[0]}")
            data = json.dumps(
                {
                    "error": {
                        "code": 500,
                        "message": "An internal error occurred",
                        "errors": [{"reason": "backendError", "message": "internal"}],
                    }
                }
            ).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        host, _, port = type(self).upstream.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        finally:
            conn.close()

    def do_GET(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def do_PATCH(self) -> None:
        self._relay()

    def do_DELETE(self) -> None:
        self._relay()


@pytest.fixture
def faulty_front(
    bq_emulator: BigQueryEmulator,
) -> Iterator[tuple[str, type[_FaultyFront]]]:
    handler = type(
        "Front",
        (_FaultyFront,),
        {"upstream": f"127.0.0.1:{bq_emulator.port}", "fail": [], "failed": []},
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _sink_at(endpoint: str, project: str, dataset: str) -> BigQuerySink:
    return BigQuerySink(
        BigQuerySinkConfig(project=project, dataset=dataset, api_endpoint=endpoint, timeout_s=10.0)
    )


def test_a_view_that_cannot_be_created_is_a_warning_and_rows_are_written(
    bq_emulator: BigQueryEmulator,
    faulty_front: tuple[str, type[_FaultyFront]],
    rows: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint, front = faulty_front
    dataset = unique_dataset()
    # The table is created (POST .../tables), then the view (POST .../tables naming it): 500.
    front.fail = [("POST", "/tables", '"tableId": "decision_reads"')]
    caplog.set_level("WARNING", logger="analyzers.sinks.bigquery.schema")
    sink = _sink_at(endpoint, bq_emulator.project, dataset)
    sink.open()
    assert front.failed and front.failed[0].startswith("POST"), front.failed
    view = f"{bq_emulator.project}.{dataset}.decision_reads"
    assert any(
        view in r.getMessage() and "could not be created" in r.getMessage() for r in caplog.records
    )
    assert sink.write(rows[:30]) == []
    assert count(bq_emulator, sink) == (30, 30)
    sink.close()


def test_a_view_update_answered_500_is_a_warning_and_rows_are_written(
    fake_bigquery: tuple[str, type[_FakeBigQuery]],
    rows: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's case: the dataset has the view with an older query, and ``PATCH
    .../tables/decision_reads`` answers HTTP 500 (as bqemulator did): a warning, not an
    outage."""
    endpoint, handler = fake_bigquery
    handler.old_view = True
    caplog.set_level("WARNING", logger="analyzers.sinks.bigquery.schema")
    sink = BigQuerySink(
        BigQuerySinkConfig(project="p", dataset="d", api_endpoint=endpoint, timeout_s=5.0)
    )
    sink.open()
    assert handler.patched == ["/projects/p/datasets/d/tables/decision_reads"]
    assert any("p.d.decision_reads" in r.getMessage() for r in caplog.records)
    assert sink.write(rows[:5]) == []
    assert handler.inserted == [[r["decision_id"] for r in rows[:5]]]
    sink.close()


def test_a_reads_view_of_another_table_is_never_repointed(
    fake_bigquery: tuple[str, type[_FakeBigQuery]],
    rows: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding 4 of issue 17: ``decision_reads`` selects from ``decisions``; a deployment whose
    FMEL_TABLE is ``decision`` (reads view also named ``decision_reads``) leaves it alone and
    warns naming both, instead of re-pointing another deployment's view."""
    endpoint, handler = fake_bigquery
    caplog.set_level("WARNING", logger="analyzers.sinks.bigquery.schema")
    sink = BigQuerySink(
        BigQuerySinkConfig(
            project="p", dataset="d", table="decision", api_endpoint=endpoint, timeout_s=5.0
        )
    )
    sink.open()
    assert handler.patched == []
    assert any(
        "p.d.decision_reads" in r.getMessage()
        and "another table" in r.getMessage()
        and "not from p.d.decision;" in r.getMessage()
        for r in caplog.records
    ), [r.getMessage() for r in caplog.records]
    assert sink.write(rows[:3]) == []
    sink.close()


def test_each_table_of_a_dataset_has_its_own_reads_view(
    bq_emulator: BigQueryEmulator, rows: list[dict[str, Any]]
) -> None:
    """Finding 4 of issue 17: two FMEL_TABLEs in one dataset; ``decisions`` keeps
    ``decision_reads``, ``other`` gets ``other_reads``, each over its own rows."""
    dataset = unique_dataset()
    sinks = {}
    for table, part in (("decisions", rows[:20]), ("other", rows[20:50])):
        cfg = BigQuerySinkConfig(
            project=bq_emulator.project,
            dataset=dataset,
            table=table,
            api_endpoint=bq_emulator.endpoint,
            timeout_s=10.0,
        )
        sinks[table] = sink = BigQuerySink(cfg)
        sink.open()
        assert sink.write(part) == []
        sink.close()
    for view, part in (("decision_reads", rows[:20]), ("other_reads", rows[20:50])):
        got = bq_emulator.query(
            f"SELECT COUNT(*) AS n, COUNT(DISTINCT decision_id) AS d "
            f"FROM `{bq_emulator.project}.{dataset}.{view}`"
        )
        assert got[0]["n"] == sum(r["reads"] for r in part)
        assert got[0]["d"] == sum(1 for r in part if r["reads"])


def test_a_schema_update_that_fails_while_rows_fit_is_a_warning(
    bq_emulator: BigQueryEmulator,
    faulty_front: tuple[str, type[_FaultyFront]],
    rows: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A table whose ``schema_version`` is REQUIRED (ours is NULLABLE): the sink asks to relax
    it, and that PATCH answers 500. Every row fills the column and the table has every column:
    a warning naming the table and the column, and rows are written."""

    endpoint, front = faulty_front
    dataset = unique_dataset()
    old = tuple(
        dataclasses.replace(f, mode="REQUIRED") if f.name == "schema_version" else f
        for f in DECISION_SCHEMA
    )
    make_table(bq_emulator, dataset, bigquery_schema(old))
    front.fail = [("PATCH", "/tables/decisions", "")]
    caplog.set_level("WARNING", logger="analyzers.sinks.bigquery.schema")
    sink = _sink_at(endpoint, bq_emulator.project, dataset)
    sink.open()
    assert front.failed and front.failed[0].startswith("PATCH")
    table = f"{bq_emulator.project}.{dataset}.decisions"
    assert any(
        table in r.getMessage()
        and "schema update failed" in r.getMessage()
        and "still REQUIRED: schema_version" in r.getMessage()
        for r in caplog.records
    )
    assert sink.write(rows[:30]) == []
    assert count(bq_emulator, sink) == (30, 30)
    sink.close()


def test_a_table_that_lacks_columns_it_could_not_be_given_is_an_outage(
    bq_emulator: BigQueryEmulator,
    faulty_front: tuple[str, type[_FaultyFront]],
) -> None:
    """The DDL that adds the missing columns fails too: rows with those fields cannot be
    inserted, so it is an outage for now (retried, records spilled meanwhile), named."""

    endpoint, front = faulty_front
    dataset = unique_dataset()
    make_table(bq_emulator, dataset, bigquery_schema(_without(DECISION_SCHEMA, "notes")))
    front.fail = [
        ("POST", "/queries", ""),
        ("POST", "/jobs", ""),
        ("PATCH", "/tables/decisions", ""),
    ]
    sink = _sink_at(endpoint, bq_emulator.project, dataset)
    with pytest.raises(TransientError):
        sink.open()
    sink.close()
