"""The server's sends and the event streams that follow them: one rate budget per
channel; a stream that ends when its page goes away; a cheap look at a campaign that
another process sends."""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from campaign.store.campaigns import open_campaign
from campaign.web.api import SERVICE
from campaign.web.watch import Watch
from tests.helpers import FaultServer, Sandbox, cli, spawn_cli, write_csv, write_job
from tests.helpers.rates import max_in_window
from tests.helpers.web import (
    TOKEN,
    call,
    client,
    final_state,
    in_process,
    start_serve,
    upload_and_validate,
)

BEARER = {"Authorization": f"Bearer {TOKEN}"}
WAIT_S = 20


@pytest.mark.exact_rate
async def test_page_campaigns_to_one_channel_share_its_rate(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    job = write_job(tmp_path, sandbox.url, limits={"rate_per_second": 20, "concurrency": 4})
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            campaigns = [await upload_and_validate(http), await upload_and_validate(http)]
            for campaign in campaigns:
                started = await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
                assert started["state"] == "running"
            for campaign in campaigns:
                done = await final_state(http, campaign)
                assert done["state"] == "done" and done["counts"]["sent"] == 43
    finally:
        server.stop()
    arrivals = [record["t"] for record in sandbox.records()]
    assert len(arrivals) == 2 * 43
    # Each campaign alone keeps to 20/s; together they must too (not 40/s).
    assert max_in_window(arrivals) <= 20


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT_S} s for {what}"
        await asyncio.sleep(0.02)


async def first_event(http: aiohttp.ClientSession, campaign: str) -> tuple[Any, str]:
    """An open event stream of the campaign and the name of its first event."""
    response = await http.get(f"/api/campaigns/{campaign}/events")
    assert response.status == 200
    async for raw in response.content:
        line = raw.decode().strip()
        if line.startswith("event: "):
            return response, line[7:]
    raise AssertionError("the stream ended before its first event")


async def streams_end_with_their_pages(
    app: web.Application, http: aiohttp.ClientSession, campaign: str, event: str
) -> None:
    """Two pages follow the campaign while nothing changes; each stream ends when its page
    goes away, though nothing is written to it that could fail."""
    service = app[SERVICE]
    pages = [await first_event(http, campaign), await first_event(http, campaign)]
    assert [name for _, name in pages] == [event, event]
    assert service.watches.streams(campaign) == 2
    for left, (response, _) in zip((1, 0), pages, strict=True):
        response.close()  # the tab is closed: the connection goes
        await until(lambda n=left: service.watches.streams(campaign) == n, f"{left} streams")


@asynccontextmanager
async def page_over_a_hanging_api(
    tmp_path: Path,
) -> AsyncIterator[tuple[FaultServer, Path, web.Application, aiohttp.ClientSession]]:
    """The page in this process, signed in, over an API that never answers: the API, the
    job, the app and the page's client."""
    with FaultServer(lambda _n, _body: "hang") as hanging:
        job = write_job(tmp_path, hanging.url, api={"timeout_s": 60}, limits={"concurrency": 1})
        async with (
            in_process(job) as (url, app),
            aiohttp.ClientSession(url, headers=BEARER) as http,
        ):
            yield hanging, job, app, http


async def test_a_stream_ends_when_its_page_goes_away_though_the_send_is_stuck(
    tmp_path: Path,
) -> None:
    async with page_over_a_hanging_api(tmp_path) as (hanging, _job, app, http):
        try:
            campaign = await upload_and_validate(http)
            await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
            await until(lambda: len(hanging.arrivals) == 1, "the first request")
            await streams_end_with_their_pages(app, http, campaign, "progress")
            assert app[SERVICE].sends.running(campaign) and len(hanging.arrivals) == 1
        finally:
            app[SERVICE].stop(campaign)
            hanging.release()


async def test_a_stream_of_a_campaign_sent_from_the_command_line_ends_with_its_page(
    tmp_path: Path,
) -> None:
    async with page_over_a_hanging_api(tmp_path) as (hanging, job, app, http):
        campaign = await upload_and_validate(http)
        upload = tmp_path / "runs" / campaign / "upload.xlsx"
        run = spawn_cli("run", str(job), "--campaign", campaign, "--input", str(upload))
        try:
            await until(lambda: len(hanging.arrivals) == 1, "the first request")
            await streams_end_with_their_pages(app, http, campaign, "state")
            assert run.poll() is None  # still sending: the pages ended the streams
        finally:
            run.send_signal(signal.SIGINT)
            hanging.release()
            assert run.wait(timeout=WAIT_S) == 130


async def test_a_watch_reads_the_ledger_again_only_when_the_campaign_changed(
    tmp_path: Path,
) -> None:
    people = write_csv(tmp_path / "people.csv", ["Phone", "First Name"], [["+14155550101", "A"]])
    job = write_job(tmp_path, "http://127.0.0.1:9", input=people)
    assert cli("validate", str(job)).returncode == 0
    directory = tmp_path / "runs" / "test"
    reads: list[int] = []

    async def read() -> dict[str, Any]:
        reads.append(1)
        return {"read": len(reads)}

    async def look(watch: Watch) -> int:
        return (await watch.view(read))["read"]

    every_time = Watch(directory, every_s=0)
    assert [await look(every_time), await look(every_time)] == [1, 1]  # nothing changed
    assert cli("validate", str(job)).returncode == 0  # the same input: nothing is written
    assert [await look(every_time), await look(every_time)] == [1, 1]
    write_csv(people, ["Phone", "First Name"], [["+14155550101", "B"]])
    assert cli("validate", str(job)).returncode == 0  # a fixed row: the ledger is written
    assert [await look(every_time), await look(every_time)] == [2, 2]
    with open_campaign(directory.parent, directory.name, "job"):  # a process takes it
        assert await look(every_time) == 3
    assert await look(every_time) == 4  # ... and lets it go (or dies: no file changes)

    once_a_second = Watch(directory)
    looks: list[Awaitable[int]] = [look(once_a_second) for _ in range(5)]
    assert await asyncio.gather(*looks) == [5] * 5  # five pages, one read


async def test_two_starts_at_once_make_one_send(tmp_path: Path) -> None:
    with FaultServer(lambda _n, _body: 200) as api:
        server = start_serve(tmp_path, write_job(tmp_path, api.url))
        try:
            async with client(server) as http:
                campaign = await upload_and_validate(http)

                async def start() -> int:
                    async with http.post(f"/api/campaigns/{campaign}/start", json={}) as response:
                        return response.status

                assert sorted(await asyncio.gather(start(), start())) == [202, 409]
                assert (await final_state(http, campaign))["counts"]["sent"] == 43
        finally:
            server.stop()
        sent = collections.Counter(body["to_phone"] for body in api.bodies())
    assert len(sent) == 43 and set(sent.values()) == {1}
