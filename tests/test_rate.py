"""The limiter's two bounds, on an event loop whose clock only moves when every task waits.

Sleeping on that clock costs no wall-clock time and no scheduling jitter, so the counts
below are exact: what they check is the algorithm, not the machine's speed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import pytest

from campaign.rate import RateLimiter
from tests.helpers.rates import achieved, max_in_window, run_virtual


def acquisitions(
    rate: float, seconds: float, workers: int, work_s: float = 0.0, cancel_every: int = 0
) -> Callable[[], Awaitable[list[float]]]:
    """Workers acquire (then "send" for work_s) until the run ends; loop times of every slot."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = RateLimiter(rate)
        times: list[float] = []
        end = loop.time() + seconds

        async def worker() -> None:
            while loop.time() < end:
                await limiter.acquire()
                times.append(loop.time())
                if work_s:
                    await asyncio.sleep(work_s)

        tasks = [asyncio.create_task(worker()) for _ in range(workers)]
        if cancel_every:
            # Cancel waiting workers now and then, as a stopping run does; replace them.
            while loop.time() < end:
                await asyncio.sleep(cancel_every / rate)
                victim = tasks.pop(0)
                victim.cancel()
                tasks.append(asyncio.create_task(worker()))
        await asyncio.gather(*tasks, return_exceptions=True)
        return [t for t in times if t < end]

    return main


def test_window_counter_counts_a_closed_interval() -> None:
    assert max_in_window([0.0, 0.5, 1.0, 1.5]) == 3
    assert max_in_window([0.0, 1.0001, 2.0002]) == 1
    assert max_in_window([]) == 0


@pytest.mark.parametrize("rate", [1, 7, 50, 200, 1000])
def test_no_window_holds_more_than_the_rate_and_the_rate_is_nearly_reached(rate: int) -> None:
    times = run_virtual(acquisitions(rate, seconds=12, workers=min(rate, 100)))
    assert max_in_window(times) <= rate
    assert achieved(times) >= 0.97 * rate


def test_the_first_second_does_not_carry_a_full_bucket_plus_refill() -> None:
    # The plain `AsyncLimiter(N, 1)` lets about 2·N through in the first second.
    times = run_virtual(acquisitions(100, seconds=2, workers=100))
    first_second = [t for t in times if t <= times[0] + 1.0]
    assert len(first_second) <= 100


def test_slow_requests_do_not_break_either_bound() -> None:
    # Each worker holds its slot for a while, as a request waiting for its answer does.
    times = run_virtual(acquisitions(200, seconds=11, workers=60, work_s=0.05))
    assert max_in_window(times) <= 200
    assert achieved(times) >= 0.97 * 200


def test_cancelled_waiters_give_no_extra_slot() -> None:
    times = run_virtual(acquisitions(40, seconds=6, workers=30, cancel_every=3))
    assert max_in_window(times) <= 40
    assert len(times) >= 0.9 * 40 * 6


def test_a_fractional_rate_spaces_single_requests() -> None:
    times = run_virtual(acquisitions(0.5, seconds=20, workers=3))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(times) >= 9
    assert min(gaps) >= 2.0


def test_the_log_forgets_old_acquisitions() -> None:
    async def main() -> list[float]:
        limiter = RateLimiter(1_000_000)
        for _ in range(5000):
            await limiter.acquire()
        await asyncio.sleep(2)
        await limiter.acquire()
        return [float(len(limiter._slots.recent))]

    assert run_virtual(main) == [1.0]


def stalled_departures(rate: int, confirm: bool) -> list[float]:
    """Each request leaves after a stall between its slot and its departure (a ledger commit,
    a checkpoint): usually none, 150 ms for a run of requests now and then."""

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = RateLimiter(rate)
        departures: list[float] = []
        end = loop.time() + 6
        taken = 0

        async def worker() -> None:
            nonlocal taken
            while loop.time() < end:
                await limiter.acquire()
                taken += 1
                if taken % 293 < 30:
                    await asyncio.sleep(0.15)
                if confirm:
                    await limiter.confirm()
                departures.append(loop.time())

        await asyncio.gather(*(worker() for _ in range(40)))
        return departures

    return run_virtual(main)


def test_confirm_keeps_departures_within_the_rate_despite_stalls() -> None:
    assert max_in_window(stalled_departures(200, confirm=False)) > 200  # the hazard is real
    departures = stalled_departures(200, confirm=True)
    assert max_in_window(departures) <= 200
    assert achieved(departures) >= 0.97 * 200


def test_confirm_costs_nothing_when_nothing_stalls() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        limiter = RateLimiter(100)
        waits = []
        for _ in range(500):
            await limiter.acquire()
            before = loop.time()
            await limiter.confirm()
            waits.append(loop.time() - before)
        return waits

    assert max(run_virtual(main)) < 1e-3


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(0)
