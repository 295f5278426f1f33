"""Which delivery report entry belongs to which request, and which spans to read: pure
functions over plain data (numbers and pandas frames), tested on tables of cases and on
generated worlds.

The spans read: from the first request − 2 min to the last request + `settle_minutes`
(at least the 15 min an entry may take), never past now, in windows of at most 7 days. A
window is read again while its entries may still change (younger than 72 h when it was
read); an older one read whole is final, so a rerun or a killed reconcile does not fetch
it again.

Entries carry no campaign and no request: only a number and a time. So an entry is
judged against every request the store knows to its number (all campaigns), each one
classed by its answer: known to have arrived (200 with success), certainly not arrived
(the connection never opened, 408/429/503, other refusals: those own no entry), or maybe
arrived (anything else: a timeout, a dropped connection, 500/502/504, in flight when a
run died, a 200 that was not success). A request may own an entry created within
[request − 2 min, request + 15 min]; the requests to one number whose windows overlap
form a group (directly or through others), and a group's entries belong to its requests
and to no other. With E entries, K requests known to have arrived and M maybe:
- each known request gets the entry nearest after it (within the skew before it when
  none is after); one entry is one request's, and they choose before the maybe ones;
- E >= K + M: every maybe request arrived (there are not enough other owners for the
  entries): confirmed, with an entry of those left;
- E == K, every request settled (`settle_minutes` passed) and the group's time read
  whole: the entries are the known requests' and no maybe request arrived: not_found;
- anything else is ambiguous, and says why in plain words.
The one assumption: no sender the store does not know texts the same number in the
same minutes (through the same `reporting.from_phone` when that is set).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

SKEW_S = 120.0  # an entry may be this much older than the request (clock skew)
MATCH_S = 15 * 60.0  # an entry is created at most this long after its request
WINDOW_S = 7 * 24 * 3600.0  # the provider's recommended longest span per query
SETTLED_S = 72 * 3600.0  # statuses of entries older than this no longer change
# Requests of the store are loaded this far around the campaign's: a group that reaches
# within SKEW_S + MATCH_S of the edge may go on past it and is never settled by counting.
REACH_S = 3600.0

# What a request's answer says of whether it reached the API.
NOT_ARRIVED, MAYBE, ARRIVED = 0, 1, 2
MATCHED, CONFIRMED, NOT_FOUND, AMBIGUOUS = "matched", "confirmed", "not_found", "ambiguous"

Window = tuple[float, float]
# (start, end, read whole, when it was read), as the ledger keeps them.
ReadWindow = tuple[float, float, bool, float | None]

# One row per request: the campaign's recipient id (-1: another campaign's), the number as
# E.164 digits, its start, its kind (NOT_ARRIVED, MAYBE, ARRIVED).
REQUEST_COLUMNS = ["person", "phone", "at", "kind"]
ENTRY_COLUMNS = ["entry", "phone", "created_at", "status", "error"]
JUDGED_COLUMNS = [
    *REQUEST_COLUMNS,
    "group",
    "verdict",
    "reason",
    "entry",
    "created_at",
    "status",
    "error",
]


@dataclass(frozen=True)
class Scope:
    """What a verdict may rest on: the windows read, how long entries take to settle,
    now, and the span the store's requests were loaded for."""

    read: list[ReadWindow]
    settle_s: float
    now: float
    reach: Window
    store_whole: bool = True  # every campaign of the store could be read


def reach_of(first: float, last: float) -> Window:
    """The span the store's requests are loaded for, around a campaign's [first, last]."""
    return (first - REACH_S, last + REACH_S)


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


def judge(requests: pd.DataFrame, entries: pd.DataFrame, scope: Scope) -> pd.DataFrame:
    """Every request that could own an entry, judged by what the entries of its group
    say. `requests` (person, phone, at, kind): every request of the store to the numbers
    looked at, `person` -1 for those of other campaigns; `entries` (ENTRY_COLUMNS).
    Returns one row per request of kind ARRIVED or MAYBE with JUDGED_COLUMNS."""
    found = _grouped(requests[requests["kind"] != NOT_ARRIVED])
    if found.empty:
        return _empty(JUDGED_COLUMNS)
    groups = _groups(found)
    owned = _entries_of(groups, entries)
    groups["entries"] = owned.groupby("group").size().reindex(groups.index, fill_value=0)
    cut, clear, clear_known, reason = _verdicts(groups, scope)
    group = found["group"].to_numpy()
    maybe = (found["kind"] == MAYBE).to_numpy()
    confirm = maybe & ~cut[group] & (_spare(found, groups) >= 1)
    pick = _assigned(found, owned, groups, confirm)
    found["verdict"] = np.where(maybe, AMBIGUOUS, "unmatched")
    found.loc[confirm, "verdict"] = CONFIRMED
    found.loc[maybe & clear[group], "verdict"] = NOT_FOUND
    found.loc[~maybe & (pick >= 0), "verdict"] = MATCHED
    # A request known to have arrived that no entry is left for: the report does not know
    # it (said only once it could: settled, read whole; it is `sent` whatever is said).
    unknown_to_report = ~maybe & (pick < 0) & (clear_known[group])
    found.loc[unknown_to_report, "verdict"] = NOT_FOUND
    found["reason"] = np.where(found["verdict"] == AMBIGUOUS, reason[group], None)
    chosen = owned.iloc[np.clip(pick, 0, None)] if len(owned) else None
    for column in ("entry", "created_at", "status", "error"):
        values = chosen[column].to_numpy() if chosen is not None else np.full(len(found), None)
        found[column] = pd.Series(values, index=found.index).where(pick >= 0, None)
    return found[JUDGED_COLUMNS]


def _spare(found: pd.DataFrame, groups: pd.DataFrame) -> Any:
    """Per maybe request: the entries of its group left over even if every request known
    to have arrived and every maybe request of *other* people arrived and owns one. At
    least 1: one of this person's requests arrived, in every world the entries allow.
    (Another campaign's request counts as another person's.) E >= K + M gives every
    maybe person at least 1."""
    maybe = (found["kind"] == MAYBE).to_numpy()
    theirs = found[maybe & (found["person"] >= 0).to_numpy()]
    own = np.ones(len(found))
    own[theirs.index.to_numpy()] = theirs.groupby(["group", "person"])["at"].transform("size")
    group = found["group"].to_numpy()
    entries, known, maybes = (groups[c].to_numpy()[group] for c in ("entries", "known", "maybe"))
    return entries - known - (maybes - own)


def extent(requests: pd.DataFrame) -> Window | None:
    """(first, last) request of the groups holding a request of the campaign's people
    (`requests` as for `judge`); None when there is none."""
    found = _grouped(requests[requests["kind"] != NOT_ARRIVED])
    mine = found.loc[found["person"] >= 0, "group"].unique()
    theirs = found[found["group"].isin(mine)]
    if theirs.empty:
        return None
    return float(theirs["at"].min()), float(theirs["at"].max())


def _grouped(requests: pd.DataFrame) -> pd.DataFrame:
    """The requests by number and time, each with its group: the requests to one number
    whose match windows overlap, directly or through others (a connected group)."""
    found = requests.sort_values(["phone", "at"], kind="stable").reset_index(drop=True)
    apart = found["at"].diff().to_numpy() > SKEW_S + MATCH_S
    other_number = (found["phone"] != found["phone"].shift()).to_numpy()
    found["group"] = np.cumsum(apart | other_number) - 1
    return found


def _groups(found: pd.DataFrame) -> pd.DataFrame:
    """Per group: its number, first and last request, requests known to have arrived
    (`known`) and maybe arrived (`maybe`)."""
    by = (found["kind"] == ARRIVED).groupby(found["group"])
    at = found["at"].groupby(found["group"])
    groups = pd.DataFrame(
        {
            "phone": found["phone"].groupby(found["group"]).first(),
            "first": at.min(),
            "last": at.max(),
            "known": by.sum().astype("int64"),
            "size": by.size(),
        }
    )
    groups["maybe"] = groups["size"] - groups["known"]
    groups["lo"] = groups["first"] - SKEW_S
    groups["hi"] = groups["last"] + MATCH_S
    return groups


def _entries_of(groups: pd.DataFrame, entries: pd.DataFrame) -> pd.DataFrame:
    """The entries inside some group's windows, each with its group, by time."""
    if entries.empty:
        return _empty([*ENTRY_COLUMNS, "group"])
    bounds = groups[["phone", "lo", "hi"]].rename_axis("group").reset_index()
    bounds = bounds.sort_values("lo", kind="stable")
    ordered = entries[ENTRY_COLUMNS].sort_values("created_at", kind="stable")
    joined = pd.merge_asof(
        ordered, bounds, left_on="created_at", right_on="lo", by="phone", direction="backward"
    )
    joined = joined[joined["group"].notna() & (joined["created_at"] <= joined["hi"])]
    joined = joined.astype({"group": "int64"}).drop(columns=["lo", "hi"])
    return joined.sort_values(["group", "created_at"], kind="stable").reset_index(drop=True)


def _verdicts(groups: pd.DataFrame, scope: Scope) -> tuple[Any, Any, Any, Any]:
    """Per group (arrays by group number): whether it may go on past what was loaded (then
    nothing in it is confirmed or not_found); its maybe requests not_found; whatever it
    lacks may be called not_found (settled, read whole); else why it is ambiguous."""
    known, maybe, count = (groups[c].to_numpy() for c in ("known", "maybe", "entries"))
    lo, hi = groups["lo"].to_numpy(), np.minimum(groups["hi"].to_numpy(), scope.now)
    reach_lo, reach_hi = scope.reach
    # A group that may go on past the requests loaded could own entries not counted.
    cut = (groups["first"].to_numpy() < reach_lo + SKEW_S + MATCH_S) | (
        groups["last"].to_numpy() > reach_hi - SKEW_S - MATCH_S
    )
    cut |= not scope.store_whole
    settled = groups["last"].to_numpy() + scope.settle_s <= scope.now
    whole = _inside(lo, hi, covered(scope.read))
    clear_known = settled & whole & ~cut
    clear = (count == known) & clear_known
    reason = np.array(
        [
            _why(*row)
            for row in zip(count, known + maybe, cut, settled, whole, count == known, strict=True)
        ],
        dtype=object,
    )
    return cut, clear, clear_known, reason


def _why(entries: int, requests: int, cut: bool, settled: bool, whole: bool, even: bool) -> str:
    counted = _plural(entries, "entry", "entries")
    said = f"{counted} for {_plural(requests, 'request')} to this number"
    if cut:
        return f"{said}, and requests to it go on beyond the time looked at"
    if not even:
        return said
    if not settled:
        return f"{said}, and settle_minutes have not passed since the last of them"
    if not whole:
        return f"{said}, and part of their time was not read whole"
    return said


def _plural(n: int, one: str, many: str = "") -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _inside(lo: Any, hi: Any, spans: list[Window]) -> Any:
    """Whether each [lo, hi] lies inside one of the (merged, sorted) spans."""
    if not spans:
        return np.zeros(len(lo), dtype=bool)
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    which = np.searchsorted(starts, lo, side="right") - 1
    return (which >= 0) & (ends[np.clip(which, 0, None)] >= hi)


def _assigned(found: pd.DataFrame, owned: pd.DataFrame, groups: pd.DataFrame, confirm: Any) -> Any:
    """Per request, the position in `owned` of the entry it gets (-1: none). Requests
    known to have arrived choose first: alone in its group, the nearest entry after it
    (within the skew before it when none is after); several, in time order, each the
    earliest entry left in its window. Then each confirmed person one entry from what is
    left (in the window of one of their requests, else the earliest: there are enough)."""
    pick = np.full(len(found), -1, dtype=np.int64)
    if owned.empty:
        return pick
    single = (groups["size"] == 1).to_numpy()[found["group"].to_numpy()]
    _assign_singles(found, owned, single, pick)
    pick[(found["kind"] == MAYBE).to_numpy() & ~confirm] = -1
    times = owned["created_at"].to_numpy()
    starts = np.searchsorted(owned["group"].to_numpy(), groups.index.to_numpy(), side="left")
    ends = np.searchsorted(owned["group"].to_numpy(), groups.index.to_numpy(), side="right")
    several = found[~single & ((found["kind"] == ARRIVED).to_numpy() | confirm)]
    for group, members in several.groupby("group", sort=False):
        free = list(range(int(starts[group]), int(ends[group])))
        known = members[members["kind"] == ARRIVED]
        for position, at in zip(known.index, known["at"], strict=True):
            pick[position] = _take(free, times, float(at), fallback=False)
        served: set[int] = set()
        for position, at, person in zip(
            members.index, members["at"], members["person"], strict=True
        ):
            if members.at[position, "kind"] == MAYBE and person not in served:
                pick[position] = _take(free, times, float(at), fallback=True)
                served.add(person)
    return pick


def _assign_singles(found: pd.DataFrame, owned: pd.DataFrame, single: Any, pick: Any) -> None:
    """Groups of one request: every entry of the group is in its window; it gets the
    nearest after it, else the nearest before it."""
    alone = found[single]
    if alone.empty:
        return
    at = alone.set_index("group")["at"]
    candidates = owned[owned["group"].isin(at.index)]
    if candidates.empty:
        return
    offset = candidates["created_at"].to_numpy() - at.reindex(candidates["group"]).to_numpy()
    # After the request comes first (nearest first), then before it (nearest first).
    score = np.where(offset >= 0, offset, MATCH_S + SKEW_S - offset)
    best = pd.Series(score, index=candidates.index).groupby(candidates["group"].to_numpy()).idxmin()
    position = pd.Series(alone.index, index=alone["group"].to_numpy())
    hit = position.reindex(best.index)
    pick[hit.to_numpy()] = best.to_numpy()


def _take(free: list[int], times: Any, at: float, *, fallback: bool) -> int:
    """Take from `free` (positions by time) the earliest entry in the request's window
    [at − SKEW_S, at + MATCH_S], else (fallback) the earliest left; -1: none. Requests
    taken in time order so get each its own entry whenever the entries allow it."""
    if not free:
        return -1
    i = bisect.bisect_left(free, at - SKEW_S, key=lambda p: times[p])
    if i < len(free) and times[free[i]] <= at + MATCH_S:
        return free.pop(i)
    return free.pop(0) if fallback else -1


def by_person(judged: pd.DataFrame, last_at: pd.Series) -> Verdicts:
    """What the report says of each person of the campaign from their requests' verdicts
    (`last_at`: person -> start of their latest request of any kind):
    - an entry: that of their latest request known to have arrived, else of a confirmed
      one (a confirmed `unknown` person reached the API);
    - not_found: every request of theirs is not_found;
    - ambiguous: none arrived for sure, none confirmed, some maybe one ambiguous.
    A person with a request known to have arrived gets no other verdict."""
    mine = judged[judged["person"] >= 0]
    with_entry = mine[mine["verdict"].isin([MATCHED, CONFIRMED]) & mine["entry"].notna()]
    with_entry = with_entry.assign(first_known=with_entry["kind"] == ARRIVED)
    with_entry = with_entry.sort_values(["first_known", "at"], kind="stable")
    matched = with_entry.drop_duplicates("person", keep="last")
    rest = mine[~mine["person"].isin(matched["person"])]
    open_ = rest[rest["verdict"] != NOT_FOUND].sort_values("at", kind="stable")
    settled = rest.loc[~rest["person"].isin(open_["person"]), "person"].drop_duplicates()
    arrived = rest.loc[rest["kind"] == ARRIVED, "person"]
    open_ = open_[~open_["person"].isin(arrived)]
    ambiguous = open_.drop_duplicates("person", keep="last")[["person", "reason"]]
    not_found = pd.DataFrame({"person": settled, "at": last_at.reindex(settled).to_numpy()})
    columns = ["person", "phone", "kind", "entry", "created_at", "status", "error"]
    return Verdicts(matched[columns].reset_index(drop=True), not_found, ambiguous)


@dataclass(frozen=True)
class Verdicts:
    matched: pd.DataFrame  # person, phone, kind, entry, created_at, status, error
    not_found: pd.DataFrame  # person, at (their latest request)
    ambiguous: pd.DataFrame  # person, reason


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_dtype(c)) for c in columns})


def _dtype(column: str) -> str:
    kinds = {"person": "int64", "phone": "int64", "group": "int64", "kind": "int64"}
    times = {"at": "float64", "created_at": "float64", "first": "float64"}
    return {**kinds, **times}.get(column, "object")
