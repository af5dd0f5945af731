"""BigQuery decision sink: where a record leaves for BigQuery, one row per decision, streamed
with ``insert_rows_json``.

:class:`BigQuerySink` implements :class:`~analyzers.sinks.base.DecisionSink`; the
:class:`~analyzers.sinks.writer.DecisionWriter` owns it and calls every method from its writer
thread (batching, retry with backoff, spill and replay live there).

* ``open()`` creates or checks the dataset, table and view (:func:`.schema.ensure_table`).
* ``write()`` validates every row against the table's schema first
  (:func:`.rows.validate_row`, so the reason names the field path, e.g. ``actions[0].size``),
  splits what is left into requests under the byte and row limits of the streaming API, sends
  each with ``row_ids`` = ``decision_id``, ``skip_invalid_rows`` (valid rows are written even
  when one is not), no client-side retry and an explicit timeout (the writer retries; the
  client's default retries an HTTP 500 for minutes), and maps per-row ``insertErrors`` to
  :class:`~analyzers.sinks.base.RowError`. A request answered with a server error while the
  server answers other calls (the emulator's HTTP 500 on some bad values) is split in halves
  until the offending row is alone and rejected; the others are written.
* Never a duplicate: rows confirmed written are remembered (bounded) and skipped when a batch
  is sent again; rows whose request had an unknown outcome (timeout, dropped connection) and
  rows replayed from a spill file are looked up by ``decision_id`` before they are sent again.
  BigQuery's own best-effort ``insertId`` de-duplication stays on as a second line.
* Optionally every written row is also published to a Pub/Sub topic (:mod:`.topic`).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from analyzers.schema import DECISION_SCHEMA, FieldSpec
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.bigquery.client import make_client, run_query
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.bigquery.errors import (
    POISON_PREFIX,
    RETRY_REASONS,
    PoisonRowError,
    describe,
    is_transient,
    is_transport,
)
from analyzers.sinks.bigquery.rows import (
    MAX_REQUEST_BYTES,
    MAX_ROWS_PER_REQUEST,
    Pending,
    chunks,
    row_size,
    validate_row,
)
from analyzers.sinks.bigquery.schema import ensure_table
from analyzers.sinks.bigquery.topic import DecisionTopic
from core.errors import SinkError, TransientError

logger = logging.getLogger(__name__)

# How many confirmed decision ids are remembered to skip re-sends (about 100 bytes each).
CONFIRMED_IDS_KEPT = 200_000


@dataclass(slots=True)
class BigQuerySinkStats:
    """Counters of one sink (written on the writer thread; read anywhere).

    Attributes:
        requests: insertAll requests sent.
        rows_sent: rows in those requests.
        bytes_sent: their JSON size, bytes.
        skipped_written: rows not sent because they were already stored (re-sends, replays).
        lookups: existence look-ups made before re-sending uncertain rows.
        published / publish_errors: decisions topic messages sent / failed.
    """

    requests: int = 0
    rows_sent: int = 0
    bytes_sent: int = 0
    skipped_written: int = 0
    lookups: int = 0
    published: int = 0
    publish_errors: int = 0


class BigQuerySink:
    """Decision rows streamed into a BigQuery table.

    Thread context: constructed on any thread; ``open``/``write``/``close``/``before_replay``
    are called from the :class:`~analyzers.sinks.writer.DecisionWriter` thread only.

    Args:
        config: project, dataset, table, location, endpoint, request timeout (seconds),
            optional decisions topic.
        client: a ``google.cloud.bigquery.Client`` to use (default: built in :meth:`open`, with
            Application Default Credentials, or anonymous ones when ``config.api_endpoint`` is
            set for the emulator).
        publisher: a ``pubsub_v1.PublisherClient`` for the decisions topic (default: built in
            :meth:`open` when ``config.decisions_topic`` is set; it honours
            ``PUBSUB_EMULATOR_HOST``).
        max_request_bytes: upper bound of one insertAll request body, bytes.
        max_rows_per_request: upper bound of rows in one request.
    """

    name = "bigquery"

    def __init__(
        self,
        config: BigQuerySinkConfig,
        *,
        client: Any = None,
        publisher: Any = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_rows_per_request: int = MAX_ROWS_PER_REQUEST,
    ) -> None:
        if max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {max_request_bytes}")
        if max_rows_per_request < 1:
            raise ValueError(f"max_rows_per_request must be >= 1, got {max_rows_per_request}")
        self.config = config
        self.max_request_bytes = max_request_bytes
        self.max_rows_per_request = max_rows_per_request
        self.stats = BigQuerySinkStats()
        self.table_id = config.table_id
        self.topic: DecisionTopic | None = None
        self._client = client
        self._own_client = client is None
        self._publisher = publisher
        self._schema: tuple[FieldSpec, ...] = DECISION_SCHEMA
        self._opened = False
        self._confirmed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._uncertain: set[str] = set()
        self._lock = threading.Lock()  # publish results may be counted while close() runs

    # -- protocol ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the dataset, table and view when missing; check and extend the schema.

        Raises:
            TransientError: BigQuery unreachable or overloaded now.
            SinkError: bad credentials or permissions, or an incompatible table (the message
                lists every offending column).
        """
        try:
            if self._client is None:
                self._client = make_client(self.config)
            self._schema = ensure_table(self._client, self.config)
            if self.config.decisions_topic and self.topic is None:
                topic = DecisionTopic(
                    self.config.decisions_topic,
                    self.config.project,
                    publisher=self._publisher,
                    count=self._count_publish,
                )
                topic.open()
                self.topic = topic
        except (TransientError, SinkError):
            raise
        except Exception as e:
            if is_transient(e):
                raise TransientError(f"BigQuery {self.table_id}: {describe(e)}") from e
            raise SinkError(f"BigQuery {self.table_id}: {describe(e)}") from e
        self._opened = True

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        """Stream rows; return those refused for good.

        Rows already stored (remembered from this process, or found by a look-up for rows
        whose earlier outcome is unknown) are skipped, never sent twice.

        Raises:
            TransientError: some rows were not written; those that were are remembered, so the
                retry of the whole batch sends only the rest.
            SinkError: the table vanished and cannot be recreated, or permission was withdrawn.
        """
        if not self._opened:
            self.open()
        errors: list[RowError] = []
        pending: list[Pending] = []
        for i, row in enumerate(rows):
            did = row.get("decision_id")
            if isinstance(did, str) and did in self._confirmed:
                self.stats.skipped_written += 1
                continue
            problems = validate_row(row, self._schema)
            if problems:
                errors.append(RowError(i, "; ".join(problems)))
                continue
            size = row_size(row)
            if size > self.max_request_bytes:
                errors.append(
                    RowError(
                        i,
                        f"row is {size} bytes, over the {self.max_request_bytes}"
                        "-byte request limit",
                    )
                )
                continue
            pending.append((i, row, size))
        pending = self._drop_stored(pending)
        for chunk in chunks(pending, self.max_request_bytes, self.max_rows_per_request):
            chunk_errors = self._send(chunk)
            if (
                len(chunk) > 1
                and len(chunk_errors) == len(chunk)
                and all(e.reason.startswith(POISON_PREFIX) for e in chunk_errors)
            ):
                # Every row "poison" is not N bad rows but a server not ready (seen on the
                # emulator right after it starts): retry the batch (rows already written are
                # remembered and skipped), then spill, rather than reject good records.
                raise TransientError(
                    f"BigQuery answered a server error for each of the {len(chunk)} rows of a "
                    "batch; retrying it as an outage"
                )
            errors += chunk_errors
        return sorted(errors)

    def before_replay(self, rows: Sequence[Row]) -> None:
        """Rows about to be replayed from a spill file may already be stored (a batch half
        written before a crash): look them up before sending. Writer thread."""
        for row in rows:
            did = row.get("decision_id")
            if isinstance(did, str) and did not in self._confirmed:
                self._uncertain.add(did)

    def close(self) -> None:
        """Flush the decisions topic (bounded by the request timeout) and close clients.
        Idempotent."""
        self._publisher = None
        if self.topic is not None:
            self.topic.close(wait_s=self.config.timeout_s)
        client, self._client = self._client, None
        if client is not None and self._own_client:
            try:
                client.close()
            except Exception:
                logger.exception("BigQuery client close failed")
        self._opened = False

    def describe(self) -> str:
        where = f"bigquery:{self.table_id}"
        if self.config.api_endpoint:
            where += f" (emulator {self.config.api_endpoint})"
        return where

    def example_query(self) -> str:
        t = f"`{self.table_id}`"
        return (
            f"bq query --use_legacy_sql=false 'SELECT decision_point, bar_time, action, "
            f'reads, portfolio_value FROM {t} WHERE action <> "HOLD" ORDER BY bar_time '
            "LIMIT 20'"
        )

    # -- write ------------------------------------------------------------------------------

    def _drop_stored(self, pending: list[Pending]) -> list[Pending]:
        """Look up rows of unknown outcome; drop (and remember) those already stored."""
        unsure = [
            str(r["decision_id"]) for _, r, _ in pending if r["decision_id"] in self._uncertain
        ]
        if not unsure:
            return pending
        from google.cloud import bigquery

        stored: set[str] = set()
        for start in range(0, len(unsure), 10_000):
            ids = unsure[start : start + 10_000]
            sql = f"SELECT decision_id FROM `{self.table_id}` WHERE decision_id IN UNNEST(@ids)"
            try:
                result = run_query(
                    self._client,
                    sql,
                    self.config.timeout_s,
                    [bigquery.ArrayQueryParameter("ids", "STRING", ids)],
                )
                stored.update(str(r[0]) for r in result)
            except Exception as e:
                if is_transient(e):
                    raise TransientError(
                        f"BigQuery look-up of {len(ids)} rows: {describe(e)}"
                    ) from e
                raise SinkError(f"BigQuery look-up in {self.table_id}: {describe(e)}") from e
        self.stats.lookups += 1
        self._uncertain.difference_update(unsure)
        if stored:
            logger.info(
                "%d of %d decision records were already in %s; not sent again",
                len(stored),
                len(unsure),
                self.table_id,
            )
            self.stats.skipped_written += len(stored)
            for did in stored:
                self._remember(did)
        return [p for p in pending if p[1]["decision_id"] not in stored]

    def _remember(self, decision_id: str) -> None:
        self._confirmed[decision_id] = None
        self._uncertain.discard(decision_id)
        if len(self._confirmed) > CONFIRMED_IDS_KEPT:
            self._confirmed.popitem(last=False)

    def _send(self, chunk: list[Pending]) -> list[RowError]:
        """One request; on a server error for several rows, split and send the halves (so a
        poison row the emulator answers with HTTP 500 does not hold back its batch)."""
        tries = 1 if len(chunk) > 1 else 2  # a lone row gets a second chance before rejection
        for attempt in range(tries):
            try:
                return self._insert(chunk)
            except PoisonRowError as e:
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    return self._send(chunk[:mid]) + self._send(chunk[mid:])
                if attempt + 1 == tries:
                    return [RowError(chunk[0][0], str(e))]
        raise AssertionError("unreachable")

    def _insert(self, chunk: list[Pending]) -> list[RowError]:
        from google.api_core import exceptions as gexc

        rows = [r for _, r, _ in chunk]
        ids = [str(r["decision_id"]) for r in rows]
        self.stats.requests += 1
        self.stats.rows_sent += len(rows)
        self.stats.bytes_sent += sum(s for _, _, s in chunk)
        try:
            # retry=None: the writer owns retries (with backoff, then spill); the client's
            # default would retry a 500 for up to 10 minutes.
            result = self._client.insert_rows_json(
                self.table_id,
                rows,
                row_ids=ids,
                skip_invalid_rows=True,
                retry=None,
                timeout=self.config.timeout_s,
            )
        except gexc.NotFound as e:
            self._opened = False  # table or dataset deleted under us: recreate on next write
            raise TransientError(
                f"BigQuery {self.table_id} not found; recreating: {describe(e)}"
            ) from e
        except Exception as e:
            if is_transport(e):
                # The request may have reached the server: look these rows up before resending.
                self._uncertain.update(ids)
                raise TransientError(f"BigQuery insert of {len(rows)} rows: {describe(e)}") from e
            if is_transient(e):
                if self._server_is_up():
                    raise PoisonRowError(
                        f"{POISON_PREFIX} while the server answers other calls: {describe(e)}"
                    ) from e
                raise TransientError(f"BigQuery insert of {len(rows)} rows: {describe(e)}") from e
            if isinstance(e, gexc.Unauthorized | gexc.Forbidden):
                raise SinkError(f"BigQuery refused writes to {self.table_id}: {describe(e)}") from e
            if len(rows) > 1:
                raise PoisonRowError(describe(e)) from e
            return [RowError(chunk[0][0], f"request refused: {describe(e)}")]
        return self._account(chunk, result)

    def _server_is_up(self) -> bool:
        """Whether BigQuery answers a metadata call now (tells a poison row from an outage).
        Two tries: a server that failed a request may have closed the pooled connection."""
        for _ in range(2):
            try:
                self._client.get_table(self.table_id, retry=None, timeout=self.config.timeout_s)
                return True
            except Exception as e:  # noqa: BLE001 - any failure means "not answering"
                if not is_transport(e):
                    return False
        return False

    def _account(self, chunk: list[Pending], result: Sequence[Mapping[str, Any]]) -> list[RowError]:
        """Map insertErrors to RowErrors; remember the rows written; publish them."""
        failed: dict[int, list[Mapping[str, Any]]] = {}
        for entry in result or ():
            failed.setdefault(int(entry.get("index", -1)), []).extend(entry.get("errors") or ())
        errors: list[RowError] = []
        retry: list[int] = []
        written: list[Row] = []
        for pos, (i, row, _) in enumerate(chunk):
            errs = failed.get(pos)
            if errs is None:
                self._remember(str(row["decision_id"]))
                written.append(row)
                continue
            reasons = {str(e.get("reason")) for e in errs}
            if reasons <= RETRY_REASONS:
                retry.append(i)
                continue
            detail = "; ".join(
                f"{e.get('location') or '?'}: {e.get('reason')}: {e.get('message')}"
                for e in errs
                if e.get("reason") not in RETRY_REASONS
            )
            errors.append(RowError(i, detail))
        if self.topic is not None:
            self.topic.publish(written)
        if retry:
            raise TransientError(
                f"BigQuery did not take {len(retry)} rows this time (stopped/"
                "backend error); retrying them"
            )
        return errors

    def _count_publish(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.stats.published += 1
            else:
                self.stats.publish_errors += 1
