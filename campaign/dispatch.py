"""Dispatch: send to every target once, within the rate and concurrency limits.

A fixed pool of workers takes targets straight from the ledger's stream, so memory does
not grow with the campaign, and each worker turns whatever happens to its target into a
recorded outcome. The order for one request is the contract's: take the rate-limit slot,
have the ledger commit the attempt as in flight, then send. Attempts that start together
share one commit (`LedgerWriter`), made in a thread of its own on a connection of its
own: while one fsync runs, the loop goes on answering and queueing the next batch, and no
request leaves before its record is on disk. The request itself is `avaamo.SendClient`'s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

import structlog

from campaign.avaamo import SendClient
from campaign.gate import LATE_S
from campaign.job import Api, Limits
from campaign.policy import Answer, Decision, Transport, decide, wait
from campaign.progress import DispatchResult, Progress
from campaign.rate import Limiter
from campaign.records import Outcome, Target
from campaign.store.ledger import Ledger
from campaign.times import iso_utc

if TYPE_CHECKING:
    from campaign.gate import Gate

log = structlog.get_logger(__name__)

T = TypeVar("T")


class LedgerWriter:
    """Group commit: every op queued while the last transaction ran goes into the next.

    `begin` resolves once the attempt is committed. If the ledger fails, every waiting and
    later `begin` raises that error, so no request leaves unrecorded; outcomes that could
    not be written leave their recipients in flight, which the next start makes `unknown`.
    """

    def __init__(self, ledger: Ledger, run_id: int) -> None:
        self._of = ledger  # the writer's own connection is another one to this ledger
        self.run_id = run_id
        self._begins: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._outcomes: list[Outcome] = []
        self._holds: list[tuple[int, str | None, str]] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-writer")
        self._ledger: Ledger | None = None

    async def begin(self, recipient_id: int, n: int) -> bool:
        """True once the attempt is committed; False if the recipient is already sent."""
        if self._error is not None:
            raise self._error
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._begins.append((recipient_id, n, future))
        self._wake.set()
        return await future

    def finish(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._wake.set()

    def hold(self, recipient_id: int, state: str | None, error: str) -> None:
        """A recipient whose request does not leave now (see `gate.Hold`)."""
        self._holds.append((recipient_id, state, error))
        self._wake.set()

    async def start(self) -> None:
        self._ledger = await self._in_thread(self._of.reopen)
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Commit everything queued, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._ledger is not None:
            await self._in_thread(self._ledger.close)
        self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        while self._error is None:
            await self._wake.wait()
            self._wake.clear()
            # Let every worker that is ready queue its op, so they share this commit.
            await asyncio.sleep(0)
            if self._begins or self._outcomes or self._holds:
                await self._commit_queued()
            elif self._closing:
                return

    async def _commit_queued(self) -> None:
        begins, self._begins = self._begins, []
        outcomes, self._outcomes = self._outcomes, []
        holds, self._holds = self._holds, []
        try:
            started = await self._in_thread(
                self._commit, [(r, n) for r, n, _ in begins], outcomes, holds
            )
        except Exception as exc:
            self._error = exc
            log.error("the ledger cannot be written; stopping", error=repr(exc))
            for _, _, future in begins + self._begins:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), ok in zip(begins, started, strict=True):
            if not future.done():
                future.set_result(ok)
        self._wake.set()  # ops queued during the commit go into the next one

    def _commit(
        self,
        begins: list[tuple[int, int]],
        outcomes: list[Outcome],
        holds: list[tuple[int, str | None, str]],
    ) -> list[bool]:
        assert self._ledger is not None
        return self._ledger.write_batch(self.run_id, outcomes, holds, begins)

    async def _in_thread(self, call: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)


class Dispatcher:
    def __init__(
        self,
        api: Api,
        limits: Limits,
        writer: LedgerWriter,
        progress: Progress,
        on_progress: Callable[[Progress], None] | None = None,
        *,
        limiter: Limiter,
        gate: Gate | None = None,
    ) -> None:
        self.gate = gate
        self.held_for_window: set[int] = set()  # recipients whose window opens later
        self.api = api
        self.limits = limits
        self.writer = writer
        self.progress = progress
        self.on_progress = on_progress or (lambda _p: None)
        self.halt = asyncio.Event()
        self.result = DispatchResult()
        # Recipients in a row whose final outcome was of one kind (`_streak_of`).
        self._streak: tuple[str | None, int] = (None, 0)
        self._crash: BaseException | None = None
        self._limiter = limiter  # the run's: `worker._limiter` chooses it
        self._client = SendClient(api, limits.concurrency)  # its session opens in `run`
        self._busy: dict[asyncio.Task[None], bool] = {}
        self._iso_second, self._iso_text = -1, ""

    def stop(self) -> None:
        """Stop taking new requests; the ones in flight finish and are recorded."""
        self.result.interrupted = True
        self._halt()

    def abort(self, reason: str, *, cut_off: bool = False) -> None:
        """Stop taking new requests, for `reason`: the API's (exit 3), or `cut_off` from
        this worker's ledger (exit 1)."""
        if not self.result.aborted:
            self.result.aborted, self.result.cut_off = reason, cut_off
        self._halt()

    def _halt(self) -> None:
        if self.halt.is_set():
            return
        self.halt.set()
        # Only tasks with no request open are cancelled: waiting for a rate slot, a retry
        # or a queue place. A request in flight always gets its answer recorded. The task
        # that halts ends by itself (cancelling it would cancel the whole gather).
        halting = asyncio.current_task()
        for task, busy in self._busy.items():
            if not busy and task is not halting:
                task.cancel()

    async def run(self, batches: AsyncIterator[list[Target]]) -> DispatchResult:
        """Send to `batches` (one round of a run: `worker.Worker` runs one dispatcher for
        every round); `held_for_window` is this round's."""
        self.held_for_window = set()
        self._streak = (None, 0)  # a round hours after the last one starts its own count
        if self.halt.is_set():
            return self.result
        # Workers take the next target from the ledger's claims: in input order, never more
        # than a batch held in memory beyond the ones being sent.
        targets = _Feed(batches, low=self.limits.concurrency)
        with _collecting_less():
            await self._send(targets)
        if self._crash is not None:
            raise self._crash
        return self.result

    async def _send(self, targets: _Feed) -> None:
        async with self._client:
            tasks = [
                asyncio.create_task(self._worker(targets), name=f"worker-{i}")
                for i in range(self.limits.concurrency)
            ]
            self._busy = dict.fromkeys(tasks, False)
            # Every worker ends (its request in flight answered and recorded) before the
            # session closes, even when one of them hit an error.
            try:
                await asyncio.gather(*tasks)
            finally:
                await targets.close()

    async def _worker(self, targets: _Feed) -> None:
        with _quiet_when(self.halt):
            try:
                task = asyncio.current_task()
                assert task is not None
                while not self.halt.is_set() and (target := await targets.next()) is not None:
                    await self._deliver(target, task)
            except Exception as exc:  # the ledger failed: nothing more may leave
                self._crash = self._crash or exc
                self._halt()

    async def _deliver(self, target: Target, task: asyncio.Task[None]) -> None:
        attempt = target.attempts
        cap = target.attempts + self.limits.max_attempts  # each run gets max_attempts
        maybe_delivered = target.maybe_delivered
        while True:
            if await self._held(target):
                return
            await self._limiter.acquire()
            # Looked at again right before it leaves: the slot may have taken a while.
            if await self._held(target):
                return
            checked = time.monotonic()
            self._busy[task] = True
            try:
                attempt += 1
                if not await self.writer.begin(target.id, attempt):
                    return  # already sent (by an earlier run): never send again
                await self._limiter.confirm()
                if time.monotonic() - checked > LATE_S and await self._late(target, attempt):
                    return
                self.progress.requests += 1
                answer = await self._client.send(target.payload)
                decision = decide(
                    answer,
                    attempt,
                    max_attempts=cap,
                    retry_ambiguous=self.limits.retry_ambiguous,
                    maybe_delivered_before=maybe_delivered,
                )
                maybe_delivered = maybe_delivered or answer.maybe_delivered
                self._record(target, attempt, answer, decision)
            finally:
                self._busy[task] = False
            if decision.retry_in_s is None or self.halt.is_set():
                return
            await wait(decision.retry_in_s, "send retry", row=target.row)

    async def _late(self, target: Target, attempt: int) -> bool:
        """Whether a request recorded in flight, late past its check, must not leave now
        (the list grew meanwhile): its attempt is recorded as never sent."""
        hold = await self.gate.late_check(target) if self.gate is not None else None
        if hold is None or hold.state is None:
            return False
        self.writer.finish(Outcome(target.id, attempt, hold.state, None, hold.error, None))
        self.progress.add(hold.state)
        log.info("not sent", row=target.row, state=hold.state)
        self.on_progress(self.progress)
        return True

    async def _held(self, target: Target) -> bool:
        """Whether the gate keeps `target` from leaving now (its hold is recorded)."""
        if self.gate is None:
            return False
        hold = await self.gate.check(target)
        if hold is None:
            return False
        self.writer.hold(target.id, hold.state, hold.error)
        if hold.state is not None:
            self.progress.add(hold.state)
            log.info("not sent", row=target.row, state=hold.state)
        elif not hold.final:
            self.progress.wait(hold.until)
            if hold.until is not None:
                self.held_for_window.add(target.id)
        if hold.final and not self.result.deadline:
            self.result.deadline = True
            log.warning("deadline passed: no new requests; those in flight finish")
            # No task is cancelled: each one meets this gate before its next request
            # anyway, and a worker that has not started yet must not die of a cancel.
            self.halt.set()
        self.on_progress(self.progress)
        return True

    def _record(self, target: Target, attempt: int, answer: Answer, decision: Decision) -> None:
        sent_at = self._now_iso() if decision.state == "sent" else None
        self.writer.finish(
            Outcome(target.id, attempt, decision.state, answer.http_status, decision.error, sent_at)
        )
        if decision.final:
            self.progress.add(decision.state)
        if decision.state != "sent":
            answered = (
                {"http_status": answer.http_status}
                if answer.http_status
                else {"transport": str(answer.transport)}
            )
            if not decision.final:
                log.info(
                    "will retry",
                    row=target.row,
                    attempt=attempt,
                    wait_s=round(decision.retry_in_s or 0, 2),
                    **answered,
                )
            else:
                log.warning("not sent", row=target.row, state=decision.state, **answered)
        self._watch_streaks(answer, decision)
        self.on_progress(self.progress)

    def _now_iso(self) -> str:
        """`iso_utc(time.time())`, formatted once a second rather than once an answer."""
        second = int(time.time())
        if second != self._iso_second:
            self._iso_second, self._iso_text = second, iso_utc(second) or ""
        return self._iso_text

    def _watch_streaks(self, answer: Answer, decision: Decision) -> None:
        """Abort when `abort_after_fatal` recipients in a row end the same bad way: a fatal
        answer (401/403/404), or no connection even after every retry. Any other outcome,
        and any answer while retrying, breaks the streak."""
        if not decision.final and answer.transport is Transport.CONNECT:
            return  # still trying to connect: this recipient's end decides
        kind = _streak_of(answer, decision)
        last, count = self._streak
        count = count + 1 if kind is not None and kind == last else 1
        self._streak = (kind, count)
        if kind is None or count < self.limits.abort_after_fatal or self.result.aborted:
            return
        if kind == "fatal":
            self.result.aborted = (
                f"{count} fatal answers in a row (last: HTTP {answer.http_status}); "
                "check api.base_url and api.channel_uuid"
            )
        else:
            self.result.aborted = (
                f"the API could not be reached for {count} recipients in a row, each after "
                f"{self.limits.max_attempts} attempts ({answer.detail})"
            )
        log.error("aborting", reason=kind, http_status=answer.http_status)
        self._halt()


_GC_THRESHOLD_WHILE_SENDING = 20_000  # allocations between collections (Python's: 700)
_sending = 0  # dispatchers sending now in this process (`campaign serve` runs several)
_thresholds = gc.get_threshold()  # the collector's settings when nobody sends


@contextlib.contextmanager
def _collecting_less() -> Iterator[None]:
    """While requests are sent, Python's cycle collector runs far less often and leaves
    alone what was alive before. At its defaults it ran about 2,000 times during 40,000
    requests, and its full passes walked every object of the process (the phone number
    metadata, the modules): 1.5 to 3.4 s of CPU in a 10 s run, on the thread that sends.
    Requests make few reference cycles; those are still collected, less often."""
    global _sending, _thresholds
    _sending += 1
    if _sending == 1:
        gc.collect()
        gc.freeze()
        _thresholds = gc.get_threshold()
        gc.set_threshold(_GC_THRESHOLD_WHILE_SENDING, *_thresholds[1:])
    try:
        yield
    finally:
        _sending -= 1
        if _sending == 0:
            gc.set_threshold(*_thresholds)
            gc.unfreeze()


class _Feed:
    """One target at a time to whichever worker asks, from batches that come in as needed
    (a batch may take a while: it is claimed in the ledger, or waits for other workers).
    The next batch is asked for once fewer than `low` targets are left, so the workers do
    not all stand still while it is claimed."""

    def __init__(self, batches: AsyncIterator[list[Target]], low: int) -> None:
        self._batches = batches
        self._low = low
        self._ready: collections.deque[Target] = collections.deque()
        self._coming: asyncio.Future[list[Target] | None] | None = None
        self._done = False
        self._lock = asyncio.Lock()

    async def next(self) -> Target | None:
        async with self._lock:
            while not self._ready:
                if self._done:
                    return None
                batch = await self._ask()
                self._coming = None
                if batch is None:
                    self._done = True
                else:
                    self._ready.extend(batch)
            if len(self._ready) <= self._low and not self._done:
                self._ask()
            return self._ready.popleft()

    def _ask(self) -> asyncio.Future[list[Target] | None]:
        if self._coming is None:
            self._coming = asyncio.ensure_future(anext(self._batches, None))
        return self._coming

    async def close(self) -> None:
        """Stop asking for batches (the run is over or halted). A batch asked for and
        never taken is awaited too, even when it is already done: its error (the ledger
        is gone) was the workers' to report, and is not printed again as a task
        exception never retrieved."""
        if self._coming is None:
            return
        if not self._coming.done():
            self._coming.cancel()
        with contextlib.suppress(BaseException):
            await self._coming


class _quiet_when:
    """Swallow the cancellation `Dispatcher._halt` uses to stop an idle task."""

    def __init__(self, halt: asyncio.Event) -> None:
        self.halt = halt

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is asyncio.CancelledError and self.halt.is_set()


def _streak_of(answer: Answer, decision: Decision) -> str | None:
    if decision.fatal:
        return "fatal"
    if decision.final and answer.transport is Transport.CONNECT:
        return "unreachable"
    return None
