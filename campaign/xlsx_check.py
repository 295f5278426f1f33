"""A look inside an .xlsx file before the Excel reader builds anything from it.

python-calamine builds a sheet as one grid from its first to its last cell, and reads
every part of the zip whole: a 1.5 KB file with cells at A1 and XFD1048576 asks it for
half a terabyte (a Rust abort that no `except` catches), and a 1.5 MB zip holding one
1.5 GB cell takes gigabytes. So the zip is read here first, in bounded memory: each part
the reader may parse is inflated in small pieces (its sizes are counted, not taken from
the zip's own directory, which can lie) and streamed through an XML parser that keeps
only counters: where the cells are, how many there are, how long each one's text is.
A workbook past any limit is refused with one line saying which limit; the limits are
`campaign.load`'s (stated in its docstring).

Positions follow the reader's own rules: a `<row>` or `<c>` without its `r` attribute
takes the next row or column, so a sheet of empty `<row/>` elements moves its last cell
down as surely as an `r` that says so.
"""

from __future__ import annotations

import functools
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO
from xml.parsers import expat

_READ = 64 * 1024  # compressed bytes read at a time
_INFLATE = 256 * 1024  # most bytes one inflate step may give
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature ... file name length, extra length
_DIGITS = "0123456789"
# Parts the reader parses as XML: every one is checked, whatever the workbook says.
_XML_SUFFIXES = (".xml", ".rels")
_LINK_PARTS = ("xl/workbook.xml", "xl/_rels/workbook.xml.rels")


@dataclass(frozen=True)
class Limits:
    part_bytes: int  # one part, uncompressed
    total_bytes: int  # every XML part together, uncompressed
    ratio: int  # uncompressed / compressed, for parts of at least ratio_floor bytes
    ratio_floor: int
    parts: int  # entries in the zip
    cell_chars: int  # the text of one cell (or one shared string)
    text_chars: int  # any other text run, and the longest tag the parser may hold
    rows: int
    columns: int
    grid_floor: int  # a sheet's grid (rows x columns spanned) is always allowed this big
    grid_per_cell: int  # beyond the floor, this many grid cells for each cell present


class Refused(Exception):
    """The workbook is past a limit; `str()` says which (to follow the file's name), and
    never quotes a cell."""


class Damaged(Refused):
    """The file is not a readable .xlsx at all; `str()` says what is wrong with it."""


def check_workbook(path: str, limits: Limits) -> None:
    """Raise `Refused` unless every XML part of the .xlsx at `path` is within `limits`."""
    try:
        book = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise Damaged(f"not a readable zip archive: {exc}") from None
    with book, open(path, "rb") as handle:
        members = book.infolist()
        if len(members) > limits.parts:
            raise Refused(
                f"is refused: it holds {len(members)} parts; a workbook has at most {limits.parts}"
            )
        names = {m.filename.lower() for m in members}
        _check_kind(names)
        total, links = 0, _Links()
        for member in members:
            if not member.filename.lower().endswith(_XML_SUFFIXES):
                continue  # images, printer settings, macros: the reader never opens them
            total += _check_part(handle, member, limits, links)
            if total > limits.total_bytes:
                raise Refused(
                    f"is refused: its XML parts hold more than {limits.total_bytes // 2**20} "
                    "MB uncompressed, more than any workbook this tool reads"
                )
        links.check()


class _Links:
    """Which parts hold the sheets: every XML part is checked above, so a sheet kept in
    a part of another name would be the one the reader reads unchecked."""

    def __init__(self) -> None:
        self.sheets: list[str] = []  # the relationship ids of xl/workbook.xml's <sheet>s
        self.targets: dict[str, str] = {}  # xl/_rels/workbook.xml.rels: id -> target

    def check(self) -> None:
        for number, sheet in enumerate(self.sheets, start=1):
            target = self.targets.get(sheet, "")
            if target and not target.lower().endswith(".xml"):
                raise Refused(f"is refused: sheet {number} is kept in a part that is not XML")


def _check_kind(names: set[str]) -> None:
    """Only .xlsx (and .xlsm): the reader picks other formats by the file's name, and
    those keep their cells in parts this check does not read."""
    if "xl/workbook.bin" in names:
        raise Refused("is a binary Excel workbook (.xlsb); save it as .xlsx or CSV")
    if "mimetype" in names or "content.xml" in names:
        raise Refused("is an OpenDocument spreadsheet (.ods); save it as .xlsx or CSV")
    if "xl/workbook.xml" not in names:
        raise Damaged("a zip archive without xl/workbook.xml")


def _check_part(handle: BinaryIO, member: zipfile.ZipInfo, limits: Limits, links: _Links) -> int:
    name = member.filename
    if member.flag_bits & 0x1:
        raise Damaged(f"part {name} is encrypted")
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise Damaged(f"part {name} uses a compression Excel does not write")
    if member.file_size > limits.part_bytes:
        raise Refused(_too_big(name, limits))
    scan = _Scan(name, limits, links if name.lower() in _LINK_PARTS else None)
    size = 0
    for data in _inflated(handle, member):
        size += len(data)
        if size > limits.part_bytes:
            raise Refused(_too_big(name, limits))
        if size >= limits.ratio_floor and size > limits.ratio * max(member.compress_size, 1):
            raise Refused(
                f"is refused: part {name} is compressed more than {limits.ratio} to 1, as no real "
                "workbook is (a zip bomb?)"
            )
        scan.feed(data)
    if size != member.file_size:
        raise Damaged(f"part {name} is not the size the zip states")
    scan.close()
    return size


def _too_big(name: str, limits: Limits) -> str:
    return (
        f"is refused: part {name} is larger than {limits.part_bytes // 2**20} MB uncompressed, "
        "more than any workbook this tool reads"
    )


def _inflated(handle: BinaryIO, member: zipfile.ZipInfo) -> Iterator[bytes]:
    """The member's bytes as the Excel reader gets them: its compressed bytes inflated
    until the deflate stream ends, whatever size the zip's directory states."""
    handle.seek(member.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise Damaged(f"part {member.filename} has no local header")
    _, name_length, extra_length = _LOCAL_HEADER.unpack(header)
    handle.seek(member.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)
    left = member.compress_size
    while left > 0:
        raw = handle.read(min(left, _READ))
        if not raw:
            raise Damaged(f"part {member.filename} is cut short")
        left -= len(raw)
        if member.compress_type == zipfile.ZIP_STORED:
            yield raw
            continue
        try:
            data = inflate.decompress(raw, _INFLATE)
            yield data
            while inflate.unconsumed_tail:
                yield inflate.decompress(inflate.unconsumed_tail, _INFLATE)
        except zlib.error:
            raise Damaged(f"part {member.filename} has bad compressed data") from None
        if inflate.eof:
            return


class _Scan:
    """One part through expat, keeping counters only. The text of a cell (`<c>`, or a
    shared string `<si>`) is counted across its pieces; any other run of text is counted
    on its own. A parser that reports nothing while it is fed more than `text_chars`
    bytes is holding one huge tag (or comment) in its buffer: refused."""

    def __init__(self, name: str, limits: Limits, links: _Links | None = None) -> None:
        self.name, self.limits, self.links = name, limits, links
        parser = expat.ParserCreate()
        parser.buffer_text = True
        parser.buffer_size = 64 * 1024
        parser.StartElementHandler = self._start
        parser.EndElementHandler = self._end
        parser.CharacterDataHandler = self._text
        parser.CommentHandler = self._other
        parser.ProcessingInstructionHandler = self._other
        parser.StartDoctypeDeclHandler = self._doctype
        self.parser = parser
        self.events = 0
        self.silent = 0  # bytes fed since the parser last reported something
        self.in_sheet = 0  # depth of <sheetData>
        self.item = 0  # depth of <c> / <si>
        self.chars = 0  # text of the current cell, or of the current run elsewhere
        self.row = 0  # 0-based, as the reader counts
        self.column = 0
        self.cells = 0
        self.strings = 0  # <si> elements
        self.declared = 0  # what <sst uniqueCount> says there are
        self.top = self.left = 1 << 31
        self.bottom = self.right = -1

    def feed(self, data: bytes) -> None:
        before = self.events
        self._parse(data, final=False)
        self.silent = self.silent + len(data) if self.events == before else 0
        if self.silent > self.limits.text_chars:
            raise Refused(
                f"is refused: part {self.name} holds a tag or comment longer than "
                f"{self.limits.text_chars} bytes, which no workbook does"
            )

    def close(self) -> None:
        self._parse(b"", final=True)
        if self.cells:
            self._check_grid()
        allowed = max(self.limits.grid_floor, self.limits.grid_per_cell * self.strings)
        if self.declared > allowed:
            raise Refused(
                f"is refused: part {self.name} says it holds {self.declared} strings but "
                f"holds {self.strings}: reading it would reserve memory for them all"
            )

    def _parse(self, data: bytes, final: bool) -> None:
        try:
            self.parser.Parse(data, final)
        except expat.ExpatError as exc:
            where = f"line {exc.lineno}" if exc.lineno else "its start"
            raise Damaged(f"part {self.name} is not well-formed XML (at {where})") from None

    def _start(self, tag: str, attributes: dict[str, str]) -> None:
        self.events += 1
        if ":" in tag:
            tag = tag.rpartition(":")[2]
        if self.in_sheet:
            if tag == "c":
                self._cell(attributes.get("r"))
                self.item += 1
            elif tag == "row":
                self._row(attributes.get("r"))
            elif tag == "sheetData":
                self.in_sheet += 1
        elif tag == "sheetData":
            self.in_sheet = 1
        elif tag == "si":
            self.item += 1
            self.strings += 1
        elif tag == "sst":
            # The reader reserves room for this many shared strings before reading one.
            self.declared = _declared_count(attributes.get("uniqueCount", ""))
        elif self.links is not None:
            self._link(tag, attributes)
        if not self.item:
            self.chars = 0

    def _end(self, tag: str) -> None:
        self.events += 1
        if ":" in tag:
            tag = tag.rpartition(":")[2]
        if self.in_sheet:
            if tag == "c":
                self.item -= 1
                self.column += 1
            elif tag == "row":
                self.row += 1
                self.column = 0
            elif tag == "sheetData":
                self.in_sheet -= 1
        elif tag == "si" and self.item:
            self.item -= 1
        if not self.item:
            self.chars = 0

    def _link(self, tag: str, attributes: dict[str, str]) -> None:
        assert self.links is not None
        if tag == "sheet":
            ids = [v for k, v in attributes.items() if k.rpartition(":")[2] == "id"]
            self.links.sheets.extend(ids[:1])
        elif tag == "Relationship" and "Id" in attributes:
            self.links.targets[attributes["Id"]] = attributes.get("Target", "")

    def _text(self, text: str) -> None:
        self.events += 1
        self.chars += len(text)
        if self.item and self.chars > self.limits.cell_chars:
            raise Refused(
                f"is refused: part {self.name} holds a cell of more than {self.limits.cell_chars} "
                "characters, more than Excel allows in a cell"
            )
        if self.chars > self.limits.text_chars:
            raise Refused(
                f"is refused: part {self.name} holds a run of text longer than "
                f"{self.limits.text_chars} characters, which no workbook does"
            )

    def _other(self, *_: object) -> None:
        self.events += 1

    def _doctype(self, *_: object) -> None:
        raise Refused(f"is refused: part {self.name} declares a DTD, which no workbook does")

    def _row(self, ref: str | None) -> None:
        if ref is not None:
            self.row = _row_of(ref) - 1
            if self.row < 0:
                raise Refused(
                    f"is refused: part {self.name} has a row numbered other than 1, 2, ..."
                )

    def _cell(self, ref: str | None) -> None:
        if ref is None:
            row, column = self.row, self.column
        else:
            letters = ref.rstrip(_DIGITS)
            row, column = _row_of(ref[len(letters) :]) - 1, _column_of(letters)
            if row < 0 or column < 0:
                raise Refused(
                    f"is refused: part {self.name} has a cell whose position is not a cell address"
                )
            self.column = column
        if row >= self.limits.rows or column >= self.limits.columns:
            raise Refused(
                f"is refused: part {self.name} has a cell beyond row {self.limits.rows} or column "
                f"{self.limits.columns}, the last ones Excel has"
            )
        self.cells += 1
        if row < self.top:
            self.top = row
        if row > self.bottom:
            self.bottom = row
        if column < self.left:
            self.left = column
        if column > self.right:
            self.right = column

    def _check_grid(self) -> None:
        rows, columns = self.bottom - self.top + 1, self.right - self.left + 1
        allowed = max(self.limits.grid_floor, self.limits.grid_per_cell * self.cells)
        if rows * columns > allowed:
            raise Refused(
                f"is refused: part {self.name} spreads {self.cells} cells over {rows} rows "
                f"and {columns} columns: reading it would take memory for {rows * columns} "
                f"cells (at most {allowed} for this many); delete the empty rows and "
                "columns between them, or copy the data to a new sheet"
            )


def _declared_count(text: str) -> int:
    """A count as the reader takes it (an unsigned number, a `+` allowed), else 0."""
    digits = text[1:] if text.startswith("+") else text
    return int(digits) if digits.isascii() and digits.isdigit() else 0


def _row_of(digits: str) -> int:
    """A row number as written (1-based), or 0 when it is not one."""
    if 0 < len(digits) <= 7 and digits.isascii() and digits.isdigit():
        return int(digits)
    return 0


@functools.lru_cache(maxsize=4096)
def _column_of(letters: str) -> int:
    """A column's letters as a 0-based index (A is 0), or -1 when they are not letters."""
    if not (0 < len(letters) <= 3 and letters.isascii() and letters.isalpha()):
        return -1
    index = 0
    for letter in letters.upper():
        index = index * 26 + ord(letter) - ord("A") + 1
    return index - 1
