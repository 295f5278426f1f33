"""Phone numbers: a cell's text as an E.164 number or the reason it cannot be sent to,
and which column of a sheet holds them. Used by the mapping, the upload page's guess and
the suppression list's imports alike."""

from __future__ import annotations

import itertools
import re

import phonenumbers
from phonenumbers import NumberParseException

from campaign.load import Row

SAMPLE_ROWS = 200  # rows looked at to guess the phone column

# A column whose sample cells are mostly valid numbers is the phone, even without a name.
PHONE_SHARE = 0.6
_PHONE_WORDS = frozenset(
    {"phone", "mobile", "cell", "cellphone", "tel", "telephone", "msisdn", "whatsapp", "sms"}
)
# Excel shows a long number in a General cell as 4.15555E+09 and saves it that way to CSV.
_SCIENTIFIC = re.compile(r"[0-9](?:[.,][0-9]+)?E\+?[0-9]+", re.IGNORECASE)
# A phone that went through a float on its way (pandas, some exports): 4155550101.0
_FLOAT_TAIL = re.compile(r"(\+?[0-9]{6,})\.0+")

_PARSE_REASONS = {
    NumberParseException.INVALID_COUNTRY_CODE: "has no valid country code",
    NumberParseException.NOT_A_NUMBER: "does not look like a phone number",
    NumberParseException.TOO_SHORT_AFTER_IDD: "is too short",
    NumberParseException.TOO_SHORT_NSN: "is too short",
    NumberParseException.TOO_LONG: "is too long",
}


def normalize_phone(text: str, region: str) -> tuple[str | None, str | None]:
    """(E.164 number, None) or (None, reason it cannot be sent to)."""
    if _SCIENTIFIC.fullmatch(text):
        return None, (
            "phone was saved by Excel in scientific notation (like 4.15555E+09), which lost "
            "its digits; format the column as Text and export again"
        )
    if found := _FLOAT_TAIL.fullmatch(text):
        text = found.group(1)
    try:
        number = phonenumbers.parse(text, region)
    except NumberParseException as exc:
        if _several_numbers(text, region):
            return None, _SEVERAL
        why = _PARSE_REASONS.get(exc.error_type, "does not look like a phone number")
        return None, f"phone {why}"
    if number.extension:
        return None, "phone has an extension; an SMS needs a number of its own"
    if not phonenumbers.is_valid_number(number):
        if _several_numbers(text, region):
            return None, _SEVERAL
        reason = phonenumbers.is_possible_number_with_reason(number)
        if reason == phonenumbers.ValidationResult.TOO_SHORT:
            return None, "phone is too short"
        if reason == phonenumbers.ValidationResult.TOO_LONG:
            return None, "phone is too long"
        if text.lstrip().startswith("+"):
            return None, "phone is not a valid number for its country code"
        return (
            None,
            f"phone is not a valid number (written without +country code: {region} assumed)",
        )
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


def normalize_phones(
    given: list[str], region: str, where: str, first: int = 0
) -> tuple[list[str], list[str]]:
    """(every number as E.164, one problem per entry that is not a number, placed by
    `where.format(position)`), for the command and the page that add numbers by hand."""
    phones, problems = [], []
    for i, text in enumerate(given, start=first):
        phone, why = normalize_phone(text.strip(), region)
        if phone is None:
            problems.append(f"{where.format(i)}: {why}")
        else:
            phones.append(phone)
    return phones, problems


_SEVERAL = "phone cell holds more than one number; give each number a row of its own"


def _several_numbers(text: str, region: str) -> bool:
    if len(text) > 120:  # the matcher is slow on long text; no phone cell is this long
        return False
    matches = phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID)
    return sum(1 for _ in itertools.islice(matches, 2)) > 1


def guess_phone_column(columns: list[str], sample: list[Row], region: str) -> int | None:
    shares = [_phone_share(sample, i, region) for i in range(len(columns))]
    named = [i for i, name in enumerate(columns) if _sounds_like_phone(name)]
    if named:
        return max(named, key=lambda i: shares[i])
    best = max(range(len(columns)), key=lambda i: shares[i], default=None)
    if best is not None and shares[best] >= PHONE_SHARE:
        return best
    return None


def _sounds_like_phone(header: str) -> bool:
    words = set(re.findall(r"[a-z]+", header.lower()))
    return bool(words & _PHONE_WORDS) or "phone" in header.lower()


def _phone_share(sample: list[Row], column: int, region: str) -> float:
    cells = [r.cells[column].strip() for r in sample if r.cells[column].strip()]
    if not cells:
        return 0.0
    # Short digit runs (ids, zip codes) are never phones, whatever the region's rules say.
    valid = sum(
        1
        for cell in cells
        if len(re.sub(r"\D", "", cell)) >= 7 and normalize_phone(cell, region)[0] is not None
    )
    return valid / len(cells)
