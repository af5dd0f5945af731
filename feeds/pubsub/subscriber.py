"""The one Pub/Sub subscriber of a runner: subscriptions, streaming pull, reconnects, shutdown.

Data path::

    topic --(one subscription per deployment and topic)--> PubSubBarSubscriber
      callback thread: MessageHandler.handle(): decode, validate, hash, de-duplicate, route by
                       the ``symbol`` attribute -> BarHub.offer() (blocks while that symbol's
                       buffer is full = back-pressure); refused messages are acknowledged
      main thread:     PubSubMarketDataFeed._load() -> BarHub.take()
      acknowledgement: at once (default), or with ``durable_acks`` only once the decision made
                       on the bar is on local disk (:meth:`PubSubBarSubscriber.ack_through`,
                       called by the runtime when the decision writer reports it durable)

The subscription is stable per deployment (``<PUBSUB_SUBSCRIPTION_PREFIX>-<deployment>``), so a
restarted runner continues from the bars it had not acknowledged; it is kept at exit (expiring
after ``PUBSUB_SUBSCRIPTION_TTL_S`` idle) unless ``PUBSUB_DELETE_SUBSCRIPTION`` is set.

Threads: the Pub/Sub client's callback thread (one worker per stream) runs
:meth:`~feeds.pubsub.handler.MessageHandler.handle`; the supervisor thread probes the
subscription and reconnects (backoff: :meth:`core.retry.RetryPolicy.delay_s`); everything
touching backtrader runs on the main thread. The only hand-off is the
:class:`~feeds.pubsub.hub.BarHub`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import backtrader as bt

from core.errors import ConfigError, TransientError
from core.time import posix_to_bt_num
from feeds.pubsub.clients import resource_path, subscriber_client, subscription_id, symbol_filter
from feeds.pubsub.config import (
    FieldSet,
    PubSubFeedConfig,
    StreamSettings,
    bar_seconds,
    live_bar_size,
    parse_declared_fields,
)
from feeds.pubsub.feed import PubSubMarketDataFeed, make_pubsub_feed
from feeds.pubsub.gaps import GapCounter
from feeds.pubsub.handler import DELIVERED, STOPPED, FeedEvents, MessageHandler
from feeds.pubsub.hub import BarHub
from feeds.pubsub.messages import LiveBar

__all__ = ["PubSubBarSubscriber"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Sub:
    path: str
    topic: str
    owned: bool
    future: Any = None


class PubSubBarSubscriber:
    """The one subscriber of a runner: its subscriptions (one per topic), streams, hub, handler
    and supervisor thread.

    Lifecycle (main thread): :meth:`start` -> :meth:`discover_fields` -> :meth:`make_feeds` ->
    ``cerebro.run()`` -> :meth:`close`. :meth:`request_stop` is safe from a signal handler at
    any point (it also ends a discovery wait, and a later :meth:`start` then does nothing).

    Subscriptions are named ``<PUBSUB_SUBSCRIPTION_PREFIX>-<deployment>`` (plus the topic id
    when there are several topics), carry an expiration policy (``PUBSUB_SUBSCRIPTION_TTL_S``:
    a deployment that is gone leaves nothing behind), message ordering, and a ``symbol`` filter
    when it fits (the emulator stores but ignores filters; routing is done here in any case).
    One that exists under that name is reused when it is attached to the same topic and has no
    filter or the same one (another filter means SYMBOLS changed and Pub/Sub would hold back
    the new symbols: a :class:`ConfigError` says what to do). ``PUBSUB_SUBSCRIPTION`` names an
    existing subscription instead.

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
        self.last_error = ""
        self._client: Any = None
        self._subs: list[_Sub] = []
        self._stop = threading.Event()
        self._stream_lock = threading.Lock()
        self._ack_lock = threading.Lock()
        self._held: list[Any] = []  # messages that came after the input closed
        self._supervisor: threading.Thread | None = None
        self._drain_timeout_s: float | None = None
        self._barrier: Callable[[float], bool] | None = None
        self._closed = False
        self._started = False
        self._warned_ordering = False
        self._generation = 0
        self.stale_stream_messages = 0  # returned: delivered by a replaced stream

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def redelivery_s(self) -> float:
        """How long after a stream broke Pub/Sub redelivers what it held: the stream's ack
        deadline (``lease_extension_s``) plus a margin for the server's expiry sweep."""
        return self.settings.lease_extension_s + self.settings.redelivery_margin_s

    @property
    def subscription_paths(self) -> list[str]:
        """``projects/<p>/subscriptions/<id>`` of every subscription in use."""
        return [s.path for s in self._subs]

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
        subscriptions, open the streams, start the supervisor. Does nothing after
        :meth:`request_stop`.

        Args:
            backfill: per symbol, CSV bars from :func:`~feeds.pubsub.backfill.backfill_bars`
                (oldest first); live bars at or before a symbol's last backfill bar are then
                dropped as duplicates/stale.

        Raises:
            ConfigError: the topic does not exist, a name is invalid, permission is denied, or
                a reused subscription is missing, bound to another topic or filtered for
                other symbols.
            TransientError: Pub/Sub is unreachable or failed a call (the message says which).
        """
        from google.api_core import exceptions as gexc

        if self._stop.is_set():
            logger.info("stop requested before the subscription was opened")
            return
        for sym, bars in (backfill or {}).items():
            if bars:
                self.handler.seed(sym, bars)
                self.hub.preload(bars)
        self._client = subscriber_client(self.cfg.emulator_host)
        many = len(self.cfg.topics) > 1
        where = self.cfg.emulator_host or "Google"
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
            self._open_streams()
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
        self.hub.set_status("CONNECTED")
        self._started = True
        self._supervisor = threading.Thread(
            target=self._supervise, name="pubsub-supervisor", daemon=True
        )
        self._supervisor.start()
        _StreamErrorLog.install(self)
        logger.info(
            "subscribed to %s via %s (%d symbols; acknowledged %s)",
            ", ".join(self.cfg.topics),
            ", ".join(s.path.rsplit("/", 1)[-1] for s in self._subs),
            len(self.symbols),
            "once decisions are on disk" if self.durable_acks else "on receipt",
        )

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
        default :attr:`drain_timeout_s`) then end. Safe from a signal handler: it only sets
        events; a discovery wait returns at once, the supervisor thread closes the input."""
        self._drain_timeout_s = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._stop.set()
        self.handler.interrupt()
        if not self._started:
            self.hub.close_input("stop requested", self._drain_timeout_s)

    def ack_through(self, bar_time_posix_s: float) -> int:
        """Acknowledge every taken bar of the steps up to ``bar_time_posix_s`` (a decision's
        bar time, POSIX seconds): the decisions on them are on disk. Any thread (the decision
        writer's). Returns how many messages were acknowledged."""
        bars = self.hub.pop_loaded_through(posix_to_bt_num(bar_time_posix_s))
        for bar in bars:
            bar.token.ack()
        if bars:
            with self._ack_lock:
                self.acked += len(bars)
        return len(bars)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the streams, join the supervisor, settle every message and close the client.

        With ``durable_acks``: wait (at most ``timeout_s``) for the durability barrier so that
        the last decisions' bars are acknowledged, then return everything else to Pub/Sub
        (nack: buffered bars, bars taken without a durable decision, messages that came after
        the stop), so the next start gets them. The subscription is deleted only with
        ``PUBSUB_DELETE_SUBSCRIPTION``. Idempotent; never raises (failures are logged).
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.hub.close_input("subscriber closed", self._drain_timeout_s)
        if self._supervisor is not None:
            self._supervisor.join(timeout_s)
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
        taken, rest = self.hub.pop_unacknowledged()
        with self._ack_lock:
            held, self._held = self._held, []
        settle = [b.token for b in (*taken, *rest) if b.token is not None] + held
        for message in settle:
            try:
                message.nack()
            except Exception as e:  # noqa: BLE001 - it is redelivered after its deadline anyway
                logger.debug("nack failed: %r", e)
        self.returned += len(settle)
        if settle:
            logger.info(
                "returned %d unacknowledged messages to Pub/Sub for the next start (%d taken "
                "without a decision on disk, %d buffered, %d after the stop)",
                len(settle),
                len(taken),
                sum(1 for b in rest if b.token is not None),
                len(held),
            )
        self._cancel_streams(timeout_s)  # flushes queued acks and nacks
        if self.cfg.delete_subscription:
            self._delete_owned()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                logger.exception("closing the Pub/Sub client failed")
            self._client = None

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
            disordered=self.hub.disordered,
            holds=self.hub.holds,
            disconnects=self.disconnects,
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
        total.update({f"malformed.{k}": v for k, v in sorted(st.malformed.items())})
        rows["all"] = total
        return rows

    # -- streams (supervisor thread, and start) -------------------------------------------------

    def _on_message(self, generation: int, message: Any) -> None:
        """Pub/Sub callback thread of the streams opened as ``generation``: a stream that was
        replaced but is still winding down must not interleave its messages with the new
        stream's (it would hand over bars out of order): they go back to Pub/Sub (nack), which
        delivers them again on the current stream."""
        if generation != self._generation:
            message.nack()
            self.stale_stream_messages += 1
            return
        self._callback(message)

    def _callback(self, message: Any) -> None:
        """Pub/Sub callback thread: decode, validate, hash, buffer; acknowledge refused
        messages at once, bars at once or (``durable_acks``) once decided on disk."""
        try:
            pt = message.publish_time
            publish_time_s = pt.timestamp() if pt else None
        except Exception:  # noqa: BLE001 - a missing publish time only costs the age metric
            publish_time_s = None
        key = getattr(message, "ordering_key", None)
        if key and not self._warned_ordering:
            self._warned_ordering = True
            logger.warning(
                "messages carry an ordering key (%r): publish live bars without one. With "
                "keys, the Pub/Sub client hands over one message per key until it is "
                "acknowledged (once its decision is on disk), so after a restart a redelivered "
                "bar waits behind newer ones and comes too late (late_bar)",
                key,
            )
        outcome = self.handler.handle(
            message.data,
            message.attributes,
            message_id=message.message_id,
            publish_time_s=publish_time_s,
            token=message if self.durable_acks else None,
        )
        if outcome == STOPPED:
            # Held, not nacked now: a nack is redelivered at once (a storm while we drain);
            # close() returns them all just before the stream is cancelled.
            with self._ack_lock:
                self._held.append(message)
        elif outcome != DELIVERED or not self.durable_acks:
            message.ack()

    def _open_streams(self) -> None:
        from google.cloud.pubsub_v1 import types as pubsub_types
        from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

        st = self.settings
        flow = pubsub_types.FlowControl(
            max_messages=max(st.max_outstanding_messages, 4 * len(self.symbols)),
            max_bytes=st.max_outstanding_bytes,
            max_duration_per_lease_extension=st.lease_extension_s,
        )
        with self._stream_lock:
            if self._closed:
                return  # close() ran meanwhile: no stream may outlive it
            self._generation += 1
            on_message = functools.partial(self._on_message, self._generation)
            for sub in self._subs:
                # One worker per stream: bars of a symbol are handled in arrival order.
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pubsub-cb")
                sub.future = self._client.subscribe(
                    sub.path, on_message, flow_control=flow, scheduler=ThreadScheduler(executor)
                )

    def _cancel_streams(self, timeout_s: float) -> None:
        with self._stream_lock:
            futures = [(s, s.future) for s in self._subs if s.future is not None]
            for s, _ in futures:
                s.future = None
        for _, fut in futures:
            fut.cancel()
        for sub, fut in futures:
            try:
                fut.result(timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - the stream is gone either way
                logger.debug("stream %s ended: %r", sub.path, e)

    def _ensure(self, sub: _Sub) -> None:
        """Create an owned subscription, or reuse it when it already exists."""
        from google.api_core import exceptions as gexc
        from google.protobuf import duration_pb2

        request: dict[str, Any] = {
            "name": sub.path,
            "topic": sub.topic,
            "ack_deadline_seconds": self.settings.ack_deadline_s,
            # No server-side ordering: the emulator holds an ordering key for good once a
            # stream that had one of its messages outstanding breaks (a network cut, a killed
            # pod). The hub orders each symbol's bars itself and holds steps after a
            # (re)connect until redeliveries are due (see BarHub.hold_steps).
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
            # It may hold bars a killed runner had received: redelivered after their deadline.
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

    def _probe(self) -> str | None:
        """None when every stream runs and its subscription answers; else what is wrong."""
        with self._stream_lock:
            subs = list(self._subs)
        for sub in subs:
            fut = sub.future
            if fut is None:
                return f"stream of {sub.path} not running"
            if fut.done():
                return f"stream of {sub.path} ended: {_exc_text(fut)}"
        for sub in subs:
            try:
                self._client.get_subscription(
                    request={"subscription": sub.path},
                    retry=None,
                    timeout=self.settings.probe_timeout_s,
                )
            except Exception as e:  # noqa: BLE001 - any failure means "not connected"
                return f"{sub.path}: {type(e).__name__}: {e}"
        return None

    def _teardown_streams(self) -> None:
        """Close the channel, then wait for the streams to wind down (supervisor thread).

        The channel goes first: a stream the client is reopening by itself would otherwise
        reconnect once the network is back and take messages it never hands over (they come
        back only after their deadline, out of order). What the old streams held is
        redelivered; steps wait for it (:meth:`_hold_for_backlog`)."""
        old, self._client = self._client, None
        if old is not None:
            try:
                old.close()
            except Exception as e:  # noqa: BLE001 - it is replaced either way
                logger.debug("closing the old Pub/Sub client failed: %r", e)
        self._cancel_streams(self.settings.admin_timeout_s)

    def _reconnect(self) -> None:
        """Recreate owned subscriptions that vanished (e.g. a restarted server) and reopen the
        streams. Raises what the calls raise."""
        from google.api_core import exceptions as gexc

        self._teardown_streams()
        if self._stop.is_set():
            return
        self._client = subscriber_client(self.cfg.emulator_host)
        kept = False
        for sub in self._subs:
            try:
                self._client.get_subscription(
                    request={"subscription": sub.path},
                    retry=None,
                    timeout=self.settings.probe_timeout_s,
                )
                kept = True
            except gexc.NotFound:
                if not sub.owned:
                    raise
                self._ensure(sub)
                logger.warning(
                    "subscription %s was gone (server restarted empty?) and is created again; "
                    "bars published in between are lost and show as missing bar times",
                    sub.path,
                )
                # A new subscription may reuse message ids (a restarted emulator starts at 1).
                self.handler.forget_message_ids()
        if kept:
            # What the broken stream held comes back once its deadline passed, and the backlog
            # may come mixed with new bars: no step before it has drained.
            self._hold_for_backlog()
        self._open_streams()

    def _supervise(self) -> None:
        """Supervisor thread: probe every ``health_interval_s``; on failure report
        DISCONNECTED and reconnect, waiting ``settings.reconnect.delay_s(attempt)`` before each
        attempt (capped exponential backoff with full jitter), until the stream is open again
        (CONNECTED; the handler reports LIVE when bars flow). Every wait ends at once on stop."""
        from google.api_core import exceptions as gexc

        terminal = (gexc.PermissionDenied, gexc.Unauthenticated, gexc.InvalidArgument)
        st = self.settings
        attempt = 0
        connected = True
        while not self._stop.is_set():
            if connected:
                if self._stop.wait(st.health_interval_s):
                    break
                problem = self._probe()
                if problem is None:
                    continue
                connected = False
                self.disconnects += 1
                self.last_error = problem
                logger.warning("Pub/Sub stream down (%s); reconnecting", problem)
                self.hub.set_status("DISCONNECTED", problem)
                self._on_stream_break()
                self._teardown_streams()
                attempt = 0
                continue
            attempt += 1
            if self._stop.wait(st.reconnect.delay_s(attempt)):
                break
            try:
                self._reconnect()
            except terminal as e:
                self.last_error = f"{type(e).__name__}: {e}"
                logger.error(
                    "Pub/Sub refused the subscription for good (%s); ending the live input",
                    self.last_error,
                )
                self.hub.set_status("CONNBROKEN", self.last_error)
                self.hub.close_input(f"stream broken: {self.last_error}")
                return
            except Exception as e:  # noqa: BLE001 - retried with backoff
                self.last_error = f"{type(e).__name__}: {e}"
                logger.info("reconnect attempt %d failed: %s", attempt, self.last_error)
                continue
            connected = True
            self.reconnects += 1
            logger.warning(
                "Pub/Sub stream open again after %d attempt(s); LIVE once bars flow", attempt
            )
            self.hub.set_status("CONNECTED")
        # Stop requested: the feeds drain what was buffered; the streams stay open until
        # close() has settled every message (an acknowledgement needs a live client).
        self.hub.close_input("stop requested", self._drain_timeout_s)

    def _on_stream_break(self) -> None:
        """A stream broke (any thread): what it held is redelivered only after its deadline and
        the backlog may come mixed with new bars, so steps wait (:meth:`BarHub.hold_steps`)."""
        if not self._closed and not self._stop.is_set():
            self._hold_for_backlog()

    def _hold_for_backlog(self) -> None:
        self.hub.hold_steps(self.redelivery_s, backlog_before_s=time.time())

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
        self._cancel_streams(self.settings.probe_timeout_s)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None


class _StreamErrorLog(logging.Handler):
    """Hears google-cloud-pubsub's stream errors, which it logs at DEBUG on the
    ``subscriber-streams`` logger while it reopens a stream by itself
    (``streaming_pull_manager.py``, ``_should_recover``/``_should_terminate``):

    * re-logged here at WARNING, at most once per error text per minute (never silent);
    * a stream that broke and is being reopened may have held bars that Pub/Sub redelivers only
      after their ack deadline, while newer bars flow on the new stream at once: every running
      subscriber is told (:meth:`PubSubBarSubscriber._on_stream_break`) and holds its steps.

    Installed once per process; the library's other DEBUG records are dropped.
    """

    LOGGER = "subscriber-streams"
    _handler: _StreamErrorLog | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self._last: dict[str, float] = {}
        self.subscribers: weakref.WeakSet[PubSubBarSubscriber] = weakref.WeakSet()

    @classmethod
    def install(cls, sub: PubSubBarSubscriber) -> None:
        with cls._lock:
            if cls._handler is None:
                cls._handler = cls()
                lib = logging.getLogger(cls.LOGGER)
                lib.addHandler(cls._handler)
                lib.setLevel(logging.DEBUG)
                lib.propagate = False  # its DEBUG records would otherwise reach our handlers
            cls._handler.subscribers.add(sub)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001
            return
        if "stream error" not in text:
            return
        if "reopen" in text:  # recoverable: the client reopens the stream by itself
            for sub in list(self.subscribers):
                sub._on_stream_break()
        key = text[:200]
        now = time.monotonic()
        if now - self._last.get(key, -60.0) < 60.0:
            return
        self._last[key] = now
        logger.warning("Pub/Sub client: %s", key)


def _exc_text(fut: Any) -> str:
    try:
        exc = fut.exception(timeout=0)
    except Exception as e:  # noqa: BLE001 - cancelled futures raise here
        return type(e).__name__
    return f"{type(exc).__name__}: {exc}" if exc is not None else "finished"
