"""Claiming the next people costs the same at any size of campaign.

A run claims its people a batch at a time. A claim that looked at every unclaimed person
(and sorted them) made a campaign quadratic: 35 ms a batch at 40,000 people, hours at a
million. The work of a claim is counted in SQLite's virtual machine steps, which depend
on the query plan and the data only, not on the machine's speed.

On PostgreSQL a worker out of people ends only after a claim made after it saw that no
other live worker holds any (people a dead worker let go meanwhile are not left behind).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from campaign.job import Limits
from campaign.progress import Progress
from campaign.records import MappedRow, Outcome
from campaign.store.ledger import Ledger
from campaign.worker import RunControl, _claims, _nobody_to_send

BATCH = 100
STEPS_PER_TICK = 100


def ledger_of(path: Path, people: int) -> Ledger:
    ledger = Ledger(path)
    rows = [
        MappedRow(n, [f"+1212555{n:04d}"], f"+1212555{n:04d}", json.dumps({"n": n}), None)
        for n in range(1, people + 1)
    ]
    ledger.replace_rows(iter([rows]), ["Phone"])
    return ledger


def steps_of_claims(ledger: Ledger, claims: int) -> tuple[int, int]:
    """(VM steps, in ticks of STEPS_PER_TICK, of `claims` successive claims; people
    claimed)."""
    run_id = ledger.start_run("run")
    ticks = 0

    def tick() -> int:
        nonlocal ticks
        ticks += 1
        return 0  # go on

    after, claimed = 0, 0
    ledger.db.raw.set_progress_handler(tick, STEPS_PER_TICK)
    try:
        for _ in range(claims):
            found = ledger.claim(run_id, ("pending",), after, BATCH)
            claimed += len(found)
            after = found[-1].row
    finally:
        ledger.db.raw.set_progress_handler(None, STEPS_PER_TICK)
    return ticks, claimed


def test_a_claim_costs_the_same_in_a_small_and_a_big_campaign(tmp_path: Path) -> None:
    small = ledger_of(tmp_path / "small.sqlite", 1_000)
    big = ledger_of(tmp_path / "big.sqlite", 20_000)
    try:
        small_steps, small_claimed = steps_of_claims(small, 5)
        big_steps, big_claimed = steps_of_claims(big, 5)
    finally:
        small.close()
        big.close()
    assert small_claimed == big_claimed == 5 * BATCH
    # Twenty times the people: the same work per batch (a plan that looks at every
    # unclaimed person does about twenty times more).
    assert big_steps < 1.5 * small_steps, (small_steps, big_steps)


def ledger_on(store: str | None, tmp_path: Path) -> Ledger:
    return Ledger(tmp_path / "ledger.sqlite") if store is None else Ledger.on_postgres(store, "t")


def test_two_answers_for_one_person_in_one_commit_never_undo_sent(
    store: str | None, tmp_path: Path
) -> None:
    """One group commit holding two answers for one person applies them in order, as one
    after the other: `sent` stays `sent` whichever comes second. (On PostgreSQL a single
    statement that meets a row twice keeps only one of the two changes, either one.)"""
    ledger = ledger_on(store, tmp_path)
    try:
        rows = [
            MappedRow(n, [f"+1212555{n:04d}"], f"+1212555{n:04d}", json.dumps({"n": n}), None)
            for n in (1, 2)
        ]
        ledger.replace_rows(iter([rows]), ["Phone"])
        run_id = ledger.start_run("run")
        first, second = ledger.claim(run_id, ("pending",), 0, 10)
        assert ledger.write_batch(run_id, [], [], [(first.id, 1), (second.id, 1)]) == [True, True]
        sent = Outcome(first.id, 1, "sent", 200, None, "2026-11-27T00:00:00Z")
        failed = Outcome(first.id, 1, "failed", 400, "HTTP 400", None)
        ledger.write_batch(run_id, [sent, failed], [], [])
        sent_later = Outcome(second.id, 1, "sent", 200, None, "2026-11-27T00:00:00Z")
        failed_first = Outcome(second.id, 1, "failed", 400, "HTTP 400", None)
        ledger.write_batch(run_id, [failed_first, sent_later], [], [])
        states = {row[0]: row[1] for row in ledger.db.execute("SELECT id, state FROM recipients")}
        assert states == {first.id: "sent", second.id: "sent"}
    finally:
        ledger.close()


def _settled_at_the_look(
    ledger: Ledger, sweeper: Ledger, monkeypatch: pytest.MonkeyPatch
) -> tuple[set[int], int]:
    """Three people held by a dead worker, and a live run whose look at whether other
    workers hold people comes right after the dead worker's lease sweep settled them (the
    sweep runs on a connection of its own, at any moment). Returns (their ids, the run)."""
    rows = [
        MappedRow(n, [f"+1212555{n:04d}"], f"+1212555{n:04d}", json.dumps({"n": n}), None)
        for n in (1, 2, 3)
    ]
    ledger.replace_rows(iter([rows]), ["Phone"])
    dead = ledger.start_run("run")
    held = {target.id for target in ledger.claim(dead, ("pending",), 0, 10)}
    assert len(held) == 3
    run_id = ledger.start_run("run")
    look = ledger.held_elsewhere

    def settled_then_look(run: int) -> bool:
        sweeper.db.execute(
            "UPDATE runs SET heartbeat_at = heartbeat_at - 100 WHERE id = ?", (dead,)
        )
        sweeper.recover(lease_s=30)
        return look(run)

    monkeypatch.setattr(ledger, "held_elsewhere", settled_then_look)
    return held, run_id


async def test_a_worker_claims_once_more_after_seeing_nobody_else_holds_people(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that finds nobody left to claim looks whether other workers still hold
    people. A dead worker's people let go between that empty claim and the look are
    claimed by one more claim, not left pending when the worker ends."""
    ledger = Ledger.on_postgres(pg_url, "t")
    sweeper = ledger.reopen()
    try:
        held, run_id = _settled_at_the_look(ledger, sweeper, monkeypatch)
        control = RunControl()
        control.progress = Progress(total=0)  # all three were held when the run counted
        batches = _claims(ledger, run_id, ("pending",), Limits(lease_s=30), control)
        claimed = [target.id async for batch in batches for target in batch]
        assert sorted(claimed) == sorted(held)
        assert control.progress.total == 3  # the progress bar never shows 3 done of 0
    finally:
        sweeper.close()
        ledger.close()


async def test_a_worker_that_counted_nobody_counts_again_after_its_look(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same moment at a worker's start: it counted nobody to send to (a dead worker
    held them all), then the people were let go before it looked at other workers. It
    counts again and sends them, instead of ending with them pending."""
    ledger = Ledger.on_postgres(pg_url, "t")
    sweeper = ledger.reopen()
    try:
        _, run_id = _settled_at_the_look(ledger, sweeper, monkeypatch)
        progress = Progress(total=ledger.count_targets(("pending",)))
        assert progress.total == 0
        assert not await _nobody_to_send(ledger, run_id, ("pending",), progress)
        assert progress.total == 3
    finally:
        sweeper.close()
        ledger.close()
