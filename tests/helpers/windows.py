"""Numbers in known zones and local-time arithmetic for send-window tests."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

NEW_YORK, HONOLULU = ZoneInfo("America/New_York"), ZoneInfo("Pacific/Honolulu")
NY_PHONES = ["+1 212 555 0100", "+1 212 555 0101", "+1 212 555 0102"]


HNL_PHONES = ["+1 808 555 0101", "+1 808 555 0102"]


TOLL_FREE = ["+1 800 234 5678", "+1 888 234 5678"]


def hhmm(minutes: int) -> str:
    minutes %= 24 * 60
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def local_minutes(zone: ZoneInfo, at: dt.datetime | None = None) -> int:
    local = (at or dt.datetime.now(dt.UTC)).astimezone(zone)
    return local.hour * 60 + local.minute


def ny_open_hnl_closed() -> str:
    """A window open now in New York and closed now in Honolulu (5 or 6 hours behind)."""
    now = local_minutes(NEW_YORK)
    return f"{hhmm(now - 60)}-{hhmm(now + 120)}"


def new_york_hours() -> dict[str, str]:
    """Job limits whose send window is open now in New York, closed now in Honolulu."""
    return {"send_window": ny_open_hnl_closed(), "timezone": "America/New_York"}
