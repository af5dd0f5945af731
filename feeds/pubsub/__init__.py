"""Live market data from Google Pub/Sub: one subscriber per runner, one backtrader feed per symbol.

Data path (docs/pubsub.md, docs/architecture.md)::

    topic --(one subscription per deployment and topic, stable across restarts)-->
    PubSubBarSubscriber
      pull thread:     MessageHandler.handle(): decode_message() (any bytes -> validated,
                       hashed LiveBar, or refused with a reason and acknowledged),
                       de-duplicate, count gaps, route by the ``symbol`` attribute ->
                       BarHub.offer() (blocks while that symbol's buffer is full)
      main thread:     PubSubMarketDataFeed._load() -> BarHub.take(): the bar of the current
                       step (one bar time per step; a late bar is refused, never merged) ->
                       OHLCV + dynamic lines + text fields + data hash
      acknowledgement: once the decision on the bar is on local disk (the runtime connects the
                       decision writer's journal to PubSubBarSubscriber.ack_through)

Modules, by role:

==================  ===========================================================================
``config``          :class:`PubSubFeedConfig` (``PUBSUB_*``), :class:`StreamSettings`,
                    :class:`FieldSet`, :func:`parse_declared_fields`
``messages``        the message contract: :func:`decode_message` -> :class:`LiveBar` (pure)
``hub``             :class:`BarHub`: per-symbol buffers, back-pressure, steps (alignment),
                    the acknowledgement ledger
``handler``         :class:`MessageHandler`: the pull thread's work (de-duplication, fields)
``gaps``            :class:`GapCounter`: missing bar times on the bar-size grid
``feed``            :class:`PubSubMarketDataFeed` (backtrader), :class:`LiveMemoryBound`
``subscriber``      :class:`PubSubBarSubscriber`: subscriptions, pulling, leases, reconnects,
                    shutdown
``clients``         Pub/Sub client factories, resource paths, subscription ids and filters
``backfill``        :func:`backfill_bars`: CSV warm-up before going live
==================  ===========================================================================

The wiring from a whole run configuration (``start_live_input``) is ``runtime.live``: this
package takes only its own typed configs.
"""

from feeds.pubsub.backfill import backfill_bars
from feeds.pubsub.clients import publisher_client, subscriber_client, subscription_id, symbol_filter
from feeds.pubsub.config import FieldSet, PubSubFeedConfig, StreamSettings, parse_declared_fields
from feeds.pubsub.feed import (
    LiveMemoryBound,
    PubSubMarketDataFeed,
    live_feed_class,
    make_pubsub_feed,
)
from feeds.pubsub.gaps import GapCounter
from feeds.pubsub.handler import FeedEvents, FeedStats, MessageHandler
from feeds.pubsub.hub import BarHub
from feeds.pubsub.messages import LiveBar, MalformedMessageError, decode_message
from feeds.pubsub.subscriber import PubSubBarSubscriber

__all__ = [
    "BarHub",
    "FeedEvents",
    "FeedStats",
    "FieldSet",
    "GapCounter",
    "LiveBar",
    "LiveMemoryBound",
    "MalformedMessageError",
    "MessageHandler",
    "PubSubBarSubscriber",
    "PubSubFeedConfig",
    "PubSubMarketDataFeed",
    "StreamSettings",
    "backfill_bars",
    "decode_message",
    "live_feed_class",
    "make_pubsub_feed",
    "parse_declared_fields",
    "publisher_client",
    "subscriber_client",
    "subscription_id",
    "symbol_filter",
]
