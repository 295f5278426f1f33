"""Spreadsheet formula escaping for cells we write, and its inverse for cells we read.

A cell that Excel or LibreOffice would run as a formula is written with a leading `'`.
The escape is a bijection (a cell that already starts with quotes before a formula gets
one more), so a results CSV read back as input gives exactly the values written.
"""

from __future__ import annotations

import re

_NUMBER_OR_PHONE = re.compile(r"[+-]?[0-9 ().-]+")
_FORMULA_START = ("=", "@", "\t", "\r")


def _is_formula(text: str) -> bool:
    if text.startswith(_FORMULA_START):
        return True
    return text.startswith(("+", "-")) and not _NUMBER_OR_PHONE.fullmatch(text)


def escape(text: str) -> str:
    return "'" + text if _is_formula(text.lstrip("'")) else text


def unescape(text: str) -> str:
    if text.startswith("'") and _is_formula(text.lstrip("'")):
        return text[1:]
    return text
