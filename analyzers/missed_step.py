"""The note of feeds that missed a step, recorded the same way in backtests and paper runs.

A feed missed the step when it has started (delivered a bar), its latest bar is older than
the step's bar time and the step is one of its own bar times: in a paper run its bar did not
come within ``PUBSUB_ALIGN_WAIT_S``; in a backtest its file lacks that row. A feed with no bar
yet has not started (a stock listed later than the others, a symbol whose first bar has not
come), and a feed at its last bar has ended (a CSV feed's ``last_num``; the last bar in the
buffer of a backtrader feed that is not live): neither is noted, nor
is a feed of a coarser bar size than the finest (an hourly feed beside 5-minute bars), nor a
resampled or replayed feed (its source is the one that can miss a bar). Feeds are named as
FMEL records them (their symbols; feeds that share one are told apart). The Runner adds
:class:`MissedStepNote` in both modes (before FMEL), so a paper run's decision records equal
those of a backtest over files that have the same gaps.

Thread context: main (backtrader) thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import backtrader as bt
from backtrader.linebuffer import LineBuffer

from analyzers.fmel import attach_note
from analyzers.tracking.model import feed_labels
from core.bars import bar_seconds, delivery_seconds, delivery_size

__all__ = ["MISSED_STEP_NOTE", "MissedStepNote", "missed_feeds", "step_feeds"]

# Key of the decision record's ``notes`` that lists the symbols that missed the step.
MISSED_STEP_NOTE = "feeds_missed_step"


def _derived(data: Any) -> bool:
    """Whether backtrader builds the feed's bars from another feed's: a resample or a replay
    (``cerebro.resampledata``/``replaydata``; backtrader's ``Resampler`` sets ``resampling``
    and ``replaying`` on the feed)."""
    return bool(getattr(data, "resampling", 0) or getattr(data, "replaying", 0))


def step_feeds(datas: Sequence[Any]) -> list[tuple[Any, str]]:
    """The feeds that can miss a step, each with the name the note gives it, in ``datas`` order.

    Only feeds that deliver bars of the finest size among ``datas``, compared as lengths
    in seconds (:func:`~core.bars.bar_seconds`: ``Seconds, 3600`` is coarser than
    ``Minutes, 5``): a weekly resample beside daily bars has no bar on most days by design,
    and does not miss them. A replayed feed delivers at its source's bar size whatever it
    declares. Resampled and replayed feeds are never noted themselves: their bars are built
    from another feed's (a resample of the same bar size delivers each bar one step late, by
    design), so that feed is the one that can miss a step. Each is named as FMEL records it
    (:func:`~analyzers.tracking.model.feed_labels`: its symbol; feeds that share one are
    told apart)."""
    labels = feed_labels(list(datas))
    finest = min((delivery_seconds(d) for d in datas), default=0.0)
    return [(d, labels[id(d)]) for d in datas if not _derived(d) and delivery_seconds(d) == finest]


# How far a step may be from a whole number of a feed's bar lengths after its latest bar and
# still be one of its bar times: a tenth of a millisecond, in backtrader's day numbers (they
# hold a time to ~10 us at today's dates; bars of two files 0.4 ms apart are on two phases:
# found by an attack, helper-66, with half a millisecond).
_TOLERANCE_DAYS = 0.0001 / 86_400.0


def _on_grid(data: Any, at: float, now: float) -> bool:
    """Whether the step at ``now`` is one of the times feed ``data`` has bars at, seen from its
    latest bar at ``at`` (backtrader day numbers): a whole number (at least one) of its bar
    lengths later, to a tenth of a millisecond; for months and years, the same day of the month (the
    1st to the 28th) and time of day a whole number of bars later. Feeds of no bar length
    (ticks) have no grid.

    A feed on another phase of the same bar size (stocks at :30 beside a coin at :00, daily
    bars stamped at 16:00 beside others at 17:00, dates at the end of their day beside
    midnights) is never on the others' steps. Not covered (not noted): days of 23 or 25 hours
    of a feed stamped in local time, months stamped at their last day (28-31)."""
    tf, comp = delivery_size(data)  # a replay: its source's bar size
    if tf in (bt.TimeFrame.Months, bt.TimeFrame.Years):
        then, step = bt.num2date(at), bt.num2date(now)
        months = (step.year - then.year) * 12 + step.month - then.month
        per_bar = comp * (12 if tf == bt.TimeFrame.Years else 1)
        return (  # a day every month has (a bar dated by its month's end varies: no grid)
            then.day <= 28
            and months >= per_bar
            and months % per_bar == 0
            and (step.day, step.time()) == (then.day, then.time())
        )
    length = bar_seconds(tf, comp, unknown=0.0) / 86_400.0
    if not 0.0 < length < math.inf:
        return False
    bars = round((now - at) / length)
    return bars >= 1 and abs(now - at - bars * length) <= _TOLERANCE_DAYS


def _pacers(datas: Sequence[Any]) -> list[Any]:
    """The feeds whose bars make the steps a feed of :func:`step_feeds` can miss: every feed
    (resampled and replayed ones too) that delivers at the finest bar size."""
    finest = min((delivery_seconds(d) for d in datas), default=0.0)
    return [d for d in datas if delivery_seconds(d) == finest]


def missed_feeds(
    strategy: Any,
    feeds: Sequence[tuple[Any, str]] | None = None,
    pacers: Sequence[Any] | None = None,
) -> list[str]:
    """Names (:func:`step_feeds`, in ``strategy.datas`` order) of the feeds that have started
    and not ended but missed the step's bar: ``len(data) > 0``, not at its last bar
    (:func:`_ended`), and the step's time is one of the feed's
    own bar times (:func:`_on_grid`: a feed on another phase of the same bar size, stocks at
    :30 beside a coin at :00, missed nothing).
    None when no feed of the finest bar size (:func:`_pacers`, resampled and replayed ones
    too) has a bar at the step's time: a coarser feed alone made that step. Backtrader date
    numbers (days).

    Args:
        feeds: :func:`step_feeds` of the strategy's datas, computed once (default: now).
        pacers: :func:`_pacers` of the strategy's datas, computed once (default: now).
    """
    now = strategy.lines.datetime[0]
    if pacers is None:
        pacers = _pacers(strategy.datas)
    if not any(len(d) and d.lines.datetime[0] == now for d in pacers):
        return []
    out = []
    for d, name in step_feeds(strategy.datas) if feeds is None else feeds:
        if len(d):
            at = d.lines.datetime[0]
            if at < now and not _ended(d, at) and _on_grid(d, at, now):
                out.append(name)
    return out


def _ended(data: Any, at: float) -> bool:
    """Whether feed ``data``, at its bar of time ``at``, has delivered its last bar: our feeds
    know their last bar time (``last_num``); a backtrader feed that is not live and keeps its
    whole buffer has loaded ahead every bar it still has (``preload``, or the one bar
    backtrader loads and rewinds when it is not yet due, ``Cerebro._runnext``), so its last bar
    is the buffer's. Found by an attack (helper-66): a ``PandasData`` or ``GenericCSVData``
    that ended was noted at every later step. A bounded buffer (``exactbars``) cannot tell."""
    last = getattr(data, "last_num", None)
    if last is not None:
        return bool(at >= last)
    line = data.lines.datetime
    if getattr(line, "mode", None) != LineBuffer.UnBounded or data.islive():
        return False
    return bool(len(data) >= line.buflen())


class MissedStepNote(bt.Analyzer):  # type: ignore[misc]
    """Notes, in the decision record of each step (``notes[MISSED_STEP_NOTE]``), the symbols
    whose feed has no bar at the step's time: their bar did not come in time (live) or the file
    lacks it (backtest). The same rule in both modes, so a paper run's records equal those of a
    backtest that sees the same gaps. The agent reads the same as ``data.missed_step`` (live
    feeds) or ``len``/``datetime`` of its datas.

    Must be added before the FMEL analyzer (analyzers run in the order they were added).
    Thread context: main thread.
    """

    def start(self) -> None:
        self._feeds = step_feeds(self.strategy.datas)
        self._pacers = _pacers(self.strategy.datas)

    def _note(self) -> None:
        missed = missed_feeds(self.strategy, self._feeds, self._pacers)
        if missed:
            notes: dict[str, Any] = {MISSED_STEP_NOTE: missed}
            attach_note(self.strategy, **notes)

    def prenext(self) -> None:
        self._note()

    def nextstart(self) -> None:
        self._note()

    def next(self) -> None:
        self._note()
