"""Market-data ingestor: Alpaca's real-time bars (alpaca-py) -> enriched bar messages -> Pub/Sub,
with no gap and no duplicate (historical backfill after every reconnection or restart).

Data path::

    Alpaca stream (StockDataStream / CryptoDataStream, msgpack)
      -> stream thread: bar / trade message + arrival time -> bounded queue
      -> worker thread: catch-up from history after each (re)connection, gap check, the bar's
         trades, enrichment (Alpaca's n/vw, risk metrics, user indicators), message + data hash
      -> Pub/Sub (ordering key = symbol, attribute symbol, bar_key, source, data_hash)
      -> confirmed -> state file (last published bar per symbol, unfilled gaps)

Modules, by role:

==============  ===============================================================================
``config``      :class:`IngestConfig` (``SYMBOLS``, ``PUBSUB_TOPIC``, ``ALPACA_*``,
                ``INGEST_*``), :class:`IngestTuning`
``alpaca``      the alpaca-py stream (connection hooks) and historical client; wire normalisers
``enrich``      :func:`risk_metrics` (VWAP, RV, BV, jump ratio) and user indicators
``messages``    :func:`build_message`: the runner's message contract, the data hash
``publisher``   :class:`BarPublisher`: ordered publishing, confirmations, republish on failure
``state``       :class:`IngestState`: the state file
``ingestor``    :class:`Ingestor`: threads, catch-up, gap checks, shutdown, report
==============  ===============================================================================

The entry point that reads the environment and wires logs, health, metrics and signals is
``python -m runtime.ingest`` (:mod:`runtime.ingest`): this package takes only its typed config.
"""

from feeds.ingest.config import IngestConfig, IngestTuning
from feeds.ingest.enrich import BarView, Enricher, Indicator, Trades, risk_metrics
from feeds.ingest.ingestor import IngestEvents, Ingestor, IngestStats
from feeds.ingest.messages import OutBar, bar_key, build_message
from feeds.ingest.publisher import BarPublisher, PublishFailedError
from feeds.ingest.state import Gap, IngestState

__all__ = [
    "BarPublisher",
    "BarView",
    "Enricher",
    "Gap",
    "Indicator",
    "IngestConfig",
    "IngestEvents",
    "IngestState",
    "IngestStats",
    "IngestTuning",
    "Ingestor",
    "OutBar",
    "PublishFailedError",
    "Trades",
    "bar_key",
    "build_message",
    "risk_metrics",
]
