"""Never twice, never lost: the ledger's invariants under hostile schedules, counted at the
sandbox's record (what was really delivered), with the real CLI in subprocesses."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from campaign.store.campaigns import is_locked, open_campaign
from campaign.store.ledger import Ledger
from tests.helpers import (
    FaultServer,
    Sandbox,
    assert_no_duplicates,
    cli,
    open_ledger,
    phones,
    read_results,
    soak_trials,
    spawn_cli,
    start_sandbox,
    statuses,
    write_csv,
    write_job,
)
from tests.helpers.pg import workers
from tests.helpers.runs import people, people_job, sent_job, wait_for

TRIALS = soak_trials()
AT_A_TIME = 4  # trials started together (two runs each)
EARLIER_CAMPAIGNS = 300
# Runs of one campaign while others keep asking whether it is in use: the first sends, the
# next finds everyone sent.
RUNS = soak_trials(2)


def _finished_campaigns(output_dir: Path, job_name: str, count: int) -> None:
    """Earlier campaigns of the job, each with a finished run: the midnight guard reads
    them all, which widens the moment two runs started together race in. One is made by
    the Ledger; the others are copies of it with their own name and creation time (made
    one by one, their fsyncs took most of the test's time)."""
    template = output_dir.parent / f"{job_name}-template" / "ledger.sqlite"
    template.parent.mkdir(parents=True)
    ledger = Ledger(template)
    ledger.set_meta(campaign=template.parent.name, job=job_name, origin="cli", created_at=0)
    ledger.end_run(ledger.start_run("run"), "finished")
    ledger.close()
    for i in range(count):
        directory = output_dir / f"{job_name}-old-{i:04d}"
        directory.mkdir(parents=True)
        shutil.copyfile(template, directory / "ledger.sqlite")
        with contextlib.closing(sqlite3.connect(directory / "ledger.sqlite")) as copy:
            copy.execute("PRAGMA synchronous = OFF")
            copy.executemany(
                "UPDATE meta SET value = ? WHERE key = ?",
                [(json.dumps(directory.name), "campaign"), (json.dumps(i), "created_at")],
            )
            copy.commit()


@pytest.mark.soak
def test_two_runs_started_at_once_send_each_person_once(tmp_path: Path) -> None:
    """Every pair of runs starts together, over an output directory of hundreds of
    campaigns (the midnight guard reads them all, which widens the race). The trials go a
    few at a time, each with a job of its own, so that their guards do not see each other."""
    box = start_sandbox(tmp_path, "--latency-ms", "30")
    try:
        _finished_campaigns(tmp_path / "runs", "nightly", EARLIER_CAMPAIGNS)
        for first in range(0, TRIALS, AT_A_TIME):
            trials = range(first, min(first + AT_A_TIME, TRIALS))
            jobs, runs = {}, {}
            for trial in trials:
                jobs[trial] = write_job(
                    tmp_path,
                    box.url,
                    name=f"nightly-{trial % AT_A_TIME}",
                    input=people(tmp_path / f"in-{trial}.csv", 6, start=100 * trial),
                    campaign=f"t{trial:02d}-{{date}}",
                    limits={"concurrency": 2},
                )
                runs[trial] = [
                    spawn_cli("run", str(jobs[trial]), "--no-progress") for _ in range(2)
                ]
            for trial in trials:
                ended = [(run.wait(timeout=120), *run.communicate()) for run in runs[trial]]
                codes = sorted(code for code, _, _ in ended)
                assert codes in ([0, 0], [0, 2]), ended
                for code, _, err in ended:
                    if code == 2:
                        assert "is in use by" in err or "did not finish" in err, err
                # The campaign the winner made is whole: a third run sends nobody again.
                again = cli("run", str(jobs[trial]), "--no-progress")
                assert again.returncode == 0, again.stderr
                found = (tmp_path / "runs").glob(f"t{trial:02d}-*/results.csv")
                assert statuses(read_results(next(found))) == {"sent": 6}
        assert len(assert_no_duplicates(box)) == 6 * TRIALS
    finally:
        box.stop()


@pytest.mark.soak
def test_two_runs_started_at_once_on_postgresql_share_the_work(tmp_path: Path, pg_url: str) -> None:
    """On PostgreSQL two runs of one campaign are two workers (docs/design.md, invariant 7): both
    finish, and together they reach each person once. The trials are independent
    campaigns (and jobs), a few at a time: every pair still starts together."""
    box = start_sandbox(tmp_path, "--latency-ms", "30")
    try:
        for first in range(0, TRIALS, AT_A_TIME):
            trials = range(first, min(first + AT_A_TIME, TRIALS))
            runs = {}
            for trial in trials:
                job = write_job(
                    tmp_path,
                    box.url,
                    name=f"nightly-{trial}",
                    input=people(tmp_path / f"in-{trial}.csv", 6, start=100 * trial),
                    campaign=f"t{trial:02d}",
                    # A worker with nobody left to claim looks again every third of a lease.
                    limits={"concurrency": 2, "lease_s": 3},
                    ledger=pg_url,
                )
                runs[trial] = workers(job, 2)
            for trial in trials:
                ended = [(run.wait(timeout=120), *run.communicate()) for run in runs[trial]]
                assert [code for code, _, _ in ended] == [0, 0], ended
                with contextlib.closing(
                    open_ledger(tmp_path / "runs", pg_url, f"t{trial:02d}")
                ) as ledger:
                    assert ledger.counts()["sent"] == 6
                    assert ledger.count_targets(("pending", "failed", "unknown", "inflight")) == 0
        assert len(assert_no_duplicates(box)) == 6 * TRIALS
    finally:
        box.stop()


@pytest.mark.soak
def test_asking_whether_a_campaign_is_in_use_never_fails_a_run(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    job = people_job(tmp_path, sandbox.url, 3)
    directory = tmp_path / "runs" / "test"
    done = threading.Event()
    probes = 0

    def probe() -> None:
        nonlocal probes
        while not done.is_set():
            is_locked(directory)
            probes += 1

    # Several probers at once, as a page server and the midnight guards of other jobs may.
    probers = [threading.Thread(target=probe) for _ in range(3)]
    for prober in probers:
        prober.start()
    try:
        codes = [cli("run", str(job), "--no-progress").returncode for _ in range(RUNS)]
    finally:
        done.set()
        for prober in probers:
            prober.join()
    assert probes > 100
    assert codes == [0] * RUNS
    assert len(sandbox.phones()) == 3


# The mapping is compared by the command line, whatever the store keeps it in: one store.
def test_another_mapping_after_requests_is_refused_and_named(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    data = write_csv(
        tmp_path / "in.csv",
        ["First Name", "Phone", "Mobile"],
        [[f"P{i}", p, m] for i, (p, m) in enumerate(zip(phones(3), phones(3, 50), strict=True))],
    )
    job = write_job(tmp_path, sandbox.url, input=data)
    assert cli("run", str(job), "--no-progress").returncode == 0

    other = write_job(tmp_path, sandbox.url, input=data, mapping={"to_phone": "Mobile"})
    for command in ("run", "validate"):
        refused = cli(command, str(other), "--no-progress")
        assert refused.returncode == 2, refused.stderr
        assert "mapping.to_phone ('Phone' -> 'Mobile')" in refused.stderr
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr

    # The same mapping written another way is the same mapping.
    same = write_job(
        tmp_path,
        sandbox.url,
        input=data,
        mapping={"to_phone": " Phone ", "default_region": "us"},
    )
    done = cli("run", str(same), "--no-progress")
    assert done.returncode == 0, done.stderr
    assert sorted(sandbox.phones()) == sorted(p.replace(" ", "") for p in phones(3))


def test_validating_another_file_or_editing_the_report_leaves_a_true_report(
    tmp_path: Path, sandbox: Sandbox, store: str | None
) -> None:
    a = people(tmp_path / "a.csv", 3)
    b = people(tmp_path / "b.csv", 1, start=40)
    job = write_job(tmp_path, sandbox.url, input=a, ledger=store)
    assert cli("run", str(job), "--no-progress").returncode == 0
    assert cli("validate", str(job), "--input", str(b)).returncode == 0
    results = tmp_path / "runs" / "test" / "results.csv"
    assert statuses(read_results(results)) == {"pending": 1, "sent": 3}

    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = read_results(results)
    assert [(r["First Name"], r["_status"]) for r in rows] == [
        ("P0", "sent"),
        ("P1", "sent"),
        ("P2", "sent"),
    ]
    assert len(sandbox.phones()) == 3

    # A report edited by hand is rewritten by the next run, though it changes nobody.
    results.write_text("not the report\n", encoding="utf-8")
    assert cli("run", str(job), "--no-progress").returncode == 0
    assert statuses(read_results(results)) == {"sent": 3}
    assert len(sandbox.phones()) == 3


def test_a_sent_row_edited_into_an_unusable_one_still_shows_sent(
    tmp_path: Path, sandbox: Sandbox, store: str | None
) -> None:
    path = tmp_path / "in.csv"
    write_csv(path, ["First Name", "Phone"], [["Ann", "+1 415 200 0001"], ["Bob", "415 200"]])
    job = write_job(tmp_path, sandbox.url, input=path, ledger=store)
    assert cli("run", str(job), "--no-progress").returncode == 0
    path.write_text(
        "First Name,Phone\nAnn,+1 415 200 0001,an extra cell\nBob,415 200 0002\n", "utf-8"
    )
    done = cli("run", str(job), "--no-progress")
    assert done.returncode == 0, done.stderr
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [(r["_row"], r["_status"]) for r in rows] == [("1", "sent"), ("2", "sent")]
    assert rows[0]["_error"].startswith("sent earlier; the row now: ")
    assert sorted(sandbox.phones()) == ["+14152000001", "+14152000002"]


def test_every_commit_is_fsynced(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        journal = ledger.db.execute("PRAGMA journal_mode").fetchone()[0]
        synchronous = ledger.db.execute("PRAGMA synchronous").fetchone()[0]
    finally:
        ledger.close()
    assert (journal, synchronous) == ("wal", 2)  # 2: FULL, an fsync at every commit


def test_a_ledger_of_the_previous_version_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "CREATE TABLE recipients (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE,"
        " payload TEXT NOT NULL, to_phone TEXT, state TEXT NOT NULL DEFAULT 'pending',"
        " attempts INTEGER NOT NULL DEFAULT 0, http_status INTEGER, error TEXT, sent_at TEXT);"
        "INSERT INTO recipients (key, payload, to_phone, state) VALUES"
        " ('+14152000001', '{}', '+14152000001', 'sent');"
    )
    old.close()
    ledger = Ledger(path)
    try:
        assert ledger.counts()["sent"] == 1  # the person is in no row: still shown as sent
        assert [r[3] for r in ledger.report_rows()] == ["+14152000001"]
    finally:
        ledger.close()


@contextlib.contextmanager
def _small_disk(path: Path, size_mb: int) -> Iterator[Path]:
    """A tmpfs of `size_mb` at `path` (root only): a disk that can be filled on purpose."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * (1 << 20))
    return filler


def test_a_full_disk_mid_run_stops_sending_and_loses_no_request(tmp_path: Path) -> None:
    total = 2000
    box = start_sandbox(tmp_path, "--latency-ms", "20")
    try:
        with _small_disk(tmp_path / "disk", 16) as disk:
            job = write_job(
                tmp_path,
                box.url,
                input=people(tmp_path / "in.csv", total),
                output_dir=str(disk / "runs"),
                limits={"concurrency": 10},
            )
            run = spawn_cli("run", str(job), "--no-progress")
            deadline = time.monotonic() + 60
            while len(box.records()) < 100:
                assert time.monotonic() < deadline and run.poll() is None, "no requests"
                time.sleep(0.01)
            filler = _fill(disk)
            _, err = run.communicate(timeout=120)
            assert run.returncode == 1, err
            assert "disk is full" in err and "Traceback" not in err
            arrived = box.phones()
            assert len(arrived) < total

            filler.unlink()  # space again: every request that arrived has its record
            ledger = Ledger(disk / "runs" / "test" / "ledger.sqlite")
            recorded = {
                phone
                for (phone,) in ledger.db.execute(
                    "SELECT to_phone FROM recipients WHERE attempts > 0"
                )
            }
            ledger.close()
            assert set(arrived) <= recorded

            # The rest at a faster pace: the run after the full disk is not the subject.
            job = write_job(
                tmp_path,
                box.url,
                input=tmp_path / "in.csv",
                output_dir=str(disk / "runs"),
                limits={"concurrency": 50, "rate_per_second": 5000},
            )
            again = cli("run", str(job), "--no-progress")
            assert again.returncode in (0, 1), again.stderr
            rows = read_results(disk / "runs" / "test" / "results.csv")
        counts = statuses(rows)
        # Only people in flight when the disk filled may be unknown; everyone else is sent.
        assert counts.get("unknown", 0) <= 10 and sum(counts.values()) == total
        assert counts["sent"] + counts.get("unknown", 0) == total
        assert len(assert_no_duplicates(box)) >= counts["sent"]
    finally:
        box.stop()


def test_a_report_waits_for_no_run_and_never_overwrites_a_newer_one(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    sent_job(tmp_path, sandbox.url, 2)
    directory = tmp_path / "runs" / "test"
    with open_campaign(directory.parent, directory.name, "job"):  # a run holds it
        busy = cli("report", str(directory))
    assert busy.returncode == 2 and "is in use by" in busy.stderr, busy.stderr
    # A report killed mid-write left its temporary file: the next owner removes it.
    leftover = directory / ".results.csv.x1y2.tmp"
    leftover.write_text("half a report", encoding="utf-8")
    done = cli("report", str(directory))
    assert done.returncode == 0, done.stderr
    assert not leftover.exists()
    assert statuses(read_results(directory / "results.csv")) == {"sent": 2}


def test_a_report_of_a_damaged_ledger_is_one_clear_line(tmp_path: Path) -> None:
    directory = tmp_path / "runs" / "broken"
    directory.mkdir(parents=True)
    (directory / "ledger.sqlite").write_bytes(b"this is not a database at all" * 100)
    done = cli("report", str(directory))
    assert done.returncode == 2
    assert "cannot open the ledger" in done.stderr and "Traceback" not in done.stderr


def test_a_full_disk_while_reading_the_input_names_the_cause(tmp_path: Path) -> None:
    with _small_disk(tmp_path / "disk", 16) as disk:
        job = write_job(
            tmp_path,
            "http://127.0.0.1:9",
            input=people(tmp_path / "in.csv", 20_000),
            output_dir=str(disk / "runs"),
        )
        filler = _fill(disk)
        filler.write_bytes(b"\0" * (filler.stat().st_size - 200_000))  # a little room left
        done = cli("validate", str(job))
        assert done.returncode == 2, done.stderr
        assert "full" in done.stderr and "no transaction" not in done.stderr, done.stderr
        filler.unlink()
        again = cli("validate", str(job))
        assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill -9"])
def test_a_person_who_may_have_the_sms_stays_unknown_while_a_retry_is_due(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """Each person's first request is cut after the server read it (`unknown`); the
    `--resend-unknown` run gets a 503 with a long Retry-After and is stopped while it
    waits. Before, that wait was recorded as `pending` ("not attempted yet"): a plain
    rerun sent everyone again, and a 400 to that made them `failed`, for `--only-failed`
    to send a third time."""
    people_n = 5
    seen: Counter[str] = Counter()

    def reply(_n: int, body: dict[str, Any]) -> Any:
        seen[body["to_phone"]] += 1
        return ["reset", (503, {"Retry-After": "600"})][min(seen[body["to_phone"]], 2) - 1]

    with FaultServer(reply) as server:
        data = people(tmp_path / "in.csv", people_n)
        job = write_job(tmp_path, server.url, input=data, limits={"concurrency": people_n})
        assert cli("run", str(job), "--no-progress").returncode == 1
        assert statuses(read_results(tmp_path / "runs" / "test" / "results.csv")) == {
            "unknown": people_n
        }
        resend = spawn_cli("run", str(job), "--no-progress", "--resend-unknown")
        try:
            # The ledger, not the log: the log line may be written before the commit, and
            # a kill -9 between the two leaves the attempts in flight (also `unknown`).
            wait_for(lambda: retries_due(tmp_path / "runs" / "test") == people_n, what="retries")
            resend.send_signal(stop)
            resend.communicate(timeout=60)
        finally:
            if resend.poll() is None:
                resend.kill()
                resend.wait()
        rerun = cli("run", str(job), "--no-progress")
        assert rerun.returncode == 1, rerun.stdout + rerun.stderr
        assert sorted(seen.values()) == [2] * people_n  # the plain rerun sent nobody
        results = read_results(tmp_path / "runs" / "test" / "results.csv")
        assert statuses(results) == {"unknown": people_n}
        assert all("earlier attempt may have arrived" in r["_error"] for r in results)
        assert cli("run", str(job), "--no-progress", "--only-failed").returncode == 1
        assert sorted(seen.values()) == [2] * people_n


def retries_due(campaign: Path) -> int:
    """Second attempts the ledger has committed as answered and waiting for a retry."""
    with contextlib.closing(
        sqlite3.connect(f"file:{campaign / 'ledger.sqlite'}?mode=ro", uri=True)
    ) as db:
        query = "SELECT count(*) FROM attempts WHERE n = 2 AND finished_at IS NOT NULL"
        return int(db.execute(query).fetchone()[0])
