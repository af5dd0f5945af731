"""Optional copies of written decision rows on a Pub/Sub topic, for real-time consumers.

Each row BigQuery confirmed is published as JSON with the attributes ``session_id``,
``agent_id``, ``decision_id`` and ``action``. Off unless ``FMEL_PUBSUB_TOPIC`` is set.
Publishing is best effort: failures are counted and logged, never retried, and never hold back
BigQuery.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from analyzers.sinks.base import Row
from analyzers.sinks.bigquery.errors import describe

logger = logging.getLogger(__name__)


class DecisionTopic:
    """Publishes written rows to one topic.

    Thread context: every method on the writer thread (through the sink); ``count`` is called
    there too, from :meth:`publish` and :meth:`close`.

    Args:
        topic: ``projects/<p>/topics/<t>``, or a topic name in ``project``.
        project: GCP project of a bare topic name.
        publisher: a ``pubsub_v1.PublisherClient`` (default: built in :meth:`open`; it honours
            ``PUBSUB_EMULATOR_HOST``). One passed in is not stopped by :meth:`close`.
        count: called with ``True`` for each message published, ``False`` for each failure.
    """

    def __init__(
        self,
        topic: str,
        project: str,
        *,
        publisher: Any = None,
        count: Callable[[bool], None] | None = None,
    ) -> None:
        self.path = topic if topic.startswith("projects/") else f"projects/{project}/topics/{topic}"
        self._publisher = publisher
        self._own_publisher = publisher is None
        self._count = count or (lambda ok: None)
        self._futures: list[Any] = []

    def open(self) -> None:
        """Build the publisher when none was given."""
        if self._publisher is None:
            from google.cloud.pubsub_v1 import PublisherClient

            self._publisher = PublisherClient()
        logger.info("decisions are also published to %s", self.path)

    def publish(self, rows: Sequence[Row]) -> None:
        """Queue one message per row (returns at once; results are counted later). A no-op
        after :meth:`close`."""
        if self._publisher is None or not rows:
            return
        self._collect(wait_s=0.0)
        for row in rows:
            try:
                # in the try: the rows are stored by now, so a row this cannot encode is a
                # failed publish, counted, not an error of the write (helper-112)
                data = json.dumps(row, separators=(",", ":"), allow_nan=False).encode()
                future = self._publisher.publish(
                    self.path,
                    data,
                    session_id=str(row.get("session_id")),
                    agent_id=str(row.get("agent_id")),
                    decision_id=str(row.get("decision_id")),
                    action=str(row.get("action")),
                )
            except Exception as e:  # noqa: BLE001 - best effort: counted and logged
                self._count(False)
                logger.warning("decisions topic: publish failed: %s", describe(e))
                continue
            self._futures.append(future)

    def close(self, wait_s: float) -> None:
        """Send what is batched (stopping a publisher this object built) and count the results,
        waiting at most ``wait_s`` seconds. Idempotent; never raises."""
        publisher, self._publisher = self._publisher, None
        if publisher is None:
            return
        try:
            if self._own_publisher:
                publisher.stop()  # publishes what is batched, then stops
            self._collect(wait_s=wait_s)
        except Exception:
            logger.exception("decisions topic: flush failed")

    def _collect(self, wait_s: float) -> None:
        """Count finished publishes; with ``wait_s`` > 0 wait up to that long in total."""
        deadline = time.monotonic() + wait_s
        keep = []
        for future in self._futures:
            remaining = deadline - time.monotonic()
            if not future.done() and remaining > 0:
                try:
                    future.result(timeout=remaining)
                except Exception:  # noqa: BLE001 - counted below
                    pass
            if not future.done():
                keep.append(future)
                continue
            exc = future.exception()
            self._count(exc is None)
            if exc is not None:
                logger.warning("decisions topic: publish failed: %s", describe(exc))
        self._futures = keep
