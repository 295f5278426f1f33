"""What the Avaamo SMS Reporting API answers: its pages and the shape of their entries
(the requests themselves are `avaamo.ReportingClient`'s).

    -> {"current_page", "per_page": 25, "total_entries", "total_pages", "entries": [...]}

Entries come back with formatted numbers (`+1(415) 555-0101`): `phone_digits` turns
them into E.164 digits. An entry without a usable number, time (epoch seconds) or status
(one of `STATUSES`) is counted (`Page.bad`) and skipped; its window is then not read
whole, so nobody in it is taken for `not_found` on the strength of it.

An answer is refused (`PageUnreadable`) when it is not JSON within `bounds`' size and
depth, or its counts are not counts; `total_pages` is only believed up to what
`total_entries` needs and `bounds.MAX_REPORT_PAGES` (`Page.last_page`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import phonenumbers

from campaign.bounds import (
    MAX_PAGE_BYTES,
    MAX_REPORT_PAGES,
    MAX_STATUS_DETAIL_CHARS,
    JsonRefused,
    load_json,
)
from campaign.errors import PageUnreadable

PER_PAGE = 25
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


@dataclass(frozen=True)
class Envelope:
    """The paging of an answer of Avaamo's paged APIs (reports, opt status)."""

    entries: list[Any]
    total_pages: int
    total_entries: int
    per_page: int


def read_envelope(raw: bytes, number: int, per_page: int) -> Envelope:
    """Page `number`'s entries and counts (`per_page` when it says none);
    `PageUnreadable` when the answer is not a page."""
    try:
        body = load_json(raw, MAX_PAGE_BYTES)
    except JsonRefused as exc:
        raise PageUnreadable(f"page {number}: the answer is {_refusal(exc)}") from None
    if not isinstance(body, dict) or not isinstance(body.get("entries"), list):
        raise PageUnreadable(f"page {number}: the answer has no list of entries")
    total_pages, total_entries = body.get("total_pages"), body.get("total_entries")
    if not _count(total_pages) or not _count(total_entries):
        raise PageUnreadable(f"page {number}: total_pages or total_entries is not a count")
    said = body.get("per_page", per_page)
    if not _count(said) or said == 0:
        raise PageUnreadable(f"page {number}: per_page is not a count")
    entries = body["entries"]
    return Envelope(entries, total_pages, total_entries, max(said, len(entries)))


def parse_page(raw: bytes, number: int, region: str) -> Page:
    """A page's answer; `PageUnreadable` when it is not a report page."""
    return _read_page(raw, number, region)[0]


def _read_page(raw: bytes, number: int, region: str) -> tuple[Page, list[Any]]:
    """The page, and the answer's items its usable entries were read from (in order)."""
    envelope = read_envelope(raw, number, PER_PAGE)
    page = Page(
        number, envelope.total_pages, envelope.total_entries, received=len(envelope.entries)
    )
    page.per_page = envelope.per_page
    usable = []
    for item in envelope.entries:
        entry = parse_entry(item, region)
        if entry is None:
            page.bad += 1
        else:
            page.entries.append(entry)
            usable.append(item)
    return page, usable


def _count(value: object) -> TypeGuard[int]:
    """A whole number of 0 or more; JSON's true is no count, though Python's bool is an int."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _refusal(exc: JsonRefused) -> str:
    text = str(exc)
    return text if text.startswith("not ") else f"JSON {text}"


MESSAGE_CHARS = 2000  # an SMS is at most a few hundred characters; more is not a message


@dataclass(frozen=True)
class Received:
    """One report entry with the text the phone received (a test send's preview)."""

    key: str
    created_at: float
    status: str
    error: str | None
    message: str | None


def parse_received(raw: bytes, number: int, region: str) -> tuple[Page, list[Received]]:
    """A page's answer (`parse_page`), and its usable entries with their `message`."""
    page, usable = _read_page(raw, number, region)
    received = []
    for item, (key, _, created, status, error) in zip(usable, page.entries, strict=True):
        text = item.get("message")
        message = text[:MESSAGE_CHARS] if isinstance(text, str) else None
        received.append(Received(key, created, status, error, message))
    return page, received


# --- the SMS Opt Status API's pages (`campaign suppress sync`) --------------------------------

OPT_OUT, OPT_IN = "opt-out", "opt-in"
OPT_STATUS_PER_PAGE = 100  # the API's maximum


@dataclass
class OptPage:
    number: int
    total_pages: int
    total_entries: int
    per_page: int
    entries: list[tuple[str, str, float | None]] = field(default_factory=list)
    received: int = 0
    bad: int = 0  # no usable to_phone or current_status

    @property
    def last_page(self) -> int:
        """The last page worth asking for, by `total_entries` (total_pages can lie)."""
        return max(0, min(math.ceil(self.total_entries / self.per_page), MAX_REPORT_PAGES))


def parse_opt_page(raw: bytes, number: int, region: str = "US") -> OptPage:
    """A page of the SMS Opt Status API; `PageUnreadable` when it is not one."""
    envelope = read_envelope(raw, number, OPT_STATUS_PER_PAGE)
    page = OptPage(number, envelope.total_pages, envelope.total_entries, envelope.per_page)
    page.received = len(envelope.entries)
    for item in envelope.entries:
        digits = phone_digits(item.get("to_phone"), region) if isinstance(item, dict) else None
        current = item.get("current_status") if isinstance(item, dict) else None
        if digits is None or current not in (OPT_OUT, OPT_IN):
            page.bad += 1
            continue
        page.entries.append((f"+{digits}", current, _seconds(item.get("created_at"))))
    return page


def _seconds(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0 < value < 253_402_300_800 else None
