"""`campaign serve`: the upload page and its JSON API, on the same pipeline as the CLI.

Access: every `/api/` route needs the token, as `Authorization: Bearer TOKEN` or as the
session cookie that `POST /api/session {"token"}` sets (HttpOnly, SameSite=Strict, so a
page on another site can neither read nor send it). The cookie holds an HMAC of the
token, not the token, and stays valid across restarts with the same token. The page and
its assets hold no data and need no token.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import os
import secrets
import signal
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

import structlog
from aiohttp import web

from campaign.errors import UsageError
from campaign.job import Job
from campaign.web_api import CLOSING, MAX_UPLOAD, SERVICE, add_routes
from campaign.web_service import Campaigns, ServiceError

log = structlog.get_logger(__name__)

SESSION_COOKIE = "campaign_session"
TOKEN = web.AppKey("token", str)
STATIC = Path(str(resources.files("campaign") / "static"))
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(job: Job, token: str, max_upload_bytes: int) -> web.Application:
    app = web.Application(middlewares=[_errors, _auth])
    app[SERVICE] = Campaigns(job)
    app[TOKEN] = token
    app[MAX_UPLOAD] = max_upload_bytes
    app[CLOSING] = asyncio.Event()
    app.router.add_get("/", _index)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    app.router.add_post("/api/session", _login)
    app.router.add_delete("/api/session", _logout)
    add_routes(app)
    app.on_response_prepare.append(_security_headers)
    app.on_shutdown.append(_drain_sends)
    return app


def session_value(token: str) -> str:
    return hmac.new(token.encode(), b"campaign-session", hashlib.sha256).hexdigest()


def _authorized(request: web.Request) -> bool:
    token = request.app[TOKEN]
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].strip().encode(), token.encode())
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), session_value(token).encode())


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    is_login = request.path == "/api/session" and request.method == "POST"
    if request.path.startswith("/api/") and not is_login and not _authorized(request):
        raise ServiceError(401, "a valid token is needed (Authorization: Bearer TOKEN)")
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServiceError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 413:
            headers = {"Connection": "close"}
        return web.json_response({"error": str(exc)}, status=exc.status, headers=headers)
    except web.HTTPException as exc:
        if not request.path.startswith("/api/") or exc.status < 400:
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


async def _index(_request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


async def _login(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        body = None
    given = body.get("token") if isinstance(body, dict) else None
    token = request.app[TOKEN]
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), token.encode()):
        raise ServiceError(401, "wrong token")
    response = web.json_response({"ok": True})
    response.set_cookie(
        SESSION_COOKIE, session_value(token), httponly=True, samesite="Strict", path="/"
    )
    return response


async def _logout(_request: web.Request) -> web.Response:
    response = web.json_response({"ok": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def _drain_sends(app: web.Application) -> None:
    app[CLOSING].set()
    await app[SERVICE].shutdown()


def serve_web(args: argparse.Namespace) -> int:
    from campaign import logs
    from campaign.job import load_job

    logs.configure("console")
    job = load_job(args.job)
    logs.masker.hide(job.api.channel_uuid)
    token = os.environ.get("CAMPAIGN_TOKEN", "").strip()
    generated = not token
    token = token or secrets.token_urlsafe(18)
    app = create_app(job, token, int(args.max_upload_mb * 1024 * 1024))
    asyncio.run(_serve(app, args.host, args.port, token if generated else None))
    return 0


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
