"""Avaamo's own opt-outs (the SMS Opt Status API) on the suppression list: `campaign
suppress sync` and the sync before and while a run sends, against the sandbox or a small
server with faults. Counted at the server: who was texted, what was asked for."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from campaign.errors import CampaignError
from campaign.job import load_job
from campaign.optouts import sync_opt_outs
from campaign.store.suppression import SuppressionList, suppress_numbers
from tests.helpers import (
    FaultServer,
    cli,
    cli_peak_memory,
    e164,
    phones,
    read_results,
    soak_trials,
    spawn_cli,
    start_sandbox,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.optouts import OptStatus, is_opt_query, opt_entry, opt_page
from tests.helpers.runs import wait_for

TOKEN = "tok-5d2e-OPTOUT-SECRET-77ab"
TOKEN_VAR = "${OPT_TOKEN}"
ENV = {"OPT_TOKEN": TOKEN}


def reporting(url: str | None, **more: Any) -> dict[str, Any]:
    found = {"agent_id": "7", "access_token": TOKEN_VAR, **more}
    return found if url is None else {**found, "base_url": url}


def opt_job(tmp_path: Path, url: str, store: str | None = None, **more: Any) -> Path:
    """A job whose Send API and opt status are both at `url`; `more` updates its sections."""
    data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["A", p] for p in phones(5)])
    sections: dict[str, Any] = {"reporting": reporting(url), "ledger": store, **more}
    return write_job(tmp_path, url, input=data, **sections)


def sync(job: Path, *options: str, env: dict[str, str] | None = None) -> Any:
    return cli("suppress", "sync", str(job), *options, env={**ENV, **(env or {})})


def synced_here(job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole sync from the test's process: a run's earlier sync, not what is checked."""
    monkeypatch.setenv("OPT_TOKEN", TOKEN)
    result = asyncio.run(sync_opt_outs(load_job(str(job))))
    assert result.problems == [] and result.unread == 0, result.line()


def listed(job: Path, store: str | None) -> dict[str, str]:
    with SuppressionList(job.parent / "runs", store) as found:
        return {e.phone: e.source for e in found.entries()}


def sends(server: FaultServer) -> list[str]:
    return [b["to_phone"] for b in server.bodies() if not is_opt_query(b)]


def opt_queries(server: FaultServer) -> list[dict[str, Any]]:
    return [b for b in server.bodies() if is_opt_query(b)]


def serving(status: OptStatus) -> FaultServer:
    """The Send API (every request accepted) and `status`'s opt-status pages."""
    return FaultServer(lambda _n, body: status.answer(body) if is_opt_query(body) else 200)


# --- a run against the sandbox ---------------------------------------------------------------


def test_a_run_never_texts_a_number_opted_out_at_avaamo_when_it_started(
    tmp_path: Path, store: str | None
) -> None:
    box = start_sandbox(
        tmp_path, "--opt-out-rate", "1", "--opt-in-after-s", "3600", "--delivery-delay-s", "0"
    )
    try:
        first = phones(12)
        fresh = phones(3, start=500)
        settings = {"agent_id": "1", "access_token": "sandbox-token"}
        data = write_csv(tmp_path / "a.csv", ["First Name", "Phone"], [["A", p] for p in first])
        job = write_job(tmp_path, box.url, input=data, reporting=settings, ledger=store)
        assert cli("run", str(job), "--no-progress").returncode == 0
        stops = {r["body"]["to_phone"]: r["report"]["opt_out"] for r in box.records()}
        assert sorted(stops) == sorted(e164(p) for p in first)
        wait_for(lambda: time.time() > max(stops.values()) + 0.1, 30, "every STOP to be sent")

        started = time.time()
        both = write_csv(
            tmp_path / "b.csv", ["First Name", "Phone"], [["B", p] for p in first + fresh]
        )
        second = write_job(
            tmp_path,
            box.url,
            name="second",
            input=both,
            reporting=settings,
            ledger=store,
            campaign="second",
        )
        done = cli("run", str(second), "--no-progress")
        assert done.returncode == 0, done.stderr
        texted = [r["body"]["to_phone"] for r in box.records() if r["t"] >= started]
        assert sorted(texted) == sorted(e164(p) for p in fresh)  # the opted out: nobody
        rows = read_results(tmp_path / "runs" / "second" / "results.csv")
        assert statuses(rows) == {"suppressed": 12, "sent": 3}
        suppressed = [r for r in rows if r["_status"] == "suppressed"]
        assert all("opted out at Avaamo (STOP)" in r["_error"] for r in suppressed)

        checked = cli("validate", str(second))
        assert "12 of them opted out at Avaamo (STOP)" in checked.stdout, checked.stdout
    finally:
        box.stop()


def test_a_number_that_opts_out_while_a_run_sends_is_not_texted_after_the_next_sync(
    tmp_path: Path,
) -> None:
    status = OptStatus()
    people = phones(60)
    late = [e164(p) for p in people[-15:]]
    moment: dict[str, float] = {}

    def reply(_n: int, body: dict[str, Any]) -> Any:
        if is_opt_query(body):
            return status.answer(body)
        if body["to_phone"] == e164(people[9]):
            status.set(late, "opt-out")
            moment["at"] = time.monotonic()
        return 200

    with FaultServer(reply) as server:
        data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["A", p] for p in people])
        job = write_job(
            tmp_path,
            server.url,
            input=data,
            reporting=reporting(server.url),
            limits={"rate_per_second": 8, "concurrency": 1},
        )
        often = {**ENV, "CAMPAIGN_OPT_STATUS_EVERY_S": "1"}
        done = cli("run", str(job), "--no-progress", env=often)
        assert done.returncode == 0, done.stderr
        arrivals = list(server.arrivals)
    synced = [
        a
        for a in arrivals
        if is_opt_query(a.body) and a.body["current_status"] == "opt-out" and a.at > moment["at"]
    ]
    assert synced, "no sync after the opt-outs"
    limit = synced[0].at + 2
    after = [a.body["to_phone"] for a in arrivals if not is_opt_query(a.body) and a.at > limit]
    assert after, "the run had stopped sending before the sync: nothing was checked"
    assert set(after) & set(late) == set()
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    texted = {e164(r["Phone"]) for r in rows if r["_status"] == "sent"}
    assert texted | set(late) == {e164(p) for p in people}
    assert any(r["_status"] == "suppressed" for r in rows)


# --- suppress sync ---------------------------------------------------------------------------


def test_an_opt_in_lifts_only_what_avaamo_or_a_report_put_on_the_list(
    tmp_path: Path, store: str | None
) -> None:
    """Also: the second sync asks for a window, its times in milliseconds, both or neither
    (the API refuses anything else), from the last sync less 2 minutes to now."""
    by_hand, by_report, by_avaamo, new = (e164(p) for p in phones(4, start=700))
    status = OptStatus()
    status.set([by_avaamo], "opt-out", at=time.time() - 3600)
    with FaultServer(in_milliseconds(status)) as server:
        job = opt_job(tmp_path, server.url, store)
        before = time.time()
        first = sync(job)
        after = time.time()
        assert first.returncode == 0, first.stderr
        assert "added 1, removed 0" in first.stdout
        with SuppressionList(tmp_path / "runs", store) as listing:
            listing.add([by_hand], "by hand", "manual")
        suppress_numbers(tmp_path / "runs", [by_report], "unsubscribed", store)

        status.set([by_hand, by_report, by_avaamo], "opt-in")
        status.set([new], "opt-out")
        second = sync(job)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "added 1, removed 2, 1 unchanged" in second.stdout, second.stdout
        assert listed(job, store) == {by_hand: "manual", new: "avaamo"}
        queries = opt_queries(server)
    # The first sync: every current opt-out; the second: a window, both statuses.
    assert "start_time" not in queries[0] and queries[0]["current_status"] == "opt-out"
    assert {q["current_status"] for q in queries[1:]} == {"opt-in", "opt-out"}
    assert all(q["per_page"] == "100" for q in queries)
    windowed = [q for q in queries if "start_time" in q]
    assert windowed
    start = int(windowed[0]["start_time"]) / 1000
    assert before - 120 - 1 <= start <= after - 120 + 1  # the last sync less 2 minutes
    assert abs(int(windowed[0]["end_time"]) / 1000 - time.time()) < 30


def in_milliseconds(status: OptStatus) -> Any:
    """A server answering `status`, refusing (400) a query whose times are not both
    there as epoch milliseconds (or both absent)."""

    def reply(_n: int, body: dict[str, Any]) -> Any:
        if not is_opt_query(body):
            return 200
        times = [body.get("start_time"), body.get("end_time")]
        now_ms = time.time() * 1000
        if times != [None, None] and not all(
            t is not None and t.isdigit() and 1e12 < int(t) <= now_ms + 60_000 for t in times
        ):
            return (400, None, {"error": "start_time and end_time: epoch milliseconds"})
        return status.answer(body)

    return reply


@pytest.mark.parametrize(
    ("total_pages", "total_entries", "code", "added"),
    [(1000, 250, 0, 250), (1, 250, 0, 250), (3, 300, 1, 250)],
    ids=["total-pages-too-many", "total-pages-too-few", "entries-promised-not-given"],
)
def test_pages_of_100_are_read_as_far_as_the_entries_go(
    tmp_path: Path, total_pages: int, total_entries: int, code: int, added: int
) -> None:
    numbers = [f"+1415300{i:04d}" for i in range(250)]

    def reply(_n: int, body: dict[str, Any]) -> Any:
        if not is_opt_query(body):
            return 200
        number = int(body["page"])
        part = numbers[(number - 1) * 100 : number * 100]
        return opt_page(
            [opt_entry(p, "opt-out", 1_700_000_000.0) for p in part],
            total=total_entries,
            number=number,
            total_pages=total_pages,
        )

    with FaultServer(reply) as server:
        job = opt_job(tmp_path, server.url)
        done = sync(job)
        asked = sorted(int(q["page"]) for q in opt_queries(server))
    assert done.returncode == code, done.stdout + done.stderr
    assert f"added {added}," in done.stdout
    assert len(listed(job, None)) == added
    assert asked[:3] == [1, 2, 3] and max(asked) <= 4  # never the thousand pages promised
    if code:
        assert "promised 300 entries and gave 250" in done.stdout


def test_a_busy_or_silent_api_is_asked_again(tmp_path: Path) -> None:
    """Three pages, each met first by one fault: 429 (with Retry-After), 503, no answer."""
    status = OptStatus()
    numbers = [f"+1415310{i:04d}" for i in range(250)]
    status.set(numbers, "opt-out")
    faults = {"1": (429, {"Retry-After": "1"}, {"error": "slow down"}), "2": 503, "3": "hang"}
    faulted: set[str] = set()

    def reply(_n: int, body: dict[str, Any]) -> Any:
        if not is_opt_query(body):
            return 200
        page = body["page"]
        if page not in faulted:
            faulted.add(page)
            return faults[page]
        return status.answer(body)

    with FaultServer(reply) as server:
        job = opt_job(tmp_path, server.url, api={"timeout_s": 1})
        done = sync(job)
        arrivals = [a for a in server.arrivals if is_opt_query(a.body)]
    assert done.returncode == 0, done.stdout + done.stderr
    assert "added 250," in done.stdout
    assert sorted(a.body["page"] for a in arrivals) == ["1", "1", "2", "2", "3", "3"]
    first, again = (a.at for a in arrivals if a.body["page"] == "1")
    assert again - first >= 0.9  # Retry-After honoured


@pytest.mark.parametrize("refusal", [401, 403, 404])
def test_a_refusal_ends_the_sync_with_exit_3_and_one_line(tmp_path: Path, refusal: int) -> None:
    def reply(_n: int, body: dict[str, Any]) -> Any:
        return (refusal, None, {"error": f"token {TOKEN} refused"}) if is_opt_query(body) else 200

    with FaultServer(reply) as server:
        job = opt_job(tmp_path, server.url)
        done = sync(job)
        asked = len(opt_queries(server))
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert f"SMS Opt Status API refused the request (HTTP {refusal})" in lines[0]
    assert asked == 1  # not retried
    assert TOKEN not in done.stdout + done.stderr


def test_an_unusable_job_is_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    done = sync(job)
    assert done.returncode == 2
    assert "reporting:" in done.stderr and "Traceback" not in done.stderr
    bad = write_job(
        tmp_path, "http://127.0.0.1:9", name="bad", reporting=reporting(None, opt_status="maybe")
    )
    # Where the command reads the job (the same exit code and line): a second command
    # would check nothing more.
    monkeypatch.setenv("OPT_TOKEN", TOKEN)
    with pytest.raises(CampaignError) as refused:
        load_job(str(bad))
    assert refused.value.exit_code == 2 and "opt_status" in str(refused.value)


# --- the sync before a run sends -------------------------------------------------------------


@pytest.mark.parametrize(
    ("synced_before", "max_age_hours", "code"),
    [(False, 24, 3), (True, 24, 0), (True, 0, 3)],
    ids=["never-synced", "fresh-last-sync", "stale-last-sync"],
)
def test_a_failed_sync_stops_a_run_unless_the_last_one_is_fresh(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    synced_before: bool,
    max_age_hours: float,
    code: int,
) -> None:
    status = OptStatus()
    failing = {"now": False}

    def reply(_n: int, body: dict[str, Any]) -> Any:
        if not is_opt_query(body):
            return 200
        if failing["now"]:
            return (503, None, {"error": f"down (token {TOKEN})"})
        return status.answer(body)

    with FaultServer(reply) as server:
        more = {"opt_status_max_age_hours": max_age_hours}
        settings = reporting(server.url, **more)
        job = opt_job(tmp_path, server.url, reporting=settings, limits={"max_attempts": 2})
        if synced_before:
            synced_here(job, monkeypatch)
        failing["now"] = True
        done = cli("run", str(job), "--no-progress", env=ENV)
        texted = sends(server)
    assert done.returncode == code, done.stdout + done.stderr
    assert TOKEN not in done.stdout + done.stderr
    if code == 3:
        assert texted == []
        assert "SMS Opt Status API" in done.stderr and "503" in done.stderr
        assert "nothing was sent" in done.stderr
        assert not (tmp_path / "runs" / "test").exists()
    else:
        assert len(texted) == 5
        assert "going on" in done.stdout


def test_opt_status_off_reads_nothing(tmp_path: Path) -> None:
    with FaultServer(lambda _n, body: 503 if is_opt_query(body) else 200) as server:
        job = opt_job(tmp_path, server.url, reporting=reporting(server.url, opt_status="off"))
        done = cli("run", str(job), "--no-progress", env=ENV)
        assert done.returncode == 0, done.stderr
        assert opt_queries(server) == [] and len(sends(server)) == 5


def test_the_token_is_in_no_log_error_or_file(tmp_path: Path) -> None:
    answers = iter([401, 503, 503, 503])

    def reply(_n: int, body: dict[str, Any]) -> Any:
        if not is_opt_query(body):
            return 200
        return (next(answers, 503), None, {"error": f"bad access-token {TOKEN}"})

    with FaultServer(reply) as server:
        job = opt_job(tmp_path, server.url, limits={"max_attempts": 2})
        run = cli("run", str(job), "--no-progress", "--log-format", "json", env=ENV)
        outputs = [run, sync(job)]
    # The run met the 401; the sync then a page that stayed 503 (the answers echo the token).
    assert [o.returncode for o in outputs] == [3, 1]
    for done in outputs:
        assert TOKEN not in done.stdout + done.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# --- many numbers, many hosts ----------------------------------------------------------------


# Under `make soak`, a million numbers (the size it must hold to), else a tenth of a tenth.
MANY = 1_000_000 if soak_trials() > 1 else 100_000


@pytest.mark.soak
def test_a_first_sync_of_many_numbers_stays_in_bounded_memory(tmp_path: Path) -> None:
    """Ten times the numbers cost about the same memory: what is read is written a batch at
    a time, never held (a hundred thousand numbers held would take tens of MB more)."""
    few = _first_sync_peak(tmp_path / "few", MANY // 10)
    many = _first_sync_peak(tmp_path / "many", MANY)
    assert many <= few + 12 * 1024 * 1024, f"peak RSS {few / 2**20:.0f}, {many / 2**20:.0f} MB"
    assert many <= 300 * 1024 * 1024, f"peak RSS {many / 2**20:.0f} MB"


def _first_sync_peak(directory: Path, total: int) -> int:
    """The peak memory of a first `suppress sync` reading `total` opt-outs, all written."""

    def reply(_n: int, body: dict[str, Any]) -> Any:
        number = int(body["page"])
        first = (number - 1) * 100
        part = range(first, min(first + 100, total))
        return opt_page(
            [opt_entry(f"+1415{i:07d}", "opt-out", 1_700_000_000.0) for i in part],
            total=total,
            number=number,
        )

    directory.mkdir()
    with FaultServer(reply) as server:
        settings = reporting(server.url, rate_per_second=1000)
        job = opt_job(directory, server.url, reporting=settings)
        done, peak = cli_peak_memory("suppress", "sync", str(job), env=ENV, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"added {total}," in done.stdout
    with SuppressionList(directory / "runs") as found:
        assert found.count() == total
    return peak


def test_hosts_syncing_at_once_neither_lose_nor_double_entries(tmp_path: Path, pg_url: str) -> None:
    status = OptStatus()
    numbers = [f"+1415400{i:04d}" for i in range(3000)]
    status.set(numbers, "opt-out", at=time.time() - 60)
    with serving(status) as server:
        settings = reporting(server.url, rate_per_second=500)
        job = opt_job(tmp_path, server.url, pg_url, reporting=settings)
        processes = [spawn_cli("suppress", "sync", str(job), env=ENV) for _ in range(3)]
        outputs = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            outputs.append(out)
    added = sum(int(out.split("added ")[1].split(",")[0]) for out in outputs)
    assert added == len(numbers), outputs
    found = listed(job, pg_url)
    assert sorted(found) == numbers and set(found.values()) == {"avaamo"}


# --- the page ----------------------------------------------------------------------------------


async def test_the_page_shows_the_last_sync_and_syncs_now(tmp_path: Path) -> None:
    from tests.helpers.web import call, client, sign_in, start_serve

    status = OptStatus()
    opted = [e164(p) for p in phones(3, start=900)]
    status.set(opted, "opt-out", at=time.time() - 60)
    with serving(status) as server:
        settings = {"agent_id": "7", "access_token": TOKEN, "base_url": server.url}
        job = opt_job(tmp_path, server.url, reporting=settings)
        served = start_serve(tmp_path, job)
        try:
            async with client(served) as http:
                before = await call(http, "GET", "/api/suppression")
                assert before["avaamo"] == {"enabled": True, "synced_at": None, "count": 0}
                done = await call(http, "POST", "/api/suppression/sync")
                assert (done["added"], done["removed"], done["unread"]) == (3, 0, 0)
                after = await call(http, "GET", "/api/suppression")
                assert after["avaamo"]["count"] == 3 and after["avaamo"]["synced_at"]
                assert {e["phone"] for e in after["entries"]} == set(opted)
            async with client(served, token=None) as http:
                cookie, _ = await sign_in(http, served.url)
                foreign = {"Cookie": cookie, "Origin": "http://127.0.0.1:1"}
                await call(http, "POST", "/api/suppression/sync", 403, json={}, headers=foreign)
            asked = len(opt_queries(server))
        finally:
            served.stop()
    assert asked == 1  # the refused request read nothing
    assert TOKEN not in served.log.read_text()
