"""Which delivery report entry belongs to which person, and which spans to read: pure
functions over plain data (numbers and pandas frames), tested on tables of cases.

The rules (DESIGN.md, "Delivery reports"):
- the spans read: from the first request − 2 min to the last request + `settle_minutes`
  (at least the 15 min an entry may take), never past now, in windows of at most 7 days.
  A window is read again while its entries may still change (younger than 72 h when it
  was read); an older one read whole is final, so a rerun or a killed reconcile does not
  fetch it again;
- a person gets the entry for their number created nearest after their last request,
  within 15 min; an entry up to 2 min before the request counts too (clocks differ), but
  only when there is none after it. One entry matches one person: when two claim the
  same one (two people sharing a number), the nearest claim wins and the other looks
  again among the entries left;
- `not_found`: no entry, `settle_minutes` passed since the last request, and the whole
  match window [request − 2 min, request + 15 min] (up to now) lies in spans read whole.
  Anything less says nothing: the person keeps what an earlier reconcile found. Nor is
  anyone `not_found` whose first request came more than 2 min before the last: the
  entry of that one (a request cut after it arrived, then a retry refused with a 503)
  would lie before the window looked at, and a resend would be their second SMS.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SKEW_S = 120.0  # an entry may be this much older than the request (clock skew)
MATCH_S = 15 * 60.0  # an entry is created at most this long after its request
WINDOW_S = 7 * 24 * 3600.0  # the provider's recommended longest span per query
SETTLED_S = 72 * 3600.0  # statuses of entries older than this no longer change
MAX_ROUNDS = 20  # claim rounds: only people sharing a number need more than one

Window = tuple[float, float]
# (start, end, read whole, when it was read), as the ledger keeps them.
ReadWindow = tuple[float, float, bool, float | None]

# Recipient id, number as digits, last request, first request.
PEOPLE_COLUMNS = ["id", "phone", "at", "first"]
ENTRY_COLUMNS = ["entry", "phone", "created_at", "status", "error"]


def request_span(first: float, last: float, settle_s: float, now: float) -> Window | None:
    """The span of time that holds the entries of requests made in [first, last]."""
    start = first - SKEW_S
    end = min(last + max(settle_s, MATCH_S), now)
    return (start, end) if end > start else None


def windows(span: Window) -> list[Window]:
    """The span in windows of at most 7 days, aligned on its start (so the windows of a
    later reconcile of the same campaign are the same ones, the last one longer)."""
    start, end = span
    found = []
    while start < end:
        found.append((start, min(start + WINDOW_S, end)))
        start += WINDOW_S
    return found


def to_read(planned: list[Window], read: list[ReadWindow]) -> list[Window]:
    """The planned windows that must be fetched: all but those read whole, to their
    planned end, at a time when their entries could no longer change."""
    final = {
        start
        for start, end, whole, read_at in read
        if whole and read_at is not None and read_at >= end + SETTLED_S
    }
    by_start = {start: end for start, end, *_ in read}
    return [
        (start, end) for start, end in planned if not (start in final and by_start[start] >= end)
    ]


def covered(read: list[ReadWindow]) -> list[Window]:
    """The spans of time read whole, merged where they touch."""
    merged: list[Window] = []
    for start, end, whole, _ in sorted(read):
        if not whole:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def match(people: pd.DataFrame, entries: pd.DataFrame) -> pd.DataFrame:
    """Each person's entry: `people` (id, phone, at), `entries` (entry, phone, created_at,
    status, error) -> one row per matched person: id, at, entry, created_at, status,
    error. Phones are integers (E.164 digits) on both sides."""
    found: list[pd.DataFrame] = []
    seekers, left = people[["id", "phone", "at"]], entries[ENTRY_COLUMNS]
    for _ in range(MAX_ROUNDS):
        if seekers.empty or left.empty:
            break
        claims = _claims(seekers, left)
        if claims.empty:
            break
        # Per entry, the nearest claim wins: one after its request before one within the
        # skew, then the shortest distance, then the lowest recipient id.
        claims = claims.sort_values(["entry", "skewed", "distance", "id"], kind="stable")
        won = claims.drop_duplicates("entry", keep="first")
        found.append(won)
        losers = claims.loc[~claims["id"].isin(won["id"]), "id"]
        seekers = seekers[seekers["id"].isin(losers)]
        left = left[~left["entry"].isin(won["entry"])]
    columns = ["id", "at", "entry", "created_at", "status", "error"]
    if not found:
        return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in columns})
    return pd.concat(found, ignore_index=True)[columns]


def _claims(people: pd.DataFrame, entries: pd.DataFrame) -> pd.DataFrame:
    """Every person's nearest entry: after the request within MATCH_S, else before it
    within SKEW_S. Columns: id, at, entry, created_at, status, error, skewed, distance."""
    people = people.sort_values("at", kind="stable")
    entries = entries.sort_values("created_at", kind="stable")
    after = pd.merge_asof(
        people,
        entries,
        left_on="at",
        right_on="created_at",
        by="phone",
        direction="forward",
        tolerance=MATCH_S,
    )
    after["skewed"] = False
    missing = after["entry"].isna()
    before = pd.merge_asof(
        people[missing.to_numpy()],
        entries,
        left_on="at",
        right_on="created_at",
        by="phone",
        direction="backward",
        tolerance=SKEW_S,
    )
    before["skewed"] = True
    claims = pd.concat([after[~missing], before], ignore_index=True)
    claims = claims[claims["entry"].notna()].copy()
    claims["entry"] = claims["entry"].astype("int64")
    claims["distance"] = (claims["created_at"] - claims["at"]).abs()
    return claims


def not_found(
    people: pd.DataFrame,
    matched_ids: pd.Series,
    read: list[ReadWindow],
    settle_s: float,
    now: float,
) -> pd.Series:
    """Ids of the people the report does not know: unmatched, settled, every request
    within the skew before the last, and their whole match window inside spans read
    whole."""
    rest = people[~people["id"].isin(matched_ids)]
    rest = rest[rest["at"] - rest["first"] <= SKEW_S]
    at = rest["at"].to_numpy(dtype="float64")
    settled = at + settle_s <= now
    spans = covered(read)
    if not spans:
        return rest["id"].iloc[0:0]
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    lo, hi = at - SKEW_S, np.minimum(at + MATCH_S, now)
    # The span that starts last at or before `lo` must reach `hi`.
    which = np.searchsorted(starts, lo, side="right") - 1
    inside = (which >= 0) & (ends[np.clip(which, 0, None)] >= hi)
    return rest["id"][settled & inside]


def _dtype(column: str) -> str:
    return {"id": "int64", "entry": "int64", "at": "float64", "created_at": "float64"}.get(
        column, "object"
    )
