"""``python runner.py`` as a subprocess on the bundled real data, and the documented queries
(``docs/decisions.md``) run against the store it wrote."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import backtrader as bt
import duckdb
import pytest

from agents.sma_cross import SmaCrossAgent
from feeds.csv import make_csv_feed
from runtime.config import load_config
from tests.conftest import DATA, REPO, clean_env, run_runner

QUERIES_DOC = REPO / "docs" / "decisions.md"


def doc_queries() -> dict[str, str]:
    """The ```sql blocks of ``docs/decisions.md`` that start with ``-- query: <name>``."""
    text = QUERIES_DOC.read_text()
    out = {}
    for block in re.findall(r"```sql\n(.*?)```", text, flags=re.S):
        m = re.match(r"-- query: (\w+)\n", block)
        if m:
            out[m.group(1)] = block[m.end() :]
    return out


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def plain_decisions_by_action() -> dict[str, int]:
    """Bars at which the example agent created orders, by side, in plain backtrader with the
    runner's defaults (no FMEL): the independent expectation for the store."""
    sides: dict[int, set[str]] = {}

    class Counting(SmaCrossAgent):
        def buy(self, *a: Any, **k: Any) -> Any:
            sides.setdefault(len(self), set()).add("BUY")
            return super().buy(*a, **k)

        def sell(self, *a: Any, **k: Any) -> Any:
            sides.setdefault(len(self), set()).add("SELL")
            return super().sell(*a, **k)

    cfg = load_config({})
    cerebro = bt.Cerebro(stdstats=False)
    for fc in cfg.csv_feeds:
        cerebro.adddata(make_csv_feed(fc), name=fc.symbol)
    cerebro.addstrategy(Counting)
    cerebro.broker.setcash(cfg.run.cash_usd)
    cerebro.broker.setcommission(commission=cfg.run.commission)
    cerebro.run()
    out: dict[str, int] = {}
    for s in sides.values():
        key = "+".join(sorted(s))
        out[key] = out.get(key, 0) + 1
    return out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    cwd = tmp_path_factory.mktemp("default_run")
    proc = run_runner(cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "fmel.duckdb", proc.stdout


def test_default_run_reports_and_stores_every_decision(default_run: tuple[Path, str]) -> None:
    db, report = default_run
    for label in (
        "start value",
        "end value",
        "return",
        "sharpe (annual)",
        "max drawdown",
        "trades",
        "decisions",
        "stored at",
        "look at them",
    ):
        assert re.search(rf"^{re.escape(label)}\s", report, flags=re.M), label
    decisions = int(re.search(r"^decisions\s+(\d+) recorded", report, flags=re.M).group(1))
    assert decisions == 5031
    assert query(db, "SELECT count(*), count(DISTINCT session_id) FROM decisions") == [
        (decisions, 1)
    ]
    # the suggested query works as printed
    shown = re.search(r"^look at them\s+(.*)$", report, flags=re.M).group(1)
    assert shown.startswith("python -m analyzers.query")


def test_doc_query_decisions_per_action(default_run: tuple[Path, str]) -> None:
    db, _ = default_run
    got = dict(query(db, doc_queries()["decisions_per_action"]))
    expected = plain_decisions_by_action()
    assert expected["BUY"] > 10 and expected["SELL"] > 10
    assert {k: v for k, v in got.items() if k != "HOLD"} == expected
    assert sum(got.values()) == 5031


def test_doc_query_fields_before_buy(default_run: tuple[Path, str]) -> None:
    db, _ = default_run
    rows = query(db, doc_queries()["fields_before_buy"])
    bought = dict(
        query(
            db,
            """SELECT decision_point, a.symbol FROM decisions,
                               UNNEST(actions) AS t(a) WHERE a.event = 'CREATED'
                               AND a.side = 'BUY'""",
        )
    )
    assert {r[0] for r in rows} == set(bought)
    for decision_point, _, symbol, fields in rows:
        if symbol == bought[decision_point]:  # the agent checked the cross, then the price
            assert fields == ["cross", "close"]
        else:
            assert "cross" in fields


def test_doc_queries_lookback_and_lookahead(workdir: Path) -> None:
    proc = run_runner(
        workdir,
        {
            "SYMBOLS": "GOOG",
            "AGENT": "tests.agents_for_tests:LookbackAgent",
            "AGENT_PARAMS": '{"every": 10, "depth": 10, "window": 20}',
        },
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = workdir / "fmel.duckdb"
    queries = doc_queries()
    # decisions reading deeper than N=5 bars back: every 10th next() once the window fits
    (deep,) = query(db, queries["lookback_deeper_than_n"])
    nexts = query(db, "SELECT count(*) FROM decisions WHERE stage <> 'PRENEXT'")[0][0]
    expected = sum(1 for call in range(1, nexts + 1) if call % 10 == 0 and call > 20)
    assert deep[0] == expected
    depth_rows = dict(query(db, queries["lookback_depth_distribution"]))
    assert depth_rows == {0: 1, 10: expected, 19: expected}
    flagged = query(db, queries["lookahead_reads"])
    assert len(flagged) == 1 and flagged[0][2:] == ("GOOG", "close", 1)
    assert "look-ahead" in proc.stdout and "look-ahead: agent read GOOG.close[1]" in proc.stderr


def test_bad_setting_exits_2_naming_the_variable(workdir: Path) -> None:
    proc = run_runner(workdir, {"CASH": "a lot"})
    assert proc.returncode == 2
    assert "CASH='a lot': expected a number" in proc.stderr
    proc = run_runner(workdir, {"AGENT_PARAMS": '{"fsat": 3}'})
    assert proc.returncode == 2 and "unknown param(s) fsat for SmaCrossAgent" in proc.stderr
    assert not (workdir / "fmel.duckdb").exists()


def test_bad_csv_row_names_file_and_line_or_is_skipped(workdir: Path) -> None:
    data = workdir / "data"
    data.mkdir()
    lines = (DATA / "GOOG.csv").read_text().splitlines()
    lines[10] = lines[10].replace(lines[10].split(",")[2], "1.0", 1)  # high below low
    (data / "GOOG.csv").write_text("\n".join(lines) + "\n")
    proc = run_runner(workdir, {"DATA_DIR": str(data)})
    assert proc.returncode == 2
    assert "CSV GOOG.csv line 11: high 1.0 < low" in proc.stderr
    proc = run_runner(workdir, {"DATA_DIR": str(data), "CSV_ON_BAD_ROWS": "skip"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^skipped rows\s+GOOG.csv: 1 ", proc.stdout, flags=re.M)
    assert query(workdir / "fmel.duckdb", "SELECT count(*) FROM decisions") == [(2147,)]


def test_sigint_flushes_what_was_recorded_and_still_reports(workdir: Path) -> None:
    env = clean_env(
        {
            "AGENT": "tests.slow_agent:SlowAgent",
            "AGENT_PARAMS": '{"sleep_s": 0.01}',
            "LOG_FORMAT": "text",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "runner.py")],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        db_dir_ready = False
        while time.monotonic() < deadline and not db_dir_ready:
            time.sleep(0.5)
            db_dir_ready = (workdir / "fmel.duckdb").exists()
        time.sleep(3)  # well into the NEXT bars (0.01 s each)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "INTERRUPTED" in out
    reported = int(re.search(r"^decisions\s+(\d+) recorded", out, flags=re.M).group(1))
    assert 0 < reported < 5031
    assert query(workdir / "fmel.duckdb", "SELECT count(*) FROM decisions") == [(reported,)]


# --- configuration failures: exit 2, naming the variable and the file (issue 11, item 8) -------


def test_unwritable_fmel_local_path_exits_2_naming_it(workdir: Path) -> None:
    blocker = workdir / "a_file"
    blocker.write_text("not a folder\n")
    for path in (blocker / "fmel.duckdb", Path("/proc/fmel.duckdb")):
        proc = run_runner(workdir, {"FMEL_LOCAL_PATH": str(path), "BACKTEST_END": "2005-01-01"})
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"FMEL_LOCAL_PATH={path}: cannot create or open the decision store" in proc.stderr
        assert "Traceback" not in proc.stderr


AGENT_MODULES = {
    "syntax_agent": (
        "import backtrader as bt\n\n\nclass Agent(bt.Strategy)\n    pass\n",
        "syntax error in {file}, line 4",
    ),
    "import_agent": (
        "import backtrader as bt\nfrom backtrader import NoSuchThing\n",
        "fails to import at {file}, line 2: ImportError: cannot import name 'NoSuchThing'",
    ),
    "raising_agent": (
        "import backtrader as bt\n\nSETTING = 1 / 0\n",
        "fails to import at {file}, line 3: ZeroDivisionError",
    ),
    "empty_agent": ("import backtrader as bt\n", "{file} has no 'Agent'"),
}


@pytest.mark.parametrize("module", sorted(AGENT_MODULES))
def test_broken_agent_module_exits_2_naming_agent_file_and_line(workdir: Path, module: str) -> None:
    source, expected = AGENT_MODULES[module]
    file = workdir / f"{module}.py"
    file.write_text(source)
    proc = run_runner(workdir, {"AGENT": f"{module}:Agent", "PYTHONPATH": f"{REPO}:{workdir}"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"AGENT='{module}:Agent'" in proc.stderr
    assert expected.format(file=file) in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ('{"fast": "10"}', "param 'fast' of SmaCrossAgent expects a whole number"),
        ('{"fast": true}', "param 'fast' of SmaCrossAgent expects a whole number"),
        ('{"allocation": "all"}', "param 'allocation' of SmaCrossAgent expects a number"),
    ],
)
def test_agent_param_of_the_wrong_type_exits_2(workdir: Path, params: str, expected: str) -> None:
    proc = run_runner(workdir, {"AGENT_PARAMS": params})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"AGENT_PARAMS: {expected}" in proc.stderr


def test_two_symbols_for_one_file_exit_2(workdir: Path) -> None:
    proc = run_runner(workdir, {"SYMBOLS": "GOOG,goog"})
    assert proc.returncode == 2
    assert "SYMBOLS: 'GOOG' and 'goog' both resolve to GOOG.csv" in proc.stderr


# --- attack 11: agent and CSV settings that once escaped as tracebacks ---


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"CSV_BAR_SIZE": "0min"}, "CSV_BAR_SIZE='0min': expected a positive count"),
        ({"CSV_DATETIME_FORMAT": "%Q"}, "CSV_DATETIME_FORMAT='%Q': '%Q' is not a strftime"),
    ],
)
def test_bad_csv_setting_exits_2_without_traceback(
    workdir: Path, extra: dict[str, str], expected: str
) -> None:
    proc = run_runner(workdir, extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_agent_refusing_its_params_exits_2_naming_agent_params(workdir: Path) -> None:
    proc = run_runner(workdir, {"AGENT_PARAMS": '{"slow": 0}'})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "AGENT_PARAMS (slow=0): agent agents.sma_cross:SmaCrossAgent failed while building" in (
        proc.stderr
    )
    assert "need 0 < fast < slow" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ('{"maperiod": 100000}', "(IndexError"),
        ('{"maperiod": 0}', "(ZeroDivisionError"),
    ],
)
def test_indicator_period_beyond_the_data_exits_2_naming_agent_params(
    workdir: Path, params: str, expected: str
) -> None:
    proc = run_runner(
        workdir, {"AGENT": "tests.idioms.agents:QuickstartSma", "AGENT_PARAMS": params}
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "AGENT_PARAMS (maperiod=" in proc.stderr and expected in proc.stderr
    assert re.search(r"\d+ bars of GOOG", proc.stderr) and "Traceback" not in proc.stderr


def test_data_shorter_than_the_default_periods_exits_2_naming_the_length(workdir: Path) -> None:
    data = workdir / "data"
    data.mkdir()
    lines = (DATA / "GOOG.csv").read_text().splitlines()
    (data / "GOOG.csv").write_text("\n".join(lines[:11]) + "\n")
    proc = run_runner(workdir, {"DATA_DIR": str(data)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "failed while warming up its indicators" in proc.stderr
    assert "the data has 10 bars of GOOG" in proc.stderr and "Traceback" not in proc.stderr


def test_a_second_run_takes_the_hashes_from_the_cache_and_stores_the_same_reads(
    tmp_path: Path,
) -> None:
    """``FMEL_HASH_CACHE_DIR``: the first backtest keeps its files' data hashes there and the
    next ones read them back instead of hashing (shown by forging the files: the forged hashes
    are what gets stored); with the cache or without it, the same reads, hash for hash."""
    from core import bar_hash_cache

    cache = tmp_path / "hashes"
    reads = (
        "SELECT decision_point, d.symbol, d.data_hash, to_json(d.access_patterns) "
        "FROM decisions, unnest(data_accessed) AS t(d) ORDER BY ALL"
    )

    def run(k: int, setting: str) -> list[tuple[Any, ...]]:
        work = tmp_path / f"run{k}"
        work.mkdir()
        proc = run_runner(work, {"FMEL_HASH_CACHE_DIR": setting, "BACKTEST_END": "2010-01-01"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        return query(work / "fmel.duckdb", reads)

    first = run(0, str(cache))
    files = sorted(cache.glob("*.barhashes"))
    assert len(files) == 3  # GOOG, SP500, NASDAQ
    assert first and all(row[2] for row in first)
    assert run(1, str(cache)) == first
    assert run(2, "off") == first
    forged = "ab" * 16
    for f in files:  # the same length, a valid checksum: only the digests are wrong
        body = bytes.fromhex(forged) * (f.stat().st_size // 16 - 1)
        f.write_bytes(body + bar_hash_cache._checksum(f.stem, body))
    assert {row[2] for row in run(3, str(cache))} == {forged}
