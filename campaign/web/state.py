"""What the upload page shows of a campaign: its ledger (read-only) and its directory.

So a restarted server shows every campaign of the store, the page's and the command
line's, with its state: uploaded | validated | running | done | aborted. `aborted` covers
every run that did not finish (a fatal answer, a stop, a process that died); the next
start continues it, and its in-flight rows become `unknown` then. On PostgreSQL the
ledger is in the database, and the directory (the page's upload, the report) is this
host's: a campaign another host ran has no report here until one is asked for.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from campaign.files import atomic_write
from campaign.job import Limits
from campaign.records import SENDABLE
from campaign.report import RESULTS_FILE, SUMMARY_FILE
from campaign.store.campaigns import MAPPING_FILE, WEB_FILE, CampaignInfo, Store
from campaign.store.ledger import LedgerError
from campaign.times import iso_utc
from campaign.web.guess import PREVIEW_COLUMNS, cut


def campaign_view(
    store: Store, campaign: str, limits: Limits, detail: bool = False
) -> dict[str, Any]:
    """What the page shows of a campaign; reads the ledger read-only (another process may
    be sending it)."""
    directory = store.output_dir / campaign
    info = read_json(directory / WEB_FILE)
    ledger_info: CampaignInfo | None = None
    counts: dict[str, int] = {}
    delivery: dict[str, int] = {}
    stored_mapping = None
    with contextlib.suppress(*LedgerError), store.reader(campaign) as ledger:
        if ledger is not None:
            ledger_info = store.info_of(campaign, ledger, limits.lease_s)
            counts = ledger.counts()
            delivery = ledger.delivery_counts()
            stored_mapping = ledger.get_meta("mapping")
    last = ledger_info.last_state if ledger_info else None
    validated = info.get("validated", True) if info else ledger_info is not None
    if last == "running":
        state = "running"  # another process sends it (`campaign run`, another host)
    elif last == "finished":
        state = "done"
    elif last is not None:
        state = "aborted"
    else:
        state = "validated" if validated and ledger_info else "uploaded"
    summary = read_json(directory / SUMMARY_FILE)
    created = info.get("uploaded_at") or (ledger_info.created_at if ledger_info else None)
    view: dict[str, Any] = {
        "id": campaign,
        "filename": info.get("filename"),
        "created": iso_utc(created),
        "created_at": created,
        "state": state,
        "last_run": last,
        "resumable": state == "aborted",
        "uploaded_here": bool(info),
        "origin": ledger_info.origin if ledger_info else "page",
        "counts": counts,
        "delivery": delivery,
        "rows": sum(counts.values()),
        "to_send": sum(counts.get(s, 0) for s in SENDABLE),
        "rate": limits.rate_per_second,
        "concurrency": limits.concurrency,
        "achieved_rate": (summary.get("last_run") or {}).get("achieved_rate"),
        # On PostgreSQL a download writes the report from the ledger when this host has
        # none (or an old one).
        "has_results": (directory / RESULTS_FILE).is_file()
        or (store.shared and ledger_info is not None),
        "error": None,
        "progress": None,
    }
    if detail:
        view["columns"] = info.get("columns", [])
        view["columns_total"] = info.get("columns_total", len(view["columns"]))
        view["preview"] = info.get("preview", [])
        # The ledger's mapping is the one requests went out with; the page's file is what
        # the page last saved (the same once validated).
        view["mapping"] = read_json(directory / MAPPING_FILE) or stored_mapping
        view["mapping_source"] = info.get("mapping_source")
    return view


def rows_page(store: Store, campaign: str, status: str, offset: int, limit: int) -> dict[str, Any]:
    """A page of the latest input's rows with one status (invalid, duplicate), with reasons."""
    with store.reader(campaign) as ledger:
        if ledger is None:
            return {"total": 0, "offset": offset, "columns": [], "rows": []}
        total, found = ledger.rows_with_status(status, offset, limit)
        columns = ledger.get_meta("columns") or []
    # Shown as the upload's preview is: a few hundred characters of the first columns.
    rows = [{"row": r, "error": e, "cells": _shown_cells(c)} for r, e, c in found]
    return {"total": total, "offset": offset, "columns": _shown_cells(columns), "rows": rows}


def _shown_cells(cells: list[str]) -> list[str]:
    return [cut(cell) for cell in cells[:PREVIEW_COLUMNS]]


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_write(path) as out:
        json.dump(value, out, ensure_ascii=False, indent=2)
