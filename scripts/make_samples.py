"""Regenerate sample_data/recipients.csv and recipients.xlsx (run from the repository root)."""

from __future__ import annotations

import csv
from pathlib import Path

import openpyxl

FIRST = [
    "José",
    "Zoë",
    "Amélie",
    "Bjørn",
    "Chloé",
    "Dmitri",
    "Émile",
    "Françoise",
    "Günther",
    "Hélène",
    "Iñaki",
    "Jürgen",
    "Kārlis",
    "Léa",
    "Małgorzata",
    "Nuño",
    "Øyvind",
    "Pál",
    "Renée",
    "Søren",
    "Thérèse",
    "Ulrich",
    "Valérie",
    "Wojciech",
    "Xavière",
    "Yusuf",
    "Zoltán",
    "Ana",
    "Brían",
    "Céline",
    "Dorothée",
    "Eóin",
    "Fañch",
    "Gaëlle",
    "Håkon",
    "Inés",
    "Jérôme",
    "Kōji",
    "Loïc",
    "Mónica",
    "Noël",
    "Oğuz",
    "Paulína",
    "Raphaël",
]
LAST = ["García", "Müller", "Ødegaard", "Nuñez", "Dupré", "Łukasz", "Ørsted", "Šimek"]
# Phones as operators type them: every US format, international numbers, and a few bad ones.
PHONES = [
    "(415) 555-0101",
    "415-555-0102",
    "415.555.0103",
    "+1 415 555 0104",
    "1-415-555-0105",
    "4155550106",
    "+14155550107",
    " 415 555 0108 ",
    "+1 (415) 555-0109",
    "415 555 0110",
    "+44 20 7946 0011",
    "+44 7700 900012",
    "+91 98765 43013",
    "+61 2 9876 5014",
    "+49 30 901820 15",
    "(212) 555-0116",
    "212-555-0117",
    "+1 212 555 0118",
    "(646) 555-0119",
    "646.555.0120",
    "+33 1 42 68 53 21",
    "+34 912 345 622",
    "(310) 555-0123",
    "310-555-0124",
    "+1 310 555 0125",
    "(305) 555-0126",
    "305 555 0127",
    "+1-305-555-0128",
    "(617) 555-0129",
    "617-555-0130",
    "+16175550131",
    "(202) 555-0132",
    "202.555.0133",
    "+1 202 555 0134",
    "(503) 555-0135",
    "503-555-0136",
    "(415) 555-0101",  # duplicate of the first, same text
    "+1 415-555-0102",  # duplicate of the second, written another way
    "555-01",  # too short
    "call me",  # not a number
    "",  # missing
    "415-555-0199 ext. 7",  # an extension: a desk phone
    "(720) 555-0143",
    "720-555-0144",
    "+1 720 555 0145",
    "(512) 555-0146",
    "512-555-0147",
    "+1 512 555 0148",
    "(206) 555-0149",
    "206-555-0150",
]


def rows() -> list[list[str]]:
    out = []
    for i, phone in enumerate(PHONES):
        first = FIRST[i % len(FIRST)]
        last = LAST[i % len(LAST)]
        emp = f"{(i * 37) % 1000:05d}"  # leading zeros are part of the id
        out.append([first, last, phone, emp])
    return out


def main() -> None:
    header = ["First Name", "Last Name", "Phone", "Employee ID"]
    data = rows()
    Path("sample_data").mkdir(exist_ok=True)
    with open("sample_data/recipients.csv", "w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(data)

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Recipients"
    sheet.append(header)
    for first, last, phone, emp in data:
        digits = "".join(c for c in phone if c.isdigit())
        # Excel users paste 10-digit US numbers and ids as numbers: store them so.
        plain_us = len(digits) == 10 and not phone.strip().startswith("+")
        sheet.append([first, last, int(digits) if plain_us else phone, int(emp)])
        sheet.cell(row=sheet.max_row, column=4).number_format = "00000"
    book.save("sample_data/recipients.xlsx")


if __name__ == "__main__":
    main()
