"""The pipeline: load -> map -> ledger -> dispatch -> report, for the CLI and the web app.

`run_campaign` is the one entry point. It takes the campaign (its lock, and under it every
decision about the campaign's directory), settles what an earlier run left in flight
before reading new input, checks that people are mapped as they were when requests went
out, decides what to send from the ledger alone, and writes the report when a run ends,
whether it finished, aborted or was interrupted. Everything that blocks (locks, SQLite,
files) runs in a thread, so the web server's other campaigns keep moving meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog

from campaign import __version__
from campaign.errors import CampaignBusy, UsageError
from campaign.fixed_mapping import keep_mapping, made_on_page, own_mapping
from campaign.job import Job, Limits
from campaign.load import open_sheet
from campaign.logs import log_to_file
from campaign.mapping import Mapper
from campaign.progress import DispatchResult, Progress
from campaign.records import SENDABLE, MappedRow, Target
from campaign.report import RESULTS_FILE, current_summary, write_report
from campaign.store.campaigns import LOG_FILE, OpenCampaign, Store, store_of
from campaign.store.ledger import Ledger, LedgerError
from campaign.store.suppression import Mark, SuppressionList, Watch, apply_to_ledger
from campaign.times import iso_instant, iso_local
from campaign.windows import Schedule, make_schedule

if TYPE_CHECKING:
    from campaign.dispatch import Dispatcher
    from campaign.gate import Gate
    from campaign.rate import Limiter, SharedRateLimiter
    from campaign.store.budget import RateBudget

log = structlog.get_logger(__name__)
T = TypeVar("T")

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE, EXIT_ABORTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
INVALID_EXAMPLES = 10


@dataclass
class RunOptions:
    input: str | None = None
    campaign: str | None = None
    new: bool = False
    only_failed: bool = False
    resend_unknown: bool = False
    dry_run: bool = False
    # Who runs it: a campaign made on the page and continued from the command line keeps
    # the page's mapping (the job file's is only the page's default).
    origin: Literal["cli", "page"] = "cli"
    # Send what the ledger holds, with the campaign's stored mapping, reading no input:
    # the page continuing a campaign of the command line.
    reuse_rows: bool = False
    # Stay until every pending person's send window has opened, sending each as it opens.
    wait: bool = False


@dataclass
class RunOutcome:
    campaign: str
    directory: Path
    summary: dict[str, Any]
    exit_code: int
    state: str  # validated | finished | interrupted | aborted
    message: str = ""
    invalid_examples: list[tuple[int, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # send windows, deadline, suppression

    @property
    def results(self) -> Path:
        return self.directory / RESULTS_FILE


class RunControl:
    """Lets a caller (signal handler, web request) stop a run at any stage."""

    def __init__(self, *, limiter: Limiter | None = None) -> None:
        self.stopping = False
        self.cut_off_reason: str | None = None  # why this worker lost its ledger
        self.dispatcher: Dispatcher | None = None
        self.progress: Progress | None = None
        self.limiter = limiter  # shared by every run to the channel in one process; None: own
        self._wake: asyncio.Event | None = None

    def stop(self) -> None:
        self.stopping = True
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self._wake is not None:
            self._wake.set()

    def cut_off(self, reason: str) -> None:
        """Stop this worker for its ledger (not the API): the run ends incomplete, exit 1.
        It holds for every later round too: a `--wait` worker cut off while it waits for a
        send window wakes up and stops, rather than send the next round on a lease it
        lost."""
        log.error("stopping", reason=reason)
        self.cut_off_reason = reason
        if self.dispatcher is not None:
            self.dispatcher.abort(reason, cut_off=True)
        if self._wake is not None:
            self._wake.set()

    async def sleep_until(self, when: float) -> None:
        """Wait until Unix time `when`, or until `stop()`."""
        self._wake = asyncio.Event()
        if self.stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(when - time.time(), 0))


class Interrupted(Exception):
    """Stopped before sending started (e.g. Ctrl-C while the input was being read)."""


async def run_campaign(
    job: Job,
    options: RunOptions,
    control: RunControl | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    control = control or RunControl()
    campaign = job.campaign_for(options.campaign)
    if not (options.input or job.input or options.reuse_rows or options.campaign):
        raise UsageError(f"{job.path}: no input: set `input:` in the job file or pass --input")
    with contextlib.ExitStack() as hold:
        owned = await asyncio.to_thread(_take, hold, job, options, campaign)
        log_to_file(campaign, owned.directory / LOG_FILE)
        structlog.contextvars.bind_contextvars(campaign=campaign)
        try:
            return await _run_owned(job, options, control, on_progress, owned)
        except UsageError:
            if owned.fresh and not owned.ledger.total_requests():
                owned.discard()  # an unusable input leaves no empty campaign behind
            raise
        finally:
            structlog.contextvars.unbind_contextvars("campaign")
            log_to_file(campaign, None)
    raise AssertionError("unreachable")


def _take(hold: contextlib.ExitStack, job: Job, options: RunOptions, campaign: str) -> OpenCampaign:
    """Own the campaign: under the job's lock, the midnight guard and the campaign's lock
    are one step. Nothing is created or removed before the campaign's lock is held."""
    store = store_of(job.output_dir, job.ledger)
    with store.job_lock(job.name):
        if not options.dry_run and not options.campaign and not options.new:
            store.check_unfinished(job.name, campaign, job.limits.lease_s)
        return hold.enter_context(store.open_campaign(campaign, job.name, options.origin))


@dataclass
class _Prepared:
    job: Job  # as this campaign is run (its mapping may be the campaign's own)
    recovered: int
    suppressed: int
    run_id: int | None  # None: a dry run
    listed_at: Mark | None  # the suppression list as the load-time check began to read it


def _prepare(owned: OpenCampaign, job: Job, options: RunOptions, control: RunControl) -> _Prepared:
    """Settle what dead runs left, read the input into the ledger and register the run,
    as one step: on PostgreSQL, workers that start meanwhile wait for it, then join the
    run that loaded (they read no input of their own, and check that their mapping is
    the campaign's)."""
    ledger = owned.ledger
    with owned.loading():
        recovered = ledger.recover(job.limits.lease_s if owned.shared else None)
        live = ledger.live_workers(job.limits.lease_s) if owned.shared else 0
        if live and options.dry_run:
            # A validate reads the input into the ledger: never under workers sending it.
            raise CampaignBusy(
                f"campaign {owned.directory.name} is being sent by {live} worker(s) now; "
                "validate it when they have finished"
            )
        job = _load_input(ledger, job, options, control, owned.directory, joining=live > 0)
        suppressed, listed_at = _suppress(ledger, job)
        run_id = None if options.dry_run else ledger.start_run("run")
    return _Prepared(job, recovered, suppressed, run_id, listed_at)


async def _run_owned(
    job: Job,
    options: RunOptions,
    control: RunControl,
    on_progress: Callable[[Progress], None] | None,
    owned: OpenCampaign,
) -> RunOutcome:
    ledger, directory = owned.ledger, owned.directory
    campaign = directory.name
    started = time.monotonic()
    try:
        prepared = await asyncio.to_thread(_prepare, owned, job, options, control)
    except Interrupted:
        summary = await asyncio.to_thread(_report, ledger, directory)
        return RunOutcome(
            campaign,
            directory,
            summary,
            EXIT_INTERRUPTED,
            "interrupted",
            "interrupted while reading the input; nothing was sent",
        )
    job, suppressed = prepared.job, prepared.suppressed
    if prepared.recovered:
        log.warning(
            "in-flight recipients of an earlier run marked unknown", count=prepared.recovered
        )
    # A report that is current holds the counts: no scan of the campaign (a rerun of a
    # finished campaign reads nothing more).
    current = await asyncio.to_thread(current_summary, ledger, directory)
    counts = await asyncio.to_thread(_counts, ledger, current)
    log.info("input mapped", seconds=round(time.monotonic() - started, 2), **counts)
    schedule = make_schedule(
        job.limits.send_window,
        job.limits.timezone,
        job.limits.deadline,
        dt.datetime.now(dt.UTC),
    )
    notes = [f"{suppressed} on the suppression list: not sent"] if suppressed else []

    if options.dry_run:
        if schedule is not None:
            notes.append(await asyncio.to_thread(window_note, ledger, schedule, SENDABLE))
        summary = await asyncio.to_thread(_report, ledger, directory)
        code = EXIT_INCOMPLETE if summary["counts"]["invalid"] else EXIT_OK
        return RunOutcome(
            campaign,
            directory,
            summary,
            code,
            "validated",
            invalid_examples=invalid_examples(ledger),
            notes=notes,
        )

    states: tuple[str, ...] = ("failed",) if options.only_failed else SENDABLE
    if options.resend_unknown:
        states += ("unknown",)
    run_id = prepared.run_id
    assert run_id is not None
    total = await asyncio.to_thread(_count_targets, ledger, states, counts, current)
    progress = control.progress = Progress(total=total)
    log.info(
        "sending",
        recipients=total,
        rate_per_second=job.limits.rate_per_second,
        concurrency=job.limits.concurrency,
    )
    state = "crashed"
    try:
        gate = _gate(job, schedule, prepared.listed_at)
        try:
            result = await _send(job, ledger, run_id, states, control, on_progress, gate, options)
        finally:
            if gate is not None:
                gate.close()
        if result.cut_off or result.interrupted:
            state = "interrupted"  # run again to continue
        else:
            state = "aborted" if result.aborted else "finished"
        if result.deadline:
            assert schedule is not None and schedule.deadline is not None
            passed = f"deadline passed ({iso_instant(schedule.deadline)})"
            await asyncio.to_thread(ledger.note_pending, passed)
            notes.append(f"{passed}: no new requests were sent after it")
        elif progress.waiting:
            notes.append(_waiting_note(progress))
    finally:
        await asyncio.to_thread(ledger.end_run, run_id, state)
        summary = await asyncio.to_thread(_report, ledger, directory)

    counts = summary["counts"]
    others = 0
    if owned.shared and not (result.aborted or result.interrupted or counts["failed"]):
        others = await asyncio.to_thread(ledger.live_workers, job.limits.lease_s)
        # Only while they have everyone left in hand: a worker that died (still counted
        # until its lease expires) may hold people for their send window.
        if others and await asyncio.to_thread(ledger.left_behind):
            others = 0
    if others:
        # Their people in flight show `unknown` in this report until they are answered.
        code, message = (
            EXIT_OK,
            f"finished this worker's share; {others} other worker(s) still sending: "
            "the last one to finish writes the final report",
        )
    elif result.aborted and result.cut_off:
        code, message = EXIT_INCOMPLETE, f"stopped: {result.aborted}; run again to continue"
    elif result.aborted:
        code, message = EXIT_ABORTED, f"aborted: {result.aborted}"
    elif result.interrupted:
        code, message = (
            EXIT_INTERRUPTED,
            "interrupted: state saved; run the same command again to continue",
        )
    elif counts["failed"] or counts["unknown"] or counts["pending"]:
        code, message = EXIT_INCOMPLETE, "finished, but some rows were not sent"
    elif not counts["sent"]:
        code, message = EXIT_OK, "finished: no row is sendable (see _error in the results)"
    else:
        code, message = EXIT_OK, "finished: every sendable row is sent"
    log.info("run ended", state=state, requests=progress.requests, **counts)
    return RunOutcome(campaign, directory, summary, code, state, message, notes=notes)


async def _send(
    job: Job,
    ledger: Ledger,
    run_id: int,
    states: tuple[str, ...],
    control: RunControl,
    on_progress: Callable[[Progress], None] | None,
    gate: Gate | None = None,
    options: RunOptions | None = None,
) -> DispatchResult:
    """Send to the targets; with `--wait`, then wait for the first closed window to open
    and send the people held for it, again and again, until none is held."""
    progress = control.progress
    assert progress is not None
    waits = bool(options and options.wait)
    # With --wait, others holding people for their window keep this worker (see below).
    watching = waits and await _set_aside_elsewhere(ledger, run_id)
    if not watching and await _nobody_to_send(ledger, run_id, states, progress):
        return DispatchResult(interrupted=control.stopping)
    from campaign.dispatch import Dispatcher, LedgerWriter  # aiohttp: only when sending

    writer = LedgerWriter(ledger, run_id)
    await writer.start()
    held: set[int] | None = None  # after the first round: only the people held for windows
    lease = _keep_lease(ledger, run_id, job.limits.lease_s, control) if ledger.postgres else None
    limiter = control.limiter
    shared = None
    if limiter is None and job.ledger is not None:
        shared = await _shared_limiter(job)
        limiter = shared[0]
    try:
        while True:
            dispatcher = Dispatcher(
                job.api,
                job.limits,
                writer,
                progress,
                on_progress,
                limiter=limiter,
                gate=gate,
            )
            control.dispatcher = dispatcher
            if control.stopping:
                dispatcher.stop()
            if control.cut_off_reason is not None:
                dispatcher.abort(control.cut_off_reason, cut_off=True)
                return dispatcher.result
            progress.waiting, progress.opens_at = 0, None
            if held is None:
                targets = _claims(ledger, run_id, states, job.limits, control)
            else:
                targets = _held_then_let_go(ledger, run_id, states, held, job.limits, control)
            result = await dispatcher.run(targets)
            if not waits or result.aborted:
                return result
            if result.interrupted or result.deadline:
                return result
            held = dispatcher.held_for_window
            if progress.opens_at is not None:
                if on_progress is not None:
                    on_progress(progress)
                log.info(
                    "waiting for send windows",
                    waiting=progress.waiting,
                    opens=iso_local(progress.opens_at),
                )
                wake_at = progress.opens_at
            else:
                # Others hold people for their window: stay, to take them over (in a later
                # round, `_held_then_let_go`) if their worker dies before it opens. Once
                # nobody does, one more round takes those let go since this one looked.
                others_hold = await _set_aside_elsewhere(ledger, run_id)
                if not (others_hold or watching):
                    return result
                watching = others_hold
                wake_at = time.time() + (job.limits.lease_s / 3 if others_hold else 0)
            await control.sleep_until(wake_at)
            if control.stopping:
                return DispatchResult(interrupted=True)
    finally:
        if lease is not None:
            lease.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease
        if shared is not None:
            await shared[0].aclose()
            await shared[1].close()
        await writer.close()


async def _nobody_to_send(
    ledger: Ledger, run_id: int, states: tuple[str, ...], progress: Progress
) -> bool:
    """Nobody was counted, and on PostgreSQL no other worker holds people not settled yet
    (while one does, this run waits for them like any worker out of people, `_claims`).
    Counted again after that look: a dead worker's people may have been let go since the
    first count, by another worker's lease sweep."""
    if progress.total:
        return False
    if not ledger.postgres:
        return True
    if await asyncio.to_thread(ledger.held_elsewhere, run_id):
        return False
    progress.total = await asyncio.to_thread(ledger.count_targets, states)
    return not progress.total


async def _set_aside_elsewhere(ledger: Ledger, run_id: int) -> bool:
    return ledger.postgres and await asyncio.to_thread(ledger.set_aside_elsewhere, run_id)


async def _shared_limiter(job: Job) -> tuple[SharedRateLimiter, RateBudget]:
    """On PostgreSQL the channel's rate is one budget for every worker on every host: its
    slots are granted by the database (store/budget.py)."""
    from campaign.avaamo import send_url
    from campaign.rate import SharedRateLimiter
    from campaign.store.budget import RateBudget

    assert job.ledger is not None
    budget = await RateBudget.connect(job.ledger, send_url(job.api))
    return SharedRateLimiter(job.limits.rate_per_second, budget.grant), budget


async def _claims(
    ledger: Ledger, run_id: int, states: tuple[str, ...], limits: Limits, control: RunControl
) -> AsyncIterator[list[Target]]:
    """The people this run sends to, claimed a batch at a time in input order. On
    PostgreSQL, when none is left to claim but other workers still hold people not yet
    sent, it waits for them: a worker that dies leaves its people to the others once its
    lease expires, and only then does the campaign end."""
    # Enough people to keep the workers busy while the next batch is claimed, but no more
    # than about a second's worth at the rate: several workers then run out of people
    # close together, instead of one sending the last big batch alone.
    batch = min(max(2 * limits.concurrency, 100), 1000)
    batch = min(batch, max(limits.concurrency, math.ceil(limits.rate_per_second)))
    after, claimed = 0, 0
    last_look = False
    while not control.stopping:
        found = await _to_the_end(ledger.claim, run_id, states, after, batch)
        if found:
            after, last_look = found[-1].row, False
            claimed += len(found)
            if control.progress is not None and claimed > control.progress.total:
                # People a dead worker held when this run counted its share at the start.
                control.progress.total = claimed
            yield found
        elif after:
            after = 0  # once more from the top: people a dead worker let go meanwhile
        elif last_look or not ledger.postgres:
            return
        elif await _to_the_end(ledger.held_elsewhere, run_id):
            # This run's lease sweep (`_keep_lease`) settles them if their worker died: on a
            # connection of its own, and never waiting long for a stopped worker's rows.
            await asyncio.sleep(limits.lease_s / 3)
        else:
            # Nobody else holds anyone now, but a dead worker's people may have been let
            # go between the claim that found none and that look (this run's lease sweep
            # settles dead workers on a connection of its own, at any moment): one more
            # claim, made after the look, sees them. Without it the run ended leaving
            # them pending.
            last_look = True


async def _to_the_end(call: Callable[..., T], *args: Any) -> T:
    """`call` in a thread. Cancelled (the run halts while the next batch is claimed), it
    still waits for the call to return: the call uses the run's own connection, which
    ending the run and writing its report use next, and a thread cannot be stopped."""
    running = asyncio.ensure_future(asyncio.to_thread(call, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


async def _held_then_let_go(
    ledger: Ledger,
    run_id: int,
    states: tuple[str, ...],
    held: set[int],
    limits: Limits,
    control: RunControl,
) -> AsyncIterator[list[Target]]:
    """A `--wait` round: the people this run held for the window that opened, then any
    that others let go meanwhile (a worker that died waiting for a window of its own)."""
    if found := await _to_the_end(ledger.claimed, run_id, states, held):
        yield found
    async for batch in _claims(ledger, run_id, states, limits, control):
        yield batch


def _keep_lease(
    ledger: Ledger, run_id: int, lease_s: float, control: RunControl
) -> asyncio.Task[None]:
    """Renew this worker's lease while it sends (a third of the lease apart), and settle
    the workers whose lease expired: whoever notices first. A worker that finds its own
    lease gone (it was cut off longer than the lease) stops: its people are others' now."""

    async def beat(keeper: Ledger) -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                alive = await asyncio.to_thread(keeper.heartbeat, run_id)
            except LedgerError as exc:
                control.cut_off(f"the ledger cannot be reached ({exc})")
                return
            if not alive:
                control.cut_off(f"this worker's lease expired (no heartbeat for {lease_s:g} s)")
                return

    async def sweep(sweeper: Ledger) -> None:
        # On a connection of its own: settling a stopped worker may wait for the rows it
        # holds, and that must never hold up this worker's own heartbeat.
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                settled = await asyncio.to_thread(sweeper.recover, lease_s, lease_s / 3, run_id)
            except LedgerError as exc:
                log.warning("could not settle expired workers this time", error=str(exc))
                continue
            if settled:
                log.warning(
                    "a worker's lease expired: its people in flight are unknown", count=settled
                )

    async def keep() -> None:
        keeper = await asyncio.to_thread(ledger.reopen)
        sweeper = await asyncio.to_thread(ledger.reopen)
        try:
            await asyncio.gather(beat(keeper), sweep(sweeper))
        finally:
            await asyncio.to_thread(keeper.close)
            await asyncio.to_thread(sweeper.close)

    return asyncio.create_task(keep(), name="lease")


def _gate(job: Job, schedule: Schedule | None, listed_at: Mark | None) -> Gate | None:
    """The last look before each request. Its watch of the list starts where the load-time
    check started reading (`listed_at`): a number added while the input was loaded, or
    while this run waited for others to load it, is seen."""
    from campaign.gate import Gate

    watch = None
    if job.mapping.to_phone is not None and listed_at is not None:
        watch = Watch(job.output_dir, listed_at, url=job.ledger)
    if schedule is None and watch is None:
        return None
    return Gate(schedule, watch)


def _suppress(ledger: Ledger, job: Job) -> tuple[int, Mark | None]:
    """Rows whose number is on the store's suppression list become `suppressed`. Returns
    how many, and the list's mark taken before the check read it (None: no numbers)."""
    if job.mapping.to_phone is None:
        return 0, None  # custom-auth channels: no number, not covered
    with SuppressionList(job.output_dir, job.ledger) as listed:
        # First the mark, then the check: whatever commits between the two is seen twice,
        # never zero times.
        listed_at = listed.mark()
        return apply_to_ledger(ledger, listed), listed_at


def _waiting_note(progress: Progress) -> str:
    first = f"; the first opens {iso_local(progress.opens_at)}" if progress.opens_at else ""
    return f"{progress.waiting} waiting for their send window{first}; run again then, or use --wait"


def window_note(ledger: Ledger, schedule: Schedule, states: tuple[str, ...]) -> str:
    """How many of the people to send are inside their send window now, and when the
    others open (`validate`)."""
    now = dt.datetime.now(dt.UTC)
    inside = outside = 0
    first: dt.datetime | None = None
    for batch in ledger.targets(states):
        for target in batch:
            verdict = schedule.verdict(target.to_phone, now)
            if verdict.deadline:
                assert schedule.deadline is not None
                return f"deadline passed ({iso_instant(schedule.deadline)}): nothing would be sent"
            if verdict.send:
                inside += 1
                continue
            outside += 1
            if verdict.until is not None and (first is None or verdict.until < first):
                first = verdict.until
    text = f"{inside} inside their send window now, {outside} outside"
    if first is not None:
        text += f" (the first opens {iso_local(first)})"
    return text


def _report(ledger: Ledger, directory: Path) -> dict[str, Any]:
    """Rewrite the report, unless the one there was written from the ledger as it is now
    (a rerun that changed nobody leaves results.csv and summary.json untouched)."""
    current = current_summary(ledger, directory)
    return current if current is not None else write_report(ledger, directory, directory.name)


def _load_input(
    ledger: Ledger,
    job: Job,
    options: RunOptions,
    control: RunControl,
    directory: Path,
    joining: bool = False,
) -> Job:
    """Map the input into the ledger; returns the job as this campaign is run (its mapping
    may be the campaign's own, see `fixed_mapping.own_mapping`). `joining`: another
    worker loaded the campaign's input and is sending it; this one shares its rows."""
    own = own_mapping(ledger, directory)
    page_campaign_from_cli = made_on_page(ledger) and options.origin == "cli"
    if own is not None and (options.reuse_rows or page_campaign_from_cli):
        job = job.with_changes(mapping=own)
    if options.reuse_rows or (page_campaign_from_cli and not options.input):
        if not ledger.has_rows():
            raise UsageError(
                f"campaign {directory.name} has no rows yet (validate it on the page first, "
                "or give the input with --input)"
            )
        log.info("continuing with the campaign's own rows and mapping")
        return job
    if page_campaign_from_cli and own is not None:
        log.info("a campaign of the page: its own mapping is used, not the job file's")
    if joining and not (options.input or job.input):
        log.info("joining the workers already sending this campaign")
        return job
    if not (options.input or job.input):
        raise UsageError(f"{job.path}: no input: set `input:` in the job file or pass --input")
    path = Path(options.input or job.input or "")
    sheet = open_sheet(path, job.sheet)
    mapper = Mapper.compile(job.mapping, sheet)
    keep_mapping(ledger, job.mapping, sheet, joining)
    fingerprint = _fingerprint(path, ledger.get_meta("mapping"), job.sheet)
    if joining:
        # Their rows cannot be replaced under them. A worker that died still counts until
        # its lease expires: a fixed input given right after would otherwise be ignored.
        if ledger.get_meta("input_fingerprint") != fingerprint:
            raise CampaignBusy(
                f"{path}: campaign {directory.name} is being sent by other workers from "
                "another input (another file, sheet or version of campaign); run again "
                "once they have finished (a worker that stopped "
                f"counts until its lease expires, {job.limits.lease_s:g} s after it stopped)"
            )
        log.info("joining the workers already sending this campaign, with their input")
        return job
    if ledger.get_meta("input_fingerprint") == fingerprint:
        return job  # the same file under the same mapping: the ledger's rows are this input

    def chunks() -> Iterator[list[MappedRow]]:
        for chunk in mapper.map_chunks(sheet):
            if control.stopping:
                raise Interrupted
            yield chunk

    ledger.replace_rows(chunks(), sheet.columns, fingerprint)
    return job


def _fingerprint(path: Path, mapping: object, sheet: str | None) -> str:
    """What the mapped rows depend on: the file's bytes, the mapping (as the campaign
    keeps it: the same one written another way is the same), the sheet, the code."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    config = json.dumps([mapping, sheet, __version__], sort_keys=True)
    digest.update(config.encode())
    return digest.hexdigest()


def invalid_examples(ledger: Ledger, limit: int = INVALID_EXAMPLES) -> list[tuple[int, str]]:
    return [(row, error) for row, error, _ in ledger.rows_with_status("invalid", 0, limit)[1]]


def _counts(ledger: Ledger, current: dict[str, Any] | None) -> dict[str, int]:
    """Lines of the report per status (those with any): from the current summary if there
    is one, else from the ledger."""
    counts = current["counts"] if current is not None else ledger.counts()
    return {k: v for k, v in counts.items() if v}


def _count_targets(
    ledger: Ledger, states: tuple[str, ...], counts: dict[str, int], current: object
) -> int:
    """People to send now. Nobody, without a look at the ledger, when the current report
    shows no line in those states (its `unknown` lines include those in flight)."""
    if current is not None and not any(counts.get(state) for state in states):
        return 0
    return ledger.count_targets(states)


def rebuild_report(store: Store, campaign: str) -> dict[str, Any]:
    """`campaign report`: rewrite results.csv and summary.json from the ledger alone. It
    takes the campaign like a run does: a run in progress writes the report itself when
    it ends, and a report written beside it could land after the run's and be stale."""
    with store.open_campaign(campaign, "") as owned:
        return write_report(owned.ledger, owned.directory, campaign)
