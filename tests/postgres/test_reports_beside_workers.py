"""Reports and reconcile while workers send: the final report is never replaced by an earlier
one, and a reconcile leaves the workers and their people alone."""

from __future__ import annotations

import asyncio
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
