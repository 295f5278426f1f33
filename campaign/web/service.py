"""The upload service's campaigns, on the same pipeline and ledger as the command line.

Each upload gets a generated id and a directory `{output_dir}/{id}/` holding the
spreadsheet (`upload.csv` / `upload.xlsx` / `upload.xls`, named from its content), the
page's mapping (`mapping.json`) and what the page needs to show it again after a restart
(`web.json`); the pipeline adds its ledger (which stores the mapping requests went out
with), log and results there. Validation is a dry run; sending is `run_campaign` in a
background task that `stop`/`shutdown` drain exactly as Ctrl-C drains the command line.
So `campaign run JOB --campaign ID` continues a campaign of the page with the page's
mapping, and the page continues a campaign of `campaign run` from its ledger.

On a PostgreSQL store the ledgers are in the database, shared by every page server and
worker: a page lists the database's campaigns besides this host's uploads, a campaign is
running while a worker holds a live lease, and a start joins the workers already sending
it. An upload stays on the host that took it until it is validated (`store/uploads.py`
says which); from then on its rows and mapping are in its ledger, and any page server can
send it as it sends a campaign of the command line.

Whatever blocks (files, SQLite, PostgreSQL, the campaign lock) runs in a thread, never on
the event loop: one operator's big upload or slow disk must not freeze another's page.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from campaign.bounds import MAX_JSON_BODY_BYTES, JsonRefused, load_json
from campaign.errors import (
    CampaignBusy,
    CampaignError,
    InputError,
    ReportingRefused,
    UsageError,
)
from campaign.isolate import Failed, Refused, preload, run_isolated
from campaign.job import CAMPAIGN_ID, Job, Mapping, first_problem
from campaign.load import Sheet
from campaign.mapping import Mapper
from campaign.pipeline import RunControl, RunOptions, run_campaign
from campaign.report import RESULTS_FILE, report_is_current, write_report
from campaign.store import uploads
from campaign.store.campaigns import store_of
from campaign.times import compact_stamp
from campaign.web.guess import Look, look_at
from campaign.web.sends import Sends
from campaign.web.state import (
    MAPPING_FILE,
    WEB_FILE,
    campaign_view,
    read_json,
    rows_page,
    write_json,
)
from campaign.web.watch import Watches

log = structlog.get_logger(__name__)
preload("campaign.web.guess")  # the page reads uploads with it, in child processes

PART_FILE = "upload.part"
_KINDS = ((b"PK\x03\x04", ".xlsx"), (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", ".xls"))
PAGE_ROWS = 50
# The child process that reads an upload's first rows (campaign/isolate.py): the memory it may
# map beyond the interpreter's own, and how long it may take. Both leave room for a
# workbook of the largest upload (--max-upload-mb, 50 MB by default) that the loader's
# limits let through.
READ_MEMORY_BYTES = 3 * 1024 * 1024 * 1024
READ_TIMEOUT_S = 300.0
READ_AT_ONCE = 2  # uploads read at the same time; others wait their turn


class ServiceError(Exception):
    """A request the service refuses: an HTTP status and one line for the operator."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Campaigns:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.root = Path(job.output_dir)
        # Web campaigns are one-off ids: they must not trip the midnight guard of the
        # job's own dated campaigns, so the ledger records them under their own job name.
        self.job_name = f"{job.name}.web"
        self.store = store_of(job.output_dir, job.ledger)
        self.sends = Sends()
        self.busy: dict[str, str] = {}  # campaign -> what this server is doing with it
        self.watches = Watches(self.store, job.limits.lease_s)
        self.readers = asyncio.Semaphore(READ_AT_ONCE)
        # Test sends: what each campaign's last one shows, and the waits for their reports.
        self.tests: dict[str, dict[str, Any]] = {}
        self._test_waits: set[asyncio.Task[None]] = set()
        # How other page servers on the database name this one, where its uploads are.
        self.server = f"{socket.gethostname()} (data directory {self.root.resolve()})"

    # --- uploads -------------------------------------------------------------------------

    def begin_upload(self) -> tuple[str, Path]:
        """A new campaign directory and the path to stream the upload into."""
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = compact_stamp()
        while True:
            campaign = f"web-{stamp}-{secrets.token_hex(2)}"
            with contextlib.suppress(FileExistsError):
                (self.root / campaign).mkdir()
                return campaign, self.root / campaign / PART_FILE

    async def discard(self, campaign: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.root / campaign, ignore_errors=True)
        if self.job.ledger is not None:
            with contextlib.suppress(CampaignError):
                await asyncio.to_thread(uploads.forget_upload, self.job.ledger, campaign)

    async def finish_upload(
        self, campaign: str, filename: str, mapping_json: str | None
    ) -> dict[str, Any]:
        directory = self.root / campaign
        try:
            upload = await asyncio.to_thread(_name_by_content, directory / PART_FILE)
            shown = _display_name(filename) or upload.name
            look = await self._look(upload, shown)
            mapping, source = look.mapping, look.mapping_source
            if mapping_json:
                try:
                    raw = load_json(mapping_json, MAX_JSON_BODY_BYTES)
                except JsonRefused as exc:
                    raise ServiceError(400, f"mapping: not usable JSON ({exc})") from None
                mapping = self._check_mapping(raw, upload, look.columns).model_dump()
                source = "request"
            if self.job.ledger is not None:
                await asyncio.to_thread(uploads.note_upload, self.job.ledger, campaign, self.server)
        except BaseException:
            await self.discard(campaign)  # a refused upload must not stay behind as a campaign
            raise
        info = {
            "filename": shown,
            "upload": upload.name,
            "uploaded_at": time.time(),
            "columns": look.columns,
            "columns_total": look.columns_total,
            "preview": look.preview,
            "mapping_source": source,
            "validated": False,
        }
        await asyncio.to_thread(write_json, directory / WEB_FILE, info)
        await asyncio.to_thread(write_json, directory / MAPPING_FILE, mapping)
        log.info("upload stored", campaign=campaign, rows_sampled=look.rows_sampled)
        return {
            "id": campaign,
            "filename": shown,
            "columns": look.columns,
            "columns_total": look.columns_total,
            "preview": look.preview,
            "mapping": mapping,
            "mapping_source": source,
        }

    async def _look(self, upload: Path, shown: str) -> Look:
        """The upload's first look, read in a child process: a file that would crash or
        exhaust the reader costs that upload a 400, not the server and its sends."""
        try:
            async with self.readers:
                return await asyncio.to_thread(
                    run_isolated,
                    look_at,
                    (upload, None, self.job.mapping),
                    memory_bytes=READ_MEMORY_BYTES,
                    timeout_s=READ_TIMEOUT_S,
                )
        except Refused as exc:
            raise ServiceError(400, _shown(exc, shown)) from None
        except Failed as exc:
            log.warning("upload not readable", reason=str(exc))
            raise ServiceError(400, f"{shown}: cannot be read: {exc}") from None

    # --- mapping and validation ------------------------------------------------------------

    async def set_mapping(self, campaign: str, raw: Any) -> dict[str, Any]:
        directory, info = await asyncio.to_thread(self._web_campaign, campaign)
        async with self._exclusive(campaign, "being validated", joins=False):
            upload = directory / info["upload"]
            mapping = self._check_mapping(raw, upload, info["columns"])
            options = RunOptions(input=str(upload), campaign=campaign, dry_run=True, origin="page")
            try:
                outcome = await run_campaign(self._job_for(mapping, upload), options, RunControl())
            except CampaignError as exc:
                # Nothing saved: a mapping the campaign cannot take (e.g. another one after
                # requests went out) must not become the one the next start uses.
                status = 409 if isinstance(exc, CampaignBusy) else 400
                raise ServiceError(status, str(exc)) from None
            await asyncio.to_thread(write_json, directory / MAPPING_FILE, mapping.model_dump())
            await self._update_info(directory, validated=True, mapping_source="page")
        summary = await self.describe(campaign)
        summary["invalid"] = await asyncio.to_thread(
            rows_page, self.store, campaign, "invalid", 0, PAGE_ROWS
        )
        # What validate prints too: people on the suppression list, inside their send
        # window now and when the others' windows open.
        summary["notes"] = outcome.notes
        return summary

    def _check_mapping(self, raw: Any, upload: Path, columns: list[str]) -> Mapping:
        if not isinstance(raw, dict):
            raise ServiceError(400, "mapping: must be a JSON object like the job file's mapping:")
        try:
            mapping = Mapping.model_validate(raw)
        except ValidationError as exc:
            message, key = first_problem(exc, Mapping)
            raise ServiceError(400, f"mapping.{key}: {message}" if key else message) from None
        try:
            Mapper.compile(mapping, Sheet(upload, columns, iter(())))
        except InputError as exc:
            raise ServiceError(400, _shown(exc, "the upload")) from None
        return mapping

    def _job_for(self, mapping: Mapping, upload: Path | None) -> Job:
        # The upload's own first sheet with data: the job's `sheet:` names a sheet of
        # the job's input, which an uploaded file need not have.
        source = str(upload) if upload else None
        return self.job.with_changes(name=self.job_name, mapping=mapping, input=source, sheet=None)

    # --- sending ---------------------------------------------------------------------------

    async def start(self, campaign: str, only_failed: bool) -> dict[str, Any]:
        directory = await self.directory(campaign)
        info = await asyncio.to_thread(read_json, directory / WEB_FILE)
        async with self._exclusive(campaign, "starting"):
            if not info:
                # Started with `campaign run` (or uploaded to another page server): its
                # rows and its mapping are in its ledger.
                job = self._job_for(self.job.mapping, None)
                options = RunOptions(
                    campaign=campaign, only_failed=only_failed, origin="page", reuse_rows=True
                )
            else:
                if not info.get("validated"):
                    raise ServiceError(
                        409, f"campaign {campaign}: validate the mapping before sending"
                    )
                upload = directory / info["upload"]
                raw = await asyncio.to_thread(read_json, directory / MAPPING_FILE)
                mapping = self._check_mapping(raw, upload, info["columns"])
                job = self._job_for(mapping, upload)
                options = RunOptions(
                    input=str(upload), campaign=campaign, only_failed=only_failed, origin="page"
                )
            self.sends.start(campaign, job, options, directory)
        return await self.describe(campaign)

    async def reconcile(self, campaign: str) -> dict[str, Any]:
        """`campaign reconcile` for one campaign: its delivery reports into its ledger."""
        from campaign.reconcile import reconcile_campaign

        await self.directory(campaign)
        if self.job.reporting is None:
            raise ServiceError(
                409, "the job file has no reporting: section (agent_id, access_token)"
            )
        async with self._exclusive(campaign, "checking delivery"):
            try:
                outcome = await reconcile_campaign(self.job, campaign)
            except ReportingRefused as exc:
                raise ServiceError(502, str(exc)) from None
            except CampaignError as exc:
                raise ServiceError(
                    409 if isinstance(exc, CampaignBusy) else 400, str(exc)
                ) from None
        view = await self.describe(campaign)
        view.update(
            complete=outcome.exit_code == 0,
            message=outcome.message,
            problems=outcome.tally.problems[:5],
        )
        return view

    async def send_test(self, campaign: str, to: list[str], row: int | None) -> dict[str, Any]:
        """`campaign test` for one campaign: answers once the test requests are answered;
        the report's message is waited for in the background (`test_view`)."""
        from campaign.test_send import plan_test

        job, upload = await self._job_as_sent(campaign)
        async with self._exclusive(campaign, "sending a test"):
            try:
                plan = await asyncio.to_thread(plan_test, job, to, row, campaign, None, upload)
            except CampaignError as exc:
                raise ServiceError(400, str(exc)) from None
            view: dict[str, Any] = {"row": plan.row, "params": plan.payload}
            sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(_run_test(plan, view, sent))
            self._test_waits.add(task)
            task.add_done_callback(self._test_waits.discard)
            await asyncio.wait([sent, task], return_when=asyncio.FIRST_COMPLETED)
            if not sent.done():
                error = task.exception() if not task.cancelled() else None
                status = 409 if isinstance(error, CampaignBusy) else 400
                raise ServiceError(status, str(error or "the test was stopped"))
        self.tests[campaign] = view
        return view

    def test_view(self, campaign: str) -> dict[str, Any]:
        view = self.tests.get(campaign)
        if view is None:
            raise ServiceError(404, f"campaign {campaign}: no test sent from this page server")
        return view

    async def _job_as_sent(self, campaign: str) -> tuple[Job, bool]:
        """The job as the campaign's run would use it, and whether its input is the page's
        upload: a page campaign's upload and mapping; a campaign of `campaign run`, the
        job file (its stored mapping applies)."""
        directory = await self.directory(campaign)
        info = await asyncio.to_thread(read_json, directory / WEB_FILE)
        if not info:
            return self.job, False
        if not info.get("validated"):
            raise ServiceError(409, f"campaign {campaign}: validate the mapping before a test")
        upload = directory / info["upload"]
        raw = await asyncio.to_thread(read_json, directory / MAPPING_FILE)
        return self._job_for(self._check_mapping(raw, upload, info["columns"]), upload), True

    def stop(self, campaign: str) -> None:
        if not self.sends.stop(campaign):
            raise ServiceError(409, f"campaign {campaign} is not sending from this server")

    async def shutdown(self) -> None:
        """Drain every send like Ctrl-C does: finish the requests in flight, save state."""
        await self.sends.shutdown()
        for task in list(self._test_waits):
            task.cancel()

    @contextlib.asynccontextmanager
    async def _exclusive(
        self, campaign: str, doing: str, joins: bool = True
    ) -> AsyncIterator[None]:
        """One change at a time per campaign. It is claimed before the first await, so two
        requests that interleave at the awaits (a double click on Send) cannot both pass;
        a send holds it from then on until it ends. Another process sending the campaign
        refuses it on SQLite; on PostgreSQL what `joins` (a send, a reconcile) shares the
        campaign with the other workers, and only a validation, which replaces the rows
        they send from, is refused."""
        if self.sends.running(campaign):
            raise ServiceError(409, f"campaign {campaign} is sending; stop it first")
        if campaign in self.busy:
            raise ServiceError(409, f"campaign {campaign} is {self.busy[campaign]}")
        self.busy[campaign] = doing
        try:
            if not (joins and self.store.shared) and await asyncio.to_thread(
                self.store.in_use, campaign, self.job.limits.lease_s
            ):
                raise ServiceError(409, f"campaign {campaign} is in use by another process")
            yield
        finally:
            del self.busy[campaign]

    # --- reading -----------------------------------------------------------------------------

    async def directory(self, campaign: str) -> Path:
        """The campaign's directory; 404 when there is no such campaign."""
        return await asyncio.to_thread(self._directory, campaign)

    def _directory(self, campaign: str) -> Path:
        if not CAMPAIGN_ID.fullmatch(campaign):
            raise ServiceError(404, f"no campaign {campaign!r}")
        directory = self.root / campaign
        if (directory / WEB_FILE).is_file() or self.store.exists(campaign):
            return directory
        elsewhere = self._uploaded_elsewhere(campaign)
        if elsewhere:
            raise ServiceError(
                409,
                f"campaign {campaign} was uploaded to the page server on {elsewhere} and is "
                "not validated yet: until it is, its spreadsheet is on that server only. "
                "Validate it there (then any server can send it), or upload it here",
            )
        raise ServiceError(404, f"no campaign {campaign!r}")

    def _uploaded_elsewhere(self, campaign: str) -> str | None:
        """PostgreSQL: the other page server that holds the campaign's upload."""
        if self.job.ledger is None:
            return None
        server = uploads.upload_server(self.job.ledger, campaign)
        return server if server != self.server else None

    def _web_campaign(self, campaign: str) -> tuple[Path, dict[str, Any]]:
        directory = self._directory(campaign)
        info = read_json(directory / WEB_FILE)
        if not info:
            elsewhere = self._uploaded_elsewhere(campaign)
            if elsewhere:
                raise ServiceError(
                    409,
                    f"campaign {campaign} was uploaded to the page server on {elsewhere}: "
                    "its mapping can be changed there only, where its spreadsheet is (it "
                    "can still be sent from here, with the mapping it was validated with)",
                )
            raise ServiceError(
                409,
                f"campaign {campaign} was started with `campaign run`: its mapping is the one "
                "in its ledger, set by its job file (it can still be sent from here)",
            )
        return directory, info

    async def _update_info(self, directory: Path, **changes: Any) -> None:
        def update() -> None:
            write_json(directory / WEB_FILE, {**read_json(directory / WEB_FILE), **changes})

        await asyncio.to_thread(update)

    def _views(self) -> list[dict[str, Any]]:
        """The store's campaigns and this host's uploads not validated yet."""
        uploaded = [
            d.name
            for d in (self.root.iterdir() if self.root.is_dir() else [])
            if CAMPAIGN_ID.fullmatch(d.name) and (d / WEB_FILE).is_file()
        ]
        found = dict.fromkeys([*uploaded, *self.store.campaign_ids()])
        return [campaign_view(self.store, c, self.job.limits) for c in found]

    async def list(self) -> list[dict[str, Any]]:
        items = await asyncio.to_thread(self._views)
        for item in items:
            self._merge_live(item)
        return sorted(items, key=lambda i: i["created_at"] or 0, reverse=True)

    async def describe(self, campaign: str, detail: bool = False) -> dict[str, Any]:
        def view() -> dict[str, Any]:
            self._directory(campaign)
            return campaign_view(self.store, campaign, self.job.limits, detail)

        item = await asyncio.to_thread(view)
        self._merge_live(item)
        return item

    async def rows(self, campaign: str, status: str, offset: int, limit: int) -> dict[str, Any]:
        if status not in ("invalid", "duplicate", "suppressed"):
            raise ServiceError(400, "status: invalid, duplicate or suppressed")
        await self.directory(campaign)
        return await asyncio.to_thread(rows_page, self.store, campaign, status, offset, limit)

    async def results(self, campaign: str) -> Path:
        def find() -> Path:
            path = self._directory(campaign) / RESULTS_FILE
            if self.store.shared and self.store.exists(campaign):
                self._report_here(campaign)
            if not path.is_file():
                raise ServiceError(
                    404, f"campaign {campaign} has no results yet: validate it first"
                )
            return path

        return await asyncio.to_thread(find)

    def _report_here(self, campaign: str) -> None:
        """PostgreSQL: whoever ran the campaign last wrote its results.csv on their host;
        when this host has none, or one older than the ledger, write it from the ledger as
        `campaign report` does."""
        with self.store.open_campaign(campaign, self.job_name, "page") as owned:
            if not report_is_current(owned.ledger, owned.directory):
                write_report(owned.ledger, owned.directory, campaign)

    def _merge_live(self, item: dict[str, Any]) -> None:
        send = self.sends.get(item["id"])
        if send is None:
            return
        item["error"] = send.error
        if send.running:
            item["state"], item["resumable"] = "running", False
            item["progress"] = send.progress()


async def _run_test(plan: Any, view: dict[str, Any], sent: asyncio.Future[None]) -> None:
    """A test send, its answers and then its report shown in `view` as they come."""
    from campaign.test_send import TestOutcome, send_test

    def show(outcome: TestOutcome) -> None:
        view["requests"] = [_test_request_view(r) for r in outcome.requests]
        view["waiting"] = plan.job.reporting is not None and any(
            r.state == "sent" for r in outcome.requests
        )

    def answered(outcome: TestOutcome) -> None:
        show(outcome)
        if not sent.done():
            sent.set_result(None)

    try:
        outcome = await send_test(plan, on_sent=answered)
        show(outcome)
        if not outcome.waited and any(r.state == "sent" for r in outcome.requests):
            view["note"] = "the message can be read on the test phone"
    except CampaignError as exc:
        if not sent.done():
            raise
        view["error"] = str(exc)
    finally:
        view["waiting"] = False


def _test_request_view(request: Any) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "to": request.phone,
        "state": request.state,
        "http_status": request.http_status,
        "error": request.error,
    }
    if request.received is not None:
        shown.update(
            message=request.received.message,
            sms_status=request.received.status,
            sms_status_response=request.received.error,
        )
    return shown


def _name_by_content(part: Path) -> Path:
    """The finished upload renamed `upload.csv`, `.xlsx` or `.xls` by its first bytes."""
    with part.open("rb") as handle:
        head = handle.read(8)
    suffix = next((s for magic, s in _KINDS if head.startswith(magic)), ".csv")
    return part.rename(part.parent / f"upload{suffix}")


def _display_name(filename: str) -> str:
    """The uploaded file's own name, for display only: never part of a path."""
    name = urllib.parse.unquote(filename).replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in name if ch.isprintable())[:200]


def _shown(exc: UsageError | Refused, shown: str) -> str:
    """The error's message with the server's path replaced by the name the operator knows."""
    path = getattr(exc, "path", None)
    return str(exc).replace(path, shown, 1) if path else str(exc)
