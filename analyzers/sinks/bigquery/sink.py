"""BigQuery decision sink: where a record leaves for BigQuery, one row per decision, streamed
with tabledata.insertAll (the requests ``insert_rows_json`` makes, each body encoded once).

:class:`BigQuerySink` implements :class:`~analyzers.sinks.base.DecisionSink`; the
:class:`~analyzers.sinks.writer.DecisionWriter` owns it and calls every method from its writer
thread (batching, retry with backoff, spill and drain live there).

* ``open()`` creates or checks the dataset, table and views (:func:`.schema.ensure_storage`);
  a view or schema update that fails while rows can still be inserted is a warning naming the
  object, not an outage. A new deployment stores compact rows (the reads grouped per bar, ~40 %
  fewer bytes for read-heavy records: :mod:`.compact`) in ``<table>_compact`` under a view
  ``<table>`` of the row-per-read shape; a table made before that keeps its layout.
* ``write()`` validates every row against the table's schema first
  (:func:`.rows.validate_row`, so the reason names the field path, e.g. ``actions[0].size``),
  leaves out null fields (:func:`.rows.compact_row`), encodes each row once
  (:func:`.rows.encode_entry`), splits them into requests sized by those bytes under the
  streaming API's limit, and sends up to ``max_in_flight`` of them at once, each body as
  encoded (:meth:`BigQuerySink._insert_all`).
  Each request carries ``row_ids`` = ``decision_id``, no client-side retry and an explicit
  timeout (the writer retries; the client's default retries an HTTP 500 for minutes). Per-row
  ``insertErrors`` become :class:`~analyzers.sinks.base.RowError`; rows BigQuery ``stopped``
  because another row of their request was invalid are sent again at once without it. A request
  answered with a server error while the server answers other calls (the emulator's HTTP 500 on
  a bad value) is split in halves until the offending row is alone and rejected.
* ``write_records()`` is the writer's path for fresh records: the reads of a record are built by
  the tracker with known types, so only the other fields are checked.
* Never a duplicate, by insert id: rows confirmed written are remembered (bounded) and skipped
  when sent again (``is_stored`` tells the writer which rows of a failed write were stored, so
  they are not spilled); rows whose request had an unknown outcome (timeout, dropped
  connection) and rows of an earlier run's spill (``before_replay``) are looked up by
  ``decision_id`` before they are sent. BigQuery's own best-effort ``insertId``
  de-duplication stays on as a second line; the emulator has none, so the tests check ours.
* Optionally every written row is also published to a Pub/Sub topic (:mod:`.topic`).

Thread context: the writer thread calls every method; the requests of one ``write`` run on up
to ``max_in_flight`` threads of a pool the sink owns (``close`` joins it). One client is shared
by those threads: the BigQuery client is safe to share across threads (python-bigquery's docs,
"thread safety" note added in googleapis/python-bigquery PR #132).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from analyzers.schema import DECISION_SCHEMA, DecisionRecord, FieldSpec, to_row
from analyzers.sinks.base import Row, RowError
from analyzers.sinks.bigquery.client import make_client, run_query
from analyzers.sinks.bigquery.compact import pack_reads, pack_row
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.bigquery.errors import (
    POISON_PREFIX,
    RETRY_REASONS,
    PoisonRowError,
    UnreadableAnswerError,
    describe,
    is_transient,
    is_transport,
    reasons,
)
from analyzers.sinks.bigquery.rows import (
    MAX_REQUEST_BYTES,
    MAX_ROWS_PER_REQUEST,
    REQUEST_ENVELOPE_BYTES,
    Pending,
    chunks,
    compact_row,
    encode_entry,
    entry_size,
    request_body,
    split_bytes,
    timestamp_from_text,
    validate_row,
)
from analyzers.sinks.bigquery.schema import ensure_storage
from analyzers.sinks.bigquery.topic import DecisionTopic
from core.errors import SinkError, TransientError

logger = logging.getLogger(__name__)

# How many confirmed decision ids are remembered to skip re-sends (about 100 bytes each).
CONFIRMED_IDS_KEPT = 200_000
# Requests of one write sent at once. BigQuery takes concurrent streaming inserts into a table
# (its limits are per project: bytes per second and rows per request, "Quotas and limits").
DEFAULT_IN_FLIGHT = 4
# Records the writer hands over in one write when it catches up or drains a spill: enough for
# several requests in flight of read-heavy rows (~24 kB each, 9 MB per request).
DEFAULT_MAX_BATCH = 2_000
# Ids per existence look-up query (one array parameter).
LOOKUP_IDS = 10_000
# Writes in which a row must fail alone with an HTTP 500 (no retry reason), none of its request
# stored, over at least POISON_SPAN_S seconds, before it is refused as one the server cannot
# read (_judge_poison); rows counted.
POISON_STRIKES = 3
POISON_SPAN_S = 30.0
POISON_IDS_KEPT = 10_000


@dataclass(slots=True)
class BigQuerySinkStats:
    """Counters of one sink (written under the sink's lock; read anywhere).

    Attributes:
        requests: insertAll requests sent.
        rows_sent: rows in those requests.
        bytes_sent: their JSON size, bytes.
        skipped_written: rows not sent because they were already stored (re-sends, replays).
        lookups: existence look-up queries made before re-sending uncertain rows.
        published / publish_errors: decisions topic messages sent / failed.
    """

    requests: int = 0
    rows_sent: int = 0
    bytes_sent: int = 0
    skipped_written: int = 0
    lookups: int = 0
    published: int = 0
    publish_errors: int = 0


@dataclass(slots=True)
class _Outcome:
    """What the requests of one chunk gave: rows refused, rows stored, and the failure that
    left some rows neither (None when every row was settled)."""

    errors: list[RowError] = field(default_factory=list)
    written: list[tuple[int, Row]] = field(default_factory=list)
    failure: Exception | None = None


# Rows built by ``to_row`` from a record: the reads (``data_accessed``) come from the tracker
# with known types, so only their shape is checked (a type this validator does not know is left
# to BigQuery, see rows._type_problem).
_TRUSTED = "TRUSTED"


def _light(schema: Sequence[FieldSpec]) -> tuple[FieldSpec, ...]:
    return tuple(
        replace(f, type=_TRUSTED, fields=()) if f.name == "data_accessed" else f for f in schema
    )


class BigQuerySink:
    """Decision rows streamed into a BigQuery table.

    Thread context: constructed on any thread; every method is called from the
    :class:`~analyzers.sinks.writer.DecisionWriter` thread; requests run on the sink's pool.

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
        max_in_flight: requests of one write sent at once.
        max_batch: records the writer hands over in one write (read by the writer).
        poison_span_s: seconds over which a row must fail alone with an HTTP 500, in
            :data:`POISON_STRIKES` writes, before it is refused (:meth:`_judge_poison`).

    Raises:
        ValueError: a bound below its minimum.
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
        max_in_flight: int = DEFAULT_IN_FLIGHT,
        max_batch: int = DEFAULT_MAX_BATCH,
        poison_span_s: float = POISON_SPAN_S,
    ) -> None:
        if max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {max_request_bytes}")
        if max_rows_per_request < 1:
            raise ValueError(f"max_rows_per_request must be >= 1, got {max_rows_per_request}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.config = config
        self.max_request_bytes = max_request_bytes
        self.max_rows_per_request = max_rows_per_request
        self.max_in_flight = max_in_flight
        self.max_batch = max_batch
        self.poison_span_s = poison_span_s
        self.stats = BigQuerySinkStats()
        self.table_id = config.table_id
        # Where rows go (``<table>_compact`` for compact rows; known after open()).
        self.insert_id = config.table_id
        self.compact = False
        self.topic: DecisionTopic | None = None
        self._client = client
        self._own_client = client is None
        self._publisher = publisher
        self._schema: tuple[FieldSpec, ...] = DECISION_SCHEMA
        self._light_schema = _light(DECISION_SCHEMA)
        self._opened = False
        self._confirmed: collections.OrderedDict[str, None] = collections.OrderedDict()
        # decision id -> (writes in which the row failed alone with a server error, monotonic
        # time of the first): _judge_poison
        self._strikes: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()
        self._uncertain: set[str] = set()
        self._replaying: set[str] = set()  # of _uncertain: rows of earlier runs' spills
        self._lock = threading.Lock()  # ids and counters, updated from request threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # -- protocol ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the dataset, table and view when missing; check and extend the schema.

        Raises:
            TransientError: BigQuery unreachable or overloaded now, or the table lacks columns
                our rows need and could not be extended now.
            SinkError: bad credentials or permissions, or an incompatible table (the message
                lists every offending column).
        """
        try:
            if self._client is None:
                self._client = make_client(self.config)
            storage = ensure_storage(self._client, self.config)
            self._schema = storage.schema
            self._light_schema = _light(self._schema)
            self.insert_id, self.compact = storage.insert_id, storage.compact
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

    def probe(self) -> None:
        """One cheap call (the table's metadata) to learn whether BigQuery answers, before the
        writer sends a large batch after an outage.

        Raises:
            TransientError: BigQuery does not answer (or answers a server error).
            SinkError: permission was withdrawn.
        """
        if self._client is None or not self._opened:
            self.open()
            return
        from google.api_core import exceptions as gexc

        try:
            self._client.get_table(self.insert_id, retry=None, timeout=self.config.timeout_s)
        except gexc.NotFound:
            self._opened = False  # deleted under us: the next write recreates it
        except Exception as e:
            if is_transient(e):
                raise TransientError(f"BigQuery {self.table_id}: {describe(e)}") from e
            raise SinkError(f"BigQuery {self.table_id}: {describe(e)}") from e

    def write(self, rows: Sequence[Row]) -> list[RowError]:
        """Stream rows; return those refused for good (positions in ``rows``).

        Rows already stored (remembered from this process, found by a look-up for rows whose
        earlier outcome is unknown, or repeated within ``rows``) are skipped, never sent twice.

        Raises:
            TransientError: some rows were not written; those that were are remembered
                (:meth:`is_stored`), so the retry of the whole batch sends only the rest.
            SinkError: the table vanished and cannot be recreated, or permission was withdrawn.
        """
        return self._write(rows, light=False)

    def write_records(self, records: Sequence[DecisionRecord]) -> list[RowError]:
        """:meth:`write` for fresh records of the analyzer: each record's reads are not
        checked field by field (the tracker builds them with known types); the other fields
        (agent notes, orders, positions) are."""
        if not self._opened:
            self.open()
        if self.compact and self.topic is None:
            # The reads packed straight from the record (no dict per read on the way).
            rows = []
            for rec in records:
                # Read through the attributes: a record may resolve its reads late
                # (analyzers/deferred.py), so its tuple slots are not the values.
                row = to_row(
                    DecisionRecord._make(
                        () if name == "data_accessed" else getattr(rec, name)
                        for name in DecisionRecord._fields
                    )
                )
                row["data_accessed"] = pack_reads(rec.data_accessed)
                rows.append(row)
            return self._write(rows, light=True, packed=True)
        return self._write([to_row(r) for r in records], light=True)

    def is_stored(self, decision_id: object) -> bool:
        """Whether this sink confirmed ``decision_id`` stored (recently: the memory is
        bounded). Writer thread."""
        with self._lock:
            return isinstance(decision_id, str) and decision_id in self._confirmed

    def unsure_ids(self) -> set[str]:
        """Decision ids of this run whose request got no answer (a timeout, a dropped
        connection, a server error after the rows may have been taken) and that were not looked
        up since: they may be stored. Rows of earlier runs (``before_replay``) are not
        included. Any thread."""
        with self._lock:
            return self._uncertain - self._replaying

    def before_replay(self, rows: Sequence[Row]) -> None:
        """Rows about to be replayed from an earlier run's spill file may already be stored (a
        batch written before a crash): look them up before sending. Writer thread."""
        with self._lock:
            for row in rows:
                did = row.get("decision_id")
                if isinstance(did, str) and did not in self._confirmed:
                    self._uncertain.add(did)
                    self._replaying.add(did)

    def close(self) -> None:
        """Join the request threads, flush the decisions topic (bounded by the request
        timeout) and close clients. Idempotent."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
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

    @property
    def destination(self) -> str:
        """Where rows go (the table), for a spill file to remember (DecisionWriter)."""
        return f"bigquery:{self.table_id}"

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

    def _write(self, rows: Sequence[Row], *, light: bool, packed: bool = False) -> list[RowError]:
        if not self._opened:
            self.open()
        if packed and not self.compact:
            # Reopened onto a row-per-read table since the rows were packed: build them again.
            raise TransientError(f"BigQuery {self.table_id}: table layout changed; retrying")
        schema = self._light_schema if light else self._schema
        errors: list[RowError] = []
        pending: list[Pending] = []
        first: dict[str, int] = {}  # decision id -> position of its first row in this write
        shown: dict[int, Row] = {}  # position -> the row in the to_row shape (for the topic)
        repeats: dict[int, int] = {}  # position of a repeated id -> position of the first
        for i, row in enumerate(rows):
            did = row.get("decision_id")
            if did is not None and (not isinstance(did, str) or not did):
                # the insert id and the key of every look-up: text only (helper-113 F4: a
                # number passed as STRING, and a row of unknown outcome was never looked up),
                # and not empty (helper-114: insertId "" turns BigQuery's de-duplication off,
                # and two such rows of a write were taken for one repeated)
                errors.append(
                    RowError(i, f"decision_id: expected non-empty text, got {_excerpt(did)}")
                )
                continue
            if isinstance(did, str):
                if did in first:
                    repeats[i] = first[did]
                    continue
                first[did] = i
                if self.is_stored(did):
                    with self._lock:
                        self.stats.skipped_written += 1
                    continue
            problems = validate_row(row, schema)
            if problems:
                errors.append(RowError(i, "; ".join(problems)))
                continue
            compact = compact_row(row)
            if self.compact and not packed:
                shown[i] = compact
                compact = pack_row(compact)
            try:
                entry = encode_entry(compact)
            except (ValueError, TypeError, RecursionError) as e:
                errors.append(RowError(i, f"row has no JSON form: {type(e).__name__}: {e}"))
                continue
            size = entry_size(entry)
            if size + REQUEST_ENVELOPE_BYTES > self.max_request_bytes:
                errors.append(
                    RowError(
                        i,
                        f"row is {size} bytes, over the {self.max_request_bytes}"
                        "-byte request limit",
                    )
                )
                continue
            pending.append((i, compact, size, entry))
        pending = self._drop_stored(pending)
        per_request = split_bytes(
            sum(p[2] for p in pending),
            self.max_in_flight,
            self.max_request_bytes - REQUEST_ENVELOPE_BYTES,
            largest=max((p[2] for p in pending), default=0),
        )
        requests = list(chunks(pending, per_request, self.max_rows_per_request))
        outcomes = self._run(requests)
        written = [shown.get(i, row) for o in outcomes for i, row in o.written]
        if self.topic is not None and written:
            self.topic.publish(written)  # on the writer thread: the topic is not thread-safe
        failures = [o.failure for o in outcomes if o.failure is not None]
        if failures:
            fatal = next((f for f in failures if isinstance(f, SinkError)), None)
            if fatal is not None:
                raise fatal
            done = sum(1 for o in outcomes if o.failure is None)
            raise TransientError(
                f"{len(failures)} of {len(outcomes)} BigQuery requests failed ({done} stored): "
                f"{failures[0]}"
            ) from failures[0]
        for o in outcomes:
            errors += o.errors
        refused = {e.index: e.reason for e in errors}
        errors += [RowError(i, refused[j]) for i, j in repeats.items() if j in refused]
        return sorted(errors)

    def _run(self, requests: list[list[Pending]]) -> list[_Outcome]:
        """Send the requests, up to ``max_in_flight`` at once; one outcome each, in order."""
        if len(requests) <= 1 or self.max_in_flight == 1:
            return [self._request(r) for r in requests]
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.max_in_flight, thread_name_prefix="fmel-bigquery"
            )
        return list(self._pool.map(self._request, requests))

    def _request(self, chunk: list[Pending]) -> _Outcome:
        """One chunk (split further on poison rows); failures are returned, not raised, so the
        other requests of the write finish and are accounted."""
        out = _Outcome()
        try:
            self._send(chunk, out)
            self._judge_poison(chunk, out)
        except (TransientError, SinkError) as e:
            out.failure = e
        return out

    def _judge_poison(self, chunk: list[Pending], out: _Outcome) -> None:
        """Keep a "poison" refusal (a row answered HTTP 500 alone, twice) only with evidence
        that the row, not the server, is at fault: other rows of its request were stored, or
        it failed alone in :data:`POISON_STRIKES` writes over at least ``poison_span_s``
        seconds (the writer's backoff, then its probes, space them). Otherwise the request
        fails for now, to be retried.

        bqemulator answers a value it cannot read with HTTP 500 ``internalError``, as BigQuery
        answers its own internal errors, which it says to retry: a row refused on its first
        write could be a good one (helper-113), and a row never refused blocks the spill
        behind it for good (helper-114: a row too large to share a request, and a spill's last
        row, were retried forever). Every row of several failing is an outage (the emulator
        right after it starts), never a strike.

        Raises:
            TransientError: the request's poison rows are not judged yet.
        """
        poison = [e for e in out.errors if e.reason.startswith(POISON_PREFIX)]
        if not poison or out.written:
            return
        if len(chunk) > 1 and len(out.errors) == len(chunk) and len(poison) == len(chunk):
            out.errors = []
            raise TransientError(
                f"BigQuery answered a server error for each of the {len(chunk)} rows of a "
                "request; retrying it as an outage"
            )
        ids = {p[0]: str(p[1]["decision_id"]) for p in chunk}
        now = time.monotonic()
        with self._lock:
            strikes = []
            for e in poison:
                n, first = self._strikes.get(ids[e.index], (0, now))
                self._strikes[ids[e.index]] = (n + 1, first)
                self._strikes.move_to_end(ids[e.index])
                strikes.append((n + 1, now - first))
            while len(self._strikes) > POISON_IDS_KEPT:
                self._strikes.popitem(last=False)
        if all(n >= POISON_STRIKES and span >= self.poison_span_s for n, span in strikes):
            return
        out.errors = []
        raise TransientError(
            f"BigQuery answered a server error for {len(poison)} rows alone, none of their "
            f"request stored (strike {min(n for n, _ in strikes)} of {POISON_STRIKES}, refused "
            f"after {self.poison_span_s:g} s); retrying"
        )

    def _drop_stored(self, pending: list[Pending]) -> list[Pending]:
        """Look up rows of unknown outcome; drop (and remember) those already stored.

        The query is limited to the rows' sessions and bar times, so BigQuery prunes the
        table's partitions (by day on ``bar_time``) and clusters (``session_id``) and scans
        little.

        Raises:
            TransientError: the look-up failed for now.
            SinkError: the look-up was refused.
        """
        with self._lock:
            unsure = [p for p in pending if p[1]["decision_id"] in self._uncertain]
        if not unsure:
            return pending
        from google.cloud import bigquery

        stored: set[str] = set()
        sql = (
            f"SELECT decision_id FROM `{self.insert_id}` WHERE bar_time BETWEEN @lo AND @hi "
            "AND session_id IN UNNEST(@sessions) AND decision_id IN UNNEST(@ids)"
        )
        for start in range(0, len(unsure), LOOKUP_IDS):
            part = [p[1] for p in unsure[start : start + LOOKUP_IDS]]
            times = [timestamp_from_text(r["bar_time"]) for r in part]
            params = [
                bigquery.ScalarQueryParameter("lo", "TIMESTAMP", min(times)),
                bigquery.ScalarQueryParameter("hi", "TIMESTAMP", max(times)),
                bigquery.ArrayQueryParameter(
                    "sessions", "STRING", sorted({str(r["session_id"]) for r in part})
                ),
                bigquery.ArrayQueryParameter(
                    "ids", "STRING", [str(r["decision_id"]) for r in part]
                ),
            ]
            try:
                result = run_query(self._client, sql, self.config.timeout_s, params)
                stored.update(str(r[0]) for r in result)
            except Exception as e:
                if is_transient(e):
                    raise TransientError(
                        f"BigQuery look-up of {len(part)} rows: {describe(e)}"
                    ) from e
                raise SinkError(f"BigQuery look-up in {self.table_id}: {describe(e)}") from e
            with self._lock:
                self.stats.lookups += 1
        with self._lock:
            looked_up = {str(p[1]["decision_id"]) for p in unsure}
            self._uncertain -= looked_up
            self._replaying -= looked_up
            self.stats.skipped_written += len(stored)
        if stored:
            logger.info(
                "%d of %d decision records were already in %s; not sent again",
                len(stored),
                len(unsure),
                self.table_id,
            )
            for did in stored:
                self._remember(did)
        return [p for p in pending if p[1]["decision_id"] not in stored]

    def _remember(self, decision_id: str) -> None:
        with self._lock:
            self._strikes.pop(decision_id, None)
            self._confirmed[decision_id] = None
            self._uncertain.discard(decision_id)
            self._replaying.discard(decision_id)
            if len(self._confirmed) > CONFIRMED_IDS_KEPT:
                self._confirmed.popitem(last=False)

    def _send(self, chunk: list[Pending], out: _Outcome) -> None:
        """One request, its results added to ``out``; on a server error for several rows, the
        halves are sent apart (so a poison row the emulator answers with HTTP 500 does not
        hold back its batch); rows BigQuery stopped because of an invalid row of the same
        request are sent again without it.

        Raises:
            TransientError: rows of this chunk were not written for now.
            SinkError: permission withdrawn.
        """
        tries = 1 if len(chunk) > 1 else 2  # a lone row gets a second chance before rejection
        for attempt in range(tries):
            try:
                stopped = self._insert(chunk, out)
            except PoisonRowError as e:
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    self._send(chunk[:mid], out)
                    self._send(chunk[mid:], out)
                    return
                if attempt + 1 == tries:
                    out.errors.append(RowError(chunk[0][0], str(e)))
                continue
            if stopped:
                self._send(stopped, out)
            return

    def _insert(self, chunk: list[Pending], out: _Outcome) -> list[Pending]:
        """One insertAll request. Adds refused and stored rows to ``out``; returns the rows
        BigQuery stopped because an invalid row of the same request was refused (to send
        again without it).

        Raises:
            PoisonRowError: a server error for this request while the server answers.
            TransientError: the request failed for now (its rows may be stored when the
                connection dropped: they are looked up before they are sent again).
            SinkError: permission withdrawn.
        """
        from google.api_core import exceptions as gexc

        rows = [p[1] for p in chunk]
        ids = [str(r["decision_id"]) for r in rows]
        with self._lock:
            self.stats.requests += 1
            self.stats.rows_sent += len(rows)
            self.stats.bytes_sent += sum(p[2] for p in chunk)
        try:
            result = self._insert_all(chunk)
        except gexc.NotFound as e:
            self._opened = False  # table or dataset deleted under us: recreate on next write
            raise TransientError(
                f"BigQuery {self.table_id} not found; recreating: {describe(e)}"
            ) from e
        except Exception as e:
            if is_transport(e):
                # The request may have reached the server: look these rows up before resending.
                with self._lock:
                    self._uncertain.update(ids)
                raise TransientError(f"BigQuery insert of {len(rows)} rows: {describe(e)}") from e
            if is_transient(e):
                if _may_be_poison(e) and self._server_is_up():
                    raise PoisonRowError(
                        f"{POISON_PREFIX} while the server answers other calls: {describe(e)}"
                    ) from e
                with self._lock:
                    self._uncertain.update(ids)  # a 5xx may come after the rows were taken
                raise TransientError(f"BigQuery insert of {len(rows)} rows: {describe(e)}") from e
            if isinstance(e, gexc.Unauthorized | gexc.Forbidden):
                raise SinkError(f"BigQuery refused writes to {self.table_id}: {describe(e)}") from e
            if len(rows) > 1:
                raise PoisonRowError(describe(e)) from e
            out.errors.append(RowError(chunk[0][0], f"request refused: {describe(e)}"))
            return []
        return self._account(chunk, result, out)

    def _insert_all(self, chunk: list[Pending]) -> list[dict[str, Any]]:
        """POST one tabledata.insertAll request of ``chunk``'s encoded entries; its
        ``insertErrors`` as ``insert_rows_json`` returns them (``index``, ``errors``).

        The body is the rows' text as :func:`~.rows.encode_entry` made it to size them, sent
        as is: ``insert_rows_json`` would build it again from the rows with ``json.dumps``
        (about 25 us a SMA-cross row, 170 us a read-heavy one, with the GIL held on the writer
        thread). The request is made as ``insert_rows_json`` makes it (google-cloud-bigquery
        3.47, ``Client.insert_rows_json``): the client's ``_call_api`` with the same span and
        path, which adds the server-timeout header and calls the connection's ``api_request``
        (google-cloud-core: a ``str``/``bytes`` body is sent as given, with the content type
        given; an HTTP error status raises ``google.api_core.exceptions.from_http_response``).
        Both are private to the client: the pin in requirements.txt holds them, and the tests
        send through them to the emulator and to a capturing server.

        Request thread. Raises what the client raises (mapped by :meth:`_insert`).

        retry=None: the writer owns retries (with backoff, then spill); the client's default
        would retry a 500 for up to 10 minutes. skipInvalidRows false: a request with an
        invalid row stores nothing and answers "stopped" for the others (tabledata.insertAll),
        which are sent again at once; rows are checked before they leave, so that is rare, and
        the emulator reads each row once instead of twice.
        """
        path = f"{self._table_path}/insertAll"
        response = self._client._call_api(
            None,
            span_name="BigQuery.insertRowsJson",
            span_attributes={"path": path},
            method="POST",
            path=path,
            data=request_body([p[3] for p in chunk]),
            content_type="application/json",
            timeout=self.config.timeout_s,
        )
        return _insert_errors(response, len(chunk))

    @property
    def _table_path(self) -> str:
        """``/projects/<p>/datasets/<d>/tables/<t>`` of :attr:`insert_id` (the REST path the
        client builds with ``TableReference.path``)."""
        from google.cloud.bigquery import TableReference

        return TableReference.from_string(self.insert_id, default_project=self.config.project).path

    def _server_is_up(self) -> bool:
        """Whether BigQuery answers a metadata call now (tells a poison row from an outage).
        Two tries: a server that failed a request may have closed the pooled connection."""
        for _ in range(2):
            try:
                self._client.get_table(self.insert_id, retry=None, timeout=self.config.timeout_s)
                return True
            except Exception as e:  # noqa: BLE001 - any failure means "not answering"
                if not is_transport(e):
                    return False
        return False

    def _account(
        self, chunk: list[Pending], result: Sequence[Mapping[str, Any]], out: _Outcome
    ) -> list[Pending]:
        """Map insertErrors to RowErrors and remember the rows written (into ``out``); returns
        the rows stopped by an invalid row of the same request.

        Raises:
            TransientError: BigQuery did not take some rows this time (backend error, timeout,
                or stopped with no invalid row to blame).
        """
        failed: dict[int, list[Mapping[str, Any]]] = {}
        for entry in result or ():
            failed.setdefault(int(entry.get("index", -1)), []).extend(entry.get("errors") or ())
        refused: list[RowError] = []
        retry: list[Pending] = []
        stopped_only = True
        for pos, item in enumerate(chunk):
            i, row = item[0], item[1]
            errs = failed.get(pos)
            if errs is None:
                self._remember(str(row["decision_id"]))
                out.written.append((i, row))
                continue
            said = {str(e.get("reason")) for e in errs}
            if said <= RETRY_REASONS:
                retry.append(item)
                stopped_only = stopped_only and said == {"stopped"}
                continue
            detail = "; ".join(
                f"{e.get('location') or '?'}: {e.get('reason')}: {e.get('message')}"
                for e in errs
                if e.get("reason") not in RETRY_REASONS
            )
            refused.append(RowError(i, detail))
        out.errors += refused
        if retry and refused and stopped_only:
            return retry
        if retry:
            raise TransientError(
                f"BigQuery did not take {len(retry)} rows this time (stopped/"
                "backend error); retrying them"
            )
        return []

    def _count_publish(self, ok: bool) -> None:
        with self._lock:
            if ok:
                self.stats.published += 1
            else:
                self.stats.publish_errors += 1


def _may_be_poison(exc: Exception) -> bool:
    """An HTTP 500 that does not say "try again": what bqemulator answers for a whole request
    with a value it cannot read (reason ``internalError``). BigQuery's 500 and 503 answers
    ``backendError`` and ``timeout``, and its quota answers (403, 429) ``rateLimitExceeded``
    and ``quotaExceeded``, say to retry ("Troubleshoot errors", error table): never poison.
    helper-112 found a lone row under sustained 429/503 answers rejected as poison for good."""
    from google.api_core import exceptions as gexc

    return isinstance(exc, gexc.InternalServerError) and not reasons(exc) & _RETRY_SAYS


# Not internalError: bqemulator answers a value it cannot read with it, as BigQuery answers an
# internal error; a request whose every row gets it is retried instead (_request).
_RETRY_SAYS = frozenset({"backendError", "rateLimitExceeded", "quotaExceeded", "timeout"})


def _insert_errors(response: Any, rows: int) -> list[dict[str, Any]]:
    """An insertAll answer's ``insertErrors`` as ``insert_rows_json`` returns them (``index``,
    ``errors``), checked: BigQuery answers a JSON object whose ``insertErrors``, present only
    when rows failed, lists ``{"index": <row of the request>, "errors": [...]}``
    ("Method: tabledata.insertAll", response body).

    Raises:
        UnreadableAnswerError: anything else (helper-112: an empty, ``null`` or ``[]`` body
            counted every row stored, and an index past the request's rows too). The rows are
            then looked up before they are sent again, as after a dropped connection.
    """
    if not isinstance(response, Mapping) or "error" in response:
        raise UnreadableAnswerError(f"insertAll answered {_excerpt(response)}, not an answer")
    found = response.get("insertErrors", [])
    if not isinstance(found, list):
        raise UnreadableAnswerError(f"insertAll answered insertErrors={_excerpt(found)}")
    errors = []
    for e in found:
        index = e.get("index") if isinstance(e, Mapping) else None
        i = -1
        if type(index) is int:
            i = index
        elif isinstance(index, str) and index.isascii() and index.isdigit():
            i = int(index)  # int64 is a JSON string in Google's REST answers
        objects = e.get("errors") if 0 <= i < rows else None
        if not (
            isinstance(objects, list)
            and objects
            and all(isinstance(o, Mapping) and isinstance(o.get("reason"), str) for o in objects)
        ):
            # helper-113 F1: an error that is not an object raised AttributeError later, after
            # the rows before it were counted stored; the others were then sent again unlooked.
            # BigQuery's error objects (ErrorProto) carry a reason; without one a row was
            # refused as "?: None: None" (helper-114)
            raise UnreadableAnswerError(
                f"insertAll answered an insert error that names no row of its {rows} or no "
                f"error: {_excerpt(e)}"
            )
        errors.append({"index": i, "errors": objects})
    return errors


def _excerpt(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."
