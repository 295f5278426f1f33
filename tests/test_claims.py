"""Claiming the next people costs the same at any size of campaign.

A run claims its people a batch at a time. A claim that looked at every unclaimed person
(and sorted them) made a campaign quadratic: 35 ms a batch at 40,000 people, hours at a
million. The work of a claim is counted in SQLite's virtual machine steps, which depend
on the query plan and the data only, not on the machine's speed.
"""

from __future__ import annotations

import json
from pathlib import Path

from campaign.store.ledger import Ledger, MappedRow

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
