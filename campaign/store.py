"""Campaign directories: `{output_dir}/{campaign}/` with its ledger, lock and log.

One process at a time per campaign: an advisory `flock` on `.lock`, which the kernel
drops when the holder dies (even by SIGKILL), so a stale lock never blocks a rerun.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from campaign.errors import CampaignBusy, UnfinishedCampaign, UsageError
from campaign.ledger import LEDGER_FILE, Ledger

LOCK_FILE = ".lock"
LOG_FILE = "log.jsonl"
UNFINISHED = ("running", "crashed", "interrupted", "aborted")


@contextlib.contextmanager
def open_campaign(output_dir: Path, campaign: str, job_name: str) -> Iterator[Ledger]:
    """Create/lock the campaign directory and open its ledger for the duration."""
    directory = output_dir / campaign
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = (directory / LOCK_FILE).open("a+", encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"{directory}: cannot create the campaign directory ({exc.strerror})"
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise CampaignBusy(
                f"campaign {campaign} is in use by {holder}; "
                "wait for it to finish, or stop it (Ctrl-C) first"
            ) from None
        lock.seek(0)
        lock.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {since}")
        lock.flush()
        try:
            ledger = Ledger(directory / LEDGER_FILE)
        except sqlite3.Error as exc:
            raise UsageError(f"{directory / LEDGER_FILE}: cannot open the ledger ({exc})") from None
        try:
            if ledger.get_meta("campaign") is None:
                ledger.set_meta(campaign=campaign, job=job_name, created_at=time.time())
            yield ledger
        finally:
            ledger.close()
            lock.seek(0)
            lock.truncate()


@dataclass(frozen=True)
class CampaignInfo:
    id: str
    job: str | None
    created_at: float | None
    last_state: str | None  # state of the last `run`; None if it was never sent
    last_started_at: float | None


def list_campaigns(output_dir: Path) -> list[CampaignInfo]:
    """Every campaign under `output_dir`, read-only, newest activity first."""
    found = []
    if not output_dir.is_dir():
        return []
    for ledger_path in output_dir.glob(f"*/{LEDGER_FILE}"):
        info = read_info(ledger_path.parent)
        if info is not None:
            found.append(info)
    found.sort(key=lambda c: c.last_started_at or c.created_at or 0, reverse=True)
    return found


def read_info(directory: Path) -> CampaignInfo | None:
    try:
        db = sqlite3.connect(f"file:{directory / LEDGER_FILE}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
        run = db.execute(
            "SELECT state, started_at FROM runs WHERE command = 'run' ORDER BY id DESC LIMIT 1"
        ).fetchone()
    except sqlite3.Error:
        return None
    finally:
        db.close()
    state, started = run if run else (None, None)
    if state == "running" and not is_locked(directory):
        state = "crashed"
    return CampaignInfo(directory.name, meta.get("job"), meta.get("created_at"), state, started)


def is_locked(directory: Path) -> bool:
    try:
        with (directory / LOCK_FILE).open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def check_unfinished(output_dir: Path, job_name: str, campaign: str) -> None:
    """The midnight guard: refuse to start `campaign` while the job's latest one is unfinished."""
    for info in list_campaigns(output_dir):
        state = info.last_state
        if info.job != job_name:
            continue
        if state is None:
            # Never sent, unless a run holds it right now (still reading its input).
            if not is_locked(output_dir / info.id):
                continue
            state = "running"
        if info.id != campaign and state in UNFINISHED:
            raise UnfinishedCampaign(
                f"campaign {info.id} of job {job_name} did not finish (its last run "
                f"{_said(state)}). Continue it with `--campaign {info.id}`, "
                f"or start {campaign} anyway with `--new`"
            )
        return  # only the latest campaign that was sent counts


@contextlib.contextmanager
def job_lock(output_dir: Path, job_name: str) -> Iterator[None]:
    """Held while a run checks the midnight guard and takes its campaign's lock, so two runs
    of one job started at the same moment cannot both pass the guard."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock = (output_dir / f".{job_name}.lock").open("a+", encoding="utf-8")
    except OSError as exc:
        raise UsageError(
            f"{output_dir}: cannot create the output directory ({exc.strerror})"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _said(state: str) -> str:
    return {
        "running": "is still running",
        "crashed": "crashed",
        "interrupted": "was interrupted",
        "aborted": "was aborted",
    }.get(state, state)
