"""`campaign suppress import`: a spreadsheet's phone column onto the suppression list.

The file is read with the project's loader (any CSV or Excel file the run reads), the phone
column is `--column` or guessed as the upload page guesses it, each number is normalized
with the job's `default_region`, and the rows that cannot be added are named by their line
in the file. Rows stream from the loader into the list in batches: a file of a million
numbers takes no more memory than a small one. A file whose first row holds a number has
no header: that row is a person like the others (a list exported without column names
must not lose its first number), and its columns are `column 1`, `column 2`, ...
Messages name columns and lines, never what a cell holds.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from campaign.errors import InputError
from campaign.header import about_missing
from campaign.load import open_sheet
from campaign.phones import SAMPLE_ROWS, guess_phone_column, normalize_phone
from campaign.store.suppression import SuppressionList

SHOWN_PROBLEMS = 1000  # rows named one by one; beyond, only counted
_NUMBER = re.compile(r"[-+]?[0-9][0-9.,]*")


@dataclass
class Imported:
    column: str
    rows: int = 0
    added: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    not_added: int = 0

    @property
    def already(self) -> int:
        """Valid numbers that were on the list already (their first entry is kept)."""
        return self.rows - self.not_added - self.added


def import_numbers(
    listed: SuppressionList,
    path: Path | str,
    column: str | None,
    region: str,
    reason: str,
) -> Imported:
    """Add the numbers of `path`'s phone column; raises `InputError` for an unusable file
    or when no column holds phone numbers."""

    def first_row_is_data(cells: list[str]) -> bool:
        named = column is not None and column.strip() in (c.strip() for c in cells)
        return not named and any(_is_number(cell, region) for cell in cells)

    sheet = open_sheet(path, first_row_is_data=first_row_is_data)
    rows = itertools.chain.from_iterable(sheet.chunks)
    if column is not None:
        found = [i for i, name in enumerate(sheet.columns) if name.strip() == column.strip()]
        if not found:
            about = about_missing(sheet.columns, column)
            raise InputError(path, f"no such column (--column); {about}", column=column)
        if len(found) > 1:
            raise InputError(path, f"appears {len(found)} times in the header", column=column)
        index = found[0]
    else:
        sample = list(itertools.islice(rows, SAMPLE_ROWS))
        guessed = guess_phone_column(sheet.columns, sample, region)
        if guessed is None:
            raise InputError(
                path,
                "no column looks like phone numbers (by its name or its cells); "
                "name it with --column",
            )
        index = guessed
        rows = itertools.chain(sample, rows)
    result = Imported(column=sheet.columns[index].strip())

    def numbers() -> Iterator[str]:
        for row in rows:
            result.rows += 1
            text = row.cells[index].strip()
            phone, why = normalize_phone(text, region) if text else (None, "phone is empty")
            if phone is None:
                result.not_added += 1
                if len(result.problems) < SHOWN_PROBLEMS:
                    result.problems.append((row.number + 1, why or "not a phone number"))
                continue
            yield phone

    result.added = listed.add(numbers(), reason, "import")
    return result


def _is_number(cell: str, region: str) -> bool:
    """A phone number or a plain number: a first row holding one is a person, not a
    header (a list of numbers exported without one)."""
    text = cell.strip()
    if not text:
        return False
    return bool(_NUMBER.fullmatch(text)) or (
        sum(c.isdigit() for c in text) >= 7 and normalize_phone(text, region)[0] is not None
    )
