"""One campaign, two front doors: a campaign of the page continued with `campaign run`, and
one of `campaign run` continued on the page, each person sent once, counted at the server."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import (
    FaultServer,
    Sandbox,
    cli,
    phones,
    read_results,
    soak_trials,
    spawn_cli,
    write_csv,
    write_job,
)
from tests.helpers.shared_sandbox import ChannelView, channel_of
from tests.helpers.web import call, client, final_state, start_serve, upload

# The page chooses Mobile; the job file says Phone: another person for every row.
HEADER = ["First Name", "Phone", "Mobile"]
TRIALS = soak_trials(2)  # two at least: each order, page first and command line first
HOLD_S = 60


@pytest.fixture
def sandbox(module_sandbox: Sandbox) -> ChannelView:
    """The module's sandbox, through a channel of this test's own."""
    return channel_of(module_sandbox)


def _office_and_mobile(path: Path, n: int, start: int = 0) -> Path:
    office, mobile = phones(n, start), phones(n, start + 500)
    rows = [[f"P{i}", o, m] for i, (o, m) in enumerate(zip(office, mobile, strict=True))]
    return write_csv(path, HEADER, rows)


async def test_a_page_campaign_continued_from_the_command_line_keeps_the_page_mapping(
    tmp_path: Path, sandbox: ChannelView
) -> None:
    data = _office_and_mobile(tmp_path / "people.csv", 3)
    job = write_job(tmp_path, sandbox.url, input=data, api={"channel_uuid": sandbox.channel})
    mapping = {"to_phone": "Mobile", "params": {"first_name": "First Name"}}
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            made = await upload(http, data, mapping=json.dumps(mapping))
            campaign = made["id"]
            await call(http, "PUT", f"/api/campaigns/{campaign}/mapping", json=mapping)
            await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
            assert (await final_state(http, campaign))["state"] == "done"
    finally:
        server.stop()
    mobiles = sorted(p.replace(" ", "") for p in phones(3, 500))
    assert sorted(sandbox.phones()) == mobiles

    directory = tmp_path / "runs" / campaign
    for extra in (["--input", str(directory / "upload.csv")], []):
        done = cli("run", str(job), "--campaign", campaign, "--no-progress", *extra)
        assert done.returncode == 0, done.stderr
        rows = read_results(directory / "results.csv")
        assert [(r["_status"], r["_to_phone"]) for r in rows] == [("sent", m) for m in mobiles]
    assert sorted(sandbox.phones()) == mobiles  # nobody was sent a second SMS


async def test_a_command_line_campaign_is_continued_on_the_page(tmp_path: Path) -> None:
    data = _office_and_mobile(tmp_path / "people.csv", 3)
    down = {phones(1)[0].replace(" ", "")}

    def reply(_n: int, body: dict[str, Any]) -> Any:
        return 503 if body["to_phone"] in down else 200

    with FaultServer(reply) as api:
        job = write_job(tmp_path, api.url, input=data, limits={"max_attempts": 1})
        first = cli("run", str(job), "--no-progress")
        assert first.returncode == 1, first.stderr
        down.clear()
        server = start_serve(tmp_path, job)
        try:
            async with client(server) as http:
                listed = (await call(http, "GET", "/api/campaigns"))["campaigns"]
                assert [(c["id"], c["uploaded_here"]) for c in listed] == [("test", False)]
                assert listed[0]["counts"]["failed"] == 1
                await call(
                    http, "POST", "/api/campaigns/test/start", 202, json={"only_failed": True}
                )
                final = await final_state(http, "test")
        finally:
            server.stop()
        requests = collections.Counter(b["to_phone"] for b in api.bodies())
    assert final["state"] == "done" and final["counts"]["sent"] == 3
    # The one answered 503 was sent again (it was not delivered); the others never were.
    failed_once = phones(1)[0].replace(" ", "")
    assert requests == {
        p.replace(" ", ""): 1 + (p.replace(" ", "") == failed_once) for p in phones(3)
    }
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [r["_status"] for r in rows] == ["sent"] * 3


class Held:
    """The API: while held, requests wait (until `let_go()`) before their 200; otherwise 200
    at once. Who holds the campaign's lock stays in its send for as long as the test needs,
    whatever the machine's speed."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def hold(self) -> None:
        self.gate = threading.Event()

    def let_go(self) -> None:
        self.gate.set()

    def reply(self, _n: int, _body: dict[str, Any]) -> Any:
        return "held"

    async def held(self, _request: web.Request) -> web.Response:
        await asyncio.to_thread(self.gate.wait, HOLD_S)
        return web.json_response({"success": True})


def wait_for_arrivals(api: FaultServer, count: int) -> None:
    deadline = time.monotonic() + HOLD_S
    while len(api.arrivals) < count:
        assert time.monotonic() < deadline, f"the API did not get {count} requests"
        time.sleep(0.02)


@pytest.mark.soak
async def test_page_and_command_line_on_one_campaign_send_each_person_once(
    tmp_path: Path,
) -> None:
    """Each trial starts the page's send and `campaign run --campaign` on one campaign, in
    turn one first and the other while it sends: one works, the other is refused."""
    # The first sender's requests are held until the other has been answered (or has run
    # for HOLD_S): the two always meet, however slow the command line is to start.
    people = 30
    holder = Held()
    with FaultServer(holder.reply, streams={"held": holder.held}) as api:
        job = write_job(
            tmp_path, api.url, api={"timeout_s": HOLD_S + 30}, limits={"concurrency": 2}
        )
        server = start_serve(tmp_path, job)
        losers = []
        try:
            async with client(server) as http:
                for trial in range(TRIALS):
                    data = _office_and_mobile(
                        tmp_path / f"people-{trial}.csv", people, 1000 * trial
                    )
                    made = await upload(http, data)
                    campaign = made["id"]
                    path = f"/api/campaigns/{campaign}"
                    await call(http, "PUT", f"{path}/mapping", json=made["mapping"])
                    before = len(api.arrivals)
                    holder.hold()
                    run = ("run", str(job), "--campaign", campaign, "--no-progress")
                    if trial % 2:
                        command = spawn_cli(*run)
                        wait_for_arrivals(api, before + 1)  # the command line is sending
                        async with http.post(f"{path}/start", json={}) as started:
                            page = (started.status, (await started.json()).get("error"))
                        holder.let_go()
                    else:
                        await call(http, "POST", f"{path}/start", 202, json={})
                        wait_for_arrivals(api, before + 1)  # the page is sending
                        command = spawn_cli(*run)
                        page = (202, None)
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            command.wait(timeout=HOLD_S)  # refused, or (a bug) sending too
                        holder.let_go()
                    _, err = command.communicate(timeout=120)
                    final = await final_state(http, campaign)
                    if command.returncode == 2:
                        assert "is in use by" in err, err
                        losers.append("command line")
                    elif page[0] == 409 or final.get("error"):
                        assert "in use" in (page[1] or final["error"]), (page, final)
                        losers.append("page")
                    # Whoever lost, the campaign is whole: a last run sends nobody again.
                    again = cli(*run)
                    assert again.returncode == 0, again.stderr
                    rows = read_results(tmp_path / "runs" / campaign / "results.csv")
                    assert [r["_status"] for r in rows] == ["sent"] * people
        finally:
            holder.let_go()
            server.stop()
        sent = collections.Counter(body["to_phone"] for body in api.bodies())
    twice = sorted(phone for phone, n in sent.items() if n > 1)
    assert twice == [], f"a recipient was sent twice: {twice}"
    assert len(sent) == people * TRIALS
    assert sorted(set(losers)) == ["command line", "page"], losers


async def test_the_command_line_never_removes_or_replaces_a_page_upload(
    tmp_path: Path, sandbox: ChannelView
) -> None:
    """An upload not validated yet: `campaign run|validate --campaign` of it cannot send the
    job file's own input under the page's id, and must leave the page's files alone."""
    own_input = _office_and_mobile(tmp_path / "job-input.csv", 2, 700)
    job = write_job(tmp_path, sandbox.url, input=own_input, api={"channel_uuid": sandbox.channel})
    data = _office_and_mobile(tmp_path / "people.csv", 3)
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            campaign = (await upload(http, data))["id"]
            directory = tmp_path / "runs" / campaign
            before = sorted(p.name for p in directory.iterdir())
            for command in (
                ["run", str(job), "--campaign", campaign],
                ["validate", str(job), "--campaign", campaign],
                ["validate", str(job), "--campaign", campaign, "--input", "missing.csv"],
            ):
                refused = cli(*command, "--no-progress")
                assert refused.returncode == 2, refused.stderr
                assert sorted(p.name for p in directory.iterdir()) == before
            assert sandbox.phones() == []
            # The page goes on as if nothing happened.
            made = await call(http, "GET", f"/api/campaigns/{campaign}")
            await call(http, "PUT", f"/api/campaigns/{campaign}/mapping", json=made["mapping"])
            await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
            assert (await final_state(http, campaign))["counts"]["sent"] == 3
    finally:
        server.stop()
    assert len(sandbox.phones()) == 3
