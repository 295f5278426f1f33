"""An exact request rate: never more than N requests in any one-second window.

`AsyncLimiter(N, 1)` alone lets a full bucket (N) through at once and then refills at N/s,
so the first second can carry almost 2·N requests. We keep aiolimiter for smooth pacing
with a small bucket, and add a sliding-window log that refuses the (N+1)-th acquisition
until the N-th-last one is a full window old. The window is slightly longer than a
second so that jitter between here and the server's clock cannot put N+1 arrivals into
one second there; the pace is set to match, about 0.98·N per second, evenly spaced.

A slot is taken before the ledger records the attempt, so a stall between the two (a
commit, a checkpoint, a pause of the process) would let a request leave late and land in
the same second as requests that took their slots a second after it. `confirm()`, called
just before the request leaves, checks a second log of actual departures and waits out
such a stall; when nothing stalled it returns at once.

The logs only keep the last window, so a very high limit (used to mean "no limit") costs
no memory.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from aiolimiter import AsyncLimiter

WINDOW_S = 1.02  # 20 ms of margin for scheduling and network jitter
SEND_WINDOW_S = 1.02  # departures: the same margin, for the network and the server
BURST_SHARE = 0.02  # the pacing bucket: a fiftieth of a second of requests; even spacing
MIN_BURST = 3.0


class _WindowLog:
    """At most `limit` entries in any `window` seconds of the loop clock."""

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.recent: deque[float] = deque()
        self._lock = asyncio.Lock()

    def try_enter(self) -> bool:
        """The common case, without a coroutine: nobody is waiting and the window has room."""
        return not self._lock.locked() and self._take(asyncio.get_running_loop().time())

    async def enter(self) -> None:
        if self.try_enter():
            return
        loop = asyncio.get_running_loop()
        # One waiter at a time, in order: the lock is held while sleeping for the window.
        async with self._lock:
            now = loop.time()
            if self._take(now):
                return
            due = self.recent[0] + self.window
            await asyncio.sleep(due - now)  # if cancelled here, the log is unchanged
            self.recent.popleft()
            # A timer may fire a clock tick early; never log a time inside the window.
            self.recent.append(max(loop.time(), due))

    def _take(self, now: float) -> bool:
        recent = self.recent
        horizon = now - self.window
        while recent and recent[0] <= horizon:
            recent.popleft()
        if len(recent) < self.limit:
            recent.append(now)
            return True
        return False


class RateLimiter:
    """`acquire()` before every request, retries included, and `confirm()` right before it
    leaves. Create one per run, inside the loop."""

    def __init__(self, rate_per_second: float) -> None:
        if not rate_per_second > 0:
            raise ValueError("rate_per_second must be positive")
        self.rate = rate_per_second
        # A fractional rate (e.g. 0.5/s) allows one request per 1/rate seconds.
        self.limit = max(1, math.floor(rate_per_second))
        self.window = max(WINDOW_S, WINDOW_S * self.limit / rate_per_second)
        # A bucket of a few requests at least: it absorbs late wake-ups, which a bucket of
        # one would turn into lost slots (about 10 % at 50/s).
        burst = max(MIN_BURST, math.floor(self.limit * BURST_SHARE))
        # The same long-run pace as the window allows, so neither limiter starves the other.
        self._pace = AsyncLimiter(burst, burst * self.window / self.limit)
        self._slots = _WindowLog(self.limit, self.window)
        self._departures = _WindowLog(self.limit, self.window * SEND_WINDOW_S / WINDOW_S)

    async def acquire(self) -> None:
        await self._pace.acquire()
        if not self._slots.try_enter():
            await self._slots.enter()

    async def confirm(self) -> None:
        if not self._departures.try_enter():
            await self._departures.enter()
