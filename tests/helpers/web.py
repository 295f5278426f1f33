"""Helpers for tests of the upload service: a real `campaign serve`, a signed-in client, uploads."""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from campaign.job import load_job
from campaign.web.app import create_app
from tests.helpers import (
    ROOT,
    Sandbox,
    Served,
    serve,
)

TOKEN = "test-token-7f3a-5b0e"  # at least 16 characters, or serve refuses it


XLSX = ROOT / "sample_data" / "recipients.xlsx"


COLUMNS = ["First Name", "Last Name", "Phone", "Employee ID"]


# recipients.xlsx: 50 rows, 5 with unusable phones, 2 repeating an earlier phone.
EXPECTED = {
    "sent": 0,
    "failed": 0,
    "unknown": 0,
    "pending": 43,
    "invalid": 5,
    "duplicate": 2,
    "suppressed": 0,
}


WAIT_S = 30


def start_serve(directory: Path, job: Path, *options: str, token: str = TOKEN) -> Served:
    """`campaign serve JOB --port 0` signed with `token`, once it says where it listens."""
    return serve(directory, job, token, *options)


@asynccontextmanager
async def in_process(job: Path, **options: Any) -> AsyncIterator[tuple[str, web.Application]]:
    """The app in the test's own process and loop, on 127.0.0.1: its URL and the app, for
    what a subprocess cannot show (its open event streams) or be made to do (a clock 12 h
    on). Sends run in the test's loop."""
    app = create_app(load_job(job), TOKEN, 1024 * 1024, **options)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", app
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client(server: Served, token: str | None = TOKEN) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(server.url, headers=headers) as session:
        yield session


async def upload(http: aiohttp.ClientSession, path: Path, **extra: str) -> dict[str, Any]:
    form = aiohttp.FormData()
    form.add_field("file", path.read_bytes(), filename=path.name)
    for name, value in extra.items():
        form.add_field(name, value)
    async with http.post("/api/campaigns", data=form) as response:
        body = await response.json()
        assert response.status == 201, body
        return body


async def call(
    http: aiohttp.ClientSession, method: str, path: str, status: int = 200, **kwargs: Any
) -> Any:
    async with http.request(method, path, **kwargs) as response:
        body = await response.json()
        assert response.status == status, body
        return body


async def final_state(http: aiohttp.ClientSession, campaign: str) -> dict[str, Any]:
    """Follow the campaign's server-sent events until it stops running; its last state."""
    state: dict[str, Any] = {}
    async with http.get(f"/api/campaigns/{campaign}/events") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        event = ""
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "state":
                state = json.loads(line[6:])
                if state["state"] != "running":
                    return state
    raise AssertionError(f"the event stream ended without a final state: {state}")


def wait_for_records(sandbox: Sandbox, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while len(sandbox.records()) < count:
        assert time.monotonic() < deadline, f"the sandbox did not get {count} requests"
        time.sleep(0.02)


def results_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


async def sign_in(http: aiohttp.ClientSession, origin: str) -> tuple[str, str]:
    """The page's sign-in: the session cookie as a Cookie header, and the Set-Cookie line."""
    async with http.post("/api/session", json={"token": TOKEN}, headers={"Origin": origin}) as r:
        assert r.status == 200, await r.text()
        set_cookie = r.headers["Set-Cookie"]
    return set_cookie.split(";")[0], set_cookie


async def upload_and_validate(http: aiohttp.ClientSession) -> str:
    made = await upload(http, XLSX)
    campaign = made["id"]
    summary = await call(http, "PUT", f"/api/campaigns/{campaign}/mapping", json=made["mapping"])
    assert summary["counts"] == EXPECTED
    return campaign


# --- Chromium (Debian's package, driven by Playwright) -----------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Per chart (figure[data-chart]) of a page: how many of its canvas's pixels are painted.
# The mark of every test that drives Chromium: skipped, saying why, where it is missing.
BROWSER = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (`make test` installs it as root)",
    ),
]


@contextmanager
def validated_page(url: str, timeout_ms: int = 30_000) -> Iterator[Any]:
    """Chromium's context on the page at `url`, signed in: its first page has the sample
    workbook uploaded and validated (43 people to send). Yields (context, page)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 900})
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            page.goto(f"{url}/#token={TOKEN}")
            page.set_input_files("#file", XLSX)
            expect(page.locator("#preview tbody tr")).to_have_count(10)
            page.click("#validate")
            expect(page.locator('#counts [data-status="pending"] strong')).to_have_text("43")
            yield context, page
        finally:
            browser.close()


CHART_INK_JS = """() => Object.fromEntries([...document.querySelectorAll("figure[data-chart]")]
  .map((figure) => {
    const canvas = figure.querySelector("canvas");
    if (!canvas || !canvas.width || !canvas.height) return [figure.dataset.chart, 0];
    const pixels = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
    let painted = 0;
    for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) painted += 1;
    return [figure.dataset.chart, painted];
  }))"""
CHARTS = ("rate", "progress", "statuses", "funnel", "reasons", "waiting")


async def sent_from_the_page(http: aiohttp.ClientSession, campaign: str) -> list[dict[str, str]]:
    """The sample workbook's campaign started on the page and waited for (43 sent): the
    rows of the results.csv the page then gives, one a row of the workbook."""
    started = await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
    assert started["state"] == "running"
    done = await final_state(http, campaign)
    assert done["state"] == "done" and done["counts"]["sent"] == 43
    async with http.get(f"/api/campaigns/{campaign}/results.csv") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/csv")
        assert response.headers["Content-Disposition"].startswith("attachment")
        rows = results_rows(await response.text())
    assert [r["_row"] for r in rows] == [str(i) for i in range(1, 51)]
    return rows
