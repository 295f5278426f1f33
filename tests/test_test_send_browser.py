"""The page's *Send a test* in headless Chromium: a row to the operator's own phone, the
API's answer, then the message the phone received (from the sandbox's delivery reports),
and the campaign's people untouched."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Sandbox
from tests.helpers.web import BROWSER, Served, validated_page

TEST_PHONE = "+1 415 555 0199"

pytestmark = BROWSER


def test_send_a_test_shows_the_answer_then_the_message_received(
    tmp_path: Path, reports_sandbox: Sandbox, reports_server: Served
) -> None:
    from playwright.sync_api import expect

    with validated_page(reports_server.url, timeout_ms=20_000) as (_, page):
        # The test block comes before the big button, in the Send card.
        boxes = [page.locator(selector).bounding_box() for selector in ("#test-block", "#start")]
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

    bodies = [r["body"] for r in reports_sandbox.records()]
    assert bodies == [{"to_phone": "+14155550199", "first_name": "Zoë", "emp_id": "37"}]
