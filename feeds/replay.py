"""Replay CSV bars to a Pub/Sub topic, as the live ingestor would publish them.

``python -m runtime.replay --topic T --csv FILE[:SYMBOL] ... [--speed X]`` (the entry point lives
in :mod:`runtime.replay`, which reads the environment and calls :func:`main` here).

* Every file is read and validated by :func:`feeds.csv.read_csv_bars` (same options as the
  backtest: ``--datetime-column``, ``--datetime-format``, ``--timezone``, ``--columns``), so each
  message carries the CSV feed's ``data_hash`` for that bar and the live feed verifies it.
* Bars of several symbols are interleaved in time order (ties by symbol).
* ``--speed 0`` (or ``max``, the default) publishes as fast as possible; ``--speed N`` plays N
  times real time (``--speed 60`` plays one-minute bars one per second). A paced replay has its
  own clock (the first bar's time plus N times the elapsed time): every message carries it as
  the attribute ``replay_clock`` (POSIX seconds), and the live feed refuses bars stamped
  further ahead of it than ``PUBSUB_MAX_FUTURE_S`` (``future_timestamp``), as it does against
  the wall clock live.
* Messages follow the contract of :mod:`feeds.pubsub.messages`: JSON body ``symbol``, ``timestamp``
  (ISO-8601 UTC), OHLCV, extra columns as extra fields, ``data_hash``; attribute ``symbol``; no
  ordering key (the live feed puts each symbol's bars in order itself; see docs/pubsub.md).
* The topic is created when missing. Project and emulator come from ``--project`` /
  ``--emulator-host``, else from the defaults the entry point passes to :func:`main` (the
  environment's ``GOOGLE_CLOUD_PROJECT`` and ``PUBSUB_EMULATOR_HOST``).
* Batches go out one request at a time, in order (:class:`feeds.pubsub.clients.OrderedPublisher`);
  a failed one is retried with :data:`PUBLISH_RETRY` (:class:`core.retry.RetryPolicy`).

A file with a bar time not on a whole millisecond is refused before anything is published: the
live feed would refuse those bars (``bad_timestamp``).

Prints one JSON line with what was published and exits 0; exits 2 on bad arguments or input,
1 when publishing failed after retries.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from core.bars import OHLCV
from core.errors import ConfigError, DataError, TransientError
from core.retry import RetryPolicy
from core.time import iso_utc
from feeds.csv import CSVBars, CSVFeedConfig, read_csv_bars
from feeds.pubsub.clients import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    OrderedPublisher,
    resource_path,
)
from feeds.pubsub.config import resource_name_problem
from feeds.pubsub.messages import REPLAY_CLOCK_ATTRIBUTE

logger = logging.getLogger(__name__)

# Publishing a batch: 6 attempts in all, waits of up to 0.2, 0.4, ... 5 s (full jitter).
PUBLISH_RETRY = RetryPolicy(attempts=6, initial_s=0.2, max_s=5.0)


@dataclass(slots=True)
class ReplayResult:
    """What a replay published.

    Attributes:
        published: messages published.
        per_symbol: messages per symbol.
        first_bar, last_bar: ISO-8601 UTC bar times (None when nothing was published).
        elapsed_s: wall time, seconds.
        retries: publish attempts repeated after an error.
    """

    published: int = 0
    per_symbol: Counter[str] = field(default_factory=Counter)
    first_bar: str | None = None
    last_bar: str | None = None
    elapsed_s: float = 0.0
    retries: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "published": self.published,
            "per_symbol": dict(self.per_symbol),
            "first_bar": self.first_bar,
            "last_bar": self.last_bar,
            "elapsed_s": round(self.elapsed_s, 3),
            "retries": self.retries,
        }


class BarMessage:
    """One message to publish: its body, symbol (attribute), bar time, data
    hash, and (paced replays) the replay's clock when it is published, POSIX seconds."""

    __slots__ = ("body", "data_hash", "replay_clock", "symbol", "ts")

    def __init__(self, symbol: str, ts: datetime, body: bytes, data_hash: str) -> None:
        self.symbol = symbol
        self.ts = ts
        self.body = body
        self.data_hash = data_hash
        self.replay_clock: float | None = None

    def attributes(self) -> dict[str, str]:
        """Message attributes: ``symbol``, and ``replay_clock`` when paced."""
        attrs = {"symbol": self.symbol}
        if self.replay_clock is not None:
            attrs[REPLAY_CLOCK_ATTRIBUTE] = f"{self.replay_clock:.3f}"
        return attrs


def _rows(bars: CSVBars) -> Iterator[tuple[datetime, str, int]]:
    stamps = pd.DatetimeIndex(bars.times).to_pydatetime()
    for i, ts in enumerate(stamps):
        yield ts, bars.symbol, i


def bar_messages(sources: Sequence[CSVBars]) -> Iterator[BarMessage]:
    """Messages of every bar of ``sources``, in time order (ties by symbol).

    The body holds the symbol, the timestamp, OHLCV (volume left out when the file has none),
    every extra column that has a value (numbers as JSON numbers, text as strings) and the CSV
    feed's ``data_hash``.
    """
    by_symbol = {b.symbol: b for b in sources}
    if len(by_symbol) != len(sources):
        raise ConfigError("replay: each symbol may be given once")
    columns = {
        b.symbol: ([(k, a.tolist()) for k, a in b.numeric.items()], list(b.text.items()))
        for b in sources
    }
    for ts, symbol, i in heapq.merge(*(_rows(b) for b in sources)):
        numeric, text = columns[symbol]
        doc: dict[str, Any] = {"symbol": symbol, "timestamp": iso_utc(ts)}
        for name, col in numeric:
            value = col[i]
            if not math.isnan(value):
                doc[name] = value
            elif name in OHLCV[:4]:  # cannot happen: read_csv_bars validated prices
                raise DataError(f"{symbol} {ts}: {name} is NaN")
        for name, tcol in text:
            if tcol[i] is not None:
                doc[name] = tcol[i]
        digest = by_symbol[symbol].hashes[i]
        doc["data_hash"] = digest
        body = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        yield BarMessage(symbol, ts, body, digest)


class PublishFailedError(TransientError):
    """A publish request failed (retried by :func:`publish`).

    Attributes:
        count: messages in the request.
    """

    def __init__(self, count: int, error: BaseException | None) -> None:
        super().__init__(f"{count} messages failed: {error}")
        self.count = count


class BatchPublisher(Protocol):
    """What :func:`publish` needs: :class:`feeds.pubsub.clients.OrderedPublisher` (or a fake)."""

    def publish_batch(
        self, topic_path: str, messages: Sequence[tuple[bytes, Mapping[str, str]]]
    ) -> list[str]: ...


def ensure_topic(publisher: Any, topic_path: str) -> bool:
    """Create the topic unless it exists. Returns True when it was created."""
    from google.api_core import exceptions as gexc

    try:
        publisher.create_topic(request={"name": topic_path})
    except gexc.AlreadyExists:
        return False
    logger.info("created topic %s", topic_path)
    return True


def publish(
    publisher: BatchPublisher,
    topic_path: str,
    messages: Iterator[BarMessage],
    *,
    speed: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    retry: RetryPolicy = PUBLISH_RETRY,
) -> ReplayResult:
    """Publish ``messages`` in order, paced by ``speed`` (0 = as fast as possible, N = N times
    real time measured on bar times).

    Messages go out in batches (at most :data:`~feeds.pubsub.clients.MAX_BATCH_MESSAGES` and
    :data:`~feeds.pubsub.clients.MAX_BATCH_BYTES`), one request at a time, each confirmed before
    the next, so Pub/Sub receives them in order without ordering keys. A failed batch is sent
    again as a whole, as ``retry`` allows (copies of a batch whose answer was lost are dropped
    by the live feed's de-duplication).

    Args:
        publisher: sends one batch per call.
        topic_path: ``projects/<p>/topics/<t>``.
        messages: what to publish, in order.
        speed: 0 = as fast as possible, N = N times real time.
        sleep, clock: pacing (seconds; tests pass a fake clock).
        retry: attempts and backoff of a failed batch.

    Raises:
        TransientError: when a batch could not be published after the retries.
    """
    result = ReplayResult()
    t0 = clock()
    first_ts: datetime | None = None
    chunk: list[BarMessage] = []
    chunk_bytes = 0

    def attempt(batch: list[BarMessage]) -> None:
        try:
            publisher.publish_batch(topic_path, [(m.body, m.attributes()) for m in batch])
        except Exception as e:
            raise PublishFailedError(len(batch), e) from e

    def on_retry(err: BaseException) -> None:
        count = err.count if isinstance(err, PublishFailedError) else 0
        result.retries += count
        logger.warning("%d messages failed (%s); retrying", count, err.__cause__)

    def flush() -> None:
        nonlocal chunk_bytes
        batch = list(chunk)
        chunk.clear()
        chunk_bytes = 0
        if batch:
            retry.call(
                f"publishing to {topic_path}",
                attempt,
                batch,
                retry_on=lambda e: isinstance(e, PublishFailedError),
                on_retry=on_retry,
            )
            result.published += len(batch)
            result.per_symbol.update(m.symbol for m in batch)

    for msg in messages:
        if first_ts is None:
            first_ts = msg.ts
            result.first_bar = iso_utc(msg.ts)
        result.last_bar = iso_utc(msg.ts)
        if speed > 0:
            due = t0 + (msg.ts - first_ts).total_seconds() / speed
            wait = due - clock()
            if wait > 0:
                flush()
                sleep(wait)
            # The replay's own clock now: bar times play N times faster than the wall clock.
            msg.replay_clock = first_ts.timestamp() + (clock() - t0) * speed
        else:
            msg.replay_clock = None
        size = len(msg.body) + 100
        if chunk and (len(chunk) >= MAX_BATCH_MESSAGES or chunk_bytes + size > MAX_BATCH_BYTES):
            flush()
        chunk.append(msg)
        chunk_bytes += size
    flush()
    result.elapsed_s = clock() - t0
    return result


def parse_source(spec: str) -> tuple[Path, str]:
    """``FILE[:SYMBOL]`` -> (path, symbol); the symbol defaults to the file's stem."""
    if Path(spec).is_file():
        return Path(spec), Path(spec).stem
    path_text, sep, symbol = spec.rpartition(":")
    if not sep or not symbol:
        path_text, symbol = spec, Path(spec).stem
    path = Path(path_text)
    if not path.is_file():
        raise ConfigError(f"--csv {spec}: no such file {path}")
    return path, symbol


def _speed(text: str) -> float:
    if text.lower() in ("max", "0", "inf"):
        return 0.0
    value = float(text)
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError("speed must be >= 0 (0 or max: as fast as possible)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runtime.replay", description=__doc__.split("\n")[0])
    p.add_argument("--topic", required=True, help="topic id or projects/<p>/topics/<t>")
    p.add_argument(
        "--csv",
        required=True,
        action="append",
        nargs="+",
        metavar="FILE[:SYMBOL]",
        help="CSV file and its symbol (default: the file name); repeatable",
    )
    p.add_argument(
        "--speed",
        type=_speed,
        default=0.0,
        help="0 or max: as fast as possible (default); N: N times real time",
    )
    p.add_argument("--project", help="GCP project (default: GOOGLE_CLOUD_PROJECT)")
    p.add_argument(
        "--emulator-host", help="Pub/Sub emulator host:port (default: PUBSUB_EMULATOR_HOST)"
    )
    p.add_argument(
        "--start",
        help="first bar time to publish (ISO date; without an offset, in --timezone), inclusive",
    )
    p.add_argument(
        "--end",
        help="last bar time to publish (ISO date, its whole day; without an offset, in "
        "--timezone), inclusive",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=0,
        help="publish at most this many bars per file (the first ones after --start)",
    )
    p.add_argument("--datetime-column", help="datetime column name or 0-based index")
    p.add_argument("--datetime-format", help="strftime format of the datetime column")
    p.add_argument("--timezone", default="UTC", help="IANA zone of naive timestamps")
    p.add_argument("--columns", help="JSON object mapping our names to the file's columns")
    p.add_argument("--log-level", default="INFO")
    return p


def _date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as e:
        raise ConfigError(f"expected an ISO date, got {text!r}") from e
    return dt  # without an offset: in --timezone (CSVFeedConfig places it)


def _refuse_sub_millisecond(bars: CSVBars, spec: str) -> None:
    """Refuse a file with a bar time not on a whole millisecond: the live feed refuses such a
    message (``bad_timestamp``, :func:`feeds.pubsub.messages.decode_message`), so a replay of
    it would publish bars every subscriber skips.

    Raises:
        ConfigError: naming the file and its first such bar.
    """
    ns = np.asarray(bars.times).astype("datetime64[ns]").view(np.int64)
    off = np.flatnonzero(ns % 1_000_000)
    if len(off):
        first = pd.Timestamp(int(ns[off[0]]))
        raise ConfigError(
            f"--csv {spec}: {len(off)} bar time(s) not on a whole millisecond, the first "
            f"{first.isoformat()} (bar {int(off[0]) + 1}); the live feed keeps bar times to "
            "the millisecond and would refuse them (bad_timestamp)"
        )


def load_sources(args: argparse.Namespace) -> list[CSVBars]:
    """Read every ``--csv`` file with the CSV feed's reader (trimmed to ``--limit``)."""
    dt_col: str | int | None = args.datetime_column
    if isinstance(dt_col, str) and dt_col.isdigit():
        dt_col = int(dt_col)
    columns = json.loads(args.columns) if args.columns else {}
    out = []
    for spec in (s for group in args.csv for s in group):
        path, symbol = parse_source(spec)
        cfg = CSVFeedConfig(
            path=path,
            symbol=symbol,
            datetime_column=dt_col,
            datetime_format=args.datetime_format,
            timezone=args.timezone,
            columns=columns,
            start=_date(args.start),
            end=_date(args.end),
        )
        bars = read_csv_bars(cfg)
        _refuse_sub_millisecond(bars, spec)
        if args.limit and len(bars) > args.limit:
            n = args.limit
            bars = dataclasses.replace(
                bars,
                times=bars.times[:n],
                numeric={k: a[:n] for k, a in bars.numeric.items()},
                text={k: v[:n] for k, v in bars.text.items()},
                hashes=bars.hashes[:n],
                lines=None if bars.lines is None else bars.lines[:n],
            )
        out.append(bars)
    return out


def main(
    argv: Sequence[str] | None = None,
    *,
    project: str | None = None,
    emulator_host: str | None = None,
) -> int:
    """CLI body (entry point: ``python -m runtime.replay``).

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).
        project: GCP project when ``--project`` is not given.
        emulator_host: Pub/Sub emulator ``host:port`` when ``--emulator-host`` is not given.

    Returns:
        The exit code: 0 done, 1 publishing failed, 2 bad arguments or input.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    project = args.project or project
    host = args.emulator_host or emulator_host
    try:
        if not project and not args.topic.startswith("projects/"):
            raise ConfigError("no project: pass --project or set GOOGLE_CLOUD_PROJECT")
        problem = resource_name_problem(args.topic, "topics")
        if problem:
            raise ConfigError(f"--topic: {problem}")
        sources = load_sources(args)
    except (ConfigError, DataError, ValueError) as e:
        logger.error("%s", e)
        return 2
    topic_path = resource_path(project, "topics", args.topic)
    publisher = OrderedPublisher(host)
    try:
        ensure_topic(publisher, topic_path)
        result = publish(publisher, topic_path, bar_messages(sources), speed=args.speed)
    except TransientError as e:
        logger.error("%s", e)
        return 1
    finally:
        publisher.stop()
    sys.stdout.write(json.dumps({"topic": topic_path, **result.as_dict()}) + "\n")
    return 0
