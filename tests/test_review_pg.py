"""An adversarial review of the PostgreSQL store (and the SQLite claims): hostile schedules
against the real CLI, a real PostgreSQL and the sandbox, counted at the sandbox's record."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from campaign.store.db import schema_name
from tests.helpers import (
    assert_no_duplicates,
    cli,
    phones,
    spawn_cli,
    start_sandbox,
    write_csv,
    write_job,
)
from tests.test_resume import finish


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


@pytest.mark.parametrize("trial", range(3))
def test_a_joiner_with_another_mapping_cannot_replace_the_loaders_mapping(
    tmp_path: Path, pg_url: str, trial: int
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
        time.sleep(0.3)
        joiner = spawn_cli("run", str(other), "--no-progress")
        codes = [finish(loader), finish(joiner)]
        assert codes[0] == 0, codes
        assert codes[1] in (0, 2), codes
        assert_no_duplicates(box)
        assert len(box.records()) == rows
        # A rerun of the other job (another host's file, say): refused, nothing sent again.
        wrong = cli("run", str(other), "--no-progress")
        received = Counter(box.phones())
        assert max(received.values()) == 1, f"{sum(received.values()) - rows} sent twice"
        assert wrong.returncode == 2, wrong.stdout + wrong.stderr
        # The campaign was mapped, and sent, with the loader's mapping: its own job is fine.
        stored = ledger_meta(pg_url, "test", "mapping")
        assert isinstance(stored, dict) and stored["recipient_key"] == ["to_phone"], stored
        again = cli("run", str(job), "--no-progress")
        assert again.returncode == 0, again.stdout + again.stderr
        assert_no_duplicates(box)
    finally:
        box.stop()
