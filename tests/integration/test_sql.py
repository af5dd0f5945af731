"""Every query in ``sql/`` answers what a real run did, on BigQuery (bqemulator) and DuckDB.

One backtest (two real symbols, three years, an SMA-cross agent that also reads windows, looks
back and peeks ahead once) runs twice through the real :class:`runtime.runner.Runner`: once
writing to the emulator with :class:`analyzers.sinks.bigquery.sink.BigQuerySink`, once to a
local DuckDB store. Expected answers are computed here, in Python, from two independent
witnesses of each run: the decision records the FMEL analyzer handed to the writer (tapped on
their way in) and backtrader's own order notifications (an extra analyzer that logs them). The
CSV file itself is the witness of the look-ahead value.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import backtrader as bt
import duckdb
import pandas as pd
import pytest

from analyzers.schema import DecisionRecord, utc_datetime
from analyzers.sinks.views import bigquery_view_query, duckdb_view_sql
from runtime.config import load_config
from runtime.runner import Runner
from tests.bqemu_harness import BigQueryEmulator, unique_dataset
from tests.conftest import DATA

SQL = Path(__file__).resolve().parents[2] / "sql"
QUERIES = sorted(p.stem for p in (SQL / "bigquery").glob("*.sql"))
RUN_ENV = {
    "SYMBOLS": "GOOG,SP500",
    "BACKTEST_START": "2009-01-01",
    "BACKTEST_END": "2011-12-31",
    "AGENT": "tests.bq_agents:PeekingSmaAgent",
    "FMEL_BATCH_SIZE": "50",
    "FMEL_FLUSH_INTERVAL_S": "0.5",
    "PROGRESS": "off",
}

pytestmark = pytest.mark.slow


class OrderLog(bt.Analyzer):  # type: ignore[misc]
    """backtrader's own order notifications, as they arrive."""

    params = (("out", None),)

    def notify_order(self, order: Any) -> None:
        self.p.out.append(
            {
                "ref": int(order.ref),
                "status": order.getstatusname().upper(),
                "side": "BUY" if order.isbuy() else "SELL",
                "symbol": order.data._name,
                "size": abs(float(order.created.size)),
                "exec_size": abs(float(order.executed.size)),
                "exec_price": float(order.executed.price or 0.0),
                "comm": float(order.executed.comm or 0.0),
            }
        )


@dataclass
class Run:
    """One run: its session, the records it produced and backtrader's order notifications."""

    session_id: str
    records: list[DecisionRecord] = field(default_factory=list)
    orders: list[dict[str, Any]] = field(default_factory=list)
    written: int = 0


def run_once(env: dict[str, str], session_id: str) -> Run:
    out = Run(session_id)
    runner = Runner(load_config({**RUN_ENV, **env}), session_id=session_id)
    runner.build()
    writer = runner.writer
    assert writer is not None
    submit = writer.submit

    def tap(record: Any) -> None:
        out.records.append(record)
        submit(record)

    writer.submit = tap  # type: ignore[method-assign]
    runner.cerebro.addanalyzer(OrderLog, _name="orderlog", out=out.orders)
    report = runner.run()
    out.written = report.records_written
    assert report.records_spilled == 0 and report.records_rejected == 0
    assert report.decisions == len(out.records) == report.records_written
    return out


@dataclass
class Stores:
    emu: BigQueryEmulator
    dataset: str
    bq: Run
    duck_path: Path
    local: Run


@pytest.fixture(scope="module")
def stores(
    bq_emulator: BigQueryEmulator,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stores]:
    tmp = tmp_path_factory.mktemp("sql")
    dataset = unique_dataset("sql")
    bq = run_once(
        {
            "FMEL_SINK": "bigquery",
            "FMEL_DATASET": dataset,
            "FMEL_SPILL_DIR": str(tmp / "spill-bq"),
            **bq_emulator.env(),
        },
        "sql-bq-session",
    )
    duck_path = tmp / "fmel.duckdb"
    local = run_once(
        {
            "FMEL_SINK": "local",
            "FMEL_LOCAL_PATH": str(duck_path),
            "FMEL_SPILL_DIR": str(tmp / "spill-local"),
        },
        "sql-local-session",
    )
    yield Stores(bq_emulator, dataset, bq, duck_path, local)


# ---------------------------------------------------------------------------------------------
# Running the files
# ---------------------------------------------------------------------------------------------


def sql_text(dialect: str, name: str) -> str:
    return (SQL / dialect / f"{name}.sql").read_text(encoding="utf-8")


def run_bq(st: Stores, name: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    from google.cloud import bigquery

    text = re.sub(r"\bfmel\.", f"{st.dataset}.", sql_text("bigquery", name))
    qp = [bigquery.ScalarQueryParameter(k, "STRING", v) for k, v in (params or {}).items()]
    return st.emu.query(text, qp)


def run_duck(st: Stores, name: str, params: dict[str, str] | None = None) -> list[dict[str, Any]]:
    with duckdb.connect(str(st.duck_path), read_only=True) as con:
        rel = con.execute(sql_text("duckdb", name), params or {})
        cols = [d[0] for d in rel.description]
        return [dict(zip(cols, row, strict=True)) for row in rel.fetchall()]


def norm(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, pd.Timestamp):
        return norm(value.to_pydatetime())
    return value


def table(rows: list[dict[str, Any]], cols: tuple[str, ...]) -> list[tuple[Any, ...]]:
    return [tuple(norm(r[c]) for c in cols) for r in rows]


def both(
    st: Stores, name: str, params: dict[str, str] | None = None
) -> list[tuple[Run, list[dict[str, Any]]]]:
    """The query's rows on each store, with the run that filled it."""
    return [(st.bq, run_bq(st, name, params)), (st.local, run_duck(st, name, params))]


# ---------------------------------------------------------------------------------------------
# Expected answers, from the witnesses
# ---------------------------------------------------------------------------------------------


def accesses(rec: DecisionRecord) -> Iterator[tuple[str, Any]]:
    for da in rec.data_accessed:
        for ap in da.access_patterns:
            yield da.symbol, ap


def final_orders(run: Run) -> dict[int, dict[str, Any]]:
    """Last notification of each order (backtrader's view of how it ended)."""
    last: dict[int, dict[str, Any]] = {}
    for n in run.orders:
        last[n["ref"]] = n
    return last


def test_every_query_exists_in_both_dialects() -> None:
    assert sorted(p.stem for p in (SQL / "duckdb").glob("*.sql")) == QUERIES
    assert {
        "session_summary",
        "action_counts",
        "fields_before_trades",
        "lookback_depth",
        "lookahead_reads",
        "decisions_by_data_hash",
        "order_outcomes",
        "decision_reads_view",
    } <= set(QUERIES)


def test_the_runs_are_the_same_backtest(stores: Stores) -> None:
    """Same data and agent: both stores must tell the same story (bar for bar)."""
    a, b = stores.bq.records, stores.local.records
    assert len(a) == len(b) > 500
    for x, y in zip(a, b, strict=True):
        assert (x.bar_time, x.action, x.reads, x.portfolio_value) == (
            y.bar_time,
            y.action,
            y.reads,
            y.portfolio_value,
        )


def test_session_summary(stores: Stores) -> None:
    for run, rows in both(stores, "session_summary"):
        recs = sorted(run.records, key=lambda r: r.decision_point)
        acts = collections.Counter(r.action for r in recs)
        notes = collections.Counter(n["status"] for n in run.orders)
        expected = [
            (
                run.session_id,
                "PeekingSmaAgent",
                "backtest",
                len(recs),
                utc_datetime(min(r.bar_time for r in recs)),
                utc_datetime(max(r.bar_time for r in recs)),
                acts["BUY"],
                acts["SELL"],
                acts["HOLD"],
                len(final_orders(run)),  # every order backtrader notified about was created
                notes["COMPLETED"],
                sum(r.reads for r in recs),
                sum(r.lookahead_reads for r in recs),
                norm(recs[0].portfolio_value),
                norm(recs[-1].portfolio_value),
            )
        ]
        cols = (
            "session_id",
            "agent_id",
            "mode",
            "decisions",
            "first_bar",
            "last_bar",
            "buy_decisions",
            "sell_decisions",
            "hold_decisions",
            "orders_created",
            "orders_filled",
            "reads",
            "lookahead_reads",
            "first_value_usd",
            "last_value_usd",
        )
        assert table(rows, cols) == expected
        assert acts["BUY"] > 5 and acts["SELL"] > 5 and sum(r.lookahead_reads for r in recs) == 1


def test_action_counts(stores: Stores) -> None:
    for run, rows in both(stores, "action_counts"):
        expected: list[tuple[Any, ...]] = [
            (run.session_id, "decision", action, None, n)
            for action, n in collections.Counter(r.action for r in run.records).items()
        ]
        # Order events from backtrader's notifications; CREATED once per order it notified.
        events = collections.Counter((n["status"], n["side"]) for n in run.orders)
        for order in final_orders(run).values():
            events["CREATED", order["side"]] += 1
        expected += [
            (run.session_id, "order_event", ev, side, n) for (ev, side), n in events.items()
        ]
        got = table(rows, ("session_id", "kind", "name", "side", "n"))
        assert sorted(got, key=repr) == sorted(expected, key=repr)


def test_fields_before_trades(stores: Stores) -> None:
    for run, rows in both(stores, "fields_before_trades"):
        expected = []
        for rec in run.records:
            if rec.action not in ("BUY", "SELL", "BUY+SELL"):
                continue
            groups: dict[tuple[str, str], list[Any]] = collections.defaultdict(list)
            for symbol, ap in accesses(rec):
                groups[symbol, ap.field].append(ap)
            for (symbol, fld), aps in groups.items():
                expected.append(
                    (
                        rec.decision_point,
                        rec.action,
                        symbol,
                        fld,
                        len(aps),
                        max(a.size - 1 - a.index for a in aps),
                        norm(max(aps, key=lambda a: a.seq).value),
                    )
                )
        got = table(
            rows,
            (
                "decision_point",
                "action",
                "symbol",
                "field",
                "reads",
                "deepest_lookback_bars",
                "last_value",
            ),
        )
        assert sorted(got, key=repr) == sorted(expected, key=repr)
        trades = {r.decision_point for r in run.records if r.action != "HOLD"}
        assert {g[0] for g in got} == trades  # every trade read something first


def test_lookback_depth(stores: Stores) -> None:
    for run, rows in both(stores, "lookback_depth"):
        reads: collections.Counter[int] = collections.Counter()
        decisions: dict[int, set[int]] = collections.defaultdict(set)
        for rec in run.records:
            for _, ap in accesses(rec):
                if not ap.lookahead:
                    depth = ap.size - 1 - ap.index
                    reads[depth] += 1
                    decisions[depth].add(rec.decision_point)
        expected = [(run.session_id, d, reads[d], len(decisions[d])) for d in sorted(reads)]
        assert table(rows, ("session_id", "depth_bars", "reads", "decisions")) == expected
        # The agent's own params: windows of 3 reach 2 bars back, close[-5] reaches 5.
        assert {0, 2, 5} <= set(reads)


def test_lookahead_reads(stores: Stores) -> None:
    goog = pd.read_csv(DATA / "GOOG.csv", index_col=0, parse_dates=True)
    for run, rows in both(stores, "lookahead_reads"):
        expected = [
            (
                rec.decision_point,
                symbol,
                ap.field,
                ap.index,
                ap.bar_index,
                ap.data_hash,
                norm(ap.value),
            )
            for rec in run.records
            for symbol, ap in accesses(rec)
            if ap.lookahead
        ]
        got = table(
            rows,
            ("decision_point", "symbol", "field", "bars_ahead", "bar_index", "data_hash", "value"),
        )
        assert got == expected and len(got) == 1
        # The CSV says what the peek saw: the close of GOOG's next row.
        bar_time = next(r.bar_time for r in run.records if r.lookahead_reads)
        pos = goog.index.get_loc(pd.Timestamp(utc_datetime(bar_time).replace(tzinfo=None)))
        assert got[0][1] == "GOOG" and got[0][6] == norm(float(goog["Close"].iloc[pos + 1]))


def test_decisions_by_data_hash(stores: Stores) -> None:
    for run, _ in both(stores, "session_summary"):
        # A GOOG bar that several decisions saw: the one read 5 bars back at a lookback read.
        rec = next(
            r
            for r in run.records
            if any(ap.index == -5 for _, ap in accesses(r)) and r.decision_point > 100
        )
        h = next(ap.data_hash for _, ap in accesses(rec) if ap.index == -5)
        assert h
        rows = (
            run_bq(stores, "decisions_by_data_hash", {"data_hash": h})
            if run is stores.bq
            else run_duck(stores, "decisions_by_data_hash", {"data_hash": h})
        )
        expected = []
        for r in run.records:
            for da in r.data_accessed:
                n = sum(1 for ap in da.access_patterns if ap.data_hash == h)
                if da.data_hash == h or n:
                    expected.append((r.decision_point, da.symbol, da.data_hash == h, n))
        got = table(rows, ("decision_point", "symbol", "current_bar", "reads"))
        assert got == expected
        # That bar was current 5 decisions before, and read back again at our decision.
        assert any(e[2] for e in expected) and any(e[0] == rec.decision_point for e in expected)


def test_order_outcomes(stores: Stores) -> None:
    for run, rows in both(stores, "order_outcomes"):
        created = {
            a.order_ref: (rec.decision_point, a.symbol, a.side, a.order_type)
            for rec in run.records
            for a in rec.actions
            if a.event == "CREATED"
        }
        expected = []
        for ref, last in final_orders(run).items():
            point, symbol, side, otype = created[ref]
            filled = last["exec_size"]
            expected.append(
                (
                    point,
                    ref,
                    last["symbol"],
                    last["side"],
                    last["size"],
                    last["status"],
                    norm(filled),
                    norm(last["exec_price"]) if filled else None,
                    norm(last["comm"]),
                )
            )
            assert (symbol, side, otype) == (last["symbol"], last["side"], "Market")
        got = table(
            rows,
            (
                "decision_point",
                "order_ref",
                "symbol",
                "side",
                "size",
                "final_status",
                "filled_size",
                "avg_fill_price",
                "commission_usd",
            ),
        )
        assert sorted(got) == sorted(expected)
        assert len(got) == len(created) > 10
        assert all(g[5] == "COMPLETED" for g in got)  # market orders on daily bars all fill


def test_decision_reads_view(stores: Stores) -> None:
    """The view BI tools read: one row per read. Created by both sinks at start from the sql/
    files."""
    flat = " ".join
    sink_view = bigquery_view_query("fmel.decisions").replace("`fmel.decisions`", "fmel.decisions")
    assert flat(sink_view.split()) in flat(sql_text("bigquery", "decision_reads_view").split())
    duck_view = duckdb_view_sql()
    assert flat(duck_view.split()) in flat(sql_text("duckdb", "decision_reads_view").split())
    for run, rows in (
        (
            stores.bq,
            stores.emu.query(
                f"SELECT decision_point, symbol, seq, field, `index`, value FROM "
                f"{stores.dataset}.decision_reads"
            ),
        ),
        (
            stores.local,
            run_duck_text(
                stores,
                'SELECT decision_point, symbol, seq, field, "index", value FROM decision_reads',
            ),
        ),
    ):
        expected = [
            (rec.decision_point, s, ap.seq, ap.field, ap.index, norm(ap.value))
            for rec in run.records
            for s, ap in accesses(rec)
        ]
        got = table(rows, ("decision_point", "symbol", "seq", "field", "index", "value"))
        assert sorted(got, key=repr) == sorted(expected, key=repr)


def test_the_view_file_creates_the_view(stores: Stores) -> None:
    """Running sql/*/decision_reads_view.sql by hand (another dataset) works on both."""
    text = re.sub(r"\bfmel\.", f"{stores.dataset}.", sql_text("bigquery", "decision_reads_view"))
    stores.emu.query(text.replace("decision_reads AS", "decision_reads_by_hand AS"))
    n_bq = stores.emu.query(f"SELECT COUNT(*) AS n FROM {stores.dataset}.decision_reads_by_hand")
    with duckdb.connect(":memory:") as con:
        con.execute(f"ATTACH '{stores.duck_path}' AS s (READ_ONLY)")
        con.execute("CREATE TABLE decisions AS SELECT * FROM s.decisions")
        con.execute(sql_text("duckdb", "decision_reads_view"))
        n_duck = con.execute("SELECT count(*) FROM decision_reads").fetchone()
    assert n_bq[0]["n"] == sum(r.reads for r in stores.bq.records)
    assert n_duck is not None and n_duck[0] == sum(r.reads for r in stores.local.records)


def run_duck_text(st: Stores, sql: str) -> list[dict[str, Any]]:
    with duckdb.connect(str(st.duck_path), read_only=True) as con:
        rel = con.execute(sql)
        cols = [d[0] for d in rel.description]
        return [dict(zip(cols, row, strict=True)) for row in rel.fetchall()]


def test_decision_reads_are_the_same_on_both_stores(stores: Stores) -> None:
    """The same run, read through ``decision_reads`` on BigQuery (compact rows under the
    ``decisions`` view) and on DuckDB (one element per read): every column of every read is the
    same (the session ids differ by construction)."""
    client = stores.emu.client()
    try:
        kinds = {
            t.table_id: t.table_type
            for t in client.list_tables(f"{stores.emu.project}.{stores.dataset}")
        }
    finally:
        client.close()
    assert {k: kinds.get(k) for k in ("decisions", "decision_reads", "decisions_compact")} == {
        "decisions": "VIEW",
        "decision_reads": "VIEW",
        "decisions_compact": "TABLE",
    }
    cols = (
        "agent_id",
        "decision_point",
        "bar_time",
        "stage",
        "action",
        "symbol",
        "seq",
        "field",
        "index",
        "size",
        "bar_index",
        "data_hash",
        "value",
        "text_value",
        "lookahead",
    )
    bq = stores.emu.query(
        "SELECT decision_id, "
        + ", ".join(f"`{c}`" for c in cols)
        + f" FROM {stores.dataset}.decision_reads"
    )
    duck = run_duck_text(
        stores,
        "SELECT decision_id, " + ", ".join(f'"{c}"' for c in cols) + " FROM decision_reads",
    )

    def rows(got: list[dict[str, Any]], session: str) -> list[tuple[Any, ...]]:
        assert all(str(r["decision_id"]).startswith(session + ":") for r in got)
        return sorted(table(got, cols), key=repr)

    assert len(bq) == sum(r.reads for r in stores.bq.records) > 1_000
    assert rows(bq, stores.bq.session_id) == rows(duck, stores.local.session_id)
