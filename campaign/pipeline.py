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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import structlog

from campaign import __version__
from campaign.errors import CampaignBusy, UsageError
from campaign.fixed_mapping import keep_mapping, made_on_page, own_mapping
from campaign.job import Job
from campaign.load import open_sheet
from campaign.logs import log_to_file
from campaign.mapping import Mapper
from campaign.progress import Progress
from campaign.records import SENDABLE, MappedRow
from campaign.report import RESULTS_FILE, current_summary, write_report
from campaign.store.campaigns import LOG_FILE, OpenCampaign, Store, store_of
from campaign.store.ledger import Ledger
from campaign.store.suppression import Mark, SuppressionList, Watch, apply_to_ledger
from campaign.times import iso_instant, iso_local
from campaign.windows import Schedule, make_schedule
from campaign.worker import RunControl, Worker

if TYPE_CHECKING:
    from campaign.gate import Gate

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
    warning = None
    if not options.dry_run:
        # Before anything is created or sent: Avaamo's opt-outs onto the list, so the
        # load-time check sees them (a failure here is exit 3, nothing sent).
        from campaign.optouts import sync_before_send

        warning = await sync_before_send(job)
    with contextlib.ExitStack() as hold:
        owned = await asyncio.to_thread(_take, hold, job, options, campaign)
        log_to_file(campaign, owned.directory / LOG_FILE)
        structlog.contextvars.bind_contextvars(campaign=campaign)
        try:
            return await _run_owned(job, options, control, on_progress, owned, warning)
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
    warning: str | None = None,
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
    if warning:
        notes.append(warning)

    if options.dry_run:
        if suppressed and job.reporting is not None:
            opted_out = await asyncio.to_thread(_opted_out_at_avaamo, ledger)
            notes.append(f"{opted_out} of them opted out at Avaamo (STOP)")
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
        synced = _keep_synced(job, control)
        try:
            worker = Worker(job, ledger, run_id, states, control, on_progress, gate, options.wait)
            result = await worker.run()
        finally:
            if synced is not None:
                synced.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await synced
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


def _keep_synced(job: Job, control: RunControl) -> asyncio.Task[None] | None:
    """Avaamo's opt-outs read again every few minutes while this run sends; the gate's
    watch of the list then holds back whoever they add."""
    from campaign.optouts import keep_synced, wanted

    if not wanted(job.reporting) or job.mapping.to_phone is None:
        return None
    return asyncio.create_task(keep_synced(job, control.cut_off), name="opt-status")


def _opted_out_at_avaamo(ledger: Ledger) -> int:
    """Rows suppressed because their number is on the list from Avaamo's opt-outs."""
    from campaign.optouts import SOURCE

    marker = f"({SOURCE}): "
    return sum(
        1
        for chunk in ledger.phone_rows()
        for _, _, status, error in chunk
        if status == "suppressed" and error is not None and marker in error
    )


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
