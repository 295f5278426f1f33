"""A campaign's story: the aggregates its charts draw, read from its ledger.

One function (`campaign_story`) for the page (`GET /api/campaigns/{id}/story`) and for
report.html, so both show the same thing. Everything here is an aggregate: counts per
time bucket, per status, per delivery state, per failure reason, per window opening.
Never a point per person, never a phone number, never a param value: failure reasons are
the ledger's `_error` / `_delivery_error` texts, which may quote the API's answer body,
so numbers in them are replaced and the values of the people who got them are blanked
(docs/page.md, "Charts").

Time series are bounded: at most MAX_POINTS buckets whatever the campaign's length (a
bucket of 1 s for a short send, of minutes for a day-long one).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from typing import Any

from campaign.logs import masker
from campaign.records import STATUSES
from campaign.store.campaigns import Store
from campaign.store.ledger import Ledger

MAX_POINTS = 2000
# Bucket widths in seconds: the smallest that keeps a campaign under MAX_POINTS buckets.
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
OUTCOMES = ("sent", "failed", "unknown", "retried", "in_flight")
FUNNEL = (
    "sent",
    "delivered",
    "sent_at_carrier",
    "undelivered",
    "failed",
    "not_found",
    "ambiguous",
    "not_checked",
)
TOP_REASONS = 10
# Distinct raw error texts looked at (the most frequent first); the rest are "other".
MAX_REASON_GROUPS = 20_000
MAX_OPENINGS = 50
# The rate behind an ETA: the settling of people over the last this many seconds.
ETA_WINDOW_S = 60.0

_WINDOW_WAIT = "waiting for the send window "
_DATED = re.compile(r"\d{4}-\d\d-\d\d ")
_NUMBER = re.compile(r"\*+\d{1,4}")
# A channel uuid (or any other) in an answer quoted back.
_UUID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I)


def campaign_story(
    ledger: Ledger,
    campaign: str,
    counts: dict[str, int] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The aggregates of one campaign, JSON-ready, with a plain-text line per chart.
    `counts`: the report's lines per status, when the caller has just counted them."""
    now = time.time() if now is None else now
    statuses = {**dict.fromkeys(STATUSES, 0), **(counts if counts is not None else ledger.counts())}
    running = _in_flight(ledger, statuses)
    funnel, delivery = _funnel(ledger, statuses)
    rate, progress = _timeline(ledger, statuses, running, now)
    reasons = _reasons(ledger, running)
    waiting = _waiting(ledger)
    story: dict[str, Any] = {
        "campaign": campaign,
        "generated_at": now,
        "statuses": statuses,
        "delivery": delivery,
        "funnel": funnel,
        "rate": rate,
        "progress": progress,
        "reasons": reasons,
        "waiting": waiting,
    }
    story["text"] = describe(story)
    return story


def stored_story(store: Store, campaign: str) -> dict[str, Any] | None:
    """The story of a campaign of the store, read read-only (another process may be
    sending it); None when it has no ledger yet (an upload not validated)."""
    with store.reader(campaign) as ledger:
        return None if ledger is None else campaign_story(ledger, campaign)


# --- statuses and the delivery funnel --------------------------------------------------------


def _funnel(ledger: Ledger, statuses: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    """The delivery funnel, and counts per delivery state. The funnel follows the `sent`
    people to what the delivery report says of them (`sent_at_carrier`: the report's
    `sent`, not delivered yet; `not_checked`: no report read for them); `not_found` and
    `ambiguous` also count the `unknown` people the report could not place. Every person
    who may have been reached is on exactly one line of the report, so the recipients
    with a delivery state are the report's lines with one."""
    funnel = dict.fromkeys(FUNNEL, 0)
    delivery: Counter[str] = Counter()
    found = ledger.db.execute(
        "SELECT r.state, d.status, count(*) FROM deliveries d "
        "JOIN recipients r ON r.id = d.recipient_id GROUP BY r.state, d.status"
    ).fetchall()
    checked = 0
    for state, status, count in found:
        delivery[status] += count
        if state == "sent":
            checked += count
            stage = "sent_at_carrier" if status == "sent" else status
            if stage in funnel:
                funnel[stage] += count
        elif status in ("not_found", "ambiguous"):
            funnel[status] += count
    funnel["sent"] = statuses.get("sent", 0)
    funnel["not_checked"] = max(funnel["sent"] - checked, 0)
    return funnel, dict(sorted(delivery.items()))


# --- requests over time, and progress --------------------------------------------------------


def bucket_width(span_s: float, max_points: int = MAX_POINTS) -> int:
    """The smallest step (s) that cuts `span_s` into at most `max_points` buckets."""
    for step in _STEPS:
        if span_s / step < max_points:
            return step
    return math.ceil(span_s / max_points / 86400) * 86400


def _in_flight(ledger: Ledger, statuses: dict[str, int]) -> bool:
    """Whether a run is sending; if so, its requests still open are `in_flight`, not
    `unknown` as the report calls them (a report is read when no run holds them)."""
    db = ledger.db
    if not db.execute("SELECT 1 FROM runs WHERE state = 'running' LIMIT 1").fetchone():
        return False
    found = db.execute("SELECT count(*) FROM recipients WHERE state = 'inflight'").fetchone()
    moved = min(int(found[0]), statuses.get("unknown", 0))
    if moved:
        statuses["unknown"] -= moved
        statuses["in_flight"] = moved
    return True


def _timeline(
    ledger: Ledger, statuses: dict[str, int], running: bool, now: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Requests per second by outcome, per bucket; and the people settled over time
    (their last request answered for good), with an ETA while a run is sending."""
    db = ledger.db
    first, last = db.execute("SELECT min(started_at), max(started_at) FROM attempts").fetchone()
    total = sum(statuses.get(s, 0) for s in ("sent", "failed", "unknown", "pending", "in_flight"))
    settled_now = sum(statuses.get(s, 0) for s in ("sent", "failed", "unknown"))
    if first is None:
        empty: dict[str, Any] = {"start": None, "step": 1, "series": {o: [] for o in OUTCOMES}}
        nothing: dict[str, Any] = {
            "start": None,
            "step": 1,
            "settled": [],
            "total": total,
            "settled_now": settled_now,
            "running": running,
            "eta_at": None,
        }
        return empty, nothing
    step = bucket_width(float(last) - float(first) + 1)
    start = math.floor(float(first) / step) * step
    buckets = int((float(last) - start) // step) + 1
    # SQLite truncates a cast toward zero (the offset is never negative); PostgreSQL's
    # cast rounds, so it is told to floor.
    offset = "(a.started_at - ?) / ?"
    index = f"floor({offset})" if ledger.postgres else f"CAST({offset} AS INTEGER)"
    found = db.execute(
        f"SELECT {index} AS b, "
        "sum(CASE WHEN a.n < r.attempts OR a.state = 'pending' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN a.n >= r.attempts AND a.state = 'sent' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN a.n >= r.attempts AND a.state = 'failed' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN a.n >= r.attempts AND a.state = 'unknown' THEN 1 ELSE 0 END), "
        "sum(CASE WHEN a.n >= r.attempts AND a.state IS NULL THEN 1 ELSE 0 END), "
        "sum(CASE WHEN a.n = r.attempts AND r.state IN ('sent', 'failed', 'unknown') "
        "THEN 1 ELSE 0 END) "
        "FROM attempts a JOIN recipients r ON r.id = a.recipient_id GROUP BY b",
        (start, step),
    ).fetchall()
    series = {o: [0.0] * buckets for o in OUTCOMES}
    settled = [0] * buckets
    names = ("retried", "sent", "failed", "unknown", "in_flight")
    for b, *counts in found:
        i = min(max(int(b), 0), buckets - 1)
        for name, count in zip(names, counts[:5], strict=True):
            series[name][i] += (count or 0) / step
        settled[i] += counts[5] or 0
    rate = {
        "start": start,
        "step": step,
        "series": {o: [round(v, 3) for v in values] for o, values in series.items()},
    }
    cumulative, running_total = [], 0
    for count in settled:
        running_total += count
        cumulative.append(running_total)
    eta_at = None
    remaining = max(total - settled_now, 0)
    if running and remaining:
        recent = _recent_rate(cumulative, step, start, now)
        if recent > 0:
            eta_at = now + remaining / recent
    progress: dict[str, Any] = {
        "start": start,
        "step": step,
        "settled": cumulative,
        "total": total,
        "settled_now": settled_now,
        "running": running,
        "eta_at": eta_at,
    }
    return rate, progress


def _recent_rate(cumulative: list[int], step: int, start: float, now: float) -> float:
    """People settled per second over the last ETA_WINDOW_S (at least one bucket)."""
    if not cumulative:
        return 0.0
    back = max(1, int(ETA_WINDOW_S // step))
    earlier = cumulative[-1 - back] if len(cumulative) > back else 0
    span = min(back * step, max(now - start, step))
    return (cumulative[-1] - earlier) / span


# --- failure reasons ------------------------------------------------------------------------


def clean_reason(text: str, values: list[str]) -> str:
    """A reason as it may be shown: every number replaced (all its digits), a uuid (the
    channel's, say) replaced, and the given param values (those of a person who got this
    text) blanked."""
    text = masker.clean(_UUID.sub("[id]", text))
    text = _NUMBER.sub("[number]", text)
    for value in sorted(values, key=len, reverse=True):
        if len(value) < 2 or value not in text:
            continue
        if len(value) >= 4:
            text = text.replace(value, "[value]")
        else:  # a short value only as a word of its own, not inside every longer word
            text = re.sub(rf"(?<!\w){re.escape(value)}(?!\w)", "[value]", text)
    return text


def _payload_values(payload: str | None) -> list[str]:
    try:
        found = json.loads(payload or "{}")
    except ValueError:
        return []
    if not isinstance(found, dict):
        return []
    return [str(v).strip() for v in found.values() if v is not None and str(v).strip()]


def _reasons(ledger: Ledger, running: bool) -> list[dict[str, Any]]:
    """The most frequent failure reasons, with counts: why people are `failed` or
    `unknown` (`_error`), and why their SMS was not delivered (`_delivery_error`)."""
    db = ledger.db
    # A request in flight is no failure while its run sends; left by a dead run, it is.
    dead = "" if running else ", 'inflight'"
    groups: list[tuple[str, str | None, int, int]] = [
        ("send", error, count, rid)
        for error, count, rid in db.execute(
            "SELECT error, count(*), min(id) FROM recipients "
            f"WHERE state IN ('failed', 'unknown'{dead}) "
            "GROUP BY error ORDER BY count(*) DESC LIMIT ?",
            (MAX_REASON_GROUPS,),
        ).fetchall()
    ]
    groups += [
        (f"delivery {status}", error, count, rid)
        for status, error, count, rid in db.execute(
            "SELECT status, error, count(*), min(recipient_id) FROM deliveries "
            "WHERE status IN ('undelivered', 'failed', 'ambiguous') "
            "GROUP BY status, error ORDER BY count(*) DESC LIMIT ?",
            (MAX_REASON_GROUPS,),
        ).fetchall()
    ]
    # Everyone of a group got the very same text: if it quotes a person's own values, it
    # quotes every member's, so one member's payload names every value to blank.
    payloads = _payloads(ledger, [rid for *_, rid in groups])
    merged: Counter[tuple[str, str]] = Counter()
    for kind, error, count, rid in groups:
        reason = clean_reason(error or "(no reason given)", payloads.get(rid, []))
        merged[(kind, reason)] += count
    known = sum(merged.values())
    everyone = _failing_people(ledger, dead)
    top: list[dict[str, Any]] = [
        {"kind": kind, "reason": reason, "count": count}
        for (kind, reason), count in merged.most_common(TOP_REASONS)
    ]
    other = everyone - sum(item["count"] for item in top)
    if other > 0 and known:
        top.append({"kind": "other", "reason": "other reasons", "count": other})
    return top


def _payloads(ledger: Ledger, ids: list[int]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for at in range(0, len(ids), 500):
        part = ids[at : at + 500]
        marks = ",".join("?" * len(part))
        for rid, payload in ledger.db.execute(
            f"SELECT id, payload FROM recipients WHERE id IN ({marks})", part
        ):
            found[rid] = _payload_values(payload)
    return found


def _failing_people(ledger: Ledger, dead: str) -> int:
    found = ledger.db.execute(
        "SELECT (SELECT count(*) FROM recipients WHERE state IN ('failed', 'unknown'"
        f"{dead})), (SELECT count(*) FROM deliveries WHERE status IN "
        "('undelivered', 'failed', 'ambiguous'))"
    ).fetchone()
    return int(found[0]) + int(found[1])


# --- people waiting for their send window ---------------------------------------------------


def _waiting(ledger: Ledger) -> list[dict[str, Any]]:
    """How many people of the input wait for each window opening (`_error` says when)."""
    found = ledger.db.execute(
        "SELECT r.error, count(*) FROM recipients r JOIN rows ON rows.key = r.key "
        "AND rows.status = 'ok' WHERE r.state = 'pending' AND r.error LIKE ? "
        "GROUP BY r.error",
        (_WINDOW_WAIT + "%",),
    ).fetchall()
    openings: Counter[str] = Counter()
    for error, count in found:
        openings[error.rsplit(": opens ", 1)[-1]] += count
    # An opening later today has no date; a later day's starts with it.
    ordered = sorted(openings.items(), key=lambda item: (bool(_DATED.match(item[0])), item[0]))
    return [{"opens": opens, "people": n} for opens, n in ordered[:MAX_OPENINGS]]


# --- the plain-text summaries ---------------------------------------------------------------


def describe(story: dict[str, Any]) -> dict[str, str]:
    """One plain sentence per chart, shown beside it (screen readers, e-mail previews)."""
    return {
        "rate": _describe_rate(story["rate"]),
        "progress": _describe_progress(story["progress"], story["generated_at"]),
        "statuses": _describe_counts(story["statuses"], "No rows yet."),
        "funnel": _describe_funnel(story["funnel"]),
        "reasons": _describe_reasons(story["reasons"]),
        "waiting": _describe_waiting(story["waiting"]),
    }


def _describe_rate(rate: dict[str, Any]) -> str:
    series = rate["series"]
    if not series["sent"] and rate["start"] is None:
        return "No requests yet."
    step = rate["step"]
    totals = {o: round(sum(v) * step) for o, v in series.items()}
    peak = max((sum(values) for values in zip(*series.values(), strict=True)), default=0.0)
    parts = [f"{totals[o]} {o.replace('_', ' ')}" for o in OUTCOMES if totals[o]]
    span = len(series["sent"]) * step
    return (
        f"{sum(totals.values())} requests over {_duration(span)} ({', '.join(parts)}); "
        f"peak {peak:.1f} per second, in buckets of {step} s."
    )


def _describe_progress(progress: dict[str, Any], now: float) -> str:
    total, done = progress["total"], progress.get("settled_now", 0)
    if not total:
        return "Nobody to send."
    text = f"{done} of {total} people settled ({100 * done / total:.0f}%)."
    if progress.get("eta_at"):
        left = max(progress["eta_at"] - now, 0)
        text += f" About {_duration(left)} to go at the recent rate."
    elif done < total:
        text += f" {total - done} not settled yet (pending)."
    return text


def _describe_counts(counts: dict[str, int], empty: str) -> str:
    parts = [f"{n} {name.replace('_', ' ')}" for name, n in counts.items() if n]
    return (", ".join(parts) + ".") if parts else empty


def _describe_funnel(funnel: dict[str, int]) -> str:
    sent = funnel.get("sent", 0)
    if not sent:
        return "Nothing sent yet."
    parts = [f"{funnel[k]} {k.replace('_', ' ')}" for k in FUNNEL[1:] if funnel.get(k)]
    return f"{sent} sent: " + ", ".join(parts) + "."


def _describe_reasons(reasons: list[dict[str, Any]]) -> str:
    if not reasons:
        return "No failures."
    parts = [f"{r['count']} × {r['reason']} ({r['kind']})" for r in reasons[:3]]
    return "Most frequent: " + "; ".join(parts) + "."


def _describe_waiting(waiting: list[dict[str, Any]]) -> str:
    if not waiting:
        return "Nobody is waiting for a send window."
    parts = [f"{w['people']} at {w['opens']}" for w in waiting[:5]]
    return f"{sum(w['people'] for w in waiting)} people wait for their window: " + (
        ", ".join(parts) + "."
    )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"
