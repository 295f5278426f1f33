"""Hostile schedules against the PostgreSQL group commit (one pipeline), the claim as
one CTE and the halting of a run while it claims: the real CLI in subprocesses, a real
PostgreSQL (tests/helpers/pg_server.py), and the sandbox's record as the count of what was sent."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from campaign.store.db import schema_name
from tests.helpers import (
    Sandbox,
    assert_no_duplicates,
    cli,
    spawn_cli,
    start_sandbox,
    statuses,
    write_job,
)
from tests.helpers.pg import ledger_states, lock_waiters
from tests.helpers.pg_server import PgServer
from tests.helpers.runs import people, results, wait_for

CONCURRENCY = 8


def check_against_record(box: Sandbox, tmp_path: Path, rows: int, in_doubt: int) -> int:
    """The report after every worker ended, checked at the sandbox's record: nobody twice,
    every `sent` person arrived, at most `in_doubt` unknown; the number unknown."""
    received = set(assert_no_duplicates(box))
    lines = results(tmp_path)
    counts = statuses(lines)
    assert set(counts) <= {"sent", "unknown"}, counts
    assert sum(counts.values()) == rows
    sent = {line["_to_phone"] for line in lines if line["_status"] == "sent"}
    assert sent <= received, f"reported sent, never arrived: {sorted(sent - received)}"
    unknown = counts.get("unknown", 0)
    assert unknown <= in_doubt, counts
    assert len(received) >= rows - unknown
    return unknown


def resend_and_check(box: Sandbox, tmp_path: Path, job: Path, rows: int, unknown: int) -> None:
    again = cli("run", str(job), "--no-progress", "--resend-unknown", timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert statuses(results(tmp_path)) == {"sent": rows}
    received = Counter(box.phones())
    assert len(received) == rows
    assert sum(received.values()) - rows <= unknown


@pytest.mark.timeout(240)
def test_workers_killed_and_replaced_at_random_moments_send_each_person_once(
    tmp_path: Path, pg_url: str
) -> None:
    """Three workers; one after another is killed -9 at a random moment (often inside a
    group commit: latency is low, so commits follow each other) and replaced."""
    rows, kills = 900, 4
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "in.csv", rows),
            ledger=pg_url,
            limits={"concurrency": CONCURRENCY, "rate_per_second": 100_000, "lease_s": 3},
        )
        rng = random.Random()
        running = [spawn_cli("run", str(job), "--no-progress") for _ in range(3)]
        marks = sorted(rng.sample(range(30, rows - 150), kills))
        for mark in marks:
            wait_for(
                lambda m=mark: (
                    len(box.records()) >= m or any(p.poll() is not None for p in running)
                ),
                what=f"{mark} requests",
            )
            for process in running:
                if process.poll() is not None:
                    out, err = process.communicate()
                    assert process.returncode in (0, 1), out + err
            victim = running.pop(rng.randrange(len(running)))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            running.append(spawn_cli("run", str(job), "--no-progress"))
        for process in running:
            out, err = process.communicate(timeout=180)
            assert process.returncode in (0, 1), out + err
        settle = cli("run", str(job), "--no-progress", timeout=180)
        assert settle.returncode in (0, 1), settle.stdout + settle.stderr
        assert ledger_states(pg_url).keys() <= {"sent", "unknown"}
        unknown = check_against_record(box, tmp_path, rows, CONCURRENCY * kills)
        resend_and_check(box, tmp_path, job, rows, unknown)
    finally:
        box.stop()


def group_commits_waiting(url: str) -> list[int]:
    """Backends waiting at the generation bump (`UPDATE meta`) of a group commit: the
    transaction has written the attempts table. The lease sweep's settling of dead
    workers bumps the generation with the same statement, once a lease_s / 3, and writes
    no attempt while nobody died: matching the statement alone may pick the sweep."""
    with psycopg.connect(url, autocommit=True) as db:
        found = db.execute(
            "SELECT a.pid FROM pg_stat_activity a WHERE a.datname = current_database() "
            "AND a.wait_event_type = 'Lock' AND a.query LIKE 'UPDATE meta%%' "
            "AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.granted "
            "AND l.relation = %s::regclass AND l.mode = 'RowExclusiveLock')",
            (f'"{schema_name("test")}".attempts',),
        ).fetchall()
    return [pid for (pid,) in found]


def worker_backends(url: str) -> list[int]:
    with psycopg.connect(url, autocommit=True) as db:
        found = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid != pg_backend_pid() AND backend_type = 'client backend'"
        ).fetchall()
    return [pid for (pid,) in found]


@pytest.mark.timeout(240)
def worker_at_a_held_commit(
    tmp_path: Path, box: Sandbox, pg_url: str, rows: int, lease_s: float
) -> tuple[Path, subprocess.Popen[str], psycopg.Connection[Any]]:
    """A worker sending `rows` people, its group commit held: after a random number of
    requests a connection here holds the generation row, and the worker's next commit
    waits there (its pipeline sent, its COMMIT not yet). Returns the job, the worker and
    that connection (closing it lets the commit go on)."""
    job = write_job(
        tmp_path,
        box.url,
        input=people(tmp_path / "in.csv", rows),
        ledger=pg_url,
        limits={"concurrency": CONCURRENCY, "rate_per_second": 100_000, "lease_s": lease_s},
    )
    worker = spawn_cli("run", str(job), "--no-progress")
    mark = random.randrange(20, 300)
    wait_for(lambda: len(box.records()) >= mark, what=f"{mark} requests")
    locker = psycopg.connect(pg_url)
    try:
        locker.execute(f'SET search_path TO "{schema_name("test")}"')
        locker.execute("SELECT 1 FROM meta WHERE key = 'generation' FOR UPDATE")
        wait_for(lambda: group_commits_waiting(pg_url) != [], what="the worker's commit")
    except BaseException:
        locker.close()
        raise
    return job, worker, locker


def test_worker_connections_terminated_at_random_moments(tmp_path: Path, pg_url: str) -> None:
    """pg_terminate_backend of one of the workers' connections at a time (the writer's, the
    claims', the budget's...), picked at random, while three workers send."""
    rows, cuts = 900, 4
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "in.csv", rows),
            ledger=pg_url,
            limits={"concurrency": CONCURRENCY, "rate_per_second": 100_000, "lease_s": 3},
        )
        rng = random.Random()
        running = [spawn_cli("run", str(job), "--no-progress") for _ in range(3)]
        for mark in sorted(rng.sample(range(30, rows - 150), cuts)):
            # A cut connection may stop its worker (exit 1): when all have stopped, the
            # requests stop short of the next mark.
            wait_for(
                lambda m=mark: (
                    len(box.records()) >= m
                    or all(process.poll() is not None for process in running)
                ),
                what=f"{mark} requests or every worker stopped",
            )
            backends = worker_backends(pg_url)
            if backends:
                with psycopg.connect(pg_url, autocommit=True) as db:
                    db.execute("SELECT pg_terminate_backend(%s)", (rng.choice(backends),))
        for process in running:
            out, err = process.communicate(timeout=180)
            assert process.returncode in (0, 1, 3), out + err
            assert "Traceback" not in err, err
        settle = cli("run", str(job), "--no-progress", timeout=180)
        assert settle.returncode in (0, 1), settle.stdout + settle.stderr
        assert ledger_states(pg_url).keys() <= {"sent", "unknown"}
        unknown = check_against_record(box, tmp_path, rows, CONCURRENCY * 3)
        resend_and_check(box, tmp_path, job, rows, unknown)
    finally:
        box.stop()


@pytest.mark.timeout(240)
def test_postgres_stopped_at_a_random_moment_then_a_rerun(
    tmp_path: Path, pg_server: PgServer, pg_url: str
) -> None:
    rows = 900
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "in.csv", rows),
            ledger=pg_url,
            limits={"concurrency": CONCURRENCY, "rate_per_second": 100_000, "lease_s": 3},
        )
        running = [spawn_cli("run", str(job), "--no-progress") for _ in range(3)]
        mark = random.randrange(30, rows - 150)
        wait_for(lambda: len(box.records()) >= mark, what=f"{mark} requests")
        pg_server.stop_immediate()
        try:
            for process in running:
                out, err = process.communicate(timeout=120)
                assert process.returncode in (0, 1, 3), out + err
                assert "Traceback" not in err, err
        finally:
            pg_server.start()
        settle = cli("run", str(job), "--no-progress", timeout=180)
        assert settle.returncode in (0, 1), settle.stdout + settle.stderr
        assert ledger_states(pg_url).keys() <= {"sent", "unknown"}
        unknown = check_against_record(box, tmp_path, rows, CONCURRENCY * 3)
        resend_and_check(box, tmp_path, job, rows, unknown)
    finally:
        box.stop()


@pytest.mark.timeout(240)
def test_sigint_at_a_random_moment_of_a_rate_limited_run(tmp_path: Path, store: str | None) -> None:
    """At 200/s a claim is a batch of 200, so claims come every second; SIGINT at a random
    arrival: 130, one line, no traceback, and the rerun sends everyone else once."""
    rows = 1000
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "in.csv", rows),
            ledger=store,
            limits={"concurrency": CONCURRENCY, "rate_per_second": 200},
        )
        run = spawn_cli("run", str(job), "--no-progress")
        mark = random.randrange(150, 700)
        wait_for(lambda: len(box.records()) >= mark, what=f"{mark} requests")
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
        assert run.returncode == 130, out + err
        assert "Traceback" not in err and "Task exception" not in err, err
        again = cli("run", str(job), "--no-progress", timeout=180)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(assert_no_duplicates(box)) == rows
        assert statuses(results(tmp_path)) == {"sent": rows}
    finally:
        box.stop()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["kill -9", "cancel", "terminate", "stop", "cancel then kill"])
def test_a_group_commit_stopped_inside_its_pipeline(
    tmp_path: Path, pg_server: PgServer, pg_url: str, fault: str
) -> None:
    """The writer's pipeline has marked a batch in flight and logged its attempts, and
    waits at the generation bump (a row lock held here) before its COMMIT; then the worker
    is killed, its statement cancelled, its connection terminated, or PostgreSQL stopped.
    None of that batch may leave, nobody is left in flight, and a rerun sends each person
    once, counted at the sandbox."""
    rows = 600
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job, worker, locker = worker_at_a_held_commit(tmp_path, box, pg_url, rows, lease_s=3)
        try:
            (writer,) = group_commits_waiting(pg_url)
            before = len(box.records())
            if fault.startswith("kill"):
                worker.send_signal(signal.SIGKILL)
            elif fault.startswith("cancel"):
                with psycopg.connect(pg_url, autocommit=True) as db:
                    db.execute("SELECT pg_cancel_backend(%s)", (writer,))
                if fault == "cancel then kill":
                    worker.send_signal(signal.SIGKILL)
            elif fault == "terminate":
                with psycopg.connect(pg_url, autocommit=True) as db:
                    db.execute("SELECT pg_terminate_backend(%s)", (writer,))
            else:
                pg_server.stop_immediate()
            if fault in ("cancel", "terminate"):
                wait_for(lambda: writer not in lock_waiters(pg_url, "%"), what="the error")
            if pg_server.running:
                locker.rollback()  # the worker's end bumps the generation too
            out, err = worker.communicate(timeout=120)
            if "kill" not in fault:
                assert worker.returncode in (1, 3), out + err
                assert "Traceback" not in err, err
            # After the fault only requests recorded in flight before it may still arrive
            # (at most the concurrency): the blocked commit's batch never leaves.
            after = len(box.records())
            assert after - before <= CONCURRENCY, (before, after)
        finally:
            if not pg_server.running:
                pg_server.start()
            locker.close()
        settle = cli("run", str(job), "--no-progress", timeout=180)
        assert settle.returncode in (0, 1), settle.stdout + settle.stderr
        assert ledger_states(pg_url).keys() <= {"sent", "unknown"}
        unknown = check_against_record(box, tmp_path, rows, CONCURRENCY)
        resend_and_check(box, tmp_path, job, rows, unknown)
    finally:
        box.stop()


@pytest.mark.timeout(240)
def test_a_killed_workers_buffered_commit_lands_while_another_worker_settles_it(
    tmp_path: Path, pg_url: str
) -> None:
    """A's whole group commit (BEGIN .. COMMIT) is at the server, waiting at the generation
    bump, when A is killed -9: the server still runs it to its COMMIT once the lock goes,
    marking A's batch in flight though none of it left. B starts meanwhile and settles A
    (lease expired), waiting for A's rows. Nobody is left in flight, nobody twice."""
    rows = 600
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job, a, locker = worker_at_a_held_commit(tmp_path, box, pg_url, rows, lease_s=2)
        try:
            a.send_signal(signal.SIGKILL)
            a.wait()
            # A's connections, some of them still waiting (its lease sweep may wait at
            # the same lock): B's wait is one of a connection not among them.
            of_a = set(worker_backends(pg_url))
            before = len(box.records())
            b = spawn_cli("run", str(job), "--no-progress")
            wait_for(lambda: set(lock_waiters(pg_url, "%")) - of_a != set(), what="B waits")
        finally:
            locker.close()
        out, err = b.communicate(timeout=180)
        assert b.returncode in (0, 1), out + err
        assert len(box.records()) - before <= rows
        assert ledger_states(pg_url).keys() <= {"sent", "unknown"}, ledger_states(pg_url)
        unknown = check_against_record(box, tmp_path, rows, CONCURRENCY)
        resend_and_check(box, tmp_path, job, rows, unknown)
    finally:
        box.stop()


@pytest.mark.timeout(240)
def test_six_claimers_at_once_share_every_person_once_in_batches(
    tmp_path: Path, pg_url: str
) -> None:
    """Six connections claim the same campaign at once, each in a loop like `_claims`
    (from the top again once it finds nobody after its last row): no person is claimed
    twice, no claim returns more than its batch, and nobody is left unclaimed."""
    from campaign.store.ledger import Ledger

    rows, batch = 3000, 37
    job = write_job(
        tmp_path, "http://127.0.0.1:9", input=people(tmp_path / "in.csv", rows), ledger=pg_url
    )
    checked = cli("validate", str(job))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    start = threading.Barrier(6)
    claimed: list[list[int]] = [[] for _ in range(6)]
    sizes: list[int] = []
    failures: list[BaseException] = []

    def claimer(i: int) -> None:
        try:
            ledger = Ledger.on_postgres(pg_url, "test")
            run = ledger.start_run("run")
            start.wait()
            after = 0
            while True:
                found = ledger.claim(run, ("pending", "failed"), after, batch)
                sizes.append(len(found))
                if found:
                    claimed[i].extend(t.id for t in found)
                    after = found[-1].row
                elif after:
                    after = 0
                else:
                    break
            ledger.close()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert failures == []
    every = [rid for ids in claimed for rid in ids]
    assert len(every) == len(set(every)) == rows
    assert max(sizes) <= batch
    assert sum(1 for ids in claimed if ids) >= 2


@pytest.mark.timeout(240)
def test_sigint_while_the_next_batch_is_being_claimed(tmp_path: Path, pg_url: str) -> None:
    """The next claim waits (the input's table is locked here) while the workers send the
    last of their batch; SIGINT then: 130 once the claim has returned, no traceback, the
    people that claim took go back to the pool, and a rerun sends each person once."""
    rows, rate = 400, 100
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "in.csv", rows),
            ledger=pg_url,
            limits={"concurrency": 4, "rate_per_second": rate},
        )
        run = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(box.records()) >= 10, what="the first batch")
        locker = psycopg.connect(pg_url)
        try:
            locker.execute(f'LOCK TABLE "{schema_name("test")}".rows IN ACCESS EXCLUSIVE MODE')
            wait_for(lambda: lock_waiters(pg_url, "WITH picked%") != [], what="a claim")
            wait_for(lambda: len(box.records()) >= rate, what="the batch sent")
            run.send_signal(signal.SIGINT)
        finally:
            locker.close()
        out, err = run.communicate(timeout=60)
        assert run.returncode == 130, out + err
        assert "Traceback" not in err and "Task exception" not in err, err
        assert len(box.records()) == rate
        assert ledger_states(pg_url) == {"sent": rate, "pending": rows - rate}
        again = cli("run", str(job), "--no-progress", timeout=180)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(assert_no_duplicates(box)) == rows
        assert statuses(results(tmp_path)) == {"sent": rows}
    finally:
        box.stop()
