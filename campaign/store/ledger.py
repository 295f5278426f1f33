"""The ledger: one database per campaign (a SQLite file, or a schema of a PostgreSQL
database), the single source of truth.

Tables:
    meta        campaign facts (id, job, origin, mapping, input columns, report stamp)
    recipients  one per recipient key: payload, state, attempts, last answer, last row
    attempts    one per HTTP request: when, outcome
    rows        the latest input, row by row: cells, and ok / invalid / duplicate
    runs        one per command that ran: when, how it ended; a `run` is a worker, and
                its heartbeat is its lease on the people it claimed
    deliveries  per recipient: what the delivery report says (`campaign reconcile`)
    report_entries, report_windows   the Reporting API's entries as read, and which
                spans of time were read whole (so a killed reconcile continues)
    suppress_candidates  numbers whose delivery error asks for the suppression list

Recipient states: pending -> inflight -> sent | failed | unknown | pending (retry later).
A recipient is `inflight` only while its request is open; the state is committed before
the request leaves (`Ledger.write_batch`), so a crash leaves it `inflight`, and the
next start turns it into `unknown` (`Ledger.recover`).

Claims: a worker (a run) sends only to people it claimed (`Ledger.claim`: a batch at a
time, `FOR UPDATE SKIP LOCKED` on PostgreSQL, so workers sharing a campaign never take
the same person), and a request may leave only while its person is still claimed by it.
A worker whose lease expired (no heartbeat for `lease_s`) loses its claims: its in-flight
people become `unknown`, the others go back to the pool (`Ledger.recover`). On SQLite
there is one worker at a time (the campaign's lock), so every earlier run is over.

Durability: SQLite in WAL with synchronous=FULL, PostgreSQL with its own commit, so every
commit is on disk before it returns and an in-flight record survives a power cut, not
only a killed process. The dispatcher batches the attempts that start together into one
commit (one fsync).

Every committed change to what the report shows (people's states and attempts, the input's
rows, delivery reports, campaign facts) bumps `meta.generation`; a report stamped with the
generation it was written at is known to be current (`report.report_is_current`). A run's
own bookkeeping (registering, its lease, ending, releasing claims) does not: a rerun that
changes nobody leaves the report as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from campaign.errors import UsageError
from campaign.records import (
    MAYBE_REACHED,
    REQUESTED,
    SENDABLE,
    STATUSES,
    MappedRow,
    Outcome,
    RunInfo,
    Target,
)
from campaign.store.db import (
    Database,
    LedgerError,
    Transaction,
    bump_generation,
    schema_name,
)
from campaign.store.deliveries import DeliveryTables
from campaign.store.schema import DROP_RESULTS_VIEWS, LEDGER_SCHEMA, RESULTS_VIEWS, ROWS_COLUMNS

LEDGER_FILE = "ledger.sqlite"
# 6: a claim set aside for a send window is `set_aside`, not negative; an attempt keeps
# the number it went to (`attempts.to_phone`: a person's number may be fixed later).
SCHEMA_VERSION = 6
LEASE_S = 30.0  # a worker without a heartbeat this long is taken for dead
REPORT_TURN_WAIT_S = 60.0  # the longest a report waits for another one being written

__all__ = [
    "MAYBE_REACHED",
    "REQUESTED",
    "SENDABLE",
    "STATUSES",
    "LedgerError",
    "MappedRow",
    "Outcome",
    "RunInfo",
    "Target",
    "Transaction",
]

# The suppression list's version as last applied to the rows (`Ledger.set_suppressed`).
_APPLIED = "suppression_applied"

# An `unknown` recipient is sent again (with --resend-unknown) blind when the campaign's
# delivery reports were never read whole; once they were, only when the report does not
# know them (`not_found`): one the report shows did arrive, or has not settled yet, is held.
_DIED_IN_FLIGHT = "in flight when an earlier run stopped; it may have arrived"

# The run is still a live worker: one that other workers took for dead (its lease expired)
# claims nobody and sends nothing more, even if it goes on running.
_LIVE = "EXISTS (SELECT 1 FROM runs WHERE runs.id = ? AND runs.state = 'running')"
# The same, holding the run's row until the transaction ends (PostgreSQL): a claim stopped
# between this check and its commit cannot be settled as dead meanwhile (the lease sweep
# waits, then gives up and tries again), or it would commit people to a crashed run.
_LIVE_HELD = "EXISTS (SELECT 1 FROM runs WHERE runs.id = ? AND runs.state = 'running' FOR SHARE)"

# An `unknown` person may be sent again (--resend-unknown) blind, before any delivery
# report was read (and none found them ambiguous), or once the report does not know their
# latest request: a `not_found` about an earlier request says nothing of a later one,
# which may have arrived. An `ambiguous` person is never sent again. A report that gave
# entries reconcile could not use (`UNUSABLE_REPORT` in meta) is not "none read": those
# entries may be theirs, so nobody is sent blind until a window reads whole.
UNUSABLE_REPORT = "report_unusable_entries"
_RESENDABLE = f"""(r.state != 'unknown'
    OR (NOT EXISTS (SELECT 1 FROM report_windows WHERE complete = 1)
        AND NOT EXISTS (SELECT 1 FROM meta WHERE key = '{UNUSABLE_REPORT}')
        AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.recipient_id = r.id
                        AND d.status = 'ambiguous'))
    OR EXISTS (SELECT 1 FROM deliveries d WHERE d.recipient_id = r.id
               AND d.status = 'not_found' AND d.request_at >= (SELECT max(a.started_at)
               FROM attempts a WHERE a.recipient_id = r.id)))"""


def _unclaimed(states: tuple[str, ...]) -> str:
    """People to send (`r`, joined to their input row `rows`): in one of `states` (one
    parameter each), held by nobody, and, if `unknown`, resendable (`_RESENDABLE`)."""
    marks = ",".join("?" * len(states))
    return f"rows.status = 'ok' AND r.state IN ({marks}) AND r.claim IS NULL AND {_RESENDABLE}"


def _target(
    rid: int, row: int, payload: str, attempts: int, state: str, to_phone: str | None
) -> Target:
    return Target(rid, row, payload.encode(), attempts, state == "unknown", to_phone)


def connect(path: Path, *, readonly: bool = False) -> Database:
    """A SQLite connection in autocommit mode (transactions are `Transaction`s).
    Read-write: WAL with synchronous=FULL, every commit fsynced."""
    return Database.sqlite(path, readonly=readonly)


class Ledger(DeliveryTables):
    """A campaign's ledger. `Ledger(path)` is a SQLite file; `Ledger.on_postgres(url,
    campaign)` a schema of a PostgreSQL database, with the same tables."""

    def __init__(
        self,
        path: Path | str,
        *,
        readonly: bool = False,
        db: Database | None = None,
        reopen: Callable[[bool], Ledger] | None = None,
    ) -> None:
        self.path = Path(path)
        self.db = db if db is not None else connect(self.path, readonly=readonly)
        self._reopen = reopen or (lambda ro: Ledger(self.path, readonly=ro))
        try:
            if not readonly:
                self._migrate()
            self._create_views()
            if readonly:
                self.db.read_only()
        except LedgerError:
            self.db.close()
            raise

    @classmethod
    def on_postgres(cls, url: str, campaign: str, *, readonly: bool = False) -> Ledger:
        db = Database.postgresql(url, schema_name(campaign), create=not readonly)
        return cls._on(db, url, campaign, readonly)

    @classmethod
    def postgres_reader(cls, url: str, campaign: str) -> Ledger | None:
        """A read-only connection to the campaign's schema; None when it holds no ledger
        (the campaign was never opened by a run or a validation)."""
        schema = schema_name(campaign)
        db = Database.postgresql(url, schema, create=False)
        try:
            found = db.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
        except LedgerError:
            db.close()
            raise
        if not found[0]:
            db.close()
            return None
        return cls._on(db, url, campaign, readonly=True)

    @classmethod
    def _on(cls, db: Database, url: str, campaign: str, readonly: bool) -> Ledger:
        return cls(
            f"{db.where}#{schema_name(campaign)}",
            readonly=readonly,
            db=db,
            reopen=lambda ro: cls.on_postgres(url, campaign, readonly=ro),
        )

    @property
    def postgres(self) -> bool:
        return self.db.postgres

    def reopen(self, readonly: bool = False) -> Ledger:
        """Another connection to the same ledger (for a thread of its own)."""
        return self._reopen(readonly)

    @classmethod
    def reader(cls, path: Path | str) -> Ledger:
        """A read-only connection: for looking at a campaign another process may own. A
        ledger of an older schema is upgraded first (a short write, like any other)."""
        if not Path(path).is_file():
            raise sqlite3.OperationalError(f"{path}: no ledger")
        ledger = cls(path, readonly=True)
        if ledger.db.version() >= SCHEMA_VERSION:
            return ledger
        ledger.close()
        return cls(path)

    def _create_views(self) -> None:
        # A temporary view lives as long as this connection, whatever version wrote the file.
        make = "CREATE OR REPLACE TEMP VIEW" if self.postgres else "CREATE TEMP VIEW IF NOT EXISTS"
        for create in RESULTS_VIEWS:
            self.db.execute(create.replace("CREATE TEMP VIEW", make, 1))

    def _migrate(self) -> None:
        """Create the schema, or upgrade a ledger written by an older version in place."""
        db = self.db
        found = db.version()
        if found > SCHEMA_VERSION:
            # Its claims and attempts may mean what this version cannot read (a host not
            # upgraded yet beside one that was): touch nothing.
            raise UsageError(
                f"{db.where}: the campaign's ledger is of schema {found}, written by a newer "
                f"version of campaign (this one reads up to {SCHEMA_VERSION}): upgrade it"
            )
        if found == SCHEMA_VERSION:
            return
        with self.transaction(changes=False):
            if db.postgres:
                # Workers starting together: one creates the tables, the others wait for it.
                db.execute("SELECT pg_advisory_xact_lock(hashtextextended(current_schema(), 1))")
            if db.version() >= SCHEMA_VERSION:
                return  # another process upgraded it meanwhile
            for statement in db.ddl(LEDGER_SCHEMA).split(";"):
                if statement.strip():
                    db.execute(statement)
            recipients, runs = db.columns("recipients"), db.columns("runs")
            if "row" not in recipients:  # version 1
                db.execute("ALTER TABLE recipients ADD COLUMN row INTEGER")
            if "claim" not in recipients:  # versions 1-3
                db.execute("ALTER TABLE recipients ADD COLUMN claim INTEGER")
                for column in ("heartbeat_at REAL", "host TEXT", "pid INTEGER"):
                    if column.split()[0] not in runs:
                        db.execute(f"ALTER TABLE runs ADD COLUMN {db.ddl(column)}")
            db.execute("CREATE INDEX IF NOT EXISTS recipients_claim ON recipients (claim)")
            if "request_at" not in db.columns("deliveries"):  # versions 1-4
                db.execute(f"ALTER TABLE deliveries ADD COLUMN {db.ddl('request_at REAL')}")
            if "to_phone" not in db.columns("attempts"):  # versions 1-5: the person's number
                db.execute("ALTER TABLE attempts ADD COLUMN to_phone TEXT")
                db.execute(
                    "UPDATE attempts SET to_phone = (SELECT to_phone FROM recipients "
                    "WHERE recipients.id = attempts.recipient_id)"
                )
            if "set_aside" not in db.columns("recipients"):  # versions 1-5: a negative claim
                db.execute("ALTER TABLE recipients ADD COLUMN set_aside INTEGER NOT NULL DEFAULT 0")
                db.execute("UPDATE recipients SET claim = -claim, set_aside = 1 WHERE claim < 0")
            db.set_version(SCHEMA_VERSION)

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def report_turn(self, wait_s: float = REPORT_TURN_WAIT_S) -> Iterator[None]:
        """Held while a report is read from the ledger and written. PostgreSQL: one report
        of the campaign at a time, each reading the ledger once it has its turn, so a
        report read earlier never lands on top of one read later (workers that end
        together, `campaign report`, the page). A writer that waited `wait_s` for its turn
        (its holder stopped, say with Ctrl-Z) writes without it rather than never. SQLite:
        whoever writes a report holds the campaign's lock already."""
        if not self.postgres:
            yield
            return
        turn = "hashtextextended('report:' || current_schema(), 0)"
        if not self._wait_for_lock(f"SELECT pg_advisory_lock({turn})", wait_s):
            yield
            return
        try:
            yield
        finally:
            with contextlib.suppress(*LedgerError):  # a lost connection lost the lock too
                self.db.execute(f"SELECT pg_advisory_unlock({turn})")

    def _wait_for_lock(self, take: str, wait_s: float) -> bool:
        """Run `take` (it waits for a lock) with a lock timeout; False when it timed out."""
        import psycopg

        before = self.db.execute("SELECT current_setting('lock_timeout')").fetchone()[0]
        self.db.execute("SELECT set_config('lock_timeout', ?, false)", (f"{int(wait_s * 1000)}",))
        try:
            self.db.execute(take)
        except LedgerError as exc:
            if isinstance(exc.__cause__, psycopg.errors.LockNotAvailable):
                return False
            raise
        finally:
            with contextlib.suppress(*LedgerError):
                self.db.execute("SELECT set_config('lock_timeout', ?, false)", (before,))
        return True

    def transaction(self, changes: bool = True) -> Transaction:
        """BEGIN ... COMMIT; `changes`: the report may change (bump generation)."""
        return Transaction(self.db, changes)

    # --- meta --------------------------------------------------------------------------

    def get_meta(self, key: str) -> Any:
        found = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(found[0]) if found else None

    def all_meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: Any) -> None:
        self._set_meta(values, changes=True)

    def note_unusable_report(self, count: int) -> None:
        """The report gave `count` entries reconcile could not use (`_RESENDABLE`)."""
        self._set_meta({UNUSABLE_REPORT: count}, changes=False)

    def set_report_stamp(self, stamp: Any) -> None:
        """Recording what the report shows changes nothing the report shows."""
        self._set_meta({"report_stamp": stamp}, changes=False)

    def _set_meta(self, values: dict[str, Any], changes: bool) -> None:
        with self.transaction(changes):
            self._put_meta(values)

    def _put_meta(self, values: dict[str, Any]) -> None:
        """Inside a transaction."""
        self.db.executemany(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [(k, json.dumps(v, ensure_ascii=False)) for k, v in values.items()],
        )

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    # --- runs: workers and their leases ------------------------------------------------

    def recover(
        self, lease_s: float | None = None, wait_s: float | None = None, own: int = 0
    ) -> int:
        """Settle what dead workers left: their in-flight people become `unknown`, their
        other claims go back to the pool. `lease_s` None: every run still marked running
        is dead (SQLite, where this process holds the campaign's lock); else those without
        a heartbeat for `lease_s` seconds of the store's clock. When no live worker is
        left, every claim is released: a new run starts from the whole campaign. `own`: the
        caller's run, never settled by its own sweep (woken from a stop longer than its
        lease, it may still renew it, unless another worker settled it first)."""
        db = self.db
        # Settling runs and releasing claims changes nothing the report shows: only people
        # turned `unknown` bump the generation.
        with self.transaction(changes=False):
            if wait_s is not None and db.postgres:
                # `wait_s`: give up (an error) rather than wait longer for rows a stopped
                # worker still holds.
                db.execute(f"SET LOCAL lock_timeout = {int(wait_s * 1000)}")
            if lease_s is None:
                dead = [r for (r,) in db.execute("SELECT id FROM runs WHERE state = 'running'")]
            else:
                horizon = db.now() - lease_s
                dead = [
                    r
                    for (r,) in db.execute(
                        "SELECT id FROM runs WHERE state = 'running' AND id != ? "
                        "AND coalesce(heartbeat_at, started_at) < ?",
                        (own, horizon),
                    )
                ]
            if lease_s is None:
                recovered = db.execute(
                    "UPDATE recipients SET state = 'unknown', error = ? WHERE state = 'inflight'",
                    (_DIED_IN_FLIGHT,),
                ).rowcount
                attempts = db.execute(
                    "UPDATE attempts SET state = 'unknown', error = 'run stopped in flight' "
                    "WHERE state IS NULL"
                ).rowcount
            else:
                recovered = (
                    db.executemany(
                        "UPDATE recipients SET state = 'unknown', error = ? "
                        "WHERE state = 'inflight' AND claim = ?",
                        [(_DIED_IN_FLIGHT, run) for run in dead],
                    ).rowcount
                    if dead
                    else 0
                )
                attempts = (
                    db.executemany(
                        "UPDATE attempts SET state = 'unknown', error = 'run stopped in flight' "
                        "WHERE state IS NULL AND run_id = ?",
                        [(run,) for run in dead],
                    ).rowcount
                    if dead
                    else 0
                )
            db.executemany(
                "UPDATE recipients SET claim = NULL, set_aside = 0 WHERE claim = ?",
                [(run,) for run in dead],
            )
            db.executemany(
                "UPDATE runs SET state = 'crashed' WHERE id = ?", [(run,) for run in dead]
            )
            if lease_s is not None:
                recovered = max(recovered, 0) + self._settle_orphans()
            if not db.execute("SELECT 1 FROM runs WHERE state = 'running' LIMIT 1").fetchone():
                db.execute(
                    "UPDATE recipients SET claim = NULL, set_aside = 0 WHERE claim IS NOT NULL"
                )
            if recovered > 0 or max(attempts, 0) > 0:
                bump_generation(db)
        return max(recovered, 0)

    def _settle_orphans(self) -> int:
        """In-flight people whose claim no running run holds become `unknown`. A dead run
        can commit an attempt while it is being settled (its transaction was open when it
        stopped, and the claims' release waited for it): the release then clears the
        claim of a person just recorded in flight, after the marking of its in-flight
        people had looked. Whoever settles next, in a statement of its own, sees it."""
        db = self.db
        found = db.execute(
            "UPDATE recipients SET state = 'unknown', error = ?, claim = NULL, set_aside = 0 "
            "WHERE state = 'inflight' "
            "AND (claim IS NULL OR claim NOT IN (SELECT id FROM runs WHERE state = 'running')) "
            "RETURNING id, attempts",
            (_DIED_IN_FLIGHT,),
        ).fetchall()
        # Their attempts by key: the attempts table has no index on the run.
        db.executemany(
            "UPDATE attempts SET state = 'unknown', error = 'run stopped in flight' "
            "WHERE recipient_id = ? AND n = ? AND state IS NULL",
            found,
        )
        return len(found)

    def settle_runs_of(self, command: str) -> None:
        """Runs of `command` still marked running are over: the caller holds the lock that
        only one of them at a time may hold (`reconcile`, whose runs claim nobody)."""
        with self.transaction(changes=False):
            self.db.execute(
                "UPDATE runs SET state = 'crashed' WHERE state = 'running' AND command = ?",
                (command,),
            )

    def live_workers(self, lease_s: float | None = None) -> int:
        """Runs marked running; with `lease_s`, only those whose lease has not expired."""
        if lease_s is None:
            found = self.db.execute("SELECT count(*) FROM runs WHERE state = 'running'")
        else:
            found = self.db.execute(
                "SELECT count(*) FROM runs WHERE state = 'running' "
                "AND coalesce(heartbeat_at, started_at) >= ?",
                (self.db.now() - lease_s,),
            )
        return int(found.fetchone()[0])

    def left_behind(self) -> bool:
        """Whether someone of the input is neither sent nor being sent: not settled
        (pending, unknown, in flight), and not held by a running run that has them in
        flight or still to try. People set aside for their send window are left behind
        too: a worker that died waiting for the window takes them with it for a lease."""
        found = self.db.execute(
            "SELECT 1 FROM rows JOIN recipients r ON r.key = rows.key "
            "WHERE rows.status = 'ok' AND r.state IN ('pending', 'unknown', 'inflight') "
            "AND NOT (r.claim > 0 AND r.set_aside = 0 AND r.state IN ('pending', 'inflight') "
            "AND r.claim IN (SELECT id FROM runs WHERE state = 'running')) LIMIT 1"
        ).fetchone()
        return found is not None

    def watch_stamp(self, lease_s: float) -> tuple[Any, int]:
        """Differs whenever what a page shows of the campaign may have changed, in one
        query: the generation (every committed change bumps it) and how many workers hold
        a live lease (a worker killed with -9 changes nothing else)."""
        found = self.db.execute(
            "SELECT (SELECT value FROM meta WHERE key = 'generation'), "
            "(SELECT count(*) FROM runs WHERE state = 'running' "
            f"AND coalesce(heartbeat_at, started_at) >= {self.db.clock()} - ?)",
            (lease_s,),
        ).fetchone()
        return found[0], int(found[1])

    def start_run(self, command: str) -> int:
        # Bookkeeping: a new run changes nothing the report shows (see the module's notes).
        with self.transaction(changes=False):
            now = self.db.now()
            found = self.db.execute(
                "INSERT INTO runs (command, started_at, state, heartbeat_at, host, pid) "
                "VALUES (?, ?, 'running', ?, ?, ?) RETURNING id",
                (command, now, now, socket.gethostname(), os.getpid()),
            ).fetchone()
        return int(found[0])

    def heartbeat(self, run_id: int) -> bool:
        """Renew the run's lease. False: it had expired and another worker took its people
        (the run must stop sending)."""
        with self.transaction(changes=False):
            return (
                self.db.execute(
                    "UPDATE runs SET heartbeat_at = ? WHERE id = ? AND state = 'running'",
                    (self.db.now(), run_id),
                ).rowcount
                == 1
            )

    def end_run(self, run_id: int, state: str) -> None:
        """The run is over; the people it claimed but never tried go back to the pool, and
        so do those left `unknown`, for a `--resend-unknown` run to see (a person that
        failed stays with it: another worker does not retry it right away). A run that
        other workers settled as `crashed` (its lease expired) stays so: that is when its
        people in flight became `unknown`. Nothing the report shows changes: a run that
        changed nobody leaves the report current."""
        with self.transaction(changes=False):
            self.db.execute(
                "UPDATE runs SET state = CASE WHEN state = 'crashed' THEN state ELSE ? END, "
                "finished_at = ?, "
                "requests = (SELECT count(*) FROM attempts WHERE run_id = ?) WHERE id = ?",
                (state, time.time(), run_id, run_id),
            )
            self.db.execute(
                "UPDATE recipients SET claim = NULL, set_aside = 0 WHERE claim = ? "
                "AND state IN ('pending', 'unknown')",
                (run_id,),
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
        # PostgreSQL: a staging table of this connection's own, whatever other workers or
        # pages look at meanwhile; its rows are copied in at the end, as other
        # connections' views depend on the table `rows`. SQLite: renamed into place.
        db.execute("DROP TABLE IF EXISTS rows_new")
        temporary = "TEMP " if db.postgres else ""
        db.execute(f"CREATE {temporary}TABLE rows_new ({db.ddl(ROWS_COLUMNS)})")
        for chunk in chunks:
            with self.transaction(changes=False):
                db.executemany(
                    "INSERT INTO rows_new (row, cells, status, key, payload, to_phone, error) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
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
                    ],
                )
        with self.transaction():
            if db.postgres:
                db.execute("CREATE INDEX ON rows_new (key, row)")
            else:
                for drop in DROP_RESULTS_VIEWS:
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
                "payload = CASE WHEN recipients.state = 'sent' THEN recipients.payload "
                "ELSE excluded.payload END, "
                "to_phone = CASE WHEN recipients.state = 'sent' THEN recipients.to_phone "
                "ELSE excluded.to_phone END"
            )
            if db.postgres:
                db.execute("DELETE FROM rows")
                db.execute("INSERT INTO rows SELECT * FROM rows_new")
                db.execute("DROP TABLE rows_new")
            else:
                db.execute("ALTER TABLE rows_new RENAME TO rows")
                self._create_views()
            self._put_meta({"columns": columns, "input_fingerprint": fingerprint})
            # New rows: none of them is marked from the suppression list yet.
            db.execute("DELETE FROM meta WHERE key = ?", (_APPLIED,))

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
        """People in one of `states` that no live worker has claimed."""
        return int(
            self.db.execute(
                f"SELECT count(*) FROM rows JOIN recipients r ON r.key = rows.key "
                f"WHERE {_unclaimed(states)}",
                states,
            ).fetchone()[0]
        )

    def claim(
        self, run_id: int, states: tuple[str, ...], after: int = 0, batch: int = 500
    ) -> list[Target]:
        """Claim for `run_id` the next people in one of `states` that nobody holds, in
        input order after row `after` (one commit). On PostgreSQL, rows another worker is
        claiming at this moment are skipped, not waited for."""
        lock = " FOR UPDATE OF r SKIP LOCKED" if self.postgres else ""
        live = _LIVE_HELD if self.postgres else _LIVE
        # The next people are found by walking the rows in order from `after`, stopping at
        # `batch`; any other plan sorts every unclaimed person for each batch (35 ms a
        # batch at 40,000 people, so quadratic in the campaign). SQLite keeps the order of
        # a CROSS JOIN; PostgreSQL, whose statistics are often stale right after a load, is
        # told not to sort. The picking is a CTE so that PostgreSQL runs it once: as a
        # subquery of the UPDATE it may run it again for every person it updates.
        with self.transaction(changes=False):
            if self.postgres:
                self.db.execute("SET LOCAL enable_sort = off")
            found = self.db.execute(
                f"WITH picked AS (SELECT r.id FROM rows CROSS JOIN recipients r "
                f"WHERE r.key = rows.key AND rows.row > ? AND {_unclaimed(states)} "
                f"ORDER BY rows.row LIMIT ?{lock}) "
                f"UPDATE recipients SET claim = ?, set_aside = 0 "
                f"WHERE id IN (SELECT id FROM picked) "
                f"AND claim IS NULL AND {live} "
                f"RETURNING id, row, payload, attempts, state, to_phone",
                (after, *states, batch, run_id, run_id),
            ).fetchall()
        return sorted((_target(*found_row) for found_row in found), key=lambda t: t.row)

    def held_elsewhere(self, run_id: int) -> bool:
        """Whether another run still marked running holds people it has yet to settle: in
        flight, or claimed and not tried yet (or waiting for a retry). Not its `failed`
        people, which stay with it until it ends but which it will not try again: two
        workers that each hold some would wait for each other for ever."""
        found = self.db.execute(
            "SELECT 1 FROM recipients WHERE set_aside = 0 AND claim != ? "
            "AND state IN ('inflight', 'pending') "
            "AND claim IN (SELECT id FROM runs WHERE state = 'running') LIMIT 1",
            (run_id,),
        ).fetchone()
        return found is not None

    def set_aside_elsewhere(self, run_id: int) -> bool:
        """Whether another run still marked running holds people for their send window."""
        found = self.db.execute(
            "SELECT 1 FROM recipients WHERE set_aside = 1 AND claim != ? "
            "AND claim IN (SELECT id FROM runs WHERE state = 'running') LIMIT 1",
            (run_id,),
        ).fetchone()
        return found is not None

    def claimed(self, run_id: int, states: tuple[str, ...], ids: set[int]) -> list[Target]:
        """Of the people `run_id` holds or set aside, those in `ids` still in one of
        `states`, claimed again (the people held back for their send window, when it
        opens)."""
        marks = ",".join("?" * len(states))
        wanted = sorted(ids)
        found: list[Any] = []
        with self.transaction(changes=False):
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                values = ", ".join(["(?)"] * len(part))
                found += self.db.execute(
                    f"UPDATE recipients SET claim = ?, set_aside = 0 FROM (VALUES {values}) AS v "
                    f"WHERE recipients.id = v.column1 AND recipients.claim = ? "
                    f"AND recipients.state IN ({marks}) RETURNING recipients.id, "
                    f"recipients.row, recipients.payload, recipients.attempts, "
                    f"recipients.state, recipients.to_phone",
                    (run_id, *part, run_id, *states),
                ).fetchall()
        return sorted((_target(*row) for row in found), key=lambda t: t.row)

    def targets(self, states: tuple[str, ...], batch: int = 1000) -> Iterator[list[Target]]:
        """Recipients in one of `states`, in input order, a batch at a time."""
        marks = ",".join("?" * len(states))
        query = (
            f"SELECT r.id, rows.row, r.payload, r.attempts, r.state, r.to_phone FROM rows "
            f"JOIN recipients r ON r.key = rows.key "
            f"WHERE rows.status = 'ok' AND rows.row > ? AND r.state IN ({marks}) "
            f"AND {_RESENDABLE} ORDER BY rows.row LIMIT ?"
        )
        after = 0
        while True:
            found = self.db.execute(query, (after, *states, batch)).fetchall()
            if not found:
                return
            after = found[-1][1]
            yield [_target(*found_row) for found_row in found]

    def write_batch(
        self,
        run_id: int,
        outcomes: list[Outcome],
        holds: list[tuple[int, str | None, str]],
        begins: list[tuple[int, int]],
    ) -> list[bool]:
        """The dispatcher's group commit, one transaction and so one fsync: the answers
        recorded, the recipients held back, and the attempts about to leave marked in
        flight. Returns, per begin, whether it may leave (False: already sent, or no longer
        claimed by this run because its lease expired: skip it). On PostgreSQL the whole
        transaction is one round trip."""
        with self.db.pipeline(), self.transaction():
            if outcomes:
                self._finish_attempts(outcomes)
            if holds:
                self._hold(run_id, holds)
            leaving = self._begin_attempts(run_id, begins)
        started = leaving()
        return [rid in started for rid, _ in begins]

    def _begin_attempts(
        self, run_id: int, attempts: list[tuple[int, int]]
    ) -> Callable[[], set[int]]:
        """Marks the attempts in flight and logs them; returns how to read which of them
        may leave (on PostgreSQL, known once the pipeline is answered)."""
        if not attempts:
            return set
        now = time.time()
        if self.db.postgres:
            # One statement of the same text every time (arrays, not a list of values), so
            # it is planned once per connection, not once per commit.
            ids, tries = [rid for rid, _ in attempts], [n for _, n in attempts]
            cursor = self.db.execute(
                "WITH started AS (UPDATE recipients SET state = 'inflight', attempts = v.n "
                "FROM unnest(?::bigint[], ?::bigint[]) AS v(id, n) "
                f"WHERE recipients.id = v.id AND recipients.claim = ? "
                f"AND recipients.set_aside = 0 AND {_LIVE} "
                "AND recipients.state != 'sent' "
                "RETURNING recipients.id, v.n, recipients.to_phone), "
                "logged AS (INSERT INTO attempts (recipient_id, n, run_id, started_at, to_phone) "
                "SELECT id, n, ?, ?, to_phone FROM started "
                "ON CONFLICT (recipient_id, n) DO UPDATE SET "
                "run_id = excluded.run_id, started_at = excluded.started_at, "
                "finished_at = NULL, state = NULL, http_status = NULL, error = NULL, "
                "to_phone = excluded.to_phone) "
                "SELECT id FROM started",
                (ids, tries, run_id, run_id, run_id, now),
            )
            return lambda: {rid for (rid,) in cursor.fetchall()}
        # SQLite plans UPDATE ... FROM as a scan of the table: one indexed update each.
        live = self.db.execute(f"SELECT {_LIVE}", (run_id,)).fetchone()[0]
        started: dict[int, tuple[int, str | None]] = {}  # id: (attempt, the number it goes to)
        for rid, n in attempts if live else []:
            found = self.db.execute(
                "UPDATE recipients SET state = 'inflight', attempts = ? "
                "WHERE id = ? AND claim = ? AND set_aside = 0 AND state != 'sent' "
                "RETURNING to_phone",
                (n, rid, run_id),
            ).fetchone()
            if found is not None:
                started[rid] = (n, found[0])
        self.db.executemany(
            "INSERT INTO attempts (recipient_id, n, run_id, started_at, to_phone) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (recipient_id, n) DO UPDATE SET "
            "run_id = excluded.run_id, started_at = excluded.started_at, "
            "finished_at = NULL, state = NULL, http_status = NULL, error = NULL, "
            "to_phone = excluded.to_phone",
            [(rid, n, run_id, now, phone) for rid, (n, phone) in started.items()],
        )
        return lambda: set(started)

    def _finish_attempts(self, outcomes: list[Outcome]) -> None:
        # A person's state is its latest attempt's outcome. An older attempt's answer comes
        # late when its worker stalled past its lease and another sent the person since
        # (--resend-unknown): it changes the person only to say it arrived. Once `sent`,
        # always sent: no later answer makes a person sendable again.
        now = time.time()
        if self.db.postgres:
            for wave in _waves(outcomes):
                self._finish_wave(wave, now)
            return
        self.db.executemany(
            "UPDATE recipients SET state = ?, http_status = ?, error = ?, "
            "sent_at = CASE WHEN ? = 'sent' THEN ? ELSE sent_at END "
            "WHERE id = ? AND state != 'sent' AND (attempts = ? OR ? = 'sent')",
            [
                (o.state, o.http_status, o.error, o.state, o.sent_at, o.recipient_id, o.n, o.state)
                for o in outcomes
            ],
        )
        self.db.executemany(
            "UPDATE attempts SET finished_at = ?, state = ?, http_status = ?, error = ? "
            "WHERE recipient_id = ? AND n = ?",
            [(now, o.state, o.http_status, o.error, o.recipient_id, o.n) for o in outcomes],
        )

    def _finish_wave(self, outcomes: list[Outcome], now: float) -> None:
        """One statement of the same text every time, for both tables (see above). Each
        person at most once: a statement updates a row once, whichever of two it picks."""
        self.db.execute(
            "WITH v AS (SELECT * FROM unnest(?::bigint[], ?::bigint[], ?::text[], "
            "?::bigint[], ?::text[], ?::text[]) AS v(id, n, state, http_status, error, "
            "sent_at)), done AS (UPDATE attempts SET finished_at = ?, state = v.state, "
            "http_status = v.http_status, error = v.error FROM v "
            "WHERE attempts.recipient_id = v.id AND attempts.n = v.n) "
            "UPDATE recipients SET state = v.state, http_status = v.http_status, "
            "error = v.error, sent_at = CASE WHEN v.state = 'sent' THEN v.sent_at "
            "ELSE recipients.sent_at END FROM v WHERE recipients.id = v.id "
            "AND recipients.state != 'sent' AND (recipients.attempts = v.n "
            "OR v.state = 'sent')",
            (
                [o.recipient_id for o in outcomes],
                [o.n for o in outcomes],
                [o.state for o in outcomes],
                [o.http_status for o in outcomes],
                [o.error for o in outcomes],
                [o.sent_at for o in outcomes],
                now,
            ),
        )

    def _hold(self, run_id: int, holds: list[tuple[int, str | None, str]]) -> None:
        """Recipients whose request did not leave (suppressed, outside their send window,
        deadline passed): (id, new state or None to keep it, error). A recipient already
        sent stays sent, and one whose earlier request may have arrived stays unknown."""
        # The run keeps them, set aside: not work another worker should wait for, and
        # taken up again by this run when their window opens (`claimed`).
        self.db.executemany(
            "UPDATE recipients SET error = ?, state = CASE WHEN state = 'unknown' "
            "THEN state ELSE coalesce(?, state) END, "
            "set_aside = CASE WHEN claim = ? THEN 1 ELSE set_aside END "
            "WHERE id = ? AND state NOT IN ('sent', 'inflight')",
            [(error, state, run_id, recipient_id) for recipient_id, state, error in holds],
        )

    def note_pending(self, error: str) -> int:
        """Say why the pending people of the input were not sent (e.g. the deadline)."""
        with self.transaction():
            return self.db.execute(
                "UPDATE recipients SET error = ? WHERE state = 'pending' "
                "AND key IN (SELECT key FROM rows WHERE status = 'ok')",
                (error,),
            ).rowcount

    # --- suppression (the list itself lives in `store/suppression.py`) -----------------------

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

    def set_suppressed(
        self, marks: list[tuple[int, str]], cleared: list[int], applied: Any = None
    ) -> None:
        """Rows whose number is on the suppression list (row, why), and rows whose number
        came off it (sendable again, and so is their person, if a run had held them).
        `applied`: the list's version and how many rows it suppresses, kept (not shown in
        the report) so that the next run skips an unchanged list (`suppression_applied`)."""
        held = self.db.execute(
            "SELECT 1 FROM recipients WHERE state = 'suppressed' "
            "AND key IN (SELECT key FROM rows WHERE status = 'ok') LIMIT 1"
        ).fetchone()
        if not (marks or cleared or held):
            # Nothing changes: the report stays current (no generation bump).
            if applied is not None and applied != self.suppression_applied():
                self._set_meta({_APPLIED: applied}, changes=False)
            return
        with self.transaction():
            if applied is not None:
                self._put_meta({_APPLIED: applied})
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

    def suppression_applied(self) -> Any:
        """[the suppression list's version, rows it suppressed] as last applied to these
        rows; None when not applied since they were last replaced."""
        return self.get_meta(_APPLIED)

    # --- report ------------------------------------------------------------------------

    def report_rows(self) -> Iterator[tuple[Any, ...]]:
        """(cells JSON or None, _row, _status, _to_phone, _attempts, _http_status, _error,
        _sent_at, _delivery, _delivery_error, _delivery_checked_at), every result as text:
        the input's rows in order, then the people who may have been reached but are in no
        row of it (cells None, _row empty)."""
        results = (
            "coalesce(to_phone, ''), coalesce(CAST(attempts AS TEXT), ''), "
            "coalesce(CAST(http_status AS TEXT), ''), coalesce(error, ''), "
            "coalesce(sent_at, ''), coalesce(delivery, ''), coalesce(delivery_error, ''), "
            "coalesce(delivery_checked_at, '')"
        )
        yield from self.db.stream(
            f"SELECT cells, CAST(row AS TEXT), status, {results} FROM row_results "
            "ORDER BY row_results.row"
        )
        yield from self.db.stream(
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


def _waves(outcomes: list[Outcome]) -> list[list[Outcome]]:
    """The outcomes in order, cut wherever a person comes again (their later answer then
    lands after the earlier one, as on SQLite)."""
    waves: list[list[Outcome]] = [[]]
    seen: set[int] = set()
    for outcome in outcomes:
        if outcome.recipient_id in seen:
            waves.append([])
            seen = set()
        waves[-1].append(outcome)
        seen.add(outcome.recipient_id)
    return waves
