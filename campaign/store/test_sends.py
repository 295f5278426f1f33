"""A campaign's test sends (`campaign test`), in a table of their own in its ledger.

They are kept apart from the campaign's people: no recipient, attempt or delivery row
is written for them, so a later run sends everyone as it would have without the test,
and the results and the status counts never show them. The summary lists them under
`tests`, with the test number masked.

A test request is recorded in flight before it leaves and updated once it is answered,
like a person's attempt: a test cut off between the two shows as `unknown`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from campaign.logs import mask_phone
from campaign.store.deliveries import TEST_SENDS
from campaign.store.ledger import Ledger
from campaign.times import iso_utc

TABLE = TEST_SENDS  # the ledger's matching reads it too (`Ledger.requests`)
_SCHEMA = f"""CREATE TABLE IF NOT EXISTS {TABLE} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sent_at REAL NOT NULL,
    to_phone TEXT NOT NULL,
    row INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    http_status INTEGER,
    error TEXT,
    report_key TEXT,
    sms_status TEXT,
    sms_status_response TEXT,
    checked_at REAL
)"""


@dataclass(frozen=True)
class Report:
    """What the Reporting API's entry for a test request said."""

    key: str
    status: str
    error: str | None


def ensure(ledger: Ledger) -> None:
    """Create the table in a ledger that has none (any schema version has room for it)."""
    if TABLE not in _tables(ledger):
        ledger.db.execute(ledger.db.ddl(_SCHEMA))


def begin(ledger: Ledger, to_phone: str, row: int, sent_at: float) -> int:
    """A test request about to leave, committed before it does; its id."""
    with ledger.transaction(changes=True) as db:
        found = db.execute(
            f"INSERT INTO {TABLE} (sent_at, to_phone, row, state, attempts) "
            "VALUES (?, ?, ?, 'inflight', 1) RETURNING id",
            (sent_at, to_phone, row),
        ).fetchone()
    return int(found[0])


def attempt(ledger: Ledger, test_id: int, number: int, sent_at: float) -> None:
    """Another attempt of the same test request (a retry), in flight."""
    with ledger.transaction(changes=True) as db:
        db.execute(
            f"UPDATE {TABLE} SET state = 'inflight', attempts = ?, sent_at = ? WHERE id = ?",
            (number, sent_at, test_id),
        )


def answered(
    ledger: Ledger, test_id: int, state: str, http_status: int | None, error: str | None
) -> None:
    with ledger.transaction(changes=True) as db:
        db.execute(
            f"UPDATE {TABLE} SET state = ?, http_status = ?, error = ? WHERE id = ?",
            (state, http_status, error, test_id),
        )


def reported(ledger: Ledger, test_id: int, report: Report, checked_at: float) -> None:
    with ledger.transaction(changes=True) as db:
        db.execute(
            f"UPDATE {TABLE} SET report_key = ?, sms_status = ?, sms_status_response = ?, "
            "checked_at = ? WHERE id = ?",
            (report.key, report.status, report.error, checked_at, test_id),
        )


def claimed_keys(ledger: Ledger, to_phone: str) -> set[str]:
    """The report entries earlier tests to this number were matched with."""
    if TABLE not in _tables(ledger):
        return set()
    found = ledger.db.execute(
        f"SELECT report_key FROM {TABLE} WHERE to_phone = ? AND report_key IS NOT NULL",
        (to_phone,),
    )
    return {key for (key,) in found}


def summary(ledger: Ledger) -> list[dict[str, Any]]:
    """The campaign's test sends for summary.json: the number masked, no param value."""
    if TABLE not in _tables(ledger):
        return []
    found = ledger.db.execute(
        f"SELECT sent_at, to_phone, row, state, attempts, http_status, error, sms_status, "
        f"sms_status_response FROM {TABLE} ORDER BY id"
    )
    tests = []
    for sent_at, phone, row, state, attempts, http_status, error, status, response in found:
        test: dict[str, Any] = {
            "at": iso_utc(sent_at),
            "to": mask_phone(phone),
            "row": row,
            # In flight when its process stopped: it may have arrived.
            "state": "unknown" if state == "inflight" else state,
            "attempts": attempts,
            "http_status": http_status,
        }
        if error:
            test["error"] = error
        if status:
            test["sms_status"] = status
            if response:
                test["sms_status_response"] = response
        tests.append(test)
    return tests


def _tables(ledger: Ledger) -> set[str]:
    db = ledger.db
    if db.postgres:
        found = db.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema() AND table_name = ?",
            (TABLE,),
        )
    else:
        found = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
        )
    return {name for (name,) in found}
