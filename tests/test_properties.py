"""Properties of the loader, the report and the mapper, over generated cell text.

- Any text cell survives the trip ledger -> results.csv (the real report writer) -> the
  real loader unchanged, formula escape included.
- `Mapper.map_row` never raises, whatever a row holds; what it returns is consistent.
"""

from __future__ import annotations

import json
import tempfile
import uuid
from pathlib import Path
from typing import Literal

import phonenumbers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign.escape import escape, unescape
from campaign.job import Mapping
from campaign.load import Row, Sheet, open_sheet
from campaign.mapping import Mapper
from campaign.records import MappedRow
from campaign.report import write_report
from tests.helpers import loaded_or_refused, open_ledger

# A spreadsheet cell holds any text but NUL (the loader refuses NUL bytes as binary data).
cell_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
# Text that looks like what the escape is about: formula starts, signs, quotes, digits.
tricky = st.text(alphabet="=+-@'\t\r\n 0123456789().,;|\"abc", max_size=12)
cells = st.one_of(cell_text, tricky)

# Modest counts keep the suite fast; no example database left in the work tree.
FAST = settings(max_examples=60, deadline=None, database=None)


@FAST
@given(cells)
def test_escape_is_undone_by_unescape(text: str) -> None:
    assert unescape(escape(text)) == text


@FAST
@given(cells)
def test_escaped_cells_never_start_a_formula(text: str) -> None:
    written = escape(text)
    assert not written.startswith(("=", "@", "\t", "\r"))
    if written.startswith(("+", "-")):
        assert written == text  # only numbers and phone numbers keep a leading sign


# Each example has a campaign of its own: the store (a fixture) is shared by the examples.
@settings(
    FAST,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(cells, cells), min_size=1, max_size=5), st.sampled_from(["A", "=B"]))
def test_cells_round_trip_through_results_csv(
    store: str | None, rows: list[tuple[str, str]], name: str
) -> None:
    columns = ["Id", name, "Note"]
    table = [[f"id{i}", a, b] for i, (a, b) in enumerate(rows, start=1)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        ledger = open_ledger(directory, store, f"props-{uuid.uuid4().hex}", readonly=False)
        try:
            mapped = [
                MappedRow(row=n, cells=cells, error="not sent in this test")
                for n, cells in enumerate(table, start=1)
            ]
            ledger.replace_rows([mapped], columns)
            write_report(ledger, directory, "props")
        finally:
            ledger.close()
        sheet = open_sheet(directory / "results.csv")
        assert sheet.columns == columns
        loaded = [row for chunk in sheet.chunks for row in chunk]
    assert [row.cells for row in loaded] == table
    assert [row.number for row in loaded] == list(range(1, len(table) + 1))
    assert all(row.problem is None for row in loaded)


REGIONS = st.sampled_from(["US", "GB", "IN", "DE", "BR"])
phones = st.one_of(
    cell_text,
    tricky,
    st.from_regex(r"\+?[0-9 ().-]{0,20}( ?(ext\.?|x|#) ?[0-9]{1,4})?", fullmatch=True),
    st.sampled_from(["(415) 555-0101", "+44 20 7946 0958", "1-800-FLOWERS", "4.15555E+09"]),
)


PARAMS: list[tuple[dict[str, str] | Literal["all"], str | None]] = [
    ("all", "Name"),  # (mapping.params, the payload key the Name column becomes)
    ({"first_name": "Name"}, "first_name"),
    ({}, None),
]


@st.composite
def mappings(draw: st.DrawFn) -> Mapping:
    params, name_key = draw(st.sampled_from(PARAMS))
    key = ["to_phone", name_key] if name_key and draw(st.booleans()) else ["to_phone"]
    return Mapping(
        to_phone="Phone",
        default_region=draw(REGIONS),
        require_phone=draw(st.booleans()),
        params=params,
        constants=draw(st.sampled_from([{}, {"source": "sms"}])),
        recipient_key=key,
    )


@settings(FAST, max_examples=150)
@given(mappings(), phones, cells, cells, st.none() | st.just("row has 4 cells"))
def test_mapping_never_raises(
    mapping: Mapping, phone: str, name: str, extra: str, problem: str | None
) -> None:
    sheet = Sheet(Path("in.csv"), ["Phone", "Name", " Extra "], iter([]))
    mapper = Mapper.compile(mapping, sheet)
    result = mapper.map_row(Row(7, [phone, name, extra], problem))

    assert result.row == 7 and result.cells == [phone, name, extra]
    if result.error is not None:
        assert result.payload is None
        # An unusable row still names its person when it can (a person reached before keeps
        # showing as reached): the key is then the one a usable row would have had.
        if result.key is not None and mapping.recipient_key == ["to_phone"]:
            assert result.key == result.to_phone
        assert result.error.strip() and "\n" not in result.error
        if problem:
            assert result.error == problem
        return
    assert problem is None
    payload = json.loads(result.payload or "")
    assert payload and result.key
    assert all(isinstance(v, str) and v == v.strip() and v for v in payload.values())
    if "to_phone" in payload:
        number = phonenumbers.parse(payload["to_phone"])
        assert phonenumbers.is_valid_number(number)
        assert payload["to_phone"] == result.to_phone
        assert payload["to_phone"].startswith("+")
    else:
        assert not mapping.require_phone and not phone.strip()


csv_like = st.lists(
    st.sampled_from(['"', ",", ";", "\t", "|", "\n", "\r\n", "\r", " ", "'", "=", "x", "é", "1"]),
    max_size=40,
).map("".join)
file_bytes = st.one_of(
    st.binary(max_size=300),
    csv_like.map(lambda t: t.encode("utf-8")),
    csv_like.map(lambda t: t.encode("utf-16")),
    st.tuples(csv_like, st.binary(max_size=8)).map(lambda p: p[0].encode("cp1252") + p[1]),
)


@settings(FAST, max_examples=150)
@given(file_bytes, st.sampled_from([".csv", ".txt", ".xlsx", ".xls"]))
def test_loader_gives_rows_or_one_input_error(content: bytes, suffix: str) -> None:
    """Whatever the bytes, the loader gives rows of text or an InputError naming the file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(content)
        rows = loaded_or_refused(path)
    assert all(isinstance(cell, str) for row in rows for cell in row.cells)
    assert [row.number for row in rows] == sorted({row.number for row in rows})
