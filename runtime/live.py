"""Wiring of the live input (``MODE=paper``): the whole run configuration -> a started
:class:`~feeds.pubsub.subscriber.PubSubBarSubscriber`, the run's metrics as its observer, the
decision writer's "durable" events as its acknowledgements, and the per-step note of symbols
that missed a step.

The feed package takes only its own typed configs and knows nothing of the decision writer
(feeds sit below analyzers); this composition-root module connects them:

* :func:`start_live_input`: subscriber (stable subscription ``<prefix>-<deployment>``), CSV
  backfill, discovery; every wait in it ends within a second of a stop request.
* :func:`connect_durable_acks`: a bar's message is acknowledged once the decision made on it is
  in the writer's journal on local disk (``fsync``); at shutdown the subscriber waits for the
  journal, acknowledges, and returns everything else to Pub/Sub.
* :func:`add_live_feeds`: the feeds, bounded memory, and :class:`MissedStepNote`.
* :func:`deployment_name`, :func:`decision_scope`: the names that stay the same across restarts
  (the subscription's, and the prefix of paper decision ids).

Called by the Runner on the main thread.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pyarrow as pa
from prometheus_client import Counter

from analyzers.missed_step import MISSED_STEP_NOTE, MissedStepNote
from core.errors import ConfigError
from feeds.pubsub import (
    FeedEvents,
    FieldSet,
    LiveBar,
    LiveMemoryBound,
    PubSubBarSubscriber,
    StreamSettings,
    backfill_bars,
)
from feeds.pubsub.clients import subscription_id
from runtime.config import AppConfig
from runtime.metrics import PREFIX, RunMetrics

__all__ = [
    "MISSED_STEP_NOTE",
    "MissedStepNote",
    "add_live_feeds",
    "connect_durable_acks",
    "decision_scope",
    "deployment_name",
    "metrics_events",
    "start_live_input",
]

logger = logging.getLogger(__name__)


def deployment_name(config: AppConfig) -> str:
    """The deployment's stable name: ``AGENT_ID``, else the agent's class name."""
    return config.run.agent_id or config.run.agent.rpartition(":")[2]


def decision_scope(config: AppConfig) -> str:
    """Prefix of paper decision ids (``<scope>:<bar time>``): the subscription's name, so a
    restarted runner that decides a redelivered bar again writes the same id (stores keep one
    row per id)."""
    cfg = config.pubsub
    if cfg is None:
        raise ConfigError("MODE=paper needs the Pub/Sub settings (PUBSUB_TOPIC)")
    if cfg.subscription:
        return cfg.subscription.rsplit("/", 1)[-1]
    return subscription_id(cfg.subscription_prefix, deployment_name(config), "", False)


def start_live_input(
    config: AppConfig,
    *,
    events: FeedEvents | None = None,
    settings: StreamSettings | None = None,
    on_created: Callable[[PubSubBarSubscriber], None] | None = None,
    durable_acks: bool = True,
) -> PubSubBarSubscriber:
    """Everything ``MODE=paper`` needs before the feeds are added: the subscriber, the CSV
    backfill (``PUBSUB_BACKFILL_BARS``), the subscription and pulling, field discovery. Then
    call :func:`add_live_feeds`, and :meth:`~PubSubBarSubscriber.close` at the end.

    Args:
        config: the run configuration.
        events: metrics observer (:func:`metrics_events`).
        settings: subscriber tuning.
        on_created: called with the subscriber before anything slow happens, so a signal
            handler can reach :meth:`~PubSubBarSubscriber.request_stop` during the backfill
            and the discovery wait (the Runner stores it as its live input).
        durable_acks: acknowledge bars only once their decision is on disk (then call
            :func:`connect_durable_acks`).

    Raises:
        ConfigError, DataError: bad settings or backfill file.
        TransientError: Pub/Sub unreachable.
    """
    cfg = config.pubsub
    if cfg is None:
        raise ConfigError(
            "MODE=paper needs the Pub/Sub settings (PUBSUB_TOPIC, GOOGLE_CLOUD_PROJECT)"
        )
    sub = PubSubBarSubscriber(
        cfg,
        symbols=config.run.symbols,
        deployment=deployment_name(config),
        settings=settings,
        events=events,
        durable_acks=durable_acks,
    )
    # A stop ends the run after the current step: bars buffered but not yet given to the agent
    # are returned to Pub/Sub for the next start (no decision, and no order, after SIGTERM).
    sub.drain_timeout_s = 0.0
    if durable_acks:
        # Beside the decision journal: the last bar time acknowledged, for the next start.
        sub.resume_path = config.fmel.spill_dir / f"pubsub-resume-{decision_scope(config)}.json"
    if on_created is not None:
        on_created(sub)
    backfill: dict[str, list[LiveBar]] = {}
    backfill_fields: dict[str, FieldSet] = {}
    if cfg.backfill_bars > 0:
        for fc in config.csv_feeds:
            if sub.stop_requested:
                break
            try:
                bars, file_fields, timeframe, compression = backfill_bars(fc, cfg.backfill_bars)
            except pa.ArrowCancelled as e:
                # pyarrow's CSV reader checks for SIGINT/SIGTERM while it reads when a Python
                # handler is installed: it cancels the read and hands the signal on to that
                # handler (e.signum), which asks for the stop on its relay thread
                # (core.signals), so stop_requested may not be set yet. Anything else is a
                # real error. (CI caught the race: exit 1, "uncaught ArrowCancelled".)
                if not (sub.stop_requested or e.signum is not None):
                    raise
                logger.info("backfill of %s cancelled by the stop request", fc.symbol)
                break
            sub.set_bar_size(timeframe, compression)
            backfill[fc.symbol] = bars
            backfill_fields[fc.symbol] = file_fields
            logger.info(
                "backfill %s: %d bars from %s before going live", fc.symbol, len(bars), fc.path.name
            )
    try:
        sub.start(backfill)
        fields = sub.discover_fields(backfill_fields)
    except BaseException:
        sub.close()
        raise
    logger.info(
        "live fields: %s",
        "; ".join(
            f"{s}: {', '.join(f.numeric + f.text) or 'OHLCV only'}" for s, f in fields.items()
        ),
    )
    return sub


class DurableWriter(Protocol):
    """What :func:`connect_durable_acks` needs of the decision writer
    (:class:`analyzers.sinks.writer.DecisionWriter` with its journal)."""

    def add_durable_listener(self, fn: Callable[[Sequence[Any]], None]) -> None: ...

    def wait_durable(self, timeout_s: float) -> bool: ...


def connect_durable_acks(writer: DurableWriter, sub: PubSubBarSubscriber) -> None:
    """Acknowledge a bar's message once the decision made on it is on local disk.

    The writer calls the listener on its own thread with each batch of records it has just
    journaled (``fsync``); every taken bar up to the latest ``bar_time`` among them is then
    acknowledged (bars are taken in step order, one bar time per step). At shutdown the
    subscriber first waits (:meth:`DurableWriter.wait_durable`) for the journal to hold every
    decision made, so the last bars are acknowledged and the rest returned to Pub/Sub.
    """

    def on_durable(records: Sequence[Any]) -> None:
        times = [t for t in map(_bar_time, records) if t is not None]
        if times:
            sub.ack_through(max(times))

    writer.add_durable_listener(on_durable)
    sub.set_durability_barrier(writer.wait_durable)


def _bar_time(record: Any) -> float | None:
    """POSIX seconds of a record's bar time (a DecisionRecord, or a row dict from a replay)."""
    value = getattr(record, "bar_time", None)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def add_live_feeds(cerebro: Any, sub: PubSubBarSubscriber) -> list[Any]:
    """Add one live feed per symbol, the bounded-memory analyzer and :class:`MissedStepNote`
    (before FMEL is added, so the note reaches the step's decision record). Returns the feeds.
    """
    feeds = sub.make_feeds()
    for feed in feeds:
        cerebro.adddata(feed, name=feed.symbol)
    # Bounded memory however long the run: indicators and strategy lines too.
    cerebro.addanalyzer(LiveMemoryBound, _name="live_memory")
    cerebro.addanalyzer(MissedStepNote, _name="missed_step")
    return feeds


class _MetricsEvents:
    """:class:`~feeds.pubsub.handler.FeedEvents` that count into :class:`RunMetrics` (and the
    live input's own counters, registered in the same registry).

    Thread context: Pub/Sub callback threads (``prometheus_client`` values are thread-safe).
    """

    def __init__(self, metrics: RunMetrics) -> None:
        self._metrics = metrics
        self._refused, self._missing = _live_counters(metrics)

    def on_bar(self, symbol: str, age_s: float | None) -> None:
        self._metrics.bars_received.labels(feed=symbol).inc()
        if age_s is not None:
            self._metrics.message_age.labels(feed=symbol).observe(max(age_s, 0.0))

    def on_malformed(self, symbol: str, reason: str) -> None:
        self._metrics.malformed.labels(feed=symbol).inc()
        self._refused.labels(reason=reason).inc()

    def on_duplicate(self, symbol: str) -> None:
        self._metrics.duplicates.labels(feed=symbol).inc()

    def on_gap(self, symbol: str, missing: int) -> None:
        self._missing.labels(feed=symbol).inc(missing)


_COUNTERS: weakref.WeakKeyDictionary[RunMetrics, tuple[Counter, Counter]] = (
    weakref.WeakKeyDictionary()
)


def _live_counters(metrics: RunMetrics) -> tuple[Counter, Counter]:
    """``runner_messages_refused_total{reason}`` and ``runner_bars_missing_total{feed}`` in the
    run's registry (created once per registry)."""
    found = _COUNTERS.get(metrics)
    if found is None:
        found = (
            Counter(
                f"{PREFIX}messages_refused",
                "Live messages refused, by reason (late_bar, future_timestamp, bad_json...)",
                ["reason"],
                registry=metrics.registry,
            ),
            Counter(
                f"{PREFIX}bars_missing",
                "Missing bar times of a live feed (gaps on the bar-size grid)",
                ["feed"],
                registry=metrics.registry,
            ),
        )
        _COUNTERS[metrics] = found
    return found


def metrics_events(metrics: RunMetrics) -> FeedEvents:
    """Adapter from the run's metrics (``bars_received``, ``message_age``, ``malformed``,
    ``duplicates``, labelled by feed; plus ``runner_messages_refused_total{reason}`` and
    ``runner_bars_missing_total{feed}``) to :class:`~feeds.pubsub.handler.FeedEvents`."""
    return _MetricsEvents(metrics)
