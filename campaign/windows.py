"""Send windows and the deadline, as pure functions of a number and an instant.

`limits.send_window: "08:00-21:00"` is in each recipient's local time. The zone comes from
the number (phonenumbers' timezone data). A number with several zones within
`MAX_SPREAD_H` hours of each other may be sent only while the window is open in all of
them; a number with none, with zones spread wider (toll-free and non-geographic numbers
get every North American zone), or no number at all, uses `limits.timezone`.

A request takes time to arrive: a person is "open" only when the window is open now and
still open `LEAVE_MARGIN_S` later, so that a request leaving at 20:59:59 does not land at
21:00:01. Every function takes the instant as an argument (aware `datetime`); nothing here
reads the clock, so tests can choose any instant.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as phone_zones

from campaign.times import clock_in, iso_instant

MAX_SPREAD_H = 3
LEAVE_MARGIN_S = 30
_WINDOW = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
_CLOCK = re.compile(r"([0-9]{2}):([0-9]{2})")
_UNKNOWN_ZONE = "Etc/Unknown"


@dataclass(frozen=True)
class Window:
    """Minutes after local midnight: open from `start` (included) to `end` (excluded);
    `end` < `start` crosses midnight; `end` may be 1440 (24:00)."""

    start: int
    end: int

    def open_at(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_window(text: str) -> Window:
    """`HH:MM-HH:MM`, 24-hour, two digits each; the end may be 24:00. Raises ValueError."""
    found = _WINDOW.fullmatch(text.strip()) if isinstance(text, str) else None
    if found is None:
        raise ValueError(f'must be "HH:MM-HH:MM" in 24-hour time, like "08:00-21:00", not {text!r}')
    h1, m1, h2, m2 = (int(g) for g in found.groups())
    if h1 > 23 or m1 > 59:
        raise ValueError(f"{_hhmm_text(h1, m1)} is not a time of day (00:00 to 23:59)")
    if m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        raise ValueError(f"{_hhmm_text(h2, m2)} is not a time of day (00:00 to 24:00)")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise ValueError("the window starts when it ends: give two different times")
    return Window(start, end)


def _hhmm_text(h: int, m: int) -> str:
    return f"{h:02d}:{m:02d}"


def parse_zone(name: str) -> ZoneInfo:
    """An IANA zone (`America/New_York`); raises ValueError."""
    if not isinstance(name, str) or not name.strip() or name.strip().startswith(("/", ".")):
        raise ValueError(f"{name!r} is not a time zone name (like America/New_York)")
    try:
        return ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(
            f"{name!r} is not a time zone name the IANA database knows (like America/New_York)"
        ) from None


def check_deadline(text: str) -> bool:
    """Whether a deadline needs `limits.timezone` (no UTC offset given). Raises ValueError
    for anything that is not `HH:MM` or an ISO 8601 date and time."""
    text = text.strip() if isinstance(text, str) else ""
    if _CLOCK.fullmatch(text):
        h, m = int(text[:2]), int(text[3:])
        if h > 23 or m > 59:
            raise ValueError(f"{text} is not a time of day (00:00 to 23:59)")
        return True
    if "T" not in text and " " not in text:
        raise ValueError(
            f'must be a time today ("18:00") or an ISO date and time '
            f'("2026-05-01T18:00", "2026-05-01T18:00+02:00"), not {text!r}'
        )
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 date and time (like 2026-05-01T18:00)"
        ) from None
    return when.tzinfo is None


def resolve_deadline(text: str, zone: ZoneInfo | None, now: dt.datetime) -> dt.datetime:
    """The deadline as an instant: `HH:MM` is today (in `zone`) at that time; an ISO time
    without an offset is in `zone`."""
    text = text.strip()
    if _CLOCK.fullmatch(text):
        assert zone is not None
        today = now.astimezone(zone).date()
        return dt.datetime.combine(today, dt.time(int(text[:2]), int(text[3:])), tzinfo=zone)
    when = dt.datetime.fromisoformat(text)
    if when.tzinfo is None:
        assert zone is not None
        when = when.replace(tzinfo=zone)
    return when


@functools.lru_cache(maxsize=1 << 16)
def number_zones(phone: str) -> tuple[str, ...]:
    """The zones phonenumbers gives an E.164 number (empty when it knows none)."""
    try:
        number = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return ()
    names = phone_zones.time_zones_for_number(number)
    return tuple(n for n in names if n != _UNKNOWN_ZONE)


@functools.lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    return ZoneInfo(name)


def zones_for(phone: str | None, fallback: ZoneInfo, at: dt.datetime) -> tuple[ZoneInfo, ...]:
    """The zones whose window a person must be inside: the number's own when it has some
    within `MAX_SPREAD_H` hours of each other at `at`, else `fallback`."""
    names = number_zones(phone) if phone else ()
    zones = []
    for name in names:
        try:
            zones.append(_zone(name))
        except (ZoneInfoNotFoundError, ValueError):
            continue
    if not zones:
        return (fallback,)
    offsets = [at.astimezone(z).utcoffset() or dt.timedelta() for z in zones]
    if max(offsets) - min(offsets) > dt.timedelta(hours=MAX_SPREAD_H):
        return (fallback,)
    return tuple(zones)


def open_in(window: Window, zone: ZoneInfo, at: dt.datetime) -> bool:
    local = at.astimezone(zone)
    return window.open_at(local.hour * 60 + local.minute)


def is_open(window: Window, zones: tuple[ZoneInfo, ...], at: dt.datetime) -> bool:
    """Open now in every zone, and still open `LEAVE_MARGIN_S` later (the request's way)."""
    later = at + dt.timedelta(seconds=LEAVE_MARGIN_S)
    return all(open_in(window, z, at) and open_in(window, z, later) for z in zones)


def next_open(window: Window, zones: tuple[ZoneInfo, ...], at: dt.datetime) -> dt.datetime | None:
    """The first instant at or after `at` when `is_open` holds; None if the window is never
    open in all the zones at once within the next days."""
    if is_open(window, zones, at):
        return at
    # Openings start at a window start in one of the zones: try those, in order.
    candidates = []
    for zone in zones:
        day = at.astimezone(zone).date()
        for shift in range(-1, 4):
            local = dt.datetime.combine(
                day + dt.timedelta(days=shift),
                dt.time(window.start // 60, window.start % 60),
                tzinfo=zone,
            )
            if local > at:
                candidates.append(local)
    for when in sorted(candidates):
        if is_open(window, zones, when):
            return when
    return None


def describe_opening(zones: tuple[ZoneInfo, ...], when: dt.datetime, at: dt.datetime) -> str:
    """`08:00 America/New_York` (the first zone's local time; with the date when it is not
    the day of `at` there), for `_error` and progress."""
    zone = zones[0]
    local = when.astimezone(zone)
    today = local.date() == at.astimezone(zone).date()
    return clock_in(zone.key, local, day_shown=not today)


@dataclass(frozen=True)
class Verdict:
    """Whether a person may be sent at an instant, and if not, until when to wait."""

    send: bool
    until: dt.datetime | None = None  # when the window opens (None: never, or deadline)
    error: str | None = None
    deadline: bool = False  # the deadline passed: nobody may be sent any more


@dataclass(frozen=True)
class Schedule:
    """The job's window (or none) and deadline (or none), for people's numbers."""

    window: Window | None
    fallback: ZoneInfo | None
    deadline: dt.datetime | None

    def verdict(self, phone: str | None, at: dt.datetime) -> Verdict:
        if self.deadline is not None and at >= self.deadline:
            return Verdict(
                False, error=f"deadline passed ({iso_instant(self.deadline)})", deadline=True
            )
        if self.window is None:
            return Verdict(True)
        assert self.fallback is not None
        zones = zones_for(phone, self.fallback, at)
        if is_open(self.window, zones, at):
            return Verdict(True)
        opens = next_open(self.window, zones, at)
        names = ", ".join(z.key for z in zones)
        if opens is None:
            return Verdict(
                False, error=f"send window {self.window} is never open in all of {names} at once"
            )
        if self.deadline is not None and opens >= self.deadline:
            return Verdict(
                False,
                error=f"send window {self.window} ({names}) opens only after the deadline",
            )
        return Verdict(
            False,
            until=opens,
            error=f"waiting for the send window {self.window}: opens "
            f"{describe_opening(zones, opens, at)}",
        )


def make_schedule(
    window: str | None, timezone: str | None, deadline: str | None, now: dt.datetime
) -> Schedule | None:
    """The schedule of a job's limits (already checked by `job.Limits`), None when it has
    neither a window nor a deadline."""
    if window is None and deadline is None:
        return None
    zone = parse_zone(timezone) if timezone else None
    return Schedule(
        parse_window(window) if window else None,
        zone,
        resolve_deadline(deadline, zone, now) if deadline else None,
    )
