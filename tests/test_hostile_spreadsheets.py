"""Spreadsheets built to hurt: a sparse .xlsx that asks for a 17-billion-cell grid, a zip
bomb, a header row that is a person, a sheet 100,000 columns wide, a 5 MB cell. Each is
one clear line (exit 2 on the command line, 400 on the page) in bounded memory, and the
page server, with a campaign sending through it, lives on."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
import zipfile
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign.errors import InputError
from campaign.isolate import Failed, run_isolated
from campaign.load import MAX_CELL_CHARS, MAX_COLUMNS, XLSX_GRID_FLOOR, open_sheet
from campaign.web.guess import PREVIEW_CHARS, PREVIEW_COLUMNS, PREVIEW_ROWS
from tests.helpers import (
    ROOT,
    FaultServer,
    cli,
    cli_peak_memory,
    loaded_or_refused,
    serve,
    soak_trials,
    write_job,
    write_xlsx,
    xls_with_cell_at,
    xlsx_cell,
)

PEAK_MEMORY = 300 * 1024 * 1024
RECIPIENTS = ROOT / "sample_data" / "recipients.xlsx"  # 43 to send, 5 invalid, 2 duplicates
SERVE_TOKEN = "test-token-hostile-input"  # at least 16 characters, or serve refuses it
AUTH = {"Authorization": f"Bearer {SERVE_TOKEN}"}
WAIT_S = 60


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sparse", "bomb"])
def test_validate_refuses_a_workbook_built_to_exhaust_memory_in_bounded_memory(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    source: Path = request.getfixturevalue(f"{kind}_workbook")
    # A mapping the files fit: what stops them must be their size, not a missing column.
    job = write_job(tmp_path, "http://127.0.0.1:9", mapping={"params": {}})
    done, peak = cli_peak_memory("validate", str(job), "--input", str(source))
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    line = one_line(done.stderr)
    assert str(source) in line and "is refused" in line
    assert peak <= PEAK_MEMORY, f"validate peaked at {peak / 2**20:.0f} MB"


def test_suppress_import_of_a_sparse_workbook_is_exit_2_and_adds_nothing(
    tmp_path: Path, sparse_workbook: Path
) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    done = cli("suppress", "import", str(job), str(sparse_workbook))
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "XFD1048576" not in one_line(done.stderr)  # positions, never cells, are named
    assert cli("suppress", "list", str(job)).stdout.strip() == "phone,reason,source,added_at"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("numbers.csv", "+14155550101\n+14155550102\n4155550103\n"),
        ("one.csv", "+14155550101\n"),
        ("numbers.xlsx", None),
    ],
    ids=["csv", "one-number", "xlsx-number-cells"],
)
def test_suppress_import_of_a_file_without_a_header_adds_its_first_number(
    tmp_path: Path, name: str, content: str | None
) -> None:
    source = tmp_path / name
    if content is not None:
        source.write_text(content)
        expected = {"+14155550101", "+14155550102", "+14155550103"}
        expected = {p for p in expected if p[-4:] in content}
    else:
        openpyxl = pytest.importorskip("openpyxl")
        book = openpyxl.Workbook()
        for number in (4155550101, 4155550102):  # number cells, as Excel keeps them
            book.active.append([number])
        book.save(source)
        expected = {"+14155550101", "+14155550102"}
    job = write_job(tmp_path, "http://127.0.0.1:9")
    done = cli("suppress", "import", str(job), str(source))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"added {len(expected)}," in done.stdout and "0 not added" in done.stdout
    listed = cli("suppress", "list", str(job)).stdout.splitlines()[1:]
    assert {line.split(",")[0] for line in listed} == expected
    for number in ("4155550101", "4155550102"):
        assert number not in done.stdout + done.stderr  # no cell in any message


def test_suppress_import_column_message_of_a_headerless_file_quotes_no_cell(
    tmp_path: Path,
) -> None:
    source = tmp_path / "numbers.csv"
    source.write_text("+14155550101,Ann\n+14155550102,Bob\n")
    job = write_job(tmp_path, "http://127.0.0.1:9")
    done = cli("suppress", "import", str(job), str(source), "--column", "Mobile")
    assert done.returncode == 2
    line = one_line(done.stderr)
    assert "'Mobile'" in line and "no such column" in line
    assert "4155550101" not in line and "Ann" not in line


# --- the loader's limits, at the limit ------------------------------------------------------------


def _people(*rows: bytes) -> list[bytes]:
    return [b'<row r="1">' + xlsx_cell("A1", "Phone") + b"</row>", *rows]


def test_a_cell_as_long_as_excel_allows_is_read_and_one_more_character_is_refused(
    tmp_path: Path,
) -> None:
    longest = "z" * MAX_CELL_CHARS
    path = write_xlsx(
        tmp_path / "long.xlsx", _people(b"<row>" + xlsx_cell("A2", longest) + b"</row>")
    )
    sheet = open_sheet(path)
    assert [row.cells for chunk in sheet.chunks for row in chunk] == [[longest]]
    write_xlsx(path, _people(b"<row>" + xlsx_cell("A2", longest + "z") + b"</row>"))
    with pytest.raises(InputError, match=f"more than {MAX_CELL_CHARS} characters"):
        open_sheet(path)


def test_a_grid_as_large_as_the_floor_is_read_and_one_row_more_is_refused(tmp_path: Path) -> None:
    # A1 and ALL2000 span 2000 rows x 1000 columns: the floor exactly.
    assert XLSX_GRID_FLOOR == 2000 * 1000
    path = write_xlsx(
        tmp_path / "grid.xlsx",
        _people(xlsx_cell("ALL2000", "x").join([b"<row r='2000'>", b"</row>"])),
    )
    sheet = open_sheet(path)
    assert len(sheet.columns) == 1000
    write_xlsx(path, _people(xlsx_cell("ALL2001", "x").join([b"<row r='2001'>", b"</row>"])))
    with pytest.raises(InputError, match="2001 rows and 1000 columns"):
        open_sheet(path)


def test_rows_and_cells_without_positions_are_placed_as_the_reader_places_them(
    tmp_path: Path,
) -> None:
    # 150,000 empty <row/>, then 20 cells without `r`: the reader puts them on row 150,002,
    # columns A to T, so its grid is 3 million cells though no position says so.
    cells = b"<c><v>1</v></c>" * 20
    path = write_xlsx(
        tmp_path / "rows.xlsx", _people(b"<row/>" * 150_000, b"<row>" + cells + b"</row>")
    )
    with pytest.raises(InputError, match="21 cells over 150002 rows and 20 columns"):
        open_sheet(path)


def test_a_part_whose_zip_directory_understates_its_size_is_measured_by_inflating_it(
    tmp_path: Path,
) -> None:
    cell = [
        b'<row r="2"><c r="A2" t="inlineStr"><is><t>',
        b"A" * (1 << 20) * 64,
        b"</t></is></c></row>",
    ]
    path = write_xlsx(tmp_path / "liar.xlsx", _people(*cell))
    data = bytearray(path.read_bytes())
    # Each header of the sheet's part (local and central) now says it holds 1,000 bytes.
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(signature)
        while at >= 0:
            name_at = at + (30 if signature == b"PK\x03\x04" else 46)
            if data[name_at : name_at + 24] == b"xl/worksheets/sheet1.xml":
                data[at + size_at : at + size_at + 4] = (1000).to_bytes(4, "little")
            at = data.find(signature, at + 4)
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"is refused: part xl/worksheets/sheet1\.xml"):
        open_sheet(path)


def test_a_sheet_kept_in_a_part_not_named_xml_is_refused_not_read_unchecked(
    tmp_path: Path, sparse_workbook: Path
) -> None:
    # The sparse sheet again, moved to a part the reader finds through the workbook's
    # relationships only: a check of the .xml parts alone would never see it.
    path = tmp_path / "hidden.xlsx"
    with (
        zipfile.ZipFile(sparse_workbook) as source,
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as hidden,
    ):
        for member in source.infolist():
            data = source.read(member)
            if member.filename == "xl/_rels/workbook.xml.rels":
                data = data.replace(b"worksheets/sheet1.xml", b"worksheets/sheet1.bin")
            name = member.filename.replace("sheet1.xml", "sheet1.bin")
            hidden.writestr(name, data)
    job = write_job(tmp_path, "http://127.0.0.1:9", mapping={"params": {}})
    done = cli("validate", str(job), "--input", str(path))
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "sheet 1 is kept in a part that is not XML" in one_line(done.stderr)


def test_shared_strings_that_claim_billions_are_refused_before_the_reader_reserves_them(
    tmp_path: Path,
) -> None:
    # A sheet of two people, and a shared strings part that says it has 4 billion: the
    # reader would reserve 96 GB for them (and abort) before reading the one it has.
    base = write_xlsx(tmp_path / "base.xlsx", _people(b"<row>" + xlsx_cell("A2", "1") + b"</row>"))
    path = tmp_path / "strings.xlsx"
    with zipfile.ZipFile(base) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as book:
        for member in source.infolist():
            book.writestr(member.filename, source.read(member))
        book.writestr(
            "xl/sharedStrings.xml",
            '<?xml version="1.0"?><sst xmlns="x" uniqueCount="4000000000"><si><t>a</t></si></sst>',
        )
    job = write_job(tmp_path, "http://127.0.0.1:9", mapping={"params": {}})
    done = cli("validate", str(job), "--input", str(path))
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "says it holds 4000000000 strings but holds 1" in one_line(done.stderr)


@pytest.mark.parametrize(
    ("row", "column", "message"),
    [
        (65535, 255, "over 65536 rows and 256 columns"),
        (65535, 65535, "the Excel reader cannot read this .xls within"),
    ],
    ids=["last-row-and-column", "column-65535"],
)
def test_an_old_xls_with_a_cell_far_away_is_refused_in_bounded_memory(
    tmp_path: Path, row: int, column: int, message: str
) -> None:
    path = xls_with_cell_at(tmp_path / "far.xls", row, column)
    job = write_job(tmp_path, "http://127.0.0.1:9", mapping={"params": {}})
    done, peak = cli_peak_memory("validate", str(job), "--input", str(path))
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    line = one_line(done.stderr)
    assert str(path) in line and message in line
    assert peak <= PEAK_MEMORY, f"validate peaked at {peak / 2**20:.0f} MB"


# --- the reader's child process ------------------------------------------------------------------


def test_a_reader_that_aborts_or_runs_out_of_memory_or_time_costs_only_its_child() -> None:
    limits: dict[str, Any] = {"memory_bytes": 256 * 1024 * 1024, "timeout_s": 30}
    assert run_isolated(len, ("abc",), **limits) == 3
    with pytest.raises(Failed, match="stopped on it"):
        run_isolated(os.abort, (), **limits)
    with pytest.raises(Failed, match="more than 256 MB"):
        run_isolated(bytearray, (4 * 1024**3,), **limits)
    with pytest.raises(Failed, match="longer than 1 s"):
        run_isolated(time.sleep, (120,), memory_bytes=limits["memory_bytes"], timeout_s=1)


# --- the page server -----------------------------------------------------------------------------


async def _post_file(
    http: aiohttp.ClientSession, name: str, content: bytes
) -> tuple[int, dict[str, Any], int]:
    form = aiohttp.FormData()
    form.add_field("file", content, filename=name)
    async with http.post("/api/campaigns", data=form) as response:
        raw = await response.read()
        return response.status, json.loads(raw), len(raw)


async def _call(http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any) -> Any:
    async with http.request(method, path, **kwargs) as response:
        body = await response.json()
        assert response.status < 300, (response.status, body)
        return body


async def _until_done(http: aiohttp.ClientSession, campaign: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        view = await _call(http, "GET", f"/api/campaigns/{campaign}")
        if view["state"] != "running":
            return view
        assert time.monotonic() < deadline, view
        await asyncio.sleep(0.1)


async def test_serve_survives_hostile_uploads_while_a_campaign_sends(
    tmp_path: Path, sparse_workbook: Path, bomb_workbook: Path
) -> None:
    # The API answers the first 5 requests, then holds every other one until the hostile
    # uploads are answered: the campaign is certainly sending while they are read.
    gate = threading.Event()

    async def held(_request: web.Request) -> web.StreamResponse:
        await asyncio.to_thread(gate.wait, WAIT_S)
        return web.json_response({"success": True})

    api = FaultServer(lambda n, _body: 200 if n < 5 else "held", streams={"held": held})
    with api:
        job = write_job(tmp_path, api.url, api={"timeout_s": WAIT_S})
        served = serve(tmp_path, job, SERVE_TOKEN)
        try:
            async with aiohttp.ClientSession(served.url, headers=AUTH) as http:
                status, made, _ = await _post_file(http, RECIPIENTS.name, RECIPIENTS.read_bytes())
                assert status == 201, made
                campaign = made["id"]
                await _call(http, "PUT", f"/api/campaigns/{campaign}/mapping", json=made["mapping"])
                await _call(http, "POST", f"/api/campaigns/{campaign}/start", json={})
                deadline = time.monotonic() + WAIT_S
                while len(api.arrivals) < 6:  # answered 5, holding one at least
                    assert time.monotonic() < deadline, "the send did not start"
                    await asyncio.sleep(0.02)

                for kind, path in (("sparse", sparse_workbook), ("bomb", bomb_workbook)):
                    status, body, _ = await _post_file(http, f"{kind}.xlsx", path.read_bytes())
                    assert status == 400, (kind, body)
                    assert body["error"].startswith(f"{kind}.xlsx: "), body
                    assert "\n" not in body["error"]
                view = await _call(http, "GET", f"/api/campaigns/{campaign}")
                assert view["state"] == "running" and view["counts"]["sent"] < 43
                gate.set()
                final = await _until_done(http, campaign)
        finally:
            gate.set()
            served.stop()
    assert final["state"] == "done", final
    assert final["counts"]["sent"] == 43
    assert final["counts"]["unknown"] == final["counts"]["pending"] == 0
    phones = [a.body["to_phone"] for a in api.arrivals]
    assert len(phones) == len(set(phones)) == 43
    assert "Traceback" not in served.log.read_text()


async def test_upload_answers_stay_small_for_a_wide_sheet_and_a_huge_cell(tmp_path: Path) -> None:
    wide_columns = 10_000
    header = ["Phone", *(f"c{i}" for i in range(wide_columns - 1))]
    rows = [[f"+1415555{i:04d}", *(["v"] * (wide_columns - 1))] for i in range(1, 13)]
    wide = "\n".join(",".join(r) for r in [header, *rows]).encode()
    huge_cell = "x" * 5_000_000
    huge = f"Phone,Note\n12,{huge_cell}\n+14155550101,{huge_cell}\n".encode()
    too_wide = (",".join(f"c{i}" for i in range(100_000)) + "\n" + "1," * 99_999 + "1\n").encode()

    job = write_job(tmp_path, "http://127.0.0.1:9")
    served = serve(tmp_path, job, SERVE_TOKEN)
    try:
        async with aiohttp.ClientSession(served.url, headers=AUTH) as http:
            status, body, size = await _post_file(http, "too_wide.csv", too_wide)
            assert status == 400 and f"at most {MAX_COLUMNS}" in body["error"], body
            assert size < 1000

            status, made, size = await _post_file(http, "wide.csv", wide)
            assert status == 201, made
            assert size < 100_000, size
            assert made["columns_total"] == wide_columns
            assert made["columns"][0] == "Phone" and len(made["columns"]) <= 1000
            assert len(made["preview"]) == PREVIEW_ROWS
            assert all(len(r["cells"]) == PREVIEW_COLUMNS for r in made["preview"])

            status, made, size = await _post_file(http, "huge.csv", huge)
            assert status == 201, made
            assert size < 5_000, size
            cells = [c for r in made["preview"] for c in r["cells"]]
            assert max(len(c) for c in cells) == PREVIEW_CHARS
            campaign = made["id"]
            async with http.get(f"/api/campaigns/{campaign}") as response:
                assert response.status == 200 and len(await response.read()) < 10_000
            # Validated: the row with the unusable phone comes back among the invalid rows,
            # its cells cut as in the preview.
            async with http.put(
                f"/api/campaigns/{campaign}/mapping", json=made["mapping"]
            ) as response:
                raw = await response.read()
                assert response.status == 200, raw[:2000]
            assert len(raw) < 10_000, len(raw)
            assert json.loads(raw)["invalid"]["total"] == 1
    finally:
        served.stop()


# --- the loader, on generated hostile workbooks --------------------------------------------------

_refs = st.one_of(
    st.none(),
    st.from_regex(r"[A-Z]{1,2}[1-9][0-9]{0,2}", fullmatch=True),
    st.sampled_from(
        ["XFD1048576", "A1048577", "XFE1", "A0", "a1", "A١", "A²", "", "$A$1", "1A", "AAAA1"]
    ),
    st.text(max_size=4),
)
_texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["1e308", "-0", "NaN", "１２３", "+14155550101"]),
    st.integers(0, 40_000).map(lambda n: "y" * n),
)
_kinds = st.sampled_from(["inlineStr", "n", "s", "b", "e", "str", "d", None])


@st.composite
def _cells(draw: st.DrawFn) -> bytes:
    ref, text, kind = draw(_refs), draw(_texts), draw(_kinds)
    attributes = "" if ref is None else f" r={quoteattr(ref)}"
    if kind == "inlineStr":
        return f"<c{attributes} t='inlineStr'><is><t>{escape(text)}</t></is></c>".encode()
    attributes += "" if kind is None else f" t={quoteattr(kind)}"
    return f"<c{attributes}><v>{escape(text)}</v></c>".encode()


_rows = st.tuples(
    st.one_of(st.none(), st.integers(-1, 2_000_000).map(str), st.sampled_from(["x", "１"])),
    st.lists(_cells(), max_size=4),
).map(
    lambda row: (
        (b"<row>" if row[0] is None else f"<row r={quoteattr(row[0])}>".encode())
        + b"".join(row[1])
        + b"</row>"
    )
)
_heads = st.sampled_from(
    [
        b"",
        b"<!DOCTYPE worksheet>",
        b"<!-- a note -->",
        b'<dimension ref="A1:XFD1048576"/>',
        b'<sheetPr><outlinePr summaryBelow="0"/></sheetPr>',
    ]
)


# `make soak` runs the fuzz tests that many times longer.
FUZZ = settings(
    max_examples=60 * soak_trials(),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.soak
@FUZZ
@given(st.lists(_rows, max_size=6), _heads)
def test_loader_gives_rows_or_one_input_error_for_generated_sheets(
    tmp_path: Path, rows: list[bytes], head: bytes
) -> None:
    path = tmp_path / "fuzz.xlsx"
    start = b'<?xml version="1.0" encoding="UTF-8"?><worksheet xmlns="x">'
    write_xlsx(
        path, [b'<row r="1">' + xlsx_cell("A1", "Phone") + b"</row>", *rows], head=start + head
    )
    loaded_or_refused(path)


@pytest.mark.soak
@FUZZ
@given(st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 255)), min_size=1, max_size=8))
def test_loader_gives_rows_or_one_input_error_for_damaged_workbooks(
    tmp_path: Path, flips: list[tuple[int, int]]
) -> None:
    good = io.BytesIO()
    with (
        zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as book,
        zipfile.ZipFile(RECIPIENTS) as sample,
    ):
        for member in sample.infolist():
            book.writestr(member.filename, sample.read(member.filename))
    data = bytearray(good.getvalue())
    for at, value in flips:
        data[at * 7 % len(data)] = value
    path = tmp_path / "damaged.xlsx"
    path.write_bytes(bytes(data))
    loaded_or_refused(path)


_csv_cells = st.one_of(
    st.sampled_from(['"', '""', "=1+1", "١٢٣", "²", "\x00", "\r", "NaN", "", " ", "+14155550101"]),
    st.text(max_size=8),
    st.integers(0, 70_000).map(lambda n: "w" * n),
)


@pytest.mark.soak
@FUZZ
@given(
    st.integers(1, MAX_COLUMNS + 50),
    st.lists(st.lists(_csv_cells, max_size=5), max_size=4),
    st.sampled_from([",", ";", "\t", "|"]),
)
def test_loader_gives_rows_or_one_input_error_for_generated_wide_csv(
    tmp_path: Path, width: int, rows: list[list[str]], delimiter: str
) -> None:
    path = tmp_path / "fuzz.csv"
    lines = [delimiter.join(f"h{i}" for i in range(width))]
    lines += [delimiter.join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
    loaded_or_refused(path)
