"""Who may drive the upload service: sessions, the same-origin rule, the token's length.

A page on another port of 127.0.0.1 is the same *site* as the server, so SameSite=Strict
alone lets it use the operator's cookie; these tests play that page with a real HTTP
client and count what reached the sandbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from campaign.web.access import SESSION_TTL_S, Sessions
from campaign.web.app import _is_loopback
from tests.helpers import Sandbox, cli, start_sandbox, write_job
from tests.helpers.web import (
    TOKEN,
    XLSX,
    Served,
    call,
    client,
    final_state,
    in_process,
    sign_in,
    start_serve,
    upload_and_validate,
)

NOWHERE = "http://127.0.0.1:9"  # the API of tests that send nothing
CROSS_ORIGIN = "refused: a state-changing request signed in by the session cookie"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Served]]:
    """One sandbox and server for the tests of who may send: each uploads its own campaign
    and counts what reached the sandbox during the test."""
    directory = tmp_path_factory.mktemp("access")
    box = start_sandbox(directory)
    served = start_serve(directory, write_job(directory, box.url))
    try:
        yield box, served
    finally:
        served.stop()
        box.stop()


@pytest.fixture
def sandbox(shared: tuple[Sandbox, Served]) -> Sandbox:
    return shared[0]


@pytest.fixture
def server(shared: tuple[Sandbox, Served]) -> Served:
    return shared[1]


def upload_form() -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("file", XLSX.read_bytes(), filename=XLSX.name)
    return form


async def test_a_page_of_another_origin_cannot_use_the_cookie(
    sandbox: Sandbox, server: Served
) -> None:
    sent_before = len(sandbox.records())
    port = int(server.url.rsplit(":", 1)[1])
    other = f"http://127.0.0.1:{port + 1}"  # same site (127.0.0.1), another origin
    async with client(server) as bearer:
        campaign = await upload_and_validate(bearer)
    start = f"/api/campaigns/{campaign}/start"
    async with client(server, token=None) as http:
        cookie, _ = await sign_in(http, server.url)
        listed = await call(http, "GET", "/api/campaigns", headers={"Cookie": cookie})
        campaigns = [c["id"] for c in listed["campaigns"]]
        assert campaign in campaigns
        attempts: list[tuple[dict[str, str], dict[str, Any]]] = [
            ({"Origin": other, "Content-Type": "text/plain"}, {"data": b"{}"}),
            ({"Origin": other}, {"json": {}}),
            ({"Origin": other}, {}),
            ({"Referer": f"{other}/"}, {"json": {}}),
            ({"Origin": "null"}, {"json": {}}),
            ({"Origin": f"http://localhost:{port}"}, {"json": {}}),  # another host name
            ({"Origin": server.url.replace("http:", "https:")}, {"json": {}}),
            ({}, {"json": {}}),  # neither Origin nor Referer
        ]
        for headers, body in attempts:
            error = await call(
                http, "POST", start, 403, headers={"Cookie": cookie, **headers}, **body
            )
            assert error["error"].startswith(CROSS_ORIGIN), headers

        foreign = {"Cookie": cookie, "Origin": other}
        mapping = {"to_phone": "Phone", "params": {}}
        await call(
            http, "PUT", f"/api/campaigns/{campaign}/mapping", 403, headers=foreign, json=mapping
        )
        await call(http, "POST", f"/api/campaigns/{campaign}/stop", 403, headers=foreign)
        await call(http, "POST", "/api/campaigns", 403, headers=foreign, data=upload_form())
        await call(http, "DELETE", "/api/session", 403, headers=foreign)  # no forced sign-out
        # Signing in from another origin is refused too, whatever the token.
        error = await call(
            http, "POST", "/api/session", 403, headers={"Origin": other}, json={"token": TOKEN}
        )
        assert error["error"] == "refused: sign in on this server's own page"

        # Reading is harmless (another origin cannot read the answer) and still works.
        state = await call(http, "GET", f"/api/campaigns/{campaign}", headers={"Cookie": cookie})
        assert state["state"] == "validated" and state["mapping"]["params"] != {}
        listed = await call(http, "GET", "/api/campaigns", headers={"Cookie": cookie})
        assert [c["id"] for c in listed["campaigns"]] == campaigns  # the upload made nothing
    assert len(sandbox.records()) == sent_before


async def test_the_page_signs_in_maps_sends_and_signs_out_on_its_own_origin(
    sandbox: Sandbox, server: Served
) -> None:
    sent_before = len(sandbox.records())
    async with client(server, token=None) as http:
        cookie, set_cookie = await sign_in(http, server.url)
        attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
        assert {"httponly", "samesite", "max-age", "path"} <= attributes
        assert f"Max-Age={12 * 3600}" in set_cookie and "Secure" not in set_cookie
        assert TOKEN not in set_cookie

        page = {"Cookie": cookie, "Origin": server.url}
        async with http.post("/api/campaigns", headers=page, data=upload_form()) as response:
            made = await response.json()
            assert response.status == 201, made
        campaign = made["id"]
        # A browser that leaves Origin out still sends the page's own address as Referer.
        referred = {"Cookie": cookie, "Referer": f"{server.url}/#campaign={campaign}"}
        summary = await call(
            http,
            "PUT",
            f"/api/campaigns/{campaign}/mapping",
            headers=referred,
            json=made["mapping"],
        )
        assert summary["to_send"] == 43
        json_utf8 = {**page, "Content-Type": "application/json; charset=utf-8"}
        started = await call(
            http, "POST", f"/api/campaigns/{campaign}/start", 202, headers=json_utf8, data=b"{}"
        )
        assert started["state"] == "running"
        async with aiohttp.ClientSession(server.url, headers={"Cookie": cookie}) as events:
            done = await final_state(events, campaign)  # the page's EventSource: a GET
        assert done["counts"]["sent"] == 43

        await call(http, "DELETE", "/api/session", headers=page)
        await call(http, "GET", "/api/campaigns", 401, headers={"Cookie": cookie})
        await call(http, "POST", f"/api/campaigns/{campaign}/stop", 401, headers=page)
    assert len(sandbox.records()) == sent_before + 43


async def test_scripts_send_with_the_token_and_json_or_no_body(
    sandbox: Sandbox, server: Served
) -> None:
    sent_before = len(sandbox.records())
    async with client(server) as http:
        campaign = await upload_and_validate(http)
        start = f"/api/campaigns/{campaign}/start"
        as_text = {"Content-Type": "text/plain"}
        error = await call(
            http, "POST", start, 415, headers=as_text, data=b'{"only_failed": false}'
        )
        assert "application/json" in error["error"]
        await call(
            http, "POST", "/api/session", 415, headers=as_text, data=f'{{"token": "{TOKEN}"}}'
        )
        await call(http, "POST", "/api/session", 415)  # a sign-in without a body
        assert (await call(http, "GET", f"/api/campaigns/{campaign}"))["state"] == "validated"
        assert len(sandbox.records()) == sent_before

        # `curl -X POST -H 'Authorization: Bearer T' .../start`: no body, no Origin.
        async with http.post(start) as response:
            assert response.status == 202, await response.text()
        done = await final_state(http, campaign)
        assert done["counts"]["sent"] == 43
    assert len(sandbox.records()) == sent_before + 43


async def test_a_session_ends_after_12_hours_and_is_forgotten(tmp_path: Path) -> None:
    clock = [1000.0]
    sessions = Sessions(clock=lambda: clock[0])
    async with (
        in_process(write_job(tmp_path, NOWHERE), sessions=sessions) as (url, _),
        aiohttp.ClientSession(url) as http,
    ):
        cookie, _ = await sign_in(http, url)
        earlier, _ = await sign_in(http, url)
        assert cookie != earlier and len(sessions) == 2
        clock[0] += SESSION_TTL_S - 1
        await call(http, "GET", "/api/campaigns", headers={"Cookie": cookie})
        clock[0] += 1
        await call(http, "GET", "/api/campaigns", 401, headers={"Cookie": cookie})
        fresh, _ = await sign_in(http, url)  # drops every expired id
        assert len(sessions) == 1
        await call(http, "GET", "/api/campaigns", 401, headers={"Cookie": earlier})
        await call(http, "GET", "/api/campaigns", headers={"Cookie": fresh})


async def test_the_cookie_is_secure_when_the_server_listens_beyond_loopback(
    tmp_path: Path,
) -> None:
    hosts = ["127.0.0.1", "::1", "localhost", "0.0.0.0", "::", "192.168.1.20", "example.org"]
    assert [h for h in hosts if _is_loopback(h)] == ["127.0.0.1", "::1", "localhost"]
    async with (
        in_process(write_job(tmp_path, NOWHERE), secure_cookie=True) as (url, _),
        aiohttp.ClientSession(url) as http,
    ):
        _, set_cookie = await sign_in(http, url)
    assert "Secure" in set_cookie


def test_a_short_token_is_refused_at_start(tmp_path: Path) -> None:
    job = write_job(tmp_path, NOWHERE)
    result = cli(
        "serve", str(job), "--port", "0", env={"CAMPAIGN_TOKEN": "fifteen-chars-x"}, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "campaign: error: CAMPAIGN_TOKEN is shorter than 16 characters: use a longer one "
        "(or leave it unset, and serve makes one up)"
    ]
    assert "listening" not in result.stdout
