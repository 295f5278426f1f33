"""Hosts starting together create the store's schemas once, without failing each other."""

from __future__ import annotations

import asyncio
import functools
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from campaign.store import uploads
from campaign.store.budget import RateBudget
from campaign.store.db import Database
from campaign.store.suppression import SuppressionList
from tests.helpers import soak_trials
from tests.helpers.pg_server import PgServer


@pytest.mark.soak
def test_connections_creating_one_schema_at_once_all_succeed(pg_url: str) -> None:
    """CREATE SCHEMA IF NOT EXISTS from several connections at the same moment makes all
    but one fail on PostgreSQL's catalog (a unique violation: a worker exiting 2 beside
    the one that started with it) unless the creation is serialized."""
    for trial in range(soak_trials(5)):
        connect = functools.partial(_connect_and_close, pg_url, f"together_{trial}")
        assert _all_at_once([connect] * 8) == []


def _connect_and_close(url: str, schema: str) -> None:
    Database.postgresql(url, schema).close()


@pytest.mark.soak
def test_the_list_the_rate_budget_and_the_uploads_create_their_schema_together(
    pg_server: PgServer, tmp_path: Path
) -> None:
    """On a database's first use, a run (the suppression list, the rate budget) and a page
    server (its uploads) starting together all create `campaign_shared` and the tables
    they share there: each under the same lock, or one fails on the catalog."""
    for trial in range(soak_trials(5)):
        name = f"first_use_{trial}_{secrets.token_hex(3)}"
        with psycopg.connect(pg_server.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        assert _all_at_once(_first_users(pg_server.url(name), tmp_path)) == []


def _first_users(url: str, tmp_path: Path) -> list[Callable[[], object]]:
    async def budget() -> None:
        await (await RateBudget.connect(url, "http://127.0.0.1:9/sms/x/send.json")).close()

    return [
        lambda: uploads.upload_server(url, "nobody"),
        lambda: asyncio.run(budget()),
        lambda: SuppressionList(tmp_path, url).close(),
    ]


def _all_at_once(creators: list[Callable[[], object]]) -> list[BaseException]:
    """Run `creators` in threads released together; what they raised."""
    start = threading.Barrier(len(creators))
    errors: list[BaseException] = []

    def create(creator: Callable[[], object]) -> None:
        start.wait()
        try:
            creator()
        except BaseException as exc:  # seen by the test, not lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(c,)) for c in creators]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors
