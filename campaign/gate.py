"""The last look before a request leaves: the suppression list and the send window.

The dispatcher asks `Gate.check` for every attempt, retries included, after its rate slot
and right before the attempt is recorded in flight, so a person who must not be sent now is
never even recorded as in flight. That order is what makes a number added to the list at T
get no request leaving after T + 2 s (the argument is in `store/suppression.py`). When the
in-flight commit or the rate's pacing after it took longer than `LATE_S`, the dispatcher
asks `late_check` once more before the request leaves, so a slow commit or a shared rate
that made the request wait cannot stretch that moment. Both checks are cheap at full
speed: the window is a pure function of the number and the clock (`windows.Schedule`), and
the list's additions are read with one query at most every half second (`suppression.Watch`).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass

from campaign.records import Target
from campaign.store.suppression import Watch
from campaign.windows import Schedule


@dataclass(frozen=True)
class Hold:
    """Why a target does not leave now."""

    state: str | None  # the recipient's new state (`suppressed`), None: keep it (pending...)
    error: str
    until: float | None = None  # Unix time its send window opens, when it will
    final: bool = False  # the deadline passed: no request may leave any more


LATE_S = 0.5  # a request this long past its check looks at the list again before it leaves


class Gate:
    def __init__(
        self,
        schedule: Schedule | None,
        watch: Watch | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.schedule = schedule
        self.watch = watch
        self.clock = clock

    async def check(self, target: Target) -> Hold | None:
        if self.watch is not None:
            entry = await self.watch.check(target.to_phone)
            if entry is not None:
                return Hold("suppressed", entry.why())
        if self.schedule is not None:
            now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
            verdict = self.schedule.verdict(target.to_phone, now)
            if not verdict.send:
                until = verdict.until.timestamp() if verdict.until is not None else None
                return Hold(None, verdict.error or "not now", until, verdict.deadline)
        return None

    async def late_check(self, target: Target) -> Hold | None:
        """The list only, for a request recorded in flight that waited since `check`: a
        number added meanwhile keeps it from leaving (the attempt never left)."""
        if self.watch is None:
            return None
        entry = await self.watch.check(target.to_phone)
        return None if entry is None else Hold("suppressed", f"{entry.why()}; not sent")

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
