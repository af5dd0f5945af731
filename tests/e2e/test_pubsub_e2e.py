"""``runner.py`` in ``MODE=paper`` as a subprocess, fed by ``python -m runtime.replay`` through the
real Pub/Sub emulator, with the bundled real data:

* end to end + parity: the decisions stored by a paper run equal, field by field (data hashes,
  values read, orders, fills, portfolio), those of a CSV backtest of the same bars; only session
  ids, wall-clock times and the mode differ;
* SIGTERM mid-stream: the run stops after the current step within the shutdown budget, its
  decisions are stored, the bars it had not decided go back to the (kept) subscription, and a
  restarted runner decides them: every bar time once over both runs;
* CSV backfill warms the indicators up before the first live bar.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from feeds.csv import CSVFeedConfig, read_csv_bars
from feeds.pubsub import publisher_client
from tests.conftest import DATA, REPO, clean_env, run_runner
from tests.e2e.test_shutdown import RunnerProcess
from tests.pubsub_emulator import PubSubEmulator

pytestmark = pytest.mark.slow

SYMBOLS = "GOOG,SP500,NASDAQ"
START, END = "2005-01-01", "2005-12-31"
SHUTDOWN_BUDGET_S = 10.0  # SHUTDOWN_TIMEOUT_S default: the run must end within it


def paper_runner(work: Path, emu: PubSubEmulator, topic: str, **env: str) -> RunnerProcess:
    """``python runner.py`` in MODE=paper on ``topic`` (the shutdown tests' process wrapper:
    own process group, /metrics, stderr lines; decisions in ``work/fmel.duckdb``)."""
    work.mkdir(parents=True, exist_ok=True)
    settings = {
        **emu.env(),
        "MODE": "paper",
        "SYMBOLS": SYMBOLS,
        "PUBSUB_TOPIC": topic,
        # The subscription is <prefix>-<agent>, stable across restarts: one per test's topic.
        "PUBSUB_SUBSCRIPTION_PREFIX": f"t-{topic}",
        "PUBSUB_QCHECK_S": "0.1",
        "PUBSUB_DISCOVERY_S": "20",
        "PUBSUB_IDLE_TIMEOUT_S": "3",
    }
    settings.update(env)
    return RunnerProcess(work, **settings)


def new_topic(emu: PubSubEmulator) -> str:
    name = f"bars-{uuid.uuid4().hex[:8]}"
    pub = publisher_client(emu.host)
    pub.create_topic(request={"name": f"projects/{emu.project}/topics/{name}"})
    pub.stop()
    return name


def replay(emu: PubSubEmulator, topic: str, *args: str) -> subprocess.Popen[str]:
    sources = [f"{DATA / s}.csv:{s}" for s in SYMBOLS.split(",")]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runtime.replay",
            "--topic",
            topic,
            "--csv",
            *sources,
            *args,
            "--log-level",
            "WARNING",
        ],
        cwd=REPO,
        env=clean_env(emu.env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def decisions(store: Path) -> list[dict[str, Any]]:
    """Stored decisions without what differs between sessions (ids, wall clock, mode), order
    refs renumbered by first appearance (backtrader's refs are a process-wide counter)."""
    with duckdb.connect(str(store), read_only=True) as con:
        cur = con.execute(
            "SELECT * EXCLUDE (decision_id, session_id, ts, mode) FROM decisions ORDER BY bar_time"
        )
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    refs: dict[int, int] = {}
    for row in rows:
        for action in row["actions"]:
            action["order_ref"] = refs.setdefault(action["order_ref"], len(refs))
    return rows


def report_line(stdout: str, label: str) -> str:
    m = re.search(rf"^{re.escape(label)}\s+(.*)$", stdout, re.MULTILINE)
    assert m, stdout
    return m.group(1)


@pytest.fixture
def runners() -> Any:
    started: list[RunnerProcess] = []
    yield started
    for r in started:
        r.kill()


def test_paper_run_end_to_end_decides_like_the_backtest(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    emu = pubsub_emulator
    topic = new_topic(emu)
    (tmp_path / "bt").mkdir()
    back = run_runner(
        tmp_path / "bt",
        {
            "MODE": "backtest",
            "SYMBOLS": SYMBOLS,
            "BACKTEST_START": START,
            "BACKTEST_END": END,
            "FMEL_LOCAL_PATH": str(tmp_path / "bt.duckdb"),
            "FMEL_SPILL_DIR": str(tmp_path / "bt-spill"),
        },
    )
    assert back.returncode == 0, back.stderr[-2000:]

    paper = paper_runner(tmp_path / "paper", emu, topic)
    runners.append(paper)
    paper.wait_for("the subscription", lambda: subscription(emu, topic) in emu.subscriptions())
    pub = replay(emu, topic, "--start", START, "--end", END)
    out, err = pub.communicate(timeout=120)
    assert pub.returncode == 0, err
    published = json.loads(out)
    expected = sum(
        len(
            read_csv_bars(
                CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s, start=_utc(START), end=_utc(END))
            )
        )
        for s in SYMBOLS.split(",")
    )
    assert published["published"] == expected
    assert paper.finish(timeout_s=120) == 0, "".join(paper.err_lines[-30:])

    # The report: live counters, nothing refused or duplicated; the subscription is kept for
    # the next start of this deployment.
    assert "mode=paper" in paper.stdout
    # Missing bar times: daily bars count business days, so the 2005 exchange holidays show.
    holidays = 0
    for s in SYMBOLS.split(","):
        days = read_csv_bars(
            CSVFeedConfig(path=DATA / f"{s}.csv", symbol=s, start=_utc(START), end=_utc(END))
        ).times.astype("datetime64[D]")
        holidays += int(np.busday_count(days[0], days[-1] + 1)) - len(days)
    assert holidays == 3 * 8  # 2005: MLK, Presidents, Good Friday, Memorial, July 4, ...
    assert report_line(paper.stdout, "feed all").startswith(
        f"received={expected}, delivered={expected}, duplicates=0, malformed=0, "
        f"missing={holidays}, late=0, missed_steps=0"
    )
    assert subscription(emu, topic) in emu.subscriptions()
    # Same decisions as the backtest of the same bars: bar times, stages, every field read
    # with its value and data hash, orders and fills, portfolio.
    live_rows, back_rows = (
        decisions(tmp_path / "paper" / "fmel.duckdb"),
        decisions(tmp_path / "bt.duckdb"),
    )
    assert len(live_rows) == len(back_rows) == 252
    assert sum(r["action"] != "HOLD" for r in back_rows) >= 4
    assert live_rows == back_rows
    # The hashes are the CSV feed's.
    goog = read_csv_bars(
        CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG", start=_utc(START), end=_utc(END))
    )
    hashes = {
        a["data_hash"]
        for r in live_rows
        for d in r["data_accessed"]
        if d["symbol"] == "GOOG"
        for a in d["access_patterns"]
    }
    assert hashes and hashes <= set(goog.hashes)


def _utc(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)


def subscription(emu: PubSubEmulator, topic: str) -> str:
    """The runner's stable subscription: ``<prefix>-<agent class>``."""
    return f"projects/{emu.project}/subscriptions/t-{topic}-SmaCrossAgent"


def test_sigterm_mid_stream_then_a_restart_decides_every_bar_once(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    emu = pubsub_emulator
    topic = new_topic(emu)
    paper = paper_runner(tmp_path, emu, topic, PUBSUB_IDLE_TIMEOUT_S="0")
    runners.append(paper)
    paper.wait_for("the subscription", lambda: subscription(emu, topic) in emu.subscriptions())
    # Daily bars at 20 bars a second: the stream lasts ~13 s.
    pub = replay(emu, topic, "--start", START, "--end", END, "--speed", str(86_400 * 20))
    try:
        paper.wait_for(
            "40 live bars",
            lambda: (paper.metric("runner_bars_processed_total", feed="GOOG") or 0) >= 40,
        )
        # The live input's counters are exported as metrics too.
        assert (paper.metric("runner_bars_received_total", feed="SP500") or 0) >= 40
        assert (paper.metric("runner_message_age_seconds_count", feed="SP500") or 0) >= 40
        assert paper.metric("runner_messages_malformed_total", feed="SP500") in (None, 0.0)
        signalled = time.time()
        paper.proc.send_signal(signal.SIGTERM)
        # The shutdown budget is the contract (Kubernetes grace period): the wait's timeout.
        assert paper.finish(timeout_s=SHUTDOWN_BUDGET_S) == 0, "".join(paper.err_lines[-30:])
        assert pub.wait(timeout=120) == 0  # the rest is published while no runner is up
    finally:
        pub.kill()
        pub.communicate()
    assert "(INTERRUPTED)" in paper.stdout
    assert any("stopping: SIGTERM" in line for line in paper.err_lines)
    first = decisions(tmp_path / "fmel.duckdb")
    assert 40 <= len(first) < 252  # it really stopped mid-stream
    with duckdb.connect(str(tmp_path / "fmel.duckdb"), read_only=True) as con:
        late = con.execute(
            "SELECT count(*) FROM decisions WHERE epoch(ts) > ?", [signalled + 0.5]
        ).fetchone()
    # It stops after the current step: buffered bars are not decided (nor traded) after the
    # signal; they go back to Pub/Sub (found by an attack: 5 s of decisions after SIGTERM).
    assert late == (0,)
    counts = report_line(paper.stdout, "feed all")
    assert "duplicates=0" in counts
    undelivered = int(re.search(r"undelivered=(\d+)", counts).group(1))  # type: ignore[union-attr]
    returned = int(re.search(r"returned=(\d+)", counts).group(1))  # type: ignore[union-attr]
    assert returned >= undelivered  # bars not decided went back to Pub/Sub
    dec = re.search(r"decisions\s+(\d+) recorded \((\d+) written", paper.stdout)
    assert dec and int(dec.group(1)) == int(dec.group(2)) == len(first)
    assert subscription(emu, topic) in emu.subscriptions()  # kept with its backlog

    # The restarted runner continues from what the first one had not acknowledged.
    again = paper_runner(tmp_path, emu, topic, PUBSUB_IDLE_TIMEOUT_S="3")
    runners.append(again)
    assert again.finish(timeout_s=180) == 0, "".join(again.err_lines[-30:])
    rows = decisions(tmp_path / "fmel.duckdb")
    bar_times = [r["bar_time"] for r in rows]
    assert len(rows) == 252 and len(set(bar_times)) == 252  # every bar time once, none twice
    with duckdb.connect(str(tmp_path / "fmel.duckdb"), read_only=True) as con:
        sessions = con.execute("SELECT count(DISTINCT session_id) FROM decisions").fetchone()
        ids = con.execute("SELECT count(DISTINCT decision_id), count(*) FROM decisions").fetchone()
    assert sessions == (2,) and ids is not None and ids[0] == ids[1] == 252


def test_csv_backfill_warms_indicators_before_the_first_live_bar(
    tmp_path: Path, pubsub_emulator: PubSubEmulator, runners: list[RunnerProcess]
) -> None:
    emu = pubsub_emulator
    topic = new_topic(emu)
    # 40 bars of 2004 from the bundled CSV, then live bars of January-February 2005.
    paper = paper_runner(
        tmp_path,
        emu,
        topic,
        PUBSUB_BACKFILL_BARS="40",
        BACKTEST_END="2004-12-31",
        PUBSUB_DISCOVERY_S="0",
    )
    runners.append(paper)
    paper.wait_for("the subscription", lambda: subscription(emu, topic) in emu.subscriptions())
    pub = replay(emu, topic, "--start", "2005-01-01", "--end", "2005-02-28")
    assert pub.wait(timeout=120) == 0
    assert paper.finish(timeout_s=120) == 0, "".join(paper.err_lines[-30:])
    rows = decisions(tmp_path / "fmel.duckdb")
    cut = datetime(2005, 1, 1, tzinfo=UTC)
    warm = [r for r in rows if r["bar_time"] < cut]
    live = [r for r in rows if r["bar_time"] >= cut]
    n_live = len(
        read_csv_bars(
            CSVFeedConfig(
                path=DATA / "SP500.csv", symbol="SP500", start=cut, end=_utc("2005-02-28")
            )
        )
    )
    assert len(warm) == 40 and len(live) == n_live
    assert {r["stage"] for r in live} == {"NEXT"}  # SMA(30) ready at the first live bar
    assert warm[0]["stage"] == "PRENEXT"
    # Backfill decisions carry the CSV feed's hashes too.
    goog = read_csv_bars(
        CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG", end=datetime(2004, 12, 31, tzinfo=UTC))
    )
    warm_hashes = {
        d["data_hash"] for r in warm for d in r["data_accessed"] if d["symbol"] == "GOOG"
    }
    assert warm_hashes and warm_hashes <= set(goog.hashes[-40:])
    assert report_line(paper.stdout, "feed all").startswith(
        f"received={3 * n_live}, delivered={3 * n_live}, duplicates=0, malformed=0"
    )
