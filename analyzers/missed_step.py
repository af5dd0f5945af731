"""The note of feeds that missed a step, recorded the same way in backtests and paper runs.

A feed missed the step when it has started (delivered a bar) and its latest bar is older than
the step's bar time: in a paper run its bar did not come within ``PUBSUB_ALIGN_WAIT_S``; in a
backtest its file lacks that row. A feed with no bar yet has not started (a stock listed later
than the others, a symbol whose first bar has not come), and a CSV feed at its file's last bar
has ended (``last_num``): neither is noted, nor is a feed of a coarser bar size than the
finest (an hourly feed beside 5-minute bars), nor a resampled or replayed feed (its source is
the one that can miss a bar). Feeds are named as FMEL records them (their
symbols; feeds that share one are told apart). The Runner adds :class:`MissedStepNote` in both
modes (before FMEL), so a paper run's decision records equal those of a backtest over files
that have the same gaps.

Thread context: main (backtrader) thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import backtrader as bt

from analyzers.fmel import attach_note
from analyzers.tracking.model import feed_labels
from core.bars import delivery_seconds

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


def missed_feeds(strategy: Any, feeds: Sequence[tuple[Any, str]] | None = None) -> list[str]:
    """Names (:func:`step_feeds`, in ``strategy.datas`` order) of the feeds that have started
    and not ended but have no bar at the step's time: ``len(data) > 0`` and
    ``data.datetime[0] < strategy.datetime[0]`` and ``data.datetime[0] < data.last_num`` when
    the feed knows its last bar (backtrader date numbers). None when no feed of
    :func:`step_feeds` has a bar at the step's time: a coarser feed alone made that step.

    Args:
        feeds: :func:`step_feeds` of the strategy's datas, computed once (default: now).
    """
    now = strategy.lines.datetime[0]
    out = []
    stepped = False  # a feed of the finest bar size has a bar at the step's time
    for d, name in step_feeds(strategy.datas) if feeds is None else feeds:
        if len(d):
            at = d.lines.datetime[0]
            if at == now:
                stepped = True
            elif at < now and at < getattr(d, "last_num", math.inf):
                out.append(name)
    # a step only a coarser feed made (a daily bar at its day's end beside hourly bars) was
    # missed by no one
    return out if stepped else []


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

    def _note(self) -> None:
        missed = missed_feeds(self.strategy, self._feeds)
        if missed:
            notes: dict[str, Any] = {MISSED_STEP_NOTE: missed}
            attach_note(self.strategy, **notes)

    def prenext(self) -> None:
        self._note()

    def nextstart(self) -> None:
        self._note()

    def next(self) -> None:
        self._note()
