"""Probes of a PostgreSQL campaign for hostile-schedule tests: locks, leases, runs, states."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from campaign.store.db import schema_name
from tests.helpers import (
    Sandbox,
    statuses,
    write_job,
)
from tests.helpers.runs import people, results


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


def lease_job(
    tmp_path: Path, box: Sandbox, url: str, rows: int, lease: float, **limits: object
) -> Path:
    return write_job(
        tmp_path,
        box.url,
        input=people(tmp_path / "in.csv", rows),
        ledger=url,
        api={"timeout_s": 10},
        limits={"concurrency": 8, "rate_per_second": 100_000, "lease_s": lease, **limits},
    )


def ledger_states(url: str, campaign: str = "test") -> Counter[str]:
    with psycopg.connect(url, autocommit=True) as db:
        db.execute(f'SET search_path TO "{schema_name(campaign)}"')
        found = db.execute("SELECT state, count(*) FROM recipients GROUP BY state").fetchall()
    return Counter(dict(found))
