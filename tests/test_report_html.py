"""report.html: written with every report, holds no phone number or param value, stays
small for a million people; the story behind it is bounded and the same for the page."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from campaign.report_html import REPORT_HTML, render
from campaign.story import MAX_POINTS, bucket_width, campaign_story, clean_reason
from tests.helpers import (
    FaultServer,
    cli,
    e164,
    phones,
    soak_trials,
    write_csv,
    write_job,
)
from tests.helpers.big import big_ledger
from tests.helpers.web import TOKEN, in_process
from tests.helpers.windows import HNL_PHONES, NY_PHONES, new_york_hours

MAX_BYTES = 1_000_000
# An answer that quotes the person back: their number and their first and last name.
REFUSED = "number {to_phone} of {first_name} {last_name} ({emp_id}) is not allowed"


def people(path: Path, n: int) -> tuple[Path, list[list[str]]]:
    rows = [
        [f"Zorvath{i:02d}", f"Quillby{i:02d}", phone, f"EMP-{7300 + i}"]
        for i, phone in enumerate(phones(n, start=4321))
    ]
    return write_csv(path, ["First Name", "Last Name", "Phone", "Employee ID"], rows), rows


def refuse_every_other(_n: int, body: dict[str, Any]) -> Any:
    """Every other person is refused with an answer that quotes them."""
    if int(body["to_phone"][-1]) % 2 == 0:
        return (400, None, {"error": REFUSED.format(**body)})
    return 200


def story_of(page: str) -> dict[str, Any]:
    found = re.search(r'<script type="application/json" id="story">(.*?)</script>', page, re.S)
    assert found is not None, "report.html carries no story"
    story: dict[str, Any] = json.loads(found.group(1))
    return story


def test_every_report_writes_report_html_without_numbers_or_params(
    tmp_path: Path, store: str | None
) -> None:
    source, rows = people(tmp_path / "people.csv", 20)
    with FaultServer(refuse_every_other) as api:
        job = write_job(
            tmp_path,
            api.url,
            input=source,
            mapping={
                "params": {
                    "first_name": "First Name",
                    "last_name": "Last Name",
                    "emp_id": "Employee ID",
                }
            },
            **({"ledger": store} if store else {}),
        )
        ran = cli("run", str(job), "--no-progress")
    assert ran.returncode == 1, ran.stderr
    report = tmp_path / "runs" / "test" / REPORT_HTML
    page = report.read_text(encoding="utf-8")

    for first, last, typed, emp_id in rows:
        number = e164(typed)
        for form in (number, number[1:], number[2:], typed, first, last, emp_id):
            assert form not in page, f"report.html holds {form!r}"
    story = story_of(page)
    assert story["statuses"]["sent"] == 10 and story["statuses"]["failed"] == 10
    # The ten refusals differ only in what they quote: once that is blanked, one reason.
    assert story["reasons"][0]["count"] == 10
    assert "[number]" in story["reasons"][0]["reason"]
    assert story["reasons"][0]["reason"].count("[value]") == 3
    assert sum(story["rate"]["series"]["sent"]) * story["rate"]["step"] == pytest.approx(10)

    # `campaign report` writes it again from the ledger alone.
    report.unlink()
    rebuilt = cli("report", str(job))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert story_of(report.read_text(encoding="utf-8"))["statuses"] == story["statuses"]


def bounded_report(tmp_path: Path, people: int) -> int:
    """The story and report.html of a big ledger of `people` (tests/helpers/big.py), each
    checked against its bounds: the page's size in bytes."""
    ledger = big_ledger(tmp_path, f"big{people}", people)
    began = time.monotonic()
    story = campaign_story(ledger, f"big{people}")
    took = time.monotonic() - began
    page = render(story, {})

    size = len(page.encode())
    assert size <= MAX_BYTES
    series = story["rate"]["series"]
    assert all(len(points) <= MAX_POINTS for points in series.values())
    assert len(story["progress"]["settled"]) <= MAX_POINTS
    # Every request is in some bucket, whatever the bucket's width: each person past the
    # first 5,000 (who wait) once, every 10th of them twice.
    requests = sum(sum(points) for points in series.values()) * story["rate"]["step"]
    assert requests == pytest.approx(people - 5000 + people // 10 - 500)
    # A refusal quoting each 50th person: one reason once they are blanked.
    assert story["reasons"][0] == {
        "kind": "send",
        "reason": 'HTTP 400: Bad Request {"error": "[number] ([value]) refused"}',
        "count": people // 50 - 100,
    }
    shown = json.dumps(story)
    assert "+1415" not in shown and "(P1" not in shown
    assert story["waiting"] == [
        {"opens": f"{hour:02d}:00 America/New_York", "people": 1000} for hour in range(8, 13)
    ]
    assert took < 60, f"the story of {people:,} people took {took:.1f} s"
    return size


@pytest.mark.soak
def test_a_report_stays_under_one_megabyte_however_many_people(tmp_path: Path) -> None:
    """The page's size is bound by the story's points and reasons, not by its people: well
    under a megabyte, and ten times the people add little. `make soak` adds a million."""
    sizes = [bounded_report(tmp_path, 10_000), bounded_report(tmp_path, 100_000)]
    assert sizes[1] < 1.25 * sizes[0], sizes
    if soak_trials() > 1:
        assert bounded_report(tmp_path, 1_000_000) < 1.25 * sizes[0], sizes


@pytest.mark.parametrize("span_s", [0.5, 1, 1999, 2000, 3600, 86_400, 30 * 86_400, 400 * 86_400])
def test_time_buckets_stay_under_the_bound(span_s: float) -> None:
    step = bucket_width(span_s)
    assert span_s / step < MAX_POINTS
    # ...and are no coarser than they need be.
    assert step == 1 or span_s / step > MAX_POINTS / 3


def test_reasons_lose_numbers_and_the_values_they_quote() -> None:
    text = "HTTP 400: +1 (415) 200-4321 rejected: Zorvath01 Quillby01 emp 7300, code AB"
    cleaned = clean_reason(text, ["Zorvath01", "Quillby01", "7300", "AB", "x"])
    assert cleaned == "HTTP 400: [number] rejected: [value] [value] emp [value], code [value]"
    channel = "11111111-2222-4333-8444-555555555555"
    assert clean_reason(f"HTTP 404: no channel {channel}", []) == "HTTP 404: no channel [id]"
    # A short value is blanked only as a word of its own.
    assert clean_reason("ABBA said AB", ["AB"]) == "ABBA said [value]"


def test_people_waiting_for_their_window_are_counted_per_opening(tmp_path: Path) -> None:
    rows = [[f"W{i}", phone] for i, phone in enumerate(NY_PHONES + HNL_PHONES)]
    source = write_csv(tmp_path / "people.csv", ["First Name", "Phone"], rows)
    with FaultServer(lambda _n, _body: 200) as api:
        job = write_job(tmp_path, api.url, input=source, limits=new_york_hours())
        ran = cli("run", str(job), "--no-progress")
    assert sorted(body["to_phone"] for body in api.bodies()) == sorted(map(e164, NY_PHONES))
    assert ran.returncode == 1, ran.stderr
    story = story_of((tmp_path / "runs" / "test" / REPORT_HTML).read_text(encoding="utf-8"))

    assert story["statuses"]["sent"] == len(NY_PHONES)
    [opening] = story["waiting"]
    assert opening["people"] == len(HNL_PHONES)
    assert opening["opens"].endswith(" Pacific/Honolulu")
    assert story["text"]["waiting"].startswith(f"{len(HNL_PHONES)} people wait for their window")


async def test_the_story_route_needs_the_token_and_a_campaign(tmp_path: Path) -> None:
    job = write_job(tmp_path, "http://127.0.0.1:9")
    async with in_process(job) as (url, _app), aiohttp.ClientSession(url) as http:
        async with http.get("/api/campaigns/web-x/story") as anonymous:
            assert anonymous.status == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with http.get("/api/campaigns/web-x/story", headers=headers) as missing:
            assert missing.status == 404
            assert "no campaign" in (await missing.json())["error"]
