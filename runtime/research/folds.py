"""Walk-forward windows (``WALK_FORWARD``): parameters chosen in-sample, scored out-of-sample.

``WALK_FORWARD='{"train": "2y", "test": "6m"}'`` cuts the data span into folds::

    fold 0  [train 2y            )[test 6m )
    fold 1           [train 2y            )[test 6m )        (rolled by "step", default "test")
    ...

Keys: ``train`` and ``test`` (durations), ``step`` (default: ``test``, so the test windows
tile the span without overlap), ``anchored`` (default false; true keeps every train window
starting at the first bar: an expanding window). Durations are ``<n><unit>`` with unit ``y``
(years), ``m`` or ``mo`` (calendar months), ``w`` (weeks), ``d`` (days) or ``h`` (hours); months
and years are calendar offsets (``pandas.DateOffset``), so ``"6m"`` from 31 Aug ends on 28/29 Feb.

Windows are half-open ``[start, end)``, stored in UTC and computed in the data's time zone
(``CSV_TIMEZONE``): ``"6m"`` from a bar at local midnight in January ends at local midnight in
July whatever the daylight-saving offset (in UTC it would end an hour off, one daily bar moving
between train and test). The folds start at the first bar of the span and
stop when a test window would start after the last bar; the last test window is cut at the end
of the data and dropped when that leaves less than half of ``test``.

Without ``WALK_FORWARD`` there is one fold over the whole span, in-sample only.

Pure (no I/O).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd

from core.errors import ConfigError

_VAR = "WALK_FORWARD"
_DURATION_RE = re.compile(r"^\s*(\d+)\s*(y|mo|m|w|d|h)\s*$", re.IGNORECASE)
_KEYS = frozenset({"train", "test", "step", "anchored"})


@dataclass(frozen=True, slots=True)
class Duration:
    """A calendar duration: ``count`` of ``unit`` (``y``, ``m``, ``w``, ``d``, ``h``)."""

    count: int
    unit: str

    @classmethod
    def parse(cls, text: Any, key: str) -> Duration:
        """``"6m"`` -> ``Duration(6, "m")``.

        Raises:
            ConfigError: naming WALK_FORWARD and the key.
        """
        m = _DURATION_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ConfigError(
                f"{_VAR}: {key}={text!r}: expected a duration such as 2y, 6m, 4w, 90d or 12h"
            )
        digits, unit = m.group(1).lstrip("0") or "0", m.group(2).lower()
        # int() of thousands of digits raises ValueError: anything this long is too long
        count = int(digits) if len(digits) <= 12 else 10**12
        if count < 1:
            raise ConfigError(f"{_VAR}: {key}={text!r}: expected a duration > 0")
        unit = "m" if unit == "mo" else unit
        if count > _MAX_COUNT[unit]:
            raise ConfigError(
                f"{_VAR}: {key}={text!r}: longer than {_MAX_COUNT[unit]}{unit} (1000 years)"
            )
        return cls(count, unit)

    def offset(self, times: int = 1) -> pd.DateOffset:
        """This duration ``times`` over, as a calendar offset."""
        return offset(self, times=times)

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"


#: Longest duration of each unit (1000 years): longer is a typo, and would overflow the
#: calendar arithmetic (pandas timestamps end in 2262).
_MAX_COUNT = {"y": 1000, "m": 12_000, "w": 52_200, "d": 365_250, "h": 8_766_000}

_UNIT_NAMES = {"y": "years", "m": "months", "w": "weeks", "d": "days", "h": "hours"}


def offset(*parts: Duration, times: int = 1, extra: tuple[Duration, ...] = ()) -> pd.DateOffset:
    """One calendar offset for ``times`` x the sum of ``parts`` plus ``extra`` (applied at once,
    like ``dateutil.relativedelta``: years and months first, clipped to the month's last day,
    then weeks, days, hours), so boundaries computed from one start never drift."""
    n = dict.fromkeys(_UNIT_NAMES.values(), 0)
    for d in parts:
        n[_UNIT_NAMES[d.unit]] += d.count * times
    for d in extra:
        n[_UNIT_NAMES[d.unit]] += d.count
    return pd.DateOffset(
        years=n["years"], months=n["months"], weeks=n["weeks"], days=n["days"], hours=n["hours"]
    )


#: More folds than this is a mistake in the windows (an hourly step on years of data).
MAX_FOLDS = 1000


@dataclass(frozen=True, slots=True)
class WalkForward:
    """Parsed ``WALK_FORWARD``."""

    train: Duration
    test: Duration
    step: Duration
    anchored: bool = False


def parse_walk_forward(raw: Mapping[str, Any]) -> WalkForward | None:
    """Parse ``WALK_FORWARD`` (already decoded from JSON); ``None`` for an empty object.

    Raises:
        ConfigError: naming WALK_FORWARD and what was expected.
    """
    if not raw:
        return None
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(
            f"{_VAR}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; expected train, "
            "test, step, anchored"
        )
    for key in ("train", "test"):
        if key not in raw:
            raise ConfigError(f'{_VAR}: needs "{key}", e.g. {{"train": "2y", "test": "6m"}}')
    train = Duration.parse(raw["train"], "train")
    test = Duration.parse(raw["test"], "test")
    step = Duration.parse(raw["step"], "step") if "step" in raw else test
    anchored = raw.get("anchored", False)
    if not isinstance(anchored, bool):
        raise ConfigError(f"{_VAR}: anchored must be true or false, got {anchored!r}")
    return WalkForward(train, test, step, anchored)


@dataclass(frozen=True, slots=True)
class Fold:
    """One fold: train ``[train_start, train_end)``, test ``[train_end, test_end)``.

    All times aware UTC. ``test_end`` is ``None`` for the single in-sample fold (no
    ``WALK_FORWARD``); its ``train_end`` is just after the last bar. ``zone``: the IANA zone
    the boundaries were computed in, and :meth:`describe` prints them in.
    """

    index: int
    train_start: datetime
    train_end: datetime
    test_end: datetime | None
    zone: str = "UTC"

    @property
    def test_start(self) -> datetime | None:
        return self.train_end if self.test_end is not None else None

    @property
    def end(self) -> datetime:
        """End of the whole fold (exclusive)."""
        return self.test_end if self.test_end is not None else self.train_end

    def describe(self) -> str:
        def d(t: datetime) -> str:
            t = t.astimezone(ZoneInfo(self.zone))
            # Whole days as dates (the in-sample fold ends 1 us after the last bar).
            daily = t.hour == t.minute == t.second == 0 and t.microsecond < 1000
            return t.strftime("%Y-%m-%d" if daily else "%Y-%m-%d %H:%M")

        text = f"train {d(self.train_start)}..{d(self.train_end)}"
        if self.test_end is not None:
            text += f" test {d(self.train_end)}..{d(self.test_end)}"
        return text


def _utc(t: datetime | pd.Timestamp) -> datetime:
    ts = pd.Timestamp(t)
    ts = ts.tz_localize(UTC) if ts.tzinfo is None else ts.tz_convert(UTC)
    return ts.to_pydatetime()


def make_folds(
    first: datetime, last: datetime, spec: WalkForward | None, zone: str = "UTC"
) -> list[Fold]:
    """The folds over the span ``[first, last]`` (first and last bar times, UTC or naive UTC),
    their boundaries computed in the IANA time zone ``zone`` (the data's ``CSV_TIMEZONE``:
    calendar offsets in its wall time, so daylight saving moves no bar between windows).

    Returns:
        folds in time order, indices 0..n-1.

    Raises:
        ConfigError: naming WALK_FORWARD when the span is too short for one fold.
    """
    first, last = _utc(first), _utc(last)
    if last < first:
        raise ValueError(f"span ends before it starts: {first} > {last}")
    end = last + timedelta(microseconds=1)  # exclusive end just after the last bar
    if spec is None:
        return [Fold(0, first, end, None, zone)]
    start = pd.Timestamp(first).tz_convert(zone)
    folds: list[Fold] = []
    k = 0
    while True:
        # Every boundary from the first bar in one offset: with step == test, fold k's test
        # window ends exactly where fold k+1's begins.
        try:
            train_start = start if spec.anchored else start + offset(spec.step, times=k)
            train_end = (start + offset(spec.step, times=k, extra=(spec.train,))).to_pydatetime()
            full_end = (
                start + offset(spec.step, times=k, extra=(spec.train, spec.test))
            ).to_pydatetime()
        except (OverflowError, ValueError, pd.errors.OutOfBoundsDatetime):
            # past the last representable time (year 2262): no further window fits the data
            break
        if train_end > last:
            break
        test_end = min(full_end, end)
        # The last window is cut at the end of the data: kept if at least half remains.
        if test_end < full_end and (test_end - train_end) * 2 < full_end - train_end:
            break
        if k >= MAX_FOLDS:
            raise ConfigError(
                f"{_VAR}: train {spec.train}, test {spec.test}, step {spec.step} make more than "
                f"{MAX_FOLDS} folds over {first:%Y-%m-%d}..{last:%Y-%m-%d}: use a longer step"
            )
        folds.append(Fold(k, _utc(train_start), _utc(train_end), _utc(test_end), zone))
        k += 1
    if not folds:
        raise ConfigError(
            f"{_VAR}: train {spec.train} + test {spec.test} does not fit in the data "
            f"({first:%Y-%m-%d}..{last:%Y-%m-%d}): shorten the windows or add data"
        )
    return folds
