"""The baseline: a bare aiohttp client posting the campaign's bodies, nothing else.

    python bench/bare_client.py URL FIRST_ROW ROWS CONCURRENCY [asyncio|uvloop]

No ledger, no limiter, no parsing of the answer: the fastest this machine can post these
bodies to that server with that many requests in flight, on the standard event loop (what
a hand-written script uses) or on uvloop (what `campaign run` uses).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.tools import CHANNEL, body

HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> int:
    target = f"{url}/sms/{CHANNEL}/send.json"
    todo = iter(bodies)
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        for data in todo:
            async with session.post(target, data=data) as answer:
                await answer.read()
                failures += answer.status != 200

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failures


def main() -> int:
    url, first, rows, concurrency = sys.argv[1], *map(int, sys.argv[2:5])
    loop = sys.argv[5] if len(sys.argv) > 5 else "asyncio"
    bodies = [body(i) for i in range(first, first + rows)]
    if loop == "uvloop":
        import uvloop

        failures = uvloop.run(post_all(url, bodies, concurrency))
    else:
        failures = asyncio.run(post_all(url, bodies, concurrency))
    print(f"posted {rows}, {failures} not 200")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
