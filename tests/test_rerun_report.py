"""A rerun that changes nobody leaves results.csv and summary.json as they are (bytes, time,
file); one that changes anything the report shows writes them again."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Sandbox, cli, e164, phones, statuses, write_csv, write_job
from tests.helpers.runs import results

REPORT_FILES = ("results.csv", "summary.json")


def snapshot(tmp_path: Path) -> dict[str, tuple[bytes, int, int]]:
    """Each report file's bytes, modification time (ns) and inode: a rewrite by rename
    changes the inode even when bytes and time happen to match."""
    directory = tmp_path / "runs" / "test"
    found = {}
    for name in REPORT_FILES:
        info = (directory / name).stat()
        found[name] = ((directory / name).read_bytes(), info.st_mtime_ns, info.st_ino)
    return found


def rows_with(first_phone: str, n: int) -> list[list[str]]:
    return [["P0", first_phone]] + [[f"P{i}", p] for i, p in enumerate(phones(n - 1, 1), 1)]


def test_a_rerun_rewrites_the_report_only_when_a_row_or_the_list_changed(
    tmp_path: Path, store: str | None, sandbox: Sandbox
) -> None:
    header = ["First Name", "Phone"]
    data = write_csv(tmp_path / "in.csv", header, rows_with("not a phone", 5))
    job = write_job(tmp_path, sandbox.url, input=data, ledger=store)
    first = cli("run", str(job), "--no-progress")
    assert first.returncode == 0, first.stdout + first.stderr
    assert statuses(results(tmp_path)) == {"invalid": 1, "sent": 4}
    invalid = snapshot(tmp_path)
    # The first rerun changes nobody, though it also records the list it applied.
    unchanged = cli("run", str(job), "--no-progress")
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert "sent 4" in unchanged.stdout, unchanged.stdout
    assert snapshot(tmp_path) == invalid

    # The fixed row: its person is sent, and the report says so.
    write_csv(data, header, rows_with(phones(1)[0], 5))
    fixed = cli("run", str(job), "--no-progress")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert statuses(results(tmp_path)) == {"sent": 5}
    assert snapshot(tmp_path)["results.csv"][0] != invalid["results.csv"][0]
    assert '"sent": 5' in (tmp_path / "runs" / "test" / "summary.json").read_text()
    sent = snapshot(tmp_path)
    # A later rerun that changes nobody, everyone sent: the report stays as it is too.
    again = cli("run", str(job), "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "sent 5" in again.stdout, again.stdout
    assert snapshot(tmp_path) == sent
    assert len(sandbox.records()) == 5

    # Only the suppression list changes: a sent person's row now says it is on it.
    added = cli("suppress", "add", str(job), phones(2)[1], "--reason", "replied STOP")
    assert added.returncode == 0, added.stdout + added.stderr
    listed = cli("run", str(job), "--no-progress")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    row = results(tmp_path)[1]
    assert row["_status"] == "sent" and "replied STOP" in row["_error"], row
    assert snapshot(tmp_path)["results.csv"] != sent["results.csv"]
    assert len(sandbox.records()) == 5
    assert sorted(r["body"]["to_phone"] for r in sandbox.records()) == sorted(
        e164(p) for p in phones(5)
    )


def test_a_suppression_list_made_anew_is_applied_again(tmp_path: Path, sandbox: Sandbox) -> None:
    """The list is skipped only while it is the one last applied: a list file removed and
    made again with another number (the same ids and count) is read again."""
    data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], rows_with(phones(1)[0], 4))
    job = write_job(tmp_path, sandbox.url, input=data)
    first, second = phones(4)[2], phones(4)[3]
    assert cli("suppress", "add", str(job), first, "--reason", "STOP").returncode == 0
    assert cli("run", str(job), "--no-progress").returncode == 0
    assert [r["_status"] for r in results(tmp_path)] == ["sent", "sent", "suppressed", "sent"]
    for leftover in (tmp_path / "runs").glob("suppression.sqlite*"):
        leftover.unlink()
    assert cli("suppress", "add", str(job), second, "--reason", "STOP").returncode == 0
    again = cli("run", str(job), "--no-progress")
    assert again.returncode == 0, again.stdout + again.stderr
    rows = results(tmp_path)
    assert [r["_status"] for r in rows] == ["sent", "sent", "sent", "sent"], rows
    assert "STOP" in rows[3]["_error"], rows[3]
    assert sorted(r["body"]["to_phone"] for r in sandbox.records()) == sorted(
        e164(p) for p in phones(4)
    )
