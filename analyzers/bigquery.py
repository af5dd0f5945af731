"""BigQuery decision sink: one row per decision, streamed with ``insert_rows_json``.

:class:`BigQuerySink` implements :class:`~analyzers.sinks.DecisionSink`; the
:class:`~analyzers.sinks.DecisionWriter` owns it and calls every method from its writer thread
(batching, retry with backoff, spill and replay live there).

* ``open()`` creates the dataset and the table from :func:`analyzers.schema.bigquery_schema`
  (partitioned by day on ``bar_time``, clustered by ``agent_id``, ``session_id``) and the view
  ``decision_reads`` (one row per read, for BI tools). An existing table with an older schema is
  extended with the missing columns (added NULLABLE, as BigQuery requires); a table whose
  columns cannot take our rows (another type, another repetition, a REQUIRED column we never
  fill) raises :class:`~core.errors.SinkError` naming each column.
* ``write()`` validates every row against the table's schema first (BigQuery's type rules for
  JSON rows, so the reason names the field path, e.g. ``actions[0].size``), splits what is
  left into requests under the byte and row limits of the streaming API, sends each with
  ``row_ids`` = ``decision_id``, ``skip_invalid_rows`` (valid rows are written even when one
  is not), no client-side retry and an explicit timeout (the writer retries; the client's
  default retries an HTTP 500 for minutes), and maps per-row ``insertErrors`` to
  :class:`~analyzers.sinks.RowError`. A request answered with a server error while the server
  answers other calls (the emulator's HTTP 500 on some bad values) is split in halves until
  the offending row is alone and rejected; the others are written.
* Never a duplicate: rows confirmed written are remembered (bounded) and skipped when a batch
  is sent again; rows whose request had an unknown outcome (timeout, dropped connection) and
  rows replayed from a spill file are looked up by ``decision_id`` before they are sent again.
  BigQuery's own best-effort ``insertId`` de-duplication stays on as a second line.
* Optionally every written row is also published to a Pub/Sub topic (JSON, attributes
  ``session_id``, ``agent_id``, ``decision_id``, ``action``) for real-time consumers; off unless
  ``decisions_topic`` is set. Publishing is best effort: failures are counted and logged, never
  retried, and never hold back BigQuery.

Limits used (BigQuery streaming API, "Quotas and limits", tabledata.insertAll): 10 MB per HTTP
request, 500 rows per request recommended. Row type rules: "Streaming data into BigQuery" /
"Loading JSON data" (INT64 as JSON number or decimal string; TIMESTAMP as a date-time string or
epoch seconds; this sink sends and accepts only the former).
"""

from __future__ import annotations

import collections
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from analyzers.schema import DECISION_SCHEMA, FieldSpec, bigquery_schema
from analyzers.sinks import Row, RowError
from core.errors import SinkError, TransientError
from runtime.config import BigQuerySinkConfig

logger = logging.getLogger(__name__)

# Streaming API limits. The request envelope ({"rows": [{"insertId": ..., "json": ...}], ...})
# adds a few dozen bytes per row; keep a margin under the 10 MB hard limit.
MAX_REQUEST_BYTES = 9_000_000
MAX_ROWS_PER_REQUEST = 500
_ROW_OVERHEAD_BYTES = 64
# How many confirmed decision ids are remembered to skip re-sends (about 100 bytes each).
CONFIRMED_IDS_KEPT = 200_000

VIEW_NAME = "decision_reads"
# One row per read: the view BI tools use (same columns as the local store's view of that name).
VIEW_SQL = """
SELECT d.decision_id, d.session_id, d.agent_id, d.decision_point, d.bar_time, d.stage, d.action,
       da.symbol, ap.seq, ap.field, ap.`index`, ap.size, ap.bar_index, ap.data_hash, ap.value,
       ap.text_value, ap.lookahead
FROM `{table}` AS d, UNNEST(d.data_accessed) AS da, UNNEST(da.access_patterns) AS ap
"""

_TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "STRUCT": "RECORD"}
_INT_RE = re.compile(r"^[+-]?\d+$")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# BigQuery reasons (error objects of a failed request or of insertErrors) that mean "try again".
_RETRY_REASONS = frozenset(
    {"backendError", "internalError", "rateLimitExceeded", "timeout", "stopped", "quotaExceeded"}
)


# ---------------------------------------------------------------------------------------------
# Schema: comparison, evolution, row validation
# ---------------------------------------------------------------------------------------------


def _norm_type(t: str) -> str:
    t = t.upper()
    return _TYPE_ALIASES.get(t, t)


def spec_of(field: Any) -> FieldSpec:
    """A ``google.cloud.bigquery.SchemaField`` as a :class:`FieldSpec` (types normalised:
    INTEGER -> INT64, FLOAT -> FLOAT64, BOOLEAN -> BOOL, STRUCT -> RECORD)."""
    return FieldSpec(
        field.name,
        _norm_type(field.field_type),
        (field.mode or "NULLABLE").upper(),
        tuple(spec_of(f) for f in field.fields or ()),
        field.description or "",
    )


@dataclass(frozen=True, slots=True)
class SchemaPlan:
    """What :func:`plan_schema` decided.

    Attributes:
        merged: the table's schema after evolution (existing columns first, in table order, then
            the added ones in our order; the order matters to the emulator, which inserts by
            position).
        added: dotted paths of columns to add (``notes``, ``actions.reason``).
        relaxed: dotted paths of REQUIRED columns to relax to NULLABLE.
        problems: why the table cannot take our rows (empty when it can).
    """

    merged: tuple[FieldSpec, ...]
    added: tuple[str, ...]
    relaxed: tuple[str, ...]
    problems: tuple[str, ...]

    @property
    def changes(self) -> bool:
        return bool(self.added or self.relaxed)


def plan_schema(
    existing: Sequence[FieldSpec], wanted: Sequence[FieldSpec] = DECISION_SCHEMA, prefix: str = ""
) -> SchemaPlan:
    """Compare a table's schema with ours and plan the evolution BigQuery allows.

    Allowed (BigQuery, "Modifying table schemas"): adding NULLABLE or REPEATED columns, also
    inside RECORDs, and relaxing REQUIRED to NULLABLE. A column we mark REQUIRED that the table
    lacks is added NULLABLE. Everything else is a problem: another type, another repetition, or
    a REQUIRED column of the table that our rows never fill.

    Args:
        existing: the table's columns (see :func:`spec_of`).
        wanted: our columns.
        prefix: dotted path of the enclosing RECORD (recursion).
    """
    have = {f.name.lower(): f for f in existing}
    want_names = {f.name.lower() for f in wanted}
    merged: list[FieldSpec] = []
    added: list[str] = []
    relaxed: list[str] = []
    problems: list[str] = []
    for f in existing:
        path = prefix + f.name
        if f.name.lower() not in want_names and f.mode == "REQUIRED":
            problems.append(f"{path}: REQUIRED in the table but not written by this version")
    by_name: dict[str, FieldSpec] = {}
    for w in wanted:
        path = prefix + w.name
        e = have.get(w.name.lower())
        if e is None:
            mode = "NULLABLE" if w.mode == "REQUIRED" else w.mode
            by_name[w.name.lower()] = FieldSpec(w.name, w.type, mode, w.fields, w.description)
            added.append(path)
            continue
        if e.type != w.type:
            problems.append(f"{path}: table has {e.type}, expected {w.type}")
            continue
        if (e.mode == "REPEATED") != (w.mode == "REPEATED"):
            problems.append(f"{path}: table mode {e.mode}, expected {w.mode}")
            continue
        mode = e.mode
        if e.mode == "REQUIRED" and w.mode == "NULLABLE":
            relaxed.append(path)
            mode = "NULLABLE"
        fields = e.fields
        if w.type == "RECORD":
            sub = plan_schema(e.fields, w.fields, path + ".")
            fields = sub.merged
            added += sub.added
            relaxed += sub.relaxed
            problems += sub.problems
        by_name[w.name.lower()] = FieldSpec(
            e.name, e.type, mode, fields, e.description or w.description
        )
    for f in existing:
        merged.append(by_name.pop(f.name.lower(), f))
    merged.extend(by_name.values())  # the added ones, in our order
    return SchemaPlan(tuple(merged), tuple(added), tuple(relaxed), tuple(problems))


def to_schema_fields(specs: Iterable[FieldSpec]) -> list[Any]:
    """:class:`FieldSpec` tuple -> ``SchemaField`` list."""
    return bigquery_schema(tuple(specs))


def ddl_type(spec: FieldSpec) -> str:
    """The GoogleSQL DDL type of a column: ``ARRAY<STRUCT<`seq` INT64, ...>>``."""
    if spec.type == "RECORD":
        base = "STRUCT<" + ", ".join(f"`{f.name}` {ddl_type(f)}" for f in spec.fields) + ">"
    else:
        base = spec.type
    return f"ARRAY<{base}>" if spec.mode == "REPEATED" else base


def _type_problem(value: Any, spec: FieldSpec) -> str | None:
    """Why ``value`` is not a valid JSON value for a scalar column (None when it is)."""
    t = spec.type
    if t == "STRING":
        ok = isinstance(value, str) or (
            isinstance(value, int | float) and not isinstance(value, bool)
        )
    elif t == "INT64":
        if isinstance(value, bool):
            ok = False
        elif isinstance(value, int):
            ok = _INT64_MIN <= value <= _INT64_MAX
        elif isinstance(value, float):
            ok = value.is_integer() and _INT64_MIN <= value <= _INT64_MAX
        else:
            ok = isinstance(value, str) and bool(_INT_RE.match(value.strip()))
    elif t == "FLOAT64":
        if isinstance(value, bool):
            ok = False
        elif isinstance(value, int | float):
            ok = True
        elif isinstance(value, str):
            try:
                float(value)
                ok = True
            except ValueError:
                ok = False
        else:
            ok = False
    elif t == "BOOL":
        ok = isinstance(value, bool) or (
            isinstance(value, str) and value.lower() in ("true", "false")
        )
    elif t == "TIMESTAMP":
        # Strings only: BigQuery also takes epoch seconds as a number, but the emulator reads a
        # number as microseconds and stores a wrong time without an error; rows made by
        # ``to_row`` always carry ISO-8601 text.
        if isinstance(value, str):
            text = value.strip().replace(" UTC", "+00:00").replace("Z", "+00:00")
            try:
                datetime.fromisoformat(text)
                ok = True
            except ValueError:
                ok = False
        else:
            ok = False
    else:  # a type this sink never writes: let BigQuery judge
        ok = True
    if ok:
        return None
    return f"expected {t}, got {type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_row(
    row: Mapping[str, Any], schema: Sequence[FieldSpec], prefix: str = ""
) -> list[str]:
    """Check one JSON row against a schema with BigQuery's rules.

    Returns:
        Problems as ``"<field path>: <reason>"`` (``actions[2].size: expected FLOAT64, got str
        'abc'``); empty when the row is valid. Unknown fields, missing REQUIRED fields, wrong
        scalar types and out-of-range INT64 values are reported.
    """
    problems: list[str] = []
    known = {f.name: f for f in schema}
    for key in row:
        if key not in known:
            problems.append(f"{prefix}{key}: no such field in the table")
    for spec in schema:
        path = prefix + spec.name
        value = row.get(spec.name)
        if value is None:
            if spec.mode == "REQUIRED":
                problems.append(f"{path}: REQUIRED field is missing or null")
            continue
        if spec.mode == "REPEATED":
            if not isinstance(value, list | tuple):
                problems.append(f"{path}: expected a list (REPEATED), got {type(value).__name__}")
                continue
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            items = [(path, value)]
        for item_path, item in items:
            if item is None:
                if spec.mode == "REPEATED":
                    problems.append(f"{item_path}: null element in a REPEATED field")
                continue
            if spec.type == "RECORD":
                if not isinstance(item, Mapping):
                    problems.append(
                        f"{item_path}: expected an object (RECORD), got {type(item).__name__}"
                    )
                else:
                    problems += validate_row(item, spec.fields, item_path + ".")
            else:
                why = _type_problem(item, spec)
                if why:
                    problems.append(f"{item_path}: {why}")
    return problems


# ---------------------------------------------------------------------------------------------
# Error classification
# ---------------------------------------------------------------------------------------------


def _reasons(exc: BaseException) -> set[str]:
    errors = getattr(exc, "errors", None) or []
    return {str(e.get("reason")) for e in errors if isinstance(e, Mapping)}


def is_transient(exc: BaseException) -> bool:
    """True for failures that may pass when retried: transport errors (refused, reset,
    timeouts), HTTP 408/429/5xx, and 403 with a rate-limit reason (BigQuery's
    ``rateLimitExceeded``/``quotaExceeded``)."""
    import requests
    from google.api_core import exceptions as gexc
    from google.auth import exceptions as auth_exc

    if isinstance(
        exc,
        requests.exceptions.RequestException
        | ConnectionError
        | TimeoutError
        | auth_exc.TransportError
        | gexc.RetryError,
    ):
        return True
    if isinstance(exc, gexc.GoogleAPICallError):
        code = exc.code or 0
        if code in (408, 429) or code >= 500:
            return True
        return code == 403 and bool(_reasons(exc) & _RETRY_REASONS)
    return False


def _is_transport(exc: BaseException) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.RequestException | ConnectionError | TimeoutError)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


# ---------------------------------------------------------------------------------------------
# The sink
# ---------------------------------------------------------------------------------------------


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


_POISON_PREFIX = "server error for this row"


class _PoisonRowError(Exception):
    """One row the server refuses with a server error while it answers other calls."""


class BigQuerySink:
    """Decision rows streamed into a BigQuery table.

    Thread context: constructed on any thread; ``open``/``write``/``close``/``before_replay``
    are called from the :class:`~analyzers.sinks.DecisionWriter` thread only.

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
        self.table_id = f"{config.project}.{config.dataset}.{config.table}"
        self._client = client
        self._own_client = client is None
        self._publisher = publisher
        self._own_publisher = publisher is None
        self._topic_path: str | None = None
        self._publish_futures: list[Any] = []
        self._schema: tuple[FieldSpec, ...] = DECISION_SCHEMA
        self._opened = False
        self._confirmed: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._uncertain: set[str] = set()
        self._lock = threading.Lock()  # close() may race a late publish callback count

    # -- protocol ---------------------------------------------------------------------------

    def open(self) -> None:
        """Create the dataset, table and view when missing; check and extend the schema.

        Raises:
            TransientError: BigQuery unreachable or overloaded now.
            SinkError: bad credentials or permissions, or an incompatible table (the message
                lists every offending column).
        """
        try:
            self._open()
        except (TransientError, SinkError):
            raise
        except Exception as e:
            if is_transient(e):
                raise TransientError(f"BigQuery {self.table_id}: {_describe(e)}") from e
            raise SinkError(f"BigQuery {self.table_id}: {_describe(e)}") from e
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
        pending: list[tuple[int, Row, int]] = []
        for i, row in enumerate(rows):
            did = row.get("decision_id")
            if isinstance(did, str) and did in self._confirmed:
                self.stats.skipped_written += 1
                continue
            problems = validate_row(row, self._schema)
            if problems:
                errors.append(RowError(i, "; ".join(problems)))
                continue
            size = (
                len(json.dumps(row, separators=(",", ":"), allow_nan=False))
                + len(str(did))
                + _ROW_OVERHEAD_BYTES
            )
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
        for chunk in self._chunks(pending):
            chunk_errors = self._send(chunk)
            if (
                len(chunk) > 1
                and len(chunk_errors) == len(chunk)
                and all(e.reason.startswith(_POISON_PREFIX) for e in chunk_errors)
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
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            try:
                if self._own_publisher:
                    publisher.stop()  # publishes what is batched, then stops
                self._collect_publishes(wait_s=self.config.timeout_s)
            except Exception:
                logger.exception("decisions topic: flush failed")
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

    # -- open -------------------------------------------------------------------------------

    def _make_client(self) -> Any:
        from google.cloud import bigquery

        cfg = self.config
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
                f"BigQuery: no usable credentials ({_describe(e)}); set up "
                "Application Default Credentials or BIGQUERY_EMULATOR_HOST"
            ) from e

    def _open(self) -> None:
        from google.api_core import exceptions as gexc
        from google.cloud import bigquery

        if self._client is None:
            self._client = self._make_client()
        client, cfg, timeout = self._client, self.config, self.config.timeout_s
        dataset = bigquery.Dataset(f"{cfg.project}.{cfg.dataset}")
        if cfg.location:
            dataset.location = cfg.location
        client.create_dataset(dataset, exists_ok=True, retry=None, timeout=timeout)
        try:
            table = client.get_table(self.table_id, retry=None, timeout=timeout)
        except gexc.NotFound:
            table = bigquery.Table(self.table_id, schema=bigquery_schema())
            table.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.DAY, field="bar_time"
            )
            table.clustering_fields = ["agent_id", "session_id"]
            table.description = "FMEL decision records: one row per agent bar"
            table = client.create_table(table, exists_ok=True, retry=None, timeout=timeout)
            logger.info(
                "created BigQuery table %s (partitioned by day on bar_time, clustered "
                "by agent_id, session_id)",
                self.table_id,
            )
        self._schema = self._evolve(table)
        self._check_layout(table)
        self._ensure_view()
        if cfg.decisions_topic and self._topic_path is None:
            self._open_topic()

    def _evolve(self, table: Any) -> tuple[FieldSpec, ...]:
        """Check the table's schema and extend it; returns the schema rows are checked with."""
        existing = tuple(spec_of(f) for f in table.schema)
        plan = plan_schema(existing)
        if plan.problems:
            raise SinkError(
                f"BigQuery table {self.table_id} cannot take decision records: "
                + "; ".join(plan.problems)
                + ". Use another FMEL_TABLE or migrate the table."
            )
        if not plan.changes:
            return existing
        client, timeout = self._client, self.config.timeout_s
        top_added = [s for s in plan.merged if s.name in plan.added]
        # Top-level columns through DDL first: BigQuery accepts both ways, and the emulator
        # only alters its storage on DDL (its tables.patch changes the catalog alone).
        for spec in top_added:
            sql = (
                f"ALTER TABLE `{self.table_id}` ADD COLUMN IF NOT EXISTS `{spec.name}` "
                f"{ddl_type(spec)}"
            )
            self._query(sql)
        # Then the whole merged schema through tables.patch (nested fields, relaxed modes,
        # descriptions). Order: table columns first, added ones after, as the DDL left them.
        table.schema = to_schema_fields(plan.merged)
        client.update_table(table, ["schema"], retry=None, timeout=timeout)
        logger.warning(
            "BigQuery table %s extended: added %s%s",
            self.table_id,
            ", ".join(plan.added) or "nothing",
            f"; relaxed to NULLABLE: {', '.join(plan.relaxed)}" if plan.relaxed else "",
        )
        return plan.merged

    def _check_layout(self, table: Any) -> None:
        tp = table.time_partitioning
        if tp is None or tp.field != "bar_time":
            logger.warning(
                "BigQuery table %s is not partitioned on bar_time: queries by date "
                "scan the whole table",
                self.table_id,
            )
        if list(table.clustering_fields or []) != ["agent_id", "session_id"]:
            logger.warning(
                "BigQuery table %s is clustered by %s, not agent_id, session_id",
                self.table_id,
                table.clustering_fields,
            )

    def _ensure_view(self) -> None:
        from google.api_core import exceptions as gexc
        from google.cloud import bigquery

        cfg, client, timeout = self.config, self._client, self.config.timeout_s
        view_id = f"{cfg.project}.{cfg.dataset}.{VIEW_NAME}"
        query = VIEW_SQL.format(table=self.table_id).strip()
        try:
            view = client.get_table(view_id, retry=None, timeout=timeout)
        except gexc.NotFound:
            view = bigquery.Table(view_id)
            view.view_query = query
            view.description = "One row per read of each decision (flattened access patterns)"
            client.create_table(view, exists_ok=True, retry=None, timeout=timeout)
            return
        if view.table_type != "VIEW":
            logger.warning(
                "%s exists and is not a view; the flat view of reads is not created", view_id
            )
        elif (view.view_query or "").strip() != query:
            view.view_query = query
            client.update_table(view, ["view_query"], retry=None, timeout=timeout)

    def _open_topic(self) -> None:
        topic = self.config.decisions_topic
        assert topic is not None
        self._topic_path = (
            topic
            if topic.startswith("projects/")
            else f"projects/{self.config.project}/topics/{topic}"
        )
        if self._publisher is None:
            from google.cloud.pubsub_v1 import PublisherClient

            self._publisher = PublisherClient()
        logger.info("decisions are also published to %s", self._topic_path)

    # -- write ------------------------------------------------------------------------------

    def _chunks(self, pending: list[tuple[int, Row, int]]) -> Iterable[list[tuple[int, Row, int]]]:
        chunk: list[tuple[int, Row, int]] = []
        size = 0
        for item in pending:
            if chunk and (
                size + item[2] > self.max_request_bytes or len(chunk) >= self.max_rows_per_request
            ):
                yield chunk
                chunk, size = [], 0
            chunk.append(item)
            size += item[2]
        if chunk:
            yield chunk

    def _drop_stored(self, pending: list[tuple[int, Row, int]]) -> list[tuple[int, Row, int]]:
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
                result = self._query(sql, [bigquery.ArrayQueryParameter("ids", "STRING", ids)])
                stored.update(str(r[0]) for r in result)
            except Exception as e:
                if is_transient(e):
                    raise TransientError(
                        f"BigQuery look-up of {len(ids)} rows: {_describe(e)}"
                    ) from e
                raise SinkError(f"BigQuery look-up in {self.table_id}: {_describe(e)}") from e
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

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One query, no client-side retries (neither of the request nor of the job: the
        defaults retry for up to 10 minutes) and the request timeout on each call."""
        from google.cloud import bigquery

        timeout = self.config.timeout_s
        job = self._client.query(
            sql,
            job_config=bigquery.QueryJobConfig(query_parameters=list(params)),
            retry=None,
            timeout=timeout,
            job_retry=None,
        )
        return list(job.result(timeout=timeout, retry=None, job_retry=None))

    def _remember(self, decision_id: str) -> None:
        self._confirmed[decision_id] = None
        self._uncertain.discard(decision_id)
        if len(self._confirmed) > CONFIRMED_IDS_KEPT:
            self._confirmed.popitem(last=False)

    def _send(self, chunk: list[tuple[int, Row, int]]) -> list[RowError]:
        """One request; on a server error for several rows, split and send the halves (so a
        poison row the emulator answers with HTTP 500 does not hold back its batch)."""
        tries = 1 if len(chunk) > 1 else 2  # a lone row gets a second chance before rejection
        for attempt in range(tries):
            try:
                return self._insert(chunk)
            except _PoisonRowError as e:
                if len(chunk) > 1:
                    mid = len(chunk) // 2
                    return self._send(chunk[:mid]) + self._send(chunk[mid:])
                if attempt + 1 == tries:
                    return [RowError(chunk[0][0], str(e))]
        raise AssertionError("unreachable")

    def _insert(self, chunk: list[tuple[int, Row, int]]) -> list[RowError]:
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
                f"BigQuery {self.table_id} not found; recreating: {_describe(e)}"
            ) from e
        except Exception as e:
            if _is_transport(e):
                # The request may have reached the server: look these rows up before resending.
                self._uncertain.update(ids)
                raise TransientError(f"BigQuery insert of {len(rows)} rows: {_describe(e)}") from e
            if is_transient(e):
                if self._server_is_up():
                    raise _PoisonRowError(
                        f"{_POISON_PREFIX} while the server answers other calls: {_describe(e)}"
                    ) from e
                raise TransientError(f"BigQuery insert of {len(rows)} rows: {_describe(e)}") from e
            if isinstance(e, gexc.Unauthorized | gexc.Forbidden):
                raise SinkError(
                    f"BigQuery refused writes to {self.table_id}: {_describe(e)}"
                ) from e
            if len(rows) > 1:
                raise _PoisonRowError(_describe(e)) from e
            return [RowError(chunk[0][0], f"request refused: {_describe(e)}")]
        return self._account(chunk, result)

    def _server_is_up(self) -> bool:
        """Whether BigQuery answers a metadata call now (tells a poison row from an outage).
        Two tries: a server that failed a request may have closed the pooled connection."""
        for _ in range(2):
            try:
                self._client.get_table(self.table_id, retry=None, timeout=self.config.timeout_s)
                return True
            except Exception as e:  # noqa: BLE001 - any failure means "not answering"
                if not _is_transport(e):
                    return False
        return False

    def _account(
        self, chunk: list[tuple[int, Row, int]], result: Sequence[Mapping[str, Any]]
    ) -> list[RowError]:
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
            if reasons <= _RETRY_REASONS:
                retry.append(i)
                continue
            detail = "; ".join(
                f"{e.get('location') or '?'}: {e.get('reason')}: {e.get('message')}"
                for e in errs
                if e.get("reason") not in _RETRY_REASONS
            )
            errors.append(RowError(i, detail))
        self._publish(written)
        if retry:
            raise TransientError(
                f"BigQuery did not take {len(retry)} rows this time (stopped/"
                "backend error); retrying them"
            )
        return errors

    # -- decisions topic --------------------------------------------------------------------

    def _publish(self, rows: Sequence[Row]) -> None:
        if self._publisher is None or self._topic_path is None or not rows:
            return
        self._collect_publishes(wait_s=0.0)
        for row in rows:
            data = json.dumps(row, separators=(",", ":"), allow_nan=False).encode()
            try:
                future = self._publisher.publish(
                    self._topic_path,
                    data,
                    session_id=str(row.get("session_id")),
                    agent_id=str(row.get("agent_id")),
                    decision_id=str(row.get("decision_id")),
                    action=str(row.get("action")),
                )
            except Exception as e:  # noqa: BLE001 - best effort: counted and logged
                with self._lock:
                    self.stats.publish_errors += 1
                logger.warning("decisions topic: publish failed: %s", _describe(e))
                continue
            self._publish_futures.append(future)

    def _collect_publishes(self, wait_s: float) -> None:
        """Count finished publishes; with ``wait_s`` > 0 wait up to that long in total."""
        import time

        deadline = time.monotonic() + wait_s
        keep = []
        for future in self._publish_futures:
            remaining = deadline - time.monotonic()
            if not future.done() and remaining > 0:
                try:
                    future.result(timeout=remaining)
                except Exception:  # noqa: BLE001 - counted below
                    pass
            if not future.done():
                keep.append(future)
                continue
            exc = future.exception()
            with self._lock:
                if exc is None:
                    self.stats.published += 1
                else:
                    self.stats.publish_errors += 1
                    logger.warning("decisions topic: publish failed: %s", _describe(exc))
        self._publish_futures = keep
