"""Hostile schedules against the claims and leases of a PostgreSQL campaign: the real CLI
in subprocesses, a real PostgreSQL (tests/helpers/pg_server.py), and the server's own log of
arrivals as the count of what was sent. Each schedule is forced by events (a lock a
backend waits for, a lease that expired, a request that arrived), not by sleeps."""

from __future__ import annotations

import asyncio
import gc
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
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
    start_sandbox,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.pg import in_campaign, lease_expired, lock_waiters, only_run
from tests.helpers.runs import finish, people, results, wait_for


def held_for(
    number: str, release: threading.Event
) -> tuple[
    Callable[[int, dict[str, Any]], Any], Callable[[web.Request], Awaitable[web.StreamResponse]]
]:
    """A FaultServer reply that holds the request to `number` (the others: 200),
    and the stream that answers it `success` once `release` is set."""

    async def held(_request: web.Request) -> web.StreamResponse:
        while not release.is_set():
            await asyncio.sleep(0.01)
        return web.json_response({"success": True})

    def reply(_n: int, body: dict[str, Any]) -> Any:
        return "held" if body["to_phone"] == number else 200

    return reply, held


def state_of(url: str, recipient_id: int) -> str:
    with in_campaign(url) as db:
        found = db.execute("SELECT state FROM recipients WHERE id = %s", (recipient_id,)).fetchone()
    return str(found[0])


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
        job = write_job(
            tmp_path,
            server.url,
            input=people(tmp_path / "in.csv", 3),
            ledger=pg_url,
            api={"timeout_s": 60},
            limits={"concurrency": 1, "rate_per_second": 1000, "lease_s": lease},
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


def with_invalid_rows(path: Path, valid: list[str], invalid: int) -> Path:
    """The `valid` numbers first, then `invalid` rows without a phone (each one a line of
    the report, none sent): a report that takes a while to write."""
    notes = "n" * 200
    rows = [[f"P{i}", phone, notes] for i, phone in enumerate(valid)]
    rows += [[f"Q{i}", "", notes] for i in range(invalid)]
    return write_csv(path, ["First Name", "Phone", "Notes"], rows)


def advisory_waiters(url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as db:
        found = db.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
        ).fetchone()
    return found is not None


def report_being_written(directory: Path) -> bool:
    return any(tmp.stat().st_size > 0 for tmp in directory.glob(".results.csv.*.tmp"))


@pytest.mark.timeout(120)
def test_a_report_read_before_the_last_answer_never_replaces_the_final_report(
    tmp_path: Path, pg_url: str
) -> None:
    """`campaign report` (or the page's results download) reads the ledger while a worker's
    last request is open, and is slow to write (here: stopped) while the worker records
    its answer `sent`, ends and writes the final report. On PostgreSQL nothing keeps a
    report from landing on top of a newer one: the older reading replaces results.csv, and
    a person shown `sent` shows `unknown` in the report written after it (invariant 4)."""
    numbers = [p.replace(" ", "") for p in phones(3)]
    x = numbers[0]
    answer_x = threading.Event()
    reply, held = held_for(x, answer_x)

    invalid = 60_000
    with FaultServer(reply, streams={"held": held}) as server:
        job = write_job(
            tmp_path,
            server.url,
            input=with_invalid_rows(tmp_path / "in.csv", numbers, invalid),
            ledger=pg_url,
            api={"timeout_s": 60},  # X's answer comes when the test says
            limits={"concurrency": 4, "rate_per_second": 1000, "lease_s": 5},
        )
        directory = tmp_path / "runs" / "test"
        worker = spawn_cli("run", str(job), "--no-progress")
        report: subprocess.Popen[str] | None = None
        try:
            wait_for(lambda: len(server.arrivals) == 3, what="the three requests")
            report = spawn_cli("report", str(job))
            wait_for(lambda: report_being_written(directory), what="the report being written")
            report.send_signal(signal.SIGSTOP)
            assert report_being_written(directory), "the report was written before the stop"
            answer_x.set()
            # The worker has written its final report, or waits for its turn to.
            wait_for(lambda: worker.poll() is not None or advisory_waiters(pg_url), what="worker")
            report.send_signal(signal.SIGCONT)
            assert finish(report) == 0
            assert finish(worker) == 0
        finally:
            for process in (worker, report):
                if process is not None and process.poll() is None:
                    process.send_signal(signal.SIGCONT)
                    process.kill()
                    process.wait()
        assert Counter(server.bodies()[i]["to_phone"] for i in range(3)) == Counter(numbers)
        assert statuses(results(tmp_path)) == {"sent": 3, "invalid": invalid}


@pytest.mark.timeout(120)
def test_a_reconcile_while_a_worker_sends_leaves_the_worker_and_its_people_alone(
    tmp_path: Path, pg_url: str
) -> None:
    """On PostgreSQL a worker is dead only once its lease expired. `campaign reconcile`,
    started while a live worker waits for an answer, settled the campaign as if every run
    still marked running were dead (SQLite's rule, where the campaign's lock excludes a
    run): the worker's person in flight became `unknown` and the worker, taken for dead,
    stopped with the rest of the campaign unsent."""
    numbers = [p.replace(" ", "") for p in phones(6)]
    x = numbers[0]
    answer_x = threading.Event()
    reply, held = held_for(x, answer_x)

    reports = start_sandbox(tmp_path)  # the Reporting API: it has not seen anyone
    with FaultServer(reply, streams={"held": held}) as server:
        job = write_job(
            tmp_path,
            server.url,
            input=people(tmp_path / "in.csv", 6),
            ledger=pg_url,
            api={"timeout_s": 60},
            reporting={"agent_id": "1", "access_token": "sandbox-token", "base_url": reports.url},
            limits={"concurrency": 1, "rate_per_second": 1000, "lease_s": 30},
        )
        worker = spawn_cli("run", str(job), "--no-progress")
        try:
            wait_for(lambda: len(server.arrivals) == 1, what="the request to X")
            checked = cli("reconcile", str(job))
            assert checked.returncode == 0, checked.stdout + checked.stderr
            assert worker.poll() is None
            answer_x.set()
            out, err = worker.communicate(timeout=60)
        finally:
            answer_x.set()
            reports.stop()
            if worker.poll() is None:
                worker.kill()
                worker.wait()
        assert worker.returncode == 0, out + err
        assert Counter(b["to_phone"] for b in server.bodies()) == Counter(numbers)
        assert statuses(results(tmp_path)) == {"sent": 6}


async def test_a_prefetched_batch_that_failed_is_not_printed_as_a_lost_task_error() -> None:
    """The feed asks for the next batch while workers still have targets; the ledger dies
    (the request for that batch fails) and the run halts before anyone takes it. The
    failure is the workers' to report (one line, exit 1 or 3): it must not also reach
    stderr as asyncio's "Task exception was never retrieved" with a traceback, which
    `test_postgres_stopped_mid_run_stops_the_workers_cleanly_and_a_rerun_continues` hit."""
    from campaign.dispatch import _Feed
    from campaign.store.ledger import Target

    async def batches() -> Any:
        yield [Target(i, i, b"{}", 0, False) for i in range(1, 4)]
        raise RuntimeError("the ledger is gone")

    lost: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: lost.append(context))
    feed = _Feed(batches(), low=8)
    first = await feed.next()  # three left, fewer than `low`: the next batch is asked for
    assert first is not None and first.id == 1
    await asyncio.sleep(0.05)  # meanwhile the request for it fails
    await feed.close()  # the run halted with targets left
    del feed
    gc.collect()
    await asyncio.sleep(0)
    assert lost == []
