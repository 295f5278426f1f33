"""The messy-input corpus (tests/data/README.md) through the real CLI against the sandbox.

File-level errors: exit 2, one line naming the file, no traceback, no results file (or the
previous one untouched) and no request. Awkward but usable files: every row comes out as
the operator wrote it, or `invalid` with its reason.

Each case has a channel uuid of its own, so one sandbox serves them all and its record
tells which case sent what. The CLI runs of all cases start in a small pool when the
module starts, since starting Python dominates each case's time.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Sandbox, cli, read_results, write_job

DATA = Path(__file__).resolve().parent / "data"
MAPPING = {
    "to_phone": "Phone",
    "default_region": "US",
    "params": {"first_name": "First Name", "emp_id": "Employee ID"},
}


@pytest.fixture(scope="module")
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=3) as executor:
        yield executor


def sent_on(module_sandbox: Sandbox, channel: str) -> list[dict[str, Any]]:
    """Bodies the sandbox accepted on `channel`, in arrival order.

    Other cases may be sending while this reads the record, so a line still being written
    (the 100 KB cell is written in several pieces) is left for them."""
    if not module_sandbox.record.exists():
        return []
    lines = module_sandbox.record.read_bytes().split(b"\n")[
        :-1
    ]  # after the last newline: incomplete
    records = [json.loads(line.decode("utf-8")) for line in lines if line.strip()]
    return [r["body"] for r in records if r["channel"] == channel]


def job_for(home: Path, module_sandbox: Sandbox, channel: str, **sections: Any) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    mapping = {**MAPPING, **sections.pop("mapping", {})}
    return write_job(
        home, module_sandbox.url, mapping=mapping, api={"channel_uuid": channel}, **sections
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("campaign: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --- file-level errors ------------------------------------------------------------------


@dataclass
class Bad:
    input: str  # a file in tests/data, or "<dir>" / "<missing>"
    says: tuple[str, ...]
    sections: dict[str, Any] = field(default_factory=dict)


BAD = {
    "empty": Bad("empty.csv", ("the file is empty",)),
    "blank lines only": Bad("blank_lines_only.csv", ("the file is empty",)),
    "header only": Bad("header_only.csv", ("has a header row but no data rows",)),
    "header and blank rows": Bad("header_and_blank_rows.csv", ("no data rows",)),
    "required column missing": Bad(
        "missing_column.csv", ("column 'First Name'", "no such column", "'Name'")
    ),
    "no header row": Bad("no_header.csv", ("first row looks like data", "add a header row")),
    "used column twice": Bad("duplicate_header.csv", ("column 'Phone'", "appears 2 times")),
    "params all, a column twice": Bad(
        "odd_headers.csv", ("column 'Note'", "appears 2 times"), {"mapping": {"params": "all"}}
    ),
    "binary garbage .csv": Bad("garbage.csv", ("binary data",)),
    "neither utf-8 nor cp1252": Bad("bad_encoding.csv", ("UTF-8", "cp1252")),
    "utf-8 with a cp1252 line": Bad("mixed_encoding.csv", ("mixes text encodings", "line 3")),
    "quote never closed": Bad("unclosed_quote.csv", ("line 3 is never closed",)),
    "text named .xlsx": Bad("not_a_workbook.xlsx", ("not an Excel workbook", "plain text")),
    "zip without a workbook": Bad("plain_zip.xlsx", (".xlsx file", "cannot be read")),
    "truncated xlsx": Bad("truncated.xlsx", (".xlsx file", "cannot be read")),
    "ole2 garbage .xls": Bad("ole_garbage.xls", ("old Excel .xls", "cannot be read")),
    "workbook without data": Bad("empty_workbook.xlsx", ("no sheet has any data",)),
    "no such sheet": Bad(
        "types.xlsx", ("no sheet named 'Nope'", "'Recipients'"), {"sheet": "Nope"}
    ),
    "sheet for a csv": Bad("crlf.csv", ("`sheet:` is set",), {"sheet": "Data"}),
    "a directory": Bad("<dir>", ("is a directory",)),
    "no such file": Bad("<missing>", ("input file not found",)),
}


def bad_input(home: Path, case: Bad) -> Path:
    if case.input == "<dir>":
        (home / "folder.csv").mkdir()
        return home / "folder.csv"
    if case.input == "<missing>":
        return home / "nowhere.csv"
    return DATA / case.input


@dataclass
class BadRun:
    path: Path
    channel: str
    validate: subprocess.CompletedProcess[str]
    validate_results: Path
    run: subprocess.CompletedProcess[str]
    run_results: Path
    previous: bytes  # the seeded campaign's results.csv before `run`


@pytest.fixture(scope="module")
def bad_runs(
    tmp_path_factory: pytest.TempPathFactory, module_sandbox: Sandbox, pool: ThreadPoolExecutor
) -> dict[str, Future[BadRun]]:
    """Per case: `validate` into a fresh directory, and `run` over a campaign whose rows
    are pending: a bad new input must neither touch its results nor send its rows."""
    seed = tmp_path_factory.mktemp("seed")
    job = job_for(seed, module_sandbox, "seed")
    done = cli("validate", str(job), "--input", str(DATA / "crlf.csv"), "--no-progress")
    assert done.returncode == 0, done.stderr

    def one(name: str, case: Bad) -> BadRun:
        home = tmp_path_factory.mktemp("bad")
        path, channel = bad_input(home, case), "bad-" + name.replace(" ", "-")
        fresh = job_for(home / "fresh", module_sandbox, channel, **case.sections)
        again = job_for(home / "again", module_sandbox, channel, **case.sections)
        shutil.copytree(seed / "runs" / "test", home / "again" / "runs" / "test")
        results = home / "again" / "runs" / "test" / "results.csv"
        previous = results.read_bytes()
        checked = cli("validate", str(fresh), "--input", str(path), "--no-progress")
        ran = cli("run", str(again), "--input", str(path), "--no-progress")
        fresh_results = home / "fresh" / "runs" / "test" / "results.csv"
        return BadRun(path, channel, checked, fresh_results, ran, results, previous)

    return {name: pool.submit(one, name, case) for name, case in BAD.items()}


@pytest.mark.parametrize("name", BAD)
def test_file_level_error(
    name: str, bad_runs: dict[str, Future[BadRun]], module_sandbox: Sandbox
) -> None:
    case, ran = BAD[name], bad_runs[name].result()
    line = assert_one_line_error(ran.validate, str(ran.path), *case.says)
    assert "555 01" not in line and "555-01" not in line  # no phone from the file
    assert not ran.validate_results.exists()
    assert_one_line_error(ran.run, str(ran.path), *case.says)
    assert ran.run_results.read_bytes() == ran.previous
    assert sent_on(module_sandbox, ran.channel) == []


def test_input_from_the_job_file_is_named_too(tmp_path: Path, module_sandbox: Sandbox) -> None:
    job = job_for(tmp_path, module_sandbox, "from-job", input=str(DATA / "garbage.csv"))
    assert_one_line_error(cli("run", str(job), "--no-progress"), "garbage.csv", "binary data")
    assert sent_on(module_sandbox, "from-job") == []


# --- awkward but usable files -------------------------------------------------------------


@dataclass
class Ran:
    case: str
    validate: subprocess.CompletedProcess[str]
    validated: list[dict[str, str]]  # results.csv after `validate`
    run: subprocess.CompletedProcess[str]
    rows: list[dict[str, str]]  # results.csv after `run`
    header: list[str]
    bodies: list[dict[str, Any]]  # what the sandbox accepted for this case

    def sent_to(self) -> dict[str, dict[str, Any]]:
        return {b["to_phone"]: b for b in self.bodies}


GOOD: dict[str, tuple[str, dict[str, Any]]] = {  # case: (file, job sections)
    "cp1252.csv": ("cp1252.csv", {}),
    "utf8_bom.csv": ("utf8_bom.csv", {}),
    "semicolon.csv": ("semicolon.csv", {}),
    "tab.csv": ("tab.csv", {}),
    "pipe.csv": ("pipe.csv", {}),
    "unicode_text.txt": ("unicode_text.txt", {}),
    "quoted_newlines.csv": ("quoted_newlines.csv", {}),
    "crlf.csv": ("crlf.csv", {}),
    "cr_only.csv": ("cr_only.csv", {}),
    "nan_words.csv": ("nan_words.csv", {}),
    "empty_first_sheet.xlsx": ("empty_first_sheet.xlsx", {}),
    "big_cell.csv": ("big_cell.csv", {}),
    "odd_headers": ("odd_headers.csv", {"mapping": {"params": {"first_name": "First Name"}}}),
    "ragged": ("ragged.csv", {}),
    "blank_rows": ("blank_rows.csv", {}),
    "phones": ("phones.csv", {}),
    "leading_zeros": ("leading_zeros.csv", {}),
    "types.xlsx": (
        "types.xlsx",
        {
            "mapping": {
                "params": {
                    "first_name": "First Name",
                    "emp_id": "Employee ID",
                    "joined": "Joined",
                    "active": "Active",
                    "score": "Score",
                    "at": "At",
                }
            }
        },
    ),
    "legacy.xls": ("legacy.xls", {}),
}


@pytest.fixture(scope="module")
def good_runs(
    tmp_path_factory: pytest.TempPathFactory, module_sandbox: Sandbox, pool: ThreadPoolExecutor
) -> dict[str, Future[Ran]]:
    def one(case: str, name: str, sections: dict[str, Any]) -> Ran:
        home, channel = tmp_path_factory.mktemp("good"), f"good-{case}"
        job, data = job_for(home, module_sandbox, channel, **sections), str(DATA / name)
        results = home / "runs" / "test" / "results.csv"
        checked = cli("validate", str(job), "--input", data, "--no-progress")
        validated = read_results(results) if results.exists() else []
        sent_by_validate = sent_on(module_sandbox, channel)
        assert sent_by_validate == [], "validate must send nothing"
        done = cli("run", str(job), "--input", data, "--no-progress")
        with results.open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle))
        rows = read_results(results)
        return Ran(case, checked, validated, done, rows, header, sent_on(module_sandbox, channel))

    return {case: pool.submit(one, case, *spec) for case, spec in GOOD.items()}


@pytest.fixture
def ran(request: pytest.FixtureRequest, good_runs: dict[str, Future[Ran]]) -> Ran:
    """The case named by the test's parameter, with the checks every case must pass."""
    result = good_runs[request.param].result()
    for out in (result.validate, result.run):
        assert "Traceback" not in out.stdout + out.stderr
    assert {r["_status"] for r in result.validated} <= {"pending", "invalid", "duplicate"}
    assert [r["_row"] for r in result.rows] == [r["_row"] for r in result.validated]
    return result


def case(name: str) -> Any:
    return pytest.mark.parametrize("ran", [name], indirect=True)


SIMPLE = {
    "cp1252.csv": ["José", "Françoise €"],
    "utf8_bom.csv": ["Zoë"],
    "semicolon.csv": ["Ann, Jr."],
    "tab.csv": ["Ann, Jr."],
    "pipe.csv": ["Ann; Jr."],
    "unicode_text.txt": ["Łukasz", "日本"],
    "quoted_newlines.csv": ["Ann\nMarie", 'Bob "B" Jones'],
    "crlf.csv": ["Ann", "Bob"],
    "cr_only.csv": ["Ann", "Bob"],
    "nan_words.csv": ["NA", "null", "None", "#N/A", "NaN", "N/A", "nan", "-"],
    "empty_first_sheet.xlsx": ["Ann"],
    "big_cell.csv": ["x" * 100_000, "Bob"],
}


@pytest.mark.parametrize("ran", SIMPLE, indirect=True)
def test_every_row_is_sent_as_written(ran: Ran) -> None:
    names = SIMPLE[ran.case]
    assert ran.validate.returncode == 0, ran.validate.stderr
    assert ran.run.returncode == 0, ran.run.stderr
    assert ran.header[:3] == ["First Name", "Phone", "Employee ID"]
    assert [r["First Name"] for r in ran.rows] == names
    assert [r["_status"] for r in ran.rows] == ["sent"] * len(names)
    assert sorted(b["first_name"] for b in ran.bodies) == sorted(names)
    assert not [v for b in ran.bodies for v in b.values() if "\r" in v]
    assert not [v for r in ran.rows for v in r.values() if "\r" in v]
    if ran.case != "nan_words.csv":
        assert [r["Employee ID"] for r in ran.rows] == [str(i + 1) for i in range(len(names))]


@case("nan_words.csv")
def test_nan_words_stay_words_in_every_column(ran: Ran) -> None:
    assert [r["Employee ID"] for r in ran.rows] == SIMPLE["nan_words.csv"]
    assert sorted(b["emp_id"] for b in ran.bodies) == sorted(SIMPLE["nan_words.csv"])


@case("odd_headers")
def test_headers_with_stray_spaces_blank_and_doubled(ran: Ran) -> None:
    assert ran.run.returncode == 0, ran.run.stderr
    assert ran.header[:5] == [" First Name ", "Phone  ", "", "Note", "Note"]
    assert ran.bodies == [{"to_phone": "+14155550101", "first_name": "Ann"}]
    assert list(ran.rows[0].values())[:3] == ["Ann", "415 555 0101", "x"]


@case("ragged")
def test_ragged_rows(ran: Ran) -> None:
    assert ran.validate.returncode == 1  # some rows are invalid
    assert ran.run.returncode == 0, ran.run.stderr  # every sendable row is sent
    assert [r["_status"] for r in ran.rows] == ["sent", "invalid", "sent"]
    assert ran.rows[1]["_error"] == "row has 4 cells but the header has 3 columns"
    assert "row 2: row has 4 cells" in ran.validate.stdout
    sent = ran.sent_to()
    assert sent["+14155550101"] == {"to_phone": "+14155550101", "first_name": "Ann"}
    assert sent["+14155550103"]["emp_id"] == "3"
    assert "+14155550102" not in sent


@case("blank_rows")
def test_blank_rows_are_skipped_and_keep_their_numbers(ran: Ran) -> None:
    assert ran.run.returncode == 0, ran.run.stderr
    assert [(r["_row"], r["First Name"]) for r in ran.rows] == [("1", "Ann"), ("4", "Cy")]


PHONES = [  # (status, _to_phone, words of _error), in row order
    ("sent", "+14155550101", ""),
    ("sent", "+14155550102", ""),
    ("sent", "+14155550103", ""),
    ("sent", "+14155550104", ""),
    ("sent", "+14155550105", ""),
    ("sent", "+442079460958", ""),
    ("sent", "+442079460959", ""),
    ("sent", "+18003569377", ""),
    ("invalid", "", "extension"),
    ("invalid", "", "too short"),
    ("invalid", "", "does not look like a phone number"),
    ("invalid", "", "scientific notation"),
    ("duplicate", "+14155550101", "duplicate of row 1"),
    ("invalid", "", "Phone is empty"),
    ("invalid", "", "not a valid number"),
    ("sent", "+14155550116", ""),  # 4155550116.0: a phone that went through a float
    ("invalid", "", "more than one number"),
]


@case("phones")
def test_phones_in_many_formats(ran: Ran) -> None:
    assert ran.validate.returncode == 1
    assert ran.run.returncode == 0, ran.run.stderr
    got = [(r["_status"], r["_to_phone"], r["_error"]) for r in ran.rows]
    for (status, phone, error), (got_status, got_phone, got_error) in zip(PHONES, got, strict=True):
        assert (got_status, got_phone) == (status, phone), got
        assert error in got_error, got
    assert sorted(ran.sent_to()) == sorted(p for s, p, _ in PHONES if s == "sent")
    assert len(ran.bodies) == 9  # the duplicate is not sent


@case("leading_zeros")
def test_leading_zero_ids_stay_text(ran: Ran) -> None:
    assert [r["Employee ID"] for r in ran.rows] == ["00123", "000"]
    assert [r["Phone"] for r in ran.rows] == ["415 555 0101", "0014155550102"]
    assert ran.bodies == [{"to_phone": "+14155550101", "first_name": "Ann", "emp_id": "00123"}]
    assert ran.rows[1]["_status"] == "invalid"


@case("types.xlsx")
def test_xlsx_cells_are_their_values_as_text(ran: Ran) -> None:
    assert ran.run.returncode == 0, ran.run.stderr
    columns = ["First Name", "Phone", "Employee ID", "Joined", "Active", "Score", "At", "Sum"]
    assert [[r[c] for c in [*columns, "_row"]] for r in ran.rows] == [
        ["Ann", "4155550101", "00123", "2024-03-05", "TRUE", "12.5", "", "25", "1"],
        ["Bob", "14155550102", "1234", "2024-03-05T14:30:00", "FALSE", "1000", "x", "2000", "2"],
        ["Cy", "+1 415 555 0103", "7", "", "", "-3", "09:15:00", "-6", "4"],
    ]
    assert ran.sent_to()["+14155550102"] == {
        "to_phone": "+14155550102",
        "first_name": "Bob",
        "emp_id": "1234",
        "joined": "2024-03-05T14:30:00",
        "active": "FALSE",
        "score": "1000",
        "at": "x",
    }


@case("legacy.xls")
def test_old_xls_is_read(ran: Ran) -> None:
    assert ran.run.returncode == 0, ran.run.stderr
    assert [(r["Phone"], r["Employee ID"], r["Joined"]) for r in ran.rows] == [
        ("4155550101", "00123", "2024-03-05"),
        ("+1 415 555 0102", "42", ""),
    ]
    assert sorted(ran.sent_to()) == ["+14155550101", "+14155550102"]
