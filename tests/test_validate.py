"""`campaign validate` / `run --dry-run`: counts and reasons, a results CSV, and no request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FaultServer, cli, read_results, write_csv, write_job


@pytest.fixture
def server() -> Any:
    with FaultServer(lambda _n, _b: 200) as server:
        yield server


def test_validate_reports_invalid_rows_and_sends_nothing(
    tmp_path: Path, server: Any, store: str | None
) -> None:
    data = write_csv(
        tmp_path / "in.csv",
        ["First Name", "Phone"],
        [["Ann", "+1 415 200 0001"], ["Bob", "12"], ["Ann", "415-200-0001"]],
    )
    job = write_job(tmp_path, server.url, input=data, ledger=store)
    for command in (["validate", str(job)], ["run", str(job), "--dry-run"]):
        done = cli(*command, "--no-progress")
        assert done.returncode == 1, done.stderr
        assert "invalid 1" in done.stdout and "duplicate 1" in done.stdout
        assert "row 2:" in done.stdout
        rows = read_results(tmp_path / "runs" / "test" / "results.csv")
        assert [r["_status"] for r in rows] == ["pending", "invalid", "duplicate"]
        assert rows[2]["_error"] == "duplicate of row 1"
    assert server.arrivals == []


def test_validate_is_exit_0_when_every_row_is_sendable_or_duplicate(
    tmp_path: Path, server: Any, store: str | None
) -> None:
    data = write_csv(
        tmp_path / "in.csv",
        ["First Name", "Phone"],
        [["Ann", "+1 415 200 0001"], ["Ann", "+1 415 200 0001"]],
    )
    job = write_job(tmp_path, server.url, input=data, ledger=store)
    done = cli("validate", str(job), "--no-progress", "--campaign", "check")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "runs" / "check" / "results.csv").exists()
    assert server.arrivals == []


def test_a_changed_mapping_remaps_an_unchanged_file(
    tmp_path: Path, server: Any, store: str | None
) -> None:
    data = write_csv(
        tmp_path / "in.csv", ["First Name", "Phone", "Mobile"], [["Ann", "12", "+1 415 200 0001"]]
    )
    job = write_job(tmp_path, server.url, input=data, ledger=store)
    assert cli("validate", str(job)).returncode == 1
    job = write_job(
        tmp_path,
        server.url,
        input=data,
        mapping={"to_phone": "Mobile", "params": {"first_name": "First Name"}},
        ledger=store,
    )
    assert cli("validate", str(job)).returncode == 0
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert server.bodies() == [{"to_phone": "+14152000001", "first_name": "Ann"}]
