"""Probes of a PostgreSQL campaign for hostile-schedule tests: locks, leases, runs, states."""

from __future__ import annotations

import random
import subprocess
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
    statuses,
)
from tests.helpers.runs import people_job, resend_and_check, results, wait_for
from tests.helpers.shared_sandbox import ChannelView

CONCURRENCY = 8


def in_campaign(url: str, campaign: str = "test") -> psycopg.Connection[Any]:
    """A connection whose unqualified names are the campaign's tables."""
    db = psycopg.connect(url, autocommit=True)
    db.execute(f'SET search_path TO "{schema_name(campaign)}"')
    return db


def lock_waiters(url: str, like: str) -> list[int]:
    """Backends of the test's database waiting for a lock, running a statement `like`."""
    with psycopg.connect(url, autocommit=True) as db:
        found = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE %s",
            (like,),
        ).fetchall()
    return [pid for (pid,) in found]


def lease_expired(url: str, run_id: int, lease_s: float) -> bool:
    with in_campaign(url) as db:
        found = db.execute(
            "SELECT extract(epoch FROM clock_timestamp()) - heartbeat_at FROM runs WHERE id = %s",
            (run_id,),
        ).fetchone()
    return found is not None and found[0] > lease_s * 1.5


def only_run(url: str) -> int:
    with in_campaign(url) as db:
        found = db.execute("SELECT id FROM runs").fetchall()
    assert len(found) == 1, found
    return int(found[0][0])


def check_report_against_record(box: Sandbox, tmp_path: Path, rows: int) -> dict[str, int]:
    """Each person at most once at the sandbox; every row in the report once; every row
    reported `sent` was received; every number received is reported sent or unknown."""
    received = Counter(p for p in box.phones())
    twice = sorted(p for p, n in received.items() if n > 1)
    assert twice == [], f"{len(twice)} sent twice: {twice[:5]}"
    lines = results(tmp_path)
    assert len(lines) == rows, len(lines)
    counts = statuses(lines)
    for line in lines:
        if line["_status"] == "sent":
            assert line["_to_phone"] in received, f"reported sent, never received: {line}"
        elif line["_to_phone"] in received:
            assert line["_status"] == "unknown", f"received, reported {line['_status']}: {line}"
    return counts


def pg_job(tmp_path: Path, to: str | ChannelView, pg_url: str, rows: int, **limits: Any) -> Path:
    """A job sending `rows` people to `to` (`people_job`), its ledger at `pg_url`:
    CONCURRENCY requests at once and no rate to speak of unless `limits` say otherwise."""
    fast: dict[str, Any] = {"concurrency": CONCURRENCY, "rate_per_second": 100_000}
    return people_job(tmp_path, to, rows, ledger=pg_url, **{**fast, **limits})


def workers(job: Path, n: int, *extra: str) -> list[subprocess.Popen[str]]:
    """`n` workers of one job started at once."""
    return [spawn_cli("run", str(job), "--no-progress", *extra) for _ in range(n)]


def ledger_states(url: str, campaign: str = "test") -> Counter[str]:
    with in_campaign(url, campaign) as db:
        found = db.execute("SELECT state, count(*) FROM recipients GROUP BY state").fetchall()
    return Counter(dict(found))


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


def ended_cleanly(process: subprocess.Popen[str], timeout: float = 180) -> tuple[str, str]:
    """A worker whose database failed under it ended 0, 1 or 3, never with a traceback:
    its stdout and stderr."""
    out, err = process.communicate(timeout=timeout)
    assert process.returncode in (0, 1, 3), out + err
    assert "Traceback" not in err, err
    return out, err


def rerun_sends_the_rest(box: Sandbox, tmp_path: Path, job: Path, rows: int) -> None:
    """A rerun after a stopped worker sends everyone it left, and nobody twice."""
    again = cli("run", str(job), "--no-progress", timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(assert_no_duplicates(box)) == rows
    assert statuses(results(tmp_path)) == {"sent": rows}


def settle_and_resend(
    box: Sandbox, tmp_path: Path, job: Path, pg_url: str, rows: int, in_doubt: int
) -> None:
    """After hostile workers ended: a rerun settles what they left (nobody pending or in
    flight), the report is checked at the sandbox's record (at most `in_doubt` unknown),
    and --resend-unknown reaches everyone."""
    settle = cli("run", str(job), "--no-progress", timeout=180)
    assert settle.returncode in (0, 1), settle.stdout + settle.stderr
    assert ledger_states(pg_url).keys() <= {"sent", "unknown"}
    unknown = check_against_record(box, tmp_path, rows, in_doubt)
    resend_and_check(box, tmp_path, job, rows, unknown)


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
    return worker_at_a_held_commit_of(tmp_path, box, pg_url, rows, lease_s=lease_s)


def worker_at_a_held_commit_of(
    tmp_path: Path, box: Sandbox, pg_url: str, rows: int, **limits: Any
) -> tuple[Path, subprocess.Popen[str], psycopg.Connection[Any]]:
    """`worker_at_a_held_commit`, its job's `limits` (and `api`) given."""
    job = pg_job(tmp_path, box.url, pg_url, rows, **limits)
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
