"""Bad command-line options and unexpected failures: exit code, one clear line, no traceback.

An unexpected exception (here: a disk problem, `results.csv` being a directory) must give
a short message and the path of a log file holding the traceback: exit 2 when nothing
was sent yet, 1 when sending had started.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Sandbox, cli, read_results, write_job
from tests.helpers.runs import people

TWO = ["415 555 0101", "415 555 0102"]  # sent as +14155550101 and +14155550102


@dataclass
class Channel:
    """The module's sandbox as one test sees it: only what was sent on the test's channel."""

    box: Sandbox
    uuid: str

    @property
    def url(self) -> str:
        return self.box.url

    def records(self) -> list[dict[str, Any]]:
        return [r for r in self.box.records() if r["channel"] == self.uuid]

    def phones(self) -> list[str]:
        return [r["body"].get("to_phone") for r in self.records()]

    def job(self, directory: Path, **sections: Any) -> Path:
        return write_job(directory, self.url, api={"channel_uuid": self.uuid}, **sections)


@pytest.fixture
def sandbox(module_sandbox: Sandbox) -> Channel:
    """The module's sandbox: each test sends on a channel uuid of its own."""
    return Channel(module_sandbox, f"cli-errors-{uuid.uuid4()}")


def error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines, "no message on stderr"
    return lines[-1]


@pytest.mark.parametrize(
    ("options", "says"),
    [
        # The job's limits decide, whether a value comes from the file or an option.
        (["--rate", "0"], "--rate: must be a number greater than 0, not 0"),
        (["--rate", "-2.5"], "--rate: must be a number greater than 0, not -2.5"),
        (["--rate", "inf"], "--rate: must be a number greater than 0, not inf"),
        (["--rate", "fast"], "argument --rate: must be a number, not 'fast'"),
        (["--concurrency", "0"], "--concurrency: must be a whole number from 1 to 1000, not 0"),
        (["--concurrency", "-1"], "--concurrency: must be a whole number from 1 to 1000"),
        (["--concurrency", "100000"], "--concurrency: must be a whole number from 1 to 1000"),
        (["--concurrency", "1.5"], "argument --concurrency: must be a whole number, not '1.5'"),
        (["--campaign", "x", "--new"], "not allowed with argument --campaign"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, list) else None,
)
def test_bad_option_exit_2_nothing_sent(
    options: list[str], says: str, tmp_path: Path, sandbox: Channel
) -> None:
    job = sandbox.job(tmp_path, input=people(tmp_path / "in.csv", TWO))
    done = cli("run", str(job), "--no-progress", *options)
    assert done.returncode == 2, done.stderr
    assert says in error_line(done)
    assert sandbox.records() == []
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--input", "nowhere.csv", "nowhere.csv: input file not found"),
        ("--input", ".", "is a directory, not a spreadsheet"),
        ("--output-dir", "plain-file/runs", "plain-file/runs: cannot create the output directory"),
        ("--campaign", "../escape", "--campaign '../escape'"),
        # An unset variable in a script must not mean "the job's input" or "here".
        ("--input", "", "--input: is empty: give a path"),
        ("--output-dir", "", "--output-dir: is empty: give a path"),
        ("--campaign", "", "--campaign '': use letters"),
    ],
)
def test_bad_path_or_id_is_one_line(
    option: str, value: str, says: str, tmp_path: Path, sandbox: Channel
) -> None:
    (tmp_path / "plain-file").write_text("a file, not a directory\n")
    job = sandbox.job(tmp_path, input=people(tmp_path / "in.csv", TWO))
    for command in ("validate", "run"):
        done = cli(command, str(job), "--no-progress", option, value, cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert says in error_line(done)
    assert sandbox.records() == []
    assert not (tmp_path / "escape").exists()
    assert not (tmp_path / "test").exists()  # `--output-dir ""` made no campaign here


def crash_log(line: str) -> Path:
    found = re.search(r"details in (\S+\.log)$", line)
    assert found, line
    return Path(found.group(1))


@pytest.mark.parametrize(
    ("command", "code", "sent"),
    [("validate", 2, []), ("run", 1, ["+14155550101", "+14155550102"])],
    ids=["before-sending-exit-2", "after-sending-exit-1"],
)
def test_an_unexpected_error_is_one_line_and_a_log(
    tmp_path: Path, sandbox: Channel, store: str | None, command: str, code: int, sent: list[str]
) -> None:
    """Exit 2 while nothing was sent, 1 once some were: one line, the traceback in a log."""
    job = sandbox.job(tmp_path, input=people(tmp_path / "in.csv", TWO), ledger=store)
    (tmp_path / "runs" / "test" / "results.csv").mkdir(parents=True)
    done = cli(command, str(job), "--no-progress")
    assert done.returncode == code
    line = error_line(done)
    assert line.startswith("campaign: error: unexpected error: ")
    text = crash_log(line).read_text(encoding="utf-8")
    assert "Traceback" in text and "IsADirectoryError" in text
    assert sorted(sandbox.phones()) == sent
    # The ledger kept what happened: with the obstacle gone, the report is complete and
    # a second run sends nobody twice.
    (tmp_path / "runs" / "test" / "results.csv").rmdir()
    again = cli("run", str(job), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert [r["_status"] for r in read_results(tmp_path / "runs" / "test" / "results.csv")] == [
        "sent",
        "sent",
    ]
    assert len(sandbox.records()) == 2


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("nowhere", "nowhere: job file not found"),
        ("empty-dir", "empty-dir: not a campaign directory"),
        ("job.yaml", "no campaign of this job"),
    ],
)
def test_report_on_nothing_to_report_is_one_line(target: str, says: str, tmp_path: Path) -> None:
    (tmp_path / "empty-dir").mkdir()
    write_job(tmp_path, "http://127.0.0.1:9", input=people(tmp_path / "in.csv", TWO))
    done = cli("report", target, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert says in error_line(done)


@pytest.mark.parametrize("campaign", ["", "../runs/test"])
def test_report_takes_only_a_campaign_id(campaign: str, tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9", input=people(tmp_path / "in.csv", TWO))
    assert cli("validate", str(job), "--no-progress").returncode == 0
    done = cli("report", str(job), "--campaign", campaign, cwd=tmp_path)
    assert done.returncode == 2, done.stdout
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"--campaign {campaign!r}: use letters" in error_line(done)


def test_a_ledger_of_a_newer_version_is_refused_and_left_alone(
    tmp_path: Path, sandbox: Channel
) -> None:
    """A host not upgraded yet must not send from a ledger a newer version wrote: its
    claims and attempts may mean what this version cannot read."""
    import sqlite3

    from campaign.store.ledger import LEDGER_FILE, SCHEMA_VERSION

    job = sandbox.job(tmp_path, input=people(tmp_path / "in.csv", 3))
    assert cli("run", str(job), "--no-progress").returncode == 0
    ledger = tmp_path / "runs" / "test" / LEDGER_FILE
    with sqlite3.connect(ledger) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 2, done.stderr
    assert "newer version of campaign" in error_line(done)
    assert len(sandbox.records()) == 3
    with sqlite3.connect(ledger) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
        assert db.execute("SELECT state, count(*) FROM recipients GROUP BY state").fetchall() == [
            ("sent", 3)
        ]
