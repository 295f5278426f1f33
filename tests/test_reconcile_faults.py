"""`campaign reconcile` on bad input and a hostile Reporting API: one clear line and an
exit code, or entries counted and skipped; never a traceback, never the access token."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    FaultServer,
    by_employee_id,
    read_results,
    write_csv,
    write_job,
)
from tests.helpers import cli as run_cli
from tests.helpers.optouts import OFF
from tests.helpers.reports import PEOPLE, SentOnce, sent_through

TOKEN = "tok-7c1e-SECRET-91aa-d00d"
# The job file names the token's variable, as an operator's would: the token is in the
# environment only, and must show up in no file the commands write.
TOKEN_VAR = "${REPORT_TOKEN}"


def cli(*args: str, timeout: float = 120) -> Any:
    return run_cli(*args, env={"REPORT_TOKEN": TOKEN}, timeout=timeout)


REPORTING = {"agent_id": "7", "access_token": TOKEN_VAR, "settle_minutes": 0, **OFF}
# Where a job sends, for a campaign already sent: reconcile never sends.
NOWHERE = "http://127.0.0.1:9"


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> SentOnce:
    """3 people sent once, on SQLite, copied for each test that only reconciles."""
    reporting = {"base_url": NOWHERE, **REPORTING}
    return SentOnce(tmp_path_factory.mktemp, PEOPLE, reporting, {"REPORT_TOKEN": TOKEN})


def campaign(
    tmp_path: Path,
    sent: SentOnce,
    report_url: str,
    store: str | None = None,
    **reporting: Any,
) -> Path:
    """A campaign of 3 people sent (every request answered 200), on `store`; its delivery
    reports at `report_url`. On SQLite a copy of `sent`; on PostgreSQL sent here."""
    settings = {"base_url": report_url, **REPORTING, **reporting}
    if store is None:
        data = sent.copy_to(tmp_path)
        return write_job(
            tmp_path, NOWHERE, input=data, reporting=settings, limits={"max_attempts": 2}
        )
    with FaultServer(lambda n, body: 200) as api:
        return sent_through(tmp_path, api.url, settings, store, env={"REPORT_TOKEN": TOKEN})


def entry(phone: str, at: float, status: str = "delivered", **changes: Any) -> dict[str, Any]:
    digits = "".join(ch for ch in phone if ch.isdigit())
    formatted = f"+1({digits[1:4]}) {digits[4:7]}-{digits[7:]}"
    return {
        "uuid": f"u-{digits}-{at}",
        "to_phone": formatted,
        "created_at": at,
        "sms_status": status,
        **changes,
    }


def page(entries: list[dict[str, Any]], total_pages: int = 1, total: int | None = None) -> Any:
    body = {
        "current_page": 1,
        "per_page": 25,
        "total_pages": total_pages,
        "total_entries": len(entries) if total is None else total,
        "entries": entries,
    }
    return (200, None, body)


def one_line_error(result: Any) -> str:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    return errors[0]


def no_token_anywhere(tmp_path: Path, *outputs: str) -> None:
    for text in outputs:
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    ("status", "named"),
    [(401, "reporting.access_token"), (403, "access_token"), (404, "reporting.agent_id")],
)
def test_a_refusal_is_exit_3_naming_the_key(
    tmp_path: Path, sent: SentOnce, status: int, named: str
) -> None:
    with FaultServer(lambda n, q: (status, None, {"error": f"bad token {TOKEN}"})) as api:
        job = campaign(tmp_path, sent, api.url)
        result = cli("reconcile", str(job), "--log-format", "json")
        assert len(api.arrivals) == 1  # a refusal is not retried
    assert result.returncode == 3
    line = one_line_error(result)
    assert f"HTTP {status}" in line and named in line
    no_token_anywhere(tmp_path, result.stdout, result.stderr)


def test_the_query_carries_both_timetokens_the_page_and_the_token_header(
    tmp_path: Path, sent: SentOnce
) -> None:
    with FaultServer(lambda n, q: page([])) as api:
        job = campaign(tmp_path, sent, api.url)
        result = cli("reconcile", str(job))
        query = api.bodies()[0]
    assert result.returncode == 0, result.stderr
    assert set(query) == {"from_timetoken", "to_timetoken", "page"}
    assert float(query["from_timetoken"]) < float(query["to_timetoken"]) <= time.time()
    assert query["page"] == "1"


def test_entries_without_a_usable_number_or_time_are_counted_and_leave_the_window_partial(
    tmp_path: Path, sent: SentOnce, store: str | None
) -> None:
    now = time.time()
    good = entry(PEOPLE[0], now)
    bad = [
        {**entry(PEOPLE[1], now), "to_phone": None},
        {**entry(PEOPLE[2], now), "created_at": "yesterday"},
        {**entry(PEOPLE[2], now), "to_phone": "call me"},
    ]
    with FaultServer(lambda n, q: page([good, *bad])) as api:
        job = campaign(tmp_path, sent, api.url, store)
        result = cli("reconcile", str(job))
    assert result.returncode == 1, result.stderr
    assert "skipped 3 unusable entries" in result.stdout
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["last_reconcile"]["bad_entries"] == 3
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    # An unusable entry may be anybody's: nobody in its window is not_found.
    assert [r["_delivery"] for r in rows] == ["delivered", "", ""]


def test_a_page_that_is_not_json_leaves_its_window_unread(tmp_path: Path, sent: SentOnce) -> None:
    # What an unread window leaves in the store is checked on both stores by the tests of
    # unusable entries and of a count that promises more; this one is the page's format.
    from aiohttp import web

    with FaultServer(lambda n, q: web.Response(text="<html>oops</html>")) as api:
        job = campaign(tmp_path, sent, api.url)
        result = cli("reconcile", str(job))
        assert len(api.arrivals) == 2  # max_attempts
    assert result.returncode == 1
    assert "not JSON" in result.stdout and "Traceback" not in result.stderr
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    # Nothing was read whole: nobody is called not_found.
    assert [r["_delivery"] for r in rows] == ["", "", ""]


def test_total_pages_that_promises_more_than_there_is(
    tmp_path: Path, sent: SentOnce, store: str | None
) -> None:
    now = time.time()

    def reply(n: int, query: dict[str, str]) -> Any:
        if query["page"] == "1":
            return page([entry(PEOPLE[0], now)], total_pages=4, total=76)
        return page([], total_pages=4, total=76)

    with FaultServer(reply) as api:
        job = campaign(tmp_path, sent, api.url, store)
        result = cli("reconcile", str(job))
    assert result.returncode == 1
    assert "promised 76 entries and gave 1" in result.stdout
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    # What was read is kept; the window is not whole, so nobody is not_found.
    assert [r["_delivery"] for r in rows] == ["delivered", "", ""]


def test_total_pages_that_gives_the_same_entries_again_stops_early(
    tmp_path: Path, sent: SentOnce
) -> None:
    now = time.time()
    same = [entry(p, now) for p in PEOPLE]
    with FaultServer(lambda n, q: page(same, total_pages=10_000, total=3)) as api:
        job = campaign(tmp_path, sent, api.url)
        result = cli("reconcile", str(job))
        asked = len(api.arrivals)
    assert result.returncode == 0, result.stderr
    assert asked == 1  # 3 entries fit one page, whatever total_pages says
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["delivery"] == {"delivered": 3}


def test_429_with_retry_after_is_honoured(tmp_path: Path, sent: SentOnce) -> None:
    now = time.time()

    def reply(n: int, query: dict[str, str]) -> Any:
        return (429, {"Retry-After": "1"}) if n == 0 else page([entry(PEOPLE[0], now)])

    with FaultServer(reply) as api:
        job = campaign(tmp_path, sent, api.url)
        result = cli("reconcile", str(job))
        times = [a.at for a in api.arrivals]
    assert result.returncode == 0, result.stderr
    assert len(times) == 2 and times[1] - times[0] >= 0.95


def test_a_server_that_hangs_is_one_line_and_exit_1(tmp_path: Path, sent: SentOnce) -> None:
    with FaultServer(lambda n, q: "hang") as api:
        job = campaign(tmp_path, sent, api.url)
        # A short timeout: the server never answers, however long the wait.
        job.write_text(job.read_text().replace("timeout_s: 2", "timeout_s: 0.3"))
        result = cli("reconcile", str(job), timeout=60)
        api.release()
    assert result.returncode == 1
    assert "no answer in time" in result.stdout
    assert "Traceback" not in result.stderr
    no_token_anywhere(tmp_path, result.stdout, result.stderr)


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (None, "no reporting: section"),
        ({}, "reporting.agent_id: required key is missing"),
        ({"agent_id": "abc", "access_token": TOKEN_VAR}, "reporting.agent_id: must be the agent"),
        ({"agent_id": TOKEN_VAR, "access_token": "x"}, "reporting.agent_id: must be the agent"),
        ({"agent_id": "7", "access_token": "  "}, "reporting.access_token: is empty"),
        ({"agent_id": "7", "acess_token": TOKEN_VAR}, "did you mean access_token"),
    ],
)
def test_an_unusable_reporting_section_is_exit_2(
    tmp_path: Path, sent: SentOnce, section: Any, message: str
) -> None:
    extra = {} if section is None else {"reporting": section}
    # A campaign that exists (copied, sent with a reporting: section the job no longer has).
    data = sent.copy_to(tmp_path)
    job = write_job(tmp_path, NOWHERE, input=data, **extra)
    result = cli("reconcile", str(job))
    assert result.returncode == 2
    assert message in one_line_error(result)
    assert TOKEN not in result.stderr


def test_empty_reporting_key_is_exit_2(tmp_path: Path, sent: SentOnce) -> None:
    data = sent.copy_to(tmp_path)
    job = write_job(tmp_path, NOWHERE, input=data)
    job.write_text(job.read_text() + "reporting:\n")
    result = cli("reconcile", str(job))
    assert result.returncode == 2
    assert "no reporting: section" in one_line_error(result)


def test_a_custom_auth_campaign_cannot_be_matched(tmp_path: Path) -> None:
    # Sent through an API that takes every request (a campaign keyed by employee id).
    with FaultServer(lambda n, body: 200) as api:
        data = write_csv(tmp_path / "in.csv", ["Employee ID"], [["1001"], ["1002"]])
        job = write_job(
            tmp_path,
            api.url,
            input=data,
            mapping=by_employee_id({"emp_id": "Employee ID"}),
            reporting={"agent_id": "1", "access_token": TOKEN_VAR, **OFF},
        )
        assert cli("run", str(job), "--no-progress").returncode == 0
    result = cli("reconcile", str(job))
    assert result.returncode == 2
    assert "custom user authentication" in one_line_error(result)


def test_no_campaign_yet_is_exit_2(tmp_path: Path) -> None:
    job = write_job(tmp_path, NOWHERE, reporting={"agent_id": "1", "access_token": TOKEN_VAR})
    result = cli("reconcile", str(job))
    assert result.returncode == 2
    assert "no campaign of this job" in one_line_error(result)


def test_a_refused_reconcile_leaves_resend_unknown_as_it_was(
    tmp_path: Path, store: str | None
) -> None:
    data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["A", p] for p in PEOPLE])
    with FaultServer(lambda n, q: "reset" if "to_phone" in q else 401) as api:
        lost = write_job(
            tmp_path,
            api.url,
            name="lost",
            input=data,
            reporting={"agent_id": "7", "access_token": TOKEN_VAR, **OFF},
            ledger=store,
        )
        assert cli("run", str(lost), "--no-progress").returncode == 1  # all unknown
        assert cli("reconcile", str(lost)).returncode == 3
    # No report was read whole: --resend-unknown is the blind resend it always was.
    with FaultServer(lambda n, body: 200) as api:
        job = write_job(tmp_path, api.url, input=data, ledger=store)
        result = cli("run", str(job), "--no-progress", "--resend-unknown")
        arrived = [body["to_phone"] for body in api.bodies()]
    assert result.returncode == 0, result.stderr
    assert sorted(arrived) == sorted("+" + "".join(filter(str.isdigit, p)) for p in PEOPLE)


def test_from_phone_asks_the_reporting_api_for_the_channels_entries_only(
    tmp_path: Path, sent: SentOnce
) -> None:
    with FaultServer(lambda n, q: page([])) as api:
        job = campaign(tmp_path, sent, api.url, from_phone="+1 800 555 0100")
        result = cli("reconcile", str(job))
    assert result.returncode == 0, result.stderr
    assert {query.get("from_phone") for query in api.bodies()} == {"+18005550100"}


def test_a_from_phone_that_is_not_a_number_is_one_line_naming_the_key(
    tmp_path: Path, sent: SentOnce
) -> None:
    job = campaign(tmp_path, sent, NOWHERE)
    text = job.read_text(encoding="utf-8").replace(
        "reporting:\n", "reporting:\n  from_phone: '12'\n"
    )
    job.write_text(text, encoding="utf-8")
    result = cli("reconcile", str(job))
    assert result.returncode == 2
    line = one_line_error(result)
    assert "from_phone" in line and "E.164" in line


def test_a_person_a_reconcile_could_not_judge_is_not_resent_blind(tmp_path: Path) -> None:
    """Every answer lost (unknown), and the Reporting API busy for every page: nothing
    read whole, so the report can tell nothing of them. They are `ambiguous` and
    --resend-unknown holds them back; before, a campaign with no window read whole
    resent its unknown people blind even after a reconcile had looked."""
    # Every request arrives and its answer is lost (the connection cut after it was read).
    with FaultServer(lambda n, body: "reset") as box:
        with FaultServer(lambda n, q: 503) as api:
            reporting = {"base_url": api.url, **REPORTING}
            job = sent_through(tmp_path, box.url, reporting, expect=1, env={"REPORT_TOKEN": TOKEN})
            checked = cli("reconcile", str(job))
        assert checked.returncode == 1, checked.stderr
        rows = read_results(tmp_path / "runs" / "test" / "results.csv")
        assert {(r["_status"], r["_delivery"]) for r in rows} == {("unknown", "ambiguous")}
        assert all("not read whole" in r["_delivery_error"] for r in rows)
        cli("run", str(job), "--no-progress", "--resend-unknown")
        assert len(box.arrivals) == len(PEOPLE)  # nobody twice
