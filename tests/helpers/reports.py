"""A campaign sent once and copied: tests of `campaign reconcile` against a scripted
Reporting API start from the same sent campaign without paying for a run (a CLI process)
each."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import FaultServer, cli, phones, write_csv, write_job
from tests.helpers.runs import wait_for

# Entries match requests made at most 15 minutes before them (the matcher's MATCH_S):
# a copy older than 5 minutes is made again, so a test's entries made "now" still match.
FRESH_S = 5 * 60.0


@dataclass
class SentOnce:
    """The output dir of a campaign of `people` (column "First Name", "Phone"), every request
    answered 200, on SQLite, with `reporting`; made on first use, copied per test."""

    mktemp: Callable[[str], Path]  # a fresh directory (tmp_path_factory.mktemp)
    people: list[str]
    reporting: dict[str, Any]
    env: dict[str, str]
    _made: tuple[float, Path, Path] | None = None  # (when, output dir, input file)

    def copy_to(self, directory: Path) -> Path:
        """`directory`/runs, a copy of the sent campaign's output dir; the input file (for
        the job's `input:`) is returned."""
        if self._made is None or time.monotonic() - self._made[0] > FRESH_S:
            self._made = self._send()
        _, runs, data = self._made
        shutil.copytree(runs, directory / "runs")
        return data

    def _send(self) -> tuple[float, Path, Path]:
        directory = self.mktemp("sent-once")
        rows = [["A", phone] for phone in self.people]
        data = write_csv(directory / "in.csv", ["First Name", "Phone"], rows)
        with FaultServer(lambda n, body: 200) as api:
            job = write_job(
                directory,
                api.url,
                input=data,
                reporting=self.reporting,
                limits={"max_attempts": 2},
            )
            result = cli("run", str(job), "--no-progress", env=self.env)
        assert result.returncode == 0, result.stderr
        return time.monotonic(), directory / "runs", data


def wait_until(at: float) -> None:
    """Wait for the wall clock (time.time()) to pass `at`: when a report's entries are due
    or a campaign's requests have settled, so that a reconcile from then on can decide."""
    wait_for(lambda: time.time() >= at, timeout=120, what=f"the clock to pass {at:.1f}")


PEOPLE = phones(3)


def sent_through(
    directory: Path,
    send_url: str,
    reporting: dict[str, Any],
    store: str | None = None,
    expect: int | None = 0,
    env: dict[str, str] | None = None,
    **limits: Any,
) -> Path:
    """The job of a campaign of `PEOPLE` sent through `send_url` on `store`, with
    `reporting`, the command run with `env`; the run ends `expect` (None: the test does
    not rely on how)."""
    data = write_csv(directory / "in.csv", ["First Name", "Phone"], [["A", p] for p in PEOPLE])
    job = write_job(
        directory,
        send_url,
        input=data,
        reporting=reporting,
        limits={"max_attempts": 2, **limits},
        ledger=store,
    )
    done = cli("run", str(job), "--no-progress", env=env)
    assert expect is None or done.returncode == expect, done.stderr
    return job
