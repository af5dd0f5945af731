"""Prometheus metrics of one run (``prometheus_client``), cheap to import and to update.

Each :class:`RunMetrics` owns its own ``CollectorRegistry``: the Runner creates one per run and
hands it to the components it builds, so nothing is process-global and tests never see another
test's numbers. Updating a metric is thread-safe (``prometheus_client`` locks per value), so the
Pub/Sub callback thread, the broker monitor thread and the main thread may all update.

Metric names (all prefixed ``runner_``; ``feed`` is the symbol the feed carries):

* ``runner_info{session,agent,mode}`` gauge: always 1; the labels say what runs.
* ``runner_bars_received_total{feed}``: bars a feed accepted (CSV rows loaded, Pub/Sub messages
  decoded and queued).
* ``runner_bars_processed_total{feed}``: bars the agent's bar loop consumed.
* ``runner_message_age_seconds{feed}`` histogram: publish time to receipt by the subscriber.
* ``runner_feed_lag_seconds{feed}`` gauge: wall clock minus the bar time when the bar was
  processed (live feeds only).
* ``runner_messages_malformed_total{feed}``, ``runner_messages_duplicate_total{feed}``: messages
  refused as invalid; redeliveries dropped by de-duplication.
* ``runner_orders_total{status}``: order notifications by backtrader status name (Submitted,
  Accepted, Partial, Completed, Canceled, Margin, Rejected, Expired).
* ``runner_broker_api_errors_total{operation}``, ``runner_broker_api_retries_total{operation}``.
* ``runner_decision_records_{submitted,written,rejected}_total``: this run's records given to
  the writer, stored, refused for good; ``runner_decision_records_spilled_total``: this run's
  records that went to the spill file (also those stored from it later);
  ``runner_decision_records_in_spill`` (gauge): this run's records in the spill file now, so
  submitted = written + rejected + in_spill + queued; ``runner_decision_records_replayed_total``:
  rows of earlier runs' spills stored; ``runner_decision_spill_rows`` (gauge): every row waiting
  in the spill file (earlier runs' too); ``runner_decision_sink_retries_total``,
  ``runner_decision_records_queued`` (gauge), ``runner_decision_sink_healthy`` (gauge, 0 while
  spilling).
* ``runner_bar_loop_seconds`` histogram: time of one agent bar, its ``next()`` and the analyzers
  after it (FMEL).

The decision-record numbers are read from ``DecisionWriter.stats`` at scrape time
(:meth:`RunMetrics.watch_writer`): the writer needs no knowledge of Prometheus.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import backtrader as bt
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from core.time import bt_num_to_posix

PREFIX = "runner_"
# Bar-loop time: 50 us .. 10 s (agents range from an SMA cross to a model call per bar).
LOOP_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
# Message age: 5 ms .. 5 min (Pub/Sub redelivery after an outage can be minutes old).
AGE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _Pull(Collector):
    """A collector that asks a callable for metric families at scrape time."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterator[Metric]:
        yield from self._fn()

    def describe(self) -> list[Metric]:
        return list(self._fn())


class RunMetrics:
    """The metric objects of one run and the registry they live in.

    Args:
        registry: defaults to a fresh ``CollectorRegistry`` (never the process-global one).

    Attributes:
        registry: pass to ``prometheus_client.generate_latest`` (the health server does).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # monotonic seconds of the last bar-loop step (MetricsAnalyzer; None before one)
        self.last_step_s: float | None = None
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.info = Gauge(
            f"{PREFIX}info",
            "What this runner runs (always 1)",
            ["session", "agent", "mode"],
            registry=r,
        )
        self.bars_received = Counter(
            f"{PREFIX}bars_received", "Bars a feed accepted", ["feed"], registry=r
        )
        self.bars_processed = Counter(
            f"{PREFIX}bars_processed", "Bars the agent's bar loop consumed", ["feed"], registry=r
        )
        self.message_age = Histogram(
            f"{PREFIX}message_age_seconds",
            "Publish time to receipt by the subscriber, seconds",
            ["feed"],
            buckets=AGE_BUCKETS_S,
            registry=r,
        )
        self.feed_lag = Gauge(
            f"{PREFIX}feed_lag_seconds",
            "Wall clock minus bar time when the bar was processed, seconds",
            ["feed"],
            registry=r,
        )
        self.malformed = Counter(
            f"{PREFIX}messages_malformed", "Messages refused as invalid", ["feed"], registry=r
        )
        self.duplicates = Counter(
            f"{PREFIX}messages_duplicate",
            "Redelivered messages dropped by de-duplication",
            ["feed"],
            registry=r,
        )
        self.orders = Counter(
            f"{PREFIX}orders", "Order notifications by status", ["status"], registry=r
        )
        self.broker_errors = Counter(
            f"{PREFIX}broker_api_errors", "Failed broker API calls", ["operation"], registry=r
        )
        self.broker_retries = Counter(
            f"{PREFIX}broker_api_retries", "Retried broker API calls", ["operation"], registry=r
        )
        self.bar_loop = Histogram(
            f"{PREFIX}bar_loop_seconds",
            "Time of one agent bar (next() and the analyzers), seconds",
            buckets=LOOP_BUCKETS_S,
            registry=r,
        )

    def set_info(self, *, session: str, agent: str, mode: str) -> None:
        self.info.labels(session=session, agent=agent, mode=mode).set(1)

    def watch_writer(self, writer: Any) -> None:
        """Export a ``DecisionWriter``'s counters (read from ``writer.snapshot()`` and
        ``writer.healthy`` at each scrape)."""

        def families() -> Iterator[Metric]:
            # One consistent copy: submitted = written + rejected + in_spill + queued holds in
            # every scrape, the batch in flight counted in queued (issue 17, finding 7).
            st, waiting = writer.snapshot()
            for name, key, what in (
                ("submitted", "submitted", "of this run given to the writer"),
                ("written", "written", "of this run stored by the sink"),
                ("spilled", "spilled_total", "of this run put in the spill file"),
                ("replayed", "replayed", "of earlier runs stored from the spill file"),
                ("rejected", "rejected", "of this run refused for good by the sink"),
            ):
                yield CounterMetricFamily(
                    f"{PREFIX}decision_records_{name}",
                    f"Decision records {what}",
                    value=getattr(st, key),
                )
            yield GaugeMetricFamily(
                f"{PREFIX}decision_records_in_spill",
                "Decision records of this run waiting in the spill file",
                value=st.spilled,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}decision_spill_rows",
                "Rows waiting in the spill file (this run's and earlier runs')",
                value=st.in_spill,
            )
            yield CounterMetricFamily(
                f"{PREFIX}decision_sink_retries", "Retried decision sink calls", value=st.retries
            )
            yield GaugeMetricFamily(
                f"{PREFIX}decision_records_queued",
                "Decision records of this run waiting in the writer (buffered or in flight)",
                value=waiting,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}decision_sink_healthy",
                "1 while the decision sink takes records",
                value=1.0 if writer.healthy else 0.0,
            )

        self.registry.register(_Pull(families))

    def watch(self, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register a callable returning metric families, evaluated at each scrape (for
        components that keep their own counters)."""
        self.registry.register(_Pull(fn))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's current value (``None`` when absent); for tests and reports."""
        return self.registry.get_sample_value(name, labels)


class MetricsAnalyzer(bt.Analyzer):  # type: ignore[misc]
    """Feeds :class:`RunMetrics` from the bar loop; add it after every other analyzer.

    Per bar: ``bars_processed`` for each feed whose length grew, ``feed_lag`` for live feeds,
    and ``bar_loop`` = the time from the strategy's cash/value notification (backtrader sends it
    right before ``prenext``/``next``) to this analyzer's own hook, which runs after the agent and
    after the analyzers added before it (FMEL). Orders are counted by status name as
    backtrader notifies them.

    Thread context: main (backtrader) thread only.

    Params:
        metrics: the run's :class:`RunMetrics`.
    """

    params = (("metrics", None),)

    def start(self) -> None:
        self._m: RunMetrics = self.p.metrics
        if self._m is None:
            raise ValueError("MetricsAnalyzer needs metrics=RunMetrics(...)")
        self._t0: float | None = None
        datas = self.strategy.datas
        self._lens = [0] * len(datas)
        names = [d._name or f"data{i}" for i, d in enumerate(datas)]
        # Label children resolved once: the per-bar path is then a lock and an add.
        self._processed = [self._m.bars_processed.labels(feed=n) for n in names]
        self._lag = [
            self._m.feed_lag.labels(feed=n) if d.islive() else None for n, d in zip(names, datas)
        ]

    def notify_cashvalue(self, cash: float, value: float) -> None:
        self._t0 = time.perf_counter()

    def notify_order(self, order: Any) -> None:
        self._m.orders.labels(status=order.getstatusname()).inc()

    def _bar(self) -> None:
        self._m.last_step_s = time.monotonic()  # the bar loop's heartbeat (HEALTH_STALL_S)
        if self._t0 is not None:
            self._m.bar_loop.observe(time.perf_counter() - self._t0)
            self._t0 = None
        for i, data in enumerate(self.strategy.datas):
            n = len(data)
            if n > self._lens[i]:
                self._processed[i].inc(n - self._lens[i])
                self._lens[i] = n
                lag = self._lag[i]
                if lag is not None:
                    # backtrader keeps naive-UTC float days since 0001-01-01 (date2num).
                    lag.set(time.time() - bt_num_to_posix(data.datetime[0]))

    def prenext(self) -> None:
        self._bar()

    def nextstart(self) -> None:
        self._bar()

    def next(self) -> None:
        self._bar()
