"""The suppression list: numbers that must not get another SMS, whatever a spreadsheet says.

One list per store, shared by every campaign and the page: `{output_dir}/suppression.sqlite`
(WAL, synchronous=FULL, schema versioned with `PRAGMA user_version`), apart from the
campaigns' ledgers because it outlives them. Each entry: the E.164 number, why, where it
came from (`report`: a delivery report said so; `manual`: `suppress add` or the page;
`import`: `suppress import`) and when it was added. Adding a number already on the list
keeps the first entry: "since when" is the first time.

The list is read three ways:
- when a run maps its input, every row whose number is on it becomes `suppressed`
  (and every row whose number came off it is sendable again): `apply_to_ledger`;
- right before a request leaves, against the numbers added since the run began:
  `Watch`, which looks for additions at most every `POLL_S` seconds with one indexed
  query (ids only grow), so a number added by another process is respected within a
  second or two without a query per request;
- by `campaign suppress list` and the page.

Removals are not watched during a run: a number taken off the list while a run goes is
sendable from the next run on (the safe side).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from campaign.report import iso_utc
from campaign.store.db import Database
from campaign.store.ledger import Ledger, LedgerError, Transaction, connect

SUPPRESSION_FILE = "suppression.sqlite"
SCHEMA_VERSION = 1
SHARED_SCHEMA = "campaign_shared"  # PostgreSQL: what every campaign of the store shares
SOURCES = ("report", "manual", "import")
POLL_S = 1.0
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
                    if self.db.postgres:  # hosts starting together: one creates it
                        self.db.execute(
                            "SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", ("suppression",)
                        )
                    self.db.execute(self.db.ddl(_SCHEMA))
                    self.db.set_version(SCHEMA_VERSION)
        except LedgerError:
            self.db.close()
            raise

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
        now = time.time()
        with Transaction(self.db):
            return max(
                self.db.executemany(
                    "INSERT INTO numbers (phone, reason, source, added_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (phone) DO NOTHING",
                    [(p, reason, source, now) for p in phones],
                ).rowcount,
                0,
            )

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

    def last_id(self) -> int:
        """The id of the latest addition ever (ids are never reused)."""
        return int(self.db.execute("SELECT coalesce(max(id), 0) FROM numbers").fetchone()[0])

    def added_since(self, last_id: int) -> tuple[int, dict[str, Entry]]:
        """(the new last id, the entries added after `last_id`)."""
        found = {}
        newest = last_id
        for rowid, *row in self.db.execute(
            "SELECT id, phone, reason, source, added_at FROM numbers WHERE id > ? ORDER BY id",
            (last_id,),
        ):
            found[row[0]] = Entry(*row)
            newest = rowid
        return newest, found


def suppress_numbers(
    output_dir: Path | str, phones: Iterable[str], reason: str, url: str | None = None
) -> int:
    """The hook for `campaign reconcile`: put numbers whose delivery report says they must
    not be texted again on the store's list (source `report`); returns how many were new."""
    with SuppressionList(output_dir, url) as listed:
        return listed.add(phones, reason, "report")


class Watch:
    """The list as a running dispatcher sees it: what was on it when the input was mapped
    (those rows are already `suppressed` in the ledger), plus what was added since, looked
    for at most every `POLL_S` seconds."""

    def __init__(
        self,
        output_dir: Path | str,
        clock: Callable[[], float] = time.monotonic,
        url: str | None = None,
    ) -> None:
        self._list = SuppressionList(output_dir, url)
        self._last_id = self._list.last_id()
        self._added: dict[str, Entry] = {}
        self._clock = clock
        self._polled = self._clock()
        self._lock = asyncio.Lock()

    async def check(self, phone: str | None) -> Entry | None:
        """The entry for `phone` if it was added to the list since the run began."""
        if phone is None:
            return None
        if self._clock() - self._polled >= POLL_S:
            async with self._lock:
                if self._clock() - self._polled >= POLL_S:
                    self._last_id, added = await asyncio.to_thread(
                        self._list.added_since, self._last_id
                    )
                    self._added.update(added)
                    self._polled = self._clock()
        return self._added.get(phone)

    def close(self) -> None:
        self._list.close()


def apply_to_ledger(ledger: Ledger, listed: SuppressionList) -> int:
    """Mark the input's rows whose number is on the list `suppressed` (with why and since
    when), and make sendable again those whose number came off it. Returns how many rows
    are suppressed. Streams the rows: memory does not grow with the input."""
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
    ledger.set_suppressed(marks, cleared)
    return suppressed


def normalize_phones(
    given: list[str], region: str, where: str, first: int = 0
) -> tuple[list[str], list[str]]:
    """(every number as E.164, one problem per entry that is not a number, placed by
    `where.format(position)`), for the command and the page that add numbers by hand."""
    from campaign.mapping import normalize_phone

    phones, problems = [], []
    for i, text in enumerate(given, start=first):
        phone, why = normalize_phone(text.strip(), region)
        if phone is None:
            problems.append(f"{where.format(i)}: {why}")
        else:
            phones.append(phone)
    return phones, problems
