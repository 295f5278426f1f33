"""One campaign, two front doors: a campaign of the page continued with `campaign run`, and
one of `campaign run` continued on the page, each person sent once, counted at the server."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

from tests.helpers import FaultServer, Sandbox, cli, phones, read_results, write_csv, write_job
from tests.test_web_api import call, client, final_state, start_serve, upload

# The page chooses Mobile; the job file says Phone: another person for every row.
HEADER = ["First Name", "Phone", "Mobile"]


def _office_and_mobile(path: Path, n: int) -> Path:
    rows = [[f"P{i}", o, m] for i, (o, m) in enumerate(zip(phones(n), phones(n, 500), strict=True))]
    return write_csv(path, HEADER, rows)


async def test_a_page_campaign_continued_from_the_command_line_keeps_the_page_mapping(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    data = _office_and_mobile(tmp_path / "people.csv", 3)
    job = write_job(tmp_path, sandbox.url, input=data)
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
