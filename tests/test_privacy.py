"""Logs are safe to ship: no whole phone number (as written or E.164), no channel uuid and
no param value in stdout, stderr or the campaign's log.jsonl, whatever happened to a row."""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from tests.helpers import FaultServer, cli, write_csv, write_job

CHANNEL = "5f2c9d1e-7a3b-4c8d-9e0f-1a2b3c4d5e6f"
PEOPLE = [  # (name, phone as written, employee id, what the API answers)
    ("Quillonia", "(415) 555-0123", "E-90817-Q", 200),
    ("Zebadiah", "415.555.0124", "E-90818-Z", 400),  # failed
    ("Ottoline", "+1 415 555 0125", "E-90819-O", 503),  # retried, then sent
    ("Pernelle", "4155550126", "E-90820-P", 500),  # unknown
    ("Wystan", "+44 20 7946 0958", "E-90821-W", 401),  # fatal
    ("Ysolde", "1-415-555-0127", "E-90822-Y", 200),
    ("Dup Quillonia", "415 555 0123", "E-90823-D", 200),  # duplicate of row 1
    ("Extension Ezra", "415-555-0128 ext. 9", "E-90824-E", 200),  # invalid
    ("Shorty", "555-01", "E-90825-S", 200),  # invalid
]
CONSTANT = "promo-Kx81-Marmalade"


def secrets() -> list[str]:
    found = [CHANNEL, CHANNEL[8:], CONSTANT]
    for name, phone, emp_id, _ in PEOPLE:
        digits = re.sub(r"\D", "", phone.split(" ext")[0])
        found += [name, emp_id, phone, digits]
        if len(digits) == 10:  # a US number: its E.164 and international digits
            found += [f"+1{digits}", f"1{digits}"]
        if phone.startswith("+"):
            found.append(f"+{digits}")
    return [s for s in found if len(s) >= 6]


def private_job(tmp_path: Path, url: str, data: Path, **sections: Any) -> Path:
    """A job on this file's own channel uuid (the one searched for in every output),
    each request given 1 s."""
    return write_job(
        tmp_path, url, input=data, api={"channel_uuid": CHANNEL, "timeout_s": 1}, **sections
    )


def test_no_phone_uuid_or_param_value_in_any_output(tmp_path: Path, store: str | None) -> None:
    plan = {re.sub(r"\D", "", p)[-10:]: answer for _, p, _, answer in PEOPLE}
    seen: dict[str, int] = {}

    def reply(_n: int, body: dict[str, Any]) -> Any:
        key = body["to_phone"][-10:]
        seen[key] = seen.get(key, 0) + 1
        answer = plan[key]
        if answer == 503:
            return 200 if seen[key] > 1 else (503, {"Retry-After": "0"})
        if answer in {400, 401}:  # an API that echoes what it got, as some do
            echo = f"rejected {body['to_phone']} ({body['first_name']}, {body['emp_id']})"
            return (answer, None, {"success": False, "error": echo})
        return answer

    data = write_csv(
        tmp_path / "in.csv",
        ["First Name", "Phone", "Employee ID"],
        [[name, phone, emp_id] for name, phone, emp_id, _ in PEOPLE],
    )
    outputs: list[str] = []
    with FaultServer(reply) as server:
        job = private_job(
            tmp_path,
            server.url,
            data,
            mapping={
                "params": {"first_name": "First Name", "emp_id": "Employee ID"},
                "constants": {"code": CONSTANT},
            },
            limits={"concurrency": 1, "abort_after_fatal": 5, "max_attempts": 3},
            ledger=store,
        )
        json_logs = ["--log-format", "json", "--no-progress"]
        for command in (
            ["validate", str(job), *json_logs],
            ["run", str(job), *json_logs],
            ["run", str(job), "--resend-unknown", *json_logs],
            ["report", str(job)],
        ):
            done = cli(*command)
            assert "Traceback" not in done.stdout + done.stderr
            outputs += [done.stdout, done.stderr]
        sent = server.bodies()

    log = (tmp_path / "runs" / "test" / "log.jsonl").read_text(encoding="utf-8")
    events = [json.loads(line) for line in log.splitlines()]
    # Not vacuous: requests went out with the values, and the log tells the story.
    assert {b["emp_id"] for b in sent} >= {"E-90817-Q", "E-90818-Z", "E-90820-P"}
    assert all(b["code"] == CONSTANT for b in sent)
    assert len(events) >= 5 and any(e.get("level") in {"warning", "error"} for e in events)
    # The searched forms are real: the results file holds each value and E.164 number.
    results = (tmp_path / "runs" / "test" / "results.csv").read_text(encoding="utf-8")
    written = [v for name, phone, emp_id, _ in PEOPLE for v in (name, phone, emp_id)]
    assert [v for v in written + [b["to_phone"] for b in sent] if v not in results] == []
    # With a PostgreSQL ledger, its password is a secret too.
    password = [urlsplit(store).password or ""] if store is not None else []
    assert all(password)
    for where, text in [("log.jsonl", log)] + [(f"output {i}", o) for i, o in enumerate(outputs)]:
        leaked = [s for s in secrets() + password if s in text]
        assert leaked == [], f"{where} holds {leaked}"


# A file without a header row: its first person is read as the header.
FIRST_ROW = ["Quillonia Marchbanks", "E-90817-Q", "quillonia@example.com", "1985-04-12"]
SECOND_ROW = ["Zebadiah Oakes", "E-90818-Z", "zebadiah@example.com", "1990-01-31"]
PHONES = ["+1 415 555 0123", "415.555.0124"]
HEADER = ["First Name", "Employee ID", "Email", "Born"]

MAPPINGS = {  # name: (mapping, whether the file has a phone column)
    "phone": ({"to_phone": "Phone", "params": {"first_name": "First Name"}}, True),
    "custom auth": (
        {
            "to_phone": None,
            "require_phone": False,
            "params": {"emp_id": "Employee ID"},
            "recipient_key": ["emp_id"],
        },
        False,
    ),
    "every column": (
        {"to_phone": None, "require_phone": False, "params": "all", "recipient_key": ["Email"]},
        False,
    ),
}


def write_rows(path: Path, rows: list[list[str]]) -> None:
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as out:
            csv.writer(out).writerows(rows)
        return
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    assert sheet is not None
    for row in rows:  # the dates as Excel dates, the rest as text
        sheet.append([dt.date.fromisoformat(c) if c[:2] in {"19", "20"} else c for c in row])
    book.save(path)


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
@pytest.mark.parametrize("mapping", MAPPINGS)
def test_a_file_without_a_header_row_is_not_quoted(
    mapping: str, suffix: str, tmp_path: Path
) -> None:
    shape, with_phone = MAPPINGS[mapping]
    people = [FIRST_ROW, SECOND_ROW]
    if with_phone:
        people = [[*row, phone] for row, phone in zip(people, PHONES, strict=True)]
    header = HEADER + ["Phone"] * with_phone
    good = tmp_path / f"good{suffix}"
    ann = ["Ann", "1", "a@example.com", "2000-01-01", "415 555 0101"][: len(header)]
    write_rows(good, [header, ann])
    headerless = tmp_path / f"people{suffix}"
    write_rows(headerless, people)
    outputs: list[str] = []
    with FaultServer(lambda _n, _body: 200) as server:
        job = write_job(tmp_path, server.url, input=good, mapping=shape)
        # The campaign exists (and has its log) before the file without a header comes.
        checked = cli("validate", str(job), "--no-progress")
        assert checked.returncode == 0, checked.stderr
        for command in ("validate", "run"):
            done = cli(command, str(job), "--input", str(headerless), "--log-format", "json")
            assert done.returncode == 2, (done.stdout, done.stderr)
            assert "Traceback" not in done.stdout + done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1, done.stderr
            assert "first row looks like data" in lines[0] and "add a header row" in lines[0]
            assert f"the first row has {len(header)} cells" in lines[0]
            outputs += [done.stdout, done.stderr]
        assert server.bodies() == []

    log = (tmp_path / "runs" / "test" / "log.jsonl").read_text(encoding="utf-8")
    assert log.strip()  # the first validate's lines: the search below is not vacuous
    values = [*FIRST_ROW, *SECOND_ROW, *PHONES, "4155550123", "4155550124"]
    values += [word for value in FIRST_ROW + SECOND_ROW for word in value.split()]
    for where, text in [("log.jsonl", log)] + [(f"output {i}", o) for i, o in enumerate(outputs)]:
        leaked = [v for v in values if v in text]
        assert leaked == [], f"{where} holds {leaked}"


@pytest.mark.parametrize("status", [404, 400, 200])
def test_an_answer_that_echoes_the_channel_uuid_keeps_it_out_of_every_file(
    tmp_path: Path, status: int
) -> None:
    """A server that quotes the address it was sent to (an error page naming the route)
    gets its words into `_error`, but never the channel uuid whole."""
    echo = f"no such channel {CHANNEL} at /sms/{CHANNEL}/send.json"

    def reply(_n: int, _body: dict[str, Any]) -> Any:
        return web.Response(status=status, text=echo, content_type="text/plain")

    data = write_csv(tmp_path / "in.csv", ["Phone"], [["+1 415 555 0123"]])
    with FaultServer(reply) as server:
        job = private_job(
            tmp_path, server.url, data, mapping={"params": {}}, limits={"max_attempts": 1}
        )
        done = cli("run", str(job), "--log-format", "json", "--no-progress")
        assert len(server.bodies()) == 1
    assert "Traceback" not in done.stdout + done.stderr
    directory = tmp_path / "runs" / "test"
    with (directory / "results.csv").open(encoding="utf-8", newline="") as rows:
        (row,) = list(csv.DictReader(rows))
    # Not vacuous: the server's words are kept, the uuid shown by its start alone.
    assert "no such channel" in row["_error"] and CHANNEL[:8] + "…" in row["_error"]
    written = [done.stdout, done.stderr] + [
        (directory / name).read_text(encoding="utf-8")
        for name in ("results.csv", "summary.json", "log.jsonl")
    ]
    assert [text for text in written if CHANNEL in text or CHANNEL[8:] in text] == []
