"""The upload service's JSON API (the routes of DESIGN.md), over `web_service.Campaigns`.

Handlers parse the request, call the service and shape the answer; a `ServiceError`
becomes a JSON `{"error": ...}` with its status in `web.py`'s middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import BodyPartReader, web

from campaign.web_service import Campaigns, ServiceError

SERVICE = web.AppKey("service", Campaigns)
CLOSING = web.AppKey("closing", asyncio.Event)
MAX_UPLOAD = web.AppKey("max_upload", int)

# Room for the multipart framing and the optional mapping beside the file itself.
MULTIPART_SLACK = 256 * 1024
# An oversized upload is read to its end (up to this much) and dropped, so the client
# gets to read the 413 instead of a connection reset in the middle of its send.
DRAIN_LIMIT = 64 * 1024 * 1024
MAX_MAPPING_BYTES = 256 * 1024
PROGRESS_POLL_S = 0.25
ELSEWHERE_POLL_S = 1.0


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
                campaign, path = service.begin_upload()
                filename = part.filename or ""
                size = 0
                with path.open("wb") as out:
                    while chunk := await part.read_chunk():
                        size += len(chunk)
                        if size > cap:
                            raise _TooLarge
                        out.write(chunk)
            elif part.name == "mapping":
                data = await part.read()
                if len(data) > MAX_MAPPING_BYTES:
                    raise ServiceError(400, "mapping: too large")
                mapping_json = data.decode("utf-8", errors="replace")
            else:
                await part.release()
    except _TooLarge:
        if campaign:
            service.discard(campaign)
        await _drain(request)
        raise _too_large(cap) from None
    except BaseException:
        if campaign:
            service.discard(campaign)
        raise
    if campaign is None:
        raise ServiceError(400, "no file in the upload: send it as the form field `file`")
    body = await service.finish_upload(campaign, filename, mapping_json)
    return web.json_response(body, status=201)


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
    service.directory(campaign)
    service.stop(campaign)
    return web.json_response(await service.describe(campaign), status=202)


async def results(request: web.Request) -> web.FileResponse:
    campaign = request.match_info["id"]
    path = request.app[SERVICE].results(campaign)
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


async def events(request: web.Request) -> web.StreamResponse:
    """Progress as server-sent events while the campaign sends, then its final state."""
    service, closing = request.app[SERVICE], request.app[CLOSING]
    campaign = request.match_info["id"]
    state = await service.describe(campaign)
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-store",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    try:
        last: dict[str, Any] | None = None
        while not closing.is_set():
            send = service.sends.get(campaign)
            if send is not None and send.running:
                progress = send.progress()
                if progress != last:
                    await _event(response, "progress", progress)
                    last = progress
                wait = PROGRESS_POLL_S
            else:
                state = await service.describe(campaign)
                if state["state"] != "running":
                    break
                await _event(response, "state", state)  # sending from another process
                wait = ELSEWHERE_POLL_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing.wait(), wait)
        await _event(response, "state", await service.describe(campaign))
    except (ConnectionResetError, ConnectionError):
        pass  # the page went away
    return response


async def _event(response: web.StreamResponse, name: str, data: dict[str, Any]) -> None:
    await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())


async def _json_body(request: web.Request, empty_ok: bool = False) -> Any:
    text = await request.text()
    if not text.strip() and empty_ok:
        return {}
    try:
        return json.loads(text)
    except ValueError:
        raise ServiceError(400, "the request body must be JSON") from None
