"""An adversarial review of the PostgreSQL store (and the SQLite claims): hostile schedules
against the real CLI, a real PostgreSQL and the sandbox, counted at the sandbox's record."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
from aiohttp import web

from campaign.store.db import schema_name
from tests.helpers import (
    FaultServer,
    Sandbox,
    assert_no_duplicates,
    cli,
    phones,
    spawn_cli,
    start_sandbox,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.pg import (
    check_report_against_record,
    in_campaign,
    lease_expired,
    lease_job,
    ledger_states,
    only_run,
)
from tests.helpers.runs import YESTERDAY, finish, people, results, wait_for
from tests.helpers.windows import (
    HNL_PHONES,
    NY_PHONES,
    e164,
    hhmm,
    local_minutes,
    ny_open_hnl_closed,
)


def staff(path: Path, n: int) -> Path:
    """People with a phone and an employee id."""
    return write_csv(
        path,
        ["First Name", "Phone", "Emp"],
        [[f"P{i}", p, f"E{i:05d}"] for i, p in enumerate(phones(n))],
    )


def ledger_meta(url: str, campaign: str, key: str) -> object:
    with psycopg.connect(url) as db:
        db.execute(f'SET search_path TO "{schema_name(campaign)}"')
        found = db.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return None if found is None else json.loads(found[0])


def test_a_joiner_with_another_mapping_cannot_replace_the_loaders_mapping(
    tmp_path: Path, pg_url: str
) -> None:
    """Worker 1 loads the campaign with its mapping (recipient key: the phone); worker 2,
    started a moment later from another job file whose mapping keys people by employee id,
    waits for the load and joins. Before worker 1's first request is recorded,
    `keep_mapping` sees no request and stores worker 2's mapping over the one the rows were
    mapped with. Then the campaign's own job is refused ("sent with another mapping"),
    and a rerun of the joiner's job maps everyone to new recipient keys: all sent again."""
    rows = 4000
    box = start_sandbox(tmp_path)
    try:
        data = staff(tmp_path / "in.csv", rows)
        limits = {"concurrency": 8, "rate_per_second": 100_000, "lease_s": 2}
        job = write_job(tmp_path, box.url, input=data, ledger=pg_url, limits=limits)
        other = write_job(
            tmp_path,
            box.url,
            name="other",
            input=data,
            ledger=pg_url,
            limits=limits,
            mapping={
                "to_phone": "Phone",
                "default_region": "US",
                "params": {"first_name": "First Name", "emp_id": "Emp"},
                "recipient_key": ["emp_id"],
            },
        )
        loader = spawn_cli("run", str(job), "--no-progress")
        time.sleep(0.3)  # usually during the load; on a slow machine the joiner loads first
        joiner = spawn_cli("run", str(other), "--no-progress")
        codes = [finish(loader), finish(joiner)]
        # Whoever loaded first mapped the campaign; the other one joined it or was refused.
        stored = ledger_meta(pg_url, "test", "mapping")
        assert isinstance(stored, dict), stored
        first = 0 if stored["recipient_key"] == ["to_phone"] else 1
        assert stored["recipient_key"] == [["to_phone"], ["emp_id"]][first], stored
        assert codes[first] == 0, codes
        assert codes[1 - first] in (0, 2), codes
        assert_no_duplicates(box)
        assert len(box.records()) == rows
        # A rerun of the other job (another host's file, say): refused, nothing sent again.
        wrong = cli("run", str([job, other][1 - first]), "--no-progress")
        received = Counter(box.phones())
        assert max(received.values()) == 1, f"{sum(received.values()) - rows} sent twice"
        assert wrong.returncode == 2, wrong.stdout + wrong.stderr
        # The campaign was mapped, and sent, with the first one's mapping: its job is fine.
        assert ledger_meta(pg_url, "test", "mapping") == stored
        again = cli("run", str([job, other][first]), "--no-progress")
        assert again.returncode == 0, again.stdout + again.stderr
        assert_no_duplicates(box)
    finally:
        box.stop()


def test_a_worker_stopped_longer_than_its_lease_then_continued(tmp_path: Path, pg_url: str) -> None:
    """SIGSTOP one of three workers at a random moment for three leases, SIGCONT it while
    the others have taken its people over: nobody twice, the report true to the record."""
    rows, lease = 1500, 1
    box = start_sandbox(tmp_path, "--latency-ms", "30")
    try:
        job = lease_job(tmp_path, box, pg_url, rows, lease)
        rng = random.Random()
        mark = rng.randrange(0, rows // 2)
        running = [spawn_cli("run", str(job), "--no-progress") for _ in range(3)]
        wait_for(lambda: len(box.records()) >= mark, what=f"{mark} requests")
        victim = running[rng.randrange(3)]
        victim.send_signal(signal.SIGSTOP)
        time.sleep(lease * rng.uniform(1.5, 4))
        victim.send_signal(signal.SIGCONT)
        codes = [finish(p) for p in running]
        assert set(codes) <= {0, 1, 3}, codes
        report = cli("report", str(job))
        assert report.returncode == 0, report.stderr
        counts = check_report_against_record(box, tmp_path, rows)
        assert set(counts) <= {"sent", "unknown", "pending"}, counts
        assert counts.get("unknown", 0) <= 8, counts
    finally:
        box.stop()


def test_a_stalled_workers_late_answer_does_not_undo_a_later_send(
    tmp_path: Path, pg_url: str
) -> None:
    """Worker A's request to X hangs; A stops (SIGSTOP) longer than its lease. B, run with
    --resend-unknown, finds A's lease expired (X is `unknown`, invariant 3) and sends X: 200,
    `sent`. Then X's first request is answered 400 and A continues: A records `failed` over
    B's `sent`. The report shows X failed (invariant 4: once sent, always shown sent), and
    the next ordinary run sends X a second SMS."""
    numbers = [p.replace(" ", "") for p in phones(4)]
    x = numbers[0]
    answer_first = threading.Event()
    delivered: list[str] = []
    lock = threading.Lock()

    async def held(_request: web.Request) -> web.StreamResponse:
        while not answer_first.is_set():
            await asyncio.sleep(0.02)
        return web.json_response({"success": False, "error": "bad request"}, status=400)

    def reply(_n: int, body: dict[str, Any]) -> Any:
        with lock:
            if body.get("to_phone") == x and not any(
                a.body.get("to_phone") == x for a in server.arrivals[:-1]
            ):
                return "held"
            delivered.append(body.get("to_phone"))
        return 200

    server = FaultServer(reply, streams={"held": held})
    with server:
        job = write_job(
            tmp_path,
            server.url,
            input=people(tmp_path / "in.csv", 4),
            ledger=pg_url,
            api={"timeout_s": 30},
            limits={"concurrency": 4, "rate_per_second": 1000, "lease_s": 1, "max_attempts": 1},
        )
        a = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(server.arrivals) >= 4, what="A's four requests")
        time.sleep(0.3)
        a.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3)
            b = cli("run", str(job), "--no-progress", "--resend-unknown")
            assert b.returncode == 0, b.stdout + b.stderr
            assert delivered.count(x) == 1
            answer_first.set()
            time.sleep(0.3)
        finally:
            a.send_signal(signal.SIGCONT)
        finish(a)
        report = cli("report", str(job))
        assert report.returncode == 0, report.stderr
        shown = {line["_to_phone"]: line["_status"] for line in results(tmp_path)}
        assert shown[x] == "sent", shown
        again = cli("run", str(job), "--no-progress")
        assert again.returncode == 0, again.stdout + again.stderr
        assert Counter(delivered) == Counter(numbers), Counter(delivered)


def test_a_worker_continued_after_its_lease_expired_then_killed_leaves_nobody_in_flight(
    tmp_path: Path, pg_url: str
) -> None:
    """SIGSTOP one of two workers past its lease (the other settles it: `crashed`), SIGCONT
    it and kill -9 it a moment later. Whatever it did in that moment, once a later run is
    over nobody is left `inflight` (invariant 3: in flight when its process died ->
    `unknown`, which --resend-unknown and reconcile can act on), and nobody twice."""
    rows, lease = 2000, 1
    box = start_sandbox(tmp_path, "--latency-ms", "60")
    try:
        job = lease_job(tmp_path, box, pg_url, rows, lease)
        rng = random.Random()
        running = [spawn_cli("run", str(job), "--no-progress") for _ in range(2)]
        wait_for(lambda: len(box.records()) >= 200, what="200 requests")
        victim, other = running
        victim.send_signal(signal.SIGSTOP)
        time.sleep(2.5 * lease)
        victim.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.0, 0.3))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        _, err = other.communicate(timeout=120)
        assert other.returncode in (0, 1), err[-3000:]
        final = cli("run", str(job), "--no-progress")
        assert final.returncode in (0, 1), final.stdout + final.stderr
        states = ledger_states(pg_url)
        assert "inflight" not in states, states
        check_report_against_record(box, tmp_path, rows)
    finally:
        box.stop()


def loading(url: str, campaign: str) -> bool:
    """The campaign's ledger exists and no run is registered yet: its first worker is
    still reading the input."""
    with psycopg.connect(url) as db:
        schema = schema_name(campaign)
        if db.execute("SELECT to_regclass(%s)", (f'"{schema}".runs',)).fetchone()[0] is None:
            return False
        db.execute(f'SET search_path TO "{schema}"')
        made = db.execute("SELECT 1 FROM meta WHERE key = 'campaign'").fetchone()
        runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
    return made is not None and runs == 0


def test_midnight_guard_sees_yesterdays_run_still_reading_its_input(
    tmp_path: Path, pg_url: str
) -> None:
    """The nightly job started at 23:59 is still reading a big input (no run registered
    yet) when the same job is started at 00:01 on another host: the new day's campaign
    must be refused (as on SQLite, `test_a_run_still_reading_its_input_blocks_the_next_
    days_campaign`), or both campaigns send everyone."""
    rows = 40_000
    box = start_sandbox(tmp_path)
    try:
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "in.csv", rows),
            campaign="{job}-{date}",
            ledger=pg_url,
            limits={"concurrency": 8, "rate_per_second": 100_000, "lease_s": 2},
        )
        yesterday = spawn_cli("run", str(job), "--no-progress", "--campaign", YESTERDAY)
        wait_for(lambda: loading(pg_url, YESTERDAY), what="yesterday's run loading")
        today = spawn_cli("run", str(job), "--no-progress")
        try:
            out, err = today.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            out = err = "(still sending after 15 s)"
        for process in (yesterday, today):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        finish(yesterday)
        finish(today)
        assert_no_duplicates(box)
        assert today.returncode == 2, out + err
        assert YESTERDAY in err and "still running" in err, err
    finally:
        box.stop()


def test_two_workers_with_people_waiting_for_their_window_both_end(
    tmp_path: Path, pg_url: str
) -> None:
    """Every person's send window is closed now (San Francisco numbers, a window that opens
    in two hours there). Two workers must not each wait for the people the other holds for
    their window: both end, the one that held people with exit 1 ("waiting for their send
    window"), the other with 1 too or 0 if it ended first with nobody of its own."""
    now = local_minutes(ZoneInfo("America/Los_Angeles"))
    window = f"{hhmm(now + 120)}-{hhmm(now + 180)}"
    box = start_sandbox(tmp_path)
    try:
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "in.csv", 400),
            ledger=pg_url,
            limits={
                "concurrency": 8,
                "lease_s": 1,
                "send_window": window,
                "timezone": "America/Los_Angeles",
            },
        )
        running = [spawn_cli("run", str(job), "--no-progress") for _ in range(2)]
        try:
            codes = [finish(p, timeout=30) for p in running]
        except subprocess.TimeoutExpired:
            codes = [p.poll() for p in running]
        finally:
            for p in running:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert None not in codes and 1 in codes and set(codes) <= {0, 1}, codes
        assert box.records() == []
    finally:
        box.stop()


def test_validate_report_and_only_failed_while_workers_send(tmp_path: Path, pg_url: str) -> None:
    """While two workers send: `validate` is refused (it would replace their rows), `report`
    works, an `--only-failed` worker joins and ends; nobody twice, the report true."""
    rows = 2000
    box = start_sandbox(tmp_path, "--latency-ms", "40")
    try:
        job = lease_job(tmp_path, box, pg_url, rows, 2)
        running = [spawn_cli("run", str(job), "--no-progress") for _ in range(2)]
        wait_for(lambda: len(box.records()) >= 300, what="300 requests")
        checked = cli("validate", str(job))
        assert checked.returncode == 2, checked.stdout + checked.stderr
        assert cli("report", str(job)).returncode == 0
        only = cli("run", str(job), "--no-progress", "--only-failed")
        assert only.returncode in (0, 1), only.stdout + only.stderr
        assert [finish(p) for p in running] == [0, 0]
        assert cli("report", str(job)).returncode == 0
        assert check_report_against_record(box, tmp_path, rows) == {"sent": rows}
    finally:
        box.stop()


def test_a_stopped_worker_does_not_cost_a_live_one_its_lease(tmp_path: Path, pg_url: str) -> None:
    """One of two workers is SIGSTOPped (perhaps inside a transaction, holding rows) for
    three leases, then continued. The other kept running the whole time: it must not lose
    its lease ("this worker's lease expired") because its `recover`, on the same
    connection as its heartbeat, waited for the stopped worker's row locks."""
    rows, lease = 2000, 1
    box = start_sandbox(tmp_path, "--latency-ms", "60")
    try:
        job = lease_job(tmp_path, box, pg_url, rows, lease)
        victim, other = (spawn_cli("run", str(job), "--no-progress") for _ in range(2))
        wait_for(lambda: len(box.records()) >= random.randrange(100, 600), what="requests")
        victim.send_signal(signal.SIGSTOP)
        time.sleep(3 * lease)
        victim.send_signal(signal.SIGCONT)
        _, err = other.communicate(timeout=120)
        _, victim_err = victim.communicate(timeout=120)
        assert other.returncode in (0, 1), err[-2000:]
        assert "this worker's lease expired" not in err, err[-2000:]
        # The victim may find its lease gone: stopped, incomplete (exit 1), not aborted.
        assert victim.returncode in (0, 1), victim_err[-2000:]
        check_report_against_record(box, tmp_path, rows)
    finally:
        box.stop()


def test_a_waiting_worker_whose_lease_expired_stops(tmp_path: Path, pg_url: str) -> None:
    """A `--wait` worker sends the New York person and waits for Honolulu's window (hours
    away). Stopped past its lease, it is settled by a second worker that takes its people
    over; continued, it finds its lease gone and stops: exit 1 ("stopped: …") and its run
    stays `crashed`. Before, the loss was noted on the round that had already ended: the
    worker slept on until the window opened, to send another round on a lost lease."""
    box = start_sandbox(tmp_path)
    try:
        job, first = a_waiting_worker(tmp_path, box, pg_url, lease_s=1)
        log = tmp_path / "runs" / "test" / "log.jsonl"
        second: subprocess.Popen[str] | None = None
        try:
            first.send_signal(signal.SIGSTOP)
            run_id = only_run(pg_url)
            wait_for(lambda: lease_expired(pg_url, run_id, 1), what="the lease to expire")
            second = spawn_cli("run", str(job), "--wait", "--no-progress")
            wait_for(lambda: log.read_text().count(WAITING) == 2, what="a 2nd wait")
            assert run_state(pg_url, run_id) == "crashed"
            first.send_signal(signal.SIGCONT)
            out, err = first.communicate(timeout=60)
            assert first.returncode == 1, out + err[-2000:]
            assert "stopped: this worker's lease expired" in out
            assert run_state(pg_url, run_id) == "crashed"
            second.send_signal(signal.SIGINT)
            assert finish(second) == 130
        finally:
            kill_left(first, second)
        assert box.phones() == [e164(NY_PHONES[0])]
        assert statuses(results(tmp_path)) == {"sent": 1, "pending": 2}
    finally:
        box.stop()


WAITING = "waiting for send windows"


def a_waiting_worker(
    tmp_path: Path, box: Sandbox, pg_url: str, lease_s: float
) -> tuple[Path, subprocess.Popen[str]]:
    """A job of one New York person (inside the window now) and two Honolulu people (whose
    window opens hours later), and a `--wait` worker on it, once it waits for them."""
    rows = [[p, "x"] for p in NY_PHONES[:1] + HNL_PHONES]
    job = write_job(
        tmp_path,
        box.url,
        input=write_csv(tmp_path / "in.csv", ["Phone", "First Name"], rows),
        ledger=pg_url,
        limits={
            "send_window": ny_open_hnl_closed(),
            "timezone": "America/New_York",
            "lease_s": lease_s,
        },
    )
    log = tmp_path / "runs" / "test" / "log.jsonl"
    worker = spawn_cli("run", str(job), "--wait", "--no-progress")
    try:
        wait_for(lambda: log.exists() and WAITING in log.read_text(), what="the worker to wait")
    except AssertionError:
        worker.kill()
        worker.wait()
        raise
    return job, worker


def run_state(url: str, run_id: int) -> str:
    with in_campaign(url) as db:
        found = db.execute("SELECT state FROM runs WHERE id = %s", (run_id,)).fetchone()
    return str(found[0])


def test_a_rerun_with_another_input_inside_a_dead_workers_lease_is_refused(
    tmp_path: Path, pg_url: str
) -> None:
    """A worker is killed; the operator reruns at once with a fixed input (30 more rows).
    The dead worker still counts until its lease expires, so the rerun would join it with
    the old rows: the new people never sent, missing from results.csv, and exit 0 with
    `--resend-unknown`. It is refused instead (exit 2, naming the file); after the lease
    the same command loads the fixed input and sends everyone once."""
    box = start_sandbox(tmp_path)
    try:
        limits = {"concurrency": 4, "rate_per_second": 40, "lease_s": 2}
        job = write_job(
            tmp_path, box.url, input=people(tmp_path / "in.csv", 200), ledger=pg_url, limits=limits
        )
        first = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(box.records()) >= 40, what="requests")
        first.kill()
        first.wait()
        fixed = people(tmp_path / "fixed.csv", 230)
        refused = cli("run", str(job), "--no-progress", "--input", str(fixed))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "fixed.csv" in refused.stderr and "another input" in refused.stderr
        assert "Traceback" not in refused.stderr
        # The same input and mapping, written another way, joins (and sends the rest once
        # the dead worker's lease has expired).
        spelled = {"to_phone": " Phone ", "params": {"first_name": " First Name "}}
        other = write_job(
            tmp_path,
            box.url,
            name="spelled",
            input=people(tmp_path / "copy.csv", 200),
            ledger=pg_url,
            limits=limits,
            mapping={"default_region": "us", **spelled},
        )
        joiner = cli("run", str(other), "--no-progress")
        assert joiner.returncode in (0, 1), joiner.stdout + joiner.stderr
        assert "joining the workers" in joiner.stderr
        again = cli("run", str(job), "--no-progress", "--input", str(fixed), "--resend-unknown")
        assert again.returncode == 0, again.stdout + again.stderr
        assert sorted(set(box.phones())) == sorted(e164(p) for p in phones(230))
        assert statuses(results(tmp_path)) == {"sent": 230}
    finally:
        box.stop()


def test_a_worker_ending_beside_a_dead_waiting_worker_says_rows_are_left(
    tmp_path: Path, pg_url: str
) -> None:
    """A `--wait` worker holds the Honolulu people for their window (hours away) and is
    killed. A plain worker started inside its lease finds nobody to send and ends: before,
    with exit 0 ("another worker still sending") for a campaign nobody was sending any
    more; now exit 1. After the lease, a rerun takes the Honolulu people over."""
    box = start_sandbox(tmp_path)
    try:
        job, waiting = a_waiting_worker(tmp_path, box, pg_url, lease_s=2)
        waiting.kill()
        waiting.wait()
        dead = only_run(pg_url)
        beside = cli("run", str(job), "--no-progress")
        assert beside.returncode == 1, beside.stdout + beside.stderr
        assert "still sending" not in beside.stdout
        wait_for(lambda: lease_expired(pg_url, dead, 2), what="the lease to expire")
        rerun = cli("run", str(job), "--no-progress")
        assert rerun.returncode == 1 and "2 waiting for their send window" in rerun.stdout
        assert box.phones() == [e164(NY_PHONES[0])]
        assert statuses(results(tmp_path)) == {"sent": 1, "pending": 2}
    finally:
        box.stop()


def test_a_second_waiting_worker_stays_and_takes_over_a_dead_ones_people(
    tmp_path: Path, pg_url: str
) -> None:
    """Two `--wait` workers: the first holds the Honolulu people for their window (hours
    away). The second, with nobody of its own, stays (before, it ended at once). The first
    is killed: after its lease the second takes its people over and waits for their
    window itself; Ctrl-C then stops it. Nobody is sent but the New York person, once."""
    box = start_sandbox(tmp_path)
    second: subprocess.Popen[str] | None = None
    try:
        job, first = a_waiting_worker(tmp_path, box, pg_url, lease_s=2)
        dead = only_run(pg_url)
        log = tmp_path / "runs" / "test" / "log.jsonl"
        try:
            second = spawn_cli("run", str(job), "--wait", "--no-progress")
            wait_for(lambda: live_runs(pg_url) == 2, what="the second worker to start")
            first.kill()
            first.wait()
            wait_for(lambda: log.read_text().count(WAITING) == 2, what="the takeover")
            assert run_state(pg_url, dead) == "crashed"
            assert second.poll() is None
            second.send_signal(signal.SIGINT)
            assert finish(second) == 130
        finally:
            kill_left(first, second)
        assert box.phones() == [e164(NY_PHONES[0])]
        assert statuses(results(tmp_path)) == {"sent": 1, "pending": 2}
    finally:
        box.stop()


def kill_left(*processes: subprocess.Popen[str] | None) -> None:
    """Kill the workers a test left running (a stopped one is continued first)."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()


def live_runs(url: str) -> int:
    with in_campaign(url) as db:
        return int(db.execute("SELECT count(*) FROM runs WHERE state = 'running'").fetchone()[0])
