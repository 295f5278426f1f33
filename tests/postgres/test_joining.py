"""Workers joining a running campaign: the input and mapping are the loader's, another input is
refused, and validate, report and --only-failed beside workers."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from campaign.store.db import schema_name
from tests.helpers import (
    assert_no_duplicates,
    cli,
    e164,
    phones,
    spawn_cli,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.pg import (
    check_report_against_record,
    in_campaign,
    only_run,
    pg_job,
    workers,
)
from tests.helpers.runs import YESTERDAY, finish, people, people_job, results, wait_for
from tests.helpers.shared_sandbox import ChannelView


def staff(path: Path, n: int) -> Path:
    """People with a phone and an employee id."""
    return write_csv(
        path,
        ["First Name", "Phone", "Emp"],
        [[f"P{i}", p, f"E{i:05d}"] for i, p in enumerate(phones(n))],
    )


def ledger_meta(url: str, campaign: str, key: str) -> object:
    with in_campaign(url, campaign) as db:
        found = db.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return None if found is None else json.loads(found[0])


def heartbeat_at(db: psycopg.Connection[Any], run_id: int) -> float:
    found = db.execute("SELECT heartbeat_at FROM runs WHERE id = %s", (run_id,)).fetchone()
    assert found is not None
    return float(found[0])


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


def test_a_joiner_with_another_mapping_cannot_replace_the_loaders_mapping(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """Worker 1 loads the campaign with its mapping (recipient key: the phone); worker 2,
    started a moment later from another job file whose mapping keys people by employee id,
    waits for the load and joins. Before worker 1's first request is recorded,
    `keep_mapping` sees no request and stores worker 2's mapping over the one the rows were
    mapped with. Then the campaign's own job is refused ("sent with another mapping"),
    and a rerun of the joiner's job maps everyone to new recipient keys: all sent again."""
    rows = 1500
    box = sandboxes(0)
    data = staff(tmp_path / "in.csv", rows)
    limits = {"concurrency": 8, "rate_per_second": 100_000, "lease_s": 2}
    job = write_job(tmp_path, box.url, input=data, ledger=pg_url, api=box.api(), limits=limits)
    other = write_job(
        tmp_path,
        box.url,
        name="other",
        input=data,
        ledger=pg_url,
        api=box.api(),
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


def test_midnight_guard_sees_yesterdays_run_still_reading_its_input(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """The nightly job started at 23:59 is still reading a big input (no run registered
    yet) when the same job is started at 00:01 on another host: the new day's campaign
    must be refused (as on SQLite, `test_a_run_still_reading_its_input_blocks_the_next_
    days_campaign`), or both campaigns send everyone."""
    rows = 40_000
    box = sandboxes(0)
    job = write_job(
        tmp_path,
        box.url,
        input=people(tmp_path / "in.csv", rows),
        campaign="{job}-{date}",
        ledger=pg_url,
        api=box.api(),
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


def test_validate_report_and_only_failed_while_workers_send(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """While two workers send: `validate` is refused (it would replace their rows), `report`
    works, an `--only-failed` worker joins and ends; nobody twice, the report true."""
    rows = 2000
    box = sandboxes(40)
    job = pg_job(tmp_path, box.url, pg_url, rows, api=box.api(timeout_s=10), lease_s=2)
    running = workers(job, 2)
    wait_for(lambda: len(box.records()) >= 300, what="300 requests")
    # The three together: each is checked while the workers send, in a shorter while.
    beside = [
        spawn_cli("validate", str(job)),
        spawn_cli("report", str(job)),
        spawn_cli("run", str(job), "--no-progress", "--only-failed"),
    ]
    (out, err), (_, report_err), (only_out, only_err) = (p.communicate(timeout=120) for p in beside)
    validate, report, only = beside
    assert validate.returncode == 2, out + err
    assert report.returncode == 0, report_err
    assert only.returncode in (0, 1), only_out + only_err
    assert [finish(p) for p in running] == [0, 0]
    assert cli("report", str(job)).returncode == 0
    assert check_report_against_record(box, tmp_path, rows) == {"sent": rows}


def test_a_rerun_with_another_input_inside_a_dead_workers_lease_is_refused(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """A worker is killed; the operator reruns at once with a fixed input (30 more rows).
    The dead worker still counts until its lease expires, so the rerun would join it with
    the old rows: the new people never sent, missing from results.csv, and exit 0 with
    `--resend-unknown`. It is refused instead (exit 2, naming the file); after the lease
    the same command loads the fixed input and sends everyone once."""
    # The worker is killed as soon as it has renewed its lease: all of the 7 s are left
    # for the two commands run inside it, however loaded the machine (a lease of 10 s
    # counted from a heartbeat up to a third of a lease old left less).
    limits = {"concurrency": 4, "rate_per_second": 40, "lease_s": 7}
    sandbox = sandboxes(0)
    job = people_job(tmp_path, sandbox, 200, ledger=pg_url, **limits)
    first = spawn_cli("run", str(job), "--no-progress")
    wait_for(lambda: len(sandbox.records()) >= 40, what="requests")
    run_id = only_run(pg_url)
    with in_campaign(pg_url) as db:
        last = heartbeat_at(db, run_id)
        wait_for(lambda: heartbeat_at(db, run_id) != last, what="a heartbeat")
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
        sandbox.url,
        name="spelled",
        input=people(tmp_path / "copy.csv", 200),
        ledger=pg_url,
        api=sandbox.api(),
        limits=limits,
        mapping={"default_region": "us", **spelled},
    )
    joiner = cli("run", str(other), "--no-progress")
    assert joiner.returncode in (0, 1), joiner.stdout + joiner.stderr
    assert "joining the workers" in joiner.stderr
    again = cli("run", str(job), "--no-progress", "--input", str(fixed), "--resend-unknown")
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted(set(sandbox.phones())) == sorted(e164(p) for p in phones(230))
    assert statuses(results(tmp_path)) == {"sent": 230}
