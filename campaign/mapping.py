"""Map: a spreadsheet row to an API payload, its E.164 phone and its recipient key.

`Mapper.map_row` never raises for anything a cell can hold: a row it cannot send comes
back with `error` set and becomes `invalid`. Problems with the job's mapping against the
sheet's header (a missing or doubled column) are raised once, up front, as `InputError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

from campaign.errors import InputError
from campaign.header import about_data, about_missing, looks_like_names
from campaign.job import Mapping
from campaign.load import Row, Sheet
from campaign.phones import normalize_phone
from campaign.records import MappedRow


def _missing(columns: list[str], key: str, name: str = "") -> str:
    """Why a mapped column is missing, without repeating a person's data from the file."""
    if name.strip().startswith("_"):
        return (
            f"no such column (mapping.{key}): columns whose names start with _ are the "
            "results of an earlier run and are ignored on load; rename the column"
        )
    return f"no such column (mapping.{key}); {about_missing(columns, name)}"


@dataclass(frozen=True)
class Mapper:
    """The job's mapping compiled against one sheet's header."""

    phone_column: int | None
    phone_name: str | None
    params: tuple[tuple[str, int, str], ...]  # (param, column index, column name)
    constants: tuple[tuple[str, str], ...]
    region: str
    require_phone: bool
    recipient_key: tuple[str, ...]

    @classmethod
    def compile(cls, mapping: Mapping, sheet: Sheet) -> Mapper:
        positions: dict[str, list[int]] = {}
        for i, name in enumerate(sheet.columns):
            positions.setdefault(name.strip(), []).append(i)

        def column(name: str, key: str) -> int:
            found = positions.get(name.strip())
            if not found:
                raise InputError(sheet.path, _missing(sheet.columns, key, name), column=name)
            if len(found) > 1:
                raise InputError(
                    sheet.path,
                    f"appears {len(found)} times in the header (mapping.{key})",
                    column=name,
                )
            return found[0]

        phone = column(mapping.to_phone, "to_phone") if mapping.to_phone else None
        if mapping.params == "all":
            if not looks_like_names(sheet.columns):
                # Its cells would become the param names of every payload: one person's
                # data sent to everyone.
                raise InputError(
                    sheet.path,
                    "mapping.params is all, so the header names would become param names, "
                    f"but {about_data(sheet.columns)}",
                )
            used = [
                (name.strip(), i)
                for i, name in enumerate(sheet.columns)
                if name.strip() and i != phone
            ]
            params = tuple(
                (name, column(name, f"params: all ({name})"), sheet.columns[i]) for name, i in used
            )
        else:
            params = tuple(
                (param, column(name, f"params.{param}"), name.strip())
                for param, name in mapping.params.items()
            )
        if any(param == "to_phone" for param, _, _ in params):
            raise InputError(sheet.path, "to_phone is set by mapping.to_phone, not as a param")
        constants = tuple((k, _constant_text(v)) for k, v in mapping.constants.items())
        mapper = cls(
            phone_column=phone,
            phone_name=mapping.to_phone.strip() if mapping.to_phone else None,
            params=params,
            constants=constants,
            region=mapping.default_region,
            require_phone=mapping.require_phone,
            recipient_key=tuple(mapping.recipient_key),
        )
        known = {"to_phone"} | {p for p, _, _ in params} | {k for k, _ in constants}
        unknown = [k for k in mapper.recipient_key if k not in known]
        if unknown:
            raise InputError(
                sheet.path,
                f"mapping.recipient_key names {', '.join(unknown)}, which the mapping "
                f"does not produce (payload keys: {', '.join(sorted(known))})",
            )
        return mapper

    def map_row(self, row: Row) -> MappedRow:
        payload: dict[str, str] = {}
        to_phone = error = None
        if self.phone_column is not None:
            text = row.cells[self.phone_column].strip()
            if text:
                to_phone, error = normalize_phone(text, self.region)
            elif self.require_phone:
                error = f"{self.phone_name} is empty"
            if to_phone:
                payload["to_phone"] = to_phone
        for param, i, _ in self.params:
            value = row.cells[i].strip()
            if value:
                payload[param] = value
        for name, value in self.constants:
            payload.setdefault(name, value)
        if row.problem:
            error = row.problem
        parts = [payload.get(k) for k in self.recipient_key]
        missing = [k for k, v in zip(self.recipient_key, parts, strict=True) if not v]
        if error is None and missing:
            error = f"recipient key {', '.join(missing)} is empty"
        elif error is None and not payload:
            error = "nothing to send: every mapped cell is empty"
        # The person the row names, even when the row cannot be sent as it is: a person
        # reached earlier keeps showing as reached (ledger: the results view).
        key = None
        if not missing:
            key = parts[0] if len(parts) == 1 else json.dumps(parts, ensure_ascii=False)
        return MappedRow(
            row=row.number,
            cells=row.cells,
            key=key,
            payload=None if error else json.dumps(payload, ensure_ascii=False),
            to_phone=to_phone,
            error=error,
        )

    def effective(self) -> dict[str, object]:
        """The mapping as it applies to this sheet, by column name: two mappings with the
        same effective form send every person the same payload under the same key."""
        return {
            "to_phone": self.phone_name,
            "default_region": self.region,
            "require_phone": self.require_phone,
            "params": {param: name.strip() for param, _, name in self.params},
            "constants": dict(self.constants),
            "recipient_key": list(self.recipient_key),
        }

    def map_chunks(self, sheet: Sheet) -> Iterator[list[MappedRow]]:
        for chunk in sheet.chunks:
            yield [self.map_row(row) for row in chunk]


def _constant_text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
