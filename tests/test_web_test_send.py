"""The page's test send route: `POST /api/campaigns/{id}/test`, under the API's access
rules, refusing what `campaign test` refuses, and leaving the campaign's people alone."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Sandbox, start_sandbox, write_job
from tests.helpers.web import (
    EXPECTED,
    Served,
    call,
    client,
    start_serve,
    upload_and_validate,
)

TEST_PHONE = "+1 415 555 0199"
# The job of the `reports_server` fixture (tests/conftest.py), for a server of this module.
REPORTS_JOB: dict[str, Any] = {
    "mapping": {"params": {"first_name": "First Name", "emp_id": "Employee ID"}},
    "reporting": {"agent_id": "1", "access_token": "sandbox-token"},
}


async def _until_reported(http: Any, campaign: str) -> dict[str, Any]:
    for _ in range(200):
        view: dict[str, Any] = await call(http, "GET", f"/api/campaigns/{campaign}/test")
        if not view["waiting"]:
            return view
        await asyncio.sleep(0.1)
    raise AssertionError("the test's report never came")


@pytest.fixture(scope="module")
def reporting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Sandbox, Served, Path]]:
    """One server and sandbox (delivery reports within a fifth of a second) for the
    module: each test has a campaign of its own and reads the sandbox's records from its
    own start. The sandbox, the server and its job."""
    directory = tmp_path_factory.mktemp("reporting")
    box = start_sandbox(directory, "--delivery-delay-s", "0.2")
    job = write_job(directory, box.url, **REPORTS_JOB)
    server = start_serve(directory, job)
    try:
        yield box, server, job
    finally:
        server.stop()
        box.stop()


def test_a_test_from_the_page_reaches_the_test_number_only(
    reporting: tuple[Sandbox, Served, Path],
) -> None:
    box, server, _ = reporting
    before = len(box.records())

    async def scenario() -> None:
        async with client(server) as http:
            campaign = await upload_and_validate(http)
            view = await call(
                http, "POST", f"/api/campaigns/{campaign}/test", json={"to": [TEST_PHONE]}
            )
            assert view["row"] == 1 and view["params"] == {"first_name": "José", "emp_id": "0"}
            assert [r["state"] for r in view["requests"]] == ["sent"]
            view = await _until_reported(http, campaign)
            (request,) = view["requests"]
            assert request["message"].startswith("Hello José!")
            assert request["sms_status"] == "delivered"
            state = await call(http, "GET", f"/api/campaigns/{campaign}")
            assert state["counts"] == EXPECTED

    asyncio.run(scenario())
    assert [r["body"]["to_phone"] for r in box.records()[before:]] == ["+14155550199"]


@pytest.fixture(scope="module")
def untouched(reporting: tuple[Sandbox, Served, Path]) -> tuple[Sandbox, Served, str]:
    """A validated campaign of the module's server, for the tests that must send nothing
    (each checks that the sandbox got no request while it ran): the sandbox, server and
    campaign."""
    box, server, _ = reporting
    return box, server, validated_upload(server)


def validated_upload(server: Served) -> str:
    """A campaign uploaded to `server` and validated: its id."""

    async def validated() -> str:
        async with client(server) as http:
            return await upload_and_validate(http)

    return asyncio.run(validated())


@pytest.mark.parametrize(
    ("body", "said"),
    [
        ({"to": ["12"]}, "test number '12': phone is too short"),
        ({"to": [TEST_PHONE], "row": 12}, "row 12 is invalid"),
        ({"to": [TEST_PHONE], "row": 999}, "no row 999"),
        ({"to": []}, "to: give 1 to 20 test numbers"),
        ({"to": [TEST_PHONE], "row": "2"}, "row: a whole number"),
    ],
    ids=["invalid-number", "invalid-row", "no-such-row", "no-number", "row-not-a-number"],
)
def test_the_page_refuses_what_the_command_refuses(
    untouched: tuple[Sandbox, Served, str], body: dict[str, Any], said: str
) -> None:
    box, server, campaign = untouched
    before = len(box.records())

    async def scenario() -> None:
        async with client(server) as http:
            answer = await call(http, "POST", f"/api/campaigns/{campaign}/test", 400, json=body)
            assert said in answer["error"]

    asyncio.run(scenario())
    assert box.records()[before:] == []


def test_a_test_needs_the_token(untouched: tuple[Sandbox, Served, str]) -> None:
    box, server, campaign = untouched
    before = len(box.records())

    async def scenario() -> None:
        async with client(server, token=None) as anonymous:
            await call(
                anonymous, "POST", f"/api/campaigns/{campaign}/test", 401, json={"to": [TEST_PHONE]}
            )

    asyncio.run(scenario())
    assert box.records()[before:] == []


def test_a_page_campaign_is_tested_from_the_command_line_only_with_its_spreadsheet(
    reporting: tuple[Sandbox, Served, Path],
) -> None:
    """The job file's input is not the page's upload: its row 1 is another person."""
    from tests.helpers import cli
    from tests.helpers.web import XLSX

    box, server, job = reporting
    before = len(box.records())
    campaign = validated_upload(server)
    refused = cli("test", str(job), "--campaign", campaign, "--to", TEST_PHONE)
    assert refused.returncode == 2
    assert "was made on the page: send the test from the page" in refused.stderr
    assert len(box.records()) == before

    given = cli("test", str(job), "--campaign", campaign, "--to", TEST_PHONE, "--input", str(XLSX))
    assert given.returncode == 0, given.stdout + given.stderr
    assert [r["body"]["first_name"] for r in box.records()[before:]] == ["José"]
