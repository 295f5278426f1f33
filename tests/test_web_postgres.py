"""The upload page on a PostgreSQL store: the real `campaign serve` (one or two processes
on one database), the real CLI beside it, a real PostgreSQL (tests/helpers/pg_server.py), and the
sandbox's record as the count of what was sent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import (
    assert_no_duplicates,
    cli,
    phones,
    statuses,
    write_job,
)
from tests.helpers.pg import in_campaign, workers
from tests.helpers.rates import max_in_window
from tests.helpers.runs import finish, people, people_job, results
from tests.helpers.shared_sandbox import ChannelView
from tests.helpers.web import (
    EXPECTED,
    XLSX,
    call,
    client,
    final_state,
    results_rows,
    sent_from_the_page,
    start_serve,
    upload,
    wait_for_records,
)


def runs_by_pid(url: str, campaign: str) -> dict[int, int]:
    """Requests per process that worked the campaign (its runs' pids)."""
    with in_campaign(url, campaign) as db:
        found = db.execute(
            "SELECT r.pid, count(a.run_id) FROM runs r LEFT JOIN attempts a ON a.run_id = r.id "
            "GROUP BY r.pid"
        ).fetchall()
    return dict(found)


async def _validate(http: aiohttp.ClientSession, campaign: str, mapping: dict[str, Any]) -> None:
    summary = await call(http, "PUT", f"/api/campaigns/{campaign}/mapping", json=mapping)
    assert summary["state"] == "validated" and summary["counts"] == EXPECTED
    assert summary["invalid"]["total"] == 5


async def test_page_sends_a_campaign_on_postgres_and_sees_the_command_lines(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """Upload, validate, start, download on a PostgreSQL job; a number suppressed on the
    page is respected by `campaign run` on the same database, whose campaign the page then
    shows with its counts."""
    box = sandboxes(0)
    rows = 20
    job = write_job(
        tmp_path, box.url, input=people(tmp_path / "in.csv", rows), ledger=pg_url, api=box.api()
    )
    server = start_serve(tmp_path, job)
    try:
        async with client(server) as http:
            made = await upload(http, XLSX)
            campaign = made["id"]
            await _validate(http, campaign, made["mapping"])
            assert not (tmp_path / "runs" / campaign / "ledger.sqlite").exists()
            lines = await sent_from_the_page(http, campaign)
            assert statuses(lines) == {"sent": 43, "invalid": 5, "duplicate": 2}
            assert len(assert_no_duplicates(box)) == 43

            held_back = phones(rows)[3]
            added = await call(
                http, "POST", "/api/suppression", json={"phones": [held_back], "reason": "asked"}
            )
            assert added == {"added": 1, "already": 0}
            run = cli("run", str(job), "--no-progress")
            assert run.returncode == 0, run.stdout + run.stderr
            assert statuses(results(tmp_path)) == {"sent": rows - 1, "suppressed": 1}
            assert len(assert_no_duplicates(box)) == 43 + rows - 1

            listed = {c["id"]: c for c in (await call(http, "GET", "/api/campaigns"))["campaigns"]}
            assert set(listed) == {campaign, "test"}
            assert listed["test"]["state"] == "done" and listed["test"]["origin"] == "cli"
            assert listed["test"]["counts"]["sent"] == rows - 1
            assert listed["test"]["counts"]["suppressed"] == 1
            assert listed[campaign]["counts"]["sent"] == 43
            page = await call(http, "GET", "/api/campaigns/test/rows?status=suppressed")
            assert page["total"] == 1
    finally:
        server.stop()


async def test_a_campaign_validated_on_one_server_is_sent_from_another(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """Two page servers on one database, each with its own data directory: an upload is
    on its server only until validated (the other says so), then the other sends it."""
    box = sandboxes(0)
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    server_a = start_serve(a_dir, write_job(a_dir, box.url, ledger=pg_url, api=box.api()))
    server_b = start_serve(b_dir, write_job(b_dir, box.url, ledger=pg_url, api=box.api()))
    try:
        async with client(server_a) as on_a, client(server_b) as on_b:
            made = await upload(on_a, XLSX)
            campaign = made["id"]
            refused = await call(
                on_b, "PUT", f"/api/campaigns/{campaign}/mapping", 409, json=made["mapping"]
            )
            assert "not validated yet" in refused["error"]
            assert str((a_dir / "runs").resolve()) in refused["error"]
            assert (await call(on_b, "GET", "/api/campaigns"))["campaigns"] == []

            await _validate(on_a, campaign, made["mapping"])
            seen = await call(on_b, "GET", f"/api/campaigns/{campaign}")
            assert seen["state"] == "validated" and seen["counts"] == EXPECTED
            again = await call(
                on_b, "PUT", f"/api/campaigns/{campaign}/mapping", 409, json=made["mapping"]
            )
            assert "can still be sent from here" in again["error"]

            await call(on_b, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
            done = await final_state(on_b, campaign)
            assert done["state"] == "done" and done["counts"]["sent"] == 43
            assert (await call(on_a, "GET", f"/api/campaigns/{campaign}"))["state"] == "done"
            for http in (on_b, on_a):  # B ran it; A's results are written from the ledger
                async with http.get(f"/api/campaigns/{campaign}/results.csv") as response:
                    assert response.status == 200
                    lines = results_rows(await response.text())
                assert statuses(lines) == {"sent": 43, "invalid": 5, "duplicate": 2}
            assert not (b_dir / "runs" / campaign / "upload.xlsx").exists()
    finally:
        server_a.stop()
        server_b.stop()
    assert len(assert_no_duplicates(box)) == 43


@pytest.mark.exact_rate
async def test_a_page_start_joins_the_command_line_workers_sending_the_campaign(
    tmp_path: Path, pg_url: str, sandboxes: Callable[[int], ChannelView]
) -> None:
    """Two `campaign run` workers send a campaign; the page shows it running, and its start
    joins them: every person once at the sandbox, the page's worker among the senders,
    and the one rate budget of the channel held by all three."""
    rows, rate = 400, 100
    box = sandboxes(20)
    job = people_job(
        tmp_path, box, rows, ledger=pg_url, rate_per_second=rate, concurrency=4, lease_s=3
    )
    server = start_serve(tmp_path, job)
    try:
        running = workers(job, 2)
        wait_for_records(box, 50)
        async with client(server) as http:
            busy = await call(http, "GET", "/api/campaigns/test")
            assert busy["state"] == "running"
            # A page that follows the workers' progress from the ledger, before it sends.
            watching = asyncio.create_task(final_state(http, "test"))
            await asyncio.sleep(0.5)
            await call(http, "POST", "/api/campaigns/test/start", 202, json={})
            done = await final_state(http, "test")
            assert (await watching)["state"] == "done"
        codes = await asyncio.to_thread(lambda: [finish(p) for p in running])
        assert codes == [0, 0], codes
        assert done["state"] == "done", done
        assert done["counts"]["sent"] == rows
        assert len(assert_no_duplicates(box)) == rows
        per_process = runs_by_pid(pg_url, "test")
        assert per_process.get(server.process.pid, 0) > 0, per_process
        assert sum(per_process.values()) == rows
        assert max_in_window([r["t"] for r in box.records()]) <= rate
    finally:
        server.stop()
