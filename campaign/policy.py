"""What to do after an attempt: the retry policy as data and one pure decision function.

A request is retried only when it certainly did not take effect. When it may have, the
recipient is `unknown`: the API has no idempotency key, and a blind retry is how people
get two SMS.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import re
import time
from dataclasses import dataclass
from enum import StrEnum

import structlog

from campaign.bounds import LOUD_WAIT_S, MAX_RETRY_AFTER_S

log = structlog.get_logger(__name__)

# The server says it did not act on the request: sending again is safe.
RETRY_STATUSES = frozenset({408, 429, 503})
# The job is wrong (bad channel, no access): every other row will fail the same way.
FATAL_STATUSES = frozenset({401, 403, 404})

BACKOFF_BASE_S = 0.5  # first retry waits up to this long (full jitter)...
BACKOFF_CAP_S = 30.0  # ...doubling per attempt, never more than this
RETRY_AFTER_CAP_S = MAX_RETRY_AFTER_S  # a Retry-After longer than this is treated as this
# RFC 9110 delay-seconds: ASCII digits only (str.isdigit also takes "²" and "٣").
_DELAY_SECONDS = re.compile(r"[0-9]{1,12}")


class Transport(StrEnum):
    """How an attempt ended when no HTTP answer came back."""

    CONNECT = "connect"  # the connection could not be opened: nothing was sent
    TIMEOUT = "timeout"  # sent, no answer in time: may have arrived
    DROPPED = "dropped"  # connection lost after sending: may have arrived


@dataclass(frozen=True)
class Answer:
    """What one attempt produced: an HTTP answer, or a transport failure."""

    http_status: int | None = None
    success: bool = False
    retry_after_s: float | None = None
    transport: Transport | None = None
    detail: str = ""

    @property
    def maybe_delivered(self) -> bool:
        if self.transport is not None:
            return self.transport is not Transport.CONNECT
        if self.http_status is not None and 200 < self.http_status < 300:
            return True  # 202 Accepted, 204...: the API took the request, whatever it says
        return self.http_status not in RETRY_STATUSES and not _client_error(self.http_status)

    def describe(self) -> str:
        if self.transport is Transport.CONNECT:
            return f"could not connect ({self.detail})"
        if self.transport is Transport.TIMEOUT:
            return f"no answer in time ({self.detail})"
        if self.transport is Transport.DROPPED:
            return f"connection dropped after sending ({self.detail})"
        text = f"HTTP {self.http_status}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True)
class Decision:
    state: str  # sent | failed | unknown | pending
    error: str | None = None
    retry_in_s: float | None = None  # None: final; else retry after this long
    fatal: bool = False

    @property
    def final(self) -> bool:
        return self.retry_in_s is None


SENT = Decision("sent")  # the common case, made once: a Decision is immutable


def decide(
    answer: Answer,
    attempt: int,
    *,
    max_attempts: int,
    retry_ambiguous: bool,
    maybe_delivered_before: bool = False,
    rng: random.Random | None = None,
) -> Decision:
    """Turn the answer to attempt number `attempt` (from 1) into the recipient's next state.

    `maybe_delivered_before`: an earlier attempt for this recipient may have arrived, so
    a final failure must be reported as `unknown`, never as `failed`.
    """
    status = answer.http_status
    if answer.transport is None and status is not None and 200 <= status < 300 and answer.success:
        return SENT

    error = answer.describe()
    fatal = answer.transport is None and status in FATAL_STATUSES
    ambiguous = answer.maybe_delivered
    retryable = answer.transport is Transport.CONNECT or status in RETRY_STATUSES
    if ambiguous and retry_ambiguous and not fatal:
        retryable = True

    retry_in_s = None
    if retryable and attempt < max_attempts:
        retry_in_s = backoff_s(attempt, answer.retry_after_s, rng)
    elif retryable and attempt > 1:
        error = f"{error} (after {attempt} attempts)"
    if ambiguous or maybe_delivered_before:
        # Also while a retry is due: a run stopped before it must not leave a person who
        # may have the SMS already looking untried (`pending`), for a rerun to send again.
        if not ambiguous:
            error = f"{error}; an earlier attempt may have arrived"
        return Decision("unknown", error, retry_in_s, fatal)
    return Decision("failed" if retry_in_s is None else "pending", error, retry_in_s, fatal)


def backoff_s(attempt: int, retry_after_s: float | None, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1`: Retry-After if given, else full jitter."""
    if retry_after_s is not None and retry_after_s > 0:
        return min(retry_after_s, RETRY_AFTER_CAP_S)
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    return (rng or random).uniform(0, ceiling)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP date); None if absent or
    anything else (the default backoff applies). Never raises: the value is the peer's."""
    if not value or not isinstance(value, str):
        return None
    value = value.strip()
    if _DELAY_SECONDS.fullmatch(value):
        return float(value)
    if not value.isascii() or len(value) > 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


async def wait(seconds: float, why: str, **context: object) -> None:
    """Sleep `seconds`; a wait long enough to look like a hang says so in the log first."""
    if seconds > LOUD_WAIT_S:
        log.warning("waiting before the next attempt", wait_s=round(seconds, 1), why=why, **context)
    await asyncio.sleep(seconds)


def answer_detail(status: int, reason: str | None, raw: bytes, chars: int) -> str:
    """The reason phrase and the start of a non-HTML body, once: aiohttp's own error bodies
    (`302: Found`) repeat the reason and are left out."""
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    if not text or text.lstrip().startswith("<") or text == f"{status}: {reason}":
        text = ""
    return " ".join(part for part in (reason or "", text[:chars]) if part)


def _client_error(status: int | None) -> bool:
    """A 4xx (other than 408/429), a 3xx, or a 200 that is not success: refused."""
    if status is None or status in RETRY_STATUSES or 200 < status < 300:
        return False
    return status < 500
