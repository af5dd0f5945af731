"""Configuration of the live Pub/Sub feed: the run's settings, the subscriber's tuning, the fields.

* :class:`PubSubFeedConfig`: what ``PUBSUB_*`` sets (declared here with
  :func:`core.settings.setting`; ``runtime.config`` builds it from the environment).
* :class:`StreamSettings`: tuning of the subscriber (probe period, reconnect backoff, flow
  control); not read from the environment, tests shorten the periods.
* :class:`FieldSet` and :func:`parse_declared_fields`: a feed's extra fields (``PUBSUB_FIELDS``).

Pure: no I/O, nothing of ours but :mod:`core`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from core.bars import OHLCV, OPEN_INTEREST, bar_seconds, field_name
from core.errors import ConfigError
from core.retry import RetryPolicy
from core.settings import setting
from feeds.fields import reserved_reason
from feeds.pubsub.clients import resource_path

__all__ = [
    "MAX_MESSAGE_BYTES",
    "RECONNECT_BACKOFF",
    "FieldSet",
    "PubSubFeedConfig",
    "StreamSettings",
    "live_bar_size",
    "parse_declared_fields",
    "resource_name_problem",
]

# Pub/Sub's limit on one published message (data plus attributes), bytes
# (https://cloud.google.com/pubsub/quotas#resource_limits: "Message size ... 10 MB").
MAX_MESSAGE_BYTES = 10 * 1000 * 1000

# Attributes of feeds.pubsub.feed.PubSubMarketDataFeed beyond backtrader's own (which
# feeds.fields.reserved_reason covers): a field may not take their names.
# tests/unit/test_pubsub_decoder.py checks that this list is complete.
FEED_ATTRIBUTES = frozenset({"last_bar", "live_bars", "missed_step", "text_fields"})


@dataclass(frozen=True, slots=True, kw_only=True)
class PubSubFeedConfig:
    """Live Pub/Sub bars.

    Attributes:
        project: GCP project of the topics and the subscription.
        topics: topic ids or full paths.
        subscription_prefix: the runner creates or reuses ``<prefix>-<deployment>`` (one per
            deployment and topic; the deployment is ``AGENT_ID``, else the agent class name), so
            a restarted runner goes on from the bars it had not acknowledged.
        subscription: use this existing subscription (id or path) instead (never deleted).
        delete_subscription: delete the created subscription at a clean exit (its backlog is
            lost; by default it is kept for the next start and expires after
            ``subscription_ttl_s`` idle).
        emulator_host: ``host:port`` of a Pub/Sub emulator (``PUBSUB_EMULATOR_HOST``, set by
            the loader); ``None`` = Google's endpoint.
        qcheck_s: longest ``_load()`` blocks waiting for a bar, seconds (backtrader's qcheck).
        max_buffered_bars: bars buffered per symbol; pulling waits beyond that.
        fields: extra fields declared up front; empty = discovered from the first messages.
        discovery_s: start-up window for field discovery, seconds.
        backfill_bars: CSV bars loaded before going live (indicator warm-up).
        lookback_bars: bars kept in memory per live line.
        subscription_ttl_s: expiration policy of created subscriptions, seconds (>= 86400 on GCP).
        idle_timeout_s: end the run after this long without a bar; 0 = run until stopped.
        align_wait_s: longest a step waits, from the first bar of its time, for the other
            symbols' bars of that time (so the agent sees them in one step, as in a backtest),
            seconds; 0 = never wait. A bar that comes after its step was served is refused as
            ``late_bar`` (see :class:`~feeds.pubsub.hub.BarHub`).
        max_future_s: a bar stamped further ahead of the clock than this is refused as
            ``future_timestamp``, seconds (the clock: wall time, or a replay's own clock, see
            :mod:`feeds.pubsub.messages`).
        bar_size: size of the live bars (``1s``, ``1min``, ``1d``...); empty = the backfill
            file's, else inferred from the bars (gaps are counted in bar sizes).
        gap_max_s: a jump between two bars of a symbol longer than this is a market close,
            not missing bars, seconds; 0 = every jump counts (daily bars skip weekends anyway).
        gap_hold_s: for this long after a (re)connect, a step that would leave bar times
            missing after the last one decided waits for them (Pub/Sub redelivers what a dead
            runner or a broken connection had pulled one lease later), seconds; 0 = never.
            Needs a known bar size (``bar_size`` or the backfill file's).
    """

    project: str  # GOOGLE_CLOUD_PROJECT, declared once on runtime.config.GCPConfig
    topics: tuple[str, ...] = setting(
        (),
        env="PUBSUB_TOPIC",
        help="topic(s) of live bars, comma list; short names or projects/<p>/topics/<t>",
    )
    subscription_prefix: str = setting(
        "bt-runner",
        env="PUBSUB_SUBSCRIPTION_PREFIX",
        help="the runner's subscription is <prefix>-<AGENT_ID or agent class>, stable across "
        "restarts",
    )
    subscription: str | None = setting(
        None,
        env="PUBSUB_SUBSCRIPTION",
        help="use this existing subscription instead of <prefix>-<agent> (never deleted)",
    )
    delete_subscription: bool = setting(
        False,
        env="PUBSUB_DELETE_SUBSCRIPTION",
        help="delete the runner's subscription at a clean exit (its backlog is lost)",
    )
    emulator_host: str | None = None
    qcheck_s: float = setting(
        0.5,
        env="PUBSUB_QCHECK_S",
        help="longest the feed blocks waiting for a bar, seconds",
        gt=0,
    )
    max_buffered_bars: int = setting(
        10_000,
        env="PUBSUB_MAX_BUFFERED_BARS",
        help="bars buffered per symbol before pulling waits (back-pressure)",
        minimum=1,
    )
    fields: tuple[str, ...] = setting(
        (),
        env="PUBSUB_FIELDS",
        help="comma list of extra fields to expect, name or name:text "
        "(else discovered from each symbol's first message)",
    )
    discovery_s: float = setting(
        5.0,
        env="PUBSUB_DISCOVERY_S",
        help="start-up window to discover extra fields, seconds",
        minimum=0,
    )
    backfill_bars: int = setting(
        0,
        env="PUBSUB_BACKFILL_BARS",
        help="bars of CSV history loaded before going live",
        minimum=0,
    )
    lookback_bars: int = setting(
        5_000,
        env="PUBSUB_LOOKBACK_BARS",
        help="bars kept in memory per live line (bounded)",
        minimum=1,
    )
    subscription_ttl_s: int = setting(
        86_400,
        env="PUBSUB_SUBSCRIPTION_TTL_S",
        help="subscription expires after this idle time, s",
        minimum=86_400,
    )
    idle_timeout_s: float = setting(
        0.0,
        env="PUBSUB_IDLE_TIMEOUT_S",
        help=(
            "stop the live run after this long with no bar, counted from the first bar (0: "
            "never; a run that never gets a bar waits for SIGTERM)"
        ),
        minimum=0,
    )
    align_wait_s: float = setting(
        1.0,
        env="PUBSUB_ALIGN_WAIT_S",
        help="longest a bar waits for the other symbols' bars of the "
        "same time before it is delivered alone, seconds (0: never wait)",
        minimum=0,
    )
    max_future_s: float = setting(
        5.0,
        env="PUBSUB_MAX_FUTURE_S",
        help="refuse bars stamped further ahead of the clock than this, seconds",
        minimum=0,
    )
    bar_size: str = setting(
        "",
        env="PUBSUB_BAR_SIZE",
        help="live bar size, e.g. 1s, 1min, 1d (default: the backfill file's, else inferred)",
    )
    gap_max_s: float = setting(
        0.0,
        env="PUBSUB_GAP_MAX_S",
        help="a longer jump between two bars of a symbol is a market close, not missing "
        "bars, seconds (0: every jump counts)",
        minimum=0,
    )
    gap_hold_s: float = setting(
        30.0,
        env="PUBSUB_GAP_HOLD_S",
        help="after a (re)connect, how long a step that would leave bar times missing waits "
        "for them to be redelivered, seconds (0: never; needs a known bar size)",
        minimum=0,
    )

    def __post_init__(self) -> None:
        if not self.topics:
            raise ConfigError("PUBSUB_TOPIC is required in MODE=paper: expected a topic name")
        if self.qcheck_s <= 0:
            raise ConfigError(f"PUBSUB_QCHECK_S must be > 0, got {self.qcheck_s}")
        if self.max_buffered_bars < 1:
            raise ConfigError(
                f"PUBSUB_MAX_BUFFERED_BARS must be >= 1, got {self.max_buffered_bars}"
            )
        if self.lookback_bars < 1:
            raise ConfigError(f"PUBSUB_LOOKBACK_BARS must be >= 1, got {self.lookback_bars}")
        if self.align_wait_s < 0:
            raise ConfigError(f"PUBSUB_ALIGN_WAIT_S must be >= 0, got {self.align_wait_s}")
        if not self.max_future_s >= 0:
            raise ConfigError(f"PUBSUB_MAX_FUTURE_S must be >= 0, got {self.max_future_s}")
        if not self.gap_max_s >= 0:
            raise ConfigError(f"PUBSUB_GAP_MAX_S must be >= 0, got {self.gap_max_s}")
        paths: dict[str, str] = {}
        for topic in self.topics:
            problem = resource_name_problem(topic, "topics")
            if problem:
                raise ConfigError(f"PUBSUB_TOPIC: {problem}")
            # the path the subscriber uses: one topic named twice would get two
            # subscriptions and two pullers, every bar delivered twice
            path = resource_path(self.project, "topics", topic)
            if path in paths:
                raise ConfigError(
                    f"PUBSUB_TOPIC: {paths[path]!r} and {topic!r} are the same topic {path}; "
                    "give each topic once"
                )
            paths[path] = topic
        if self.subscription:
            problem = resource_name_problem(self.subscription, "subscriptions")
            if problem:
                raise ConfigError(f"PUBSUB_SUBSCRIPTION: {problem}")
        if self.bar_size:
            live_bar_size(self.bar_size)  # raises ConfigError naming PUBSUB_BAR_SIZE
        for spec in self.fields:
            name, _, kind = spec.partition(":")
            if not name.strip() or kind.strip().lower() not in ("", "number", "text"):
                raise ConfigError(
                    f"PUBSUB_FIELDS: {spec!r}: expected name, name:number or name:text"
                )


# Waits between attempts while Pub/Sub is unreachable: up to 0.25, 0.5, 1, 2, 2... s (full
# jitter). Capped low so a server that is back is used within about two seconds (bars published
# to a server that lost the subscription before it exists again are gone: that wait is a gap).
RECONNECT_BACKOFF = RetryPolicy(initial_s=0.25, max_s=2.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamSettings:
    """Tuning of the subscriber; the defaults suit production, tests shorten the periods.

    Attributes:
        pull_timeout_s: deadline of one Pull request, seconds (an idle long poll returns
            empty before it; a stop is noticed within it).
        probe_timeout_s: timeout of the probe that tells an idle poll from an outage, and of a
            lease extension, seconds.
        reconnect: backoff between attempts while Pub/Sub is unreachable
            (:meth:`core.retry.RetryPolicy.delay_s`: full jitter, from ``initial_s`` up to
            ``max_s`` seconds); retried until stopped, so ``attempts`` is not used.
        ack_deadline_s: ack deadline of created subscriptions: the first lease of a pulled
            message, seconds (10..600).
        lease_extension_s: each lease extension, seconds (10..600; renewed every third of
            it): what a runner that died had pulled is redelivered about this long later.
        redelivery_margin_s: after a (re)connect to a subscription that may hold redeliveries,
            steps wait ``lease_extension_s + redelivery_margin_s`` seconds, so an older bar
            still on its way is not overtaken by newer ones (:meth:`BarHub.hold_steps`).
        backlog_quiet_s: ...and then until bars have come in order for this long, seconds
            (also after any bar came out of order).
        max_outstanding_messages: flow control: messages pulled and not settled (leased)
            before pulling pauses (back-pressure reaches Pub/Sub here); the subscriber raises
            it to ``4 * symbols`` so that a whole bar time of every symbol fits while earlier
            bars wait for their decision to be on disk.
        max_message_bytes: a larger message is refused as ``oversized`` before decoding.
        dedup_message_ids: message ids remembered for de-duplication.
        dedup_times_per_symbol: bar times remembered per symbol for de-duplication (a copy
            of an older bar is refused as ``stale_timestamp`` instead); memory is about
            100 bytes per entry per symbol.
        admin_timeout_s: timeout of create/delete/acknowledge calls, seconds.
    """

    pull_timeout_s: float = 5.0
    probe_timeout_s: float = 2.0
    reconnect: RetryPolicy = RECONNECT_BACKOFF
    ack_deadline_s: int = 10
    lease_extension_s: int = 10
    redelivery_margin_s: float = 5.0
    backlog_quiet_s: float = 15.0
    max_outstanding_messages: int = 1000
    max_message_bytes: int = MAX_MESSAGE_BYTES
    dedup_message_ids: int = 100_000
    dedup_times_per_symbol: int = 128
    admin_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.pull_timeout_s <= 0 or self.probe_timeout_s <= 0:
            raise ConfigError("StreamSettings: pull_timeout_s and probe_timeout_s must be > 0")
        if not 10 <= self.ack_deadline_s <= 600:
            raise ConfigError(
                f"StreamSettings: ack_deadline_s must be 10..600, got {self.ack_deadline_s}"
            )
        if not 10 <= self.lease_extension_s <= 600:
            raise ConfigError(
                f"StreamSettings: lease_extension_s must be 10..600, got {self.lease_extension_s}"
            )


@dataclass(frozen=True, slots=True)
class FieldSet:
    """Extra fields of a feed: numeric ones become lines, text ones
    :class:`~feeds.fields.TextLine` s."""

    numeric: tuple[str, ...] = ()
    text: tuple[str, ...] = ()

    def union(self, other: FieldSet) -> FieldSet:
        """Both sets, in order; a name keeps the kind it has in ``self``."""
        have = set(self.numeric) | set(self.text)
        numeric = self.numeric + tuple(n for n in other.numeric if n not in have)
        text = self.text + tuple(n for n in other.text if n not in have)
        return FieldSet(numeric, text)

    def kind(self, name: str) -> str | None:
        """``"number"``, ``"text"``, or ``None`` when ``name`` is not in the set."""
        if name in self.numeric:
            return "number"
        if name in self.text:
            return "text"
        return None

    def __bool__(self) -> bool:
        return bool(self.numeric or self.text)


def parse_declared_fields(specs: Iterable[str]) -> FieldSet:
    """``("sentiment", "headline:text", "latest_news.relevance:number")`` -> a FieldSet.

    Names are normalised like CSV columns (:func:`core.bars.field_name`).

    Raises:
        ConfigError: on a bad kind, a reserved name, or one field given two kinds.
    """
    numeric: list[str] = []
    text: list[str] = []
    seen: list[str] = []
    for spec in specs:
        raw, _, kind = spec.partition(":")
        try:
            name = field_name(raw)
        except ValueError as e:
            raise ConfigError(f"PUBSUB_FIELDS: {spec!r}: {e}") from e
        if name in OHLCV or name == OPEN_INTEREST:
            # dropped without a word before (a fresh-context attack: volume:text asked for
            # volume as text, and the run went on with OHLCV only)
            raise ConfigError(
                f"PUBSUB_FIELDS: {spec!r} is {name!r}, one of backtrader's own lines (open, "
                "high, low, close, volume, openinterest), which every feed has: declare only "
                "extra fields"
            )
        why = reserved_reason(name) or (
            "an attribute of the live feed" if name in FEED_ATTRIBUTES else None
        )
        if why is not None:
            raise ConfigError(f"PUBSUB_FIELDS: {spec!r} would become {name!r}, which is {why}")
        kind = kind.strip().lower() or "number"
        if kind not in ("number", "text"):
            raise ConfigError(f"PUBSUB_FIELDS: {spec!r}: kind must be number or text")
        target = text if kind == "text" else numeric
        other = numeric if kind == "text" else text
        if name in other:
            # "a:number,A:text" are one field (names are normalised): its kind is not clear
            # (the first was kept without a word: a fresh-context attack)
            first = next(x for x in seen if field_name(x.partition(":")[0]) == name)
            raise ConfigError(
                f"PUBSUB_FIELDS: {first!r} and {spec!r} are the same field {name!r} with two "
                "kinds; give it once"
            )
        if name not in target:
            target.append(name)
        seen.append(spec)
    return FieldSet(tuple(numeric), tuple(text))


# Topic and subscription ids (Pub/Sub API reference, google.pubsub.v1.Topic.name and
# Subscription.name): start with a letter; letters, digits and - _ . ~ + %; 3 to 255 characters;
# not starting with "goog".
_RESOURCE_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9\-_.~+%]{2,254}")


def resource_name_problem(name: str, kind: str) -> str | None:
    """What is wrong with a topic or subscription name, or None when it is valid.

    Args:
        name: a short id (``"bars"``) or a full path (``"projects/p/topics/bars"``).
        kind: ``"topics"`` or ``"subscriptions"``.

    Returns:
        A sentence naming the problem (for a :class:`ConfigError`), or None.
    """
    ident = name
    if name.startswith("projects/"):
        parts = name.split("/")
        if len(parts) != 4 or parts[2] != kind or not parts[1] or not parts[3]:
            return f"{name!r} is not a path of the form projects/<project>/{kind}/<id>"
        ident = parts[3]
    if not _RESOURCE_ID_RE.fullmatch(ident) or ident.lower().startswith("goog"):
        return (
            f"{ident!r} is not a valid Pub/Sub id: it must start with a letter, hold only "
            "letters, digits and - _ . ~ + %, be 3 to 255 characters long and not start "
            "with 'goog'"
        )
    return None


def live_bar_size(text: str) -> tuple[int, int, float]:
    """``PUBSUB_BAR_SIZE`` text -> ``(bt timeframe, compression, seconds)``.

    Uses the CSV feed's rule (:func:`feeds.csv.reader.parse_bar_size`: ``30s``, ``1min``, ``1h``,
    ``1d``, ``1w``, ``1mo``); a month counts 30.44 days.

    Raises:
        ConfigError: naming ``PUBSUB_BAR_SIZE``.
    """
    from feeds.csv.reader import parse_bar_size

    try:
        timeframe, compression = parse_bar_size(text)
    except ValueError as e:
        raise ConfigError(f"PUBSUB_BAR_SIZE: {e}") from e
    return timeframe, compression, bar_seconds(timeframe, compression)
