"""A Reporting API that lies or answers oddly: entries it cannot stand behind never make
anybody `not_found` (so never a second SMS), huge counts cost no memory, odd headers and
nesting are one line, never a traceback."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest
from aiohttp import web

from campaign.bounds import LOUD_WAIT_S, MAX_REPORT_PAGES, MAX_STATUS_DETAIL_CHARS, PAGES_QUEUED
from campaign.reporting import Page
from tests.helpers import (
    FaultServer,
    Reply,
    cli_peak_memory,
    open_ledger,
    read_results,
    write_job,
)
from tests.helpers import cli as run_cli
from tests.helpers.optouts import OFF
from tests.helpers.reports import PEOPLE, SentOnce, sent_through

TOKEN = "tok-51ab-SECRET-77cd"


def cli(*args: str, timeout: float = 120) -> Any:
    return run_cli(*args, env={"REPORT_TOKEN": TOKEN}, timeout=timeout)


REPORTING = {"agent_id": "7", "access_token": "${REPORT_TOKEN}", "settle_minutes": 0, **OFF}
# Where a job sends, for a campaign already sent: reconcile never sends.
NOWHERE = "http://127.0.0.1:9"


def sent_campaign(
    tmp_path: Path, send_url: str, report_url: str, store: str | None = None, **limits: Any
) -> Path:
    reporting = {**REPORTING, "base_url": report_url}
    env = {"REPORT_TOKEN": TOKEN}
    return sent_through(tmp_path, send_url, reporting, store, expect=None, env=env, **limits)


def entry(phone: str, at: Any, status: str = "delivered", **changes: Any) -> dict[str, Any]:
    digits = "".join(ch for ch in phone if ch.isdigit())
    return {
        "uuid": f"u-{digits}",
        "to_phone": f"+1({digits[1:4]}) {digits[4:7]}-{digits[7:]}",
        "created_at": at,
        "sms_status": status,
        **changes,
    }


def page(entries: list[Any], total_pages: int = 1, total: Any = None, per_page: int = 25) -> Any:
    body = {
        "current_page": 1,
        "per_page": per_page,
        "total_pages": total_pages,
        "total_entries": len(entries) if total is None else total,
        "entries": entries,
    }
    return (200, None, body)


def no_traceback(result: Any) -> None:
    assert "Traceback" not in result.stderr + result.stdout
    assert "unexpected error" not in result.stderr


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> SentOnce:
    """3 people sent once (on SQLite), copied for each test that only reconciles."""
    reporting = {**REPORTING, "base_url": NOWHERE}
    return SentOnce(tmp_path_factory.mktemp, PEOPLE, reporting, {"REPORT_TOKEN": TOKEN})


def copied_campaign(tmp_path: Path, sent: SentOnce, report_url: str) -> Path:
    """The campaign `sent` makes (as `sent_campaign` would), copied; its delivery reports
    at `report_url`."""
    data = sent.copy_to(tmp_path)
    return write_job(
        tmp_path,
        NOWHERE,
        input=data,
        reporting={**REPORTING, "base_url": report_url},
        limits={"max_attempts": 2},
    )


def reconciled_against(reply: Reply, tmp_path: Path, sent: SentOnce) -> CompletedProcess[str]:
    """`campaign reconcile` of a sent campaign, its reports read from a fault server
    answering `reply`; it never ends in a traceback."""
    with FaultServer(reply) as api:
        job = copied_campaign(tmp_path, sent, api.url)
        result = cli("reconcile", str(job))
    no_traceback(result)
    return result


def deliveries(tmp_path: Path) -> list[str]:
    return [r["_delivery"] for r in read_results(tmp_path / "runs" / "test" / "results.csv")]


def test_entries_with_iso_times_confirm_lost_answers_and_resend_sends_nobody_twice(
    tmp_path: Path,
) -> None:
    # Every request arrives and its answer is lost (the connection cut after it was read).
    with FaultServer(lambda n, body: "reset") as box:
        iso = dt.datetime.now(dt.UTC).isoformat()
        with FaultServer(lambda n, q: page([entry(p, iso) for p in PEOPLE])) as api:
            job = sent_campaign(tmp_path, box.url, api.url)
            assert [r["_status"] for r in read_results(tmp_path / "runs/test/results.csv")] == [
                "unknown"
            ] * 3
            result = cli("reconcile", str(job))
        no_traceback(result)
        assert result.returncode == 0, result.stdout
        assert deliveries(tmp_path) == ["delivered"] * 3
        cli("run", str(job), "--no-progress", "--resend-unknown")
        arrived = [body["to_phone"] for body in box.bodies()]
    assert sorted(arrived) == sorted(set(arrived))  # nobody twice
    assert len(arrived) == 3


def test_after_only_unusable_entries_resend_unknown_sends_nobody_a_second_sms(
    tmp_path: Path, store: str | None
) -> None:
    # Every request arrives and its answer is lost (the connection cut after it was read).
    with FaultServer(lambda n, body: "reset") as box:
        now = time.time()
        unusable = [{k: v for k, v in entry(p, now).items() if k != "sms_status"} for p in PEOPLE]
        with FaultServer(lambda n, q: page(unusable)) as api:
            job = sent_campaign(tmp_path, box.url, api.url, store)
            result = cli("reconcile", str(job))
        no_traceback(result)
        assert result.returncode == 1
        assert "3 unusable entries" in result.stdout
        resend = cli("run", str(job), "--no-progress", "--resend-unknown")
        no_traceback(resend)
        arrived = [body["to_phone"] for body in box.bodies()]
    assert sorted(arrived) == sorted(set(arrived)) and len(arrived) == 3  # nobody twice
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [r["_status"] for r in rows] == ["unknown"] * 3


def test_unusable_entries_leave_their_window_partial_and_nobody_not_found(
    tmp_path: Path, sent: SentOnce
) -> None:
    now = time.time()
    entries = [
        entry(PEOPLE[0], now),
        {k: v for k, v in entry(PEOPLE[1], now).items() if k != "created_at"},
        entry(PEOPLE[2], "yesterday"),
    ]
    result = reconciled_against(lambda n, q: page(entries), tmp_path, sent)
    assert result.returncode == 1
    assert "2 unusable entries" in result.stdout
    assert deliveries(tmp_path) == ["delivered", "", ""]
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["last_reconcile"]["bad_entries"] == 2
    assert summary["last_reconcile"]["windows_unread"] == 1


def test_a_status_outside_the_documented_four_is_not_stored_and_errors_are_cut(
    tmp_path: Path, sent: SentOnce
) -> None:
    now = time.time()
    long_error = "carrier says " + "x" * 100_000
    entries = [
        entry(PEOPLE[0], now, "undelivered", sms_status_response=long_error),
        entry(PEOPLE[1], now, "not_found"),
        entry(PEOPLE[2], now, "s" * 100_000),
    ]
    result = reconciled_against(lambda n, q: page(entries), tmp_path, sent)
    assert result.returncode == 1
    assert "x" * (MAX_STATUS_DETAIL_CHARS + 1) not in result.stdout
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [r["_delivery"] for r in rows] == ["undelivered", "", ""]
    assert len(rows[0]["_delivery_error"]) <= MAX_STATUS_DETAIL_CHARS
    assert (tmp_path / "job.yaml").exists()


def test_total_pages_of_ten_million_is_bounded_by_total_entries(
    tmp_path: Path, sent: SentOnce
) -> None:
    now = time.time()

    def reply(n: int, query: dict[str, str]) -> Any:
        if query["page"] == "1":
            two = [entry(p, now) for p in PEOPLE[:2]]
            return page(two, total_pages=10_000_000, total=3, per_page=2)
        if query["page"] == "2":
            return page([entry(PEOPLE[2], now)], total_pages=10_000_000, total=3, per_page=2)
        return page([], total_pages=10_000_000, total=3, per_page=2)

    with FaultServer(reply) as api:
        job = copied_campaign(tmp_path, sent, api.url)
        result, peak = cli_peak_memory(
            "reconcile", str(job), env={"REPORT_TOKEN": TOKEN}, timeout=60
        )
        asked = sorted(int(q["page"]) for q in api.bodies())
    no_traceback(result)
    assert result.returncode == 0, result.stdout
    # 3 entries at 2 a page: 2 pages, whatever total_pages says
    assert asked == [1, 2]
    assert peak < 300 * 2**20, f"peak {peak // 1024} KB"


def test_a_count_that_is_true_is_not_a_count(tmp_path: Path, sent: SentOnce) -> None:
    now = time.time()
    result = reconciled_against(
        lambda n, q: page([entry(PEOPLE[0], now)], total=True), tmp_path, sent
    )
    assert result.returncode == 1
    assert "not a count" in result.stdout and "True" not in result.stdout


def test_deeply_nested_json_leaves_the_window_unread_in_one_line(
    tmp_path: Path, sent: SentOnce
) -> None:
    deep = b'{"entries": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    result = reconciled_against(
        lambda n, q: web.Response(body=deep, content_type="application/json"), tmp_path, sent
    )
    assert result.returncode == 1
    assert "nested deeper" in result.stdout
    assert deliveries(tmp_path) == ["", "", ""]


def test_a_retry_after_of_unicode_digits_is_the_default_backoff_in_reconcile(
    tmp_path: Path, sent: SentOnce
) -> None:
    now = time.time()

    def reply(n: int, query: dict[str, str]) -> Any:
        if n == 0:
            return (429, {"Retry-After": "²"})
        return page([entry(p, now) for p in PEOPLE])

    result = reconciled_against(reply, tmp_path, sent)
    assert result.returncode == 0, result.stdout
    assert deliveries(tmp_path) == ["delivered"] * 3


def test_a_retry_after_of_unicode_digits_leaves_nobody_in_flight_in_run(tmp_path: Path) -> None:
    def reply(n: int, body: dict[str, Any]) -> Any:
        return (429, {"Retry-After": "²"}) if n < 3 else 200

    with FaultServer(reply) as api:
        sent_campaign(tmp_path, api.url, api.url, concurrency=1, max_attempts=5)
        sent = len(api.arrivals)
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [r["_status"] for r in rows] == ["sent"] * 3
    assert sent == 6  # three 429s, each retried, then one request per person
    ledger = open_ledger(tmp_path / "runs", None)
    try:
        assert ledger.counts().get("inflight", 0) == 0
    finally:
        ledger.close()


def test_a_redirect_is_described_once(tmp_path: Path) -> None:
    # aiohttp's own redirect body repeats the reason: "302: Found"
    def found(n: int, body: dict[str, Any]) -> web.Response:
        return web.Response(status=302, text="302: Found", headers={"Location": "/elsewhere"})

    with FaultServer(found) as api:
        sent_campaign(tmp_path, api.url, api.url)
    errors = {r["_error"] for r in read_results(tmp_path / "runs" / "test" / "results.csv")}
    assert errors == {"HTTP 302: Found"}, errors


def test_pages_are_asked_for_a_few_at_a_time_when_every_count_is_huge(
    tmp_path: Path, sent: SentOnce
) -> None:
    now = time.time()
    huge = {"total_pages": 10_000_000, "total": 250_000_000}

    def reply(n: int, query: dict[str, str]) -> Any:
        if query["page"] == "1":
            return page([entry(p, now) for p in PEOPLE], **huge)
        return page([], **huge)  # the API has nothing more, whatever it promised

    with FaultServer(reply) as api:
        job = copied_campaign(tmp_path, sent, api.url)
        result, peak = cli_peak_memory(
            "reconcile", str(job), env={"REPORT_TOKEN": TOKEN}, timeout=60
        )
        asked = len(api.arrivals)
    no_traceback(result)
    assert result.returncode == 1
    assert "promised 250000000 entries and gave 3" in result.stdout
    assert asked <= 1 + PAGES_QUEUED
    assert peak < 300 * 2**20, f"peak {peak // 1024} KB"


def test_total_pages_never_exceed_the_hard_cap() -> None:
    assert Page(1, 10**12, 10**15).last_page == MAX_REPORT_PAGES
    assert Page(1, 10**12, 26).last_page == 2
    assert Page(1, 1, 10**15).last_page == 1


def test_a_wait_longer_than_ten_seconds_says_so_in_the_log(tmp_path: Path, sent: SentOnce) -> None:
    now = time.time()
    wait_s = int(LOUD_WAIT_S) + 1

    def reply(n: int, query: dict[str, str]) -> Any:
        if n == 0:
            return (429, {"Retry-After": str(wait_s)})
        return page([entry(p, now) for p in PEOPLE])

    with FaultServer(reply) as api:
        job = copied_campaign(tmp_path, sent, api.url)
        result = cli("reconcile", str(job), "--log-format", "json")
    assert result.returncode == 0, result.stdout
    said = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and "waiting before the next attempt" in line
    ]
    assert len(said) == 1 and said[0]["wait_s"] == wait_s, result.stderr
