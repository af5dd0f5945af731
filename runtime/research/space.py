"""The search space (``OPTIMIZE_SPACE``) and the searches over it: a grid, or Optuna samplers.

``OPTIMIZE_SPACE`` is a JSON object from agent param name to one of:

=====================================  ============================================================
value                                  meaning
=====================================  ============================================================
``[5, 10, 20]``                        these values (any JSON scalars), in this order
``7`` (a scalar)                       a constant: always this value
``{"low": 30, "high": 120}``           whole numbers 30..120 (step 1) when both ends are whole
``{"low": 30, "high": 120, "step": 10}``  30, 40, ..., 120 (``high`` is lowered to the last step)
``{"low": 0.1, "high": 0.9, "step": 0.2}``  0.1, 0.3, 0.5, 0.7, 0.9
``{"low": 1e-3, "high": 1.0, "log": true}``  log-uniform; sampled search only
=====================================  ============================================================

A grid needs a finite set: float ranges need a ``step`` and ``log`` is refused. The grid is
enumerated lazily (``itertools.product``), in the order of the keys, so a large grid is never
held in memory. Sampled search asks Optuna (``TPESampler`` with ``constant_liar`` for parallel
trials, or ``RandomSampler``) one trial at a time, with the same distributions
(``suggest_int``/``suggest_float``/``suggest_categorical``).

Pure (no I/O); Optuna is imported only when a sampled search is built.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Literal, Protocol

from core.errors import ConfigError

if TYPE_CHECKING:
    import optuna

Value = int | float | str | bool | None
Params = dict[str, Value]

_VAR = "OPTIMIZE_SPACE"
#: Most grid points a study may have (a larger grid is a mistake in the space: a million
#: backtests already take days).
MAX_GRID_POINTS = 1_000_000
_RANGE_KEYS = frozenset({"low", "high", "step", "log"})


@dataclass(frozen=True, slots=True)
class Choice:
    """Explicit values of one param (a constant is one value)."""

    name: str
    values: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Range:
    """A numeric range of one param, both ends inclusive.

    Attributes:
        integer: whole numbers (``low``, ``high`` and ``step`` all whole).
        step: spacing of the values; ``None`` = continuous (floats) or 1 (whole numbers).
        log: sample log-uniformly (sampled search only; ``low > 0``, no ``step``).
    """

    name: str
    low: float
    high: float
    step: float | None
    log: bool
    integer: bool

    def count(self) -> int:
        """Number of grid points, by arithmetic (nothing materialised).

        Raises:
            ConfigError: for a continuous float range (no step) or a log range, or more than
                :data:`MAX_GRID_POINTS` points.
        """
        if self.log or (self.step is None and not self.integer):
            raise ConfigError(
                f"{_VAR}: {self.name} is a continuous range; a grid needs a list or a step "
                "(or use OPTIMIZE_SAMPLER=tpe or random)"
            )
        try:
            n = _steps(self.low, self.high, self.step if self.step is not None else 1) + 1
        except InvalidOperation:  # more steps than Decimal's 28 digits can count
            n = MAX_GRID_POINTS + 1
        if n > MAX_GRID_POINTS:
            raise ConfigError(
                f"{_VAR}: {self.name} has more than {MAX_GRID_POINTS:,} grid points: use a "
                "larger step or OPTIMIZE_SAMPLER=tpe or random"
            )
        return n

    def values(self) -> tuple[Value, ...]:
        """Every point of the range (grid search).

        Raises:
            ConfigError: as :meth:`count`.
        """
        n = self.count()
        step = self.step if self.step is not None else 1
        if self.integer:
            return tuple(int(self.low) + i * int(step) for i in range(n))
        return tuple(_point(self.low, i, step) for i in range(n))


Param = Choice | Range
Space = tuple[Param, ...]


def _dec(x: float) -> Decimal:
    # The decimal the user wrote (shortest repr), so 0.1 + 2 * 0.2 is 0.5, not 0.5000000000000001.
    return Decimal(repr(x))


def _point(low: float, i: int, step: float) -> float:
    """``low + i * step`` in decimal arithmetic on the numbers as written."""
    return float(_dec(low) + i * _dec(step))


def _steps(low: float, high: float, step: float) -> int:
    """Whole steps from ``low`` to at most ``high`` (exact, on the numbers as written)."""
    return int((_dec(high) - _dec(low)) // _dec(step))


def _number(name: str, key: str, v: Any) -> float | int:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"{_VAR}: {name}.{key} must be a finite number, got {v!r}")
    return v


#: Largest whole number a float (and so Optuna's sampling) holds exactly.
_MAX_EXACT_INT = 2**53


def _parse_range(name: str, spec: Mapping[str, Any], *, grid: bool) -> Range:
    unknown = set(spec) - _RANGE_KEYS
    if unknown:
        raise ConfigError(
            f"{_VAR}: {name} has unknown key(s) {', '.join(sorted(unknown))}; expected low, "
            "high, step, log"
        )
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{_VAR}: {name} needs both low and high")
    low, high = _number(name, "low", spec["low"]), _number(name, "high", spec["high"])
    step = _number(name, "step", spec["step"]) if spec.get("step") is not None else None
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{_VAR}: {name}.log must be true or false, got {log!r}")
    if low > high:
        raise ConfigError(f"{_VAR}: {name}: low {low} > high {high}")
    # Optuna samples in floats: a span beyond the largest float overflowed (OverflowError), and
    # whole numbers beyond 2**53 are not exact in a float (TPE failed with a TypeError)
    if not math.isfinite(float(high) - float(low)):
        raise ConfigError(f"{_VAR}: {name}: high - low is beyond the largest float")
    if any(isinstance(v, int) and abs(v) > _MAX_EXACT_INT for v in (low, high)):
        raise ConfigError(
            f"{_VAR}: {name}: whole-number ranges must lie within +-2**53 ({_MAX_EXACT_INT}), "
            f"got {low}..{high}"
        )
    if step is not None and step <= 0:
        raise ConfigError(f"{_VAR}: {name}.step must be > 0, got {step}")
    if log and step is not None:
        raise ConfigError(f"{_VAR}: {name}: log and step cannot be combined")
    if log and low <= 0:
        raise ConfigError(f"{_VAR}: {name}: a log range needs low > 0, got {low}")
    if log and grid:
        raise ConfigError(
            f"{_VAR}: {name} is a log range; a grid needs a list or a step (or use "
            "OPTIMIZE_SAMPLER=tpe or random)"
        )
    integer = all(isinstance(v, int) for v in (low, high) + ((step,) if step is not None else ()))
    if step is not None:  # lower high to the last point on the step grid (as Optuna would)
        try:
            n = _steps(low, high, step)
        except InvalidOperation:
            raise ConfigError(
                f"{_VAR}: {name}: step {step} is too small for {low}..{high}"
            ) from None
        high = int(low) + n * int(step) if integer else _point(low, n, step)
    r = Range(name, low, high, step, log, integer)
    if grid:
        r.count()  # refuses continuous float ranges and huge ranges now, at start
        if not integer:
            # a step finer than floats can tell apart near the range: two decimal points of
            # the grid become one float and the same trial would run twice
            points = r.values()
            for i in range(1, len(points)):
                if points[i] == points[i - 1]:
                    raise ConfigError(
                        f"{_VAR}: {name}: step {step} is finer than a float can tell apart "
                        f"near {points[i]!r} (grid points {i - 1} and {i} are the same "
                        "number); use a larger step"
                    )
    return r


def parse_space(raw: Mapping[str, Any], *, grid: bool) -> Space:
    """Parse ``OPTIMIZE_SPACE`` (already decoded from JSON).

    Args:
        raw: param name -> list, scalar or range object (module docstring).
        grid: also require every param to be finite (grid search).

    Returns:
        one :class:`Choice` or :class:`Range` per param, in the order of ``raw``; ``()`` for
        an empty object.

    Raises:
        ConfigError: naming OPTIMIZE_SPACE, the param and what was expected.
    """
    out: list[Param] = []
    for name, spec in raw.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{_VAR}: param names must be identifiers, got {name!r}")
        if isinstance(spec, Mapping):
            out.append(_parse_range(name, spec, grid=grid))
            continue
        values = tuple(spec) if isinstance(spec, list | tuple) else (spec,)
        if not values:
            raise ConfigError(f"{_VAR}: {name} has an empty list of values")
        for v in values:
            if v is not None and not isinstance(v, str | int | float | bool):
                raise ConfigError(
                    f"{_VAR}: {name}: values must be numbers, strings, booleans or null, got {v!r}"
                )
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{_VAR}: {name}: values must be finite, got {v!r}")
        # True == 1 in Python: compare with the type so [1, true] are two values.
        keys = [(type(v).__name__, v) for v in values]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"{_VAR}: {name} lists a value twice: {list(values)!r}")
        out.append(Choice(name, values))
    if grid:
        grid_size(tuple(out))  # refuses a grid of more than MAX_GRID_POINTS, at start
    return tuple(out)


def grid_size(space: Space) -> int:
    """Number of grid points (1 for an empty space), by arithmetic.

    Raises:
        ConfigError: naming OPTIMIZE_SPACE for more than :data:`MAX_GRID_POINTS` points.
    """
    n = 1
    for p in space:
        n *= len(p.values) if isinstance(p, Choice) else p.count()
        if n > MAX_GRID_POINTS:
            raise ConfigError(
                f"{_VAR}: the grid has more than {MAX_GRID_POINTS:,} points: use larger steps, "
                "fewer values or OPTIMIZE_SAMPLER=tpe or random"
            )
    return n


def grid_points(space: Space) -> Iterator[Params]:
    """Every grid point, lazily, the last param varying fastest."""
    names = [p.name for p in space]
    axes = [p.values if isinstance(p, Choice) else p.values() for p in space]
    for combo in itertools.product(*axes):
        yield dict(zip(names, combo, strict=True))


def suggest(trial: optuna.Trial, space: Space) -> Params:
    """Ask an Optuna trial for one point of ``space``."""
    out: Params = {}
    for p in space:
        if isinstance(p, Choice):
            out[p.name] = (
                p.values[0]
                if len(p.values) == 1
                else trial.suggest_categorical(p.name, list(p.values))
            )
        elif p.integer:
            out[p.name] = trial.suggest_int(
                p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log
            )
        else:
            v = trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
            if p.step is not None:  # back onto the decimal grid the user wrote
                v = _point(p.low, round((v - p.low) / p.step), p.step)
            out[p.name] = v
    return out


@dataclass(frozen=True, slots=True)
class Proposal:
    """One point to try: its trial number within the fold, and the params."""

    number: int
    params: Params


TrialState = Literal["complete", "failed", "pruned"]


class Search(Protocol):
    """A search over one fold: proposals in, scores back. Driver thread only."""

    #: planned number of trials
    total: int

    def ask(self) -> Proposal | None:
        """The next point, or ``None`` when the search has proposed all it will."""
        ...

    def tell(self, number: int, objective: float | None, state: TrialState) -> None:
        """The in-sample objective of trial ``number`` (higher is better; ``None`` undefined)."""
        ...


class GridSearch:
    """Every grid point once, in :func:`grid_points` order."""

    def __init__(self, space: Space) -> None:
        self.total = grid_size(space)
        self._points = grid_points(space)
        self._number = 0

    def ask(self) -> Proposal | None:
        params = next(self._points, None)
        if params is None:
            return None
        self._number += 1
        return Proposal(self._number - 1, params)

    def tell(self, number: int, objective: float | None, state: TrialState) -> None:
        """A grid does not learn."""


class OptunaSearch:
    """An Optuna study in memory (params and objective values only, a few hundred bytes a
    trial): ``ask``/``tell`` as trials finish, in any order.

    Args:
        space: the parsed space.
        sampler: ``tpe`` (``TPESampler(constant_liar=True)``: parallel trials are told apart by
            assuming the running ones score badly) or ``random``.
        trials: how many trials to propose.
        seed: sampler seed (the proposals of a sequential run are reproducible).
    """

    def __init__(
        self, space: Space, *, sampler: Literal["tpe", "random"], trials: int, seed: int
    ) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.space = space
        self.total = trials
        chosen: optuna.samplers.BaseSampler = (
            optuna.samplers.TPESampler(seed=seed, constant_liar=True)
            if sampler == "tpe"
            else optuna.samplers.RandomSampler(seed=seed)
        )
        self.study = optuna.create_study(direction="maximize", sampler=chosen)
        self._open: dict[int, optuna.Trial] = {}
        self._asked = 0

    def ask(self) -> Proposal | None:
        if self._asked >= self.total:
            return None
        trial = self.study.ask()
        params = suggest(trial, self.space)
        self._asked += 1
        self._open[trial.number] = trial
        return Proposal(trial.number, params)

    def tell(self, number: int, objective: float | None, state: TrialState) -> None:
        import optuna

        trial = self._open.pop(number)
        if state == "pruned":
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        elif state == "failed" or objective is None or math.isnan(objective):
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, objective)


def make_search(
    space: Space,
    *,
    sampler: Literal["grid", "tpe", "random"],
    trials: int,
    seed: int,
) -> Search:
    """The search of one fold."""
    if sampler == "grid":
        return GridSearch(space)
    return OptunaSearch(space, sampler=sampler, trials=trials, seed=seed)
