"""`campaign test`: one real request per test number with a row's params, the message the
phone received read back from the Reporting API, and the campaign's people untouched."""

from __future__ import annotations

import datetime as dt
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.helpers import (
    FaultServer,
    Sandbox,
    assert_no_duplicates,
    cli,
    e164,
    open_ledger,
    read_results,
    start_sandbox,
    write_csv,
    write_job,
)

TEST_PHONE = "+1 415 555 0199"
PEOPLE = [
    ["+1 415 200 0001", "Ann", "E-1001"],
    ["+1 415 200 0002", "Bob", "E-1002"],
    ["not a phone", "Cid", "E-1003"],
    ["+1 415 200 0004", "Dee", "E-1004"],
]
REPORTING = {"agent_id": "1", "access_token": "sandbox-token"}
MAPPING = {"params": {"first_name": "First Name", "emp_id": "Employee ID"}}


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    started = start_sandbox(tmp_path, "--delivery-delay-s", "0.2")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def idle_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One sandbox for the tests that must send it nothing: its record stays empty."""
    started = start_sandbox(tmp_path_factory.mktemp("idle"))
    yield started
    started.stop()


def _input(tmp_path: Path, rows: list[list[str]] | None = None) -> Path:
    return write_csv(
        tmp_path / "people.csv", ["Phone", "First Name", "Employee ID"], rows or PEOPLE
    )


def _job(tmp_path: Path, base_url: str, **sections: Any) -> Path:
    sections.setdefault("mapping", MAPPING)
    return write_job(tmp_path, base_url, input=_input(tmp_path), **sections)


def _report_entries(sandbox: Sandbox, phone: str) -> list[dict[str, Any]]:
    """The sandbox's Reporting API entries to `phone`, as the API answers them."""
    now = dt.datetime.now(dt.UTC).timestamp()
    query = urllib.parse.urlencode(
        {"from_timetoken": now - 600, "to_timetoken": now + 1, "page": 1, "to_phone": phone}
    )
    request = urllib.request.Request(
        f"{sandbox.url}/api/v1/agents/1/sms/report.json?{query}",
        headers={"access-token": "sandbox-token"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        entries: list[dict[str, Any]] = json.load(answer)["entries"]
    return entries


def test_a_test_sends_row_n_to_the_test_number_only_and_prints_the_message_received(
    tmp_path: Path, sandbox: Sandbox, store: str | None
) -> None:
    job = _job(tmp_path, sandbox.url, reporting=REPORTING, ledger=store)
    assert cli("validate", str(job)).returncode == 1  # row 3 is invalid
    results = tmp_path / "runs" / "test" / "results.csv"
    before = read_results(results)

    done = cli("test", str(job), "--to", TEST_PHONE, "--row", "2", "--no-progress")

    assert done.returncode == 0, done.stderr
    records = sandbox.records()
    assert [r["body"] for r in records] == [
        {"to_phone": e164(TEST_PHONE), "first_name": "Bob", "emp_id": "E-1002"}
    ]
    # The message printed is the one the Reporting API holds for the test number.
    (entry,) = _report_entries(sandbox, e164(TEST_PHONE))
    assert "Bob" in entry["message"]
    assert f"This is what row 2 produces: {entry['message']}\n" in done.stdout
    assert f"sms_status ({e164(TEST_PHONE)}): {entry['sms_status']}" in done.stdout
    assert "first_name: Bob" in done.stdout and "emp_id: E-1002" in done.stdout
    # The params went to the terminal, never to a log.
    log = (tmp_path / "runs" / "test" / "log.jsonl").read_text(encoding="utf-8")
    assert "test request answered" in log
    for secret in ("Bob", "E-1002", e164(TEST_PHONE), entry["message"]):
        assert secret not in log and secret not in done.stderr

    # Nobody of the campaign was touched: the same results, no attempt, tests apart.
    assert read_results(results) == before
    ledger = open_ledger(tmp_path / "runs", store)
    try:
        assert ledger.total_requests() == 0
        assert ledger.counts()["sent"] == 0
    finally:
        ledger.close()
    summary = json.loads((results.parent / "summary.json").read_text(encoding="utf-8"))
    (test,) = summary["tests"]
    assert test["to"] == "*******0199" and test["row"] == 2 and test["state"] == "sent"
    assert test["sms_status"] == entry["sms_status"]
    assert summary["counts"]["sent"] == 0 and summary["attempts"] == 0

    # The run that follows sends every person once, as if there had been no test.
    run = cli("run", str(job), "--no-progress")
    assert run.returncode == 0, run.stderr
    sent = assert_no_duplicates(sandbox)
    assert sorted(sent) == sorted([e164(TEST_PHONE)] + [e164(r[0]) for r in PEOPLE if "+" in r[0]])
    after = json.loads((results.parent / "summary.json").read_text(encoding="utf-8"))
    assert after["counts"]["sent"] == 3 and after["attempts"] == 3
    assert len(after["tests"]) == 1


def test_without_reporting_the_first_sendable_row_goes_to_test_recipients(
    tmp_path: Path,
) -> None:
    rows = [["", "Nobody", "E-0"], ["+1 415 200 0002", "Bob", "E-1002"]]
    with FaultServer(lambda _n, _body: 200) as api:  # takes every request, as the API does
        job = write_job(
            tmp_path,
            api.url,
            input=_input(tmp_path, rows),
            mapping=MAPPING,
            test_recipients=[TEST_PHONE, "+1 415 555 0198"],
        )

        done = cli("test", str(job))
        bodies = api.bodies()

    assert done.returncode == 0, done.stderr
    assert bodies == [
        {"to_phone": e164(number), "first_name": "Bob", "emp_id": "E-1002"}
        for number in (TEST_PHONE, "+1 415 555 0198")
    ]
    assert "a test of row 2" in done.stdout
    assert "the message can be read on the test phone" in done.stdout
    assert "This is what" not in done.stdout


def test_a_campaign_made_with_another_mapping_is_tested_with_its_own(tmp_path: Path) -> None:
    """Once requests went out, the campaign's stored mapping is what its people get."""
    with FaultServer(lambda _n, _body: 200) as api:  # takes every request, as the API does
        job = _job(tmp_path, api.url)
        assert cli("run", str(job), "--no-progress").returncode == 0
        changed = write_job(
            tmp_path,
            api.url,
            name="changed",
            input=_input(tmp_path),
            mapping={"params": {"first_name": "First Name"}},
        )

        done = cli("test", str(changed), "--campaign", "test", "--to", TEST_PHONE, "--row", "1")
        last = api.bodies()[-1]

    assert done.returncode == 0, done.stderr
    assert last == {
        "to_phone": e164(TEST_PHONE),
        "first_name": "Ann",
        "emp_id": "E-1001",
    }


def _window_closed_now() -> str:
    """A one-hour send window that is closed now in New York (the test number's zone)."""
    now = dt.datetime.now(ZoneInfo("America/New_York"))
    start = (now + dt.timedelta(hours=3)).strftime("%H:00")
    end = (now + dt.timedelta(hours=4)).strftime("%H:00")
    return f"{start}-{end}"


@pytest.mark.parametrize(
    ("args", "sections", "said"),
    [
        (["--to", "12"], {}, "test number '12': phone is too short"),
        (["--to", "+1 415 555 0199", "--row", "3"], {}, "row 3 is invalid: phone"),
        (["--to", "+1 415 555 0199", "--row", "9"], {}, "no row 9"),
        ([], {}, "no test number: give --to PHONE"),
        (
            ["--to", "+1 212 555 0199"],
            {"limits": {"send_window": "WINDOW", "timezone": "America/New_York"}},
            "test number '+1 212 555 0199': not now: waiting for the send window",
        ),
        (["--to", "+1 415 555 0199"], {"api": None}, "api: required key is missing"),
    ],
    ids=["invalid-number", "invalid-row", "no-such-row", "no-number", "window", "no-api"],
)
def test_refusals_are_one_line_exit_2_and_send_nothing(
    tmp_path: Path,
    idle_sandbox: Sandbox,
    args: list[str],
    sections: dict[str, Any],
    said: str,
) -> None:
    if "limits" in sections:
        sections["limits"]["send_window"] = _window_closed_now()
    job = _job(tmp_path, idle_sandbox.url, **sections)
    if sections.get("api", "") is None:
        text = job.read_text(encoding="utf-8").replace("api: null\n", "")
        job.write_text(text, encoding="utf-8")

    done = cli("test", str(job), *args)

    assert done.returncode == 2, done.stdout + done.stderr
    assert said in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
    assert idle_sandbox.records() == []


def test_a_number_on_the_suppression_list_is_refused(tmp_path: Path, idle_sandbox: Sandbox) -> None:
    job = _job(tmp_path, idle_sandbox.url)
    assert cli("suppress", "add", str(job), TEST_PHONE).returncode == 0

    done = cli("test", str(job), "--to", "+1 415 200 0002", "--to", TEST_PHONE)

    assert done.returncode == 2
    assert "is on the suppression list" in done.stderr
    assert idle_sandbox.records() == []  # not even the other number


@pytest.mark.parametrize(("status", "code"), [(404, 3), (401, 3), (400, 1)])
def test_the_apis_refusal_gives_exit_3_and_a_rejected_request_exit_1(
    tmp_path: Path, status: int, code: int
) -> None:
    with FaultServer(lambda _n, _body: status) as api:
        job = _job(tmp_path, api.url)
        done = cli("test", str(job), "--to", TEST_PHONE, "--to", "+1 415 555 0198")
        asked = len(api.bodies())

    assert done.returncode == code, done.stdout + done.stderr
    assert f"HTTP {status}" in done.stdout + done.stderr
    # A wrong channel is not tried on the next number; a rejected request is.
    assert asked == (1 if code == 3 else 2)
    summary_dir = tmp_path / "runs" / "test"
    ledger = open_ledger(tmp_path / "runs", None)
    try:
        assert ledger.total_requests() == 0
    finally:
        ledger.close()
    assert not (summary_dir / "results.csv").exists()


def test_a_report_that_never_comes_is_waited_for_and_ctrl_c_stops_waiting(
    tmp_path: Path,
) -> None:
    """With reporting: and no entry for the number, the wait shows progress; SIGINT ends
    it with what is known (exit 1: not known to be delivered)."""
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT

    empty = {"current_page": 1, "per_page": 25, "total_entries": 0, "total_pages": 0}
    empty["entries"] = []  # type: ignore[assignment]

    def reply(_n: int, body: dict[str, Any]) -> Any:
        return (200, None, empty) if "to_timetoken" in body else 200

    with FaultServer(reply) as api:
        job = _job(tmp_path, api.url, reporting=REPORTING)
        process = subprocess.Popen(
            [sys.executable, "-m", "campaign", "test", str(job), "--to", TEST_PHONE],
            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stderr is not None
        line = process.stderr.readline()
        while "waiting for the delivery report" not in line:
            assert line, "the command ended without waiting"
            line = process.stderr.readline()
        process.send_signal(signal.SIGINT)
        out, _err = process.communicate(timeout=30)

    assert process.returncode == 1
    assert "no delivery report yet (stopped waiting)" in out


def test_a_test_sends_report_entry_never_confirms_a_person_of_the_same_number(
    tmp_path: Path, store: str | None
) -> None:
    """Ann's request to X never arrives (504, nothing forwarded): she is `unknown`. A test
    to X follows. Its entry is the test's, not Ann's: she is not_found and resent, never
    taken for `sent` on the strength of the test's SMS."""
    from campaign.sandbox_reporting import CREATED_WITHIN_S
    from tests.helpers import BLOCK, Gateway, reached, reconcile_until
    from tests.helpers.reports import wait_until

    x = "+14155550177"
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0")
    reporting = {**REPORTING, "base_url": box.url, "settle_minutes": (CREATED_WITHIN_S + 0.5) / 60}
    people = write_csv(tmp_path / "ann.csv", ["Phone", "First Name"], [[x, "Ann"]])

    def ann_job(api_url: str) -> Path:
        return write_job(tmp_path, api_url, input=people, reporting=reporting, ledger=store)

    try:
        with Gateway(box.url, lambda _body: BLOCK) as gateway:
            assert cli("run", str(ann_job(gateway.url)), "--no-progress").returncode == 1
        ended = time.time()
        job = ann_job(box.url)
        tested = cli("test", str(job), "--to", x, "--no-progress")
        assert tested.returncode == 0, tested.stdout + tested.stderr
        # Ann's request settled: one reconcile decides.
        wait_until(ended + CREATED_WITHIN_S + 0.5)
        rows = reconcile_until(
            job, "test", lambda rows: all(r["_delivery"] == "not_found" for r in rows)
        )
        assert [(r["_status"], r["_delivery"]) for r in rows] == [("unknown", "not_found")]
        assert cli("run", str(job), "--no-progress", "--resend-unknown").returncode == 0
        assert reached(box, "to_phone", "first_name") == {(x, "Ann"): 2}  # the test, then Ann's
    finally:
        box.stop()


def test_a_test_reported_undelivered_exits_1_with_the_reason(tmp_path: Path) -> None:
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0", "--undelivered-rate", "1")
    try:
        job = _job(tmp_path, box.url, reporting=REPORTING)
        done = cli("test", str(job), "--to", TEST_PHONE, "--no-progress")
        (entry,) = _report_entries(box, e164(TEST_PHONE))
    finally:
        box.stop()

    assert done.returncode == 1, done.stdout + done.stderr
    assert entry["sms_status"] in ("undelivered", "failed")
    status = f"{entry['sms_status']}: {entry['sms_status_response']}"
    assert f"sms_status ({e164(TEST_PHONE)}): {status}" in done.stdout
    assert f"This is what row 1 produces: {entry['message']}" in done.stdout
