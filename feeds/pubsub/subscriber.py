"""The one Pub/Sub subscriber of a runner: subscriptions, streaming pull, reconnects, shutdown.

Data path::

    topic --(one subscription per runner and topic)--> PubSubBarSubscriber
      callback thread: MessageHandler.handle(): decode, validate, hash, de-duplicate, route by
                       the ``symbol`` attribute -> BarHub.offer() (blocks while that symbol's
                       buffer is full = back-pressure), then ack
      main thread:     PubSubMarketDataFeed._load() -> BarHub.take()

Threads: the Pub/Sub client's callback thread (one worker per stream) runs
:meth:`~feeds.pubsub.handler.MessageHandler.handle`; the supervisor thread probes the
subscription and reconnects (backoff: :meth:`core.retry.RetryPolicy.delay_s`); everything
touching backtrader runs on the main thread. The only hand-off is the
:class:`~feeds.pubsub.hub.BarHub`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import backtrader as bt

from core.errors import ConfigError, TransientError
from feeds.pubsub.clients import resource_path, subscriber_client, subscription_id, symbol_filter
from feeds.pubsub.config import FieldSet, PubSubFeedConfig, StreamSettings, parse_declared_fields
from feeds.pubsub.feed import PubSubMarketDataFeed, make_pubsub_feed
from feeds.pubsub.handler import STOPPED, FeedEvents, MessageHandler
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
    ``cerebro.run()`` -> :meth:`close`. :meth:`request_stop` is safe from a signal handler.

    Subscriptions are named ``<PUBSUB_SUBSCRIPTION_PREFIX>-<session id>`` (plus the topic id when
    there are several topics), carry an expiration policy (``PUBSUB_SUBSCRIPTION_TTL_S``) so a
    crashed pod leaves nothing behind, message ordering, and a ``symbol`` filter when it fits
    (the emulator stores but ignores filters; routing is done here in any case). One that
    already exists under that name is reused; ``PUBSUB_SUBSCRIPTION`` reuses a named one that
    this runner then neither recreates nor deletes. Created ones are deleted by :meth:`close`.

    Args:
        cfg: the feed config.
        symbols: symbols to route (others are refused as ``unknown_symbol``).
        session_id: the runner's session (names the subscription).
        settings: stream tuning.
        events: optional metrics observer.
    """

    def __init__(
        self,
        cfg: PubSubFeedConfig,
        *,
        symbols: Sequence[str],
        session_id: str,
        settings: StreamSettings | None = None,
        events: FeedEvents | None = None,
    ) -> None:
        if not symbols:
            raise ConfigError("SYMBOLS: a live run needs at least one symbol")
        if cfg.subscription and len(cfg.topics) > 1:
            raise ConfigError(
                "PUBSUB_SUBSCRIPTION names one subscription but PUBSUB_TOPIC lists "
                f"{len(cfg.topics)} topics; use one topic or drop "
                "PUBSUB_SUBSCRIPTION"
            )
        self.cfg = cfg
        self.symbols = tuple(symbols)
        self.session_id = session_id
        self.settings = settings or StreamSettings()
        self.hub = BarHub(
            self.symbols,
            max_buffered_bars=cfg.max_buffered_bars,
            align_wait_s=cfg.align_wait_s,
            idle_timeout_s=cfg.idle_timeout_s,
        )
        self.handler = MessageHandler(self.hub, settings=self.settings, events=events)
        self.declared = parse_declared_fields(cfg.fields)
        self.fields: dict[str, FieldSet] = {}
        self.timeframe: int = bt.TimeFrame.Minutes
        self.compression = 1
        self.drain_timeout_s: float | None = None
        self.disconnects = 0
        self.reconnects = 0
        self.last_error = ""
        self._client: Any = None
        self._subs: list[_Sub] = []
        self._stop = threading.Event()
        self._stream_lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._drain_timeout_s: float | None = None
        self._closed = False
        self._started = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self, backfill: Mapping[str, Sequence[LiveBar]] | None = None) -> None:
        """Queue the backfill bars (they play before any live bar), create or reuse the
        subscriptions, open the streams, start the supervisor.

        Args:
            backfill: per symbol, CSV bars from :func:`~feeds.pubsub.backfill.backfill_bars`
                (oldest first); live bars at or before a symbol's last backfill bar are then
                dropped as duplicates/stale.

        Raises:
            ConfigError: the topic does not exist, or a reused subscription is missing or
                bound to another topic.
            TransientError: Pub/Sub is unreachable or refused a call (the message says which).
        """
        from google.api_core import exceptions as gexc

        for sym, bars in (backfill or {}).items():
            if bars:
                self.handler.seed(sym, bars)
                self.hub.preload(bars)
        self._client = subscriber_client(self.cfg.emulator_host)
        many = len(self.cfg.topics) > 1
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
                        self.session_id,
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
        except gexc.GoogleAPICallError as e:
            self._abort()
            raise TransientError(f"Pub/Sub at {self.cfg.emulator_host or 'Google'}: {e}") from e
        except Exception:
            self._abort()
            raise
        self.hub.set_status("LIVE")
        self._started = True
        self._supervisor = threading.Thread(
            target=self._supervise, name="pubsub-supervisor", daemon=True
        )
        self._supervisor.start()
        logger.info(
            "subscribed to %s via %s (%d symbols)",
            ", ".join(self.cfg.topics),
            ", ".join(s.path.rsplit("/", 1)[-1] for s in self._subs),
            len(self.symbols),
        )

    def discover_fields(
        self, backfill: Mapping[str, FieldSet] | None = None
    ) -> dict[str, FieldSet]:
        """Each symbol's extra fields: the declared ones (PUBSUB_FIELDS) or those of its first
        message within ``PUBSUB_DISCOVERY_S``, plus the backfill file's; then fixed."""
        if self.declared:
            found = {s: self.declared for s in self.symbols}
        elif self.cfg.discovery_s > 0:
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
        size defaults to :attr:`timeframe`/:attr:`compression` (the backfill file's, else one
        minute)."""
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
        """Stop pulling; feeds drain what was delivered (for at most ``drain_timeout_s``,
        default :attr:`drain_timeout_s`) then end. Safe from a signal handler: only sets an
        event; the supervisor thread does the work."""
        self._drain_timeout_s = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._stop.set()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop the streams, join the supervisor, delete the subscriptions this runner created
        and close the client. Idempotent; never raises (failures are logged: an undeleted
        subscription expires by its TTL)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.hub.close_input("subscriber closed", self._drain_timeout_s)
        if self._supervisor is not None:
            self._supervisor.join(timeout_s)
        self._cancel_streams(timeout_s)
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
            backpressure_waits=self.hub.backpressure_waits,
            disconnects=self.disconnects,
            reconnects=self.reconnects,
            subscriptions=[s.path for s in self._subs],
            status=self.hub.status,
            input_closed=self.hub.close_reason,
        )
        return out

    def feed_counters(self) -> dict[str, dict[str, int]]:
        """Per-symbol counters plus an ``all`` row (malformed by reason, duplicates...)."""
        st = self.handler.stats
        rows: dict[str, dict[str, int]] = {
            s: {"delivered": st.per_symbol.get(s, 0)} for s in self.symbols
        }
        total = {
            "received": st.received,
            "delivered": st.delivered,
            "duplicates": st.duplicates,
            "malformed": sum(st.malformed.values()),
            "disconnects": self.disconnects,
            "undelivered": self.hub.undelivered,
        }
        total.update({f"malformed.{k}": v for k, v in sorted(st.malformed.items())})
        rows["all"] = total
        return rows

    # -- streams (supervisor thread, and start) -------------------------------------------------

    def _callback(self, message: Any) -> None:
        """Pub/Sub callback thread: decode, validate, hash, buffer, then ack."""
        try:
            pt = message.publish_time
            outcome = self.handler.handle(
                message.data,
                message.attributes,
                message_id=message.message_id,
                publish_time_s=pt.timestamp() if pt else None,
            )
        except Exception:
            self.handler.stats.internal_errors += 1
            logger.exception(
                "internal error handling message %s; nacked", getattr(message, "message_id", "?")
            )
            message.nack()
            return
        if outcome == STOPPED:
            message.nack()
        else:
            message.ack()

    def _open_streams(self) -> None:
        from google.cloud.pubsub_v1 import types as pubsub_types
        from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

        st = self.settings
        flow = pubsub_types.FlowControl(
            max_messages=st.max_outstanding_messages, max_bytes=st.max_outstanding_bytes
        )
        with self._stream_lock:
            for sub in self._subs:
                # One worker per stream: bars of a symbol are handled in arrival order.
                executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pubsub-cb")
                sub.future = self._client.subscribe(
                    sub.path, self._callback, flow_control=flow, scheduler=ThreadScheduler(executor)
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
            "enable_message_ordering": True,
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
            self._check_reused(sub)
            logger.info("reusing existing subscription %s", sub.path)

    def _check_reused(self, sub: _Sub) -> None:
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

    def _reconnect(self) -> None:
        """Recreate owned subscriptions that vanished (e.g. a restarted server) and reopen the
        streams. Raises what the calls raise."""
        from google.api_core import exceptions as gexc

        self._cancel_streams(self.settings.probe_timeout_s)
        for sub in self._subs:
            try:
                self._client.get_subscription(
                    request={"subscription": sub.path},
                    retry=None,
                    timeout=self.settings.probe_timeout_s,
                )
            except gexc.NotFound:
                if not sub.owned:
                    raise
                self._ensure(sub)
                # A new subscription may reuse message ids (a restarted emulator starts at 1).
                self.handler.forget_message_ids()
        self._open_streams()

    def _supervise(self) -> None:
        """Supervisor thread: probe every ``health_interval_s``; on failure report
        DISCONNECTED and reconnect, waiting ``settings.reconnect.delay_s(attempt)`` before each
        attempt (capped exponential backoff with full jitter), until LIVE again."""
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
            logger.warning("Pub/Sub stream reconnected after %d attempt(s)", attempt)
            self.hub.set_status("LIVE")
        # Stop requested: stop pulling; the feeds drain what was delivered.
        self.hub.close_input("stop requested", self._drain_timeout_s)
        self._cancel_streams(st.probe_timeout_s)

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
                logger.info("deleted subscription %s", sub.path)
            except Exception as e:  # noqa: BLE001 - it expires by its TTL anyway
                logger.warning(
                    "could not delete subscription %s (%s); it expires after %d s idle",
                    sub.path,
                    e,
                    self.cfg.subscription_ttl_s,
                )

    def _abort(self) -> None:
        self._cancel_streams(self.settings.probe_timeout_s)
        self._delete_owned()
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass
            self._client = None


def _exc_text(fut: Any) -> str:
    try:
        exc = fut.exception(timeout=0)
    except Exception as e:  # noqa: BLE001 - cancelled futures raise here
        return type(e).__name__
    return f"{type(exc).__name__}: {exc}" if exc is not None else "finished"
