"""`campaign serve`: the upload page and its JSON API, on the same pipeline as the CLI.

Access (`web_access`): every `/api/` route needs the token, as `Authorization: Bearer
TOKEN` or as the session cookie that `POST /api/session {"token"}` sets (HttpOnly,
SameSite=Strict, Secure when the server listens beyond loopback). The cookie holds a
random session id that this process keeps for 12 hours; signing out or a restart ends
it. A state-changing request on the cookie must come from the page itself (its Origin),
and JSON routes take only JSON. The page and its assets hold no data and need no token.
A `CAMPAIGN_TOKEN` shorter than 16 characters is refused at start.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import structlog
from aiohttp import web

from campaign.errors import StoreFailed, StoreUnavailable, UsageError
from campaign.job import Job
from campaign.web.access import (
    MIN_TOKEN_CHARS,
    SECURE_COOKIE,
    SESSIONS,
    TOKEN,
    Sessions,
    guard,
    login,
    logout,
)
from campaign.web.api import CLOSING, MAX_UPLOAD, SERVICE, add_routes
from campaign.web.service import Campaigns, ServiceError
from campaign.web.suppression import add_routes as add_suppression_routes

log = structlog.get_logger(__name__)

STATIC = Path(str(resources.files("campaign.web") / "static"))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    job: Job,
    token: str,
    max_upload_bytes: int,
    *,
    secure_cookie: bool = False,
    sessions: Sessions | None = None,
) -> web.Application:
    app = web.Application(middlewares=[_errors, guard])
    app[SERVICE] = Campaigns(job)
    app[TOKEN] = token
    app[SESSIONS] = sessions if sessions is not None else Sessions()
    app[SECURE_COOKIE] = secure_cookie
    app[MAX_UPLOAD] = max_upload_bytes
    app[CLOSING] = asyncio.Event()
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    app.router.add_post("/api/session", login)
    app.router.add_delete("/api/session", logout)
    add_routes(app)
    add_suppression_routes(app)
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(_drain_sends)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 413:
            headers = {"Connection": "close"}
        return web.json_response({"error": str(exc)}, status=exc.status, headers=headers)
    except (StoreUnavailable, StoreFailed) as exc:
        # A PostgreSQL store that cannot be reached: the message names it without password.
        return web.json_response({"error": str(exc)}, status=503)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def _index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def _drain_sends(app: web.Application) -> None:
    app[CLOSING].set()
    await app[SERVICE].shutdown()


def serve_web(args: argparse.Namespace) -> int:
    from campaign import logs
    from campaign.job import load_job

    logs.configure("console")
    token = os.environ.get("CAMPAIGN_TOKEN", "").strip()
    if token and len(token) < MIN_TOKEN_CHARS:
        raise UsageError(
            f"CAMPAIGN_TOKEN is shorter than {MIN_TOKEN_CHARS} characters: use a longer one "
            "(or leave it unset, and serve makes one up)"
        )
    job = load_job(args.job)
    _ledger_reachable(job.ledger)
    logs.masker.hide(job.api.channel_uuid)
    if job.reporting is not None:
        logs.masker.hide(job.reporting.access_token, keep=0)
    generated = not token
    token = token or secrets.token_urlsafe(18)
    app = create_app(
        job,
        token,
        int(args.max_upload_mb * 1024 * 1024),
        secure_cookie=not _is_loopback(args.host),
    )
    asyncio.run(_serve(app, args.host, args.port, token if generated else None))
    return 0


def _ledger_reachable(url: str | None) -> None:
    """A page server on a database it cannot reach would answer every request 503: it
    refuses to start instead (StoreUnavailable, exit 2, the URL without its password)."""
    if url is None:
        return
    from campaign.store.db import Database

    Database.postgresql(url, None).close()


async def _serve(app: web.Application, host: str, port: int, shown_token: str | None) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            print("stopped at once; requests in flight become unknown", flush=True)
            os._exit(130)
        stopping.set()
        log.warning("stopping: sends finish their requests in flight (again to quit at once)")

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    bound = runner.addresses[0][1]
    url = f"http://{_url_host(host)}:{bound}/"
    print(f"campaign serve: listening on {url}", flush=True)
    if shown_token:
        print(f"open {url}#token={shown_token}  (token: {shown_token})", flush=True)
    else:
        print(f"open {url}  (token: the value of CAMPAIGN_TOKEN)", flush=True)
    if not _is_loopback(host):
        log.warning("listening beyond this machine: anyone who has the token can send", host=host)
        log.warning("the session cookie is Secure: the page signs in over HTTPS only")
    try:
        await stopping.wait()
    finally:
        await _drain_sends(app)
        await runner.cleanup()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
