"""The page's *Send a test* in headless Chromium: a row to the operator's own phone, the
API's answer, then the message the phone received (from the sandbox's delivery reports),
and the campaign's people untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Sandbox, start_sandbox, write_job
from tests.helpers.web import TOKEN, XLSX, Served, start_serve

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
TEST_PHONE = "+1 415 555 0199"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (`make test` installs it as root)",
    ),
]


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    started = start_sandbox(tmp_path, "--delivery-delay-s", "0.2")
    yield started
    started.stop()


@pytest.fixture
def served(tmp_path: Path, sandbox: Sandbox) -> Iterator[Served]:
    job = write_job(
        tmp_path,
        sandbox.url,
        mapping={"params": {"first_name": "First Name", "emp_id": "Employee ID"}},
        reporting={"agent_id": "1", "access_token": "sandbox-token"},
    )
    server = start_serve(tmp_path, job)
    yield server
    server.stop()


def test_send_a_test_shows_the_answer_then_the_message_received(
    tmp_path: Path, sandbox: Sandbox, served: Served
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(20_000)
            page.goto(f"{served.url}/#token={TOKEN}")
            page.set_input_files("#file", XLSX)
            expect(page.locator("#preview tbody tr")).to_have_count(10)
            page.click("#validate")
            expect(page.locator('#counts [data-status="pending"] strong')).to_have_text("43")

            # The test block comes before the big button, in the Send card.
            boxes = [
                page.locator(selector).bounding_box() for selector in ("#test-block", "#start")
            ]
            assert boxes[0] is not None and boxes[1] is not None
            assert boxes[0]["y"] < boxes[1]["y"]
            page.fill("#test-phone", TEST_PHONE)
            page.fill("#test-row", "2")
            page.click("#test-send")
            expect(page.locator("#test-answer")).to_contain_text("+14155550199: sent (HTTP 200)")
            expect(page.locator("#test-params")).to_contain_text("first_name: Zoë · emp_id: 37")
            message = page.locator("#test-message")
            expect(message).to_contain_text("This is what row 2 produces: Hello Zoë! (emp_id: 37)")
            expect(message).to_contain_text("(delivered)")
            page.screenshot(path=tmp_path / "test-send.png", full_page=True)

            # Nobody of the campaign was sent; the phone is remembered for the session.
            expect(page.locator("#start")).to_contain_text("Send to 43 recipients")
            page.reload()
            page.locator("#campaigns tbody tr").first.click()
            expect(page.locator("#test-phone")).to_have_value(TEST_PHONE)
            expect(page.locator('#counts [data-status="pending"] strong')).to_have_text("43")
        finally:
            browser.close()

    bodies = [r["body"] for r in sandbox.records()]
    assert bodies == [{"to_phone": "+14155550199", "first_name": "Zoë", "emp_id": "37"}]
