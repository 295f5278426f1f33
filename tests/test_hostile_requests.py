"""Hostile requests to the page's server and hostile command lines: a clear 4xx or one
line and exit 2, never a 500, a traceback, a crash or a password."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from campaign.job import load_job
from campaign.store.suppression import SuppressionList
from tests.helpers import (
    ROOT,
    FaultServer,
    Sandbox,
    Served,
    cli,
    e164,
    phones,
    raw_http,
    serve,
    write_csv,
    write_job,
)
from tests.helpers.optouts import OFF

TOKEN = "a-token-of-thirty-two-characters-x"
DEEP = b"[" * 100_000
PASSWORD = "S3C#RET/pw?x@y%41"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, module_sandbox: Sandbox) -> Iterator[Served]:
    """One server for the hostile requests: each leaves its log clean, so each test checks
    the whole log so far."""
    directory = tmp_path_factory.mktemp("hostile-requests")
    served = serve(directory, write_job(directory, module_sandbox.url), TOKEN)
    yield served
    served.stop()


def clean_log(served: Served) -> None:
    text = served.log.read_text()
    assert "Traceback" not in text and "Error handling request" not in text, text[-3000:]


def test_a_bearer_token_that_is_not_utf8_is_401(server: Served) -> None:
    head = b"GET /api/campaigns HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\r\n"
    assert raw_http(server.url, head) == 401
    clean_log(server)


def test_a_token_with_a_lone_surrogate_is_401(server: Served) -> None:
    head = b"POST /api/session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    assert raw_http(server.url, head, b'{"token": "\\ud800"}') == 401
    clean_log(server)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/api/campaigns/none/mapping"),
        ("POST", "/api/suppression"),
        ("POST", "/api/session"),
        ("POST", "/api/campaigns/none/start"),
    ],
)
async def test_deeply_nested_bodies_are_a_clear_4xx(server: Served, method: str, path: str) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession(server.url, headers=headers) as http,
        http.request(method, path, data=DEEP) as response,
    ):
        body = await response.json()
    assert response.status in {400, 401}, body
    assert "error" in body
    clean_log(server)


async def test_a_body_over_the_limit_is_413(server: Served) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    big = json.dumps({"phones": ["+14155550100"] * 30_000}).encode()
    async with (
        aiohttp.ClientSession(server.url, headers=headers) as http,
        http.post("/api/suppression", data=big) as response,
    ):
        assert response.status == 413, await response.text()
    clean_log(server)


async def test_an_upload_whose_mapping_is_deeply_nested_is_400(
    tmp_path: Path, server: Served
) -> None:
    data = write_csv(tmp_path / "up.csv", ["First Name", "Phone"], [["A", phones(1)[0]]])
    form = aiohttp.FormData()
    form.add_field("file", data.read_bytes(), filename="up.csv")
    form.add_field("mapping", "[" * 100_000)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession(server.url, headers=headers) as http,
        http.post("/api/campaigns", data=form) as response,
    ):
        body = await response.json()
    assert response.status == 400, body
    assert body["error"].startswith("mapping:")
    clean_log(server)


def test_serve_refuses_an_unreachable_ledger_without_its_password(tmp_path: Path) -> None:
    job = write_job(
        tmp_path, "http://127.0.0.1:9", ledger=f"postgresql://bob:{PASSWORD}@127.0.0.1:1/db"
    )
    result = cli("serve", str(job), "--port", "0", env={"CAMPAIGN_TOKEN": TOKEN}, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("campaign: error: PostgreSQL at ")
    for secret in ("RET", "pw?x", "%41", "x@y"):
        assert secret not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["run", "reconcile", "suppress"])
def test_no_command_prints_a_ledger_password_with_odd_characters(
    tmp_path: Path, command: str
) -> None:
    job = write_job(
        tmp_path,
        "http://127.0.0.1:9",
        ledger=f"postgresql://bob:{PASSWORD}@127.0.0.1:1/db",
        reporting={"agent_id": "7", "access_token": "t"},
        input=str(write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["A", phones(1)[0]]])),
    )
    args = {"run": ["run", str(job)], "reconcile": ["reconcile", str(job)]}.get(
        command, ["suppress", "list", str(job)]
    )
    result = cli(*args, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "PostgreSQL at postgresql://bob@127.0.0.1:1/db" in result.stderr
    assert "RET" not in result.stderr + result.stdout


def test_serve_refuses_an_upload_cap_it_cannot_count(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    result = cli("serve", str(job), "--max-upload-mb", "1e308", env={"CAMPAIGN_TOKEN": TOKEN})
    assert result.returncode == 2
    assert "--max-upload-mb" in result.stderr and "Traceback" not in result.stderr


def test_suppress_list_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    # A list long enough not to fit the pipe's buffer, written as `suppress add` would.
    with SuppressionList(load_job(job).output_dir, None) as listed:
        assert listed.add([e164(p) for p in phones(3000)], "added by hand", "manual") == 3000
    process = subprocess.Popen(
        [sys.executable, "-m", "campaign", "suppress", "list", str(job)],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    first = [process.stdout.readline() for _ in range(2)]  # `| head -2`
    process.stdout.close()
    errors = process.stderr.read().decode()
    process.wait(timeout=60)
    assert first[0].startswith(b"phone,")
    assert errors == ""
    assert process.returncode == 141
    assert not list(tmp_path.glob("**/crash-*"))


async def test_the_page_checks_delivery_through_a_retry_after_of_unicode_digits(
    tmp_path: Path, module_sandbox: Sandbox
) -> None:
    people = phones(2)

    def reply(n: int, query: dict[str, str]) -> object:
        if n == 0:
            return (429, {"Retry-After": "²"})
        return (200, None, {"total_pages": 1, "total_entries": 0, "entries": []})

    data = write_csv(tmp_path / "in.csv", ["First Name", "Phone"], [["A", p] for p in people])
    with FaultServer(reply) as api:
        reporting = {"agent_id": "7", "access_token": "t", "base_url": api.url, **OFF}
        job = write_job(tmp_path, module_sandbox.url, input=data, reporting=reporting)
        assert cli("run", str(job), "--no-progress").returncode == 0
        served = serve(tmp_path, job, TOKEN)
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            async with (
                aiohttp.ClientSession(served.url, headers=headers) as http,
                http.post("/api/campaigns/test/reconcile") as response,
            ):
                body = await response.json()
            assert response.status == 200, body
            assert len(api.arrivals) == 2
            clean_log(served)
        finally:
            served.stop()
