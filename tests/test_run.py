"""`campaign run` end to end: the real CLI against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import (
    CHANNEL,
    ROOT,
    Arrival,
    FaultServer,
    Sandbox,
    by_employee_id,
    cli,
    open_ledger,
    start_sandbox,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.runs import people, people_job, results


def by_phone(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["_to_phone"]: r for r in rows}


def test_every_status_and_exit_1(tmp_path: Path, store: str | None) -> None:
    plan = {
        "+14152000000": 200,
        "+14152000001": 400,
        "+14152000002": 502,
        "+14152000003": "hang",
        "+14152000004": (200, None, {"success": False}),
    }

    def reply(_n: int, body: dict[str, Any]) -> Any:
        return plan.get(body["to_phone"], 200)

    data = people(tmp_path / "in.csv", 5, extra=[["Dup", "(415) 200-0000"], ["Bad", "12"]])
    with FaultServer(reply) as server:
        job = write_job(tmp_path, server.url, input=data, api={"timeout_s": 1}, ledger=store)
        done = cli("run", str(job), "--no-progress")
        sent_to = [b["to_phone"] for b in server.bodies()]
    assert done.returncode == 1, done.stderr
    rows = results(tmp_path)
    assert [r["_status"] for r in rows] == [
        "sent",
        "failed",
        "unknown",
        "unknown",
        "failed",
        "duplicate",
        "invalid",
    ]
    assert sorted(sent_to) == sorted(plan)  # one request each: nothing retried
    assert rows[5]["_error"] == "duplicate of row 1"
    assert "HTTP 400" in rows[1]["_error"] and rows[1]["_http_status"] == "400"
    assert "HTTP 502" in rows[2]["_error"]
    assert "no answer in time" in rows[3]["_error"]
    assert "success" in rows[4]["_error"]
    assert rows[0]["_sent_at"].endswith("Z") and rows[0]["_attempts"] == "1"
    assert "campaign test:" in done.stdout and "results:" in done.stdout


def test_all_sent_is_exit_0_and_a_second_run_sends_nothing(
    tmp_path: Path, sandbox: Sandbox, store: str | None
) -> None:
    job = write_job(
        tmp_path,
        sandbox.url,
        input=people(tmp_path / "in.csv", 20, extra=[["X", "nope"]]),
        ledger=store,
    )
    first = cli("run", str(job), "--no-progress")
    assert first.returncode == 0, first.stderr
    assert len(sandbox.records()) == 20
    assert {r["channel"] for r in sandbox.records()} == {CHANNEL}  # the uuid goes in the URL
    second = cli("run", str(job), "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "every sendable row is sent" in second.stdout, second.stdout
    assert len(sandbox.records()) == 20
    assert statuses(results(tmp_path)) == {"sent": 20, "invalid": 1}
    # A rerun that changed nobody leaves the summary of the run that sent them.
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["counts"]["sent"] == 20 and summary["last_run"]["requests"] == 20


def one_person(
    tmp_path: Path, reply: Callable[[int, dict[str, Any]], Any]
) -> tuple[subprocess.CompletedProcess[str], list[Arrival]]:
    """One person sent through a fault server answering `reply`: the run, and the requests
    that arrived."""
    with FaultServer(reply) as server:
        job = write_job(tmp_path, server.url, input=people(tmp_path / "in.csv", 1))
        return cli("run", str(job), "--no-progress"), list(server.arrivals)


def test_429_with_retry_after_then_success(tmp_path: Path) -> None:
    def reply(n: int, _body: dict[str, Any]) -> Any:
        return (429, {"Retry-After": "1"}) if n == 0 else 200

    done, arrivals = one_person(tmp_path, reply)
    assert done.returncode == 0, done.stderr
    assert len(arrivals) == 2
    assert arrivals[1].at - arrivals[0].at >= 0.99  # the retry waited for Retry-After
    row = results(tmp_path)[0]
    assert (row["_status"], row["_attempts"], row["_http_status"]) == ("sent", "2", "200")


def test_503_twice_then_success(tmp_path: Path) -> None:
    done, _ = one_person(tmp_path, lambda n, _b: 503 if n < 2 else 200)
    assert done.returncode == 0, done.stderr
    assert results(tmp_path)[0]["_attempts"] == "3"


@pytest.mark.parametrize(
    ("answer", "requests", "status", "error"),
    [
        # 503 until limits.max_attempts run out: failed, the request never resent.
        ((503, {"Retry-After": "0"}), 3, "failed", "after 3 attempts"),
        # The connection dropped: it may have arrived, so it is not retried.
        ("reset", 1, "unknown", "connection dropped"),
    ],
    ids=["503-until-attempts-run-out-is-failed", "a-dropped-connection-is-unknown"],
)
def test_a_person_never_answered_200_ends_failed_or_unknown(
    tmp_path: Path, answer: Any, requests: int, status: str, error: str
) -> None:
    done, arrivals = one_person(tmp_path, lambda _n, _b: answer)
    assert len(arrivals) == requests
    assert done.returncode == 1
    row = results(tmp_path)[0]
    assert row["_status"] == status and error in row["_error"]
    text = (tmp_path / "runs" / "test" / "results.csv").read_text(encoding="utf-8")
    assert CHANNEL not in text  # not even in an error that quotes the request


def test_unknown_rows_are_not_resent_without_resend_unknown(
    tmp_path: Path, store: str | None
) -> None:
    with FaultServer(lambda n, _b: 502 if n == 0 else 200) as server:
        job = write_job(tmp_path, server.url, input=people(tmp_path / "in.csv", 1), ledger=store)
        assert cli("run", str(job), "--no-progress").returncode == 1
        assert cli("run", str(job), "--no-progress").returncode == 1
        assert len(server.arrivals) == 1
        again = cli("run", str(job), "--no-progress", "--resend-unknown")
        assert again.returncode == 0, again.stderr
        assert len(server.arrivals) == 2
    assert results(tmp_path)[0]["_status"] == "sent"


def test_404_three_times_aborts_with_exit_3_and_the_rest_pending(
    tmp_path: Path, store: str | None
) -> None:
    with FaultServer(lambda _n, _b: 404) as server:
        job = people_job(tmp_path, server.url, 10, ledger=store, concurrency=1)
        done = cli("run", str(job), "--no-progress")
        assert len(server.arrivals) == 3
    assert done.returncode == 3, done.stderr
    assert "aborted" in done.stdout and "fatal" in done.stdout
    assert statuses(results(tmp_path)) == {"failed": 3, "pending": 7}


def test_unreachable_api_aborts_with_exit_3(tmp_path: Path) -> None:
    with FaultServer(lambda _n, _b: 200) as server:
        url = server.url  # a port that was just free: nothing listens there afterwards
    job = people_job(tmp_path, url, 10, concurrency=1, max_attempts=2)
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 3, done.stderr
    counts = statuses(results(tmp_path))
    assert counts == {"failed": 3, "pending": 7}
    assert "could not connect" in results(tmp_path)[0]["_error"]


def test_request_leaves_only_after_the_ledger_records_it_in_flight(
    tmp_path: Path, store: str | None
) -> None:
    seen: list[tuple[str, int, int]] = []

    def reply(_n: int, body: dict[str, Any]) -> Any:
        with contextlib.closing(open_ledger(tmp_path / "runs", store)) as ledger:
            state, attempts = ledger.db.execute(
                "SELECT state, attempts FROM recipients WHERE key = ?", (body["to_phone"],)
            ).fetchone()
            open_attempts = ledger.db.execute(
                "SELECT count(*) FROM attempts a JOIN recipients r ON r.id = a.recipient_id "
                "WHERE r.key = ? AND a.state IS NULL",
                (body["to_phone"],),
            ).fetchone()[0]
        seen.append((state, attempts, open_attempts))
        return 200

    with FaultServer(reply) as server:
        job = people_job(tmp_path, server.url, 30, ledger=store, concurrency=8)
        assert cli("run", str(job), "--no-progress").returncode == 0
    assert seen == [("inflight", 1, 1)] * 30


def test_custom_auth_channel_without_phones(tmp_path: Path, store: str | None) -> None:
    box = start_sandbox(tmp_path, "--custom-auth")
    try:
        data = write_csv(
            tmp_path / "in.csv",
            ["Employee ID", "First Name"],
            [["007", "Ann"], ["008", "Bob"], ["007", "Ann again"], ["", "Nobody"]],
        )
        job = write_job(
            tmp_path,
            box.url,
            input=data,
            mapping=by_employee_id({"emp_id": "Employee ID", "first_name": "First Name"}),
            ledger=store,
        )
        done = cli("run", str(job), "--no-progress")
        bodies = sorted((r["body"] for r in box.records()), key=lambda b: b["emp_id"])
    finally:
        box.stop()
    assert done.returncode == 0, done.stderr
    assert bodies == [
        {"emp_id": "007", "first_name": "Ann"},
        {"emp_id": "008", "first_name": "Bob"},
    ]
    assert [r["_status"] for r in results(tmp_path)] == ["sent", "sent", "duplicate", "invalid"]


@pytest.mark.parametrize("sample", ["recipients.csv", "recipients.xlsx"])
def test_sample_spreadsheets_keep_their_text(tmp_path: Path, sandbox: Sandbox, sample: str) -> None:
    job = write_job(
        tmp_path,
        sandbox.url,
        mapping={"params": {"first_name": "First Name", "emp_id": "Employee ID"}},
    )
    done = cli("run", str(job), "--input", str(ROOT / "sample_data" / sample), "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = results(tmp_path)
    assert len(rows) == 50
    sent = {r["body"]["to_phone"]: r["body"] for r in sandbox.records()}
    assert len(sent) == len(sandbox.records()) == statuses(rows)["sent"]
    first = sent["+14155550101"]
    assert first["first_name"] == "José"
    # CSV: ids as typed; XLSX: the cell's value (a number 37 formatted 00037 is "37").
    assert sent["+14155550102"]["emp_id"] == ("00037" if sample.endswith("csv") else "37")
    assert rows[1]["Phone"] in {"415-555-0102", "4155550102"}
    assert all("." not in r["Employee ID"] for r in rows)  # no float text like 37.0


def test_unusable_job_is_exit_2_with_one_line(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        "http://127.0.0.1:9",
        input=people(tmp_path / "in.csv", 1),
        limits={"rate_per_second": 0},
    )
    done = cli("run", str(job))
    assert done.returncode == 2
    assert "limits.rate_per_second" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_trickling_answer_is_cut_off_as_unknown(tmp_path: Path) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        for _ in range(200):  # one byte at a time, never finishing within timeout_s
            await response.write(b" ")
            await asyncio.sleep(0.2)
        return response

    with FaultServer(lambda _n, _b: "trickle") as server:
        server.streams["trickle"] = trickle
        job = write_job(
            tmp_path, server.url, input=people(tmp_path / "in.csv", 1), api={"timeout_s": 1}
        )
        done = cli("run", str(job), "--no-progress", timeout=60)
    assert done.returncode == 1, done.stderr
    row = results(tmp_path)[0]
    assert row["_status"] == "unknown" and "no answer in time" in row["_error"]
