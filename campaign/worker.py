"""A worker: the rounds of one run, from its first claim to its last answer.

A run sends in rounds. The first claims people a batch at a time in input order and sends
them (`_claims`); on PostgreSQL, when none is left to claim while other workers still hold
people, it waits for them, taking over those a dead worker let go. With `--wait`, a round
ends with people held for a send window that opens later; the worker then sleeps until the
first one opens and sends those people (`_held_then_let_go`), again and again. Between
rounds the worker is in one of the states of `Next`. Throughout, on PostgreSQL it renews
its lease and settles workers whose lease expired (`_keep_lease`), and it stops at once
when it finds itself cut off from its ledger (`RunControl.cut_off`).

One dispatcher, one ledger writer and one rate limiter serve every round (`_limiter`
chooses it: the page server's shared one, the PostgreSQL budget, or the run's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from campaign.job import Job, Limits
from campaign.progress import DispatchResult, Progress
from campaign.records import Target
from campaign.store.ledger import Ledger, LedgerError
from campaign.times import iso_local

if TYPE_CHECKING:
    from campaign.dispatch import Dispatcher
    from campaign.gate import Gate
    from campaign.rate import Limiter

log = structlog.get_logger(__name__)
T = TypeVar("T")


class RunControl:
    """Lets a caller (signal handler, web request) stop a run at any stage."""

    def __init__(self, *, limiter: Limiter | None = None) -> None:
        self.stopping = False
        self.cut_off_reason: str | None = None  # why this worker lost its ledger
        self.dispatcher: Dispatcher | None = None
        self.progress: Progress | None = None
        self.limiter = limiter  # shared by every run to the channel in one process; None: own
        self._wake: asyncio.Event | None = None

    def stop(self) -> None:
        self.stopping = True
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self._wake is not None:
            self._wake.set()

    def cut_off(self, reason: str) -> None:
        """Stop this worker for its ledger (not the API): the run ends incomplete, exit 1.
        It holds for every later round too: a `--wait` worker cut off while it waits for a
        send window wakes up and stops, rather than send the next round on a lease it
        lost."""
        log.error("stopping", reason=reason)
        self.cut_off_reason = reason
        if self.dispatcher is not None:
            self.dispatcher.abort(reason, cut_off=True)
        if self._wake is not None:
            self._wake.set()

    async def sleep_until(self, when: float) -> None:
        """Wait until Unix time `when`, or until `stop()`."""
        self._wake = asyncio.Event()
        if self.stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), max(when - time.time(), 0))


class Next(enum.Enum):
    """What a worker does after a round."""

    END = "end"  # nothing more for this worker
    WINDOW = "window"  # sleep until the first held person's window opens, then send them
    WATCH = "watch"  # others hold people for a window: look again a third of a lease later
    LAST_LOOK = "last look"  # nobody holds any more: one more round takes those let go


class Worker:
    """One run (`run_id`) sending `states` people of the campaign in `ledger`."""

    def __init__(
        self,
        job: Job,
        ledger: Ledger,
        run_id: int,
        states: tuple[str, ...],
        control: RunControl,
        on_progress: Callable[[Progress], None] | None,
        gate: Gate | None,
        waits: bool,
    ) -> None:
        assert control.progress is not None
        self.job, self.ledger, self.run_id, self.states = job, ledger, run_id, states
        self.control, self.on_progress, self.gate, self.waits = control, on_progress, gate, waits
        self.progress: Progress = control.progress

    async def run(self) -> DispatchResult:
        """Send to the targets; with `--wait`, then to the people held for each window as
        it opens, until none is held."""
        ledger, control = self.ledger, self.control
        # With --wait, others holding people for their window keep this worker (`_next`).
        watching = self.waits and await _set_aside_elsewhere(ledger, self.run_id)
        if not watching and await _nobody_to_send(ledger, self.run_id, self.states, self.progress):
            return DispatchResult(interrupted=control.stopping)
        from campaign.dispatch import Dispatcher, LedgerWriter  # aiohttp: only when sending

        writer = LedgerWriter(ledger, self.run_id)
        await writer.start()
        lease = (
            _keep_lease(ledger, self.run_id, self.job.limits.lease_s, control)
            if ledger.postgres
            else None
        )
        limiter, close_limiter = await _limiter(self.job, control)
        try:
            dispatcher = control.dispatcher = Dispatcher(
                self.job.api,
                self.job.limits,
                writer,
                self.progress,
                self.on_progress,
                limiter=limiter,
                gate=self.gate,
            )
            if control.stopping:
                dispatcher.stop()
            held: set[int] | None = None  # after the first round: the people held for windows
            while True:
                if control.cut_off_reason is not None:
                    dispatcher.abort(control.cut_off_reason, cut_off=True)
                    return dispatcher.result
                self.progress.waiting, self.progress.opens_at = 0, None
                if held is None:
                    targets = _claims(ledger, self.run_id, self.states, self.job.limits, control)
                else:
                    targets = _held_then_let_go(
                        ledger, self.run_id, self.states, held, self.job.limits, control
                    )
                result = await dispatcher.run(targets)
                if not self.waits or result.aborted or result.interrupted or result.deadline:
                    return result
                held = set(dispatcher.held_for_window)
                step, watching = await self._next(watching)
                if step is Next.END:
                    return result
                await control.sleep_until(self._wake_at(step))
                if control.stopping:
                    return DispatchResult(interrupted=True)
        finally:
            if lease is not None:
                lease.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await lease
            if close_limiter is not None:
                await close_limiter()
            await writer.close()

    async def _next(self, watching: bool) -> tuple[Next, bool]:
        """After a `--wait` round: (what next, whether others still hold people)."""
        progress = self.progress
        if progress.opens_at is not None:
            if self.on_progress is not None:
                self.on_progress(progress)
            log.info(
                "waiting for send windows",
                waiting=progress.waiting,
                opens=iso_local(progress.opens_at),
            )
            return Next.WINDOW, watching
        # Others hold people for their window: stay, to take them over (in a later round,
        # `_held_then_let_go`) if their worker dies before it opens. Once nobody does, one
        # more round takes those let go since this one looked.
        others_hold = await _set_aside_elsewhere(self.ledger, self.run_id)
        if others_hold:
            return Next.WATCH, True
        return (Next.LAST_LOOK if watching else Next.END), False

    def _wake_at(self, step: Next) -> float:
        if step is Next.WINDOW:
            assert self.progress.opens_at is not None
            return self.progress.opens_at
        return time.time() + (self.job.limits.lease_s / 3 if step is Next.WATCH else 0)


async def _limiter(
    job: Job, control: RunControl
) -> tuple[Limiter, Callable[[], Awaitable[None]] | None]:
    """The one place a run's rate limiter is chosen: the one its caller shares between runs
    to the channel (the page server's), else the channel's (`channel_limiter`). With it,
    what the run must close when it ends."""
    if control.limiter is not None:
        return control.limiter, None
    return await channel_limiter(job)


async def channel_limiter(job: Job) -> tuple[Limiter, Callable[[], Awaitable[None]] | None]:
    """A rate limiter for one sender to the job's channel (a run, the page server, a test
    send): on PostgreSQL the channel's budget shared by every worker on every host (slots
    granted by the database: store/budget.py), else its own. With it, what the sender
    must close when it is done (the budget's connection), or None."""
    if job.ledger is None:
        from campaign.rate import RateLimiter

        return RateLimiter(job.limits.rate_per_second), None
    from campaign.avaamo import send_url
    from campaign.rate import SharedRateLimiter
    from campaign.store.budget import RateBudget

    budget = await RateBudget.connect(job.ledger, send_url(job.api))
    shared = SharedRateLimiter(job.limits.rate_per_second, budget.grant)

    async def close() -> None:
        await shared.aclose()
        await budget.close()

    return shared, close


async def _nobody_to_send(
    ledger: Ledger, run_id: int, states: tuple[str, ...], progress: Progress
) -> bool:
    """Nobody was counted, and on PostgreSQL no other worker holds people not settled yet
    (while one does, this run waits for them like any worker out of people, `_claims`).
    Counted again after that look: a dead worker's people may have been let go since the
    first count, by another worker's lease sweep."""
    if progress.total:
        return False
    if not ledger.postgres:
        return True
    if await asyncio.to_thread(ledger.held_elsewhere, run_id):
        return False
    progress.total = await asyncio.to_thread(ledger.count_targets, states)
    return not progress.total


async def _set_aside_elsewhere(ledger: Ledger, run_id: int) -> bool:
    return ledger.postgres and await asyncio.to_thread(ledger.set_aside_elsewhere, run_id)


async def _claims(
    ledger: Ledger, run_id: int, states: tuple[str, ...], limits: Limits, control: RunControl
) -> AsyncIterator[list[Target]]:
    """The people this run sends to, claimed a batch at a time in input order. On
    PostgreSQL, when none is left to claim but other workers still hold people not yet
    sent, it waits for them: a worker that dies leaves its people to the others once its
    lease expires, and only then does the campaign end."""
    # Enough people to keep the workers busy while the next batch is claimed, but no more
    # than about a second's worth at the rate: several workers then run out of people
    # close together, instead of one sending the last big batch alone.
    batch = min(max(2 * limits.concurrency, 100), 1000)
    batch = min(batch, max(limits.concurrency, math.ceil(limits.rate_per_second)))
    after, claimed = 0, 0
    last_look = False
    while not control.stopping:
        found = await _to_the_end(ledger.claim, run_id, states, after, batch)
        if found:
            after, last_look = found[-1].row, False
            claimed += len(found)
            if control.progress is not None and claimed > control.progress.total:
                # People a dead worker held when this run counted its share at the start.
                control.progress.total = claimed
            yield found
        elif after:
            after = 0  # once more from the top: people a dead worker let go meanwhile
        elif last_look or not ledger.postgres:
            return
        elif await _to_the_end(ledger.held_elsewhere, run_id):
            # This run's lease sweep (`_keep_lease`) settles them if their worker died: on a
            # connection of its own, and never waiting long for a stopped worker's rows.
            await asyncio.sleep(limits.lease_s / 3)
        else:
            # Nobody else holds anyone now, but a dead worker's people may have been let
            # go between the claim that found none and that look (this run's lease sweep
            # settles dead workers on a connection of its own, at any moment): one more
            # claim, made after the look, sees them. Without it the run ended leaving
            # them pending.
            last_look = True


async def _to_the_end(call: Callable[..., T], *args: Any) -> T:
    """`call` in a thread. Cancelled (the run halts while the next batch is claimed), it
    still waits for the call to return: the call uses the run's own connection, which
    ending the run and writing its report use next, and a thread cannot be stopped."""
    running = asyncio.ensure_future(asyncio.to_thread(call, *args))
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await running
        raise


async def _held_then_let_go(
    ledger: Ledger,
    run_id: int,
    states: tuple[str, ...],
    held: set[int],
    limits: Limits,
    control: RunControl,
) -> AsyncIterator[list[Target]]:
    """A `--wait` round: the people this run held for the window that opened, then any
    that others let go meanwhile (a worker that died waiting for a window of its own)."""
    if found := await _to_the_end(ledger.claimed, run_id, states, held):
        yield found
    async for batch in _claims(ledger, run_id, states, limits, control):
        yield batch


def _keep_lease(
    ledger: Ledger, run_id: int, lease_s: float, control: RunControl
) -> asyncio.Task[None]:
    """Renew this worker's lease while it sends (a third of the lease apart), and settle
    the workers whose lease expired: whoever notices first. A worker that finds its own
    lease gone (it was cut off longer than the lease) stops: its people are others' now."""

    async def beat(keeper: Ledger) -> None:
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                alive = await asyncio.to_thread(keeper.heartbeat, run_id)
            except LedgerError as exc:
                control.cut_off(f"the ledger cannot be reached ({exc})")
                return
            if not alive:
                control.cut_off(f"this worker's lease expired (no heartbeat for {lease_s:g} s)")
                return

    async def sweep(sweeper: Ledger) -> None:
        # On a connection of its own: settling a stopped worker may wait for the rows it
        # holds, and that must never hold up this worker's own heartbeat.
        while True:
            await asyncio.sleep(lease_s / 3)
            try:
                settled = await asyncio.to_thread(sweeper.recover, lease_s, lease_s / 3, run_id)
            except LedgerError as exc:
                log.warning("could not settle expired workers this time", error=str(exc))
                continue
            if settled:
                log.warning(
                    "a worker's lease expired: its people in flight are unknown", count=settled
                )

    async def keep() -> None:
        keeper = await asyncio.to_thread(ledger.reopen)
        sweeper = await asyncio.to_thread(ledger.reopen)
        try:
            await asyncio.gather(beat(keeper), sweep(sweeper))
        finally:
            await asyncio.to_thread(keeper.close)
            await asyncio.to_thread(sweeper.close)

    return asyncio.create_task(keep(), name="lease")
