"""Avaamo's own opt-outs, read into the suppression list (docs/compliance.md).

People who reply STOP to the channel are opted out by Avaamo; START opts them back in.
The SMS Opt Status API lists them (`avaamo.OptStatusClient`):

    -> {"current_page", "per_page": 100, "total_entries", "total_pages", "time_token",
        "entries": [{"to_phone", "from_phone", "created_at", "status", "current_status"}]}

A sync (`sync_opt_outs`: `campaign suppress sync`, and every run before it sends):
- the first one, or `--full`, reads every number whose current status is opt-out;
- later ones read the windows since the last whole sync (less `OVERLAP_S`), at most
  `WINDOW_S` each, for both statuses: a number currently opted in comes off the list
  only where Avaamo or a delivery report put it there (`OPT_IN_REMOVES`), never where a
  person did;
- each reading goes page by page, never more than `PAGES_AHEAD` pages held, writing a
  batch at a time, so a million numbers cost what a few thousand do;
- a reading is whole when it gave every entry its first page promised
  (`total_entries`; `total_pages` is only a hint). Only a sync whose readings were all
  whole records its start as the last sync; what a partial one read is kept.

Several hosts syncing one PostgreSQL store take turns (an advisory lock for the whole
sync), so an older reading never undoes a newer one; SQLite stores take a file lock.
Additions are ordinary inserts, so a running dispatcher's watch of the list sees them
within seconds (the moment invariant).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from campaign.errors import (
    CampaignError,
    LedgerError,
    PageUnreadable,
    ReportingRefused,
    UsageError,
)
from campaign.reporting import OPT_IN, OPT_OUT, OptPage
from campaign.times import iso_utc

if TYPE_CHECKING:
    from collections.abc import Callable

    from campaign.avaamo import OptStatusClient
    from campaign.job import Job, Reporting
    from campaign.store.suppression import SuppressionList

log = structlog.get_logger(__name__)

SOURCE = "avaamo"
SYNC_NAME = "avaamo-opt-status"
REASON = "opted out at Avaamo (STOP)"
WINDOW_S = 7 * 24 * 3600  # the provider's recommended span per query
OVERLAP_S = 120  # a later sync reads from the last one's start less this
SYNC_EVERY_S = 600.0  # a run sending syncs again this often
# Tests only (a long run must sync within seconds): read here and nowhere else.
EVERY_ENV = "CAMPAIGN_OPT_STATUS_EVERY_S"
PAGES_AHEAD = 8
WRITE_BATCH = 5_000
LOCK_FILE = "suppression.sync.lock"
T = TypeVar("T")
_SYNC_FAILURES: tuple[type[Exception], ...] = (CampaignError, OSError, *LedgerError)


class OptOutsUnavailable(CampaignError):
    """A run's sync failed and the last whole one is too old: nothing is sent."""

    exit_code = 3


def reason(created_at: float | None) -> str:
    when = iso_utc(created_at) if created_at is not None else None
    return f"{REASON} at {when}" if when else REASON


@dataclass
class SyncResult:
    full: bool
    added: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: int = 0  # unusable entries
    pages: int = 0
    readings: int = 0
    unread: int = 0  # readings not read whole
    problems: list[str] = field(default_factory=list)
    last_whole: float | None = None  # after this sync

    def line(self) -> str:
        kind = "full" if self.full else "since the last sync"
        text = (
            f"Avaamo opt-outs ({kind}): added {self.added}, removed {self.removed}, "
            f"{self.unchanged} unchanged, {self.skipped} unusable entries skipped "
            f"({self.pages} pages)"
        )
        if self.unread:
            text += f"; {self.unread} of {self.readings} readings not read whole"
        return text


def wanted(reporting: Reporting | None) -> bool:
    return reporting is not None and reporting.opt_status != "off"


def reporting_for_sync(job: Job) -> Reporting:
    if job.reporting is None:
        raise UsageError(
            f"{job.path}: reporting: the job has no reporting: section (access_token), "
            "which reading Avaamo's opt-outs needs"
        )
    return job.reporting


async def sync_opt_outs(job: Job, *, full: bool = False) -> SyncResult:
    """Read Avaamo's opt-outs into the store's suppression list. `ReportingRefused` on
    401/403/404; a reading that could not be read whole is counted in `unread`."""
    reporting = reporting_for_sync(job)
    worker = ThreadPoolExecutor(1, thread_name_prefix="opt-status")
    loop = asyncio.get_running_loop()
    try:
        listed = await loop.run_in_executor(worker, _open, job)
        try:
            async with _turn(loop, worker, listed, job):
                return await _Sync(job, reporting, listed, loop, worker, full).run()
        finally:
            await loop.run_in_executor(worker, listed.close)
    finally:
        worker.shutdown(wait=True)


def _open(job: Job) -> SuppressionList:
    from campaign.store.suppression import SuppressionList

    return SuppressionList(job.output_dir, job.ledger)


@contextlib.asynccontextmanager
async def _turn(
    loop: asyncio.AbstractEventLoop, worker: ThreadPoolExecutor, listed: SuppressionList, job: Job
) -> Any:
    """One sync of a store at a time, across processes and hosts."""
    if listed.db.postgres:
        await loop.run_in_executor(worker, lambda: listed.db.advisory_lock(SYNC_NAME))
        try:
            yield
        finally:
            await loop.run_in_executor(worker, listed.db.advisory_unlock, SYNC_NAME)
        return
    path = Path(job.output_dir) / LOCK_FILE
    handle = await loop.run_in_executor(worker, _locked_file, path)
    try:
        yield
    finally:
        handle.close()  # closing lets the lock go


def _locked_file(path: Path) -> Any:
    handle = path.open("a")
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


class _Sync:
    def __init__(
        self,
        job: Job,
        reporting: Reporting,
        listed: SuppressionList,
        loop: asyncio.AbstractEventLoop,
        worker: ThreadPoolExecutor,
        full: bool,
    ) -> None:
        self.job = job
        self.reporting = reporting
        self.listed = listed
        self.loop = loop
        self.worker = worker
        self.result = SyncResult(full=full)
        self.outs: list[tuple[str, str]] = []
        self.ins: list[str] = []

    async def _call(self, call: Callable[..., T], *args: Any) -> T:
        return await self.loop.run_in_executor(self.worker, call, *args)

    async def run(self) -> SyncResult:
        from campaign.avaamo import OptStatusClient

        result = self.result
        last = await self._call(self.listed.synced_at, SYNC_NAME)
        started = time.time()
        readings = _plan(None if result.full else last, started)
        result.full = readings == [(OPT_OUT, None)]
        reporting = self.reporting
        client = OptStatusClient(
            reporting.base_url or self.job.api.base_url,
            reporting.access_token,
            rate_per_second=reporting.rate_per_second,
            timeout_s=self.job.api.timeout_s,
            max_attempts=self.job.limits.max_attempts,
            concurrency=PAGES_AHEAD,
            from_phone=reporting.from_phone,
            region=self.job.mapping.default_region,
        )
        async with client:
            for current, span in readings:
                result.readings += 1
                try:
                    await self._reading(client, current, span)
                except PageUnreadable as exc:
                    result.unread += 1
                    result.problems.append(f"{_named(current, span)}: {exc}")
                finally:
                    await self._flush()
        if not result.unread:
            await self._call(self.listed.set_synced, SYNC_NAME, started)
        result.last_whole = await self._call(self.listed.synced_at, SYNC_NAME)
        log.info(
            "Avaamo opt-outs synced",
            full=result.full,
            added=result.added,
            removed=result.removed,
            unchanged=result.unchanged,
            skipped=result.skipped,
            pages=result.pages,
            unread=result.unread,
        )
        return result

    async def _reading(
        self, client: OptStatusClient, current: str, span: tuple[float, float] | None
    ) -> None:
        first = await client.page(current, 1, span)
        await self._take(first)
        promised, got, last = first.total_entries, first.received, first.last_page
        ahead: deque[asyncio.Task[OptPage]] = deque()
        following = 2
        try:
            while ahead or following <= last:
                while following <= last and len(ahead) < PAGES_AHEAD:
                    ahead.append(asyncio.create_task(client.page(current, following, span)))
                    following += 1
                page = await ahead.popleft()
                await self._take(page)
                got += page.received
                if page.received == 0:
                    break  # past the end of what the API has, whatever it promised
        finally:
            for task in ahead:
                task.cancel()
            await asyncio.gather(*ahead, return_exceptions=True)
        if got < promised:
            raise PageUnreadable(f"the API promised {promised} entries and gave {got}")

    async def _take(self, page: OptPage) -> None:
        self.result.pages += 1
        self.result.skipped += page.bad
        for phone, current, created_at in page.entries:
            if current == OPT_OUT:
                self.outs.append((phone, reason(created_at)))
            else:
                self.ins.append(phone)
        if len(self.outs) + len(self.ins) >= WRITE_BATCH:
            await self._flush()

    async def _flush(self) -> None:
        outs, ins = self.outs, self.ins
        self.outs, self.ins = [], []
        if outs:
            added = await self._call(self.listed.add_each, outs, SOURCE)
            self.result.added += added
            self.result.unchanged += len(outs) - added
        if ins:
            removed = await self._call(self.listed.remove_opted_in, ins)
            self.result.removed += removed
            self.result.unchanged += len(ins) - removed


def _plan(last: float | None, now: float) -> list[tuple[str, tuple[float, float] | None]]:
    """The readings of a sync: every current opt-out; or since `last`, window by window,
    opt-ins first (within one sync, a later opt-out wins: the safe side)."""
    if last is None:
        return [(OPT_OUT, None)]
    readings: list[tuple[str, tuple[float, float] | None]] = []
    for span in _windows(min(last, now) - OVERLAP_S, now):
        readings += [(OPT_IN, span), (OPT_OUT, span)]
    return readings


def _windows(start: float, end: float) -> Iterator[tuple[float, float]]:
    while start < end:
        yield start, min(start + WINDOW_S, end)
        start += WINDOW_S


def _named(current: str, span: tuple[float, float] | None) -> str:
    if span is None:
        return f"every {current}"
    return f"{current} {iso_utc(span[0])} to {iso_utc(span[1])}"


# --- before and while a run sends ----------------------------------------------------------


def sync_every_s() -> float:
    """How often a sending run syncs again; the environment may shorten it (tests)."""
    try:
        every = float(os.environ.get(EVERY_ENV, SYNC_EVERY_S))
    except ValueError:
        return SYNC_EVERY_S
    return every if math.isfinite(every) and every > 0 else SYNC_EVERY_S


async def sync_before_send(job: Job) -> str | None:
    """The sync before a run's first request. Returns a warning to show when it failed but
    the last whole one is young enough; `OptOutsUnavailable` (exit 3) when it is not."""
    if not wanted(job.reporting) or job.mapping.to_phone is None:
        return None
    problem, last = await _try_sync(job)
    if problem is None:
        return None
    return _judged(job, problem, last)


def _judged(job: Job, problem: str, last: float | None) -> str:
    reporting = reporting_for_sync(job)
    max_age_s = reporting.opt_status_max_age_hours * 3600
    since = f"last whole sync {iso_utc(last)}" if last is not None else "never synced whole"
    if last is not None and time.time() - last < max_age_s:
        warning = f"{problem}; going on: {since}, within opt_status_max_age_hours"
        log.warning("Avaamo opt-outs not read", problem=problem, last_whole=iso_utc(last))
        return warning
    raise OptOutsUnavailable(
        f"{problem} ({since}; reporting.opt_status is required): nothing was sent"
    )


async def _try_sync(job: Job) -> tuple[str | None, float | None]:
    """(what went wrong or None, the last whole sync)."""
    try:
        result = await sync_opt_outs(job)
    except ReportingRefused as exc:
        return str(exc), await asyncio.to_thread(_last_whole, job)
    if result.unread:
        first = result.problems[0] if result.problems else "a page could not be read"
        return f"the SMS Opt Status API could not be read whole: {first}", result.last_whole
    return None, result.last_whole


def _last_whole(job: Job) -> float | None:
    with _open(job) as listed:
        return listed.synced_at(SYNC_NAME)


async def keep_synced(job: Job, cut_off: Callable[[str], None]) -> None:
    """While a run sends: sync every `sync_every_s()`; a failure while the last whole
    sync is too old stops the run (`cut_off`)."""
    every = sync_every_s()
    while True:
        await asyncio.sleep(every)
        try:
            problem, last = await _try_sync(job)
            if problem is not None:
                _judged(job, problem, last)
        except OptOutsUnavailable as exc:
            cut_off(str(exc))
            return
        except _SYNC_FAILURES as exc:
            # The list as it was stays in force; the next round tries again.
            log.warning("Avaamo opt-outs not read", problem=str(exc)[:200])
