"""Helpers for tests that run the real CLI: people to send to, waiting, results."""

from __future__ import annotations

import datetime as dt
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers import (
    phones,
    read_results,
    write_csv,
)

# With a PostgreSQL ledger, a killed run's people are settled once its lease expires: a
# short lease keeps the tests that kill a run from waiting out the default 30 s.
LEASE_S = 3


def wait_for(condition: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def people(path: Path, n: int, start: int = 0) -> Path:
    return write_csv(
        path, ["First Name", "Phone"], [[f"P{i}", p] for i, p in enumerate(phones(n, start))]
    )


def results(tmp_path: Path, campaign: str = "test") -> list[dict[str, str]]:
    return read_results(tmp_path / "runs" / campaign / "results.csv")


def finish(process: subprocess.Popen[str], timeout: float = 120) -> int:
    process.communicate(timeout=timeout)
    return process.returncode


YESTERDAY = f"job-{(dt.date.today() - dt.timedelta(days=1)).isoformat()}"
