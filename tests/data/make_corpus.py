"""Write the messy-input corpus next to this file: `python tests/data/make_corpus.py`.

The generated files are committed, so the tests need neither this script nor the writers
it uses (openpyxl for .xlsx, xlwt for the old .xls format: `pip install xlwt`, only here).
Text files are written byte for byte (encodings, BOMs, CRLF), which an editor would undo.
Expected outcomes: README.md beside this file and tests/test_corpus.py.
"""

from __future__ import annotations

import datetime as dt
import io
import random
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEADER = "First Name,Phone,Employee ID"


def text(name: str, content: str, encoding: str = "utf-8", newline: str = "\n") -> None:
    (HERE / name).write_bytes(content.replace("\n", newline).encode(encoding))


def write_text_files() -> None:
    text("empty.csv", "")
    text("blank_lines_only.csv", "\n  \n\n")
    text("header_only.csv", HEADER + "\n")
    text("header_and_blank_rows.csv", HEADER + "\n,,\n\n")
    text("no_header.csv", "Ann,415 555 0101,1\nBob,415 555 0102,2\n")
    text("missing_column.csv", "Name,Phone,Employee ID\nAnn,415 555 0101,1\n")
    text("duplicate_header.csv", "Phone,First Name,Phone\n415 555 0101,Ann,415 555 0102\n")
    random.seed(7)
    (HERE / "garbage.csv").write_bytes(bytes(random.randrange(256) for _ in range(4096)))
    # 0x81 and 0x8D are undefined in cp1252 and invalid UTF-8 on their own.
    (HERE / "bad_encoding.csv").write_bytes(
        (HEADER + "\nAnn,415 555 0101,1\n").encode() + b"B\x81\x8dob,415 555 0102,2\n"
    )
    (HERE / "mixed_encoding.csv").write_bytes(
        (HEADER + "\nJosé,415 555 0101,1\n").encode()
        + "Françoise,415 555 0102,2\n".encode("cp1252")
    )
    text(
        "unclosed_quote.csv",
        HEADER + '\nAnn,415 555 0101,1\n"Bob,415 555 0102,2\nCy,415 555 0103,3\n',
    )
    text("not_a_workbook.xlsx", HEADER + "\nAnn,415 555 0101,1\n")
    (HERE / "ole_garbage.xls").write_bytes(
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(range(256)) * 8
    )

    text("cp1252.csv", HEADER + "\nJosé,415 555 0101,1\nFrançoise €,415 555 0102,2\n", "cp1252")
    text("utf8_bom.csv", HEADER + "\nZoë,415 555 0101,1\n", "utf-8-sig")
    text("semicolon.csv", "First Name;Phone;Employee ID\nAnn, Jr.;415 555 0101;1\n")
    text("tab.csv", "First Name\tPhone\tEmployee ID\nAnn, Jr.\t415 555 0101\t1\n")
    text("pipe.csv", "First Name|Phone|Employee ID\nAnn; Jr.|415 555 0101|1\n")
    text(
        "odd_headers.csv",
        " First Name ,Phone  ,,Note,Note\nAnn,415 555 0101,x,a,b\n",
    )
    text(
        "ragged.csv",
        HEADER + "\n"
        "Ann,415 555 0101\n"  # short: padded, sent without emp_id
        "Bob,415 555 0102,2,surplus\n"  # long with a value: invalid
        "Cy,415 555 0103,3,,\n",  # long but the extra cells are empty: fine
    )
    text(
        "quoted_newlines.csv",
        HEADER + '\n"Ann\nMarie",415 555 0101,1\n"Bob ""B"" Jones",415 555 0102,"2"\n',
    )
    text("crlf.csv", HEADER + "\nAnn,415 555 0101,1\nBob,415 555 0102,2\n", newline="\r\n")
    text("cr_only.csv", HEADER + "\nAnn,415 555 0101,1\nBob,415 555 0102,2\n", newline="\r")
    text("blank_rows.csv", HEADER + "\nAnn,415 555 0101,1\n\n , ,\nCy,415 555 0103,3\n")
    phones = [
        ("A", "(415) 555-0101"),
        ("B", "415.555.0102"),
        ("C", "4155550103"),
        ("D", "+1 415 555 0104"),
        ("E", "1-415-555-0105"),
        ("F", "+44 20 7946 0958"),
        ("G", "011 44 20 7946 0959"),
        ("H", "1-800-FLOWERS"),
        ("I", "415-555-0109 ext. 12"),
        ("J", "555-01"),
        ("K", "call me"),
        ("L", "4.15555E+09"),
        ("M", "+1 (415) 555-0101"),
        ("N", ""),
        ("O", "123 456 7890"),
        ("P", "4155550116.0"),
        ("Q", "415 555 0117, 415 555 0118"),
    ]
    quoted = [(n, f'"{p}"' if "," in p else p) for n, p in phones]
    text("phones.csv", HEADER + "\n" + "".join(f"{n},{p},{i}\n" for i, (n, p) in enumerate(quoted)))
    text(
        "leading_zeros.csv",
        HEADER + "\nAnn,415 555 0101,00123\nBob,0014155550102,000\n",
    )
    text(
        "nan_words.csv",
        HEADER
        + "\n"
        + "".join(
            f"{word},415 555 01{i:02d},{word}\n"
            for i, word in enumerate(["NA", "null", "None", "#N/A", "NaN", "N/A", "nan", "-"], 1)
        ),
    )
    text(
        "formulas.csv",
        HEADER + "\n"
        "=1+2,415 555 0101,@SUM(A1)\n"
        "+cmd|x,415 555 0102,-2+3\n"
        '"\tTabbed",415 555 0103,-42\n'
        '-1.5,+1 415 555 0104,"=HYPERLINK(""http://127.0.0.1/x"",""x"")"\n'
        "'=already,415 555 0105,'plain\n",
    )
    text(
        "unicode_text.txt",
        "First Name\tPhone\tEmployee ID\nŁukasz\t415 555 0101\t1\n日本\t415 555 0102\t2\n",
        "utf-16",  # Python's utf-16 writes the BOM; little-endian on every supported machine
        "\r\n",
    )
    text("big_cell.csv", HEADER + "\n" + "x" * 100_000 + ",415 555 0101,1\nBob,415 555 0102,2\n")


def write_workbooks() -> None:
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Recipients"
    sheet.append(["First Name", "Phone", "Employee ID", "Joined", "Active", "Score", "At", "Sum"])
    sheet.append(["Ann", 4155550101, "00123", dt.date(2024, 3, 5), True, 12.5, None, "=F2*2"])
    sheet.append(
        ["Bob", 14155550102.0, 1234, dt.datetime(2024, 3, 5, 14, 30), False, 1e3, "x", "=F3*2"]
    )
    sheet.append([None, None, None, None, None, None, None, None])
    sheet.append(["Cy", "+1 415 555 0103", 7, None, None, -3, dt.time(9, 15), "=F5*2"])
    book.save(HERE / "types.xlsx")
    # openpyxl writes formulas without the value Excel caches beside them; add the values
    # Excel would have saved, since a reader must give those, not the formula.
    cached = {"H2": "25", "H3": "2000", "H5": "-6"}
    _rewrite_zip_member(
        HERE / "types.xlsx",
        "xl/worksheets/sheet1.xml",
        lambda xml: re.sub(
            r'(<c r="(H\d)"[^>]*>)(<f>[^<]*</f>)(<v\s*/>|<v></v>)?',
            lambda m: f"{m.group(1)}{m.group(3)}<v>{cached[m.group(2)]}</v>",
            xml,
        ),
    )

    book = Workbook()
    first = book.active
    assert first is not None
    first.title = "Notes"
    data = book.create_sheet("Data")
    data.append(["First Name", "Phone", "Employee ID"])
    data.append(["Ann", "415 555 0101", "1"])
    book.save(HERE / "empty_first_sheet.xlsx")

    book = Workbook()
    book.save(HERE / "empty_workbook.xlsx")

    whole = (HERE / "types.xlsx").read_bytes()
    (HERE / "truncated.xlsx").write_bytes(whole[: len(whole) // 2])

    # A zip that holds no workbook at all.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "not a workbook")
    (HERE / "plain_zip.xlsx").write_bytes(buffer.getvalue())


def _rewrite_zip_member(path: Path, member: str, change: Callable[[str], str]) -> None:
    with zipfile.ZipFile(path) as source:
        items = [(info, source.read(info)) for info in source.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info, data in items:
            if info.filename == member:
                data = change(data.decode("utf-8")).encode("utf-8")
            target.writestr(info, data)


def write_xls() -> None:
    import xlwt

    book = xlwt.Workbook()
    sheet = book.add_sheet("Legacy")
    dates = xlwt.easyxf(num_format_str="YYYY-MM-DD")
    for col, name in enumerate(["First Name", "Phone", "Employee ID", "Joined"]):
        sheet.write(0, col, name)
    sheet.write(1, 0, "Ann")
    sheet.write(1, 1, 4155550101)
    sheet.write(1, 2, "00123")
    sheet.write(1, 3, dt.date(2024, 3, 5), dates)
    sheet.write(2, 0, "Bob")
    sheet.write(2, 1, "+1 415 555 0102")
    sheet.write(2, 2, 42)
    book.save(str(HERE / "legacy.xls"))


if __name__ == "__main__":
    write_text_files()
    write_workbooks()
    if "--no-xls" not in sys.argv:
        write_xls()
