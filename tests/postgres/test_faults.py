"""The database under a worker fails: connections terminated, PostgreSQL stopped, a group
commit cut inside its pipeline, SIGINT at random moments. Nothing is sent twice and nothing
is left in flight."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from tests.helpers import spawn_cli
from tests.helpers.pg import (
    CONCURRENCY,
    ended_cleanly,
    group_commits_waiting,
    lock_waiters,
    pg_job,
    rerun_sends_the_rest,
    settle_and_resend,
    worker_at_a_held_commit_of,
    worker_backends,
    workers,
)
from tests.helpers.pg_server import PgServer
from tests.helpers.runs import people_job, wait_for
from tests.helpers.shared_sandbox import ChannelView


def test_worker_connections_terminated_at_random_moments(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """pg_terminate_backend of one of the workers' connections at a time (the writer's, the
    claims', the budget's...), picked at random, while three workers send."""
    rows, cuts = 900, 4
    box = sandboxes(5)
    job = pg_job(tmp_path, box, pg_url, rows, lease_s=3)
    rng = random.Random()
    running = workers(job, 3)
    for mark in sorted(rng.sample(range(30, rows - 150), cuts)):
        # A cut connection may stop its worker (exit 1): when all have stopped, the
        # requests stop short of the next mark.
        wait_for(
            lambda m=mark: (
                len(box.records()) >= m or all(process.poll() is not None for process in running)
            ),
            what=f"{mark} requests or every worker stopped",
        )
        backends = worker_backends(pg_url)
        if backends:
            with psycopg.connect(pg_url, autocommit=True) as db:
                db.execute("SELECT pg_terminate_backend(%s)", (rng.choice(backends),))
    for process in running:
        ended_cleanly(process, timeout=180)
    settle_and_resend(box, tmp_path, job, pg_url, rows, CONCURRENCY * 3)


@pytest.mark.timeout(240)
def test_postgres_stopped_at_a_random_moment_then_a_rerun(
    tmp_path: Path, pg_server: PgServer, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    rows = 900
    box = sandboxes(5)
    job = pg_job(tmp_path, box, pg_url, rows, lease_s=3)
    running = workers(job, 3)
    mark = random.randrange(30, rows - 150)
    wait_for(lambda: len(box.records()) >= mark, what=f"{mark} requests")
    pg_server.stop_immediate()
    try:
        for process in running:
            out, err = ended_cleanly(process, timeout=120)
            if process.returncode == 1:  # incomplete: the store is named, its password not
                assert "PostgreSQL at" in err, err
            assert not any(secret in out + err for secret in pg_server.passwords.values())
    finally:
        pg_server.start()
    settle_and_resend(box, tmp_path, job, pg_url, rows, CONCURRENCY * 3)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", ["kill -9", "cancel", "terminate", "stop", "cancel then kill"])
def test_a_group_commit_stopped_inside_its_pipeline(
    tmp_path: Path,
    pg_server: PgServer,
    pg_url: str,
    fault: str,
    sandboxes: Callable[[int], ChannelView],
) -> None:
    """The writer's pipeline has marked a batch in flight and logged its attempts, and
    waits at the generation bump (a row lock held here) before its COMMIT; then the worker
    is killed, its statement cancelled, its connection terminated, or PostgreSQL stopped.
    None of that batch may leave, nobody is left in flight, and a rerun sends each person
    once, counted at the sandbox."""
    rows = 600
    box = sandboxes(5)
    job, worker, locker = worker_at_a_held_commit_of(
        tmp_path, box, pg_url, rows, api=box.api(), lease_s=3
    )
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
    settle_and_resend(box, tmp_path, job, pg_url, rows, CONCURRENCY)


@pytest.mark.timeout(240)
def test_sigint_at_a_random_moment_of_a_rate_limited_run(
    tmp_path: Path, store: str | None, sandboxes: Callable[[int], ChannelView]
) -> None:
    """At 200/s a claim is a batch of 200, so claims come every second; SIGINT at a random
    arrival: 130, one line, no traceback, and the rerun sends everyone else once."""
    rows = 800
    box = sandboxes(5)
    job = people_job(
        tmp_path, box, rows, ledger=store, concurrency=CONCURRENCY, rate_per_second=200
    )
    run = spawn_cli("run", str(job), "--no-progress")
    mark = random.randrange(150, 600)
    wait_for(lambda: len(box.records()) >= mark, what=f"{mark} requests")
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, out + err
    assert "Traceback" not in err and "Task exception" not in err, err
    rerun_sends_the_rest(box, tmp_path, job, rows)
