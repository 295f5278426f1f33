from __future__ import annotations

from pathlib import Path

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
