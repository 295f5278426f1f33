"""Who may call the upload service's API, and from where (docs/page.md, "Access").

Two ways in: `Authorization: Bearer TOKEN` (scripts), or the session cookie that
`POST /api/session {"token"}` sets for the page. The cookie holds a random session id,
never the token; the id lives in this process's memory for 12 hours (the cookie's
Max-Age too), `DELETE /api/session` forgets it, and a restart forgets them all, so the
page asks for the token again. Without that, a cookie copied once would open the API
for as long as the token stays the same.

A browser attaches the cookie to requests that other pages make as well. SameSite=Strict
keeps other sites out, but every port of 127.0.0.1 is the same site: a page served by
anything else on this machine could POST /start with the operator's cookie. So a
state-changing request (POST, PUT, PATCH, DELETE) that rides on the cookie must name this
server as its origin (`Origin`, or `Referer` when a browser leaves Origin out), and a JSON
route takes only `application/json` bodies, which a page of another origin cannot send
without a CORS preflight that this server never answers. A Bearer request carries no
ambient credential, so only the content-type rule applies to it; a request without a
body (`curl -X POST -H 'Authorization: Bearer T' .../start`) needs no content type.
The sign-in itself refuses another origin and anything but JSON too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from yarl import URL

from campaign.bounds import MAX_JSON_BODY_BYTES, JsonRefused, load_json
from campaign.web.service import ServiceError

SESSION_COOKIE = "campaign_session"
SESSION_TTL_S = 12 * 3600
MIN_TOKEN_CHARS = 16
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOGIN = ("POST", "/api/session")
# State-changing routes whose body is not JSON: the upload is multipart/form-data.
NOT_JSON = frozenset({("POST", "/api/campaigns")})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Sessions:
    """Session ids handed out at sign-in, each valid for `ttl_s` seconds of `clock`.

    Only a hash of each id is kept, so a lookup's timing says nothing about the ids."""

    def __init__(
        self, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._expiry: dict[str, float] = {}

    def open(self) -> str:
        self._drop_expired()
        session = secrets.token_urlsafe(32)
        self._expiry[_digest(session)] = self._clock() + self.ttl_s
        return session

    def valid(self, session: str) -> bool:
        key = _digest(session)
        expiry = self._expiry.get(key)
        if expiry is None:
            return False
        if self._clock() >= expiry:
            del self._expiry[key]
            return False
        return True

    def close(self, session: str) -> None:
        self._expiry.pop(_digest(session), None)

    def __len__(self) -> int:
        return len(self._expiry)  # those not yet dropped, expired or not

    def _drop_expired(self) -> None:
        now = self._clock()
        for key in [k for k, expiry in self._expiry.items() if now >= expiry]:
            del self._expiry[key]


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


TOKEN = web.AppKey("token", str)
SESSIONS = web.AppKey("sessions", Sessions)
SECURE_COOKIE = web.AppKey("secure_cookie", bool)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every `/api/` request: who it is (401), where it comes from (403), its body (415)."""
    if not request.path.startswith("/api/"):
        return await handler(request)
    route = (request.method, _route_path(request))
    changing = request.method in STATE_CHANGING
    if route == LOGIN:
        # No credential yet, but a page of another origin must not sign anyone in.
        if _claimed_origin(request) and not _same_origin(request):
            raise ServiceError(403, "refused: sign in on this server's own page")
    else:
        way = _credential(request)
        if way is None:
            raise ServiceError(401, "a valid token is needed (Authorization: Bearer TOKEN)")
        if changing and way == "cookie" and not _same_origin(request):
            raise _cross_origin()
    json_body = changing and route not in NOT_JSON and (route == LOGIN or _has_body(request))
    if json_body and request.content_type != "application/json":
        raise ServiceError(415, "send the body as JSON (Content-Type: application/json)")
    return await handler(request)


def _credential(request: web.Request) -> str | None:
    """Which valid credential the request carries: "bearer", "cookie", or None."""
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return "bearer" if same_token(header[7:].strip(), request.app[TOKEN]) else None
    session = request.cookies.get(SESSION_COOKIE, "")
    return "cookie" if session and request.app[SESSIONS].valid(session) else None


def _route_path(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else request.path


def _has_body(request: web.Request) -> bool:
    return bool(request.content_length) or "Transfer-Encoding" in request.headers


def _claimed_origin(request: web.Request) -> str:
    """Where the request says it comes from: Origin, or Referer when Origin is absent."""
    return request.headers.get("Origin") or request.headers.get("Referer") or ""


def _same_origin(request: web.Request) -> bool:
    """The claimed origin is this server's as the request reached it: scheme, host, port."""
    try:
        claimed, own = URL(_claimed_origin(request)), request.url
    except ValueError:
        return False
    if not claimed.absolute or claimed.host is None:
        return False  # absent, or "null" (a sandboxed frame, a privacy setting)
    return (claimed.scheme, claimed.host, claimed.port) == (own.scheme, own.host, own.port)


def _cross_origin() -> ServiceError:
    return ServiceError(
        403,
        "refused: a state-changing request signed in by the session cookie must come "
        "from this server's own page (its Origin or Referer is missing or another origin)",
    )


def same_token(given: object, token: str) -> bool:
    """Whether `given` is the token, in constant time. A header or JSON string may hold
    what UTF-8 cannot encode (a lone surrogate, a byte the header decoding escaped): that
    is simply not the token."""
    if not isinstance(given, str):
        return False
    try:
        encoded = given.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(encoded, token.encode("utf-8"))


async def json_body(request: web.Request, *, empty_ok: bool = False) -> Any:
    """A request's JSON body within `bounds` (size, depth, valid Unicode); one clear 400
    (413 when too large) instead of anything else."""
    if (request.content_length or 0) > MAX_JSON_BODY_BYTES:
        raise ServiceError(413, f"the request body is larger than {MAX_JSON_BODY_BYTES} bytes")
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_JSON_BODY_BYTES and (chunk := await request.content.readany()):
        chunks.append(chunk)
        size += len(chunk)
    raw = b"".join(chunks)
    if size > MAX_JSON_BODY_BYTES:
        raise ServiceError(413, f"the request body is larger than {MAX_JSON_BODY_BYTES} bytes")
    if empty_ok and not raw.strip():
        return {}
    try:
        return load_json(raw, MAX_JSON_BODY_BYTES)
    except JsonRefused as exc:
        raise ServiceError(400, f"the request body must be JSON: it is {exc}") from None


async def login(request: web.Request) -> web.Response:
    try:
        body = await json_body(request)
    except ServiceError:
        body = None
    given = body.get("token") if isinstance(body, dict) else None
    if not same_token(given, request.app[TOKEN]):
        raise ServiceError(401, "wrong token")
    sessions = request.app[SESSIONS]
    if earlier := request.cookies.get(SESSION_COOKIE):
        sessions.close(earlier)
    response = web.json_response({"ok": True})
    response.set_cookie(
        SESSION_COOKIE,
        sessions.open(),
        max_age=int(sessions.ttl_s),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.app[SECURE_COOKIE],
    )
    return response


async def logout(request: web.Request) -> web.Response:
    """Sign out: the session id is forgotten here, and the browser told to drop it."""
    if session := request.cookies.get(SESSION_COOKIE):
        request.app[SESSIONS].close(session)
    response = web.json_response({"ok": True})
    response.del_cookie(
        SESSION_COOKIE,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.app[SECURE_COOKIE],
    )
    return response
