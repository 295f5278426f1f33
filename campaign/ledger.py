"""The ledger: one SQLite database per campaign, the single source of truth.

Tables:
    meta        campaign facts (id, job, origin, mapping, input columns, report stamp)
    recipients  one per recipient key: payload, state, attempts, last answer, last row
    attempts    one per HTTP request: when, outcome
    rows        the latest input, row by row: cells, and ok / invalid / duplicate
    runs        one per command that ran: when, how it ended

Recipient states: pending -> inflight -> sent | failed | unknown | pending (retry later).
A recipient is `inflight` only while its request is open; the state is committed before
the request leaves (`Ledger.begin_attempts`), so a crash leaves it `inflight`, and the
next start turns it into `unknown` (`Ledger.recover`).

Durability: WAL with synchronous=FULL, so every commit is fsynced before it returns and
an in-flight record survives a power cut, not only a killed process. The dispatcher
batches the attempts that start together into one commit (one fsync).

Every committed change bumps `meta.generation`; a report stamped with the generation it
was written at is known to be current (`report.report_is_current`).
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
STATUSES = ("sent", "failed", "unknown", "pending", "invalid", "duplicate", "suppressed")
SCHEMA_VERSION = 2
# States in which a request may have reached the API: such a person stays in every report.
MAYBE_REACHED = ("sent", "unknown", "inflight")

LedgerError = sqlite3.Error

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
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', '0');
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    to_phone TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    error TEXT,
    sent_at TEXT,
    row INTEGER
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

# The results: one line per input row in input order (`row_results`), then the people who
# may have been reached but are in no row of the current input (`gone_results`; invariant
# 4: once sent, always shown). A row shows its person's state when it is a sendable row,
# or when its person was reached before the row became unusable, or was sent before its
# number went on the suppression list. The report and the counts read the same views.
_RESULTS_VIEWS = (
    f"""
CREATE TEMP VIEW IF NOT EXISTS row_results AS
SELECT rows.row AS row, rows.cells AS cells,
    CASE WHEN p.id IS NULL THEN rows.status
         WHEN p.state = 'inflight' THEN 'unknown' ELSE p.state END AS status,
    coalesce(p.to_phone, rows.to_phone) AS to_phone,
    p.attempts AS attempts, p.http_status AS http_status,
    CASE WHEN p.id IS NULL THEN rows.error
         WHEN rows.status = 'invalid'
         THEN coalesce(CASE p.state WHEN 'sent' THEN 'sent earlier' ELSE p.error END, '')
              || '; the row now: ' || rows.error
         WHEN rows.status = 'suppressed' THEN 'sent earlier; now ' || rows.error
         ELSE p.error END AS error,
    p.sent_at AS sent_at
FROM rows LEFT JOIN recipients p ON p.key = rows.key AND (
    rows.status = 'ok' OR (rows.status = 'invalid' AND p.state IN {MAYBE_REACHED})
    OR (rows.status = 'suppressed' AND p.state = 'sent'))
""",
    f"""
CREATE TEMP VIEW IF NOT EXISTS gone_results AS
SELECT p.row AS was_row, CASE p.state WHEN 'inflight' THEN 'unknown' ELSE p.state END AS status,
    p.to_phone AS to_phone, p.attempts AS attempts, p.http_status AS http_status,
    'not in the current input' || coalesce(' (was row ' || p.row || ')', '')
        || coalesce('; ' || p.error, '') AS error,
    p.sent_at AS sent_at
FROM recipients p
WHERE p.state IN {MAYBE_REACHED} AND NOT EXISTS (SELECT 1 FROM rows WHERE rows.key = p.key)
""",
    """
CREATE TEMP VIEW IF NOT EXISTS results AS
SELECT status FROM row_results UNION ALL SELECT status FROM gone_results
""",
)
_DROP_RESULTS_VIEWS = tuple(
    f"DROP VIEW IF EXISTS temp.{name}" for name in ("results", "row_results", "gone_results")
)


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
    to_phone: str | None = None  # for the checks right before sending (suppression, window)


@dataclass(frozen=True)
class RunInfo:
    id: int
    command: str
    started_at: float
    finished_at: float | None
    state: str
    requests: int


class Ledger:
    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly:
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA busy_timeout=5000")
            if not readonly:
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self._migrate()
            for create in _RESULTS_VIEWS:
                self.db.execute(create)
        except sqlite3.Error:
            self.db.close()
            raise

    @classmethod
    def reader(cls, path: Path | str) -> Ledger:
        """A read-only connection: for looking at a campaign another process may own. A
        ledger of an older schema is upgraded first (a short write, like any other)."""
        if not Path(path).is_file():
            raise sqlite3.OperationalError(f"{path}: no ledger")
        ledger = cls(path, readonly=True)
        if ledger._version() >= SCHEMA_VERSION:
            return ledger
        ledger.close()
        return cls(path)

    def _version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        """Create the schema, or upgrade a ledger written by an older version in place."""
        if self._version() >= SCHEMA_VERSION:
            return
        self.db.executescript(_SCHEMA)
        with self.transaction(changes=False):
            if self._version() >= SCHEMA_VERSION:
                return  # another process upgraded it meanwhile
            columns = {c[1] for c in self.db.execute("PRAGMA table_info(recipients)")}
            if "row" not in columns:  # version 1
                self.db.execute("ALTER TABLE recipients ADD COLUMN row INTEGER")
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def transaction(self, changes: bool = True) -> _Transaction:
        """BEGIN IMMEDIATE ... COMMIT; `changes`: the report may change (bump generation)."""
        return _Transaction(self.db, changes)

    # --- meta --------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        found = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def all_meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: Any) -> None:
        self._set_meta(values, changes=True)

    def set_report_stamp(self, stamp: Any) -> None:
        """Recording what the report shows changes nothing the report shows."""
        self._set_meta({"report_stamp": stamp}, changes=False)

    def _set_meta(self, values: dict[str, Any], changes: bool) -> None:
        with self.transaction(changes):
            self.db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v, ensure_ascii=False)) for k, v in values.items()],
            )

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

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
            with self.transaction(changes=False):
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
            for drop in _DROP_RESULTS_VIEWS:
                db.execute(drop)
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
                "INSERT INTO recipients (key, payload, to_phone, row) "
                "SELECT key, payload, to_phone, row FROM rows_new WHERE status = 'ok' "
                "ON CONFLICT (key) DO UPDATE SET row = excluded.row, "
                "payload = CASE WHEN state = 'sent' THEN payload ELSE excluded.payload END, "
                "to_phone = CASE WHEN state = 'sent' THEN to_phone ELSE excluded.to_phone END"
            )
            db.execute("ALTER TABLE rows_new RENAME TO rows")
            for create in _RESULTS_VIEWS:
                db.execute(create)
            db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [
                    ("columns", json.dumps(columns, ensure_ascii=False)),
                    ("input_fingerprint", json.dumps(fingerprint)),
                ],
            )

    def has_rows(self) -> bool:
        return self.db.execute("SELECT 1 FROM rows LIMIT 1").fetchone() is not None

    def rows_with_status(
        self, status: str, offset: int = 0, limit: int = 50
    ) -> tuple[int, list[tuple[int, str, list[str]]]]:
        """(how many, a page of (row, reason, cells)) of the input's rows with `status`
        (invalid, duplicate) as the input gave it."""
        total = self.db.execute("SELECT count(*) FROM rows WHERE status = ?", (status,))
        found = self.db.execute(
            "SELECT row, error, cells FROM rows WHERE status = ? ORDER BY row LIMIT ? OFFSET ?",
            (status, limit, offset),
        )
        return total.fetchone()[0], [(r, e, json.loads(c)) for r, e, c in found]

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
            f"SELECT r.id, rows.row, r.payload, r.attempts, r.state, r.to_phone FROM rows "
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
                Target(rid, row, payload.encode(), attempts, state == "unknown", to_phone)
                for rid, row, payload, attempts, state, to_phone in found
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

    def hold(self, holds: list[tuple[int, str | None, str]]) -> None:
        """Recipients whose request did not leave (suppressed, outside their send window,
        deadline passed): (id, new state or None to keep it, error). A recipient already
        sent stays sent."""
        with self.transaction():
            self.db.executemany(
                "UPDATE recipients SET state = coalesce(?, state), error = ? "
                "WHERE id = ? AND state NOT IN ('sent', 'inflight')",
                [(state, error, recipient_id) for recipient_id, state, error in holds],
            )

    def note_pending(self, error: str) -> int:
        """Say why the pending people of the input were not sent (e.g. the deadline)."""
        with self.transaction():
            return self.db.execute(
                "UPDATE recipients SET error = ? WHERE state = 'pending' "
                "AND key IN (SELECT key FROM rows WHERE status = 'ok')",
                (error,),
            ).rowcount

    # --- suppression (the list itself lives in `suppression.py`) -----------------------

    def phone_rows(self, batch: int = 5000) -> Iterator[list[tuple[int, str, str, str | None]]]:
        """(row, E.164 number, status, error) of the input's rows that are sendable or
        suppressed."""
        after = 0
        while True:
            found = self.db.execute(
                "SELECT row, to_phone, status, error FROM rows WHERE row > ? "
                "AND to_phone IS NOT NULL AND status IN ('ok', 'suppressed') "
                "ORDER BY row LIMIT ?",
                (after, batch),
            ).fetchall()
            if not found:
                return
            after = found[-1][0]
            yield found

    def set_suppressed(self, marks: list[tuple[int, str]], cleared: list[int]) -> None:
        """Rows whose number is on the suppression list (row, why), and rows whose number
        came off it (sendable again, and so is their person, if a run had held them)."""
        held = self.db.execute(
            "SELECT 1 FROM recipients WHERE state = 'suppressed' "
            "AND key IN (SELECT key FROM rows WHERE status = 'ok') LIMIT 1"
        ).fetchone()
        if not (marks or cleared or held):
            return  # nothing changes: the report stays current
        with self.transaction():
            self.db.executemany(
                "UPDATE rows SET status = 'suppressed', error = ? WHERE row = ?",
                [(error, row) for row, error in marks],
            )
            self.db.executemany(
                "UPDATE rows SET status = 'ok', error = NULL WHERE row = ?",
                [(row,) for row in cleared],
            )
            self.db.execute(
                "UPDATE recipients SET state = 'pending', error = NULL WHERE state = 'suppressed' "
                "AND key IN (SELECT key FROM rows WHERE status = 'ok')"
            )

    # --- report ------------------------------------------------------------------------

    def report_rows(self) -> Iterator[tuple[Any, ...]]:
        """(cells JSON or None, _row, _status, _to_phone, _attempts, _http_status, _error,
        _sent_at), every result as text: the input's rows in order, then the people who
        may have been reached but are in no row of it (cells None, _row empty)."""
        results = (
            "coalesce(to_phone, ''), coalesce(CAST(attempts AS TEXT), ''), "
            "coalesce(CAST(http_status AS TEXT), ''), coalesce(error, ''), "
            "coalesce(sent_at, '')"
        )
        yield from self.db.execute(
            f"SELECT cells, CAST(row AS TEXT), status, {results} FROM row_results ORDER BY row"
        )
        yield from self.db.execute(
            f"SELECT NULL, '', status, {results} FROM gone_results ORDER BY was_row"
        )

    def counts(self) -> dict[str, int]:
        """Lines of the report per status."""
        counts = dict.fromkeys(STATUSES, 0)
        counts.update(self.db.execute("SELECT status, count(*) FROM results GROUP BY status"))
        return counts

    def total_requests(self) -> int:
        """Requests ever made for this campaign, whoever is in the input now."""
        return self.db.execute("SELECT count(*) FROM attempts").fetchone()[0]


@dataclass(frozen=True)
class Outcome:
    recipient_id: int
    n: int
    state: str
    http_status: int | None
    error: str | None
    sent_at: str | None


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error (the connection is in autocommit).
    A transaction that may change the report also bumps `meta.generation`."""

    def __init__(self, db: sqlite3.Connection, changes: bool) -> None:
        self.db = db
        self.changes = changes

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if kind is not None:
            # SQLite has already rolled back after some errors (a full disk): a second
            # ROLLBACK would fail and hide the first error.
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            return
        if self.changes:
            self.db.execute(
                "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) "
                "WHERE key = 'generation'"
            )
        self.db.execute("COMMIT")
