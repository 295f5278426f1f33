"""Hosts starting together create the store's schemas once, without failing each other."""

from __future__ import annotations

import threading

import pytest

from campaign.store.db import Database
from tests.helpers import soak_trials


@pytest.mark.soak
def test_connections_creating_one_schema_at_once_all_succeed(pg_url: str) -> None:
    """CREATE SCHEMA IF NOT EXISTS from several connections at the same moment makes all
    but one fail on PostgreSQL's catalog (a unique violation: a worker exiting 2 beside
    the one that started with it) unless the creation is serialized."""
    for trial in range(soak_trials(5)):
        schema = f"together_{trial}"
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def connect(
            schema: str = schema,
            start: threading.Barrier = start,
            errors: list[BaseException] = errors,
        ) -> None:
            start.wait()
            try:
                Database.postgresql(pg_url, schema).close()
            except BaseException as exc:  # seen by the test, not lost in a thread
                errors.append(exc)

        threads = [threading.Thread(target=connect) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [], errors
