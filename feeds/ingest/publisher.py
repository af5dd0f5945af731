"""Ordered, confirmed publishing of bars to one Pub/Sub topic.

Each bar is published with ``ordering_key=symbol`` and its futures are kept per symbol in send
order. :meth:`BarPublisher.reap` (worker thread) pops the finished ones from the front of each
queue: a success confirms the bar (the caller then advances its state file); a failure after the
client's own retries has paused the ordering key (google-cloud-pubsub fails every later message
of a paused key), so the failed message and everything after it are published again, in order,
after ``resume_publish`` -- at most ``attempts`` times per message, then
:class:`PublishFailedError`.

Thread context: :meth:`publish`, :meth:`reap`, :meth:`flush` on the worker thread; the futures'
done callbacks (latency) on the client's threads.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import TransientError
from feeds.ingest.messages import OutBar

__all__ = ["BarPublisher", "PublishFailedError", "PublisherStats"]

logger = logging.getLogger(__name__)


class PublishFailedError(TransientError):
    """A bar could not be published after every attempt; the ingestor stops (its state file
    still ends before that bar, so a restart publishes it again)."""


@dataclass(slots=True)
class PublisherStats:
    """Counters (worker thread writes; any thread may read)."""

    published: int = 0
    confirmed: int = 0
    republished: int = 0
    latencies_ns: deque[int] = field(default_factory=lambda: deque(maxlen=100_000))


class _Entry:
    __slots__ = ("attempts", "bar", "done_ns", "future")

    def __init__(self, bar: OutBar, future: Any, attempts: int) -> None:
        self.bar = bar
        self.future = future
        self.attempts = attempts
        self.done_ns = 0


class BarPublisher:
    """Publishes :class:`~feeds.ingest.messages.OutBar` s and tracks their confirmation.

    Args:
        client: a ``PublisherClient`` with message ordering enabled.
        topic_path: ``projects/<p>/topics/<t>``.
        attempts: publishes per message before :class:`PublishFailedError`.
        on_done: ``(bar, latency_s)`` when Pub/Sub answered a publish successfully; runs on a
            client thread (metrics only). ``latency_s`` runs from the Alpaca message's arrival
            (``OutBar.received_ns``) to the answer.
    """

    def __init__(
        self,
        client: Any,
        topic_path: str,
        *,
        attempts: int = 5,
        on_done: Callable[[OutBar, float], None] | None = None,
    ) -> None:
        self.client = client
        self.topic_path = topic_path
        self.attempts = attempts
        self.on_done = on_done
        self.stats = PublisherStats()
        self._queues: dict[str, deque[_Entry]] = {}
        # Symbols with a finished future since the last reap (appended by done callbacks):
        # reap() then looks at those queues only, whatever the number of symbols.
        self._finished: deque[str] = deque()

    def _send(self, bar: OutBar, attempts: int) -> _Entry:
        future = self.client.publish(
            self.topic_path, bar.body, ordering_key=bar.symbol, **bar.attributes
        )
        entry = _Entry(bar, future, attempts)

        def done(f: Any, entry: _Entry = entry) -> None:
            entry.done_ns = time.perf_counter_ns()
            self._finished.append(entry.bar.symbol)
            if self.on_done is not None and f.exception() is None:
                received = entry.bar.received_ns or entry.done_ns
                self.on_done(entry.bar, (entry.done_ns - received) / 1e9)

        future.add_done_callback(done)
        return entry

    def publish(self, bar: OutBar) -> None:
        """Publish ``bar`` after every earlier bar of its symbol (returns at once)."""
        self._queues.setdefault(bar.symbol, deque()).append(self._send(bar, 1))
        self.stats.published += 1

    @property
    def pending(self) -> int:
        """Messages sent and not yet confirmed."""
        return sum(len(q) for q in self._queues.values())

    def reap(self) -> list[OutBar]:
        """Pop the confirmed bars from the front of each symbol's queue (send order) and publish
        failed ones again.

        Returns:
            The newly confirmed bars, in send order per symbol.

        Raises:
            PublishFailedError: a message failed ``attempts`` times.
        """
        confirmed: list[OutBar] = []
        symbols: set[str] = set()
        while self._finished:
            symbols.add(self._finished.popleft())
        for symbol in sorted(symbols):
            q = self._queues[symbol]
            while q and q[0].future.done():
                head = q[0]
                error = head.future.exception()
                if error is None:
                    q.popleft()
                    confirmed.append(head.bar)
                    if head.done_ns and head.bar.received_ns:
                        self.stats.latencies_ns.append(head.done_ns - head.bar.received_ns)
                    continue
                self._retry(symbol, q, error)
                break
        self.stats.confirmed += len(confirmed)
        return confirmed

    def _retry(self, symbol: str, q: deque[_Entry], error: BaseException) -> None:
        # Later messages of a paused key fail at once; wait for their answers before resuming.
        failed: list[_Entry] = []
        for entry in list(q):
            try:
                entry.future.result(timeout=60)
            except Exception:  # noqa: BLE001 - every failure of the key is retried below
                failed.append(entry)
        q.clear()
        if failed and failed[0].attempts >= self.attempts:
            raise PublishFailedError(
                f"publishing {failed[0].bar.key} failed {failed[0].attempts} times: {error}"
            ) from error
        logger.warning(
            "publishing %s failed (%s); resuming the ordering key and publishing %d again",
            failed[0].bar.key if failed else symbol,
            error,
            len(failed),
        )
        self.client.resume_publish(self.topic_path, symbol)
        for entry in failed:
            q.append(self._send(entry.bar, entry.attempts + 1))
            self.stats.republished += 1

    def flush(self, timeout_s: float) -> list[OutBar]:
        """Wait up to ``timeout_s`` for every sent message to be confirmed.

        Returns:
            Bars confirmed while waiting (as :meth:`reap`); :attr:`pending` says what is left.

        Raises:
            PublishFailedError: as :meth:`reap`.
        """
        deadline = time.monotonic() + timeout_s
        confirmed = self.reap()
        while self.pending and time.monotonic() < deadline:
            for q in self._queues.values():
                if q:
                    try:
                        q[-1].future.exception(
                            timeout=max(0.0, min(0.05, deadline - time.monotonic()))
                        )
                    except Exception:  # noqa: BLE001 - a timeout here just means "not yet"
                        pass
                    break
            confirmed += self.reap()
        return confirmed
