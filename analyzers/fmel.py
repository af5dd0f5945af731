"""The FMEL analyzer: one immutable decision record per agent bar.

Added by the runner to every run (``cerebro.addanalyzer(FMELAnalyzer, writer=..., run=...)``).
At ``start`` it makes the agent's data feeds and every line object the agent created track their
reads (:mod:`analyzers.tracking`) and wraps the agent's callbacks so that reads count only while
the agent's own code runs: not inside the backtrader calls it makes (orders, ``order_target_*``,
sizers, ``close()``, the broker's ``getvalue``...), which read prices on its behalf. At the end
of every bar (``prenext``/``nextstart``/``next``, called by backtrader right after the
strategy's own) it builds a :class:`~analyzers.schema.DecisionRecord`
with the reads, the order events of the bar, the portfolio and the agent's notes, and hands it to
the :class:`~analyzers.sinks.writer.DecisionWriter` (which returns at once; I/O happens on the
writer's thread).

Agents attach notes with :func:`attach_note` (a no-op when no FMEL analyzer is present, so agents
run unchanged without it).

Thread context: everything here runs on the main (backtrader) thread.
"""

from __future__ import annotations

import atexit
import collections
import functools
import gc
import hashlib
import inspect
import json
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import backtrader as bt

from analyzers.deferred import DeferredRecord, PendingReads
from analyzers.schema import (
    Action,
    DecisionRecord,
    Position,
    RunInfo,
    new_session_id,
)
from analyzers.sinks.writer import DecisionWriter
from analyzers.tracking import AccessTracker, proxies
from analyzers.tracking.graph import _IND
from analyzers.tracking.tracker import take_reads
from core.bars import feed_symbol
from core.time import BT_EPOCH_DAYS, SECONDS_PER_DAY
from feeds.csv import prefetch_hashes

logger = logging.getLogger(__name__)

_STATUS_EVENT = {
    bt.Order.Submitted: "SUBMITTED",
    bt.Order.Accepted: "ACCEPTED",
    bt.Order.Partial: "PARTIAL",
    bt.Order.Completed: "COMPLETED",
    bt.Order.Canceled: "CANCELED",
    bt.Order.Expired: "EXPIRED",
    bt.Order.Margin: "MARGIN",
    bt.Order.Rejected: "REJECTED",
    bt.Order.Created: "CREATED",
}
_tuple_new = tuple.__new__
_AGENT_CALLBACKS = (
    "prenext",
    "nextstart",
    "next",
    "prenext_open",  # cheat_on_open=True: called before the broker, in the same step
    "nextstart_open",
    "next_open",
    "notify_order",
    "notify_trade",
    "notify_data",
    "notify_cashvalue",
    "notify_fund",
    "notify_store",
    "notify_timer",
)
_ORDER_CALLS = ("buy", "sell", "cancel")
# backtrader methods of the strategy that read prices on the agent's behalf (the order calls
# above are wrapped the same way, plus their events are recorded)
_ON_BEHALF_CALLS = (
    "close",
    "order_target_size",
    "order_target_value",
    "order_target_percent",
    "buy_bracket",
    "sell_bracket",
    "getsizing",
)
# broker methods that read prices (portfolio value of positions, order construction); the agent
# calls them, the reads are the broker's. Not every public method: the broker calls its own
# methods many times per bar, each through the wrapper.
_BROKER_CALLS = (
    "getvalue",
    "get_value",
    "get_value_lever",
    "get_fundvalue",
    "buy",
    "sell",
    "submit",
    "transmit",
    "cancel",
)


def source_hash(cls: type) -> str | None:
    """BLAKE2b-128 hex of the file defining ``cls`` (None when it has no source file)."""
    try:
        path = inspect.getsourcefile(cls)
        if path is None:
            return None
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    except (OSError, TypeError):
        return None


def agent_params_json(strategy: Any) -> str:
    """The strategy's params as JSON object text (non-JSON values as their ``str``)."""
    try:
        params = dict(strategy.params._getkwargs())
    except AttributeError:
        params = {}
    return json.dumps(params, sort_keys=True, default=str)


def make_run_info(
    strategy_cls: type,
    *,
    session_id: str,
    agent_id: str | None,
    mode: str,
    params_json: str = "{}",
    decision_scope: str | None = None,
) -> RunInfo:
    """Run metadata shared by all records of a session (``decision_scope``: see
    :attr:`~analyzers.schema.RunInfo.decision_scope`)."""
    return RunInfo(
        session_id=session_id,
        agent_id=agent_id or strategy_cls.__name__,
        mode=mode,
        agent_class=f"{strategy_cls.__module__}.{strategy_cls.__qualname__}",
        agent_params=params_json,
        agent_source_hash=source_hash(strategy_cls),
        decision_scope=decision_scope,
    )


def attach_note(
    strategy: Any, *, reasoning: str | None = None, confidence: float | None = None, **notes: Any
) -> None:
    """Attach notes to the decision being made (call from ``next()``).

    Args:
        strategy: the agent (``self``).
        reasoning: free text, stored in the ``reasoning`` column.
        confidence: a number, stored in the ``confidence`` column.
        **notes: anything JSON-serialisable (numpy values and arrays included), stored as one
            JSON object in ``notes``; later keys in the same bar overwrite earlier ones.

    No-op when the run has no FMEL analyzer.
    """
    for analyzer in getattr(strategy, "analyzers", ()):
        if isinstance(analyzer, FMELAnalyzer):
            analyzer.add_note(reasoning=reasoning, confidence=confidence, **notes)
            return


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, datetime):
        return obj.isoformat()
    return str(obj)


class FMELAnalyzer(bt.Analyzer):  # type: ignore[misc]
    """Records every agent bar as a decision record.

    Params (backtrader boundary; runtime code passes typed values):
        writer (DecisionWriter): where records go; ``None`` keeps them in :attr:`records`
            (tests, notebooks).
        run (RunInfo): session/agent ids and agent metadata; default derived from the strategy.
        strict_lookahead (bool): raise :class:`~core.errors.LookAheadError` on a read that
            reaches a bar not in the past of the current step.
        keep_records (bool): without a writer, keep the records in :attr:`records` (default);
            False drops them once made: the reads are still tracked and checked (a research
            trial run only for ``strict_lookahead``, whose memory would grow with the run).
        track_indicators (bool): also track every line object the agent created (indicators,
            lines operations, shifted lines), labelled by where the agent keeps them.
        gc_freeze (bool): tune the garbage collector for the run, see :class:`_GCFreeze`:
            move the objects alive at ``start`` to its permanent generation (``gc.freeze()``)
            and collect the young generation every :data:`GC_YOUNG_THRESHOLD` allocations
            instead of 700, until ``stop`` (``gc.unfreeze()``, the threshold put back). With
            it, the read-heavy benchmark's added main-thread CPU went from 1.37-1.44x to
            1.25-1.27x of plain backtrader's, and a tracked read inside the agent's loop from
            0.35 to 0.17 us (``docs/benchmarks.md``, tenth pass). Default False: it is
            process-wide, and a run stopped where no FMEL code sees it (Ctrl-C in a notebook)
            leaves the heap frozen until the next FMEL run or the process's exit, while
            cycles made before ``start`` and dropped during a long live run are collected
            only after it. The runner turns it on for backtests (``MODE=backtest``, a process
            that ends with its run).
    """

    params = (
        ("writer", None),
        ("run", None),
        ("strict_lookahead", False),
        ("keep_records", True),
        ("track_indicators", True),
        ("gc_freeze", False),
    )

    def __init__(self) -> None:
        self.tracker = AccessTracker(strict_lookahead=bool(self.p.strict_lookahead))
        # the once-a-bar record in one C call (_record.c) when the compiled reads are in use
        # (fixed here, as the tracker's are: proxies.use_compiled), else _record_py
        self._record_c = _record_bar if proxies.compiled_in_use() else None
        self.writer: DecisionWriter | None = self.p.writer
        self.run_info: RunInfo | None = self.p.run
        self.records: list[DecisionRecord] = []
        self._keep = bool(self.p.keep_records)
        self.decisions = 0
        self._events: list[Action] = []
        self._filled: dict[int, tuple[float, float]] = {}
        self._notes: dict[str, Any] = {}
        self._reasoning: str | None = None
        self._confidence: float | None = None
        self._datas: list[Any] = []
        self._symbol_of: dict[int, str] = {}
        # (object, attribute, its instance value before or _ABSENT, the wrapper): put back at
        # stop where the wrapper is still there
        self._unwrap: list[tuple[Any, str, Any, Any]] = []
        # the strategy's analyzers collection while its class is _IterableItems (start..stop)
        self._iterable: Any = None
        # the agent's callbacks as wrapped: name -> its instance attribute as FMEL left it (the
        # wrapper, or _ABSENT / a non-callable), checked once a bar (_check_callbacks)
        self._callbacks: dict[str, Any] = {}
        self._callback_items: list[tuple[str, Any]] = []
        self._agent_vars: dict[str, Any] = {}
        self._agent_len = 0
        self._callbacks_logged: set[str] = set()
        self._tracked_call: Callable[[Callable[..., Any], str], Callable[..., Any]] = _same_call
        self._thread_id = 0  # the run's thread (start)
        self._in_run = False  # between start and _finish: the records trim _pending
        self._dtline: Any = None
        self._getvalue: Callable[[], float] = lambda: float(self.strategy.broker.getvalue())
        # with a writer and growing buffers, reads are resolved on the writer thread
        # (analyzers.deferred); bars handed over and not known to be resolved yet
        self._defer = False
        self._pending: collections.deque[PendingReads] = collections.deque()
        # positions of the last record: with backtrader's own broker they change only when an
        # order executes, which notify_order hears first (None: compute at the next record)
        self._held: tuple[Position, ...] | None = None
        self._cache_held = False
        self._froze = False
        self._aborted = ""  # the agent's callback whose exception ended the tracking (_abort)
        self._in_own = False  # inside the agent's own start() or stop() (_wrap_agent)
        self._noted: Any = None  # the order whose notice the agent's wrapper recorded

    @property
    def lookahead_total(self) -> int:
        """Reads flagged look-ahead so far in this run (resolves bars still pending)."""
        self._settle()
        return self.tracker.lookahead_total

    def _settle(self) -> None:
        """Resolve every bar handed over and not resolved yet, on the calling thread. While
        the run goes on, only its records drop bars from ``_pending`` (the resolved ones at
        its front): this resolves a copy and leaves the deque alone, whoever calls it (another
        thread reading :attr:`lookahead_total`, a writer's listener, a signal handler on the
        run's own thread, the record's own stale-tracker check). helper-124 and helper-125:
        a caller emptying the deque while a record's trim had stopped inside its ``done``
        check (a Python property) made the trim's ``popleft`` raise ``IndexError`` out of
        ``cerebro.run()``. After the run (:meth:`_finish`) the bars are dropped as they are
        resolved, from any thread."""
        pending = self._pending
        if self._in_run:
            for bar in list(pending):  # copied in C, under the GIL
                bar.lookaheads()
            return
        while True:
            try:
                bar = pending.popleft()  # another thread may be emptying it too
            except IndexError:
                return
            bar.lookaheads()

    # -- wiring -----------------------------------------------------------------------------

    def start(self) -> None:
        strategy = self.strategy
        if self.run_info is None:
            # one session per analyzer: two strategies of one Cerebro, or two runs into one
            # store, never share a decision_id
            self.run_info = make_run_info(
                type(strategy),
                session_id=new_session_id(),
                agent_id=None,
                mode="backtest",
                params_json=agent_params_json(strategy),
            )
        self._check_start()
        self._thread_id = threading.get_ident()
        self._in_run = True
        _RUNNING.add(self)
        self._datas = list(strategy.datas)
        self._dtline = strategy.lines.datetime  # the bar time of each record
        self.tracker.track_strategy(strategy, track_indicators=bool(self.p.track_indicators))
        # what the feeds are recorded as (feed_labels: their symbols, told apart when shared)
        self._symbol_of.update(self.tracker.feed_labels)
        self._defer = self.writer is not None and self.tracker.deferrable
        if self._defer:
            # CSV files' data hashes, computed by a helper process while the run goes on
            # (core.hash_worker): the writer's thread would otherwise hash them under the GIL
            prefetch_hashes(self.tracker.feed_hashes)
        self._cache_held = isinstance(strategy.broker, bt.brokers.BackBroker)
        self.tracker.note_overrides(strategy, (*_ORDER_CALLS, *_ON_BEHALF_CALLS))
        if self.tracker.gaps:
            self.run_info = self.run_info._replace(tracking_gaps=json.dumps(self.tracker.gaps))
        self._wrap_agent(strategy)
        if self.p.gc_freeze:
            self._froze = _GC_FREEZE.enter(self)

    def _check_start(self) -> None:
        """Refuse what would lose or mix up this run's records, before the first bar: an FMEL
        run in progress on another thread (the tracking flag is one for the process), a
        second FMEL analyzer on the strategy (the agent's reads reach one of them), a writer
        that is not running (nothing would take the records: ``writer.start()`` first), and
        decision ids another run already writes through the writer
        (:meth:`DecisionWriter.claim_ids`: two strategies given the same ``run``, or one
        ``run`` given to several runs).

        Raises:
            ValueError: one of those; the message names it.
        """
        strategy = self.strategy
        me = threading.get_ident()
        frames = sys._current_frames()
        for running in list(_RUNNING):
            if running._thread_id != me and _runs_on(running, frames.get(running._thread_id)):
                raise ValueError(
                    "FMELAnalyzer: another FMEL run is in progress on another thread of this "
                    "process; FMEL records one run at a time per process (whether the agent's "
                    "code is running is one flag for the process): run backtests side by side "
                    "in processes (cerebro.optstrategy with maxcpus, MODE=optimize)"
                )
        for other in getattr(strategy, "analyzers", ()):
            if other is self:
                break
            if isinstance(other, FMELAnalyzer):
                raise ValueError(
                    f"FMELAnalyzer: {type(strategy).__name__} has one already; one per strategy "
                    "(the agent's reads are recorded by one of them)"
                )
        run, writer = self.run_info, self.writer
        if writer is None or run is None:
            return
        if not writer.running:
            raise ValueError(
                "FMELAnalyzer: its writer is not running (never started, stopped, or failed: "
                "see its failure); call writer.start() before cerebro.run()"
            )
        who = f"{type(strategy).__name__} (params {agent_params_json(strategy)})"
        this_run = getattr(getattr(strategy, "cerebro", None), "runningstrats", None) or ()

        def stale(other: object) -> bool:
            # an analyzer of an earlier run that ended before its first bar (refused, failed)
            return (
                isinstance(other, FMELAnalyzer)
                and other.decisions == 0
                and not any(s is other.strategy for s in this_run)
            )

        writer.claim_ids(run.decision_scope or run.session_id, who, owner=self, stale=stale)

    def _start(self) -> None:
        # backtrader's: the children's _start, then start() (a subclass's start() may add
        # children after ours); then the bar calls are shortened where nothing else runs
        super()._start()
        self._bind_bar_calls()
        self._iterable_analyzers()

    def _iterable_analyzers(self) -> None:
        """backtrader loops over the strategy's analyzers twice a bar (``Strategy._notify``'s
        cash notices, ``_next_analyzers``); its ``ItemCollection`` has no ``__iter__``, so each
        loop calls ``__getitem__`` once an analyzer plus once more raising ``IndexError``:
        this analyzer added a call to every loop (1.5 us a loop with one analyzer against 0.8
        with none here). The collection's class is swapped for one iterating its list (0.57
        us), the same items in the same order, put back at the stop; only for backtrader's
        class itself (a subclass is left as it is)."""
        items = getattr(self.strategy, "analyzers", None)
        if type(items) is _ITEM_COLLECTION:
            items.__class__ = _IterableItems
            self._iterable = items

    def _bind_bar_calls(self) -> None:
        """Shorten backtrader's calls into this analyzer once a bar. ``Analyzer._next`` runs
        the children's ``_next``, then ``next``, which calls :meth:`_record`: three Python
        frames; bound here to :meth:`_record` with its stage (a ``functools.partial``: one
        frame), or, where :meth:`_record` is FMELAnalyzer's and the compiled record is in use,
        straight to ``_fastread.record_bar`` (no Python frame). The cash/value and fund
        notices (``_notify_cashvalue``, ``_notify_fund``, twice a bar) reach nothing when
        there are no children and ``notify_cashvalue`` / ``notify_fund`` are backtrader's
        ``pass``: bound to a single no-op frame.

        Only where nothing else would run: no child analyzer (also none added by a
        subclass's ``start()``: this runs after it), and both the private hook and its public
        one are still the functions of FMELAnalyzer / ``bt.Analyzer`` as imported (a subclass
        or mixin overriding either, e.g. ``bt.TimeFrameAnalyzerBase``'s ``_next``, a mock
        patched onto the class, or one set on the instance keeps backtrader's calls)."""
        if self._children:
            return
        cls, mine = type(self), vars(self)
        for private, public, own, stage in _BAR_CALLS:
            if (
                private not in mine
                and public not in mine
                and getattr(cls, private, None) is _ANALYZER_HOOKS[private]
                and getattr(cls, public, None) is own
            ):
                if stage is None:
                    bound: Callable[[], None] = _ignore
                elif self._record_c is not None and getattr(cls, "_record", None) is _RECORD:
                    bound = functools.partial(self._record_c, self, stage)
                else:
                    bound = functools.partial(self._record, stage)
                setattr(self, private, bound)

    def _wrap_agent(self, strategy: Any) -> None:
        # The flag is flipped by storing the module attribute (no call: these wrappers run
        # several times a bar).
        flags = proxies
        tracker = self.tracker
        main = threading.get_ident()  # the run's thread: reads elsewhere are not this bar's
        ident = threading.get_ident

        agent = vars(strategy)

        def tracked(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
            notices = name == "notify_order"

            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                if ident() != main:  # e.g. a broker's thread delivering a notice: not recorded
                    return fn(*args, **kwargs)
                if notices and args and sys._getframe(1).f_code is _NOTIFY_CODE:
                    # backtrader tells the agent before its analyzers (Strategy._notify): the
                    # notice is recorded first, so an order the agent places in reply to a
                    # fill follows that fill in the record's actions
                    self._note_order(args[0])
                    self._noted = args[0]
                if flags.OWNER is not tracker:  # another strategy's reads came last
                    tracker.activate()
                was = flags.ACTIVE
                flags.ACTIVE = True
                try:
                    result = fn(*args, **kwargs)
                    if agent.get(name) is not call:  # it replaced itself: wrap the new one now
                        flags.ACTIVE = was
                        self._check_callbacks()
                    return result
                except BaseException:
                    # Out of the agent's outermost call, backtrader does not catch it: the run
                    # ends without stop() (of this strategy's analyzers and the others'); the
                    # collector goes back as it was now, not at the next run's start (a freeze
                    # this analyzer shares). Out of a call the agent's own code made (``was``:
                    # prenext calling next inside ``try``), the agent may catch it and go on:
                    # the outer call decides (helper-116: a multi-feed prenext's caught
                    # IndexError ended the recording of 3,617 bars' reads and its orders).
                    if not was and not self._in_own:
                        self._end_tracking(name)
                    raise
                finally:
                    flags.ACTIVE = was

            return call

        def ordering(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
            # Order construction reads close[0]/datetime[0] itself: not the agent's reads.
            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                was = flags.ACTIVE
                flags.ACTIVE = False
                try:
                    result = fn(*args, **kwargs)
                finally:
                    flags.ACTIVE = was
                self._on_order_call(kind, result, args, kwargs)
                return result

            return call

        def on_behalf(fn: Callable[..., Any]) -> Callable[..., Any]:
            # backtrader reading prices for the agent (order_target_*, sizers, getvalue(datas)).
            # Only on the main thread: a broker's worker thread must not flip the flag.
            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                if not flags.ACTIVE or threading.get_ident() != main:
                    return fn(*args, **kwargs)
                flags.ACTIVE = False
                try:
                    return fn(*args, **kwargs)
                finally:
                    flags.ACTIVE = True

            return call

        def wrap(obj: Any, name: str, wrapper: Callable[..., Any]) -> None:
            _WRAPPERS.add(wrapper)
            self._unwrap.append((obj, name, vars(obj).get(name, _ABSENT), wrapper))
            setattr(obj, name, wrapper)

        self._agent_vars = vars(strategy)
        self._tracked_call = tracked
        for name in _AGENT_CALLBACKS:
            # backtrader's own callbacks read nothing (``pass``, or nextstart calling the
            # wrapped next): left unwrapped, a bar does not pay for notify_fund and the like
            if name not in vars(strategy) and getattr(type(strategy), name, None) is getattr(
                bt.Strategy, name, None
            ):
                continue
            wrapper = tracked(getattr(strategy, name), name)
            wrap(strategy, name, wrapper)
            self._callbacks[name] = wrapper
        self._callback_items = list(self._callbacks.items())
        self._agent_len = len(self._agent_vars)

        def own(fn: Callable[..., Any], name: str, after: Callable[[], None] | None) -> Any:
            """The agent's start() or stop(): backtrader calls them outside the bar calls and
            does not catch what they raise. A callback they call is nested in them (a caught
            exception there leaves the recording alone: helper-118, a start() priming state
            with next() in try ended it); one escaping them ends the run, and the tracking
            goes as it does for the bar calls (helper-118: out of stop(), the tracked lines,
            the frozen heap and the running run were left behind)."""

            reads = name == "start"

            @functools.wraps(fn)
            def call(*args: Any, **kwargs: Any) -> Any:
                was, inside = flags.ACTIVE, self._in_own
                # called by backtrader, not from the agent's running code (helper-122: next()
                # calling self.start() in try ended the recording at its first exception)
                outer = not inside and not was
                self._in_own = True
                if reads and outer and ident() == main:
                    # what start() reads goes with the first decision, which it comes before
                    # (helper-120: a "reference price" read there, the preloaded buffer's last
                    # bar, was neither recorded nor flagged as the look-ahead it is)
                    if flags.OWNER is not tracker:
                        tracker.activate()
                    flags.ACTIVE = True
                try:
                    result = fn(*args, **kwargs)
                except BaseException:
                    if outer and ident() == main:
                        flags.ACTIVE = was
                        self._end_tracking(name)
                    raise
                finally:
                    flags.ACTIVE = was
                    self._in_own = inside
                if after is not None:
                    after()
                return result

            return call

        def after_start() -> None:
            # callbacks the agent set there are wrapped before the first bar, and line objects
            # it made there tracked from the first bar (helper-116 F6: an indicator created in
            # start() was tracked from the second bar's record on)
            self._check_callbacks()
            self.tracker.sync(in_start=True)
            # order calls it replaced there (self.buy = ...) are wrapped and told, as those
            # replaced in __init__ (helper-120: its BUY events and actions were lost)
            replaced = [
                name
                for name in (*_ORDER_CALLS, *_ON_BEHALF_CALLS)
                if callable(vars(strategy).get(name)) and vars(strategy)[name] not in _WRAPPERS
            ]
            for name in _ORDER_CALLS:
                if name not in vars(strategy):  # its wrapper deleted (helper-122): again
                    wrap(strategy, name, ordering(getattr(strategy, name), name))
            if replaced:
                tracker.note_overrides(strategy, replaced)
                for name in replaced:
                    fn = vars(strategy)[name]
                    wrap(
                        strategy,
                        name,
                        ordering(fn, name) if name in _ORDER_CALLS else on_behalf(fn),
                    )
                if self.decisions == 0 and self.run_info is not None:
                    self.run_info = self.run_info._replace(tracking_gaps=json.dumps(tracker.gaps))

        for name, after in (("start", after_start), ("stop", None)):
            fn = getattr(strategy, name, None)
            if callable(fn) and getattr(type(strategy), name, None) is not getattr(
                bt.Strategy, name
            ):
                # the agent's start() runs after the analyzers' (Strategy._start), its stop()
                # before theirs (Strategy._stop)
                wrap(strategy, name, own(fn, name, after))
        for name in _ORDER_CALLS:
            wrap(strategy, name, ordering(getattr(strategy, name), name))
        for name in _ON_BEHALF_CALLS:
            if callable(getattr(strategy, name, None)):
                wrap(strategy, name, on_behalf(getattr(strategy, name)))
        broker = strategy.broker
        self._getvalue = broker.getvalue  # unwrapped: the analyzer runs outside agent calls
        for name in _BROKER_CALLS:
            if vars(broker).get(name) in _WRAPPERS:
                # left by a run that raised before its analyzer's stop (the broker outlives it)
                del vars(broker)[name]
            method = getattr(broker, name, None)
            if inspect.ismethod(method) and name not in vars(broker):
                wrap(broker, name, on_behalf(method))

    def stop(self) -> None:
        # Order events that arrived after the last bar (a live broker's final cancels and fills,
        # delivered just before the strategies stop) get one last record, stage STOP.
        if self._events:
            self._record("STOP")
        self._finish()

    def _end_tracking(self, name: str) -> None:
        """The agent's ``name`` raised out of a call backtrader made: the collector goes back
        as it was now, not at the next run's start (a freeze this analyzer shares), and the
        tracking goes (:meth:`_abort`). Main thread."""
        if self._froze:
            self._froze = False
            _GC_FREEZE.release_all()
        self._abort(name)

    def _abort(self, name: str) -> None:
        """The agent's ``name`` raised out of its outermost call (main thread, in the wrapped
        call; a call the agent's own code made is left to that code). backtrader does not
        catch it: the run ends without ``stop()``. The tracking goes now, as at ``stop`` (the
        feeds' lines get their classes back, the agent and broker their calls), so a run
        after it, with or without FMEL, neither pays for reads nor keeps them in memory. If
        something outside the agent caught the exception and the run goes on, its later
        records have no reads: an error says so once."""
        if self._aborted:
            return
        self._aborted = name
        try:
            self._finish()
        except Exception:  # the agent's exception is the one to see
            logger.exception("FMEL: removing the tracking after the agent's exception failed")
        self._record = self._record_after_abort  # type: ignore[method-assign]

    def _record_after_abort(self, stage: str) -> None:
        """:meth:`_record` once the tracking went (:meth:`_abort`) and the run went on."""
        if self._aborted:
            logger.error(
                "FMEL: the agent's %s raised in decision %d and the run went on (the "
                "code around it caught it); reads after it are not recorded in this run",
                self._aborted,
                self.decisions,
            )
            self._aborted = ""  # said once
        FMELAnalyzer._record(self, stage)

    def _finish(self) -> None:
        # The reads the writer has not resolved yet are resolved against this run's bars,
        # also when a next run over the same feeds (cerebro.run() again, optstrategy in one
        # process) resets them: the feeds' bar times are pinned as they are now.
        self.tracker.pin()
        self._in_run = False
        _RUNNING.discard(self)
        self.tracker.untrack_all()
        for name in _ANALYZER_HOOKS:
            self.__dict__.pop(name, None)  # _bind_bar_calls
        # the agent and the broker as they were (a finished strategy pickles: backtrader's
        # optimisation with maxcpus > 1 sends analyzers holding it to the parent process)
        for obj, name, before, wrapper in reversed(self._unwrap):
            if vars(obj).get(name) is not wrapper:
                continue  # the agent set its own since (_check_callbacks): left as it set it
            if before is _ABSENT:
                vars(obj).pop(name, None)
            else:
                vars(obj)[name] = before
        self._unwrap.clear()
        self._callbacks.clear()
        self._callback_items = []
        items, self._iterable = self._iterable, None
        if items is not None and type(items) is _IterableItems:
            items.__class__ = _ITEM_COLLECTION
        self._release_gc()

    def _release_gc(self) -> None:
        if self._froze:
            self._froze = False
            _GC_FREEZE.leave(self)

    # -- events -----------------------------------------------------------------------------

    def _on_order_call(
        self, kind: str, result: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if kind == "cancel":
            order = args[0] if args else kwargs.get("order")
            if order is not None:
                self._events.append(self._action("CANCEL_REQUEST", order))
            return
        # an Order, None (close() with no position, size 0), or from an agent's override of
        # buy() anything it returns: its orders are recorded, nothing else (helper-122: a
        # tuple (entry, stop) made the run raise AttributeError where backtrader ran). An
        # order a wrapped call inside this one recorded already is not recorded again (a
        # replacement made in start() around the wrapped buy it found: every CREATED twice;
        # an override placing its stop with self.sell())
        found = result if isinstance(result, tuple | list) else (result,)
        for order in found:
            if isinstance(order, bt.OrderBase) and not any(
                a.order_ref == order.ref and a.event == "CREATED" for a in self._events
            ):
                self._events.append(self._action("CREATED", order))

    def _action(
        self,
        event: str,
        order: Any,
        exec_size: float | None = None,
        exec_price: float | None = None,
        commission: float | None = None,
    ) -> Action:
        reason = None
        info = getattr(order, "info", None)
        if info:
            reason = info.get("reason") or info.get("rejected_reason")
            reason = str(reason) if reason is not None else None
        price = order.created.price if order.exectype != bt.Order.Market else None
        return Action(
            seq=len(self._events),
            event=event,
            side="BUY" if order.isbuy() else "SELL",
            symbol=self._symbol_of.get(id(order.data), feed_symbol(order.data)),
            order_ref=int(order.ref),
            order_type=bt.Order.ExecTypes[order.exectype],
            size=abs(float(order.created.size)),
            price=price,
            exec_size=exec_size,
            exec_price=exec_price,
            commission=commission,
            reason=reason,
        )

    def notify_order(self, order: Any) -> None:
        noted, self._noted = self._noted, None
        if noted is order:
            return  # recorded before the agent's notify_order ran (_wrap_agent)
        self._note_order(order)

    def _note_order(self, order: Any) -> None:
        """The order's notice as an action of this bar (``notify_order``, or the agent's
        wrapped ``notify_order`` before the agent's code: an order it places there comes
        after the notice that caused it)."""
        self._held = None
        event = _STATUS_EVENT.get(order.status, order.getstatusname().upper())
        exec_size = exec_price = commission = None
        if order.status in (bt.Order.Partial, bt.Order.Completed):
            size = value = comm = 0.0
            for bit in order.executed.iterpending():
                size += abs(bit.size)
                value += abs(bit.size) * bit.price
                comm += bit.comm
            if size == 0.0:  # brokers that do not keep execution bits: use cumulative deltas
                cum = abs(float(order.executed.size))
                last_size, last_value = self._filled.get(order.ref, (0.0, 0.0))
                cum_value = cum * float(order.executed.price or 0.0)
                size, value = cum - last_size, cum_value - last_value
                comm = float(order.executed.comm or 0.0)
                self._filled[order.ref] = (cum, cum_value)
            exec_size = size
            exec_price = value / size if size else None
            commission = comm
        self._events.append(self._action(event, order, exec_size, exec_price, commission))

    def add_note(
        self, *, reasoning: str | None = None, confidence: float | None = None, **notes: Any
    ) -> None:
        """See :func:`attach_note`."""
        if reasoning is not None:
            self._reasoning = str(reasoning)
        if confidence is not None:
            self._confidence = float(confidence)
        self._notes.update(notes)

    # -- per bar ----------------------------------------------------------------------------

    def prenext(self) -> None:
        self._record("PRENEXT")

    def nextstart(self) -> None:
        self._record("NEXTSTART")

    def next(self) -> None:
        self._record("NEXT")

    def _record(self, stage: str) -> None:
        """Record the bar (main thread, once a bar): :meth:`_record_py`'s work, done for the
        usual bar in one C call (``_fastread.record_bar``, ``analyzers/tracking/_record.c``),
        which calls :meth:`_record_py` itself for any other."""
        fast = self._record_c
        if fast is not None:
            fast(self, stage)
        else:
            self._record_py(stage)

    def _record_py(self, stage: str) -> None:
        # Once a bar on the bar loop: kept to plain attribute and tuple work (see
        # docs/benchmarks.md); the record is built with tuple.__new__ (the namedtuple's own
        # __new__ is one more Python call), fields in DecisionRecord's order.
        run = self.run_info
        assert run is not None
        agent = self._agent_vars
        if len(agent) != self._agent_len:
            self._check_callbacks()
        else:
            for name, expected in self._callback_items:
                if agent.get(name, _ABSENT) is not expected:
                    self._check_callbacks()
                    break
        tracker = self.tracker
        tracker.sync()
        raw = tracker.reads
        n_reads = len(raw)
        make: Any = DecisionRecord
        data_accessed: Any
        lookaheads: Any
        if not n_reads:
            data_accessed, lookaheads = (), 0
        elif self._defer:
            # hand the raw reads over: resolved on the writer thread (analyzers.deferred)
            if tracker.stale:
                self._settle()  # earlier bars resolve with the sources they had
                tracker.refresh()
            bar_reads = take_reads(raw)  # tracker.drain() without its method call
            data_accessed = lookaheads = PendingReads(tracker, bar_reads, tracker.capture())
            pending = self._pending
            pending.append(data_accessed)
            if len(pending) > _PENDING_KEEP:
                while pending and pending[0].done:
                    pending.popleft()
            make = DeferredRecord
        else:
            data_accessed, lookaheads = tracker.resolve(tracker.drain())
        events: Any = self._events
        if events:
            self._events = []
            events = tuple(events)
            action = _summary(events)
        else:
            events, action = (), "HOLD"
        notes = None
        if self._notes:
            notes = _notes_json(self)
        reasoning, confidence = self._reasoning, self._confidence
        if reasoning is not None or confidence is not None:
            self._reasoning = self._confidence = None
        broker = self.strategy.broker
        held = self._held
        dtl = self._dtline  # dtl[0] without LineBuffer.__getitem__'s Python frame
        rec = _tuple_new(
            make,
            (
                run,
                self.decisions,
                time.time(),
                _round_ms((dtl.array[dtl._idx] - BT_EPOCH_DAYS) * SECONDS_PER_DAY),
                stage,
                action,
                events,
                data_accessed,
                n_reads,
                lookaheads,
                float(self._getvalue()),
                float(broker.getcash()),
                self._positions(broker) if held is None else held,
                reasoning,
                confidence,
                notes,
            ),
        )
        self.decisions += 1
        if self.writer is not None:
            self.writer.submit(rec)
        elif self._keep:
            self.records.append(rec)

    def _check_callbacks(self) -> None:
        """The agent set, replaced or deleted a callback of its own during the run
        (``self.next = self._phase2``, in ``start()``, ``next()`` or a notice): the one it set
        is wrapped too. Checked after the agent's ``start()``, after each wrapped call that
        replaced itself, and once a bar (:meth:`_record`: a callback set from elsewhere)."""
        agent, watched = self._agent_vars, self._callbacks
        for name in _AGENT_CALLBACKS:
            seen = agent.get(name, _ABSENT)
            if name not in watched and seen is _ABSENT:
                continue  # backtrader's own, never set on the agent
            if watched.get(name, _ABSENT) is seen:
                continue
            target = seen
            if seen is _ABSENT:  # deleted: the class's own runs, unless it is backtrader's
                own = getattr(type(self.strategy), name, None)
                if own is getattr(bt.Strategy, name, None):
                    watched[name] = _ABSENT
                    continue
                target = getattr(self.strategy, name)
            if not callable(target) or target in _WRAPPERS:
                watched[name] = seen  # not a call: nothing to wrap
                continue
            wrapper = self._tracked_call(target, name)
            _WRAPPERS.add(wrapper)
            self._unwrap.append((self.strategy, name, seen, wrapper))
            agent[name] = wrapper
            watched[name] = wrapper
            if name not in self._callbacks_logged:
                self._callbacks_logged.add(name)
                logger.info(
                    "FMEL: the agent sets self.%s during the run (first in decision %d); each "
                    "one it sets is wrapped when set",
                    name,
                    self.decisions,
                )
        self._callback_items = list(watched.items())
        self._agent_len = len(agent)

    def _positions(self, broker: Any) -> tuple[Position, ...]:
        held = self._held = self._broker_positions(broker) if self._cache_held else None
        return held if held is not None else self._broker_positions(broker)

    def _broker_positions(self, broker: Any) -> tuple[Position, ...]:
        positions = getattr(broker, "positions", None)
        if not positions:
            return ()
        symbol_of = self._symbol_of
        new = _tuple_new
        return tuple(
            new(
                Position,
                (symbol_of.get(id(data)) or feed_symbol(data), float(pos.size), float(pos.price)),
            )
            for data, pos in list(positions.items())
            if pos.size
        )

    # -- another process ---------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        """A finished run's results, for another process: backtrader's optimisation with
        ``maxcpus`` > 1 (``cerebro.optstrategy``) sends each run's analyzers back from its
        worker process in a ``cerebro.OptReturn`` (pickled by ``multiprocessing``), after
        detaching them from the strategy and its datas. Kept: :attr:`records`,
        :attr:`decisions`, :attr:`run_info`, the params and what :meth:`get_analysis`
        answers (look-ahead reads, tracking gaps); the tracking (lines, wrapped agent calls,
        locks) stays behind. Pending reads are resolved first (on the calling thread).

        Raises:
            TypeError: the analyzer has a ``writer``: its records are that writer's, in this
                process (a :class:`DecisionWriter` itself refuses to be pickled).
        """
        if self.writer is not None:
            raise TypeError(
                "an FMELAnalyzer with a writer cannot be pickled: its records go to that "
                "writer's store in this process"
            )
        self._settle()
        return {
            "p": self.p,
            "params": self.params,
            "records": self.records,
            "decisions": self.decisions,
            "run_info": self.run_info,
            "_finished": (self.tracker.lookahead_total, list(self.tracker.gaps)),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        lookaheads, gaps = state.pop("_finished")
        self.__dict__.update(state)
        self.writer = None
        self._record_c = None
        self._pending = collections.deque()
        self._thread_id = 0
        self._in_run = False
        self.tracker = AccessTracker(strict_lookahead=bool(self.p.strict_lookahead))
        self.tracker.lookahead_total = lookaheads
        self.tracker.gaps = gaps

    def get_analysis(self) -> Mapping[str, Any]:
        """``decisions``, ``lookahead_reads``, ``tracking_gaps``. backtrader asks for it at the
        end of every run: ``lookahead_reads`` is counted when read (it resolves the bars still
        pending, see :attr:`lookahead_total`), so the bar loop does not resolve them itself."""
        return _Analysis(self)


class _Analysis(Mapping[str, Any]):
    """:meth:`FMELAnalyzer.get_analysis`, each value read when asked for."""

    _KEYS = ("decisions", "lookahead_reads", "tracking_gaps")

    def __init__(self, fmel: FMELAnalyzer) -> None:
        self._fmel = fmel

    def __getitem__(self, key: str) -> Any:
        fmel = self._fmel
        if key == "decisions":
            return fmel.decisions
        if key == "lookahead_reads":
            return fmel.lookahead_total
        if key == "tracking_gaps":
            return list(fmel.tracker.gaps)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def __repr__(self) -> str:
        return repr(dict(self))


class _GCFreeze:
    """``gc.freeze()`` while at least one FMEL analyzer runs, ``gc.unfreeze()`` after the last;
    meanwhile the young generation's threshold at least :data:`GC_YOUNG_THRESHOLD`.

    Why: a record keeps its reads alive until the writer has stored it, so the bar loop makes
    long-lived objects at a steady rate, and every time they have piled up to a quarter of the
    older heap CPython runs a full collection, which walks *every* tracked object: backtrader's
    lines and the imported libraries as well as the records. Frozen, the heap that existed at
    ``start`` is skipped by those collections (Python docs, ``gc.freeze``). Measured in
    main-thread instructions of ``cerebro.run()`` (valgrind's callgrind, as
    ``benchmarks/bench_instructions.py`` counts them) with every record still queued at the end
    (a writer that has fallen behind, as it does in a backtest): FMEL's bar-loop cost went from
    +16 % to +7 % of plain backtrader's on the SMA-cross benchmark, from +20 % to +14 % on the
    read-heavy one. With a writer that keeps up, few records survive to a full collection and
    the difference is within the run-to-run spread (``docs/benchmarks.md``).

    The young threshold: CPython collects the young generation every 700 allocations of
    objects it may track (it counts allocations, tracked or not), and every tenth young
    collection is a middle one. The bar loop allocates a raw read a read, so the read-heavy
    benchmark (71 reads a bar) ran about three times as many young collections as plain
    backtrader, each walking the young objects of backtrader's own bar. At 7,000 it runs a
    tenth as many, each over more objects. The collector's time in that run (``gc.callbacks``,
    medians of three): 0.11 s as CPython has it, 0.056 s frozen, 0.037 s frozen with this
    threshold (``docs/benchmarks.md``, tenth pass). Put back at the end unless someone else
    changed it during the run; a threshold above it is kept.

    Only when nothing else froze the heap (``gc.get_freeze_count() == 0`` at the first
    ``start``): ``gc.unfreeze()`` would undo someone else's freeze (one made *during* the run,
    from an agent's code, is undone at ``stop``: the collector cannot tell them apart). An
    exception out of an agent's call ends the run without ``stop``: the collector is put back
    as it leaves the call. A run that raised elsewhere (a feed, the broker, another analyzer)
    never reached ``stop`` either: the next ``start`` finds its analyzers no longer
    running (their strategy is not among its cerebro's running strategies, or that cerebro's
    ``runstrategies`` is not on the stack), drops them and, when no one else holds the freeze,
    unfreezes before freezing again; until then the objects of the failed run stay frozen.
    Objects frozen at ``start`` that become garbage during the run are freed by reference
    counting as usual; those in reference cycles are collected after ``stop``. Nothing is
    done when the collector is off (``gc.disable()`` or a threshold of 0). Main thread.
    """

    def __init__(self) -> None:
        # analyzers between start and stop, weakly: a run that ended without stop() must not
        # keep its cerebro and data alive (fresh-context attack: an interrupted notebook run)
        self.holders: list[weakref.ref[Any]] = []
        self.ours = False  # the heap is frozen by us
        self.threshold: tuple[int, ...] = ()  # gc.get_threshold() before, and ours
        self.raised: tuple[int, ...] = ()

    def enter(self, analyzer: Any) -> bool:
        """``analyzer`` starts; freeze on the first. True: call :meth:`leave` at its stop."""
        if self.holders:
            running = _running_cerebros()
            self.holders = [
                h for h in self.holders if (a := h()) is not None and _still_running(a, running)
            ]
            if not self.holders and self.ours:  # all stale: start over
                self._release()
        if not self.holders:
            if not gc.isenabled() or gc.get_freeze_count() or gc.get_threshold()[0] == 0:
                return False
            gc.freeze()
            self.threshold = gc.get_threshold()
            self.raised = (max(self.threshold[0], GC_YOUNG_THRESHOLD), *self.threshold[1:])
            gc.set_threshold(*self.raised)
            self.ours = True
        elif not self.ours:
            return False
        self.holders.append(weakref.ref(analyzer))
        return True

    def leave(self, analyzer: Any) -> None:
        """``analyzer`` stopped; unfreeze after the last."""
        self.holders = [h for h in self.holders if (a := h()) is not None and a is not analyzer]
        if not self.holders and self.ours:
            self._release()

    def release_all(self) -> None:
        """Forget every holder and put the collector back (at exit)."""
        self.holders = []
        if self.ours:
            self._release()

    def _release(self) -> None:
        """Unfreeze; the young threshold back unless someone changed it since."""
        self.ours = False
        gc.unfreeze()
        if gc.get_threshold() == self.raised:
            gc.set_threshold(*self.threshold)


def _running_cerebros() -> set[int]:
    """Ids of the cerebros whose ``runstrategies`` is on this thread's stack."""
    out: set[int] = set()
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "runstrategies":
            out.add(id(frame.f_locals.get("self")))
        frame = frame.f_back  # type: ignore[assignment]
    return out


def _runs_on(analyzer: Any, frame: Any) -> bool:
    """Whether ``analyzer``'s cerebro is in its ``runstrategies`` on the stack ending at
    ``frame`` (another thread's top frame, ``sys._current_frames()``; None: no such thread). A
    run that raised outside the agent's calls (a feed, an indicator, the broker: nothing of FMEL
    sees it end) stays in :data:`_RUNNING` while something holds it, and its thread (the main
    one, in a notebook) lives on: a run on another thread was refused as if it still ran."""
    cerebro = getattr(getattr(analyzer, "strategy", None), "cerebro", None)
    while frame is not None and cerebro is not None:
        if frame.f_code.co_name == "runstrategies" and frame.f_locals.get("self") is cerebro:
            return True
        frame = frame.f_back
    return False


def _still_running(analyzer: Any, running: set[int]) -> bool:
    strategy = getattr(analyzer, "strategy", None)
    cerebro = getattr(strategy, "cerebro", None)
    if cerebro is None or id(cerebro) not in running:
        return False
    return any(s is strategy for s in getattr(cerebro, "runningstrats", ()))


# Young collections while frozen: every GC_YOUNG_THRESHOLD allocations of tracked objects, not
# CPython's 700. The bar loop allocates a raw read a read (created untracked by the compiled
# reads, but counted: CPython counts allocations, not tracked objects), so the read-heavy
# benchmark ran ~500 more young collections than plain backtrader, each walking the bar's
# young objects, and every tenth of them a middle one (docs/benchmarks.md, tenth pass).
GC_YOUNG_THRESHOLD = 7000
_GC_FREEZE = _GCFreeze()
# A run that raised outside the agent's calls (a feed, the broker) keeps the heap frozen until
# the next run's start; at exit the collector is put back so the interpreter's last collection
# frees it (else extension types report their objects as leaked).
atexit.register(_GC_FREEZE.release_all)


def _same_call(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """What FMELAnalyzer._tracked_call is before the agent is wrapped."""
    return fn


def _ignore(*args: Any) -> None:
    """Takes a notice and does nothing (see :meth:`FMELAnalyzer._bind_bar_calls`)."""


_ITEM_COLLECTION = bt.metabase.ItemCollection


class _IterableItems(bt.metabase.ItemCollection):  # type: ignore[misc]
    """backtrader's ``ItemCollection`` with ``__iter__`` (see
    :meth:`FMELAnalyzer._iterable_analyzers`): a list iterator over the same list, which,
    like the sequence protocol it replaces, sees items appended during the loop."""

    __slots__ = ()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)


# the code of backtrader's Strategy._notify: the caller of the agent's notify_order for a notice
_NOTIFY_CODE = bt.Strategy._notify.__code__
_ABSENT = object()  # no instance attribute of that name (FMELAnalyzer._unwrap)
# FMELAnalyzer._record_py: once its _pending deque holds more bars than this, the resolved ones
# at its front are dropped at each record (the writer resolves them in batches; lookahead_total
# settles what is left). 0: the deque holds the bars not resolved yet, and none of the resolved
# ones, which keep their batch's resolved columns alive. At 4,096 the last 4,096 resolved bars
# stayed, during the run and after it: a wide backtest (200 feeds, 2 reads each, 3,000 bars)
# peaked at 807 MB against 695 MB, and the read-heavy benchmark's analyzer held 24.6 MB of
# columns after its run (docs/benchmarks.md, thirty-sixth pass).
_PENDING_KEEP = 0
# FMEL analyzers between start and stop (or an exception out of the agent): one thread at a time
_RUNNING: weakref.WeakSet[FMELAnalyzer] = weakref.WeakSet()
# every wrapper FMELAnalyzer put on an agent or a broker (a broker outlives a run that raised)
_WRAPPERS: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()

# FMELAnalyzer._bind_bar_calls: (backtrader's private hook, its public one, the public one's
# function when nothing overrides it, the record's stage or None for a notice), the functions
# taken as imported (a mock patched onto either class later is not taken for them)
_ANALYZER_HOOKS: dict[str, Any] = {
    name: vars(bt.Analyzer)[name]
    for name in ("_prenext", "_nextstart", "_next", "_notify_cashvalue", "_notify_fund")
}
_BAR_CALLS: tuple[tuple[str, str, Any, str | None], ...] = (
    ("_prenext", "prenext", vars(FMELAnalyzer)["prenext"], "PRENEXT"),
    ("_nextstart", "nextstart", vars(FMELAnalyzer)["nextstart"], "NEXTSTART"),
    ("_next", "next", vars(FMELAnalyzer)["next"], "NEXT"),
    ("_notify_cashvalue", "notify_cashvalue", vars(bt.Analyzer)["notify_cashvalue"], None),
    ("_notify_fund", "notify_fund", vars(bt.Analyzer)["notify_fund"], None),
)


def _round_ms(posix_s: float) -> float:
    """``round(posix_s, 3)``, exactly (Python's ``round`` to digits goes through decimal text:
    ~1 us, once a bar): ``rint(x * 1000) / 1000`` is correctly rounded when ``x * 1000`` is far
    from a half and small enough to be exact to 0.1, as in
    :func:`analyzers.tracking.columns.round_ms`; anything else is Python's own ``round``."""
    y = posix_s * 1000.0
    if y == y and -(2.0**49) < y < 2.0**49:
        k = float(round(y))
        if -0.4 < y - k < 0.4:
            return k / 1000.0 if k else math.copysign(0.0, posix_s)  # round(-0.0001, 3) is -0.0
    return round(posix_s, 3)


def _summary(events: tuple[Action, ...]) -> str:
    sides = {a.side for a in events if a.event == "CREATED"}
    if sides == {"BUY"}:
        return "BUY"
    if sides == {"SELL"}:
        return "SELL"
    if sides:
        return "BUY+SELL"
    if any(a.event == "CANCEL_REQUEST" for a in events):
        return "CANCEL"
    return "HOLD"


# FMELAnalyzer._record as defined here (_bind_bar_calls binds the C record only where a subclass
# or a patch did not replace it)
_RECORD = FMELAnalyzer._record
# the analyzer's attributes _record.c reads from the instance dict, as _record_py reads them
# (it records in C only while none is a data descriptor of the analyzer's class)
_C_READS = (
    "run_info",
    "tracker",
    "_agent_vars",
    "_agent_len",
    "_callback_items",
    "_defer",
    "_events",
    "_notes",
    "_reasoning",
    "_confidence",
    "_dtline",
    "_pending",
    "_held",
    "decisions",
    "_getvalue",
    "strategy",
    "writer",
    "_keep",
    "records",
)


def _notes_json(analyzer: FMELAnalyzer) -> str:
    """The bar's notes as ``_record_py`` stores them (JSON, keys sorted), emptied; for
    ``_fastread.record_bar``."""
    notes = json.dumps(analyzer._notes, default=_json_default, sort_keys=True)
    analyzer._notes = {}
    return notes


_record_bar: Callable[[FMELAnalyzer, str], None] | None
if proxies.COMPILED:
    from analyzers.tracking import _fastread

    _fastread.record_init(
        globals(), _IND, _fastread.ReadBuffer, AccessTracker, FMELAnalyzer, _C_READS
    )
    _record_bar = _fastread.record_bar
else:
    _record_bar = None
