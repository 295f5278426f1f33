"""The pipeline: load -> map -> ledger -> dispatch -> report, for the CLI and the web app.

`run_campaign` is the one entry point. It settles what an earlier run left in flight
before reading new input, decides what to send from the ledger alone, and always ends by
writing the report, whether the run finished, aborted or was interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from campaign import __version__
from campaign.errors import UsageError
from campaign.job import CAMPAIGN_ID, Job
from campaign.ledger import SENDABLE, Ledger, MappedRow
from campaign.load import open_sheet
from campaign.logs import log_to_file
from campaign.mapping import Mapper
from campaign.progress import DispatchResult, Progress
from campaign.report import RESULTS_FILE, write_report, write_summary
from campaign.store import LOG_FILE, check_unfinished, job_lock, open_campaign

if TYPE_CHECKING:
    from campaign.dispatch import Dispatcher

log = structlog.get_logger(__name__)

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


@dataclass
class RunOutcome:
    campaign: str
    directory: Path
    summary: dict[str, Any]
    exit_code: int
    state: str  # validated | finished | interrupted | aborted
    message: str = ""
    invalid_examples: list[tuple[int, str]] = field(default_factory=list)

    @property
    def results(self) -> Path:
        return self.directory / RESULTS_FILE


class RunControl:
    """Lets a caller (signal handler, web request) stop a run at any stage."""

    def __init__(self) -> None:
        self.stopping = False
        self.dispatcher: Dispatcher | None = None
        self.progress: Progress | None = None

    def stop(self) -> None:
        self.stopping = True
        if self.dispatcher is not None:
            self.dispatcher.stop()


class Interrupted(Exception):
    """Stopped before sending started (e.g. Ctrl-C while the input was being read)."""


def campaign_id_for(job: Job, options: RunOptions) -> str:
    # `--campaign ""` (an unset variable) is refused, not read as "the default campaign".
    campaign = job.campaign_id() if options.campaign is None else options.campaign
    if not CAMPAIGN_ID.fullmatch(campaign):
        raise UsageError(f"--campaign {campaign!r}: use letters, digits, '.', '_' and '-' only")
    return campaign


async def run_campaign(
    job: Job,
    options: RunOptions,
    control: RunControl | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RunOutcome:
    control = control or RunControl()
    campaign = campaign_id_for(job, options)
    output_dir = Path(job.output_dir)
    input_path = options.input or job.input
    if not input_path:
        raise UsageError(f"{job.path}: no input: set `input:` in the job file or pass --input")

    directory = output_dir / campaign
    created = not directory.exists()
    try:
        with contextlib.ExitStack() as hold:
            with job_lock(output_dir, job.name):
                if not options.dry_run and not options.campaign and not options.new:
                    check_unfinished(output_dir, job.name, campaign)
                ledger = hold.enter_context(open_campaign(output_dir, campaign, job.name))
            log_to_file(campaign, directory / LOG_FILE)
            structlog.contextvars.bind_contextvars(campaign=campaign)
            try:
                return await _run_locked(job, options, control, on_progress, ledger, directory)
            finally:
                structlog.contextvars.unbind_contextvars("campaign")
                log_to_file(campaign, None)
    except UsageError:
        if created:
            # An unusable input leaves no empty campaign behind to confuse the next run.
            shutil.rmtree(directory, ignore_errors=True)
        raise


async def _run_locked(
    job: Job,
    options: RunOptions,
    control: RunControl,
    on_progress: Callable[[Progress], None] | None,
    ledger: Ledger,
    directory: Path,
) -> RunOutcome:
    campaign = directory.name
    recovered = ledger.recover()
    if recovered:
        log.warning("in-flight recipients of an earlier run marked unknown", count=recovered)

    started = time.monotonic()
    try:
        await asyncio.to_thread(_load_input, ledger, job, options, control)
    except Interrupted:
        summary = write_report(ledger, directory, campaign)
        return RunOutcome(
            campaign,
            directory,
            summary,
            EXIT_INTERRUPTED,
            "interrupted",
            "interrupted while reading the input; nothing was sent",
        )
    log.info("input mapped", seconds=round(time.monotonic() - started, 2), **_counts(ledger))

    if options.dry_run:
        summary = write_report(ledger, directory, campaign)
        code = EXIT_INCOMPLETE if summary["counts"]["invalid"] else EXIT_OK
        return RunOutcome(
            campaign,
            directory,
            summary,
            code,
            "validated",
            invalid_examples=invalid_examples(ledger),
        )

    states: tuple[str, ...] = ("failed",) if options.only_failed else SENDABLE
    if options.resend_unknown:
        states += ("unknown",)
    run_id = ledger.start_run("run")
    total = ledger.count_targets(states)
    progress = control.progress = Progress(total=total)
    log.info(
        "sending",
        recipients=total,
        rate_per_second=job.limits.rate_per_second,
        concurrency=job.limits.concurrency,
    )
    state = "crashed"
    try:
        result = await _send(job, ledger, run_id, states, control, on_progress)
        state = "aborted" if result.aborted else "interrupted" if result.interrupted else "finished"
    finally:
        ledger.end_run(run_id, state)
        summary = _report(ledger, directory, recovered)

    counts = summary["counts"]
    if result.aborted:
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
    return RunOutcome(campaign, directory, summary, code, state, message)


async def _send(
    job: Job,
    ledger: Ledger,
    run_id: int,
    states: tuple[str, ...],
    control: RunControl,
    on_progress: Callable[[Progress], None] | None,
) -> DispatchResult:
    assert control.progress is not None
    if not control.progress.total:
        return DispatchResult(interrupted=control.stopping)
    from campaign.dispatch import Dispatcher, LedgerWriter  # aiohttp: only when sending

    writer = LedgerWriter(ledger, run_id)
    try:
        dispatcher = Dispatcher(job.api, job.limits, writer, control.progress, on_progress)
        control.dispatcher = dispatcher
        if control.stopping:
            dispatcher.stop()
        writer.start()
        return await dispatcher.run(ledger.targets(states))
    finally:
        await writer.close()


def _report(ledger: Ledger, directory: Path, recovered: int) -> dict[str, Any]:
    """Rewrite the report, unless nothing it shows can have changed since it was written:
    same input rows, no request since, nothing recovered (a no-op rerun of a big campaign
    should not spend its time rewriting an identical file)."""
    counts = ledger.counts()
    stamp = json.dumps([ledger.get_meta("input_fingerprint"), ledger.total_requests(), counts])
    unchanged = not recovered and ledger.get_meta("report_stamp") == stamp
    if unchanged and (directory / RESULTS_FILE).is_file():
        return write_summary(ledger, directory, directory.name, counts)
    summary = write_report(ledger, directory, directory.name)
    ledger.set_meta(report_stamp=stamp)
    return summary


def _load_input(ledger: Ledger, job: Job, options: RunOptions, control: RunControl) -> None:
    path = Path(options.input or job.input or "")
    sheet = open_sheet(path, job.sheet)
    mapper = Mapper.compile(job.mapping, sheet)
    _keep_recipient_key(ledger, list(job.mapping.recipient_key))
    fingerprint = _fingerprint(path, job)
    if ledger.get_meta("input_fingerprint") == fingerprint:
        return  # the same file under the same mapping: the ledger's rows are this input

    def chunks() -> Iterator[list[MappedRow]]:
        for chunk in mapper.map_chunks(sheet):
            if control.stopping:
                raise Interrupted
            yield chunk

    ledger.replace_rows(chunks(), sheet.columns, fingerprint)


def _keep_recipient_key(ledger: Ledger, key: list[str]) -> None:
    """A campaign's recipient key cannot change once a request went out: under a new key
    everyone would be a new person, and be sent to again."""
    stored = ledger.get_meta("recipient_key")
    if stored == key:
        return
    if stored is not None and ledger.total_requests():
        raise UsageError(
            f"campaign {ledger.get_meta('campaign')} identifies people by "
            f"recipient_key {stored}, and the job now says {key}: under a new key everyone "
            "would be sent again. Restore recipient_key, or start a new campaign (--campaign ID)"
        )
    ledger.set_meta(recipient_key=key)


def _fingerprint(path: Path, job: Job) -> str:
    """What the mapped rows depend on: the file's bytes, the mapping, the sheet, the code."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    config = json.dumps([job.mapping.model_dump(), job.sheet, __version__], sort_keys=True)
    digest.update(config.encode())
    return digest.hexdigest()


def invalid_examples(ledger: Ledger, limit: int = INVALID_EXAMPLES) -> list[tuple[int, str]]:
    return ledger.db.execute(
        "SELECT row, error FROM rows WHERE status = 'invalid' ORDER BY row LIMIT ?", (limit,)
    ).fetchall()


def _counts(ledger: Ledger) -> dict[str, int]:
    return {k: v for k, v in ledger.counts().items() if v}


def rebuild_report(directory: Path) -> dict[str, Any]:
    """`campaign report`: rewrite results.csv and summary.json from the ledger alone."""
    from campaign.ledger import LEDGER_FILE

    if not (directory / LEDGER_FILE).is_file():
        raise UsageError(f"{directory}: not a campaign directory (no {LEDGER_FILE})")
    ledger = Ledger(directory / LEDGER_FILE)
    try:
        return write_report(ledger, directory, directory.name)
    finally:
        ledger.close()
