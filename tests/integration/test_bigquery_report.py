"""The run's HTML report read from BigQuery (bqemulator): an agent that never traded, and a
report bounded by a stopping run's shutdown budget (issue 17, finding 10)."""

from __future__ import annotations

import socket
import time

import pytest

from analyzers.schema import to_row
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.bigquery.sink import BigQuerySink
from runtime.reporting.html import render_run
from runtime.reporting.store import BigQueryStore, load_run
from tests.bqemu_harness import BigQueryEmulator, unique_dataset
from tests.unit.test_writer import RUN, record

pytestmark = pytest.mark.slow


def test_a_session_without_orders_renders_from_bigquery(bq_emulator: BigQueryEmulator) -> None:
    """No order events: the query answers no rows, yet its columns are known (the page used
    to fail with KeyError 'side')."""
    dataset = unique_dataset()
    cfg = BigQuerySinkConfig(
        project=bq_emulator.project, dataset=dataset, api_endpoint=bq_emulator.endpoint
    )
    sink = BigQuerySink(cfg)
    sink.open()
    rows = [to_row(record(i)) for i in range(5)]  # HOLD decisions, no actions
    assert sink.write(rows) == []
    sink.close()
    client = bq_emulator.client()
    try:
        data = load_run(BigQueryStore(client, bq_emulator.project, dataset), RUN.session_id)
        assert len(data.actions) == 0 and "side" in data.actions.columns
        page = render_run(data)
    finally:
        client.close()
    assert RUN.session_id in page


def test_report_requests_end_with_the_shutdown_budget() -> None:
    """A server that takes the connection and never answers (a network black hole): with a
    deadline 1 s away the report gives up at the deadline, not after the 30 s request
    timeout; past the deadline nothing is sent."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # the kernel completes the handshake; nobody reads or answers
        client = bigquery.Client(
            project="p",
            credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
            client_options=ClientOptions(api_endpoint=f"http://127.0.0.1:{hole.getsockname()[1]}"),
        )
        try:
            t0 = time.monotonic()
            store = BigQueryStore(client, "p", "d", timeout_s=30.0, deadline=t0 + 1.0)
            with pytest.raises(Exception):  # noqa: B017 - a read timeout, whichever class
                load_run(store, "s")
            took = time.monotonic() - t0
            assert took < 10.0, took  # the deadline, not 30 s per request
            with pytest.raises(TimeoutError):
                store.frame("SELECT 1", {})  # the budget is spent: not sent
        finally:
            client.close()
