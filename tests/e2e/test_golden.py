"""Golden result: the main job's numbers on the bundled real data are pinned, so a refactor that
changes a result (a fill, a statistic, a recorded read) fails here. A change that is meant to
alter them updates the numbers below in the same commit and says why."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from tests.conftest import run_runner

pytestmark = pytest.mark.e2e

# `make run` on GOOG, SP500, NASDAQ (5,031 daily bars), SmaCrossAgent, simulated broker.
GOLDEN = {
    "end value": "236,571.25 USD",
    "return": "+136.57 %",
    "cagr": "+4.41 %",
    "sharpe (annual)": "0.561",
    "sortino (annual)": "0.806",
    "calmar": "0.229",
    "max drawdown": "19.27 %",
    "annualised from": "252 bars a year",
    "trades": "157 closed, win rate 48.4 %",
}
DECISIONS = 5031
# count and md5 of every recorded read (decision_reads, ordered), and of the decisions' actions
# and portfolio values: a change in what FMEL records fails here even when the report does not.
READS = (10919, "bd710db28e424019e57ed5c82424edf6")
DECISIONS_MD5 = "1b24a7c56a7f1c825201a4e221f6ac98"

READS_SQL = """
SELECT count(*), md5(string_agg(concat_ws('|', decision_point, symbol, seq, field, "index", size,
    bar_index, data_hash, value, text_value, lookahead), ',' ORDER BY decision_point, seq))
FROM decision_reads
"""
DECISIONS_SQL = """
SELECT count(*), md5(string_agg(concat_ws('|', decision_point, action, portfolio_value,
    portfolio_cash), ',' ORDER BY decision_point))
FROM decisions
"""


def test_the_default_run_gives_the_golden_numbers(workdir: Path) -> None:
    proc = run_runner(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = {
        m.group(1).strip(): m.group(2).strip()
        for m in re.finditer(r"^([a-z ()]+?)\s{2,}(.+)$", proc.stdout, re.M)
    }
    for key, value in GOLDEN.items():
        assert report.get(key) == value, (key, report.get(key), proc.stdout)
    assert report["decisions"].startswith(f"{DECISIONS} recorded ({DECISIONS} written")

    con = duckdb.connect(str(workdir / "fmel.duckdb"), read_only=True)
    try:
        assert con.execute(READS_SQL).fetchone() == READS
        assert con.execute(DECISIONS_SQL).fetchone() == (DECISIONS, DECISIONS_MD5)
    finally:
        con.close()
