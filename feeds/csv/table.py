"""One CSV file -> a table of strings with the physical line number of every row (pyarrow).

Reading is pyarrow's C++ CSV reader (``pyarrow.csv.read_csv``), every column as text: numbers and
times are parsed afterwards, vectorised, so a bad value is reported for its row instead of
failing the whole file. Line numbers are the ones a text editor shows: 1 = the header, blank lines
and every line of a quoted multi-line value counted, ``\\n``, ``\\r\\n`` and a lone ``\\r`` each
ending one line.

How the line numbers are found, without Python per row:

* pyarrow numbers *records* (a record is one row of fields; 1 = the header) and reports the
  number of every record with the wrong field count to ``ParseOptions.invalid_row_handler``
  (serial reading only: ``use_threads=False``). With ``ignore_empty_lines=False`` a blank line
  is a record too, so every valid row's record number is "the next number not reported".
* A record spans several physical lines only when a quoted value holds a line break. For files
  with quotes, :func:`record_lines` finds where records start from the bytes: a line break ends
  a record when an even number of ``"`` precede it (RFC 4180 quoting, where ``""`` inside a
  quoted value is an escaped quote, keeps the parity).

Bottom of the CSV package: imports nothing of ours but :mod:`core.errors`.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from core.errors import DataError

logger = logging.getLogger(__name__)

_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_CHUNK = 1 << 24  # bytes scanned at once by record_lines (bounds its temporary memory)
_HEADER_PROBE = 1 << 20  # bytes decoded to read the header line


@dataclass(slots=True)
class RawTable:
    """The text of one CSV file, before any value is parsed.

    Attributes:
        header: column names as written (stripped), in file order.
        columns: one ``pyarrow`` string (chunked) array per header column (no nulls; ``""``
            when empty).
        lines: physical line number (1 = header) of each row, ``int64``, increasing.
        bad_rows: ``(line, reason)`` of rows with the wrong number of fields.
        blank_lines: count of blank (empty or whitespace-only) lines after the header; they
            carry no data and are not rows.
    """

    header: list[str]
    columns: list[pa.ChunkedArray]
    lines: np.ndarray
    bad_rows: list[tuple[int, str]] = field(default_factory=list)
    blank_lines: int = 0

    def __len__(self) -> int:
        return len(self.lines)


def line_of_offset(raw: bytes, offset: int) -> int:
    """Physical line (1-based) holding byte ``offset`` of ``raw``."""
    head = raw[:offset]
    lone_cr = head.count(b"\r") - head.count(b"\r\n")
    return head.count(b"\n") + lone_cr + 1


def physical_lines(raw: bytes | memoryview) -> int:
    """Number of lines of ``raw`` as an editor counts them (a final line break ends the last
    line; it starts no new one)."""
    data = bytes(raw) if isinstance(raw, memoryview) else raw
    breaks = data.count(b"\n") + data.count(b"\r") - data.count(b"\r\n")
    return breaks + (0 if data.endswith((b"\n", b"\r")) or not data else 1)


def record_lines(raw: bytes | memoryview) -> np.ndarray:
    """Physical line (1-based) on which each record of ``raw`` starts.

    Scans the bytes in chunks of 16 MiB with a running count of quotes, so its temporary memory
    is bounded whatever the file size.

    Args:
        raw: the file's bytes (after any byte order mark).

    Returns:
        ``int64`` array: element ``r`` is the line where record ``r + 1`` starts (record 1 = the
        header). It may hold one entry more than the file has records (a final line break
        starts no record).
    """
    buf = np.frombuffer(raw, dtype=np.uint8)
    starts: list[np.ndarray] = [np.array([1], dtype=np.int64)]
    quotes_before = 0  # quotes in earlier chunks
    breaks_before = 0  # line breaks in earlier chunks
    for start in range(0, len(buf), _CHUNK):
        chunk = buf[start : start + _CHUNK + 1]  # one byte more: is a \r followed by \n?
        body = chunk[:_CHUNK]
        brk = np.flatnonzero(body == 0x0A)
        cr = np.flatnonzero(body == 0x0D)
        if len(cr):
            nxt = cr + 1
            followed = np.zeros(len(cr), dtype=bool)
            inside = nxt < len(chunk)
            followed[inside] = chunk[nxt[inside]] == 0x0A
            brk = np.union1d(brk, cr[~followed])
        quotes = np.flatnonzero(body == 0x22)
        ends_record = (np.searchsorted(quotes, brk) + quotes_before) % 2 == 0
        # a record starts on the line after each record-ending break (line k+1 ends at break k)
        starts.append(np.flatnonzero(ends_record).astype(np.int64) + breaks_before + 2)
        quotes_before += len(quotes)
        breaks_before += len(brk)
    return np.concatenate(starts)


def quoted_record_lines(raw: bytes | memoryview, delimiter: str, where: str) -> np.ndarray:
    """Physical line (1-based) on which each record starts, for a file with quotes, checking
    its quoting (RFC 4180, as Python's :mod:`csv` reads it with ``strict=True``).

    A ``"`` inside an unquoted value (``24" iMac``) is a literal character there, as pyarrow
    reads it too, so it neither opens a quoted value nor shifts the line count.

    Args:
        raw: the file's bytes (after any byte order mark), valid UTF-8.
        delimiter: the field separator.
        where: ``"CSV <file name>"``.

    Returns:
        ``int64`` array, element ``r`` = the line where record ``r + 1`` starts (1 = header).

    Raises:
        DataError: a quote never closed (the rest of the file would become one value), or
            text after a closing quote (``"5" screen``, ``"10"1``), naming the line.
    """
    text = bytes(raw).decode("utf-8")
    if csv.field_size_limit() < len(text):
        csv.field_size_limit(len(text))  # a quoted value may be as long as the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    starts: list[int] = []
    prev = 0
    try:
        for _ in reader:
            starts.append(prev + 1)
            prev = reader.line_num
    except csv.Error as e:
        if "unexpected end of data" in str(e):
            raise DataError(
                f"{where} line {prev + 1}: a quote opened in this row is never closed (the rest "
                'of the file would be inside it); close it, or write a literal " as ""'
            ) from e
        raise DataError(
            f"{where} line {reader.line_num}: text after a closing quote ({e}); quote the whole "
            'value and write a literal " inside it as "" (e.g. "24"" screen")'
        ) from e
    return np.asarray(starts, dtype=np.int64)


def _decode_header(raw: memoryview, delimiter: str, where: str) -> list[str]:
    probe = bytes(raw[:_HEADER_PROBE])
    end = probe.find(b"\n")
    try:  # the header line itself is UTF-8 (the probe may cut a character after it)
        probe[: end if end >= 0 else len(probe)].decode("utf-8")
    except UnicodeDecodeError as u:
        if end >= 0 or u.end < len(probe):
            # found by an attack (helper-67): a Windows-1252 header ("Eröffnung") was read as
            # "Er\ufffdffnung", and CSV_COLUMNS naming the column was "not found"
            raise DataError(
                f"{where} line 1: invalid UTF-8 bytes {probe[u.start : u.end]!r}; save the file "
                "as UTF-8 (CSV UTF-8 in Excel)"
            ) from u
    text = probe.decode("utf-8", errors="replace")
    try:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
        first = next(reader, [])
    except csv.Error as e:
        raise DataError(
            f"{where} line 1: cannot read the header ({e}): a quote in a column name is never "
            'closed, or text follows a closing quote; write a literal " as ""'
        ) from e
    header = [c.strip() for c in first]
    broken = [c for c in header if "\n" in c or "\r" in c]
    if broken:
        raise DataError(
            f"{where} line 1: column name {broken[0]!r} holds a line break; put the header on "
            "one line"
        )
    if not any(header):
        raise DataError(f"{where} line 1: the first line is blank; expected the header")
    return header


def read_header(data: bytes, *, delimiter: str, where: str) -> list[str]:
    """The column names on line 1 (stripped).

    Raises:
        DataError: an empty file, a UTF-16 file, a blank first line, or a header with fewer
            than two columns (the wrong ``CSV_DELIMITER``, or a title line): names line 1.
    """
    if not data:
        raise DataError(f"{where} line 1: the file is empty (0 bytes); expected a header line")
    if data.startswith(_UTF16_BOMS):
        raise DataError(
            f"{where} line 1: the file is UTF-16 encoded; save it as UTF-8 (CSV UTF-8 in Excel)"
        )
    if b"\x00" in data[: data.find(b"\n") if b"\n" in data[:65_536] else 65_536]:
        # found by an attack (helper-59): UTF-16 without a byte-order mark (as some exporters
        # write it) was read as names with a NUL between their letters
        raise DataError(
            f"{where} line 1: the header holds NUL bytes: the file looks UTF-16 encoded "
            "without a byte-order mark; save it as UTF-8 (CSV UTF-8 in Excel)"
        )
    view = memoryview(data)
    if data.startswith(_BOM):
        view = view[len(_BOM) :]
    header = _decode_header(view, delimiter, where)
    if len(header) < 2:
        seps = [s for s in (";", "\t", "|", ",") if s != delimiter and s in header[0]]
        hint = (
            f"; the file looks {seps[0]!r}-separated: set CSV_DELIMITER"
            if seps
            else "; if line 1 is a title or a URL rather than the column names, delete it"
        )
        raise DataError(
            f"{where} line 1: the header has one column ({header[0][:60]!r}) with "
            f"CSV_DELIMITER={delimiter!r}{hint}"
        )
    return header


def read_raw_table(
    data: bytes,
    *,
    delimiter: str,
    where: str,
    header: list[str],
    float_columns: tuple[int, ...] = (),
) -> RawTable:
    """Split a CSV file's bytes into rows of text.

    Args:
        data: the whole file.
        delimiter: the field separator (one character).
        where: ``"CSV <file name>"``, the start of every error message.
        header: :func:`read_header` of ``data``.
        float_columns: positions of columns to try parsing as float64 while reading (plain
            decimals, ``nan``/``inf``; an empty value is null): one pass in C++ instead of
            text then a cast. When any value of them is not such a number, the whole file is
            read again as text, so the caller finds and names the bad values.

    Returns:
        :class:`RawTable`: the header, the columns (text, or float64 for ``float_columns`` when
        that worked), each row's physical line; rows with the wrong number of fields are in
        ``bad_rows``, blank lines only counted.

    Raises:
        DataError: invalid UTF-8, or no data rows; the message names the file, the line and
            the reason.
    """
    view = memoryview(data)
    if data.startswith(_BOM):
        view = view[len(_BOM) :]
    _check_utf8(view, where)
    has_quotes = b'"' in data
    invalid: list[tuple[int | None, int, str]] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        invalid.append((row.number, row.actual_columns, row.text))
        return "skip"

    names = [f"c{i}" for i in range(len(header))]

    def read(types: dict[str, pa.DataType]) -> pa.Table:
        return pacsv.read_csv(
            pa.py_buffer(view),
            read_options=pacsv.ReadOptions(
                column_names=names, skip_rows=1, use_threads=False, block_size=1 << 24
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=delimiter,
                quote_char='"',
                double_quote=True,
                newlines_in_values=has_quotes,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=types,
                null_values=[""],
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )

    text_types: dict[str, pa.DataType] = {n: pa.string() for n in names}
    table = None
    if float_columns:
        typed = {**text_types, **{names[i]: pa.float64() for i in float_columns}}
        try:
            table = read(typed)
        except pa.ArrowInvalid:
            invalid.clear()  # read again as text: the caller names every bad value
    if table is None:
        try:
            table = read(text_types)
        except pa.ArrowInvalid as e:
            raise _arrow_error(bytes(view), e, where) from e
    n = table.num_rows
    total = n + len(invalid) + 1  # records, with the header
    # records and lines differ only when a quoted value holds a line break
    rec_line: np.ndarray | None = None
    if has_quotes:  # checks the quoting too; line numbers differ only with multi-line values
        rec_line = quoted_record_lines(view, delimiter, where)
        if physical_lines(data) == total:
            rec_line = None

    def physical(record: np.ndarray) -> np.ndarray:
        if rec_line is None:
            return record
        return np.asarray(rec_line[np.minimum(record - 1, len(rec_line) - 1)], dtype=np.int64)

    numbers = np.array([r[0] for r in invalid if r[0] is not None], dtype=np.int64)
    records = np.setdiff1d(np.arange(2, total + 1, dtype=np.int64), numbers, assume_unique=True)
    if len(numbers) != len(invalid) or len(records) != n:  # never seen; kept honest
        raise DataError(f"{where}: cannot number the lines of the file (pyarrow {pa.__version__})")
    bad_rows: list[tuple[int, str]] = []
    blank = 0
    expected = len(header)
    for number, actual, text in invalid:
        assert number is not None
        line = int(physical(np.array([number]))[0])
        if actual == 1 and not text.strip():
            blank += 1
        elif actual == 1 and text.lstrip().startswith('"') and text.count('"') % 2:
            bad_rows.append(
                (
                    line,
                    "a quote opened on this line is never closed (the rest of the file is "
                    "inside it)",
                )
            )
        else:
            what = "missing" if actual < expected else "extra"
            bad_rows.append(
                (line, f"{actual} fields where the header has {expected} ({what} fields)")
            )
    columns = [table.column(i) for i in range(len(header))]
    lines = physical(records)
    if n:
        # blank lines of a multi-column file come back as rows of empty fields
        empty = _is_blank(columns[0])
        for col in columns[1:]:
            if not empty.any():
                break
            empty &= _is_blank(col)
        if empty.any():
            blank += int(empty.sum())
            keep = pa.array(~empty)
            columns = [c.filter(keep) for c in columns]
            lines = lines[~empty]
    return RawTable(
        header=header, columns=columns, lines=lines, bad_rows=bad_rows, blank_lines=blank
    )


def _is_blank(col: pa.ChunkedArray) -> np.ndarray:
    if not pa.types.is_string(col.type):
        return np.asarray(col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    blank = pc.or_(pc.equal(col, ""), pc.utf8_is_space(col))
    return np.asarray(blank.to_numpy(zero_copy_only=False), dtype=bool)


def _check_utf8(view: memoryview, where: str) -> None:
    """Refuse invalid UTF-8 with its line, before parsing (pyarrow's own check, zero-copy over
    the file's bytes; a bad byte in a row with the wrong field count would otherwise abort the
    parse inside pyarrow's invalid-row callback)."""
    offsets = pa.py_buffer(np.array([0, len(view)], dtype=np.int64).tobytes())
    blob = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(view)])
    try:
        blob.cast(pa.large_string())
    except pa.ArrowInvalid:
        raw = bytes(view)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as u:
            line = line_of_offset(raw, u.start)
            raise DataError(
                f"{where} line {line}: invalid UTF-8 bytes {raw[u.start : u.end]!r}; save the "
                "file as UTF-8"
            ) from u


def _arrow_error(raw: bytes, e: pa.ArrowInvalid, where: str) -> DataError:
    """A DataError with the line for what pyarrow refused as a whole: invalid UTF-8 (also
    inside a row with the wrong field count, which pyarrow cannot hand to Python), else the row
    pyarrow names."""
    msg = str(e)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as u:
        line = line_of_offset(raw, u.start)
        return DataError(
            f"{where} line {line}: invalid UTF-8 bytes {raw[u.start : u.end]!r}; save the file "
            "as UTF-8"
        )
    if "skip initial" in msg or "Empty CSV" in msg:
        return DataError(f"{where} line 2: no data rows after the header")
    m = re.search(r"Row #(\d+)", msg)
    if m:
        record = int(m.group(1))
        starts = record_lines(raw) if b'"' in raw else None
        line = int(starts[min(record, len(starts)) - 1]) if starts is not None else record
        return DataError(f"{where} line {line}: cannot read the row ({msg})")
    return DataError(f"{where}: cannot read the file ({msg})")
