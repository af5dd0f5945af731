"""Read what a report needs from a decision store: the local DuckDB file or BigQuery.

:class:`DuckDBStore` and :class:`BigQueryStore` answer the same questions with the same SQL in
two dialects (``UNNEST`` aliases, identifier quotes, parameters and list membership differ);
:func:`load_run` turns the answers into a :class:`ReportData`, :func:`load_trials` reads the
``trials`` table of an optimisation (:mod:`runtime.research.store`).

Thread context: any thread; one store object per thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pandas as pd

from core.errors import ConfigError, DataError
from runtime.reporting.bars import BAR_COLUMNS, BARS_TABLE

logger = logging.getLogger(__name__)

#: Orders shown in the decision explorer at most (the newest are dropped first: a run that
#: trades on every bar still gives a page a browser opens).
MAX_EXPLORER_ORDERS = 2_000

Dialect = Literal["duckdb", "bigquery"]


class ReportStore(Protocol):
    """A store the report reads from."""

    dialect: Dialect

    def table(self, name: str) -> str:
        """The quoted name of table or view ``name``."""
        ...

    def has_table(self, name: str) -> bool: ...

    def frame(self, sql: str, params: dict[str, Any]) -> pd.DataFrame:
        """Rows of ``sql`` (parameters ``{session}``/``{points}`` already in dialect form) as a
        frame; ``params`` maps names to a str or a list of ints."""
        ...

    def describe(self) -> str: ...


class DuckDBStore:
    """The local decision store (``FMEL_LOCAL_PATH``), opened read-only.

    Raises:
        ConfigError: the file does not exist or cannot be opened (names the file).
    """

    dialect: Dialect = "duckdb"

    def __init__(self, path: Path, *, con: Any = None) -> None:
        import duckdb

        self.path = Path(path)
        if con is not None:
            self._con = con
            return
        if not self.path.is_file():
            raise ConfigError(f"--db {self.path}: no such DuckDB file")
        try:
            self._con = duckdb.connect(str(self.path), read_only=True)
        except duckdb.Error as e:
            raise ConfigError(f"--db {self.path}: cannot open ({e})") from e

    def table(self, name: str) -> str:
        return f'"{name}"'

    def has_table(self, name: str) -> bool:
        rows = self._con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
        ).fetchall()
        return bool(rows[0][0])

    def frame(self, sql: str, params: dict[str, Any]) -> pd.DataFrame:
        df: pd.DataFrame = self._con.execute(sql, params).df()
        return df

    def describe(self) -> str:
        return f"duckdb:{self.path}"

    def close(self) -> None:
        self._con.close()


class BigQueryStore:
    """A BigQuery dataset holding ``decisions`` (and ``session_bars``, ``trials``), read with
    the real ``google-cloud-bigquery`` client.

    Args:
        client: a ``google.cloud.bigquery.Client``.
        project, dataset: where the tables are.
        decisions_table: the decision table's name (``FMEL_TABLE``).
        timeout_s: timeout of one request, seconds.
        deadline: ``time.monotonic()`` time by which every request must be done (a run
            stopping within its shutdown budget); each request's timeout is cut to it, and
            past it a request raises :class:`TimeoutError` without being sent. None: no bound.
    """

    dialect: Dialect = "bigquery"

    def __init__(
        self,
        client: Any,
        project: str,
        dataset: str,
        *,
        decisions_table: str = "decisions",
        timeout_s: float = 60.0,
        deadline: float | None = None,
    ) -> None:
        self.client = client
        self.project = project
        self.dataset = dataset
        self.timeout_s = timeout_s
        self.deadline = deadline
        self._names = {"decisions": decisions_table}

    def request_timeout(self) -> float:
        """The next request's timeout, seconds (cut to :attr:`deadline`).

        Raises:
            TimeoutError: the deadline passed.
        """
        if self.deadline is None:
            return self.timeout_s
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("BigQuery report: the shutdown budget is spent")
        return min(self.timeout_s, left)

    def table(self, name: str) -> str:
        return f"`{self.project}.{self.dataset}.{self._names.get(name, name)}`"

    def has_table(self, name: str) -> bool:
        from google.api_core.exceptions import NotFound

        try:
            self.client.get_table(
                f"{self.project}.{self.dataset}.{self._names.get(name, name)}",
                timeout=self.request_timeout(),
                retry=None,
            )
        except NotFound:
            return False
        return True

    def frame(self, sql: str, params: dict[str, Any]) -> pd.DataFrame:
        from google.cloud import bigquery

        from analyzers.sinks.bigquery.client import query_result

        qp: list[Any] = []
        for name, value in params.items():
            if isinstance(value, list):
                qp.append(bigquery.ArrayQueryParameter(name, "INT64", value))
            else:
                qp.append(bigquery.ScalarQueryParameter(name, "STRING", value))
        result = query_result(self.client, sql, self.request_timeout(), qp)
        # The result's columns also when it has no rows (an agent that never traded: no
        # order events, yet the page selects on their columns).
        columns = [f.name for f in result.schema]
        return pd.DataFrame([dict(r.items()) for r in result], columns=columns)

    def describe(self) -> str:
        return f"bigquery:{self.project}.{self.dataset}"


def _sql(store: ReportStore, text: str) -> str:
    """Fill the dialect parts of ``text``: ``{T:name}`` tables, ``{session}``, ``{points}``
    (membership test of ``decision_point``), ``{actions}`` (UNNEST of ``d.actions`` as ``a``),
    ``{q:name}`` quoted column."""
    duck = store.dialect == "duckdb"
    out = text
    for name in ("decisions", "decision_reads", BARS_TABLE, "trials", "folds"):
        out = out.replace("{T:" + name + "}", store.table(name))
    out = out.replace("{session}", "$session" if duck else "@session")
    out = out.replace(
        "{points}",
        "list_contains($points, d.decision_point)"
        if duck
        else "d.decision_point IN UNNEST(@points)",
    )
    out = out.replace(
        "{actions}", "UNNEST(d.actions) AS t(a)" if duck else "UNNEST(d.actions) AS a"
    )
    out = out.replace("{q:index}", '"index"' if duck else "`index`")
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportData:
    """Everything one run's report shows, read from the store.

    Attributes:
        session_id, agent_id, agent_class, agent_params, mode: from the decision records.
        equity: portfolio value (USD) by bar time (aware UTC), one point per decision.
        bars: the run's bars (:data:`~runtime.reporting.bars.BAR_COLUMNS`); empty when the
            store has no ``session_bars`` rows for the session (then no price chart and no
            benchmark).
        actions: every order event (decision_point, bar_time, seq, event, side, symbol,
            order_ref, order_type, size, price, exec_size, exec_price, commission, reason).
        decisions: the decisions that created the orders in the explorer (decision_point,
            bar_time, stage, action, reasoning, confidence, notes, reads, lookahead_reads,
            portfolio_value, portfolio_cash).
        reads: every read of those decisions (decision_point, symbol, seq, field, index, size,
            bar_index, data_hash, value, text_value, lookahead).
        orders_left_out: orders beyond :data:`MAX_EXPLORER_ORDERS` not in the explorer.
        source: where it was read from (``duckdb:/path``).
    """

    session_id: str
    agent_id: str
    agent_class: str
    agent_params: str
    mode: str
    equity: pd.Series
    bars: pd.DataFrame
    actions: pd.DataFrame
    decisions: pd.DataFrame
    reads: pd.DataFrame
    orders_left_out: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


_INFO_SQL = """
SELECT any_value(agent_id) AS agent_id, any_value(agent_class) AS agent_class,
       any_value(agent_params) AS agent_params, any_value(mode) AS mode, count(*) AS n
FROM {T:decisions} WHERE session_id = {session}
"""
_EQUITY_SQL = """
SELECT bar_time, portfolio_value FROM {T:decisions}
WHERE session_id = {session} ORDER BY decision_point
"""
_ACTIONS_SQL = """
SELECT d.decision_point, d.bar_time, a.seq, a.event, a.side, a.symbol, a.order_ref,
       a.order_type, a.size, a.price, a.exec_size, a.exec_price, a.commission, a.reason
FROM {T:decisions} AS d, {actions}
WHERE d.session_id = {session}
ORDER BY d.decision_point, a.seq
"""
_DECISIONS_SQL = """
SELECT d.decision_point, d.bar_time, d.stage, d.action, d.reasoning, d.confidence, d.notes,
       d.reads, d.lookahead_reads, d.portfolio_value, d.portfolio_cash
FROM {T:decisions} AS d
WHERE d.session_id = {session} AND {points}
ORDER BY d.decision_point
"""
_READS_SQL = """
SELECT d.decision_point, d.symbol, d.seq, d.field, d.{q:index} AS idx, d.size, d.bar_index,
       d.data_hash, d.value, d.text_value, d.lookahead
FROM {T:decision_reads} AS d
WHERE d.session_id = {session} AND {points}
ORDER BY d.decision_point, d.seq
"""
_BARS_SQL = """
SELECT {cols} FROM {T:session_bars}
WHERE session_id = {session} ORDER BY symbol, bar_index
"""
_STUDY_SQL = "SELECT * FROM {T:trials} WHERE study_id = {session} ORDER BY fold, trial"
_FOLDS_SQL = "SELECT * FROM {T:folds} WHERE study_id = {session} ORDER BY fold"


def _utc(col: pd.Series) -> pd.Series:
    return pd.to_datetime(col, utc=True)


def session_exists(store: ReportStore, session_id: str) -> bool:
    """The store holds decisions of ``session_id``."""
    info = store.frame(_sql(store, _INFO_SQL), {"session": session_id})
    return bool(len(info)) and int(info["n"].iloc[0] or 0) > 0


def load_run(store: ReportStore, session_id: str) -> ReportData:
    """Read one run's report data.

    Raises:
        DataError: the store has no decisions of ``session_id``.
    """
    params: dict[str, Any] = {"session": session_id}
    info = store.frame(_sql(store, _INFO_SQL), params)
    if not len(info) or int(info["n"].iloc[0] or 0) == 0:
        raise DataError(f"{store.describe()}: no decisions of session {session_id!r}")
    row = info.iloc[0]
    eq = store.frame(_sql(store, _EQUITY_SQL), params)
    equity = pd.Series(
        eq["portfolio_value"].astype(float).to_numpy(),
        index=pd.DatetimeIndex(_utc(eq["bar_time"])),
        name="portfolio_value",
    )
    actions = store.frame(_sql(store, _ACTIONS_SQL), params)
    if len(actions):
        actions["bar_time"] = _utc(actions["bar_time"])
    created = actions[actions["event"] == "CREATED"] if len(actions) else actions
    points = sorted({int(p) for p in created["decision_point"]}) if len(created) else []
    left_out = 0
    if len(created) > MAX_EXPLORER_ORDERS:
        keep = created.iloc[:MAX_EXPLORER_ORDERS]
        left_out = len(created) - MAX_EXPLORER_ORDERS
        points = sorted({int(p) for p in keep["decision_point"]})
    decisions = store.frame(_sql(store, _DECISIONS_SQL), {**params, "points": points})
    reads = store.frame(_sql(store, _READS_SQL), {**params, "points": points})
    if len(decisions):
        decisions["bar_time"] = _utc(decisions["bar_time"])
    if store.has_table(BARS_TABLE):
        cols = ", ".join(BAR_COLUMNS)
        bars = store.frame(_sql(store, _BARS_SQL.replace("{cols}", cols)), params)
        if len(bars):
            bars["bar_time"] = _utc(bars["bar_time"])
    else:
        bars = pd.DataFrame(columns=list(BAR_COLUMNS))
    return ReportData(
        session_id=session_id,
        agent_id=str(row["agent_id"]),
        agent_class=str(row["agent_class"]),
        agent_params=str(row["agent_params"]),
        mode=str(row["mode"]),
        equity=equity,
        bars=bars,
        actions=actions,
        decisions=decisions,
        reads=reads,
        orders_left_out=left_out,
        source=store.describe(),
    )


def load_study(store: ReportStore, study_id: str) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The ``trials`` of an optimisation and its ``folds`` (``None`` when the store has no
    ``folds`` table). Empty trials when the study is unknown or there is no ``trials`` table."""
    if not store.has_table("trials"):
        return pd.DataFrame(), None
    params = {"session": study_id}
    trials = store.frame(_sql(store, _STUDY_SQL), params)
    folds = store.frame(_sql(store, _FOLDS_SQL), params) if store.has_table("folds") else None
    return trials, folds


def sessions(store: ReportStore) -> Sequence[str]:
    """Session ids in the store, newest first (session ids sort by start time)."""
    df = store.frame(
        _sql(store, "SELECT DISTINCT session_id FROM {T:decisions} ORDER BY session_id DESC"), {}
    )
    return [str(s) for s in df["session_id"]] if len(df) else []
