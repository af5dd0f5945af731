"""Progress of a study: trials done, best so far, ETA.

On a terminal (``PROGRESS=auto``) or with ``PROGRESS=on``: a tqdm bar on stderr
(``trials 37/390 ... <ETA> fold 2/13 best sharpe 1.41``); otherwise an INFO log line at every
10 % with the same facts and an ETA from the mean time per trial so far; ``PROGRESS=off``: nothing.

Thread context: main thread only.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Literal

logger = logging.getLogger(__name__)


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    """Counts finished trials against the planned total.

    Args:
        total: planned trials over all folds.
        folds: number of folds.
        metric: the objective's name (shown with the best value).
        mode: ``bar`` (tqdm), ``log`` (INFO lines every 10 %) or ``off``.
    """

    def __init__(
        self, total: int, *, folds: int, metric: str, mode: Literal["bar", "log", "off"]
    ) -> None:
        self.total = total
        self.folds = folds
        self.metric = metric
        self.mode = mode
        self.done = 0
        self.best: dict[int, float] = {}  # fold -> best objective so far
        self._t0 = time.perf_counter()
        self._next_pct = 10
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="trial", desc="trials", file=sys.stderr, mininterval=0.5
            )

    def best_text(self, fold: int) -> str:
        """``best sharpe 1.410`` (in ``fold``) or ``best sharpe n/a``."""
        best = self.best.get(fold)
        if best is None:
            return f"best {self.metric} n/a"
        value = -best if self.metric == "max_drawdown" else best  # shown as stored
        return f"best {self.metric} {value:.3f}"

    def update(self, *, fold: int, objective: float | None) -> None:
        """One trial of ``fold`` finished with this in-sample objective (higher is better)."""
        if objective is not None and objective > self.best.get(fold, float("-inf")):
            self.best[fold] = objective
        self.done += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"fold {fold + 1}/{self.folds} {self.best_text(fold)}")
            self._bar.update(1)
        elif self.mode == "log" and self.total:
            pct = self.done * 100 // self.total
            if pct >= self._next_pct:
                self._next_pct = pct - pct % 10 + 10
                elapsed = time.perf_counter() - self._t0
                eta = elapsed / self.done * (self.total - self.done)
                logger.info(
                    "trials %d/%d (%d%%), fold %d/%d, %s, ETA %s",
                    self.done,
                    self.total,
                    pct,
                    fold + 1,
                    self.folds,
                    self.best_text(fold),
                    _eta(eta),
                )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
