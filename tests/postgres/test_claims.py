"""Claims on PostgreSQL: workers claiming at once share every person once, and a run halted
while it claims ends cleanly."""

from __future__ import annotations

import asyncio
import gc
import signal
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from campaign.store.db import schema_name
from tests.helpers import (
    cli,
    spawn_cli,
    start_sandbox,
    write_job,
)
from tests.helpers.pg import ledger_states, lock_waiters, rerun_sends_the_rest
from tests.helpers.runs import people, people_job, wait_for


async def test_a_prefetched_batch_that_failed_is_not_printed_as_a_lost_task_error() -> None:
    """The feed asks for the next batch while workers still have targets; the ledger dies
    (the request for that batch fails) and the run halts before anyone takes it. The
    failure is the workers' to report (one line, exit 1 or 3): it must not also reach
    stderr as asyncio's "Task exception was never retrieved" with a traceback, which
    `test_postgres_stopped_mid_run_stops_the_workers_cleanly_and_a_rerun_continues` hit."""
    from campaign.dispatch import _Feed
    from campaign.records import Target

    async def batches() -> Any:
        yield [Target(i, i, b"{}", 0, False) for i in range(1, 4)]
        raise RuntimeError("the ledger is gone")

    lost: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: lost.append(context))
    feed = _Feed(batches(), low=8)
    first = await feed.next()  # three left, fewer than `low`: the next batch is asked for
    assert first is not None and first.id == 1
    await asyncio.sleep(0.05)  # meanwhile the request for it fails
    await feed.close()  # the run halted with targets left
    del feed
    gc.collect()
    await asyncio.sleep(0)
    assert lost == []


@pytest.mark.timeout(240)
def test_six_claimers_at_once_share_every_person_once_in_batches(
    tmp_path: Path, pg_url: str
) -> None:
    """Six connections claim the same campaign at once, each in a loop like `_claims`
    (from the top again once it finds nobody after its last row): no person is claimed
    twice, no claim returns more than its batch, and nobody is left unclaimed."""
    from campaign.store.ledger import Ledger

    rows, batch = 3000, 37
    job = write_job(
        tmp_path, "http://127.0.0.1:9", input=people(tmp_path / "in.csv", rows), ledger=pg_url
    )
    checked = cli("validate", str(job))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    start = threading.Barrier(6)
    claimed: list[list[int]] = [[] for _ in range(6)]
    sizes: list[int] = []
    failures: list[BaseException] = []

    def claimer(i: int) -> None:
        try:
            ledger = Ledger.on_postgres(pg_url, "test")
            run = ledger.start_run("run")
            start.wait()
            after = 0
            while True:
                found = ledger.claim(run, ("pending", "failed"), after, batch)
                sizes.append(len(found))
                if found:
                    claimed[i].extend(t.id for t in found)
                    after = found[-1].row
                elif after:
                    after = 0
                else:
                    break
            ledger.close()
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert failures == []
    every = [rid for ids in claimed for rid in ids]
    assert len(every) == len(set(every)) == rows
    assert max(sizes) <= batch
    assert sum(1 for ids in claimed if ids) >= 2


@pytest.mark.timeout(240)
def test_sigint_while_the_next_batch_is_being_claimed(tmp_path: Path, pg_url: str) -> None:
    """The next claim waits (the input's table is locked here) while the workers send the
    last of their batch; SIGINT then: 130 once the claim has returned, no traceback, the
    people that claim took go back to the pool, and a rerun sends each person once."""
    rows, rate = 200, 100  # two claims of a batch each
    box = start_sandbox(tmp_path, "--latency-ms", "5")
    try:
        job = people_job(
            tmp_path, box.url, rows, ledger=pg_url, concurrency=4, rate_per_second=rate
        )
        run = spawn_cli("run", str(job), "--no-progress")
        wait_for(lambda: len(box.records()) >= 10, what="the first batch")
        locker = psycopg.connect(pg_url)
        try:
            locker.execute(f'LOCK TABLE "{schema_name("test")}".rows IN ACCESS EXCLUSIVE MODE')
            wait_for(lambda: lock_waiters(pg_url, "WITH picked%") != [], what="a claim")
            wait_for(lambda: len(box.records()) >= rate, what="the batch sent")
            run.send_signal(signal.SIGINT)
        finally:
            locker.close()
        out, err = run.communicate(timeout=60)
        assert run.returncode == 130, out + err
        assert "Traceback" not in err and "Task exception" not in err, err
        assert len(box.records()) == rate
        assert ledger_states(pg_url) == {"sent": rate, "pending": rows - rate}
        rerun_sends_the_rest(box, tmp_path, job, rows)
    finally:
        box.stop()
