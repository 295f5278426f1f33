"""What an error message may say about a sheet's header row.

A file without a header row makes its first person the header: an error about a column
would then quote their name, email and phone into cron logs and the page. So a header is
quoted only when every cell looks like a column name (no email, time or URL, no phone,
id or date digits, no long text); otherwise the message says that the first row looks
like data and how many cells it has. The check is on the whole row: one cell that looks
like data is enough, because a row of data usually holds a phone, an id or an email.
A row of words only (names, cities) still looks like a header; nothing can tell the two
apart by shape.
"""

from __future__ import annotations

import difflib
import re

MAX_NAME = 40  # longer is a note, an address or a sentence, not a column name
MAX_LISTED = 20
_DATA_CHARS = re.compile(r"[@:+\n\r\t]")  # emails, times and URLs, phones, cell breaks
_DIGIT_RUN = re.compile(r"\d{4}")  # years, ids, phone groups, postcodes
_DATE = re.compile(r"\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}")
_NUMBER = re.compile(r"[-+]?[\d.,]+")


def looks_like_name(cell: str) -> bool:
    """Could this header cell be a column name rather than a value?"""
    text = cell.strip()
    return not (
        len(text) > MAX_NAME
        or _DATA_CHARS.search(text)
        or _DIGIT_RUN.search(text)
        or sum(c.isdigit() for c in text) >= 5
        or _DATE.search(text)
        or _NUMBER.fullmatch(text)
    )


def looks_like_names(columns: list[str]) -> bool:
    return all(looks_like_name(c) for c in columns)


def about_missing(columns: list[str], wanted: str) -> str:
    """What a message about a column `wanted` that the header lacks may say of the header:
    its names and the closest one, or, when it looks like data, only its size."""
    names = [c.strip() for c in columns if c.strip()]
    if not looks_like_names(columns):
        return about_data(columns)
    by_lower = {n.lower(): n for n in names}
    close = difflib.get_close_matches(wanted.strip().lower(), list(by_lower), n=1, cutoff=0.6)
    hint = f"did you mean {by_lower[close[0]]!r}? " if close else ""
    listed = ", ".join(repr(n) for n in names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        listed += f" and {len(names) - MAX_LISTED} more"
    return f"{hint}the columns are: {listed or 'none'}"


def about_data(columns: list[str]) -> str:
    """What may be said of a header that looks like data: its size only."""
    return (
        "the first row looks like data, not column names, so it is not repeated here: "
        f"add a header row if the file has none (the first row has {len(columns)} cells)"
    )
