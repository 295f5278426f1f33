"""The ledger: one SQLite database per campaign, the single source of truth.

Tables:
    meta        campaign facts (id, job, input columns)
    recipients  one per recipient key: payload, state, attempts, last answer
    attempts    one per HTTP request: when, outcome
    rows        the latest input, row by row: cells, and ok / invalid / duplicate
    runs        one per command that ran: when, how it ended

Recipient states: pending -> inflight -> sent | failed | unknown | pending (retry later).
A recipient is `inflight` only while its request is open; the state is committed before
the request leaves (`Ledger.begin_attempts`), so a crash leaves it `inflight`, and the
next start turns it into `unknown` (`Ledger.recover`).

WAL with synchronous=NORMAL: a commit survives the process being killed (it is in the
WAL file), though not a power cut; per-request fsync would cost more than the requests.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LEDGER_FILE = "ledger.sqlite"
SENDABLE = ("pending", "failed")
STATUSES = ("sent", "failed", "unknown", "pending", "invalid", "duplicate")

_ROWS_COLUMNS = """
    row INTEGER PRIMARY KEY,
    cells TEXT NOT NULL,
    status TEXT NOT NULL,
    key TEXT,
    payload TEXT,
    to_phone TEXT,
    error TEXT
"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    to_phone TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    error TEXT,
    sent_at TEXT
);
CREATE TABLE IF NOT EXISTS attempts (
    recipient_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    run_id INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    state TEXT,
    http_status INTEGER,
    error TEXT,
    PRIMARY KEY (recipient_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rows ({ROWS_COLUMNS});
CREATE INDEX IF NOT EXISTS rows_key ON rows (key, row);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    command TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    state TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0
);
""".replace("{ROWS_COLUMNS}", _ROWS_COLUMNS)


@dataclass(frozen=True)
class MappedRow:
    """One input row after mapping: what the ledger stores for it."""

    row: int
    cells: list[str]
    key: str | None = None
    payload: str | None = None  # JSON, ready to send
    to_phone: str | None = None
    error: str | None = None  # set: the row is invalid


@dataclass(frozen=True)
class Target:
    """A recipient to send to, as the dispatcher needs it."""

    id: int
    row: int
    payload: bytes
    attempts: int
    maybe_delivered: bool  # an earlier attempt may have arrived (state was unknown)


@dataclass(frozen=True)
class RunInfo:
    id: int
    command: str
    started_at: float
    finished_at: float | None
    state: str
    requests: int


class Ledger:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def transaction(self) -> _Transaction:
        return _Transaction(self.db)

    # --- meta --------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        found = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def set_meta(self, **values: Any) -> None:
        with self.transaction():
            self.db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v)) for k, v in values.items()],
            )

    # --- runs --------------------------------------------------------------------------

    def recover(self) -> int:
        """Settle what a dead run left: in-flight recipients become `unknown`."""
        with self.transaction():
            cursor = self.db.execute(
                "UPDATE recipients SET state = 'unknown', "
                "error = 'in flight when an earlier run stopped; it may have arrived' "
                "WHERE state = 'inflight'"
            )
            self.db.execute(
                "UPDATE attempts SET state = 'unknown', error = 'run stopped in flight' "
                "WHERE state IS NULL"
            )
            self.db.execute("UPDATE runs SET state = 'crashed' WHERE state = 'running'")
        return cursor.rowcount

    def start_run(self, command: str) -> int:
        with self.transaction():
            cursor = self.db.execute(
                "INSERT INTO runs (command, started_at, state) VALUES (?, ?, 'running')",
                (command, time.time()),
            )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def end_run(self, run_id: int, state: str) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE runs SET state = ?, finished_at = ?, "
                "requests = (SELECT count(*) FROM attempts WHERE run_id = ?) WHERE id = ?",
                (state, time.time(), run_id, run_id),
            )

    def last_run(self, commands: tuple[str, ...] = ("run",)) -> RunInfo | None:
        marks = ",".join("?" * len(commands))
        found = self.db.execute(
            f"SELECT id, command, started_at, finished_at, state, requests FROM runs "
            f"WHERE command IN ({marks}) ORDER BY id DESC LIMIT 1",
            commands,
        ).fetchone()
        return RunInfo(*found) if found else None

    # --- input rows --------------------------------------------------------------------

    def replace_rows(
        self, chunks: Iterable[list[MappedRow]], columns: list[str], fingerprint: str = ""
    ) -> None:
        """Store a new input: rows, duplicates, recipients. All or nothing.

        The rows are written to a staging table in chunks (memory stays flat and the WAL
        small); the swap and the recipient upsert happen in one final transaction.
        A recipient already `sent` keeps its payload: it is never sent again.
        """
        db = self.db
        db.execute("DROP TABLE IF EXISTS rows_new")
        db.execute(f"CREATE TABLE rows_new ({_ROWS_COLUMNS})")
        for chunk in chunks:
            with self.transaction():
                db.executemany(
                    "INSERT INTO rows_new (row, cells, status, key, payload, to_phone, error) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        (
                            r.row,
                            json.dumps(r.cells, ensure_ascii=False),
                            "invalid" if r.error else "ok",
                            r.key,
                            r.payload,
                            r.to_phone,
                            r.error,
                        )
                        for r in chunk
                    ),
                )
        with self.transaction():
            db.execute("DROP TABLE rows")
            db.execute("CREATE INDEX rows_key ON rows_new (key, row)")
            db.execute(
                "UPDATE rows_new SET status = 'duplicate', "
                "error = 'duplicate of row ' || (SELECT min(f.row) FROM rows_new f "
                "  WHERE f.key = rows_new.key AND f.status = 'ok') "
                "WHERE status = 'ok' AND row > (SELECT min(f.row) FROM rows_new f "
                "  WHERE f.key = rows_new.key AND f.status = 'ok')"
            )
            db.execute(
                "INSERT INTO recipients (key, payload, to_phone) "
                "SELECT key, payload, to_phone FROM rows_new WHERE status = 'ok' "
                "ON CONFLICT (key) DO UPDATE SET payload = excluded.payload, "
                "to_phone = excluded.to_phone WHERE recipients.state != 'sent'"
            )
            db.execute("ALTER TABLE rows_new RENAME TO rows")
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [
                    ("columns", json.dumps(columns, ensure_ascii=False)),
                    ("input_fingerprint", json.dumps(fingerprint)),
                ],
            )

    # --- sending -----------------------------------------------------------------------

    def count_targets(self, states: tuple[str, ...]) -> int:
        marks = ",".join("?" * len(states))
        return self.db.execute(
            f"SELECT count(*) FROM rows JOIN recipients r ON r.key = rows.key "
            f"WHERE rows.status = 'ok' AND r.state IN ({marks})",
            states,
        ).fetchone()[0]

    def targets(self, states: tuple[str, ...], batch: int = 1000) -> Iterator[list[Target]]:
        """Recipients in one of `states`, in input order, a batch at a time."""
        marks = ",".join("?" * len(states))
        query = (
            f"SELECT r.id, rows.row, r.payload, r.attempts, r.state FROM rows "
            f"JOIN recipients r ON r.key = rows.key "
            f"WHERE rows.status = 'ok' AND rows.row > ? AND r.state IN ({marks}) "
            f"ORDER BY rows.row LIMIT ?"
        )
        after = 0
        while True:
            found = self.db.execute(query, (after, *states, batch)).fetchall()
            if not found:
                return
            after = found[-1][1]
            yield [
                Target(rid, row, payload.encode(), attempts, state == "unknown")
                for rid, row, payload, attempts, state in found
            ]

    def begin_attempts(self, run_id: int, attempts: list[tuple[int, int]]) -> list[bool]:
        """Mark recipients in flight, one transaction. False: it is already sent (skip)."""
        now = time.time()
        started = []
        with self.transaction():
            for recipient_id, n in attempts:
                cursor = self.db.execute(
                    "UPDATE recipients SET state = 'inflight', attempts = ? "
                    "WHERE id = ? AND state != 'sent'",
                    (n, recipient_id),
                )
                ok = cursor.rowcount == 1
                if ok:
                    self.db.execute(
                        "INSERT OR REPLACE INTO attempts (recipient_id, n, run_id, started_at) "
                        "VALUES (?, ?, ?, ?)",
                        (recipient_id, n, run_id, now),
                    )
                started.append(ok)
        return started

    def finish_attempts(self, outcomes: list[Outcome]) -> None:
        now = time.time()
        with self.transaction():
            self.db.executemany(
                "UPDATE recipients SET state = ?, http_status = ?, error = ?, "
                "sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END WHERE id = ?",
                [
                    (o.state, o.http_status, o.error, o.state, o.sent_at, o.recipient_id)
                    for o in outcomes
                ],
            )
            self.db.executemany(
                "UPDATE attempts SET finished_at = ?, state = ?, http_status = ?, error = ? "
                "WHERE recipient_id = ? AND n = ?",
                [(now, o.state, o.http_status, o.error, o.recipient_id, o.n) for o in outcomes],
            )

    # --- report ------------------------------------------------------------------------

    def report_rows(self) -> Iterator[tuple[str, ...]]:
        """(cells JSON, _row, _status, _to_phone, _attempts, _http_status, _error, _sent_at),
        every value as text, in input order."""
        return self.db.execute(
            "SELECT rows.cells, CAST(rows.row AS TEXT), "
            "CASE WHEN rows.status != 'ok' THEN rows.status "
            "     WHEN r.state = 'inflight' THEN 'unknown' ELSE r.state END, "
            "coalesce(r.to_phone, rows.to_phone, ''), "
            "CASE WHEN rows.status = 'ok' THEN CAST(r.attempts AS TEXT) ELSE '' END, "
            "coalesce(CASE WHEN rows.status = 'ok' THEN CAST(r.http_status AS TEXT) END, ''), "
            "coalesce(CASE WHEN rows.status = 'ok' THEN r.error ELSE rows.error END, ''), "
            "coalesce(CASE WHEN rows.status = 'ok' THEN r.sent_at END, '') "
            "FROM rows LEFT JOIN recipients r ON r.key = rows.key AND rows.status = 'ok' "
            "ORDER BY rows.row"
        )

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for status, n in self.db.execute(
            "SELECT CASE WHEN rows.status != 'ok' THEN rows.status "
            "WHEN r.state = 'inflight' THEN 'unknown' ELSE r.state END, count(*) "
            "FROM rows LEFT JOIN recipients r ON r.key = rows.key AND rows.status = 'ok' "
            "GROUP BY 1"
        ):
            counts[status] = n
        return counts

    def total_requests(self) -> int:
        """Requests ever made for this campaign, whoever is in the input now."""
        return self.db.execute("SELECT count(*) FROM attempts").fetchone()[0]

    def total_attempts(self) -> int:
        return self.db.execute(
            "SELECT count(*) FROM attempts a JOIN recipients r ON r.id = a.recipient_id "
            "JOIN rows ON rows.key = r.key AND rows.status = 'ok'"
        ).fetchone()[0]


@dataclass(frozen=True)
class Outcome:
    recipient_id: int
    n: int
    state: str
    http_status: int | None
    error: str | None
    sent_at: str | None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if kind is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
