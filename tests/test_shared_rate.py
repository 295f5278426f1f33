"""SharedRateLimiter's slot math, on the virtual clock of test_rate: several limiters (as
several processes would) share one budget whose clock is far from the loop's and whose
answers take a round trip. The budget here is a stand-in for PostgreSQL's grant, the
injected clock source; tests/test_budget.py runs the real one."""

from __future__ import annotations

import asyncio

import pytest

from campaign.rate import TOLERANCE_S, Granted, SharedRateLimiter
from tests.helpers.rates import achieved, max_in_window, run_virtual

SERVER_OFFSET = 1.7e9  # the budget's clock: epoch seconds, the loop's starts at 1000


class FakeBudget:
    """GCRA on the loop's clock + SERVER_OFFSET, answering after `rtt` (half each way)."""

    def __init__(self, rtt: float = 0.002, slow_every: int = 0) -> None:
        self.rtt = rtt
        self.slow_every = slow_every  # every so many answers takes 40 ms to come back
        self.tat = 0.0
        self.grants: list[tuple[float, float]] = []  # (first, end) of every grant

    async def grant(self, n: int, interval: float) -> Granted:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.rtt / 2)
        now = loop.time() + SERVER_OFFSET
        first = max(self.tat, now)
        tat = self.tat = first + n * interval
        self.grants.append((first, tat))
        slow = self.slow_every and len(self.grants) % self.slow_every == 0
        await asyncio.sleep(0.04 if slow else self.rtt / 2)
        return Granted(tat=tat, now=now)


def departures(
    rate: float,
    seconds: float,
    *,
    processes: int = 3,
    tasks: int = 10,
    rtt: float = 0.002,
    slow_every: int = 0,
    stall_every: int = 0,
    stall_s: float = 0.0,
    confirm: bool = True,
) -> list[float]:
    """Each "process" (a limiter) runs `tasks` tasks sending as fast as it allows; a stall
    (a long ledger commit) between acquire() and confirm() now and then."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        budget = FakeBudget(rtt, slow_every)
        limiters = [SharedRateLimiter(rate, budget.grant) for _ in range(processes)]
        times: list[float] = []
        end = loop.time() + seconds
        taken = 0

        async def task(limiter: SharedRateLimiter) -> None:
            nonlocal taken
            while loop.time() < end:
                await limiter.acquire()
                taken += 1
                if stall_every and taken % stall_every < 10:
                    await asyncio.sleep(stall_s)
                if confirm:
                    await limiter.confirm()
                times.append(loop.time())

        await asyncio.gather(*(task(lim) for lim in limiters for _ in range(tasks)))
        for limiter in limiters:
            await limiter.aclose()
        return [t for t in times if t < end]

    return run_virtual(main)


@pytest.mark.parametrize("rate", [1, 7, 50, 200, 1000])
def test_three_workers_share_one_rate(rate: int) -> None:
    times = departures(rate, seconds=12, tasks=min(rate, 20))
    assert max_in_window(times) <= rate
    assert achieved(times) >= 0.97 * rate


def test_a_fractional_rate_is_one_request_per_interval() -> None:
    times = departures(0.5, seconds=20)
    assert max_in_window(times, 2.0) == 1
    assert len(times) >= 9


def test_a_slow_budget_still_gives_the_full_rate() -> None:
    # A round trip of 8 ms leaves 2 ms to use each slot: enough on an exact clock.
    times = departures(200, seconds=6, rtt=0.008)
    assert max_in_window(times) <= 200
    assert achieved(times) >= 0.97 * 200


def test_a_slow_answer_costs_no_slots() -> None:
    # A slow answer alone would convert too loosely to use its batch in time; the clock
    # read again (a grant of none, answered fast) makes it usable.
    times = departures(200, seconds=6, slow_every=4)
    assert max_in_window(times) <= 200
    assert achieved(times) >= 0.97 * 200


def test_confirm_takes_a_fresh_slot_after_a_stall() -> None:
    hazard = departures(200, seconds=6, stall_every=293, stall_s=0.15, confirm=False)
    assert max_in_window(hazard) > 200  # without confirm() the stalls bunch departures
    times = departures(200, seconds=6, stall_every=293, stall_s=0.15)
    assert max_in_window(times) <= 200
    # Each stalled request spent two slots of the budget: its first one passed unused.
    assert achieved(times) >= 0.97 * 200 * (1 - 10 / 293)


def test_a_slot_is_never_used_late() -> None:
    """The loop blocks now and then (the clock jumps while no task runs): the slots that
    passed meanwhile are dropped, not spent in a burst when the loop comes back."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        budget = FakeBudget()
        limiter = SharedRateLimiter(100, budget.grant)
        times: list[float] = []
        end = loop.time() + 5

        async def sender() -> None:
            while loop.time() < end:
                await limiter.acquire()
                await limiter.confirm()
                times.append(loop.time())

        async def blocker() -> None:
            while loop.time() < end:
                await asyncio.sleep(0.31)
                loop.clock.now += 0.2  # type: ignore[attr-defined]  # a blocked loop

        await asyncio.gather(*(sender() for _ in range(5)), blocker())
        await limiter.aclose()
        slots = sorted(
            first + i * limiter.interval - SERVER_OFFSET
            for first, end_ in budget.grants
            for i in range(round((end_ - first) / limiter.interval))
        )
        late = [t for t in times if _lateness(t, slots) > TOLERANCE_S]
        assert limiter.dropped > 0
        assert late == []
        return times

    times = run_virtual(main)
    assert max_in_window(times) <= 100


def _lateness(t: float, slots: list[float]) -> float:
    """How long after the latest slot not after `t` a departure at `t` left."""
    return t - max(s for s in slots if s <= t + 1e-9)


def test_a_failed_grant_reaches_the_caller_and_the_next_one_asks_again() -> None:
    async def main() -> list[float]:
        calls = 0

        async def flaky(n: int, interval: float) -> Granted:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("budget unreachable")
            now = asyncio.get_running_loop().time()
            return Granted(tat=now + n * interval, now=now)

        limiter = SharedRateLimiter(50, flaky)
        with pytest.raises(RuntimeError, match="unreachable"):
            await limiter.acquire()
        await limiter.acquire()
        await limiter.aclose()
        return [float(calls)]

    assert run_virtual(main)[0] >= 2


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SharedRateLimiter(0, FakeBudget().grant)
