"""The retry decision as a table: (answer, attempt) -> next state."""

from __future__ import annotations

import email.utils
import random

import pytest

from campaign.bounds import MAX_RETRY_AFTER_S
from campaign.policy import Answer, Transport, backoff_s, decide, parse_retry_after

OK = Answer(http_status=200, success=True)


def run(answer: Answer, attempt: int = 1, *, ambiguous: bool = False, before: bool = False):
    return decide(
        answer,
        attempt,
        max_attempts=3,
        retry_ambiguous=ambiguous,
        maybe_delivered_before=before,
        rng=random.Random(7),
    )


@pytest.mark.parametrize(
    ("answer", "state", "retries", "fatal"),
    [
        (OK, "sent", False, False),
        (Answer(http_status=201, success=True), "sent", False, False),
        (Answer(http_status=200, success=False), "failed", False, False),
        (Answer(http_status=202), "unknown", False, False),
        (Answer(http_status=204), "unknown", False, False),
        (Answer(http_status=400), "failed", False, False),
        (Answer(http_status=422), "failed", False, False),
        (Answer(http_status=301), "failed", False, False),
        (Answer(http_status=408), "pending", True, False),
        (Answer(http_status=429), "pending", True, False),
        (Answer(http_status=503), "pending", True, False),
        (Answer(http_status=500), "unknown", False, False),
        (Answer(http_status=502), "unknown", False, False),
        (Answer(http_status=504), "unknown", False, False),
        (Answer(http_status=401), "failed", False, True),
        (Answer(http_status=403), "failed", False, True),
        (Answer(http_status=404), "failed", False, True),
        (Answer(transport=Transport.CONNECT, detail="refused"), "pending", True, False),
        (Answer(transport=Transport.TIMEOUT), "unknown", False, False),
        (Answer(transport=Transport.DROPPED), "unknown", False, False),
    ],
)
def test_first_attempt(answer: Answer, state: str, retries: bool, fatal: bool) -> None:
    decision = run(answer)
    assert decision.state == state
    assert (decision.retry_in_s is not None) is retries
    assert decision.fatal is fatal
    assert (decision.error is None) is (state == "sent")


def test_retries_end_failed_when_attempts_run_out() -> None:
    decision = run(Answer(http_status=503), attempt=3)
    assert decision.state == "failed"
    assert decision.retry_in_s is None
    assert "after 3 attempts" in (decision.error or "")


def test_retry_ambiguous_retries_timeouts_and_ends_unknown() -> None:
    """Until the retry is answered, the person is `unknown` (the timed-out request may have
    arrived), not `pending` (never tried), which a plain rerun would send again."""
    timeout = Answer(transport=Transport.TIMEOUT)
    retrying = run(timeout, ambiguous=True)
    assert retrying.state == "unknown" and retrying.retry_in_s is not None
    assert run(timeout, attempt=3, ambiguous=True).state == "unknown"
    assert run(timeout, attempt=3, ambiguous=True).retry_in_s is None
    assert run(Answer(http_status=502), ambiguous=True).state == "unknown"
    assert run(Answer(http_status=502), ambiguous=True).retry_in_s is not None
    assert run(Answer(http_status=404), ambiguous=True).state == "failed"


def test_a_retry_after_a_maybe_delivered_attempt_waits_as_unknown() -> None:
    """`--resend-unknown` gets a 503: retried, but if the run stops before the retry the
    person must stay `unknown`, or a rerun without the flag sends to them again."""
    decision = run(Answer(http_status=503), before=True)
    assert decision.state == "unknown" and decision.retry_in_s is not None
    assert "earlier attempt may have arrived" in (decision.error or "")
    assert not decision.final
    assert run(Answer(http_status=503)).state == "pending"


def test_a_failure_after_a_maybe_delivered_attempt_is_unknown_not_failed() -> None:
    decision = run(Answer(http_status=400), before=True)
    assert decision.state == "unknown"
    assert "earlier attempt may have arrived" in (decision.error or "")
    assert run(OK, before=True).state == "sent"


def test_retry_after_is_honoured_and_capped() -> None:
    assert run(Answer(http_status=429, retry_after_s=7)).retry_in_s == 7
    assert backoff_s(1, 10_000) == MAX_RETRY_AFTER_S


def test_full_jitter_grows_and_stays_under_the_cap() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(30.0, 0.5 * 2 ** (attempt - 1))
        waits = [backoff_s(attempt, None, rng) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > ceiling / 2  # jitter spreads over the whole range


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30)
    assert parse_retry_after(email.utils.formatdate(999_000, usegmt=True), now=1_000_000) == 0
