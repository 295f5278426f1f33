"""The upload page's first look at a spreadsheet: its columns, first rows, a guessed mapping.

The job file's mapping is the default when its columns are all in the sheet; otherwise the
phone column is guessed from header names and from cells that parse as phone numbers, and
every other column is offered as a param. The operator edits the guess on the page.

What goes back to the page is bounded whatever the file holds (the README says so): the
preview is at most PREVIEW_ROWS rows of PREVIEW_COLUMNS cells, each cut to PREVIEW_CHARS;
the page lists (and maps) the first PAGE_COLUMNS columns, their names cut the same way,
and says how many there are in all.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign.errors import InputError
from campaign.job import Mapping, param_name_problem
from campaign.load import Row, Sheet, open_sheet
from campaign.mapping import Mapper
from campaign.phones import SAMPLE_ROWS, guess_phone_column

PREVIEW_ROWS = 10
PREVIEW_COLUMNS = 50
PREVIEW_CHARS = 300
PAGE_COLUMNS = 1000
_CUT = "…"


@dataclass
class Look:
    columns: list[str]  # the first PAGE_COLUMNS header names, cut to PREVIEW_CHARS
    columns_total: int
    preview: list[dict[str, Any]]
    rows_sampled: int
    mapping: dict[str, Any]
    mapping_source: str  # job | guessed


def look_at(path: Path, sheet_name: str | None, job_mapping: Mapping) -> Look:
    """Read the first rows of an upload; raises `InputError` for anything unusable."""
    sheet = open_sheet(path, sheet_name)
    sample = list(itertools.islice(itertools.chain.from_iterable(sheet.chunks), SAMPLE_ROWS))
    if not sheet.columns:
        raise InputError(path, "has no columns to read")
    if not sample:
        raise InputError(path, "has a header row but no data rows under it")
    columns = [cut(name) for name in sheet.columns[:PAGE_COLUMNS]]
    preview = [
        {"row": r.number, "cells": [cut(c) for c in r.cells[:PREVIEW_COLUMNS]]}
        for r in sample[:PREVIEW_ROWS]
    ]
    try:
        Mapper.compile(job_mapping, Sheet(path, sheet.columns, iter(())))
    except InputError:
        mapping, source = guess_mapping(columns, sample, job_mapping), "guessed"
    else:
        mapping, source = expand_all(job_mapping, columns), "job"
    return Look(columns, len(sheet.columns), preview, len(sample), mapping, source)


def cut(text: str) -> str:
    """A cell or a name as the page shows it: at most PREVIEW_CHARS characters."""
    return text if len(text) <= PREVIEW_CHARS else text[: PREVIEW_CHARS - 1] + _CUT


def expand_all(mapping: Mapping, columns: list[str]) -> dict[str, Any]:
    """The mapping as the page edits it: `params: all` spelled out column by column. A
    header name that is not a usable param name gets the name the page would guess, so
    that the mapping the page sends back passes the job's rule."""
    shape = mapping.model_dump()
    if mapping.params == "all":
        phone = (mapping.to_phone or "").strip()
        names = [(i, c.strip()) for i, c in enumerate(columns) if c.strip() not in {"", phone}]
        params = {name: name for _, name in names if param_name_problem(name) is None}
        for i, name in names:
            if param_name_problem(name) is not None:
                params[_unique(param_name(name, i), params)] = name
        shape["params"] = params
    return shape


def guess_mapping(columns: list[str], sample: list[Row], job_mapping: Mapping) -> dict[str, Any]:
    phone = guess_phone_column(columns, sample, job_mapping.default_region)
    params: dict[str, str] = {}
    for i, column in enumerate(columns):
        if i == phone or not column.strip():
            continue
        params[_unique(param_name(column, i), params)] = column.strip()
    return {
        "to_phone": columns[phone].strip() if phone is not None else None,
        "default_region": job_mapping.default_region,
        "require_phone": job_mapping.require_phone,
        "params": params,
        "constants": dict(job_mapping.constants),
        "recipient_key": ["to_phone"] if phone is not None else list(params)[:1],
    }


def param_name(column: str, index: int) -> str:
    """`First Name` -> `first_name`, `Prénom` -> `prenom`: a name that passes the job's
    param-name rule. The page's `suggestName` (static/app.js) is the same steps in
    JavaScript, for the columns the guess leaves out."""
    # NFKD splits an accented letter into the letter and a combining mark (U+0300-U+036F).
    text = re.sub("[\u0300-\u036f]", "", unicodedata.normalize("NFKD", column)).lower()
    name = re.sub(r"[^0-9a-z]+", "_", text).strip("_")
    if not name:
        return f"column_{index + 1}"
    if name[0].isdigit() or param_name_problem(name) is not None:
        return f"c_{name}"
    return name


def _unique(name: str, taken: dict[str, str]) -> str:
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    return candidate
