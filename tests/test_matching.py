"""The delivery-report matcher and the window plan: pure functions, tested on tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from campaign.matching import (
    AMBIGUOUS,
    ARRIVED,
    ENTRY_COLUMNS,
    MATCH_S,
    MAYBE,
    NOT_ARRIVED,
    NOT_FOUND,
    REQUEST_COLUMNS,
    SETTLED_S,
    SKEW_S,
    WINDOW_S,
    Scope,
    by_person,
    covered,
    judge,
    reach_of,
    request_span,
    to_read,
    windows,
)
from campaign.reporting import parse_entry, phone_digits
from tests.helpers import soak_trials

A, B = 14155550101, 14155550102
T = 1_700_000_000.0
OTHER = -1  # a request of another campaign


def requests(*rows: tuple[int, int, float, int]) -> pd.DataFrame:
    """(person, phone, at, kind)"""
    return pd.DataFrame(rows, columns=REQUEST_COLUMNS)


def entries(*rows: tuple[int, int, float, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["entry", "phone", "created_at", "status"])
    frame["error"] = None
    return frame[ENTRY_COLUMNS]


def scope(settle_s: float = 60, now: float = T + 6000, read: list[Any] | None = None) -> Scope:
    whole = [(T - 3600, now, True, now)] if read is None else read
    return Scope(whole, settle_s, now, reach_of(T, T + 60))


def verdicts(who: pd.DataFrame, what: pd.DataFrame, where: Scope | None = None) -> dict:
    """person -> entry id, "not_found" or ("ambiguous", reason)"""
    found = by_person(judge(who, what, where or scope()), who.groupby("person")["at"].max())
    said: dict[int, Any] = {
        int(p): int(e) for p, e in zip(found.matched["person"], found.matched["entry"], strict=True)
    }
    said.update({int(p): NOT_FOUND for p in found.not_found["person"]})
    said.update(
        {
            int(p): (AMBIGUOUS, r)
            for p, r in zip(found.ambiguous["person"], found.ambiguous["reason"], strict=True)
        }
    )
    return said


def known(*rows: tuple[int, int, float]) -> pd.DataFrame:
    return requests(*[(p, phone, at, ARRIVED) for p, phone, at in rows])


CASES = [
    # (name, people whose requests were answered 200, entries, expected person -> entry)
    ("seconds after the request", [(1, A, T)], [(10, A, T + 3, "sent")], {1: 10}),
    ("another number is not theirs", [(1, A, T)], [(10, B, T + 3, "sent")], {1: NOT_FOUND}),
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
    ("beyond the skew", [(1, A, T)], [(10, A, T - SKEW_S - 1, "x")], {1: NOT_FOUND}),
    ("beyond 15 minutes", [(1, A, T)], [(10, A, T + MATCH_S + 1, "x")], {1: NOT_FOUND}),
    ("exactly 15 minutes", [(1, A, T)], [(10, A, T + MATCH_S, "x")], {1: 10}),
    (
        "two people, one number, two entries: one each",
        [(1, A, T), (2, A, T + 1)],
        [(10, A, T + 2, "x"), (11, A, T + 3, "x")],
        {1: 10, 2: 11},
    ),
    (
        "two people, one number, one entry: one has it",
        [(1, A, T), (2, A, T + 1)],
        [(10, A, T + 2, "x")],
        {1: 10, 2: NOT_FOUND},
    ),
    (
        "entries of one clock behind: each request its own",
        [(1, A, T), (2, A, T + 5)],
        [(10, A, T - 119, "x"), (11, A, T + 3, "x")],
        {1: 10, 2: 11},
    ),
    ("no entries", [(1, A, T)], [], {1: NOT_FOUND}),
]


@pytest.mark.parametrize(("name", "who", "what", "expected"), CASES, ids=[c[0] for c in CASES])
def test_requests_known_to_have_arrived_get_their_entries(
    name: str, who: list, what: list, expected: dict[int, Any]
) -> None:
    assert verdicts(known(*who), entries(*what)) == expected


def test_a_match_carries_status_and_error() -> None:
    what = entries((10, A, T + 3, "undelivered"))
    what["error"] = ["unsubscribed recipient"]
    found = by_person(judge(known((1, A, T)), what, scope()), pd.Series({1: T}))
    assert found.matched.iloc[0][["status", "error"]].tolist() == [
        "undelivered",
        "unsubscribed recipient",
    ]


UNKNOWN_CASES = [
    # (name, requests, entries, expected person -> verdict)
    (
        "case 3: another campaign's entry is not theirs",
        [(1, A, T, MAYBE), (OTHER, A, T + 20, ARRIVED)],
        [(10, A, T + 21, "delivered")],
        {1: NOT_FOUND},
    ),
    (
        "case 4: a shared number, the lost request first",
        [(1, A, T, MAYBE), (2, A, T, ARRIVED)],
        [(10, A, T + 1, "delivered")],
        {1: NOT_FOUND, 2: 10},
    ),
    (
        "case 4: a shared number, the lost request second",
        [(1, A, T, ARRIVED), (2, A, T, MAYBE)],
        [(10, A, T + 1, "delivered")],
        {1: 10, 2: NOT_FOUND},
    ),
    (
        "entries enough for every maybe request: all confirmed",
        [(1, A, T, MAYBE), (2, A, T, ARRIVED), (3, A, T, MAYBE)],
        [(10, A, T + 1, "x"), (11, A, T + 1, "x"), (12, A, T + 2, "x")],
        {1: 11, 2: 10, 3: 12},
    ),
    (
        "one entry short: nobody confirmed, nobody not_found",
        [(1, A, T, MAYBE), (2, A, T, ARRIVED), (3, A, T, MAYBE)],
        [(10, A, T + 1, "x"), (11, A, T + 1, "x")],
        {
            1: (AMBIGUOUS, "2 entries for 3 requests to this number"),
            2: 10,
            3: (AMBIGUOUS, "2 entries for 3 requests to this number"),
        },
    ),
    (
        "two requests of one person, one entry: that person was reached",
        [(1, A, T, MAYBE), (1, A, T + 30, MAYBE)],
        [(10, A, T + 31, "x")],
        {1: 10},
    ),
    (
        "a refused request owns no entry",
        [(1, A, T, NOT_ARRIVED), (2, A, T, MAYBE)],
        [(10, A, T + 1, "x")],
        {2: 10},
    ),
    (
        "a request cut after it arrived, then a retry refused 3 minutes later",
        [(1, A, T - 180, MAYBE), (1, A, T, NOT_ARRIVED)],
        [(10, A, T - 179, "x")],
        {1: 10},
    ),
    (
        "another campaign's maybe request competes",
        [(1, A, T, MAYBE), (OTHER, A, T + 60, MAYBE)],
        [(10, A, T + 61, "x")],
        {1: (AMBIGUOUS, "1 entry for 2 requests to this number")},
    ),
]


@pytest.mark.parametrize(
    ("name", "who", "what", "expected"), UNKNOWN_CASES, ids=[c[0] for c in UNKNOWN_CASES]
)
def test_unknown_requests_are_confirmed_only_when_the_entries_leave_no_doubt(
    name: str, who: list, what: list, expected: dict[int, Any]
) -> None:
    assert verdicts(requests(*who), entries(*what)) == expected


def test_forty_people_on_one_number_half_the_answers_lost_all_confirmed() -> None:
    who = requests(*[(p, A, T + p / 10, MAYBE if p % 2 else ARRIVED) for p in range(40)])
    what = entries(*[(100 + p, A, T + 1 + p / 10, "delivered") for p in range(40)])
    said = verdicts(who, what)
    assert sorted(said) == list(range(40))
    assert sorted(said.values()) == list(range(100, 140))  # one entry each, none twice


def test_not_found_needs_settling_and_a_span_read_whole() -> None:
    who = requests((1, A, T, MAYBE), (2, B, T, MAYBE))
    read = [(T - SKEW_S, T + 4000, True, T + 5000)]
    assert verdicts(who, entries(), scope(read=read)) == {1: NOT_FOUND, 2: NOT_FOUND}
    early = verdicts(who, entries(), scope(settle_s=3 * 3600, read=read))
    assert early[1][0] == AMBIGUOUS and "settle_minutes have not passed" in early[1][1]
    unread = verdicts(who, entries(), scope(read=[(T - SKEW_S, T + 4000, False, None)]))
    assert unread[1][0] == AMBIGUOUS and "not read whole" in unread[1][1]


def test_not_found_counts_only_up_to_now() -> None:
    # Read up to now, settled: no need to wait the 15 minutes an entry may take.
    read = [(T - SKEW_S, T + 10, True, T + 10)]
    where = scope(settle_s=5, now=T + 10, read=read)
    assert verdicts(requests((1, A, T, MAYBE)), entries(), where) == {1: NOT_FOUND}


def test_requests_going_on_past_those_loaded_decide_nothing() -> None:
    """Requests to the number every 10 minutes from well before the hour loaded: the
    group may own entries of requests not looked at."""
    chain = [(OTHER, A, T - 3600 + 600 * i, ARRIVED) for i in range(7)]
    who = requests(*chain, (1, A, T, MAYBE))
    what = entries(*[(10 + i, A, at + 1, "x") for i, (_, _, at, _) in enumerate(chain)])
    said = verdicts(who, what)
    assert said[1][0] == AMBIGUOUS and "beyond the time looked at" in said[1][1]


OURS, THEIRS = "+18005550100", "+18005550199"  # reporting.from_phone, another sender


@dataclass
class World:
    """What really happened: every request of the store (person -1: another campaign's),
    whether it truly arrived, its kind as its answer says, and every report entry with
    the sender's number."""

    requests: pd.DataFrame  # person, phone, at, kind, arrived
    entries: pd.DataFrame  # ENTRY_COLUMNS + from_phone


@st.composite
def worlds(draw: st.DrawFn) -> World:
    numbers = draw(st.lists(st.sampled_from([A, B, A + 7]), min_size=1, max_size=3, unique=True))
    phone_of = draw(st.lists(st.sampled_from(numbers), min_size=1, max_size=6))
    rows, entries = [], []
    for _ in range(draw(st.integers(1, 14))):
        person = draw(st.integers(-1, len(phone_of) - 1))
        phone = draw(st.sampled_from(numbers)) if person < 0 else phone_of[person]
        at = T + draw(st.integers(0, 2400))
        arrived = draw(st.booleans())
        if arrived:  # answered 200, or its answer lost (timeout, dropped, 504 after it)
            kind = draw(st.sampled_from([ARRIVED, MAYBE]))
            # Created up to 15 min after the request, or up to 2 min before (clocks).
            entries.append((phone, at + draw(st.integers(-int(SKEW_S), int(MATCH_S))), OURS))
        else:  # refused (connect, 408/429/503, 4xx), or a 504 that forwarded nothing
            kind = draw(st.sampled_from([NOT_ARRIVED, MAYBE]))
        rows.append((person, phone, at, kind, arrived))
    for _ in range(draw(st.integers(0, 4))):  # another sender's texts to the same numbers
        entries.append((draw(st.sampled_from(numbers)), T + draw(st.integers(0, 3300)), THEIRS))
    found = pd.DataFrame(rows, columns=[*REQUEST_COLUMNS, "arrived"])
    report = pd.DataFrame(
        [
            (i, phone, at, "delivered", None, sender)
            for i, (phone, at, sender) in enumerate(entries)
        ],
        columns=[*ENTRY_COLUMNS, "from_phone"],
    )
    return World(found, report)


# 100 worlds under `make test`; `make soak` tries CAMPAIGN_SOAK_TRIALS times as many.
@pytest.mark.soak
@settings(max_examples=100 * soak_trials(), deadline=None, database=None)
@given(worlds())
def test_no_confirmation_without_an_arrival_and_no_not_found_with_one(world: World) -> None:
    """With the entries of `reporting.from_phone` only (the stated assumption: nobody
    else texts these numbers through it), complete and settled: nobody is confirmed whose
    request did not truly arrive, nobody is not_found whose request did, and every
    request answered 200 gets an entry."""
    ours = world.entries[world.entries["from_phone"] == OURS][ENTRY_COLUMNS]
    who = world.requests[REQUEST_COLUMNS]
    now = T + 2400 + MATCH_S + 60
    where = Scope([(T - 3600, now, True, now)], 60, now, reach_of(T, T + 2400))
    judged = judge(who, ours, where)
    said = by_person(judged, who.groupby("person")["at"].max())
    truly = world.requests.groupby("person")["arrived"].any()
    answered = world.requests[world.requests["kind"] == ARRIVED].groupby("person").size()
    confirmed = said.matched.loc[~said.matched["person"].isin(answered.index), "person"]
    assert truly.reindex(confirmed).all(), "confirmed, but none of their requests arrived"
    assert not truly.reindex(said.not_found["person"]).any(), "not_found, but one arrived"
    known = judged[judged["kind"] == ARRIVED]
    assert (known["verdict"] == "matched").all(), "a request answered 200 got no entry"
    assert said.matched["entry"].is_unique
    assert judged["entry"].dropna().is_unique


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
