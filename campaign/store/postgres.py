"""What every PostgreSQL part of the store shares: the URL as it may be shown (never with
its password), and one clear error when the server cannot be used.

A URL is shown in errors and logs, so it goes through `safe_url` first; psycopg's own
messages can quote the connection string (a malformed one is echoed back), so they are
cleaned the same way before they reach an operator.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from campaign.errors import StoreFailed, StoreUnavailable

if TYPE_CHECKING:
    import psycopg

CONNECT_TIMEOUT_S = 10

# key=value connection strings: password=secret or password='it''s secret'
_KEYWORD_PASSWORD = re.compile(r"\bpassword\s*=\s*(?:'(?:[^'\\]|\\.)*'|\S+)\s*", re.IGNORECASE)


def safe_url(url: str) -> str:
    """`url` without its password: postgresql://user:secret@host/db -> postgresql://user@host/db,
    also a ?password= parameter and a key=value string's password=.

    A password may hold any character (`#`, `?`, `/`, `@`, percent-escapes), so the
    URL is not split the standard way (a `#` would start a fragment and leave the rest of
    the password in it): everything between the user name and the last `@` goes."""
    if "://" not in url:
        return _KEYWORD_PASSWORD.sub("", url).strip()
    scheme, _, rest = url.partition("://")
    userinfo, at, after = rest.rpartition("@")
    if at and ":" in userinfo:  # no `:` before the last `@`: no password in the userinfo
        rest = f"{userinfo.partition(':')[0]}@{after}"
    base, question, query = rest.partition("?")
    kept = [p for p in query.split("&") if p.partition("=")[0].lower() != "password"]
    return f"{scheme}://{base}{question if any(kept) else ''}{'&'.join(kept)}"


# ?password=... or &password=... up to the next `&` (or the end)
_QUERY_PASSWORD = re.compile(r"([?&])password=[^&]*", re.IGNORECASE)


_QUOTED = re.compile(r'"([^"]*)"')


def _shares(text: str, secrets: list[str], run: int = 3) -> bool:
    """Whether `text` holds `run` characters in a row of a secret (or a whole short one)."""
    return any(
        secret[i : i + run] in text
        for secret in secrets
        for i in range(max(1, len(secret) - run + 1))
    )


def _password(url: str) -> list[str]:
    """Every form the password may take in a message: as written, percent-decoded, and
    as libpq reads it."""
    found: list[str] = []
    if "://" in url:
        userinfo, at, _ = url.partition("://")[2].rpartition("@")
        if at and ":" in userinfo:
            found.append(userinfo.partition(":")[2])
        found += [m.group().split("=", 1)[1] for m in _QUERY_PASSWORD.finditer(url)]
    else:
        match = _KEYWORD_PASSWORD.search(url)
        if match is not None:
            found.append(match.group().split("=", 1)[1].strip().strip("'"))
    from psycopg.conninfo import conninfo_to_dict  # only when a PostgreSQL store is used

    with contextlib.suppress(Exception):  # a URL libpq cannot read has nothing more to give
        found.append(str(conninfo_to_dict(url).get("password") or ""))
    found += [unquote(secret) for secret in found]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def _reason(url: str, error: BaseException) -> str:
    """psycopg's message on one line, with neither the raw URL nor the password in it."""
    text = " ".join(str(error).split()) or type(error).__name__
    text = text.replace(url, safe_url(url))
    secrets = _password(url)
    for secret in secrets:
        text = text.replace(secret, "[hidden]")
    if secrets:
        # libpq quotes the part of a URL it could not parse, which may be a piece of the
        # password (`"x@y@127.0.0.1/db"` of `bob:S3C#RET?x@y@...`): such a quote goes.
        text = _QUOTED.sub(lambda m: '"[hidden]"' if _shares(m[1], secrets) else m[0], text)
        if _shares(text.replace(safe_url(url), ""), secrets, 4):
            return (
                "the server cannot be used with this URL (the reason is not shown: it "
                "quotes part of the password)"
            )
    return text.removeprefix("connection failed: ")


def unavailable(url: str, error: BaseException) -> StoreUnavailable:
    return StoreUnavailable(safe_url(url), _reason(url, error))


def failed(url: str, error: BaseException) -> StoreFailed:
    return StoreFailed(safe_url(url), _reason(url, error))


async def connect(url: str, **options: Any) -> psycopg.AsyncConnection[Any]:
    """An autocommit connection on the running loop; StoreUnavailable when there is none."""
    import psycopg

    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **options
        )
    except psycopg.Error as error:
        raise unavailable(url, error) from error


def schema_lock(schema: str) -> str:
    """The advisory lock (for `pg_advisory_xact_lock(hashtextextended(key, 0))`) under
    which a schema and the tables every component shares in it are created: creators of
    one schema starting together (hosts, or the list, the rate budget and the page's
    uploads on a database's first use) take turns instead of failing on the catalog."""
    return f"schema:{schema}"
