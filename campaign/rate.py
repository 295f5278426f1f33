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

`SharedRateLimiter` is the same promise for many workers on many hosts: its slots come
from one budget per channel (in PostgreSQL, store/budget.py), so only one clock counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiolimiter import AsyncLimiter

WINDOW_S = 1.02  # 20 ms of margin for scheduling and network jitter
SEND_WINDOW_S = 1.02  # departures: the same margin, for the network and the server
BURST_SHARE = 0.02  # the pacing bucket: a fiftieth of a second of requests; even spacing
MIN_BURST = 3.0


class Limiter(Protocol):
    """`acquire()` before every request, retries included; `confirm()` right before it
    leaves."""

    async def acquire(self) -> None: ...
    async def confirm(self) -> None: ...


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


# --- one budget for every worker: slots granted by a shared clock ----------------------------

SHARED_WINDOW_S = 1.03  # slots 1.03/N apart: 30 ms of margin, TOLERANCE_S of it for lateness
LEAD_S = 0.05  # a slot is handed out this long before its time, for the ledger's commit
TOLERANCE_S = 0.010  # a slot leaves at most this late (half the window's 20 ms margin)
BATCH_S = 0.1  # one grant asks for about this long of slots
CLOCK_RETRIES = 3  # clock readings after a slow grant, for a conversion tight enough


@dataclass(frozen=True)
class Granted:
    """A grant's answer, on the budget's clock (seconds): the end of the slots just granted
    (the budget's new theoretical arrival time) and the clock's reading as it answered."""

    tat: float
    now: float


# grant(n, interval): n slots spaced `interval` apart, after every slot granted before;
# grant(0, interval) only reads the clock.
Grant = Callable[[int, float], Awaitable[Granted]]


@dataclass(frozen=True)
class _Slot:
    at: float  # loop time: not before
    deadline: float  # loop time: not after (then it is dropped, never used late)


@dataclass
class _Slots:
    """A grant's slots, `interval` apart from `first` (loop time), as a range: a high rate
    grants many thousands at once, and the ones that pass unused are skipped by
    arithmetic, not one by one."""

    first: float
    count: int
    interval: float
    slack: float  # how late a slot may still leave
    taken: int = 0

    @property
    def left(self) -> int:
        return self.count - self.taken

    def skip_passed(self, now: float) -> int:
        """Drop the slots too late to use at `now`; returns how many."""
        usable = math.ceil((now - self.slack - self.first) / self.interval)
        skipped = min(max(usable - self.taken, 0), self.left)
        self.taken += skipped
        return skipped

    def take(self) -> _Slot:
        at = self.first + self.taken * self.interval
        self.taken += 1
        return _Slot(at, at + self.slack)


class SharedRateLimiter:
    """`acquire()` / `confirm()` like `RateLimiter`, with slots from a budget every worker of
    the channel shares: `grant` asks it for the next n slots (store/budget.py's
    `RateBudget.grant`). Create one per process and channel, inside the loop; `aclose()`.

    Why N at most in any one-second window, at departure, whatever the number of workers:
    the budget hands out slots I = 1.03/N apart on its own clock, each grant after the end
    of every earlier one (GCRA), so any interval of length L holds at most floor(L/I) + 1
    slots. A worker converts a slot to its loop clock with the offset measured by its grant
    (the budget's reading against loop.time() when the answer came): the reading was taken
    between sending and answering, so the converted time is late by u at most, u the round
    trip, never early (after a slow grant the clock is read again and the tightest reading
    kept; the clocks' drift over the tenths of a second a batch lasts is negligible). The
    request then leaves no later than TOLERANCE - u after the converted time, or the slot
    is dropped. So every request leaves between its slot and its slot + TOLERANCE on the
    budget's clock: requests leaving within one second hold slots within
    1 + TOLERANCE = 1.01 s of each other, at most floor(1.01/1.03 · N) + 1 <= N of them.
    The other 20 ms of the margin are for what lies between a departure and the API's
    clock: the network, and the processes' scheduling on a busy host (several workers, the
    database and the API may share its cores), which can hold a request back once it has
    its slot.
    `acquire()` hands the slot out up to LEAD_S early, so the ledger's commit of the
    attempt overlaps the wait; `confirm()` then waits for the slot itself, and keeps the
    bound when the commit took long: a slot that would now leave late is given up for a
    fresh one.

    Grants are batches of about BATCH_S of slots, and the next batch is asked for in the
    background once half of the current one is used, so a worker rarely waits on a round
    trip. Slots that pass unused (no request ready, or the loop was busy) are lost: the
    budget is spent, the rate only lower.
    """

    def __init__(self, rate_per_second: float, grant: Grant) -> None:
        if not rate_per_second > 0:
            raise ValueError("rate_per_second must be positive")
        self.rate = rate_per_second
        limit = max(1, math.floor(rate_per_second))
        self.interval = max(SHARED_WINDOW_S / limit, SHARED_WINDOW_S / rate_per_second)
        self.batch = max(1, round(rate_per_second * BATCH_S))
        self.granted = 0
        self.dropped = 0  # slots that passed unused
        self._grant = grant
        self._slots: deque[_Slots] = deque()
        self._lock = asyncio.Lock()
        self._next: asyncio.Task[_Slots] | None = None
        self._held: weakref.WeakKeyDictionary[asyncio.Task[Any], _Slot] = (
            weakref.WeakKeyDictionary()
        )

    async def acquire(self) -> None:
        """A slot, handed out up to LEAD_S before its time: the ledger's commit of the
        attempt runs meanwhile, and `confirm()` waits for the slot itself."""
        slot = await self._take(LEAD_S)
        task = asyncio.current_task()
        if task is not None:
            self._held[task] = slot

    async def confirm(self) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        slot = self._held.pop(task, None) if task is not None else None
        if slot is not None:
            # A timer may fire a clock tick early: never leave before the slot.
            while (now := loop.time()) < slot.at:
                await asyncio.sleep(slot.at - now)
            if now <= slot.deadline:
                return
        await self._take(0.0)  # the slot would leave late (or there was none): a fresh one

    async def aclose(self) -> None:
        """Stop asking for slots: the batch being asked for is abandoned."""
        task, self._next = self._next, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _take(self, lead: float) -> _Slot:
        """The next slot that can still be used, once it is at most `lead` away."""
        loop = asyncio.get_running_loop()
        # One taker at a time, in slot order; the lock is held while waiting for the slot.
        async with self._lock:
            while True:
                if not self._slots:
                    await self._refill()
                slots = self._slots[0]
                self.dropped += slots.skip_passed(loop.time())
                if not slots.left:
                    self._slots.popleft()
                    continue
                slot = slots.take()
                if not slots.left:
                    self._slots.popleft()
                if sum(run.left for run in self._slots) <= self.batch // 2:
                    self._prefetch()
                try:
                    # A timer may fire a clock tick early: never leave before the slot.
                    while (now := loop.time()) < slot.at - lead:
                        await asyncio.sleep(slot.at - lead - now)
                except asyncio.CancelledError:
                    # Still good for the next taker.
                    slack = slot.deadline - slot.at
                    self._slots.appendleft(_Slots(slot.at, 1, self.interval, slack))
                    raise
                if now <= slot.deadline:
                    return slot
                self.dropped += 1

    def _prefetch(self) -> None:
        if self._next is None:
            self._next = asyncio.create_task(self._ask(self.batch))
            # Its failure is raised to the taker that awaits it, not logged as lost.
            self._next.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _refill(self) -> None:
        self._prefetch()
        task = self._next
        assert task is not None
        try:
            # Shielded: a taker cancelled while waiting leaves the grant to the next one.
            slots = await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._next is task:
                self._next = None
            raise
        except BaseException:
            if self._next is task:
                self._next = None  # the next taker asks again
            raise
        if self._next is task:
            self._next = None
        self._slots.append(slots)

    async def _ask(self, n: int) -> _Slots:
        granted, offset, late = await self._measured(n)
        # A slow answer (the process or the server was busy) makes a loose conversion,
        # which would leave no time to use the slots: read the clock again (a grant of
        # none), the slots stay as granted.
        for _ in range(CLOCK_RETRIES):
            if late <= TOLERANCE_S / 2:
                break
            _, again, late_again = await self._measured(0)
            if late_again < late:
                offset, late = again, late_again
        self.granted += n
        slack = max(0.0, TOLERANCE_S - late)
        return _Slots(granted.tat - n * self.interval + offset, n, self.interval, slack)

    async def _measured(self, n: int) -> tuple[Granted, float, float]:
        """A grant, the offset from its clock to the loop's, and how late that may make a
        converted time (the round trip: the clock was read between sending and answering)."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        granted = await self._grant(n, self.interval)
        answered = loop.time()
        return granted, answered - granted.now, answered - sent
