"""Report: the per-row results CSV and summary.json, rebuilt from the ledger.

Both are written to a temporary file beside the target and renamed over it, so a reader
never sees half a file. Rows stream from SQLite to the CSV: memory does not grow with the
campaign.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from campaign.escape import escape
from campaign.ledger import Ledger

RESULT_COLUMNS = ["_row", "_status", "_to_phone", "_attempts", "_http_status", "_error", "_sent_at"]
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.json"
_MAYBE_FORMULA = frozenset("=@\t\r+-'")


def write_report(ledger: Ledger, directory: Path, campaign: str) -> dict[str, Any]:
    """Write results.csv and summary.json; return the summary."""
    columns: list[str] = ledger.get_meta("columns") or []
    with atomic_write(directory / RESULTS_FILE) as out:
        writer = csv.writer(out)
        writer.writerow([escape(c) for c in columns + RESULT_COLUMNS])
        for cells, *results in ledger.report_rows():
            values = json.loads(cells)
            values.extend(results)
            # escape() changes only cells starting with one of these: test that first.
            writer.writerow([escape(v) if v[:1] in _MAYBE_FORMULA else v for v in values])
    return write_summary(ledger, directory, campaign)


def write_summary(
    ledger: Ledger, directory: Path, campaign: str, counts: dict[str, int] | None = None
) -> dict[str, Any]:
    summary = summarize(ledger, campaign, counts)
    with atomic_write(directory / SUMMARY_FILE) as out:
        json.dump(summary, out, indent=2)
        out.write("\n")
    return summary


def summarize(
    ledger: Ledger, campaign: str, counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """`counts`: the ledger's counts, when the caller has just read them."""
    counts = counts if counts is not None else ledger.counts()
    summary: dict[str, Any] = {
        "campaign": campaign,
        "rows": sum(counts.values()),
        "counts": counts,
        "attempts": ledger.total_attempts(),
    }
    run = ledger.last_run(("run",))
    if run is not None:
        ended = run.finished_at or time.time()
        duration = max(ended - run.started_at, 1e-9)
        summary["last_run"] = {
            "state": run.state,
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at) if run.finished_at else None,
            "duration_s": round(duration, 3),
            "requests": run.requests,
            "achieved_rate": round(run.requests / duration, 2),
        }
    return summary


@contextmanager
def atomic_write(path: Path) -> Iterator[IO[str]]:
    """Write a text file via a temporary file in the same directory and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
