"""Avaamo's SMS Opt Status API as a test controls it: who is opted out or in, and since
when, answered page by page from each query (for `FaultServer`)."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

PER_PAGE_MAX = 100


@dataclass
class OptStatus:
    """number (E.164) -> (current status, when it last changed, epoch seconds)."""

    numbers: dict[str, tuple[str, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, phones: list[str], status: str, at: float | None = None) -> None:
        when = time.time() if at is None else at
        with self.lock:
            for phone in phones:
                self.numbers[phone] = (status, when)

    def answer(self, query: dict[str, str]) -> tuple[int, None, dict[str, Any]]:
        """The page the query asks for (times in milliseconds, as documented)."""
        current = query["current_status"]
        per_page = min(PER_PAGE_MAX, int(query.get("per_page", "25")))
        number = int(query.get("page", "1"))
        span = None
        if "start_time" in query:
            span = (int(query["start_time"]) / 1000, int(query["end_time"]) / 1000)
        with self.lock:
            found = sorted(
                (phone, at)
                for phone, (status, at) in self.numbers.items()
                if status == current and (span is None or span[0] <= at <= span[1])
            )
        shown = found[(number - 1) * per_page : number * per_page]
        return opt_page(
            [opt_entry(phone, current, at) for phone, at in shown],
            total=len(found),
            number=number,
            per_page=per_page,
        )


def opt_entry(phone: str, current: str, at: float) -> dict[str, Any]:
    return {
        "to_phone": phone,
        "from_phone": "+18005550100",
        "created_at": round(at, 3),
        "status": current,
        "current_status": current,
    }


def opt_page(
    entries: list[dict[str, Any]],
    *,
    total: int,
    number: int = 1,
    per_page: int = PER_PAGE_MAX,
    total_pages: int | None = None,
) -> tuple[int, None, dict[str, Any]]:
    body = {
        "current_page": number,
        "per_page": per_page,
        "total_entries": total,
        "total_pages": math.ceil(total / per_page) if total_pages is None else total_pages,
        "time_token": round(time.time(), 2),
        "entries": entries,
    }
    return (200, None, body)


def is_opt_query(body: dict[str, Any]) -> bool:
    return "current_status" in body


# `reporting:` keys for tests of delivery reports: their servers answer no opt status, and
# a run with a token syncs Avaamo's opt-outs first (tests/test_opt_outs.py covers that).
OFF: dict[str, str] = {"opt_status": "off"}
