"""The server's sends: one rate budget per channel across campaigns."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Sandbox, write_job
from tests.test_rate import max_in_window
from tests.test_web_api import _upload_and_validate, call, client, final_state, start_serve


async def test_page_campaigns_to_one_channel_share_its_rate(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    job = write_job(tmp_path, sandbox.url, limits={"rate_per_second": 20, "concurrency": 4})
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            campaigns = [await _upload_and_validate(http), await _upload_and_validate(http)]
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
