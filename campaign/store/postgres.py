"""What every PostgreSQL part of the store shares: the URL as it may be shown (never with
its password), and one clear error when the server cannot be used.

A URL is shown in errors and logs, so it goes through `safe_url` first; psycopg's own
messages can quote the connection string (a malformed one is echoed back), so they are
cleaned the same way before they reach an operator.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from campaign.errors import StoreFailed, StoreUnavailable

CONNECT_TIMEOUT_S = 10

# key=value connection strings: password=secret or password='it''s secret'
_KEYWORD_PASSWORD = re.compile(r"\bpassword\s*=\s*(?:'(?:[^'\\]|\\.)*'|\S+)\s*", re.IGNORECASE)


def safe_url(url: str) -> str:
    """`url` without its password: postgresql://user:secret@host/db -> postgresql://user@host/db,
    also a ?password= parameter and a key=value string's password=."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub("", url).strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a malformed PostgreSQL URL)"
    userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"{userinfo.partition(':')[0]}@{hostport}" if at else hostport
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, v) for k, v in pairs if k.lower() != "password"])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _password(url: str) -> str | None:
    try:
        if "://" in url:
            parts = urlsplit(url)
            found = parts.password or dict(parse_qsl(parts.query)).get("password")
            return found or None
    except ValueError:
        return None
    match = _KEYWORD_PASSWORD.search(url)
    if match is None:
        return None
    return match.group().split("=", 1)[1].strip().strip("'") or None


def _reason(url: str, error: BaseException) -> str:
    """psycopg's message on one line, with neither the raw URL nor the password in it."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.replace(url, safe_url(url))
    secret = _password(url)
    if secret:
        text = text.replace(secret, "[hidden]")
    return text.removeprefix("connection failed: ")


def unavailable(url: str, error: BaseException) -> StoreUnavailable:
    return StoreUnavailable(safe_url(url), _reason(url, error))


def failed(url: str, error: BaseException) -> StoreFailed:
    return StoreFailed(safe_url(url), _reason(url, error))


async def connect(url: str, **options: Any) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection on the running loop; StoreUnavailable when there is none."""
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **options
        )
    except psycopg.Error as error:
        raise unavailable(url, error) from error
