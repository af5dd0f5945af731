"""Wiring of the live input (``MODE=paper``): the whole run configuration -> a started
:class:`~feeds.pubsub.subscriber.PubSubBarSubscriber`, and the run's metrics as its observer.

The feed package takes only its own typed configs; this composition-root module picks them out of
:class:`~runtime.config.AppConfig` (Pub/Sub settings, symbols, CSV files for the backfill, the
shutdown budget). Called by the Runner on the main thread.
"""

from __future__ import annotations

import logging

from core.errors import ConfigError
from feeds.pubsub import (
    FeedEvents,
    FieldSet,
    LiveBar,
    PubSubBarSubscriber,
    StreamSettings,
    backfill_bars,
)
from runtime.config import AppConfig
from runtime.metrics import RunMetrics

__all__ = ["metrics_events", "start_live_input"]

logger = logging.getLogger(__name__)


def start_live_input(
    config: AppConfig,
    *,
    session_id: str,
    events: FeedEvents | None = None,
    settings: StreamSettings | None = None,
) -> PubSubBarSubscriber:
    """Everything ``MODE=paper`` needs before the feeds are added: read the CSV backfill
    (``PUBSUB_BACKFILL_BARS``), start the subscriber, discover the fields. Then call
    :meth:`PubSubBarSubscriber.make_feeds`, and :meth:`~PubSubBarSubscriber.close` at the end.

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
        cfg, symbols=config.run.symbols, session_id=session_id, settings=settings, events=events
    )
    # Half the shutdown budget drains buffered bars; the rest flushes decisions and cleans up.
    sub.drain_timeout_s = config.ops.shutdown_timeout_s / 2
    backfill: dict[str, list[LiveBar]] = {}
    backfill_fields: dict[str, FieldSet] = {}
    if cfg.backfill_bars > 0:
        for fc in config.csv_feeds:
            bars, file_fields, sub.timeframe, sub.compression = backfill_bars(fc, cfg.backfill_bars)
            backfill[fc.symbol] = bars
            backfill_fields[fc.symbol] = file_fields
            logger.info(
                "backfill %s: %d bars from %s before going live", fc.symbol, len(bars), fc.path.name
            )
    sub.start(backfill)
    try:
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


class _MetricsEvents:
    """:class:`~feeds.pubsub.handler.FeedEvents` that count into :class:`RunMetrics`.

    Thread context: Pub/Sub callback threads (``prometheus_client`` values are thread-safe).
    """

    def __init__(self, metrics: RunMetrics) -> None:
        self._metrics = metrics

    def on_bar(self, symbol: str, age_s: float | None) -> None:
        self._metrics.bars_received.labels(feed=symbol).inc()
        if age_s is not None:
            self._metrics.message_age.labels(feed=symbol).observe(max(age_s, 0.0))

    def on_malformed(self, symbol: str, reason: str) -> None:
        self._metrics.malformed.labels(feed=symbol).inc()

    def on_duplicate(self, symbol: str) -> None:
        self._metrics.duplicates.labels(feed=symbol).inc()


def metrics_events(metrics: RunMetrics) -> FeedEvents:
    """Adapter from the run's metrics (``bars_received``, ``message_age``, ``malformed``,
    ``duplicates``, labelled by feed) to :class:`~feeds.pubsub.handler.FeedEvents`."""
    return _MetricsEvents(metrics)
