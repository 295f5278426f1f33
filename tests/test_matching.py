"""The delivery-report matcher and the window plan: pure functions, tested on tables."""

from __future__ import annotations

import pandas as pd
import pytest

from campaign.matching import (
    MATCH_S,
    SETTLED_S,
    SKEW_S,
    WINDOW_S,
    covered,
    match,
    not_found,
    request_span,
    to_read,
    windows,
)
from campaign.reporting import parse_entry, phone_digits

A, B = 14155550101, 14155550102
T = 1_700_000_000.0


def people(*rows: tuple[int, int, float]) -> pd.DataFrame:
    """(id, phone, last request); the first request is the same one unless set."""
    frame = pd.DataFrame(rows, columns=["id", "phone", "at"])
    frame["first"] = frame["at"]
    return frame


def entries(*rows: tuple[int, int, float, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["entry", "phone", "created_at", "status"])
    frame["error"] = None
    return frame


def pairs(found: pd.DataFrame) -> dict[int, int]:
    return dict(zip(found["id"], found["entry"], strict=True))


CASES = [
    # (name, people, entries, expected person -> entry)
    ("seconds after the request", [(1, A, T)], [(10, A, T + 3, "sent")], {1: 10}),
    ("another number is not theirs", [(1, A, T)], [(10, B, T + 3, "sent")], {}),
    (
        "nearest after, not the later one",
        [(1, A, T)],
        [(10, A, T + 5, "x"), (11, A, T + 60, "x")],
        {1: 10},
    ),
    (
        "an older entry (another campaign) is not theirs",
        [(1, A, T)],
        [(10, A, T - 600, "x"), (11, A, T + 4, "x")],
        {1: 11},
    ),
    ("within the skew before, when none after", [(1, A, T)], [(10, A, T - 60, "x")], {1: 10}),
    (
        "one after beats one within the skew",
        [(1, A, T)],
        [(10, A, T - 30, "x"), (11, A, T + 100, "x")],
        {1: 11},
    ),
    ("beyond the skew", [(1, A, T)], [(10, A, T - SKEW_S - 1, "x")], {}),
    ("beyond 15 minutes", [(1, A, T)], [(10, A, T + MATCH_S + 1, "x")], {}),
    ("exactly 15 minutes", [(1, A, T)], [(10, A, T + MATCH_S, "x")], {1: 10}),
    (
        "two people, one number, two entries: one each",
        [(1, A, T), (2, A, T + 1)],
        [(10, A, T + 2, "x"), (11, A, T + 3, "x")],
        {2: 10, 1: 11},
    ),
    (
        "two people, one number, one entry: the nearest claim wins",
        [(1, A, T), (2, A, T + 1)],
        [(10, A, T + 2, "x")],
        {2: 10},
    ),
    ("no entries", [(1, A, T)], [], {}),
]


@pytest.mark.parametrize(("name", "who", "what", "expected"), CASES, ids=[c[0] for c in CASES])
def test_match(name: str, who: list, what: list, expected: dict[int, int]) -> None:
    found = match(people(*who), entries(*what))
    assert pairs(found) == expected
    assert found["entry"].is_unique


def test_match_carries_status_and_error() -> None:
    what = entries((10, A, T + 3, "undelivered"))
    what["error"] = ["unsubscribed recipient"]
    found = match(people((1, A, T)), what)
    assert found.iloc[0][["status", "error"]].tolist() == ["undelivered", "unsubscribed recipient"]


def test_not_found_needs_settling_and_a_span_read_whole() -> None:
    who = people((1, A, T), (2, B, T), (3, A, T + 3600))
    read = [(T - SKEW_S, T + 4000, True, T + 5000)]
    # Person 1 matched; 2 settled and covered; 3's match window runs past what was read.
    found = not_found(who, pd.Series([1]), read, settle_s=60, now=T + 6000)
    assert found.tolist() == [2]
    assert not_found(who, pd.Series([1]), read, settle_s=3 * 3600, now=T + 6000).tolist() == []
    unread = [(T - SKEW_S, T + 4000, False, None)]
    assert not_found(who, pd.Series([1]), unread, settle_s=60, now=T + 6000).tolist() == []


def test_not_found_never_for_requests_spread_wider_than_the_skew() -> None:
    """A request cut after it arrived, then a retry refused (503) three minutes later: the
    entry of the first lies before the window of the last. The report cannot tell, so
    the person is not `not_found` (a resend would be their second SMS); within the skew
    it can."""
    who = people((1, A, T), (2, B, T))
    who.loc[who["id"] == 1, "first"] = T - 180
    who.loc[who["id"] == 2, "first"] = T - SKEW_S
    read = [(T - 600, T + 4000, True, T + 5000)]
    found = not_found(who, pd.Series([], dtype="int64"), read, settle_s=60, now=T + 6000)
    assert found.tolist() == [2]


def test_not_found_counts_only_up_to_now() -> None:
    # Read up to now, settled: no need to wait the 15 minutes an entry may take.
    who = people((1, A, T))
    read = [(T - SKEW_S, T + 10, True, T + 10)]
    assert not_found(who, pd.Series([], dtype="int64"), read, 5, now=T + 10).tolist() == [1]


def test_span_and_windows() -> None:
    assert request_span(T, T + 100, 30 * 60, now=T + 10**6) == (T - SKEW_S, T + 100 + 1800)
    assert request_span(T, T, 0, now=T + 10**6) == (T - SKEW_S, T + MATCH_S)
    assert request_span(T, T, 0, now=T + 5) == (T - SKEW_S, T + 5)
    assert request_span(T, T, 0, now=T - 500) is None
    span = (T, T + 2.5 * WINDOW_S)
    assert windows(span) == [
        (T, T + WINDOW_S),
        (T + WINDOW_S, T + 2 * WINDOW_S),
        (T + 2 * WINDOW_S, T + 2.5 * WINDOW_S),
    ]


def test_only_windows_read_whole_after_they_settled_are_not_read_again() -> None:
    planned = [(T, T + WINDOW_S), (T + WINDOW_S, T + 2 * WINDOW_S), (T + 2 * WINDOW_S, T + 3e5)]
    read = [
        (T, T + WINDOW_S, True, T + WINDOW_S + SETTLED_S + 1),  # final
        (T + WINDOW_S, T + 2 * WINDOW_S, True, T + 2 * WINDOW_S + 10),  # read young
        (T + 2 * WINDOW_S, T + 2e5, True, T + 9e9),  # read, but it is longer now
    ]
    assert to_read(planned, read) == planned[1:]
    partly = [(T, T + WINDOW_S, False, None)]
    assert to_read(planned, partly) == planned


def test_covered_merges_touching_windows() -> None:
    read = [(0.0, 10.0, True, 1.0), (10.0, 20.0, True, 1.0), (20.0, 30.0, False, None)]
    assert covered(read) == [(0.0, 20.0)]


@pytest.mark.parametrize(
    ("text", "digits"),
    [
        ("+1(415) 555-0101", 14155550101),
        ("+14155550101", 14155550101),
        ("+44 (0)20 7946 0958", 442079460958),
        ("(415) 555-0101", 14155550101),
        ("+1 415 555 0101", 14155550101),
        ("not a phone", None),
        ("", None),
        (None, None),
        (14155550101, None),
        ("+12", None),
    ],
)
def test_phone_digits(text: object, digits: int | None) -> None:
    assert phone_digits(text, "US") == digits


@pytest.mark.parametrize(
    ("raw", "usable"),
    [
        (
            {"uuid": "u", "to_phone": "+1(415) 555-0101", "created_at": T, "sms_status": "sent"},
            True,
        ),
        (
            {
                "uuid": "u",
                "to_phone": "+1(415) 555-0101",
                "created_at": str(T),
                "sms_status": "sent",
            },
            True,
        ),
        ({"uuid": "u", "created_at": T, "sms_status": "sent"}, False),
        ({"uuid": "u", "to_phone": "+1(415) 555-0101", "sms_status": "sent"}, False),
        (
            {
                "uuid": "u",
                "to_phone": "+1(415) 555-0101",
                "created_at": "yesterday",
                "sms_status": "sent",
            },
            False,
        ),
        (
            {"uuid": "u", "to_phone": "+1(415) 555-0101", "created_at": True, "sms_status": "sent"},
            False,
        ),
        ({"uuid": "u", "to_phone": "+1(415) 555-0101", "created_at": T}, False),
        ("not an object", False),
    ],
)
def test_entries_without_a_number_time_or_status_are_skipped(raw: object, usable: bool) -> None:
    assert (parse_entry(raw, "US") is not None) == usable
