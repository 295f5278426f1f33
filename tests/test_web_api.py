"""The upload service's API, driven over HTTP against the real `campaign serve` process.

The server runs as a subprocess on a free port; sends go to the sandbox (also a
subprocess), whose record file says exactly what was delivered.
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import (
    Sandbox,
    assert_no_duplicates,
    cli,
    spawn_cli,
    start_sandbox,
    write_job,
)
from tests.helpers.shared_sandbox import ChannelView, channel_of
from tests.helpers.web import (
    COLUMNS,
    EXPECTED,
    TOKEN,
    WAIT_S,
    XLSX,
    Served,
    call,
    client,
    final_state,
    sent_from_the_page,
    start_serve,
    upload,
    upload_and_validate,
    wait_for_records,
)


@pytest.fixture(scope="module")
def any_slow_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One request at a time at 50 ms each: a send of 43 rows lasts long enough to stop."""
    box = start_sandbox(tmp_path_factory.mktemp("slow"), "--latency-ms", "50")
    yield box
    box.stop()


@pytest.fixture
def sandbox(module_sandbox: Sandbox) -> ChannelView:
    """The module's sandbox, through a channel of this test's own."""
    return channel_of(module_sandbox)


@pytest.fixture
def slow_sandbox(any_slow_sandbox: ChannelView) -> ChannelView:
    return channel_of(any_slow_sandbox)


def job_for(directory: Path, box: ChannelView, **sections: Any) -> Path:
    """A job file of `directory` sending to the channel of `box`."""
    return write_job(directory, box.url, api={"channel_uuid": box.channel}, **sections)


@pytest.fixture
def server(tmp_path: Path, sandbox: ChannelView) -> Iterator[Served]:
    served = start_serve(tmp_path, job_for(tmp_path, sandbox))
    yield served
    served.stop()


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory, module_sandbox: Sandbox) -> Iterator[Served]:
    """A server that takes uploads of 52 KB at most, for the tests that make no campaign
    but the one the upload test checks for."""
    directory = tmp_path_factory.mktemp("capped")
    served = start_serve(
        directory, write_job(directory, module_sandbox.url), "--max-upload-mb", "0.05"
    )
    yield served
    served.stop()


async def test_every_api_route_needs_the_token(capped: Served) -> None:
    server = capped
    async with client(server, token=None) as anonymous:
        async with anonymous.get("/") as page:
            assert page.status == 200
            assert "<title>" in await page.text()
        async with anonymous.get("/static/app.js") as script:
            assert script.status == 200
        await call(anonymous, "GET", "/api/campaigns", 401)
        await call(anonymous, "POST", "/api/campaigns/x/start", 401, json={})
        await call(anonymous, "GET", "/api/campaigns", 401, headers={"Authorization": "Bearer no"})
        await call(
            anonymous, "GET", "/api/campaigns", 401, headers={"Cookie": "campaign_session=x"}
        )
        await call(anonymous, "POST", "/api/session", 401, json={"token": "wrong"})

        async with anonymous.post("/api/session", json={"token": TOKEN}) as login:
            assert login.status == 200
            set_cookie = login.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
        assert TOKEN not in set_cookie
        cookie = set_cookie.split(";")[0]
        by_cookie = await call(anonymous, "GET", "/api/campaigns", headers={"Cookie": cookie})

    async with client(server) as bearer:
        listed = await call(bearer, "GET", "/api/campaigns")
        assert listed["rate"] == 1000 and listed == by_cookie
        # None, or the one the upload test makes (the module's tests share the server).
        made = sorted(p.name for p in (capped.log.parent / "runs").glob("*"))
        assert [c["id"] for c in listed["campaigns"]] == made


async def test_uploads_are_capped_checked_and_their_mapping_guessed(capped: Served) -> None:
    server = capped
    runs = capped.log.parent / "runs"
    async with client(server) as http:
        line = b"First Name,Phone\n" + b"Ann,+14155550101\n" * 6000  # about 100 KB
        for body in (line, line * 12):  # under and over the multipart slack
            form = aiohttp.FormData()
            form.add_field("file", body, filename="big.csv")
            error = await call(http, "POST", "/api/campaigns", 413, data=form)
            assert "upload limit of 0.05 MB" in error["error"]

        form = aiohttp.FormData()
        form.add_field("file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10, filename="cat.png")
        error = await call(http, "POST", "/api/campaigns", 400, data=form)
        assert error["error"].startswith("cat.png: is not a CSV or Excel file")

        form = aiohttp.FormData()
        form.add_field("file", b"Phone,Name\n", filename="empty.csv")
        error = await call(http, "POST", "/api/campaigns", 400, data=form)
        assert error["error"] == "empty.csv: has a header row but no data rows under it"

        for multipart in (True, False):
            form = aiohttp.FormData(default_to_multipart=multipart)
            form.add_field("other", "x")
            error = await call(http, "POST", "/api/campaigns", 400, data=form)
            assert "field `file`" in error["error"]

        assert (await call(http, "GET", "/api/campaigns"))["campaigns"] == []
        assert not runs.exists() or list(runs.iterdir()) == []

        # No column the job names, none called "phone": the numbers give it away.
        # The name says .xlsx, the content is CSV: the content decides.
        text = "Name,Contact,Code\nAnn,(415) 555-0101,7\nBo,415.555.0102,12\n"
        form = aiohttp.FormData()
        form.add_field("file", text.encode(), filename="../../contacts.xlsx")
        made = await call(http, "POST", "/api/campaigns", 201, data=form)
        assert made["mapping_source"] == "guessed" and made["filename"] == "contacts.xlsx"
        assert made["mapping"]["to_phone"] == "Contact"
        assert made["mapping"]["params"] == {"name": "Name", "code": "Code"}
        assert [p.name for p in runs.iterdir()] == [made["id"]]
        assert (runs / made["id"] / "upload.csv").is_file()


async def test_upload_map_validate_send_download(
    tmp_path: Path, sandbox: ChannelView, server: Served
) -> None:
    async with client(server) as http:
        made = await upload(http, XLSX)
        campaign = made["id"]
        assert campaign.startswith("web-") and "recipients" not in campaign
        assert made["columns"] == COLUMNS
        assert made["preview"][0] == {"row": 1, "cells": ["José", "García", "4155550101", "0"]}
        assert made["mapping_source"] == "job" and made["mapping"]["to_phone"] == "Phone"
        assert (tmp_path / "runs" / campaign / "upload.xlsx").is_file()

        mapping = {
            **made["mapping"],
            "params": {"first_name": "First Name", "surname": "Last Name"},
        }
        bad = {**mapping, "params": {"first_name": "Nickname"}}
        error = await call(http, "PUT", f"/api/campaigns/{campaign}/mapping", 400, json=bad)
        assert "'Nickname'" in error["error"] and "no such column" in error["error"]
        # The job file's rule for param names, and its words.
        bad = {**mapping, "params": {"first name": "First Name"}}
        error = await call(http, "PUT", f"/api/campaigns/{campaign}/mapping", 400, json=bad)
        assert error["error"].startswith("mapping.params: 'first name' is not a usable param")

        summary = await call(http, "PUT", f"/api/campaigns/{campaign}/mapping", json=mapping)
        assert summary["state"] == "validated"
        assert summary["counts"] == EXPECTED and summary["to_send"] == 43
        assert summary["invalid"]["total"] == 5
        assert [r["row"] for r in summary["invalid"]["rows"]] == [12, 39, 40, 41, 42]
        assert summary["invalid"]["rows"][1]["error"] == "phone is too short"
        page = await call(http, "GET", f"/api/campaigns/{campaign}/rows?offset=3&limit=2")
        assert [r["row"] for r in page["rows"]] == [41, 42] and page["total"] == 5
        assert sandbox.records() == []  # validating sends nothing

        rows = await sent_from_the_page(http, campaign)
        assert sum(r["_status"] == "sent" for r in rows) == 43

        rerun = await call(
            http, "POST", f"/api/campaigns/{campaign}/start", 202, json={"only_failed": True}
        )
        # Nothing failed, so the rerun has nothing to send and may be over already.
        assert rerun["state"] in ("running", "done")
        assert (await final_state(http, campaign))["counts"]["sent"] == 43

    phones = assert_no_duplicates(sandbox)
    assert len(phones) == 43
    assert {frozenset(r["body"]) for r in sandbox.records()} == {
        frozenset({"to_phone", "first_name", "surname"})
    }

    # A restarted server shows the campaign as it was left, with the page's mapping.
    server.stop()
    again = start_serve(tmp_path, job_for(tmp_path, sandbox))
    try:
        async with client(again) as http:
            listed = (await call(http, "GET", "/api/campaigns"))["campaigns"]
            assert [(c["id"], c["state"], c["counts"]["sent"]) for c in listed] == [
                (campaign, "done", 43)
            ]
            detail = await call(http, "GET", f"/api/campaigns/{campaign}")
            assert detail["mapping"]["params"] == mapping["params"]
            assert detail["filename"] == "recipients.xlsx"
    finally:
        again.stop()


async def sending_from_the_page(tmp_path: Path, box: ChannelView) -> tuple[Path, Served, str]:
    """The sample workbook sent from the page, one request at a time, 3 of them arrived:
    the job, the page's server and the campaign."""
    job = job_for(tmp_path, box, limits={"concurrency": 1})
    server = start_serve(tmp_path, job)
    async with client(server) as http:
        campaign = await upload_and_validate(http)
        await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
    wait_for_records(box, 3)
    return job, server, campaign


async def test_page_campaign_stopped_with_the_server_is_continued_by_cli(
    tmp_path: Path, slow_sandbox: ChannelView
) -> None:
    job, server, campaign = await sending_from_the_page(tmp_path, slow_sandbox)
    assert server.stop(signal.SIGTERM) == 0  # drains like Ctrl-C: requests in flight finish
    delivered = len(slow_sandbox.records())
    assert 3 <= delivered < 43

    ledger = sqlite3.connect(tmp_path / "runs" / campaign / "ledger.sqlite")
    inflight = ledger.execute("SELECT count(*) FROM recipients WHERE state = 'inflight'")
    assert inflight.fetchone()[0] == 0
    assert ledger.execute("SELECT state FROM runs").fetchall() == [("interrupted",)]
    ledger.close()

    again = start_serve(tmp_path, job)
    try:
        async with client(again) as http:
            listed = (await call(http, "GET", "/api/campaigns"))["campaigns"]
            assert [(c["state"], c["resumable"]) for c in listed] == [("aborted", True)]
            assert listed[0]["counts"]["sent"] == delivered

            upload_path = tmp_path / "runs" / campaign / "upload.xlsx"
            result = cli("run", str(job), "--campaign", campaign, "--input", str(upload_path))
            assert result.returncode == 0, result.stderr
            assert (await call(http, "GET", f"/api/campaigns/{campaign}"))["state"] == "done"
    finally:
        again.stop()
    assert len(assert_no_duplicates(slow_sandbox)) == 43


async def test_server_killed_mid_send_shows_a_resumable_campaign(
    tmp_path: Path, slow_sandbox: ChannelView
) -> None:
    job, server, campaign = await sending_from_the_page(tmp_path, slow_sandbox)
    server.process.kill()
    server.process.wait(timeout=WAIT_S)

    again = start_serve(tmp_path, job)
    try:
        async with client(again) as http:
            listed = (await call(http, "GET", "/api/campaigns"))["campaigns"]
            assert [(c["state"], c["resumable"], c["last_run"]) for c in listed] == [
                ("aborted", True, "crashed")
            ]
            await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
            done = await final_state(http, campaign)
    finally:
        again.stop()
    assert done["state"] == "done"
    counts = done["counts"]
    # The one request in flight at the kill may have arrived: unknown, and not sent again.
    assert counts["unknown"] <= 1 and counts["sent"] + counts["unknown"] == 43
    delivered = len(assert_no_duplicates(slow_sandbox))
    assert counts["sent"] <= delivered <= counts["sent"] + counts["unknown"]


async def test_cli_campaign_is_continued_from_the_page(
    tmp_path: Path, slow_sandbox: ChannelView
) -> None:
    job = job_for(tmp_path, slow_sandbox, limits={"concurrency": 1})
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            campaign = await upload_and_validate(http)
            upload_path = tmp_path / "runs" / campaign / "upload.xlsx"
            run = spawn_cli(
                "run", str(job), "--campaign", campaign, "--input", str(upload_path),
                "--no-progress",
            )  # fmt: skip
            wait_for_records(slow_sandbox, 3)
            busy = await call(http, "GET", f"/api/campaigns/{campaign}")
            assert busy["state"] == "running"
            error = await call(http, "POST", f"/api/campaigns/{campaign}/start", 409, json={})
            assert "another process" in error["error"]
            run.send_signal(signal.SIGINT)
            assert run.wait(timeout=WAIT_S) == 130
            delivered = len(slow_sandbox.records())
            assert delivered < 43

            stopped = await call(http, "GET", f"/api/campaigns/{campaign}")
            assert stopped["state"] == "aborted" and stopped["to_send"] == 43 - delivered
            await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
            done = await final_state(http, campaign)
            assert done["state"] == "done" and done["counts"]["sent"] == 43
    finally:
        server.stop()
    assert len(assert_no_duplicates(slow_sandbox)) == 43
