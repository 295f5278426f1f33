"""Reconcile: delivery reports from the Reporting API into the ledger, then the report.

`reconcile_campaign` is the one entry point, for the CLI and the web app alike. It owns
the campaign the way a run does (`open_campaign`: never at the same time as a run of
it), settles what a dead run left in flight, then:

1. plans the windows to read (`matching`): the span of the campaign's requests in
   windows of at most 7 days, without those read whole once their entries had settled;
2. reads every page of every window, concurrently within `reporting.rate_per_second`
   (`reporting.ReportingClient`), and stores each page's entries in the ledger as it
   arrives, so a killed reconcile loses nothing and the next one goes on from there;
   a window is marked read whole when every entry it promised was read;
3. judges the stored entries against every request the store knows to their numbers,
   this campaign's and every other campaign's (pandas, `matching.judge`), and records
   per person what the report says: the entry's status, `not_found` or `ambiguous`; an
   `unknown` person whose request the entries confirm is `sent`;
4. keeps the numbers whose delivery error names a `suppress_on` phrase for the
   suppression list, and rewrites results.csv and summary.json.

A page that cannot be read after its retries leaves its window unread (exit 1, what was
read is kept and matched); a refusal (401/403/404) ends the reconcile (exit 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from campaign.bounds import PAGES_QUEUED, PROGRESS_EVERY_PAGES
from campaign.errors import PageUnreadable, ReportingRefused, UsageError
from campaign.job import Job, Reporting
from campaign.logs import log_to_file
from campaign.report import write_report
from campaign.store.campaigns import LOG_FILE, store_of
from campaign.store.ledger import Ledger, LedgerError
from campaign.times import iso_utc

if TYPE_CHECKING:
    from campaign.avaamo import ReportingClient  # aiohttp: only once pages are read

log = structlog.get_logger(__name__)

EXIT_OK, EXIT_INCOMPLETE = 0, 1
MATCH_SHARES = 8  # numbers matched a share at a time (memory)
RECORD_BATCH = 50_000  # people recorded per transaction
MAX_FETCHERS = 64
T = TypeVar("T")


@dataclass
class Tally:
    """What a reconcile read; kept in the ledger (`meta.reconcile`) and in summary.json."""

    checked_at: str = ""
    windows: int = 0  # windows of the span
    windows_read: int = 0  # fetched whole by this reconcile
    windows_kept: int = 0  # read whole before, final: not fetched again
    windows_unread: int = 0  # a page could not be read, or fewer entries than promised
    pages: int = 0
    entries: int = 0  # usable entries of the span, stored
    bad_entries: int = 0  # skipped: no usable to_phone, created_at or sms_status
    repeated_entries: int = 0  # the same entry on another page of the same reading
    matched: int = 0
    unmatched_entries: int = 0  # owned by no request of the store: other senders
    not_found: int = 0
    ambiguous: int = 0  # unknown people the report can neither confirm nor rule out
    confirmed_unknown: int = 0  # unknown people the report shows did reach the API
    suppress_candidates: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class ReconcileOutcome:
    campaign: str
    directory: Path
    summary: dict[str, Any]
    tally: Tally
    exit_code: int
    message: str


def campaign_to_reconcile(job: Job, campaign: str | None) -> str:
    """`--campaign`, else the job's latest campaign that has a ledger."""
    store = store_of(job.output_dir, job.ledger)
    where = store.where
    chosen = job.campaign_for(campaign)
    if campaign is None and not store.exists(chosen):
        mine = [c for c in store.list_campaigns() if c.job == job.name]
        if not mine:
            raise UsageError(f"{job.path}: no campaign of this job in {where}")
        chosen = mine[0].id
    if not store.exists(chosen):
        raise UsageError(f"no campaign {chosen} in {where}")
    return chosen


def reporting_of(job: Job) -> Reporting:
    if job.reporting is None:
        raise UsageError(
            f"{job.path}: reporting: the job has no reporting: section (agent_id, "
            "access_token), which campaign reconcile needs"
        )
    return job.reporting


async def reconcile_campaign(job: Job, campaign: str | None = None) -> ReconcileOutcome:
    reporting = reporting_of(job)
    campaign = await asyncio.to_thread(campaign_to_reconcile, job, campaign)
    store = store_of(job.output_dir, job.ledger)
    with contextlib.ExitStack() as hold:
        owned = await asyncio.to_thread(hold.enter_context, store.open_campaign(campaign, job.name))
        await asyncio.to_thread(hold.enter_context, owned.alone("reconcile"))
        log_to_file(campaign, owned.directory / LOG_FILE)
        structlog.contextvars.bind_contextvars(campaign=campaign)
        worker = ThreadPoolExecutor(1, thread_name_prefix="reconcile-ledger")
        try:
            reader = _Reconcile(job, reporting, owned.ledger, owned.directory, worker)
            return await reader.run()
        finally:
            worker.shutdown(wait=True)
            structlog.contextvars.unbind_contextvars("campaign")
            log_to_file(campaign, None)
    raise AssertionError("unreachable")


class _Reconcile:
    """One reconcile of one owned campaign; every ledger call runs in `worker`, one at a
    time, on the campaign's own connection."""

    def __init__(
        self,
        job: Job,
        reporting: Reporting,
        ledger: Ledger,
        directory: Path,
        worker: ThreadPoolExecutor,
    ) -> None:
        self.job = job
        self.reporting = reporting
        self.ledger = ledger
        self.directory = directory
        self.worker = worker
        self.tally = Tally()
        self.run_id = 0
        # The store's other campaigns with requests in a reach, and whether all were read.
        self._others: dict[tuple[float, float], tuple[list[str], bool]] = {}

    async def _call(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.worker, call, *args)

    async def run(self) -> ReconcileOutcome:
        from campaign import matching

        ledger, campaign = self.ledger, self.directory.name
        # PostgreSQL: workers may be sending this campaign now; only those whose lease
        # expired are dead (an earlier reconcile is: this one holds the reconcile lock).
        # SQLite: the campaign's lock excludes any run.
        lease_s = None
        if ledger.postgres:
            lease_s = self.job.limits.lease_s
            await self._call(ledger.settle_runs_of, "reconcile")
        recovered = await self._call(ledger.recover, lease_s)
        if recovered:
            log.warning("in-flight recipients of an earlier run marked unknown", count=recovered)
        region = await self._call(self._phone_region)
        span = await self._call(ledger.request_span)
        if span is not None:
            span = await self._call(self._widened, span)
        now = time.time()
        settle_s = self.reporting.settle_minutes * 60
        whole = matching.request_span(*span, settle_s, now) if span else None
        planned = matching.windows(whole) if whole else []
        if not planned:
            summary = await self._call(write_report, ledger, self.directory, campaign)
            message = "no request to check yet" if span is None else "too early to check"
            return ReconcileOutcome(campaign, self.directory, summary, self.tally, 0, message)

        self.run_id = await self._call(ledger.start_run, "reconcile")
        state = "crashed"
        try:
            read_before = await self._call(ledger.report_windows)
            fetch = matching.to_read(planned, read_before)
            self.tally.windows = len(planned)
            self.tally.windows_kept = len(planned) - len(fetch)
            log.info("reading delivery reports", windows=len(fetch), kept=self.tally.windows_kept)
            await self._read(fetch, region)
            await self._call(self._match_and_record, planned, settle_s, now)
            state = "finished"
        except ReportingRefused:
            state = "aborted"
            raise
        finally:
            await self._call(ledger.end_run, self.run_id, state)
        await self._call(lambda: ledger.set_meta(reconcile=_public(self.tally)))
        summary = await self._call(write_report, ledger, self.directory, campaign)
        tally = self.tally
        code = EXIT_INCOMPLETE if tally.windows_unread else EXIT_OK
        message = (
            f"{tally.windows_unread} of {tally.windows} windows could not be read whole; "
            "what was read is recorded: run reconcile again"
            if tally.windows_unread
            else "delivery reports read"
        )
        log.info("reconcile ended", **{k: v for k, v in asdict(tally).items() if k != "problems"})
        return ReconcileOutcome(campaign, self.directory, summary, tally, code, message)

    def _phone_region(self) -> str:
        """The campaign's default region (for report numbers written without "+"); a
        campaign whose payloads carry no phone cannot be matched (custom auth)."""
        mapping = self.ledger.get_meta("mapping") or {}
        if mapping and not mapping.get("to_phone"):
            raise UsageError(
                f"campaign {self.directory.name} sends no phone numbers (custom user "
                "authentication): its delivery reports cannot be matched to people"
            )
        return str(mapping.get("default_region") or "US")

    # --- reading ------------------------------------------------------------------------

    async def _read(self, fetch: list[tuple[float, float]], region: str) -> None:
        from campaign.avaamo import ReportingClient

        reporting, limits = self.reporting, self.job.limits
        fetchers = min(MAX_FETCHERS, max(4, math.ceil(reporting.rate_per_second * 2)))
        client = ReportingClient(
            reporting.base_url or self.job.api.base_url,
            reporting.agent_id,
            reporting.access_token,
            rate_per_second=reporting.rate_per_second,
            timeout_s=self.job.api.timeout_s,
            max_attempts=limits.max_attempts,
            region=region,
            concurrency=fetchers,
            from_phone=reporting.from_phone,
        )
        states = [_Window(start, end) for start, end in fetch]
        queue: asyncio.Queue[tuple[_Window, int]] = asyncio.Queue()
        for window in states:
            await self._call(self.ledger.begin_window, window.start, window.end)
            queue.put_nowait((window, 1))
        async with client:
            workers = [asyncio.create_task(self._fetcher(client, queue)) for _ in range(fetchers)]
            try:
                joined = asyncio.create_task(queue.join())
                done, _ = await asyncio.wait(
                    [joined, *workers], return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is not joined:
                        task.result()  # a worker ended: only by an error (e.g. refused)
            finally:
                for task in [*workers, joined]:
                    task.cancel()
                await asyncio.gather(*workers, joined, return_exceptions=True)
        for window in states:
            await self._finish(window)

    async def _fetcher(
        self, client: ReportingClient, queue: asyncio.Queue[tuple[_Window, int]]
    ) -> None:
        while True:
            window, number = await queue.get()
            try:
                if window.failed or number > window.last_page:
                    continue
                try:
                    page = await client.page(window.start, window.end, number)
                except PageUnreadable as exc:
                    window.failed = window.failed or f"{_when(window)}: {exc}"
                    continue
                self._count_page()
                repeated = 0
                if page.entries:
                    store = self.ledger.store_entries
                    repeated = await self._call(store, page.entries, self.run_id)
                self.tally.bad_entries += page.bad
                self.tally.repeated_entries += repeated
                window.bad += page.bad
                window.read += page.received - repeated
                if number == 1:
                    window.promised = page.total_entries
                    window.last_page = page.last_page
                elif page.received == 0 or repeated == page.received:
                    # Past the end of what the API really has (its total_pages said more,
                    # or it gives the same entries again): no later page is asked for.
                    window.last_page = min(window.last_page, number)
                # Pages are asked for a few at a time: a window that claims millions of
                # pages must not have them all queued at once (memory).
                want = PAGES_QUEUED if number == 1 else 1
                while want and not window.failed and window.queued < window.last_page:
                    window.queued += 1
                    want -= 1
                    queue.put_nowait((window, window.queued))
            finally:
                queue.task_done()

    def _count_page(self) -> None:
        self.tally.pages += 1
        if self.tally.pages % PROGRESS_EVERY_PAGES == 0:
            log.info("still reading delivery reports", pages=self.tally.pages)

    async def _finish(self, window: _Window) -> None:
        if not window.failed and window.read < window.promised:
            window.failed = (
                f"{_when(window)}: the Reporting API promised {window.promised} entries and "
                f"gave {window.read}"
            )
        if window.bad:
            # Until a window reads whole, --resend-unknown must not take these for "none".
            await self._call(self.ledger.note_unusable_report, window.bad)
        if not window.failed and window.bad:
            window.failed = (
                f"{_when(window)}: {window.bad} unusable entries (no usable number, time or "
                "status): nobody in this window is taken for not_found"
            )
        if window.failed:
            self.tally.windows_unread += 1
            self.tally.problems.append(window.failed)
            log.warning("window not read whole", problem=window.failed)
            return
        await self._call(self.ledger.finish_window, window.start, window.end, time.time())
        self.tally.windows_read += 1

    # --- matching and recording ------------------------------------------------------------

    def _match_and_record(
        self, planned: list[tuple[float, float]], settle_s: float, now: float
    ) -> None:
        """In the ledger's thread: the stored entries judged against every request the
        store knows to their numbers (`matching.judge`), and what that says of each person
        recorded; the suppression candidates queued."""
        from campaign import matching

        ledger = self.ledger
        tally = self.tally
        checked_at = iso_utc(now) or ""
        tally.checked_at = checked_at
        tally.entries = tally.matched = tally.unmatched_entries = 0
        tally.not_found = tally.ambiguous = 0
        candidates: list[tuple[str, str, str]] = []
        span = ledger.attempt_span()
        if span is None:
            return
        reach = matching.reach_of(*span)
        others, whole = self._other_campaigns(reach)
        scope = matching.Scope(ledger.report_windows(), settle_s, now, reach, whole)
        # Every entry a request of the reach could own.
        start, end = reach[0] - matching.SKEW_S, reach[1] + matching.MATCH_S
        # Requests and entries only ever match by number: one share of the numbers at a
        # time keeps memory to a share of the campaign's (and of the store's beside it).
        for share in range(MATCH_SHARES):
            requests = self._requests(reach, share, others)
            entries = _frame(
                ledger.report_entries(start, end, share, MATCH_SHARES), matching.ENTRY_COLUMNS
            )
            entries = entries.astype({"entry": "int64", "phone": "int64", "created_at": "float64"})
            judged = matching.judge(requests, entries, scope)
            mine = requests[requests["person"] >= 0]
            verdicts = matching.by_person(judged, mine.groupby("person")["at"].max())
            owned = judged["entry"].notna() & judged["verdict"].isin(
                [matching.MATCHED, matching.CONFIRMED]
            )
            tally.entries += len(entries)
            tally.unmatched_entries += len(entries) - int(owned.sum())
            tally.matched += len(verdicts.matched)
            tally.not_found += len(verdicts.not_found)
            tally.ambiguous += len(verdicts.ambiguous)
            self._record_matches(verdicts, checked_at)
            candidates += suppress_candidates(
                verdicts.matched, self.reporting.suppress_on, checked_at
            )
        candidates.sort()
        queue_for_suppression(ledger, self.directory.parent, candidates, self.job.ledger)
        tally.suppress_candidates = len(candidates)

    def _widened(self, span: tuple[float, float]) -> tuple[float, float]:
        """The span of the campaign's requests widened to the groups they are in: another
        campaign's request to the same number minutes before the first (or after the
        last) shares its entries, and a group is judged only once read whole."""
        from campaign import matching

        own = self.ledger.attempt_span()
        if own is None:
            return span
        reach = matching.reach_of(*own)
        others, _ = self._other_campaigns(reach)
        if not others:
            return span
        first, last = span
        for share in range(MATCH_SHARES):
            found = matching.extent(self._requests(reach, share, others))
            if found is not None:
                first, last = min(first, found[0]), max(last, found[1])
        return first, last

    def _other_campaigns(self, reach: tuple[float, float]) -> tuple[list[str], bool]:
        """The store's other campaigns with a request in `reach` (report entries carry no
        campaign: theirs are judged with ours), and whether every one could be read."""
        if reach in self._others:
            return self._others[reach]
        store = store_of(self.job.output_dir, self.job.ledger)
        found, whole = [], True
        for campaign in sorted(set(store.campaign_ids()) - {self.directory.name}):
            try:
                with store.reader(campaign) as other:
                    span = None if other is None else other.attempt_span()
            except LedgerError as exc:
                # Its requests could own any entry: nothing is confirmed or not_found.
                whole = False
                self.tally.problems.append(f"campaign {campaign} could not be read: {exc}")
                log.warning("another campaign's requests could not be read", other=campaign)
                continue
            if span is not None and span[0] <= reach[1] and span[1] >= reach[0]:
                found.append(campaign)
        self._others[reach] = (found, whole)
        return found, whole

    def _requests(self, reach: tuple[float, float], share: int, others: list[str]) -> Any:
        """Every request of the store in `reach` to a number of `share`: this campaign's,
        then the other campaigns' (person -1: nobody of this campaign)."""
        from campaign import matching

        columns = matching.REQUEST_COLUMNS
        frames = [_frame(self.ledger.requests(*reach, share, MATCH_SHARES), columns)]
        store = store_of(self.job.output_dir, self.job.ledger)
        for campaign in others:
            with store.reader(campaign) as other:
                if other is None:
                    continue
                theirs = _frame(other.requests(*reach, share, MATCH_SHARES), columns)
            theirs = theirs[theirs["kind"] != matching.NOT_ARRIVED]
            frames.append(theirs.assign(person=-1))
        import pandas as pd

        found = pd.concat(frames, ignore_index=True)
        types = {"person": "int64", "phone": "int64", "at": "float64", "kind": "int64"}
        return found.astype(types)

    def _record_matches(self, verdicts: Any, checked_at: str) -> None:
        import pandas as pd

        matched, missing, unsure = verdicts.matched, verdicts.not_found, verdicts.ambiguous
        for offset in range(0, max(len(matched), len(missing), len(unsure), 1), RECORD_BATCH):
            chunk = matched.iloc[offset : offset + RECORD_BATCH]
            found = [
                (int(rid), str(status), None if pd.isna(error) else str(error), int(entry), at)
                for rid, status, error, entry, at in zip(
                    chunk["person"],
                    chunk["status"],
                    chunk["error"],
                    chunk["entry"],
                    [iso_utc(t) or "" for t in chunk["created_at"]],
                    strict=True,
                )
            ]
            nobody = [
                (int(rid), float(at))
                for rid, at in missing.iloc[offset : offset + RECORD_BATCH].itertuples(index=False)
            ]
            why = [
                (int(rid), str(reason))
                for rid, reason in unsure.iloc[offset : offset + RECORD_BATCH].itertuples(
                    index=False
                )
            ]
            self.tally.confirmed_unknown += self.ledger.record_deliveries(
                found, nobody, checked_at, why
            )


def suppress_candidates(
    matched: Any, phrases: list[str], seen_at: str
) -> list[tuple[str, str, str]]:
    """(E.164 number, reason, seen at) for every matched person whose delivery error
    contains a `suppress_on` phrase (any case)."""
    wanted = [phrase.casefold() for phrase in phrases]
    errors = matched["error"].dropna()
    hits = errors[errors.map(lambda e: any(p in str(e).casefold() for p in wanted)).astype(bool)]
    return sorted(
        {
            (f"+{int(matched.at[i, 'phone'])}", f"delivery report: {error}", seen_at)
            for i, error in hits.items()
        }
    )


def queue_for_suppression(
    ledger: Ledger,
    output_dir: Path,
    candidates: list[tuple[str, str, str]],
    url: str | None = None,
) -> None:
    """Put the numbers on the store's suppression list (source `report`), so no campaign
    sends to them again; the campaign's ledger keeps them too, as the record of why."""
    if not candidates:
        return
    from campaign.store.suppression import suppress_numbers

    ledger.add_suppress_candidates(candidates)
    by_reason: dict[str, list[str]] = {}
    for phone, reason, _ in candidates:
        by_reason.setdefault(reason, []).append(phone)
    for reason, phones in by_reason.items():
        suppress_numbers(output_dir, phones, reason, url)


@dataclass
class _Window:
    start: float
    end: float
    promised: int = 0
    read: int = 0
    last_page: int = 1
    queued: int = 1  # pages put in the queue so far (1 to `queued`)
    bad: int = 0  # unusable entries: the window is not read whole
    failed: str = ""


def _when(window: _Window) -> str:
    return f"window {iso_utc(window.start)} to {iso_utc(window.end)}"


def _frame(batches: Iterator[list[tuple[Any, ...]]], columns: list[str]) -> Any:
    """Batches of rows as one DataFrame, built batch by batch (memory: the frame, not a
    list of every row as Python tuples)."""
    import pandas as pd

    frames = [pd.DataFrame.from_records(batch, columns=columns) for batch in batches]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    return pd.concat(frames, ignore_index=True)


def _public(tally: Tally) -> dict[str, Any]:
    shown = asdict(tally)
    shown["problems"] = shown["problems"][:20]
    return shown
