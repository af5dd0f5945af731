"""The one Pub/Sub subscriber of a runner: subscriptions, pulling, leases, reconnects, shutdown.

Data path::

    topic --(one subscription per deployment and topic)--> PubSubBarSubscriber
      pull thread (one per subscription): Pull -> MessageHandler.handle(): decode, validate,
                       hash, de-duplicate, route by the ``symbol`` attribute -> BarHub.offer()
                       (blocks while that symbol's buffer is full = back-pressure); refused
                       messages are acknowledged at once
      main thread:     PubSubMarketDataFeed._load() -> BarHub.take()
      acknowledgement: at once (default), or with ``durable_acks`` only once the decision made
                       on the bar is on local disk (:meth:`PubSubBarSubscriber.ack_through`,
                       called by the runtime when the decision writer reports it durable)
      lease thread:    extends the ack deadline of every message not settled yet

The subscription is stable per deployment (``<PUBSUB_SUBSCRIPTION_PREFIX>-<deployment>``), so a
restarted runner continues from the bars it had not acknowledged; it is kept at exit (expiring
after ``PUBSUB_SUBSCRIPTION_TTL_S`` idle) unless ``PUBSUB_DELETE_SUBSCRIPTION`` is set.

Why synchronous Pull and no server-side ordering (measured on the emulator,
0.8.20; docs/pubsub.md has the numbers): a streaming-pull client that dies (a killed pod, a
network cut) is never forgotten by the emulator, which goes on handing it about half of the
messages, each back one ack deadline later, for as long as it runs; with message ordering the
key instead stays blocked for good. With Pull there is no stream to forget: what a dead runner
had pulled comes back once, an ack deadline later. And the client library hands over only one
message per ordering key until it is acknowledged. So the subscriber pulls, extends the leases
of what it holds itself, and the hub puts each symbol's bars in order and holds steps while
bars come out of order (:meth:`~feeds.pubsub.hub.BarHub.hold_steps`). Ordering keys on the
messages (the ingestor sets ``ordering_key=symbol``) are accepted and change nothing here: a
subscription without message ordering delivers them like any other message. Pull latency on the
emulator matches streaming pull (publish -> receipt p50 32 ms, p99 59 ms).

Threads: one pull thread per subscription (runs the handler, reconnects with backoff:
:meth:`core.retry.RetryPolicy.delay_s`), one lease thread, and one ack thread (sends what
:meth:`PubSubBarSubscriber.ack_through` queues, so the decision writer never waits on Pub/Sub);
everything touching backtrader runs on the main thread. The only hand-off is the
:class:`~feeds.pubsub.hub.BarHub`. Every thread is owned by the subscriber and joined by
:meth:`PubSubBarSubscriber.close`.
:meth:`PubSubBarSubscriber.close`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import backtrader as bt

from core.bars import bar_seconds
from core.errors import ConfigError, TransientError
from core.time import bt_num_to_posix, posix_to_bt_num
from feeds.pubsub.clients import resource_path, subscriber_client, subscription_id, symbol_filter
from feeds.pubsub.config import (
    FieldSet,
    PubSubFeedConfig,
    StreamSettings,
    live_bar_size,
    parse_declared_fields,
)
from feeds.pubsub.feed import PubSubMarketDataFeed, make_pubsub_feed
from feeds.pubsub.gaps import GapCounter
from feeds.pubsub.handler import (
    DELIVERED,
    DUPLICATE,
    RETURNED,
    STOPPED,
    FeedEvents,
    MessageHandler,
)
from feeds.pubsub.hub import BarHub
from feeds.pubsub.messages import LiveBar

__all__ = ["PubSubBarSubscriber", "PulledMessage"]

logger = logging.getLogger(__name__)

# Ack ids per Acknowledge / ModifyAckDeadline request (Pub/Sub caps a request at 512 kB).
_ACK_CHUNK = 1000


# While steps are held, pulling goes on up to this many times the flow control limit
# (PUBSUB_MAX_OUTSTANDING_MESSAGES): enough for a hold of 30 s at 50 bars a second behind a
# backfill (the soak), bounded for a backlog of hundreds of thousands (an attack pulled 180,000
# into memory when the bound was the hub's 10,000 bars per symbol).
HELD_PULL_FACTOR = 10

# A bar a full buffer hands back during a backlog (feeds.pubsub.hub) comes again after this
# long, seconds: its lease is set to it (ModifyAckDeadline), so it is not pulled again at once,
# in a loop, while the older bars it made room for are still on their way.
RETURN_DELAY_S = 5


@dataclass(slots=True)
class _Sub:
    path: str
    topic: str
    owned: bool
    thread: threading.Thread | None = None


class PulledMessage:
    """One pulled message; ``ack``/``nack`` settle it (any thread, once; later calls do
    nothing). The attributes mirror google-cloud-pubsub's ``Message``."""

    __slots__ = (
        "_owner",
        "ack_id",
        "attributes",
        "data",
        "message_id",
        "ordering_key",
        "publish_time",
        "subscription",
    )

    def __init__(self, owner: PubSubBarSubscriber, subscription: str, received: Any) -> None:
        msg = received.message
        self._owner = owner
        self.subscription = subscription
        self.ack_id: str = received.ack_id
        self.data: bytes = msg.data
        self.attributes: Mapping[str, str] = msg.attributes
        self.message_id: str = msg.message_id
        self.ordering_key: str = msg.ordering_key
        self.publish_time: datetime | None = msg.publish_time

    def ack(self) -> None:
        self._owner.settle([self], ack=True)

    def nack(self) -> None:
        self._owner.settle([self], ack=False)


def _interruptible(fn: Callable[[], None], stop: threading.Event, poll_s: float = 0.1) -> bool:
    """Run ``fn`` on a helper thread and wait for it, returning False at once when ``stop`` is
    set first (the call then finishes or times out on its own; its result is dropped). A
    blocking gRPC call on the main thread would hold back the Python signal handler until it
    returns (up to its timeout); waiting here keeps SIGTERM within ``poll_s``. Exceptions of
    ``fn`` are raised here."""
    failure: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            failure.append(e)
        finally:
            done.set()

    threading.Thread(target=run, name="pubsub-admin", daemon=True).start()
    while not done.wait(poll_s):
        if stop.is_set():
            return False
    if failure:
        raise failure[0]
    return True


def _iso_ms(num: float) -> str:
    """A backtrader day number as ISO 8601 UTC to the millisecond (day numbers hold ~15 us)."""
    return datetime.fromtimestamp(round(bt_num_to_posix(num), 3), UTC).isoformat(
        timespec="milliseconds"
    )


class PubSubBarSubscriber:
    """The one subscriber of a runner: its subscriptions (one per topic), pull threads, lease
    and ack threads, hub and handler.

    Lifecycle (main thread): :meth:`start` -> :meth:`discover_fields` -> :meth:`make_feeds` ->
    ``cerebro.run()`` -> :meth:`close`. :meth:`request_stop` may be called from any thread at
    any point: it ends a discovery wait and any reconnect wait, and a later :meth:`start` then
    does nothing. Not from a signal handler: it takes the hub's lock, which the main thread may
    hold when the signal lands (:mod:`core.signals` relays it).

    Subscriptions are named ``<PUBSUB_SUBSCRIPTION_PREFIX>-<deployment>`` (plus the topic id
    when there are several topics), carry an expiration policy (``PUBSUB_SUBSCRIPTION_TTL_S``:
    a deployment that is gone leaves nothing behind) and a ``symbol`` filter when it fits (the
    emulator stores but ignores filters; routing is done here in any case). One that exists
    under that name is reused when it is attached to the same topic and has no filter or the
    same one (another filter means SYMBOLS changed and Pub/Sub would hold back the new
    symbols: a :class:`ConfigError` says what to do). ``PUBSUB_SUBSCRIPTION`` names an
    existing subscription instead.

    Status (hub, then the feeds' ``notify_data``): CONNECTED once pulling works, LIVE with the
    first bar, DISCONNECTED while Pub/Sub cannot be reached (CONNECTED, then LIVE again when
    bars flow), CONNBROKEN when it refuses for good.

    Args:
        cfg: the feed config.
        symbols: symbols to route (others are refused as ``unknown_symbol``).
        deployment: stable name of this deployment (names the subscription); the same value
            after a restart reuses the subscription.
        settings: stream tuning.
        events: optional metrics observer.
        durable_acks: acknowledge a bar only when :meth:`ack_through` reaches its time (the
            decision on it is on disk); at :meth:`close` whatever was not acknowledged is
            returned to Pub/Sub (nacked) and delivered again at the next start. False:
            acknowledge when buffered.
    """

    def __init__(
        self,
        cfg: PubSubFeedConfig,
        *,
        symbols: Sequence[str],
        deployment: str,
        settings: StreamSettings | None = None,
        events: FeedEvents | None = None,
        durable_acks: bool = False,
    ) -> None:
        if not symbols:
            raise ConfigError("SYMBOLS: a live run needs at least one symbol")
        if cfg.subscription and len(cfg.topics) > 1:
            raise ConfigError(
                "PUBSUB_SUBSCRIPTION names one subscription but PUBSUB_TOPIC lists "
                f"{len(cfg.topics)} topics; use one topic or drop PUBSUB_SUBSCRIPTION"
            )
        self.cfg = cfg
        self.symbols = tuple(symbols)
        self.deployment = deployment
        self.settings = settings or StreamSettings()
        self.durable_acks = durable_acks
        self.hub = BarHub(
            self.symbols,
            max_buffered_bars=cfg.max_buffered_bars,
            align_wait_s=cfg.align_wait_s,
            idle_timeout_s=cfg.idle_timeout_s,
        )
        self.timeframe: int = bt.TimeFrame.Minutes
        self.compression = 1
        bar_s: float | None = None
        if cfg.bar_size:
            self.timeframe, self.compression, bar_s = live_bar_size(cfg.bar_size)
        self.hub.gaps = GapCounter(bar_s, gap_max_s=cfg.gap_max_s)
        self.hub.disorder_quiet_s = self.settings.backlog_quiet_s
        self.hub.gap_hold_s = cfg.gap_hold_s
        self.handler = MessageHandler(
            self.hub, settings=self.settings, events=events, max_future_s=cfg.max_future_s
        )
        if events is not None:
            self.hub.on_gap = events.on_gap
        self.declared = parse_declared_fields(cfg.fields)
        self.fields: dict[str, FieldSet] = {}
        self.drain_timeout_s: float | None = None
        self.disconnects = 0
        self.reconnects = 0
        self.acked = 0
        self.returned = 0
        self.returned_backlog = 0  # handed back by a full buffer, to come again
        self._logged_shed = False
        self.settle_failures = 0
        self.last_error = ""
        self.max_outstanding = max(self.settings.max_outstanding_messages, 4 * len(self.symbols))
        # While steps are held (BarHub.holding): ten times the limit, so bars that end a hold
        # are reached behind newer ones, yet a large backlog is not pulled whole into memory.
        self.max_outstanding_held = HELD_PULL_FACTOR * self.max_outstanding
        self._client: Any = None
        # Pulls go on a channel of their own, so close() can end a long poll in flight at once
        # (closing it) and still acknowledge and return messages on ``_client``.
        self._pull_client: Any = None
        self._subs: list[_Sub] = []
        self._stop = threading.Event()
        self._lock = threading.Condition(threading.Lock())  # leases, counters, room
        self._leases: dict[str, PulledMessage] = {}  # ack id -> message not settled yet
        self._held: list[PulledMessage] = []  # pulled after the input closed
        self._lease_thread: threading.Thread | None = None
        self._ack_thread: threading.Thread | None = None
        self._acks: queue.SimpleQueue[tuple[list[PulledMessage], float] | None] = (
            queue.SimpleQueue()
        )
        # Where the last bar time acknowledged is kept across restarts (BarHub.resume_after);
        # the runtime sets it (beside the decision journal) before start().
        self.resume_path: Path | None = None
        self._resumed_through = -math.inf
        self._acked_num = -math.inf  # decisions through this bar time are on disk (lock)
        self._copies_waiting: list[tuple[float, PulledMessage]] = []  # (bar time, copy) (lock)
        self._drain_timeout_s: float | None = None
        self._barrier: Callable[[float], bool] | None = None
        self._closed = False
        self._started = False
        self._connected = False
        self._warned_ordering = False
        self._batch = threading.local()  # a pull thread's acknowledgements of one pull
        self._originals: dict[str, PulledMessage] = {}  # message id -> first copy still held
        self._copies: dict[str, list[PulledMessage]] = {}  # ...and copies redelivered meanwhile

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def redelivery_s(self) -> float:
        """How long after a runner died or the network broke Pub/Sub redelivers what was
        pulled: the lease (``lease_extension_s``) plus a margin."""
        return self.settings.lease_extension_s + self.settings.redelivery_margin_s

    @property
    def subscription_paths(self) -> list[str]:
        """``projects/<p>/subscriptions/<id>`` of every subscription in use."""
        return [s.path for s in self._subs]

    @property
    def outstanding(self) -> int:
        """Messages pulled and not settled yet (leased)."""
        return len(self._leases)

    def set_bar_size(self, timeframe: int, compression: int) -> None:
        """Bar size of the feeds and of the gap count (from the backfill file), unless
        ``PUBSUB_BAR_SIZE`` set it. Call before :meth:`start`."""
        if self.cfg.bar_size:
            return
        self.timeframe, self.compression = timeframe, compression
        self.hub.gaps = GapCounter(
            bar_seconds(timeframe, compression), gap_max_s=self.cfg.gap_max_s
        )

    def set_durability_barrier(self, barrier: Callable[[float], bool]) -> None:
        """``barrier(timeout_s) -> bool``: called by :meth:`close` before the last
        acknowledgements; it returns once every decision made so far is on disk (and has been
        passed to :meth:`ack_through`), or False after ``timeout_s``."""
        self._barrier = barrier

    def start(self, backfill: Mapping[str, Sequence[LiveBar]] | None = None) -> None:
        """Queue the backfill bars (they play before any live bar), create or reuse the
        subscriptions, start pulling. Does nothing after :meth:`request_stop`.

        Args:
            backfill: per symbol, CSV bars from :func:`~feeds.pubsub.backfill.backfill_bars`
                (oldest first); live copies of them are dropped as duplicates.

        Raises:
            ConfigError: the topic does not exist, a name is invalid, permission is denied, or
                a reused subscription is missing, bound to another topic or filtered for
                other symbols.
            TransientError: Pub/Sub is unreachable or failed a call (the message says which).
        """

        if self._stop.is_set():
            logger.info("stop requested before the subscription was opened")
            return
        for sym, bars in (backfill or {}).items():
            if bars:
                self.handler.seed(sym, bars)
                self.hub.preload(bars)
        self._load_resume()
        self._client = subscriber_client(self.cfg.emulator_host)
        many = len(self.cfg.topics) > 1
        where = self.cfg.emulator_host or "Google"
        opened = _interruptible(lambda: self._open_subscriptions(where, many), self._stop)
        if not opened:
            logger.info("stop requested while the subscription was being opened")
            self._abort()
            return
        self._connected = True
        self.hub.set_status("CONNECTED")
        self._started = True
        self._pull_client = subscriber_client(self.cfg.emulator_host)
        for i, sub in enumerate(self._subs):
            sub.thread = threading.Thread(
                target=self._pull_loop, args=(sub,), name=f"pubsub-pull-{i}", daemon=True
            )
            sub.thread.start()
        self._lease_thread = threading.Thread(
            target=self._lease_loop, name="pubsub-lease", daemon=True
        )
        self._lease_thread.start()
        self._ack_thread = threading.Thread(target=self._ack_loop, name="pubsub-ack", daemon=True)
        self._ack_thread.start()
        logger.info(
            "pulling %s via %s (%d symbols; acknowledged %s)",
            ", ".join(self.cfg.topics),
            ", ".join(s.path.rsplit("/", 1)[-1] for s in self._subs),
            len(self.symbols),
            "once decisions are on disk" if self.durable_acks else "on receipt",
        )

    def _open_subscriptions(self, where: str, many: bool) -> None:
        """Create or reuse one subscription per topic (blocking admin calls; any thread)."""
        from google.api_core import exceptions as gexc

        try:
            for topic in self.cfg.topics:
                topic_path = resource_path(self.cfg.project, "topics", topic)
                if self.cfg.subscription:
                    sub = _Sub(
                        resource_path(self.cfg.project, "subscriptions", self.cfg.subscription),
                        topic_path,
                        owned=False,
                    )
                    self._check_reused(sub)
                    self._hold_for_backlog()  # it may hold what a killed runner had pulled
                else:
                    name = subscription_id(
                        self.cfg.subscription_prefix,
                        self.deployment,
                        topic_path.rsplit("/", 1)[-1],
                        many,
                    )
                    sub = _Sub(
                        resource_path(self.cfg.project, "subscriptions", name),
                        topic_path,
                        owned=True,
                    )
                    try:
                        self._ensure(sub)
                    except gexc.NotFound as e:
                        raise ConfigError(
                            f"PUBSUB_TOPIC: topic {topic_path} does not exist "
                            "(create it, or start the publisher first)"
                        ) from e
                self._subs.append(sub)
        except (gexc.InvalidArgument, gexc.PermissionDenied, gexc.Unauthenticated) as e:
            self._abort()
            raise ConfigError(
                f"Pub/Sub at {where} refused the subscription for good: "
                f"{type(e).__name__}: {e} (check PUBSUB_TOPIC, PUBSUB_SUBSCRIPTION, "
                "GOOGLE_CLOUD_PROJECT and the credentials' permissions)"
            ) from e
        except gexc.GoogleAPICallError as e:
            self._abort()
            raise TransientError(f"Pub/Sub at {where}: {e}") from e
        except Exception:
            self._abort()
            raise

    def discover_fields(
        self, backfill: Mapping[str, FieldSet] | None = None
    ) -> dict[str, FieldSet]:
        """Each symbol's extra fields: the declared ones (PUBSUB_FIELDS) or those of its first
        message within ``PUBSUB_DISCOVERY_S`` (cut short by :meth:`request_stop`), plus the
        backfill file's; then fixed."""
        if self.declared:
            found = {s: self.declared for s in self.symbols}
        elif self.cfg.discovery_s > 0 and self._started and not self._stop.is_set():
            found = self.handler.wait_discovery(self.cfg.discovery_s)
        else:
            found = {s: FieldSet() for s in self.symbols}
        if backfill:
            found = {s: found[s].union(backfill.get(s, FieldSet())) for s in self.symbols}
        self.fields = found
        self.handler.freeze_fields(found)
        return found

    def make_feeds(
        self, *, timeframe: int | None = None, compression: int | None = None
    ) -> list[PubSubMarketDataFeed]:
        """One feed per symbol (in SYMBOLS order). Call after :meth:`discover_fields`. The bar
        size defaults to :attr:`timeframe`/:attr:`compression` (``PUBSUB_BAR_SIZE``, else the
        backfill file's, else one minute)."""
        tf = self.timeframe if timeframe is None else timeframe
        comp = self.compression if compression is None else compression
        return [
            make_pubsub_feed(
                self.hub,
                s,
                self.fields.get(s, FieldSet()),
                lookback=self.cfg.lookback_bars,
                qcheck_s=self.cfg.qcheck_s,
                timeframe=tf,
                compression=comp,
            )
            for s in self.symbols
        ]

    def request_stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop taking bars; feeds drain what was buffered (for at most ``drain_timeout_s``,
        default :attr:`drain_timeout_s`) then end: a discovery wait and any reconnect wait end at
        once. Any thread, not a signal handler: it sets events and closes the hub's input under
        the hub's lock."""
        self._drain_timeout_s = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._stop.set()
        self.handler.interrupt()
        self.hub.close_input("stop requested", self._drain_timeout_s)

    def ack_through(self, bar_time_posix_s: float) -> int:
        """Acknowledge every taken bar of the steps up to ``bar_time_posix_s`` (a decision's
        bar time, POSIX seconds): the decisions on them are on disk. Any thread (the decision
        writer's). Returns how many messages were acknowledged."""
        num = posix_to_bt_num(bar_time_posix_s)
        bars = self.hub.pop_loaded_through(num)
        tokens = [b.token for b in bars if b.token is not None]
        with self._lock:
            self._acked_num = max(self._acked_num, num)
            if self._copies_waiting:
                keep: list[tuple[float, PulledMessage]] = []
                for n, m in self._copies_waiting:
                    if n <= num:
                        tokens.append(m)
                    else:
                        keep.append((n, m))
                self._copies_waiting = keep
        if tokens:
            through = max((b.dt_num for b in bars), default=num)
            with self._lock:
                self.acked += len(tokens)
            if self._ack_thread is not None and self._ack_thread.is_alive():
                # sent by the ack thread: the caller never waits on I/O
                self._acks.put((tokens, through))
            else:
                self.settle(tokens, ack=True)
                self._save_resume(through)
        return len(tokens)

    def _load_resume(self) -> None:
        """Tell the hub the last bar time an earlier run acknowledged (:attr:`resume_path`)."""
        path = self.resume_path
        if path is None or not path.exists():
            return
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            num = float(state["bt_num"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("resume state %s unreadable (%s); ignored", path, e)
            return
        if not math.isfinite(num):
            return
        self._resumed_through = num
        self.hub.resume_after(num)
        logger.info(
            "an earlier run acknowledged bars through %s; after connecting, steps wait up to "
            "%g s (PUBSUB_GAP_HOLD_S) for the bar times after it",
            state.get("bar_time", "?"),
            self.hub.gap_hold_s,
        )

    def _save_resume(self, through: float) -> None:
        """Keep the last bar time acknowledged (atomic replace; ack thread)."""
        path = self.resume_path
        if path is None or through <= self._resumed_through:
            return
        self._resumed_through = through
        body = json.dumps({"bt_num": through, "bar_time": _iso_ms(through)})
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(body, encoding="utf-8")
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("resume state %s not written (%s)", path, e)

    def _ack_loop(self) -> None:
        """Ack thread: sends the acknowledgements :meth:`ack_through` queued, in order, until
        the ``None`` that :meth:`close` queues."""
        while True:
            item = self._acks.get()
            if item is None:
                return
            tokens, through = item
            self.settle(tokens, ack=True)
            self._save_resume(through)

    def settle(self, messages: Iterable[PulledMessage], *, ack: bool, delay_s: int = 0) -> None:
        """Acknowledge (``ack``) or return (nack) pulled messages, batched per subscription;
        returned ones come again after ``delay_s`` seconds (their ack deadline, 0-600).
        Any thread; a message already settled is skipped. A failed call is logged and counted
        (``settle_failures``): the message then comes back after its lease, and is dropped as
        a duplicate."""
        by_sub: dict[str, list[str]] = {}
        with self._lock:
            for m in messages:
                # Copies redelivered while this one was held are settled with it.
                for c in (m, *self._copies.pop(m.message_id, ())):
                    if self._leases.pop(c.ack_id, None) is not None:
                        by_sub.setdefault(c.subscription, []).append(c.ack_id)
                if self._originals.get(m.message_id) is m:
                    del self._originals[m.message_id]
            if by_sub:
                self._lock.notify_all()  # room for the pull threads
        client = self._client
        if client is None:
            return
        for path, ids in by_sub.items():
            for i in range(0, len(ids), _ACK_CHUNK):
                chunk = ids[i : i + _ACK_CHUNK]
                try:
                    if ack:
                        client.acknowledge(
                            request={"subscription": path, "ack_ids": chunk},
                            retry=None,
                            timeout=self.settings.admin_timeout_s,
                        )
                    else:
                        client.modify_ack_deadline(
                            request={
                                "subscription": path,
                                "ack_ids": chunk,
                                "ack_deadline_seconds": delay_s,
                            },
                            retry=None,
                            timeout=self.settings.admin_timeout_s,
                        )
                except Exception as e:  # noqa: BLE001 - redelivered after the lease anyway
                    with self._lock:
                        self.settle_failures += len(chunk)
                    logger.info(
                        "%s of %d messages failed (%s: %s); they come back after their lease "
                        "and are dropped as duplicates",
                        "acknowledging" if ack else "returning",
                        len(chunk),
                        type(e).__name__,
                        str(e)[:200],
                    )

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop pulling, settle every message, join the threads and close the client.

        With ``durable_acks``: wait (at most ``timeout_s``) for the durability barrier so that
        the last decisions' bars are acknowledged, then return everything else to Pub/Sub
        (nack: buffered bars, bars taken without a durable decision, messages pulled after the
        stop), so the next start gets them at once. The subscription is deleted only with
        ``PUBSUB_DELETE_SUBSCRIPTION``. Idempotent; never raises (failures are logged).
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.hub.close_input("subscriber closed", self._drain_timeout_s)
        with self._lock:
            self._lock.notify_all()
        if self.durable_acks and self._barrier is not None:
            try:
                if not self._barrier(timeout_s):
                    logger.warning(
                        "decisions not all on disk within %.1f s; their bars are returned to "
                        "Pub/Sub and decided again at the next start",
                        timeout_s,
                    )
            except Exception:
                logger.exception("durability barrier failed; unacknowledged bars are returned")
        if self._ack_thread is not None:
            self._acks.put(None)  # after the acknowledgements the barrier queued
            self._ack_thread.join(timeout_s)
        # A pull in flight may still bring messages: closing its channel ends it at once (an
        # idle long poll would otherwise hold the shutdown for up to pull_timeout_s); messages
        # it had pulled are returned below, or (still on the wire) come back when their lease
        # ends.
        with self._lock:
            pull_client, self._pull_client = self._pull_client, None
        if pull_client is not None:
            try:
                pull_client.close()
            except Exception:  # the pull threads end on the stop flag anyway
                logger.debug("closing the pull channel failed", exc_info=True)
        for sub in self._subs:
            if sub.thread is not None:
                sub.thread.join(self.settings.probe_timeout_s)
        taken, rest = self.hub.pop_unacknowledged()
        with self._lock:
            held, self._held = self._held, []
        tokens = [b.token for b in (*taken, *rest) if b.token is not None]
        known = set(tokens) | set(held)  # once: 30k leases made it quadratic (attack finding)
        with self._lock:
            unsettled = [m for m in self._leases.values() if m not in known]
        settle = tokens + held + unsettled
        self.settle(settle, ack=False)
        self.returned += len(settle)
        if settle:
            logger.info(
                "returned %d unacknowledged messages to Pub/Sub for the next start (%d taken "
                "without a decision on disk, %d buffered, %d pulled after the stop)",
                len(settle),
                len(taken),
                len(tokens) - len(taken),
                len(held) + len(unsettled),
            )
        if self.cfg.delete_subscription:
            self._delete_owned()
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:
                logger.exception("closing the Pub/Sub client failed")
        for thread in [s.thread for s in self._subs] + [self._lease_thread]:
            if thread is not None:
                thread.join(timeout_s)

    # -- report --------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters for the final report and metrics."""
        out = self.handler.stats.as_dict()
        out.update(
            buffered=self.hub.buffered,
            undelivered_at_stop=self.hub.undelivered,
            returned_at_stop=self.returned,
            acked=self.acked,
            late=dict(self.hub.late),
            missing_bars=dict(self.hub.missing),
            gap_events=self.hub.gap_events,
            missed_steps=dict(self.hub.missed),
            steps=self.hub.steps,
            backpressure_waits=self.hub.backpressure_waits,
            returned_backlog=dict(self.hub.returned),
            disordered=self.hub.disordered,
            holds=self.hub.holds,
            disconnects=self.disconnects,
            settle_failures=self.settle_failures,
            reconnects=self.reconnects,
            subscriptions=[s.path for s in self._subs],
            status=self.hub.status,
            input_closed=self.hub.close_reason,
        )
        return out

    def feed_counters(self) -> dict[str, dict[str, int]]:
        """Per-symbol counters plus an ``all`` row (malformed by reason, duplicates, missing
        bar times, late bars, missed steps...)."""
        st = self.handler.stats
        hub = self.hub
        rows: dict[str, dict[str, int]] = {}
        for s in self.symbols:
            row = {"delivered": st.per_symbol.get(s, 0)}
            for key, value in (
                ("missing", hub.missing.get(s, 0)),
                ("late", hub.late.get(s, 0)),
                ("missed_steps", hub.missed.get(s, 0)),
                ("returned_backlog", hub.returned.get(s, 0)),
            ):
                if value:
                    row[key] = value
            rows[s] = row
        total = {
            "received": st.received,
            "delivered": st.delivered,
            "duplicates": st.duplicates,
            "malformed": sum(st.malformed.values()),
            "missing": sum(hub.missing.values()),
            "late": sum(hub.late.values()),
            "missed_steps": sum(hub.missed.values()),
            "disconnects": self.disconnects,
            "undelivered": hub.undelivered,
            "returned": self.returned,
        }
        if self.returned_backlog:
            total["returned_backlog"] = self.returned_backlog
        total.update({f"malformed.{k}": v for k, v in sorted(st.malformed.items())})
        rows["all"] = total
        return rows

    # -- pulling (pull threads) and leases (lease thread) -------------------------------------

    def _callback(self, message: PulledMessage) -> None:
        """Pull thread: decode, validate, hash, buffer; acknowledge refused messages at once,
        bars at once or (``durable_acks``) once decided on disk."""
        try:
            pt = message.publish_time
            publish_time_s = pt.timestamp() if pt else None
        except Exception:  # noqa: BLE001 - a missing publish time only costs the age metric
            publish_time_s = None
        key = getattr(message, "ordering_key", None)
        if key and not self._warned_ordering:
            # The ingestor sets ordering_key=symbol (its batching publisher needs it to send a
            # symbol's bars one after the other); on our subscription, which has no message
            # ordering, the key changes nothing: the hub orders each symbol's bars itself.
            self._warned_ordering = True
            logger.info(
                "messages carry ordering keys (%r): ignored by this subscription (no message "
                "ordering); the feed orders each symbol's bars itself",
                key,
            )
        outcome = self.handler.handle(
            message.data,
            message.attributes,
            message_id=message.message_id,
            publish_time_s=publish_time_s,
            token=message if self.durable_acks else None,
        )
        back = self.handler.pop_returned_tokens()
        if outcome == RETURNED:
            back.append(message)
        # A backlog larger than the buffer: these come again later (feeds.pubsub.hub).
        self._return_later(back)
        if outcome == RETURNED:
            return
        if outcome == STOPPED:
            # Kept, not nacked now: close() returns them all once, with the rest.
            with self._lock:
                self._held.append(message)
        elif outcome == DUPLICATE and self.durable_acks and self._is_copy(message):
            pass  # settled with the original, once the decision on it is on disk
        elif outcome == DUPLICATE and self.durable_acks and self._wait_with_original(message):
            pass  # a copy of a bar not decided yet: acknowledged once its decision is on disk
        elif outcome != DELIVERED or not self.durable_acks:
            batch = getattr(self._batch, "acks", None)
            if batch is None:
                message.ack()
            else:
                batch.append(message)  # acknowledged with the rest of its pull, in one call

    def _wait_with_original(self, message: PulledMessage) -> bool:
        """A copy of a bar (same symbol and bar time, another message id: a publisher's
        backfill) whose decision is not on disk yet stays leased, and is acknowledged with the
        decisions through its bar time (:meth:`ack_through`) or returned at close. Found by the
        CI soak: a runner acknowledged such copies at once while the originals, pulled from a
        server that then restarted empty, waited for a decision; it was killed, and 31 bar
        times were lost with both. True when kept (pull thread)."""
        num = self.handler.last_duplicate_num()
        with self._lock:
            if num is None or num <= self._acked_num:
                return False
            self._copies_waiting.append((num, message))
        return True

    def _is_copy(self, message: PulledMessage) -> bool:
        with self._lock:
            return any(c is message for c in self._copies.get(message.message_id, ()))

    def _wait_for_room(self) -> int:
        """Pull thread: wait until fewer than ``max_outstanding`` messages are leased; the
        number that may be pulled (0 when stopping).

        While the hub holds steps (:meth:`BarHub.holding`), the limit is
        ``max_outstanding_held`` (:data:`HELD_PULL_FACTOR` times it) instead: found by the
        30-minute soak, a restarted runner waiting for the bar times after its resume point
        leased 1,000 newer bars, stopped pulling, and so never received the older ones queued
        behind them (the emulator does not deliver in publish order); the bar time was lost
        when the hold ran out.

        At that limit while steps are held, the newest buffered bars go back to Pub/Sub once a
        wait (:meth:`BarHub.shed_newest`, up to half the limit): a backlog beyond it arriving
        newest first otherwise filled the leases with its newest bars, and the oldest came
        after their steps (helper-78 F2)."""
        shed = False
        while not self._stop.is_set():
            # Asked outside self._lock: the hub's lock is never taken inside it.
            holding = self.hub.holding()
            limit = self.max_outstanding_held if holding else self.max_outstanding
            with self._lock:
                if len(self._leases) < limit:
                    return min(_ACK_CHUNK, limit - len(self._leases))
                if shed or not holding:
                    self._lock.wait(0.25)
                    continue
            shed = True
            self._shed_newest(min(_ACK_CHUNK, max(1, limit // 2)))
        return 0

    def _shed_newest(self, count: int) -> None:
        """Pull thread: hand back the copies kept leased for their undecided originals
        (:meth:`_wait_with_original`) and up to ``count`` of the newest buffered bars, to come
        again after :data:`RETURN_DELAY_S` (counted in ``returned_backlog``).

        The copies first (helper-83): a backlog whose bars came twice filled the leases with
        such copies while no bar was buffered; nothing could be handed back, the pull stopped
        for good, and the bars handed back earlier never came again. A copy returned is not
        lost: it stays in Pub/Sub, as does its original until decided."""
        with self._lock:
            copies = [m for _, m in self._copies_waiting]
            self._copies_waiting = []
        self._return_later(copies)
        if self.handler.shed_newest(count) and not self._logged_shed:
            self._logged_shed = True
            logger.info(
                "%d messages leased while steps are held (its limit): the newest buffered "
                "bars go back to Pub/Sub so the older ones of the backlog can be pulled",
                len(self._leases),
            )
        self._return_later(self.handler.pop_returned_tokens())

    def _return_later(self, messages: list[PulledMessage]) -> None:
        """Pull thread: hand ``messages`` back to Pub/Sub, to come again after
        :data:`RETURN_DELAY_S` seconds, counted in ``returned_backlog`` (returns, not bars)."""
        if not messages:
            return
        with self._lock:
            self.returned_backlog += len(messages)
        self.settle(messages, ack=False, delay_s=RETURN_DELAY_S)

    def _pull_loop(self, sub: _Sub) -> None:
        """Pull thread of one subscription: pull, hand over in order, reconnect on failure
        (DISCONNECTED; waits of ``settings.reconnect.delay_s(attempt)``, ended at once by a
        stop), re-create an owned subscription that vanished (a server restarted empty)."""
        st = self.settings
        attempt = 0
        while not self._stop.is_set() and not self.hub.input_closed:
            room = self._wait_for_room()
            if room <= 0:
                break
            client = self._pull_client
            try:
                resp = client.pull(
                    request={"subscription": sub.path, "max_messages": room},
                    retry=None,
                    timeout=st.pull_timeout_s,
                )
            except Exception as e:  # noqa: BLE001 - classified by _after_failed_pull
                if self._stop.is_set() or client is not self._pull_client:
                    continue  # close() or a new channel ended this pull: not an outage
                attempt = self._after_failed_pull(sub, e, attempt)
                if attempt < 0:
                    return
                continue
            attempt = 0
            self._up()
            pulled = [PulledMessage(self, sub.path, rm) for rm in resp.received_messages]
            with self._lock:
                for m in pulled:
                    self._leases[m.ack_id] = m
                    original = self._originals.get(m.message_id)
                    if original is None:
                        self._originals[m.message_id] = m
                    elif original.ack_id in self._leases and original.data == m.data:
                        # Redelivered while the original is held (its lease ran out): keep the
                        # copy leased too, so acknowledging it cannot outrun the decision.
                        self._copies.setdefault(m.message_id, []).append(m)
            acks: list[PulledMessage] = []
            self._batch.acks = acks
            try:
                for m in pulled:
                    if self._stop.is_set():
                        with self._lock:
                            self._held.append(m)  # returned by close()
                        continue
                    self._callback(m)
            finally:
                self._batch.acks = None
                if acks:
                    self.settle(acks, ack=True)

    def _after_failed_pull(self, sub: _Sub, error: Exception, attempt: int) -> int:
        """Pull thread, after a failed pull: probe, re-create, wait or give up. Returns the
        attempt count, or -1 when Pub/Sub refused the subscription for good."""
        from google.api_core import exceptions as gexc

        terminal = (gexc.PermissionDenied, gexc.Unauthenticated, gexc.InvalidArgument)
        if isinstance(error, gexc.DeadlineExceeded):
            # An idle long poll, or a network that swallows packets: ask Pub/Sub.
            problem = self._probe(sub)
            if problem is None:
                self._up()
                return attempt
            return self._down(attempt, f"{type(error).__name__}; {problem}")
        if isinstance(error, gexc.NotFound):
            if not sub.owned:
                self._broken(f"subscription {sub.path} is gone: {error}")
                return -1
            # Pub/Sub answers, the subscription is gone (a server restarted empty): re-create
            # it at once; every bar published meanwhile is lost (and shows as a gap).
            self._down(attempt, f"subscription {sub.path} is gone", wait=False)
            if self._recreate(sub):
                self._up()  # reachable, pulling from the new subscription
                return 0
            return self._down(attempt, f"re-creating {sub.path} failed")
        if isinstance(error, terminal):
            self._broken(f"{type(error).__name__}: {error}")
            return -1
        return self._down(attempt, f"{type(error).__name__}: {str(error)[:200]}")

    def _up(self) -> None:
        """Pulling works (again): CONNECTED; the handler reports LIVE with the next bar."""
        if not self._connected:
            self._connected = True
            self.reconnects += 1
            logger.warning("Pub/Sub reachable again; LIVE once bars flow")
            self.hub.set_status("CONNECTED")
            self._hold_for_backlog()

    def _down(self, attempt: int, problem: str, *, wait: bool = True) -> int:
        """A pull failed: report DISCONNECTED (once), hold steps, wait before the next
        attempt (a stop ends the wait), and from the second attempt on use a new channel
        (gRPC backs off its own reconnects for up to two minutes). Returns the attempt count.
        """
        self.last_error = problem
        if self._connected:
            self._connected = False
            self.disconnects += 1
            logger.warning("Pub/Sub unreachable (%s); retrying", problem)
            self.hub.set_status("DISCONNECTED", problem)
            self._hold_for_backlog()
        else:
            logger.info("Pub/Sub still unreachable (attempt %d): %s", attempt + 1, problem)
        if not wait:
            return attempt
        attempt += 1
        if self._stop.wait(self.settings.reconnect.delay_s(attempt)):
            return attempt
        if attempt >= 2:
            self._new_channel()
        return attempt

    def _new_channel(self) -> None:
        """Replace the client (pull thread); the old one is closed (calls still on it fail and
        are retried or, for acknowledgements, come back as duplicates)."""
        with self._lock:
            if self._closed or self._stop.is_set():
                return
            old, self._client = self._client, subscriber_client(self.cfg.emulator_host)
            old_pull, self._pull_client = (
                self._pull_client,
                subscriber_client(self.cfg.emulator_host),
            )
        for client in (old, old_pull):
            try:
                if client is not None:
                    client.close()
            except Exception as e:  # noqa: BLE001 - it is replaced either way
                logger.debug("closing the old Pub/Sub client failed: %r", e)

    def _broken(self, problem: str) -> None:
        self.last_error = problem
        logger.error(
            "Pub/Sub refused the subscription for good (%s); ending the live input", problem
        )
        self.hub.set_status("CONNBROKEN", problem)
        self.hub.close_input(f"subscription broken: {problem}")

    def _recreate(self, sub: _Sub) -> bool:
        """Re-create an owned subscription a restarted server lost (pull thread). False when
        that failed (retried by the pull loop)."""
        try:
            self._ensure(sub)
        except Exception as e:  # noqa: BLE001 - retried by the pull loop
            logger.info("re-creating %s failed: %s", sub.path, e)
            return False
        logger.warning(
            "subscription %s was gone (server restarted empty?) and is created again; bars "
            "published in between are lost and show as missing bar times",
            sub.path,
        )
        # A new subscription may reuse message ids (a restarted emulator starts at 1).
        self.handler.forget_message_ids()
        return True

    def _probe(self, sub: _Sub) -> str | None:
        """None when the subscription answers; else what is wrong."""
        try:
            self._client.get_subscription(
                request={"subscription": sub.path},
                retry=None,
                timeout=self.settings.probe_timeout_s,
            )
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
            return f"{type(e).__name__}: {str(e)[:200]}"
        return None

    def _hold_for_backlog(self) -> None:
        """Messages pulled by a runner that died, or lost to a broken connection, come back an
        ack deadline later, mixed with newer ones: steps wait (:meth:`BarHub.hold_steps`)."""
        self.hub.hold_steps(self.redelivery_s, backlog_before_s=time.time())

    def _lease_loop(self) -> None:
        """Lease thread: every third of a lease, extend the ack deadline of every message held (a
        bar waiting in the hub or for its decision to be on disk) by ``lease_extension_s``."""
        st = self.settings
        period = st.lease_extension_s / 3
        while not self._stop.wait(period):
            with self._lock:
                by_sub: dict[str, list[str]] = {}
                for m in self._leases.values():
                    by_sub.setdefault(m.subscription, []).append(m.ack_id)
            client = self._client
            if client is None:
                continue
            for path, ids in by_sub.items():
                for i in range(0, len(ids), _ACK_CHUNK):
                    try:
                        client.modify_ack_deadline(
                            request={
                                "subscription": path,
                                "ack_ids": ids[i : i + _ACK_CHUNK],
                                "ack_deadline_seconds": st.lease_extension_s,
                            },
                            retry=None,
                            timeout=st.probe_timeout_s,
                        )
                    except Exception as e:  # noqa: BLE001 - the pull loop reports outages
                        logger.debug("extending leases failed: %r", e)

    def _ensure(self, sub: _Sub) -> None:
        """Create an owned subscription, or reuse it when it already exists."""
        from google.api_core import exceptions as gexc
        from google.protobuf import duration_pb2

        request: dict[str, Any] = {
            "name": sub.path,
            "topic": sub.topic,
            "ack_deadline_seconds": self.settings.ack_deadline_s,
            # No server-side ordering: the hub orders each symbol's bars itself (see the
            # module docstring for why).
            "enable_message_ordering": False,
            "expiration_policy": {
                "ttl": duration_pb2.Duration(seconds=int(self.cfg.subscription_ttl_s))
            },
        }
        flt = symbol_filter(self.symbols)
        if flt is not None:
            request["filter"] = flt
        try:
            self._client.create_subscription(
                request=request, retry=None, timeout=self.settings.admin_timeout_s
            )
            logger.info(
                "created subscription %s on %s (expires after %d s idle)",
                sub.path,
                sub.topic,
                self.cfg.subscription_ttl_s,
            )
        except gexc.AlreadyExists:
            got = self._check_reused(sub)
            # It may hold what a killed runner had pulled: redelivered after its lease.
            self._hold_for_backlog()
            if got.filter and got.filter != flt:
                raise ConfigError(
                    f"subscription {sub.path} exists with filter {got.filter or '(none)'!r} but "
                    f"SYMBOLS now needs {flt or '(none)'!r} (Pub/Sub filters cannot change): "
                    "delete it (its unacknowledged bars go with it) or set "
                    "PUBSUB_SUBSCRIPTION_PREFIX to start a new one"
                ) from None
            logger.info(
                "reusing subscription %s: continuing from its unacknowledged bars", sub.path
            )

    def _check_reused(self, sub: _Sub) -> Any:
        from google.api_core import exceptions as gexc

        try:
            got = self._client.get_subscription(
                request={"subscription": sub.path},
                retry=None,
                timeout=self.settings.admin_timeout_s,
            )
        except gexc.NotFound as e:
            raise ConfigError(f"PUBSUB_SUBSCRIPTION: {sub.path} does not exist") from e
        if got.topic != sub.topic:
            raise ConfigError(
                f"subscription {sub.path} is attached to {got.topic}, not {sub.topic}"
            )
        return got

    def _delete_owned(self) -> None:
        if self._client is None:
            return
        for sub in self._subs:
            if not sub.owned:
                continue
            try:
                self._client.delete_subscription(
                    request={"subscription": sub.path},
                    retry=None,
                    timeout=self.settings.admin_timeout_s,
                )
                logger.warning(
                    "deleted subscription %s (PUBSUB_DELETE_SUBSCRIPTION): bars it still held "
                    "are gone with it",
                    sub.path,
                )
            except Exception as e:  # noqa: BLE001 - it expires by its TTL anyway
                logger.warning(
                    "could not delete subscription %s (%s); it expires after %d s idle",
                    sub.path,
                    e,
                    self.cfg.subscription_ttl_s,
                )

    def _abort(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None
