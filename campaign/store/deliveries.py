"""A ledger's delivery-report tables (`campaign reconcile`): the requests a report may
show, the entries read, the windows of time read whole, what each person's entry says, and
the numbers a delivery error puts on the suppression list.

`Ledger` carries these as a mixin: they share its connection and transactions, and the
requests they read are the ones the sending side recorded.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from campaign.records import REQUESTED
from campaign.store.db import batched

if TYPE_CHECKING:
    from campaign.store.db import Database, Transaction

# How far a request's answer says it reached the API (`matching`: NOT_ARRIVED, MAYBE,
# ARRIVED). Certainly not: the connection never opened (policy's "could not connect"),
# 408/429/503, or another refusal (3xx/4xx); the server did not act. Known: 200 with
# success. Anything else may have arrived: a timeout, a dropped connection, 500/502/504,
# in flight when a run died, a 2xx that was not success (when in doubt, a possible owner).
# An attempt recorded `suppressed` was held back after its in-flight record: it never left.
_REQUEST_KIND = """CASE WHEN a.state = 'sent' THEN 2 WHEN a.state = 'suppressed' THEN 0
    WHEN a.http_status IN (408, 429, 503) OR (a.http_status >= 300 AND a.http_status < 500)
        OR (a.http_status IS NULL AND a.error LIKE 'could not connect%') THEN 0
    ELSE 1 END"""

# Test sends (store/test_sends.py, a table of their own) as requests for matching: answered
# 200 arrived; failed or waiting for a retry certainly did not; in flight or unknown, maybe.
TEST_SENDS = "test_sends"
_TEST_KIND = (
    "CASE WHEN t.state = 'sent' THEN 2 WHEN t.state IN ('failed', 'pending') THEN 0 ELSE 1 END"
)


class DeliveryTables:
    """Reads and writes of the delivery tables; `db` and `transaction` are the ledger's."""

    db: Database

    def transaction(self, changes: bool = True) -> Transaction:
        raise NotImplementedError

    def request_span(self) -> tuple[float, float] | None:
        """(first, last) start time of the requests of people who may have been reached."""
        found = self.db.execute(
            f"SELECT min(a.started_at), max(a.started_at) FROM attempts a "
            f"JOIN recipients r ON r.id = a.recipient_id WHERE r.state IN {REQUESTED}"
        ).fetchone()
        return None if found[0] is None else (found[0], found[1])

    def attempt_span(self) -> tuple[float, float] | None:
        """(first, last) start time of every request of the campaign, whatever came of it."""
        found = self.db.execute("SELECT min(started_at), max(started_at) FROM attempts").fetchone()
        return None if found[0] is None else (found[0], found[1])

    def requests(
        self, start: float, end: float, share: int = 0, shares: int = 1, batch: int = 100_000
    ) -> Iterator[list[tuple[Any, ...]]]:
        """(recipient id, or -1 for a person a delivery report says nothing of; phone as
        E.164 digits; start; kind) of every request started in [start, end] to a number in
        `share` of `shares` (number modulo shares), a batch at a time. The kind, from its
        answer (`matching`): 2 known to have arrived, 0 certainly not, 1 maybe.
        A test send's request (`store/test_sends.py`) owns its entry like anyone's: it
        competes as a person the report says nothing of, so its entry never confirms an
        `unknown` person of the same number."""
        # The number the request went to: a person's number may have been fixed since.
        number = "coalesce(a.to_phone, r.to_phone)"
        phone = f"CAST(substr({number}, 2) AS BIGINT)"
        sql = (
            f"SELECT CASE WHEN r.state IN {REQUESTED} THEN r.id ELSE -1 END, {phone}, "
            f"a.started_at, {_REQUEST_KIND} FROM attempts a "
            f"JOIN recipients r ON r.id = a.recipient_id WHERE {number} IS NOT NULL "
            f"AND a.started_at BETWEEN ? AND ? AND {phone} % ? = ?"
        )
        params: tuple[Any, ...] = (start, end, shares, share)
        if "to_phone" in self.db.columns(TEST_SENDS):
            test_phone = "CAST(substr(t.to_phone, 2) AS BIGINT)"
            sql += (
                f" UNION ALL SELECT -1, {test_phone}, t.sent_at, {_TEST_KIND} "
                f"FROM {TEST_SENDS} t WHERE t.sent_at BETWEEN ? AND ? AND {test_phone} % ? = ?"
            )
            params += params
        yield from batched(self.db.stream(sql, params, batch), batch)

    def report_windows(self) -> list[tuple[float, float, bool, float | None]]:
        """(start, end, read whole, when) of every span of the Reporting API looked at."""
        return [
            (start, end, bool(complete), read_at)
            for start, end, complete, read_at in self.db.execute(
                "SELECT start_at, end_at, complete, read_at FROM report_windows ORDER BY start_at"
            )
        ]

    def begin_window(self, start: float, end: float) -> None:
        """A window about to be read: known from now on (a read one keeps what it was)."""
        with self.transaction(changes=False):
            self.db.execute(
                "INSERT INTO report_windows (start_at, end_at) VALUES (?, ?) "
                "ON CONFLICT (start_at) DO NOTHING",
                (start, end),
            )

    def store_entries(
        self, entries: list[tuple[str, int, float, str, str | None]], run_id: int
    ) -> int:
        """Entries of a page as read by reconcile `run_id`: (key, phone digits, created_at,
        status, error); a later reading of an entry replaces the earlier one (statuses
        move on). Returns how many of them this run had read already."""
        with self.transaction(changes=False):
            keys = [entry[0] for entry in entries]
            marks = ",".join("?" * len(keys))
            repeated = self.db.execute(
                f"SELECT count(*) FROM report_entries WHERE read_by = ? AND key IN ({marks})",
                (run_id, *keys),
            ).fetchone()[0]
            self.db.executemany(
                "INSERT INTO report_entries (key, phone, created_at, status, error, read_by) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "phone = excluded.phone, created_at = excluded.created_at, "
                "status = excluded.status, error = excluded.error, read_by = excluded.read_by",
                [(*entry, run_id) for entry in entries],
            )
        return int(repeated)

    def finish_window(self, start: float, end: float, read_at: float) -> None:
        """Every page of the window [start, end] was read at `read_at`."""
        with self.transaction(changes=False):
            self.db.execute(
                "UPDATE report_windows SET end_at = ?, complete = 1, read_at = ? "
                "WHERE start_at = ?",
                (end, read_at, start),
            )

    def report_entries(
        self, start: float, end: float, share: int = 0, shares: int = 1, batch: int = 100_000
    ) -> Iterator[list[tuple[Any, ...]]]:
        """(entry id, phone digits, created_at, status, error) of the entries created in
        [start, end] whose number is in `share` of `shares`, a batch at a time."""
        yield from batched(
            self.db.stream(
                "SELECT id, phone, created_at, status, error FROM report_entries "
                "WHERE created_at BETWEEN ? AND ? AND phone % ? = ?",
                (start, end, shares, share),
                batch,
            ),
            batch,
        )

    def record_deliveries(
        self,
        matched: list[tuple[int, str, str | None, int, str]],
        not_found: list[tuple[int, float]],
        checked_at: str,
        ambiguous: list[tuple[int, str]] | None = None,
    ) -> int:
        """What the report says, in one transaction: `matched` (recipient id, status,
        error, entry id, entry time as ISO), `not_found` (recipient id, start of their
        latest request) and `ambiguous` (recipient id, why). An `unknown` recipient with an
        entry did reach the API: it becomes `sent`. Neither not_found nor ambiguous ever
        replaces an entry seen before (once confirmed, always sent). Returns how many
        unknown recipients were confirmed."""
        with self.transaction():
            self.db.executemany(
                "INSERT INTO deliveries (recipient_id, status, error, checked_at, entry) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (recipient_id) DO UPDATE SET "
                "status = excluded.status, error = excluded.error, "
                "checked_at = excluded.checked_at, entry = excluded.entry",
                [(rid, status, error, checked_at, key) for rid, status, error, key, _ in matched],
            )
            unowned: list[tuple[int, str, str | None, str, float | None]] = [
                (rid, "not_found", None, checked_at, at) for rid, at in not_found
            ]
            unowned += [(rid, "ambiguous", why, checked_at, None) for rid, why in ambiguous or []]
            self.db.executemany(
                "INSERT INTO deliveries (recipient_id, status, error, checked_at, request_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (recipient_id) DO UPDATE SET "
                "status = excluded.status, error = excluded.error, "
                "checked_at = excluded.checked_at, request_at = excluded.request_at "
                "WHERE deliveries.entry IS NULL",
                unowned,
            )
            return max(
                self.db.executemany(
                    "UPDATE recipients SET state = 'sent', "
                    "error = 'confirmed by the delivery report', sent_at = coalesce(sent_at, ?) "
                    "WHERE id = ? AND state = 'unknown'",
                    [(at, rid) for rid, _, _, _, at in matched],
                ).rowcount,
                0,
            )

    def delivery_counts(self) -> dict[str, int]:
        """Lines of the report per delivery state (those with one)."""
        return dict(
            self.db.execute(
                "SELECT delivery, count(*) FROM results WHERE delivery IS NOT NULL "
                "GROUP BY delivery ORDER BY delivery"
            ).fetchall()
        )

    def add_suppress_candidates(self, numbers: list[tuple[str, str, str]]) -> None:
        """(E.164 number, reason, seen at): numbers the delivery report says must not get
        another SMS, kept for the store's suppression list to take."""
        with self.transaction(changes=False):
            self.db.executemany(
                "INSERT INTO suppress_candidates (phone, reason, seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT (phone) DO UPDATE SET reason = excluded.reason, "
                "seen_at = excluded.seen_at",
                numbers,
            )

    def suppress_candidates(self) -> list[tuple[str, str, str]]:
        return self.db.execute(
            "SELECT phone, reason, seen_at FROM suppress_candidates ORDER BY phone"
        ).fetchall()
