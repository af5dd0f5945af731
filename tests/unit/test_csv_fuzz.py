"""The CSV loader fuzzed (Hypothesis): any input either loads exactly or fails with file, line and
reason; never another exception, never a silent change.

Two properties:

* ``test_generated_files_load_exactly_or_name_every_bad_line``: files built from valid OHLCV
  rows with extra numeric and text columns, then mutated the ways real files go wrong (blank and
  whitespace lines, a missing or extra field, a non-number, ``inf``/``1e400``/``nan`` prices, a
  duplicate or backwards time, an offset among naive times, a daylight-saving gap, quoted values
  with commas, quotes and line breaks, spaces around values, a byte order mark, CRLF). An oracle
  written here, independent of the loader (Python ``float()``, ``zoneinfo``, its own line
  count), says which physical lines are bad and what every good row holds. With
  ``CSV_ON_BAD_ROWS=raise`` the error names the file and the first bad line; with ``skip`` the
  bars are exactly the good rows (times, every value, text, line numbers, data hashes equal to
  :func:`core.bars.bar_hash` of the written content) and the skipped lines exactly the bad ones.
* ``test_arbitrary_text_never_escapes_as_another_exception``: arbitrary CSV-ish bytes; the
  result is a :class:`DataError` of the form ``CSV <file> line <n>: <reason>``, or bars that
  satisfy every invariant.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from core.bars import bar_hash
from core.errors import DataError
from feeds.csv import CSVFeedConfig, read_csv_bars

SYMBOL = "FUZZ"
HEADER = ["Date", "Open", "High", "Low", "Close", "Volume", "rsi", "note"]
PRICES = ("open", "high", "low", "close")

# Starting points: plain, and just before a spring-forward and a fall-back in Europe/Berlin.
ANCHORS = [datetime(2020, 1, 6, 9, 0), datetime(2021, 3, 28, 0, 30), datetime(2021, 10, 31, 0, 30)]


@dataclass
class Row:
    """One generated bar and how it is written."""

    minutes: int  # after the previous row (0 = same time, negative = backwards)
    low: float
    spread: float  # high = low + spread
    open_f: float  # open = low + open_f * spread
    close_f: float
    volume: int | None
    rsi: float | None
    note: str | None
    offset_min: int | None = None  # write the time with this UTC offset (an aware value)
    quote: bool = False
    pad: bool = False  # spaces around values
    blank_before: int = 0
    ws_before: bool = False  # a whitespace-only line before the row
    mutation: str | None = None
    bad_value: str = ""
    date_style: int = 0  # naive times: "2020-01-06 09:00:00", "...T09:00:00", "... 09:00"


MUTATIONS = [None] * 8 + [
    "missing_field",
    "extra_field",
    "bad_number",
    "inf_price",
    "huge_price",
    "nan_price",
    "empty_price",
    "inf_rsi",
    "high_below_low",
    "close_above_high",
    "negative_volume",
    "bad_date",
    "empty_date",
]

notes = st.one_of(
    st.none(),
    st.text(alphabet="abc XYZ,;\"'\n", min_size=0, max_size=8).map(lambda s: "n" + s),
)
prices = st.floats(min_value=0.01, max_value=1e6, allow_nan=False, allow_infinity=False)
rows = st.builds(
    Row,
    minutes=st.one_of(st.integers(1, 600), st.sampled_from([0, -5, 30, 60, 1440])),
    low=prices,
    spread=st.one_of(st.just(0.0), st.floats(0, 1e4, allow_nan=False, allow_infinity=False)),
    open_f=st.floats(0, 1),
    close_f=st.floats(0, 1),
    volume=st.one_of(st.none(), st.integers(0, 10**12)),
    rsi=st.one_of(st.none(), st.floats(-1e9, 1e9, allow_nan=False, allow_infinity=False)),
    note=notes,
    offset_min=st.one_of(st.none(), st.none(), st.sampled_from([0, 60, -300, 330])),
    quote=st.booleans(),
    pad=st.booleans(),
    blank_before=st.sampled_from([0, 0, 0, 1, 2]),
    ws_before=st.sampled_from([False, False, False, True]),
    mutation=st.sampled_from(MUTATIONS),
    bad_value=st.sampled_from(["abc", "1,5", "--1", "1.2.3", "0x10", "#N/A"]),
    date_style=st.integers(0, 2),
)


@dataclass
class Case:
    text: str
    bad_lines: list[int]
    good: list[dict[str, Any]] = field(default_factory=list)  # ts, line, values, text


def _fmt_float(x: float, style: int) -> str:
    if style == 0:
        return repr(x)
    if style == 1:
        return f"{x:.6g}"
    return f"{x:.4e}"


def _cell(text: str, row: Row) -> str:
    if row.pad:
        text = f" {text} "
    if row.quote or any(c in text for c in ',"\n'):
        return '"' + text.replace('"', '""') + '"'
    return text


def _local_to_utc(naive: datetime, tz: str) -> datetime | None:
    """UTC of a wall time in ``tz``; None when the zone skips or repeats it."""
    zone = ZoneInfo(tz)
    a, b = naive.replace(tzinfo=zone, fold=0), naive.replace(tzinfo=zone, fold=1)
    if a.utcoffset() != b.utcoffset():
        return None
    return a.astimezone(UTC).replace(tzinfo=None)


def build_case(
    data: list[Row], anchor: datetime, tz: str, crlf: bool, bom: bool, float_style: int
) -> Case:
    """Write ``data`` as a CSV file and compute, independently of the loader, what it holds."""
    nl = "\r\n" if crlf else "\n"
    out = [",".join(HEADER)]
    line = 1
    bad: list[int] = []
    good: list[dict[str, Any]] = []
    wall = anchor
    last_ts: datetime | None = None
    for r in data:
        for _ in range(r.blank_before):
            out.append("")
            line += 1
        if r.ws_before:
            out.append("   ")
            line += 1
        wall = wall + timedelta(minutes=r.minutes)
        high = r.low + r.spread
        values: dict[str, float] = {
            "open": min(high, r.low + r.open_f * r.spread),
            "high": high,
            "low": r.low,
            "close": min(high, r.low + r.close_f * r.spread),
        }
        cells: dict[str, str] = {k: _fmt_float(v, float_style) for k, v in values.items()}
        # the value the loader must see is the float of the text written
        values = {k: float(cells[k]) for k in cells}
        cells["volume"] = "" if r.volume is None else str(r.volume)
        cells["rsi"] = "" if r.rsi is None else _fmt_float(r.rsi, float_style)
        cells["note"] = r.note or ""
        if r.offset_min is None:
            fmt = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M")[r.date_style]
            date_text = wall.strftime(fmt)
            ts = _local_to_utc(wall, tz)
        else:
            off = timedelta(minutes=r.offset_min)
            sign = "-" if r.offset_min < 0 else "+"
            hh, mm = divmod(abs(r.offset_min), 60)
            date_text = wall.strftime("%Y-%m-%dT%H:%M:%S") + f"{sign}{hh:02d}:{mm:02d}"
            ts = wall - off
        cells["Date"] = date_text
        is_bad = ts is None
        m = r.mutation
        if m == "bad_number":
            cells["close"], is_bad = r.bad_value, True
        elif m == "inf_price":
            cells["high"], is_bad = "inf", True
        elif m == "huge_price":
            cells["open"], is_bad = "1e400", True
        elif m == "nan_price":
            cells["low"], is_bad = "NaN", True
        elif m == "empty_price":
            cells["open"], is_bad = "", True
        elif m == "inf_rsi":
            cells["rsi"], is_bad = "-inf", True
        elif m == "high_below_low":
            cells["high"], is_bad = _fmt_float(r.low / 2, float_style), True
        elif m == "close_above_high":
            cells["close"], is_bad = _fmt_float(high * 2 + 1, float_style), True
        elif m == "negative_volume":
            cells["volume"], is_bad = "-1", True
        elif m == "bad_date":
            cells["Date"], is_bad = "2020-13-45 99:00:00", True
        elif m == "empty_date":
            cells["Date"], is_bad = "", True
        written = [_cell(cells[h.lower()] if h != "Date" else cells["Date"], r) for h in HEADER]
        if m == "missing_field":
            written, is_bad = written[:-1], True
        elif m == "extra_field":
            written, is_bad = [*written, "1"], True
        text_line = ",".join(written)
        line += 1
        this_line = line
        line += text_line.count("\n")  # a quoted note with line breaks spans lines
        out.append(text_line)
        if not is_bad and (last_ts is not None and ts is not None and ts <= last_ts):
            is_bad = True  # duplicate or backwards, judged against the rows kept
        if is_bad:
            bad.append(this_line)
            continue
        assert ts is not None
        last_ts = ts
        good.append(
            {
                "ts": ts,
                "line": this_line,
                "values": values,
                "volume": float(cells["volume"]) if cells["volume"] else math.nan,
                "rsi": float(cells["rsi"]) if cells["rsi"] else math.nan,
                "note": cells["note"].strip() or None,
            }
        )
    text = nl.join(out) + nl
    if bom:
        text = "\ufeff" + text
    return Case(text, bad, good)


def _check_loaded(bars: Any, case: Case, path: Path) -> None:
    g = case.good
    assert len(bars) == len(g)
    assert bars.lines.tolist() == [r["line"] for r in g]
    expected_ns = [
        int((r["ts"] - datetime(1970, 1, 1)) / timedelta(microseconds=1)) * 1000 for r in g
    ]
    assert bars.times.astype(np.int64).tolist() == expected_ns
    for k in PRICES:
        assert bars.numeric[k].tolist() == [r["values"][k] for r in g], k
    np.testing.assert_array_equal(bars.numeric["volume"], [r["volume"] for r in g])
    if "rsi" in bars.numeric:
        np.testing.assert_array_equal(bars.numeric["rsi"], [r["rsi"] for r in g])
    else:
        assert all(math.isnan(r["rsi"]) for r in g)
    notes_seen = [r["note"] for r in g]
    if "note" in bars.text:
        assert bars.text["note"] == notes_seen
    else:  # every note empty: an all-empty column is numeric NaN
        assert all(n is None for n in notes_seen)
    for i in sorted({0, len(g) // 2, len(g) - 1}):
        r = g[i]
        content: dict[str, Any] = dict(r["values"])
        for k in ("volume", "rsi"):
            if not math.isnan(r[k]):
                content[k] = r[k]
        if r["note"] is not None:
            content["note"] = r["note"]
        assert bars.hashes[i] == bar_hash(SYMBOL, r["ts"], content)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    data=st.lists(rows, min_size=1, max_size=12),
    anchor=st.sampled_from(ANCHORS),
    tz=st.sampled_from(["UTC", "Europe/Berlin"]),
    crlf=st.booleans(),
    bom=st.booleans(),
    float_style=st.integers(0, 2),
)
def test_generated_files_load_exactly_or_name_every_bad_line(
    tmp_path: Path,
    data: list[Row],
    anchor: datetime,
    tz: str,
    crlf: bool,
    bom: bool,
    float_style: int,
) -> None:
    case = build_case(data, anchor, tz, crlf, bom, float_style)
    path = tmp_path / "FUZZ.csv"
    path.write_bytes(case.text.encode())
    strict = CSVFeedConfig(path=path, symbol=SYMBOL, timezone=tz, bar_size="1min")
    if case.bad_lines:
        with pytest.raises(DataError) as err:
            read_csv_bars(strict)
        assert str(err.value).startswith(f"CSV FUZZ.csv line {case.bad_lines[0]}: "), (
            str(err.value),
            case.bad_lines,
        )
    else:
        _check_loaded(read_csv_bars(strict), case, path)
    lenient = CSVFeedConfig(
        path=path, symbol=SYMBOL, timezone=tz, bar_size="1min", on_bad_rows="skip"
    )
    if not case.good:
        with pytest.raises(DataError, match=r"^CSV FUZZ\.csv line \d+: no bars left"):
            read_csv_bars(lenient)
        return
    bars = read_csv_bars(lenient)
    assert [line for line, _ in bars.skipped] == case.bad_lines
    assert all(reason for _, reason in bars.skipped)
    _check_loaded(bars, case, path)


_ERROR = re.compile(r"^CSV FUZZ\.csv line [1-9]\d*: \S")
CSV_ALPHABET = [*'0123456789.,-+eE:T Z/"\n\r\t;abcinfINFNa', "\ufeff", "\x00", "é"]


@settings(max_examples=300, deadline=None)
@given(
    body=st.lists(st.sampled_from(CSV_ALPHABET), max_size=200).map("".join),
    header=st.sampled_from(
        ["Date,Open,High,Low,Close,Volume", ",Open,High,Low,Close", "Date,Open,High,Low,Close,x"]
    ),
    raw_bytes=st.binary(max_size=20),
)
@example(body="", header="", raw_bytes=b"")
@example(
    body="2020-01-01,1,2,1,1,5\n\n2020-01-01,1,2,1,1,5",
    header="Date,Open,High,Low,Close,Volume",
    raw_bytes=b"",
)
def test_arbitrary_text_never_escapes_as_another_exception(
    tmp_path_factory: pytest.TempPathFactory, body: str, header: str, raw_bytes: bytes
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "FUZZ.csv"
    path.write_bytes((header + "\n" + body).encode() + raw_bytes if header else raw_bytes)
    for policy in ("raise", "skip"):
        cfg = CSVFeedConfig(path=path, symbol=SYMBOL, on_bad_rows=policy)  # type: ignore[arg-type]
        try:
            bars = read_csv_bars(cfg)
        except DataError as e:
            assert _ERROR.match(str(e)), str(e)
            continue
        n_lines = path.read_bytes().count(b"\n") + path.read_bytes().count(b"\r") + 1
        t = bars.times.astype(np.int64)
        assert len(bars) > 0 and np.all(np.diff(t) > 0)
        assert bars.lines is not None and len(bars.lines) == len(bars)
        assert np.all(np.diff(bars.lines) > 0) and bars.lines[0] >= 2 and bars.lines[-1] <= n_lines
        for k in PRICES:
            assert np.all(np.isfinite(bars.numeric[k])) and np.all(bars.numeric[k] > 0)
        assert np.all(bars.numeric["high"] >= bars.numeric["low"])
        for digest in bars.hashes:
            assert re.fullmatch(r"[0-9a-f]{32}", digest)
        if policy == "raise":
            assert not bars.skipped


QUOTE_MUTATIONS = ["inch_text", "inch_price", "unclosed_text", "unclosed_price", "text_after_quote"]


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(2, 8),
    where=st.integers(0, 7),
    mutation=st.sampled_from(QUOTE_MUTATIONS),
    multiline_before=st.booleans(),
    words=st.text(alphabet="abc xyz()", min_size=1, max_size=8),
)
def test_broken_quoting_is_named_on_its_line_never_absorbed(
    tmp_path: Path, n: int, where: int, mutation: str, multiline_before: bool, words: str
) -> None:
    """Quotes that do not follow RFC 4180: a quote never closed (which would swallow the rest of
    the file into one value), text after a closing quote (``"5" screen``), and a literal quote
    inside an unquoted value (``24" iMac``, read as written). The oracle counts lines itself."""
    k = min(where, n - 1)
    lines = ["Date,Open,High,Low,Close,Volume,Headline"]
    line_no = 1
    bad_line = None
    expected_text: list[str] = []
    for i in range(n):
        close, headline = "101", f"ok {i}"
        if multiline_before and i == 0:
            headline = '"two\nlines"'
        if i == k:
            if mutation == "inch_text":
                headline = f'24" {words}'.strip()
            elif mutation == "inch_price":
                close = '101"'
            elif mutation == "unclosed_text":
                headline = f'"{words}'
            elif mutation == "unclosed_price":
                close = '"101'
            else:
                headline = f'"5"{words}'
        day = datetime(2020, 1, 1) + timedelta(days=i)
        row = f"{day:%Y-%m-%d},100,102,99,{close},1000,{headline}"
        if i == k:
            bad_line = line_no + 1
        expected_text.append(headline.strip('"') if i == 0 and multiline_before else headline)
        lines.append(row)
        line_no += row.count("\n") + 1
    path = tmp_path / "FUZZ.csv"
    path.write_text("\n".join(lines) + "\n")
    if mutation == "inch_text" and not (multiline_before and k == 0):
        bars = read_csv_bars(CSVFeedConfig(path=path, symbol=SYMBOL))
        assert bars.text["headline"] == expected_text
        starts = [2 + sum(r.count("\n") + 1 for r in lines[1 : i + 1]) for i in range(n)]
        assert bars.lines is not None and bars.lines.tolist() == starts
        return
    if multiline_before and k == 0:
        return  # the mutation replaced the multi-line value: covered by the cases above
    for policy in ("raise", "skip"):
        cfg = CSVFeedConfig(path=path, symbol=SYMBOL, on_bad_rows=policy)  # type: ignore[arg-type]
        if mutation == "inch_price" and policy == "skip":
            bars = read_csv_bars(cfg)
            assert [line for line, _ in bars.skipped] == [bad_line]
            continue
        with pytest.raises(DataError, match=rf"^CSV FUZZ\.csv line {bad_line}: ") as err:
            read_csv_bars(cfg)
        if mutation.startswith("unclosed"):
            assert "never closed" in str(err.value)
        elif mutation == "text_after_quote":
            assert "after a closing quote" in str(err.value)
