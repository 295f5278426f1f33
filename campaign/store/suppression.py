"""The suppression list: numbers that must not get another SMS, whatever a spreadsheet says.

One list per store, shared by every campaign and the page: `{output_dir}/suppression.sqlite`
(WAL, synchronous=FULL, schema versioned with `PRAGMA user_version`), apart from the
campaigns' ledgers because it outlives them, or a table of the PostgreSQL store's shared
schema. Each entry: the E.164 number, why, where it came from (`report`: a delivery report
said so; `manual`: `suppress add` or the page; `import`: `suppress import`; `avaamo`:
Avaamo's own opt-out list, `optouts`) and when it was added. Adding a number already on
the list keeps the first entry: "since when" is the first time. The list also keeps when
each sync from outside last read its source whole (`syncs`).

The list is read three ways:
- when a run maps its input, every row whose number is on it becomes `suppressed`
  (and every row whose number came off it is sendable again): `apply_to_ledger`;
- right before a request leaves, against the numbers added since that check began:
  `Watch`, which reads what was added at most every `POLL_S` seconds with one indexed
  query, so a number added by another process is respected within two seconds without a
  query per request;
- by `campaign suppress list` and the page.

The moment invariant (docs/design.md, invariant 8): a number whose addition committed at
time T gets no request that leaves after T + 2 s, from a run sending at T or starting
later. Why it holds:
- Nothing committed is missed. A `Mark` is taken before the load-time check reads the
  list: what committed before it, that check sees (its reads come later); what commits
  after it, the watch returns, because each poll returns exactly the entries its snapshot
  sees that the previous one did not (`added_since`), in commit order on either store.
  SQLite: one writer at a time (`BEGIN IMMEDIATE` holds the write lock from before the
  insert until the commit), so ids are committed in the order they are handed out and
  "ids above the last one seen" is that difference. PostgreSQL hands ids out at insert
  and commits in any order, so there the watch reads by transaction instead: each entry
  carries the id of the transaction that added it (`txid`), and a poll keeps the
  snapshot it read with; an entry is new when its transaction was not visible in the last
  poll's snapshot (`pg_visible_in_snapshot`). A transaction still running at one poll is
  read by a later one, however long it held its commit.
- What is seen is fresh. A poll's time is taken before its query, so its snapshot is never
  older than that time, and a check reads the list again when that time is `POLL_S` or
  more ago: the snapshot a check uses was taken less than `POLL_S` (0.5 s) before it.
- The check is the last step before the request: the dispatcher checks each attempt
  (retries too) after its rate slot, right before recording it in flight, and the request
  leaves once that record is committed and the rate lets it (`confirm`). When that commit
  and pacing took longer than `gate.LATE_S` (0.5 s), the list is checked once more right
  before the request leaves (`Gate.late_check`; a number found then makes the attempt one
  that never left). So a request leaving at L used a snapshot taken after L - 1 s (0.5 s
  of commit and pacing at most unchecked, plus the snapshot's 0.5 s of age), and a request
  leaving after T + 2 s used a snapshot taken after T, which sees the number. The one
  assumption: a poll's query and the step from the last check to the socket take under
  about a second.

Removals are not watched during a run: a number taken off the list while a run goes is
sendable from the next run on (the safe side).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign.store.db import Database, LedgerError, Transaction
from campaign.store.ledger import Ledger, connect
from campaign.store.postgres import schema_lock
from campaign.times import iso_utc

SUPPRESSION_FILE = "suppression.sqlite"
SCHEMA_VERSION = 3  # 2: PostgreSQL entries carry the transaction that added them; 3: syncs
SHARED_SCHEMA = "campaign_shared"  # PostgreSQL: what every campaign of the store shares
SOURCES = ("report", "manual", "import", "avaamo")
# Entries an opt-in at Avaamo takes off again: what a person put on the list stays.
OPT_IN_REMOVES = ("avaamo", "report")
POLL_S = 0.5  # one indexed query per run every half second, at most
_LOOKUP_BATCH = 500  # numbers per `IN (...)` query, below SQLite's variable limit
_WRITE_BATCH = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS numbers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    phone TEXT NOT NULL UNIQUE,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS syncs (
    name TEXT PRIMARY KEY,
    synced_at REAL NOT NULL
);
"""
# PostgreSQL: the transaction that added each entry, for a watch in commit order (see the
# module's docstring). Existing entries get the migration's own transaction.
_PG_TXID = """
ALTER TABLE numbers ADD COLUMN IF NOT EXISTS txid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS numbers_txid ON numbers (txid);
"""


@dataclass(frozen=True)
class Entry:
    phone: str
    reason: str
    source: str
    added_at: float

    @property
    def added(self) -> str:
        return iso_utc(self.added_at) or ""

    def why(self) -> str:
        """The `_error` of a suppressed row: why, and since when."""
        return f"on the suppression list since {self.added} ({self.source}): {self.reason}"


class SuppressionList:
    """The list: a SQLite file in `output_dir`, or with a PostgreSQL store (`url`) a table
    of its shared schema, one list for every host. Blocking: call it from a thread in
    async code."""

    def __init__(self, output_dir: Path | str, url: str | None = None) -> None:
        if url is None:
            directory = Path(output_dir)
            directory.mkdir(parents=True, exist_ok=True)
            self.db = connect(directory / SUPPRESSION_FILE)
        else:
            self.db = Database.postgresql(url, SHARED_SCHEMA)
        try:
            if self.db.version() < SCHEMA_VERSION:
                with Transaction(self.db):
                    self._migrate()
        except LedgerError:
            self.db.close()
            raise

    def _migrate(self) -> None:
        if self.db.postgres:  # hosts starting together: one migrates, the others see it done
            self.db.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))",
                (schema_lock(SHARED_SCHEMA),),
            )
            if self.db.version() >= SCHEMA_VERSION:
                return
        for statement in self.db.ddl(_SCHEMA).split(";"):
            if statement.strip():
                self.db.execute(statement)
        if self.db.postgres:
            self.db.script(_PG_TXID)
        self.db.set_version(SCHEMA_VERSION)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> SuppressionList:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- changes -----------------------------------------------------------------------

    def add(self, phones: Iterable[str], reason: str, source: str) -> int:
        """Put E.164 `phones` on the list; returns how many were not on it yet. Streams:
        written in batches, each its own transaction."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        added = 0
        batch: list[str] = []
        for phone in phones:
            batch.append(phone)
            if len(batch) >= _WRITE_BATCH:
                added += self._add_batch(batch, reason, source)
                batch = []
        if batch:
            added += self._add_batch(batch, reason, source)
        return added

    def _add_batch(self, phones: list[str], reason: str, source: str) -> int:
        return self.add_each([(phone, reason) for phone in phones], source)

    def add_each(self, entries: list[tuple[str, str]], source: str) -> int:
        """Put (E.164 phone, reason) `entries` on the list in one transaction; returns how
        many were not on it yet (an entry already there keeps its first reason)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}")
        if not entries:
            return 0
        now = time.time()
        with Transaction(self.db):
            return max(
                self.db.executemany(
                    "INSERT INTO numbers (phone, reason, source, added_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (phone) DO NOTHING",
                    [(phone, reason, source, now) for phone, reason in entries],
                ).rowcount,
                0,
            )

    def remove_opted_in(self, phones: list[str]) -> int:
        """Take `phones` off the list where an opt-in may lift them (`OPT_IN_REMOVES`)."""
        if not phones:
            return 0
        marks = ",".join("?" * len(OPT_IN_REMOVES))
        with Transaction(self.db):
            return max(
                self.db.executemany(
                    f"DELETE FROM numbers WHERE phone = ? AND source IN ({marks})",
                    [(p, *OPT_IN_REMOVES) for p in phones],
                ).rowcount,
                0,
            )

    def synced_at(self, name: str) -> float | None:
        """When the sync `name` last read its source whole (epoch seconds), or None."""
        found = self.db.execute("SELECT synced_at FROM syncs WHERE name = ?", (name,)).fetchone()
        return None if found is None else float(found[0])

    def set_synced(self, name: str, at: float) -> None:
        """Record a whole sync that began at `at`; never moves the time back (another host
        may have recorded a later one meanwhile)."""
        with Transaction(self.db):
            self.db.execute(
                "INSERT INTO syncs (name, synced_at) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                "SET synced_at = CASE WHEN syncs.synced_at > excluded.synced_at "
                "THEN syncs.synced_at ELSE excluded.synced_at END",
                (name, at),
            )

    def count_from(self, source: str) -> int:
        found = self.db.execute("SELECT count(*) FROM numbers WHERE source = ?", (source,))
        return int(found.fetchone()[0])

    def remove(self, phones: Iterable[str]) -> int:
        """Take `phones` off the list; returns how many were on it."""
        listed = list(phones)
        with Transaction(self.db):
            return max(
                self.db.executemany(
                    "DELETE FROM numbers WHERE phone = ?", [(p,) for p in listed]
                ).rowcount,
                0,
            )

    # --- questions ---------------------------------------------------------------------

    def entries(self) -> Iterator[Entry]:
        """Every entry, by number."""
        for row in self.db.execute(
            "SELECT phone, reason, source, added_at FROM numbers ORDER BY phone"
        ):
            yield Entry(*row)

    def count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM numbers").fetchone()[0])

    def lookup(self, phones: Iterable[str]) -> dict[str, Entry]:
        """The entries of those `phones` that are on the list."""
        found: dict[str, Entry] = {}
        unique = list(dict.fromkeys(phones))
        for start in range(0, len(unique), _LOOKUP_BATCH):
            part = unique[start : start + _LOOKUP_BATCH]
            marks = ",".join("?" * len(part))
            for row in self.db.execute(
                f"SELECT phone, reason, source, added_at FROM numbers WHERE phone IN ({marks})",
                part,
            ):
                found[row[0]] = Entry(*row)
        return found

    def version(self) -> list[Any] | None:
        """What the list holds, in one statement (one snapshot), as a value that differs
        whenever an entry was added or removed since: an addition raises the largest id
        (AUTOINCREMENT never hands one out twice), removals alone lower the count, and the
        sum of the entries' times tells a list made anew from scratch. None on PostgreSQL,
        whose ids do not commit in order."""
        if self.db.postgres:
            return None
        found = self.db.execute(_SQLITE_VERSION).fetchone()
        return [int(found[0]), int(found[1]), float(found[2])]

    def mark(self) -> Mark:
        """Where a watch of what is added from now on starts (see `added_since`)."""
        if self.db.postgres:
            return Mark(snapshot=str(self.db.execute(_PG_SNAPSHOT).fetchone()[0]))
        return Mark(last_id=int(self.db.execute(_SQLITE_LAST_ID).fetchone()[0]))

    def added_since(self, mark: Mark) -> tuple[Mark, dict[str, Entry]]:
        """(the mark to read from next time, the entries that committed after `mark` and
        are still on the list), by number. Every entry is returned once, whatever the
        order in which writers commit."""
        if not self.db.postgres:
            return self._added_after_id(mark.last_id)
        assert mark.snapshot is not None
        found: dict[str, Entry] = {}
        snapshot = mark.snapshot
        for now, *row in self.db.execute(_PG_ADDED_SINCE, (mark.snapshot, mark.snapshot)):
            snapshot = now
            if row[0] is not None:
                found[row[0]] = Entry(*row)
        return Mark(snapshot=snapshot), found

    def _added_after_id(self, last_id: int) -> tuple[Mark, dict[str, Entry]]:
        # SQLite commits ids in the order it hands them out: one writer at a time, and a
        # writer holds the lock from before its insert until its commit (`BEGIN
        # IMMEDIATE`). A reader's snapshot holds every id up to the largest it sees, and
        # any id committed later is larger (AUTOINCREMENT never reuses a committed one).
        found = {}
        newest = last_id
        for rowid, *row in self.db.execute(
            "SELECT id, phone, reason, source, added_at FROM numbers WHERE id > ? ORDER BY id",
            (last_id,),
        ):
            found[row[0]] = Entry(*row)
            newest = rowid
        return Mark(last_id=newest), found


@dataclass(frozen=True)
class Mark:
    """A point in the list's history: SQLite, the last id seen; PostgreSQL, the snapshot
    (`pg_snapshot` as text) of the last read. Entries committed after it are new."""

    last_id: int = 0
    snapshot: str | None = None


_SQLITE_LAST_ID = "SELECT coalesce(max(id), 0) FROM numbers"
_SQLITE_VERSION = "SELECT coalesce(max(id), 0), count(*), total(added_at) FROM numbers"
_PG_SNAPSHOT = "SELECT pg_current_snapshot()::text"
# One statement, so one snapshot: the rows it sees and the snapshot it returns are the
# same. New: added by a transaction the last snapshot did not see as finished. Every
# transaction below that snapshot's xmin had finished, so the index range starts there.
_PG_ADDED_SINCE = """
SELECT pg_current_snapshot()::text, n.phone, n.reason, n.source, n.added_at
FROM (SELECT 1) AS one
LEFT JOIN numbers AS n
  ON n.txid >= pg_snapshot_xmin(?::pg_snapshot)
 AND NOT pg_visible_in_snapshot(n.txid, ?::pg_snapshot)
"""


def suppress_numbers(
    output_dir: Path | str, phones: Iterable[str], reason: str, url: str | None = None
) -> int:
    """The hook for `campaign reconcile`: put numbers whose delivery report says they must
    not be texted again on the store's list (source `report`); returns how many were new."""
    with SuppressionList(output_dir, url) as listed:
        return listed.add(phones, reason, "report")


class Watch:
    """The list as a running dispatcher sees it: what was on it at `mark` (taken before the
    load-time check: those rows are already `suppressed` in the ledger), plus what was
    added since, read again when the last read is `POLL_S` seconds old or more."""

    def __init__(
        self,
        output_dir: Path | str,
        mark: Mark,
        clock: Callable[[], float] = time.monotonic,
        url: str | None = None,
    ) -> None:
        self._list = SuppressionList(output_dir, url)
        self._mark = mark
        self._added: dict[str, Entry] = {}
        self._clock = clock
        self._polled: float | None = None  # None: not read since `mark`
        self._lock = asyncio.Lock()

    def _stale(self) -> bool:
        return self._polled is None or self._clock() - self._polled >= POLL_S

    async def check(self, phone: str | None) -> Entry | None:
        """The entry for `phone` if it was added to the list since the mark, as the list
        was less than `POLL_S` seconds ago."""
        if phone is None:
            return None
        if self._stale():
            async with self._lock:
                if self._stale():
                    # Before the query: its snapshot is taken later, never earlier.
                    started = self._clock()
                    self._mark, added = await asyncio.to_thread(self._list.added_since, self._mark)
                    self._added.update(added)
                    self._polled = started
        return self._added.get(phone)

    def close(self) -> None:
        self._list.close()


def apply_to_ledger(ledger: Ledger, listed: SuppressionList) -> int:
    """Mark the input's rows whose number is on the list `suppressed` (with why and since
    when), and make sendable again those whose number came off it. Returns how many rows
    are suppressed. Streams the rows: memory does not grow with the input.

    Skipped when neither the list nor the input's rows changed since it was last applied
    (`SuppressionList.version`, read before the rows: a number added while they are read
    makes the next run apply the list again, never miss it). The ledger forgets the
    version when its rows are replaced."""
    version = listed.version()
    if version is not None:
        applied = ledger.suppression_applied()
        if applied is not None and applied[0] == version:
            return int(applied[1])
    marks: list[tuple[int, str]] = []
    cleared: list[int] = []
    suppressed = 0
    for chunk in ledger.phone_rows():
        found = listed.lookup(phone for _, phone, _, _ in chunk)
        for row, phone, status, error in chunk:
            entry = found.get(phone)
            if entry is not None:
                suppressed += 1
                if status != "suppressed" or error != entry.why():
                    marks.append((row, entry.why()))
            elif status == "suppressed":
                cleared.append(row)
    ledger.set_suppressed(marks, cleared, None if version is None else [version, suppressed])
    return suppressed
