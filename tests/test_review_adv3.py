"""Review of the waiting worker (PostgreSQL): a worker stopped inside its claim's
transaction past its lease, with the real CLI, a real PostgreSQL and the sandbox's record."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg

from campaign.store.db import schema_name
from tests.helpers import cli, spawn_cli, start_sandbox
from tests.helpers.pg import check_report_against_record, lease_job, ledger_states
from tests.helpers.runs import wait_for

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


def test_a_worker_stopped_inside_its_claim_past_its_lease_leaves_nobody_pending(
    tmp_path: Path, pg_url: str
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
    box = start_sandbox(tmp_path, "--latency-ms", "150")
    try:
        job = lease_job(tmp_path, box, pg_url, rows, lease)
        mapped = cli("run", str(job), "--dry-run")
        assert mapped.returncode == 0, mapped.stdout + mapped.stderr
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute(f'SET search_path TO "{schema_name("test")}"')
            db.execute(SLOW_FIRST_CLAIM)
        other = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(box.records()) >= 5, what="the other worker's first requests")
        victim = spawn_cli(
            "run", str(job), "--no-progress", env={**os.environ, "PGAPPNAME": "victim"}
        )
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
    finally:
        box.stop()
