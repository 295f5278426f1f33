"""Avaamo's HTTP APIs: every request to Avaamo leaves from here.

    POST {api.base_url}/sms/{channel_uuid}/send.json                 (`SendClient`)
    GET  {base_url}/api/v1/agents/{agent_id}/sms/report.json        (`ReportingClient`)
         ?from_timetoken=EPOCH&to_timetoken=EPOCH&page=N[&to_phone=..]
         access-token: TOKEN
    GET  {base_url}/api/v2/sms/opt-status.json                       (`OptStatusClient`)
         ?current_status=opt-out|opt-in[&start_time=MS&end_time=MS]&page=N&per_page=100
         access-token: TOKEN

What every endpoint shares is here once: the timeouts, an answer read up to a cap, a
transport failure (no connection, no answer in time, a dropped connection) turned into
the retry policy's `Answer`, and the secrets (the channel uuid, the access token) kept
out of every message (`_Secrets`; the CLI hides them from every log line as well).

A paged read (`_PagedReader`) is rate limited and retried as what it is, a GET: timeouts
and 5xx are retried too (retrying a read sends nobody an SMS); 401/403/404 end it
(`ReportingRefused`, exit 3); an answer that is not a page is tried again, then
`PageUnreadable`. A new paged endpoint gives its address, its refusal and its parser.

The send request itself is never retried here: whether it may be sent again is the
dispatcher's decision (`policy.decide`), after the answer is recorded.

Reporting: both timetokens are always sent (with `to_timetoken` alone the API returns
only the latest 3 entries). The page parameter's name is not documented: `page` is
assumed, here only. What a page holds is `reporting`'s.

Opt status: times are epoch milliseconds, and both are sent or neither (with
`start_time` alone the API returns only the latest 3). What a page holds is `optouts`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import ClassVar, Self, TypeVar

import aiohttp

from campaign.bounds import (
    MAX_PAGE_BYTES,
    MAX_SEND_ANSWER_BYTES,
    MAX_STATUS_DETAIL_CHARS,
    JsonRefused,
    load_json,
)
from campaign.errors import PageUnreadable, ReportingRefused
from campaign.job import Api
from campaign.policy import (
    Answer,
    Transport,
    answer_detail,
    backoff_s,
    decide,
    parse_retry_after,
    wait,
)
from campaign.rate import RateLimiter
from campaign.reporting import (
    OPT_STATUS_PER_PAGE,
    OptPage,
    Page,
    Received,
    parse_opt_page,
    parse_page,
    parse_received,
)

P = TypeVar("P")

_SEND_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_SEND_DETAIL_CHARS = 200
MAX_ANSWER_BYTES = MAX_SEND_ANSWER_BYTES
_SUCCESS_BODIES = frozenset({b'{"success": true}', b'{"success":true}'})
_SENT = Answer(http_status=200, success=True)
_EMPTY = "empty answer"
# Shorter than the idle timeout of common servers (5 s): a connection the server closed
# while idle would fail a request that it never received, and that failure looks the same
# as a request that arrived: `unknown`.
KEEPALIVE_S = 2.0

PAGE_PARAM = "page"  # not documented by the provider: assumed, and only here
TOKEN_HEADER = "access-token"
_PAGE_DETAIL_CHARS = MAX_STATUS_DETAIL_CHARS


def send_url(api: Api) -> str:
    """The channel's Send API address: what one rate budget is for."""
    return f"{api.base_url}/sms/{api.channel_uuid}/send.json"


def report_url(base_url: str, agent_id: str) -> str:
    return f"{base_url.rstrip('/')}/api/v1/agents/{agent_id}/sms/report.json"


def opt_status_url(base_url: str) -> str:
    return f"{base_url.rstrip('/')}/api/v2/sms/opt-status.json"


class _Secrets:
    """What no message may hold, each with what is shown in its place, should a server
    or a library echo it."""

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self._pairs = tuple((secret, shown) for secret, shown in pairs if secret)

    def scrub(self, text: str) -> str:
        for secret, shown in self._pairs:
            text = text.replace(secret, shown)
        return text


class _Client:
    """One session to one Avaamo endpoint. Create it inside the running loop (`async
    with`)."""

    def __init__(self, timeout_s: float, secrets: _Secrets, detail_chars: int) -> None:
        self.timeout_s = timeout_s
        self._secrets = secrets
        self._detail_chars = detail_chars
        self._session: aiohttp.ClientSession | None = None

    def _connector(self) -> aiohttp.TCPConnector:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        # sock_read restarts with every byte: the overall deadline stops a trickle. It is
        # longer than sock_connect, so a connection that cannot be opened is told apart.
        timeout = aiohttp.ClientTimeout(
            total=self.timeout_s * 2, sock_connect=self.timeout_s, sock_read=self.timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector(),
            timeout=timeout,
            headers=self._headers(),
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    def _failed(self, exc: BaseException) -> Answer:
        """A request that got no HTTP answer, as the retry policy's `Answer`: only a
        connection that could not be opened certainly sent nothing."""
        if isinstance(exc, aiohttp.ClientConnectorError):
            return Answer(transport=Transport.CONNECT, detail=self._exc_text(exc))
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return Answer(transport=Transport.CONNECT, detail="connect timed out")
        if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
            return Answer(transport=Transport.TIMEOUT, detail=f"{self.timeout_s:g} s")
        return Answer(transport=Transport.DROPPED, detail=self._exc_text(exc))

    def _refusal(self, status: int, reason: str | None, raw: bytes) -> str:
        """What a non-success HTTP answer said, fit for a message."""
        return self._secrets.scrub(answer_detail(status, reason, raw, self._detail_chars))

    def _exc_text(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self._secrets.scrub(text)[: self._detail_chars]


# Every way a request can end without an HTTP answer (TimeoutError is an OSError).
_NO_ANSWER = (aiohttp.ClientError, OSError)


class SendClient(_Client):
    """The Send API of one channel: one request, one `Answer`."""

    def __init__(self, api: Api, concurrency: int) -> None:
        uuid = api.channel_uuid
        # The channel uuid is as good as a password: only its start is ever shown.
        super().__init__(api.timeout_s, _Secrets((uuid, uuid[:8] + "…")), _SEND_DETAIL_CHARS)
        self.url = send_url(api)
        self._concurrency = concurrency

    def _connector(self) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
        )

    def _headers(self) -> dict[str, str]:
        return _SEND_HEADERS

    async def send(self, body: bytes) -> Answer:
        assert self._session is not None
        try:
            async with self._session.post(self.url, data=body, allow_redirects=False) as resp:
                raw = await read_capped(resp.content, MAX_ANSWER_BYTES)
                if resp.status == 200 and raw in _SUCCESS_BODIES:
                    return _SENT
                return Answer(
                    http_status=resp.status,
                    success=_is_success(raw),
                    retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
                    detail=self._send_detail(resp.status, resp.reason, raw),
                )
        except _NO_ANSWER as exc:
            return self._failed(exc)

    def _send_detail(self, status: int, reason: str | None, raw: bytes) -> str:
        if 200 <= status < 300:
            text = self._secrets.scrub(raw.decode("utf-8", "replace").strip())
            return f"answer was not success: {text[:_SEND_DETAIL_CHARS]}" if text else _EMPTY
        return self._refusal(status, reason, raw)


class _PagedReader(_Client):
    """GETs of one paged endpoint within one rate limiter, each page retried as a read.
    An endpoint gives its address, its name and what to check on each refusal, and its
    page parser (which raises `PageUnreadable`)."""

    NAME: ClassVar[str] = ""
    FIXES: ClassVar[Mapping[int, str]] = {}  # HTTP status of a refusal: what to check

    def __init__(
        self,
        url: str,
        access_token: str,
        *,
        rate_per_second: float,
        timeout_s: float,
        max_attempts: int,
        concurrency: int,
    ) -> None:
        super().__init__(timeout_s, _Secrets((access_token, "[access token]")), _PAGE_DETAIL_CHARS)
        self.url = url
        self._token = access_token
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self._limiter = RateLimiter(rate_per_second)
        self.requests = 0

    def _connector(self) -> aiohttp.TCPConnector:
        return aiohttp.TCPConnector(limit=self.concurrency)

    def _headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: self._token, "Accept": "application/json"}

    def _refused(self, answer: Answer) -> str:
        fix = self.FIXES.get(answer.http_status or 0, "check the reporting: section")
        return f"the {self.NAME} refused the request (HTTP {answer.http_status}): {fix}"

    async def _page(self, params: dict[str, str], number: int, parse: Callable[[bytes], P]) -> P:
        """Page `number`, parsed; `ReportingRefused` on 401/403/404, `PageUnreadable`
        once the retries are spent."""
        attempt = 0
        while True:
            await self._limiter.acquire()
            await self._limiter.confirm()
            attempt += 1
            self.requests += 1
            answer, raw = await self._get(params)
            if answer is None:
                try:
                    return parse(raw)
                except PageUnreadable as exc:
                    # A proxy's error page in a 200 is usually passing: try again.
                    if attempt >= self.max_attempts:
                        raise PageUnreadable(f"{exc} (after {attempt} attempts)") from None
                    await wait(backoff_s(attempt, None), "unreadable page", page=number)
                    continue
            decision = decide(answer, attempt, max_attempts=self.max_attempts, retry_ambiguous=True)
            if decision.fatal:
                raise ReportingRefused(self._refused(answer))
            if decision.retry_in_s is None:
                raise PageUnreadable(f"page {number}: {decision.error or ''}")
            await wait(decision.retry_in_s, self.NAME, page=number)

    async def _get(self, params: dict[str, str]) -> tuple[Answer | None, bytes]:
        """(None, body) for a 200; else what went wrong as the send policy's `Answer`."""
        assert self._session is not None
        try:
            async with self._session.get(self.url, params=params, allow_redirects=False) as resp:
                raw = await read_capped(resp.content, MAX_PAGE_BYTES)
                if resp.status == 200:
                    return None, raw
                return Answer(
                    http_status=resp.status,
                    retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
                    detail=self._refusal(resp.status, resp.reason, raw),
                ), b""
        except _NO_ANSWER as exc:
            return self._failed(exc), b""


class ReportingClient(_PagedReader):
    """Pages of the Reporting API, one session and one rate limiter per reconcile."""

    NAME = "Reporting API"
    FIXES: ClassVar[Mapping[int, str]] = {
        401: "check reporting.access_token",
        403: "check reporting.access_token (it has no access to this agent)",
        404: "check reporting.agent_id and reporting.base_url",
    }

    def __init__(
        self,
        base_url: str,
        agent_id: str,
        access_token: str,
        *,
        rate_per_second: float,
        timeout_s: float,
        max_attempts: int,
        region: str,
        concurrency: int,
        from_phone: str | None = None,
    ) -> None:
        super().__init__(
            report_url(base_url, agent_id),
            access_token,
            rate_per_second=rate_per_second,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            concurrency=concurrency,
        )
        self.from_phone = from_phone  # only the entries of this sender (the API's filter)
        self.region = region

    async def page(self, start: float, end: float, number: int) -> Page:
        """Page `number` of the entries created in [start, end] (epoch seconds)."""
        params = {
            "from_timetoken": f"{start:.3f}",
            "to_timetoken": f"{end:.3f}",
            PAGE_PARAM: str(number),
        }
        if self.from_phone:
            params["from_phone"] = self.from_phone
        region = self.region
        return await self._page(params, number, lambda raw: parse_page(raw, number, region))

    async def received(self, to_phone: str, start: float, end: float) -> list[Received]:
        """The entries to `to_phone` created in [start, end], with their messages: the
        first page only (newest first), which is all a test send looks for."""
        params = {
            "from_timetoken": f"{start:.3f}",
            "to_timetoken": f"{end:.3f}",
            "to_phone": to_phone,
            PAGE_PARAM: "1",
        }
        if self.from_phone:
            params["from_phone"] = self.from_phone
        region = self.region
        page = await self._page(params, 1, lambda raw: parse_received(raw, 1, region))
        return page[1]


class OptStatusClient(_PagedReader):
    """Pages of the SMS Opt Status API: who is opted out (or back in) at Avaamo."""

    NAME = "SMS Opt Status API"
    FIXES: ClassVar[Mapping[int, str]] = {
        401: "check reporting.access_token",
        403: "check reporting.access_token (it has no access to opt status)",
        404: "check reporting.base_url",
    }

    def __init__(
        self,
        base_url: str,
        access_token: str,
        *,
        rate_per_second: float,
        timeout_s: float,
        max_attempts: int,
        concurrency: int,
        from_phone: str | None = None,
        region: str = "US",
    ) -> None:
        super().__init__(
            opt_status_url(base_url),
            access_token,
            rate_per_second=rate_per_second,
            timeout_s=timeout_s,
            max_attempts=max_attempts,
            concurrency=concurrency,
        )
        self.from_phone = from_phone
        self.region = region  # for a number written without its country code

    async def page(
        self,
        current_status: str,
        number: int,
        span: tuple[float, float] | None = None,
        *,
        status: str | None = None,
        to_phone: str | None = None,
    ) -> OptPage:
        """Page `number` of the numbers whose current status is `current_status`; with
        `span` (epoch seconds), only those whose status changed within it."""
        params = {
            "current_status": current_status,
            PAGE_PARAM: str(number),
            "per_page": str(OPT_STATUS_PER_PAGE),
        }
        if span is not None:
            params["start_time"] = str(math.floor(span[0] * 1000))
            params["end_time"] = str(math.ceil(span[1] * 1000))
        if status:
            params["status"] = status
        if to_phone:
            params["to_phone"] = to_phone
        if self.from_phone:
            params["from_phone"] = self.from_phone
        region = self.region
        return await self._page(params, number, lambda raw: parse_opt_page(raw, number, region))


async def read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes:
    """The whole answer, or its first `cap` bytes: an answer is a few bytes of JSON, and a
    huge one must not fill the memory."""
    chunks: list[bytes] = []
    size = 0
    while size < cap and (chunk := await stream.read(cap - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _is_success(raw: bytes) -> bool:
    if raw in _SUCCESS_BODIES:
        return True
    try:
        body = load_json(raw, MAX_ANSWER_BYTES)
    except JsonRefused:
        return False
    return isinstance(body, dict) and body.get("success") is True
