"""`campaign test`: one real SMS per test number, with the params of one row of the input.

The SMS text lives in the Avaamo agent, filled from the params: sending a row to the
operator's own phone is the only way to see what it produces. The row is mapped by the
run's own code (`mapping.Mapper`, with the campaign's stored mapping once it has one,
docs/design.md invariant 6), `to_phone` is replaced by the test number, and the request
goes through the run's client, rate limiter and retry policy.

The campaign's people are never touched: the tests are recorded in a table of their own
(`store.test_sends`). With `reporting:`, the test number's entry in the Reporting API
carries the `message` the phone received: it is waited for (up to `MAX_WAIT_S`) and
printed. The params and the message go to the terminal only, never to a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from campaign.errors import CampaignBusy, CampaignError, PageUnreadable, UsageError
from campaign.fixed_mapping import made_on_page, own_mapping
from campaign.job import Job
from campaign.load import open_sheet
from campaign.logs import log_to_file, mask_phone
from campaign.mapping import Mapper
from campaign.phones import normalize_phone
from campaign.records import MappedRow
from campaign.reporting import Received
from campaign.store import test_sends
from campaign.store.campaigns import LOG_FILE, Store, store_of
from campaign.store.ledger import Ledger
from campaign.store.suppression import SuppressionList
from campaign.windows import make_schedule

log = structlog.get_logger(__name__)

MAX_WAIT_S = 120.0  # how long the report entry of a test is waited for
POLL_S = 2.0  # between looks at the Reporting API while waiting
SKEW_S = 120.0  # the Reporting API's clock may be this far behind ours (docs/delivery-reports.md)
FINAL = frozenset({"delivered", "undelivered", "failed"})
REACHED = frozenset({"delivered", "sent"})


class TestRefused(CampaignError):
    """401/403/404 from the Send API: the channel is wrong (exit 3)."""

    exit_code = 3


@dataclass
class TestRequest:
    phone: str
    id: int = 0
    state: str = "not sent"  # sent | failed | unknown | not sent (an earlier one was fatal)
    http_status: int | None = None
    error: str | None = None
    sent_at: float = 0.0
    fatal: bool = False
    received: Received | None = None


@dataclass
class Plan:
    """What a test sends: checked before anything leaves."""

    job: Job  # with the campaign's own mapping when it has one
    campaign: str
    row: int
    payload: dict[str, str]  # the row's, to_phone left out
    phones: list[str]


@dataclass
class TestOutcome:
    plan: Plan
    requests: list[TestRequest] = field(default_factory=list)
    waited: bool = False  # reporting: was asked
    stopped_waiting: bool = False

    @property
    def exit_code(self) -> int:
        if any(r.fatal for r in self.requests):
            return 3
        if any(r.state != "sent" for r in self.requests):
            return 1
        if self.waited and any(
            r.received is None or r.received.status not in REACHED for r in self.requests
        ):
            return 1
        return 0


# --- before anything leaves --------------------------------------------------------------


def plan_test(
    job: Job,
    given: list[str],
    row: int | None,
    campaign: str | None,
    input_path: str | None = None,
    from_page: bool = False,
) -> Plan:
    """The row, its payload and the test numbers; `UsageError` (exit 2) for a number that
    is not valid, on the suppression list or outside its send window, and for a row that
    does not exist or is invalid."""
    campaign_id = job.campaign_for(campaign)
    phones = _test_numbers(job, given)
    store = store_of(job.output_dir, job.ledger)
    job = _as_the_run_maps(job, store, campaign_id, bool(input_path) or from_page)
    mapped = _pick_row(job, row, input_path)
    assert mapped.payload is not None
    payload = {k: v for k, v in json.loads(mapped.payload).items() if k != "to_phone"}
    return Plan(job, campaign_id, mapped.row, payload, phones)


def _test_numbers(job: Job, given: list[str]) -> list[str]:
    texts = given or job.test_recipients
    if not texts:
        raise UsageError(
            f"{job.path}: no test number: give --to PHONE, or set test_recipients: in the job file"
        )
    phones: dict[str, str] = {}  # E.164 -> as given, for messages
    for text in texts:
        phone, why = normalize_phone(text.strip(), job.mapping.default_region)
        if phone is None:
            raise UsageError(f"test number {text!r}: {why}")
        phones.setdefault(phone, text)
    with SuppressionList(job.output_dir, job.ledger) as listed:
        for phone, entry in listed.lookup(phones).items():
            raise UsageError(
                f"test number {phones[phone]!r} is on the suppression list ({entry.why()}): "
                "no SMS may go to it"
            )
    schedule = make_schedule(
        job.limits.send_window, job.limits.timezone, job.limits.deadline, dt.datetime.now(dt.UTC)
    )
    if schedule is not None:
        now = dt.datetime.now(dt.UTC)
        for phone, text in phones.items():
            verdict = schedule.verdict(phone, now)
            if not verdict.send:
                raise UsageError(f"test number {text!r}: not now: {verdict.error}")
    return list(phones)


def _as_the_run_maps(job: Job, store: Store, campaign: str, input_given: bool) -> Job:
    """The job with the mapping the campaign's run uses: its stored one once a request
    went out with it (or it was made on the page), else the job file's. `input_given`:
    the spreadsheet was named (`--input`, or the page's upload)."""
    with store.reader(campaign) as ledger:
        if ledger is None:
            return job
        page = made_on_page(ledger)
        if page and not input_given:
            # The job file's input is not the page's upload: its row N is another person.
            raise UsageError(
                f"campaign {campaign} was made on the page: send the test from the page, "
                "or give its spreadsheet with --input"
            )
        own = own_mapping(ledger, store.output_dir / campaign)
        if own is not None and (page or ledger.total_requests()):
            return job.with_changes(mapping=own)
    return job


def _pick_row(job: Job, wanted: int | None, input_path: str | None) -> MappedRow:
    source = input_path or job.input
    if not source:
        raise UsageError(f"{job.path}: no input: set `input:` in the job file or pass --input")
    sheet = open_sheet(Path(source), job.sheet)
    mapper = Mapper.compile(job.mapping, sheet)
    for chunk in sheet.chunks:
        for row in chunk:
            if wanted is not None and row.number != wanted:
                if row.number > wanted:
                    break
                continue
            mapped = mapper.map_row(row)
            if mapped.error is None and mapped.payload is not None:
                return mapped
            if wanted is not None:
                raise UsageError(f"{source}: row {wanted} is invalid: {mapped.error}")
        else:
            continue
        break
    if wanted is None:
        raise UsageError(f"{source}: no sendable row to test with (every row is invalid)")
    raise UsageError(
        f"{source}: no row {wanted} (rows are numbered from 1 under the header; "
        "empty rows keep their numbers)"
    )


# --- sending ------------------------------------------------------------------------------


async def send_test(
    plan: Plan,
    on_wait: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    on_sent: Callable[[TestOutcome], None] | None = None,
) -> TestOutcome:
    """Send the plan's requests, recorded in the campaign's ledger (`on_sent` is told once
    they are answered); with `reporting:`, then wait for their report entries (until
    `stop` is set). The campaign is held while the requests leave, not while the report
    is waited for: a run may start meanwhile."""
    job = plan.job
    store = store_of(job.output_dir, job.ledger)
    outcome = TestOutcome(plan, [TestRequest(phone) for phone in plan.phones])
    with contextlib.ExitStack() as logging:
        directory = store.output_dir / plan.campaign
        structlog.contextvars.bind_contextvars(campaign=plan.campaign)
        logging.callback(structlog.contextvars.unbind_contextvars, "campaign")
        with contextlib.ExitStack() as hold:
            owned = await asyncio.to_thread(
                hold.enter_context, store.open_campaign(plan.campaign, job.name)
            )
            log_to_file(plan.campaign, directory / LOG_FILE)
            logging.callback(log_to_file, plan.campaign, None)
            ledger = owned.ledger
            await asyncio.to_thread(test_sends.ensure, ledger)
            taken = {
                phone: await asyncio.to_thread(test_sends.claimed_keys, ledger, phone)
                for phone in plan.phones
            }
            await _send_all(plan, ledger, outcome.requests)
            await asyncio.to_thread(_refresh_summary, ledger, directory, plan.campaign)
        if on_sent is not None:
            on_sent(outcome)
        if job.reporting is None or not any(r.state == "sent" for r in outcome.requests):
            return outcome
        outcome.waited = True
        outcome.stopped_waiting = await _wait_for_reports(
            plan, outcome.requests, taken, on_wait or (lambda _: None), stop
        )
        await asyncio.to_thread(_record_reports, store, plan, outcome.requests)
    return outcome


def _record_reports(store: Store, plan: Plan, requests: list[TestRequest]) -> None:
    found = [r for r in requests if r.received is not None]
    if not found:
        return
    try:
        with store.open_campaign(plan.campaign, plan.job.name) as owned:
            for request in found:
                assert request.received is not None
                received = request.received
                report = test_sends.Report(received.key, received.status, received.error)
                test_sends.reported(owned.ledger, request.id, report, time.time())
            _refresh_summary(owned.ledger, owned.directory, plan.campaign)
    except CampaignBusy:
        # A run started meanwhile: the test's answer is recorded, its report is not.
        log.warning("the test's delivery report is not recorded: the campaign is busy now")


async def _send_all(plan: Plan, ledger: Ledger, requests: list[TestRequest]) -> None:
    from campaign.avaamo import SendClient
    from campaign.worker import channel_limiter

    job = plan.job
    # On PostgreSQL the channel's budget (store/budget.py): a test beside a run of the same
    # channel takes its slots from it too.
    limiter, close = await channel_limiter(job)
    try:
        async with SendClient(job.api, 1) as client:
            for request in requests:
                body = json.dumps({"to_phone": request.phone, **plan.payload}, ensure_ascii=False)
                await _send_one(plan, ledger, client, limiter, request, body.encode())
                if request.fatal:
                    return  # the channel is wrong: the other numbers would get the same
    finally:
        if close is not None:
            await close()


async def _send_one(
    plan: Plan, ledger: Ledger, client: Any, limiter: Any, request: TestRequest, body: bytes
) -> None:
    """One test request, retried as a person's would be (`policy.decide`)."""
    from campaign.policy import decide, wait

    limits = plan.job.limits
    attempt, maybe_delivered = 0, False
    while True:
        await limiter.acquire()
        attempt += 1
        request.sent_at = time.time()
        if attempt == 1:
            request.id = await asyncio.to_thread(
                test_sends.begin, ledger, request.phone, plan.row, request.sent_at
            )
        else:
            await asyncio.to_thread(
                test_sends.attempt, ledger, request.id, attempt, request.sent_at
            )
        await limiter.confirm()
        answer = await client.send(body)
        decision = decide(
            answer,
            attempt,
            max_attempts=limits.max_attempts,
            retry_ambiguous=limits.retry_ambiguous,
            maybe_delivered_before=maybe_delivered,
        )
        maybe_delivered = maybe_delivered or answer.maybe_delivered
        request.state, request.error = decision.state, decision.error
        request.http_status, request.fatal = answer.http_status, decision.fatal
        state = decision.state if decision.final else ("unknown" if maybe_delivered else "pending")
        await asyncio.to_thread(
            test_sends.answered, ledger, request.id, state, answer.http_status, decision.error
        )
        log.info(
            "test request answered",
            to=mask_phone(request.phone),
            row=plan.row,
            attempt=attempt,
            state=decision.state,
            http_status=answer.http_status,
        )
        if decision.retry_in_s is None:
            return
        await wait(decision.retry_in_s, "test send retry", row=plan.row)


# --- the report entry: the text the phone received ----------------------------------------


async def _wait_for_reports(
    plan: Plan,
    requests: list[TestRequest],
    taken: dict[str, set[str]],
    on_wait: Callable[[str], None],
    stop: asyncio.Event | None,
) -> bool:
    """Look for each sent request's entry until its status is final or `MAX_WAIT_S` has
    passed. True when `stop` ended the wait first."""
    from campaign.avaamo import ReportingClient

    job = plan.job
    reporting = job.reporting
    assert reporting is not None
    client = ReportingClient(
        reporting.base_url or job.api.base_url,
        reporting.agent_id,
        reporting.access_token,
        rate_per_second=reporting.rate_per_second,
        timeout_s=job.api.timeout_s,
        max_attempts=job.limits.max_attempts,
        region=job.mapping.default_region,
        concurrency=1,
        from_phone=reporting.from_phone,
    )
    waiting = [r for r in requests if r.state == "sent"]
    started = time.monotonic()
    async with client:
        while waiting:
            for request in list(waiting):
                found = await _entry_of(client, request, taken[request.phone])
                if found is not None:
                    request.received = found
                    if found.status in FINAL:
                        waiting.remove(request)
            elapsed = time.monotonic() - started
            if not waiting or elapsed >= MAX_WAIT_S:
                return False
            numbers = ", ".join(mask_phone(r.phone) for r in waiting)
            on_wait(
                f"waiting for the delivery report of {numbers}: {elapsed:.0f} s of "
                f"{MAX_WAIT_S:.0f} s (Ctrl-C stops waiting)"
            )
            if await _stopped(stop, min(POLL_S, MAX_WAIT_S - elapsed)):
                return True
    return False


async def _entry_of(client: Any, request: TestRequest, taken: set[str]) -> Received | None:
    """The entry nearest the request's time, among those no earlier test took."""
    now = time.time()
    try:
        entries = await client.received(request.phone, request.sent_at - SKEW_S, now)
    except PageUnreadable as exc:
        log.warning("the Reporting API's answer could not be read; trying again", error=str(exc))
        return None
    mine = [e for e in entries if e.key not in taken]
    if not mine:
        return None
    best: Received = min(mine, key=lambda e: abs(e.created_at - request.sent_at))
    return best


async def _stopped(stop: asyncio.Event | None, seconds: float) -> bool:
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


def _refresh_summary(ledger: Ledger, directory: Path, campaign: str) -> None:
    """A campaign with a report shows the tests in it at once (`tests`)."""
    from campaign.report import SUMMARY_FILE, write_report

    if (directory / SUMMARY_FILE).exists():
        write_report(ledger, directory, campaign)


# --- the command line ---------------------------------------------------------------------


def run_test_command(job: Job, args: Any, run_loop: Callable[[Any], Any]) -> int:
    """`campaign test`: prints the params sent, each answer, and the message received."""
    plan = plan_test(job, args.to or [], args.row, args.campaign, args.input)
    show_wait = not args.no_progress
    _print_plan(plan)

    async def main() -> TestOutcome:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Ctrl-C while waiting for the report: stop waiting, show what is known.
        loop.add_signal_handler(signal.SIGINT, stop.set)
        try:
            return await send_test(plan, _shown_on_stderr if show_wait else None, stop)
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    outcome = run_loop(main())
    _print_outcome(outcome)
    if any(r.fatal for r in outcome.requests):
        fatal = next(r for r in outcome.requests if r.fatal)
        raise TestRefused(
            f"the Send API refused the test request ({fatal.error}): "
            "check api.base_url and api.channel_uuid"
        )
    return outcome.exit_code


def _shown_on_stderr(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)


def _print_plan(plan: Plan) -> None:
    numbers = ", ".join(plan.phones)
    print(f"campaign {plan.campaign}: a test of row {plan.row} to {numbers}")
    print("  params sent:" + ("" if plan.payload else " none"))
    for key, value in plan.payload.items():
        print(f"    {key}: {value}")


def _print_outcome(outcome: TestOutcome) -> None:
    row = outcome.plan.row
    for request in outcome.requests:
        answer = f"HTTP {request.http_status}" if request.http_status else request.error
        if request.state == "sent":
            print(f"  {request.phone}: sent ({answer})")
        else:
            print(f"  {request.phone}: {request.state} ({request.error or answer})")
    if not outcome.waited:
        if any(r.state == "sent" for r in outcome.requests):
            print(
                "  the message can be read on the test phone (with a reporting: section, "
                "it would be shown here)"
            )
        return
    for request in outcome.requests:
        if request.state != "sent":
            continue
        received = request.received
        if received is None:
            why = "stopped waiting" if outcome.stopped_waiting else f"none in {MAX_WAIT_S:.0f} s"
            print(f"  {request.phone}: no delivery report yet ({why}); read it on the phone")
            continue
        status = received.status
        if received.error:
            status += f": {received.error}"
        print(f"This is what row {row} produces: {received.message or '(no message text)'}")
        print(f"  sms_status ({request.phone}): {status}")
