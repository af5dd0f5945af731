"""Text -> numbers and bar times, vectorised (pyarrow compute and pandas), for the CSV reader.

Numbers: a value is a number when, after trimming spaces, removing the configured thousands
separator (only in correct 3-digit groups) and turning the configured decimal comma into a
point, it is a plain decimal (``-1.5``, ``.5``, ``2e-3``) or ``nan``/``inf``/``infinity`` (any
case, signed). With ``suffixes`` a final ``K``/``M``/``B`` scales by 1e3/1e6/1e9, applied to the
text as an exponent (``1.23M`` -> ``1.23e6``) so the float is the correctly rounded value of
what was written. The float is pyarrow's correctly rounded parse, equal to Python's ``float()``.

Bar times, with ``CSV_DATETIME_FORMAT`` unset (see ``docs/csv.md``, "Dates"):

* ISO 8601 (``2020-01-02``, ``2020-01-02T09:30:00.5``, with or without an offset or ``Z``, even
  mixed in one file): a value with an offset is that instant; one without is wall time in
  ``CSV_TIMEZONE``.
* ``d/m/Y`` vs ``m/d/Y`` (also with ``.`` or ``-``, 2- or 4-digit years): decided by the data.
  Some first part above 12 -> day first; some second part above 12 -> month first; neither ->
  refused (``01/02/2020`` is 1 February or January 2), both -> refused: set the format.
* Anything else: the format pandas guesses from the first value
  (:func:`pandas.tseries.api.guess_datetime_format`), then applied strictly to every row.
* Digits only with 10, 13, 16 or 19 digits: refused with a hint (Unix time: set
  ``CSV_DATETIME_FORMAT=epoch_s``/``epoch_ms``/``epoch_us``/``epoch_ns``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pandas.tseries.api import guess_datetime_format

from core.errors import DataError

EPOCH_UNITS = {"epoch_s": "s", "epoch_ms": "ms", "epoch_us": "us", "epoch_ns": "ns"}

_MANTISSA = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_NUMBER = _MANTISSA + r"(?:[eE][+-]?\d+)?"
_SPECIAL = r"(?i:[+-]?(?:inf|infinity|nan))"
_DMY = re.compile(r"^(\d{1,2})([/.\-])(\d{1,2})\2(\d{2}|\d{4})(?:$|[ T])")
_DMY_RX = r"^(?P<a>\d{1,2})[/.\-](?P<b>\d{1,2})[/.\-](?:\d{2}|\d{4})(?:$|[ T])"
_ISO = re.compile(r"^\d{4}-\d{2}-\d{2}(?:$|[ T]\d)")
# an offset after a time of day (a date's "-02" is not one)
_OFFSET_RX = r"^\d{4}-\d{2}-\d{2}[T ].*\d\s*(?:[Zz]|[+-]\d{2}(?::?\d{2})?)$"
# numeric strftime directives side by side: only zero-padded values read unambiguously
_ADJACENT = re.compile(r"%[YymdHIMSjU]%[YymdHIMSfjU]")
_EPOCH_LIKE = re.compile(r"^\d{10}(?:\d{3}|\d{6}|\d{9})?$")
# datetime64[ns] holds 1677-09-21 .. 2262-04-11; bar times outside are refused per row
_NS_MIN = np.datetime64("1678-01-01", "s")
_NS_MAX = np.datetime64("2262-01-01", "s")


@dataclass(frozen=True, slots=True)
class NumberStyle:
    """How numbers are written: decimal mark, thousands separator, K/M/B suffixes."""

    decimal: str = "."
    thousands: str | None = None
    suffixes: bool = False


def trim(col: pa.Array) -> pa.Array:
    """Strip spaces (Unicode whitespace) at both ends of every value."""
    return pc.utf8_trim_whitespace(col)


def parse_numbers(text: pa.Array, style: NumberStyle) -> tuple[np.ndarray, np.ndarray]:
    """Parse text as float64 (spaces at the ends ignored).

    Args:
        text: strings, no nulls (a ``pyarrow`` array or chunked array).
        style: the number style of the file.

    Returns:
        ``(values, not_number)``: float64 values (NaN where empty, ``nan`` or not a number) and a
        bool mask of the non-empty values that are not numbers.
    """
    if not pa.types.is_string(text.type):  # parsed while reading (feeds.csv.table)
        arr = np.asarray(text.to_numpy(zero_copy_only=False), dtype=np.float64)
        return arr, np.zeros(len(arr), dtype=bool)
    plain = style == NumberStyle()
    if plain:
        # fast path: every value a plain number (pyarrow's parse accepts exactly the grammar
        # below, nan and inf included, and nothing with spaces); else find the bad ones
        try:
            values = pc.cast(text, pa.float64())
        except pa.ArrowInvalid:
            pass
        else:
            arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
            return arr, np.zeros(len(arr), dtype=bool)
    text = trim(text)
    t = text
    if style.thousands:
        sep = re.escape(style.thousands)
        dec = re.escape(style.decimal)
        # the first group has no leading zero: "0.125" and "00,123" are not groupings (read
        # as 125 and 123 before; found by an attack, helper-59)
        grouped = rf"^[+-]?[1-9]\d{{0,2}}(?:{sep}\d{{3}})+(?:{dec}\d*)?(?:[eE][+-]?\d+)?[kKmMbB]?$"
        is_grouped = pc.match_substring_regex(t, grouped)
        t = pc.if_else(is_grouped, pc.replace_substring(t, style.thousands, ""), t)
    if style.decimal != ".":
        # a "." in a decimal-comma file is not a decimal point: leave it to fail as a number
        t = pc.if_else(pc.match_substring(t, "."), pa.scalar("x", pa.string()), t)
        t = pc.replace_substring(t, style.decimal, ".", max_replacements=1)
    if style.suffixes:
        for letter, exp in (("k", "e3"), ("m", "e6"), ("b", "e9")):
            pattern = rf"^({_MANTISSA})[{letter}{letter.upper()}]$"
            t = pc.replace_substring_regex(t, pattern, rf"\1{exp}")
    ok = pc.match_substring_regex(t, f"^(?:{_NUMBER}|{_SPECIAL})$")
    values = pc.cast(pc.if_else(ok, t, pa.scalar(None, pa.string())), pa.float64())
    arr = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
    not_number = ~np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool) & np.asarray(
        pc.not_equal(text, "").to_numpy(zero_copy_only=False), dtype=bool
    )
    return arr, not_number


@dataclass(slots=True)
class Times:
    """Parsed bar times.

    Attributes:
        ns: int64 nanoseconds since the epoch, UTC; meaningless where ``bad`` has a reason.
        bad: row position -> reason, for rows whose time is unusable.
        how: how the format was chosen (for the log), e.g. ``"%d/%m/%Y (day first: line 9)"``.
    """

    ns: np.ndarray
    bad: dict[int, str]
    how: str


def parse_times(
    text: pa.Array, *, fmt: str | None, timezone: str, lines: np.ndarray, where: str
) -> Times:
    """Parse datetime text into UTC bar times.

    Args:
        text: strings, one per row, no nulls (spaces at the ends are ignored).
        fmt: ``CSV_DATETIME_FORMAT`` (a ``strftime`` format or ``epoch_*``), or ``None``.
        timezone: IANA zone of values without an offset.
        lines: physical line of each row (for messages).
        where: ``"CSV <file>"``.

    Returns:
        :class:`Times`.

    Raises:
        DataError: when the format cannot be decided (ambiguous day/month order, no format
            guessed, Unix times without ``epoch_*``): names the file, a line and what to set.
    """
    n = len(text)
    if fmt is None and n and _ISO.match(str(text[0].as_py())):
        fast = _arrow_iso(text)  # the common case: every value naive ISO 8601, no spaces
        if fast is not None:
            return _finish(
                fast,
                aware=False,
                timezone=timezone,
                text=text,
                fmt=None,
                bad={},
                how="ISO 8601",
                lost=None,
            )
    text = trim(text)
    empty = np.asarray(pc.equal(text, "").to_numpy(zero_copy_only=False), dtype=bool)
    bad: dict[int, str] = {int(i): "the date is empty" for i in np.flatnonzero(empty)}
    if n == len(bad):
        return Times(np.zeros(n, dtype=np.int64), bad, "none")
    first = int(np.flatnonzero(~empty)[0])
    sample = str(text[first].as_py())
    aware = False
    how = fmt or ""
    lost: np.ndarray | None = None
    if fmt in EPOCH_UNITS:
        parsed = _parse_epoch(text, EPOCH_UNITS[fmt])
        aware = True
        _check_epoch_unit(parsed, text, fmt, lines, where)
    elif fmt:
        aware = "%z" in fmt or "%Z" in fmt
        parsed = pd.to_datetime(text.to_pandas(), format=fmt, errors="coerce", utc=aware)
    elif _ISO.match(sample):
        how = "ISO 8601"
        parsed = pd.to_datetime(text.to_pandas(), format="ISO8601", errors="coerce", utc=True)
        aware = True
        if timezone != "UTC":
            has_offset = pc.match_substring_regex(text, _OFFSET_RX)
            naive = ~np.asarray(has_offset.to_numpy(zero_copy_only=False), dtype=bool)
            if naive.any():
                local, lost_naive = _localise(parsed[naive].dt.tz_localize(None), timezone)
                parsed = parsed.copy()
                parsed[naive] = local
                lost = np.zeros(n, dtype=bool)
                lost[naive] = lost_naive
    elif _EPOCH_LIKE.match(sample):
        unit = {10: "epoch_s", 13: "epoch_ms", 16: "epoch_us", 19: "epoch_ns"}[len(sample)]
        raise DataError(
            f"{where} line {lines[first]}: the date {sample!r} looks like a Unix time; set "
            f"CSV_DATETIME_FORMAT={unit} (or epoch_s/epoch_ms/epoch_us/epoch_ns)"
        )
    else:
        dayfirst = False
        first_dmy = _DMY.match(sample)
        if first_dmy:
            if len(first_dmy.group(4)) == 2:
                _refuse_two_digit_year_first(text, first_dmy.group(2), lines, where)
            dayfirst, how = _day_first(text, lines, where)
        guessed = guess_datetime_format(sample, dayfirst=dayfirst)
        dmy = _DMY.match(sample)
        if guessed is None and dmy and dmy.end() >= len(sample.rstrip()):
            # pandas guesses no 2-digit years: a plain a/b/yy date is spelled out here
            sep = dmy.group(2)
            year = "%Y" if len(dmy.group(4)) == 4 else "%y"
            guessed = f"%d{sep}%m{sep}{year}" if dayfirst else f"%m{sep}%d{sep}{year}"
        if guessed is None:
            raise DataError(
                f"{where} line {lines[first]}: cannot tell the date format of {sample!r}; set "
                "CSV_DATETIME_FORMAT (a strftime format, e.g. %d.%m.%Y %H:%M)"
            )
        how = f"{guessed}{' ' + how if how else ''} (guessed from line {lines[first]})"
        aware = "%z" in guessed or "%Z" in guessed
        fmt = guessed
        parsed = pd.to_datetime(text.to_pandas(), format=guessed, errors="coerce", utc=aware)
    if fmt and fmt not in EPOCH_UNITS and _ADJACENT.search(fmt):
        _refuse_unpadded(text, fmt, bad)
    return _finish(
        parsed, aware=aware, timezone=timezone, text=text, fmt=fmt, bad=bad, how=how, lost=lost
    )


_WIDTHS = {"Y": 4, "j": 3, "%": 1, **dict.fromkeys("ymdHIMSU", 2)}


def _padded_length(fmt: str) -> int | None:
    """Characters of a zero-padded value of ``fmt``; ``None`` when some directive has no fixed
    width (``%f``, ``%b``, ``%z``, ...)."""
    total, i = 0, 0
    while i < len(fmt):
        if fmt[i] == "%":
            width = _WIDTHS.get(fmt[i + 1 : i + 2])
            if width is None:
                return None
            total, i = total + width, i + 2
        else:
            total, i = total + 1, i + 1
    return total


def _refuse_unpadded(text: pa.Array, fmt: str, bad: dict[int, str]) -> None:
    """With two numeric directives side by side (``%Y%m%d``, ``%H%M``) only zero-padded values
    are unambiguous (pandas reads ``2020113`` as 3 November, but it may be 13 January): a
    value longer or shorter than most of the column's is a bad row."""
    lengths = np.asarray(pc.utf8_length(text).to_numpy(zero_copy_only=False), dtype=np.int64)
    filled = lengths > 0
    if not filled.any():
        return
    usual = _padded_length(fmt)
    if usual is None:  # a directive of variable width: the column's most common length
        usual = int(np.bincount(lengths[filled]).argmax())
    for i in np.flatnonzero(filled & (lengths != usual)):
        bad.setdefault(
            int(i),
            f"date {text[int(i)].as_py()!r} has {lengths[i]} characters where a zero-padded "
            f"one has {usual}: {fmt} needs zero-padded values (2020-01-03 as 20200103)",
        )


def _finish(
    parsed: pd.Series,
    *,
    aware: bool,
    timezone: str,
    text: pa.Array,
    fmt: str | None,
    bad: dict[int, str],
    how: str,
    lost: np.ndarray | None,
) -> Times:
    """Localise naive times, convert to UTC int64 ns and give every unusable row its reason."""
    if not aware:
        if timezone == "UTC":
            parsed = parsed.dt.tz_localize(None) if parsed.dt.tz is not None else parsed
            values = parsed
        else:
            parsed, lost = _localise(parsed, timezone)
            values = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    else:
        values = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    raw = np.asarray(values.to_numpy())
    nat = np.isnat(raw)
    secs = raw.astype("datetime64[s]")
    out_of_range = ~nat & ((secs < _NS_MIN) | (secs >= _NS_MAX))
    ns = np.where(nat | out_of_range, np.datetime64(0, "ns"), raw).astype("datetime64[ns]")
    expected = f" (expected {fmt})" if fmt else ""

    def at(i: int) -> str:
        return str(text[i].as_py())

    if lost is not None:
        for i in np.flatnonzero(lost):
            bad.setdefault(
                int(i),
                f"time {at(int(i))!r} does not exist or exists twice in {timezone} (a "
                "daylight-saving change); give times with an offset or in UTC",
            )
    for i in np.flatnonzero(nat):
        bad.setdefault(int(i), f"unparsable date {at(int(i))!r}{expected}")
    for i in np.flatnonzero(out_of_range):
        bad.setdefault(int(i), f"date {at(int(i))!r} is outside the years 1678-2261")
    return Times(ns.astype(np.int64), bad, how)


def _arrow_iso(text: pa.Array) -> pd.Series | None:
    """Naive ISO 8601 times parsed by pyarrow's cast (C++, ~10x pandas); ``None`` when any value
    is not naive ISO 8601 (an offset, a bad value: pandas then decides row by row)."""
    try:
        parsed = pc.cast(text, pa.timestamp("ns"))
    except pa.ArrowInvalid:
        return None
    return pd.Series(np.asarray(parsed.to_numpy(zero_copy_only=False), dtype="datetime64[ns]"))


def _localise(wall: pd.Series, timezone: str) -> tuple[pd.Series, np.ndarray]:
    """Naive wall times in ``timezone`` -> aware, and the mask of times the zone skips or
    repeats (a daylight-saving change): those are NaT and reported, never guessed.

    A file of dates (every wall time a midnight) names days: a day whose midnight the zone
    skips (America/Santiago, Asia/Beirut, Africa/Cairo change at 00:00) begins at its first
    instant, 01:00 (a repeated midnight: its first occurrence)."""
    local = wall.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT")
    lost = np.asarray((local.isna() & wall.notna()).to_numpy(), dtype=bool)
    if lost.any() and _dates(wall):
        local = day_starts(wall, timezone)
        lost = np.zeros(len(wall), dtype=bool)
    return local, lost


def _dates(wall: pd.Series) -> bool:
    """Whether every (non-missing) naive time of ``wall`` is a midnight."""
    known = wall.dropna()
    return bool(len(known)) and bool((known == known.dt.normalize()).all())


def day_starts(days: pd.Series, timezone: str) -> pd.Series:
    """Naive dates (midnights) -> the first instant of each day in ``timezone``, aware: its
    midnight, or where the zone skips midnight the end of the gap (01:00), or where it
    repeats it the first occurrence."""
    starts: pd.Series = days.dt.tz_localize(timezone, ambiguous=True, nonexistent="shift_forward")
    return starts


_EPOCH_FLOOR = pd.Timestamp("1971-01-01", tz="UTC")


def _check_epoch_unit(
    parsed: pd.Series, text: pa.Array, fmt: str, lines: np.ndarray, where: str
) -> None:
    """Refuse Unix times read in too large a unit: bars before 1971 (``epoch_ms`` over a file
    of seconds puts 2021 in January 1970) are far more likely a wrong unit than real data.

    Raises:
        DataError: naming the first such line and the unit its digits suggest.
    """
    early = np.flatnonzero(np.asarray((parsed < _EPOCH_FLOOR).to_numpy(), dtype=bool))
    if not len(early):
        return
    i = int(early[0])
    value = str(text[i].as_py())
    digits = len(value.lstrip("+-").split(".")[0])
    unit = {10: "epoch_s", 13: "epoch_ms", 16: "epoch_us", 19: "epoch_ns"}.get(digits)
    hint = f" (its {digits} digits suggest {unit})" if unit and unit != fmt else ""
    raise DataError(
        f"{where} line {lines[i]}: {value!r} read as {fmt} is before 1971; "
        f"CSV_DATETIME_FORMAT is likely the wrong unit{hint}"
    )


def _parse_epoch(text: pa.Array, unit: str) -> pd.Series:
    # at most 18 digits, or 19 below 9e18: always within int64
    ok = pc.match_substring_regex(text, r"^[+-]?(?:\d{1,18}|[1-8]\d{18})(?:\.0*)?$")
    # pyarrow's integer cast takes no "+" sign and no ".0": both removed first
    stripped = pc.replace_substring_regex(
        pc.replace_substring_regex(text, r"\.0*$", ""), r"^\+", ""
    )
    digits = pc.if_else(ok, stripped, pa.scalar("0", pa.string()))
    # int64 throughout (no nulls: a float64 detour would round 19-digit nanoseconds)
    values = np.asarray(pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False), np.int64)
    parsed: pd.Series = pd.to_datetime(  # type: ignore[call-overload]
        pd.Series(values), unit=unit, errors="coerce", utc=True
    )
    not_ok = ~np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    if not_ok.any():
        parsed = parsed.copy()
        parsed[not_ok] = pd.NaT
    return parsed


def _refuse_two_digit_year_first(text: pa.Array, sep: str, lines: np.ndarray, where: str) -> None:
    """``a-b-yy`` dates that every row also reads as ``yy-mm-dd`` (``20-01-02``: 20 January
    2002, or 2 January 2020) are ambiguous: refused, naming a line, unless some row decides."""
    rx = r"^(?P<a>\d{1,2})[/.\-](?P<b>\d{1,2})[/.\-](?P<c>\d{2})(?:$|[ T])"
    parts = pc.extract_regex(text, rx)

    def part(name: str) -> np.ndarray:
        values = pc.cast(pc.struct_field(parts, name), pa.int16())
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=float)

    b, c = part("b"), part("c")
    rows = ~np.isnan(c)
    if not rows.any():
        return
    if ((b[rows] >= 1) & (b[rows] <= 12) & (c[rows] >= 1) & (c[rows] <= 31)).all():
        k = int(np.flatnonzero(rows)[0])
        raise DataError(
            f"{where} line {lines[k]}: dates like {text[k].as_py()!r} with a 2-digit year could "
            f"be year first (%y{sep}%m{sep}%d) as well as day or month first; set "
            f"CSV_DATETIME_FORMAT, e.g. %y{sep}%m{sep}%d or %d{sep}%m{sep}%y"
        )


def _day_first(text: pa.Array, lines: np.ndarray, where: str) -> tuple[bool, str]:
    """Decide day-first vs month-first order of ``a/b/Y`` dates from the data itself."""
    parts = pc.extract_regex(text, _DMY_RX)
    a = np.asarray(pc.cast(pc.struct_field(parts, "a"), pa.int16()).to_numpy(zero_copy_only=False))
    b = np.asarray(pc.cast(pc.struct_field(parts, "b"), pa.int16()).to_numpy(zero_copy_only=False))
    with np.errstate(invalid="ignore"):
        a_big = np.flatnonzero(np.nan_to_num(a.astype(float)) > 12)
        b_big = np.flatnonzero(np.nan_to_num(b.astype(float)) > 12)
    if len(a_big) and len(b_big):
        i, j = int(a_big[0]), int(b_big[0])
        raise DataError(
            f"{where} line {lines[i]}: {text[i].as_py()!r} is day first but line {lines[j]}: "
            f"{text[j].as_py()!r} is month first; set CSV_DATETIME_FORMAT (e.g. %d/%m/%Y)"
        )
    if len(a_big):
        return True, f"(day first: line {lines[int(a_big[0])]} has a day above 12)"
    if len(b_big):
        return False, f"(month first: line {lines[int(b_big[0])]} has a day above 12)"
    k = int(np.flatnonzero(~np.isnan(a.astype(float)))[0])
    sample = str(text[k].as_py())
    m = _DMY.match(sample)
    sep, year = (m.group(2), "%Y" if len(m.group(4)) == 4 else "%y") if m else ("/", "%Y")
    raise DataError(
        f"{where} line {lines[k]}: dates like {sample!r} could be day first or month first "
        f"(no value above 12 decides it); set CSV_DATETIME_FORMAT, e.g. %d{sep}%m{sep}{year} "
        f"or %m{sep}%d{sep}{year}"
    )
