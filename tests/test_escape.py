"""Excel safety: cells a spreadsheet would run as a formula get a leading `'` in results.csv,
numbers and phone numbers do not, and a results CSV read back gives the values written."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from campaign.escape import escape, unescape
from tests.helpers import Sandbox, cli, write_csv, write_job

FORMULAS = [  # (cell, as written to results.csv)
    ("=1+2", "'=1+2"),
    ('=HYPERLINK("http://127.0.0.1/x","x")', '\'=HYPERLINK("http://127.0.0.1/x","x")'),
    ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
    ("-2+3", "'-2+3"),
    ("-SUM(A1)", "'-SUM(A1)"),
    ("+A1", "'+A1"),
    ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
    ("\tTabbed", "'\tTabbed"),
    ("\rReturn", "'\rReturn"),
    ("'=already quoted", "''=already quoted"),
    ("''@twice", "'''@twice"),
]
PLAIN = [  # cells a spreadsheet shows as typed: never escaped
    "-42",
    "-1.5",
    "+7",
    "-",
    "+1 415 555 0101",
    "+1 (415) 555-0101",
    "+44 20 7946 0958",
    "-(415) 555-0101",
    "415.555.0101",
    "Ann",
    "",
    "'plain",
    "a=b",
    "x@example.org",
    "1+1",
]


@pytest.mark.parametrize(("cell", "written"), FORMULAS)
def test_formula_cells_are_escaped_and_come_back(cell: str, written: str) -> None:
    assert escape(cell) == written
    assert unescape(written) == cell


@pytest.mark.parametrize("cell", PLAIN)
def test_numbers_phones_and_text_are_not_escaped(cell: str) -> None:
    assert escape(cell) == cell
    assert unescape(cell) == cell


def raw_results(path: Path) -> list[list[str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle))


def test_results_csv_is_safe_and_reads_back_the_same(tmp_path: Path, sandbox: Sandbox) -> None:
    cells = [cell for cell, _ in FORMULAS] + PLAIN
    rows = [[cell, f"+1 415 555 {100 + i:04d}", "-42"] for i, cell in enumerate(cells)]
    data = write_csv(tmp_path / "in.csv", ["Note", "Phone", "=Header"], rows)
    job = write_job(
        tmp_path,
        sandbox.url,
        input=data,
        mapping={"params": {"note": "Note", "header": "=Header"}},
    )
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 0, done.stderr

    # The input's own `'` before a formula is read as an escape (a results CSV is valid
    # input), so those cells arrive one quote shorter; everything else as typed.
    expected = [unescape(cell) for cell in cells]
    bodies = {r["body"]["to_phone"]: r["body"] for r in sandbox.records()}
    assert [bodies[f"+1415555{100 + i:04d}"].get("note", "") for i in range(len(cells))] == [
        value.strip() for value in expected
    ]

    results = tmp_path / "runs" / "test" / "results.csv"
    table = raw_results(results)
    assert table[0][:3] == ["Note", "Phone", "'=Header"]
    for row, value in zip(table[1:], expected, strict=True):
        assert row[0] == escape(value)
        assert row[1].startswith("+1 415 555")  # a phone: not escaped
        assert row[2] == "-42"  # a negative number: not escaped
        assert row[4] == "sent" and row[5].startswith("+1415555")  # _status, _to_phone
    assert all(not cell.startswith(("=", "@", "\t", "\r")) for row in table for cell in row)

    # Read back as input, the results give the same cells (and so the same results file).
    again = write_job(
        tmp_path,
        sandbox.url,
        name="again",
        input=results,
        campaign="again",
        mapping={"params": {"note": "Note", "header": "=Header"}},
    )
    checked = cli("validate", str(again), "--no-progress")
    assert checked.returncode == 0, checked.stderr
    reread = raw_results(tmp_path / "runs" / "again" / "results.csv")
    assert [row[:3] for row in reread] == [row[:3] for row in table]
