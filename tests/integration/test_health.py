"""Health endpoint and metrics: real HTTP on a free port, real backtrader runs, a real writer."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import backtrader as bt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from analyzers.sinks.duckdb import LocalDuckDBSink
from analyzers.sinks.writer import DecisionWriter
from feeds.csv import CSVFeedConfig, make_csv_feed
from runtime.config import BUNDLED_DATA_DIR
from runtime.health import HealthServer
from runtime.metrics import MetricsAnalyzer, RunMetrics


def get(url: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, 4xx/5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


@pytest.fixture
def server() -> Iterator[HealthServer]:
    hs = HealthServer(port=0, host="127.0.0.1", metrics=RunMetrics())
    hs.start()
    try:
        yield hs
    finally:
        hs.stop()


def url(hs: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{hs.port}{path}"


# -- endpoint ---------------------------------------------------------------------------------


def test_healthz_answers_while_alive(server: HealthServer) -> None:
    status, ctype, body = get(url(server, "/healthz"))
    assert status == 200 and ctype == "application/json"
    assert json.loads(body)["status"] == "ok"


def test_readyz_follows_the_checks(server: HealthServer) -> None:
    state = {"feeds": False}
    server.add_check("feeds", lambda: (state["feeds"], "GOOG DELAYED"))
    server.add_check("sink", lambda: True)
    status, _, body = get(url(server, "/readyz"))
    assert status == 503
    checks = json.loads(body)["checks"]
    assert checks["feeds"] == {"ok": False, "detail": "GOOG DELAYED"}
    assert checks["sink"]["ok"] is True
    state["feeds"] = True
    assert get(url(server, "/readyz"))[0] == 200
    server.set_draining()
    status, _, body = get(url(server, "/readyz"))
    assert status == 503 and json.loads(body)["checks"]["draining"]["ok"] is False


def test_a_raising_check_is_not_ready_and_hides_its_message(server: HealthServer) -> None:
    def broken() -> bool:
        raise ConnectionError("token=abc123 refused")

    server.add_check("broker", broken)
    status, _, body = get(url(server, "/readyz"))
    assert status == 503
    assert json.loads(body)["checks"]["broker"]["detail"] == "check raised ConnectionError"
    assert "abc123" not in body


def test_liveness_checks_fail_healthz(server: HealthServer) -> None:
    server.add_check("loop", lambda: (False, "bar loop stuck"), liveness=True)
    status, _, body = get(url(server, "/healthz"))
    assert status == 503 and "bar loop stuck" in body


def test_metrics_are_prometheus_text(server: HealthServer) -> None:
    assert server.metrics is not None
    server.metrics.set_info(session="s1", agent="sma", mode="backtest")
    server.metrics.bars_received.labels(feed="GOOG").inc(3)
    status, ctype, body = get(url(server, "/metrics"))
    assert status == 200 and ctype.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["runner_bars_received"].samples[0].value == 3.0
    assert families["runner_info"].samples[0].labels == {
        "session": "s1",
        "agent": "sma",
        "mode": "backtest",
    }


def test_unknown_path_is_404(server: HealthServer) -> None:
    assert get(url(server, "/nope"))[0] == 404


def test_idle_connections_are_closed(server: HealthServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """helper-82: idle half-requests each held a server thread for good (3,000 of them: 3,000
    threads, +80 MB). A silent connection is now closed after the handler's timeout."""
    import socket
    import threading

    import runtime.health as health

    monkeypatch.setattr(health._Handler, "timeout", 1.0)
    before = threading.active_count()
    idle = []
    for _ in range(4):
        c = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        c.sendall(b"GET /healthz HTTP/1.1\r\n")  # and never the rest
        idle.append(c)
    try:
        for c in idle:
            assert c.recv(100) == b""  # closed by the server after its timeout, nothing sent
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= before
        assert get(url(server, "/healthz"))[0] == 200
    finally:
        for c in idle:
            c.close()


def test_a_probe_is_answered_when_every_slot_is_held(server: HealthServer) -> None:
    """At most MAX_CONNECTIONS are served at once (here 3). When all are held, by clients
    that send a byte now and then and so never go silent (helper-84: 512 of them locked the
    probes out for good), the oldest connection is closed to make room: a probe is answered."""
    import socket
    import threading

    srv = server._server
    assert srv is not None
    srv._slots = threading.BoundedSemaphore(3)
    held = []
    for _ in range(3):
        c = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        c.sendall(b"GET /healthz HTTP/1.1\r\n")
        held.append(c)
    stop = threading.Event()

    def drip() -> None:  # never silent for the handler's timeout
        while not stop.wait(0.3):
            for c in held:
                try:
                    c.sendall(b"X")
                except OSError:
                    pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        deadline = time.monotonic() + 5
        while srv._slots._value > 0 and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.05)
        for _ in range(3):
            assert get(url(server, "/healthz"))[0] == 200
        assert srv.evicted >= 1 and srv.refused == 0
        assert held[0].recv(100) == b""  # the oldest was closed to make room
    finally:
        stop.set()
        dripper.join(2)
        for c in held:
            c.close()


def test_stop_releases_the_port_and_the_thread() -> None:
    hs = HealthServer(port=0, host="127.0.0.1")
    hs.start()
    port = hs.port
    thread = hs._thread
    assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    hs.stop()
    hs.stop()  # idempotent
    assert thread is not None and not thread.is_alive()
    again = HealthServer(port=port, host="127.0.0.1")  # the port is free again
    again.start()
    again.stop()
    with pytest.raises(ValueError):
        HealthServer(port=70000)


# -- metrics ----------------------------------------------------------------------------------


def test_registries_are_per_run() -> None:
    a, b = RunMetrics(), RunMetrics()
    a.orders.labels(status="Completed").inc()
    assert a.value("runner_orders_total", status="Completed") == 1.0
    assert b.value("runner_orders_total", status="Completed") is None


def test_writer_counters_are_read_at_scrape_time(tmp_path: Path) -> None:
    m = RunMetrics()
    writer = DecisionWriter(
        LocalDuckDBSink(tmp_path / "d.duckdb"),
        batch_size=2,
        flush_interval_s=0.05,
        spill_dir=tmp_path / "spill",
    )
    m.watch_writer(writer)
    assert m.value("runner_decision_records_written_total") == 0.0
    assert m.value("runner_decision_sink_healthy") == 1.0
    writer.start()
    for i in range(5):
        writer.submit(_row(i))
    stats = writer.stop()
    assert stats.written == 5
    assert m.value("runner_decision_records_written_total") == 5.0
    assert m.value("runner_decision_records_spilled_total") == 0.0
    assert m.value("runner_decision_records_queued") == 0.0
    assert b"runner_decision_records_written_total 5.0" in m.render()


def _row(i: int) -> dict[str, Any]:
    from analyzers.schema import DECISION_SCHEMA

    row: dict[str, Any] = {f.name: None for f in DECISION_SCHEMA}
    row.update(
        decision_id=f"d{i}",
        session_id="s",
        agent_id="a",
        mode="backtest",
        decision_point=i,
        stage="NEXT",
        action="HOLD",
        ts=datetime.now(UTC).isoformat(),
        bar_time=datetime.now(UTC).isoformat(),
    )
    for f in DECISION_SCHEMA:
        if f.mode == "REPEATED":
            row[f.name] = []
    return row


class CountingAgent(bt.Strategy):  # type: ignore[misc]
    """Buys and sells on a fixed rhythm and counts its own order notifications."""

    def __init__(self) -> None:
        self.notes = 0
        self.bars = 0

    def notify_order(self, order: Any) -> None:
        self.notes += 1

    def next(self) -> None:
        self.bars += 1
        if self.bars % 50 == 1:
            self.buy(data=self.datas[0], size=1)
        elif self.bars % 50 == 25:
            self.close(data=self.datas[0])


def test_bar_loop_metrics_match_the_run() -> None:
    m = RunMetrics()
    cerebro = bt.Cerebro(stdstats=False)
    for sym in ("GOOG", "SP500"):
        cerebro.adddata(
            make_csv_feed(CSVFeedConfig(path=BUNDLED_DATA_DIR / f"{sym}.csv", symbol=sym)), name=sym
        )
    cerebro.addstrategy(CountingAgent)
    cerebro.addanalyzer(MetricsAnalyzer, _name="metrics", metrics=m)
    strat = cerebro.run()[0]
    for data in strat.datas:
        assert m.value("runner_bars_processed_total", feed=data._name) == float(len(data))
    assert m.value("runner_bar_loop_seconds_count") == float(len(strat))
    orders = sum(
        s.value
        for f in text_string_to_metric_families(m.render().decode())
        if f.name == "runner_orders"
        for s in f.samples
        if s.name.endswith("_total")
    )
    assert orders == strat.notes > 0
    assert m.value("runner_orders_total", status="Completed") is not None
    # CSV feeds are not live: no lag reported for them.
    assert m.value("runner_feed_lag_seconds", feed="GOOG") is None


class LiveList(bt.feed.DataBase):  # type: ignore[misc]
    """A minimal live feed: bars from a list, stamped as given."""

    params = (("bars", ()),)

    def islive(self) -> bool:
        return True

    def start(self) -> None:
        super().start()
        self._it = iter(self.p.bars)

    def _load(self) -> bool:
        try:
            ts, price = next(self._it)
        except StopIteration:
            return False
        self.lines.datetime[0] = bt.date2num(ts)
        for name in ("open", "high", "low", "close"):
            getattr(self.lines, name)[0] = price
        self.lines.volume[0] = 1.0
        return True


def test_live_feed_lag_is_reported() -> None:
    m = RunMetrics()
    now = datetime.now(UTC).replace(tzinfo=None)
    bars = [(now - timedelta(seconds=120 - i), 100.0 + i) for i in range(3)]
    cerebro = bt.Cerebro(stdstats=False, preload=False, runonce=False)
    cerebro.adddata(LiveList(bars=bars), name="BTC/USD")
    cerebro.addstrategy(bt.Strategy)
    cerebro.addanalyzer(MetricsAnalyzer, metrics=m)
    t0 = time.time()
    cerebro.run()
    lag = m.value("runner_feed_lag_seconds", feed="BTC/USD")
    assert lag is not None
    # The last bar was stamped 118 s before `now`; the lag is measured after it.
    assert 118.0 - 1.0 <= lag <= 118.0 + (time.time() - t0) + 1.0
    assert m.value("runner_bars_processed_total", feed="BTC/USD") == 3.0
