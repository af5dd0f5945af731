"""The decision table's schema on BigQuery: compare, plan the evolution, create and maintain.

:func:`ensure_table` runs when the sink opens: it creates the dataset, the table from
:func:`analyzers.schema.bigquery_schema` (partitioned by day on ``bar_time``, clustered by
``agent_id``, ``session_id``) and the view ``decision_reads`` (one row per read, for BI tools).
An existing table with an older schema is extended with the missing columns (added NULLABLE, as
BigQuery requires, planned by :func:`plan_schema`); a table whose columns cannot take our rows
(another type, another repetition, a REQUIRED column we never fill) raises
:class:`~core.errors.SinkError` naming each column.

:func:`ensure_storage` is what the sink calls: a new deployment stores compact rows (reads
grouped per bar, :mod:`.compact`) in ``<table>_compact`` and gets the view ``<table>`` in the
row-per-read shape; a table made before compact rows keeps its layout and is written as before.

Maintenance is not an outage: when the view cannot be created or updated, or the schema update
fails although the table already has every column our rows need, a warning names the object and
rows are inserted as usual. Only a table that lacks a column it could not be given stops
inserts (the error is raised, and the writer retries later).

Every call is made without client-side retries, with the request timeout of the config.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from analyzers.schema import DECISION_SCHEMA, FieldSpec, bigquery_schema
from analyzers.sinks.bigquery.client import run_query
from analyzers.sinks.bigquery.compact import (
    COMPACT_SCHEMA,
    compact_table_id,
    decisions_view_query,
)
from analyzers.sinks.bigquery.config import BigQuerySinkConfig
from analyzers.sinks.views import VIEW_NAME, bigquery_view_query
from core.errors import SinkError

logger = logging.getLogger(__name__)

_TYPE_ALIASES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL", "STRUCT": "RECORD"}


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


# ---------------------------------------------------------------------------------------------
# Table and view maintenance
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Storage:
    """Where and how a sink stores rows (what :func:`ensure_storage` found or made).

    Attributes:
        insert_id: ``project.dataset.table`` rows are inserted into and looked up in.
        schema: the schema a full (:func:`~analyzers.schema.to_row`) row is validated against.
        compact: rows are packed (:func:`.compact.pack_row`) into ``insert_id``, and the table
            name users query is a view in the row-per-read shape.
    """

    insert_id: str
    schema: tuple[FieldSpec, ...]
    compact: bool


def ensure_storage(client: Any, cfg: BigQuerySinkConfig) -> Storage:
    """Create or check what the sink writes to; which layout depends on what ``cfg.table_id``
    is:

    * missing, or a view: compact rows in ``<table>_compact`` (created or extended), and the
      views ``<table>`` (the row-per-read shape, :func:`.compact.decisions_view_query`) and
      its reads view over it (:func:`reads_view_name`);
    * a table (a deployment made before compact rows): it is left in its layout and takes
      row-per-read rows as before (:func:`ensure_table`); a warning says how to move to
      compact rows (docs/bigquery.md, "Compact rows").

    A view that cannot be created or updated is a warning naming it (rows are still inserted).

    Raises:
        SinkError: the table cannot take decision records (every offending column named).
        Exception: a client error, unchanged (the sink classifies it).
    """
    from google.api_core import exceptions as gexc

    try:
        found = client.get_table(cfg.table_id, retry=None, timeout=cfg.timeout_s)
    except gexc.NotFound:
        found = None
    if found is not None and found.table_type != "VIEW":
        logger.warning(
            "BigQuery table %s stores one element per read (the layout before compact rows); "
            "rows are written in that layout. To store compact rows (~40%% fewer bytes for "
            "read-heavy records), "
            "see docs/bigquery.md, 'Compact rows'.",
            cfg.table_id,
        )
        return Storage(cfg.table_id, ensure_table(client, cfg), compact=False)
    compact_id = compact_table_id(cfg.table_id)
    ensure_table(client, cfg, table_id=compact_id, wanted=COMPACT_SCHEMA, views=False)
    view_id = cfg.table_id
    try:
        _ensure_view(
            client,
            cfg,
            view_id,
            decisions_view_query(compact_id),
            f"Decision records, one access_patterns element per read (rows in {compact_id})",
            compact_id,
        )
    except Exception as e:  # noqa: BLE001 - any failure: the table still takes rows
        logger.warning(
            "BigQuery view %s could not be created or updated (%s); decisions are still "
            "written to %s. Create it by hand: python -m analyzers.sinks.bigquery.compact %s",
            view_id,
            _describe(e),
            compact_id,
            cfg.table_id,
        )
    _ensure_reads_view(client, cfg, cfg.table_id)
    return Storage(compact_id, DECISION_SCHEMA, compact=True)


def ensure_table(
    client: Any,
    cfg: BigQuerySinkConfig,
    *,
    table_id: str | None = None,
    wanted: tuple[FieldSpec, ...] = DECISION_SCHEMA,
    views: bool = True,
) -> tuple[FieldSpec, ...]:
    """Create the dataset, table and view when missing; check and extend the table's schema.

    Args:
        client: a ``google.cloud.bigquery.Client``.
        cfg: where the table is, and the request timeout.
        table_id: the table (default ``cfg.table_id``).
        wanted: the columns rows need (:data:`~analyzers.schema.DECISION_SCHEMA`, or
            :data:`.compact.COMPACT_SCHEMA`).
        views: also create or update the reads view (:func:`reads_view_name`) over
            ``table_id``.

    Returns:
        The table's schema after evolution: the one rows are validated against.

    Raises:
        SinkError: the table cannot take decision records (every offending column named).
        Exception: a client error, unchanged (the sink classifies it).
    """
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    table_id = table_id or cfg.table_id
    timeout = cfg.timeout_s
    _ensure_dataset(client, cfg)
    try:
        table = client.get_table(table_id, retry=None, timeout=timeout)
    except gexc.NotFound:
        table = bigquery.Table(table_id, schema=bigquery_schema(wanted))
        table.time_partitioning = bigquery.TimePartitioning(
            type_=bigquery.TimePartitioningType.DAY, field="bar_time"
        )
        table.clustering_fields = ["agent_id", "session_id"]
        table.description = "FMEL decision records: one row per agent bar"
        table = client.create_table(table, exists_ok=True, retry=None, timeout=timeout)
        logger.info(
            "created BigQuery table %s (partitioned by day on bar_time, clustered "
            "by agent_id, session_id)",
            table_id,
        )
    try:
        schema = _evolve(client, cfg, table, table_id, wanted)
    except SinkError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unless the table takes rows as it is
        schema = _after_failed_evolution(client, cfg, e, table_id, wanted)
    _check_layout(table_id, table)
    if views:
        _ensure_reads_view(client, cfg, table_id)
    return schema


def reads_view_name(table: str) -> str:
    """Name of the reads view of the table ``table`` (``FMEL_TABLE``): ``decision_reads`` for
    the default ``decisions`` (so the documented SQL runs unchanged), ``<table>_reads`` for any
    other (one dataset can hold several tables, each with its own reads view)."""
    return VIEW_NAME if table == "decisions" else f"{table}_reads"


def _ensure_reads_view(client: Any, cfg: BigQuerySinkConfig, source_id: str) -> None:
    """:func:`ensure_view` over ``source_id``; a failure is a warning naming the view."""
    try:
        ensure_view(client, cfg, source_id)
    except Exception as e:  # noqa: BLE001 - any failure: the table still takes rows
        logger.warning(
            "BigQuery view %s.%s.%s could not be created or updated (%s); decisions are still "
            "written to %s. Create it by hand from sql/bigquery/decision_reads_view.sql.",
            cfg.project,
            cfg.dataset,
            reads_view_name(cfg.table),
            _describe(e),
            source_id,
        )


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:300]}"


def _ensure_dataset(client: Any, cfg: BigQuerySinkConfig) -> None:
    """Create the dataset when missing. A refused creation of a dataset that exists (a role
    that may write tables but not create datasets) is a warning."""
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    dataset = bigquery.Dataset(f"{cfg.project}.{cfg.dataset}")
    if cfg.location:
        dataset.location = cfg.location
    try:
        client.create_dataset(dataset, exists_ok=True, retry=None, timeout=cfg.timeout_s)
    except gexc.Forbidden as e:
        client.get_dataset(dataset.reference, retry=None, timeout=cfg.timeout_s)  # raises if not
        logger.warning(
            "BigQuery dataset %s.%s exists but this identity may not create datasets (%s)",
            cfg.project,
            cfg.dataset,
            _describe(e),
        )


def _after_failed_evolution(
    client: Any,
    cfg: BigQuerySinkConfig,
    error: Exception,
    table_id: str,
    wanted: tuple[FieldSpec, ...] = DECISION_SCHEMA,
) -> tuple[FieldSpec, ...]:
    """The schema update failed: read the table again. When it has every column our rows need
    (the failed step was a description or a relaxed mode, or a DDL step went through), warn
    and go on with its schema; otherwise raise ``error`` (rows with the new fields cannot be
    inserted until the update succeeds)."""
    table = client.get_table(table_id, retry=None, timeout=cfg.timeout_s)
    existing = tuple(spec_of(f) for f in table.schema)
    plan = plan_schema(existing, wanted)
    if plan.added:
        logger.error(
            "BigQuery table %s lacks %s and could not be extended: %s",
            table_id,
            ", ".join(plan.added),
            _describe(error),
        )
        raise error
    logger.warning(
        "BigQuery table %s: schema update failed (%s)%s; it has every column decisions need, "
        "so they are written",
        table_id,
        _describe(error),
        f"; still REQUIRED: {', '.join(plan.relaxed)}" if plan.relaxed else "",
    )
    return existing


def _evolve(
    client: Any,
    cfg: BigQuerySinkConfig,
    table: Any,
    table_id: str,
    wanted: tuple[FieldSpec, ...] = DECISION_SCHEMA,
) -> tuple[FieldSpec, ...]:
    """Check the table's schema and extend it; returns the schema rows are checked with."""
    existing = tuple(spec_of(f) for f in table.schema)
    plan = plan_schema(existing, wanted)
    if plan.problems:
        raise SinkError(
            f"BigQuery table {table_id} cannot take decision records: "
            + "; ".join(plan.problems)
            + ". Use another FMEL_TABLE or migrate the table."
        )
    if not plan.changes:
        return existing
    top_added = [s for s in plan.merged if s.name in plan.added]
    # Top-level columns through DDL first: BigQuery accepts both ways, and the emulator
    # only alters its storage on DDL (its tables.patch changes the catalog alone).
    for spec in top_added:
        sql = f"ALTER TABLE `{table_id}` ADD COLUMN IF NOT EXISTS `{spec.name}` {ddl_type(spec)}"
        run_query(client, sql, cfg.timeout_s)
    # Then the whole merged schema through tables.patch (nested fields, relaxed modes,
    # descriptions). Order: table columns first, added ones after, as the DDL left them.
    table.schema = to_schema_fields(plan.merged)
    client.update_table(table, ["schema"], retry=None, timeout=cfg.timeout_s)
    logger.warning(
        "BigQuery table %s extended: added %s%s",
        table_id,
        ", ".join(plan.added) or "nothing",
        f"; relaxed to NULLABLE: {', '.join(plan.relaxed)}" if plan.relaxed else "",
    )
    return plan.merged


def _check_layout(table_id: str, table: Any) -> None:
    tp = table.time_partitioning
    if tp is None or tp.field != "bar_time":
        logger.warning(
            "BigQuery table %s is not partitioned on bar_time: queries by date "
            "scan the whole table",
            table_id,
        )
    if list(table.clustering_fields or []) != ["agent_id", "session_id"]:
        logger.warning(
            "BigQuery table %s is clustered by %s, not agent_id, session_id",
            table_id,
            table.clustering_fields,
        )


def ensure_view(client: Any, cfg: BigQuerySinkConfig, source_id: str | None = None) -> None:
    """Create the reads view next to the table (``decision_reads``, or ``<table>_reads`` for a
    table other than ``decisions``: :func:`reads_view_name`), or update its query when it
    differs from ``sql/bigquery/decision_reads_view.sql``; warns when a table of that name is
    in the way, or when the view selects from another table (it is never re-pointed).

    Args:
        source_id: what the view reads (default ``cfg.table_id``: the table, or the view of
            the same name over compact rows).
    """
    source = source_id or cfg.table_id
    _ensure_view(
        client,
        cfg,
        f"{cfg.project}.{cfg.dataset}.{reads_view_name(cfg.table)}",
        bigquery_view_query(source),
        "One row per read of each decision (flattened access patterns)",
        source,
    )


def _ensure_view(
    client: Any,
    cfg: BigQuerySinkConfig,
    view_id: str,
    query: str,
    description: str,
    source_id: str,
) -> None:
    """Create the view ``view_id`` with ``query`` (which selects from ``source_id``), or update
    its query when it differs; a view that selects from another object is left as it is (a
    warning names both): it belongs to another deployment."""
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    timeout = cfg.timeout_s
    try:
        view = client.get_table(view_id, retry=None, timeout=timeout)
    except gexc.NotFound:
        view = bigquery.Table(view_id)
        view.view_query = query
        view.description = description
        client.create_table(view, exists_ok=True, retry=None, timeout=timeout)
        return
    if view.table_type != "VIEW":
        logger.warning("%s exists and is not a view; the view is not created", view_id)
    elif view.view_query is None:
        # BigQuery always returns a view's query; the emulator returns none. Leave it.
        logger.debug("%s: the server did not return the view's query; left as it is", view_id)
    elif view.view_query.strip() != query and f"`{source_id}`" not in view.view_query:
        logger.warning(
            "BigQuery view %s selects from another table, not from %s; it is left as it is and "
            "the reads of %s have no view (docs/bigquery.md, 'Several tables in one dataset')",
            view_id,
            source_id,
            source_id,
        )
    elif view.view_query.strip() != query:
        view.view_query = query
        client.update_table(view, ["view_query"], retry=None, timeout=timeout)
