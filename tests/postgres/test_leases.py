"""A worker's lease on PostgreSQL: a dead worker's people are settled once it expires, a live
one never loses it, and nobody is sent twice. Real CLI, real PostgreSQL, counted at the
sandbox's record."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from campaign.store.db import schema_name
from tests.helpers import (
    FaultServer,
    cli,
    phones,
    spawn_cli,
)
from tests.helpers.pg import (
    check_report_against_record,
    in_campaign,
    lease_expired,
    ledger_states,
    lock_waiters,
    only_run,
    pg_job,
    workers,
)
from tests.helpers.runs import finish, people_job, results, wait_for
from tests.helpers.shared_sandbox import ChannelView


def state_of(url: str, recipient_id: int) -> str:
    with in_campaign(url) as db:
        found = db.execute("SELECT state FROM recipients WHERE id = %s", (recipient_id,)).fetchone()
    return str(found[0])


def settled_or_unregistered(db: psycopg.Connection[Any], pid: int) -> bool:
    """The stopped worker `pid` has been settled for dead by another (`crashed`), or never
    registered its run (it was stopped before): either way nothing changes until it goes
    on. `db`: a connection kept for the polls (not one per look)."""
    schema = schema_name("test")
    if db.execute("SELECT to_regclass(%s)", (f'"{schema}".runs',)).fetchone()[0] is None:
        return True
    found = db.execute(f'SELECT state FROM "{schema}".runs WHERE pid = %s', (pid,)).fetchone()
    return found is None or found[0] == "crashed"


def wait_until_settled(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as db:
        wait_for(lambda: settled_or_unregistered(db, pid), what="the victim settled")


# The first claim of a person (its claim going from nobody to a run) sleeps, once: the
# claiming transaction has checked that its run is live and holds the rows it picked.
SLOW_FIRST_CLAIM = """
CREATE TABLE slow_once (done boolean NOT NULL DEFAULT false);
INSERT INTO slow_once VALUES (false);
CREATE FUNCTION slow_claim() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.claim IS NULL AND NEW.claim IS NOT NULL
            AND current_setting('application_name') = 'victim' THEN
        UPDATE slow_once SET done = true WHERE NOT done;
        IF FOUND THEN PERFORM pg_sleep(2); END IF;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER slow_claim BEFORE UPDATE ON recipients
    FOR EACH ROW EXECUTE FUNCTION slow_claim();
"""


def claim_asleep(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as db:
        return bool(
            db.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'victim' "
                "AND wait_event = 'PgSleep'"
            ).fetchone()
        )


@pytest.mark.timeout(120)
def test_a_request_begun_while_its_worker_is_settled_for_dead_is_unknown_not_inflight(
    tmp_path: Path, pg_url: str
) -> None:
    """Worker A records X in flight, and its transaction is still open when A stops (here:
    its INSERT of the attempt waits for a lock, then SIGSTOP) past its lease. A new run B
    settles A: marking A's in-flight people `unknown` finds X still `pending` (A has not
    committed), then releasing A's claims waits for X's row. A continues, commits X in
    flight and sends it; B's release goes on and clears X's claim, so X stays `inflight`
    with nobody's claim: no later start marks it `unknown` (invariant 3), `--resend-unknown`
    and reconcile never look at it, whereas the contract says a person in flight when its
    process died is `unknown` and is sent again with `--resend-unknown`."""
    numbers = [p.replace(" ", "") for p in phones(3)]
    x = numbers[0]
    seen: list[str] = []

    def reply(_n: int, body: dict[str, Any]) -> Any:
        seen.append(body["to_phone"])
        return "hang" if body["to_phone"] == x and seen.count(x) == 1 else 200

    lease = 1.0
    with FaultServer(reply) as server:
        hang = {"timeout_s": 60}  # the hanging request outlasts the lease
        job = people_job(
            tmp_path, server.url, 3, ledger=pg_url, api=hang, concurrency=1, lease_s=lease
        )
        checked = cli("validate", str(job))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        with in_campaign(pg_url) as db:
            x_id = db.execute("SELECT id FROM recipients WHERE to_phone = %s", (x,)).fetchone()[0]
        # Holds the unique key A's first attempt will insert: A's transaction waits there.
        blocker = psycopg.connect(pg_url)
        blocker.execute(f'SET search_path TO "{schema_name("test")}"')
        blocker.execute(
            "INSERT INTO attempts (recipient_id, n, run_id, started_at) VALUES (%s, 1, 0, 0)",
            (x_id,),
        )
        a = spawn_cli("run", str(job), "--no-progress")
        b: subprocess.Popen[str] | None = None
        try:
            wait_for(lambda: lock_waiters(pg_url, "%INSERT INTO attempts%") != [], what="A waits")
            a.send_signal(signal.SIGSTOP)
            run_a = only_run(pg_url)
            wait_for(lambda: lease_expired(pg_url, run_a, lease), what="A's lease expired")
            b = spawn_cli("run", str(job), "--no-progress")
            wait_for(lambda: lock_waiters(pg_url, "UPDATE recipients%") != [], what="B waits for X")
            blocker.rollback()  # A's insert goes on; A commits X in flight once it continues
            a.send_signal(signal.SIGCONT)
            wait_for(lambda: x in seen, what="A's request to X")
            a.send_signal(signal.SIGKILL)
            a.wait()
            assert finish(b) == 1  # X is in doubt
        finally:
            blocker.close()
            for process in (a, b):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                    process.wait()
        # A is gone with X's request open: X is `unknown`, whatever B did meanwhile.
        assert state_of(pg_url, x_id) == "unknown"
        again = cli("run", str(job), "--no-progress", "--resend-unknown")
        assert again.returncode == 0, again.stdout + again.stderr
        assert Counter(seen) == {x: 2, numbers[1]: 1, numbers[2]: 1}, Counter(seen)
        assert {line["_status"] for line in results(tmp_path)} == {"sent"}


def test_a_worker_stopped_inside_its_claim_past_its_lease_leaves_nobody_pending(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """The other worker claims rows 1-100 and sends them. The victim's first claim (rows
    101-200) has checked its run is live and locked its people, and is stopped (SIGSTOP)
    before it commits, for longer than its lease. The other worker skips the victim's
    locked rows once it is done, and settles the victim for dead (`crashed`) although
    its claim is still open. Continued,
    the victim commits the claim for a crashed run, finds its lease gone and stops: 100
    people left pending by two workers that both ended. The claim must hold its run live
    until it commits: the victim's lease cannot be settled under an open claim."""
    rows, lease = 200, 1
    # The other worker's first 100 people take 100 / 8 * 0.4 = 5 s: the victim, started
    # once they begin, has that long to start (seconds on a loaded machine) and claim the
    # rest; at 150 ms, the other often claimed them all first and the victim never slept.
    box = sandboxes(400)
    job = pg_job(tmp_path, box.url, pg_url, rows, api=box.api(timeout_s=10), lease_s=lease)
    mapped = cli("run", str(job), "--dry-run")
    assert mapped.returncode == 0, mapped.stdout + mapped.stderr
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute(f'SET search_path TO "{schema_name("test")}"')
        db.execute(SLOW_FIRST_CLAIM)
    other = spawn_cli("run", str(job), "--no-progress")
    wait_for(lambda: len(box.records()) >= 1, what="the other worker's first request")
    victim = spawn_cli("run", str(job), "--no-progress", env={**os.environ, "PGAPPNAME": "victim"})
    wait_for(lambda: claim_asleep(pg_url), what="the victim's claim asleep in its trigger")
    victim.send_signal(signal.SIGSTOP)
    try:
        _, err = other.communicate(timeout=60)
        assert other.returncode in (0, 1), err[-3000:]
    finally:
        victim.send_signal(signal.SIGCONT)
    _, victim_err = victim.communicate(timeout=60)
    assert victim.returncode in (0, 1), victim_err[-3000:]
    states = ledger_states(pg_url)
    assert states == {"sent": rows}, states
    assert cli("report", str(job)).returncode == 0
    assert check_report_against_record(box, tmp_path, rows) == {"sent": rows}


def test_a_worker_stopped_longer_than_its_lease_then_continued(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """SIGSTOP one of three workers at a random moment past its lease, SIGCONT it while
    the others have taken its people over: nobody twice, the report true to the record."""
    # 3 s, not 1: the live workers keep renewing theirs, and on a loaded machine a
    # heartbeat can be a second late. The stopped one's lease expires for certain.
    rows, lease = 900, 3
    box = sandboxes(30)
    job = pg_job(tmp_path, box.url, pg_url, rows, api=box.api(timeout_s=10), lease_s=lease)
    rng = random.Random()
    mark = rng.randrange(0, rows // 2)
    running = workers(job, 3)
    wait_for(lambda: len(box.records()) >= mark, what=f"{mark} requests")
    victim = running[rng.randrange(3)]
    victim.send_signal(signal.SIGSTOP)
    wait_until_settled(pg_url, victim.pid)
    time.sleep(lease * rng.uniform(0, 1))  # continued at once, or a while after
    victim.send_signal(signal.SIGCONT)
    codes = [finish(p) for p in running]
    assert set(codes) <= {0, 1, 3}, codes
    report = cli("report", str(job))
    assert report.returncode == 0, report.stderr
    counts = check_report_against_record(box, tmp_path, rows)
    assert set(counts) <= {"sent", "unknown", "pending"}, counts
    assert counts.get("unknown", 0) <= 8, counts


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
        job = people_job(
            tmp_path,
            server.url,
            4,
            ledger=pg_url,
            api={"timeout_s": 30},
            concurrency=4,
            lease_s=1,
            max_attempts=1,
        )
        a = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(server.arrivals) >= 4, what="A's four requests")
        time.sleep(0.3)
        a.send_signal(signal.SIGSTOP)
        try:
            run_a = only_run(pg_url)
            wait_for(lambda: lease_expired(pg_url, run_a, 1), what="A's lease expired")
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
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """SIGSTOP one of two workers past its lease (the other settles it: `crashed`), SIGCONT
    it and kill -9 it a moment later. Whatever it did in that moment, once a later run is
    over nobody is left `inflight` (invariant 3: in flight when its process died ->
    `unknown`, which --resend-unknown and reconcile can act on), and nobody twice."""
    # A lease the live worker renews in time however loaded the machine; the stopped
    # one's expires for certain.
    rows, lease = 1000, 3
    box = sandboxes(60)
    job = pg_job(tmp_path, box.url, pg_url, rows, api=box.api(timeout_s=10), lease_s=lease)
    rng = random.Random()
    running = workers(job, 2)
    wait_for(lambda: len(box.records()) >= 200, what="200 requests")
    victim, other = running
    victim.send_signal(signal.SIGSTOP)
    wait_until_settled(pg_url, victim.pid)
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


def test_a_stopped_worker_does_not_cost_a_live_one_its_lease(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """One of two workers is SIGSTOPped (perhaps inside a transaction, holding rows) for
    three leases, then continued. The other kept running the whole time: it must not lose
    its lease ("this worker's lease expired") because its `recover`, on the same
    connection as its heartbeat, waited for the stopped worker's row locks."""
    # 3 s, not 1: on a loaded machine a live worker's heartbeat can be a second late, and
    # the test then saw the lease loss it looks for. Alone, the other worker sends for
    # about 10 s after the stop, longer than the three leases.
    rows, lease = 2000, 3
    box = sandboxes(60)
    job = pg_job(tmp_path, box.url, pg_url, rows, api=box.api(timeout_s=10), lease_s=lease)
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
