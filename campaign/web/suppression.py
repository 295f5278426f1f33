"""The upload service's suppression routes: the store's list, read and changed by hand
(the output_dir's SQLite list, or the PostgreSQL store's shared one).

    GET    /api/suppression            {"count", "entries": [{phone, reason, source, added_at}],
                                         "avaamo": {"enabled", "synced_at", "count"}}
                                        (`?format=csv`: the CSV of `campaign suppress list`)
    POST   /api/suppression/sync       Avaamo's opt-outs read now (`campaign suppress sync`)
                                        -> {"added", "removed", "unchanged", "skipped",
                                            "unread", "problems", "avaamo"}
    POST   /api/suppression            {"phones": [...], "reason"} -> {"added", "already"}
    DELETE /api/suppression            {"phones": [...]}           -> {"removed", "not_listed"}

Access (token, origin, JSON bodies) is `web_access.guard`'s, as for every `/api/` route.
Numbers are normalized with the job's `default_region`; a body with a number that is not
one changes nothing (400 naming its position). The list is read in a thread.
"""

from __future__ import annotations

import asyncio
import csv
import io
from typing import Any

from aiohttp import web

from campaign.escape import escape
from campaign.phones import normalize_phones
from campaign.store.suppression import SuppressionList
from campaign.times import iso_utc
from campaign.web.access import json_body
from campaign.web.api import SERVICE
from campaign.web.service import ServiceError

MAX_PHONES = 10_000  # numbers per request; more: `campaign suppress import`
PAGE_REASON = "added on the page"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/suppression", listing)
    app.router.add_post("/api/suppression", add)
    app.router.add_delete("/api/suppression", remove)
    app.router.add_post("/api/suppression/sync", sync)


async def listing(request: web.Request) -> web.Response:
    job = request.app[SERVICE].job

    def read() -> tuple[list[tuple[str, str, str, str]], dict[str, Any]]:
        with SuppressionList(job.output_dir, job.ledger) as listed:
            found = [(e.phone, e.reason, e.source, e.added) for e in listed.entries()]
            return found, _avaamo(listed, job)

    entries, avaamo = await asyncio.to_thread(read)
    if request.query.get("format") == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["phone", "reason", "source", "added_at"])
        writer.writerows([escape(v) for v in entry] for entry in entries)
        return web.Response(
            text=out.getvalue(),
            content_type="text/csv",
            headers={"Content-Disposition": 'attachment; filename="suppression.csv"'},
        )
    keys = ("phone", "reason", "source", "added_at")
    return web.json_response(
        {
            "count": len(entries),
            "entries": [dict(zip(keys, e, strict=True)) for e in entries],
            "avaamo": avaamo,
        }
    )


def _avaamo(listed: SuppressionList, job: Any) -> dict[str, Any]:
    """What the card shows of Avaamo's opt-outs: when last read whole, how many numbers."""
    from campaign.optouts import SOURCE, SYNC_NAME, wanted

    synced = listed.synced_at(SYNC_NAME)
    return {
        "enabled": wanted(job.reporting),
        "synced_at": iso_utc(synced) if synced is not None else None,
        "count": listed.count_from(SOURCE),
    }


async def sync(request: web.Request) -> web.Response:
    """Avaamo's opt-outs read into the list now, as `campaign suppress sync` does."""
    from campaign.errors import ReportingRefused
    from campaign.optouts import sync_opt_outs

    await json_body(request, empty_ok=True)
    job = request.app[SERVICE].job
    if job.reporting is None:
        raise ServiceError(400, "the job has no reporting: section (access_token)")
    try:
        result = await sync_opt_outs(job)
    except ReportingRefused as exc:
        raise ServiceError(502, str(exc)) from None

    def card() -> dict[str, Any]:
        with SuppressionList(job.output_dir, job.ledger) as listed:
            return _avaamo(listed, job)

    return web.json_response(
        {
            "added": result.added,
            "removed": result.removed,
            "unchanged": result.unchanged,
            "skipped": result.skipped,
            "unread": result.unread,
            "problems": result.problems[:5],
            "avaamo": await asyncio.to_thread(card),
        }
    )


async def _phones(request: web.Request) -> tuple[list[str], dict[str, Any]]:
    body = await json_body(request)
    given = body.get("phones") if isinstance(body, dict) else None
    if not isinstance(given, list) or not given or not all(isinstance(p, str) for p in given):
        raise ServiceError(400, 'phones: a list of phone numbers, like {"phones": ["+1..."]}')
    if len(given) > MAX_PHONES:
        raise ServiceError(400, f"phones: at most {MAX_PHONES} at once (or suppress import)")
    region = request.app[SERVICE].job.mapping.default_region
    phones, problems = normalize_phones(given, region, "phones[{}]")
    if problems:
        raise ServiceError(400, "; ".join(problems[:20]) + " (nothing was changed)")
    return list(dict.fromkeys(phones)), body


async def add(request: web.Request) -> web.Response:
    phones, body = await _phones(request)
    reason = body.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise ServiceError(400, "reason: must be text")
    reason = (reason or "").strip() or PAGE_REASON
    job = request.app[SERVICE].job

    def write() -> int:
        with SuppressionList(job.output_dir, job.ledger) as listed:
            return listed.add(phones, reason, "manual")

    added = await asyncio.to_thread(write)
    return web.json_response({"added": added, "already": len(phones) - added})


async def remove(request: web.Request) -> web.Response:
    phones, _ = await _phones(request)
    job = request.app[SERVICE].job

    def write() -> int:
        with SuppressionList(job.output_dir, job.ledger) as listed:
            return listed.remove(phones)

    removed = await asyncio.to_thread(write)
    return web.json_response({"removed": removed, "not_listed": len(phones) - removed})
