"""Send windows and the deadline: the pure rule on a table and under hypothesis, the job
keys' errors through the real CLI, and real runs against the sandbox, with windows chosen
relative to the current time (one zone open, another closed) so nothing waits for hours."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.dispatch import Dispatcher, LedgerWriter
from campaign.errors import CampaignError
from campaign.gate import Gate
from campaign.job import Api, Limits, load_job
from campaign.progress import Progress
from campaign.rate import RateLimiter
from campaign.records import MappedRow, Target
from campaign.store.ledger import Ledger
from campaign.windows import (
    LEAVE_MARGIN_S,
    Schedule,
    Window,
    is_open,
    next_open,
    parse_window,
    zones_for,
)
from tests.helpers import (
    CHANNEL,
    FaultServer,
    Sandbox,
    cli,
    e164,
    read_results,
    spawn_cli,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.runs import finish, wait_for
from tests.helpers.shared_sandbox import sandbox_since_start  # noqa: F401 (the `sandbox` here)
from tests.helpers.windows import (
    HNL_PHONES,
    HONOLULU,
    NEW_YORK,
    NY_PHONES,
    TOLL_FREE,
    hhmm,
    local_minutes,
    new_york_hours,
    ny_open_hnl_closed,
)


def inside(window: str, zone: ZoneInfo, at: dt.datetime) -> bool:
    """The rule written out again, independently of `windows`: local HH:MM within it."""
    start, end = window.split("-")
    s = int(start[:2]) * 60 + int(start[3:])
    e = int(end[:2]) * 60 + int(end[3:])
    m = local_minutes(zone, at)
    return s <= m < e if s < e else (m >= s or m < e)


# --- the rule -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [("08:00-21:00", 480, 1260), ("22:00-06:00", 1320, 360), ("00:00-24:00", 0, 1440)],
)
def test_windows_parse(text: str, start: int, end: int) -> None:
    assert parse_window(text) == Window(start, end)


@pytest.mark.parametrize(
    ("minute", "expected"),
    [(1319, False), (1320, True), (0, True), (359, True), (360, False), (720, False)],
)
def test_a_window_across_midnight(minute: int, expected: bool) -> None:
    assert parse_window("22:00-06:00").open_at(minute) is expected


def test_a_number_with_zones_spread_wider_than_3_hours_uses_the_timezone() -> None:
    fallback = ZoneInfo("Europe/Paris")
    now = dt.datetime.now(dt.UTC)
    assert zones_for(e164(TOLL_FREE[0]), fallback, now) == (fallback,)
    assert zones_for(None, fallback, now) == (fallback,)
    assert zones_for(e164(HNL_PHONES[0]), fallback, now) == (HONOLULU,)


PHONES = [e164(p) for p in NY_PHONES[:1] + HNL_PHONES[:1] + TOLL_FREE[:1]] + [
    "+442079460958",
    "+61298765432",
    "+74951234567",  # Moscow
    "+5511987654321",  # Brazil: several zones within 3 hours for some numbers
]


@settings(max_examples=400, deadline=None)
@given(
    start=st.integers(0, 24 * 60 - 1),
    length=st.integers(1, 24 * 60 - 1),
    instant=st.datetimes(
        min_value=dt.datetime(2024, 1, 1), max_value=dt.datetime(2030, 12, 31)
    ).map(lambda d: d.replace(tzinfo=dt.UTC)),
    delay=st.floats(0, LEAVE_MARGIN_S),
    phone=st.sampled_from([*PHONES, None]),
    fallback=st.sampled_from(["America/New_York", "Asia/Kolkata", "Australia/Adelaide"]),
)
def test_no_request_leaves_outside_its_persons_window(
    start: int,
    length: int,
    instant: dt.datetime,
    delay: float,
    phone: str | None,
    fallback: str,
) -> None:
    """For any window and instant: a person the schedule lets go arrives (up to the margin
    later) inside the window in every one of their zones; and a person held is told an
    opening time at which they would be let go."""
    window = f"{hhmm(start)}-{hhmm(start + length) if (start + length) % 1440 else '24:00'}"
    schedule = Schedule(parse_window(window), ZoneInfo(fallback), None)
    verdict = schedule.verdict(phone, instant)
    zones = zones_for(phone, ZoneInfo(fallback), instant)
    arrival = instant + dt.timedelta(seconds=delay)
    if verdict.send:
        assert all(inside(window, z, arrival) for z in zones), (window, zones, arrival)
    elif verdict.until is not None:
        assert verdict.until > instant
        assert is_open(parse_window(window), zones, verdict.until)
        assert schedule.verdict(phone, verdict.until).send


def test_next_open_is_the_first_minute_the_window_opens() -> None:
    at = dt.datetime(2026, 1, 15, 12, 0, tzinfo=NEW_YORK)  # 07:00 in Honolulu
    opens = next_open(parse_window("08:00-21:00"), (HONOLULU,), at)
    assert opens == dt.datetime(2026, 1, 15, 8, 0, tzinfo=HONOLULU)


# --- the job keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "key", "words"),
    [
        ({"send_window": "8:00-21:00", "timezone": "UTC"}, "limits.send_window", "HH:MM-HH:MM"),
        ({"send_window": "08:00-21", "timezone": "UTC"}, "limits.send_window", "HH:MM-HH:MM"),
        ({"send_window": "08:00–21:00", "timezone": "UTC"}, "limits.send_window", "HH:MM"),
        ({"send_window": "08:00 - 21:00", "timezone": "UTC"}, "limits.send_window", "HH:MM"),
        ({"send_window": "25:00-26:00", "timezone": "UTC"}, "limits.send_window", "time of day"),
        ({"send_window": "08:60-09:00", "timezone": "UTC"}, "limits.send_window", "time of day"),
        ({"send_window": "08:00-24:01", "timezone": "UTC"}, "limits.send_window", "time of day"),
        ({"send_window": "08:00-08:00", "timezone": "UTC"}, "limits.send_window", "starts when"),
        ({"send_window": "00:00-24:00x", "timezone": "UTC"}, "limits.send_window", "HH:MM"),
        ({"send_window": "", "timezone": "UTC"}, "limits.send_window", "HH:MM"),
        ({"send_window": ["08:00", "21:00"], "timezone": "UTC"}, "limits.send_window", "text"),
        ({"send_window": "08:00-21:00"}, "limits", "timezone: required with send_window"),
        ({"send_window": "08:00-21:00", "timezone": "Mars/Olympus"}, "limits.timezone", "IANA"),
        ({"send_window": "08:00-21:00", "timezone": ""}, "limits.timezone", "time zone"),
        ({"timezone": "EST5EDT/../x"}, "limits.timezone", "time zone"),
        ({"deadline": "6pm", "timezone": "UTC"}, "limits.deadline", "18:00"),
        ({"deadline": "24:00", "timezone": "UTC"}, "limits.deadline", "time of day"),
        ({"deadline": "18:00"}, "limits", "timezone: required with a deadline"),
        ({"deadline": "2026-05-01T18:00"}, "limits", "timezone: required with a deadline"),
        ({"deadline": "2026-13-01T18:00", "timezone": "UTC"}, "limits.deadline", "ISO 8601"),
        ({"deadline": "2026-05-01", "timezone": "UTC"}, "limits.deadline", "ISO date and time"),
        ({"deadline": 1080, "timezone": "UTC"}, "limits.deadline", "in quotes"),
        ({"deadline": True, "timezone": "UTC"}, "limits.deadline", "text"),
        ({"send_windows": "08:00-21:00"}, "limits.send_windows", "did you mean send_window"),
    ],
)
def test_every_malformed_window_timezone_or_deadline_is_exit_2_naming_the_key(
    tmp_path: Path, limits: dict[str, object], key: str, words: str
) -> None:
    """Checked where `campaign validate` reads the job (what it prints is `campaign: error:`
    and this message; its exit code is the error's): a command per case would cost a
    process start each. The command itself: the test below and the unquoted deadline."""
    job = one_row_job(tmp_path, limits)
    with pytest.raises(CampaignError) as refused:
        load_job(str(job))
    message = f"campaign: error: {refused.value}"
    assert refused.value.exit_code == 2, message
    assert f": {key}: " in message, message
    assert words in message, message
    assert "\n" not in message, message


def test_a_malformed_window_through_the_command_is_exit_2_naming_the_key(tmp_path: Path) -> None:
    job = one_row_job(tmp_path, {"send_window": "08:00-21", "timezone": "UTC"})
    done = cli("validate", str(job))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("campaign: error: "), done.stderr
    assert ": limits.send_window: " in done.stderr and "HH:MM-HH:MM" in done.stderr
    assert "Traceback" not in done.stderr


def one_row_job(tmp_path: Path, limits: dict[str, object]) -> Path:
    data = write_csv(tmp_path / "in.csv", ["Phone", "First Name"], [[NY_PHONES[0], "A"]])
    return write_job(tmp_path, "http://127.0.0.1:9", input=data, limits=limits)


def test_an_unquoted_yaml_deadline_is_explained(tmp_path: Path) -> None:
    job = one_row_job(tmp_path, {"timezone": "UTC"})
    text = job.read_text(encoding="utf-8")
    assert "  timezone: UTC\n" in text
    job.write_text(text.replace("  timezone: UTC\n", "  timezone: UTC\n  deadline: 18:00\n"))
    done = cli("validate", str(job))
    assert done.returncode == 2
    assert "limits.deadline" in done.stderr and "in quotes" in done.stderr
    assert "Traceback" not in done.stderr


# --- real runs -------------------------------------------------------------------------------


def test_a_run_sends_only_people_inside_their_window(
    tmp_path: Path, store: str | None, sandbox: Sandbox
) -> None:
    rows = [[p, f"P{i}"] for i, p in enumerate(NY_PHONES + HNL_PHONES)]
    data = write_csv(tmp_path / "in.csv", ["Phone", "First Name"], rows)
    window = ny_open_hnl_closed()
    job = write_job(
        tmp_path,
        sandbox.url,
        input=data,
        limits={"send_window": window, "timezone": "America/New_York"},
        ledger=store,
    )
    if store is None:  # what validation says does not depend on the store
        checked = cli("validate", str(job))
        assert checked.returncode == 0, checked.stderr
        assert "3 inside their send window now, 2 outside" in checked.stdout

    run = cli("run", str(job), "--no-progress")
    assert run.returncode == 1, run.stderr  # people are left pending for their window
    assert "2 waiting for their send window" in run.stdout
    records = sandbox.records()
    assert sorted(r["body"]["to_phone"] for r in records) == sorted(map(e164, NY_PHONES))
    for record in records:
        arrived = dt.datetime.fromtimestamp(record["t"], dt.UTC)
        assert inside(window, NEW_YORK, arrived)
    results = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(results) == {"sent": 3, "pending": 2}
    start = window.split("-")[0]
    for row in results[3:]:
        # "opens 15:00 Pacific/Honolulu" (with the date when that is tomorrow there)
        assert "waiting for the send window" in row["_error"]
        assert row["_error"].endswith(f"{start} Pacific/Honolulu"), row["_error"]
        assert row["_attempts"] == "0"


@pytest.mark.long
def test_wait_sends_each_person_when_their_window_opens(tmp_path: Path, sandbox: Sandbox) -> None:
    """Honolulu's window opens at the next minute; toll-free numbers (no single zone) use
    limits.timezone, Marquesas, half an hour ahead of Honolulu: open now."""
    rows = [[p, "x"] for p in HNL_PHONES + TOLL_FREE]
    data = write_csv(tmp_path / "in.csv", ["Phone", "First Name"], rows)
    now = dt.datetime.now(dt.UTC)
    # The next minute, unless it is so close that the run could start after it: then the
    # one after (the run must find the window closed, and wait).
    opens = local_minutes(HONOLULU, now) + (1 if now.second < 45 else 2)
    window = f"{hhmm(opens)}-{hhmm(opens + 60)}"
    job = write_job(
        tmp_path,
        sandbox.url,
        input=data,
        limits={"send_window": window, "timezone": "Pacific/Marquesas"},
    )
    run = cli("run", str(job), "--wait", "--no-progress", timeout=200)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "waiting for send windows" in run.stderr
    by_phone = {r["body"]["to_phone"]: r["t"] for r in sandbox.records()}
    assert sorted(by_phone) == sorted(map(e164, HNL_PHONES + TOLL_FREE))
    assert len(sandbox.records()) == 4
    for phone in map(e164, HNL_PHONES):
        arrived = dt.datetime.fromtimestamp(by_phone[phone], dt.UTC)
        assert inside(window, HONOLULU, arrived)
    assert max(by_phone[e164(p)] for p in TOLL_FREE) < min(by_phone[e164(p)] for p in HNL_PHONES)
    results = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(results) == {"sent": 4}


def test_ctrl_c_while_waiting_stops_cleanly(
    tmp_path: Path, store: str | None, sandbox: Sandbox
) -> None:
    rows = [[p, "x"] for p in NY_PHONES[:1] + HNL_PHONES]
    data = write_csv(tmp_path / "in.csv", ["Phone", "First Name"], rows)
    job = write_job(tmp_path, sandbox.url, input=data, limits=new_york_hours(), ledger=store)
    run = spawn_cli("run", str(job), "--wait", "--no-progress")
    log = tmp_path / "runs" / "test" / "log.jsonl"
    wait_for(
        lambda: log.exists() and "waiting for send windows" in log.read_text(),
        what="the run to wait",
    )
    run.send_signal(signal.SIGINT)
    assert finish(run) == 130
    assert sandbox.phones() == [e164(NY_PHONES[0])]
    results = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(results) == {"sent": 1, "pending": 2}


# The deadline is this far from the run's start: a start on a busy machine (seconds) must
# not take it all; at 10 a second, PEOPLE take twice as long to send.
DEADLINE_S = 6
PEOPLE = 120


def test_a_deadline_already_past_sends_nothing_and_after_a_deadline_no_new_request_leaves(
    tmp_path: Path, store: str | None, sandbox: Sandbox
) -> None:
    phones = [f"+1 212 555 {i:04d}" for i in range(100, 100 + PEOPLE)]
    data = write_csv(tmp_path / "in.csv", ["Phone", "First Name"], [[p, "x"] for p in phones])
    limits = {"rate_per_second": 10}
    past = {**limits, "deadline": "2020-01-01T18:00+00:00"}
    job = write_job(tmp_path, sandbox.url, input=data, limits=past, ledger=store)
    run = cli("run", str(job), "--no-progress")
    assert run.returncode == 1
    assert "deadline passed" in run.stdout
    assert sandbox.records() == []
    results = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(results) == {"pending": PEOPLE}
    assert all(r["_error"].startswith("deadline passed") for r in results)

    # The input is read and the store set up by now: the deadline races only the start.
    deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=DEADLINE_S)
    job = write_job(
        tmp_path,
        sandbox.url,
        input=data,
        limits={**limits, "deadline": deadline.isoformat()},
        ledger=store,
    )
    run = cli("run", str(job), "--no-progress")
    assert run.returncode == 1, run.stderr
    records = sandbox.records()
    assert 0 < len(records) < PEOPLE
    # A request may arrive a moment after the deadline; none may leave after it.
    assert max(r["t"] for r in records) < deadline.timestamp() + 1
    results = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(results) == {"sent": len(records), "pending": PEOPLE - len(records)}
    pending = [r for r in results if r["_status"] == "pending"]
    assert all(r["_error"].startswith("deadline passed") for r in pending)


async def test_a_retry_that_would_leave_outside_the_window_does_not_leave(
    tmp_path: Path,
) -> None:
    """The first answer is 503 (retry); by the time the retry is due, the (injected) clock
    says the window has closed: the retry is held, not sent."""
    phone = e164(NY_PHONES[0])
    ledger = Ledger(tmp_path / "ledger.sqlite")
    ledger.replace_rows(
        iter([[MappedRow(1, [phone], phone, json.dumps({"to_phone": phone}), phone)]]), ["Phone"]
    )
    open_at = dt.datetime(2026, 1, 15, 20, 58, tzinfo=NEW_YORK).timestamp()
    ticks = iter([open_at, open_at, open_at + 600])  # before, at the slot; then the retry
    schedule = Schedule(parse_window("08:00-21:00"), NEW_YORK, None)
    gate = Gate(schedule, None, clock=lambda: next(ticks, open_at + 600))
    with FaultServer(lambda n, _body: (503, {"Retry-After": "0"})) as server:
        run_id = ledger.start_run("run")
        writer = LedgerWriter(ledger, run_id)
        await writer.start()
        progress = Progress(total=1)
        api = Api(base_url=server.url, channel_uuid=CHANNEL, timeout_s=2)
        limits = Limits()
        limiter = RateLimiter(limits.rate_per_second)
        dispatcher = Dispatcher(api, limits, writer, progress, limiter=limiter, gate=gate)
        try:
            await asyncio.wait_for(dispatcher.run(_claims(ledger, run_id)), 30)
        finally:
            await writer.close()
        assert len(server.arrivals) == 1
    state, error = ledger.db.execute("SELECT state, error FROM recipients").fetchone()
    assert state == "pending"
    assert error.endswith("opens 2026-01-16 08:00 America/New_York")
    ledger.close()


async def test_the_pages_validation_says_who_is_inside_their_window(tmp_path: Path) -> None:
    from tests.helpers.web import call, client, start_serve, upload

    rows = [[p, f"P{i}"] for i, p in enumerate(NY_PHONES + HNL_PHONES)]
    data = write_csv(tmp_path / "in.csv", ["Phone", "First Name"], rows)
    limits = {"send_window": ny_open_hnl_closed(), "timezone": "America/New_York"}
    server = start_serve(tmp_path, write_job(tmp_path, "http://127.0.0.1:9", limits=limits))
    try:
        async with client(server) as http:
            made = await upload(http, data)
            path = f"/api/campaigns/{made['id']}/mapping"
            summary = await call(http, "PUT", path, json=made["mapping"])
    finally:
        server.stop()
    assert any("3 inside their send window now, 2 outside" in n for n in summary["notes"])


async def _claims(ledger: Ledger, run_id: int) -> AsyncIterator[list[Target]]:
    while batch := ledger.claim(run_id, ("pending",)):
        yield batch
