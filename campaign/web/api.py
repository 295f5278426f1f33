"""The upload service's JSON API (the routes of docs/page.md), over `web_service.Campaigns`.

Handlers parse the request, call the service and shape the answer; a `ServiceError`
becomes a JSON `{"error": ...}` with its status in `web.py`'s middleware. Files are
written and read in threads (`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import IO, Any

from aiohttp import BodyPartReader, web

from campaign.story import stored_story
from campaign.web.access import json_body
from campaign.web.service import Campaigns, ServiceError

SERVICE = web.AppKey("service", Campaigns)
CLOSING = web.AppKey("closing", asyncio.Event)
MAX_UPLOAD = web.AppKey("max_upload", int)

# Room for the multipart framing and the optional mapping beside the file itself.
MULTIPART_SLACK = 256 * 1024
# An oversized upload is read to its end (up to this much) and dropped, so the client
# gets to read the 413 instead of a connection reset in the middle of its send.
DRAIN_LIMIT = 64 * 1024 * 1024
MAX_MAPPING_BYTES = 256 * 1024
# An upload reaches the disk in writes of about this size, each in a thread.
WRITE_BATCH = 1024 * 1024
# How often an event stream looks at the progress, and whether its page is still there.
PROGRESS_POLL_S = 0.25


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/campaigns", create_campaign)
    app.router.add_get("/api/campaigns", list_campaigns)
    app.router.add_get("/api/campaigns/{id}", get_campaign)
    app.router.add_put("/api/campaigns/{id}/mapping", put_mapping)
    app.router.add_post("/api/campaigns/{id}/start", start)
    app.router.add_post("/api/campaigns/{id}/stop", stop)
    app.router.add_get("/api/campaigns/{id}/results.csv", results)
    app.router.add_get("/api/campaigns/{id}/rows", rows)
    app.router.add_get("/api/campaigns/{id}/events", events)
    app.router.add_get("/api/campaigns/{id}/story", story)
    app.router.add_post("/api/campaigns/{id}/reconcile", reconcile)
    app.router.add_post("/api/campaigns/{id}/test", send_test)
    app.router.add_get("/api/campaigns/{id}/test", test_view)


class _TooLarge(Exception):
    pass


async def create_campaign(request: web.Request) -> web.Response:
    service, cap = request.app[SERVICE], request.app[MAX_UPLOAD]
    if request.content_length is not None and request.content_length > cap + MULTIPART_SLACK:
        await _drain(request)
        raise _too_large(cap)
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError):
        raise ServiceError(
            400, "send the spreadsheet as multipart/form-data, field `file`"
        ) from None
    campaign: str | None = None
    filename, mapping_json = "", None
    try:
        async for part in reader:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "file" and campaign is None:
                campaign, path = await asyncio.to_thread(service.begin_upload)
                filename = part.filename or ""
                await _save(part, path, cap)
            elif part.name == "mapping":
                data = await part.read()
                if len(data) > MAX_MAPPING_BYTES:
                    raise ServiceError(400, "mapping: too large")
                mapping_json = data.decode("utf-8", errors="replace")
            else:
                await part.release()
    except _TooLarge:
        if campaign:
            await service.discard(campaign)
        await _drain(request)
        raise _too_large(cap) from None
    except BaseException:
        if campaign:
            await service.discard(campaign)
        raise
    if campaign is None:
        raise ServiceError(400, "no file in the upload: send it as the form field `file`")
    body = await service.finish_upload(campaign, filename, mapping_json)
    return web.json_response(body, status=201)


async def _save(part: BodyPartReader, path: Path, cap: int) -> None:
    """The part's bytes into `path`, up to `cap` (else `_TooLarge`), written in a thread."""
    out: IO[bytes] = await asyncio.to_thread(path.open, "wb")
    try:
        size, batch = 0, bytearray()
        while chunk := await part.read_chunk():
            size += len(chunk)
            if size > cap:
                raise _TooLarge
            batch += chunk
            if len(batch) >= WRITE_BATCH:
                full, batch = batch, bytearray()
                await asyncio.to_thread(out.write, full)
        await asyncio.to_thread(out.write, batch)
    finally:
        await asyncio.to_thread(out.close)


def _too_large(cap: int) -> ServiceError:
    return ServiceError(
        413,
        f"the file is larger than the upload limit of {cap / 1024 / 1024:.3g} MB "
        "(the server's --max-upload-mb)",
    )


async def _drain(request: web.Request) -> None:
    read = 0
    with contextlib.suppress(Exception):
        while read < DRAIN_LIMIT and (chunk := await request.content.readany()):
            read += len(chunk)


async def list_campaigns(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(
        {
            "job": service.job.name,
            "rate": service.job.limits.rate_per_second,
            "concurrency": service.job.limits.concurrency,
            "reporting": service.job.reporting is not None,
            "campaigns": await service.list(),
        }
    )


async def get_campaign(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(await service.describe(request.match_info["id"], detail=True))


async def put_mapping(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await _json_body(request)
    mapping = body.get("mapping", body) if isinstance(body, dict) else body
    return web.json_response(await service.set_mapping(request.match_info["id"], mapping))


async def start(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await _json_body(request, empty_ok=True)
    only_failed = body.get("only_failed", False) if isinstance(body, dict) else None
    if not isinstance(only_failed, bool):
        raise ServiceError(400, "only_failed: must be true or false")
    answer = await service.start(request.match_info["id"], only_failed)
    return web.json_response(answer, status=202)


async def stop(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    campaign = request.match_info["id"]
    await service.directory(campaign)
    service.stop(campaign)
    return web.json_response(await service.describe(campaign), status=202)


async def reconcile(request: web.Request) -> web.Response:
    """Read the campaign's delivery reports now -> counts per delivery state."""
    service = request.app[SERVICE]
    return web.json_response(await service.reconcile(request.match_info["id"]))


MAX_TEST_NUMBERS = 20


async def send_test(request: web.Request) -> web.Response:
    """A test send: {"to": ["+1..."], "row": N} -> the answers; the message follows
    (GET .../test) once the Reporting API has it."""
    body = await _json_body(request)
    to = body.get("to") if isinstance(body, dict) else None
    if isinstance(to, str):
        to = [to]
    if (
        not isinstance(to, list)
        or not 0 < len(to) <= MAX_TEST_NUMBERS
        or not all(isinstance(t, str) and 0 < len(t) <= 64 for t in to)
    ):
        raise ServiceError(400, f"to: give 1 to {MAX_TEST_NUMBERS} test numbers")
    row = body.get("row")
    if row is not None and (isinstance(row, bool) or not isinstance(row, int) or row < 1):
        raise ServiceError(400, "row: a whole number of 1 or more (or leave it out)")
    service = request.app[SERVICE]
    return web.json_response(await service.send_test(request.match_info["id"], to, row))


async def test_view(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    campaign = request.match_info["id"]
    await service.directory(campaign)
    return web.json_response(service.test_view(campaign), headers={"Cache-Control": "no-store"})


async def results(request: web.Request) -> web.FileResponse:
    campaign = request.match_info["id"]
    path = await request.app[SERVICE].results(campaign)
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "text/csv; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{campaign}-results.csv"',
            "Cache-Control": "no-store",
        },
    )


async def rows(request: web.Request) -> web.Response:
    query = request.query
    try:
        offset = max(int(query.get("offset", "0")), 0)
        limit = min(max(int(query.get("limit", "50")), 1), 500)
    except ValueError:
        raise ServiceError(400, "offset and limit: whole numbers") from None
    page = await request.app[SERVICE].rows(
        request.match_info["id"], query.get("status", "invalid"), offset, limit
    )
    return web.json_response(page)


async def story(request: web.Request) -> web.Response:
    """The aggregates the campaign's charts draw (campaign/story.py), as report.html has them."""
    service = request.app[SERVICE]
    campaign = request.match_info["id"]
    await service.directory(campaign)
    found = await asyncio.to_thread(stored_story, service.store, campaign)
    if found is None:
        raise ServiceError(404, f"campaign {campaign} has nothing to show yet: validate it first")
    return web.json_response(found, headers={"Cache-Control": "no-store"})


async def events(request: web.Request) -> web.StreamResponse:
    """Progress as server-sent events while the campaign sends, then its final state.

    An event goes out when something changed; the stream ends when the campaign stops
    running, the server stops, or the page goes away (looked at every PROGRESS_POLL_S:
    nothing is written to a stream whose page shows nothing new, so a write error
    cannot be what tells)."""
    service, closing = request.app[SERVICE], request.app[CLOSING]
    campaign = request.match_info["id"]
    directory = await service.directory(campaign)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    with contextlib.suppress(ConnectionError):
        async with service.watches.open(campaign, directory) as watch:
            last: dict[str, Any] | None = None
            while not closing.is_set() and not _gone(request):
                send = service.sends.get(campaign)
                if send is not None and send.running:
                    name, data = "progress", send.progress()
                    watch.forget()  # what another process showed before is old now
                else:
                    # Sent by another process (`campaign run`, another host), or over: read from
                    # its files or its ledger.
                    name, data = "state", await watch.view(lambda: service.describe(campaign))
                    if data["state"] != "running":
                        break
                if data != last:
                    await _event(response, name, data)
                    last = data
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(closing.wait(), PROGRESS_POLL_S)
            if not _gone(request):
                await _event(response, "state", await service.describe(campaign))
    return response


def _gone(request: web.Request) -> bool:
    """The page closed the connection (or the server is closing it)."""
    transport = request.transport
    return transport is None or transport.is_closing()


async def _event(response: web.StreamResponse, name: str, data: dict[str, Any]) -> None:
    await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())


async def _json_body(request: web.Request, empty_ok: bool = False) -> Any:
    return await json_body(request, empty_ok=empty_ok)
