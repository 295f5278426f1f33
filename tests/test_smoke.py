from __future__ import annotations

import re
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from tests.helpers import Sandbox, cli, read_results, statuses, write_csv, write_job


def test_run_sends_each_valid_row_once(tmp_path: Path, sandbox: Sandbox) -> None:
    data = write_csv(
        tmp_path / "in.csv",
        ["First Name", "Phone"],
        [["Ann", "(415) 555-0101"], ["Bob", "bad"], ["Cy", "415 555 0101"]],
    )
    job = write_job(tmp_path, sandbox.url, input=data)
    done = cli("run", str(job), "--no-progress", fresh=True)  # start-up included
    assert done.returncode == 0, done.stderr
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(rows) == {"sent": 1, "invalid": 1, "duplicate": 1}
    assert sandbox.phones() == ["+14155550101"]


@pytest.mark.parametrize(
    "command",
    ["validate", "report", "reconcile", "suppress list", "test --to 4155550199"],
)
def test_each_command_says_the_same_started_afresh_as_forked(
    tmp_path: Path, reports_sandbox: Sandbox, command: str
) -> None:
    """The commands a test waits for are forked from a process that has imported the
    package (tests/helpers/forked.py); here each one also starts in a new interpreter,
    imports included, and must end and speak the same (but for numbers: times, counts of
    tests sent)."""
    data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["Ann", "(415) 555-0101"]])
    reporting = {"agent_id": "1", "access_token": "sandbox-token", "settle_minutes": 0}
    job = write_job(tmp_path, reports_sandbox.url, input=data, reporting=reporting)
    assert cli("run", str(job), "--no-progress").returncode == 0
    words, _, options = command.partition(" --")
    args = [*words.split(), str(job), *(f"--{options}".split() if options else [])]
    forked, fresh, again = cli(*args), cli(*args, fresh=True), cli(*args)
    assert forked.returncode in (0, 1), forked.stderr  # the command did its work
    assert "Traceback" not in fresh.stderr, fresh.stderr
    # What a command says may change between two runs (reconcile reads reports that
    # arrive meanwhile): the fresh one says what the forked one said before or after it.
    assert _said(fresh) in (_said(forked), _said(again)), fresh.stdout + fresh.stderr


def _said(done: CompletedProcess[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr, numbers left out (times, counts of tests sent)."""
    return done.returncode, *(
        re.sub(r"\d+(\.\d+)?", "N", text) for text in (done.stdout, done.stderr)
    )
