"""The bars a run saw, kept next to its decisions so a report can be drawn from the store alone.

Decision records say what the agent read, not the whole price history: a price chart and a
buy-and-hold benchmark need every bar. :class:`BarRecorder` (an analyzer) keeps each feed's bars
as they arrive (backtests and live feeds alike: OHLCV, bar time, the bar's absolute index and
data hash, the same ones FMEL records in ``decision_reads``); at the end of the run the runner
writes them to the table ``session_bars`` of the same store (:func:`write_bars_duckdb`,
:func:`write_bars_bigquery`). Joining ``decision_reads.data_hash`` with
``session_bars.data_hash`` shows the whole bar behind every read.

Memory: 48 bytes a bar and feed plus a reference to the hash string the feed already holds. Feeds
whose hashes are computed on first use (CSV files) are not hashed on the bar loop: their hashes
are looked up by bar index when :meth:`BarRecorder.frame` builds the table (at write time).
Thread context: the analyzer runs on the main thread; the writers run wherever they are called.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import backtrader as bt
import numpy as np
import pandas as pd

from core.bars import feed_symbol
from core.time import BT_EPOCH_DAYS, SECONDS_PER_DAY
from feeds.csv.reader import bar_size_text

logger = logging.getLogger(__name__)

BARS_TABLE = "session_bars"
BAR_COLUMNS = (
    "session_id",
    "symbol",
    "bar_size",
    "bar_index",
    "bar_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "data_hash",
)
# (column, DuckDB type, BigQuery type, meaning)
BAR_SCHEMA: tuple[tuple[str, str, str, str], ...] = (
    ("session_id", "VARCHAR", "STRING", "run that saw the bar"),
    ("symbol", "VARCHAR", "STRING", "feed symbol"),
    ("bar_size", "VARCHAR", "STRING", "feed bar size: 1d, 1h, 5min, 1mo, ..."),
    ("bar_index", "BIGINT", "INT64", "absolute bar index in the feed (decision_reads.bar_index)"),
    ("bar_time", "TIMESTAMPTZ", "TIMESTAMP", "bar time, UTC"),
    ("open", "DOUBLE", "FLOAT64", "USD"),
    ("high", "DOUBLE", "FLOAT64", "USD"),
    ("low", "DOUBLE", "FLOAT64", "USD"),
    ("close", "DOUBLE", "FLOAT64", "USD"),
    ("volume", "DOUBLE", "FLOAT64", "shares/units"),
    ("data_hash", "VARCHAR", "STRING", "the bar's data hash (decision_reads.data_hash)"),
)


@dataclass(slots=True)
class _FeedBars:
    symbol: str
    data: Any
    bar_size: str
    seen: int = 0
    index: array[int] = field(default_factory=lambda: array("q"))
    times: array[float] = field(default_factory=lambda: array("d"))
    ohlcv: tuple[array[float], ...] = field(
        default_factory=lambda: tuple(array("d") for _ in range(5))
    )
    hashes: list[str | None] = field(default_factory=list)
    # a feed whose hashes are computed on first use (a CSV file's): resolved at write time,
    # by bar index, so the bar loop never hashes (see :meth:`_FeedBars.data_hashes`)
    lazy: Any = None

    def data_hashes(self) -> list[str | None]:
        """The data hash of every recorded bar, in order (lazy sources resolved now)."""
        if self.lazy is None:
            return self.hashes
        at = self.lazy.at
        return [at(i) for i in self.index]


class BarRecorder(bt.Analyzer):  # type: ignore[misc]
    """Every bar of every feed, recorded when it first appears at a strategy step."""

    def start(self) -> None:
        self._feeds = [
            _FeedBars(feed_symbol(d), d, bar_size_text(d._timeframe, d._compression))
            for d in self.strategy.datas
        ]
        for fb in self._feeds:
            hashes = getattr(fb.data, "bar_hashes", None)
            # BarHashes over a source (core.bars) keeps every bar and hashes on first use
            if hashes is not None and getattr(hashes, "_source", None) is not None:
                fb.lazy = hashes

    def _step(self) -> None:
        for fb in self._feeds:
            d = fb.data
            n = len(d)
            if n <= fb.seen:
                continue
            fb.seen = n
            fb.index.append(n - 1)
            fb.times.append(d.datetime[0])
            for arr, line in zip(fb.ohlcv, (d.open, d.high, d.low, d.close, d.volume)):
                arr.append(line[0])
            if fb.lazy is None:  # stored hashes (live feeds, bounded): take the reference now
                hashes = getattr(d, "bar_hashes", None)
                fb.hashes.append(hashes.at(n - 1) if hashes is not None else None)

    def prenext(self) -> None:
        self._step()

    def nextstart(self) -> None:
        self._step()

    def next(self) -> None:
        self._step()

    def frame(self, session_id: str) -> pd.DataFrame:
        """All bars as one frame with :data:`BAR_COLUMNS` (``bar_time`` aware UTC, ms)."""
        parts = []
        for fb in self._feeds:
            posix_ms = np.round((np.asarray(fb.times) - BT_EPOCH_DAYS) * SECONDS_PER_DAY * 1000)
            o, h, lo, c, v = (np.asarray(a) for a in fb.ohlcv)
            parts.append(
                pd.DataFrame(
                    {
                        "session_id": session_id,
                        "symbol": fb.symbol,
                        "bar_size": fb.bar_size,
                        "bar_index": np.asarray(fb.index, dtype=np.int64),
                        "bar_time": pd.to_datetime(posix_ms.astype(np.int64), unit="ms", utc=True),
                        "open": o,
                        "high": h,
                        "low": lo,
                        "close": c,
                        "volume": v,
                        "data_hash": pd.Series(fb.data_hashes(), dtype=object),
                    }
                )
            )
        if not parts:
            return pd.DataFrame(columns=list(BAR_COLUMNS))
        return pd.concat(parts, ignore_index=True)

    def get_analysis(self) -> dict[str, Any]:
        return {fb.symbol: fb.seen for fb in self._feeds}


def duckdb_bars_ddl(table: str = BARS_TABLE) -> str:
    cols = ", ".join(f'"{name}" {duck}' for name, duck, _, _ in BAR_SCHEMA)
    return f'CREATE TABLE IF NOT EXISTS "{table}" ({cols})'


def write_bars_duckdb(con: Any, bars: pd.DataFrame, table: str = BARS_TABLE) -> int:
    """Append ``bars`` (columns :data:`BAR_COLUMNS`) to ``table`` over an open DuckDB
    connection, replacing rows of the same sessions (a re-run of the writer is idempotent).
    Returns the rows written."""
    con.execute(duckdb_bars_ddl(table))
    sessions = sorted(set(bars["session_id"])) if len(bars) else []
    for s in sessions:
        con.execute(f'DELETE FROM "{table}" WHERE session_id = ?', [s])
    if len(bars):
        con.register("_report_bars", bars[list(BAR_COLUMNS)])
        try:
            con.execute(f'INSERT INTO "{table}" SELECT * FROM _report_bars')
        finally:
            con.unregister("_report_bars")
    return len(bars)


def bigquery_bars_schema() -> list[Any]:
    from google.cloud import bigquery

    return [
        bigquery.SchemaField(name, bq, mode="NULLABLE", description=desc)
        for name, _, bq, desc in BAR_SCHEMA
    ]


def bar_rows_json(bars: pd.DataFrame) -> list[dict[str, Any]]:
    """``insert_rows_json`` rows: timestamps as ISO-8601 UTC text, NaN as null."""
    out: list[dict[str, Any]] = []
    times = bars["bar_time"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").tolist()
    records: Sequence[Mapping[Any, Any]] = bars.to_dict("records")
    for rec, ts in zip(records, times):
        row: dict[str, Any] = {}
        for name in BAR_COLUMNS:
            value = rec[name]
            if name == "bar_time":
                value = ts
            elif isinstance(value, float) and not np.isfinite(value):
                value = None
            elif isinstance(value, np.integer):
                value = int(value)
            row[name] = value
        out.append(row)
    return out


def write_bars_bigquery(
    client: Any,
    dataset_id: str,
    bars: pd.DataFrame,
    *,
    table: str = BARS_TABLE,
    timeout_s: float = 30.0,
    chunk_rows: int = 500,
) -> int:
    """Create ``dataset_id.table`` when missing (partitioned by day on ``bar_time``) and stream
    ``bars`` into it with ``insert_rows_json``, 500 rows a request (BigQuery's recommended
    batch, "Quotas and limits", tabledata.insertAll) with row ids ``session:symbol:bar_index``
    (BigQuery's best-effort de-duplication of re-sends).

    Raises:
        RuntimeError: BigQuery refused rows (the message names the first one).
    """
    from google.cloud import bigquery

    table_id = f"{dataset_id}.{table}"
    spec = bigquery.Table(table_id, schema=bigquery_bars_schema())
    spec.time_partitioning = bigquery.TimePartitioning(field="bar_time")
    spec.clustering_fields = ["session_id", "symbol"]
    client.create_table(spec, exists_ok=True, timeout=timeout_s, retry=None)
    rows = bar_rows_json(bars)
    for i in range(0, len(rows), chunk_rows):
        chunk = rows[i : i + chunk_rows]
        ids = [f"{r['session_id']}:{r['symbol']}:{r['bar_index']}" for r in chunk]
        errors = client.insert_rows_json(
            table_id, chunk, row_ids=ids, timeout=timeout_s, retry=None
        )
        if errors:
            raise RuntimeError(f"BigQuery refused bars of {table_id}: {errors[0]}")
    return len(rows)
