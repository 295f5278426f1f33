"""Delivery reports carry a number and a time, not a campaign or a person: `campaign
reconcile` with the real CLI, the real sandbox, and a gateway in front of it that makes
chosen requests never arrive (504, nothing forwarded) or lose their answer (forwarded,
then 504). Counted at the sandbox's record: every person reached exactly once, nobody
`sent` whose SMS never left, and what the report cannot tell stays `unknown`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from campaign.sandbox_reporting import CREATED_WITHIN_S
from tests.helpers import (
    BLOCK,
    LOSE,
    PASS,
    Gateway,
    cli,
    first_time,
    reached,
    reconcile_until,
    soak_trials,
    start_sandbox,
    write_csv,
    write_job,
)
from tests.helpers.reports import wait_until

X, Y = "+14155550177", "+14155550178"
# Trials of the runs whose requests leave together (one group commit, answers in any order).
TRIALS = soak_trials()
SETTLED = {"delivered", "undelivered", "failed", "not_found"}


# Settled a little after the sandbox's latest entry time (CREATED_WITHIN_S after the
# request): sooner, a reconcile could call a person not_found whose entry is still due.
SETTLE_S = CREATED_WITHIN_S + 0.5


def reporting(box_url: str) -> dict[str, Any]:
    settle = SETTLE_S / 60
    return {
        "agent_id": "1",
        "access_token": "sandbox-token",
        "base_url": box_url,
        "settle_minutes": settle,
    }


def job(
    tmp_path: Path,
    name: str,
    api_url: str,
    box_url: str,
    names: list[str],
    store: str | None,
    *numbers: str,
) -> Path:
    """A job `name` (its campaign too) sending once per first name, keyed by both: the
    i-th name to the i-th of `numbers` (to X when none is given)."""
    rows = [[first, numbers[i] if numbers else X] for i, first in enumerate(names)]
    return write_job(
        tmp_path,
        api_url,
        name=name,
        campaign=name,
        input=write_csv(tmp_path / f"{name}.csv", ["First Name", "Phone"], rows),
        mapping={"recipient_key": ["to_phone", "first_name"]},
        reporting=reporting(box_url),
        ledger=store,
    )


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["First Name"]: row for row in rows}


def settled(rows: list[dict[str, str]]) -> bool:
    return all(row["_delivery"] in SETTLED for row in rows)


def test_another_campaigns_entry_never_confirms_a_request_that_never_arrived(
    tmp_path: Path, store: str | None
) -> None:
    """Campaign a's requests never arrive (504, nothing forwarded): Ann's to X, Cat's to Y.
    Campaign b texts X seconds earlier, campaign c texts Y seconds later. Their entries
    are not a's: a's people are not_found, and --resend-unknown sends them a's SMS.
    Before, reconcile of a took b's (or c's) entry for a's: `sent`, never resent, the
    number never got a's message."""
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0")
    before = job(tmp_path, "b", box.url, box.url, ["Bea"], store)
    after = job(tmp_path, "c", box.url, box.url, ["Dan"], store, Y)
    try:
        assert cli("run", str(before), "--no-progress").returncode == 0
        with Gateway(box.url, lambda body: BLOCK) as gateway:
            a = job(tmp_path, "a", gateway.url, box.url, ["Ann", "Cat"], store, X, Y)
            assert cli("run", str(a), "--no-progress").returncode == 1
        assert cli("run", str(after), "--no-progress").returncode == 0
        wait_until(time.time() + SETTLE_S)  # every request settled: one reconcile decides

        rows = by_name(reconcile_until(a, "a", settled))
        for name in ("Ann", "Cat"):
            assert (rows[name]["_status"], rows[name]["_delivery"]) == ("unknown", "not_found")

        a = job(tmp_path, "a", box.url, box.url, ["Ann", "Cat"], store, X, Y)  # no gateway
        assert cli("run", str(a), "--no-progress", "--resend-unknown").returncode == 0
        assert reached(box, "to_phone", "first_name") == {
            (X, "Ann"): 1,
            (X, "Bea"): 1,
            (Y, "Cat"): 1,
            (Y, "Dan"): 1,
        }
    finally:
        box.stop()


@pytest.mark.soak
@pytest.mark.parametrize("trial", range(TRIALS))
def test_two_people_sharing_a_number_one_request_lost_each_reached_once(
    tmp_path: Path, trial: int
) -> None:
    """Ann and Bob share X, Cid and Dee share Y; each pair's requests leave together and
    one of them never arrives: Ann's (the lower id) at X, Dee's (the higher) at Y. The one
    entry is the arrived one's (a request answered 200): the other is not_found and
    resent. Before, the entry went to the lower id: with Ann's request lost, Ann was
    `sent` and never got the SMS, and Bob, not_found, got a second one."""
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0")
    lost, arrived = ("Ann", "Dee"), ("Bob", "Cid")
    try:
        route = first_time(lambda body: body["first_name"] in lost)
        with Gateway(box.url, route) as gateway:
            names = ["Ann", "Bob", "Cid", "Dee"]
            shared = job(tmp_path, "shared", gateway.url, box.url, names, None, X, X, Y, Y)
            assert cli("run", str(shared), "--no-progress").returncode == 1
            wait_until(time.time() + SETTLE_S)  # every request settled: one reconcile decides
            rows = by_name(reconcile_until(shared, "shared", settled))
            for name in lost:
                assert (rows[name]["_status"], rows[name]["_delivery"]) == ("unknown", "not_found")
            for name in arrived:
                assert (rows[name]["_status"], rows[name]["_delivery"]) == ("sent", "delivered")
            again = cli("run", str(shared), "--no-progress", "--resend-unknown")
            assert again.returncode == 0, again.stderr
        assert reached(box, "to_phone", "first_name") == {
            (X, "Ann"): 1,
            (X, "Bob"): 1,
            (Y, "Cid"): 1,
            (Y, "Dee"): 1,
        }
    finally:
        box.stop()


def test_one_entry_for_two_maybe_requests_stays_unknown_and_is_never_resent(
    tmp_path: Path,
) -> None:
    """Ann's request never arrives, Bob's arrives but its answer is lost: one entry, two
    requests that could own it. Nobody is confirmed, nobody is not_found: both stay
    unknown, `ambiguous`, with the reason in plain words; --resend-unknown sends nobody
    (a resend would be Bob's second SMS)."""
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0")
    try:

        def route(body: dict[str, Any]) -> str:
            return {"Ann": BLOCK, "Bob": LOSE}.get(body["first_name"], PASS)

        with Gateway(box.url, route) as gateway:
            shared = job(tmp_path, "shared", gateway.url, box.url, ["Ann", "Bob"], None)
            assert cli("run", str(shared), "--no-progress").returncode == 1
            wait_until(time.time() + SETTLE_S)  # every request settled: one reconcile decides

            def decided(rows: list[dict[str, str]]) -> bool:
                return all(
                    row["_delivery"] and "settle_minutes" not in row["_delivery_error"]
                    for row in rows
                )

            rows = by_name(reconcile_until(shared, "shared", decided))
            for name in ("Ann", "Bob"):
                assert rows[name]["_status"] == "unknown"
                assert rows[name]["_delivery"] == "ambiguous"
                assert rows[name]["_delivery_error"] == "1 entry for 2 requests to this number"
            cli("run", str(shared), "--no-progress", "--resend-unknown")
        assert reached(box, "to_phone", "first_name") == {(X, "Bob"): 1}
        summary = (tmp_path / "runs" / "shared" / "summary.json").read_text()
        assert '"ambiguous": 2' in summary
    finally:
        box.stop()


@pytest.mark.soak
@pytest.mark.parametrize("trial", range(TRIALS))
def test_forty_people_on_one_number_half_the_answers_lost_each_reached_once(
    tmp_path: Path, trial: int
) -> None:
    """40 people share X, every request arrives, every second answer is lost. 40 entries
    for 40 requests: the 20 unknown are confirmed, nobody is resent. Before, matching
    stopped after 20 rounds, the rest were not_found, and a resend texted them twice."""
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0")
    names = [f"P{i:02d}" for i in range(40)]
    try:
        route = first_time(lambda body: int(body["first_name"][1:]) % 2 == 1, LOSE)
        with Gateway(box.url, route) as gateway:
            shared = job(tmp_path, "shared", gateway.url, box.url, names, None)
            assert cli("run", str(shared), "--no-progress").returncode == 1
            wait_until(time.time() + SETTLE_S)  # every request settled: one reconcile decides
            rows = reconcile_until(shared, "shared", settled)
            assert {row["_status"] for row in rows} == {"sent"}
            assert {row["_delivery"] for row in rows} == {"delivered"}
            cli("run", str(shared), "--no-progress", "--resend-unknown")
        assert reached(box, "to_phone", "first_name") == {(X, name): 1 for name in names}
    finally:
        box.stop()


# --- a person whose number was fixed after their request ---------------------------------

A, B, C, D = "+14155550101", "+14155550102", "+14155550103", "+14155550104"


def by_id(tmp_path: Path, api_url: str, box_url: str, people: list[list[str]]) -> Path:
    """A job keyed by an employee id, so a fixed number is the same person."""
    return write_job(
        tmp_path,
        api_url,
        name="fixed",
        campaign="fixed",
        input=write_csv(tmp_path / "fixed.csv", ["Id", "First Name", "Phone"], people),
        mapping={
            "params": {"first_name": "First Name", "emp_id": "Id"},
            "recipient_key": ["emp_id"],
        },
        reporting=reporting(box_url),
    )


def test_a_request_is_judged_by_the_number_it_went_to_not_a_number_fixed_since(
    tmp_path: Path,
) -> None:
    """Pat's request to A never arrived, Pia's to C arrived with its answer lost; Rob's to
    B and Ray's to D arrived with their answers lost; then the input is fixed, swapping
    Pat's and Rob's numbers, and Pia's and Ray's. The entries are judged against the
    numbers the requests went to: Pat is never `sent` by Rob's entry, and Pia is never
    `not_found` (and resent) when her own entry is at C."""
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0")
    first = [["1", "Pat", A], ["2", "Rob", B], ["3", "Pia", C], ["4", "Ray", D]]
    swapped = [["1", "Pat", B], ["2", "Rob", A], ["3", "Pia", D], ["4", "Ray", C]]
    try:
        with Gateway(box.url, lambda body: BLOCK if body["to_phone"] == A else LOSE) as gateway:
            sent = cli("run", str(by_id(tmp_path, gateway.url, box.url, first)), "--no-progress")
            assert sent.returncode == 1, sent.stderr
        fixed = by_id(tmp_path, box.url, box.url, swapped)
        assert cli("run", str(fixed), "--no-progress").returncode == 1
        wait_until(time.time() + SETTLE_S)  # every request settled: the report decides
        rows = reconcile_until(fixed, "fixed", lambda rows: all(r["_delivery"] for r in rows))
        assert cli("run", str(fixed), "--no-progress", "--resend-unknown").returncode in (0, 1)
        accepted = reached(box, "to_phone", "first_name")
    finally:
        box.stop()
    by = {r["Id"]: r for r in rows}
    # Pia's request arrived: her own entry at C, never not_found, never resent to D.
    assert accepted[(C, "Pia")] == 1 and accepted[(D, "Pia")] == 0, accepted
    assert by["3"]["_delivery"] != "not_found", by["3"]
    # Pat's never arrived: Rob's entry at B (Pat's fixed number) does not make Pat sent.
    assert accepted[(A, "Pat")] + accepted[(B, "Pat")] <= 1, accepted
    assert by["1"]["_status"] != "sent" or accepted[(B, "Pat")] == 1, (by["1"], accepted)
