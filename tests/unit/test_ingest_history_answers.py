"""The ingestor against history answers that lag the stream, an Alpaca clock behind the local
one, and state files a clock ahead (or a hand) wrote: every bar published once or counted in a
gap. The scripted history, Pub/Sub client and clock are helper-117's attack harness (a fresh-
context attack on the ``checked`` state of 2026-12-07), kept as tests of what it found."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from feeds.ingest.alpaca import AlpacaBar
from runtime.config import load_ingest_config
from tests.unit.test_ingest_units import BASE as UNIT_BASE

BASE = {**UNIT_BASE, "INGEST_ENRICH": "none"}
MINUTE = timedelta(minutes=1)


def at(h: int, m: int, d: int = 2, s: int = 0) -> datetime:
    return datetime(2024, 1, d, h, m, s, tzinfo=UTC)


class ScriptHistory:
    """Alpaca's historical bars as scripted: each bar visible from a local-clock time (by
    default the end of its minute). Alpaca's bars endpoint returns the bars of the span it
    has, an empty list for a symbol without any (docs.alpaca.markets/reference/stockbars);
    ``server_now`` is its ``Date`` header (RFC 9110, section 6.6.1), ``server_skew`` off the
    local clock."""

    calls = retries = 0

    def __init__(self, clock: list[datetime], server_skew: timedelta | None = timedelta(0)):
        self.clock = clock
        self.script: dict[str, list[tuple[datetime, datetime]]] = {}
        self.asked: list[tuple[list[str], datetime, datetime]] = []
        self.server_skew = server_skew

    def add(self, symbol: str, ts: datetime, visible: datetime | None = None) -> None:
        self.script.setdefault(symbol, []).append((ts, visible or ts + MINUTE))

    def bars(self, symbols: list[str], start: datetime, end: datetime) -> dict[str, list[Any]]:
        self.calls += 1
        self.asked.append((list(symbols), start, end))
        now = self.clock[0]
        return {
            s: [
                AlpacaBar(s, ts, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
                for ts, seen in sorted(self.script.get(s, []))
                if start <= ts <= end and seen <= now
            ]
            for s in symbols
        }

    def trades(self, symbols: list[str], start: datetime, end: datetime) -> dict[str, list[Any]]:
        return {s: [] for s in symbols}

    def server_now(self) -> datetime | None:
        return None if self.server_skew is None else self.clock[0] + self.server_skew

    def close(self) -> None:
        pass


class PubSubClient:
    """``PublisherClient.publish(topic, data, ordering_key=..., **attributes)`` returns a
    future that resolves to the message id once Pub/Sub took the message
    (cloud.google.com/python/docs/reference/pubsub/latest, ``publisher.client.Client.
    publish``); here each future resolves when the test says so (:meth:`confirm_all`)."""

    def __init__(self) -> None:
        self.futures: list[Future[str]] = []
        self.published: list[str] = []  # bar_key attributes, in order

    def publish(self, topic: str, data: bytes, ordering_key: str = "", **attrs: str) -> Any:
        f: Future[str] = Future()
        f.set_running_or_notify_cancel()
        self.futures.append(f)
        self.published.append(attrs.get("bar_key", ""))
        return f

    def confirm_all(self) -> None:
        for f in self.futures:
            if not f.done():
                f.set_result("id")

    def resume_publish(self, topic: str, ordering_key: str) -> None:
        pass


class FailingHistory(ScriptHistory):
    """Fails while ``fail`` is true, with the ``TransientError`` the ingestor's history client
    raises once its retries are spent."""

    fail = False

    def bars(self, symbols: list[str], start: datetime, end: datetime) -> dict[str, list[Any]]:
        if self.fail:
            from core.errors import TransientError

            self.calls += 1
            self.asked.append((list(symbols), start, end))
            raise TransientError("history down (scripted)")
        return super().bars(symbols, start, end)


def live(ing: Any, symbol: str, ts: datetime) -> None:
    """A live bar of ``symbol`` at ``ts`` as the stream sends it."""
    t = ts.strftime("%Y-%m-%dT%H:%M:%SZ")
    ing._live_bar({"T": "b", "S": symbol, "o": 1, "h": 1, "l": 1, "c": 1, "v": 1, "t": t}, 0)


def make(tmp: Path, clock: list[datetime], history: ScriptHistory, **env: str) -> Any:
    from feeds.ingest import Ingestor

    cfg, _ = load_ingest_config({**BASE, "INGEST_STATE_PATH": str(tmp / "s.json"), **env})
    client = PubSubClient()
    ing = Ingestor(cfg, client, "projects/p/topics/bars", clock=lambda: clock[0])
    ing.history = history  # type: ignore[assignment]  # the calls the ingestor makes
    ing.client_ = client  # type: ignore[attr-defined]  # the test reads it back
    return ing


def write_state(tmp: Path, doc: dict[str, Any]) -> None:
    (tmp / "s.json").write_text(json.dumps({"version": 1, **doc}))


def gaps(ing: Any) -> list[tuple[str, str, str]]:
    return [(g.symbol, g.start, g.end) for g in ing.stats.gaps]


def finish(ing: Any) -> None:
    """Every publish confirmed, the state file saved, the lock given back."""
    ing.client_.confirm_all()
    ing._confirm()
    ing._save_state(force=True)
    ing._lock.close()


def covered(ing_gaps: list[tuple[str, str, str]], symbol: str, ts: datetime) -> bool:
    def t(text: str) -> datetime:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))

    return any(s == symbol and t(a) <= ts < t(b) for s, a, b in ing_gaps)


def test_a_minute_history_lacked_when_asked_is_published_or_in_a_gap(tmp_path: Path) -> None:
    """helper-117 F1: a restart's catch-up at 15:30:06, while history has AAPL's 15:29 bar
    only from 15:30:20 (MSFT's it has): the empty answer for AAPL was kept as checked through
    15:29, the symbol then halted, and the next start, 8 days later, counted its gap from
    15:30: the 15:29 bar, in history by then, was neither published nor in a gap. An empty
    answer now proves only minutes older than HISTORY_SETTLE_S."""
    write_state(
        tmp_path, {"last_bar": {"AAPL": "2024-01-02T15:00:00Z", "MSFT": "2024-01-02T15:00:00Z"}}
    )
    clock = [at(15, 30, s=6)]
    history = ScriptHistory(clock)
    for m in range(1, 30):
        history.add("MSFT", at(15, m))
    history.add("AAPL", at(15, 29), visible=at(15, 30, s=20))
    first = make(tmp_path, clock, history)
    first._connected(time.perf_counter_ns())
    finish(first)
    clock[0] += timedelta(days=8)
    again = make(tmp_path, clock, history)
    again._connected(time.perf_counter_ns())
    finish(again)
    published = "AAPL|2024-01-02T15:29:00Z" in first.client_.published + again.client_.published
    assert published or covered(gaps(again), "AAPL", at(15, 29)), gaps(again)


def test_a_checked_time_after_the_local_clock_is_dropped_at_start(tmp_path: Path) -> None:
    """helper-117 F3: a hand edit's ``checked`` of 2024-01-20 at a start on Jan 10 was not
    taken then, but stayed in the file through the symbol's later bars and was taken once the
    clock passed it: a start on Jan 28 counted AAPL's gap from Jan 20, hiding 9 days that
    MSFT, alike but for the edit, counted. It is dropped at start, with a warning."""
    write_state(
        tmp_path,
        {
            "last_bar": {"AAPL": "2024-01-09T15:00:00Z", "MSFT": "2024-01-09T15:00:00Z"},
            "checked": {"AAPL": "2024-01-20T00:00:00Z"},
        },
    )
    clock = [datetime(2024, 1, 10, 15, 30, 6, tzinfo=UTC)]
    history = ScriptHistory(clock)
    ing = make(tmp_path, clock, history)
    assert ing.state.checked == {}
    ing._connected(time.perf_counter_ns())
    for m in range(31):  # both trade live until 16:00, confirmed
        ts = datetime(2024, 1, 10, 15, 30, tzinfo=UTC) + m * MINUTE
        for s in ("AAPL", "MSFT"):
            ing._sent[s] = ts
            ing.state.confirm(s, ts)
    finish(ing)
    assert "2024-01-20" not in (tmp_path / "s.json").read_text()
    clock[0] = datetime(2024, 1, 28, 12, 0, 6, tzinfo=UTC)
    later = make(tmp_path, clock, history)
    later._connected(time.perf_counter_ns())
    starts = {s: a for s, a, _ in gaps(later)}
    assert starts == {"AAPL": "2024-01-10T16:01:00Z", "MSFT": "2024-01-10T16:01:00Z"}
    later._lock.close()


def test_a_gap_check_is_not_cut_by_an_alpaca_clock_behind_the_stream(tmp_path: Path) -> None:
    """helper-117 P1 (older than ``checked``): Alpaca's ``Date`` header 70 s behind the local
    clock cut the gap check's history at 15:27, the check counted as done, and the live
    15:29 bar was published past the hole: 15:28 lost, no gap. The live bar proves the
    minutes before it complete."""
    write_state(
        tmp_path, {"last_bar": {"AAPL": "2024-01-02T15:26:00Z", "MSFT": "2024-01-02T15:26:00Z"}}
    )
    clock = [at(15, 30, s=1)]
    history = ScriptHistory(clock, server_skew=timedelta(seconds=-70))
    for m in (27, 28, 29):
        history.add("AAPL", at(15, m))
    ing = make(tmp_path, clock, history)
    ing.connected = True
    assert ing._lock.acquire(threading.Event())
    ing._verify = {"AAPL"}
    raw = {"T": "b", "S": "AAPL", "o": 1, "h": 1, "l": 1, "c": 1, "v": 1}
    ing._live_bar({**raw, "t": "2024-01-02T15:29:00Z"}, 0)
    finish(ing)
    assert ing.client_.published == [f"AAPL|2024-01-02T15:{m}:00Z" for m in (27, 28, 29)]
    assert gaps(ing) == []


def test_a_new_symbols_first_minute_is_fetched_when_the_stream_had_sent_it(tmp_path: Path) -> None:
    """helper-117 P2 (older than ``checked``): a first start 2 s after 15:00 ended (within
    INGEST_HISTORY_LAG_S): the symbols' start point is 14:59, so 15:00 is promised, but its
    bar was streamed before the subscription, the catch-up ended before it, and the first
    live bar (15:01) was not checked against history: 15:00 lost, no gap."""
    clock = [at(15, 1, s=2)]
    history = ScriptHistory(clock)
    for s in ("AAPL", "MSFT"):
        history.add(s, at(14, 59))
        history.add(s, at(15, 0))
    ing = make(tmp_path, clock, history)
    ing._connected(time.perf_counter_ns())
    assert ing.state.start == {"AAPL": at(14, 59), "MSFT": at(14, 59)}
    clock[0] = at(15, 2, s=1)
    raw = {"T": "b", "o": 1, "h": 1, "l": 1, "c": 1, "v": 1, "t": "2024-01-02T15:01:00Z"}
    for s in ("AAPL", "MSFT"):
        history.add(s, at(15, 1))
        ing._live_bar({**raw, "S": s}, 0)
    finish(ing)
    assert ing.client_.published == [
        f"{s}|2024-01-02T15:0{m}:00Z" for s in ("AAPL", "MSFT") for m in (0, 1)
    ]
    assert gaps(ing) == []


def test_a_start_point_is_not_moved_past_a_minute_history_had_late(tmp_path: Path) -> None:
    """helper-119 F1 (older than the checked times): a catch-up moved a symbol with nothing
    published to the newest bar history had of any symbol (MSFT's 15:29), while its own
    15:29 bar was in history only 14 s later: the bar was never fetched, no gap. Start points
    move only as far as an empty answer proves (HISTORY_SETTLE_S)."""
    write_state(
        tmp_path,
        {"last_bar": {"MSFT": "2024-01-02T15:00:00Z"}, "start": {"AAPL": "2024-01-02T15:00:00Z"}},
    )
    clock = [at(15, 30, s=6)]
    history = ScriptHistory(clock)
    for m in range(1, 30):
        history.add("MSFT", at(15, m))
    history.add("AAPL", at(15, 29), visible=at(15, 30, s=20))
    ing = make(tmp_path, clock, history)
    ing._connected(time.perf_counter_ns())
    assert ing.state.start["AAPL"] <= at(15, 15)
    clock[0] = at(15, 31, s=1)
    history.add("AAPL", at(15, 30))
    live(ing, "AAPL", at(15, 30))
    finish(ing)
    assert [k for k in ing.client_.published if k.startswith("AAPL")] == [
        "AAPL|2024-01-02T15:29:00Z",
        "AAPL|2024-01-02T15:30:00Z",
    ]
    assert gaps(ing) == []


def test_a_failed_gap_check_counts_only_what_neither_history_nor_the_stream_covered(
    tmp_path: Path,
) -> None:
    """helper-119 F2: a thin symbol's first live bar two hours after the start, history
    failing then: the gap counted was the two hours, though the stream was connected all
    along; a published symbol's was counted from its last bar, though an empty answer had
    covered most of it. Now from the later of the two, to the first minute the connection's
    stream surely delivers."""
    clock = [at(15, 0, s=30)]
    history = FailingHistory(clock)
    history.add("MSFT", at(14, 59))
    ing = make(tmp_path, clock, history)
    ing._connected(time.perf_counter_ns())  # MSFT and AAPL start at 14:59
    clock[0] = at(15, 1, s=1)
    live(ing, "MSFT", at(15, 0))
    clock[0] = at(17, 1, s=1)
    history.add("AAPL", at(17, 0))
    history.fail = True
    live(ing, "AAPL", at(17, 0))
    finish(ing)
    # the stream's first bar (MSFT's 15:00) proves it delivered what followed: only 15:00,
    # whose bars were being sent as it subscribed, is uncertain
    assert gaps(ing) == [("AAPL", "2024-01-02T15:00:00Z", "2024-01-02T15:01:00Z")]
    assert ing.client_.published == ["MSFT|2024-01-02T15:00:00Z", "AAPL|2024-01-02T17:00:00Z"]


def test_a_takeover_keeps_its_own_checked_time_over_the_others_future_one(
    tmp_path: Path,
) -> None:
    """helper-119 F4: the other ingestor's ``checked`` dated after this one's clock replaced
    this one's own in the merge, and was then dropped: nothing left, and a symbol that does
    not trade counted a gap of ten days. The other's future time is dropped before the merge."""
    clock = [at(15, 0, s=30, d=20)]
    last = "2024-01-10T15:00:00Z"
    write_state(
        tmp_path,
        {
            "last_bar": {"HALT": last, "MSFT": "2024-01-20T14:58:00Z"},
            "checked": {"HALT": "2024-01-20T14:40:00Z"},
        },
    )
    history = ScriptHistory(clock, server_skew=None)
    standby = make(tmp_path, clock, history, SYMBOLS="MSFT,HALT")
    write_state(
        tmp_path,
        {
            "last_bar": {"HALT": last, "MSFT": "2024-01-20T14:59:00Z"},
            "checked": {"HALT": "2024-01-20T15:10:00Z"},  # a clock 25 minutes ahead
        },
    )
    standby._connected(time.perf_counter_ns())
    assert gaps(standby) == []
    assert standby.state.checked["HALT"] <= at(15, 0, d=20)
    standby._lock.close()


def _published_or_in_a_gap(ing: Any, symbol: str, minutes: list[datetime]) -> None:
    for ts in minutes:
        key = f"{symbol}|{ts.strftime('%Y-%m-%dT%H:%M:%SZ')}"
        assert key in ing.client_.published or covered(gaps(ing), symbol, ts), (key, gaps(ing))


def test_a_subscription_later_than_the_connect_leaves_its_minutes_in_the_gap(
    tmp_path: Path,
) -> None:
    """helper-121 F1: what a connection's stream delivers was taken from the connect's local
    minute, but alpaca-py subscribes after its on_connected hook, which a full queue blocks.
    Connected at 15:10:30, subscribed at 15:13:05, history down: 15:11 and 15:12 were neither
    streamed nor fetched nor in the gap. It is taken from the stream's own bars now."""
    write_state(tmp_path, {"last_bar": {"AAPL": "2024-01-02T15:00:00Z"}})
    clock = [at(15, 10, s=30)]
    history = FailingHistory(clock)
    for m in range(1, 14):
        history.add("AAPL", at(15, m))
    history.fail = True
    ing = make(tmp_path, clock, history, SYMBOLS="AAPL")
    ing._connected(time.perf_counter_ns())
    clock[0] = at(15, 14, s=1)  # the first bar streamed: 15:13's
    live(ing, "AAPL", at(15, 13))
    finish(ing)
    _published_or_in_a_gap(ing, "AAPL", [at(15, m) for m in range(1, 14)])


def test_a_local_clock_behind_alpacas_leaves_no_minute_out_of_the_gap(tmp_path: Path) -> None:
    """helper-121 F1: the local clock 70 s behind Alpaca's (within the tolerance), history
    down: the connect's local minute put 15:10, streamed before the connection, after the
    gap."""
    write_state(tmp_path, {"last_bar": {"AAPL": "2024-01-02T15:00:00Z"}})
    clock = [at(15, 9, s=55)]  # Alpaca: 15:11:05
    history = FailingHistory(clock, server_skew=timedelta(seconds=70))
    history.fail = True
    ing = make(tmp_path, clock, history, SYMBOLS="AAPL")
    ing._connected(time.perf_counter_ns())
    clock[0] = at(15, 10, s=52)
    live(ing, "AAPL", at(15, 11))
    finish(ing)
    _published_or_in_a_gap(ing, "AAPL", [at(15, m) for m in range(1, 12)])


def test_a_reconnect_does_not_count_what_the_previous_connection_streamed(
    tmp_path: Path,
) -> None:
    """helper-121 F2: AAPL (thin) last traded at 10:00 while MSFT traded every minute on a
    connection that dropped at 15:00:10; reconnected at 15:00:12 with history down, AAPL's
    first bar at 15:30 counted 10:01-15:01 as a gap, though the first connection's stream had
    delivered 10:02-14:58. Only the minutes around the connections are counted: 10:01 (the
    first connection's first minute, whose bars were being sent as it subscribed), 14:59 (its
    last, maybe cut) and 15:00."""
    write_state(
        tmp_path, {"last_bar": {"AAPL": "2024-01-02T10:00:00Z", "MSFT": "2024-01-02T10:00:00Z"}}
    )
    clock = [at(10, 0, s=50)]
    history = FailingHistory(clock)
    ing = make(tmp_path, clock, history)
    ing._connected(time.perf_counter_ns())
    for m in range(1, 300):  # 10:01 .. 14:59
        ts = at(10, 0) + m * MINUTE
        clock[0] = ts + timedelta(seconds=61)
        live(ing, "MSFT", ts)
    ing.client_.confirm_all()
    ing._confirm()
    clock[0] = at(15, 0, s=12)
    history.fail = True
    ing._connected(time.perf_counter_ns())  # the catch-up fails
    clock[0] = at(15, 1, s=1)
    live(ing, "MSFT", at(15, 0))
    clock[0] = at(15, 31, s=1)
    live(ing, "AAPL", at(15, 30))
    finish(ing)
    assert [g for g in gaps(ing) if g[0] == "AAPL"] == [
        ("AAPL", "2024-01-02T10:01:00Z", "2024-01-02T10:02:00Z"),
        ("AAPL", "2024-01-02T14:59:00Z", "2024-01-02T15:01:00Z"),
    ]


def test_a_connection_that_sent_one_bar_adds_no_overlapping_gap(tmp_path: Path) -> None:
    """A connection whose stream sent one bar proves nothing (its span is empty); counted as a
    span, it split the possible gap into two that overlapped: [10:01, 10:02) and
    [10:01, 10:06) for one symbol (found reading the change again)."""
    write_state(
        tmp_path,
        {"last_bar": {"AAPL": "2024-01-02T10:00:00Z", "MSFT": "2024-01-02T10:00:00Z"}},
    )
    clock = [at(10, 0, s=50)]
    history = FailingHistory(clock)
    ing = make(tmp_path, clock, history)
    ing._connected(time.perf_counter_ns())
    clock[0] = at(10, 2, s=1)
    live(ing, "MSFT", at(10, 1))  # the only bar of the first connection
    ing.client_.confirm_all()
    ing._confirm()
    clock[0] = at(10, 5, s=12)
    history.fail = True
    ing._connected(time.perf_counter_ns())
    for m in range(5, 30):
        clock[0] = at(10, m + 1, s=1)
        live(ing, "MSFT", at(10, m))
    clock[0] = at(10, 31, s=1)
    live(ing, "AAPL", at(10, 30))
    finish(ing)
    assert [g for g in gaps(ing) if g[0] == "AAPL"] == [
        ("AAPL", "2024-01-02T10:01:00Z", "2024-01-02T10:06:00Z")
    ]
