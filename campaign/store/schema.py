"""The ledger's schema: its tables and the views the report reads, for SQLite and
PostgreSQL alike (`Database.ddl` adapts the types). `SCHEMA_VERSION` counts its migrations
(`Ledger._migrate`)."""

from __future__ import annotations

from campaign.records import MAYBE_REACHED

ROWS_COLUMNS = """
    row INTEGER PRIMARY KEY,
    cells TEXT NOT NULL,
    status TEXT NOT NULL,
    key TEXT,
    payload TEXT,
    to_phone TEXT,
    error TEXT
"""
LEDGER_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (key, value) VALUES ('generation', '0') ON CONFLICT (key) DO NOTHING;
CREATE TABLE IF NOT EXISTS recipients (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    payload TEXT NOT NULL,
    to_phone TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    http_status INTEGER,
    error TEXT,
    sent_at TEXT,
    row INTEGER,
    claim INTEGER,
    set_aside INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS attempts (
    recipient_id INTEGER NOT NULL,
    n INTEGER NOT NULL,
    run_id INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    state TEXT,
    http_status INTEGER,
    error TEXT,
    to_phone TEXT,
    PRIMARY KEY (recipient_id, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rows ({ROWS_COLUMNS});
CREATE INDEX IF NOT EXISTS rows_key ON rows (key, row);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    command TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    state TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    heartbeat_at REAL,
    host TEXT,
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS deliveries (
    recipient_id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    error TEXT,
    checked_at TEXT NOT NULL,
    entry INTEGER,
    request_at REAL
);
CREATE TABLE IF NOT EXISTS report_entries (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE,
    phone INTEGER NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    read_by INTEGER
);
CREATE INDEX IF NOT EXISTS report_entries_time ON report_entries (created_at);
CREATE TABLE IF NOT EXISTS report_windows (
    start_at REAL PRIMARY KEY,
    end_at REAL NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    read_at REAL
);
CREATE TABLE IF NOT EXISTS suppress_candidates (
    phone TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
""".replace("{ROWS_COLUMNS}", ROWS_COLUMNS)

# The results: one line per input row in input order (`row_results`), then the people who
# may have been reached but are in no row of the current input (`gone_results`; invariant
# 4: once sent, always shown). A row shows its person's state when it is a sendable row,
# or when its person was reached before the row became unusable, or was sent before its
# number went on the suppression list. The report and the counts read the same views.
RESULTS_VIEWS = (
    f"""
CREATE TEMP VIEW row_results AS
SELECT rows.row AS row, rows.cells AS cells,
    CASE WHEN p.id IS NULL THEN rows.status
         WHEN p.state = 'inflight' THEN 'unknown' ELSE p.state END AS status,
    coalesce(p.to_phone, rows.to_phone) AS to_phone,
    p.attempts AS attempts, p.http_status AS http_status,
    CASE WHEN p.id IS NULL THEN rows.error
         WHEN rows.status IN ('invalid', 'suppressed')
         THEN coalesce(CASE p.state WHEN 'sent' THEN 'sent earlier' ELSE p.error END, '')
              || '; the row now: ' || rows.error
         ELSE p.error END AS error,
    p.sent_at AS sent_at,
    d.status AS delivery, d.error AS delivery_error, d.checked_at AS delivery_checked_at
FROM rows LEFT JOIN recipients p ON p.key = rows.key AND (
    rows.status = 'ok' OR (rows.status IN ('invalid', 'suppressed') AND p.state IN {MAYBE_REACHED}))
LEFT JOIN deliveries d ON d.recipient_id = p.id
""",
    f"""
CREATE TEMP VIEW gone_results AS
SELECT p.row AS was_row, CASE p.state WHEN 'inflight' THEN 'unknown' ELSE p.state END AS status,
    p.to_phone AS to_phone, p.attempts AS attempts, p.http_status AS http_status,
    'not in the current input' || coalesce(' (was row ' || p.row || ')', '')
        || coalesce('; ' || p.error, '') AS error,
    p.sent_at AS sent_at,
    d.status AS delivery, d.error AS delivery_error, d.checked_at AS delivery_checked_at
FROM recipients p LEFT JOIN deliveries d ON d.recipient_id = p.id
WHERE p.state IN {MAYBE_REACHED} AND NOT EXISTS (SELECT 1 FROM rows WHERE rows.key = p.key)
""",
    """
CREATE TEMP VIEW results AS
SELECT status, delivery FROM row_results UNION ALL SELECT status, delivery FROM gone_results
""",
)
DROP_RESULTS_VIEWS = tuple(
    f"DROP VIEW IF EXISTS {name}" for name in ("results", "row_results", "gone_results")
)
