"""The command line: parse, call the pipeline, turn errors into one line and an exit code.

Heavy libraries are imported inside the commands, so `campaign --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from campaign.job import Job
    from campaign.pipeline import RunControl, RunOutcome
    from campaign.progress import Progress

PROG = "campaign"
PROGRESS_LOG_EVERY_S = 10.0
REDRAW_EVERY_S = 0.1


def _number(text: str, kind: type[float] | type[int], ok: Any, wanted: str) -> Any:
    """An option's number; `wanted` says what it must be when it is not."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or value != value or not ok(value):  # value != value: NaN
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
    return value


def _float(text: str) -> float:
    return float(_number(text, float, lambda v: True, "a number"))


def _int(text: str) -> int:
    return int(_number(text, int, lambda v: True, "a whole number"))


def _positive_float(text: str) -> float:
    return float(_number(text, float, lambda v: 0 < v < float("inf"), "a number greater than 0"))


def _non_negative_float(text: str) -> float:
    return float(_number(text, float, lambda v: 0 <= v < float("inf"), "a number of 0 or more"))


def _positive_int(text: str) -> int:
    return int(_number(text, int, lambda v: v > 0, "a whole number of 1 or more"))


def _share(text: str) -> float:
    return float(_number(text, float, lambda v: 0 <= v <= 1, "a number from 0 to 1"))


MAX_UPLOAD_MB = 10_240.0  # 10 GB: beyond any spreadsheet, within what a byte count holds


def _upload_mb(text: str) -> float:
    wanted = f"a number greater than 0 and at most {MAX_UPLOAD_MB:g}"
    return float(_number(text, float, lambda v: 0 < v <= MAX_UPLOAD_MB, wanted))


def _port(text: str) -> int:
    return int(_number(text, int, lambda v: 0 <= v <= 65535, "a whole number from 0 to 65535"))


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get one line (and exit 2), like every other error."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Send an SMS campaign to a spreadsheet of people through the Avaamo SMS "
        "Send API, once per person, with a per-row results CSV.",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def state_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--output-dir",
            metavar="DIR",
            help="where campaign state lives (default: the job's output_dir)",
        )
        p.add_argument(
            "--log-format",
            choices=("console", "json"),
            default="console",
            help="log lines on stderr: console (default) or json",
        )

    def input_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("job", metavar="JOB.yaml", help="the job file")
        p.add_argument(
            "--input", metavar="PATH", help="spreadsheet to use instead of the job's input"
        )
        state_options(p)
        p.add_argument(
            "--no-progress", action="store_true", help="no progress bar, even on a terminal"
        )

    run = commands.add_parser(
        "run",
        help="send the campaign (or continue it)",
        description="Send the campaign, or continue it: rows already sent are never sent again.",
    )
    input_options(run)
    which = run.add_mutually_exclusive_group()
    which.add_argument(
        "--campaign", metavar="ID", help="campaign id (default: the job's campaign:, e.g. JOB-DATE)"
    )
    which.add_argument(
        "--new",
        action="store_true",
        help="start the job's new campaign even though its latest one did not finish",
    )
    # The job's limits say which values are allowed: an option is checked with the file.
    run.add_argument(
        "--rate",
        type=_float,
        metavar="N",
        help="requests per second (overrides limits.rate_per_second)",
    )
    run.add_argument(
        "--concurrency",
        type=_int,
        metavar="N",
        help="requests in flight at once (overrides limits.concurrency)",
    )
    run.add_argument(
        "--only-failed", action="store_true", help="send only recipients that failed before"
    )
    run.add_argument(
        "--resend-unknown",
        action="store_true",
        help="also send recipients whose earlier request may or may not have arrived",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="validate and write the results CSV; send nothing"
    )
    run.add_argument(
        "--wait",
        action="store_true",
        help="stay until every pending person's send window has opened, sending each as it "
        "opens (holds the campaign meanwhile; Ctrl-C stops cleanly)",
    )

    validate = commands.add_parser(
        "validate", help="check the job and input; send nothing (= run --dry-run)"
    )
    input_options(validate)
    validate.add_argument(
        "--campaign", metavar="ID", help="campaign id (default: the job's campaign:)"
    )

    report = commands.add_parser(
        "report", help="rewrite results.csv and summary.json from the ledger"
    )
    report.add_argument(
        "target",
        metavar="JOB.yaml|RUN_DIR",
        help="a job file (its latest campaign) or a campaign directory",
    )
    report.add_argument(
        "--campaign", metavar="ID", help="with a job file: this campaign instead of the latest"
    )
    report.add_argument(
        "--output-dir", metavar="DIR", help="with a job file: where campaign state lives"
    )

    reconcile = commands.add_parser(
        "reconcile",
        help="read delivery reports into the campaign (did the SMS arrive?)",
        description="Read the SMS Reporting API's delivery reports for a campaign into its "
        "ledger and results: delivered, undelivered, failed, or not_found; an unknown "
        "person the report shows did reach the API becomes sent.",
    )
    reconcile.add_argument("job", metavar="JOB.yaml", help="the job file (with reporting:)")
    reconcile.add_argument(
        "--campaign", metavar="ID", help="campaign id (default: the job's latest campaign)"
    )
    state_options(reconcile)

    test = commands.add_parser(
        "test",
        help="send one row's SMS to your own test numbers, and show the message received",
        description="Send one row of the input, mapped as the run maps it, to test numbers "
        "instead of its person: one request per number, recorded apart from the campaign's "
        "people (a later run sends everyone as before). With a reporting: section, the "
        "message the phone received is shown. Exit 0 every test request was sent (and "
        "reported delivered or sent), 1 some were not, 2 unusable job/row/number, 3 the API "
        "refused (401/403/404).",
    )
    input_options(test)
    test.add_argument(
        "--to",
        action="append",
        metavar="PHONE",
        help="a test number (repeat for several; default: the job's test_recipients)",
    )
    test.add_argument(
        "--row",
        type=_positive_int,
        metavar="N",
        help="the input's row N (1 is the first under the header; default: the first sendable row)",
    )
    test.add_argument("--campaign", metavar="ID", help="campaign id (default: the job's campaign:)")

    sandbox = commands.add_parser(
        "sandbox", help="a local stand-in for the Avaamo SMS API (never forwards anything)"
    )
    sandbox.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sandbox.add_argument(
        "--port", type=_port, default=8765, help="port (default 8765; 0 picks a free one)"
    )
    sandbox.add_argument(
        "--rate",
        type=_positive_float,
        metavar="N",
        help="answer 429 + Retry-After above N requests per second",
    )
    sandbox.add_argument(
        "--fail-rate",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of requests answered 503 (0..1)",
    )
    sandbox.add_argument(
        "--latency-ms", type=float, default=0.0, metavar="N", help="delay before each answer"
    )
    sandbox.add_argument(
        "--custom-auth",
        action="store_true",
        help="channel with custom user authentication: to_phone optional",
    )
    sandbox.add_argument(
        "--record", metavar="FILE", help="append every accepted request to FILE as a JSON line"
    )
    sandbox.add_argument(
        "--drop-after-accept",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of requests accepted and recorded, then cut without an answer (0..1)",
    )
    sandbox.add_argument(
        "--agent-id", default="1", metavar="ID", help="the Reporting API's agent id (default 1)"
    )
    sandbox.add_argument(
        "--access-token",
        default="sandbox-token",
        metavar="TOKEN",
        help="the Reporting API's access token (default sandbox-token); another one gets 401",
    )
    sandbox.add_argument(
        "--delivery-delay-s",
        type=_non_negative_float,
        default=2.0,
        metavar="S",
        help="a report entry says sent for this long, then delivered (default 2)",
    )
    sandbox.add_argument(
        "--undelivered-rate",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of accepted requests reported undelivered or failed (0..1)",
    )
    sandbox.add_argument(
        "--report-rate",
        type=_positive_float,
        metavar="N",
        help="answer 429 + Retry-After above N Reporting API queries per second",
    )
    sandbox.add_argument(
        "--opt-out-rate",
        type=_share,
        default=0.0,
        metavar="P",
        help="share of numbers delivered to that reply STOP soon after (0..1); some START later",
    )
    sandbox.add_argument(
        "--opt-in-after-s",
        type=_non_negative_float,
        default=60.0,
        metavar="S",
        help="those who START again do so this long after their STOP (default 60)",
    )
    sandbox.add_argument(
        "--opted-out",
        type=int,
        default=0,
        metavar="N",
        help="N more numbers opted out an hour before it started (+1630...: for benchmarks)",
    )

    serve = commands.add_parser("serve", help="the upload web page and its API")
    serve.add_argument(
        "job", metavar="JOB.yaml", help="job file: API, limits, default mapping, data directory"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)"
    )
    serve.add_argument(
        "--max-upload-mb",
        type=_upload_mb,
        default=50.0,
        metavar="N",
        help="upload size cap (default 50)",
    )
    from campaign import cli_suppress

    cli_suppress.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        from campaign.errors import CampaignError
    except KeyboardInterrupt:  # Ctrl-C while starting: nothing began
        return 130

    state: dict[str, Any] = {"control": None, "directory": None}
    try:
        return _dispatch(args, state)
    except CampaignError as exc:
        _error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:
        # `campaign suppress list JOB | head`: the reader has all it wanted. Whatever is
        # still buffered goes nowhere, quietly, instead of failing again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    except Exception:
        import tempfile

        from campaign.logs import masker, save_traceback

        where = save_traceback(state.get("directory"), Path(tempfile.gettempdir()))
        _error(
            f"unexpected error: {masker.clean(repr(sys.exc_info()[1]))[:200]}; details in {where}"
        )
        control = state["control"]
        # Once the dispatcher exists, requests may have left: never claim nothing was sent.
        return 1 if control is not None and control.dispatcher is not None else 2


def _dispatch(args: argparse.Namespace, state: dict[str, Any]) -> int:
    if args.command == "sandbox":
        from campaign.sandbox import serve_sandbox

        return serve_sandbox(args)
    if args.command == "report":
        return _report(args)
    if args.command == "reconcile":
        return _reconcile(args, state)
    if args.command == "serve":
        from campaign.web.app import serve_web

        return serve_web(args)
    if args.command == "test":
        return _test(args, state)
    if args.command == "suppress":
        from campaign import cli_suppress

        return cli_suppress.run(args, _load(args))
    return _run(args, state)


# Options that stand for a key of the job file: (option, argparse dest, job key).
OVERRIDES = (
    ("--input", "input", "input"),
    ("--output-dir", "output_dir", "output_dir"),
    ("--rate", "rate", "limits.rate_per_second"),
    ("--concurrency", "concurrency", "limits.concurrency"),
)


def _load(args: argparse.Namespace, path: str | None = None) -> Any:
    """The job, with the options that override its keys checked like the file's own."""
    from campaign.job import Override, load_job

    given = [
        Override(key, value, option)
        for option, dest, key in OVERRIDES
        if (value := getattr(args, dest, None)) is not None
    ]
    return load_job(path or args.job, *given)


def _load_logged(args: argparse.Namespace) -> Job:
    """The job of a command that logs: logging set up first (a job error is then one line
    of it), and the job's channel and access token hidden from every line after."""
    from campaign import logs

    logs.configure(args.log_format)
    job = _load(args)
    logs.masker.hide(job.api.channel_uuid)
    if job.reporting is not None:
        logs.masker.hide(job.reporting.access_token, keep=0)
    return job


def _run(args: argparse.Namespace, state: dict[str, Any]) -> int:
    from campaign.pipeline import RunControl, RunOptions, run_campaign

    job = _load_logged(args)
    options = RunOptions(
        campaign=args.campaign,
        new=getattr(args, "new", False),
        only_failed=getattr(args, "only_failed", False),
        resend_unknown=getattr(args, "resend_unknown", False),
        dry_run=args.command == "validate" or args.dry_run,
        wait=getattr(args, "wait", False),
    )
    if options.wait and options.dry_run:
        from campaign.errors import OptionError

        raise OptionError("--wait", "sends as windows open; it cannot go with --dry-run")
    control = state["control"] = RunControl()
    state["directory"] = Path(job.output_dir)
    show_bar = not args.no_progress and sys.stderr.isatty()

    async def main() -> RunOutcome:
        _install_signal_handlers(control)
        with _ProgressView(show_bar) as view:
            return await run_campaign(job, options, control, view.update)

    outcome = _run_loop(main())
    _print_outcome(outcome)
    return outcome.exit_code


def _run_loop(coroutine: Any) -> Any:
    """Run on uvloop where it is installed: the same asyncio API, with less overhead per
    request, which at full speed is what limits the send rate."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _install_signal_handlers(control: RunControl) -> None:
    import asyncio
    import signal

    import structlog

    loop = asyncio.get_running_loop()
    log = structlog.get_logger("campaign.cli")

    def on_signal(signum: int) -> None:
        if control.stopping:
            _error("stopped at once; requests in flight will be marked unknown on the next run")
            os._exit(130)
        name = signal.Signals(signum).name
        log.warning("stopping: finishing requests in flight (again to quit at once)", signal=name)
        control.stop()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


class _ProgressView:
    """A rich progress bar on a terminal; a log line every few seconds otherwise."""

    def __init__(self, show_bar: bool) -> None:
        self.show_bar = show_bar
        self.bar: Any = None
        self.task: Any = None
        self.last_shown = time.monotonic()

    def __enter__(self) -> _ProgressView:
        if self.show_bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]sending"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(
                    "sent {task.fields[sent]}  failed {task.fields[failed]}  "
                    "unknown {task.fields[unknown]}  {task.fields[rate]}/s{task.fields[waiting]}"
                ),
                TimeRemainingColumn(),
                transient=False,
            )
            self.bar.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, progress: Progress) -> None:
        # Called for every answer: do nothing until a redraw or a log line is due.
        now = time.monotonic()
        due = REDRAW_EVERY_S if self.bar is not None else PROGRESS_LOG_EVERY_S
        if now - self.last_shown < due and progress.done < progress.total:
            return
        self.last_shown = now
        rate = f"{progress.rate:.1f}"
        counts = {k: progress.by_state.get(k, 0) for k in ("sent", "failed", "unknown")}
        waiting = ""
        if progress.waiting:
            from campaign.times import iso_local

            first = f", first at {iso_local(progress.opens_at)}" if progress.opens_at else ""
            waiting = f"  waiting {progress.waiting}{first}"
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(
                    "send", total=progress.total, rate=rate, waiting=waiting, **counts
                )
            self.bar.update(
                self.task, completed=progress.done, rate=rate, waiting=waiting, **counts
            )
        else:
            import structlog

            held: dict[str, object] = {"waiting": progress.waiting} if progress.waiting else {}
            if progress.opens_at:
                from campaign.times import iso_local

                held["first_opens"] = iso_local(progress.opens_at)
            structlog.get_logger("campaign.cli").info(
                "progress",
                done=progress.done,
                total=progress.total,
                rate=float(rate),
                **counts,
                **held,
            )


def _print_outcome(outcome: RunOutcome) -> None:
    counts = outcome.summary["counts"]
    line = "  ".join(f"{k} {v}" for k, v in counts.items())
    print(f"campaign {outcome.campaign}: {outcome.message or outcome.state}")
    print(f"  {line}")
    for note in outcome.notes:
        print(f"  {note}")
    if outcome.invalid_examples:
        print("  first invalid rows:")
        for row, error in outcome.invalid_examples:
            print(f"    row {row}: {error}")
    print(f"  results: {outcome.results}")


def _report(args: argparse.Namespace) -> int:
    from campaign.errors import UsageError
    from campaign.pipeline import rebuild_report
    from campaign.store.campaigns import store_of

    target = Path(args.target)
    if target.is_dir():
        store, campaign = store_of(target.parent, None), target.name
        if not store.exists(campaign):
            raise UsageError(f"{target}: not a campaign directory (no ledger)")
    else:
        job = _load(args, args.target)
        store = store_of(job.output_dir, job.ledger)
        campaign = job.campaign_for(args.campaign)
        if args.campaign is None and not store.exists(campaign):
            # Today's id has no campaign yet: the job's latest one is meant.
            mine = [c for c in store.list_campaigns() if c.job == job.name]
            if not mine:
                raise UsageError(f"{args.target}: no campaign of this job in the store")
            campaign = mine[0].id
    directory = store.output_dir / campaign
    summary = rebuild_report(store, campaign)
    line = "  ".join(f"{k} {v}" for k, v in summary["counts"].items())
    print(f"campaign {summary['campaign']}: report rewritten from the ledger")
    print(f"  {line}")
    print(f"  results: {directory / 'results.csv'}")
    return 0


def _reconcile(args: argparse.Namespace, state: dict[str, Any]) -> int:
    from campaign.reconcile import reconcile_campaign, reporting_of

    job = _load_logged(args)
    reporting_of(job)  # without a reporting: section, one line and exit 2 before anything
    state["directory"] = Path(job.output_dir)
    outcome = _run_loop(reconcile_campaign(job, args.campaign))
    tally = outcome.tally
    print(f"campaign {outcome.campaign}: {outcome.message}")
    delivery = outcome.summary.get("delivery") or {}
    print("  " + ("  ".join(f"{k} {v}" for k, v in delivery.items()) or "no delivery facts yet"))
    if tally.windows:
        print(
            f"  read {tally.windows_read} of {tally.windows} windows ({tally.windows_kept} "
            f"final from before), {tally.pages} pages: {tally.entries} entries, "
            f"{tally.matched} matched, {tally.unmatched_entries} owned by no request of this store"
        )
    if tally.bad_entries or tally.repeated_entries:
        print(
            f"  skipped {tally.bad_entries} unusable entries (no number, time or status); "
            f"{tally.repeated_entries} entries came again on later pages"
        )
    if tally.confirmed_unknown:
        print(f"  {tally.confirmed_unknown} unknown confirmed by the delivery report: now sent")
    if tally.suppress_candidates:
        print(f"  {tally.suppress_candidates} numbers put on the suppression list")
    for problem in tally.problems[:5]:
        print(f"  not read: {problem}")
    print(f"  results: {outcome.directory / 'results.csv'}")
    return outcome.exit_code


def _test(args: argparse.Namespace, state: dict[str, Any]) -> int:
    from campaign.test_send import run_test_command

    job = _load_logged(args)
    state["directory"] = Path(job.output_dir)
    return int(run_test_command(job, args, _run_loop))


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr)
