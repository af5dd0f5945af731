"""The decision schema: one definition, two renderings, and two equal JSON encodings."""

from __future__ import annotations

import json
import math

import backtrader as bt
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.rsi_agent import RsiAgent
from analyzers import schema
from analyzers.fmel import FMELAnalyzer
from analyzers.schema import (
    DECISION_SCHEMA,
    Access,
    Action,
    DataAccess,
    DecisionRecord,
    Position,
    RunInfo,
    bigquery_schema,
    duckdb_columns,
    row_json,
    to_row,
)
from feeds.csv import CSVFeedConfig, make_csv_feed
from tests.conftest import DATA


def test_fast_json_equals_the_dict_rows_of_a_real_run() -> None:
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(
        make_csv_feed(CSVFeedConfig(path=DATA / "enriched" / "GOOG.csv", symbol="GOOG")),
        name="GOOG",
    )
    cerebro.addstrategy(RsiAgent)
    cerebro.addanalyzer(FMELAnalyzer, _name="fmel")
    records = cerebro.run()[0].analyzers.fmel.records
    assert any(r.actions for r in records) and any(r.notes for r in records)
    for rec in records:
        assert json.loads(row_json(rec)) == to_row(rec)


def test_non_finite_numbers_and_odd_text_become_valid_json() -> None:
    run = RunInfo('s"1', "a\\b", "backtest", "m.C", '{"x": 1}', None)
    rec = DecisionRecord(
        run,
        7,
        1.5,
        86_400.0,
        "NEXT",
        "BUY",
        (Action(0, "CREATED", "BUY", "BTC/USD", 3, "Market", 0.5, None),),
        (
            DataAccess(
                "BTC/USD",
                "h",
                ("close", "headline"),
                (
                    Access(0, "close", -1, 1, 4, "h", math.nan, None, False),
                    Access(1, "headline", 0, 1, 5, "h", None, 'ünïcode "quoted"\n', False),
                ),
            ),
        ),
        2,
        0,
        math.inf,
        10.0,
        (Position("BTC/USD", 0.5, 100.0),),
        None,
        0.5,
        None,
    )
    row = json.loads(row_json(rec))
    assert row == to_row(rec)
    assert row["portfolio_value"] is None
    assert row["data_accessed"][0]["access_patterns"][0]["value"] is None
    assert row["bar_time"] == "1970-01-02T00:00:00Z" and row["decision_id"] == 's"1:7'


def test_both_renderings_have_the_same_columns() -> None:
    names = [f.name for f in DECISION_SCHEMA]
    assert [c for c, _ in duckdb_columns()] == names
    assert [f.name for f in bigquery_schema()] == names
    types = dict(duckdb_columns())
    assert types["data_accessed"].startswith("STRUCT(") and types["data_accessed"].endswith("[]")
    assert types["bar_time"] == "TIMESTAMPTZ"


def _outcome(fn: object, x: object) -> tuple[str, str]:
    try:
        return ("ok", fn(x))  # type: ignore[operator]
    except Exception as e:
        return ("raises", type(e).__name__)


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.floats(min_value=-62_135_596_800.0, max_value=253_402_300_799.0),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.booleans(),
    )
)
def test_bar_times_convert_the_same_through_the_cache(x: float) -> None:
    """``_ts`` keeps the texts of float bar times in a bounded cache (the spill of read-heavy
    records at a stop): every float, int and bool converts, or fails, as
    ``datetime.fromtimestamp`` alone makes it, the first time and the next."""
    plain = _outcome(schema._iso_utc, x)
    assert _outcome(schema._ts, x) == plain
    assert _outcome(schema._ts, x) == plain  # from the cache now, for a float
