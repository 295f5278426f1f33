"""The sandbox's SMS Reporting API: delivery reports for what the sandbox accepted.

    GET /api/v1/agents/{agent_id}/sms/report.json?from_timetoken=&to_timetoken=&page=N
    access-token: TOKEN

Like the real one (docs/delivery-reports.md): 25 entries a page, newest first;
`to_phone` formatted (`+1(415) 555-0101`), `created_at` up to 2 s after the request;
`sms_status` is `sent` until `delivery_delay_s` has passed, then `delivered`, or for a
share (`undelivered_rate`) `undelivered`/`failed` with an error text. `to_timetoken`
without `from_timetoken` gives only the latest 3 entries. A wrong token is 401, another
agent 404, more than `report_rate` queries in a second 429 + Retry-After.

Entries of other senders are mixed in, so that matching is exercised: every second
request brings an entry to another number at the same moment, every fifth an earlier
entry to the same number (another campaign, minutes before). The outcome of each
accepted request is written in the sandbox's record, so a test knows the truth.

The SMS Opt Status API (`opt_status`): with `opt_out_rate`, a share of the numbers the
sandbox delivered to reply STOP 0-1 s after delivery, and a third of those START again
`opt_in_after_s` later; the record says when (`opt_out`, `opt_in`). 100 entries a page at
most, times in epoch milliseconds (`start_time` without `end_time`: the latest 3),
`created_at` in seconds, one entry per number (its latest change).

An entry's `message` is the greeting the agent would send, filled from the params the
request carried (`message_for`), as a real agent's text is: a test send's preview
(docs/commands.md, `campaign test`) can be checked end to end.
"""

from __future__ import annotations

import bisect
import math
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

PER_PAGE = 25
LATEST_WITHOUT_FROM = 3
CREATED_WITHIN_S = 2.0
SENDER = "+14155550100"  # the agent's own number
OTHER_SENDER = "+12125550199"
# (status, sms_status_response) for the share that does not arrive.
UNDELIVERED = (
    ("undelivered", "Unsubscribed recipient"),
    ("failed", "Not a valid mobile number"),
    ("failed", "Landline or unreachable carrier"),
    ("undelivered", "Unreachable handset"),
    ("undelivered", "Carrier congestion"),
)


@dataclass
class ReportConfig:
    agent_id: str = "1"
    access_token: str = "sandbox-token"
    delivery_delay_s: float = 2.0
    undelivered_rate: float = 0.0
    report_rate: float | None = None
    opt_out_rate: float = 0.0
    opt_in_after_s: float = 60.0
    opted_out: int = 0  # numbers opted out an hour before the sandbox started (bench)


OPT_PER_PAGE = 100
OPT_IN_SHARE = 1 / 3


@dataclass
class _Entry:
    created_at: float
    uuid: str
    to_phone: str  # E.164
    from_phone: str
    status: str  # the final one, after the delivery delay
    error: str | None
    message: str = ""


@dataclass
class Reports:
    config: ReportConfig
    rng: random.Random = field(default_factory=random.Random)
    _entries: list[_Entry] = field(default_factory=list)
    _times: list[float] = field(default_factory=list)
    _sorted: bool = True
    _accepted: int = 0
    _recent: deque[float] = field(default_factory=deque)
    # number -> its changes of opt status, (time, "opt-out" | "opt-in"), in time order
    _opt: dict[str, list[tuple[float, str]]] = field(default_factory=dict)
    _change_times: list[float] = field(default_factory=list)  # sorted
    # (current, span) -> (the entries, accepted count and next change they hold until)
    _opt_cache: dict[Any, tuple[list[dict[str, Any]], int, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        before = time.time() - 3600
        for i in range(self.config.opted_out):
            self._opt[f"+1630{i:07d}"] = [(before + i * 1e-6, "opt-out")]
            self._change_times.append(before + i * 1e-6)

    def accept(
        self, phone: str, arrived: float, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A request the Send API accepted: its entry (and maybe others' entries); returns
        what the record says of it."""
        self._accepted += 1
        final, error = "delivered", None
        if self.rng.random() < self.config.undelivered_rate:
            final, error = self.rng.choice(UNDELIVERED)
        entry = _Entry(
            arrived + self.rng.uniform(0, CREATED_WITHIN_S),
            str(uuid.uuid4()),
            phone,
            SENDER,
            final,
            error,
            message_for(params or {}),
        )
        self._add(entry)
        if self._accepted % 2 == 0:
            other = f"+1212555{self._accepted % 10000:04d}"
            self._add(
                _Entry(entry.created_at, str(uuid.uuid4()), other, OTHER_SENDER, "delivered", None)
            )
        if self._accepted % 5 == 0:
            earlier = arrived - self.rng.uniform(300, 600)
            self._add(_Entry(earlier, str(uuid.uuid4()), phone, SENDER, "delivered", None))
        said: dict[str, Any] = {
            "uuid": entry.uuid,
            "created_at": entry.created_at,
            "status": final,
            "error": error,
        }
        if final == "delivered" and self.rng.random() < self.config.opt_out_rate:
            said.update(self._opts_out(phone, entry.created_at + self.config.delivery_delay_s))
        return said

    def _opts_out(self, phone: str, delivered: float) -> dict[str, float]:
        stop = delivered + self.rng.uniform(0, 1)
        changes = self._opt.setdefault(phone, [])
        changes.append((stop, "opt-out"))
        bisect.insort(self._change_times, stop)
        if self.rng.random() >= OPT_IN_SHARE:
            return {"opt_out": stop}
        start = stop + self.config.opt_in_after_s
        changes.append((start, "opt-in"))
        bisect.insort(self._change_times, start)
        return {"opt_out": stop, "opt_in": start}

    def _opt_cached(
        self, current: str, span: tuple[float, float] | None, now: float
    ) -> list[dict[str, Any]]:
        """`_opt_entries`, computed again only when a request was accepted or a change
        came due since: a reading of many pages costs one scan, not one a page."""
        held = self._opt_cache.get((current, span))
        if held is not None and held[1] == self._accepted and now < held[2]:
            return held[0]
        entries = self._opt_entries(current, span, now)
        due = bisect.bisect_right(self._change_times, now)
        until = self._change_times[due] if due < len(self._change_times) else math.inf
        self._opt_cache[(current, span)] = (entries, self._accepted, until)
        return entries

    def _opt_entries(
        self, current: str, span: tuple[float, float] | None, now: float
    ) -> list[dict[str, Any]]:
        """One entry per number whose status now is `current` (and, with `span`, changed
        within it), newest first."""
        found: list[tuple[float, str, str]] = []
        for phone, changes in self._opt.items():
            seen = [c for c in changes if c[0] <= now]
            if not seen or seen[-1][1] != current:
                continue
            if span is not None and not any(span[0] <= t <= span[1] for t, _ in seen):
                continue
            found.append((seen[-1][0], phone, seen[-1][1]))
        found.sort(key=lambda e: (-e[0], e[1]))
        return [
            {
                "to_phone": phone,
                "from_phone": SENDER,
                "created_at": round(at, 3),
                "status": status,
                "current_status": current,
            }
            for at, phone, status in found
        ]

    async def opt_status(self, request: web.Request) -> web.Response:
        if request.headers.get("access-token") != self.config.access_token:
            return _error(401, "invalid access token")
        wait = self._limited()
        if wait is not None:
            return _error(429, "too many requests", {"Retry-After": str(wait)})
        query = request.query
        current = query.get("current_status")
        if current not in ("opt-out", "opt-in"):
            return _error(400, "current_status must be opt-out or opt-in")
        try:
            start = int(query["start_time"]) / 1000 if "start_time" in query else None
            end = int(query["end_time"]) / 1000 if "end_time" in query else None
            number = int(query.get("page", "1"))
            per_page = min(OPT_PER_PAGE, max(1, int(query.get("per_page", "25"))))
        except ValueError:
            return _error(400, "start_time, end_time, page and per_page must be whole numbers")
        now = time.time()
        if start is not None and end is None:
            entries = self._opt_entries(current, (start, now), now)[:LATEST_WITHOUT_FROM]
        else:
            span = None if start is None or end is None else (start, end)
            entries = self._opt_cached(current, span, now)
        total = len(entries)
        shown = entries[(number - 1) * per_page : number * per_page] if number >= 1 else []
        return web.json_response(
            {
                "current_page": number,
                "per_page": per_page,
                "total_entries": total,
                "total_pages": math.ceil(total / per_page),
                "time_token": round(now, 2),
                "entries": shown,
            }
        )

    def _add(self, entry: _Entry) -> None:
        self._entries.append(entry)
        self._sorted = False

    def _ordered(self) -> list[_Entry]:
        if not self._sorted:
            self._entries.sort(key=lambda e: (e.created_at, e.uuid))
            self._times = [e.created_at for e in self._entries]
            self._sorted = True
        return self._entries

    def _limited(self) -> int | None:
        """Seconds to wait when this query is over the rate, else None."""
        if self.config.report_rate is None:
            return None
        now = time.monotonic()
        while self._recent and now - self._recent[0] >= 1.0:
            self._recent.popleft()
        if len(self._recent) >= self.config.report_rate:
            return max(1, math.ceil(self._recent[0] + 1.0 - now))
        self._recent.append(now)
        return None

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("access-token") != self.config.access_token:
            return _error(401, "invalid access token")
        if request.match_info["agent"] != self.config.agent_id:
            return _error(404, "agent not found")
        wait = self._limited()
        if wait is not None:
            return _error(429, "too many requests", {"Retry-After": str(wait)})
        query = request.query
        try:
            until = float(query["to_timetoken"])
            since = float(query["from_timetoken"]) if "from_timetoken" in query else None
            number = int(query.get("page", "1"))
        except (KeyError, ValueError):
            return _error(400, "to_timetoken (and from_timetoken, page) must be numbers")
        now = time.time()
        entries = self._ordered()
        last = bisect.bisect_right(self._times, min(until, now))
        if since is None:
            first = max(0, last - LATEST_WITHOUT_FROM)
        else:
            first = min(bisect.bisect_left(self._times, since), last)
        if "to_phone" in query:
            # The API's filter: one number's entries (written any way), then paged.
            wanted = _digits(query["to_phone"])
            entries = [e for e in entries[first:last] if _digits(e.to_phone) == wanted]
            first, last = 0, len(entries)
        # Newest first, a page at a time: only the page's own entries are copied, so a
        # report of a million entries costs the same per page as one of a hundred.
        end = last - (number - 1) * PER_PAGE
        shown: list[_Entry] = []
        if number >= 1 and first < end:
            shown = entries[max(first, end - PER_PAGE) : end][::-1]
        return web.json_response(
            {
                "current_page": number,
                "per_page": PER_PAGE,
                "total_entries": last - first,
                "total_pages": math.ceil((last - first) / PER_PAGE),
                "time_token": round(now, 2),
                "entries": [self._shown(e, now) for e in shown],
            }
        )

    def _shown(self, entry: _Entry, now: float) -> dict[str, Any]:
        settled = now >= entry.created_at + self.config.delivery_delay_s
        status = entry.status if settled else "sent"
        shown = {
            "uuid": entry.uuid,
            "from_phone": entry.from_phone,
            "to_phone": formatted(entry.to_phone),
            "message": entry.message or message_for({}),
            "created_at": round(entry.created_at, 3),
            "sms_status": status,
        }
        if status in ("failed", "undelivered"):
            shown["sms_status_response"] = entry.error
        return shown


def message_for(params: dict[str, Any]) -> str:
    """The agent's greeting filled from a request's params: the first name greets, the
    other params follow as `name: value`, in the order they came."""
    name = params.get("first_name")
    greeting = f"Hello {name}!" if isinstance(name, str) and name else "Hello!"
    others = [
        f"{key}: {value}"
        for key, value in params.items()
        if key not in ("to_phone", "first_name") and isinstance(value, str | int | float)
    ]
    details = f" ({', '.join(others)})" if others else ""
    return f"{greeting}{details} Reply to this message to start a conversation."


def _digits(phone: str) -> str:
    return "".join(ch for ch in phone if ch.isdigit())


def formatted(phone: str) -> str:
    """A number as the Reporting API writes it: `+1(415) 555-0101` for North America."""
    digits = phone.lstrip("+")
    if phone.startswith("+1") and len(digits) == 11:
        return f"+1({digits[1:4]}) {digits[4:7]}-{digits[7:]}"
    return phone


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)
