"""Workers killed at random moments and others taking over their people: each person once,
counted at the sandbox's record."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import spawn_cli
from tests.helpers.pg import (
    CONCURRENCY,
    check_against_record,
    ledger_states,
    lock_waiters,
    pg_job,
    resend_and_check,
    settle_and_resend,
    worker_at_a_held_commit_of,
    worker_backends,
    workers,
)
from tests.helpers.runs import wait_for
from tests.helpers.shared_sandbox import ChannelView


@pytest.mark.timeout(240)
def test_workers_killed_and_replaced_at_random_moments_send_each_person_once(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """Three workers; one after another is killed -9 at a random moment (often inside a
    group commit: latency is low, so commits follow each other) and replaced."""
    rows, kills = 900, 4
    box = sandboxes(5)
    job = pg_job(tmp_path, box, pg_url, rows, lease_s=3)
    rng = random.Random()
    running = workers(job, 3)
    marks = sorted(rng.sample(range(30, rows - 150), kills))
    for mark in marks:
        wait_for(
            lambda m=mark: len(box.records()) >= m or any(p.poll() is not None for p in running),
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
    settle_and_resend(box, tmp_path, job, pg_url, rows, CONCURRENCY * kills)


@pytest.mark.timeout(240)
def test_a_killed_workers_buffered_commit_lands_while_another_worker_settles_it(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """A's whole group commit (BEGIN .. COMMIT) is at the server, waiting at the generation
    bump, when A is killed -9: the server still runs it to its COMMIT once the lock goes,
    marking A's batch in flight though none of it left. B starts meanwhile and settles A
    (lease expired), waiting for A's rows. Nobody is left in flight, nobody twice."""
    rows = 600
    box = sandboxes(5)
    job, a, locker = worker_at_a_held_commit_of(
        tmp_path, box, pg_url, rows, api=box.api(), lease_s=2
    )
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
