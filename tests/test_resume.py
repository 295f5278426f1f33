"""Never twice, never lost: kill the real CLI, rerun it, and count what the server received."""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    FaultServer,
    Sandbox,
    cli,
    open_ledger,
    phones,
    spawn_cli,
    start_sandbox,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.runs import (
    LEASE_S,
    YESTERDAY,
    finish,
    people,
    people_job,
    resend_and_check,
    results,
    sent_job,
    wait_for,
)


def quick_job(tmp_path: Path, box: Sandbox, rows: int, store: str | None, **limits: Any) -> Path:
    """`rows` people sent fast (5000 a second), each request given 10 s."""
    return people_job(
        tmp_path, box.url, rows, ledger=store, api={"timeout_s": 10}, rate_per_second=5000, **limits
    )


def test_sigkill_at_random_moments_never_sends_twice(tmp_path: Path, store: str | None) -> None:
    rows, concurrency, kills = 600, 20, 3
    box = start_sandbox(tmp_path, "--latency-ms", "50")
    try:
        job = quick_job(tmp_path, box, rows, store, concurrency=concurrency, lease_s=LEASE_S)
        rng = random.Random()
        marks = sorted(rng.sample(range(50, rows - 100), kills))
        for mark in marks:
            process = spawn_cli("run", str(job), "--no-progress")
            wait_for(
                lambda m=mark, p=process: len(box.records()) >= m or p.poll() is not None,
                what=f"{mark} requests",
            )
            process.kill()
            process.wait()
        final = cli("run", str(job), "--no-progress", timeout=300)
        assert final.returncode in (0, 1), final.stdout + final.stderr

        received = Counter(box.phones())
        twice = [phone for phone, n in received.items() if n > 1]
        assert not twice, f"recipients that received two requests: {twice}"
        counts = statuses(results(tmp_path))
        assert set(counts) <= {"sent", "unknown"}, counts
        assert counts.get("unknown", 0) <= concurrency * kills, counts
        assert sum(counts.values()) == rows
        unknown = counts.get("unknown", 0)

        resend_and_check(box, tmp_path, job, rows, unknown, timeout=300)
    finally:
        box.stop()


# One handler serves both signals (campaign/cli.py): each signal on one of the stores
# covers both signals and both ledgers' records of a drained run.
@pytest.mark.parametrize(
    ("signum", "store"),
    [(signal.SIGINT, "sqlite"), (signal.SIGTERM, "postgresql")],
    ids=["SIGINT-on-sqlite", "SIGTERM-on-postgresql"],
    indirect=["store"],
)
def test_signal_drains_in_flight_requests_and_exits_130(
    tmp_path: Path, signum: int, store: str | None
) -> None:
    rows = 100
    box = start_sandbox(tmp_path, "--latency-ms", "300")
    try:
        job = quick_job(tmp_path, box, rows, store, concurrency=10)
        process = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(box.records()) >= 20, what="20 requests")
        process.send_signal(signum)
        assert finish(process) == 130
        counts = statuses(results(tmp_path))
        assert counts.get("unknown", 0) == 0 and counts["pending"] > 0
        assert counts["sent"] == len(box.records())  # every answer that came back is recorded
        # The rest all at once: the rerun is not what this test is about.
        job = quick_job(tmp_path, box, rows, store, concurrency=rows)
        done = cli("run", str(job), "--no-progress")
        assert done.returncode == 0, done.stderr
        assert max(Counter(box.phones()).values()) == 1
        assert len(box.records()) == rows
    finally:
        box.stop()


def test_second_sigint_stops_at_once_and_leaves_unknown(tmp_path: Path, store: str | None) -> None:
    with FaultServer(lambda n, _b: "hang" if n == 0 else 200) as server:
        job = people_job(
            tmp_path, server.url, 1, ledger=store, api={"timeout_s": 60}, lease_s=LEASE_S
        )
        process = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(server.arrivals) == 1, what="the request")
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)  # not a race: both signals lead to exit 130; this only orders them
        process.send_signal(signal.SIGINT)
        assert finish(process, timeout=20) == 130
        again = cli("run", str(job), "--no-progress")
        assert again.returncode == 1
        assert len(server.arrivals) == 1
    row = results(tmp_path)[0]
    assert row["_status"] == "unknown" and "in flight" in row["_error"]


def test_only_failed_sends_only_rows_that_failed(tmp_path: Path, store: str | None) -> None:
    data = people(tmp_path / "in.csv", 10)
    bad = set(phones(10)[:3])
    failing = {"+1" + "".join(c for c in p if c.isdigit())[1:] for p in bad}
    with FaultServer(lambda _n, b: 400 if b["to_phone"] in failing else 200) as server:
        job = write_job(tmp_path, server.url, input=data, ledger=store)
        assert cli("run", str(job), "--no-progress").returncode == 1
        assert len(server.arrivals) == 10
    with data.open("a", encoding="utf-8") as out:
        out.write("New,+1 415 299 0001\n")
    with FaultServer(lambda _n, _b: 200) as server:
        job = write_job(tmp_path, server.url, input=data, ledger=store)
        done = cli("run", str(job), "--no-progress", "--only-failed")
        assert sorted(b["to_phone"] for b in server.bodies()) == sorted(failing)
    assert done.returncode == 1  # the new row is still pending
    assert statuses(results(tmp_path)) == {"sent": 10, "pending": 1}


def test_results_csv_is_a_valid_input(tmp_path: Path, sandbox: Sandbox) -> None:
    names = ["=1+1", "-2", "@home", "+cmd", "Zoë", "'quoted"]
    data = write_csv(
        tmp_path / "in.csv",
        ["First Name", "Phone"],
        [[name, p] for name, p in zip(names, phones(6), strict=True)],
    )
    job = write_job(tmp_path, sandbox.url, input=data)
    assert cli("run", str(job), "--no-progress").returncode == 0
    # Requests arrive in any order (several are in flight at once): compare by phone.
    first = sorted((r["body"] for r in sandbox.records()), key=lambda b: b["to_phone"])
    assert [b["first_name"] for b in first] == names
    raw = (tmp_path / "runs" / "test" / "results.csv").read_text(encoding="utf-8")
    assert "'=1+1" in raw and "'@home" in raw and "'+cmd" in raw and "\n-2," in raw

    again = cli(
        "run",
        str(job),
        "--no-progress",
        "--campaign",
        "again",
        "--input",
        str(tmp_path / "runs" / "test" / "results.csv"),
    )
    assert again.returncode == 0, again.stderr
    second = [r["body"] for r in sandbox.records()][len(first) :]
    assert sorted(second, key=lambda b: b["to_phone"]) == first
    rows = results(tmp_path, "again")
    assert [k for k in rows[0] if not k.startswith("_")] == ["First Name", "Phone"]


def test_edited_input_sends_fixed_and_new_rows_only(
    tmp_path: Path, sandbox: Sandbox, store: str | None
) -> None:
    path = tmp_path / "in.csv"
    write_csv(
        path,
        ["First Name", "Phone"],
        [["Ann", "+1 415 200 0001"], ["Bob", "415 200"], ["Cy", "+1 415 200 0003"]],
    )
    job = write_job(tmp_path, sandbox.url, input=path, ledger=store)
    assert cli("run", str(job), "--no-progress").returncode == 0
    assert sorted(sandbox.phones()) == ["+14152000001", "+14152000003"]

    write_csv(
        path,
        ["First Name", "Phone"],
        [
            ["Ann Renamed", "+1 415 200 0001"],
            ["Bob", "415 200 0002"],
            ["Cy", "+1 415 200 0033"],
            ["Dee", "+1 415 200 0004"],
        ],
    )
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 0, done.stderr
    later = sandbox.phones()[2:]
    # Bob fixed, Cy has a new number (a new person), Dee is new; Ann is never sent again.
    assert sorted(later) == ["+14152000002", "+14152000004", "+14152000033"]
    rows = results(tmp_path)
    assert [r["_status"] for r in rows] == ["sent"] * 5
    assert rows[0]["First Name"] == "Ann Renamed"
    # Cy's old number was sent and is in no row now: still shown, after the input's rows.
    gone = rows[4]
    assert (gone["_row"], gone["First Name"], gone["_to_phone"]) == ("", "", "+14152000003")
    assert gone["_error"] == "not in the current input (was row 3)"


def test_one_run_at_a_time_and_a_dead_holder_does_not_block(tmp_path: Path) -> None:
    with FaultServer(lambda n, _b: "hang" if n == 0 else 200) as server:
        job = people_job(tmp_path, server.url, 2, api={"timeout_s": 60}, concurrency=1)
        holder = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(server.arrivals) == 1, what="the first request")
        second = cli("run", str(job), "--no-progress")
        assert second.returncode == 2
        assert "campaign test is in use by pid" in second.stderr
        assert f"pid {holder.pid}" in second.stderr
        holder.kill()
        holder.wait()
        third = cli("run", str(job), "--no-progress")
        assert third.returncode == 1, third.stderr  # the killed request is now unknown
        assert len(server.arrivals) == 2
    assert [r["_status"] for r in results(tmp_path)] == ["unknown", "sent"]


def crash_yesterdays_campaign(
    tmp_path: Path, server: FaultServer, rows: int, store: str | None
) -> Path:
    """A default-id job whose campaign dated yesterday died with its first request in flight."""
    job = write_job(
        tmp_path,
        server.url,
        input=people(tmp_path / "in.csv", rows),
        campaign="{job}-{date}",
        api={"timeout_s": 60},
        limits={"concurrency": 1, "lease_s": LEASE_S},
        ledger=store,
    )
    crashed = spawn_cli("run", str(job), "--no-progress", "--campaign", YESTERDAY)
    wait_for(lambda: len(server.arrivals) == 1, what="the first request")
    crashed.kill()
    crashed.wait()
    return job


def live_workers(store: str, campaign: str) -> int:
    """Runs of a PostgreSQL campaign whose lease (the tests' LEASE_S) has not expired."""
    with contextlib.closing(open_ledger(Path(), store, campaign)) as ledger:
        return ledger.live_workers(LEASE_S)


def test_midnight_guard_blocks_a_new_day_while_yesterday_is_unfinished(
    tmp_path: Path, store: str | None
) -> None:
    yesterday = YESTERDAY
    today = f"job-{dt.date.today().isoformat()}"
    with FaultServer(lambda n, _b: "hang" if n == 0 else 200) as server:
        job = crash_yesterdays_campaign(tmp_path, server, rows=3, store=store)
        if store is not None:
            # On PostgreSQL a run is taken for crashed once its lease (the job's) expired.
            wait_for(lambda: not live_workers(store, YESTERDAY), what="the crashed run's lease")
        blocked = cli("run", str(job), "--no-progress")
        assert blocked.returncode == 2
        assert yesterday in blocked.stderr and "crashed" in blocked.stderr
        assert f"--campaign {yesterday}" in blocked.stderr and "--new" in blocked.stderr
        assert not (tmp_path / "runs" / today).exists()

        resumed = cli("run", str(job), "--no-progress", "--campaign", yesterday)
        assert resumed.returncode == 1, resumed.stderr  # its in-flight row is unknown
        assert len(server.arrivals) == 3
        # Yesterday's campaign finished (with an unknown row): it no longer blocks.
        fresh = cli("run", str(job), "--no-progress")
        assert fresh.returncode == 0, fresh.stderr
        assert len(server.arrivals) == 6


# `--new` skips the midnight guard, which both stores' tests above go through: one store.
def test_new_starts_todays_campaign_despite_an_unfinished_one(tmp_path: Path) -> None:
    with FaultServer(lambda n, _b: "hang" if n == 0 else 200) as server:
        job = crash_yesterdays_campaign(tmp_path, server, rows=2, store=None)
        fresh = cli("run", str(job), "--no-progress", "--new")
        assert fresh.returncode == 0, fresh.stderr
        assert len(server.arrivals) == 3


def test_a_sent_campaign_rebuilds_its_report_and_keeps_its_recipient_key(
    tmp_path: Path, sandbox: Sandbox, store: str | None
) -> None:
    job = sent_job(tmp_path, sandbox.url, 5, ledger=store)
    results_csv = tmp_path / "runs" / "test" / "results.csv"
    before = results_csv.read_text(encoding="utf-8")
    results_csv.unlink()
    (tmp_path / "runs" / "test" / "summary.json").unlink()
    by_job = cli("report", str(job))
    assert by_job.returncode == 0, by_job.stderr
    assert "sent 5" in by_job.stdout
    assert results_csv.read_text(encoding="utf-8") == before
    if store is None:  # a campaign directory names a SQLite ledger; PostgreSQL needs the job
        results_csv.unlink()
        by_dir = cli("report", str(tmp_path / "runs" / "test"))
        assert by_dir.returncode == 0, by_dir.stderr
        assert results_csv.read_text(encoding="utf-8") == before
    the_recipient_key_cannot_change_once_sent(tmp_path, sandbox, store)


def the_recipient_key_cannot_change_once_sent(
    tmp_path: Path, sandbox: Sandbox, store: str | None
) -> None:
    """A job whose recipient key differs from the one the campaign sent with is refused."""
    other = write_job(
        tmp_path,
        sandbox.url,
        input=people(tmp_path / "in.csv", 5),
        mapping={"recipient_key": ["to_phone", "first_name"]},
        ledger=store,
    )
    refused = cli("run", str(other), "--no-progress")  # the same job, its key changed
    assert refused.returncode == 2
    assert "recipient_key" in refused.stderr and "new campaign" in refused.stderr
    assert len(sandbox.records()) == 5


def test_ledger_keeps_every_attempt(tmp_path: Path, store: str | None) -> None:
    def reply(n: int, _b: dict[str, Any]) -> Any:
        return 503 if n == 0 else 200

    with FaultServer(reply) as server:
        sent_job(tmp_path, server.url, 1, ledger=store)
    with contextlib.closing(open_ledger(tmp_path / "runs", store)) as ledger:
        attempts = ledger.db.execute(
            "SELECT n, state, http_status FROM attempts ORDER BY n"
        ).fetchall()
    assert [tuple(a) for a in attempts] == [(1, "pending", 503), (2, "sent", 200)]


def test_a_run_still_reading_its_input_blocks_the_next_days_campaign(tmp_path: Path) -> None:
    from campaign.store.campaigns import open_campaign

    with FaultServer(lambda _n, _b: 200) as server:
        job = write_job(
            tmp_path, server.url, input=people(tmp_path / "in.csv", 2), campaign="{job}-{date}"
        )
        # Yesterday's run holds its campaign but has not recorded a run yet (still loading).
        with open_campaign(tmp_path / "runs", YESTERDAY, "job"):
            blocked = cli("run", str(job), "--no-progress")
        assert blocked.returncode == 2
        assert YESTERDAY in blocked.stderr and "still running" in blocked.stderr
        assert server.arrivals == []
