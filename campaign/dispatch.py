"""Dispatch: send to every target once, within the rate and concurrency limits.

A fixed pool of workers takes targets from a bounded queue, so memory does not grow with
the campaign, and each worker turns whatever happens to its target into a recorded
outcome. The order for one request is the contract's: take the rate-limit slot, have the
ledger commit the attempt as in flight, then send. Attempts that start together share one
commit (`LedgerWriter`), which keeps the ledger off the hot path without ever letting a
request leave before its record is durable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
from collections.abc import Callable, Iterator

import aiohttp
import structlog

from campaign.job import Api, Limits
from campaign.ledger import Ledger, Outcome, Target
from campaign.policy import Answer, Decision, Transport, decide, parse_retry_after
from campaign.progress import DispatchResult, Progress
from campaign.rate import RateLimiter

log = structlog.get_logger(__name__)

_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}
_DETAIL_CHARS = 200
MAX_ANSWER_BYTES = 64 * 1024
_SUCCESS_BODIES = frozenset({b'{"success": true}', b'{"success":true}'})
_SENT = Answer(http_status=200, success=True)
# Shorter than the idle timeout of common servers (5 s): a connection the server closed
# while idle would fail a request that it never received, and that failure looks the same
# as a request that arrived: `unknown`.
KEEPALIVE_S = 2.0


def send_url(api: Api) -> str:
    """The channel's Send API address: what one rate budget is for."""
    return f"{api.base_url}/sms/{api.channel_uuid}/send.json"


class LedgerWriter:
    """Group commit: every op queued while the last transaction ran goes into the next."""

    def __init__(self, ledger: Ledger, run_id: int) -> None:
        self.ledger = ledger
        self.run_id = run_id
        self._begins: list[tuple[int, int, asyncio.Future[bool]]] = []
        self._outcomes: list[Outcome] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    async def begin(self, recipient_id: int, n: int) -> bool:
        """Resolves once the attempt is committed; False if the recipient is already sent."""
        if self._error is not None:
            raise self._error
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._begins.append((recipient_id, n, future))
        self._wake.set()
        return await future

    def finish(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Commit everything queued, then stop."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # Let every worker that is ready queue its op, so they share this commit.
            await asyncio.sleep(0)
            self._flush()

    def _flush(self) -> None:
        begins, self._begins = self._begins, []
        outcomes, self._outcomes = self._outcomes, []
        try:
            if outcomes:
                self.ledger.finish_attempts(outcomes)
            if begins:
                started = self.ledger.begin_attempts(
                    self.run_id, [(rid, n) for rid, n, _ in begins]
                )
        except Exception as exc:
            self._error = exc
            for *_, future in begins:
                if not future.done():
                    future.set_exception(exc)
            raise
        for (_, _, future), ok in zip(begins, started if begins else [], strict=True):
            if not future.done():
                future.set_result(ok)


class Dispatcher:
    def __init__(
        self,
        api: Api,
        limits: Limits,
        writer: LedgerWriter,
        progress: Progress,
        on_progress: Callable[[Progress], None] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.url = send_url(api)
        self.api = api
        self.limits = limits
        self.writer = writer
        self.progress = progress
        self.on_progress = on_progress or (lambda _p: None)
        self.halt = asyncio.Event()
        self.result = DispatchResult()
        self._fatal_streak = 0
        self._unreachable_streak = 0
        # A limiter shared with other runs to the same channel (the server's), else our own.
        self._limiter = limiter or RateLimiter(limits.rate_per_second)
        self._session: aiohttp.ClientSession | None = None
        self._busy: dict[asyncio.Task[None], bool] = {}

    def stop(self) -> None:
        """Stop taking new requests; the ones in flight finish and are recorded."""
        self.result.interrupted = True
        self._halt()

    def _halt(self) -> None:
        if self.halt.is_set():
            return
        self.halt.set()
        # Only tasks with no request open are cancelled: waiting for a rate slot, a retry
        # or a queue place. A request in flight always gets its answer recorded.
        for task, busy in self._busy.items():
            if not busy:
                task.cancel()

    async def run(self, batches: Iterator[list[Target]]) -> DispatchResult:
        if self.halt.is_set():
            return self.result
        # sock_read restarts with every byte: the overall deadline stops a trickle. It is
        # longer than sock_connect, so a connection that cannot be opened is told apart.
        timeout = aiohttp.ClientTimeout(
            total=self.api.timeout_s * 2,
            sock_connect=self.api.timeout_s,
            sock_read=self.api.timeout_s,
        )
        connector = aiohttp.TCPConnector(
            limit=self.limits.concurrency, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
        )
        # Workers take the next target straight from the ledger's stream: in input order,
        # never more than `concurrency` held in memory beyond the current batch.
        targets = itertools.chain.from_iterable(batches)
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=_HEADERS, raise_for_status=False
        ) as self._session:
            tasks = [
                asyncio.create_task(self._worker(targets), name=f"worker-{i}")
                for i in range(self.limits.concurrency)
            ]
            self._busy = dict.fromkeys(tasks, False)
            await asyncio.gather(*tasks)
        return self.result

    async def _worker(self, targets: Iterator[Target]) -> None:
        with _quiet_when(self.halt):
            while not self.halt.is_set() and (target := next(targets, None)) is not None:
                await self._deliver(target)

    async def _deliver(self, target: Target) -> None:
        task = asyncio.current_task()
        assert task is not None
        attempt = target.attempts
        cap = target.attempts + self.limits.max_attempts  # each run gets max_attempts
        maybe_delivered = target.maybe_delivered
        while True:
            await self._limiter.acquire()
            self._busy[task] = True
            try:
                attempt += 1
                if not await self.writer.begin(target.id, attempt):
                    return  # already sent (by an earlier run): never send again
                await self._limiter.confirm()
                self.progress.requests += 1
                answer = await self._post(target.payload)
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
            await asyncio.sleep(decision.retry_in_s)

    def _record(self, target: Target, attempt: int, answer: Answer, decision: Decision) -> None:
        sent_at = None
        if decision.state == "sent":
            sent_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        self.writer.finish(
            Outcome(target.id, attempt, decision.state, answer.http_status, decision.error, sent_at)
        )
        if decision.state != "pending":
            self.progress.add(decision.state)
        if decision.state != "sent":
            answered = (
                {"http_status": answer.http_status}
                if answer.http_status
                else {"transport": str(answer.transport)}
            )
            if decision.state == "pending":
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

    def _watch_streaks(self, answer: Answer, decision: Decision) -> None:
        """Abort after `abort_after_fatal` fatal answers (or final connect failures) in a row."""
        self._fatal_streak = self._fatal_streak + 1 if decision.fatal else 0
        unreachable = answer.transport is Transport.CONNECT and decision.state != "pending"
        if decision.state != "pending" or answer.transport is None:
            self._unreachable_streak = self._unreachable_streak + 1 if unreachable else 0
        limit = self.limits.abort_after_fatal
        if self._fatal_streak >= limit and not self.result.aborted:
            self.result.aborted = (
                f"{self._fatal_streak} fatal answers in a row (last: HTTP {answer.http_status}); "
                "check api.base_url and api.channel_uuid"
            )
            log.error("aborting", reason="fatal answers", http_status=answer.http_status)
            self._halt()
        elif self._unreachable_streak >= limit and not self.result.aborted:
            self.result.aborted = (
                f"the API could not be reached for {self._unreachable_streak} recipients in a "
                f"row, each after {self.limits.max_attempts} attempts ({answer.detail})"
            )
            log.error("aborting", reason="API unreachable")
            self._halt()

    async def _post(self, body: bytes) -> Answer:
        assert self._session is not None
        try:
            async with self._session.post(self.url, data=body, allow_redirects=False) as resp:
                raw = await _read_capped(resp.content, MAX_ANSWER_BYTES)
                if resp.status == 200 and raw in _SUCCESS_BODIES:
                    return _SENT
                return Answer(
                    http_status=resp.status,
                    success=_is_success(raw),
                    retry_after_s=parse_retry_after(resp.headers.get("Retry-After")),
                    detail=_detail(resp.status, resp.reason, raw),
                )
        except aiohttp.ClientConnectorError as exc:
            return Answer(transport=Transport.CONNECT, detail=self._exc_text(exc))
        except aiohttp.ConnectionTimeoutError:
            return Answer(transport=Transport.CONNECT, detail="connect timed out")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return Answer(transport=Transport.TIMEOUT, detail=f"{self.api.timeout_s:g} s")
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(transport=Transport.DROPPED, detail=self._exc_text(exc))

    def _exc_text(self, exc: BaseException) -> str:
        """The error's text, without the channel uuid (it is as good as a password)."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        uuid = self.api.channel_uuid
        return text.replace(uuid, uuid[:8] + "…")[:_DETAIL_CHARS]


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes:
    """The whole answer, or its first `cap` bytes: an answer is a few bytes of JSON, and a
    huge one must not fill the memory."""
    chunks: list[bytes] = []
    size = 0
    while size < cap and (chunk := await stream.read(cap - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class _quiet_when:
    """Swallow the cancellation `Dispatcher._halt` uses to stop an idle task."""

    def __init__(self, halt: asyncio.Event) -> None:
        self.halt = halt

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> bool:
        return kind is asyncio.CancelledError and self.halt.is_set()


def _is_success(raw: bytes) -> bool:
    if raw in _SUCCESS_BODIES:
        return True
    try:
        body = json.loads(raw)
    except ValueError:
        return False
    return isinstance(body, dict) and body.get("success") is True


def _detail(status: int, reason: str | None, raw: bytes) -> str:
    if 200 <= status < 300:
        text = raw.decode("utf-8", "replace").strip()
        return f"answer was not success: {text[:_DETAIL_CHARS]}" if text else "empty answer"
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    text = text[:_DETAIL_CHARS] if text and not text.lstrip().startswith("<") else ""
    return " ".join(part for part in (reason or "", text) if part)
