"""The page's "Check delivery": `POST /api/campaigns/{id}/reconcile` on the real
`campaign serve` process, against the sandbox's delivery reports."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import aiohttp

from tests.helpers import FaultServer, Sandbox, cli, phones, write_csv, write_job
from tests.helpers.web import TOKEN, call, client, start_serve

REPORTING = {"agent_id": "1", "access_token": "sandbox-token", "settle_minutes": 0}


async def test_check_delivery_reads_the_reports_and_the_csv_shows_them(
    tmp_path: Path, reports_sandbox: Sandbox
) -> None:
    sandbox = reports_sandbox  # its entries say delivered a fifth of a second after
    data = write_csv(
        tmp_path / "in.csv",
        ["First Name", "Phone"],
        [[f"P{i}", p] for i, p in enumerate(phones(4))],
    )
    job = write_job(tmp_path, sandbox.url, input=data, reporting=REPORTING)
    assert cli("run", str(job), "--no-progress").returncode == 0
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            listed = await call(http, "GET", "/api/campaigns")
            assert listed["reporting"] is True
            # Entries appear within 2 s and say delivered after the sandbox's delay.
            deadline = time.monotonic() + 30
            while True:
                state = await call(http, "POST", "/api/campaigns/test/reconcile")
                if state["delivery"] == {"delivered": 4} or time.monotonic() > deadline:
                    break
            assert state["delivery"] == {"delivered": 4}
            assert state["complete"] is True and state["counts"]["sent"] == 4
            described = await call(http, "GET", "/api/campaigns/test")
            assert described["delivery"] == {"delivered": 4}
            async with http.get("/api/campaigns/test/results.csv") as response:
                rows = list(csv.DictReader(io.StringIO(await response.text())))
            assert [r["_delivery"] for r in rows] == ["delivered"] * 4
            # Without the token, no reconcile.
            async with aiohttp.ClientSession(server.url) as anonymous:
                await call(anonymous, "POST", "/api/campaigns/test/reconcile", 401)
    finally:
        server.stop()


async def test_without_a_reporting_section_check_delivery_says_so(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["A", phones(1)[0]]])
    with FaultServer(lambda n, body: 200) as api:  # an API that takes every request
        job = write_job(tmp_path, api.url, input=data)
        assert cli("run", str(job), "--no-progress").returncode == 0
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            assert (await call(http, "GET", "/api/campaigns"))["reporting"] is False
            refused = await call(http, "POST", "/api/campaigns/test/reconcile", 409)
            assert "reporting:" in refused["error"]
            await call(http, "POST", "/api/campaigns/nope/reconcile", 404)
    finally:
        server.stop()
    assert TOKEN not in server.log.read_text()
