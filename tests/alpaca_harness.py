"""Shared pieces of the Alpaca broker tests and benchmark: a queue-fed live feed, a scripted
agent that records every notification, a fast broker config for either Alpaca API, a server
whose rate limit runs at the same speed-up, and a run driver.

Time is compressed: the fast config polls every ``FAST_POLL_S`` instead of Alpaca's 2 s, so the
server's rate limit (200 requests per minute) runs ``TIME_SCALE`` times faster too: a test that
stays under it would stay under it at the real intervals.

The live feed is the shape every live feed here has (docs/field-notes.md): a
``bt.feed.DataBase`` whose
``islive()`` is True and whose ``_load()`` pops one bar from a thread-safe queue (True), finds
none within ``qcheck`` seconds (None: cerebro loops, the broker drains its events) or gets the
end marker (False).
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import backtrader as bt
import pytest

from core.secret import Secret
from runtime.brokers.alpaca.broker import AlpacaPaperTradingBroker
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.orders import position_key
from runtime.brokers.risk import RiskConfig
from tests.alpaca_server import AlpacaServer


class QueueFeed(bt.feed.DataBase):  # type: ignore[misc]
    """A live feed fed from another thread: ``feed.put(close)``; ``feed.end()`` to finish."""

    params = (("qcheck", 0.02),)

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[datetime, float] | None] = queue.Queue()
        self._t = datetime(2026, 11, 20, 14, 30)
        self.loaded = 0

    def islive(self) -> bool:
        return True

    def haslivedata(self) -> bool:
        return not self.q.empty()

    def put(self, close: float) -> None:
        self._t += timedelta(minutes=1)
        self.q.put((self._t, close))

    def end(self) -> None:
        self.q.put(None)

    def _load(self) -> bool | None:
        try:
            item = self.q.get(timeout=self.p.qcheck)
        except queue.Empty:
            return None
        if item is None:
            return False
        t, close = item
        self.lines.datetime[0] = bt.date2num(t)
        for name in ("open", "high", "low", "close"):
            getattr(self.lines, name)[0] = close
        self.lines.volume[0] = 1000.0
        self.lines.openinterest[0] = 0.0
        self.loaded += 1
        return True


@dataclass
class Note:
    """One ``notify_order`` call as the agent saw it."""

    ref: int
    status: str
    symbol: str
    side: str
    fills: list[tuple[float, float]]  # (size, price) of this notification's new executions
    reason: str | None
    t: float  # time.perf_counter() when the agent got it


@dataclass
class Log:
    """What the scripted agent saw; thread-safe reads for the driver."""

    notes: list[Note] = field(default_factory=list)
    bars: int = 0
    orders: dict[str, Any] = field(default_factory=dict)  # name -> order (main thread only)
    calls: dict[str, float] = field(default_factory=dict)  # name -> perf_counter at the call
    lock: threading.Lock = field(default_factory=threading.Lock)

    def statuses(self, ref: int) -> list[str]:
        with self.lock:
            return [n.status for n in self.notes if n.ref == ref]

    def has(self, pred: Callable[[Note], bool]) -> bool:
        with self.lock:
            return any(pred(n) for n in self.notes)


class Scripted(bt.Strategy):  # type: ignore[misc]
    """Runs ``script[bar_number](strategy)`` at each bar and logs every notification."""

    params = (("script", None), ("log", None))

    def notify_order(self, order: Any) -> None:
        log: Log = self.p.log
        fills = [(float(b.size), float(b.price)) for b in order.executed.iterpending()]
        note = Note(
            order.ref,
            order.getstatusname(),
            str(order.data._name),
            "BUY" if order.isbuy() else "SELL",
            fills,
            order.info.get("reason"),
            time.perf_counter(),
        )
        with log.lock:
            log.notes.append(note)

    def next(self) -> None:
        log: Log = self.p.log
        action = (self.p.script or {}).get(log.bars + 1)
        if action is not None:
            action(self)
        with log.lock:  # counted after the action: the driver may then look at its orders
            log.bars += 1


FAST_POLL_S = 0.03
TIME_SCALE = 2.0 / FAST_POLL_S  # Alpaca's default poll interval over the tests'
APIS = ("trading", "broker")


@pytest.fixture(params=APIS)
def api(request: pytest.FixtureRequest) -> str:
    """Runs a test on the Trading API and on the Broker API (import it into a test module)."""
    return str(request.param)


def make_server(**kw: Any) -> AlpacaServer:
    """An (unstarted) server whose rate limit is scaled to the fast config's speed-up."""
    kw.setdefault("time_scale", TIME_SCALE)
    return AlpacaServer(**kw)


def fast_config(server: AlpacaServer, api: str = "trading", **overrides: Any) -> AlpacaBrokerConfig:
    """A config pointing at ``server`` with short intervals so tests run in well under 1 s.

    Args:
        api: ``"trading"`` (the Trading API, its websocket) or ``"broker"`` (the Broker API on
            the server's account, its events SSE).
        overrides: any config field (``use_stream=False`` for polling only).
    """
    if api not in APIS:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    broker = api == "broker"
    kw: dict[str, Any] = dict(
        api_key=Secret(server.broker_key if broker else server.api_key, source="test"),
        secret_key=Secret(server.broker_secret if broker else server.secret_key, source="test"),
        account_id=server.account_id if broker else None,
        base_url=server.url,
        poll_interval_s=FAST_POLL_S,
        stream_poll_interval_s=FAST_POLL_S * 5,
        refresh_interval_s=0.5,
        request_timeout_s=0.25,
        max_attempts=8,
        backoff_base_s=0.005,
        backoff_max_s=0.04,
        open_order_policy="halt",
        stop_timeout_s=3.0,
    )
    kw.update(overrides)
    return AlpacaBrokerConfig(**kw)


def new_session() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@dataclass
class Run:
    """One cerebro run against the test server."""

    cerebro: Any
    broker: AlpacaPaperTradingBroker
    feeds: dict[str, QueueFeed]
    log: Log
    strategy: Any = None


def build_run(
    server: AlpacaServer,
    symbols: tuple[str, ...],
    script: dict[int, Any],
    *,
    api: str = "trading",
    config: AlpacaBrokerConfig | None = None,
    risk: RiskConfig | None = None,
    quicknotify: bool = True,
    analyzers: tuple[tuple[Any, dict[str, Any]], ...] = (),
    session_id: str | None = None,
) -> Run:
    """Cerebro in next-by-next (live) mode with one QueueFeed per symbol and the broker (on
    ``api`` with the fast config unless ``config`` is given)."""
    cerebro = bt.Cerebro(
        stdstats=False, preload=False, runonce=False, exactbars=False, quicknotify=quicknotify
    )
    feeds = {}
    for sym in symbols:
        feed = QueueFeed()
        cerebro.adddata(feed, name=sym)
        feeds[sym] = feed
    broker = AlpacaPaperTradingBroker(
        config or fast_config(server, api), session_id=session_id or new_session(), risk=risk
    )
    cerebro.setbroker(broker)
    log = Log()
    cerebro.addstrategy(Scripted, script=script, log=log)
    for cls, kwargs in analyzers:
        cerebro.addanalyzer(cls, **kwargs)
    return Run(cerebro, broker, feeds, log)


def wait_until(
    pred: Callable[[], bool],
    timeout_s: float = 10.0,
    what: str = "condition",
    tick: Callable[[], None] | None = None,
) -> None:
    """Poll ``pred`` every 5 ms; call ``tick`` between polls; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        if tick is not None:
            tick()
        time.sleep(0.005)


def drive(run: Run, steps: list[Callable[[], None]], *, timeout_s: float = 30.0) -> None:
    """Run cerebro on this thread while a driver thread runs ``steps`` in order, then ends the
    feeds. A failing step ends the feeds too and re-raises here."""
    error: list[BaseException] = []

    def driver() -> None:
        try:
            for step in steps:
                step()
        except BaseException as e:  # re-raised on the test thread
            error.append(e)
        finally:
            for feed in run.feeds.values():
                feed.end()

    t = threading.Thread(target=driver, name="test-driver", daemon=True)
    t.start()
    run.strategy = run.cerebro.run()[0]
    t.join(timeout=timeout_s)
    if error:
        raise error[0]


def bar(run: Run, symbol: str, close: float) -> Callable[[], None]:
    """A step: push one bar and wait until the agent has seen it."""

    def step() -> None:
        before = run.log.bars
        run.feeds[symbol].put(close)
        wait_until(lambda: run.log.bars > before, what=f"bar {before + 1}")

    return step


def bars(run: Run, closes: dict[str, float]) -> Callable[[], None]:
    """A step: push one bar per symbol (same timestamp) and wait until the agent saw it."""

    def step() -> None:
        before = run.log.bars
        for sym, close in closes.items():
            run.feeds[sym].put(close)
        wait_until(lambda: run.log.bars > before, what=f"bar {before + 1}")

    return step


def now() -> datetime:
    return datetime.now(UTC)


# -- scenario helpers (shared by the broker test modules) -----------------------------------


def run_on(api: str, server: AlpacaServer, *args: Any, **kw: Any) -> Run:
    """``build_run`` on ``api`` (a ``config=`` given by the test wins)."""
    return build_run(server, *args, api=api, **kw)


def bt_positions(run: Run) -> dict[str, Decimal]:
    """backtrader's view (after the run): position key -> size, zeros left out."""
    out = {}
    for data, pos in run.broker.positions.items():
        if pos.size:
            out[position_key(data._name)] = Decimal(repr(pos.size))
    return out


def statuses(run: Run, ref: int) -> list[str]:
    return run.log.statuses(ref)


def alpaca_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("alpaca-")]


def order_of(run: Run, name: str) -> Any:
    return run.log.orders[name]


def buy(name: str, **kw: Any) -> Any:
    def act(s: Any) -> None:
        s.p.log.orders[name] = s.buy(data=kw.pop("data", s.datas[0]), **kw)

    return act


def sell(name: str, **kw: Any) -> Any:
    def act(s: Any) -> None:
        s.p.log.orders[name] = s.sell(data=kw.pop("data", s.datas[0]), **kw)

    return act


def bracket(kind: str = "buy_bracket", **kw: Any) -> Any:
    """A script action: ``buy_bracket``/``sell_bracket``; orders logged as parent/stop/take."""

    def act(s: Any) -> None:
        o, stop, take = getattr(s, kind)(data=s.datas[0], **kw)
        s.p.log.orders.update(parent=o, stop=stop, take=take)

    return act


def server_order(server: AlpacaServer, run: Run, name: str) -> dict[str, Any]:
    coid = f"{run.broker.session_id}-{order_of(run, name).ref}"
    wait_until(lambda: server.order_by_coid(coid) is not None, what=f"order {name} at server")
    o = server.order_by_coid(coid)
    assert o is not None
    return o
