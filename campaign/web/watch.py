"""What the page's event streams share about a campaign that another process is sending.

`campaign run` in a terminal can send a campaign for hours (`--wait`) while pages show
its progress, which the server can only read from the campaign's directory. Reading the
ledger's counts (a join over every input row) for every open page every second would
cost a scan per page per second; so the streams of one campaign share one `Watch`, which
looks at the campaign's files (a few `stat`s and its lock) at most once a second for all
of them, and reads the ledger again only when those changed. The last stream to close
drops it.

On PostgreSQL there is no ledger file to look at: the watch keeps one read-only
connection to the campaign's ledger and asks it one question a second instead (its
generation, which every committed change bumps, and how many workers hold a live lease),
and closes it with the last stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campaign.report import SUMMARY_FILE
from campaign.store.campaigns import Store, is_locked
from campaign.store.ledger import LEDGER_FILE, Ledger, LedgerError
from campaign.web.state import MAPPING_FILE, WEB_FILE

LOOK_EVERY_S = 1.0
# What the page shows of a campaign comes from these files (and the lock).
WATCHED = (LEDGER_FILE, f"{LEDGER_FILE}-wal", SUMMARY_FILE, WEB_FILE, MAPPING_FILE)

View = dict[str, Any]


class LedgerProbe:
    """PostgreSQL: the campaign's ledger's `watch_stamp` over one read-only connection,
    opened when first asked (the campaign may have no ledger yet) and again after an error.
    Blocking: call it from a thread."""

    def __init__(self, store: Store, campaign: str, lease_s: float) -> None:
        self.store, self.campaign, self.lease_s = store, campaign, lease_s
        self._ledger: Ledger | None = None

    def stamp(self) -> object:
        try:
            if self._ledger is None:
                self._ledger = self.store.open_reader(self.campaign)
            return None if self._ledger is None else self._ledger.watch_stamp(self.lease_s)
        except LedgerError:
            self.close()
            return time.monotonic()  # unknown: read the view again (it shows what it can)

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None


@dataclass
class Watch:
    directory: Path
    probe: LedgerProbe | None = None  # PostgreSQL; SQLite: the ledger's files and lock
    every_s: float = LOOK_EVERY_S
    streams: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _stamp: tuple[object, ...] | None = None
    _view: View | None = None
    _looked_at: float = 0.0

    async def view(self, read: Callable[[], Awaitable[View]]) -> View:
        """The campaign's state as `read()` gives it, read again only when its files changed.
        Every stream gets the same dict: do not change it."""
        async with self._lock:
            now = time.monotonic()
            if self._view is not None and now - self._looked_at < self.every_s:
                return self._view
            stamp = await asyncio.to_thread(self._look)
            self._looked_at = now
            if self._view is None or stamp != self._stamp:
                self._view = await read()
                self._stamp = stamp
            return self._view

    def forget(self) -> None:
        """Read again next time (this server changed the campaign itself)."""
        self._view = None

    def _look(self) -> tuple[object, ...]:
        if self.probe is None:
            return (*_file_stamp(self.directory), is_locked(self.directory))
        return (*_file_stamp(self.directory), self.probe.stamp())


class Watches:
    def __init__(self, store: Store, lease_s: float) -> None:
        self.store, self.lease_s = store, lease_s
        self._watches: dict[str, Watch] = {}

    @contextlib.asynccontextmanager
    async def open(self, campaign: str, directory: Path) -> AsyncIterator[Watch]:
        """Held by each event stream of `campaign` while it is open."""
        watch = self._watches.get(campaign)
        if watch is None:
            probe = LedgerProbe(self.store, campaign, self.lease_s) if self.store.shared else None
            watch = self._watches[campaign] = Watch(directory, probe)
        watch.streams += 1
        try:
            yield watch
        finally:
            watch.streams -= 1
            if not watch.streams:
                del self._watches[campaign]
                if watch.probe is not None:
                    await asyncio.to_thread(watch.probe.close)

    def streams(self, campaign: str) -> int:
        """How many event streams of `campaign` are open."""
        watch = self._watches.get(campaign)
        return watch.streams if watch else 0


def _file_stamp(directory: Path) -> list[tuple[int, int, int] | None]:
    """Differs whenever the page's view of the campaign may have changed: its files, and
    (the caller adds it) whether a process holds it (a `campaign run` killed with -9
    changes no file)."""
    stats: list[tuple[int, int, int] | None] = []
    for name in WATCHED:
        try:
            found = (directory / name).stat()
        except OSError:
            stats.append(None)
        else:
            stats.append((found.st_mtime_ns, found.st_size, found.st_ino))
    return stats
