"""`campaign reconcile` against the real sandbox process: the delivery reports it serves
for what it accepted are matched to exactly the truth its record holds."""

from __future__ import annotations

import collections
import contextlib
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

from campaign.sandbox_reporting import CREATED_WITHIN_S
from campaign.store.ledger import SCHEMA_VERSION, Ledger
from campaign.store.suppression import SuppressionList
from tests.helpers import (
    FaultServer,
    Sandbox,
    assert_no_duplicates,
    cli,
    e164,
    open_ledger,
    phones,
    read_results,
    spawn_cli,
    start_sandbox,
    write_job,
)
from tests.helpers.reports import wait_until
from tests.helpers.runs import people, people_job

DEADLINE_S = 60
FINAL = {"delivered", "undelivered", "failed", "not_found"}


# Settled a little after the sandbox's latest entry time (CREATED_WITHIN_S after the
# request): sooner, a reconcile could call a person not_found whose entry is still due.
SETTLE_S = CREATED_WITHIN_S + 0.5


def reporting(**changes: Any) -> dict[str, Any]:
    settle = SETTLE_S / 60
    return {"agent_id": "1", "access_token": "sandbox-token", "settle_minutes": settle, **changes}


def reconcile_until(job: Path, done: Any, not_before: float = 0) -> list[dict[str, str]]:
    """Reconcile again until `done(rows)`: entries appear and settle on the sandbox's
    clock (a bounded wait on the condition, not a sleep). `not_before` (time.time()): when
    `done` can first hold (the entries due, the requests settled); no reconcile before it
    (each is a process of its own)."""
    wait_until(not_before)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        result = cli("reconcile", str(job))
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        rows = read_results(job.parent / "runs" / "test" / "results.csv")
        if done(rows) or time.monotonic() > deadline:
            return rows


def truth(box: Sandbox) -> dict[str, dict[str, Any]]:
    """What the sandbox accepted per number: its delivery outcome and whether it answered."""
    return {
        r["body"]["to_phone"]: {**r["report"], "dropped": r.get("dropped", False)}
        for r in box.records()
    }


def never_arrived(
    tmp_path: Path, box: Sandbox, path: Path, numbers: list[str], **sections: Any
) -> None:
    """`numbers` sent through a server that cuts every connection, so none reached the
    API (their reports are read from `box`): the run ends 1, every one unknown."""
    with FaultServer(lambda n, body: "reset") as cut:
        lost = write_job(
            tmp_path,
            cut.url,
            input=people(path, numbers),
            reporting=reporting(base_url=box.url),
            **sections,
        )
        first = cli("run", str(lost), "--no-progress")
    assert first.returncode == 1, first.stderr


def test_reconcile_finds_what_the_sandbox_recorded_and_resend_unknown_sends_only_the_lost(
    tmp_path: Path, store: str | None
) -> None:
    box = start_sandbox(
        tmp_path,
        "--drop-after-accept",
        "0.3",
        "--undelivered-rate",
        "0.3",
        "--delivery-delay-s",
        "0.2",
    )
    never = phones(6, start=9000)  # requests that never reached the sandbox
    reached = phones(40)
    try:
        # The never-arrived: their connections were cut by a server that is not the API.
        never_arrived(tmp_path, box, tmp_path / "a.csv", never, name="lost", ledger=store)
        job = write_job(
            tmp_path,
            box.url,
            input=people(tmp_path / "b.csv", never + reached),
            reporting=reporting(),
            ledger=store,
        )
        second = cli("run", str(job), "--no-progress")
        ended = time.time()
        assert second.returncode == 1, second.stderr  # the dropped answers are unknown
        before = read_results(tmp_path / "runs" / "test" / "results.csv")
        assert sum(r["_status"] == "unknown" for r in before) > len(never)

        rows = reconcile_until(
            job, lambda rows: all(r["_delivery"] in FINAL for r in rows), ended + SETTLE_S
        )
        known = truth(box)
        kinds = collections.Counter()
        for row in rows:
            phone = e164(row["Phone"])
            if phone in known:
                fact = known[phone]
                assert row["_status"] == "sent", row
                assert row["_delivery"] == fact["status"], row
                assert row["_delivery_error"] == (fact["error"] or ""), row
                if fact["dropped"]:
                    assert row["_error"] == "confirmed by the delivery report", row
                    kinds["lost answer"] += 1
                else:
                    kinds[fact["status"]] += 1
            else:
                assert phone in {e164(p) for p in never}
                assert row["_status"] == "unknown" and row["_delivery"] == "not_found", row
                kinds["never arrived"] += 1
            assert row["_delivery_checked_at"].endswith("Z")
        assert kinds["never arrived"] == len(never)
        assert kinds["lost answer"] > 0 and kinds["delivered"] > 0
        assert kinds["undelivered"] + kinds["failed"] > 0

        summary = json.loads((tmp_path / "runs" / "test" / "summary.json").read_text())
        assert summary["delivery"]["not_found"] == len(never)
        assert sum(summary["delivery"].values()) == len(rows)
        assert summary["last_reconcile"]["unmatched_entries"] > 0  # other senders' entries

        # The suppression candidates: exactly the numbers whose error names a phrase.
        with contextlib.closing(open_ledger(tmp_path / "runs", store)) as ledger:
            listed = {phone for phone, _, _ in ledger.suppress_candidates()}
        phrases = ("unsubscribed", "not a valid mobile number", "landline")
        wanted = {
            p
            for p, f in known.items()
            if f["error"] and any(w in f["error"].lower() for w in phrases)
        }
        assert listed == wanted
        # ... and they are on the store's suppression list, for every later campaign.
        with SuppressionList(tmp_path / "runs", store) as on_store:
            on_list = {e.phone for e in on_store.entries() if e.source == "report"}
        assert on_list == wanted

        # --resend-unknown now sends exactly the never-arrived people, nobody else.
        accepted = len(box.records())
        again = cli("run", str(job), "--no-progress", "--resend-unknown")
        assert again.returncode in (0, 1), again.stderr
        resent = [r["body"]["to_phone"] for r in box.records()[accepted:]]
        assert sorted(resent) == sorted(e164(p) for p in never)
        assert_no_duplicates(box)
    finally:
        box.stop()


def test_a_not_found_says_nothing_of_a_later_request(tmp_path: Path) -> None:
    """The first requests never reach the API: the report does not know them (not_found).
    `--resend-unknown` sends them again; those arrive, but every answer is lost, so they
    are `unknown` again. The old not_found is about the first request only: a second
    `--resend-unknown`, before any reconcile has looked at the new requests, sends nobody.
    Before, it sent everyone a second SMS."""
    box = start_sandbox(tmp_path, "--drop-after-accept", "1", "--delivery-delay-s", "0")
    numbers = phones(5)
    try:
        never_arrived(tmp_path, box, tmp_path / "in.csv", numbers)
        ended = time.time()
        job = write_job(
            tmp_path, box.url, input=people(tmp_path / "in.csv", numbers), reporting=reporting()
        )
        rows = reconcile_until(
            job, lambda rows: all(r["_delivery"] in FINAL for r in rows), ended + SETTLE_S
        )
        assert {(r["_status"], r["_delivery"]) for r in rows} == {("unknown", "not_found")}
        assert cli("run", str(job), "--no-progress", "--resend-unknown").returncode == 1
        assert sorted(box.phones()) == sorted(map(e164, numbers))  # arrived, answers lost
        assert cli("run", str(job), "--no-progress", "--resend-unknown").returncode == 1
        assert_no_duplicates(box)
        # Once a reconcile has looked at the new requests, the report confirms them.
        due = max(r["report"]["created_at"] for r in box.records())
        rows = reconcile_until(job, lambda rows: all(r["_status"] == "sent" for r in rows), due)
        assert {r["_error"] for r in rows} == {"confirmed by the delivery report"}
    finally:
        box.stop()


def test_a_second_reconcile_after_the_delivery_delay_turns_sent_into_delivered(
    tmp_path: Path,
) -> None:
    """Entries say `sent` for a delay after they appear, then `delivered`. The first
    reconcile must start within the delay to see a `sent`; a machine too loaded for that
    tries again with a longer one (the transition is what is checked, not a start time)."""
    for trial, delay_s in enumerate((8.0, 20.0, 45.0)):
        if _sent_then_delivered(tmp_path / f"trial-{trial}", delay_s):
            return
    raise AssertionError("no reconcile started within 45 s of its run: no `sent` was seen")


def _sent_then_delivered(directory: Path, delay_s: float) -> bool:
    """False when the first reconcile came too late to see any entry still `sent`."""
    directory.mkdir()
    box = start_sandbox(directory, "--delivery-delay-s", str(delay_s))
    try:
        job = people_job(directory, box.url, 10, reporting=reporting(settle_minutes=30))
        assert cli("run", str(job), "--no-progress").returncode == 0
        early = reconcile_until(job, lambda rows: any(r["_delivery"] for r in rows))
        assert {r["_delivery"] for r in early} <= {"sent", "delivered", ""}
        if "sent" not in {r["_delivery"] for r in early}:
            return False
        # Settle is 30 min: a person with no entry yet is not "not_found".
        due = max(r["report"]["created_at"] for r in box.records()) + delay_s
        late = reconcile_until(
            job, lambda rows: all(r["_delivery"] == "delivered" for r in rows), due
        )
        assert [r["_delivery"] for r in late] == ["delivered"] * 10
        assert all(r["_status"] == "sent" for r in late)
        # Once more: the same facts (only the time they were checked moves on).
        again = reconcile_until(job, lambda rows: True)
        strip = [{k: v for k, v in r.items() if k != "_delivery_checked_at"} for r in again]
        assert strip == [{k: v for k, v in r.items() if k != "_delivery_checked_at"} for r in late]
        return True
    finally:
        box.stop()


def test_a_killed_reconcile_loses_nothing_and_the_next_one_finishes(
    tmp_path: Path, store: str | None
) -> None:
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0", "--report-rate", "2")

    def ledger() -> contextlib.closing[Ledger]:
        return contextlib.closing(open_ledger(tmp_path / "runs", store))

    try:
        pages = reporting(rate_per_second=2)
        job = people_job(tmp_path, box.url, 120, ledger=store, reporting=pages, lease_s=3)
        assert cli("run", str(job), "--no-progress").returncode == 0
        process = spawn_cli("reconcile", str(job))
        deadline = time.monotonic() + DEADLINE_S
        stored = 0
        while stored == 0 and time.monotonic() < deadline and process.poll() is None:
            with ledger() as db:
                stored = db.db.execute("SELECT count(*) FROM report_entries").fetchone()[0]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert process.returncode == -signal.SIGKILL, "the reconcile ended before it was killed"
        with ledger() as db:
            kept = db.db.execute("SELECT count(*) FROM report_entries").fetchone()[0]
            windows = [tuple(w) for w in db.db.execute("SELECT complete FROM report_windows")]
        assert kept >= stored > 0
        assert windows == [(0,)]  # begun, not read whole

        rows = reconcile_until(job, lambda rows: all(r["_delivery"] == "delivered" for r in rows))
        assert [r["_delivery"] for r in rows] == ["delivered"] * 120
        with ledger() as db:
            complete = [tuple(w) for w in db.db.execute("SELECT complete FROM report_windows")]
            assert complete == [(1,)]
            states = db.db.execute(
                "SELECT state FROM runs WHERE command = 'reconcile' ORDER BY id"
            ).fetchall()
            # The killed one is told apart from the one that finished.
            assert [s for (s,) in states][:1] == ["crashed"]
            assert [s for (s,) in states][-1] == "finished"
    finally:
        box.stop()


def test_a_ledger_of_schema_2_is_upgraded_and_shows_empty_delivery_columns(
    tmp_path: Path,
) -> None:
    with FaultServer(lambda n, body: 200) as api:  # takes every request, as the API does
        job = write_job(tmp_path, api.url, input=people(tmp_path / "in.csv", phones(3)))
        assert cli("run", str(job), "--no-progress").returncode == 0
    path = tmp_path / "runs" / "test" / "ledger.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as db:
        for table in ("deliveries", "report_entries", "report_windows", "suppress_candidates"):
            db.execute(f"DROP TABLE {table}")
        db.execute("PRAGMA user_version = 2")
        db.commit()
    result = cli("report", str(job))
    assert result.returncode == 0, result.stderr
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [(r["_status"], r["_delivery"], r["_delivery_checked_at"]) for r in rows] == [
        ("sent", "", "")
    ] * 3
