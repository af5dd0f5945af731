"""``python -m runtime.ingest``: the market-data ingestor (:mod:`feeds.ingest`) as a process.

Reads its configuration from the environment (:func:`runtime.config.load_process_ingest_config`:
``SYMBOLS``, ``PUBSUB_TOPIC``, ``GOOGLE_CLOUD_PROJECT``, ``ALPACA_API_KEY``/``ALPACA_SECRET_KEY``
or their Secret Manager references, ``INGEST_*``, ``LOG_*``, ``HEALTH_PORT``,
``SHUTDOWN_TIMEOUT_S``), then wires what the runner wires: JSON logs with secrets redacted
(:mod:`runtime.logs`), ``/healthz`` ``/readyz`` ``/metrics`` (:mod:`runtime.health`, metrics
``ingest_*`` below), SIGINT/SIGTERM handling, and prints one JSON report line on stdout at exit.

Shutdown (SIGTERM, within ``SHUTDOWN_TIMEOUT_S``, which the pod's grace period must exceed):
readiness goes 503, the stream stops, the messages already received are published, the publisher
is flushed (every sent bar confirmed) and the state file saved. A second signal exits at once
(exit code 128 + N); bars not yet confirmed are then published again by the next start (same
``bar_key`` and ``data_hash``: the runner drops the copies).

Exit codes: 0 stopped by a signal, 1 failed (publishing, stream), 2 bad configuration (including
keys Alpaca refuses), 3 Alpaca refused the connection because another client holds this key's
one market-data connection (``INGEST_ON_CONNECTION_LIMIT=exit``).

Metrics (own registry, prefix ``ingest_``): ``bars_published_total{symbol,source}``,
``publish_latency_seconds`` (Alpaca message arrival -> Pub/Sub confirmation, live bars),
``duplicates_skipped_total{symbol}``, ``invalid_bars_total{symbol}``,
``gaps_unfilled_total{symbol}``, ``connection_events_total{event}`` (connected, disconnected,
auth_error), ``connected`` (gauge), ``queue_depth``, ``unconfirmed``, ``history_calls_total``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: a signal during start-up is held
    from core.held_signals import hold_early

    hold_early()

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.errors import (
    AppError,
    ConfigError,
    DataError,
    RetryInterruptedError,
    StopRequestedError,
    TransientError,
)
from core.signals import StopSignals
from feeds.ingest import IngestConfig, Ingestor
from feeds.ingest.state import IngestState
from feeds.pubsub.clients import publisher_client, resource_path
from runtime.config import OpsConfig, load_process_ingest_config, process_log_format
from runtime.health import HealthServer
from runtime.logs import setup_logging
from runtime.metrics import RunMetrics
from runtime.secrets import secrets_in

__all__ = ["IngestMetrics", "main"]

logger = logging.getLogger(__name__)

PREFIX = "ingest_"
# Message -> confirmation: 1 ms .. 60 s (Pub/Sub batching is ~10 ms; a retried publish seconds).
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 60.0)


class _Pull(Collector):
    def __init__(self, ingestor: Ingestor) -> None:
        self._i = ingestor

    def collect(self) -> Iterator[Metric]:
        i = self._i
        yield GaugeMetricFamily(
            f"{PREFIX}connected",
            "1 while the stream is connected",
            value=1.0 if i.connected else 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}queue_depth", "Stream messages waiting for the worker", value=i.queue_depth
        )
        yield GaugeMetricFamily(
            f"{PREFIX}unconfirmed",
            "Bars sent to Pub/Sub, not yet confirmed",
            value=i.publisher.pending,
        )
        yield CounterMetricFamily(
            f"{PREFIX}history_calls", "Historical API requests", value=i.stats.history_calls
        )

    def describe(self) -> list[Metric]:
        return []


class IngestMetrics:
    """The ingestor's Prometheus metrics (see the module docstring); an
    :class:`~feeds.ingest.IngestEvents` observer. Thread-safe (``prometheus_client`` locks)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.published = Counter(
            f"{PREFIX}bars_published", "Bars Pub/Sub confirmed", ["symbol", "source"], registry=r
        )
        self.latency = Histogram(
            f"{PREFIX}publish_latency_seconds",
            "Alpaca message arrival to Pub/Sub confirmation, seconds",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.duplicates = Counter(
            f"{PREFIX}duplicates_skipped", "Bars already published", ["symbol"], registry=r
        )
        self.invalid = Counter(
            f"{PREFIX}invalid_bars", "Alpaca bars refused by the OHLCV rule", ["symbol"], registry=r
        )
        self.gaps = Counter(
            f"{PREFIX}gaps_unfilled", "Gaps history could not fill", ["symbol"], registry=r
        )
        self.connection = Counter(
            f"{PREFIX}connection_events", "Stream connection events", ["event"], registry=r
        )

    def watch(self, ingestor: Ingestor) -> None:
        self.registry.register(_Pull(ingestor))
        # Every symbol's counters from the start at 0 (an alert on rate() needs the series).
        for symbol in ingestor.config.symbols:
            for counter in (self.duplicates, self.invalid, self.gaps):
                counter.labels(symbol=symbol)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # IngestEvents
    def on_published(self, symbol: str, source: str, latency_s: float) -> None:
        self.published.labels(symbol=symbol, source=source).inc()
        if source == "live":
            self.latency.observe(max(latency_s, 0.0))

    def on_duplicate(self, symbol: str) -> None:
        self.duplicates.labels(symbol=symbol).inc()

    def on_invalid(self, symbol: str) -> None:
        self.invalid.labels(symbol=symbol).inc()

    def on_gap(self, symbol: str) -> None:
        self.gaps.labels(symbol=symbol).inc()

    def on_connection(self, event: str) -> None:
        self.connection.labels(event=event).inc()


def ensure_topic(
    client: Any,
    topic_path: str,
    *,
    deadline_s: float,
    attempt_timeout_s: float,
    stop: threading.Event | None = None,
) -> None:
    """Create the topic unless it exists, within ``deadline_s`` seconds in all.

    google-cloud-pubsub's default retry for ``CreateTopic`` keeps trying an unreachable server
    for up to 600 s (the GAPIC default ``Retry(timeout=600)``); a process that cannot reach
    Pub/Sub at start must say so quickly, so the call gets an explicit
    ``google.api_core.retry.Retry`` (transient errors only, 0.2 s -> 2 s backoff, ``deadline_s``
    in all) and a per-attempt ``attempt_timeout_s``. ``stop`` (set by SIGTERM) ends the retries
    at the next failed attempt.

    A topic that does not exist is created (the deployer may also create it; with
    ``roles/pubsub.publisher`` only, creation is refused and the topic is used as it is).

    Raises:
        TransientError: Pub/Sub unreachable or failing for ``deadline_s``, or ``stop`` set.
        ConfigError: the topic path is invalid (``InvalidArgument``).
    """
    from google.api_core import exceptions as gexc
    from google.api_core import retry as gretry

    def on_error(error: Exception) -> None:
        if stop is not None and stop.is_set():
            raise RetryInterruptedError(f"stopped while reaching Pub/Sub: {error}") from error
        logger.warning("Pub/Sub not reachable yet (%s); retrying", error)

    retry = gretry.Retry(
        predicate=gretry.if_transient_error,
        initial=0.2,
        maximum=2.0,
        multiplier=2.0,
        timeout=deadline_s,
        on_error=on_error,
    )
    try:
        client.create_topic(request={"name": topic_path}, retry=retry, timeout=attempt_timeout_s)
        logger.info("created topic %s", topic_path)
    except gexc.AlreadyExists:
        pass
    except gexc.PermissionDenied:
        # Least privilege (roles/pubsub.publisher): the topic is created by the deployer.
        logger.info("no permission to create topics; publishing to %s as it is", topic_path)
    except gexc.InvalidArgument as e:
        raise ConfigError(f"PUBSUB_TOPIC: Pub/Sub refused the topic {topic_path!r}: {e}") from e
    except (gexc.RetryError, gexc.GoogleAPICallError) as e:
        raise TransientError(
            f"Pub/Sub not reachable within {deadline_s:.0f} s creating {topic_path}: {e}"
        ) from e


class IngestProcess:
    """One ingestor process: owns the publisher client, the ingestor, the health server.

    Thread context: :meth:`run` on the main thread; a signal's stop runs on a relay thread
    (:class:`core.signals.StopSignals`).
    """

    def __init__(self, config: IngestConfig, ops: OpsConfig) -> None:
        self.config = config
        self.ops = ops
        self.metrics = IngestMetrics()
        self.topic_path = resource_path(config.project, "topics", config.topic)
        self.client = publisher_client(config.emulator_host)
        self.ingestor: Ingestor | None = None
        self.health: HealthServer | None = None
        self._stop = threading.Event()
        self._finished = False

    def _force_exit(self, name: str) -> None:
        """A second signal (in the handler): exit at once."""
        logger.error("second %s: exiting without flushing", name)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(128 + signal.Signals[name].value)

    def _request_stop(self, name: str) -> None:
        """The first signal, on the relay thread (:mod:`core.signals`: the handler takes no
        lock; ``Event.set`` here could otherwise wait on the main thread's own wait)."""
        if self._finished:
            logger.info("%s after the run ended: exiting as planned", name)
            return
        logger.warning("stopping: %s; publishing what was received, saving the state", name)
        if self.health is not None:
            self.health.set_draining()
        if self.ingestor is not None:
            self.ingestor.request_stop()
        self._stop.set()

    def run(self) -> int:
        """Start, wait for a signal or a fatal stop, shut down. Returns the exit code."""
        # Kept until the process ends: a signal while it exits only logs (not 128 + N).
        StopSignals(self._request_stop, self._force_exit).install()
        try:
            return self._run()
        finally:
            self._finished = True

    def _run(self) -> int:
        # Fails at start (exit 2) rather than after the first publishes.
        IngestState(self.config.state_path).check_writable()
        # Built (indicators imported, their field names checked, the state file read) before
        # anything is served or the topic is touched: a bad INGEST_INDICATORS or state file
        # exits 2 at once, with no topic created and no Pub/Sub wait before it (helper-79).
        ingestor = self.ingestor = Ingestor(
            self.config, self.client, self.topic_path, events=self.metrics
        )
        if self.ops.health_port > 0:
            try:
                # HealthServer only calls .render() on its metrics (duck-typed).
                self.health = HealthServer(
                    port=self.ops.health_port,
                    host=self.ops.health_host,
                    metrics=cast(RunMetrics, self.metrics),
                )
                self.health.start()
            except (OSError, OverflowError, ValueError) as e:
                # OverflowError: a port above 65535 (socket.bind's own check).
                raise ConfigError(
                    f"HEALTH_HOST={self.ops.health_host}, HEALTH_PORT={self.ops.health_port}: "
                    f"cannot serve ({e})"
                ) from e
        topic_ok = threading.Event()
        if self.health is not None:
            # Neither alive nor ready before the topic answered (a pod that cannot reach
            # Pub/Sub is not healthy; ensure_topic below gives up within its deadline).
            def topic_check() -> tuple[bool, str]:
                ok = topic_ok.is_set()
                return ok, "topic reachable" if ok else "reaching the Pub/Sub topic"

            self.health.add_check("topic", topic_check)
            self.health.add_check("topic", topic_check, liveness=True)
        try:
            try:
                ensure_topic(
                    self.client,
                    self.topic_path,
                    deadline_s=min(30.0, 3 * self.config.request_timeout_s),
                    attempt_timeout_s=min(
                        self.config.request_timeout_s, self.ops.shutdown_timeout_s / 2
                    ),
                    stop=self._stop,
                )
            except RetryInterruptedError:
                logger.warning("stopped before the topic was reached; nothing was published")
                return 0
            if self._stop.is_set():
                return 0
            topic_ok.set()
            self.metrics.watch(ingestor)
            if self.health is not None:
                self.health.add_check(
                    "stream",
                    lambda: (ingestor.ready, "connected" if ingestor.ready else "not connected"),
                )
                self.health.add_check("worker", lambda: ingestor.alive, liveness=True)
            ingestor.start()
            while not self._stop.is_set():
                if ingestor.wait(timeout_s=0.2):
                    break
            if self.health is not None:
                self.health.set_draining()
            clean = ingestor.stop(timeout_s=self.ops.shutdown_timeout_s)
            report = ingestor.report()
            sys.stdout.write(json.dumps(report) + "\n")
            sys.stdout.flush()
            if ingestor.fatal is not None or ingestor.exit_code:
                return ingestor.exit_code or 1
            return 0 if clean else 1
        finally:
            self.client.stop()
            if self.health is not None:
                self.health.stop()


def main() -> int:
    """Entry point of ``python -m runtime.ingest``; returns the exit code (module docstring)."""
    try:
        config, ops = load_process_ingest_config()
    except StopRequestedError as e:  # a SIGTERM while secrets were read: nothing ran
        setup_logging("INFO", process_log_format())
        logger.warning("%s: exiting", e)
        return 0
    except ConfigError as e:
        setup_logging("INFO", process_log_format())
        logger.error("configuration error: %s", e)
        return 2
    logs = setup_logging(ops.log_level, ops.log_format)
    logs.add_secrets(secrets_in(config))
    logs.bind(session="ingest", agent="ingest")
    logger.debug("configuration: %r", config)  # secrets print as ****
    try:
        return IngestProcess(config, ops).run()
    except (ConfigError, DataError) as e:
        logger.error("%s: %s", type(e).__name__, e)
        return 2
    except AppError as e:
        logger.error("ingestor failed: %s: %s", type(e).__name__, e)
        return 1


if __name__ == "__main__":
    from core.held_signals import ignore_for_exit

    try:
        exit_code = main()
    finally:
        ignore_for_exit()  # the outcome is printed: a signal must not change the exit code
    sys.exit(exit_code)
