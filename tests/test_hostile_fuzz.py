"""Every reader of outside data under hypothesis: hostile values (unicode digits, huge and
negative numbers, wrong types, deep nesting) give a value or the reader's own clear error,
never another exception, never a secret in a message.

Fast by default; CAMPAIGN_SOAK_TRIALS=N runs N times as many examples."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from campaign.bounds import (
    MAX_JSON_DEPTH,
    MAX_REPORT_PAGES,
    MAX_STATUS_DETAIL_CHARS,
    JsonRefused,
    load_json,
)
from campaign.errors import PageUnreadable, UsageError
from campaign.job import load_job
from campaign.policy import parse_retry_after
from campaign.reporting import STATUSES, parse_page
from campaign.store.postgres import _reason, safe_url
from tests.helpers import Served, raw_http, serve, soak_trials, write_job

FUZZ = settings(
    max_examples=50 * soak_trials(),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.sampled_from([0, 1, 10**7, 10**9, 2**63, -1]),
)
texts = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(categories=["Nd", "No"]), min_size=1, max_size=6),  # ², ٣, ...
    st.sampled_from(["²", "١٢", "1e3", "-5", " 7 ", "Wed, 21 Oct 2015 07:28:00 GMT", "inf"]),
)
scalars = st.one_of(st.none(), numbers, texts)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


json_values = st.recursive(
    scalars.filter(lambda v: not (isinstance(v, float) and not math.isfinite(v))),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@pytest.mark.soak
@FUZZ
@given(st.one_of(texts, st.text(), st.none()))
def test_retry_after_is_a_finite_wait_or_none(value: str | None) -> None:
    seconds = parse_retry_after(value, now=1_700_000_000.0)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0)
    if value is not None and not value.strip().isascii():
        assert seconds is None


@pytest.mark.soak
@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(json.dumps), st.integers(0, 5000)))
def test_json_is_a_value_or_refused(raw: bytes | str | int) -> None:
    if isinstance(raw, int):
        raw = nested(raw)
    try:
        load_json(raw, 1024 * 1024)
    except JsonRefused as exc:
        assert str(exc)


entry = st.fixed_dictionaries(
    {},
    optional={
        "uuid": scalars,
        "to_phone": st.one_of(scalars, st.sampled_from(["+1(415) 555-0101", "4155550101"])),
        "created_at": st.one_of(scalars, st.sampled_from(["2026-01-01T00:00:00Z", 1.7e9])),
        "sms_status": st.one_of(scalars, st.sampled_from([*STATUSES, "not_found", "SENT"])),
        "sms_status_response": st.one_of(scalars, st.just("x" * 5000)),
    },
)
page_bodies = st.fixed_dictionaries(
    {},
    optional={
        "total_pages": st.one_of(numbers, texts),
        "total_entries": st.one_of(numbers, texts),
        "per_page": st.one_of(numbers, texts),
        "entries": st.one_of(st.lists(st.one_of(entry, scalars), max_size=6), scalars),
    },
)


@pytest.mark.soak
@FUZZ
@given(st.one_of(page_bodies, json_values), st.integers(0, 200))
def test_a_report_page_is_a_page_or_unreadable(body: Any, nesting: int) -> None:
    raw = json.dumps(body).encode() if nesting < 100 else nested(nesting * 10).encode()
    try:
        page = parse_page(raw, 1, "US")
    except PageUnreadable as exc:
        assert "\n" not in str(exc)
        return
    assert 0 <= page.last_page <= MAX_REPORT_PAGES
    assert page.last_page <= page.total_pages
    assert page.bad + len(page.entries) == page.received
    for _, phone, created, status, error in page.entries:
        assert status in STATUSES and math.isfinite(created) and phone > 0
        assert error is None or len(error) <= MAX_STATUS_DETAIL_CHARS


password_chars = st.sampled_from([*"abcXYZ019#?/@%:&=;'\" ", "%41", "%2F", "é"])
passwords = st.lists(password_chars, min_size=5, max_size=16).map("".join)


@pytest.mark.soak
@FUZZ
@given(passwords, st.sampled_from(["", "?sslmode=require", "?application_name=a@b"]))
def test_a_url_password_never_reaches_a_message(password: str, query: str) -> None:
    url = f"postgresql://bob:{password}@127.0.0.1:5432/db{query}"
    shown = safe_url(url)
    base = f"postgresql://bob@127.0.0.1:5432/db{query}"
    if password not in base:
        assert password not in shown
    message = _reason(url, Exception(f'could not parse "{url}" near "{password[1:]}"'))
    if password[1:] not in base:
        assert password not in message and password[1:] not in message


@pytest.mark.soak
@FUZZ
@given(st.one_of(json_values, st.text(max_size=200)))
def test_a_job_file_is_a_job_or_one_job_error(tmp_path: Path, content: Any) -> None:
    path = tmp_path / "fuzz.yaml"
    if isinstance(content, str):
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    else:
        base = {"api": {"channel_uuid": "c"}, "mapping": {"to_phone": "Phone"}}
        section = ["api", "mapping", "limits", "reporting", "campaign"][len(str(content)) % 5]
        path.write_text(yaml.safe_dump({**base, section: content}), encoding="utf-8")
    try:
        load_job(path)
    except UsageError as exc:
        assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    directory = tmp_path_factory.mktemp("fuzz-serve")
    served = serve(directory, write_job(directory, "http://127.0.0.1:9"), "t" * 32)
    yield served
    served.stop()


@pytest.mark.soak
@FUZZ
@given(
    st.sampled_from(
        [
            "PUT /api/campaigns/none/mapping",
            "POST /api/suppression",
            "DELETE /api/suppression",
            "POST /api/session",
        ]
    ),
    st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.integers(30, 3000).map(lambda n: nested(n).encode()),
        st.just(b'{"token": "\\ud800", "phones": ["\\udfff"]}'),
    ),
)
def test_a_json_body_gets_an_answer_below_500(page_server: Served, route: str, body: bytes) -> None:
    method, path = route.split()
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {'t' * 32}\r\n"
    ).encode()
    assert raw_http(page_server.url, head, body) < 500
    log = page_server.log.read_text()
    assert "Traceback" not in log, log[-3000:]


def test_the_depth_limit_is_exact() -> None:
    assert load_json(nested(MAX_JSON_DEPTH), 1024) is not None
    with pytest.raises(JsonRefused):
        load_json(nested(MAX_JSON_DEPTH + 1), 1024)
