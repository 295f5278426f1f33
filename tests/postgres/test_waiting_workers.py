"""--wait workers on PostgreSQL: people held for their send window are sent by someone when it
opens, even when the worker holding them dies."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

from tests.helpers import (
    Sandbox,
    cli,
    e164,
    kill_left,
    spawn_cli,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.pg import (
    in_campaign,
    lease_expired,
    only_run,
    workers,
)
from tests.helpers.runs import finish, people_job, results, wait_for
from tests.helpers.shared_sandbox import ChannelView
from tests.helpers.windows import HNL_PHONES, NY_PHONES, hhmm, local_minutes, ny_open_hnl_closed

WAITING = "waiting for send windows"


def a_waiting_worker(
    tmp_path: Path, box: ChannelView, pg_url: str, lease_s: float
) -> tuple[Path, subprocess.Popen[str]]:
    """A job of one New York person (inside the window now) and two Honolulu people (whose
    window opens hours later), and a `--wait` worker on it, once it waits for them."""
    rows = [[p, "x"] for p in NY_PHONES[:1] + HNL_PHONES]
    job = write_job(
        tmp_path,
        box.url,
        input=write_csv(tmp_path / "in.csv", ["Phone", "First Name"], rows),
        ledger=pg_url,
        api=box.api(),
        limits={
            "send_window": ny_open_hnl_closed(),
            "timezone": "America/New_York",
            "lease_s": lease_s,
        },
    )
    log = tmp_path / "runs" / "test" / "log.jsonl"
    worker = spawn_cli("run", str(job), "--wait", "--no-progress")
    try:
        wait_for(lambda: log.exists() and WAITING in log.read_text(), what="the worker to wait")
    except AssertionError:
        worker.kill()
        worker.wait()
        raise
    return job, worker


def run_state(url: str, run_id: int) -> str:
    with in_campaign(url) as db:
        found = db.execute("SELECT state FROM runs WHERE id = %s", (run_id,)).fetchone()
    return str(found[0])


def only_new_york_sent(box: Sandbox, tmp_path: Path) -> None:
    """The New York person sent, once; the Honolulu people still waiting for their window."""
    assert box.phones() == [e164(NY_PHONES[0])]
    assert statuses(results(tmp_path)) == {"sent": 1, "pending": 2}


def live_runs(url: str) -> int:
    with in_campaign(url) as db:
        return int(db.execute("SELECT count(*) FROM runs WHERE state = 'running'").fetchone()[0])


def test_two_workers_with_people_waiting_for_their_window_both_end(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """Every person's send window is closed now (San Francisco numbers, a window that opens
    in two hours there). Two workers must not each wait for the people the other holds for
    their window: both end, the one that held people with exit 1 ("waiting for their send
    window"), the other with 1 too or 0 if it ended first with nobody of its own."""
    now = local_minutes(ZoneInfo("America/Los_Angeles"))
    window = f"{hhmm(now + 120)}-{hhmm(now + 180)}"
    box = sandboxes(0)
    where = {"send_window": window, "timezone": "America/Los_Angeles"}
    job = people_job(tmp_path, box, 400, ledger=pg_url, concurrency=8, lease_s=1, **where)
    running = workers(job, 2)
    try:
        codes = [finish(p, timeout=30) for p in running]
    except subprocess.TimeoutExpired:
        codes = [p.poll() for p in running]
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert None not in codes and 1 in codes and set(codes) <= {0, 1}, codes
    assert box.records() == []


def test_a_waiting_worker_whose_lease_expired_stops(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """A `--wait` worker sends the New York person and waits for Honolulu's window (hours
    away). Stopped past its lease, it is settled by a second worker that takes its people
    over; continued, it finds its lease gone and stops: exit 1 ("stopped: …") and its run
    stays `crashed`. Before, the loss was noted on the round that had already ended: the
    worker slept on until the window opened, to send another round on a lost lease."""
    sandbox = sandboxes(0)
    job, first = a_waiting_worker(tmp_path, sandbox, pg_url, lease_s=1)
    log = tmp_path / "runs" / "test" / "log.jsonl"
    second: subprocess.Popen[str] | None = None
    try:
        first.send_signal(signal.SIGSTOP)
        run_id = only_run(pg_url)
        wait_for(lambda: lease_expired(pg_url, run_id, 1), what="the lease to expire")
        second = spawn_cli("run", str(job), "--wait", "--no-progress")
        wait_for(lambda: log.read_text().count(WAITING) == 2, what="a 2nd wait")
        assert run_state(pg_url, run_id) == "crashed"
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 1, out + err[-2000:]
        assert "stopped: this worker's lease expired" in out
        assert run_state(pg_url, run_id) == "crashed"
        second.send_signal(signal.SIGINT)
        assert finish(second) == 130
    finally:
        kill_left(first, second)
    only_new_york_sent(sandbox, tmp_path)


def test_a_worker_ending_beside_a_dead_waiting_worker_says_rows_are_left(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """A `--wait` worker holds the Honolulu people for their window (hours away) and is
    killed. A plain worker started inside its lease finds nobody to send and ends: before,
    with exit 0 ("another worker still sending") for a campaign nobody was sending any
    more; now exit 1. After the lease, a rerun takes the Honolulu people over."""
    sandbox = sandboxes(0)
    job, waiting = a_waiting_worker(tmp_path, sandbox, pg_url, lease_s=2)
    waiting.kill()
    waiting.wait()
    dead = only_run(pg_url)
    beside = cli("run", str(job), "--no-progress")
    assert beside.returncode == 1, beside.stdout + beside.stderr
    assert "still sending" not in beside.stdout
    wait_for(lambda: lease_expired(pg_url, dead, 2), what="the lease to expire")
    rerun = cli("run", str(job), "--no-progress")
    assert rerun.returncode == 1 and "2 waiting for their send window" in rerun.stdout
    only_new_york_sent(sandbox, tmp_path)


def test_a_second_waiting_worker_stays_and_takes_over_a_dead_ones_people(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """Two `--wait` workers: the first holds the Honolulu people for their window (hours
    away). The second, with nobody of its own, stays (before, it ended at once). The first
    is killed: after its lease the second takes its people over and waits for their
    window itself; Ctrl-C then stops it. Nobody is sent but the New York person, once."""
    box = sandboxes(0)
    second: subprocess.Popen[str] | None = None
    job, first = a_waiting_worker(tmp_path, box, pg_url, lease_s=2)
    dead = only_run(pg_url)
    log = tmp_path / "runs" / "test" / "log.jsonl"
    try:
        second = spawn_cli("run", str(job), "--wait", "--no-progress")
        wait_for(lambda: live_runs(pg_url) == 2, what="the second worker to start")
        first.kill()
        first.wait()
        wait_for(lambda: log.read_text().count(WAITING) == 2, what="the takeover")
        assert run_state(pg_url, dead) == "crashed"
        assert second.poll() is None
        second.send_signal(signal.SIGINT)
        assert finish(second) == 130
    finally:
        kill_left(first, second)
    only_new_york_sent(box, tmp_path)
