"""`campaign suppress add|remove|list|import|sync`: the store's suppression list.

Parsing and printing only; the list is `suppression.SuppressionList`, the import
`suppress_import.import_numbers`, the sync of Avaamo's opt-outs `optouts.sync_opt_outs`.
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Any

from campaign.errors import UsageError

DEFAULT_REASON = {"add": "added by hand", "import": "imported"}


def add_parser(commands: Any) -> None:
    suppress = commands.add_parser(
        "suppress",
        help="the suppression list: numbers that never get an SMS",
        description="Manage the suppression list shared by every campaign under the job's "
        "output_dir. A number on it is never sent to (its rows are `suppressed`).",
    )
    actions = suppress.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("add", "put numbers on the list"), ("remove", "take numbers off")):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument("job", metavar="JOB.yaml", help="the job file (output_dir, region)")
        action.add_argument("phones", metavar="PHONE", nargs="+", help="phone numbers")
        if name == "add":
            action.add_argument("--reason", metavar="TEXT", help="why (shown in _error)")
    listing = actions.add_parser("list", help="print the list as CSV: phone,reason,source,added_at")
    listing.add_argument("job", metavar="JOB.yaml", help="the job file (output_dir)")
    imports = actions.add_parser(
        "import",
        help="add the phone numbers of a CSV or Excel file",
        description="Add the numbers of a spreadsheet's phone column (--column, or guessed "
        "as the upload page guesses it); rows that cannot be added are named by line.",
    )
    imports.add_argument("job", metavar="JOB.yaml", help="the job file (output_dir, region)")
    imports.add_argument("file", metavar="FILE", help="a CSV or Excel file")
    imports.add_argument("--column", metavar="NAME", help="the phone column's header")
    imports.add_argument("--reason", metavar="TEXT", help="why (shown in _error)")
    sync = actions.add_parser(
        "sync",
        help="read Avaamo's own opt-outs (people who replied STOP) into the list",
        description="Read the SMS Opt Status API into the list: the first sync (or --full) "
        "every number opted out; later ones what changed since the last. Exit 0 read whole, "
        "1 some windows unread (what was read is kept), 2 unusable job, 3 refused.",
    )
    sync.add_argument("job", metavar="JOB.yaml", help="the job file (reporting:, output_dir)")
    sync.add_argument("--full", action="store_true", help="read every current opt-out again")


def run(args: argparse.Namespace, job: Any) -> int:
    from campaign.store.suppression import SuppressionList

    if args.action == "sync":
        return _sync(args, job)

    with SuppressionList(job.output_dir, job.ledger) as listed:
        if args.action == "list":
            return _list(listed)
        if args.action == "import":
            return _import(listed, args, job)
        phones = _normalized(args.phones, job.mapping.default_region)
        if args.action == "add":
            reason = _reason(args.reason, "add")
            added = listed.add(phones, reason, "manual")
            print(f"added {added}; {len(set(phones)) - added} already on the list")
        else:
            removed = listed.remove(phones)
            print(f"removed {removed}; {len(set(phones)) - removed} were not on the list")
    return 0


def _sync(args: argparse.Namespace, job: Any) -> int:
    import asyncio

    from campaign import logs
    from campaign.optouts import reporting_for_sync, sync_opt_outs

    reporting = reporting_for_sync(job)
    logs.configure()
    logs.masker.hide(reporting.access_token, keep=0)
    result = asyncio.run(sync_opt_outs(job, full=args.full))
    print(result.line())
    for problem in result.problems[:5]:
        print(f"  not read: {problem}")
    return 1 if result.unread else 0


def _normalized(given: list[str], region: str) -> list[str]:
    """Every PHONE as E.164, or one error naming the arguments that are not numbers (and
    nothing changes)."""
    from campaign.phones import normalize_phones

    phones, problems = normalize_phones(given, region, "PHONE #{}", first=1)
    if problems:
        raise UsageError("; ".join(problems) + " (nothing was changed)")
    return phones


def _reason(text: str | None, action: str) -> str:
    reason = (text or "").strip()
    return reason or DEFAULT_REASON[action]


def _list(listed: Any) -> int:
    from campaign.escape import escape

    out = csv.writer(sys.stdout, lineterminator="\n")
    out.writerow(["phone", "reason", "source", "added_at"])
    for entry in listed.entries():
        values = (entry.phone, entry.reason, entry.source, entry.added)
        out.writerow([escape(v) for v in values])
    return 0


def _import(listed: Any, args: argparse.Namespace, job: Any) -> int:
    from campaign.suppress_import import SHOWN_PROBLEMS, import_numbers

    result = import_numbers(
        listed, args.file, args.column, job.mapping.default_region, _reason(args.reason, "import")
    )
    print(
        f"{args.file}: column {result.column!r}: {result.rows} rows, added {result.added}, "
        f"{result.already} already on the list, {result.not_added} not added"
    )
    for line, why in result.problems:
        print(f"  line {line}: {why}")
    if result.not_added > SHOWN_PROBLEMS:
        print(f"  ... and {result.not_added - SHOWN_PROBLEMS} more rows not added")
    return 1 if result.not_added else 0
