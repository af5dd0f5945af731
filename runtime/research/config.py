"""Settings of ``MODE=optimize``: :class:`OptimizeConfig` (declared with :func:`setting`).

The search space and the walk-forward windows arrive as JSON objects; they are parsed (and any
mistake reported naming the variable) at construction, so a bad value fails at start with
:class:`~core.errors.ConfigError` before a single trial runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from core.errors import ConfigError
from core.settings import setting
from runtime.research.folds import WalkForward, parse_walk_forward
from runtime.research.space import Space, parse_space

Metric = Literal["sharpe", "sortino", "calmar", "return", "max_drawdown"]
METRICS: tuple[str, ...] = ("sharpe", "sortino", "calmar", "return", "max_drawdown")
# the largest seed numpy takes (Optuna's samplers seed numpy): 2**32 - 1
MAX_SEED = 2**32 - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class OptimizeConfig:
    """A parameter search over the agent's params, optionally walk-forward.

    Attributes:
        space: agent param -> a list of values, a constant, or a range object
            ``{"low": 30, "high": 120, "step": 10}`` (``"log": true`` for sampled search);
            see :mod:`runtime.research.space`.
        sampler: ``grid`` (every point), ``tpe`` or ``random`` (Optuna samplers).
        trials: trials per fold for ``tpe``/``random``; ignored by ``grid``.
        metric: the in-sample objective; ``max_drawdown`` is minimised, the others maximised.
        walk_forward: ``{"train": "2y", "test": "6m"}`` plus optional ``"step"`` (default
            ``test``) and ``"anchored"`` (default false); empty: one in-sample fold over the
            whole data. See :mod:`runtime.research.folds`.
        record: whose decisions FMEL records: ``best`` (re-run each fold's best params with FMEL
            on), ``all`` (every trial) or ``none``.
        workers: parallel trials; 0 = one per CPU core (process pool) or per CPU of the Ray
            cluster; 1 = sequential in the runner's own process.
        seed: seed of the Optuna samplers (fold ``k`` uses ``seed + k``).
        pruner: ``median`` stops a sampled trial early when its running in-sample objective
            falls below the median of earlier trials at the same point (Optuna's
            ``MedianPruner``); ``none`` never prunes. Grid search never prunes.
        ray_address: run the trials on this Ray cluster (``ray://host:10001``, ``host:6379``,
            ``auto`` or ``local``); ``None`` = a local process pool.
    """

    space: Mapping[str, Any] = setting(
        default_factory=dict,
        env="OPTIMIZE_SPACE",
        help='MODE=optimize: JSON object, agent param -> list of values or {"low", "high", '
        '"step", "log"}, e.g. {"fast": [5, 10, 20], "slow": {"low": 30, "high": 120, '
        '"step": 10}}',
        default_text="",
    )
    sampler: Literal["grid", "tpe", "random"] = setting(
        "grid", env="OPTIMIZE_SAMPLER", help="grid (every point), tpe or random (Optuna samplers)"
    )
    trials: int = setting(
        50,
        env="OPTIMIZE_TRIALS",
        help="trials per walk-forward fold for OPTIMIZE_SAMPLER=tpe or random",
        minimum=1,
    )
    metric: Metric = setting(
        "sharpe",
        env="OPTIMIZE_METRIC",
        help="in-sample objective: sharpe, sortino, calmar, return (maximised) or max_drawdown "
        "(minimised)",
    )
    walk_forward: Mapping[str, Any] = setting(
        default_factory=dict,
        env="WALK_FORWARD",
        help='walk-forward windows, e.g. {"train": "2y", "test": "6m"} (+ "step", "anchored"); '
        "unset: one in-sample fold",
        default_text="",
    )
    record: Literal["best", "all", "none"] = setting(
        "best",
        env="OPTIMIZE_RECORD",
        help="whose decisions FMEL records: best (each fold's best params, re-run), all, none",
    )
    workers: int = setting(
        0,
        env="OPTIMIZE_WORKERS",
        help="parallel trials; 0: one per core (or per Ray CPU); 1: sequential",
        minimum=0,
    )
    seed: int = setting(
        0,
        env="OPTIMIZE_SEED",
        help="seed of the tpe/random samplers (fold k uses seed + k), 0 to 2**32 - 1",
        minimum=0,
    )
    pruner: Literal["none", "median"] = setting(
        "none",
        env="OPTIMIZE_PRUNER",
        help="median: stop sampled trials below the running median (Optuna MedianPruner)",
    )
    ray_address: str | None = setting(
        None,
        env="RAY_ADDRESS",
        help="MODE=optimize: run the trials on this Ray cluster (host:port, ray://host:10001, "
        "auto); unset: a local process pool",
    )

    def __post_init__(self) -> None:
        if self.sampler not in ("grid", "tpe", "random"):
            raise ConfigError(f"OPTIMIZE_SAMPLER={self.sampler!r}: expected grid, tpe or random")
        if self.metric not in METRICS:
            raise ConfigError(f"OPTIMIZE_METRIC={self.metric!r}: expected one of {METRICS}")
        if self.record not in ("best", "all", "none"):
            raise ConfigError(f"OPTIMIZE_RECORD={self.record!r}: expected best, all or none")
        if self.pruner not in ("none", "median"):
            raise ConfigError(f"OPTIMIZE_PRUNER={self.pruner!r}: expected none or median")
        if self.trials < 1:
            raise ConfigError(f"OPTIMIZE_TRIALS={self.trials}: expected a whole number >= 1")
        if self.workers < 0:
            raise ConfigError(f"OPTIMIZE_WORKERS={self.workers}: expected a whole number >= 0")
        if not 0 <= self.seed <= MAX_SEED:
            # numpy's seeds (Optuna's samplers): fold k uses seed + k (checked with the folds)
            raise ConfigError(f"OPTIMIZE_SEED={self.seed}: expected a whole number 0..{MAX_SEED}")
        # Parsed here so that a mistake fails at start; parsing again later is cheap and pure.
        parse_space(self.space, grid=self.sampler == "grid")
        parse_walk_forward(self.walk_forward)

    @property
    def parameters(self) -> Space:
        """The parsed search space (see :func:`runtime.research.space.parse_space`)."""
        return parse_space(self.space, grid=self.sampler == "grid")

    @property
    def windows(self) -> WalkForward | None:
        """The parsed walk-forward spec, ``None`` without ``WALK_FORWARD``."""
        return parse_walk_forward(self.walk_forward)
