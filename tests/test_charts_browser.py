"""The campaign's charts in headless Chromium: on the page (live during a send, and for a
finished campaign opened again), and in report.html opened from a file:// URL with the
network cut off. Screenshots go to the test's tmp dir."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from campaign.report_html import REPORT_HTML
from tests.helpers import FaultServer, cli, phones, write_csv, write_job
from tests.helpers.web import (
    BROWSER,
    CHART_INK_JS,
    CHARTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    Served,
    start_serve,
    validated_page,
)

ANSWERED_AT_ONCE = 10  # then requests wait for the test to let them through
GATE_S = 60
# A drawn chart paints at least its axes; a canvas never drawn paints nothing.
MIN_INK = 500

pytestmark = BROWSER


class Gate:
    """The API: the first requests answered at once, the others once `open()` is called."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    def reply(self, n: int, _body: dict[str, Any]) -> Any:
        return 200 if n < ANSWERED_AT_ONCE else "gated"

    async def gated(self, _request: web.Request) -> web.Response:
        await asyncio.to_thread(self.opened.wait, GATE_S)
        return web.json_response({"success": True})

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def gate() -> Iterator[tuple[Gate, FaultServer]]:
    gate = Gate()
    server = FaultServer(gate.reply, streams={"gated": gate.gated})
    with server:
        try:
            yield gate, server
        finally:
            gate.open()


@pytest.fixture
def served(tmp_path: Path, gate: tuple[Gate, FaultServer]) -> Iterator[Served]:
    job = write_job(
        tmp_path,
        gate[1].url,
        api={"timeout_s": GATE_S},
        mapping={"params": {"first_name": "First Name", "last_name": "Last Name"}},
        limits={"rate_per_second": 1000, "concurrency": 4, "max_attempts": 2},
    )
    server = start_serve(tmp_path, job)
    yield server
    server.stop()


def ink(page: Any) -> dict[str, int]:
    painted: dict[str, int] = page.evaluate(CHART_INK_JS)
    return painted


def assert_every_chart_drawn(page: Any) -> None:
    painted = ink(page)
    assert set(painted) == set(CHARTS), painted
    assert all(n >= MIN_INK for n in painted.values()), painted


def test_campaign_view_draws_its_charts_live_and_when_opened_again(
    tmp_path: Path, gate: tuple[Gate, FaultServer], served: Served
) -> None:
    from playwright.sync_api import expect

    rate_text = 'figure[data-chart="rate"] .chart-text'
    with validated_page(served.url) as (context, page):
        # A validated campaign shows its charts already: 43 people to settle.
        expect(page.locator('figure[data-chart="progress"] .chart-text')).to_contain_text(
            "0 of 43 people settled"
        )

        page.click("#start")
        # Live: the first answers, and the requests held open, while it sends.
        live = f"({ANSWERED_AT_ONCE} sent, 4 in flight)"
        expect(page.locator(rate_text)).to_contain_text(live)
        expect(page.locator("#send-state")).to_have_text("Sending…")
        painted = ink(page)
        assert painted["rate"] >= MIN_INK and painted["progress"] >= MIN_INK, painted
        page.locator("#charts-card").screenshot(path=tmp_path / "charts-live.png")

        gate[0].open()
        expect(page.locator("#send-state")).to_have_text("Done: 43 sent.")
        expect(page.locator(rate_text)).to_contain_text("43 requests")
        expect(page.locator(rate_text)).to_contain_text("(43 sent)")
        assert_every_chart_drawn(page)
        page.locator("#charts-card").screenshot(path=tmp_path / "charts-done.png")
        campaign = page.locator("#campaign-id").text_content()

        # A finished campaign opened again (a new page, signed in by its cookie).
        again = context.new_page()
        again.set_default_timeout(30_000)
        again.goto(f"{served.url}/#campaign={campaign}")
        expect(again.locator(rate_text)).to_contain_text("(43 sent)")
        expect(again.locator('figure[data-chart="statuses"] .chart-text')).to_have_text(
            "43 sent, 5 invalid, 2 duplicate."
        )
        assert_every_chart_drawn(again)


def test_report_html_from_a_file_draws_every_chart_without_a_request(tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    rows = [[f"Name{i}", phone] for i, phone in enumerate(phones(12))]
    source = write_csv(tmp_path / "people.csv", ["First Name", "Phone"], rows)
    with FaultServer(lambda n, _body: 503 if n % 3 == 0 else 200) as api:
        job = write_job(tmp_path, api.url, input=source)
        ran = cli("run", str(job), "--no-progress")
    assert ran.returncode in (0, 1), ran.stderr
    report = tmp_path / "runs" / "test" / REPORT_HTML
    url = report.as_uri()

    requested: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(offline=True, viewport={"width": 1200, "height": 900})

            def refuse(route: Any) -> None:
                requested.append(route.request.url)
                if route.request.url == url:
                    route.continue_()
                else:
                    route.abort()

            context.route("**/*", refuse)
            page = context.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url)
            expect(page.locator('figure[data-chart="rate"] .chart-text')).to_contain_text("retried")
            assert_every_chart_drawn(page)
            page.screenshot(path=tmp_path / "report.png", full_page=True)
        finally:
            browser.close()
    assert set(requested) == {url}, requested
