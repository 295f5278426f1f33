"""One rate budget per channel in PostgreSQL, shared by every worker on every host.

The budget is a GCRA: one row per channel holding its theoretical arrival time (tat), the
end of every slot granted so far, on the server's clock (`clock_timestamp()`, the only
clock every host agrees on). Granting n slots is one statement, atomic under the row's
lock: tat = GREATEST(tat, now) + n·interval. The slots are the n intervals just before the
new tat, so two grants never overlap and idle time is never saved up for a burst.
`SharedRateLimiter` (campaign/rate.py) turns them into departures.

A grant is not waited for on disk (synchronous_commit off for the budget's connection):
its round trip is what a slot's conversion to the worker's clock may be off by, and an
fsync would make it milliseconds. Losing the last grants in a crash of the server is
harmless: they reach at most a few batches (tenths of a second) past the server's clock,
so they are over before a restarted server grants again.

The channel is stored as a hash of the Send API address (which holds the channel uuid,
a secret): the table never shows it, and neither does anything logged from here.

Schema `campaign_shared` holds what campaigns share; `campaign_shared.versions` one row per
component with its schema version (this one's is `rate_budgets`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Self

import psycopg

from campaign.errors import StoreUnavailable
from campaign.rate import Granted
from campaign.store import postgres

SCHEMA = "campaign_shared"
COMPONENT = "rate_budgets"
VERSION = 1

_CREATE = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.versions (
    component TEXT PRIMARY KEY,
    version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCHEMA}.rate_budgets (
    channel TEXT PRIMARY KEY,
    tat DOUBLE PRECISION NOT NULL
);
INSERT INTO {SCHEMA}.versions (component, version) VALUES ('{COMPONENT}', {VERSION})
    ON CONFLICT (component) DO NOTHING;
"""

_NOW = "extract(epoch FROM clock_timestamp())::float8"

_GRANT = f"""
INSERT INTO {SCHEMA}.rate_budgets AS b (channel, tat)
    VALUES (%(channel)s, {_NOW} + %(span)s)
ON CONFLICT (channel) DO UPDATE SET tat = GREATEST(b.tat, {_NOW}) + %(span)s
RETURNING tat, {_NOW}
"""


def channel_key(send_url: str) -> str:
    """What the table stores for a channel: a hash of its Send API address."""
    return hashlib.sha256(send_url.encode()).hexdigest()


class RateBudget:
    """One channel's budget over one connection of its own (autocommit, on the loop).

    budget = await RateBudget.connect(url, send_url)  # StoreUnavailable if it cannot
    limiter = SharedRateLimiter(rate, budget.grant)
    ...
    await limiter.aclose(); await budget.close()     # or `async with budget:`
    """

    def __init__(self, conn: psycopg.AsyncConnection[Any], url: str, channel: str) -> None:
        self._conn = conn
        self._url = url
        self._channel = channel

    @classmethod
    async def connect(cls, url: str, send_url: str) -> Self:
        conn = await postgres.connect(url)
        try:
            await _ensure_schema(conn, url)
            await conn.execute("SET synchronous_commit TO off")
        except BaseException:
            await conn.close()
            raise
        return cls(conn, url, channel_key(send_url))

    async def grant(self, n: int, interval: float) -> Granted:
        """n slots `interval` apart, after every slot granted before (StoreFailed if the
        server is gone). n = 0 reads the clock: tat only catches up with it, as any grant
        would do first."""
        try:
            cursor = await self._conn.execute(
                _GRANT, {"channel": self._channel, "span": n * interval}
            )
            row = await cursor.fetchone()
        except psycopg.Error as error:
            raise postgres.failed(self._url, error) from error
        assert row is not None
        return Granted(tat=row[0], now=row[1])

    async def close(self) -> None:
        await self._conn.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def _ensure_schema(conn: psycopg.AsyncConnection[Any], url: str) -> None:
    """Create the tables when missing (one creator at a time), check the version."""
    try:
        found = await _version(conn)
        if found is None:
            async with conn.transaction():
                await conn.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                    (postgres.schema_lock(SCHEMA),),
                )
                await conn.execute(_CREATE)
            found = await _version(conn)
    except psycopg.errors.InsufficientPrivilege as error:
        user = conn.info.user
        raise StoreUnavailable(
            postgres.safe_url(url),
            f"role {user} may not create or use the schema {SCHEMA} "
            f"({' '.join(str(error).split())})",
        ) from error
    except psycopg.Error as error:
        raise postgres.unavailable(url, error) from error
    if found is None or found > VERSION:
        raise StoreUnavailable(
            postgres.safe_url(url),
            f"{SCHEMA}.{COMPONENT} has schema version {found}, made by a newer campaign "
            f"(this one knows {VERSION})",
        )


async def _version(conn: psycopg.AsyncConnection[Any]) -> int | None:
    cursor = await conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL",
        (f"{SCHEMA}.versions", f"{SCHEMA}.rate_budgets"),
    )
    row = await cursor.fetchone()
    if not (row and row[0]):
        return None
    cursor = await conn.execute(
        f"SELECT version FROM {SCHEMA}.versions WHERE component = %s", (COMPONENT,)
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else None
