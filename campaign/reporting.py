"""The Avaamo SMS Reporting API: the one place that knows its address, its header, its
page parameter and the shape of its entries.

    GET {base_url}/api/v1/agents/{agent_id}/sms/report.json
        ?from_timetoken=EPOCH&to_timetoken=EPOCH&page=N
    access-token: TOKEN
    -> {"current_page", "per_page": 25, "total_entries", "total_pages", "entries": [...]}

Both timetokens are always sent (with `to_timetoken` alone the API returns only the
latest 3 entries). The page parameter's name is not documented: `page` is assumed, here
only. A page is fetched within the reconcile's rate limiter and retried with the send
retry policy, but as what it is, a GET: timeouts and 5xx are retried too (retrying a
read sends nobody an SMS); 401/403/404 end the reconcile (`ReportingRefused`, exit 3).

Entries come back with formatted numbers (`+1(415) 555-0101`): `phone_digits` turns
them into E.164 digits. An entry without a usable number, time (epoch seconds) or status
(one of `STATUSES`) is counted (`Page.bad`) and skipped; its window is then not read
whole, so nobody in it is taken for `not_found` on the strength of it.

An answer is refused (`PageUnreadable`) when it is not JSON within `bounds`' size and
depth, or its counts are not counts; `total_pages` is only believed up to what
`total_entries` needs and `bounds.MAX_REPORT_PAGES` (`Page.last_page`).

The access token is sent in a header and nowhere else: no message or log line of this
module holds it (`_scrub`), and the CLI hides it from every log line as well.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from dataclasses import dataclass, field
from types import TracebackType
from typing import TypeGuard

import aiohttp
import phonenumbers

from campaign.bounds import (
    MAX_PAGE_BYTES,
    MAX_REPORT_PAGES,
    MAX_STATUS_DETAIL_CHARS,
    JsonRefused,
    load_json,
)
from campaign.dispatch import _read_capped
from campaign.errors import ReportingRefused
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

PER_PAGE = 25
PAGE_PARAM = "page"  # not documented by the provider: assumed, and only here
TOKEN_HEADER = "access-token"
# The API's sms_status values; anything else (even "not_found") is not a report of ours.
STATUSES = frozenset({"sent", "failed", "delivered", "undelivered"})
_DETAIL_CHARS = MAX_STATUS_DETAIL_CHARS
_YEAR_10000 = 253_402_300_800  # epoch seconds: later is no time a date can show
_KEY_CHARS = 128  # a longer uuid is kept as its hash
_FAST_E164 = re.compile(r"\+\d[\d\s().-]*")
Entry = tuple[str, int, float, str, str | None]  # key, phone digits, created_at, status, error


@dataclass
class Page:
    number: int
    total_pages: int
    total_entries: int
    entries: list[Entry] = field(default_factory=list)
    received: int = 0  # entries in the answer, usable or not
    bad: int = 0  # entries skipped: no usable to_phone, created_at or sms_status
    per_page: int = PER_PAGE

    @property
    def last_page(self) -> int:
        """The last page worth asking for: total_pages as far as total_entries bears it
        out, never more than the hard cap."""
        needed = math.ceil(self.total_entries / self.per_page)
        return max(0, min(self.total_pages, needed, MAX_REPORT_PAGES))


class PageUnreadable(Exception):
    """A page that could not be read after the retries the policy allows; one line."""


def report_url(base_url: str, agent_id: str) -> str:
    return f"{base_url.rstrip('/')}/api/v1/agents/{agent_id}/sms/report.json"


def phone_digits(text: object, region: str) -> int | None:
    """The E.164 number of an entry's `to_phone` as digits (no `+`), or None."""
    if not isinstance(text, str) or not text.strip():
        return None
    text = text.strip()
    # "+1(415) 555-0101": the digits are the number. A "(0)" trunk prefix is not part of
    # it, and a number without "+" needs the region: phonenumbers decides those.
    if _FAST_E164.fullmatch(text) and "(0" not in text:
        digits = re.sub(r"\D", "", text)
    else:
        try:
            number = phonenumbers.parse(text, region)
        except phonenumbers.NumberParseException:
            return None
        digits = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]
    return int(digits) if 8 <= len(digits) <= 15 else None


def parse_entry(raw: object, region: str) -> Entry | None:
    """One entry of a page as (key, phone digits, created_at, status, error); None when it
    lacks a usable number, time or status."""
    if not isinstance(raw, dict):
        return None
    phone = phone_digits(raw.get("to_phone"), region)
    created = _epoch(raw.get("created_at"))
    status = raw.get("sms_status")
    status = status.strip() if isinstance(status, str) else None
    if phone is None or created is None or status not in STATUSES:
        return None
    error = raw.get("sms_status_response")
    error = error.strip()[:_DETAIL_CHARS] or None if isinstance(error, str) else None
    return _key(raw.get("uuid"), phone, created), phone, created, status, error


def _key(uuid: object, phone: int, created: float) -> str:
    if not isinstance(uuid, str) or not uuid.strip():
        return f"{phone}@{created!r}"
    uuid = uuid.strip()
    if len(uuid) <= _KEY_CHARS:
        return uuid
    return "sha256:" + hashlib.sha256(uuid.encode("utf-8", "replace")).hexdigest()


def _epoch(value: object) -> float | None:
    """Epoch seconds as the API documents them (a number, or one written as text); an ISO
    8601 time with its UTC offset is the same instant. Anything else: None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = _text_time(value.strip()) if len(value) <= 40 else None
    if not isinstance(value, int | float) or not 0 < value < _YEAR_10000:
        return None  # NaN fails the comparison too
    return float(value)


def _text_time(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    # Without an offset the instant is anybody's guess (the API's zone is not documented).
    return when.timestamp() if when.tzinfo is not None else None


def parse_page(raw: bytes, number: int, region: str) -> Page:
    """A page's answer; `PageUnreadable` when it is not a report page."""
    try:
        body = load_json(raw, MAX_PAGE_BYTES)
    except JsonRefused as exc:
        raise PageUnreadable(f"page {number}: the answer is {_refusal(exc)}") from None
    if not isinstance(body, dict) or not isinstance(body.get("entries"), list):
        raise PageUnreadable(f"page {number}: the answer has no list of entries")
    total_pages, total_entries = body.get("total_pages"), body.get("total_entries")
    if not _count(total_pages) or not _count(total_entries):
        raise PageUnreadable(f"page {number}: total_pages or total_entries is not a count")
    per_page = body.get("per_page", PER_PAGE)
    if not _count(per_page) or per_page == 0:
        raise PageUnreadable(f"page {number}: per_page is not a count")
    page = Page(number, total_pages, total_entries, received=len(body["entries"]))
    page.per_page = max(per_page, len(body["entries"]))
    for item in body["entries"]:
        entry = parse_entry(item, region)
        if entry is None:
            page.bad += 1
        else:
            page.entries.append(entry)
    return page


def _count(value: object) -> TypeGuard[int]:
    """A whole number of 0 or more; JSON's true is no count, though Python's bool is an int."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refusal(exc: JsonRefused) -> str:
    text = str(exc)
    return text if text.startswith("not ") else f"JSON {text}"


class ReportingClient:
    """Pages of the Reporting API, one session and one rate limiter per reconcile. Create
    it inside the running loop (`async with`)."""

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
        self.url = report_url(base_url, agent_id)
        self.from_phone = from_phone  # only the entries of this sender (the API's filter)
        self._token = access_token
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.region = region
        self.concurrency = concurrency
        self._limiter = RateLimiter(rate_per_second)
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0

    async def __aenter__(self) -> ReportingClient:
        timeout = aiohttp.ClientTimeout(
            total=self.timeout_s * 2, sock_connect=self.timeout_s, sock_read=self.timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency),
            timeout=timeout,
            headers={TOKEN_HEADER: self._token, "Accept": "application/json"},
            raise_for_status=False,
        )
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()

    async def page(self, start: float, end: float, number: int) -> Page:
        """Page `number` of the entries created in [start, end] (epoch seconds)."""
        params = {
            "from_timetoken": f"{start:.3f}",
            "to_timetoken": f"{end:.3f}",
            PAGE_PARAM: str(number),
        }
        if self.from_phone:
            params["from_phone"] = self.from_phone
        attempt = 0
        while True:
            await self._limiter.acquire()
            await self._limiter.confirm()
            attempt += 1
            self.requests += 1
            answer, raw = await self._get(params)
            if answer is None:
                try:
                    return parse_page(raw, number, self.region)
                except PageUnreadable as exc:
                    # A proxy's error page in a 200 is usually passing: try again.
                    if attempt >= self.max_attempts:
                        raise PageUnreadable(f"{exc} (after {attempt} attempts)") from None
                    await wait(backoff_s(attempt, None), "unreadable page", page=number)
                    continue
            decision = decide(answer, attempt, max_attempts=self.max_attempts, retry_ambiguous=True)
            if decision.fatal:
                raise ReportingRefused(_refused(answer))
            if decision.retry_in_s is None:
                raise PageUnreadable(f"page {number}: {self._scrub(decision.error or '')}")
            await wait(decision.retry_in_s, "Reporting API", page=number)

    async def _get(self, params: dict[str, str]) -> tuple[Answer | None, bytes]:
        """(None, body) for a 200; else what went wrong as the send policy's `Answer`."""
        assert self._session is not None
        try:
            async with self._session.get(self.url, params=params, allow_redirects=False) as resp:
                raw = await _read_capped(resp.content, MAX_PAGE_BYTES)
                if resp.status == 200:
                    return None, raw
                return Answer(
                    http_status=resp.status,
                    retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
                    detail=self._scrub(answer_detail(resp.status, resp.reason, raw, _DETAIL_CHARS)),
                ), b""
        except aiohttp.ClientConnectorError as exc:
            return Answer(transport=Transport.CONNECT, detail=self._exc_text(exc)), b""
        except aiohttp.ConnectionTimeoutError:
            return Answer(transport=Transport.CONNECT, detail="connect timed out"), b""
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return Answer(transport=Transport.TIMEOUT, detail=f"{self.timeout_s:g} s"), b""
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(transport=Transport.DROPPED, detail=self._exc_text(exc)), b""

    def _exc_text(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self._scrub(text)[:_DETAIL_CHARS]

    def _scrub(self, text: str) -> str:
        """The text without the access token, should a server or a library echo it."""
        return text.replace(self._token, "[access token]") if self._token else text


def _refused(answer: Answer) -> str:
    fix = {
        401: "check reporting.access_token",
        403: "check reporting.access_token (it has no access to this agent)",
        404: "check reporting.agent_id and reporting.base_url",
    }.get(answer.http_status or 0, "check the reporting: section")
    return f"the Reporting API refused the request (HTTP {answer.http_status}): {fix}"
