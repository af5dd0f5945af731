"""One ingested bar as a Pub/Sub message, in the contract the runner reads
(:mod:`feeds.pubsub.messages`) and the replay tool writes (:mod:`feeds.replay`).

Body: compact JSON with ``symbol``, ``timestamp`` (ISO-8601 UTC), ``open``, ``high``, ``low``,
``close``, ``volume``, every dynamic field (numbers as JSON numbers, text as strings, undefined as
null) and ``data_hash`` = :func:`core.bars.bar_hash` of that content, so a CSV bar, a replayed
bar and an ingested bar with the same content hash alike. Attributes: ``symbol`` (routing),
``bar_key`` (``SYMBOL|timestamp``: the deterministic key of the bar, for de-duplication),
``source`` (``live`` or ``backfill``) and ``data_hash``. Published with ``ordering_key=symbol``.

Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from core.bars import OHLCV, bar_hash, check_bar
from core.errors import DataError
from core.time import as_utc, iso_utc

__all__ = ["OutBar", "Source", "bar_key", "build_message"]

Source = Literal["live", "backfill"]


@dataclass(frozen=True, slots=True)
class OutBar:
    """A bar ready to publish.

    Attributes:
        symbol: ordering key and ``symbol`` attribute.
        ts: bar time (start of the minute), aware UTC.
        body: the JSON body.
        attributes: message attributes (``symbol``, ``bar_key``, ``source``, ``data_hash``).
        data_hash: :func:`core.bars.bar_hash` of the content.
        received_ns: ``time.perf_counter_ns()`` when the Alpaca message arrived (latency).
    """

    symbol: str
    ts: datetime
    body: bytes
    attributes: dict[str, str]
    data_hash: str
    received_ns: int = 0

    @property
    def key(self) -> str:
        return self.attributes["bar_key"]


def bar_key(symbol: str, ts: datetime) -> str:
    """``AAPL|2024-01-02T14:30:00Z``: one bar of one symbol, whoever publishes it."""
    return f"{symbol}|{iso_utc(ts)}"


def _json_value(name: str, value: Any) -> float | str | None:
    if value is None or isinstance(value, str):
        return value
    f = float(value)
    if math.isnan(f):
        return None
    if math.isinf(f):
        raise DataError(f"{name} is infinite")
    return f


def build_message(
    symbol: str,
    ts: datetime,
    ohlcv: Mapping[str, float],
    extras: Mapping[str, Any],
    *,
    source: Source,
    received_ns: int = 0,
) -> OutBar:
    """Build the message of one bar.

    Args:
        symbol: e.g. ``AAPL`` or ``BTC/USD``.
        ts: bar time (aware, or naive meaning UTC).
        ohlcv: ``open``, ``high``, ``low``, ``close``, ``volume``.
        extras: dynamic fields by line name (numbers, text or ``None``), in message order.
        source: ``live`` or ``backfill``.
        received_ns: arrival time of the Alpaca message (``perf_counter_ns``), for latency.

    Raises:
        DataError: the bar breaks the OHLCV rule (:func:`core.bars.check_bar`) or a value is
            infinite; the message names the symbol, time and reason.
    """
    ts = as_utc(ts)
    values: dict[str, float | str | None] = {}
    try:
        for name in OHLCV:
            values[name] = float(ohlcv[name])
        problem = check_bar(*(float(ohlcv[n]) for n in OHLCV))
        if problem:
            raise DataError(problem)
        for name, value in extras.items():
            values[name] = _json_value(name, value)
    except (DataError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{symbol} {iso_utc(ts)}: {e}") from e
    digest = bar_hash(symbol, ts, values)
    doc: dict[str, Any] = {"symbol": symbol, "timestamp": iso_utc(ts), **values}
    doc["data_hash"] = digest
    body = json.dumps(doc, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    attributes = {
        "symbol": symbol,
        "bar_key": bar_key(symbol, ts),
        "source": source,
        "data_hash": digest,
    }
    return OutBar(symbol, ts, body, attributes, digest, received_ns)
