"""One connection to either store: a SQLite file, or a schema of a PostgreSQL database.

The store's SQL is written once, in the subset both databases share, with `?` marks;
`Database` passes it to sqlite3 as it is and to psycopg 3 with `%s` marks. The few
places where the two differ in substance (the schema's column types, how a table is
replaced, the clock, row locks) ask `Database.postgres` and say why.

psycopg is imported only when a PostgreSQL store is used: a SQLite run does not pay for
it. Its errors become `StoreUnavailable` (at the start: exit 2) or `StoreFailed` (later),
so callers catch one thing whichever store they use (`LedgerError`); no message repeats
a URL's password (`store.postgres.safe_url`).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from campaign.errors import LedgerError as LedgerError  # the store's callers take it from here
from campaign.errors import StoreUnavailable

POSTGRES_SCHEMES = ("postgresql", "postgres")


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchmany(self, size: int = ...) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


def is_postgres(location: str | Path) -> bool:
    return isinstance(location, str) and location.split(":", 1)[0] in POSTGRES_SCHEMES


def schema_name(campaign: str) -> str:
    """A campaign's PostgreSQL schema. Identifiers are at most 63 bytes; a longer campaign
    id is shortened and made unique by its hash."""
    name = f"c_{campaign}"
    if len(name) <= 63:
        return name
    import hashlib

    return f"c_{campaign[:44]}_{hashlib.sha256(campaign.encode()).hexdigest()[:16]}"


@lru_cache(maxsize=512)
def _for_postgres(sql: str) -> str:
    # Our SQL has no `?` or `%` inside string literals, so this is a plain replacement.
    return sql.replace("%", "%%").replace("?", "%s")


class Database:
    """A connection in autocommit mode; transactions are explicit (`begin`)."""

    def __init__(self, raw: Any, postgres: bool, where: str, url: str = "") -> None:
        self.raw = raw
        self.postgres = postgres
        self.where = where  # for messages: a file, or a URL without its password
        self._url = url

    # --- opening -------------------------------------------------------------------------

    @classmethod
    def sqlite(cls, path: Path, *, readonly: bool = False) -> Database:
        """WAL with synchronous=FULL: every commit is fsynced before it returns."""
        if readonly:
            uri = f"{path.resolve().as_uri()}?mode=ro"
            raw = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            raw.execute("PRAGMA busy_timeout=5000")
            if not readonly:
                raw.execute("PRAGMA journal_mode=WAL")
                raw.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            raw.close()
            raise
        return cls(raw, False, str(path))

    @classmethod
    def postgresql(cls, url: str, schema: str | None, *, create: bool = True) -> Database:
        """A connection whose unqualified names are `schema`'s (created if missing and
        `create`)."""
        import psycopg
        from psycopg import sql

        from campaign.store.postgres import CONNECT_TIMEOUT_S, safe_url, unavailable

        try:
            raw = psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                # A host cut off without a word is noticed in about a minute, not hours.
                keepalives=1,
                keepalives_idle=20,
                keepalives_interval=5,
                keepalives_count=4,
                # A process stopped inside a transaction must not hold its rows forever.
                options="-c idle_in_transaction_session_timeout=60000",
            )
        except (psycopg.Error, ValueError) as exc:  # ValueError: a malformed URL
            raise unavailable(url, exc) from None
        db = cls(raw, True, safe_url(url), url)
        try:
            if schema is not None:
                name = sql.Identifier(schema)
                if create:
                    _create_schema(raw, schema)
                raw.execute(sql.SQL("SET search_path TO {}").format(name))
        except psycopg.errors.InsufficientPrivilege as exc:
            raw.close()
            raise StoreUnavailable(
                safe_url(url), f"no right to create the campaign's tables ({exc.sqlstate})"
            ) from None
        except psycopg.Error as exc:
            raw.close()
            raise unavailable(url, exc) from None
        return db

    # --- statements ----------------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        if not self.postgres:
            return self.raw.execute(sql, params)
        with self._errors():
            if params:
                return self.raw.execute(_for_postgres(sql), params)
            return self.raw.execute(sql)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        if not self.postgres:
            return self.raw.executemany(sql, rows)
        rows = list(rows)
        if not rows:
            return _NO_ROWS
        with self._errors():
            cursor = self.raw.cursor()
            cursor.executemany(_for_postgres(sql), rows)
            return cursor

    def script(self, sql: str) -> None:
        """Several statements without parameters (a schema)."""
        if not self.postgres:
            self.raw.executescript(sql)
            return
        with self._errors():
            self.raw.execute(sql)

    def stream(self, sql: str, params: Sequence[Any] = (), batch: int = 10_000) -> Iterator[Any]:
        """The rows of a big query without holding them all in memory: PostgreSQL sends a
        plain query's whole result at once, so there it is read through a server-side
        cursor, in a read-only transaction of its own connection's (one snapshot)."""
        if not self.postgres:
            cursor = self.raw.execute(sql, params)
            while found := cursor.fetchmany(batch):
                yield from found
            return
        with self._errors(), self.raw.transaction(), self.raw.cursor(name="stream") as cursor:
            cursor.itersize = batch
            cursor.execute(_for_postgres(sql) if params else sql, params or None)
            yield from cursor

    @contextlib.contextmanager
    def pipeline(self) -> Iterator[None]:
        """PostgreSQL: the statements inside are sent together and answered together, one
        round trip for a whole transaction (their results are read after the block). On
        an error the transaction is rolled back: in a pipeline its COMMIT never ran."""
        if not self.postgres:
            yield
            return
        try:
            with self._errors(), self.raw.pipeline():
                yield
        except BaseException:
            with contextlib.suppress(Exception):
                self.rollback()
            raise

    def read_only(self) -> None:
        """From now on this connection only reads (its temporary views are made)."""
        if self.postgres:
            self.execute("SET default_transaction_read_only = on")

    # --- transactions --------------------------------------------------------------------

    def begin(self) -> None:
        # SQLite: take the write lock now, so that a transaction never fails half-way for
        # another writer. PostgreSQL locks the rows it writes.
        self.execute("BEGIN" if self.postgres else "BEGIN IMMEDIATE")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        # SQLite has already rolled back after some errors (a full disk): a second
        # ROLLBACK would fail and hide the first error.
        if self.in_transaction:
            self.execute("ROLLBACK")

    @property
    def in_transaction(self) -> bool:
        if not self.postgres:
            return bool(self.raw.in_transaction)
        from psycopg.pq import TransactionStatus

        return bool(self.raw.info.transaction_status != TransactionStatus.IDLE)

    # --- what differs --------------------------------------------------------------------

    def now(self) -> float:
        """The store's clock, as Unix time: on PostgreSQL the server's, the one clock every
        host agrees on (leases)."""
        if self.postgres:
            return float(self.execute("SELECT extract(epoch FROM clock_timestamp())").fetchone()[0])
        import time

        return time.time()

    def clock(self) -> str:
        """`now()` as an SQL expression, for a statement that needs the store's clock
        without a round trip of its own."""
        if self.postgres:
            return "extract(epoch FROM clock_timestamp())::float8"
        return "((julianday('now') - 2440587.5) * 86400.0)"

    def version(self) -> int:
        if not self.postgres:
            return int(self.raw.execute("PRAGMA user_version").fetchone()[0])
        found = self.execute(
            "SELECT 1 FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name = 'schema_version'"
        ).fetchone()
        if found is None:
            return 0
        row = self.execute("SELECT max(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def set_version(self, version: int) -> None:
        if not self.postgres:
            self.raw.execute(f"PRAGMA user_version = {int(version)}")
            return
        self.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        self.execute("DELETE FROM schema_version")
        self.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def columns(self, table: str) -> set[str]:
        if not self.postgres:
            return {c[1] for c in self.raw.execute(f"PRAGMA table_info({table})")}
        found = self.execute(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (table,),
        )
        return {c[0] for c in found}

    def ddl(self, sql: str) -> str:
        """A schema written for SQLite, in this database's terms: PostgreSQL's INTEGER and
        REAL are 4 bytes (phone numbers and Unix times need 8), and a generated key is an
        identity column."""
        if not self.postgres:
            return sql
        identity = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
        sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", identity)
        sql = sql.replace("INTEGER PRIMARY KEY", identity)
        sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
        sql = re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)
        return sql.replace(") WITHOUT ROWID;", ");")

    def advisory_lock(self, name: str, *, wait: bool = True, shared: bool = False) -> bool:
        """PostgreSQL: a session lock on `name` (held until `advisory_unlock` or the
        connection ends, so a killed process never leaves it behind)."""
        function = "pg_advisory_lock" if wait else "pg_try_advisory_lock"
        if shared:
            function += "_shared"
        found = self.execute(f"SELECT {function}(hashtextextended(?, 0))", (name,)).fetchone()
        return wait or bool(found[0])

    def advisory_unlock(self, name: str) -> None:
        self.execute("SELECT pg_advisory_unlock(hashtextextended(?, 0))", (name,))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.raw.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        import psycopg

        from campaign.store.postgres import failed

        try:
            yield
        except psycopg.Error as exc:
            raise failed(self._url, exc) from exc


class _NoRows:
    rowcount = 0

    def fetchone(self) -> Any:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def fetchmany(self, size: int = 0) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


_NO_ROWS = _NoRows()


def _create_schema(raw: Any, schema: str) -> None:
    """CREATE SCHEMA IF NOT EXISTS, safe when hosts start together: two of them creating
    it at the same moment make the second fail on PostgreSQL's catalog (a unique
    violation), so the creation is serialized by an advisory lock on its name."""
    from psycopg import sql

    from campaign.store.postgres import schema_lock

    exists = "SELECT 1 FROM pg_namespace WHERE nspname = %s"
    if raw.execute(exists, (schema,)).fetchone() is not None:
        return
    with raw.transaction():
        raw.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (schema_lock(schema),))
        raw.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))


class Transaction:
    """BEGIN ... COMMIT, or ROLLBACK on error (the connection is in autocommit). In a
    ledger, a transaction that may change the report also bumps `meta.generation`
    (`changes`); other databases (the suppression list) have no such counter."""

    def __init__(self, db: Database, changes: bool = False) -> None:
        self.db = db
        self.changes = changes

    def __enter__(self) -> Database:
        self.db.begin()
        return self.db

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if kind is not None:
            self.db.rollback()
            return
        if self.changes:
            bump_generation(self.db)
        self.db.commit()


def bump_generation(db: Database) -> None:
    """Inside a transaction: what the report shows may have changed."""
    db.execute(
        "UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'generation'"
    )


def batched(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    return iter(lambda: list(itertools.islice(rows, size)), [])
