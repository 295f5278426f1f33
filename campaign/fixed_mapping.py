"""A campaign's mapping is fixed once a request went out (docs/design.md, invariant 6).

The mapping (phone column, region, params, constants, recipient key) decides who a row's
person is and what they are sent. The ledger stores the one requests went out with; a run
that would map the campaign differently stops, unless it is the same mapping written
another way (the job file, the page, a page campaign's mapping.json). A campaign made on
the page keeps the page's mapping when the command line continues it.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from campaign.errors import InputError, UsageError
from campaign.job import Mapping
from campaign.load import Sheet
from campaign.mapping import Mapper
from campaign.store.campaigns import MAPPING_FILE, origin_of
from campaign.store.ledger import Ledger


def made_on_page(ledger: Ledger) -> bool:
    return origin_of(ledger.all_meta()) == "page"


def own_mapping(ledger: Ledger, directory: Path) -> Mapping | None:
    """The mapping stored with the campaign (for a page campaign from before mappings were
    stored in the ledger: the page's mapping.json)."""
    stored = ledger.get_meta("mapping")
    if stored is None and made_on_page(ledger):
        with contextlib.suppress(OSError, ValueError):
            stored = json.loads((directory / MAPPING_FILE).read_text(encoding="utf-8"))
    return _as_mapping(stored) if isinstance(stored, dict) else None


def _as_mapping(stored: dict[str, Any]) -> Mapping:
    """A mapping stored by an earlier run, as it was: a rule added since (e.g. for param
    names) must not change what the rest of the campaign is sent."""
    try:
        return Mapping.model_validate(stored)
    except ValueError:
        return Mapping.model_construct(**stored)


def keep_mapping(ledger: Ledger, mapping: Mapping, sheet: Sheet, joining: bool = False) -> None:
    """What a person is sent, and who counts as one person, is fixed once a request went
    out: the same mapping, however written, is fine; another one stops the run.
    `joining`: other workers are sending the rows mapped with the stored mapping (on
    PostgreSQL), so it is fixed already, whether or not their first request is recorded
    yet."""
    wanted = mapping.model_dump(mode="json")
    stored = ledger.get_meta("mapping")
    if stored == wanted:
        return
    if ledger.total_requests() or (joining and stored is not None):
        campaign = ledger.get_meta("campaign")
        if stored is None:  # a ledger from before mappings were stored: its recipient key
            old_key = ledger.get_meta("recipient_key")
            if old_key is not None and old_key != wanted["recipient_key"]:
                raise UsageError(
                    f"campaign {campaign} identifies people by recipient_key {old_key}, and "
                    f"the mapping now says {wanted['recipient_key']}: under a new key "
                    "everyone would be sent again. Restore recipient_key, or start a new "
                    "campaign (--campaign ID)"
                )
        else:
            changed = _mapping_changes(_as_mapping(stored), mapping, sheet)
            if changed:
                raise UsageError(
                    f"campaign {campaign} was sent with another mapping; this run changes "
                    f"{'; '.join(changed)}. People could be sent again or sent other "
                    "values: use the campaign's mapping, or start a new campaign "
                    "(--campaign ID)"
                )
            return  # the same mapping, written another way: keep the one requests used
    ledger.set_meta(mapping=wanted)


def _mapping_changes(before: Mapping, after: Mapping, sheet: Sheet) -> list[str]:
    """What differs between two mappings as they apply to this sheet, named by key and
    column (never by a value: constants are param values)."""
    try:
        was = Mapper.compile(before, sheet).effective()
    except InputError as exc:
        column = f" ({exc.column!r})" if exc.column else ""
        return [f"the campaign's columns{column}: not in this input"]
    now = Mapper.compile(after, sheet).effective()
    changed = []
    for key, value in now.items():
        if value == was.get(key):
            continue
        if key == "constants":
            changed.append("mapping.constants")
        else:
            changed.append(f"mapping.{key} ({_shown(was.get(key))} -> {_shown(value)})")
    return changed


def _shown(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(map(str, value))
    return repr(value)
