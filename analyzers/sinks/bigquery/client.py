"""The BigQuery client of the sink, and one query without client-side retries.

The sink never lets the client retry (the defaults retry an HTTP 500, a request and a query job
for up to 10 minutes): the :class:`~analyzers.sinks.writer.DecisionWriter` owns retries, with
backoff, then spill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.bigquery.errors import describe
from core.errors import SinkError


def make_client(cfg: BigQuerySinkConfig) -> Any:
    """A ``google.cloud.bigquery.Client`` for ``cfg``: anonymous credentials on the emulator
    (``cfg.api_endpoint``), Application Default Credentials otherwise.

    Raises:
        SinkError: no usable credentials.
    """
    from google.cloud import bigquery

    if cfg.api_endpoint:
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials

        return bigquery.Client(
            project=cfg.project,
            location=cfg.location,
            credentials=AnonymousCredentials(),
            client_options=ClientOptions(api_endpoint=cfg.api_endpoint),
        )
    try:
        return bigquery.Client(project=cfg.project, location=cfg.location)
    except Exception as e:  # DefaultCredentialsError and friends
        raise SinkError(
            f"BigQuery: no usable credentials ({describe(e)}); set up "
            "Application Default Credentials or BIGQUERY_EMULATOR_HOST"
        ) from e


def run_query(client: Any, sql: str, timeout_s: float, params: Sequence[Any] = ()) -> list[Any]:
    """One query, no client-side retries (neither of the request nor of the job) and the
    request timeout (seconds) on each call; returns the result rows."""
    return list(query_result(client, sql, timeout_s, params))


def query_result(client: Any, sql: str, timeout_s: float, params: Sequence[Any] = ()) -> Any:
    """As :func:`run_query`, but returns the client's ``RowIterator`` (rows and ``schema``:
    the result's columns, also when it has no rows)."""
    from google.cloud import bigquery

    job = client.query(
        sql,
        job_config=bigquery.QueryJobConfig(query_parameters=list(params)),
        retry=None,
        timeout=timeout_s,
        job_retry=None,
    )
    return job.result(timeout=timeout_s, retry=None, job_retry=None)
