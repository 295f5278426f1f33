"""One worker process for tests/test_budget.py: sends to the sandbox as fast as a
SharedRateLimiter over PostgreSQL allows, for a given time.

    python -m tests.rate_worker PG_URL SEND_URL RATE SECONDS TASKS FIRST_PHONE

Prints "ready" once connected, starts on a line on stdin, prints a JSON line of counts.
"""

from __future__ import annotations

import asyncio
import json
import sys

import aiohttp

from campaign.rate import SharedRateLimiter
from campaign.store.budget import RateBudget
from tests.helpers import phones


async def main(
    pg_url: str, send_url: str, rate: float, seconds: float, tasks: int, first: int
) -> None:
    loop = asyncio.get_running_loop()
    numbers = iter(phones(int(rate * seconds * 2), start=first))
    sent = 0
    async with await RateBudget.connect(pg_url, send_url) as budget:
        limiter = SharedRateLimiter(rate, budget.grant)
        async with aiohttp.ClientSession() as http:
            print("ready", flush=True)
            await loop.run_in_executor(None, sys.stdin.readline)
            end = loop.time() + seconds

            async def sender() -> None:
                nonlocal sent
                while True:
                    await limiter.acquire()
                    if loop.time() >= end:
                        return
                    await limiter.confirm()
                    async with http.post(send_url, json={"to_phone": next(numbers)}) as answer:
                        await answer.read()
                    sent += 1

            await asyncio.gather(*(sender() for _ in range(tasks)))
        await limiter.aclose()
    counts = {"sent": sent, "granted": limiter.granted, "dropped": limiter.dropped}
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    url, send, rate, seconds, tasks, first = sys.argv[1:7]
    asyncio.run(main(url, send, float(rate), float(seconds), int(tasks), int(first)))
