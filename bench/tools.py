"""The bench's real parts: sandboxes and the CLI as subprocesses, generated spreadsheets."""

from __future__ import annotations

import bisect
import csv
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from campaign.sandbox import spawn

ROOT = Path(__file__).resolve().parent.parent
CHANNEL = "bench000-0000-4000-8000-000000000000"
PARAMS = {"first_name": "First Name", "emp_id": "Employee ID"}


def campaign_command() -> list[str]:
    """The console script an operator runs, beside this interpreter when it is installed."""
    script = Path(sys.executable).parent / "campaign"
    return [str(script)] if script.exists() else [sys.executable, "-m", "campaign"]


@dataclass
class Sandbox:
    process: subprocess.Popen[str]
    url: str
    record: Path | None

    def accepted(self) -> int:
        with urllib.request.urlopen(f"{self.url}/stats", timeout=10) as answer:
            return int(json.load(answer)["accepted"])

    def record_size(self) -> int:
        return self.record.stat().st_size if self.record and self.record.exists() else 0

    def arrivals(self, start: int = 0, end: int | None = None) -> list[dict[str, Any]]:
        """Record lines written between two byte offsets of the record file."""
        assert self.record is not None
        with self.record.open("rb") as handle:
            handle.seek(start)
            data = handle.read() if end is None else handle.read(end - start)
        return [json.loads(line) for line in data.splitlines() if line.strip()]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def start_sandbox(directory: Path, *options: str, record: bool = True) -> Sandbox:
    path = directory / f"record-{time.monotonic_ns()}.jsonl" if record else None
    extra = ["--record", str(path)] if path else []
    process, url = spawn(campaign_command(), *extra, *options)
    return Sandbox(process, url, path)


# --- data -------------------------------------------------------------------------------------


def row(i: int) -> tuple[str, str, str]:
    """(first name, employee id, phone as typed) of the i-th generated person."""
    return f"Zoë {i}", f"{i:07d}", f"(415) 2{i // 10000 % 100:02d}-{i % 10000:04d}"


def body(i: int) -> bytes:
    """The request body the campaign sends for row i: the mapper's payload, byte for byte."""
    name, emp_id, _ = row(i)
    phone = f"+14152{i // 10000 % 100:02d}{i % 10000:04d}"
    payload = {"to_phone": phone, "first_name": name, "emp_id": emp_id}
    return json.dumps(payload, ensure_ascii=False).encode()


def write_people(path: Path, n: int) -> Path:
    """A CSV of n distinct people (at most 1,000,000 distinct phones), written as it goes."""
    if n > 1_000_000:
        raise ValueError("the phone pattern gives 1,000,000 distinct numbers")
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["First Name", "Employee ID", "Phone"])
        for start in range(0, n, 10_000):
            writer.writerows(row(i) for i in range(start, min(n, start + 10_000)))
    return path


def write_job(
    directory: Path,
    url: str,
    data: Path,
    rate: float,
    concurrency: int,
    output_dir: Path | None = None,
    ledger: str | None = None,
) -> Path:
    job: dict[str, Any] = {
        "campaign": "bench",
        "input": str(data),
        "output_dir": str(output_dir or directory / "runs"),
        "api": {"base_url": url, "channel_uuid": CHANNEL, "timeout_s": 10},
        "mapping": {"to_phone": "Phone", "default_region": "US", "params": PARAMS},
        "limits": {"rate_per_second": rate, "concurrency": concurrency, "max_attempts": 3},
    }
    if ledger is not None:
        job["ledger"] = ledger
    path = directory / "job.yaml"
    path.write_text(json.dumps(job, indent=2), encoding="utf-8")  # JSON is YAML
    return path


# --- processes --------------------------------------------------------------------------------


@dataclass
class Finished:
    code: int
    seconds: float
    peak_rss_mb: float
    output: str


def run_measured(command: list[str], directory: Path, timeout: float = 3600) -> Finished:
    """Run to the end; wall time and the peak RSS of that process alone (wait4)."""
    log = directory / f"out-{time.monotonic_ns()}.txt"
    with log.open("w", encoding="utf-8") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                raise RuntimeError(f"{command[:3]} ran over {timeout} s")
            time.sleep(0.005)
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Finished(
        process.returncode, seconds, usage.ru_maxrss / 1024, log.read_text(encoding="utf-8")
    )


def run_campaign(job: Path, *options: str) -> Finished:
    return run_measured(
        [*campaign_command(), "run", str(job), "--no-progress", "--log-format", "json", *options],
        job.parent,
    )


@dataclass
class Phases:
    """Where a run's time went, from its JSON log: reading and mapping the input (to
    "input mapped"), sending (from "sending" to "run ended"), and the rest (start, the
    count of people to send, the report)."""

    total_s: float
    mapped_s: float | None
    send_s: float | None

    @property
    def other_s(self) -> float | None:
        if self.mapped_s is None or self.send_s is None:
            return None
        return max(self.total_s - self.mapped_s - self.send_s, 0.0)

    def details(self) -> dict[str, float | None]:
        return {
            "mapped_s": _rounded(self.mapped_s),
            "send_s": _rounded(self.send_s),
            "other_s": _rounded(self.other_s),
        }

    def summary(self) -> str:
        if self.other_s is None:
            return "phases not logged"
        return (
            f"input {self.mapped_s:.1f} s, sending {self.send_s:.1f} s, rest {self.other_s:.1f} s"
        )

    def why(self, rows: int) -> str:
        """One line for a missed target: the phases, and the send rate alone."""
        if self.send_s and rows:
            return f"{self.summary()}; the send alone {rows / self.send_s:.0f} rows/s"
        return self.summary()


def phases(done: Finished) -> Phases:
    at: dict[str, float] = {}
    mapped = None
    for line in done.output.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        name = event.get("event")
        if name in ("sending", "run ended") and "timestamp" in event:
            at[name] = _seconds(event["timestamp"])
        if name == "input mapped":
            mapped = float(event.get("seconds", 0.0))
    send = at["run ended"] - at["sending"] if len(at) == 2 else None
    return Phases(done.seconds, mapped, send)


def _seconds(timestamp: str) -> float:
    return dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def count_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def max_in_window(times: list[float], window: float = 1.0) -> int:
    """The most arrivals in any closed interval [t, t + window]."""
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)), default=0)


def rate_of(times: list[float]) -> float:
    """Arrivals per second from the first to the last."""
    times = sorted(times)
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0


def fresh(directory: Path) -> Path:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    return directory


@dataclass
class Result:
    measure: str
    target: str
    result: str
    passed: bool
    details: dict[str, object]
    reason: str = ""  # one line: where the time went, when the target is missed
