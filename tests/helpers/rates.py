"""Helpers for tests that count requests against a rate, and a virtual clock for the limiter."""

from __future__ import annotations

import asyncio
import bisect
import selectors
from collections.abc import Awaitable, Callable


class _Clock:
    now = 1000.0


class _JumpingSelector(selectors.DefaultSelector):
    """Never blocks: when nothing is ready, the clock jumps to the next timer."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = super().select(0)
        if not events and timeout is not None:
            # At least a microsecond: a timer set a rounding error ahead must still come due.
            self.clock.now += max(timeout, 1e-6)
        return events


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.clock = _Clock()
        super().__init__(_JumpingSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


def run_virtual(main: Callable[[], Awaitable[list[float]]]) -> list[float]:
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most acquisitions in any closed interval [t, t + window]."""
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)), default=0)


def achieved(times: list[float]) -> float:
    """Requests per second between the first and the last acquisition."""
    return (len(times) - 1) / (times[-1] - times[0])
