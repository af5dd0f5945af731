"""The bar and field model shared by every feed: names, flattening, validation, the data hash.

One module so that a bar read from a CSV file and the same bar arriving over Pub/Sub get the same
field names, pass the same checks and get the same ``data_hash``:

* Names: :func:`field_name` turns a column or message key into a backtrader line name
  (``"Adj Close"`` -> ``adj_close``); nested keys are joined with ``_`` by :func:`flatten`
  (``{"latest_news": {"sentiment": 0.3}}`` -> ``latest_news_sentiment``).
* Values: numbers (and booleans, as 0.0/1.0) become float lines; text stays text; lists are kept
  as their JSON text.
* Checks: :func:`check_bar` is the one OHLCV validation rule (CSV rows and messages alike).
* Hash: :func:`bar_hash` is a BLAKE2b-128 over the bar's canonical JSON (symbol, UTC timestamp,
  OHLCV and extras as floats or text, keys sorted, missing/NaN extras left out). It depends only
  on content, never on file position or arrival order.
* Symbol: :func:`feed_symbol` is the symbol of a data feed (its ``symbol``, else its name).

Bottom layer: imports nothing of ours but :mod:`core.time`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from core.time import iso_utc

OHLCV: tuple[str, ...] = ("open", "high", "low", "close", "volume")
PRICE_FIELDS: tuple[str, ...] = ("open", "high", "low", "close")
# backtrader's own data line beside OHLCV and datetime (``bt.feed.DataBase.lines``: futures'
# open interest, as backtrader's CSV format writes it: ``...,Volume,OpenInterest``). A file's
# ``OpenInterest`` column fills it; it is never an extra line.
OPEN_INTEREST = "openinterest"

# Names a dynamic field may not take: backtrader's own line names and attributes of a feed that
# an extra line would shadow. A clash is reported, never silently renamed.
RESERVED_NAMES = frozenset(
    {
        "datetime",
        "openinterest",
        "lines",
        "params",
        "p",
        "array",
        "data",
        "datas",
        "plotinfo",
        "plotlines",
        "symbol",
        "data_hash",
        "bar_hashes",
        "text_lines",
        "skipped_rows",
        "extra_fields",
        "name",
        "clock",
        "owner",
        "mode",
        "idx",
        "line",
        "get",
        "len",
        "tick",
        "fromdate",
        "todate",
    }
)

_NON_IDENT = re.compile(r"[^0-9a-zA-Z]+")


def field_name(raw: str) -> str:
    """Normalise a column name or (flattened) message key to a line name.

    Lower-cases, replaces every run of non-alphanumerics (``.``, spaces, ``-``) with ``_``, trims
    ``_`` at the ends and prefixes ``f_`` when the result starts with a digit.

    Raises:
        ValueError: when nothing is left (e.g. ``"--"``).
    """
    name = _NON_IDENT.sub("_", raw.strip()).strip("_").lower()
    if not name:
        raise ValueError(f"field name {raw!r} has no letters or digits")
    if name[0].isdigit():
        name = "f_" + name
    return name


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings, joining keys with ``_`` and normalising each with
    :func:`field_name`. Lists are kept as compact JSON text.

    >>> flatten({"latest_news": {"sentiment": 0.3, "relevance": 1}})
    {'latest_news_sentiment': 0.3, 'latest_news_relevance': 1}
    """
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = field_name(f"{prefix}_{key}" if prefix else str(key))
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)
        else:
            out[name] = value
    return out


def is_numeric(value: Any) -> bool:
    """True for int/float/bool values (bools count as 0/1); False for text and None."""
    return isinstance(value, (int, float)) and not isinstance(value, str)


def to_float(value: Any) -> float:
    """A numeric field value as float (``True`` -> 1.0). Raises TypeError/ValueError otherwise."""
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return float(value)
    raise TypeError(f"not a number: {value!r}")


def check_bars(
    open_: np.ndarray, high: np.ndarray, low: np.ndarray, close: np.ndarray, volume: np.ndarray
) -> dict[int, str]:
    """Validate OHLCV bars, vectorised: the one bar rule of the project (CSV rows and Pub/Sub
    messages alike).

    Rules, in order (the first that fails is the reason): each price is present (not NaN),
    finite and positive; ``high >= low``; ``open`` and ``close`` within ``[low, high]``; volume
    is finite and not negative when present (a NaN volume means "not reported" and is allowed).

    Args:
        open_, high, low, close, volume: float64 arrays of one length.

    Returns:
        ``{row position: reason}`` for every bad row (``"high 99.1 < low 100.2"``,
        ``"close 101.5 outside [low 99.0, high 101.0]"``,
        ``"close is missing or NaN"``, ``"open -1.0 is not positive"``,
        ``"volume -5.0 is negative"``); empty when all are valid.
    """
    bad: dict[int, str] = {}
    with np.errstate(invalid="ignore"):
        for name, arr in (("open", open_), ("high", high), ("low", low), ("close", close)):
            for i in np.flatnonzero(np.isnan(arr)):
                bad.setdefault(int(i), f"{name} is missing or NaN")
            for i in np.flatnonzero(np.isinf(arr)):
                bad.setdefault(int(i), f"{name} is infinite")
            for i in np.flatnonzero(arr <= 0):
                bad.setdefault(int(i), f"{name} {float(arr[i])!r} is not positive")
        for i in np.flatnonzero(high < low):
            bad.setdefault(int(i), f"high {float(high[i])!r} < low {float(low[i])!r}")
        for name, arr in (("open", open_), ("close", close)):
            for i in np.flatnonzero((arr < low) | (arr > high)):
                bad.setdefault(
                    int(i),
                    f"{name} {float(arr[i])!r} outside [low {float(low[i])!r}, "
                    f"high {float(high[i])!r}]",
                )
        for i in np.flatnonzero(np.isinf(volume)):
            bad.setdefault(int(i), "volume is infinite")
        for i in np.flatnonzero(volume < 0):
            bad.setdefault(int(i), f"volume {float(volume[i])!r} is negative")
    return bad


def check_bar(open_: float, high: float, low: float, close: float, volume: float) -> str | None:
    """Validate one OHLCV bar with the rule of :func:`check_bars`, in plain Python (one message
    on the Pub/Sub callback thread costs ~1 us here against ~100 us through numpy). The two are
    the same rule: ``tests/unit/test_fields.py`` checks they agree on arbitrary floats.

    Returns:
        ``None`` when valid, else the reason.
    """
    prices = (("open", open_), ("high", high), ("low", low), ("close", close))
    for name, v in prices:
        if math.isnan(v):
            return f"{name} is missing or NaN"
        if math.isinf(v):
            return f"{name} is infinite"
        if v <= 0:
            return f"{name} {float(v)!r} is not positive"
    if high < low:
        return f"high {float(high)!r} < low {float(low)!r}"
    for name, v in (("open", open_), ("close", close)):
        if v < low or v > high:
            return f"{name} {float(v)!r} outside [low {float(low)!r}, high {float(high)!r}]"
    if math.isinf(volume):
        return "volume is infinite"
    if volume < 0:
        return f"volume {float(volume)!r} is negative"
    return None


def _canonical_value(value: Any) -> float | str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    f = to_float(value)
    if math.isnan(f):
        return None
    return f


def canonical_bar(symbol: str, ts: datetime, values: Mapping[str, Any]) -> bytes:
    """The bytes :func:`bar_hash` digests: compact JSON, keys sorted, numbers as floats,
    missing/NaN values left out, the timestamp as ISO-8601 UTC."""
    doc: dict[str, Any] = {"symbol": symbol, "timestamp": iso_utc(ts)}
    for key, value in values.items():
        cv = _canonical_value(value)
        if cv is not None:
            doc[key] = cv
    return json.dumps(
        doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def bar_hash(symbol: str, ts: datetime, values: Mapping[str, Any]) -> str:
    """Content address of one bar: 32 hex chars of BLAKE2b-128 over :func:`canonical_bar`.

    Args:
        symbol: e.g. ``"GOOG"`` or ``"BTC/USD"``.
        ts: bar time (aware, or naive meaning UTC).
        values: OHLCV and extra fields by line name (flattened), numbers or text.
    """
    return hashlib.blake2b(canonical_bar(symbol, ts, values), digest_size=16).hexdigest()


# Seconds since 1970 of 1000-01-01 and of 9999-12-31T23:59:59: four-digit years, where numpy's
# ISO text and strftime's agree.
_FOUR_DIGIT_YEARS = (-30_610_224_000, 253_402_300_799)
_EPOCH_NAIVE = datetime(1970, 1, 1)


def bar_hashes(
    symbol: str,
    times_us: np.ndarray,
    numeric: Mapping[str, np.ndarray],
    text: Mapping[str, Sequence[str | None]] | None = None,
) -> list[str]:
    """:func:`bar_hash` of many bars of one symbol at once, equal bar for bar (about 5x faster:
    the canonical JSON is assembled column by column, not through a dict and ``json.dumps``).

    Args:
        symbol: every bar's symbol.
        times_us: bar times, int64 microseconds since 1970-01-01 UTC, shape ``(n,)``.
        numeric: number columns by field name, each shape ``(n,)`` (NaN: left out).
        text: text columns by field name, each ``n`` long (None: left out).

    Returns:
        ``n`` hex digests.

    Raises:
        ValueError: a bar holds an infinite number (as :func:`bar_hash` does).
    """
    text = text or {}
    us = np.asarray(times_us, dtype=np.int64)
    n = len(us)
    if n == 0:
        return []
    names = [*numeric, *text]
    secs = us // 1_000_000
    frac = (us - secs * 1_000_000).tolist()
    slow = np.zeros(n, dtype=bool)
    if {"symbol", "timestamp"} & set(names):
        slow[:] = True  # a field shadowing a key of the document: the dict decides
    slow |= (secs < _FOUR_DIGIT_YEARS[0]) | (secs > _FOUR_DIGIT_YEARS[1])
    stamps = np.datetime_as_string(
        np.clip(secs, *_FOUR_DIGIT_YEARS).astype("datetime64[s]"), unit="s"
    ).tolist()
    enc = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    columns: dict[str, list[str | None]] = {
        "symbol": [f'"symbol":{enc(symbol)}'] * n,
        "timestamp": [
            f'"timestamp":"{s}.{f:06d}Z"' if f else f'"timestamp":"{s}Z"'
            for s, f in zip(stamps, frac, strict=True)
        ],
    }
    for name, col in numeric.items():
        arr = np.asarray(col, dtype=np.float64)
        slow |= np.isinf(arr)
        key = f"{enc(name)}:"
        columns[name] = [None if x != x else key + float.__repr__(x) for x in arr.tolist()]
    for name, tcol in text.items():
        key = f"{enc(name)}:"
        columns[name] = [None if t is None else key + enc(t) for t in tcol]
    ordered = [columns[k] for k in sorted(columns)]
    blake2b = hashlib.blake2b
    out: list[str] = []
    slow_rows = set(np.flatnonzero(slow).tolist())
    for i, parts in enumerate(zip(*ordered, strict=True)):
        if i in slow_rows:
            values: dict[str, Any] = {k: _plain(numeric[k][i]) for k in numeric}
            values.update({k: text[k][i] for k in text})
            ts = _EPOCH_NAIVE + timedelta(microseconds=int(us[i]))
            out.append(bar_hash(symbol, ts, values))
            continue
        doc = "{" + ",".join([p for p in parts if p is not None]) + "}"
        out.append(blake2b(doc.encode(), digest_size=16).hexdigest())
    return out


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, np.floating) else value


class BarHashes:
    """Data hash of each bar a feed delivered, by absolute bar index (0 = first bar).

    Unbounded for backtests; with ``maxlen`` only the newest ``maxlen`` are kept (live feeds),
    and older indexes answer ``None``. Appended on the main thread only.

    Bounded, a hash of :func:`bar_hash`'s form (32 hex digits) is kept as its 16 bytes in one
    ring (``bytearray``): 16 bytes a bar instead of about 90 for a ``str`` in a deque, which at
    10,000 live symbols and the default 5,000-bar lookback is 0.8 GB instead of 4.5 GB. Any
    other text is kept as given.

    With ``source`` (a sequence of every bar's hash, e.g. a CSV file's, which may compute each
    on first use) the feed calls :meth:`advance` per delivered bar instead of :meth:`append`, so
    no hash is computed before something asks for it.
    """

    __slots__ = ("_count", "_hashes", "_maxlen", "_odd", "_ring", "_rows", "_skip", "_source")

    def __init__(self, maxlen: int | None = None, *, source: Sequence[str] | None = None) -> None:
        self._hashes: list[str] = []
        self._maxlen = maxlen if maxlen else 0
        self._ring = bytearray()  # bounded: 16 bytes per kept bar, slot = index % maxlen
        self._odd: dict[int, str] = {}  # bounded: hashes not of bar_hash's form, by index
        self._source = source
        self._skip = 0  # source rows before the first delivered bar (see skip)
        self._rows: Sequence[int] | None = None  # source row of each bar, when not a range
        self._count = 0

    @property
    def bounded(self) -> bool:
        """Old hashes are evicted (``maxlen`` was given): an index may stop resolving."""
        return self._maxlen > 0

    @property
    def source(self) -> Sequence[str] | None:
        """The sequence of every bar's hash these come from (``source``), or None."""
        return self._source

    def append(self, digest: str) -> None:
        if self._source is not None:
            raise TypeError("BarHashes over a source: call advance(), not append()")
        maxlen = self._maxlen
        if not maxlen:
            self._hashes.append(digest)
            self._count += 1
            return
        index = self._count
        try:
            raw = bytes.fromhex(digest) if len(digest) == 32 else b""
        except ValueError:
            raw = b""
        if len(raw) != 16 or raw.hex() != digest:  # upper case or not hex: kept as given
            raw = bytes(16)
            self._odd[index] = digest
        pos = (index % maxlen) * 16
        if index < maxlen:
            self._ring += raw
        else:
            self._ring[pos : pos + 16] = raw
            self._odd.pop(index - maxlen, None)
        self._count = index + 1

    def skip(self, rows: int) -> None:
        """The first ``rows`` rows of ``source`` are not delivered (a feed's ``fromdate``):
        bar 0 is row ``rows``. Before the first :meth:`advance`.

        Raises:
            TypeError: no source, or bars were delivered already.
        """
        if self._source is None or self._count:
            raise TypeError("BarHashes.skip: only over a source, before the first bar")
        self._skip = rows

    def select(self, rows: Sequence[int]) -> None:
        """Bar ``k`` is row ``rows[k]`` of ``source`` (rows a feed delivers that are not one
        run of rows: backtrader drops a row before ``fromdate`` wherever it is, see
        ``HistoricalCSVFeed._window``). Before the first :meth:`advance`.

        Raises:
            TypeError: no source, or bars were delivered already.
        """
        if self._source is None or self._count:
            raise TypeError("BarHashes.select: only over a source, before the first bar")
        self._rows = rows
        self._skip = 0

    def advance(self) -> None:
        """One more bar of ``source`` was delivered (its hash is not computed here)."""
        if self._source is None:
            raise TypeError("BarHashes without a source: call append(digest)")
        self._count += 1

    def extend(self, digests: Iterable[str]) -> None:
        for d in digests:
            self.append(d)

    def at(self, index: int) -> str | None:
        """Hash of absolute bar ``index``; ``None`` when out of range or evicted."""
        if index < 0 or index >= self._count:
            return None
        if self._source is not None:
            rows = self._rows
            return self._source[rows[index] if rows is not None else index + self._skip]
        maxlen = self._maxlen
        if not maxlen:
            return self._hashes[index]
        if index < self._count - maxlen:
            return None
        odd = self._odd.get(index)
        if odd is not None:
            return odd
        pos = (index % maxlen) * 16
        return self._ring[pos : pos + 16].hex()

    def take(self, indexes: Sequence[int]) -> list[str | None]:
        """:meth:`at` of each of ``indexes`` (absolute bar indexes), in one call. When every
        index is held, a source with its own ``take`` (a CSV file's
        :class:`~feeds.csv.reader.RowHashes`) or the unbounded list answers them together
        (FMEL's writer asks for a batch's bars at once: ``resolve_columns``)."""
        if not indexes:
            return []
        count, maxlen = self._count, self._maxlen
        if min(indexes) >= 0 and max(indexes) < count and not maxlen:
            source = self._source
            if source is None:
                return list(map(self._hashes.__getitem__, indexes))
            bulk = getattr(source, "take", None)
            if bulk is not None:
                rows, skip = self._rows, self._skip
                if rows is not None:
                    return list(bulk([rows[i] for i in indexes]))
                return list(bulk([i + skip for i in indexes] if skip else indexes))
        return list(map(self.at, indexes))

    def __len__(self) -> int:
        return self._count


# Nominal length in seconds of one bar of each of backtrader's timeframes
# (``backtrader/dataseries.py``: ``Ticks, MicroSeconds, Seconds, Minutes, Days, Weeks, Months,
# Years, NoTimeFrame = range(1, 10)``); a month counts 30.44 days, a year 365.25. A tick has no
# length (finer than any bar); ``NoTimeFrame`` is infinitely long.
_BAR_SECONDS = {
    1: 0.0,
    2: 1e-6,
    3: 1.0,
    4: 60.0,
    5: 86_400.0,
    6: 7 * 86_400.0,
    7: 30.44 * 86_400.0,
    8: 365.25 * 86_400.0,
    9: math.inf,
}


def bar_seconds(timeframe: int, compression: int, unknown: float | None = None) -> float:
    """Nominal length of a bar of backtrader's ``timeframe`` and ``compression``, seconds
    (``Minutes, 5`` -> 300.0; ``Seconds, 3600`` -> 3,600.0; ``Days, 1`` -> 86,400.0); used to
    order bar sizes and to size gaps. A compression below 1 counts as 1.

    Args:
        unknown: the length of a timeframe outside backtrader's (``None``, 0 for a feed that
            never set one); default: refused.

    Raises:
        ValueError: an unknown timeframe and no ``unknown`` length.
    """
    seconds = _BAR_SECONDS.get(int(timeframe or 0))
    if seconds is None:
        if unknown is None:
            raise ValueError(f"unknown backtrader timeframe {timeframe!r}")
        return unknown
    return seconds * max(1, int(compression or 1))


def delivery_size(data: Any) -> tuple[int, int]:
    """The bar size a backtrader feed delivers at, ``(timeframe, compression)`` (0 when
    unset). A replayed feed (``cerebro.replaydata``) delivers at its source's size, its
    parameters' ``timeframe``/``compression`` (backtrader's ``Resampler`` changes only the
    feed's ``_timeframe``/``_compression``), while declaring the replay's; any other feed at
    its declared size."""
    if getattr(data, "replaying", 0):
        p = getattr(data, "p", None)
        tf, comp = getattr(p, "timeframe", 0), getattr(p, "compression", 1)
    else:
        tf, comp = getattr(data, "_timeframe", 0), getattr(data, "_compression", 1)
    return int(tf or 0), max(int(comp or 1), 1)


def delivery_seconds(data: Any) -> float:
    """How often a backtrader feed delivers a bar, in seconds: :func:`bar_seconds` of
    :func:`delivery_size` (a feed without a timeframe counts as 0.0, as fine as ticks)."""
    return bar_seconds(*delivery_size(data), unknown=0.0)


def feed_symbol(data: Any) -> str:
    """The symbol (instrument) of a data feed: its ``symbol`` attribute; else, for a feed
    backtrader cloned from another (``cerebro.resampledata`` / ``replaydata``: a
    ``DataClone``, whose ``data`` is its source), its source's symbol; else its backtrader
    name; else ``"data"``.

    A clone's own name (``resampledata(d, name="GOOG_W")``) names the feed, not the
    instrument: an order on the weekly bars of GOOG is an order for GOOG. Two feeds may share
    a symbol; FMEL's records tell them apart (``analyzers.tracking.model.feed_labels``).
    """
    symbol = getattr(data, "symbol", None)
    if symbol:
        return str(symbol)
    if getattr(data, "_clone", False):
        source = getattr(data, "data", None)
        if source is not None and source is not data:
            return feed_symbol(source)
    return str(getattr(data, "_name", "") or "data")
