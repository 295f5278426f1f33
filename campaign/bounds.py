"""Limits on data from outside that is not a spreadsheet: API answers, request bodies, job
files. Each reader checks its input against these before building anything from it, and
answers with one clear line when it is over.

API answers (Send API and Reporting API):
    MAX_SEND_ANSWER_BYTES   64 KiB read of a Send API answer (the rest is ignored)
    MAX_PAGE_BYTES          8 MiB read of a Reporting API page (a page holds 25 entries)
    MAX_JSON_DEPTH          32 levels of nested lists/objects; deeper is refused
    MAX_REPORT_PAGES        400,000 pages in one window (10 million entries); total_pages is
                            also never more than ceil(total_entries / per_page)
    PAGES_QUEUED            pages of one reading asked for ahead of the fetchers
    MAX_STATUS_DETAIL_CHARS 200 characters of sms_status_response kept and shown
    MAX_RETRY_AFTER_S       120 s: the longest Retry-After honoured (longer: this long)
    LOUD_WAIT_S             10 s: a wait longer than this is logged before it starts
    PROGRESS_EVERY_PAGES    a long reading logs a progress line every this many pages

Request bodies of the page's API (JSON):
    MAX_JSON_BODY_BYTES     256 KiB (a mapping, a list of numbers to suppress, a token)

Job files (YAML):
    MAX_JOB_FILE_BYTES      1 MiB
    MAX_YAML_ALIASES        50 aliases (`*name`); a job file needs a handful at most
"""

from __future__ import annotations

import json
from typing import Any

MAX_SEND_ANSWER_BYTES = 64 * 1024
MAX_PAGE_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 32
MAX_REPORT_PAGES = 400_000
PAGES_QUEUED = 64
MAX_STATUS_DETAIL_CHARS = 200
MAX_RETRY_AFTER_S = 120.0
LOUD_WAIT_S = 10.0
PROGRESS_EVERY_PAGES = 100

MAX_JSON_BODY_BYTES = 256 * 1024

MAX_JOB_FILE_BYTES = 1024 * 1024
MAX_YAML_ALIASES = 50


class JsonRefused(ValueError):
    """Not JSON, or JSON beyond the limits; `str()` says which, in a few words."""


def load_json(raw: bytes | str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` parsed, or `JsonRefused`: never RecursionError, never a structure deeper than
    `max_depth` or bigger than `max_bytes`."""
    size = len(raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise JsonRefused(f"larger than {max_bytes} bytes")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise JsonRefused(f"nested deeper than {max_depth} levels") from None
    except ValueError:  # UnicodeDecodeError is one
        raise JsonRefused("not JSON") from None
    _check_shape(value, max_depth)
    return value


def _check_shape(value: Any, limit: int) -> None:
    """`JsonRefused` when `value` nests lists/objects more than `limit` deep, or holds text
    that is not Unicode (a lone surrogate, `"\\ud800"`, which no file or database takes)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _unicode(item)
            continue
        if isinstance(item, dict):
            for key in item:
                _unicode(key)
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            raise JsonRefused(f"nested deeper than {limit} levels")
        stack.extend(
            (child, depth + 1) for child in children if isinstance(child, dict | list | str)
        )


def _unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JsonRefused("holds text that is not valid Unicode (a lone surrogate)") from None
