"""The server's background sends: `run_campaign` in a task per campaign.

A send is stopped the way Ctrl-C stops the command line (`RunControl.stop`: requests in
flight finish and are recorded, the rest stay pending), and the server drains every send
the same way before it exits.

Every send to one channel (one Send API address) shares one limiter: the rate is the
channel's budget, not each campaign's, so two campaigns started on the page at 20/s
reach the API at 20/s together, not 40/s. On SQLite it is a `RateLimiter`; on PostgreSQL
a `SharedRateLimiter` over the channel's budget in the database, which every worker on
every host (`campaign run`, other page servers) takes its slots from too. The limiter is
made on the first send, inside the server's event loop, and lives as long as the server
(its budget's connection is closed at shutdown, after the sends have drained).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from campaign.avaamo import send_url
from campaign.errors import CampaignError
from campaign.job import Job
from campaign.logs import masker, save_traceback
from campaign.pipeline import RunControl, RunOptions, RunOutcome, run_campaign
from campaign.rate import Limiter
from campaign.worker import channel_limiter

log = structlog.get_logger(__name__)


@dataclass
class Send:
    control: RunControl
    task: asyncio.Task[None]
    only_failed: bool
    started: float
    outcome: RunOutcome | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return not self.task.done()

    def progress(self) -> dict[str, Any]:
        """Live counts of this run, from the dispatcher's `Progress`."""
        progress = self.control.progress
        if progress is None:
            return {"phase": "preparing", "stopping": self.control.stopping}
        return {
            "phase": "sending",
            "stopping": self.control.stopping,
            "only_failed": self.only_failed,
            "total": progress.total,
            "done": progress.done,
            "requests": progress.requests,
            "by_state": dict(progress.by_state),
            "rate": round(progress.rate, 1),
        }


class Sends:
    def __init__(self) -> None:
        self._sends: dict[str, Send] = {}
        self._limiters: dict[str, Limiter] = {}  # by send URL
        self._closers: list[Callable[[], Awaitable[None]]] = []  # the budgets' connections
        self._making = asyncio.Lock()  # two first sends must not make two limiters

    def get(self, campaign: str) -> Send | None:
        return self._sends.get(campaign)

    def running(self, campaign: str) -> bool:
        send = self._sends.get(campaign)
        return send is not None and send.running

    def start(self, campaign: str, job: Job, options: RunOptions, directory: Path) -> Send:
        control = RunControl()
        task = asyncio.create_task(self._run(campaign, job, options, control, directory))
        send = self._sends[campaign] = Send(control, task, options.only_failed, time.monotonic())
        log.info("send started from the page", campaign=campaign, only_failed=options.only_failed)
        return send

    async def _limiter(self, job: Job) -> Limiter:
        url = send_url(job.api)
        async with self._making:
            if url not in self._limiters:
                # Every campaign of one server has the job's limits, so one rate per channel.
                self._limiters[url], close = await channel_limiter(job)
                if close is not None:
                    self._closers.append(close)
            return self._limiters[url]

    async def _run(
        self, campaign: str, job: Job, options: RunOptions, control: RunControl, directory: Path
    ) -> None:
        send = self._sends[campaign]
        try:
            control.limiter = await self._limiter(job)
            send.outcome = await run_campaign(job, options, control)
        except CampaignError as exc:
            send.error = str(exc)
        except Exception as exc:
            saved = save_traceback(directory)
            log.error("send failed unexpectedly", campaign=campaign, details=str(saved))
            where = saved.name if saved else "the server's log"
            send.error = masker.clean(f"unexpected error: {exc!r}; details in {where}")

    def stop(self, campaign: str) -> bool:
        """Stop after the requests in flight; False when it is not sending here."""
        send = self._sends.get(campaign)
        if send is None or not send.running:
            return False
        send.control.stop()
        return True

    async def shutdown(self) -> None:
        running = [s for s in self._sends.values() if s.running]
        for send in running:
            send.control.stop()
        await asyncio.gather(*(s.task for s in running), return_exceptions=True)
        closers, self._closers = self._closers, []
        self._limiters.clear()
        for close in closers:
            await close()
