"""The HTML report: one self-contained file (plotly.js embedded, no network needed to open it).

A run's page (:func:`render_run`): statistics of the strategy and of an equal-weight
buy-and-hold of its symbols (:mod:`runtime.stats`, the text report's numbers), the equity curve
against buy-and-hold, the drawdown, monthly returns as a heatmap, each symbol's closes with the
fills marked, and the decision explorer: pick an order (or click a fill marker) and see the
decision that created it: what the agent read (symbol, field, index, size, bar index, value,
data hash, and the bar behind each hash from ``session_bars``), its notes, and what became of
the order.

An optimisation's page (:func:`render_study`), from the ``trials`` (and ``folds``) tables of
:mod:`runtime.research.store`: the chosen trial per fold with its in-sample and out-of-sample
statistics side by side, the parameter surface (a heatmap of the mean in-sample objective over
two numeric parameters, parallel coordinates otherwise), and in-sample against out-of-sample
per trial.

Buy-and-hold benchmark: the starting value split equally across the symbols; each part is
invested at the symbol's first close and held (cash until the symbol's first bar; its last
close after its feed ends). No costs.

Large runs stay small enough to open: price lines are thinned to at most
:data:`MAX_LINE_POINTS` points per trace (every k-th bar plus the last; fills are always drawn
at their exact bar), and the explorer holds at most ``MAX_EXPLORER_ORDERS`` orders.

Pure functions of their inputs; any thread.
"""

from __future__ import annotations

import functools
import html
import json
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from plotly.colors import get_colorscale
from plotly.offline import get_plotlyjs

from feeds.csv.reader import parse_bar_size_text
from runtime.reporting.store import ReportData
from runtime.stats import (
    PerformanceStats,
    finest_bar_size,
    infer_bar_size,
    performance_stats,
    periods_per_year,
)

MAX_LINE_POINTS = 5_000
MAX_PRICE_CHARTS = 12

_STAT_ROWS: tuple[tuple[str, str, str], ...] = (
    ("total_return_pct", "return", "{:+.2f} %"),
    ("cagr_pct", "CAGR", "{:+.2f} %"),
    ("volatility_pct", "volatility (annual)", "{:.2f} %"),
    ("sharpe", "Sharpe (annual)", "{:.3f}"),
    ("sortino", "Sortino (annual)", "{:.3f}"),
    ("calmar", "Calmar", "{:.3f}"),
    ("max_drawdown_pct", "max drawdown", "{:.2f} %"),
    ("end_value_usd", "end value", "{:,.2f} USD"),
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em} td,th{padding:.2em .6em;border:1px solid #ddd}
th{background:#f5f5f5;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#555;font-size:.9em} .hash{font-family:monospace;font-size:.85em}
.lookahead{background:#fdd} pre{background:#f7f7f7;padding:.5em;overflow:auto;max-height:20em}
#explorer select{max-width:100%;font-size:.9em} .note{color:#a60}
"""


# --------------------------------------------------------------------------------------------
# computations
# --------------------------------------------------------------------------------------------


def run_periods_per_year(data: ReportData) -> float:
    """Annualisation factor of the run: the finest feed's bar size from ``session_bars``
    (inferred from the decision times when the store has no bars)."""
    index = pd.DatetimeIndex(data.equity.index)
    if len(data.bars):
        sizes = [parse_bar_size_text(s) for s in data.bars["bar_size"].dropna().unique()]
        tf, comp = finest_bar_size(sizes)
    else:
        tf, comp = infer_bar_size(index)
    return periods_per_year(index, tf, comp)


def buy_and_hold(bars: pd.DataFrame, index: pd.DatetimeIndex, start_value: float) -> pd.Series:
    """Equal-weight buy-and-hold value on ``index`` (the rule in the module docstring).

    Returns:
        USD by bar time, shape (len(index),); empty when there are no bars.
    """
    if not len(bars) or not len(index):
        return pd.Series(dtype=float)
    closes = bars.pivot_table(index="bar_time", columns="symbol", values="close", aggfunc="last")
    closes = closes.reindex(closes.index.union(index)).sort_index().ffill().reindex(index)
    part = start_value / closes.shape[1]
    total = pd.Series(0.0, index=index)
    for symbol in closes.columns:
        c = closes[symbol]
        valid = c.notna().to_numpy()
        if not valid.any():
            total += part
            continue
        # by position: two steps can share a millisecond (feeds less than 1 ms apart; found
        # by an attack, helper-66), and a time label would then name both
        total += (part / float(c.iloc[int(valid.argmax())]) * c).fillna(part)
    return total.rename("buy_and_hold")


def drawdown_pct(equity: pd.Series) -> pd.Series:
    """Fall from the running peak, percent (<= 0)."""
    return (equity / equity.cummax() - 1.0) * 100.0


def monthly_returns_pct(equity: pd.Series) -> pd.DataFrame:
    """Return of each calendar month (UTC), percent: rows years, columns 1..12 (NaN where the
    curve has no bar). The first month is measured from the curve's first value."""
    if len(equity) < 2:
        return pd.DataFrame(columns=range(1, 13))
    idx = pd.DatetimeIndex(equity.index)
    naive = equity.copy()
    naive.index = idx.tz_convert("UTC").tz_localize(None) if idx.tz is not None else idx
    month_end = naive.resample("ME").last().dropna()
    prev = month_end.shift(1)
    prev.iloc[0] = float(naive.iloc[0])
    rets = (month_end / prev - 1.0) * 100.0
    months = pd.DatetimeIndex(rets.index)
    table = pd.DataFrame(
        {"year": months.year, "month": months.month, "ret": rets.to_numpy()}
    ).pivot(index="year", columns="month", values="ret")
    return table.reindex(columns=range(1, 13))


def thin(series: pd.Series, max_points: int = MAX_LINE_POINTS) -> pd.Series:
    """Every k-th point (and the last) so at most ``max_points`` remain."""
    n = len(series)
    if n <= max_points:
        return series
    step = math.ceil(n / max_points)
    keep = np.zeros(n, dtype=bool)
    keep[::step] = True
    keep[-1] = True
    return series[keep]


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


Fig = dict[str, Any]  # {"data": [trace, ...], "layout": {...}}: plotly's figure JSON


def _figure(*traces: dict[str, Any]) -> Fig:
    return {"data": list(traces), "layout": {}}


def _trace(kind: str, **props: Any) -> dict[str, Any]:
    return {"type": kind, **props}


def _times(index: Any) -> list[str]:
    """Bar times as ISO-8601 UTC text (what plotly.js reads as dates)."""
    idx = pd.DatetimeIndex(index)
    if idx.tz is not None:
        idx = idx.tz_convert("UTC").tz_localize(None)
    return [str(t) for t in idx.strftime("%Y-%m-%d %H:%M:%S")]


@functools.cache
def _template() -> dict[str, Any]:
    import plotly.io as pio

    template: dict[str, Any] = pio.templates["plotly_white"].to_plotly_json()
    return template


def _layout(fig: Fig, title: str, height: int = 380, **kw: Any) -> Fig:
    kw.setdefault("hovermode", "x unified")
    for axis in ("xaxis", "yaxis"):
        label = kw.pop(f"{axis}_title", None)
        if label is not None:
            kw[axis] = {**kw.get(axis, {}), "title": {"text": label}}
    fig["layout"].update(
        title={"text": title},
        height=height,
        margin=dict(l=60, r=20, t=50, b=40),
        template=_template(),
        **kw,
    )
    return fig


def _line(series: pd.Series, name: str, **props: Any) -> dict[str, Any]:
    s = thin(series)
    return _trace("scatter", x=_times(s.index), y=s.to_numpy(), name=name, mode="lines", **props)


def _against_benchmark(strategy: pd.Series, benchmark: pd.Series, **props: Any) -> Fig:
    fig = _figure(_line(strategy, "strategy", **props))
    if len(benchmark):
        fig["data"].append(_line(benchmark, "buy and hold", line=dict(dash="dot")))
    return fig


def equity_figure(equity: pd.Series, benchmark: pd.Series) -> Fig:
    fig = _against_benchmark(equity, benchmark)
    return _layout(fig, "Equity (USD) against buy-and-hold", yaxis_title="USD")


def drawdown_figure(equity: pd.Series, benchmark: pd.Series) -> Fig:
    bench = drawdown_pct(benchmark) if len(benchmark) else benchmark
    fig = _against_benchmark(drawdown_pct(equity), bench, fill="tozeroy")
    return _layout(fig, "Drawdown (%)", height=300, yaxis_title="%")


def monthly_figure(table: pd.DataFrame) -> Fig:
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    z = table.to_numpy(dtype=float)
    text = [["" if math.isnan(v) else f"{v:+.1f}" for v in row] for row in z]
    finite = np.abs(z[np.isfinite(z)])
    lim = float(finite.max()) if finite.size else 1.0
    fig = _figure(
        _trace(
            "heatmap",
            z=[[None if math.isnan(v) else v for v in row] for row in z],
            x=months,
            y=[str(y) for y in table.index],
            text=text,
            texttemplate="%{text}",
            # resolved here: plotly.js knows only a few scales by name (Python plotly resolves
            # names when it validates, which _fig_html skips)
            colorscale=get_colorscale("RdYlGn"),
            zmid=0,
            zmin=-lim,
            zmax=lim,
            colorbar=dict(title={"text": "%"}),
            hovertemplate="%{y} %{x}: %{z:.2f} %<extra></extra>",
        )
    )
    return _layout(
        fig,
        "Monthly returns (%)",
        height=max(260, 28 * len(table) + 120),
        hovermode="closest",
        yaxis=dict(autorange="reversed", type="category"),
    )


def price_figure(symbol: str, bars: pd.DataFrame, fills: pd.DataFrame) -> Fig:
    """Closes of ``symbol`` with its fills (buys ▲, sells ▼); marker ``customdata`` is the
    order ref (the explorer selects that order on click)."""
    close = pd.Series(bars["close"].to_numpy(), index=pd.DatetimeIndex(bars["bar_time"]))
    fig = _figure(_line(close, f"{symbol} close"))
    for side, symbol_shape, color in (
        ("BUY", "triangle-up", "#1a9850"),
        ("SELL", "triangle-down", "#d73027"),
    ):
        f = fills[fills["side"] == side]
        if not len(f):
            continue
        fig["data"].append(
            _trace(
                "scatter",
                x=_times(f["bar_time"]),
                y=[float(p) for p in f["exec_price"]],
                mode="markers",
                name=f"{side.lower()} fills",
                marker=dict(symbol=symbol_shape, size=10, color=color, line=dict(width=1)),
                # a plain list: numpy arrays are sent base64-encoded, which the page's click
                # handler would have to decode
                customdata=[int(r) for r in f["order_ref"]],
                text=[
                    f"{side} {abs(s):g} @ {p:,.4g} (order #{int(r)})"
                    for s, p, r in zip(f["exec_size"], f["exec_price"], f["order_ref"])
                ],
                hovertemplate="%{text}<extra></extra>",
            )
        )
    return _layout(
        fig, f"{symbol}: closes and fills (click a fill to explore it)", hovermode="closest"
    )


# --------------------------------------------------------------------------------------------
# page assembly
# --------------------------------------------------------------------------------------------


def _fig_html(fig: Fig, div_id: str, css_class: str = "plot") -> str:
    import plotly.io as pio

    # validate=False: the figures are built here from plotly's own schema names; plotly's
    # validation deep-copies every array and costs seconds on a long run.
    body = pio.to_html(
        fig,
        validate=False,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config={"responsive": True, "displaylogo": False},
    )
    return f'<div class="{css_class}" data-plot="{div_id}">{body}</div>'


def _stats_table(columns: Sequence[tuple[str, PerformanceStats | None]], ppy: float) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    rows = []
    for key, label, fmt in _STAT_ROWS:
        cells = []
        for _, stats in columns:
            value = getattr(stats, key) if stats is not None else None
            cells.append(f'<td class="num">{"n/a" if value is None else fmt.format(value)}</td>')
        rows.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return (
        f'<table id="stats"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
        f'<p class="meta">Annualised from {ppy:g} bars a year (runtime.stats: '
        "empyrical-reloaded, zero risk-free rate).</p>"
    )


def _page(title: str, meta: str, sections: Sequence[str], script: str = "") -> str:
    # plotly.js inlined once (the equivalent of include_plotlyjs=True for the first figure):
    # the file opens without any network.
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
        f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
        f'<h1>{html.escape(title)}</h1><p class="meta">{meta}</p>'
        + "".join(sections)
        + script
        + "</body></html>\n"
    )


def _json_script(element_id: str, payload: Any) -> str:
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=str)
    # no "</script>" (nor "<!--") can end or bend the element early
    text = text.replace("<", "\\u003c")
    return f'<script id="{element_id}" type="application/json">{text}</script>'


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _iso(ts: Any) -> str | None:
    if ts is None or (isinstance(ts, float) and math.isnan(ts)) or ts is pd.NaT:
        return None
    t = pd.Timestamp(ts)
    return t.tz_convert("UTC").isoformat() if t.tzinfo is not None else t.isoformat()


def _day(ts: Any) -> str:
    """``2004-08-19`` for a midnight (to the second), else ``2004-08-19 14:30`` (UTC)."""
    if _iso(ts) is None:
        return ""
    t = pd.Timestamp(ts)
    t = t.tz_convert("UTC") if t.tzinfo is not None else t
    return t.strftime("%Y-%m-%d") if t.floor("s") == t.normalize() else t.strftime("%Y-%m-%d %H:%M")


def _str(x: Any) -> str | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return str(x)


def _rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = df.to_dict("records")  # type: ignore[assignment]
    return rows


def explorer_payload(data: ReportData) -> dict[str, Any]:
    """The decision explorer's data: orders (with their events), the decisions that created
    them (with reads and notes) and the bars behind the reads' data hashes."""
    actions = data.actions
    orders: list[dict[str, Any]] = []
    if len(actions):
        events_by_ref: dict[int, list[dict[str, Any]]] = {}
        for a in _rows(actions):
            if _num(a["order_ref"]) is None:
                continue
            events_by_ref.setdefault(int(a["order_ref"]), []).append(
                {
                    "decision_point": int(a["decision_point"]),
                    "bar_time": _iso(a["bar_time"]),
                    "event": a["event"],
                    "exec_size": _num(a["exec_size"]),
                    "exec_price": _num(a["exec_price"]),
                    "commission": _num(a["commission"]),
                    "reason": _str(a["reason"]),
                }
            )
        kept = (
            set(int(p) for p in data.decisions["decision_point"]) if len(data.decisions) else set()
        )
        for a in _rows(actions[actions["event"] == "CREATED"]):
            if int(a["decision_point"]) not in kept:
                continue
            events = events_by_ref.get(int(a["order_ref"]), [])
            orders.append(
                {
                    "ref": int(a["order_ref"]),
                    "decision_point": int(a["decision_point"]),
                    "bar_time": _iso(a["bar_time"]),
                    "symbol": _str(a["symbol"]),
                    "side": _str(a["side"]),
                    "type": _str(a["order_type"]),
                    "size": _num(a["size"]),
                    "price": _num(a["price"]),
                    "final": events[-1]["event"] if events else "CREATED",
                    "events": events,
                }
            )
    decisions: dict[str, Any] = {}
    reads_by_point: dict[int, list[list[Any]]] = {}
    hashes: set[str] = set()
    for r in _rows(data.reads):
        reads_by_point.setdefault(int(r["decision_point"]), []).append(
            [
                int(r["seq"]),
                _str(r["symbol"]),
                _str(r["field"]),
                int(r["idx"]),
                int(r["size"]),
                int(r["bar_index"]),
                _str(r["data_hash"]),
                _num(r["value"]),
                _str(r["text_value"]),
                bool(r["lookahead"]),
            ]
        )
        if _str(r["data_hash"]):
            hashes.add(str(r["data_hash"]))
    for d in _rows(data.decisions):
        point = int(d["decision_point"])
        decisions[str(point)] = {
            "bar_time": _iso(d["bar_time"]),
            "stage": d["stage"],
            "action": d["action"],
            "reasoning": _str(d["reasoning"]),
            "confidence": _num(d["confidence"]),
            "notes": _str(d["notes"]),
            "reads_count": int(d["reads"]) if _num(d["reads"]) is not None else None,
            "lookahead_reads": int(_num(d["lookahead_reads"]) or 0),
            "portfolio_value": _num(d["portfolio_value"]),
            "portfolio_cash": _num(d["portfolio_cash"]),
            "reads": reads_by_point.get(point, []),
        }
    bars: dict[str, Any] = {}
    if len(data.bars) and hashes:
        sub = data.bars[data.bars["data_hash"].isin(hashes)]
        for b in _rows(sub):
            bars[str(b["data_hash"])] = {
                "symbol": b["symbol"],
                "bar_index": int(b["bar_index"]),
                "bar_time": _iso(b["bar_time"]),
                "open": _num(b["open"]),
                "high": _num(b["high"]),
                "low": _num(b["low"]),
                "close": _num(b["close"]),
                "volume": _num(b["volume"]),
            }
    return {
        "session_id": data.session_id,
        "orders": orders,
        "decisions": decisions,
        "bars": bars,
        "orders_left_out": data.orders_left_out,
    }


_EXPLORER_HTML = """
<h2 id="explorer-title">Decision explorer</h2>
<div id="explorer">
<p class="meta">Pick an order (or click a fill on a price chart): the decision that created it,
what the agent read in it, its notes, and what became of the order.</p>
<label>Order <select id="order-select"></select></label>
<div id="order-detail"></div>
</div>
"""

# Builds the explorer with DOM calls only (textContent, never innerHTML of recorded values:
# notes and text fields are the agent's free text).
_EXPLORER_JS = """
<script type="text/javascript">
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("explorer-data").textContent);
  var select = document.getElementById("order-select");
  var detail = document.getElementById("order-detail");
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = String(text); }
    if (cls) { e.className = cls; }
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) { return ""; }
    if (typeof v === "number") {
      return Number.isInteger(v) ? String(v)
        : v.toPrecision(8).replace(/0+$/, "").replace(/\\.$/, "");
    }
    return String(v);
  }
  function table(id, header, rows) {
    var t = el("table"); t.id = id;
    var tr = el("tr");
    header.forEach(function (h) { tr.appendChild(el("th", h)); });
    t.appendChild(tr);
    rows.forEach(function (r) {
      var row = el("tr", null, r.cls || "");
      r.cells.forEach(function (c) { row.appendChild(el("td", fmt(c.v), c.cls || "")); });
      if (r.title) { row.title = r.title; }
      t.appendChild(row);
    });
    return t;
  }
  function show(index) {
    var o = DATA.orders[index];
    detail.textContent = "";
    if (!o) { detail.appendChild(el("p", "No orders in this run.")); return; }
    var d = DATA.decisions[String(o.decision_point)] || {};
    detail.setAttribute("data-order-ref", String(o.ref));
    detail.appendChild(el("h3", "Order #" + o.ref + ": " + o.side + " " + fmt(o.size) + " " +
      o.symbol + " (" + o.type + (o.price !== null ? " @ " + fmt(o.price) : "") + "), " + o.final));
    detail.appendChild(el("p", "Created in decision " + o.decision_point + " at bar " + d.bar_time +
      " (" + d.stage + ", action " + d.action + "); portfolio " + fmt(d.portfolio_value) +
      " USD, cash " + fmt(d.portfolio_cash) + " USD.", "meta"));
    if (d.reasoning) { detail.appendChild(el("p", "Reasoning: " + d.reasoning, "reasoning")); }
    if (d.confidence !== null && d.confidence !== undefined) {
      detail.appendChild(el("p", "Confidence: " + fmt(d.confidence)));
    }
    if (d.notes) {
      var pretty = d.notes;
      try { pretty = JSON.stringify(JSON.parse(d.notes), null, 2); } catch (e) { /* as stored */ }
      detail.appendChild(el("h4", "Notes"));
      detail.appendChild(el("pre", pretty, "notes"));
    }
    detail.appendChild(el("h4", "Reads (" + (d.reads || []).length + " recorded" +
      (d.lookahead_reads ? ", " + d.lookahead_reads + " of future bars" : "") + ")"));
    var rows = (d.reads || []).map(function (r) {
      var bar = r[6] ? DATA.bars[r[6]] : null;
      return {
        cls: r[9] ? "lookahead" : "",
        title: bar ? ("bar " + bar.bar_time + " O " + fmt(bar.open) + " H " + fmt(bar.high) +
          " L " + fmt(bar.low) + " C " + fmt(bar.close) + " V " + fmt(bar.volume)) : "",
        cells: [{v: r[0]}, {v: r[1]}, {v: r[2]}, {v: r[3]}, {v: r[4]}, {v: r[5]},
          {v: bar ? bar.bar_time : ""}, {v: r[8] !== null ? r[8] : r[7], cls: "num"},
          {v: r[6] || "", cls: "hash"}, {v: bar ? fmt(bar.close) : "", cls: "num"},
          {v: r[9] ? "yes" : ""}]
      };
    });
    detail.appendChild(table("reads-table", ["seq", "symbol", "field", "index", "size",
      "bar index", "bar time", "value", "data hash", "bar close", "look-ahead"], rows));
    detail.appendChild(el("h4", "What became of the order"));
    detail.appendChild(table("events-table", ["decision", "bar time", "event", "size filled",
      "price", "commission", "reason"], o.events.map(function (e) {
        return {cells: [{v: e.decision_point}, {v: e.bar_time}, {v: e.event},
          {v: e.exec_size, cls: "num"}, {v: e.exec_price, cls: "num"},
          {v: e.commission, cls: "num"}, {v: e.reason}]};
      })));
  }
  DATA.orders.forEach(function (o, i) {
    var opt = el("option", "#" + o.ref + "  " + (o.bar_time || "").slice(0, 16).replace("T", " ") +
      "  " + o.side + " " + fmt(o.size) + " " + o.symbol + "  -> " + o.final);
    opt.value = String(i);
    select.appendChild(opt);
  });
  if (DATA.orders_left_out) {
    select.parentNode.appendChild(el("span", " (" + DATA.orders_left_out +
      " later orders not listed)", "note"));
  }
  function selectRef(ref) {
    for (var i = 0; i < DATA.orders.length; i++) {
      if (DATA.orders[i].ref === ref) { select.value = String(i); show(i); return true; }
    }
    return false;
  }
  window.fmelSelectOrder = selectRef;
  select.addEventListener("change", function () { show(parseInt(select.value, 10)); });
  var m = /order=(\\d+)/.exec(window.location.hash);
  if (!(m && selectRef(parseInt(m[1], 10)))) { show(0); }
  window.addEventListener("load", function () {
    document.querySelectorAll(".price-chart .js-plotly-plot").forEach(function (gd) {
      if (typeof gd.on === "function") {
        gd.on("plotly_click", function (ev) {
          var p = ev.points && ev.points[0];
          if (p && p.customdata !== undefined && selectRef(Number(p.customdata))) {
            document.getElementById("explorer-title").scrollIntoView();
          }
        });
      }
    });
  });
})();
</script>
"""


def render_run(data: ReportData, *, title: str | None = None) -> str:
    """The run's page as HTML text (see the module docstring)."""
    equity = data.equity
    ppy = run_periods_per_year(data) if len(equity) else 252.0
    start = float(equity.iloc[0]) if len(equity) else 0.0
    benchmark = buy_and_hold(data.bars, pd.DatetimeIndex(equity.index), start)
    strat_stats = performance_stats(equity, periods_per_year=ppy) if len(equity) else None
    bench_stats = performance_stats(benchmark, periods_per_year=ppy) if len(benchmark) else None
    columns: list[tuple[str, PerformanceStats | None]] = [("strategy", strat_stats)]
    if bench_stats is not None:
        columns.append(("buy and hold", bench_stats))
    symbols = sorted(data.bars["symbol"].unique()) if len(data.bars) else []
    first = _iso(equity.index[0]) if len(equity) else "?"
    last = _iso(equity.index[-1]) if len(equity) else "?"
    written = datetime.now().astimezone().isoformat(timespec="seconds")
    meta = html.escape(
        f"session {data.session_id} · agent {data.agent_id} ({data.agent_class}) · "
        f"mode {data.mode} · {len(equity)} decisions from {first} to {last} · "
        f"symbols {', '.join(symbols) or 'n/a'} · params {data.agent_params} · "
        f"source {data.source} · written {written}"
    )
    sections = [
        "<h2>Statistics</h2>",
        _stats_table(columns, ppy),
        _fig_html(equity_figure(equity, benchmark), "equity-chart"),
        _fig_html(drawdown_figure(equity, benchmark), "drawdown-chart"),
        _fig_html(monthly_figure(monthly_returns_pct(equity)), "monthly-chart"),
        "<h2>Prices and fills</h2>",
    ]
    fills = (
        data.actions[data.actions["event"].isin(["COMPLETED", "PARTIAL"])]
        if len(data.actions)
        else data.actions
    )
    if not symbols:
        sections.append(
            '<p class="note">No bars for this session in the store (table session_bars): '
            "no price chart and no buy-and-hold benchmark.</p>"
        )
    for i, symbol in enumerate(symbols[:MAX_PRICE_CHARTS]):
        sym_bars = data.bars[data.bars["symbol"] == symbol]
        sym_fills = fills[fills["symbol"] == symbol] if len(fills) else fills
        sections.append(
            _fig_html(price_figure(symbol, sym_bars, sym_fills), f"price-chart-{i}", "price-chart")
        )
    if len(symbols) > MAX_PRICE_CHARTS:
        sections.append(
            f'<p class="note">{len(symbols) - MAX_PRICE_CHARTS} more symbols not charted.</p>'
        )
    sections.append(_EXPLORER_HTML)
    script = _json_script("explorer-data", explorer_payload(data)) + _EXPLORER_JS
    return _page(title or f"Run report {data.session_id}", meta, sections, script)


# --------------------------------------------------------------------------------------------
# optimisation
# --------------------------------------------------------------------------------------------

#: OPTIMIZE_METRIC -> the statistic column suffix in ``trials`` (``is_<x>``, ``oos_<x>``).
METRIC_COLUMNS = {
    "sharpe": "sharpe",
    "sortino": "sortino",
    "calmar": "calmar",
    "return": "total_return_pct",
    "max_drawdown": "max_drawdown_pct",
}


def params_frame(trials: pd.DataFrame) -> pd.DataFrame:
    """One column per parameter from the ``params`` JSON text of each trial."""
    rows = [json.loads(p) if isinstance(p, str) and p else {} for p in trials["params"]]
    return pd.DataFrame(rows, index=trials.index)


def best_per_fold(trials: pd.DataFrame, folds: pd.DataFrame | None) -> pd.DataFrame:
    """The chosen trial of each fold: from ``folds`` when given (``best_trial``), else the
    complete trial with the highest ``objective``. Columns of ``trials``."""
    done = trials[trials.get("status", pd.Series("complete", index=trials.index)) == "complete"]
    done = done[done["objective"].notna()]
    if folds is not None and len(folds) and "best_trial" in folds:
        keys = {(int(f), int(t)) for f, t in zip(folds["fold"], folds["best_trial"]) if pd.notna(t)}
        chosen = done[[(int(f), int(t)) in keys for f, t in zip(done["fold"], done["trial"])]]
        if len(chosen):
            return chosen.sort_values("fold")
    if not len(done):
        return done
    return done.loc[done.groupby("fold")["objective"].idxmax()].sort_values("fold")


def surface_figure(trials: pd.DataFrame, params: pd.DataFrame, metric: str) -> Fig:
    """Heatmap of the mean in-sample objective over two numeric parameters (all folds), or
    parallel coordinates of every numeric parameter and the objective."""
    numeric = [c for c in params.columns if pd.api.types.is_numeric_dtype(params[c])]
    obj = trials["objective"].astype(float)
    if metric == "max_drawdown":
        # the objective is the negated drawdown (higher is better); show the drawdown as a
        # positive percent like the folds table and the other charts
        obj = -obj
    if len(numeric) == 2:
        x, y = numeric
        # Positional columns: a param may be named "objective" (or anything); no name clash.
        frame = pd.DataFrame({0: params[x].to_numpy(), 1: params[y].to_numpy(), 2: obj.to_numpy()})
        grid = frame.groupby([1, 0])[2].mean().unstack(0)
        z = grid.to_numpy(dtype=float)
        fig = _figure(
            _trace(
                "heatmap",
                z=[[_num(v) for v in row] for row in z],
                x=[str(v) for v in grid.columns],
                y=[str(v) for v in grid.index],
                colorscale=get_colorscale("Viridis"),
                colorbar=dict(title={"text": metric}),
                hovertemplate=f"{x}=%{{x}} {y}=%{{y}}: %{{z:.3f}}<extra></extra>",
            )
        )
        return _layout(
            fig,
            f"Parameter surface: mean in-sample {metric} over folds",
            xaxis_title=x,
            yaxis_title=y,
            hovermode="closest",
        )
    values = [_num(v) for v in obj]
    dims = [dict(label=c, values=[float(v) for v in params[c]]) for c in numeric]
    dims.append(dict(label=f"in-sample {metric}", values=values))
    fig = _figure(
        _trace(
            "parcoords",
            line=dict(color=values, colorscale=get_colorscale("Viridis"), showscale=True),
            dimensions=dims,
        )
    )
    return _layout(fig, f"Parameters against in-sample {metric} (every trial)", height=420)


def folds_figure(best: pd.DataFrame, metric: str) -> Fig:
    col = METRIC_COLUMNS.get(metric, metric)
    folds = [str(int(f)) for f in best["fold"]]
    fig = _figure()
    for window, name in (("is", "in-sample"), ("oos", "out-of-sample")):
        key = f"{window}_{col}"
        if key in best:
            fig["data"].append(_trace("bar", x=folds, y=[_num(v) for v in best[key]], name=name))
    return _layout(
        fig,
        f"Chosen trial per fold: in-sample against out-of-sample {metric}",
        barmode="group",
        xaxis_title="fold",
        yaxis_title=metric,
        hovermode="closest",
    )


def is_oos_figure(trials: pd.DataFrame, metric: str) -> Fig:
    col = METRIC_COLUMNS.get(metric, metric)
    fig = _figure()
    for fold, grp in trials.groupby("fold"):
        xs = grp[f"is_{col}"] if f"is_{col}" in grp else grp["objective"]
        ys = grp[f"oos_{col}"] if f"oos_{col}" in grp else pd.Series(np.nan, index=grp.index)
        fig["data"].append(
            _trace(
                "scatter",
                x=[_num(v) for v in xs],
                y=[_num(v) for v in ys],
                mode="markers",
                name=f"fold {fold}",
                text=[str(p) for p in grp["params"]],
                hovertemplate="%{text}<br>IS %{x:.3f} OOS %{y:.3f}<extra></extra>",
            )
        )
    return _layout(
        fig,
        f"Every trial: in-sample against out-of-sample {metric}",
        xaxis_title=f"in-sample {metric}",
        yaxis_title=f"out-of-sample {metric}",
        hovermode="closest",
    )


def _gain_without_drawdown(r: dict[str, Any], window: str) -> bool:
    """The window gained without any drawdown: its Sortino and Calmar are +inf, stored as NULL
    (the rule of ``runtime.research.trial.objective_of``; the text report prints ``inf``; the
    HTML page printed ``n/a``, undefined, for the dominant trial: a fresh-context attack)."""
    drawdown = _num(r.get(f"{window}_max_drawdown_pct"))
    gain = _num(r.get(f"{window}_total_return_pct"))
    return drawdown is not None and drawdown <= 1e-10 and gain is not None and gain > 0


def _folds_table(best: pd.DataFrame, metric: str) -> str:
    col = METRIC_COLUMNS.get(metric, metric)
    head = (
        "<tr><th>fold</th><th>train (UTC)</th><th>test (UTC)</th><th>params</th>"
        f"<th>in-sample {html.escape(metric)}</th><th>out-of-sample {html.escape(metric)}</th>"
        "<th>session</th></tr>"
    )

    def cell(r: dict[str, Any], window: str) -> str:
        v = _num(r.get(f"{window}_{col}"))
        if v is None and metric in ("sortino", "calmar") and _gain_without_drawdown(r, window):
            return "inf"  # stored NULL, the objective +inf (docs/research.md, "The objective")
        return "n/a" if v is None else f"{v:.3f}"

    rows = []
    for r in _rows(best):
        train = f"{_day(r.get('train_start'))} .. {_day(r.get('train_end'))}"
        test = f"{_day(r.get('train_end'))} .. {_day(r.get('test_end'))}"
        rows.append(
            f"<tr><td>{int(r['fold'])}</td><td>{html.escape(train)}</td>"
            f"<td>{html.escape(test if _iso(r.get('test_end')) else 'n/a')}</td>"
            f"<td>{html.escape(str(r.get('params')))}</td>"
            f'<td class="num">{cell(r, "is")}</td>'
            f'<td class="num">{cell(r, "oos")}</td>'
            f"<td>{html.escape(str(r.get('session_id') or ''))}</td></tr>"
        )
    return f'<table id="folds">{head}{"".join(rows)}</table>'


def _study_notes(trials: pd.DataFrame, folds: pd.DataFrame | None, best: pd.DataFrame) -> list[str]:
    """Warnings above the folds table: folds a stop left incomplete, folds without any trial
    with a defined objective (nothing chosen)."""
    notes: list[str] = []
    if folds is not None and len(folds) and "complete" in folds:
        open_folds = [int(f) for f, c in zip(folds["fold"], folds["complete"]) if not bool(c)]
        if open_folds:
            notes.append(
                "Interrupted: fold(s) "
                + ", ".join(map(str, open_folds))
                + " did not finish (the study was stopped); their choice is among the trials "
                "that ran."
            )
    every = sorted({int(f) for f in trials["fold"]})
    if folds is not None and len(folds):
        every = sorted(set(every) | {int(f) for f in folds["fold"]})
    chosen = {int(f) for f in best["fold"]}
    undefined = [f for f in every if f not in chosen]
    if undefined:
        notes.append(
            "No defined objective: fold(s) "
            + ", ".join(map(str, undefined))
            + " had no complete trial with a defined objective; nothing was chosen there."
        )
    return [f'<p class="note"><strong>{html.escape(n)}</strong></p>' for n in notes]


def render_study(
    trials: pd.DataFrame,
    folds: pd.DataFrame | None = None,
    *,
    study_id: str | None = None,
    metric: str | None = None,
    title: str | None = None,
) -> str:
    """An optimisation's page from its ``trials`` rows (columns of
    :data:`runtime.research.store.TRIAL_COLUMNS`: at least ``fold``, ``trial``, ``params``,
    ``objective``; ``metric``, ``status``, ``session_id``, ``is_*``, ``oos_*`` when present).

    Raises:
        ValueError: no trials, or a required column missing.
    """
    missing = [c for c in ("fold", "trial", "params", "objective") if c not in trials]
    if missing:
        raise ValueError(f"trials: missing column(s) {', '.join(missing)}")
    if not len(trials):
        raise ValueError("trials: no rows")
    metric = metric or (str(trials["metric"].iloc[0]) if "metric" in trials else "objective")
    study_id = study_id or (str(trials["study_id"].iloc[0]) if "study_id" in trials else "")
    params = params_frame(trials)
    best = best_per_fold(trials, folds)
    status = trials["status"].value_counts().to_dict() if "status" in trials else {}
    meta = html.escape(
        f"study {study_id} · {len(trials)} trials over {trials['fold'].nunique()} folds · "
        f"objective {metric} · " + ", ".join(f"{k} {v}" for k, v in status.items())
    )
    sections = [
        "<h2>Chosen parameters per fold</h2>",
        *_study_notes(trials, folds, best),
        _folds_table(best, metric),
        _fig_html(folds_figure(best, metric), "folds-chart"),
        _fig_html(surface_figure(trials, params, metric), "surface-chart"),
        _fig_html(is_oos_figure(trials, metric), "is-oos-chart"),
    ]
    return _page(title or f"Optimisation report {study_id}", meta, sections)
