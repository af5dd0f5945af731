"""The ingestor's pure parts: risk metrics, the message contract (an ingested bar hashes like the
same bar read from CSV and decodes as the runner decodes it), time parsing, the state file,
user indicators, configuration."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from core.errors import ConfigError, DataError
from core.time import iso_utc
from feeds.csv import CSVFeedConfig, read_csv_bars
from feeds.ingest.alpaca import parse_rfc3339_ns
from feeds.ingest.enrich import RISK_FIELDS, BarView, Enricher, Trades, risk_metrics
from feeds.ingest.messages import build_message
from feeds.ingest.state import MAX_GAPS_KEPT, Gap, IngestState, StateLock
from feeds.pubsub.messages import decode_message
from runtime.config import load_ingest_config
from tests.alpaca_market_server import rfc3339

# -- risk metrics --------------------------------------------------------------------------------


def test_risk_metrics_by_hand() -> None:
    # prices 100, 101, 100, 102; sizes 1, 2, 1, 4
    t = Trades.of([(100.0, 1.0), (101.0, 2.0), (100.0, 1.0), (102.0, 4.0)])
    m = risk_metrics(t)
    r = [math.log(101 / 100), math.log(100 / 101), math.log(102 / 100)]
    rv = sum(x * x for x in r)
    bv = math.pi / 2 * (abs(r[1]) * abs(r[0]) + abs(r[2]) * abs(r[1]))
    assert m["trades_used"] == 4.0
    assert m["trade_vwap"] == pytest.approx((100 + 202 + 100 + 408) / 8, rel=1e-15)
    assert m["realized_var"] == pytest.approx(rv, rel=1e-12)
    assert m["bipower_var"] == pytest.approx(bv, rel=1e-12)
    assert m["jump_ratio"] == pytest.approx((rv - bv) / rv, rel=1e-12)


@pytest.mark.parametrize(
    ("rows", "defined"),
    [
        ([], set()),
        ([(10.0, 0.0)], set()),  # no size: no VWAP
        ([(10.0, 5.0)], {"trade_vwap"}),
        ([(10.0, 5.0), (11.0, 1.0)], {"trade_vwap", "realized_var"}),
        ([(10.0, 5.0)] * 3, {"trade_vwap", "realized_var", "bipower_var"}),  # RV = 0: no ratio
    ],
)
def test_risk_metrics_undefined_values_are_none(
    rows: list[tuple[float, float]], defined: set[str]
) -> None:
    m = risk_metrics(Trades.of(rows))
    assert {k for k, v in m.items() if v is not None} == defined | {"trades_used"}
    assert risk_metrics(None) == dict.fromkeys(RISK_FIELDS)


prices = st.floats(min_value=0.01, max_value=1e6, allow_nan=False)
sizes = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@given(st.lists(st.tuples(prices, sizes), min_size=0, max_size=60))
@example(rows=[(1.5, 5e-324)])  # a subnormal size once underflowed p*s: VWAP 2.0 > max price
def test_risk_metrics_properties(rows: list[tuple[float, float]]) -> None:
    m = risk_metrics(Trades.of(rows))
    assert m["trades_used"] == len(rows)
    if m["trade_vwap"] is not None:
        p = [r[0] for r in rows]
        assert min(p) * (1 - 1e-12) <= m["trade_vwap"] <= max(p) * (1 + 1e-12)
    if m["realized_var"] is not None:
        assert m["realized_var"] >= 0
    if m["bipower_var"] is not None:
        assert m["bipower_var"] >= 0
        # Cauchy-Schwarz: sum|r_i||r_i-1| <= RV, so BV <= (pi/2) RV
        rv = m["realized_var"]
        assert rv is not None
        assert m["bipower_var"] <= math.pi / 2 * rv * (1 + 1e-9) + 1e-300
    if m["jump_ratio"] is not None:
        assert m["jump_ratio"] <= 1.0
        assert m["jump_ratio"] >= 1 - math.pi / 2 - 1e-9


def test_risk_metrics_skip_trades_that_cannot_have_a_log_return() -> None:
    good = [(10.0, 1.0), (11.0, 1.0), (10.5, 2.0)]
    bad = [(0.0, 1.0), (float("nan"), 1.0), (10.0, -1.0)]
    assert risk_metrics(Trades.of(good + bad)) == risk_metrics(Trades.of(good))


# -- message contract ----------------------------------------------------------------------------

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)
extra_value = st.one_of(st.none(), finite, st.text(min_size=0, max_size=8))


@st.composite
def bars(draw: Any) -> tuple[datetime, dict[str, float], dict[str, Any]]:
    low = draw(st.floats(min_value=0.01, max_value=1e6))
    high = low * draw(st.floats(min_value=1.0, max_value=2.0))
    o = draw(st.floats(min_value=low, max_value=high))
    c = draw(st.floats(min_value=low, max_value=high))
    v = draw(st.floats(min_value=0, max_value=1e9))
    minute = draw(st.integers(min_value=0, max_value=10_000_000))
    ts = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(minutes=minute)
    extras = {
        "trade_count": draw(st.one_of(st.none(), st.integers(0, 10**6).map(float))),
        "vwap": draw(st.one_of(st.none(), finite)),
        "note": draw(extra_value),
    }
    return ts, {"open": o, "high": high, "low": low, "close": c, "volume": v}, extras


@given(bars(), st.sampled_from(["AAPL", "BTC/USD"]))
def test_ingested_message_decodes_as_the_runner_decodes_it(
    bar: tuple[datetime, dict[str, float], dict[str, Any]], symbol: str
) -> None:
    ts, ohlcv, extras = bar
    out = build_message(symbol, ts, ohlcv, extras, source="live")
    live = decode_message(out.body, out.attributes)
    assert live.verified and live.data_hash == out.data_hash == out.attributes["data_hash"]
    assert live.ts == ts and live.symbol == symbol
    assert out.attributes["bar_key"] == f"{symbol}|{ts:%Y-%m-%dT%H:%M:%SZ}"
    assert {k: live.values[k] for k in ohlcv} == ohlcv
    assert {k: live.values[k] for k in extras} == extras


@settings(max_examples=30, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bars())
def test_an_ingested_bar_hashes_like_the_same_bar_read_from_csv(
    tmp_path: Path, bar: tuple[datetime, dict[str, float], dict[str, Any]]
) -> None:
    ts, ohlcv, extras = bar
    numeric = {k: v for k, v in extras.items() if k != "note"}
    out = build_message("GOOG", ts, ohlcv, numeric, source="backfill")
    cols = [*ohlcv, *numeric]
    cells = [
        repr(ohlcv[c]) if c in ohlcv else ("" if numeric[c] is None else repr(numeric[c]))
        for c in cols
    ]
    path = tmp_path / "GOOG.csv"
    path.write_text(f"datetime,{','.join(cols)}\n{ts:%Y-%m-%d %H:%M:%S},{','.join(cells)}\n")
    csv_bars = read_csv_bars(CSVFeedConfig(path=path, symbol="GOOG", bar_size="1min"))
    assert csv_bars.hashes[0] == out.data_hash


def test_a_bar_breaking_the_ohlcv_rule_is_refused() -> None:
    ts = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    bad = {"open": 10.0, "high": 9.0, "low": 9.5, "close": 9.6, "volume": 1.0}
    with pytest.raises(DataError, match=r"AAPL 2024-01-02T14:30:00Z: high 9\.0 < low 9\.5"):
        build_message("AAPL", ts, bad, {}, source="live")
    with pytest.raises(DataError, match="infinite"):
        build_message("AAPL", ts, {**bad, "high": 10.0}, {"x": math.inf}, source="live")


# -- wire times ----------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=4_000_000_000 * 10**9))
def test_rfc3339_nanoseconds_round_trip(ns: int) -> None:
    assert parse_rfc3339_ns(rfc3339(ns)) == ns


def test_rfc3339_forms_alpaca_and_alpaca_py_write() -> None:
    base = 1_649_678_436 * 10**9
    assert parse_rfc3339_ns("2022-04-11T12:00:36.002951946Z") == base + 2_951_946
    assert parse_rfc3339_ns("2022-04-11T12:00:36Z") == base
    assert parse_rfc3339_ns("2022-04-11T12:00:36.5+00:00") == base + 500_000_000
    assert parse_rfc3339_ns("2022-04-11T08:00:36-04:00") == base


# -- state file ----------------------------------------------------------------------------------


def test_state_file_round_trip_and_atomic_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    st_ = IngestState.load(path)
    assert st_.last_bar == {} and not path.exists()
    t1 = datetime(2024, 1, 2, 14, 30, tzinfo=UTC)
    st_.confirm("AAPL", t1)
    st_.confirm("AAPL", t1 - timedelta(minutes=1))  # older: ignored
    st_.add_gap(Gap("AAPL", "2024-01-02T14:00:00Z", "2024-01-02T14:10:00Z", "history failed"))
    st_.save()
    again = IngestState.load(path)
    assert again.last_bar == {"AAPL": t1}
    assert again.gaps == st_.gaps
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temporary left


@pytest.mark.parametrize(
    "text", ["{", "[]", '{"version": 2}', '{"version": 1, "last_bar": {"A": 3}}']
)
def test_a_corrupt_state_file_is_refused_with_its_name(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(DataError, match=r"state\.json"):
        IngestState.load(path)


_T = "2024-01-02T14:30:00Z"


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ({"version": True}, "with version 1"),
        ({"version": 1.0}, "with version 1"),
        ({"version": "1"}, "with version 1"),
        ({"version": 1, "last_bar": [["AAA", _T]]}, "last_bar must be an object, got list"),
        ({"version": 1, "start": [["AAA", _T]]}, "start must be an object, got list"),
        ({"version": 1, "last_bar": None}, "last_bar must be an object, got NoneType"),
        ({"version": 1, "gaps": ""}, "gaps must be an array, got str"),
        ({"version": 1, "gaps": {}}, "gaps must be an array, got dict"),
        ({"version": 1, "gaps": {"AAA": _T}}, "gaps must be an array, got dict"),
    ],
    ids=["true", "1.0", "text", "pairs", "start pairs", "null", "text gaps", "empty object",
         "object gaps"],
)  # fmt: skip
def test_a_state_file_of_the_wrong_shape_is_refused_by_name(
    tmp_path: Path, doc: dict[str, Any], says: str
) -> None:
    """helper-110 (noted, left last session): ``version`` true or 1.0, ``last_bar`` as a list of
    pairs, ``gaps`` as ``""`` or ``{}`` were read (as version 1, as the pairs, as nothing), and
    an object of gaps as its keys. Each is refused now, naming the file and the member; the
    same file with the members right reads."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=rf"INGEST_STATE_PATH=.*s\.json: .*{re.escape(says)}"):
        IngestState.load(path)
    path.write_text(json.dumps({"version": 1, "last_bar": {"AAA": _T}, "start": {}, "gaps": []}))
    assert IngestState.load(path).last_bar == {"AAA": datetime(2024, 1, 2, 14, 30, tzinfo=UTC)}


def test_a_state_file_past_the_gap_limit_keeps_its_newest_gaps_at_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A file with more gaps than MAX_GAPS_KEPT (from before the limit, or edited) was loaded
    whole and cut only at the next change: it is cut when read, the oldest dropped, and the
    cut is logged."""
    t0 = datetime(2024, 1, 2, 14, 0, tzinfo=UTC)
    gaps = [
        Gap("AAA", iso_utc(t0 + timedelta(minutes=m)), iso_utc(t0 + timedelta(minutes=m + 1)), "x")
        for m in range(MAX_GAPS_KEPT + 5)
    ]
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"version": 1, "gaps": [dataclasses.asdict(g) for g in gaps]}))
    with caplog.at_level("WARNING", logger="feeds.ingest.state"):
        state = IngestState.load(path)
    assert state.gaps == gaps[5:]
    assert "1005 gaps recorded; the 5 oldest by start are dropped" in caplog.text
    assert not state.dirty  # written cut at the next change, as before
    # helper-115: by start, not by the file's order (a late gap check records an older range
    # after newer ones): the newest gap, written first, is kept, as a merge keeps it
    late = [gaps[-1], *gaps[:-1]]
    path.write_text(json.dumps({"version": 1, "gaps": [dataclasses.asdict(g) for g in late]}))
    assert IngestState.load(path).gaps == gaps[5:]
    merged = IngestState(tmp_path / "m.json")
    merged.merge(IngestState(tmp_path / "o.json", gaps=late))
    assert merged.gaps == gaps[5:]


def test_a_merge_whose_new_gaps_are_all_cut_is_not_a_change(tmp_path: Path) -> None:
    """helper-109 (noted, left last session): at the gap limit, a merge whose new gaps were all
    older than every kept one marked the state changed, and it was saved for nothing."""
    t0 = datetime(2024, 1, 2, 14, 0, tzinfo=UTC)

    def gap(minute: int) -> Gap:
        start = t0 + timedelta(minutes=minute)
        return Gap("AAA", iso_utc(start), iso_utc(start + timedelta(minutes=1)), "x")

    kept = [gap(m) for m in range(10, 10 + MAX_GAPS_KEPT)]
    a = IngestState(tmp_path / "a.json", gaps=list(kept))
    a.merge(IngestState(tmp_path / "b.json", gaps=[gap(0), gap(1)]))
    assert a.gaps == kept and not a.dirty
    a.merge(IngestState(tmp_path / "b.json", gaps=[gap(5000)]))  # newer: kept, a change
    assert a.gaps[-1] == gap(5000) and a.gaps[0] == kept[1] and a.dirty


# -- user indicators -----------------------------------------------------------------------------


class RangePct:
    """An example indicator: the bar's range as a percentage of the close, and a count."""

    fields: tuple[str, ...] = ("range_pct", "bars_seen")
    needs_trades = False

    def __init__(self, symbol: str) -> None:
        self.n = 0

    def __call__(self, bar: BarView, trades: Trades | None) -> dict[str, Any]:
        self.n += 1
        return {"range_pct": 100 * (bar.high - bar.low) / bar.close, "bars_seen": self.n}


def view(symbol: str = "AAPL") -> BarView:
    return BarView(symbol, datetime(2024, 1, 2, tzinfo=UTC), 10, 11, 9, 10, 5, 3.0, 10.2)


def test_user_indicators_run_per_symbol_after_the_built_in_fields() -> None:
    e = Enricher(risk=False, factories=[("tests:RangePct", RangePct)])
    assert e.fields("AAPL") == ("trade_count", "vwap", "range_pct", "bars_seen")
    assert e.enrich(view(), None) == {
        "trade_count": 3.0,
        "vwap": 10.2,
        "range_pct": 20.0,
        "bars_seen": 1.0,
    }
    assert e.enrich(view(), None)["bars_seen"] == 2.0
    assert e.enrich(view("MSFT"), None)["bars_seen"] == 1.0  # one instance per symbol


def test_indicator_names_are_checked() -> None:
    class Bad(RangePct):
        fields: tuple[str, ...] = ("Range Pct",)

    class Clash(RangePct):
        fields: tuple[str, ...] = ("vwap",)

    class Undeclared(RangePct):
        fields: tuple[str, ...] = ("range_pct",)

    with pytest.raises(ConfigError, match="not a line name"):
        Enricher(factories=[("x:Bad", Bad)]).fields("A")
    with pytest.raises(ConfigError, match="produced twice"):
        Enricher(factories=[("x:Clash", Clash)]).fields("A")
    with pytest.raises(ValueError, match="undeclared field 'bars_seen'"):
        Enricher(factories=[("x:U", Undeclared)]).enrich(view(), None)


@pytest.mark.parametrize("name", ["start", "text_fields", "missed_step", "tick_close", "line3"])
def test_indicator_fields_the_runner_would_refuse_are_refused_at_start(name: str) -> None:
    """The runner refuses a message field named like an attribute of its live feed (every
    bar as reserved_field); the ingestor applies the same rule at start instead of publishing
    bars no runner takes."""

    class Named(RangePct):
        fields: tuple[str, ...] = (name,)

    with pytest.raises(ConfigError, match=f"field '{name}' is reserved"):
        Enricher(factories=[("x:Named", Named)]).fields("A")


def test_indicator_values_must_be_numbers_text_or_none() -> None:
    class Weird(RangePct):
        fields: tuple[str, ...] = ("w",)

        def __call__(self, bar: BarView, trades: Trades | None) -> dict[str, Any]:
            return {"w": [1, 2]}

    with pytest.raises(ValueError, match="not a number, text or None"):
        Enricher(factories=[("x:W", Weird)]).enrich(view(), None)

    # NaN from an indicator becomes null.
    class Nan(RangePct):
        fields: tuple[str, ...] = ("w",)

        def __call__(self, bar: BarView, trades: Trades | None) -> dict[str, Any]:
            return {"w": float("nan")}

    assert Enricher(factories=[("x:N", Nan)]).enrich(view(), None)["w"] is None


def test_an_indicator_that_raises_refuses_that_bar_only() -> None:
    """Attack 16 #4: an exception in a user indicator is a refused bar (DataError, which the
    ingestor counts as invalid and logs), not a crash -- a restart would meet it again."""

    class Flaky(RangePct):
        def __call__(self, bar: BarView, trades: Trades | None) -> dict[str, Any]:
            if bar.close < 0.5:
                raise ZeroDivisionError("boom")
            return super().__call__(bar, trades)

    class NotAMapping(RangePct):
        def __call__(self, bar: BarView, trades: Trades | None) -> dict[str, Any]:
            return 3  # type: ignore[return-value]

    e = Enricher(risk=False, factories=[("x:Flaky", Flaky)])
    bad = BarView("AAPL", datetime(2024, 1, 2, tzinfo=UTC), 0.4, 0.4, 0.4, 0.4, 5, 3.0, 0.4)
    with pytest.raises(DataError, match=r"indicator x:Flaky failed on AAPL .*ZeroDivisionError"):
        e.enrich(bad, None)
    assert e.enrich(view(), None)["range_pct"] == 20.0  # the next bar goes on
    with pytest.raises(DataError, match="indicator x:M failed"):
        Enricher(factories=[("x:M", NotAMapping)]).enrich(view(), None)

    def broken_factory(symbol: str) -> RangePct:
        raise RuntimeError("no model file")

    with pytest.raises(ConfigError, match="INGEST_INDICATORS x:B: cannot be built for A"):
        Enricher(factories=[("x:B", broken_factory)]).fields("A")


# -- trades: order, duplicates, conditions (attack 16 #3) ----------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # ns (few values: many ties)
            st.integers(0, 30),  # id
            st.sampled_from([(), ("@",), ("@", "I"), ("W",), ("@", "F")]),
        ),
        max_size=30,
        unique_by=lambda r: r[1],
    ),
    st.randoms(use_true_random=False),
    st.integers(0, 5),
)
def test_ordered_trades_do_not_depend_on_arrival_order_or_repeats(
    rows: list[tuple[int, int, tuple[str, ...]]], rnd: Any, repeats: int
) -> None:
    from feeds.ingest.alpaca import TradeTick, ordered_trades

    ticks = [TradeTick(ns, 100.0 + i, 1.0, i, c) for ns, i, c in rows]
    arrived = ticks + [rnd.choice(ticks) for _ in range(repeats if ticks else 0)]
    rnd.shuffle(arrived)
    got = ordered_trades(arrived)
    assert got == ordered_trades(ticks)
    assert [(t.ns, t.id) for t in got] == sorted((t.ns, t.id) for t in got)
    assert len({t.id for t in got}) == len(got)
    # Odd lots (I) and average-price prints (W) never enter the risk metrics.
    assert not any({"I", "W"} & set(t.conditions) for t in got)
    assert {t.id for t in got} == {i for _, i, c in rows if not {"I", "W"} & set(c)}


def test_trade_id_and_conditions_are_read_from_stream_and_history() -> None:
    from feeds.ingest.alpaca import rest_trade, stream_trade

    raw = {"T": "t", "S": "A", "i": 7, "x": "V", "p": 10.5, "s": 3, "c": ["@", "I"], "z": "C"}
    t = stream_trade({**raw, "t": "2024-01-02T15:00:00.000000001Z"})
    assert (t.id, t.conditions, t.ns % 10) == (7, ("@", "I"), 1)
    h = rest_trade({**raw, "t": "2024-01-02T15:00:00Z"})
    assert (h.id, h.conditions) == (7, ("@", "I"))


# -- configuration -------------------------------------------------------------------------------

BASE = {
    "SYMBOLS": "AAPL,MSFT",
    "PUBSUB_TOPIC": "bars",
    "GOOGLE_CLOUD_PROJECT": "p",
    "ALPACA_API_KEY": "key-id-123456",
    "ALPACA_SECRET_KEY": "secret-123456",
}


def test_config_loads_with_the_runners_variables_and_hides_secrets() -> None:
    cfg, ops = load_ingest_config({**BASE, "INGEST_ENRICH": "none", "HEALTH_PORT": "8081"})
    assert cfg.symbols == ("AAPL", "MSFT") and cfg.topic == "bars" and cfg.enrich == ()
    assert ops.health_port == 8081
    assert "secret-123456" not in repr(cfg) and cfg.secret_key.reveal() == "secret-123456"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"INGEST_FED": "sip"}, "INGEST_FED is not a known setting; did you mean INGEST_FEED"),
        ({"PUBSUB_TOPIC": "a,b"}, "exactly one topic"),
        ({"SYMBOLS": ""}, "SYMBOLS is required"),
        ({"INGEST_ASSET_CLASS": "crypto"}, "BASE/QUOTE"),
        ({"INGEST_ENRICH": "risk,greeks"}, "unknown enrichment 'greeks'"),
        ({"INGEST_STREAM_URL": "http://x"}, "INGEST_STREAM_URL"),
        # helper-83: accepted, then failed at run time (exit 1) or never
        ({"INGEST_DATA_URL": "http://"}, "INGEST_DATA_URL='http://': expected a URL"),
        ({"INGEST_START_LOOKBACK_S": "1e12"}, "INGEST_START_LOOKBACK_S=1e12: expected at most"),
        ({"INGEST_REQUEST_TIMEOUT_S": "1e-300"}, "INGEST_REQUEST_TIMEOUT_S=1e-300: expected"),
        ({"INGEST_QUEUE_SIZE": "1000001"}, "INGEST_QUEUE_SIZE must be at most 1,000,000"),
        # helper-100 F6: a lag near a bar's length published past a hole
        ({"INGEST_HISTORY_LAG_S": "100"}, "INGEST_HISTORY_LAG_S=100: expected at most 30 s"),
        ({"INGEST_INDICATORS": "nocolon"}, "module:factory"),
        ({"INGEST_MAX_BACKFILL_S": "0"}, "INGEST_MAX_BACKFILL_S"),
        ({"INGEST_ON_CONNECTION_LIMIT": "fight"}, "INGEST_ON_CONNECTION_LIMIT"),
        ({"ALPACA_API_KEY": ""}, "ALPACA_API_KEY is required by the ingestor"),
        ({"GOOGLE_CLOUD_PROJECT": ""}, "GOOGLE_CLOUD_PROJECT is required by the ingestor"),
        # attack 16 #6: Alpaca symbols are upper-case; no wildcard, no space, no pair in stock.
        ({"SYMBOLS": "aapl"}, r"SYMBOLS: stock symbols .*'aapl'"),
        ({"SYMBOLS": "AAPL MSFT"}, r"SYMBOLS: stock symbols .*'AAPL MSFT'"),
        ({"SYMBOLS": "BTC/USD"}, r"SYMBOLS: stock symbols .*'BTC/USD'"),
        ({"SYMBOLS": "*"}, r"SYMBOLS: stock symbols .*'\*'"),
        ({"SYMBOLS": "btc/usd", "INGEST_ASSET_CLASS": "crypto"}, "upper-case BASE/QUOTE"),
        ({"PUBSUB_TOPIC": "projects/x/topics/"}, "PUBSUB_TOPIC='projects/x/topics/'"),
        ({"PUBSUB_TOPIC": "projects/x/subs/y"}, "expected a topic id or projects/"),
        ({"PUBSUB_TOPIC": "goog-bars"}, "does not start with goog"),
        ({"PUBSUB_TOPIC": "1bars"}, "starts with a letter"),
    ],
)
def test_bad_config_fails_naming_the_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_ingest_config({**BASE, **change})


def test_good_symbols_and_topics_pass() -> None:
    cfg, _ = load_ingest_config(
        {**BASE, "SYMBOLS": "BRK.B,SPY", "PUBSUB_TOPIC": "projects/p/topics/a.b~c"}
    )
    assert cfg.symbols == ("BRK.B", "SPY")
    crypto, _ = load_ingest_config({**BASE, "SYMBOLS": "BTC/USD", "INGEST_ASSET_CLASS": "crypto"})
    assert crypto.symbols == ("BTC/USD",)


def test_an_unwritable_state_path_fails_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"INGEST_STATE_PATH=.*cannot be written"):
        IngestState(blocker / "sub" / "state.json").check_writable()
    IngestState(tmp_path / "new" / "state.json").check_writable()  # a folder is created


# -- start: Pub/Sub unreachable (attack 16 #1) ---------------------------------------------------


def _refused_publisher() -> Any:
    from feeds.pubsub.clients import publisher_client
    from tests.pubsub_emulator import free_port

    # A port nothing listens on: every attempt is refused at once (UNAVAILABLE, transient).
    return publisher_client(f"127.0.0.1:{free_port()}")


def test_ensure_topic_gives_up_within_its_deadline() -> None:
    import time

    from core.errors import TransientError
    from runtime.ingest import ensure_topic

    client = _refused_publisher()
    t0 = time.monotonic()
    with pytest.raises(TransientError, match="not reachable within"):
        ensure_topic(client, "projects/p/topics/ticks", deadline_s=1.0, attempt_timeout_s=0.5)
    # google-cloud-pubsub's own default would retry for 600 s.
    assert time.monotonic() - t0 < 5.0


def test_ensure_topic_stops_at_once_when_asked() -> None:
    import threading
    import time

    from core.errors import RetryInterruptedError
    from runtime.ingest import ensure_topic

    stop = threading.Event()
    stop.set()
    t0 = time.monotonic()
    with pytest.raises(RetryInterruptedError):
        ensure_topic(
            _refused_publisher(),
            "projects/p/topics/ticks",
            deadline_s=60.0,
            attempt_timeout_s=0.5,
            stop=stop,
        )
    assert time.monotonic() - t0 < 2.0


# -- bar times: current minute, future, misaligned (attack 16 #7, #8) ----------------------------


def _ingestor(tmp_path: Path, now: datetime, **env: str) -> Any:
    """An Ingestor built but not started: its stream and history clients connect only when
    started or called, so its time rules are tested without a server."""
    from feeds.ingest import Ingestor

    cfg, _ = load_ingest_config({**BASE, "INGEST_STATE_PATH": str(tmp_path / "s.json"), **env})
    return Ingestor(cfg, None, "projects/p/topics/bars", clock=lambda: now)


def test_history_is_never_asked_for_the_minute_still_being_built(tmp_path: Path) -> None:
    now = datetime(2024, 1, 2, 15, 30, 3, tzinfo=UTC)  # 3 s into 15:30
    ing = _ingestor(tmp_path, now)  # INGEST_HISTORY_LAG_S=5 by default
    # 15:29 ended at 15:30:00, only 3 s ago (< 5 s lag): the newest complete one is 15:28.
    assert ing._last_complete_minute() == datetime(2024, 1, 2, 15, 28, tzinfo=UTC)
    ing0 = _ingestor(tmp_path, now, INGEST_HISTORY_LAG_S="0")
    assert ing0._last_complete_minute() == datetime(2024, 1, 2, 15, 29, tzinfo=UTC)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.integers(-(10**6), 10**6), st.integers(0, 59), st.integers(0, 999_999))
def test_bar_times_off_the_minute_or_in_the_future_are_refused(
    tmp_path: Path, offset_s: int, second: int, micro: int
) -> None:
    now = datetime(2024, 1, 2, 15, 30, tzinfo=UTC)
    ing = _ingestor(tmp_path, now)
    ts = (now + timedelta(seconds=offset_s)).replace(second=second, microsecond=micro)
    problem = ing._bad_time(ts)
    aligned = second == 0 and micro == 0
    future = (ts - now).total_seconds() > 120
    assert (problem is None) == (aligned and not future)


@pytest.mark.parametrize("t", ["0500-01-01T00:00:00Z", "0999-12-31T23:59:00Z"])
def test_a_stream_bar_dated_before_year_1000_is_refused_not_published(
    tmp_path: Path, t: str
) -> None:
    """helper-110: such a bar was published and, once confirmed, saved as ``500-01-01T...``,
    which the state file's reader refuses: every later start exited 2."""
    now = datetime(2024, 1, 2, 15, 30, tzinfo=UTC)
    ing = _ingestor(tmp_path, now, INGEST_ENRICH="none")
    published: list[Any] = []

    class Publisher:
        pending = 0

        def publish(self, out: Any) -> None:
            published.append(out)

    ing.publisher = Publisher()
    raw = {"T": "b", "S": "AAPL", "t": t, "o": 1, "h": 1, "l": 1, "c": 1, "v": 1}
    ing._live_bar(raw, time.perf_counter_ns())
    assert published == [] and ing.stats.invalid == 1
    ok = {**raw, "t": "2024-01-02T15:29:00Z"}
    ing._live_bar(ok, time.perf_counter_ns())
    assert [o.symbol for o in published] == ["AAPL"]
    for o in published:
        ing.state.confirm(o.symbol, o.ts)
    ing.state.save()
    assert IngestState.load(tmp_path / "s.json").last_bar == {"AAPL": published[0].ts}


@pytest.mark.parametrize(
    "text",
    [
        '{"version": 1, "last_bar": {"AAA": "2024-01-02T14:30:00Z", '
        '"AAA": "2024-01-02T14:31:00Z"}}',
        '{"version": 1, "version": 1}',
        '{"version": 1, "gaps": [{"symbol": "A", "symbol": "B", "start": "x", "end": "y", '
        '"reason": "r"}]}',
    ],
    ids=["last_bar", "top level", "in a gap"],
)
def test_a_name_twice_in_a_state_file_is_refused_by_name(tmp_path: Path, text: str) -> None:
    """A JSON object naming a member twice (a hand merge of two files): Python's reader kept
    the last and dropped the other without a word. Refused now, naming the file and the key;
    the same file with the name once reads."""
    path = tmp_path / "s.json"
    path.write_text(text)
    with pytest.raises(DataError, match=r"INGEST_STATE_PATH=.*s\.json: .*appears twice"):
        IngestState.load(path)
    path.write_text('{"version": 1, "last_bar": {"AAA": "2024-01-02T14:31:00Z"}}')
    assert IngestState.load(path).last_bar["AAA"].minute == 31


def test_a_state_file_nested_too_deep_is_refused_by_name(tmp_path: Path) -> None:
    """helper-110: RecursionError from the JSON reader was uncaught (exit 1, a traceback)."""
    path = tmp_path / "s.json"
    path.write_text('{"version": 1, "gaps": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(DataError, match=r"INGEST_STATE_PATH=.*not an ingest state file"):
        IngestState.load(path)


def test_one_gap_time_written_two_ways_merges_alike_either_way(tmp_path: Path) -> None:
    """helper-110 F3: equal sort keys for one instant written two ways made ``a.merge(b)`` and
    ``b.merge(a)`` keep different gaps at the cap; the texts now break the tie."""
    import feeds.ingest.state as state_module

    z = Gap("A", "2024-01-02T14:00:00Z", "2024-01-02T15:00:00Z", "r")
    offset = Gap("A", "2024-01-02T14:00:00+00:00", "2024-01-02T15:00:00Z", "r")
    fraction = Gap("A", "2024-01-02T14:00:00Z", "2024-01-02T15:00:00.000Z", "r")
    kept = []
    for mine, theirs in (([z, offset], [fraction]), ([fraction], [z, offset])):
        a = IngestState(tmp_path / "a.json", gaps=mine)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(state_module, "MAX_GAPS_KEPT", 1)
            a.merge(IngestState(tmp_path / "b.json", gaps=theirs))
        kept.append(a.gaps)
    assert kept[0] == kept[1] and len(kept[0]) == 1


def test_a_state_file_dated_in_the_future_fails_at_start(tmp_path: Path) -> None:
    now = datetime(2024, 1, 2, 15, 30, tzinfo=UTC)
    state = IngestState.load(tmp_path / "s.json")
    state.confirm("AAPL", datetime(2030, 1, 1, tzinfo=UTC))
    state.save()
    with pytest.raises(DataError, match=r"INGEST_STATE_PATH=.*after the local clock"):
        _ingestor(tmp_path, now)


def test_a_takeover_does_not_adopt_a_last_bar_dated_in_the_future(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A standby taking over the shared file (``_adopt_saved_state``) took in the other
    ingestor's last bars unchecked (helper-109's note): one after the local clock would have
    made every later bar of its symbol a duplicate, which a start refuses (exit 2). It is not
    taken as published, and named in an error; the other symbols' bars are taken over. The
    entry stays in the file, as every other one (helper-115: dropping it before the merge
    erased it, or rolled it back to the standby's older copy), so the next start names it."""
    now = datetime(2024, 1, 2, 15, 30, tzinfo=UTC)
    ing = _ingestor(tmp_path, now)
    other = IngestState.load(tmp_path / "s.json")
    good, ahead = now - timedelta(minutes=3), datetime(2030, 1, 1, tzinfo=UTC)
    other.confirm("AAPL", good)
    other.confirm("MSFT", ahead)
    other.confirm("ZZZZ", ahead)  # a symbol this ingestor does not publish
    other.set_start("NVDA", now + timedelta(hours=1))  # told, as at start (helper-115)
    other.save()
    with caplog.at_level("WARNING", logger="feeds.ingest.ingestor"):
        ing._adopt_saved_state()
    assert "start points dated after the local clock {'NVDA': '2024-01-02T16:30:00Z'}" in (
        caplog.text
    )
    assert ing._sent.get("AAPL") == good and "MSFT" not in ing._sent
    assert "last bars dated after the local clock {'MSFT': '2030-01-01T00:00:00Z', 'ZZZZ'" in (
        caplog.text
    )
    ing.state._dirty = True
    ing.state.save()
    assert IngestState.load(tmp_path / "s.json").last_bar == {
        "AAPL": good,
        "MSFT": ahead,
        "ZZZZ": ahead,
    }


def test_a_start_point_dated_in_the_future_is_told_not_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Start points come from an ingestor's local clock: one written by a pod whose clock is
    ahead is kept and named in a warning (helper-110: refused, a standby exited 2 at every
    start until its clock caught up); within the tolerance, nothing is said."""
    now = datetime(2024, 1, 2, 15, 30, tzinfo=UTC)
    state = IngestState.load(tmp_path / "s.json")
    state.set_start("AAPL", now + timedelta(minutes=1))
    state.save()
    with caplog.at_level("WARNING", logger="feeds.ingest.ingestor"):
        assert _ingestor(tmp_path, now).state.start == {"AAPL": now + timedelta(minutes=1)}
    assert "start points dated after" not in caplog.text
    state.set_start("AAPL", now + timedelta(minutes=5))
    state.save()
    with caplog.at_level("WARNING", logger="feeds.ingest.ingestor"):
        assert _ingestor(tmp_path, now).state.start == {"AAPL": now + timedelta(minutes=5)}
    assert "start points dated after the local clock {'AAPL': '2024-01-02T15:35:00Z'}" in (
        caplog.text
    )


def test_a_minute_arriving_after_a_later_one_is_a_gap_not_a_duplicate(tmp_path: Path) -> None:
    """Attack 16 #8: minute 6 published before minute 5 arrived: minute 5 cannot be published
    any more (order), and must be reported as a gap, not counted as a duplicate."""
    from collections import deque

    now = datetime(2024, 1, 2, 16, 0, tzinfo=UTC)
    ing = _ingestor(tmp_path, now)
    t = [datetime(2024, 1, 2, 15, m, tzinfo=UTC) for m in range(8)]
    ing._sent["AAPL"] = t[6]
    ing._recent["AAPL"] = deque([t[4], t[6]])

    def raw(ts: datetime) -> dict[str, Any]:
        return {
            "T": "b",
            "S": "AAPL",
            "o": 1,
            "h": 1,
            "l": 1,
            "c": 1,
            "v": 1,
            "t": rfc3339(int(ts.timestamp()) * 10**9),
        }

    ing._live_bar(raw(t[5]), 0)
    assert [(g.symbol, g.start) for g in ing.stats.gaps] == [("AAPL", "2024-01-02T15:05:00Z")]
    assert ing.stats.duplicates == 0
    ing._live_bar(raw(t[6]), 0)  # a repeat
    ing._live_bar(raw(t[3]), 0)  # before what this run published: assumed published
    assert ing.stats.duplicates == 2 and len(ing.stats.gaps) == 1


def test_a_malformed_stream_bar_is_counted_in_the_metric_and_logged_once_per_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """helper-79 F4: a bar that fails to parse was counted in the report, not in
    ``ingest_invalid_bars_total``; and each one logged the whole message."""
    from feeds.ingest.ingestor import IngestEvents

    seen: list[str] = []

    class Events(IngestEvents):
        def on_published(self, symbol: str, source: str, latency_s: float) -> None: ...
        def on_duplicate(self, symbol: str) -> None: ...
        def on_gap(self, symbol: str) -> None: ...
        def on_connection(self, event: str) -> None: ...

        def on_invalid(self, symbol: str) -> None:
            seen.append(symbol)

    now = datetime(2024, 1, 2, 16, 0, tzinfo=UTC)
    ing = _ingestor(tmp_path, now)
    ing.events = Events()
    t = rfc3339(int(datetime(2024, 1, 2, 15, 1, tzinfo=UTC).timestamp()) * 10**9)
    good = {"T": "b", "S": "AAPL", "o": 1, "h": 1, "l": 1, "c": 1, "v": 1, "t": t}
    with caplog.at_level("WARNING", logger="feeds.ingest.ingestor"):
        for _ in range(3):
            ing._live_bar({k: v for k, v in good.items() if k != "o"}, 0)  # KeyError
        ing._live_bar({**good, "n": "abc", "c": "x" * 10_000}, 0)  # ValueError, long value
        ing._live_bar({**good, "S": "ZZZZ", "h": None}, 0)  # not a symbol of this run
    assert ing.stats.invalid == 5
    assert seen == ["AAPL"] * 4
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 3  # KeyError, ValueError, TypeError: once each
    assert all(len(line) < 1_000 for line in lines)


def test_once_a_stop_drops_a_message_every_later_one_is_dropped_too(tmp_path: Path) -> None:
    """helper-79 (read in the code): a stop with a full queue dropped a message without a word,
    and a later bar of the same symbol could still get in once there was room: the dropped bar
    would then be lost for good (the state file moves past it). Now every message after the
    first dropped one is dropped too, and the report counts them (``left_queued``)."""
    now = datetime(2024, 1, 2, 16, 0, tzinfo=UTC)
    ing = _ingestor(tmp_path, now, INGEST_QUEUE_SIZE="1")
    ing._put((0, "first", 0))
    ing._stop.set()
    ing._put((0, "dropped: the queue is full", 0))
    assert ing._queue.get_nowait() == (0, "first", 0)  # room again
    ing._put((0, "later: dropped as well", 0))
    assert ing._queue.empty()
    assert ing.report()["left_queued"] == 2


@pytest.mark.parametrize(
    ("given", "sent"),
    [(" padded ", "padded"), ("trail\n", "trail"), ("", None), ("  ", None), ("ok", "ok")],
)
def test_indicator_text_is_normalised_as_the_csv_reader_reads_it(
    given: str, sent: str | None
) -> None:
    """Attack 16 #9 (text part): whitespace and empty text hash as the same CSV cell does."""

    class Label(RangePct):
        fields: tuple[str, ...] = ("label",)

        def __call__(self, bar: BarView, trades: Trades | None) -> dict[str, Any]:
            return {"label": given}

    assert Enricher(risk=False, factories=[("x:L", Label)]).enrich(view(), None)["label"] == sent


def test_the_state_file_lock_lets_one_ingestor_in_at_a_time(tmp_path: Path) -> None:
    """The standby's wait (helper-100 F7): a second holder waits while the first holds it,
    gives up when stopping, and gets it once the first releases it."""
    path = tmp_path / "s.json"
    first, second, stop = StateLock(path), StateLock(path), threading.Event()
    assert first.acquire(stop) and first.held and first.acquire(stop)
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(second.acquire(stop, poll_s=0.01)))
    waiter.start()
    time.sleep(0.2)
    assert got == [] and not second.held  # waiting
    first.release()
    first.release()  # idempotent
    waiter.join(5)
    assert got == [True] and second.held
    third = StateLock(path)
    stop.set()
    assert not third.acquire(stop) and not third.held
    second.release()


def test_the_state_file_lock_is_free_once_its_process_is_killed(tmp_path: Path) -> None:
    """A first ingestor killed (-9) during its stop: the kernel releases its lock, the
    standby goes on."""
    path = tmp_path / "s.json"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, threading, time; from pathlib import Path;"
            "from feeds.ingest.state import StateLock;"
            "StateLock(Path(sys.argv[1])).acquire(threading.Event());"
            "print('held', flush=True); time.sleep(60)",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        lock, stop = StateLock(path), threading.Event()
        threading.Timer(0.3, stop.set).start()
        assert not lock.acquire(stop, poll_s=0.01)  # held by the other process
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert lock.acquire(threading.Event())
        lock.release()
    finally:
        holder.kill()
        holder.wait(10)


_TIMES = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
).map(lambda t: t.replace(second=0, microsecond=0))
_STATES = st.tuples(
    st.dictionaries(st.sampled_from("ABCDE"), _TIMES, max_size=5),
    st.dictionaries(st.sampled_from("ABCDE"), _TIMES, max_size=5),
    st.lists(
        st.builds(
            Gap,
            st.sampled_from("ABC"),
            _TIMES.map(iso_utc),
            _TIMES.map(iso_utc),
            st.sampled_from("xy"),
        ),
        max_size=4,
    ),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mine=_STATES, other=_STATES)
def test_a_state_merge_keeps_the_later_bar_the_earlier_start_and_every_gap(
    tmp_path: Path, mine: Any, other: Any
) -> None:
    """A standby taking over a shared file merges it (helper-104 K2: it saved its start-time
    copy, rolling other symbols back and erasing the first one's gaps); the merged state
    survives a save and a load."""

    def state(parts: Any) -> IngestState:
        last, start, gaps = parts
        return IngestState(
            tmp_path / "s.json",
            dict(last),
            list(gaps),
            {s: t for s, t in start.items() if s not in last},
        )

    a, b = state(mine), state(other)
    a.merge(b)
    for s in set(mine[0]) | set(other[0]):
        assert a.last_bar[s] == max(t for t in (mine[0].get(s), other[0].get(s)) if t)
    for s, t in a.start.items():
        assert s not in a.last_bar
        assert t == min(x.start[s] for x in (state(mine), state(other)) if s in x.start)
    assert set(a.gaps) == set(mine[2]) | set(other[2])
    a._dirty = True
    a.save()
    again = IngestState.load(tmp_path / "s.json")
    assert (again.last_bar, again.start, set(again.gaps)) == (a.last_bar, a.start, set(a.gaps))


def test_a_state_merge_past_the_gap_limit_keeps_the_newest_gaps_by_start(tmp_path: Path) -> None:
    """Two files each near MAX_GAPS_KEPT: the merge orders the gaps by start and drops the
    oldest (before, the other file's gaps were appended after this one's and the limit cut
    this one's front, keeping older gaps of the other file over newer ones of this one)."""
    t0 = datetime(2024, 1, 2, 14, 0, tzinfo=UTC)

    def gap(minute: int) -> Gap:
        start = t0 + timedelta(minutes=minute)
        return Gap("AAA", iso_utc(start), iso_utc(start + timedelta(minutes=1)), "history failed")

    n = MAX_GAPS_KEPT - 10
    newer = [gap(m) for m in range(n, 2 * n)]  # this state's: recorded after the other's
    older = [gap(m) for m in range(n)] + [newer[0]]  # the other file's; one is here already
    a = IngestState(tmp_path / "a.json", gaps=list(newer))
    a.merge(IngestState(tmp_path / "b.json", gaps=list(older)))
    expected = [gap(m) for m in range(2 * n - MAX_GAPS_KEPT, 2 * n)]
    assert a.gaps == expected
    assert a.dirty
    b = IngestState(tmp_path / "b.json", gaps=list(older))
    b.merge(IngestState(tmp_path / "a.json", gaps=list(newer)))
    assert b.gaps == expected  # whichever state takes in the other


_GOOD_GAP = {
    "symbol": "BBB",
    "start": "2024-01-02T14:00:00Z",
    "end": "2024-01-02T14:05:00Z",
    "reason": "history failed",
}


@pytest.mark.parametrize(
    ("gap", "says"),
    [
        ({**_GOOD_GAP, "start": None}, "gap 1: start must be text"),
        ({**_GOOD_GAP, "end": 0}, "gap 1: end must be text"),
        ({**_GOOD_GAP, "symbol": None}, "gap 1: symbol must be text"),
        ({**_GOOD_GAP, "reason": 3}, "gap 1: reason must be text"),
        ({**_GOOD_GAP, "start": "unknown"}, "gap 1: start is not a time"),
        ({k: v for k, v in _GOOD_GAP.items() if k != "reason"}, "gap 1: expected an object"),
        ({**_GOOD_GAP, "note": "x"}, "gap 1: expected an object"),
        (["BBB", "2024-01-02T14:00:00Z"], "gap 1: expected an object"),
    ],
    ids=["null start", "number end", "null symbol", "number reason", "text start", "missing",
         "extra", "a list"],
)  # fmt: skip
def test_a_state_file_with_a_gap_that_is_not_one_fails_at_load(
    tmp_path: Path, gap: Any, says: str
) -> None:
    """helper-109 F1: gaps with ``null`` or numbers were accepted; a standby's merge then raised
    TypeError ordering them, and its save erased the first ingestor's new gap. Such a file is
    now refused when read, naming the file and the gap (at start: exit 2)."""
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"version": 1, "last_bar": {}, "gaps": [_GOOD_GAP, gap]}))
    with pytest.raises(DataError, match=rf"INGEST_STATE_PATH=.*s\.json: .*{re.escape(says)}"):
        IngestState.load(path)
    path.write_text(json.dumps({"version": 1, "last_bar": {}, "gaps": [_GOOD_GAP]}))
    assert IngestState.load(path).gaps == [Gap(**_GOOD_GAP)]


def test_a_state_file_without_start_points_reads_as_before(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text('{"version": 1, "last_bar": {"AAA": "2024-01-02T14:30:00Z"}, "gaps": []}')
    state = IngestState.load(path)
    assert state.start == {} and set(state.last_bar) == {"AAA"}
    state.set_start("BBB", datetime(2024, 1, 2, 14, 29, tzinfo=UTC))
    state.set_start("AAA", datetime(2024, 1, 2, 14, 0, tzinfo=UTC))  # published: ignored
    state.confirm("BBB", datetime(2024, 1, 2, 14, 31, tzinfo=UTC))  # leaves the start points
    assert state.start == {}


# -- symbols that do not trade: the backfill limit's gap once, not at every restart --------------


class _QuietHistory:
    """History of symbols that do not trade: every answer empty (Alpaca's historical bars
    endpoint answers ``{"bars": {}, "next_page_token": null}`` for a span without trades,
    docs.alpaca.markets/reference/stockbars). Counts its requests as the client does."""

    calls = retries = 0

    def __init__(self) -> None:
        self.asked: list[tuple[list[str], datetime, datetime]] = []

    def bars(self, symbols: list[str], start: datetime, end: datetime) -> dict[str, list[Any]]:
        self.calls += 1
        self.asked.append((list(symbols), start, end))
        return {s: [] for s in symbols}

    def server_now(self) -> datetime | None:
        return None


_T0 = datetime(2024, 1, 2, 15, 30, tzinfo=UTC)
_QUIET = {"INGEST_ENRICH": "none"}
_TEN_MINUTES = {"INGEST_MAX_BACKFILL_S": "600"}


def _start_with_clock(tmp_path: Path, clock: list[datetime], **env: str) -> Any:
    """An Ingestor (not started) whose local clock is ``clock[0]``, with a quiet history
    (INGEST_MAX_BACKFILL_S: its default, 7 days, unless given)."""
    from feeds.ingest import Ingestor

    env = {**BASE, "INGEST_STATE_PATH": str(tmp_path / "s.json"), **_QUIET, **env}
    cfg, _ = load_ingest_config(env)
    ing = Ingestor(cfg, None, "projects/p/topics/bars", clock=lambda: clock[0])
    ing.history = _QuietHistory()  # type: ignore[assignment]  # its two calls used here
    return ing


def _gaps(ing: Any) -> list[tuple[str, str]]:
    return [(g.start, g.end) for g in ing.stats.gaps]


def test_a_symbol_that_does_not_trade_is_a_gap_once_not_at_every_restart(tmp_path: Path) -> None:
    """A last bar older than INGEST_MAX_BACKFILL_S (7 days) and a symbol that then does not
    trade (a halted stock): the first start counts the unfetchable part a gap and moves the
    file past it. Every later restart counted the time since the previous one's limit as a
    gap too (the file kept that limit, not what history had answered for): a day at each of
    the next two starts. The answers are kept now (less HISTORY_SETTLE_S: history may lag),
    so only a span no answer covered is counted: the ten days before the last start that no
    ingestor ran, less the limit."""
    old = _T0 - timedelta(days=8)
    (tmp_path / "s.json").write_text(json.dumps({"version": 1, "last_bar": {"AAPL": iso_utc(old)}}))
    found, asked = [], []
    for days in (0, 1, 2, 12):
        ing = _start_with_clock(tmp_path, [_T0 + timedelta(days=days)])
        after = ing.state.last_bar["AAPL"]
        end = ing._last_complete_minute()
        assert ing._backfill({"AAPL": after}, end, reason="catch-up").done
        ing.state.save()
        found.append(_gaps(ing))
        asked.append(ing.history.asked[0][1].strftime("%d %H:%M"))
    assert found == [
        [("2023-12-25T15:31:00Z", "2023-12-26T15:30:00Z")],
        [],
        [],
        [("2024-01-04T15:14:00Z", "2024-01-07T15:30:00Z")],
    ]
    # history is asked from the limit every time, as before: only the count changed
    assert asked == ["26 15:30", "27 15:30", "28 15:30", "07 15:30"]
    saved = json.loads((tmp_path / "s.json").read_text())
    # the last answer (to 15:28), less the 15 minutes history may lag
    assert saved["checked"] == {"AAPL": "2024-01-14T15:13:00Z"}
    assert [(g["start"], g["end"]) for g in saved["gaps"]] == [f for fs in found for f in fs]


def test_an_answer_after_bars_sent_and_not_confirmed_is_not_kept(tmp_path: Path) -> None:
    """Bars sent and not yet confirmed (the file still before them): a kill now loses them,
    and the next start must count them as a possible gap. An empty answer after them says
    nothing of them, so it is not kept, and a start after the limit counts the span from
    the file's last bar."""
    (tmp_path / "s.json").write_text(
        json.dumps({"version": 1, "last_bar": {"AAPL": iso_utc(_T0 - timedelta(minutes=8))}})
    )
    ing = _start_with_clock(tmp_path, [_T0], **_TEN_MINUTES)
    sent = _T0 - timedelta(minutes=4)  # four minutes sent after the file's last bar
    assert ing._backfill({"AAPL": sent}, ing._last_complete_minute(), reason="catch-up").done
    assert ing.state.checked == {}
    ing.state.save()
    later = _start_with_clock(tmp_path, [_T0 + timedelta(minutes=30)], **_TEN_MINUTES)
    assert later._backfill({"AAPL": later.state.last_bar["AAPL"]}, _T0, reason="x").done is True
    assert _gaps(later) == [("2024-01-02T15:23:00Z", "2024-01-02T15:50:00Z")]


def test_an_answer_dated_after_the_local_clock_is_not_taken(tmp_path: Path) -> None:
    """A ``checked`` time after the local clock (written where the clock was ahead, or by
    hand) would hide a real gap: it is not taken."""
    (tmp_path / "s.json").write_text(
        json.dumps(
            {
                "version": 1,
                "last_bar": {"AAPL": "2024-01-02T13:30:00Z"},
                "checked": {"AAPL": "2024-01-03T00:00:00Z"},
            }
        )
    )
    ing = _start_with_clock(tmp_path, [_T0], **_TEN_MINUTES)
    assert ing._backfill({"AAPL": ing.state.last_bar["AAPL"]}, _T0, reason="x").done
    assert _gaps(ing) == [("2024-01-02T13:31:00Z", "2024-01-02T15:20:00Z")]


def test_a_connected_ingestor_asks_history_about_symbols_that_do_not_trade(
    tmp_path: Path,
) -> None:
    """Connected for longer than INGEST_MAX_BACKFILL_S (7 days), with a symbol that never
    trades: the stream sends nothing of it, so nothing moved its position, and a restart
    counted the whole connection as a gap. The idle check asks history about it once its
    position is older than half the limit, publishes what history has, and keeps an empty
    answer: the restart counts nothing."""
    (tmp_path / "s.json").write_text(
        json.dumps({"version": 1, "last_bar": {"AAPL": iso_utc(_T0 - timedelta(minutes=2))}})
    )
    clock = [_T0]
    ing = _start_with_clock(tmp_path, clock, INGEST_MAX_BACKFILL_S="604800")
    ing.connected = True
    assert ing._lock.acquire(threading.Event())
    try:
        asked = []
        for quarter_days in range(1, 41):  # connected for 10 days, may ask every 6 hours
            clock[0] = _T0 + timedelta(hours=6 * quarter_days)
            ing._next_idle_check = 0.0
            ing._check_idle()
            asked += [(clock[0], a[0]) for a in ing.history.asked]
            ing.history.asked.clear()
        # asked once the position (or the last answer) is older than 3.5 days, so about
        # every 3.75 days, and only about the symbol with a position (MSFT has none)
        assert len(asked) == 2 and {tuple(s) for _, s in asked} == {("AAPL",)}
        assert asked[1][0] - asked[0][0] >= timedelta(days=3.5)
        assert _gaps(ing) == []
        ing._save_state(force=True)
    finally:
        ing._lock.close()
    restart = _start_with_clock(tmp_path, [_T0 + timedelta(days=10, hours=1)])
    after = restart.state.last_bar["AAPL"]
    assert restart._backfill({"AAPL": after}, restart._last_complete_minute(), reason="x").done
    assert _gaps(restart) == []
    # without the idle check, the same restart counts the connection as a gap
    (tmp_path / "s.json").write_text(
        json.dumps({"version": 1, "last_bar": {"AAPL": iso_utc(_T0 - timedelta(minutes=2))}})
    )
    blind = _start_with_clock(tmp_path, [_T0 + timedelta(days=10, hours=1)])
    assert blind._backfill({"AAPL": blind.state.last_bar["AAPL"]}, _T0, reason="x").done
    assert _gaps(blind) == [("2024-01-02T15:29:00Z", "2024-01-05T16:30:00Z")]


def test_no_idle_checks_below_an_hour_of_backfill(tmp_path: Path) -> None:
    """helper-117 F2: with INGEST_MAX_BACKFILL_S of a second, every idle check (one a
    minute) found the symbol past the limit and counted a gap. Below an hour there are no
    idle checks (what an empty answer proves lags HISTORY_SETTLE_S behind)."""
    (tmp_path / "s.json").write_text(
        json.dumps({"version": 1, "last_bar": {"AAPL": iso_utc(_T0 - timedelta(minutes=2))}})
    )
    for limit in ("1", "600", "3599"):
        clock = [_T0]
        ing = _start_with_clock(tmp_path, clock, INGEST_MAX_BACKFILL_S=limit)
        ing.connected = True
        assert ing._lock.acquire(threading.Event())
        try:
            for minutes in range(1, 121):
                clock[0] = _T0 + timedelta(minutes=minutes)
                ing._next_idle_check = 0.0
                ing._check_idle()
        finally:
            ing._lock.close()
        assert (ing.history.asked, _gaps(ing)) == ([], []), limit


def test_the_state_file_keeps_and_merges_checked_times(tmp_path: Path) -> None:
    """``checked`` round-trips; a merge keeps the later; a confirmed bar at or after it
    drops it; an entry not after the symbol's last bar is not kept."""
    path = tmp_path / "s.json"
    st_ = IngestState(path)
    st_.confirm("A", _T0)
    st_.mark_checked("A", _T0 - timedelta(minutes=1))  # not after its last bar
    st_.mark_checked("B", _T0)
    st_.mark_checked("A", _T0 + timedelta(minutes=5))
    st_.save()
    again = IngestState.load(path)
    assert again.checked == {"A": _T0 + timedelta(minutes=5), "B": _T0}
    other = IngestState(path, checked={"B": _T0 + timedelta(minutes=9)})
    again.merge(other)
    assert again.checked["B"] == _T0 + timedelta(minutes=9)
    again.confirm("A", _T0 + timedelta(minutes=5))
    assert "A" not in again.checked
    path.write_text(
        json.dumps({"version": 1, "last_bar": {"A": iso_utc(_T0)}, "checked": {"A": iso_utc(_T0)}})
    )
    assert IngestState.load(path).checked == {}
    path.write_text(json.dumps({"version": 1, "checked": [["A", iso_utc(_T0)]]}))
    with pytest.raises(DataError, match="checked must be an object"):
        IngestState.load(path)
