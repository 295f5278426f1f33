"""The upload page in headless Chromium: upload, map, validate, send, download, rerun.

Chromium is Debian's package (`make test` installs it when it can); Playwright drives it
as an external executable, no browser is downloaded. Each step leaves a screenshot in the
test's tmp dir.
"""

from __future__ import annotations

import csv
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import FaultServer, write_job
from tests.helpers.web import BROWSER, CHROMIUM, CHROMIUM_ARGS, TOKEN, XLSX, Served, start_serve

# Answered 400 the first time (a permanent failure), 200 on the rerun.
FAIL_ONCE = {"+14155550103", "+12125550116"}

pytestmark = BROWSER


class FlakyApi:
    """Replies for the fault server: the FAIL_ONCE phones fail once, the rest succeed."""

    def __init__(self) -> None:
        self.failed: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, _n: int, body: dict[str, Any]) -> int:
        phone = body.get("to_phone", "")
        with self.lock:
            if phone in FAIL_ONCE and phone not in self.failed:
                self.failed.add(phone)
                return 400
        return 200


@pytest.fixture
def api() -> Iterator[FaultServer]:
    with FaultServer(FlakyApi()) as server:
        yield server


@pytest.fixture
def served(tmp_path: Path, api: FaultServer) -> Iterator[Served]:
    job = write_job(
        tmp_path,
        api.url,
        mapping={
            "params": {
                "first_name": "First Name",
                "last_name": "Last Name",
                "emp_id": "Employee ID",
            }
        },
        limits={"rate_per_second": 50, "concurrency": 4, "max_attempts": 2},
    )
    server = start_serve(tmp_path, job)
    yield server
    server.stop()


def test_upload_map_validate_send_download_rerun(
    tmp_path: Path, api: FaultServer, served: Served
) -> None:
    from playwright.sync_api import expect, sync_playwright

    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(20_000)

            page.goto(f"{served.url}/#token={TOKEN}")
            expect(page.locator("#app")).to_be_visible()
            assert "token" not in page.url  # the token leaves the address bar at once
            page.screenshot(path=shots / "1-signed-in.png", full_page=True)

            page.set_input_files("#file", XLSX)
            expect(page.locator("#preview tbody tr")).to_have_count(10)
            expect(page.locator("#mapping-source")).to_contain_text("from the job file")
            phone_use = page.get_by_label("use of column Phone")
            expect(phone_use).to_have_value("phone")
            page.get_by_label("use of column Employee ID").select_option("skip")
            expect(page.locator("#validate-status")).to_contain_text("validate it again")
            # Whether a param name is usable is the server's answer, as for a job file.
            last_name = page.get_by_label("param name for column Last Name")
            last_name.fill("last name")
            page.click("#validate")
            expect(page.locator("#mapping-error")).to_contain_text(
                "mapping.params: 'last name' is not a usable param name"
            )
            last_name.fill("last_name")
            page.screenshot(path=shots / "2-uploaded-and-mapped.png", full_page=True)

            page.click("#validate")
            expect(page.locator('#counts [data-status="pending"] strong')).to_have_text("43")
            expect(page.locator('#counts [data-status="invalid"] strong')).to_have_text("5")
            expect(page.locator("#invalid tbody tr")).to_have_count(5)
            expect(page.locator("#invalid")).to_contain_text("phone is too short")
            start = page.locator("#start")
            expect(start).to_have_text("Send to 43 recipients at 50 per second (about 1 s)")
            page.screenshot(path=shots / "3-validated.png", full_page=True)

            start.click()
            expect(page.locator("#send-state")).to_have_text("Done: 41 sent, 2 failed.")
            expect(page.locator('#counts [data-status="failed"] strong')).to_have_text("2")
            page.screenshot(path=shots / "4-done.png", full_page=True)

            with page.expect_download() as download_info:
                page.click("#download")
            download = download_info.value
            saved = tmp_path / download.suggested_filename
            download.save_as(saved)
            with saved.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
            assert len(rows) == 50
            statuses = Counter(r["_status"] for r in rows)
            assert statuses == {"sent": 41, "failed": 2, "invalid": 5, "duplicate": 2}
            assert {r["_to_phone"] for r in rows if r["_status"] == "failed"} == FAIL_ONCE

            rerun = page.locator("#rerun")
            expect(rerun).to_have_text("Rerun the 2 failed rows")
            rerun.click()
            expect(page.locator("#send-state")).to_have_text("Done: 43 sent.")
            expect(rerun).to_be_hidden()
            campaign_row = page.locator("#campaigns tbody tr")
            expect(campaign_row).to_have_count(1)
            expect(campaign_row).to_contain_text("43 sent")
            page.screenshot(path=shots / "5-rerun-done.png", full_page=True)
        finally:
            browser.close()

    bodies = api.bodies()
    assert all("emp_id" not in body for body in bodies)  # the page's mapping was used
    answered_ok = Counter(b["to_phone"] for b in bodies) - Counter(FAIL_ONCE)
    assert len(answered_ok) == 43 and max(answered_ok.values()) == 1
    assert len(list(shots.glob("*.png"))) == 5
