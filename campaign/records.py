"""The records the pipeline's stages pass to each other, and the statuses a person can have.

Kept apart from the store that persists them, so mapping, the gate and the dispatcher do not
depend on the ledger's SQL.

Recipient states: pending -> inflight -> sent | failed | unknown | pending (retry later);
`inflight` only while the request is open (docs/design.md, invariants 2 and 3).
"""

from __future__ import annotations

from dataclasses import dataclass

SENDABLE = ("pending", "failed")
STATUSES = ("sent", "failed", "unknown", "pending", "invalid", "duplicate", "suppressed")
# States in which a request may have reached the API: such a person stays in every report.
MAYBE_REACHED = ("sent", "unknown", "inflight")
# People whose last request a delivery report may show (`campaign reconcile`).
REQUESTED = ("sent", "unknown")


@dataclass(frozen=True)
class MappedRow:
    """One input row after mapping: what the ledger stores for it."""

    row: int
    cells: list[str]
    key: str | None = None
    payload: str | None = None  # JSON, ready to send
    to_phone: str | None = None
    error: str | None = None  # set: the row is invalid


@dataclass(frozen=True)
class Target:
    """A recipient to send to, as the dispatcher needs it."""

    id: int
    row: int
    payload: bytes
    attempts: int
    maybe_delivered: bool  # an earlier attempt may have arrived (state was unknown)
    to_phone: str | None = None  # for the checks right before sending (suppression, window)


@dataclass(frozen=True)
class RunInfo:
    id: int
    command: str
    started_at: float
    finished_at: float | None
    state: str
    requests: int


@dataclass(frozen=True)
class Outcome:
    recipient_id: int
    n: int
    state: str
    http_status: int | None
    error: str | None
    sent_at: str | None
