"""Where a page upload is, on a PostgreSQL store: the page server that took it.

An upload is a spreadsheet under one host's `output_dir` until it is validated; from then
on its rows and mapping are in the campaign's ledger and every page server on the
database can send it. Before that, another page server (behind the same address) cannot
even tell the campaign exists, and would answer "no such campaign" to an operator whose
next request happened to reach it. So each upload is noted here with the server that
holds it, and the others can say where it is.

Table `campaign_shared.uploads`, one row per page campaign, its schema version in
`campaign_shared.versions` (component `uploads`, beside store/budget.py's). Blocking:
call it from a thread in async code.
"""

from __future__ import annotations

import time

from campaign.store.db import Database, Transaction
from campaign.store.postgres import schema_lock

SCHEMA = "campaign_shared"
COMPONENT = "uploads"
VERSION = 1

_CREATE = (
    f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.versions ("
    "component TEXT PRIMARY KEY, version INTEGER NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {SCHEMA}.uploads ("
    "campaign TEXT PRIMARY KEY, server TEXT NOT NULL, uploaded_at DOUBLE PRECISION NOT NULL)",
    f"INSERT INTO {SCHEMA}.versions (component, version) VALUES ('{COMPONENT}', {VERSION}) "
    "ON CONFLICT (component) DO NOTHING",
)


def note_upload(url: str, campaign: str, server: str) -> None:
    db = _open(url)
    try:
        db.execute(
            f"INSERT INTO {SCHEMA}.uploads (campaign, server, uploaded_at) VALUES (?, ?, ?) "
            "ON CONFLICT (campaign) DO UPDATE SET server = excluded.server",
            (campaign, server, time.time()),
        )
    finally:
        db.close()


def upload_server(url: str, campaign: str) -> str | None:
    """The page server that took the campaign's upload; None when no page server did."""
    db = _open(url)
    try:
        found = db.execute(
            f"SELECT server FROM {SCHEMA}.uploads WHERE campaign = ?", (campaign,)
        ).fetchone()
        return str(found[0]) if found else None
    finally:
        db.close()


def forget_upload(url: str, campaign: str) -> None:
    db = _open(url)
    try:
        db.execute(f"DELETE FROM {SCHEMA}.uploads WHERE campaign = ?", (campaign,))
    finally:
        db.close()


def _open(url: str) -> Database:
    db = Database.postgresql(url, None)
    try:
        if db.execute(f"SELECT to_regclass('{SCHEMA}.uploads') IS NULL").fetchone()[0]:
            with Transaction(db):
                # Servers starting together: one creates the table, the others wait.
                db.execute(
                    "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (schema_lock(SCHEMA),)
                )
                for statement in _CREATE:
                    db.execute(statement)
    except BaseException:
        db.close()
        raise
    return db
