"""The rule for what an error may say about a header row, case by case: column names are
listed (with the closest one), a row of someone's data is never repeated."""

from __future__ import annotations

import pytest

from campaign.header import about_missing, looks_like_names

PERSON = [  # a first row that is a person, as files without a header row have
    ["Quillonia Marchbanks", "E1001", "quillonia@example.com", "1985-04-12", "+1 415 555 0101"],
    ["Quillonia Marchbanks", "(415) 555-0101", "E-90817-Q"],
    ["Zebadiah", "4155550102"],
    ["Ottoline Pike", "12 Harbour Road, Flat 3", "1990"],
    ["Pernelle", "04/12/85", "Seattle"],
    ["Ysolde", "ysolde at home", "09:15"],
    ["Wystan", "https://example.com/wystan"],
    ["Wystan", "00123"],
    ["Wystan", "42"],
    ["Wystan", "Prefers a call after work, never on a Sunday, and only in English"],
]

HEADERS = [  # header rows operators write
    ["First Name", "Phone", "Employee ID"],
    [" First Name ", "Phone  ", "", "Note", "Note"],
    ["Name", "Mobile No.", "Address Line 2", "Phone (E.164)", "Opted in?"],
    ["Prénom", "Téléphone", "Nº employé"],
    ["姓名", "電話"],
]


@pytest.mark.parametrize("row", PERSON, ids=lambda row: row[1])
def test_a_row_of_data_is_never_repeated(row: list[str]) -> None:
    assert not looks_like_names(row)
    message = about_missing(row, "Phone")
    assert "first row looks like data" in message
    assert f"the first row has {len(row)} cells" in message
    for cell in row:
        assert cell.strip() not in message
    for part in " ".join(row).replace(",", " ").split():  # nor any word or number of it
        assert len(part) < 4 or part not in message


@pytest.mark.parametrize("header", HEADERS, ids=lambda row: row[0])
def test_column_names_are_listed(header: list[str]) -> None:
    assert looks_like_names(header)
    message = about_missing(header, "Department")
    assert message.startswith("the columns are: ")
    for name in header:
        assert repr(name.strip()) in message or not name.strip()


@pytest.mark.parametrize(
    ("header", "wanted", "suggested"),
    [
        (["First Name", "phone"], "Phone", "phone"),
        (["First name", "Phone"], "First Name", "First name"),
        (["FirstName", "Phone"], "First Name", "FirstName"),
        (["Employe ID", "Phone"], "Employee ID", "Employe ID"),
        (["Name", "Phone"], "Employee ID", None),
    ],
)
def test_the_closest_name_is_offered(header: list[str], wanted: str, suggested: str | None) -> None:
    message = about_missing(header, wanted)
    if suggested is None:
        assert "did you mean" not in message
    else:
        assert message.startswith(f"did you mean {suggested!r}? ")


def test_a_long_header_is_cut_short() -> None:
    header = [f"Question {chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(60)]
    message = about_missing(header, "Phone")
    assert "'Question AA'" in message and "and 40 more" in message
    assert "'Question CH'" not in message
