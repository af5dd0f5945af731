"""The backtrader side of the live input: one live feed per symbol, and bounded memory.

:class:`PubSubMarketDataFeed` is a ``bt.feed.DataBase`` fed by a
:class:`~feeds.pubsub.hub.BarHub`: ``_load()`` on the main thread takes one bar (waiting at most
backtrader's ``qcheck``) and fills OHLCV, the dynamic lines, the text fields and the data hash.
Each feed keeps ``lookback`` bars per line (backtrader's bounded ``QBuffer`` mode) and as many
hashes; :class:`LiveMemoryBound` bounds the strategy's own lines the same way, so memory stays
bounded however long the run.

Thread context: main thread only.
"""

from __future__ import annotations

import json
import math
from typing import Any

import backtrader as bt
from backtrader.linebuffer import LineBuffer

from core.bars import OHLCV, OPEN_INTEREST, BarHashes
from core.errors import ConfigError
from feeds.buffers import CompactLineBuffer
from feeds.fields import TextLine, dynamic_feed_class, refuse_aggregated_fields
from feeds.pubsub.config import FieldSet
from feeds.pubsub.hub import BarHub
from feeds.pubsub.messages import LiveBar

__all__ = ["LiveMemoryBound", "PubSubMarketDataFeed", "live_feed_class", "make_pubsub_feed"]


class PubSubMarketDataFeed(bt.feed.DataBase):  # type: ignore[misc]
    """A live backtrader feed of one symbol, fed by a :class:`BarHub`. Build it with
    :func:`make_pubsub_feed` (or :meth:`~feeds.pubsub.subscriber.PubSubBarSubscriber.make_feeds`),
    which adds the extra numeric fields as lines.

    ``islive()`` is True (backtrader then runs next-by-next without preloading). ``_load()``
    returns True with a bar, None when nothing is due yet (after waiting at most the ``qcheck``
    backtrader hands it), False once the input is closed and drained.

    Status notifications (``notify_data``): DELAYED from the start (also while CSV backfill bars
    play), LIVE with the first live bar and, after a reconnect, once bars flow again,
    DISCONNECTED while Pub/Sub is unreachable (the subscriber retries with jittered exponential
    backoff), CONNBROKEN when it gives up.

    Steps (:class:`~feeds.pubsub.hub.BarHub`): a feed delivers a bar in a step only when its bar
    of the step's time came in time; otherwise it keeps its previous bar (as a backtest feed
    whose file lacks that row) and :attr:`missed_step` is True during that step.

    Attributes:
        symbol: the symbol (part of every data hash).
        bar_hashes: data hash by absolute bar index (newest ``lookback`` kept).
        text_lines: text field name -> :class:`TextLine` (newest ``lookback`` kept).
        extra_fields: extra numeric line names.
        last_bar: the :class:`LiveBar` loaded last (message id, publish time...).
        missed_step: True while the current step has no bar of this feed (read it in
            ``next()``).

    Thread context: main thread only.

    Params:
        hub (BarHub): where bars come from.
        fields (FieldSet): extra fields (numeric ones must match the class's lines).
        lookback (int): bars kept per line, text field and hash history.
    """

    params = (("hub", None), ("fields", None), ("lookback", 5000))

    def __init__(self) -> None:
        self.symbol: str = self.p.name
        self._hub: BarHub = self.p.hub
        fields: FieldSet = self.p.fields or FieldSet()
        self.extra_fields = fields.numeric
        self.text_fields = fields.text
        self._lookback = int(self.p.lookback)
        self.bar_hashes = BarHashes(maxlen=self._lookback)
        self.text_lines: dict[str, TextLine] = {}
        self._new_text_lines()
        self.last_bar: LiveBar | None = None
        self.live_bars = 0
        self._master_num: float | None = None
        self._seen_epoch = 0
        self._was_live = False
        self._slots: list[tuple[Any, str]] = []

    def islive(self) -> bool:
        return True

    @property
    def missed_step(self) -> bool:
        """True while the step being served has no bar of this feed (it had none in time, or
        has delivered nothing yet)."""
        step = self._hub.current_step
        if step is None:
            return False
        # From the feed's own record, not its lines: reading a line here would count as an
        # agent read in FMEL.
        last = self.last_bar
        return last is None or last.dt_num < step

    def haslivedata(self) -> bool:
        return self._hub.has_ready(self.symbol)

    def start(self) -> None:
        super().start()
        refuse_aggregated_fields(
            self, self.symbol, tuple(self.extra_fields), tuple(self.text_fields)
        )
        self.bar_hashes = BarHashes(maxlen=self._lookback)
        self._new_text_lines()
        names = (*OHLCV, OPEN_INTEREST, *self.extra_fields)
        self._slots = [(getattr(self.lines, n), n) for n in names]
        self._seen_epoch = self._hub.epoch
        self._bound_lines()
        self.put_notification(self.DELAYED)

    def _new_text_lines(self) -> None:
        self.text_lines = {n: TextLine(self, n, maxlen=self._lookback) for n in self.text_fields}
        for name, text_line in self.text_lines.items():
            setattr(self, name, text_line)  # data.headline[0], like a line (as the CSV feed)

    def _bound_lines(self) -> None:
        # backtrader's own bounded mode (as with exactbars), at least `lookback` bars, in
        # arrays of floats (CompactLineBuffer) rather than deques of float objects.
        for line in self.lines:
            if type(line) is LineBuffer:
                line.__class__ = CompactLineBuffer
            if line.mode != LineBuffer.QBuffer:
                LineBuffer.qbuffer(line)
            line.minbuffer(self._lookback)

    def qbuffer(self, savemem: int = 0, replaying: bool = False) -> None:
        self._bound_lines()

    def next(self, datamaster: Any = None, ticks: bool = True) -> Any:
        if datamaster is None:
            self._master_num = None
            self._hub.begin_pass(id(self))
        else:
            self._master_num = float(datamaster.lines.datetime[0])
        return super().next(datamaster=datamaster, ticks=ticks)

    def _notify(self, status: int, *args: Any) -> None:
        if status != self._laststatus:
            self.put_notification(status, *args)

    def _apply_transitions(self) -> None:
        for epoch, status, detail in self._hub.transitions_since(self._seen_epoch):
            self._seen_epoch = epoch
            if status == "LIVE":
                self._notify(self.LIVE if self._was_live else self.DELAYED)
            elif status == "CONNECTED":
                continue  # reachable again, no bar yet: LIVE once bars flow
            elif status == "DISCONNECTED":
                self._notify(self.DISCONNECTED, detail)
            elif status == "CONNBROKEN":
                self._notify(self.CONNBROKEN, detail)

    def _load(self) -> bool | None:
        hub = self._hub
        if hub.epoch != self._seen_epoch:
            self._apply_transitions()
        bar = hub.take(self.symbol, self._qcheck, self._master_num)
        if bar is None:
            return False if hub.finished(self.symbol) else None
        lines = self.lines
        lines.datetime[0] = bar.dt_num
        values = bar.values
        for line, name in self._slots:
            v = values.get(name)
            line[0] = v if type(v) is float else math.nan
        for name, text_line in self.text_lines.items():
            tv = values.get(name)
            text_line.append(tv if tv is None or isinstance(tv, str) else json.dumps(tv))
        self.bar_hashes.append(bar.data_hash)
        self.last_bar = bar
        if bar.live:
            self.live_bars += 1
            if not self._was_live:
                self._was_live = True
            if self._laststatus == self.DELAYED and hub.status == "LIVE":
                self.put_notification(self.LIVE)
        return True


def live_feed_class(extra_fields: tuple[str, ...]) -> type:
    """A :class:`PubSubMarketDataFeed` subclass with ``extra_fields`` as lines (cached)."""
    return dynamic_feed_class(PubSubMarketDataFeed, extra_fields)


def make_pubsub_feed(
    hub: BarHub,
    symbol: str,
    fields: FieldSet | None = None,
    *,
    lookback: int = 5000,
    qcheck_s: float = 0.5,
    timeframe: int = bt.TimeFrame.Minutes,
    compression: int = 1,
) -> PubSubMarketDataFeed:
    """A live feed of ``symbol``; its backtrader name is the symbol. ``qcheck_s`` is the
    longest one backtrader step waits for a bar, seconds."""
    fields = fields or FieldSet()
    cls = live_feed_class(fields.numeric)
    feed: PubSubMarketDataFeed = cls(
        hub=hub,
        fields=fields,
        lookback=lookback,
        name=symbol,
        qcheck=qcheck_s,
        timeframe=timeframe,
        compression=compression,
    )
    return feed


class LiveMemoryBound(bt.Analyzer):  # type: ignore[misc]
    """Bounds the memory of a live run of any length: the strategy's own lines, indicators and
    observers use backtrader's bounded buffers (the ``exactbars=1`` scheme) with at least
    ``indicator_lookback`` bars; live feeds keep their own ``lookback``.

    Added by the runner in paper mode. Params: ``indicator_lookback`` (int, bars).
    """

    params = (("indicator_lookback", 64),)

    def start(self) -> None:
        floor = int(self.p.indicator_lookback)
        seen: set[int] = set()

        def bound(obj: Any) -> None:
            if id(obj) in seen or isinstance(obj, bt.AbstractDataBase):
                return
            seen.add(id(obj))
            for line in obj.lines:
                if isinstance(line, LineBuffer):
                    if line.mode != LineBuffer.QBuffer:
                        LineBuffer.qbuffer(line)
                    line.minbuffer(max(floor, line._minperiod))
            for children in getattr(obj, "_lineiterators", {}).values():
                for child in children:
                    bound(child)

        bound(self.strategy)
        _check_lookback(self.strategy)


def _check_lookback(strategy: Any) -> None:
    """Refuse a live feed that keeps fewer bars than an indicator over its lines needs.

    backtrader's own bounded mode (``exactbars``) grows a feed's buffers to its consumers'
    periods (``LineIterator.qbuffer``: ``data.minbuffer(self._minperiod)``); a live feed keeps
    its own ``lookback``, and an indicator with a longer window failed on its first bar, deep
    in backtrader (``ValueError: Indices for islice() must be None or an integer``).

    Raises:
        ConfigError: naming the feed, the indicator, the bars it needs and
            ``PUBSUB_LOOKBACK_BARS``.
    """
    seen: set[int] = set()
    stack: list[Any] = [strategy]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        for children in getattr(obj, "_lineiterators", {}).values():
            stack.extend(children)
        if obj is strategy:
            continue
        datas = list(getattr(obj, "datas", ()))
        # the bars it reads of its inputs at once (its period), not its warm-up over them:
        # CrossOver(d.close, SMA(d.close, 200)) starts at bar 201 and reads 2 bars
        start = max((int(getattr(d, "_minperiod", 1)) for d in datas), default=1)
        need = int(getattr(obj, "_minperiod", 1)) - start + 1
        for data in datas:
            feed = data if isinstance(data, PubSubMarketDataFeed) else None
            if feed is None:
                lines = getattr(data, "lines", None)
                line = lines[0] if lines is not None and len(lines) else data
                owner = getattr(line, "_owner", None)
                feed = owner if isinstance(owner, PubSubMarketDataFeed) else None
            if feed is not None and need > feed._lookback:
                raise ConfigError(
                    f"PUBSUB_LOOKBACK_BARS={feed._lookback}: the live feed {feed.symbol} keeps "
                    f"{feed._lookback} bars, and the agent's {type(obj).__name__} over it needs "
                    f"{need}; set PUBSUB_LOOKBACK_BARS to at least {need}"
                )
