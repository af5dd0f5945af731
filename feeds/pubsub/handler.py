"""What the Pub/Sub pull thread does with one message before it is acknowledged.

:class:`MessageHandler` decodes and validates (:func:`~feeds.pubsub.messages.decode_message`),
refuses unknown symbols and bars from the future, drops duplicates, records field kinds
(discovery, late fields) and offers the bar to the :class:`~feeds.pubsub.hub.BarHub` (which
refuses bars whose step was served: ``late_bar``, or ``stale_timestamp`` when the symbol had
sent a newer bar already). It returns one of the outcomes
:data:`DELIVERED` (buffered: acknowledge now, or once the decision on it is on disk),
:data:`DUPLICATE`, :data:`MALFORMED` (refused with a reason, late bars included: acknowledge
both) or :data:`STOPPED` (the input is closed: do not acknowledge). It never raises: a failure of
our own is refused as ``internal_error``. Counters live in :class:`FeedStats`; an optional
:class:`FeedEvents` observer (metrics) hears every outcome.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.bars import OHLCV, OPEN_INTEREST
from feeds.pubsub.config import FieldSet, StreamSettings
from feeds.pubsub.hub import CLOSED, LATE, BarHub
from feeds.pubsub.hub import RETURNED as HUB_RETURNED
from feeds.pubsub.messages import (
    LiveBar,
    MalformedMessageError,
    bar_fields,
    decode_message,
    excerpt,
    message_clock,
)

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
    """Observer of the live input's outcomes (metrics): ``on_bar``, ``on_malformed`` and
    ``on_duplicate`` from the pull threads, ``on_gap`` from the main thread (when bars are
    handed to the agent). Must be thread-safe and cheap; an observer that raises is logged once
    and otherwise ignored."""

    def on_bar(self, symbol: str, age_s: float | None) -> None: ...

    def on_malformed(self, symbol: str, reason: str) -> None: ...

    def on_duplicate(self, symbol: str) -> None: ...

    def on_gap(self, symbol: str, missing: int) -> None: ...


DELIVERED, DUPLICATE, MALFORMED, STOPPED = "delivered", "duplicate", "malformed", "stopped"
# The bar goes back to Pub/Sub to come again later (a full buffer during a backlog): return
# the message, neither acknowledge it nor keep it.
RETURNED = "returned"


@dataclass(slots=True)
class FeedStats:
    """Counters of the live input (read by the report; written under the handler's lock).

    Attributes:
        received: messages handled.
        delivered: bars buffered for the agent.
        duplicates: redeliveries dropped (``duplicate_conflicts``: with different content).
        malformed: refused messages by reason (``late_bar`` included).
        per_symbol: delivered bars by symbol.
        late_fields, type_mismatches: fields outside the fixed ones, kind changes.
        internal_errors: failures of our own (refused as ``internal_error``).
    """

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
    """Everything the pull thread does with one message before the ack.

    Decodes and validates (:func:`decode_message`, with the future check against
    :func:`~feeds.pubsub.messages.message_clock`), refuses unknown symbols, drops duplicates
    (same message id with the same content, or a symbol+time already seen), records field
    kinds (discovery, late fields), and hands the bar to :meth:`BarHub.offer`, which puts bars
    that came out of order back in order and refuses those whose step was served already
    (``late_bar``; ``stale_timestamp`` when the symbol had sent a newer bar). Refused messages
    are counted per reason and logged once per reason with their message id and a bounded
    excerpt of the body.

    Args:
        hub: where bars go.
        settings: stream tuning (de-duplication memory, message size limit).
        events: optional metrics observer.
        max_future_s: tolerance of the future check, seconds (inf: no check).
        wall_clock: POSIX seconds (tests pass a fake).

    Thread context: the subscriber's pull threads (serialised by a lock); :meth:`wait_discovery`,
    :meth:`freeze_fields` and :meth:`seed` from the main thread; :meth:`interrupt` from any.
    """

    def __init__(
        self,
        hub: BarHub,
        *,
        settings: StreamSettings | None = None,
        events: FeedEvents | None = None,
        max_future_s: float = math.inf,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        st = settings or StreamSettings()
        self.hub = hub
        self.symbols = frozenset(hub.symbols)
        self.events = events
        self.stats = FeedStats()
        self.max_future_s = max_future_s
        self.max_bytes = st.max_message_bytes
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._local = threading.local()  # per pull thread: the last duplicate's bar time
        self._ids: OrderedDict[str, str] = OrderedDict()
        self._tokens_back: list[Any] = []  # pop_returned_tokens
        self._max_ids = st.dedup_message_ids
        self._max_times = st.dedup_times_per_symbol
        self._last: dict[str, float] = {}
        self._recent: dict[str, OrderedDict[float, str]] = {s: OrderedDict() for s in self.symbols}
        self._logged: set[str] = set()
        self._first: dict[str, FieldSet] = {}
        self._seen_kinds: dict[str, dict[str, str]] = {s: {} for s in self.symbols}
        self._frozen: dict[str, FieldSet] | None = None
        self._all_first = threading.Event()
        self._interrupted = False

    # -- per message -------------------------------------------------------------------------

    def handle(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        *,
        message_id: str | None,
        publish_time_s: float | None = None,
        token: Any = None,
    ) -> str:
        """Process one message. Never raises.

        Args:
            data, attributes: the message.
            message_id, publish_time_s: from Pub/Sub (carried into the bar).
            token: kept with the bar (the subscriber's acknowledgement handle).

        Returns:
            ``delivered``, ``duplicate``, ``malformed`` (acknowledge the last two now),
            ``stopped`` (input closed: do not acknowledge) or ``returned`` (return the message
            to Pub/Sub, to come again). Either way, bars delivered earlier may have been handed
            back: :meth:`pop_returned_tokens`.
        """
        try:
            return self._handle(data, attributes, message_id, publish_time_s, token)
        except Exception as e:
            with self._lock:
                self.stats.received += 1
                self.stats.internal_errors += 1
                if "internal" not in self._logged:
                    self._logged.add("internal")
                    logger.exception(
                        "internal error on message %s (%s); refused as internal_error and "
                        "acknowledged (further ones are counted)",
                        message_id,
                        type(e).__name__,
                    )
                self.stats.malformed["internal_error"] += 1
            self._emit("on_malformed", _text(attributes.get("symbol")), "internal_error")
            return MALFORMED

    def _handle(
        self,
        data: bytes,
        attributes: Mapping[str, str],
        message_id: str | None,
        publish_time_s: float | None,
        token: Any,
    ) -> str:
        wall = self._wall()
        try:
            bar = decode_message(
                data,
                attributes,
                message_id=message_id,
                publish_time_s=publish_time_s,
                received_s=wall,
                clock_s=message_clock(attributes, wall),
                max_future_s=self.max_future_s,
                max_bytes=self.max_bytes,
                token=token,
            )
        except MalformedMessageError as e:
            with self._lock:
                self.stats.received += 1
                self._reject_locked(e.reason, e.detail, message_id, data)
            self._emit("on_malformed", _text(attributes.get("symbol")), e.reason)
            return MALFORMED
        sym = bar.symbol
        hub = self.hub
        if hub.status != "LIVE" and hub.status == "CONNECTED":
            hub.set_status("LIVE")  # bars flow again after a (re)connect
        last: float | None = None
        with self._lock:
            self.stats.received += 1
            if sym not in self.symbols:
                self._reject_locked(
                    "unknown_symbol", f"symbol {excerpt(sym)} is not in SYMBOLS", message_id, data
                )
                refused: str | None = "unknown_symbol"
            elif message_id is not None and self._ids.get(message_id) == bar.data_hash:
                refused = self._duplicate_locked(sym, message_id, "same message id")
            else:
                refused, last = self._accept_locked(bar, data)
        if refused == DUPLICATE:
            self._local.duplicate_num = bar.dt_num
            self._emit("on_duplicate", sym)
            return DUPLICATE
        if refused is not None:
            self._emit("on_malformed", sym, refused)
            return MALFORMED
        result = hub.offer(bar)
        if result in (CLOSED, HUB_RETURNED):
            with self._lock:
                if self._last.get(sym) == bar.dt_num:
                    self._last[sym] = last if last is not None else -math.inf
                self._forget_locked(bar)
            return STOPPED if result == CLOSED else RETURNED
        self._take_back(hub.pop_returned())
        if result == LATE:
            # Older than the symbol's newest bar: stale (a redelivery from before the
            # de-duplication window, or a publisher out of order); else it just came too late.
            stale = last is not None and bar.dt_num < last
            reason = "stale_timestamp" if stale else "late_bar"
            with self._lock:
                self._reject_locked(
                    reason,
                    f"{sym} bar {bar.ts.isoformat()} came after its step was served"
                    + (" and after a newer bar of it" if stale else " (PUBSUB_ALIGN_WAIT_S)")
                    + "; it is not delivered in a later step",
                    message_id,
                    data,
                )
            self._emit("on_malformed", sym, reason)
            return MALFORMED
        with self._lock:
            self.stats.delivered += 1
            self.stats.per_symbol[sym] += 1
            if bar.verified:
                self.stats.hash_verified += 1
        if hub.consumer_waiting:
            # Hand the GIL to the waiting main thread now rather than at the next switch
            # interval (5 ms): keeps receipt -> next() well under a millisecond.
            time.sleep(0)
        age = wall - publish_time_s if publish_time_s is not None else None
        self._emit("on_bar", sym, age)
        return DELIVERED

    def _forget_locked(self, bar: LiveBar) -> None:
        """Forget a bar that goes back to Pub/Sub, so that its next delivery is not taken for
        a duplicate (lock held)."""
        self._recent[bar.symbol].pop(bar.dt_num, None)
        if bar.message_id is not None:
            self._ids.pop(bar.message_id, None)

    def _take_back(self, bars: list[LiveBar]) -> None:
        """Bars delivered earlier that a full buffer handed back (an older bar took their
        place): no longer delivered, and their messages go back to Pub/Sub
        (:meth:`pop_returned_tokens`)."""
        if not bars:
            return
        with self._lock:
            for b in bars:
                self._forget_locked(b)
                self.stats.delivered -= 1
                self.stats.per_symbol[b.symbol] -= 1
                if b.verified:
                    self.stats.hash_verified -= 1
                self._tokens_back.append(b.token)

    def shed_newest(self, count: int) -> int:
        """Hand back up to ``count`` of the newest buffered bars (:meth:`BarHub.shed_newest`):
        no longer delivered; their messages go back to Pub/Sub (:meth:`pop_returned_tokens`).
        Returns how many. Pull threads."""
        n = self.hub.shed_newest(count)
        self._take_back(self.hub.pop_returned())
        return n

    def pop_returned_tokens(self) -> list[Any]:
        """Tokens of bars a full buffer handed back since the last call: the caller returns
        their messages to Pub/Sub, to come again (any thread)."""
        with self._lock:
            out, self._tokens_back = self._tokens_back, []
        return out

    def _accept_locked(self, bar: LiveBar, data: bytes) -> tuple[str | None, float | None]:
        """Reserve the bar's time for its symbol.

        Returns:
            ``(refusal, previous time)``: the refusal reason (or :data:`DUPLICATE`) and None,
            or None and the symbol's newest bar time before this one (for a roll-back).
        """
        sym, message_id = bar.symbol, bar.message_id
        recent = self._recent[sym]
        seen_hash = recent.get(bar.dt_num)
        if seen_hash is not None:
            if seen_hash != bar.data_hash:
                self.stats.duplicate_conflicts += 1
                self._log_once(
                    f"conflict:{sym}",
                    "%s: message %s repeats bar time %s with different content; the first "
                    "version is kept (further conflicts are counted)",
                    sym,
                    message_id,
                    bar.ts.isoformat(),
                )
            return self._duplicate_locked(sym, message_id, "same symbol and timestamp"), None
        last = self._last.get(sym)
        # Reserve before the (possibly blocking) offer. Bars may come out of order (Pub/Sub
        # without ordering, redeliveries): the hub orders them and refuses those too late.
        self._last[sym] = bar.dt_num if last is None else max(last, bar.dt_num)
        recent[bar.dt_num] = bar.data_hash
        if len(recent) > self._max_times:
            recent.popitem(last=False)
        if message_id is not None:
            self._ids[message_id] = bar.data_hash
            if len(self._ids) > self._max_ids:
                self._ids.popitem(last=False)
        self._note_fields(sym, bar)
        return None, last

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
            if name in OHLCV or name == OPEN_INTEREST or value is None:  # backtrader's lines
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
                "late_field",
                "%s: field %r appeared after the feed's fields were fixed; it is covered by "
                "the data hash but agents cannot read it (declare it with PUBSUB_FIELDS; "
                "further late fields are counted in the report, not logged)",
                sym,
                name,
            )
        elif have != kind:
            self.stats.type_mismatches[f"{sym}.{name}"] += 1
            self._log_once(
                f"kind:{sym}:{name}",
                "%s: field %r is a %s line but a message carried %s; it reads as %s for that "
                "bar (counted)",
                sym,
                name,
                have,
                kind,
                # numbers and true/false are decoded as floats first: 5 reads as '5.0' and
                # true as '1.0' (a fresh-context attack: the log said "its JSON text")
                "NaN" if have == "number" else "the float's JSON text (5 -> '5.0', true -> '1.0')",
            )

    def wait_discovery(self, timeout_s: float) -> dict[str, FieldSet]:
        """Wait up to ``timeout_s`` for the first valid bar of every symbol (returns early on
        :meth:`interrupt`); returns the extra fields of each symbol's first bar (empty for
        symbols that sent nothing in time)."""
        self._all_first.wait(timeout_s)
        with self._lock:
            found = {s: self._first.get(s, FieldSet()) for s in self.hub.symbols}
            missing = [s for s in self.hub.symbols if s not in self._first]
        if missing and not self._interrupted:
            logger.warning(
                "no bar within the %.1f s discovery window for %s: OHLCV only; "
                "fields appearing later are reported (PUBSUB_FIELDS declares them)",
                timeout_s,
                ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""),
            )
        return found

    def last_duplicate_num(self) -> float | None:
        """Bar time (backtrader day number) of the last message this thread's :meth:`handle`
        answered :data:`DUPLICATE`, so the subscriber can settle the copy with the original's
        decision. Calling thread only."""
        num: float | None = getattr(self._local, "duplicate_num", None)
        return num

    def interrupt(self) -> None:
        """End a :meth:`wait_discovery` now (a stop was requested). Any thread."""
        self._interrupted = True
        self._all_first.set()

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
        return DUPLICATE

    def _reject_locked(self, reason: str, detail: str, message_id: str | None, data: bytes) -> None:
        self.stats.malformed[reason] += 1
        self._log_once(
            f"malformed:{reason}",
            "message %s refused (%s): %s; body %s; further %s messages are counted, not logged",
            message_id,
            reason,
            detail,
            excerpt(data),
            reason,
        )

    def _log_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            logger.warning(msg, *args)

    def _emit(self, name: str, *args: Any) -> None:
        events = self.events
        if events is None:
            return
        try:
            getattr(events, name)(*args)
        except Exception:
            if f"events:{name}" not in self._logged:
                self._logged.add(f"events:{name}")
                logger.exception(
                    "feed event observer failed in %s (further failures ignored)", name
                )


def _text(value: Any) -> str:
    return value if isinstance(value, str) and len(value) <= 64 else "unknown"
