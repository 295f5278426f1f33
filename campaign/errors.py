"""The errors an operator can be shown, each carrying what it is about.

    CampaignError                 anything that stops a command with one clear line
     ├── UsageError               exit 2: nothing was sent
     │    ├── JobError            a job file key or ${VAR} (names the file and key)
     │    ├── OptionError         a command-line option's value (names the option)
     │    ├── InputError          the spreadsheet (names the file, row, column)
     │    ├── CampaignBusy        another process holds the campaign's lock
     │    ├── UnfinishedCampaign  the midnight guard: yesterday's campaign did not finish
     │    └── StoreUnavailable    PostgreSQL cannot be used (names the URL, not its password)
     ├── StoreFailed              exit 1: PostgreSQL failed mid-run (names the URL)
     └── ReportingRefused         exit 3: the Reporting API refused the job's agent or token

    PageUnreadable                a page of an Avaamo API could not be read after its retries:
                                  not a CampaignError, it never ends a command by itself (its
                                  window is left unread, exit 1)
    LedgerError                   a tuple, not a class: (sqlite3.Error, StoreFailed), what any
                                  ledger call may raise, for `except LedgerError` whichever store

SQLite's own errors are not wrapped into the tree: one that nobody catches is a crash to
report (exit 1 and a crash file with its traceback: a full disk, a damaged file), which a
CampaignError would cut to one line. `StoreFailed` is the PostgreSQL side of the tuple.

A bad *row* is not an exception: it becomes an `invalid` row in the results.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


class CampaignError(Exception):
    """An error an operator can act on; `str()` is the one line shown."""

    exit_code = 1


class UsageError(CampaignError):
    """The job, arguments or input cannot be used; nothing was sent."""

    exit_code = 2


class JobError(UsageError):
    def __init__(self, path: Path | str, message: str, key: str | None = None) -> None:
        self.path = str(path)
        self.key = key
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + message)


class OptionError(UsageError):
    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"{option}: {message}")


class InputError(UsageError):
    def __init__(
        self,
        path: Path | str,
        message: str,
        *,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path = str(path)
        self.row = row
        self.column = column
        where = self.path
        if row is not None:
            where += f", row {row}"
        if column is not None:
            where += f", column {column!r}"
        super().__init__(f"{where}: {message}")


class CampaignBusy(UsageError):
    """Two processes must never send the same campaign at once."""


class UnfinishedCampaign(UsageError):
    """A new default campaign id would start over a campaign that did not finish."""


class ReportingRefused(CampaignError):
    """The Reporting API answered 401/403/404: the job's `reporting:` is wrong."""

    exit_code = 3


class StoreUnavailable(UsageError):
    """At start: a bad URL, a refused connection, wrong credentials, missing rights."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url  # without its password (store.postgres.safe_url)
        super().__init__(f"PostgreSQL at {url}: {message}")


class StoreFailed(CampaignError):
    """Mid-run: the server went away or refused a statement; nothing more may leave."""

    def __init__(self, url: str, message: str) -> None:
        self.url = url
        super().__init__(f"PostgreSQL at {url}: {message}")


class PageUnreadable(Exception):
    """A page that could not be read after the retries the policy allows; one line."""


LedgerError: tuple[type[Exception], ...] = (sqlite3.Error, StoreFailed)
