"""Every time we show, in one form per use: UTC for results and records, the local clock
for the operator's messages."""

from __future__ import annotations

import datetime as dt
import time


def iso_utc(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 UTC (seconds), the form of every time we record."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def iso_local(when: float | dt.datetime) -> str:
    """A Unix time or an aware datetime as this machine's local time, to the minute: when
    a send window opens, for the operator."""
    if not isinstance(when, dt.datetime):
        when = dt.datetime.fromtimestamp(when)
    return when.astimezone().isoformat(timespec="minutes")


def iso_instant(when: dt.datetime) -> str:
    """A datetime as written in the job file's terms (ISO 8601 with its offset): a
    deadline in a message."""
    return when.isoformat()


def clock_in(zone_key: str, when: dt.datetime, day_shown: bool) -> str:
    """`08:00 America/New_York`, or `2026-03-02 08:00 America/New_York` when the day is not
    today's there; `when` is already in that zone."""
    day = f"{when.date().isoformat()} " if day_shown else ""
    return f"{day}{when.strftime('%H:%M')} {zone_key}"


def local_stamp() -> str:
    """Now, on this machine's clock, as a lock holder states it."""
    return time.strftime("%Y-%m-%d %H:%M:%S")


def compact_stamp() -> str:
    """Now, on this machine's clock, as part of a file or campaign name."""
    return time.strftime("%Y%m%d-%H%M%S")
