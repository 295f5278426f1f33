"""Report: the per-row results CSV and summary.json, rebuilt from the ledger.

Both are written to a temporary file beside the target, fsynced and renamed over it (the
directory is fsynced too), so a reader never sees half a file, not even after a power cut.
Rows stream from SQLite to the CSV: memory does not grow with the campaign.

Every report written is stamped in the ledger with the ledger's generation and both files'
size and time, whoever wrote it (run, validate, report, the page). The generation moves
only when what the report shows changes (people, rows, deliveries; not a run's own
bookkeeping), so a rerun that changes nobody finds the stamp matching and leaves both
files alone, bytes and times (`current_summary`). A summary written while another worker
was still running is never taken as current: that worker's end must rewrite it.
"""

from __future__ import annotations

import collections
import csv
import json
import time
from pathlib import Path
from typing import Any

from campaign.escape import escape
from campaign.files import atomic_write
from campaign.records import STATUSES
from campaign.store.ledger import Ledger
from campaign.times import iso_utc

RESULT_COLUMNS = [
    "_row",
    "_status",
    "_to_phone",
    "_attempts",
    "_http_status",
    "_error",
    "_sent_at",
    "_delivery",
    "_delivery_error",
    "_delivery_checked_at",
]
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.json"
_MAYBE_FORMULA = frozenset("=@\t\r+-'")
# Where a line's `_status` and `_delivery` are among the ledger's result values.
_STATUS = RESULT_COLUMNS.index("_status")
_DELIVERY = RESULT_COLUMNS.index("_delivery")


def write_report(ledger: Ledger, directory: Path, campaign: str) -> dict[str, Any]:
    """Write results.csv and summary.json; return the summary."""
    with ledger.report_turn():
        return _write_report(ledger, directory, campaign)


def _write_report(ledger: Ledger, directory: Path, campaign: str) -> dict[str, Any]:
    generation = ledger.generation()
    columns: list[str] = ledger.get_meta("columns") or []
    blank = [""] * len(columns)
    # The summary's counts are taken from the lines as they are written: the same view,
    # without reading a large campaign's ledger a second and a third time.
    statuses: collections.Counter[str] = collections.Counter()
    deliveries: collections.Counter[str] = collections.Counter()
    with atomic_write(directory / RESULTS_FILE) as out:
        writer = csv.writer(out)
        writer.writerow([escape(c) for c in columns + RESULT_COLUMNS])
        for cells, *results in ledger.report_rows():
            statuses[results[_STATUS]] += 1
            if results[_DELIVERY]:
                deliveries[results[_DELIVERY]] += 1
            # No cells: a person reached earlier whose row is gone from the input.
            values = json.loads(cells) if cells is not None else list(blank)
            values.extend(results)
            # escape() changes only cells starting with one of these: test that first.
            writer.writerow([escape(v) if v[:1] in _MAYBE_FORMULA else v for v in values])
    counts = {**dict.fromkeys(STATUSES, 0), **statuses}
    summary = write_summary(ledger, directory, campaign, counts, dict(sorted(deliveries.items())))
    # Stamped last: a report cut off halfway is never taken for a current one.
    settled = summary.get("last_run", {}).get("state") != "running"
    ledger.set_report_stamp(_stamp(directory, generation) if settled else None)
    return summary


def report_is_current(ledger: Ledger, directory: Path) -> bool:
    """Whether results.csv and summary.json show the ledger as it is: nothing they show
    changed in the ledger since they were written, and the files are the ones written
    then."""
    stamp = _stamp(directory, ledger.generation())
    return stamp is not None and ledger.get_meta("report_stamp") == stamp


def current_summary(ledger: Ledger, directory: Path) -> dict[str, Any] | None:
    """The summary in summary.json when the report is current (`report_is_current`): its
    counts are the ledger's, read without a scan of the campaign. None: not current."""
    if not report_is_current(ledger, directory):
        return None
    try:
        found = json.loads((directory / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and isinstance(found.get("counts"), dict) else None


def _stamp(directory: Path, generation: int) -> list[int] | None:
    try:
        results = (directory / RESULTS_FILE).stat()
        summary = (directory / SUMMARY_FILE).stat()
    except OSError:
        return None
    return [
        generation,
        results.st_size,
        results.st_mtime_ns,
        summary.st_size,
        summary.st_mtime_ns,
    ]


def write_summary(
    ledger: Ledger,
    directory: Path,
    campaign: str,
    counts: dict[str, int] | None = None,
    delivery: dict[str, int] | None = None,
) -> dict[str, Any]:
    with ledger.report_turn():
        summary = summarize(ledger, campaign, counts, delivery)
        with atomic_write(directory / SUMMARY_FILE) as out:
            json.dump(summary, out, indent=2)
            out.write("\n")
        from campaign.report_html import write_report_html  # it builds on this module

        write_report_html(ledger, directory, campaign, summary)
    return summary


def summarize(
    ledger: Ledger,
    campaign: str,
    counts: dict[str, int] | None = None,
    delivery: dict[str, int] | None = None,
) -> dict[str, Any]:
    """`counts`, `delivery`: the ledger's counts, when the caller has just read them."""
    counts = counts if counts is not None else ledger.counts()
    summary: dict[str, Any] = {
        "campaign": campaign,
        "rows": sum(counts.values()),
        "counts": counts,
        "attempts": ledger.total_requests(),
    }
    # Delivery reports: counts per `_delivery`, and what the last reconcile read.
    delivery = delivery if delivery is not None else ledger.delivery_counts()
    if delivery:
        summary["delivery"] = delivery
    reconciled = ledger.get_meta("reconcile")
    if reconciled is not None:
        summary["last_reconcile"] = reconciled
    # Test sends (`campaign test`): apart from the people, never in `counts`.
    from campaign.store.test_sends import summary as test_sends

    if tests := test_sends(ledger):
        summary["tests"] = tests
    run = ledger.last_run(("run",))
    if run is not None:
        ended = run.finished_at or time.time()
        duration = max(ended - run.started_at, 1e-9)
        summary["last_run"] = {
            "state": run.state,
            "started_at": iso_utc(run.started_at),
            "finished_at": iso_utc(run.finished_at),
            "duration_s": round(duration, 3),
            "requests": run.requests,
            "achieved_rate": round(run.requests / duration, 2),
        }
    return summary
