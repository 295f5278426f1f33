"""The suppression list: suppressed people get nothing (counted at the sandbox's record),
`campaign suppress` add/remove/list/import with their exit codes and messages, and the list
read right before each request by a run that is already going."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from campaign.errors import CampaignError
from campaign.records import MappedRow
from campaign.store.suppression import SuppressionList, apply_to_ledger, suppress_numbers
from campaign.suppress_import import import_numbers
from tests.helpers import (
    FaultServer,
    Sandbox,
    cli,
    e164,
    open_ledger,
    phones,
    read_results,
    spawn_cli,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.runs import finish, people, wait_for
from tests.helpers.shared_sandbox import sandbox_since_start  # noqa: F401 (the `sandbox` here)


def listed(output_dir: Path, store: str | None = None) -> dict[str, tuple[str, str]]:
    with SuppressionList(output_dir, store) as found:
        return {e.phone: (e.reason, e.source) for e in found.entries()}


def test_suppressed_people_get_nothing_removing_makes_them_sendable_and_sent_stays_sent(
    tmp_path: Path, store: str | None, sandbox: Sandbox
) -> None:
    data = people(tmp_path / "in.csv", 5)
    job = write_job(tmp_path, sandbox.url, input=data, ledger=store)
    numbers = phones(5)
    added = cli("suppress", "add", str(job), numbers[1], numbers[3], "--reason", "opted out")
    assert added.returncode == 0, added.stderr
    assert "added 2" in added.stdout

    checked = cli("validate", str(job))
    assert checked.returncode == 0, checked.stderr
    assert "suppressed 2" in checked.stdout

    run = cli("run", str(job), "--no-progress")
    assert run.returncode == 0, run.stderr  # suppressed rows are not sendable
    assert sorted(sandbox.phones()) == sorted(e164(numbers[i]) for i in (0, 2, 4))
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [r["_status"] for r in rows] == ["sent", "suppressed", "sent", "suppressed", "sent"]
    assert rows[1]["_error"].startswith("on the suppression list since ")
    assert rows[1]["_error"].endswith("(manual): opted out")
    summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
    assert summary["counts"]["suppressed"] == 2

    removed = cli("suppress", "remove", str(job), numbers[1])
    assert removed.returncode == 0 and "removed 1" in removed.stdout
    again = cli("run", str(job), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert sandbox.phones().count(e164(numbers[1])) == 1
    assert e164(numbers[3]) not in sandbox.phones()
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(rows) == {"sent": 4, "suppressed": 1}

    # A person sent before being suppressed stays sent, and is not sent again.
    assert cli("suppress", "add", str(job), numbers[0]).returncode == 0
    sent = len(sandbox.records())
    third = cli("run", str(job), "--no-progress")
    assert third.returncode == 0, third.stderr
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [r["_status"] for r in rows] == ["sent", "sent", "sent", "suppressed", "sent"]
    assert rows[0]["_error"].startswith("sent earlier; the row now: on the suppression list")
    assert len(sandbox.records()) == sent == 4


def test_a_number_added_by_another_process_mid_run_is_not_sent(
    tmp_path: Path, store: str | None, sandbox: Sandbox
) -> None:
    data = people(tmp_path / "in.csv", 120)
    job = write_job(tmp_path, sandbox.url, input=data, limits={"rate_per_second": 20}, ledger=store)
    numbers = phones(120)
    run = spawn_cli("run", str(job), "--no-progress")
    wait_for(lambda: len(sandbox.records()) >= 5, what="the run to start sending")
    late = numbers[-20:]
    # From this process, another than the run's: a command would start too slowly to
    # leave the run a sure margin.
    with SuppressionList(tmp_path / "runs", store) as listing:
        listing.add([e164(p) for p in late], "STOP", "manual")
    # Added with about 100 people (5 s at 20/s) still to go: the run must see it.
    assert finish(run) == 0
    sent = set(sandbox.phones())
    assert not sent & {e164(p) for p in late}
    assert len(sent) == len(sandbox.records()) == 100
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert statuses(rows) == {"sent": 100, "suppressed": 20}
    assert all(r["_error"].endswith(": STOP") for r in rows if r["_status"] == "suppressed")


def test_suppress_add_refuses_what_is_not_a_number_and_changes_nothing(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    bad = cli("suppress", "add", str(job), phones(1)[0], "12", "call me")
    assert bad.returncode == 2
    assert "PHONE #2: phone is too short" in bad.stderr
    assert "PHONE #3" in bad.stderr and "nothing was changed" in bad.stderr
    assert listed(tmp_path / "runs") == {}


def test_suppress_list_is_csv_escaped_like_results(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    added = cli("suppress", "add", str(job), "(415) 555-0101", "--reason", "=HYPERLINK(1)")
    assert added.returncode == 0, added.stderr
    shown = cli("suppress", "list", str(job))
    assert shown.returncode == 0
    lines = shown.stdout.splitlines()
    assert lines[0] == "phone,reason,source,added_at"
    phone, reason, source, added_at = lines[1].split(",")
    assert (phone, reason, source) == ("+14155550101", "'=HYPERLINK(1)", "manual")
    assert added_at.endswith("Z")


def test_import_adds_valid_numbers_and_names_the_lines_it_could_not_add(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    source = write_csv(
        tmp_path / "optouts.csv",
        ["Name", "Mobile number"],
        [["a", phones(3)[0]], ["b", "12"], ["c", phones(3)[1]], ["d", ""], ["e", phones(3)[2]]],
    )
    done = cli("suppress", "import", str(job), str(source), "--reason", "opt-out form")
    assert done.returncode == 1, done.stderr
    assert "column 'Mobile number'" in done.stdout
    assert "added 3" in done.stdout and "2 not added" in done.stdout
    assert "line 3: phone is too short" in done.stdout
    assert "line 5: phone is empty" in done.stdout
    assert listed(tmp_path / "runs") == {e164(p): ("opt-out form", "import") for p in phones(3)}
    # Again, with the column named: nothing new, and the same rows are named.
    again = cli("suppress", "import", str(job), str(source), "--column", "Mobile number")
    assert again.returncode == 1
    assert "added 0, 3 already on the list" in again.stdout


def test_import_of_a_clean_excel_file_exits_0(tmp_path: Path) -> None:
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["id", "cell"])
    sheet.append([1, 4155550101])  # a number cell, as Excel keeps it
    sheet.append([2, "+44 20 7946 0958"])
    book.save(tmp_path / "numbers.xlsx")
    job = write_job(tmp_path, "http://127.0.0.1:9")
    done = cli("suppress", "import", str(job), str(tmp_path / "numbers.xlsx"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(listed(tmp_path / "runs")) == {"+14155550101", "+442079460958"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01\x02binary\xff\x00" * 50, "binary data"),
        (b"", "the file is empty"),
        (b"Name,Code\nAnn,12\nBob,7\n", "no column looks like phone numbers"),
        (b"Phone\n", "no data rows"),
    ],
    ids=["binary", "empty", "no-phone-column", "header-only"],
)
def test_import_of_an_unusable_file_is_exit_2_with_a_clear_message(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """Checked where `campaign suppress import` reads the file (it prints `campaign: error:`
    and this message, with the error's exit code); the command itself: the next test."""
    path = tmp_path / "numbers.csv"
    path.write_bytes(content)
    with SuppressionList(tmp_path / "runs") as target, pytest.raises(CampaignError) as refused:
        import_numbers(target, path, None, "US", "imported")
    assert refused.value.exit_code == 2
    assert message in str(refused.value)
    assert listed(tmp_path / "runs") == {}


def test_import_with_a_missing_column_names_it(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    source = write_csv(tmp_path / "n.csv", ["Phone"], [[phones(1)[0]]])
    done = cli("suppress", "import", str(job), str(source), "--column", "Mobile")
    assert done.returncode == 2
    assert "column 'Mobile'" in done.stderr and "no such column" in done.stderr
    assert "Traceback" not in done.stderr
    assert listed(tmp_path / "runs") == {}


def test_import_streams_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    """A file three times as long (more chunks read, more batches written) peaks at about
    the memory of one that fills a write batch: holding every number or row would triple
    it."""
    short, long = (_import_peak(tmp_path / str(rows), rows) for rows in (10_000, 30_000))
    assert long < 1.5 * short, (short, long)


def _import_peak(directory: Path, rows: int) -> int:
    directory.mkdir()
    source = directory / "many.csv"
    with source.open("w", encoding="utf-8") as out:
        out.write("Phone\n")
        for phone in phones(rows):
            out.write(phone + "\n")
    with SuppressionList(directory) as target:
        tracemalloc.start()
        try:
            result = import_numbers(target, source, None, "US", "bulk")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert result.added == rows and target.count() == rows
    return peak


def test_applying_the_list_twice_changes_nothing_the_second_time(
    tmp_path: Path, store: str | None
) -> None:
    ledger = open_ledger(tmp_path, store, readonly=False)

    numbers = [e164(p) for p in phones(4)]
    mapped = [
        MappedRow(i + 1, [n], n, json.dumps({"to_phone": n}), n) for i, n in enumerate(numbers)
    ]
    ledger.replace_rows(iter([mapped]), ["Phone"])
    suppress_numbers(tmp_path, numbers[:2], "unsubscribed", store)
    with SuppressionList(tmp_path, store) as target:
        assert apply_to_ledger(ledger, target) == 2
        generation = ledger.generation()
        assert apply_to_ledger(ledger, target) == 2
        assert ledger.generation() == generation  # the report stays current
        assert ledger.counts()["suppressed"] == 2
        assert listed(tmp_path, store)[numbers[0]] == ("unsubscribed", "report")
        target.remove(numbers[:1])
        assert apply_to_ledger(ledger, target) == 1
        assert ledger.counts()["pending"] == 3
    ledger.close()


def test_a_person_who_may_have_been_sent_stays_unknown_when_suppressed(
    tmp_path: Path, store: str | None
) -> None:
    """Suppressing someone whose request may have arrived must not hide that it may have:
    the row stays `unknown` (with the reason it is not sent again), whatever the list says."""
    data = people(tmp_path / "in.csv", 3)
    maybe = e164(phones(1)[0])
    with FaultServer(lambda _n, body: 502 if body["to_phone"] == maybe else 200) as api:
        job = write_job(tmp_path, api.url, input=data, ledger=store)
        assert cli("run", str(job), "--no-progress").returncode == 1
        with SuppressionList(tmp_path / "runs", store) as listing:
            assert listing.add([maybe], "replied STOP", "manual") == 1
        for extra in ([], ["--resend-unknown"]):
            cli("run", str(job), "--no-progress", *extra)
            rows = read_results(tmp_path / "runs" / "test" / "results.csv")
            assert [r["_status"] for r in rows] == ["unknown", "sent", "sent"], rows[0]
            assert "suppression list" in rows[0]["_error"]
        assert [b["to_phone"] for b in api.bodies()].count(maybe) == 1
