"""The shared rate budget on a real PostgreSQL (tests/helpers/pg_server.py): grants from many
connections never overlap and are never in the past when granted, idle time is not saved
up, the channel is stored hashed, errors name the URL without its password, and three
processes sending to one sandbox keep to N together."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from campaign.errors import StoreFailed, StoreUnavailable
from campaign.rate import SharedRateLimiter
from campaign.store.budget import RateBudget, channel_key
from campaign.store.postgres import safe_url
from tests.helpers import CHANNEL, ROOT, start_sandbox
from tests.helpers.pg_server import READ_ONLY, PgServer, free_port
from tests.helpers.rates import achieved, max_in_window

SEND_URL = f"http://127.0.0.1:1/sms/{CHANNEL}/send.json"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://campaign:s3cr%40t@db.example:5432/ledger",
            "postgresql://campaign@db.example:5432/ledger",
        ),
        ("postgres://u:p@h/d?sslmode=require&password=q", "postgres://u@h/d?sslmode=require"),
        ("postgresql://h/d", "postgresql://h/d"),
        ("postgresql://u@h/d", "postgresql://u@h/d"),
        ("host=h password='a b' dbname=d", "host=h dbname=d"),
    ],
)
def test_safe_url_drops_the_password(url: str, shown: str) -> None:
    assert safe_url(url) == shown


async def test_grants_from_many_connections_never_overlap(pg_url: str) -> None:
    interval = 0.001
    budgets = [await RateBudget.connect(pg_url, SEND_URL) for _ in range(4)]
    try:

        async def grants(budget: RateBudget) -> list[tuple[float, float]]:
            spans = []
            # A reading of the budget's clock from before the next grant was asked for.
            before = (await budget.grant(0, interval)).now
            for n in itertools.islice(itertools.cycle([1, 3, 7]), 30):
                granted = await budget.grant(n, interval)
                start = granted.tat - n * interval
                # Never in the past when granted: the slots start no earlier than the clock
                # as the grant ran, so no earlier than a reading taken before it. (The
                # answer's `now` is read again as the statement returns, after tat was
                # set: on a loaded server it may be later than tat, which is fine; it only
                # has to lie between asking and answering, see rate.SharedRateLimiter.)
                assert start >= before - 1e-9, (start, before)
                spans.append((start, granted.tat))
                before = granted.now
            return spans

        spans = sorted(s for b in await asyncio.gather(*map(grants, budgets)) for s in b)
    finally:
        for budget in budgets:
            await budget.close()
    assert len(spans) == 4 * 30
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 1e-9


async def test_after_idle_time_a_grant_starts_at_the_clock(pg_url: str) -> None:
    """Once the budget's clock has passed the end of every slot granted, the next grant
    starts at the clock: idle time is not saved up for a burst, and a slot is never in
    the past when it is granted."""
    interval = 0.001
    with psycopg.connect(pg_url, autocommit=True) as db:

        def clock() -> float:
            found = db.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            return float(found.fetchall()[0][0])

        async with await RateBudget.connect(pg_url, SEND_URL) as budget:
            first = await budget.grant(1, interval)
            while (before := clock()) <= first.tat:
                await asyncio.sleep(first.tat - before)
            second = await budget.grant(3, interval)
    start = second.tat - 3 * interval
    assert start >= first.tat
    assert start >= before, (start, before)


async def test_the_channel_is_stored_hashed_and_the_schema_versioned(pg_url: str) -> None:
    async with await RateBudget.connect(pg_url, SEND_URL) as budget:
        await budget.grant(1, 0.01)
    with psycopg.connect(pg_url) as conn:
        rows = conn.execute("SELECT channel FROM campaign_shared.rate_budgets").fetchall()
        versions = conn.execute("SELECT component, version FROM campaign_shared.versions")
        assert dict(versions.fetchall()) == {"rate_budgets": 1}
    assert rows == [(channel_key(SEND_URL),)]
    assert CHANNEL not in rows[0][0]


async def test_a_refused_connection_names_the_url_without_its_password(
    pg_server: PgServer,
) -> None:
    url = f"postgresql://campaign:{pg_server.passwords['campaign']}@127.0.0.1:{free_port()}/x"
    with pytest.raises(StoreUnavailable) as caught:
        await RateBudget.connect(url, SEND_URL)
    message = str(caught.value)
    assert message.startswith(f"PostgreSQL at {safe_url(url)}: ")
    assert "refused" in message
    assert pg_server.passwords["campaign"] not in message


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://campaign:hunter2@127.0.0.1:99999/x",  # no such port
        "postgresql://campaign:hunter2@127.0.0.1:5432/x?nonsense=1",  # no such option
        "http://campaign:hunter2@127.0.0.1/x",  # not a PostgreSQL URL
    ],
)
async def test_a_bad_url_is_one_clear_line_without_the_password(url: str) -> None:
    with pytest.raises(StoreUnavailable) as caught:
        await RateBudget.connect(url, SEND_URL)
    message = str(caught.value)
    assert message.startswith("PostgreSQL at ") and "\n" not in message
    assert "hunter2" not in message


async def test_wrong_credentials_and_missing_rights_say_so(
    pg_server: PgServer, pg_url: str
) -> None:
    wrong = pg_url.replace(pg_server.passwords["campaign"], "wrong")
    with pytest.raises(StoreUnavailable, match="password authentication failed"):
        await RateBudget.connect(wrong, SEND_URL)
    dbname = pg_url.rsplit("/", 1)[1]
    read_only = pg_server.url(dbname, user=READ_ONLY)
    with pytest.raises(StoreUnavailable) as caught:
        await RateBudget.connect(read_only, SEND_URL)
    message = str(caught.value)
    assert f"role {READ_ONLY} may not create" in message and "campaign_shared" in message
    assert message.startswith(f"PostgreSQL at {safe_url(read_only)}: ")
    assert pg_server.passwords[READ_ONLY] not in message


async def test_a_server_gone_mid_run_is_a_clear_error(pg_server: PgServer, pg_url: str) -> None:
    async with await RateBudget.connect(pg_url, SEND_URL) as budget:
        limiter = SharedRateLimiter(50, budget.grant)
        await limiter.acquire()
        pg_server.stop_immediate()
        try:
            with pytest.raises(StoreFailed) as caught:
                for _ in range(20):  # the prefetched batch runs out, then the grant fails
                    await limiter.acquire()
        finally:
            pg_server.start()
        await limiter.aclose()
    assert str(caught.value).startswith(f"PostgreSQL at {safe_url(pg_url)}: ")


@pytest.mark.exact_rate
@pytest.mark.parametrize("rate", [50, 200])
def test_three_processes_share_one_rate_at_the_sandbox(
    tmp_path: Path, pg_url: str, rate: int
) -> None:
    sandbox = start_sandbox(tmp_path)
    send_url = f"{sandbox.url}/sms/{CHANNEL}/send.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.rate_worker",
                pg_url,
                send_url,
                str(rate),
                "4",
                "8",
                str(i * 100_000),
            ],
            env=env,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(3)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n", (
                worker.communicate(timeout=30)[1]
            )
        for worker in workers:  # all at once: each one alone could use the whole rate
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=60) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        sandbox.stop()
    assert [worker.returncode for worker in workers] == [0, 0, 0], [o[1] for o in outputs]
    counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    arrivals = [record["t"] for record in sandbox.records()]
    assert len(arrivals) == sum(c["sent"] for c in counts)
    assert min(c["sent"] for c in counts) > 0  # every process had its share
    # The pace while all three send: each stops at its deadline holding slots of its last
    # grants, which the first and last quarter second may show as a dip.
    steady = sorted(arrivals)[rate // 4 : -(rate // 4)]
    measured = f"max per 1 s {max_in_window(arrivals)}, {achieved(steady):.1f}/s, {counts}"
    assert max_in_window(arrivals) <= rate, measured
    # The budget is used, not held back (grants the processes wait on one another for
    # would show far below N); how close to N it gets is a measure of `make bench`
    # (docs/performance.md): a loaded machine gets less.
    assert achieved(steady) >= 0.6 * rate, measured
