"""What the page's event streams share about a campaign that another process is sending.

`campaign run` in a terminal can send a campaign for hours (`--wait`) while pages show
its progress, which the server can only read from the campaign's directory. Reading the
ledger's counts (a join over every input row) for every open page every second would
cost a scan per page per second; so the streams of one campaign share one `Watch`, which
looks at the campaign's files (a few `stat`s and its lock) at most once a second for all
of them, and reads the ledger again only when those changed. The last stream to close
drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from campaign.report import SUMMARY_FILE
from campaign.store.campaigns import is_locked
from campaign.store.ledger import LEDGER_FILE
from campaign.web.state import MAPPING_FILE, WEB_FILE

LOOK_EVERY_S = 1.0
# What the page shows of a campaign comes from these files (and the lock).
WATCHED = (LEDGER_FILE, f"{LEDGER_FILE}-wal", SUMMARY_FILE, WEB_FILE, MAPPING_FILE)

View = dict[str, Any]


@dataclass
class Watch:
    directory: Path
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
            stamp = await asyncio.to_thread(_stamp, self.directory)
            self._looked_at = now
            if self._view is None or stamp != self._stamp:
                self._view = await read()
                self._stamp = stamp
            return self._view

    def forget(self) -> None:
        """Read again next time (this server changed the campaign itself)."""
        self._view = None


class Watches:
    def __init__(self) -> None:
        self._watches: dict[str, Watch] = {}

    @contextlib.contextmanager
    def open(self, campaign: str, directory: Path) -> Iterator[Watch]:
        """Held by each event stream of `campaign` while it is open."""
        watch = self._watches.setdefault(campaign, Watch(directory))
        watch.streams += 1
        try:
            yield watch
        finally:
            watch.streams -= 1
            if not watch.streams:
                del self._watches[campaign]

    def streams(self, campaign: str) -> int:
        """How many event streams of `campaign` are open."""
        watch = self._watches.get(campaign)
        return watch.streams if watch else 0


def _stamp(directory: Path) -> tuple[object, ...]:
    """Differs whenever the page's view of the campaign may have changed: its files, and
    whether a process holds it (a `campaign run` killed with -9 changes no file)."""
    stats: list[tuple[int, int, int] | None] = []
    for name in WATCHED:
        try:
            found = (directory / name).stat()
        except OSError:
            stats.append(None)
        else:
            stats.append((found.st_mtime_ns, found.st_size, found.st_ino))
    return (*stats, is_locked(directory))
