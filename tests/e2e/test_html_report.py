"""The HTML report in a real headless Chromium: ``runner.py`` (the default run, as ``make run``)
writes it next to the store and prints its path; the page loads without JavaScript errors,
every plot renders (elements present, screenshot not blank), and the decision explorer shows
the reads of a known trade exactly as the store holds them. ``python -m runtime.reporting``
writes the same page later from the store alone."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest

from tests.chromium import WAIT_FOR_PLOTS_JS, Chromium, colour_stats, dump_dom
from tests.conftest import REPO, clean_env, run_runner

pytestmark = pytest.mark.e2e

PLOTS = (
    "equity-chart",
    "drawdown-chart",
    "monthly-chart",
    "price-chart-0",
    "price-chart-1",
    "price-chart-2",
)


READS_JS = """
(() => {
  const rows = [...document.querySelectorAll('#reads-table tr')].slice(1);
  return {
    ref: document.getElementById('order-detail').getAttribute('data-order-ref'),
    reasoning: (document.querySelector('#order-detail .reasoning') || {}).textContent || null,
    rows: rows.map(tr => [...tr.children].map(td => td.textContent)),
    events: [...document.querySelectorAll('#events-table tr')].slice(1)
      .map(tr => tr.children[2].textContent),
  };
})()
"""


@dataclass
class Run:
    workdir: Path
    stdout: str
    html: Path
    session: str


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    workdir = tmp_path_factory.mktemp("html") / "work"
    workdir.mkdir()
    proc = run_runner(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"^html report\s+(\S+)$", proc.stdout, re.M)
    assert m, proc.stdout
    session = re.search(r"Portfolio report\s+session (\S+)", proc.stdout)
    assert session
    return Run(workdir, proc.stdout, Path(m.group(1)), session.group(1))


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    with Chromium(tmp_path_factory.mktemp("chromium")).running() as chromium:
        yield chromium


def known_trade(db: Path) -> tuple[int, str | None, list[tuple[Any, ...]]]:
    """The first order of the run, its decision's reasoning and reads, straight from SQL."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        ref, point, reasoning = con.sql(
            "SELECT a.order_ref, d.decision_point, d.reasoning FROM decisions d, "
            "UNNEST(d.actions) t(a) WHERE a.event = 'CREATED' ORDER BY d.decision_point, a.seq "
            "LIMIT 1"
        ).fetchall()[0]
        reads = con.sql(
            'SELECT r.seq, r.symbol, r.field, r."index", r.bar_index, r.value, r.data_hash, '
            "strftime(b.bar_time AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S') "
            "FROM decision_reads r LEFT JOIN session_bars b USING (session_id, data_hash) "
            f"WHERE r.decision_point = {int(point)} ORDER BY r.seq"
        ).fetchall()
    finally:
        con.close()
    return int(ref), reasoning, reads


def test_make_run_writes_the_report_next_to_the_store(run: Run) -> None:
    assert run.html.parent == run.workdir
    assert run.html.name == f"report-{run.session}.html"
    text = run.html.read_text(encoding="utf-8")
    assert "<script" in text and "http://" not in text.split("</head>")[0].split("<script")[0]
    # no network needed: plotly.js is inline, nothing is loaded from elsewhere
    assert not re.search(r"<script[^>]+src=", text)
    assert not re.search(r"<link[^>]+href=", text)


def test_page_loads_without_errors_and_every_plot_renders(run: Run, browser: Chromium) -> None:
    async def check() -> tuple[list[str], Any, list[tuple[int, float]]]:
        ws, page = await browser.open(run.html.as_uri(), width=1200, height=900)
        try:
            plots = await page.evaluate(WAIT_FOR_PLOTS_JS)
            shots = []
            for p in plots or []:
                png = await page.screenshot(
                    {"x": p["x"], "y": p["y"], "width": p["width"], "height": p["height"]}
                )
                shots.append(colour_stats(png))
            return page.errors, plots, shots
        finally:
            await ws.close()

    errors, plots, shots = asyncio.run(check())
    assert errors == []
    assert plots is not None, "plots never rendered"
    assert [p["id"] for p in plots] == list(PLOTS)
    for p, (colours, ink) in zip(plots, shots):
        assert p["traces"] >= 1 and p["drawn"] >= 1, p
        assert p["width"] > 300 and p["height"] > 200, p
        # a drawn chart: many colours (lines, anti-aliasing, heatmap) and real ink
        assert colours > 20 and ink > 0.02, (p["id"], colours, ink)
    assert "Uncaught" not in browser.log_path.read_text(errors="replace")


def test_explorer_shows_the_reads_of_a_known_trade(run: Run, browser: Chromium) -> None:
    ref, reasoning, reads = known_trade(run.workdir / "fmel.duckdb")
    assert reads, "the first trade's decision recorded no reads"

    async def explore() -> tuple[list[str], Any, Any]:
        ws, page = await browser.open(run.html.as_uri())
        try:
            await page.evaluate(f"fmelSelectOrder({ref})")
            shown = await page.evaluate(READS_JS)
            # a click on a fill marker selects its order: emit plotly's click event
            other = await page.evaluate(
                "(() => { const gd = document.querySelector('.price-chart .js-plotly-plot');"
                " const t = gd.data.find(t => t.customdata && t.customdata.length);"
                " const r = Number(t.customdata[t.customdata.length - 1]);"
                " gd.emit('plotly_click', {points: [{customdata: r}]});"
                " return [r, document.getElementById('order-detail')"
                ".getAttribute('data-order-ref')]; })()"
            )
            return page.errors, shown, other
        finally:
            await ws.close()

    errors, shown, other = asyncio.run(explore())
    assert errors == []
    assert shown["ref"] == str(ref)
    assert shown["reasoning"] == f"Reasoning: {reasoning}"
    assert shown["events"][-1] in ("COMPLETED", "CANCELED", "MARGIN", "REJECTED")
    assert len(shown["rows"]) == len(reads)
    for row, (seq, symbol, field, index, bar_index, value, data_hash, bar_time) in zip(
        shown["rows"], reads
    ):
        assert row[0] == str(seq) and row[1] == symbol and row[2] == field
        assert row[3] == str(index) and row[5] == str(bar_index)
        assert float(row[7]) == pytest.approx(value, rel=1e-7)
        assert row[8] == data_hash
        assert row[6].startswith(bar_time), (row, bar_time)  # the bar behind the hash
    assert other[1] == str(other[0])


def test_dump_dom_after_scripts(run: Run, tmp_path: Path) -> None:
    ref, _, reads = known_trade(run.workdir / "fmel.duckdb")
    dom = dump_dom(f"{run.html.as_uri()}#order={ref}", tmp_path / "profile")
    assert dom.count('class="main-svg"') >= len(PLOTS)
    assert f'data-order-ref="{ref}"' in dom
    assert 'id="reads-table"' in dom and reads[0][6] in dom


def test_the_cli_writes_the_same_report_from_the_store(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "later.html"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "runtime.reporting", *args],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    db = str(run.workdir / "fmel.duckdb")
    proc = cli("--db", db, "--session", run.session, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out.resolve())

    def payload(path: Path) -> tuple[Any, str]:
        text = path.read_text(encoding="utf-8")
        data = re.search(
            r'<script id="explorer-data" type="application/json">(.*?)</script>', text, re.S
        )
        stats = re.search(r'<table id="stats">.*?</table>', text, re.S)
        assert data and stats
        return json.loads(data.group(1)), stats.group(0)

    assert payload(out) == payload(run.html)
    listed = cli("--db", db, "--list")
    assert listed.returncode == 0 and run.session in listed.stdout.split()
    unknown = cli("--db", db, "--session", "no-such-session", "--out", str(tmp_path / "x.html"))
    assert unknown.returncode == 2 and "no-such-session" in unknown.stderr
    missing = cli("--db", str(tmp_path / "none.duckdb"), "--session", run.session)
    assert missing.returncode == 2 and "none.duckdb" in missing.stderr
