"""The page's suppression routes through the real server: the list read and changed, a
suppressed person shown with their reason in the validation and never sent."""

from __future__ import annotations

from pathlib import Path

from campaign.store.suppression import SuppressionList
from tests.helpers import start_sandbox, write_job
from tests.helpers.web import (
    EXPECTED,
    XLSX,
    Served,
    call,
    client,
    final_state,
    sign_in,
    start_serve,
    upload,
)

# recipients.xlsx's first row: 4155550101 (US).
FIRST = "+14155550101"


async def test_the_page_changes_the_list_only_from_its_own_origin_and_runs_respect_it(
    tmp_path: Path,
) -> None:
    """One server for both: a cookie-borne change from another origin is refused (and
    changes nothing) first, then the page's own changes go through."""
    box = start_sandbox(tmp_path)
    server = start_serve(tmp_path, write_job(tmp_path, box.url))
    try:
        await _a_cookie_borne_change_from_another_origin_is_refused(server, tmp_path / "runs")
        async with client(server) as http:
            bad = await call(http, "POST", "/api/suppression", 400, json={"phones": ["12"]})
            assert "phones[0]: phone is too short" in bad["error"]
            await call(http, "POST", "/api/suppression", 400, json={"phones": "x"})
            added = await call(
                http,
                "POST",
                "/api/suppression",
                json={"phones": ["(415) 555-0101", "+44 20 7946 0958"], "reason": "=STOP"},
            )
            assert added == {"added": 2, "already": 0}
            listed = await call(http, "GET", "/api/suppression")
            assert listed["count"] == 2
            assert {e["phone"]: (e["reason"], e["source"]) for e in listed["entries"]} == {
                FIRST: ("=STOP", "manual"),
                "+442079460958": ("=STOP", "manual"),
            }
            async with http.get("/api/suppression?format=csv") as response:
                assert response.headers["Content-Type"].startswith("text/csv")
                text = await response.text()
            assert text.splitlines()[0] == "phone,reason,source,added_at"
            assert f"{FIRST},'=STOP,manual," in text

            made = await upload(http, XLSX)
            campaign = made["id"]
            summary = await call(
                http, "PUT", f"/api/campaigns/{campaign}/mapping", json=made["mapping"]
            )
            assert summary["counts"] == {**EXPECTED, "pending": 42, "suppressed": 1}
            rows = await call(http, "GET", f"/api/campaigns/{campaign}/rows?status=suppressed")
            assert [r["row"] for r in rows["rows"]] == [1]
            assert rows["rows"][0]["error"].endswith("(manual): =STOP")

            await call(http, "POST", f"/api/campaigns/{campaign}/start", 202, json={})
            done = await final_state(http, campaign)
            assert done["counts"]["sent"] == 42 and done["counts"]["suppressed"] == 1
            assert FIRST not in box.phones()

            gone = await call(
                http, "DELETE", "/api/suppression", json={"phones": ["+1 415 555 0101"]}
            )
            assert gone == {"removed": 1, "not_listed": 0}
        with SuppressionList(tmp_path / "runs") as store:
            assert [e.phone for e in store.entries()] == ["+442079460958"]
    finally:
        server.stop()
        box.stop()


async def _a_cookie_borne_change_from_another_origin_is_refused(
    server: Served, output_dir: Path
) -> None:
    async with client(server, token=None) as http:
        cookie, _ = await sign_in(http, server.url)
        body = {"phones": [FIRST]}
        foreign = {"Cookie": cookie, "Origin": "http://127.0.0.1:1"}
        await call(http, "POST", "/api/suppression", 403, json=body, headers=foreign)
        await call(http, "DELETE", "/api/suppression", 403, json=body, headers=foreign)
        page = {"Cookie": cookie, "Origin": server.url}
        as_text = {**page, "Content-Type": "text/plain"}
        await call(http, "POST", "/api/suppression", 415, data=b'{"phones": []}', headers=as_text)
        await call(http, "GET", "/api/suppression", headers={"Cookie": cookie})
    with SuppressionList(output_dir) as store:
        assert store.count() == 0
