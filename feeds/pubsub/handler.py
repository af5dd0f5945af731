"""What the Pub/Sub callback thread does with one message before the ack.

:class:`MessageHandler` decodes and validates (:func:`~feeds.pubsub.messages.decode_message`),
refuses unknown symbols and stale bars, drops duplicates, records field kinds (discovery, late
fields) and offers the bar to the :class:`~feeds.pubsub.hub.BarHub`. It returns one of the
outcomes :data:`DELIVERED`, :data:`DUPLICATE`, :data:`MALFORMED` (ack all three) or
:data:`STOPPED` (the input is closed: do not ack). Counters live in :class:`FeedStats`; an
optional :class:`FeedEvents` observer (metrics) hears every outcome.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.bars import OHLCV
from feeds.pubsub.config import FieldSet, StreamSettings
from feeds.pubsub.hub import BarHub
from feeds.pubsub.messages import LiveBar, MalformedMessageError, bar_fields, decode_message

__all__ = [
    "DELIVERED",
    "DUPLICATE",
    "MALFORMED",
    "STOPPED",
    "FeedEvents",
    "FeedStats",
    "MessageHandler",
]

logger = logging.getLogger(__name__)


class FeedEvents(Protocol):
    """Optional observer of the callback thread's outcomes (metrics). Must be thread-safe."""

    def on_bar(self, symbol: str, age_s: float | None) -> None: ...

    def on_malformed(self, symbol: str, reason: str) -> None: ...

    def on_duplicate(self, symbol: str) -> None: ...


DELIVERED, DUPLICATE, MALFORMED, STOPPED = "delivered", "duplicate", "malformed", "stopped"


@dataclass(slots=True)
class FeedStats:
    """Counters of the live input (read by the report; written under the handler's lock)."""

    received: int = 0
    delivered: int = 0
    duplicates: int = 0
    duplicate_conflicts: int = 0
    hash_verified: int = 0
    malformed: Counter[str] = field(default_factory=Counter)
    per_symbol: Counter[str] = field(default_factory=Counter)
    late_fields: dict[str, Counter[str]] = field(default_factory=dict)
    type_mismatches: Counter[str] = field(default_factory=Counter)
    internal_errors: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "duplicate_conflicts": self.duplicate_conflicts,
            "hash_verified": self.hash_verified,
            "malformed": dict(self.malformed),
            "malformed_total": sum(self.malformed.values()),
            "late_fields": {s: dict(c) for s, c in self.late_fields.items()},
            "type_mismatches": dict(self.type_mismatches),
            "internal_errors": self.internal_errors,
        }


class MessageHandler:
    """Everything the callback thread does with one message before the ack.

    Decodes and validates (:func:`decode_message`), refuses unknown symbols and bars whose time
    is not after the symbol's last bar, drops duplicates (same message id with the same
    content, or a symbol+time already seen), records field kinds (discovery, late fields), and
    hands the bar to :meth:`BarHub.offer`. Malformed messages are counted per reason and logged
    once per reason with their message id.

    Thread context: Pub/Sub callback threads (serialised by a lock); :meth:`wait_discovery`
    and :meth:`freeze_fields` from the main thread.
    """

    def __init__(
        self,
        hub: BarHub,
        *,
        settings: StreamSettings | None = None,
        events: FeedEvents | None = None,
    ) -> None:
        st = settings or StreamSettings()
        self.hub = hub
        self.symbols = frozenset(hub.symbols)
        self.events = events
        self.stats = FeedStats()
        self._lock = threading.Lock()
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._max_ids = st.dedup_message_ids
        self._max_times = st.dedup_times_per_symbol
        self._last: dict[str, float] = {}
        self._recent: dict[str, OrderedDict[float, str]] = {s: OrderedDict() for s in self.symbols}
        self._logged: set[str] = set()
        self._first: dict[str, FieldSet] = {}
        self._seen_kinds: dict[str, dict[str, str]] = {s: {} for s in self.symbols}
        self._frozen: dict[str, FieldSet] | None = None
        self._all_first = threading.Event()

    # -- per message -------------------------------------------------------------------------

    def handle(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        *,
        message_id: str | None,
        publish_time_s: float | None = None,
    ) -> str:
        """Process one message. Returns ``delivered``, ``duplicate``, ``malformed`` (ack all
        three) or ``stopped`` (input closed: do not ack)."""
        try:
            bar = decode_message(
                data, attributes, message_id=message_id, publish_time_s=publish_time_s
            )
        except MalformedMessageError as e:
            self._reject(e.reason, e.detail, message_id, attributes.get("symbol"))
            return MALFORMED
        sym = bar.symbol
        with self._lock:
            self.stats.received += 1
            if sym not in self.symbols:
                self._reject_locked(
                    "unknown_symbol", f"symbol {sym!r} is not in SYMBOLS", message_id, sym
                )
                return MALFORMED
            if message_id is not None and self._ids.get(message_id) == bar.data_hash:
                return self._duplicate_locked(sym, message_id, "same message id")
            recent = self._recent[sym]
            seen_hash = recent.get(bar.dt_num)
            if seen_hash is not None:
                if seen_hash != bar.data_hash:
                    self.stats.duplicate_conflicts += 1
                    self._log_once(
                        f"conflict:{sym}",
                        "%s: message %s repeats bar time %s with "
                        "different content; the first version is kept (further "
                        "conflicts are counted)",
                        sym,
                        message_id,
                        bar.ts.isoformat(),
                    )
                return self._duplicate_locked(sym, message_id, "same symbol and timestamp")
            last = self._last.get(sym)
            if last is not None and bar.dt_num <= last:
                self._reject_locked(
                    "stale_timestamp",
                    f"{sym} bar time {bar.ts.isoformat()} is not after the symbol's last bar",
                    message_id,
                    sym,
                )
                return MALFORMED
            # Reserve before the (possibly blocking) offer.
            self._last[sym] = bar.dt_num
            recent[bar.dt_num] = bar.data_hash
            if len(recent) > self._max_times:
                recent.popitem(last=False)
            if message_id is not None:
                self._ids[message_id] = bar.data_hash
                if len(self._ids) > self._max_ids:
                    self._ids.popitem(last=False)
            self._note_fields(sym, bar)
        if not self.hub.offer(bar):
            with self._lock:
                if self._last.get(sym) == bar.dt_num:
                    self._last[sym] = last if last is not None else -math.inf
                recent.pop(bar.dt_num, None)
                if message_id is not None:
                    self._ids.pop(message_id, None)
            return STOPPED
        if self.hub.consumer_waiting:
            # Hand the GIL to the waiting main thread now rather than at the next switch
            # interval (5 ms): keeps callback -> next() well under a millisecond.
            time.sleep(0)
        with self._lock:
            self.stats.delivered += 1
            self.stats.per_symbol[sym] += 1
            if bar.verified:
                self.stats.hash_verified += 1
        if self.events is not None:
            age = bar.received_s - publish_time_s if publish_time_s is not None else None
            self.events.on_bar(sym, age)
        return DELIVERED

    def seed(self, symbol: str, bars: Sequence[LiveBar]) -> None:
        """Remember backfilled bars so live copies of them count as duplicates."""
        with self._lock:
            recent = self._recent[symbol]
            for bar in bars[-self._max_times :]:
                recent[bar.dt_num] = bar.data_hash
            while len(recent) > self._max_times:
                recent.popitem(last=False)
            if bars:
                self._last[symbol] = max(self._last.get(symbol, -math.inf), bars[-1].dt_num)

    def forget_message_ids(self) -> None:
        """After a new subscription (e.g. a restarted server), ids may be reused."""
        with self._lock:
            self._ids.clear()

    # -- fields ------------------------------------------------------------------------------

    def _note_fields(self, sym: str, bar: LiveBar) -> None:
        kinds = self._seen_kinds[sym]
        frozen = self._frozen.get(sym) if self._frozen is not None else None
        for name, value in bar.values.items():
            if name in OHLCV or value is None:
                continue
            kind = "text" if isinstance(value, str) else "number"
            if name not in kinds:
                kinds[name] = kind
            if frozen is not None:
                self._check_frozen(sym, name, kind, frozen)
        if sym not in self._first:
            self._first[sym] = bar_fields(bar)
            if len(self._first) == len(self.symbols):
                self._all_first.set()

    def _check_frozen(self, sym: str, name: str, kind: str, frozen: FieldSet) -> None:
        have = frozen.kind(name)
        if have is None:
            self.stats.late_fields.setdefault(sym, Counter())[name] += 1
            self._log_once(
                f"late:{sym}:{name}",
                "%s: field %r appeared after the feed's "
                "fields were fixed; it is covered by the data hash but agents cannot "
                "read it (declare it with PUBSUB_FIELDS)",
                sym,
                name,
            )
        elif have != kind:
            self.stats.type_mismatches[f"{sym}.{name}"] += 1
            self._log_once(
                f"kind:{sym}:{name}",
                "%s: field %r is a %s line but a message "
                "carried %s; it reads as %s for that bar (counted)",
                sym,
                name,
                have,
                kind,
                "NaN" if have == "number" else "its JSON text",
            )

    def wait_discovery(self, timeout_s: float) -> dict[str, FieldSet]:
        """Wait up to ``timeout_s`` for the first valid bar of every symbol; returns the extra
        fields of each symbol's first bar (empty for symbols that sent nothing in time)."""
        self._all_first.wait(timeout_s)
        with self._lock:
            found = {s: self._first.get(s, FieldSet()) for s in self.hub.symbols}
            missing = [s for s in self.hub.symbols if s not in self._first]
        if missing:
            logger.warning(
                "no bar within the %.1f s discovery window for %s: OHLCV only; "
                "fields appearing later are reported (PUBSUB_FIELDS declares them)",
                timeout_s,
                ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
            )
        return found

    def freeze_fields(self, fields: Mapping[str, FieldSet]) -> None:
        """Fix each symbol's lines; fields seen so far outside them are reported now, later
        ones as they come."""
        with self._lock:
            self._frozen = dict(fields)
            for sym, kinds in self._seen_kinds.items():
                frozen = self._frozen.get(sym, FieldSet())
                for name, kind in kinds.items():
                    self._check_frozen(sym, name, kind, frozen)

    # -- outcomes ------------------------------------------------------------------------------

    def _duplicate_locked(self, sym: str, message_id: str | None, why: str) -> str:
        self.stats.duplicates += 1
        self._log_once(
            "duplicate",
            "duplicate message %s (%s) of %s dropped; further duplicates are counted, not logged",
            message_id,
            why,
            sym,
        )
        if self.events is not None:
            self.events.on_duplicate(sym)
        return DUPLICATE

    def _reject(self, reason: str, detail: str, message_id: str | None, symbol: str | None) -> None:
        with self._lock:
            self.stats.received += 1
            self._reject_locked(reason, detail, message_id, symbol)

    def _reject_locked(
        self, reason: str, detail: str, message_id: str | None, symbol: str | None
    ) -> None:
        self.stats.malformed[reason] += 1
        self._log_once(
            f"malformed:{reason}",
            "malformed message %s refused (%s): %s; further %s messages are counted, not logged",
            message_id,
            reason,
            detail,
            reason,
        )
        if self.events is not None:
            self.events.on_malformed(symbol or "unknown", reason)

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(msg, *args)
