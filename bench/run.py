"""`make bench`: speed and exactness of `campaign run` against local sandboxes.

    python bench/run.py [--quick] [--only NAME ...] [--million-rows N]

Every measure starts its own sandbox (`campaign sandbox --port 0`, 127.0.0.1) and runs the
real command line in a subprocess. Request times are taken at the server, by arrival
(the sandbox's `--record` lines). Prints a table and writes bench/results.json.
`--quick` (or BENCH_QUICK=1) skips the million-row measures (send and reconcile), which
take minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import many_hosts
from bench.tools import (
    ROOT,
    Finished,
    Result,
    body,
    campaign_command,
    count_lines,
    fresh,
    max_in_window,
    phases,
    rate_of,
    run_campaign,
    run_measured,
    start_sandbox,
    write_job,
    write_people,
)

RESULTS = ROOT / "bench" / "results.json"
OVERHEAD_ROWS = 20_000
OVERHEAD_CONCURRENCY = 100
NO_LIMIT = 1_000_000  # rate_per_second that never binds
RESUME_ROWS = 100_000
SPEED_ROWS = 30_000
SPEED_ROUNDS = 3
SPEED_TARGET = 3_000  # rows per second, end to end
MILLION_TARGET_S = 320.0  # end to end, 1,000,000 rows on this machine
DONE_RESUME_TARGET_S = 5.0  # a rerun of a done 1,000,000-row campaign
RECONCILE_ROWS = 20_000
REPORT_RATE = 40  # the sandbox's Reporting API answers 429 above this
OPT_OUTS = 100_000
OPT_STATUS_RATE = 40  # the sandbox answers 429 above this many queries a second
TMPFS = "/dev/shm"  # memory-backed: an fsync there costs nothing


def exact_rate(work: Path, rate: int, seconds: float) -> Result:
    """Server-side arrivals of a real run at `rate`: the fullest 1 s window, the pace."""
    rows = int(rate * seconds * 1.02) + 1
    directory = fresh(work / f"rate-{rate}")
    box = start_sandbox(directory)
    try:
        data = write_people(directory / "people.csv", rows)
        done = run_campaign(write_job(directory, box.url, data, rate, 20))
        times = [line["t"] for line in box.arrivals()]
    finally:
        box.stop()
    fullest, achieved = max_in_window(times), rate_of(times)
    ordered = sorted(times)
    # How close N+1 arrivals came to fitting into one second (above 1.0 s: they never did).
    tightest = min((b - a for a, b in zip(ordered, ordered[rate:], strict=False)), default=0.0)
    ok = done.code == 0 and len(times) == rows and fullest <= rate and achieved >= 0.97 * rate
    return Result(
        f"exact rate, N={rate}/s over {seconds:g} s",
        f"max in any 1 s window <= {rate}; achieved >= {0.97 * rate:g}/s",
        f"max {fullest} in 1 s; achieved {achieved:.2f}/s ({achieved / rate:.3f} N)",
        ok,
        {
            "rows": rows,
            "arrivals": len(times),
            "exit": done.code,
            "max_in_1s": fullest,
            "achieved_per_s": round(achieved, 3),
            "span_s": round(max(times) - min(times), 3),
            "tightest_n_plus_1_span_s": round(tightest, 4),
        },
    )


def overhead(work: Path, rows: int = OVERHEAD_ROWS, repeats: int = 7) -> Result:
    """Our send rate vs a bare aiohttp client: same bodies, same sandbox, same concurrency.

    Each round runs, in a rotating order so that drift in the machine hits all alike: our
    CLI with its ledger on disk (every commit fsynced), our CLI with its ledger on tmpfs
    (where an fsync costs nothing: the price of durability is the difference), and the
    bare client on the standard event loop and on uvloop. The faster client is the one
    with the higher median rate; a round's ratio is ours over that client's in the same
    round, and the result is the median of the rounds. (Not ours over the better of the
    two clients in each round: one program's rate moves by about 20% from run to run on a
    2-core machine, and the better of two such draws is above what either client does.)
    Seven rounds, so that one odd run does not decide the median.
    """
    directory = fresh(work / "overhead")
    box = start_sandbox(directory)
    data = write_people(directory / "people.csv", rows)
    kinds = ["ours", "bare-asyncio", "ours-tmpfs", "bare-uvloop"]
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    end_to_end: list[float] = []
    try:
        for i in range(repeats):
            for who in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
                start = box.record_size()
                if who.startswith("ours"):
                    place = fresh(directory / f"{who}-{i}")
                    ledger_dir = place / "runs"
                    if who == "ours-tmpfs":
                        ledger_dir = Path(tempfile.mkdtemp(prefix="bench-", dir=TMPFS))
                    job = write_job(
                        place, box.url, data, NO_LIMIT, OVERHEAD_CONCURRENCY, ledger_dir
                    )
                    done = run_campaign(job)
                    if who == "ours":
                        end_to_end.append(rows / done.seconds)
                    else:
                        shutil.rmtree(ledger_dir, ignore_errors=True)
                else:
                    done = run_measured(
                        [
                            sys.executable,
                            str(ROOT / "bench" / "bare_client.py"),
                            box.url,
                            "0",
                            str(rows),
                            str(OVERHEAD_CONCURRENCY),
                            who.removeprefix("bare-"),
                        ],
                        directory,
                    )
                if done.code != 0:
                    raise RuntimeError(f"{who} run failed: {done.output[-2000:]}")
                lines = box.arrivals(start, box.record_size())
                if len(lines) != rows:
                    raise RuntimeError(f"{who} run: {len(lines)} arrivals for {rows} rows")
                if i == 0:
                    sent = sorted(json.dumps(line["body"], ensure_ascii=False) for line in lines)
                    if sent != sorted(body(n).decode() for n in range(rows)):
                        raise RuntimeError(f"{who} run did not send the expected bodies")
                rates[who].append(rate_of([line["t"] for line in lines]))
    finally:
        box.stop()
    rounds = range(repeats)
    median = {kind: statistics.median(values) for kind, values in rates.items()}
    clients = sorted(("bare-asyncio", "bare-uvloop"), key=lambda kind: median[kind])
    slower, faster = clients

    def ratio_to(kind: str) -> float:
        return statistics.median(rates["ours"][i] / rates[kind][i] for i in rounds)

    ratio = ratio_to(faster)
    durability = statistics.median(rates["ours"][i] / rates["ours-tmpfs"][i] for i in rounds)
    return Result(
        f"overhead at full speed, concurrency {OVERHEAD_CONCURRENCY}, ledger on disk "
        "(fsync per commit)",
        "our send rate >= 0.75 x the faster bare aiohttp client (median of rounds)",
        f"{ratio:.2f} x bare {faster.removeprefix('bare-')} ({median['ours']:.0f}/s vs "
        f"{median['bare-asyncio']:.0f}/s asyncio, {median['bare-uvloop']:.0f}/s uvloop; "
        f"{ratio_to(slower):.2f} x bare {slower.removeprefix('bare-')}); fsync costs "
        f"{1 - durability:.0%} ({median['ours-tmpfs']:.0f}/s on tmpfs); end to end "
        f"{statistics.median(end_to_end):.0f} rows/s",
        ratio >= 0.75,
        {
            "rows": rows,
            **{f"{k.replace('-', '_')}_per_s": [round(r) for r in rates[k]] for k in kinds},
            "faster_client": faster,
            "ratio": round(ratio, 3),
            "ratio_to_slower_client": round(ratio_to(slower), 3),
            "on_disk_vs_tmpfs": round(durability, 3),
            "end_to_end_rows_per_s": [round(r) for r in end_to_end],
        },
    )


def million(work: Path, rows: int) -> list[Result]:
    """Validate and send `rows` rows with no rate limit: the peak RSS of the CLI process and
    its time end to end; then the same job again, a rerun of a campaign already done."""
    directory = fresh(work / "million")
    box = start_sandbox(directory, record=False)
    try:
        data = write_people(directory / "people.csv", rows)
        job = write_job(directory, box.url, data, NO_LIMIT, OVERHEAD_CONCURRENCY)
        before = box.accepted()
        done = run_campaign(job)
        sent = box.accepted() - before
        again = run_campaign(job)
        extra = box.accepted() - before - sent
    finally:
        box.stop()
    results = directory / "runs" / "bench" / "results.csv"
    lines = count_lines(results) if results.exists() else 0
    data.unlink()
    ok = done.code == 0 and sent == rows and lines == rows + 1
    split = phases(done)
    return [
        Result(
            f"bounded memory, {rows:,} rows validated and sent",
            "peak RSS <= 300 MB",
            f"{done.peak_rss_mb:.0f} MB; {done.seconds:.0f} s ({rows / done.seconds:.0f} rows/s)",
            ok and done.peak_rss_mb <= 300,
            {
                "rows": rows,
                "exit": done.code,
                "requests": sent,
                "results_lines": lines,
                "peak_rss_mb": round(done.peak_rss_mb, 1),
                "seconds": round(done.seconds, 1),
            },
        ),
        Result(
            f"end to end, {rows:,} rows (run of a new campaign, no rate limit)",
            f"<= {MILLION_TARGET_S:g} s",
            f"{done.seconds:.0f} s ({rows / done.seconds:.0f} rows/s; {split.summary()})",
            ok and done.seconds <= MILLION_TARGET_S,
            {"rows": rows, "exit": done.code, "seconds": round(done.seconds, 1), **split.details()},
            "" if done.seconds <= MILLION_TARGET_S else split.why(rows),
        ),
        Result(
            f"resume a fully sent {rows:,}-row campaign",
            f"<= {DONE_RESUME_TARGET_S:g} s and 0 requests",
            f"{again.seconds:.2f} s, {extra} requests",
            ok and again.code == 0 and extra == 0 and again.seconds <= DONE_RESUME_TARGET_S,
            {
                "rows": rows,
                "exit": again.code,
                "seconds": round(again.seconds, 3),
                "requests": extra,
            },
            "" if again.seconds <= DONE_RESUME_TARGET_S else phases(again).why(0),
        ),
    ]


def speed(work: Path, rows: int = SPEED_ROWS, rounds: int = SPEED_ROUNDS) -> Result:
    """A new campaign of `rows` rows end to end (load, map, send, report), no rate limit:
    rows per second of the whole command, the median of `rounds` runs on one sandbox."""
    directory = fresh(work / "speed")
    box = start_sandbox(directory, record=False)
    data = write_people(directory / "people.csv", rows)
    runs: list[Finished] = []
    try:
        for i in range(rounds):
            place = fresh(directory / f"round-{i}")
            before = box.accepted()
            done = run_campaign(write_job(place, box.url, data, NO_LIMIT, OVERHEAD_CONCURRENCY))
            if done.code != 0 or box.accepted() - before != rows:
                raise RuntimeError(f"round {i} did not send every row: {done.output[-2000:]}")
            runs.append(done)
    finally:
        box.stop()
    rates = [rows / done.seconds for done in runs]
    middle = runs[rates.index(statistics.median(rates))] if rounds % 2 else runs[0]
    rate = statistics.median(rates)
    split = phases(middle)
    return Result(
        f"end to end, {rows:,} rows (run of a new campaign, no rate limit)",
        f">= {SPEED_TARGET:,} rows/s (median of {rounds} runs)",
        f"{rate:.0f} rows/s ({split.summary()})",
        rate >= SPEED_TARGET,
        {"rows": rows, "rows_per_s": [round(r) for r in rates], **split.details()},
        "" if rate >= SPEED_TARGET else split.why(rows),
    )


def _reconciled(
    work: Path, name: str, rows: int, rate: float, *options: str
) -> tuple[Finished, dict[str, Any]]:
    """Send `rows` people through a sandbox, then reconcile them against it at `rate`
    pages per second: the reconcile's run and its summary.json."""
    directory = fresh(work / name)
    box = start_sandbox(directory, "--delivery-delay-s", "0", *options, record=False)
    try:
        data = write_people(directory / "people.csv", rows)
        job = write_job(directory, box.url, data, NO_LIMIT, OVERHEAD_CONCURRENCY)
        settings = json.loads(job.read_text(encoding="utf-8"))
        settings["reporting"] = {
            "agent_id": "1",
            "access_token": "sandbox-token",
            "rate_per_second": rate,
            "settle_minutes": 0,
        }
        job.write_text(json.dumps(settings, indent=2), encoding="utf-8")
        sent = run_campaign(job)
        if sent.code != 0 or box.accepted() != rows:
            raise RuntimeError(f"the send did not send every row: {sent.output[-2000:]}")
        time.sleep(2.5)  # the sandbox's entries are created up to 2 s after their request
        done = run_measured([*campaign_command(), "reconcile", str(job)], directory)
    finally:
        box.stop()
    summary_path = directory / "runs" / "bench" / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else {}
    return done, summary


def reconcile_rate(work: Path, rows: int = RECONCILE_ROWS, rate: int = REPORT_RATE) -> Result:
    """A campaign's reconcile is bound by the Reporting API's rate: every page, matching
    and recording included, in at most 1.2 x pages / rate."""
    done, summary = _reconciled(work, "reconcile", rows, rate, "--report-rate", str(rate))
    tally = summary.get("last_reconcile", {})
    pages = int(tally.get("pages", 0))
    bound = 1.2 * pages / rate
    delivered = summary.get("delivery", {}).get("delivered", 0)
    ok = done.code == 0 and delivered == rows and pages > 0 and done.seconds <= bound
    return Result(
        f"reconcile {rows:,} people at --report-rate {rate}",
        "wall <= 1.2 x pages / rate, every person delivered",
        f"{done.seconds:.1f} s for {pages} pages (bound {bound:.1f} s; "
        f"{pages / done.seconds:.1f} pages/s); {delivered:,} delivered",
        ok,
        {
            "rows": rows,
            "exit": done.code,
            "pages": pages,
            "entries": tally.get("entries"),
            "seconds": round(done.seconds, 2),
            "bound_s": round(bound, 2),
            "peak_rss_mb": round(done.peak_rss_mb, 1),
            "delivered": delivered,
        },
    )


def reconcile_memory(work: Path, rows: int) -> Result:
    """Peak RSS of the reconcile of a campaign of `rows` people (no rate that binds)."""
    # 1000 pages a second: the highest reporting.rate_per_second a job may set.
    done, summary = _reconciled(work, "reconcile-million", rows, 1000)
    delivered = summary.get("delivery", {}).get("delivered", 0)
    ok = done.code == 0 and delivered == rows and done.peak_rss_mb <= 300
    return Result(
        f"bounded memory, reconcile of {rows:,} people",
        "peak RSS <= 300 MB",
        f"{done.peak_rss_mb:.0f} MB; {done.seconds:.0f} s; {delivered:,} delivered",
        ok,
        {
            "rows": rows,
            "exit": done.code,
            "peak_rss_mb": round(done.peak_rss_mb, 1),
            "seconds": round(done.seconds, 1),
            "pages": summary.get("last_reconcile", {}).get("pages"),
        },
    )


def opt_out_sync(work: Path, numbers: int = OPT_OUTS, rate: int = OPT_STATUS_RATE) -> Result:
    """A full sync of Avaamo's opt-outs is bound by the API's rate: every page, writing the
    list included, in at most 1.2 x pages / rate."""
    directory = fresh(work / "opt-outs")
    box = start_sandbox(
        directory, "--opted-out", str(numbers), "--report-rate", str(rate), record=False
    )
    try:
        people = write_people(directory / "in.csv", 1)
        job = write_job(directory, box.url, people, rate, 1)
        settings = json.loads(job.read_text(encoding="utf-8"))
        settings["reporting"] = {
            "agent_id": "1",
            "access_token": "sandbox-token",
            "rate_per_second": rate,
        }
        job.write_text(json.dumps(settings), encoding="utf-8")
        done = run_measured([*campaign_command(), "suppress", "sync", str(job)], directory)
    finally:
        box.stop()
    pages = math.ceil(numbers / 100)
    bound = 1.2 * pages / rate
    added = f"added {numbers}," in done.output
    ok = done.code == 0 and added and done.seconds <= bound
    return Result(
        f"full sync of {numbers:,} opted-out numbers at {rate} pages/s",
        "wall <= 1.2 x pages / rate, every number on the list",
        f"{done.seconds:.1f} s for {pages} pages (bound {bound:.1f} s); "
        f"{done.peak_rss_mb:.0f} MB peak",
        ok,
        {
            "numbers": numbers,
            "exit": done.code,
            "pages": pages,
            "seconds": round(done.seconds, 2),
            "bound_s": round(bound, 2),
            "peak_rss_mb": round(done.peak_rss_mb, 1),
        },
        "" if ok else done.output.strip().splitlines()[-1][:200],
    )


def resume(work: Path, rows: int = RESUME_ROWS) -> Result:
    """Rerun a campaign whose every row is sent: time, and requests the server saw."""
    directory = fresh(work / "resume")
    box = start_sandbox(directory, record=False)
    try:
        data = write_people(directory / "people.csv", rows)
        job = write_job(directory, box.url, data, NO_LIMIT, OVERHEAD_CONCURRENCY)
        first = run_campaign(job)
        if first.code != 0 or box.accepted() != rows:
            raise RuntimeError(f"first run did not send every row: {first.output[-2000:]}")
        again = run_campaign(job)
        extra = box.accepted() - rows
    finally:
        box.stop()
    ok = again.code == 0 and extra == 0 and again.seconds <= 3
    return Result(
        f"resume a fully sent {rows:,}-row campaign",
        "<= 3 s and 0 requests",
        f"{again.seconds:.2f} s, {extra} requests (first run {first.seconds:.1f} s)",
        ok,
        {
            "rows": rows,
            "exit": again.code,
            "seconds": round(again.seconds, 3),
            "requests": extra,
            "first_run_seconds": round(first.seconds, 2),
        },
    )


def startup(work: Path, repeats: int = 7) -> Result:
    """`campaign --help` against `python -c pass`, the interpreter's own start."""

    def median_time(command: list[str]) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(command, cwd=work, check=True, capture_output=True)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    baseline = median_time([sys.executable, "-c", "pass"])
    help_time = median_time([*campaign_command(), "--help"])
    return Result(
        "start: campaign --help",
        "<= 0.3 s",
        f"{help_time:.3f} s (python -c pass: {baseline:.3f} s)",
        help_time <= 0.3,
        {"help_s": round(help_time, 4), "python_s": round(baseline, 4), "repeats": repeats},
    )


def machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def table(results: list[Result]) -> str:
    rows = [("measure", "target", "result", "")] + [
        (r.measure, r.target, r.result, "pass" if r.passed else "FAIL") for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        default=bool(os.environ.get("BENCH_QUICK")),
        help="skip the million-row measure",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="rate, overhead, speed, million, resume, startup, reconcile, reconcile-million, "
        "opt-outs, postgresql",
    )
    parser.add_argument("--million-rows", type=int, default=1_000_000, metavar="N")
    args = parser.parse_args()

    measures: dict[str, Callable[[Path], list[Result]]] = {
        "startup": lambda w: [startup(w)],
        "rate": lambda w: [exact_rate(w, 50, 10), exact_rate(w, 200, 10)],
        "overhead": lambda w: [overhead(w)],
        "resume": lambda w: [resume(w)],
        "speed": lambda w: [speed(w)],
        "million": lambda w: million(w, args.million_rows),
        "reconcile": lambda w: [reconcile_rate(w)],
        "reconcile-million": lambda w: [reconcile_memory(w, args.million_rows)],
        "opt-outs": lambda w: [opt_out_sync(w)],
        "postgresql": many_hosts.measures,
    }
    slow = ("million", "reconcile-million")
    chosen = args.only or [m for m in measures if not (args.quick and m in slow)]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="campaign-bench-") as tmp:
        for name in chosen:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            results += measures[name](Path(tmp))
            print(f"bench: {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    report = {"machine": machine(), "results": [asdict(r) for r in results]}
    if args.only and RESULTS.exists():
        # A partial run updates its measures and keeps the others from the last full run.
        fresh_names = {r.measure for r in results}
        kept = json.loads(RESULTS.read_text(encoding="utf-8")).get("results", [])
        report["results"] = [r for r in kept if r["measure"] not in fresh_names] + report["results"]
    RESULTS.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    info = report["machine"]
    print(f"machine: {info['cores']} cores, Python {info['python']}, {info['platform']}")
    print(table(results))
    for missed in (r for r in results if not r.passed and r.reason):
        print(f"missed: {missed.measure}: {missed.reason}")
    print(f"written: {RESULTS.relative_to(ROOT)}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
