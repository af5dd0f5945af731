"""Steps of the live input (:class:`feeds.pubsub.hub.BarHub`) with a late symbol, and missing bar
times (:class:`feeds.pubsub.gaps.GapCounter`), without a server.

The alignment rule (docs/pubsub.md, "Steps"): one bar time per step, a step waits at most
``PUBSUB_ALIGN_WAIT_S`` from its first bar, a bar that comes after its step is refused as late and
never merged into a later step, and a paper run then decides exactly like a backtest whose files
lack the late bars (the records name the symbols that missed each step).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import backtrader as bt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.sma_cross import SmaCrossAgent
from analyzers.fmel import FMELAnalyzer
from analyzers.schema import to_row
from core.time import utc_to_bt_num
from feeds.buffers import BoundedFloats
from feeds.csv import CSVFeedConfig, make_csv_feed, read_csv_bars
from feeds.pubsub import BarHub, FieldSet, GapCounter, MessageHandler, decode_message
from feeds.pubsub.feed import make_pubsub_feed
from feeds.pubsub.handler import DELIVERED, MALFORMED
from feeds.pubsub.hub import LATE, MAX_HOLD_S, OFFERED, RETURNED
from feeds.replay import bar_messages
from runtime.live import MISSED_STEP_NOTE, MissedStepNote
from tests.conftest import DATA

T0 = datetime(2024, 3, 1, 14, 30, tzinfo=UTC)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def bar(symbol: str, second: int) -> Any:
    doc = {
        "timestamp": (T0 + timedelta(seconds=second)).isoformat(),
        "open": 10.0,
        "high": 11.0,
        "low": 9.0,
        "close": 10.0,
    }
    return decode_message(json.dumps(doc).encode(), {"symbol": symbol})


def simulate(
    lag_s: float, *, n: int = 40, align_wait_s: float = 1.0, tick_s: float = 0.05
) -> dict[str, Any]:
    """A publishes bar i at i s, B at i + lag_s s; a consumer runs a backtrader-like pass every
    tick (take for each symbol, then the second chance with the step's time)."""
    clock = FakeClock()
    start = clock.now
    hub = BarHub(["A", "B"], align_wait_s=align_wait_s, clock=clock)
    arrivals = sorted(
        [(i * 1.0, "A", i) for i in range(n)] + [(i * 1.0 + lag_s, "B", i) for i in range(n)]
    )
    first_arrival: dict[int, float] = {}
    steps: list[tuple[float, list[tuple[str, int]]]] = []  # (served at, bars)
    outcomes: dict[str, int] = {OFFERED: 0, LATE: 0}
    k = 0
    t = 0.0
    while t <= n + lag_s + 3 * align_wait_s:
        while k < len(arrivals) and arrivals[k][0] <= t:
            _, sym, i = arrivals[k]
            first_arrival.setdefault(i, t)
            outcomes[hub.offer(bar(sym, i))] += 1
            k += 1
        clock.now = start + t
        hub.begin_pass(1)
        hub.begin_pass(2)
        got = [(s, hub.take(s, 0)) for s in ("A", "B")]
        step = hub.current_step
        got = [(s, b) if b is not None else (s, hub.take(s, 0, master_num=step)) for s, b in got]
        taken = [(s, round((b.ts - T0).total_seconds())) for s, b in got if b is not None]
        if taken:
            steps.append((t, taken))
        t = round(t + tick_s, 6)
    return {"hub": hub, "steps": steps, "first": first_arrival, "outcomes": outcomes}


@pytest.mark.parametrize("lag_s", [0.3, 5.0, 15.0])
def test_a_step_never_mixes_bar_times_and_waits_at_most_the_align_wait(lag_s: float) -> None:
    r = simulate(lag_s)
    times = [{i for _, i in taken} for _, taken in r["steps"]]
    assert all(len(ts) == 1 for ts in times)  # one bar time per step
    served = [next(iter(ts)) for ts in times]
    assert served == sorted(set(served))  # each time once, in order: no doubled decisions
    assert len(served) == 40
    for at, taken in r["steps"]:
        assert at - r["first"][taken[0][1]] <= 1.0 + 0.05 + 1e-9  # align wait + one tick


def test_a_symbol_within_the_wait_is_always_in_step() -> None:
    r = simulate(0.3)
    assert all(len(taken) == 2 for _, taken in r["steps"])
    assert r["outcomes"][LATE] == 0 and not r["hub"].missed


@pytest.mark.parametrize("lag_s", [5.0, 15.0])
def test_a_lagging_symbol_misses_steps_and_its_bars_are_refused_as_late(lag_s: float) -> None:
    r = simulate(lag_s)
    hub = r["hub"]
    assert all(taken == [("A", i)] for (_, taken), i in zip(r["steps"], range(40), strict=True))
    assert r["outcomes"][LATE] == 40 and hub.late["B"] == 40
    assert hub.missed["B"] == 1  # once it missed, it is not waited for: the others go on
    # After the first step, the others are served at once (B costs them nothing).
    waits = [at - r["first"][taken[0][1]] for at, taken in r["steps"][1:]]
    assert max(waits) < 0.05 + 1e-9


def test_a_symbol_late_by_one_step_is_waited_for_again() -> None:
    clock = FakeClock()
    hub = BarHub(["A", "B"], align_wait_s=1.0, clock=clock)
    hub.offer(bar("A", 0))
    clock.now += 1.5
    hub.begin_pass(1)
    assert hub.take("A", 0) is not None  # step 0 without B
    assert hub.offer(bar("B", 0)) == LATE
    hub.offer(bar("A", 1))
    hub.begin_pass(1)
    assert hub.take("A", 0) is None  # step 1 waits for B again (it caught up)
    hub.offer(bar("B", 1))
    hub.begin_pass(1)
    hub.begin_pass(2)
    assert hub.take("A", 0) is not None and hub.take("B", 0) is not None


# -- parity: a paper run with late bars = a backtest without them ------------------------------


class MissReader(SmaCrossAgent):
    """The SMA agent that also records which feeds missed each step (``data.missed_step``)."""

    def __init__(self) -> None:
        super().__init__()
        self.missed: list[tuple[str, ...]] = []

    def next(self) -> None:
        self.missed.append(tuple(d._name for d in self.datas if getattr(d, "missed_step", False)))
        super().next()


def _slice(symbol: str) -> CSVFeedConfig:
    return CSVFeedConfig(
        path=DATA / f"{symbol}.csv",
        symbol=symbol,
        start=datetime(2004, 1, 1, tzinfo=UTC),
        end=datetime(2004, 12, 31, tzinfo=UTC),
    )


def _records(strategy: Any) -> list[dict[str, Any]]:
    rows = [to_row(r) for r in strategy.analyzers.fmel.records]
    refs: dict[int, int] = {}
    for row in rows:
        for key in ("decision_id", "session_id", "ts", "mode"):
            row.pop(key)
        for action in row["actions"]:
            action["order_ref"] = refs.setdefault(action["order_ref"], len(refs))
    return rows


def test_paper_decisions_equal_a_backtest_that_sees_the_same_gaps(tmp_path: Path) -> None:
    cfgs = [_slice("SP500"), _slice("NASDAQ")]
    sources = [read_csv_bars(c) for c in cfgs]
    nasdaq_times = list(sources[1].times)
    late = {nasdaq_times[i] for i in (40, 41, 90, 150, 151, 152)}
    clock = FakeClock()
    hub = BarHub(["SP500", "NASDAQ"], align_wait_s=1.0, clock=clock)
    handler = MessageHandler(hub)
    fields = {b.symbol: FieldSet(b.extra_fields, tuple(b.text)) for b in sources}
    handler.freeze_fields(fields)
    outcomes: list[str] = []

    def produce() -> None:
        pending_late: list[Any] = []
        for i, m in enumerate(bar_messages(sources)):
            if pending_late and m.ts != pending_late[0].ts:
                # The late NASDAQ bar comes after its step was served (the wait ran out).
                clock.now += 2.0
                assert hub.served_through(utc_to_bt_num(pending_late[0].ts), 30)
                for p in pending_late:
                    outcomes.append(handler.handle(p.body, {"symbol": p.symbol}, message_id=p.ts))
                pending_late.clear()
            if m.symbol == "NASDAQ" and m.ts.replace(tzinfo=None) in {
                t.astype("datetime64[us]").item() for t in late
            }:
                pending_late.append(m)
                continue
            assert handler.handle(m.body, {"symbol": m.symbol}, message_id=str(i)) == DELIVERED
        hub.close_input("end of test data")

    def cerebro(feeds: list[Any]) -> Any:
        c = bt.Cerebro(stdstats=False)
        for f in feeds:
            c.adddata(f, name=f.p.name)
        c.addstrategy(MissReader)
        c.addanalyzer(MissedStepNote, _name="missed_step")
        c.addanalyzer(FMELAnalyzer, _name="fmel")
        c.broker.setcash(100_000)
        c.broker.setcommission(commission=0.001)
        return c

    live_engine = cerebro(
        [
            make_pubsub_feed(
                hub, c.symbol, fields[c.symbol], qcheck_s=0.05, timeframe=bt.TimeFrame.Days
            )
            for c in cfgs
        ]
    )
    producer = threading.Thread(target=produce)
    producer.start()
    live = live_engine.run()[0]
    producer.join(30)
    assert outcomes == [MALFORMED] * len(late)
    assert hub.late["NASDAQ"] == len(late) and handler.stats.malformed == {"late_bar": len(late)}

    # The same run over CSV files, NASDAQ's without the late rows.
    gappy = tmp_path / "NASDAQ.csv"
    lines = (DATA / "NASDAQ.csv").read_text().splitlines()
    keep = [lines[0]] + [
        line
        for line in lines[1:]
        if datetime.strptime(line.split(",")[0], "%m/%d/%Y")
        not in {t.astype("datetime64[us]").item() for t in late}
    ]
    gappy.write_text("\n".join(keep) + "\n")
    back_cfgs = [
        cfgs[0],
        CSVFeedConfig(path=gappy, symbol="NASDAQ", start=cfgs[1].start, end=cfgs[1].end),
    ]
    back = cerebro([make_csv_feed(c) for c in back_cfgs]).run()[0]

    live_rows, back_rows = _records(live), _records(back)
    # The live side ran on the compact bounded lines (feeds.buffers), the backtest on arrays.
    assert all(isinstance(d.lines.close.array, BoundedFloats) for d in live.datas)
    assert len(live_rows) == len(back_rows) == len(sources[0].times)
    assert live_rows == back_rows
    assert live.broker.getvalue() == back.broker.getvalue()
    # The agent saw the misses (data.missed_step) and the records name them.
    assert sum(m == ("NASDAQ",) for m in live.missed) == len(late)
    noted = [r for r in live_rows if r["notes"] and MISSED_STEP_NOTE in json.loads(r["notes"])]
    assert len(noted) == len(late)


# -- missing bar times --------------------------------------------------------------------------


def _num(text: str) -> float:
    return utc_to_bt_num(datetime.fromisoformat(text).replace(tzinfo=UTC))


def test_gaps_are_counted_on_the_bar_size_grid() -> None:
    g = GapCounter(60.0)
    assert g.missing(_num("2024-03-01 14:30"), _num("2024-03-01 14:31")) == 0
    assert g.missing(_num("2024-03-01 14:31"), _num("2024-03-01 14:35")) == 3
    closes = GapCounter(60.0, gap_max_s=3600)
    assert closes.missing(_num("2024-03-01 21:00"), _num("2024-03-04 14:30")) == 0  # closed
    assert closes.missing(_num("2024-03-01 14:31"), _num("2024-03-01 14:41")) == 9


def test_daily_gaps_skip_weekends() -> None:
    g = GapCounter(86_400.0)
    assert g.missing(_num("2024-03-01"), _num("2024-03-04")) == 0  # Friday -> Monday
    assert g.missing(_num("2024-03-04"), _num("2024-03-07")) == 2  # Tue, Wed missing
    assert g.missing(_num("2024-03-01"), _num("2024-03-12")) == 6


def test_the_bar_size_is_inferred_from_the_smallest_spacing() -> None:
    g = GapCounter(None)
    assert g.missing(_num("2024-03-01 14:30:00"), _num("2024-03-01 14:30:05")) == 0
    assert g.missing(_num("2024-03-01 14:30:05"), _num("2024-03-01 14:30:06")) == 0
    assert g.bar_s == 1.0
    assert g.missing(_num("2024-03-01 14:30:06"), _num("2024-03-01 14:30:16")) == 9


def test_gaps_are_counted_in_what_the_agent_gets_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = BarHub(["A"], align_wait_s=0)
    hub.gaps = GapCounter(1.0)
    seen: list[tuple[str, int]] = []
    hub.on_gap = lambda symbol, missing: seen.append((symbol, missing))
    h = MessageHandler(hub)
    # Second 9 comes before 3..8 would have (they never come); 10 follows.
    for i, second in enumerate((0, 1, 2, 9, 10)):
        doc = {
            "timestamp": (T0 + timedelta(seconds=second)).isoformat(),
            "open": 1.0,
            "high": 1.0,
            "low": 1.0,
            "close": 1.0,
        }
        assert h.handle(json.dumps(doc).encode(), {"symbol": "A"}, message_id=str(i)) == DELIVERED
    taken = []
    for _ in range(5):
        hub.begin_pass(1)
        bar = hub.take("A", 0)
        assert bar is not None
        taken.append(bar)
    assert seen == [("A", 6)] and hub.missing == {"A": 6} and hub.gap_events == 1
    said = [r.getMessage() for r in caplog.records if "6 bar time(s) missing" in r.getMessage()]
    # the last bar before the gap by its time, to the millisecond (found by helper-60: a
    # day number's float cut to milliseconds printed 14:41 as 14:40:59.999)
    prev = (T0 + timedelta(seconds=2)).isoformat(timespec="milliseconds")
    assert len(said) == 1 and f"between {prev} and" in said[0], said


def test_bars_out_of_order_are_put_back_in_order_until_their_step() -> None:
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    h = MessageHandler(hub)
    for second in (2, 0, 1, 3):
        doc = {
            "timestamp": (T0 + timedelta(seconds=second)).isoformat(),
            "open": 1.0,
            "high": 1.0,
            "low": 1.0,
            "close": 1.0,
        }
        assert h.handle(json.dumps(doc).encode(), {"symbol": "A"}, message_id=None) == DELIVERED
    got = []
    for _ in range(2):
        hub.begin_pass(1)
        got.append(hub.take("A", 0))
    assert [int((b.ts - T0).total_seconds()) for b in got] == [0, 1]
    # Once second 1 was served, a copy of second 0 that was evicted from the de-duplication
    # memory is stale; second 1 again is a duplicate (remembered).
    late = json.dumps(
        {"timestamp": T0.isoformat(), "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0}
    ).encode()
    h._recent["A"].clear()
    assert h.handle(late, {"symbol": "A"}, message_id=None) == MALFORMED
    assert h.stats.malformed == {"stale_timestamp": 1}


def test_a_bar_older_than_a_served_step_is_late_and_holds_nothing() -> None:
    """A bar that arrives out of order holds steps for ``disorder_quiet_s`` (an older one may
    still be on its way), unless it is late itself: it is refused, and any bar it could be
    waited for with is older still. Before (a fresh-context attack on the emulator), one bar
    an hour old held every symbol for 15 s, and one every 5 s held them all the 120 s cap."""
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.disorder_quiet_s = 15.0
    for i in range(3):
        hub.offer(bar("A", i))
    assert _served(hub) == [0, 1, 2]
    assert hub.offer(bar("A", 1)) == LATE  # older than a served step
    hub.offer(bar("A", 3))
    assert _served(hub) == [3]  # at once: no hold
    assert hub.offer(bar("A", 5)) == OFFERED
    assert hub.offer(bar("A", 4)) == OFFERED  # out of order, not late: this one holds
    assert _served(hub) == []
    clock.now += 15.0
    assert _served(hub) == [4, 5]


def test_steps_are_held_while_redeliveries_are_due() -> None:
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.hold_steps(15.0)
    assert hub.offer(bar("A", 5)) == OFFERED
    hub.begin_pass(1)
    assert hub.take("A", 0) is None  # held: an older bar may still be redelivered
    assert hub.offer(bar("A", 4)) == OFFERED  # ...and it comes
    clock.now += 15.0
    hub.begin_pass(1)
    first = hub.take("A", 0)
    assert first is not None and first.ts == T0 + timedelta(seconds=4)


def _served(hub: BarHub, symbol: str = "A") -> list[int]:
    got = []
    while True:
        hub.begin_pass(1)
        b = hub.take(symbol, 0)
        if b is None:
            return got
        got.append(int((b.ts - T0).total_seconds()))


def test_after_a_reconnect_a_step_waits_for_missing_bar_times_to_be_redelivered() -> None:
    """A bar pulled just before a cut comes back one lease later, after newer ones and after the
    reconnect hold: within PUBSUB_GAP_HOLD_S the next step waits for it instead of leaving it
    behind as late."""
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.gaps = GapCounter(1.0)
    hub.gap_hold_s = 30.0
    for i in range(3):
        hub.offer(bar("A", i))
    assert _served(hub) == [0, 1, 2]
    hub.hold_steps(5.0)  # the reconnect
    for i in (4, 5):
        hub.offer(bar("A", i))
    clock.now += 6.0  # the hold is over, bar 3 is still on its way
    assert _served(hub) == []
    assert hub.offer(bar("A", 3)) == OFFERED  # redelivered
    assert _served(hub) == [3, 4, 5]
    assert hub.gap_holds == 1 and hub.late["A"] == 0


def test_a_real_gap_costs_the_gap_hold_once_and_is_counted() -> None:
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.gaps = GapCounter(1.0)
    hub.gap_hold_s = 30.0
    hub.offer(bar("A", 0))
    assert _served(hub) == [0]
    hub.hold_steps(5.0)
    hub.offer(bar("A", 2))  # bar 1 is lost for good
    clock.now += 29.0
    assert _served(hub) == []
    clock.now += 1.0
    assert _served(hub) == [2]
    assert hub.missing["A"] == 1
    hub.offer(bar("A", 4))  # no hold in force: a later gap does not wait
    assert _served(hub) == [4]


def test_a_restarted_run_waits_for_the_bars_after_the_last_one_acknowledged() -> None:
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.gaps = GapCounter(1.0)
    hub.gap_hold_s = 30.0
    hub.resume_after(utc_to_bt_num(T0 + timedelta(seconds=9)))
    hub.hold_steps(5.0)
    hub.offer(bar("A", 12))  # published while the runner was down, delivered first
    clock.now += 6.0
    assert _served(hub) == []  # 10 and 11, held by the dead runner, come one lease later
    hub.offer(bar("A", 11))
    hub.offer(bar("A", 10))
    assert _served(hub) == [10, 11, 12]


def test_without_a_known_bar_size_there_is_no_gap_hold() -> None:
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.gap_hold_s = 30.0  # GapCounter() infers the size: no gap hold
    hub.offer(bar("A", 0))
    assert _served(hub) == [0]
    hub.hold_steps(1.0)
    hub.offer(bar("A", 5))
    clock.now += 1.0
    assert _served(hub) == [5]


def test_bars_an_earlier_run_decided_are_refused_after_a_restart() -> None:
    """Found by the 30-minute soak: after a kill and an emulator restart, a publisher's backfill
    brought back bars the killed run had decided, and the new run decided them again (with a
    broker: traded twice). Preloaded CSV history still plays."""
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.gaps = GapCounter(1.0)
    hub.preload([bar("A", 0), bar("A", 1)])  # CSV backfill: warm-up history
    hub.resume_after(utc_to_bt_num(T0 + timedelta(seconds=9)))
    assert hub.offer(bar("A", 5)) == LATE  # decided by the earlier run
    assert hub.offer(bar("A", 9)) == LATE
    assert hub.offer(bar("A", 10)) == OFFERED
    assert _served(hub) == [0, 1, 10]
    assert hub.offer(bar("A", 8)) == LATE


def test_a_backlog_that_keeps_coming_out_of_order_holds_steps_at_most_max_hold_s() -> None:
    """Attack finding: a large backlog arriving out of order started a new disorder hold as
    each ended, so a restarted runner decided nothing for minutes (docs: at most 120 s)."""
    clock = FakeClock()
    hub = BarHub(["A"], align_wait_s=0, clock=clock)
    hub.disorder_quiet_s = 15.0
    t0 = clock.now
    hub.offer(bar("A", 100))
    hub.offer(bar("A", 50))  # out of order: a hold begins
    served: list[int] = []
    for k in range(40):  # another out-of-order bar every 7 s, for 280 s
        clock.now += 7.0
        hub.offer(bar("A", 101 + k))
        hub.offer(bar("A", 51 + k))
        served += _served(hub)
        if served:
            break
    assert served and clock.now - t0 <= MAX_HOLD_S + 7.0, (clock.now - t0, served)
    assert hub.holds == 1


def _leased(symbol: str, second: int) -> Any:
    """A bar whose message can go back to Pub/Sub (acknowledged only once decided)."""
    return bar(symbol, second)._replace(token=object())


def _offer_now(hub: BarHub, b: Any) -> str:
    """``hub.offer(b)`` on a pull thread of its own; fails if it waits (for room)."""
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(hub.offer(b)), daemon=True)
    t.start()
    t.join(2.0)
    assert out, f"offer of {b.ts} waits for room behind newer bars"
    return out[0]


def test_a_backlog_larger_than_the_buffer_is_served_whole_and_in_order() -> None:
    """Left alone in an earlier session: a backlog larger than ``max_buffered_bars`` coming
    newest first filled the buffer with the newest bars; the pull thread waited for room
    behind them, the hold ran out, and every older bar then came late and was refused (lost).
    Now the buffer keeps the oldest bars; the others go back to Pub/Sub, and no step is served
    past a bar that went back until it comes again."""
    clock = FakeClock()
    hub = BarHub(["A", "B"], max_buffered_bars=3, align_wait_s=0, clock=clock)
    hub.disorder_quiet_s = 5.0
    hub.hold_steps(5.0)  # a (re)connect: what was pulled before comes back mixed with newer bars
    queue = [_leased("A", i) for i in range(9, -1, -1)] + [_leased("B", i) for i in range(10)]
    served: list[int] = []
    b_served: list[int] = []
    for _ in range(200):  # the main thread (steps) and a pull thread (offers), interleaved
        served += _served(hub, "A")
        b_served += _served(hub, "B")
        if queue:
            got = _offer_now(hub, queue[0])
            assert got in (OFFERED, RETURNED)
            back = hub.pop_returned()
            if got == RETURNED:
                back.append(queue[0])
            queue = queue[1:] + back  # what went back is pulled again later
        clock.now += 1.0
        assert max(len(hub._bufs[s].pending) for s in "AB") <= 3
        if not queue and len(served) == 10:
            break
    assert served == list(range(10)), served
    assert b_served == list(range(10))
    assert sum(hub.late.values()) == 0 and hub.returned["A"] > 0


def test_bars_that_cannot_come_again_still_wait_for_room() -> None:
    """Acknowledged on receipt (no token), a bar cannot go back: the pull thread waits for room
    as before, and nothing is returned."""
    clock = FakeClock()
    hub = BarHub(["A"], max_buffered_bars=2, align_wait_s=0, clock=clock)
    hub.hold_steps(5.0)
    assert hub.offer(bar("A", 5)) == OFFERED
    assert hub.offer(bar("A", 4)) == OFFERED
    done: list[str] = []
    t = threading.Thread(target=lambda: done.append(hub.offer(bar("A", 3))), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive() and not hub.pop_returned()  # waits for room, drops nothing
    clock.now += 10.0
    assert _served(hub)[:1] == [4]
    t.join(5.0)
    assert done == [LATE]  # as before this change: an older bar behind a full buffer is late


def test_a_copy_of_a_buffered_bar_behind_a_full_buffer_does_not_wait_for_room() -> None:
    """helper-78 (F5): a copy of a buffered bar, older than the handler's window of recent bar
    times, reached a full buffer during a hold; nothing was displaced (its time is buffered)
    and the pull thread waited for room, so the older half of a backlog came after its steps
    and was lost. A copy needs no room: refused at once as a second copy, for leased bars and
    for bars acknowledged on receipt alike."""
    for make in (_leased, bar):
        clock = FakeClock()
        hub = BarHub(["A"], max_buffered_bars=2, align_wait_s=0, clock=clock)
        hub.hold_steps(5.0)
        assert _offer_now(hub, make("A", 9)) == OFFERED
        assert _offer_now(hub, make("A", 8)) == OFFERED
        assert _offer_now(hub, make("A", 9)) == LATE  # the copy: at once, not after room
        assert hub.late["A"] == 1 and not hub.pop_returned()
        if make is _leased:
            assert _offer_now(hub, make("A", 7)) == OFFERED  # the older bars go on coming
            assert [b.dt_num for b in hub.pop_returned()] == [bar("A", 9).dt_num]


def test_the_idle_timeout_neither_ends_the_run_nor_drains_past_a_bar_that_went_back() -> None:
    """helper-78 (F1): with PUBSUB_IDLE_TIMEOUT_S, the input closed while bars of a backlog
    were back at Pub/Sub; the drain served the newer bar buffered after them (decided and
    acknowledged), and at the next start they were refused as late, never decided. Now the
    idle timeout waits while a bar is owed (at most MAX_HOLD_S), and a close with owed bars
    serves no step from the oldest owed one on."""
    clock = FakeClock()
    hub = BarHub(["A"], max_buffered_bars=2, align_wait_s=0, clock=clock)
    hub.idle_timeout_s = 3.0
    hub.hold_steps(1.0)
    assert _offer_now(hub, _leased("A", 5)) == OFFERED
    assert _offer_now(hub, _leased("A", 4)) == OFFERED
    assert _offer_now(hub, _leased("A", 3)) == OFFERED  # 5 goes back: owed
    assert [int((b.ts - T0).total_seconds()) for b in hub.pop_returned()] == [5]
    clock.now += 4.0  # idle for longer than the timeout, 5 not come again
    assert _served(hub) == [3, 4]
    assert not hub.input_closed  # waits for the bar that went back
    assert _offer_now(hub, _leased("A", 5)) == OFFERED
    assert _served(hub) == [5]
    clock.now += 4.0
    assert _served(hub) == [] and hub.input_closed  # idle, nothing owed: the run ends

    # closed with a bar owed and a newer one buffered: the drain stops before the owed one
    hub = BarHub(["A"], max_buffered_bars=2, align_wait_s=0, clock=clock)
    hub.hold_steps(1.0)
    for s in (8, 6, 5):  # 8 goes back when 5 comes: owed
        assert _offer_now(hub, _leased("A", s)) == OFFERED
    assert [int((b.ts - T0).total_seconds()) for b in hub.pop_returned()] == [8]
    clock.now += 2.0
    assert _served(hub) == [5, 6]
    assert _offer_now(hub, _leased("A", 9)) == OFFERED  # room again: buffered after owed 8
    assert _served(hub) == []  # waits for 8
    hub.close_input("test", drain_timeout_s=30.0)
    assert _served(hub) == [] and hub.finished("A")  # 9 not decided before 8: left to redo
    assert hub.depth("A") == 1


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["AAA", "BBB", "CCC"]), st.integers(0, 50), st.booleans()),
        max_size=40,
    ),
    st.integers(0, 30),
)
def test_shedding_hands_back_the_newest_leased_bars_and_owes_their_times(
    offers: list[tuple[str, int, bool]], count: int
) -> None:
    """helper-78 F2 (BarHub.shed_newest): at most ``count`` and at most half of the buffered
    bars go back; they are the newest bars of each symbol's leased tail, the globally newest
    first; the rest stay in order; and no step at or after the oldest handed-back time is
    served while it is owed."""
    clock = FakeClock()
    hub = BarHub(["AAA", "BBB", "CCC"], align_wait_s=0.0, clock=clock)
    for symbol, second, leased in offers:
        hub.offer(_leased(symbol, second) if leased else bar(symbol, second))
    before = {s: [b.dt_num for b in hub._bufs[s].pending] for s in hub.symbols}
    tails = []
    for s in hub.symbols:
        for b in reversed(hub._bufs[s].pending):
            if b.token is None:
                break
            tails.append(b.dt_num)
    total = hub.buffered
    n = hub.shed_newest(count)
    assert n == min(count, total // 2, len(tails)) and hub.buffered == total - n
    back = hub.pop_returned()
    assert len(back) == n and all(b.token is not None for b in back)
    assert sorted((b.dt_num for b in back), reverse=True) == sorted(tails, reverse=True)[:n]
    for s in hub.symbols:
        kept = [b.dt_num for b in hub._bufs[s].pending]
        assert kept == before[s][: len(kept)]  # a prefix: only the newest left
    if back:
        due = hub._due(clock())
        assert due is None or due < min(b.dt_num for b in back)
