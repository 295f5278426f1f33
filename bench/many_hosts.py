"""The PostgreSQL store in `make bench`: what one worker costs against SQLite, what three
workers send together, and whether their shared rate stays exact.

Each measure starts its own sandbox and uses one PostgreSQL server for the whole bench
(started like the tests' one: tests/helpers/pg_server.py), a fresh database per run. On 2 cores
three workers do not scale; the point is the cost per person and the exact shared rate.
"""

from __future__ import annotations

import contextlib
import secrets
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from bench.tools import (
    campaign_command,
    fresh,
    max_in_window,
    rate_of,
    run_campaign,
    start_sandbox,
    write_job,
    write_people,
)
from tests.helpers.pg_server import PgServer, remove_server, start_server

if TYPE_CHECKING:
    from bench.tools import Result

PG_ROWS = 10_000
WORKERS = 3
CONCURRENCY = 100
NO_LIMIT = 1_000_000


@contextlib.contextmanager
def postgres() -> Iterator[PgServer]:
    server = start_server()
    try:
        yield server
    finally:
        remove_server(server)


def fresh_database(server: PgServer) -> str:
    name = f"bench_{secrets.token_hex(4)}"
    with psycopg.connect(server.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    return server.url(name)


def run_workers(job: Path, n: int) -> list[int]:
    """`n` workers started together; their output goes to files beside the job."""
    command = [*campaign_command(), "run", str(job), "--no-progress", "--log-format", "json"]
    with contextlib.ExitStack() as files:
        processes = []
        for i in range(n):
            out = files.enter_context((job.parent / f"worker-{i}.txt").open("w"))
            processes.append(
                subprocess.Popen(command, cwd=job.parent, stdout=out, stderr=subprocess.STDOUT)
            )
        return [p.wait(timeout=3600) for p in processes]


def postgres_vs_sqlite(
    work: Path, server: PgServer, rows: int = PG_ROWS, rounds: int = 3
) -> Result:
    """One worker on PostgreSQL vs one on SQLite: the same sandbox and job, interleaved
    rounds; the rate at the server while sending (arrivals), median of the rounds."""
    from bench.tools import Result

    directory = fresh(work / "pg-vs-sqlite")
    box = start_sandbox(directory)
    data = write_people(directory / "people.csv", rows)
    rates: dict[str, list[float]] = {"sqlite": [], "postgresql": []}
    try:
        for i in range(rounds):
            for kind in ["sqlite", "postgresql"] if i % 2 == 0 else ["postgresql", "sqlite"]:
                place = fresh(directory / f"{kind}-{i}")
                ledger = fresh_database(server) if kind == "postgresql" else None
                start = box.record_size()
                job = write_job(place, box.url, data, NO_LIMIT, CONCURRENCY, ledger=ledger)
                done = run_campaign(job)
                lines = box.arrivals(start, box.record_size())
                if done.code != 0 or len(lines) != rows:
                    raise RuntimeError(f"{kind}: exit {done.code}, {len(lines)} of {rows} sent")
                rates[kind].append(rate_of([line["t"] for line in lines]))
    finally:
        box.stop()
    # Time per person on PostgreSQL over time per person on SQLite.
    cost = statistics.median(
        s / p for s, p in zip(rates["sqlite"], rates["postgresql"], strict=True)
    )
    median = {kind: statistics.median(values) for kind, values in rates.items()}
    return Result(
        f"one worker on PostgreSQL vs SQLite, concurrency {CONCURRENCY}, no rate limit",
        "time per person on PostgreSQL <= 1.5 x SQLite's (median of interleaved rounds)",
        f"{cost:.2f} x ({median['postgresql']:.0f}/s vs {median['sqlite']:.0f}/s)",
        cost <= 1.5,
        {
            "rows": rows,
            "sqlite_per_s": [round(r) for r in rates["sqlite"]],
            "postgresql_per_s": [round(r) for r in rates["postgresql"]],
            "cost": round(cost, 3),
        },
    )


def three_workers(work: Path, server: PgServer, rows: int = PG_ROWS * 3) -> Result:
    """Three workers on one PostgreSQL campaign at no rate limit: their aggregate rate at
    the server, against one worker alone on the same database."""
    from bench.tools import Result

    directory = fresh(work / "three-workers")
    box = start_sandbox(directory)
    data = write_people(directory / "people.csv", rows)
    try:
        found = {}
        for n in (1, WORKERS):
            place = fresh(directory / f"workers-{n}")
            job = write_job(
                place, box.url, data, NO_LIMIT, CONCURRENCY, ledger=fresh_database(server)
            )
            start = box.record_size()
            codes = run_workers(job, n)
            lines = box.arrivals(start, box.record_size())
            phones = {line["body"]["to_phone"] for line in lines}
            if set(codes) != {0} or len(lines) != rows or len(phones) != rows:
                raise RuntimeError(f"{n} workers: exits {codes}, {len(lines)} requests")
            found[n] = rate_of([line["t"] for line in lines])
    finally:
        box.stop()
    return Result(
        f"{WORKERS} workers on one PostgreSQL campaign, no rate limit, {rows} people",
        "each person once; the aggregate rate (2 cores: no scaling expected)",
        f"{found[WORKERS]:.0f}/s together vs {found[1]:.0f}/s for one "
        f"({found[WORKERS] / found[1]:.2f} x); each person once",
        True,
        {"rows": rows, "one_per_s": round(found[1]), "three_per_s": round(found[WORKERS])},
    )


def shared_rate(work: Path, server: PgServer, rate: int, seconds: float = 8) -> Result:
    """Three workers at `rate` on one PostgreSQL campaign: arrivals at the server."""
    from bench.tools import Result

    rows = int(rate * seconds)
    directory = fresh(work / f"shared-rate-{rate}")
    box = start_sandbox(directory)
    try:
        data = write_people(directory / "people.csv", rows)
        job = write_job(directory, box.url, data, rate, 20, ledger=fresh_database(server))
        codes = run_workers(job, WORKERS)
        times = sorted(line["t"] for line in box.arrivals())
    finally:
        box.stop()
    fullest = max_in_window(times)
    # While all three send: the first second has the others joining, the last one
    # workers running out of people with slots of the budget still theirs.
    achieved = rate_of(times[rate:-rate])
    ok = set(codes) == {0} and len(times) == rows and fullest <= rate and achieved >= 0.95 * rate
    return Result(
        f"exact shared rate, {WORKERS} workers on PostgreSQL, N={rate}/s",
        f"max in any 1 s window <= {rate}; achieved >= {0.95 * rate:g}/s",
        f"max {fullest} in 1 s; achieved {achieved:.2f}/s ({achieved / rate:.3f} N)",
        ok,
        {"rows": rows, "exits": codes, "max_in_1s": fullest, "achieved_per_s": round(achieved, 3)},
    )


def measures(work: Path) -> list[Result]:
    with postgres() as server:
        return [
            postgres_vs_sqlite(work, server),
            three_workers(work, server),
            shared_rate(work, server, 50),
            shared_rate(work, server, 200),
        ]
