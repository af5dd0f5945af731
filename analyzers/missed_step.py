"""The note of feeds that missed a step, recorded the same way in backtests and paper runs.

A feed missed the step when it has started (delivered a bar) and its latest bar is older than
the step's bar time: in a paper run its bar did not come within ``PUBSUB_ALIGN_WAIT_S``; in a
backtest its file lacks that row. A feed with no bar yet has not started (a stock listed later
than the others, a symbol whose first bar has not come), and a CSV feed at its file's last bar
has ended (``last_num``): neither is noted, and neither is a feed of a coarser bar size than
the finest (a weekly resample beside daily bars). Feeds are named as FMEL records them (their
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

__all__ = ["MISSED_STEP_NOTE", "MissedStepNote", "missed_feeds", "step_feeds"]

# Key of the decision record's ``notes`` that lists the symbols that missed the step.
MISSED_STEP_NOTE = "feeds_missed_step"


def step_feeds(datas: Sequence[Any]) -> list[tuple[Any, str]]:
    """The feeds that can miss a step, each with the name the note gives it, in ``datas`` order.

    Only feeds of the finest bar size among ``datas`` (backtrader's ``(timeframe,
    compression)``): a weekly resample beside daily bars has no bar on most days by design,
    and does not miss them. Each is named as FMEL records it
    (:func:`~analyzers.tracking.model.feed_labels`: its symbol; feeds that share one are
    told apart)."""
    labels = feed_labels(list(datas))

    def size(d: Any) -> tuple[int, int]:
        return (int(getattr(d, "_timeframe", 0) or 0), int(getattr(d, "_compression", 1) or 1))

    finest = min((size(d) for d in datas), default=(0, 1))
    return [(d, labels[id(d)]) for d in datas if size(d) == finest]


def missed_feeds(strategy: Any, feeds: Sequence[tuple[Any, str]] | None = None) -> list[str]:
    """Names (:func:`step_feeds`, in ``strategy.datas`` order) of the feeds that have started
    and not ended but have no bar at the step's time: ``len(data) > 0`` and
    ``data.datetime[0] < strategy.datetime[0]`` and ``data.datetime[0] < data.last_num`` when
    the feed knows its last bar (backtrader date numbers).

    Args:
        feeds: :func:`step_feeds` of the strategy's datas, computed once (default: now).
    """
    now = strategy.lines.datetime[0]
    out = []
    for d, name in step_feeds(strategy.datas) if feeds is None else feeds:
        if len(d):
            at = d.lines.datetime[0]
            if at < now and at < getattr(d, "last_num", math.inf):
                out.append(name)
    return out


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
