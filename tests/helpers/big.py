"""A large campaign's ledger made in SQL in seconds (no send): for sizes and bounds."""

from __future__ import annotations

from pathlib import Path

from campaign.store.ledger import LEDGER_FILE, Ledger

_SEQ = "WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < ?) "
_PHONE = "'+1415' || printf('%07d', i)"


def big_ledger(output_dir: Path, campaign: str, people: int, rate: float = 10.0) -> Ledger:
    """A SQLite ledger of `people` sent at `rate` per second, a day and more for a million:
    every 10th person retried once, every 50th failed with an answer that quotes their
    number and first name (`P{i}`), every 97th unknown. Its first 5,000 people wait
    for their send window, in five openings."""
    directory = output_dir / campaign
    directory.mkdir(parents=True)
    ledger = Ledger(directory / LEDGER_FILE)
    state = (
        "CASE WHEN i <= 5000 THEN 'pending' WHEN i % 50 = 0 THEN 'failed' "
        "WHEN i % 97 = 0 THEN 'unknown' ELSE 'sent' END"
    )
    error = (
        "CASE WHEN i <= 5000 THEN 'waiting for the send window 08:00-21:00: opens ' "
        "|| printf('%02d:00', 8 + i % 5) || ' America/New_York' "
        f'WHEN i % 50 = 0 THEN \'HTTP 400: Bad Request {{"error": "\' || {_PHONE} '
        "|| ' (P' || i || ') refused\"}' WHEN i % 97 = 0 THEN 'no answer in time (2 s)' END"
    )
    start = 1_790_000_000.0
    with ledger.transaction() as db:
        db.execute(
            "INSERT INTO runs (id, command, started_at, finished_at, state, requests) "
            "VALUES (1, 'run', ?, ?, 'finished', ?)",
            (start, start + people / rate, people),
        )
        db.execute(
            f"{_SEQ}INSERT INTO rows (row, cells, status, key, payload, to_phone) "
            f"SELECT i, '[]', 'ok', 'k' || i, '{{}}', {_PHONE} FROM seq",
            (people,),
        )
        db.execute(
            f"{_SEQ}INSERT INTO recipients (id, key, payload, to_phone, state, attempts, "
            f"error, row) SELECT i, 'k' || i, '{{\"first_name\": \"P' || i || '\"}}', "
            f"{_PHONE}, {state}, CASE WHEN i <= 5000 THEN 0 WHEN i % 10 = 0 THEN 2 "
            f"ELSE 1 END, {error}, i FROM seq",
            (people,),
        )
        db.execute(
            f"{_SEQ}INSERT INTO attempts (recipient_id, n, run_id, started_at, finished_at, "
            "state) SELECT i, 1, 1, ? + i / ?, ? + i / ? + 0.2, CASE WHEN i % 10 = 0 "
            f"THEN 'pending' ELSE {state} END FROM seq WHERE i > 5000",
            (people, start, rate, start, rate),
        )
        db.execute(
            "INSERT INTO attempts (recipient_id, n, run_id, started_at, finished_at, state) "
            "SELECT recipient_id, 2, 1, started_at + 1, finished_at + 1, r.state "
            "FROM attempts JOIN recipients r ON r.id = recipient_id WHERE r.attempts = 2"
        )
    return ledger
