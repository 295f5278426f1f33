"""Helpers for tests that run the real CLI: people to send to, waiting, results."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import (
    Sandbox,
    cli,
    phones,
    read_results,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.shared_sandbox import ChannelView

# With a PostgreSQL ledger, a killed run's people are settled once its lease expires: a
# short lease keeps the tests that kill a run from waiting out the default 30 s.
LEASE_S = 3


def wait_for(condition: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def people(
    path: Path, who: int | list[str], start: int = 0, extra: list[list[str]] | None = None
) -> Path:
    """A CSV of people P0, P1... (First Name, Phone): `who` of them with distinct numbers
    from `start` on, or one for each number `who` lists; then the `extra` rows as given."""
    numbers = phones(who, start) if isinstance(who, int) else who
    rows = [[f"P{i}", number] for i, number in enumerate(numbers)] + (extra or [])
    return write_csv(path, ["First Name", "Phone"], rows)


def people_job(
    tmp_path: Path,
    to: str | ChannelView,
    rows: int,
    *,
    ledger: str | None = None,
    api: dict[str, Any] | None = None,
    reporting: dict[str, Any] | None = None,
    **limits: Any,
) -> Path:
    """A job sending `rows` people (tmp_path/in.csv) to `to` (a URL, or a shared sandbox's
    channel), its ledger at `ledger` (None: SQLite); `api`, `reporting` and `limits` update
    the job's defaults."""
    if isinstance(to, ChannelView):
        to, api = to.url, to.api(**(api or {}))
    sections: dict[str, Any] = {"api": api or {}, "limits": limits}
    if reporting is not None:
        sections["reporting"] = reporting
    if ledger is not None:
        sections["ledger"] = ledger
    return write_job(tmp_path, to, input=people(tmp_path / "in.csv", rows), **sections)


def sent_job(tmp_path: Path, base_url: str, rows: int, *, ledger: str | None = None) -> Path:
    """A job sending `rows` people through `base_url`, run once to its end: the job."""
    job = people_job(tmp_path, base_url, rows, ledger=ledger)
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 0, done.stdout + done.stderr
    return job


def results(tmp_path: Path, campaign: str = "test") -> list[dict[str, str]]:
    return read_results(tmp_path / "runs" / campaign / "results.csv")


def resend_and_check(
    box: Sandbox, tmp_path: Path, job: Path, rows: int, unknown: int, timeout: float = 180
) -> None:
    """`run --resend-unknown` after a hostile schedule left `unknown` people in doubt:
    everyone is sent, and only those in doubt may have arrived twice (why it is opt-in)."""
    again = cli("run", str(job), "--no-progress", "--resend-unknown", timeout=timeout)
    assert again.returncode == 0, again.stdout + again.stderr
    assert statuses(results(tmp_path)) == {"sent": rows}
    received = Counter(box.phones())
    assert len(received) == rows
    assert sum(received.values()) - rows <= unknown


def finish(process: subprocess.Popen[str], timeout: float = 120) -> int:
    process.communicate(timeout=timeout)
    return process.returncode


YESTERDAY = f"job-{(dt.date.today() - dt.timedelta(days=1)).isoformat()}"
