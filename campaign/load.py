"""Load: a CSV or Excel sheet into rows of text, exactly as the operator typed them.

CSV is read with the standard `csv` module rather than pandas: every cell must stay the
text that was typed (pandas' value is type inference, which we would have to switch off
everywhere), ragged rows must become one `invalid` row instead of a parser error for the
whole file, and the reader streams, so memory does not grow with the file.
Excel files are read with python-calamine: it is fast, reads .xlsx and old .xls alike,
and hands back cell *values* (numbers, dates, booleans, cached formula results), which we
turn into text ourselves.

Limits (the one place they are set; the README repeats them). Memory follows the data
actually in the file, never what it declares about itself:
- any sheet: at most MAX_COLUMNS (16,384, Excel's own) columns in the header row;
- CSV: one cell at most MAX_CSV_CELL_CHARS (64 Mi characters); rows stream in chunks
  of CHUNK_ROWS rows, fewer when a sheet is wide (CHUNK_CELLS cells at most);
- .xlsx, checked before the Excel reader sees it (`campaign.xlsx_check`): each XML part
  at most MAX_XLSX_PART_BYTES (1 GiB) uncompressed, all of them MAX_XLSX_TOTAL_BYTES
  (2 GiB), no part of 1 MiB or more compressed more than MAX_XLSX_RATIO (100) to 1, at
  most MAX_XLSX_PARTS (10,000) parts; a cell's text at most MAX_CELL_CHARS (32,767,
  Excel's own), any other text or tag at most MAX_XLSX_TEXT_CHARS (1 Mi); cells within
  MAX_ROWS x MAX_COLUMNS (Excel's sheet); and a sheet's grid, from its first to its last
  cell, at most XLSX_GRID_FLOOR (2 million) cells or XLSX_GRID_PER_CELL (10) times the
  cells present, whichever is more: the reader holds the whole grid in memory. A zip
  that is an .xlsb or .ods is refused: the reader would take its cells from parts
  the check does not read;
- old .xls: read first in a child process capped at XLS_PROBE_BYTES (1.5 GiB) and
  XLS_PROBE_S (120 s), then its sheets' grids are held to the same rule.
"""

from __future__ import annotations

import codecs
import csv
import datetime as dt
import io
import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campaign.errors import InputError
from campaign.escape import unescape
from campaign.isolate import Failed, inside_child, run_isolated
from campaign.isolate import Refused as ChildRefused
from campaign.xlsx_check import Damaged, Limits, Refused, check_workbook

CHUNK_ROWS = 5_000
CHUNK_CELLS = 500_000
DELIMITERS = (",", ";", "\t", "|")
_SNIFF_BYTES = 64 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_OLE_MAGIC = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"

MAX_ROWS = 1_048_576
MAX_COLUMNS = 16_384
MAX_CELL_CHARS = 32_767
MAX_CSV_CELL_CHARS = 64 * 1024 * 1024
MAX_XLSX_PART_BYTES = 1024 * 1024 * 1024
MAX_XLSX_TOTAL_BYTES = 2 * 1024 * 1024 * 1024
MAX_XLSX_RATIO = 100
XLSX_RATIO_FLOOR = 1024 * 1024
MAX_XLSX_PARTS = 10_000
MAX_XLSX_TEXT_CHARS = 1024 * 1024
XLSX_GRID_FLOOR = 2_000_000
XLSX_GRID_PER_CELL = 10
XLS_PROBE_BYTES = 1536 * 1024 * 1024
XLS_PROBE_S = 120.0

XLSX_LIMITS = Limits(
    part_bytes=MAX_XLSX_PART_BYTES,
    total_bytes=MAX_XLSX_TOTAL_BYTES,
    ratio=MAX_XLSX_RATIO,
    ratio_floor=XLSX_RATIO_FLOOR,
    parts=MAX_XLSX_PARTS,
    cell_chars=MAX_CELL_CHARS,
    text_chars=MAX_XLSX_TEXT_CHARS,
    rows=MAX_ROWS,
    columns=MAX_COLUMNS,
    grid_floor=XLSX_GRID_FLOOR,
    grid_per_cell=XLSX_GRID_PER_CELL,
)

csv.field_size_limit(MAX_CSV_CELL_CHARS)


@dataclass(frozen=True)
class Row:
    number: int  # position under the header, from 1; blank rows keep their numbers
    cells: list[str]  # one per kept column, in input order
    problem: str | None = None  # a reason the row cannot be used as it is


@dataclass
class Sheet:
    path: Path
    columns: list[str]  # header names as written, without the ignored `_` result columns
    chunks: Iterator[list[Row]] = field(repr=False)


def open_sheet(
    path: Path | str,
    sheet: str | None = None,
    *,
    first_row_is_data: Callable[[list[str]], bool] | None = None,
) -> Sheet:
    """Open a spreadsheet; raises `InputError` for anything that is not a usable one.

    `first_row_is_data` says of the first row whether it is data rather than a header:
    then the sheet has no header, its columns are named `column 1`, `column 2`, ... and
    the first row is a row like the others (its number is 0: `_row` + 1 is its line)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, not a spreadsheet")
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except FileNotFoundError:
        raise InputError(path, "input file not found") from None
    except OSError as exc:
        raise InputError(path, f"cannot read input file ({exc.strerror})") from None

    suffix = path.suffix.lower()
    if head.startswith(_ZIP_MAGIC) or head.startswith(_OLE_MAGIC):
        header, records = _excel_records(path, sheet)
    elif suffix in {".xlsx", ".xlsm", ".xls"}:
        what = "plain text (a CSV export with the wrong name?)" if b"\x00" not in head else "data"
        raise InputError(
            path,
            f"is named {suffix} but is not an Excel workbook: it holds {what}; "
            "save it from Excel as .xlsx, or give a CSV file a .csv name",
        )
    else:
        if sheet is not None:
            raise InputError(path, "`sheet:` is set, but a CSV file has no sheets")
        header, records = _csv_records(path, head)
    if first_row_is_data is not None and first_row_is_data(header):
        records = itertools.chain([(0, header)], records)
        header = [f"column {i + 1}" for i in range(len(header))]
    return _sheet(path, header, records)


def _sheet(path: Path, header: list[str], records: Iterator[tuple[int, list[str]]]) -> Sheet:
    if len(header) > MAX_COLUMNS:
        raise InputError(
            path,
            f"the header row has {len(header)} columns; a sheet has at most {MAX_COLUMNS} "
            "(as in Excel)",
        )
    keep = [i for i, name in enumerate(header) if not name.strip().startswith("_")]
    # The report escapes header cells like any other: a results CSV read back as input
    # must give the job's column names again.
    columns = [unescape(header[i]) for i in keep]
    width = len(header)

    def rows() -> Iterator[Row]:
        for number, cells in records:
            if not any(cell.strip() for cell in cells):
                continue
            problem = None
            if len(cells) > width:
                extra = cells[width:]
                if any(cell.strip() for cell in extra):
                    problem = f"row has {len(cells)} cells but the header has {width} columns"
                cells = cells[:width]
            elif len(cells) < width:
                cells = cells + [""] * (width - len(cells))
            yield Row(number, [unescape(cells[i]) for i in keep], problem)

    # Look at the first data row now: a header with nothing under it is almost always a
    # truncated or wrong export, and must stop the run before a campaign is started.
    stream = rows()
    first = next(stream, None)
    if first is None:
        raise InputError(path, "has a header row but no data rows under it")
    # A chunk holds CHUNK_ROWS rows, or fewer of a wide sheet: its memory is by cells.
    size = max(1, min(CHUNK_ROWS, CHUNK_CELLS // max(len(columns), 1)))
    return Sheet(path, columns, _chunked(itertools.chain([first], stream), size))


def _chunked(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _numbered(
    path: Path, records: Iterator[list[str]]
) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """Find the header (the first non-blank record) and number the records under it."""
    for header in records:
        if any(cell.strip() for cell in header):
            break
    else:
        raise InputError(path, "the file is empty: no header row and no data")
    return header, ((number, cells) for number, cells in enumerate(records, start=1))


# --- CSV -------------------------------------------------------------------------------


def _csv_records(path: Path, head: bytes) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    encoding = _detect_encoding(path, head)
    text = head.decode(encoding, errors="replace")
    delimiter = _sniff_delimiter(text)
    handle = path.open("r", encoding=encoding, newline="")

    def records() -> Iterator[list[str]]:
        # Lenient parsing keeps `"Ann" Smith` as one cell, but it also lets a quote that is
        # never closed swallow the rest of the file into one cell: checked at the end.
        reader = csv.reader(handle, delimiter=delimiter, strict=False)
        record: list[str] = []
        start = end = 0
        try:
            for record in reader:
                start, end = end + 1, reader.line_num
                yield record
        except csv.Error as exc:
            raise InputError(path, f"unreadable CSV at line {reader.line_num}: {exc}") from None
        except UnicodeDecodeError:
            where = f"near line {reader.line_num + 1}"
            raise InputError(path, f"is not valid {encoding} text {where}") from None
        finally:
            handle.close()
        ends_in_newline = bool(record) and record[-1].endswith(("\n", "\r"))
        if ends_in_newline and _quote_left_open(path, encoding, delimiter, start):
            raise InputError(
                path,
                f"the quote that opens a cell on line {start} is never closed, so every "
                'line after it would be read as part of that cell; add the missing "',
            )

    header, numbered = _numbered(path, records())
    return header, numbered


def _quote_left_open(path: Path, encoding: str, delimiter: str, line: int) -> bool:
    """Does the record starting at `line` run into the end of the file inside quotes?"""
    with path.open("r", encoding=encoding, newline="") as handle:
        strict = csv.reader(
            itertools.islice(handle, line - 1, None), delimiter=delimiter, strict=True
        )
        try:
            for _ in strict:
                pass
        except csv.Error as exc:
            return "unexpected end of data" in str(exc)
    return False


def _detect_encoding(path: Path, head: bytes) -> str:
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    if b"\x00" in head:
        raise InputError(path, "is not a CSV or Excel file (it holds binary data)")
    utf8 = "utf-8-sig" if head.startswith(codecs.BOM_UTF8) else "utf-8"
    bad_line = _first_bad_line(path, utf8)
    if bad_line is None:
        return utf8
    # Reading a file that is mostly UTF-8 as cp1252 would send "JosÃ©" to José.
    if utf8 == "utf-8-sig" or _has_utf8_sequences(path):
        raise InputError(
            path,
            f"mixes text encodings: it is UTF-8, but line {bad_line} is not; "
            "save the whole file again as UTF-8",
        )
    if _first_bad_line(path, "cp1252") is None:
        return "cp1252"
    raise InputError(path, "is not a text file in UTF-8, UTF-16 or Windows-1252 (cp1252)")


def _first_bad_line(path: Path, encoding: str) -> int | None:
    """The line holding the first byte that does not decode, or None if all do."""
    decoder = codecs.getincrementaldecoder(encoding)()
    lines = 1
    with path.open("rb") as handle:
        while True:
            block = handle.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                return lines + block[: max(exc.start - len(exc.object) + len(block), 0)].count(
                    b"\n"
                )
            if not block:
                return None
            lines += block.count(b"\n")


_UTF8_SEQUENCE = re.compile(
    rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)


def _has_utf8_sequences(path: Path) -> bool:
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            if _UTF8_SEQUENCE.search(block):
                return True
    return False


def _sniff_delimiter(text: str) -> str:
    """The candidate that splits the header line most often (`,` when none does)."""
    try:  # newline="": old Mac files end lines with a bare CR
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\x00")
        first = next((line[0] for line in reader if line and line[0].strip()), "")
    except csv.Error:
        first = next((line for line in text.splitlines() if line.strip()), "")
    counts = {d: first.count(d) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


# --- Excel -----------------------------------------------------------------------------


def _excel_records(
    path: Path, sheet: str | None
) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    from python_calamine import CalamineWorkbook

    if _is_zip(path):
        try:
            check_workbook(str(path), XLSX_LIMITS)
        except Damaged as exc:
            raise InputError(path, _unreadable_workbook(path, exc)) from None
        except Refused as exc:
            raise InputError(path, str(exc)) from None
    else:
        _check_old_workbook(path)
    try:
        book = CalamineWorkbook.from_path(str(path))
    except Exception as exc:  # calamine raises several unrelated types for a corrupt file
        raise InputError(path, _unreadable_workbook(path, exc)) from None
    if sheet is not None and sheet not in book.sheet_names:
        known = ", ".join(repr(n) for n in book.sheet_names)
        raise InputError(path, f"no sheet named {sheet!r} (sheets: {known})")
    for name in [sheet] if sheet is not None else book.sheet_names:
        try:
            rows = book.get_sheet_by_name(name).iter_rows()
            records = (list(map(excel_text, row)) for row in rows)
            return _numbered(path, records)
        except InputError:
            continue  # empty sheet: the default is the first sheet with data
        except Exception as exc:
            raise InputError(path, f"cannot read sheet {name!r} ({_short(exc)})") from None
    raise InputError(path, f"sheet {sheet!r} is empty" if sheet else "no sheet has any data")


def _check_old_workbook(path: Path) -> None:
    """An old .xls, before it is read here: the reader builds each sheet as one grid up
    to its last cell, and a cell record may name any of 65,536 columns, so 5 KB can ask
    for 137 GB (an abort); its strings table reserves what it claims. There is no cheap
    look inside the container, so a child process reads it first, capped
    (`campaign.isolate`), and says how large each sheet's grid is and how many cells it
    holds; the grid must pass the rule of an .xlsx sheet."""
    try:
        if inside_child():  # already capped, and not allowed children of its own
            sheets = _grids(str(path))
        else:
            sheets = run_isolated(
                _grids, (str(path),), memory_bytes=XLS_PROBE_BYTES, timeout_s=XLS_PROBE_S
            )
    except (Failed, ChildRefused) as exc:
        raise InputError(
            path,
            f"is refused: the Excel reader cannot read this .xls within "
            f"{XLS_PROBE_BYTES // 2**20} MB and {XLS_PROBE_S:.0f} s ({exc}); "
            "save it as .xlsx or CSV",
        ) from None
    for number, (rows, columns, cells) in enumerate(sheets, start=1):
        allowed = max(XLSX_GRID_FLOOR, XLSX_GRID_PER_CELL * cells)
        if rows * columns > allowed:
            raise InputError(
                path,
                f"is refused: sheet {number} spreads {cells} cells over {rows} rows and "
                f"{columns} columns: reading it would take memory for {rows * columns} "
                f"cells (at most {allowed} for this many); delete the empty rows and "
                "columns between them, or copy the data to a new sheet",
            )


def _grids(path: str) -> list[tuple[int, int, int]]:
    """Each sheet's grid (rows, columns) and the cells in it that hold something; empty
    when the workbook cannot be read at all (the caller's reading says why)."""
    from python_calamine import CalamineWorkbook

    try:
        book = CalamineWorkbook.from_path(path)
        found = []
        for name in book.sheet_names:
            grid = book.get_sheet_by_name(name)
            rows, columns = grid.height, grid.width
            cells = rows * columns
            if cells > XLSX_GRID_FLOOR:
                cells = sum(v not in ("", None) for row in grid.iter_rows() for v in row)
            found.append((rows, columns, cells))
        return found
    except Exception:
        return []


def excel_text(value: Any) -> str:
    """An Excel cell value as the text an operator means by it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e21:
            return str(int(value))
        return repr(value)
    if isinstance(value, dt.datetime):
        if value.time() == dt.time(0):
            return value.date().isoformat()
        return value.isoformat(timespec="seconds" if not value.microsecond else "auto")
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        seconds = int(value.total_seconds())
        return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return str(value)


def _is_zip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC


def _unreadable_workbook(path: Path, exc: Exception) -> str:
    with path.open("rb") as handle:
        old_format = handle.read(len(_OLE_MAGIC)) == _OLE_MAGIC
    kind = "an old Excel .xls file" if old_format else "an Excel .xlsx file (a zip archive)"
    return (
        f"looks like {kind} but cannot be read: it is damaged, incomplete or not a "
        f"workbook ({_short(exc)}); open it in Excel and save it again as .xlsx or CSV"
    )


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
