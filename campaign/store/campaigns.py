"""Campaigns: `{output_dir}/{campaign}/` with its ledger, locks and log; or, with a
PostgreSQL store, the ledger in a schema of the database and only the report and log in
the directory (`Store`).

SQLite: one process at a time per campaign. Two advisory `flock`s, which the kernel drops when
the holder dies (even by SIGKILL), so a stale lock never blocks a rerun:

    .lock   the owner's: taken exclusively, without waiting; a second run gets
            `CampaignBusy`. Nobody else ever touches it.
    .live   held exclusively by the owner as well; anyone who only wants to know
            whether the campaign is in use (`is_locked`) tries a *shared* lock on this
            one. A question can so never make a real run fail.

Everything about a campaign directory is decided while holding `.lock`: whether the
campaign is new, and removing what an unusable input left behind. A lock file can be
removed (with its directory) only by its holder, so whoever takes a lock checks that
the file it locked is still the one at that path (`_lock_file`), and starts again if not.

PostgreSQL: many processes on many hosts share a campaign (see store/ledger.py: claims
and leases); the locks are PostgreSQL's advisory locks, which end with the session that
holds them, and a run is live while its lease is.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from campaign.errors import CampaignBusy, UnfinishedCampaign, UsageError
from campaign.records import RunInfo
from campaign.store.db import Database
from campaign.store.ledger import LEASE_S, LEDGER_FILE, Ledger, LedgerError
from campaign.times import local_stamp

LOCK_FILE = ".lock"
LIVE_FILE = ".live"
LOG_FILE = "log.jsonl"
MAPPING_FILE = "mapping.json"  # a page campaign's mapping, as the page last saved it
WEB_FILE = "web.json"  # a page campaign's upload: what the page shows of it
# What an owner's atomic writes leave when it is killed mid-write (`files.atomic_write`).
_OWNER_TEMP_FILES = (".results.csv.*.tmp", ".summary.json.*.tmp")
UNFINISHED = ("running", "crashed", "interrupted", "aborted")


@dataclass
class OpenCampaign:
    """A campaign this process owns until the `open_campaign` block ends."""

    directory: Path
    ledger: Ledger
    fresh: bool  # the ledger did not exist before this process took the lock
    found: frozenset[str]  # what the directory held when the lock was taken
    shared: bool = False  # PostgreSQL: other workers may work this campaign too

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Held while a run settles what dead runs left, loads its input and registers:
        on PostgreSQL the first worker loads, the others wait here and then join it. On
        SQLite the campaign's lock is held already."""
        if not self.shared:
            yield
            return
        name = f"load:{self.directory.name}"
        self.ledger.db.advisory_lock(name)
        try:
            yield
        finally:
            self.ledger.db.advisory_unlock(name)

    @contextlib.contextmanager
    def alone(self, what: str) -> Iterator[None]:
        """PostgreSQL: no other process does `what` (e.g. a reconcile) to this campaign
        meanwhile; SQLite: the campaign's lock is held already."""
        if not self.shared:
            yield
            return
        name = f"{what}:{self.directory.name}"
        if not self.ledger.db.advisory_lock(name, wait=False):
            raise CampaignBusy(f"campaign {self.directory.name}: another {what} is running")
        try:
            yield
        finally:
            self.ledger.db.advisory_unlock(name)

    def discard(self) -> None:
        """Remove what this process made of a fresh campaign whose input turned out
        unusable, so that no empty campaign confuses the next run. Anything that was there
        before (a page's upload) stays; the directory goes only if it was made here."""
        assert self.fresh and not self.ledger.total_requests()
        if self.shared:
            return  # the schema may be another worker's by now; an empty one is harmless
        self.ledger.close()
        ours = {LOCK_FILE, LIVE_FILE}  # safe to remove while held: see `_lock_file`
        if not self.found - ours:
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        for entry in self.directory.iterdir():
            if entry.name not in self.found or entry.name in ours:
                entry.unlink(missing_ok=True)


@contextlib.contextmanager
def open_campaign(
    output_dir: Path, campaign: str, job_name: str, origin: str = "cli"
) -> Iterator[OpenCampaign]:
    """Create/lock the campaign directory and open its ledger for the duration."""
    directory = output_dir / campaign
    with _lock_file(directory, LOCK_FILE, fcntl.LOCK_EX | fcntl.LOCK_NB) as lock:
        if lock is None:
            raise CampaignBusy(
                f"campaign {campaign} is in use by {_holder(directory)}; "
                "wait for it to finish, or stop it (Ctrl-C) first"
            )
        # Probes hold `.live` shared for an instant only: waiting for it is short.
        with _lock_file(directory, LIVE_FILE, fcntl.LOCK_EX) as live:
            assert live is not None
            _write_holder(lock)
            found = frozenset(entry.name for entry in directory.iterdir())
            _remove_owner_leftovers(directory)
            fresh = LEDGER_FILE not in found
            try:
                ledger = Ledger(directory / LEDGER_FILE)
            except LedgerError as exc:
                raise UsageError(
                    f"{directory / LEDGER_FILE}: cannot open the ledger ({exc})"
                ) from None
            try:
                if ledger.get_meta("campaign") is None:
                    # A page's upload made the directory: the campaign is the page's,
                    # whoever opens its ledger first.
                    origin = "page" if WEB_FILE in found else origin
                    ledger.set_meta(
                        campaign=campaign, job=job_name, origin=origin, created_at=time.time()
                    )
                yield OpenCampaign(directory, ledger, fresh, found)
            finally:
                ledger.close()
                if directory.exists():
                    lock.seek(0)
                    lock.truncate()


@contextlib.contextmanager
def _lock_file(directory: Path, name: str, how: int) -> Iterator[IO[str] | None]:
    """Hold `flock(how)` on `directory/name`; None when LOCK_NB found it taken."""
    path = directory / name
    while True:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle = path.open("a+", encoding="utf-8")
        except OSError as exc:
            raise UsageError(
                f"{directory}: cannot create the campaign directory ({exc.strerror})"
            ) from None
        with handle:
            try:
                fcntl.flock(handle, how)
            except BlockingIOError:
                yield None
                return
            if _same_file(handle, path):
                yield handle
                return
        # Its holder removed the file while we waited for it: lock the new one.


def _remove_owner_leftovers(directory: Path) -> None:
    """Temporary files of a report whose writer was killed: only an owner writes them, so
    the new owner may remove them."""
    for pattern in _OWNER_TEMP_FILES:
        for leftover in directory.glob(pattern):
            leftover.unlink(missing_ok=True)


def _same_file(handle: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _write_holder(lock: IO[str]) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()} since {local_stamp()}")
    lock.flush()


def _holder(directory: Path) -> str:
    try:
        return (directory / LOCK_FILE).read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        return "another process"


def is_locked(directory: Path) -> bool:
    """Whether a process owns the campaign now. Takes nothing an owner needs: a shared lock
    on `.live`, for an instant, which an owner-to-be simply waits out."""
    try:
        handle = (directory / LIVE_FILE).open("r", encoding="utf-8")
    except OSError:
        return False  # never owned since it was created (or not a campaign)
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


@dataclass(frozen=True)
class CampaignInfo:
    id: str
    job: str | None
    origin: str
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
        with contextlib.closing(Ledger.reader(directory / LEDGER_FILE)) as ledger:
            return info_of(directory, ledger)
    except LedgerError:
        return None


def info_of(directory: Path, ledger: Ledger) -> CampaignInfo:
    """The campaign's facts from its open ledger."""
    meta = ledger.all_meta()
    run: RunInfo | None = ledger.last_run()
    state, started = (run.state, run.started_at) if run else (None, None)
    if state == "running" and not is_locked(directory):
        state = "crashed"
    return CampaignInfo(
        directory.name, meta.get("job"), origin_of(meta), meta.get("created_at"), state, started
    )


def origin_of(meta: dict[str, Any]) -> str:
    """Where a campaign was made: "page" or "cli". Ledgers from before the origin was
    recorded name page campaigns' job `{job}.web`."""
    return meta.get("origin") or ("page" if str(meta.get("job")).endswith(".web") else "cli")


def check_unfinished(output_dir: Path, job_name: str, campaign: str) -> None:
    """The midnight guard: refuse to start `campaign` while the job's latest one is unfinished."""
    found = list_campaigns(output_dir)
    _refuse_unfinished(found, job_name, campaign, lambda c: is_locked(output_dir / c))


def _refuse_unfinished(
    found: list[CampaignInfo], job_name: str, campaign: str, open_now: Callable[[str], bool]
) -> None:
    """The midnight guard over a store's campaigns, newest first; `open_now(id)`: a
    process has that campaign open right now (it may still be reading its input)."""
    for info in found:
        state = info.last_state
        if info.job != job_name:
            continue
        if state is None:
            # Never sent, unless a run holds it right now (still reading its input).
            if not open_now(info.id):
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
    of one job started at the same moment cannot both pass the guard. It blocks: call it
    off the event loop."""
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


@dataclass(frozen=True)
class Store(abc.ABC):
    """Where a job's campaigns live (`store_of` chooses): `SqliteStore`, SQLite files under
    `output_dir`, or `PostgresStore`, PostgreSQL at `url` (the job's `ledger:`). The report
    and log go under `output_dir` either way."""

    output_dir: Path
    url: str | None = None

    @property
    def shared(self) -> bool:
        """Several processes (hosts) may work on one campaign at once."""
        return self.url is not None

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """For messages: the output directory, or the database without its password."""

    @abc.abstractmethod
    def open_campaign(
        self, campaign: str, job_name: str, origin: str = "cli"
    ) -> contextlib.AbstractContextManager[OpenCampaign]:
        """The campaign owned by this process (a context: released on exit)."""

    @abc.abstractmethod
    def list_campaigns(self, lease_s: float = LEASE_S) -> list[CampaignInfo]:
        """`lease_s`: on PostgreSQL, a run this long without a heartbeat is `crashed`."""

    @abc.abstractmethod
    def read_info(self, campaign: str, lease_s: float = LEASE_S) -> CampaignInfo | None: ...

    @abc.abstractmethod
    def info_of(
        self, campaign: str, ledger: Ledger, lease_s: float = LEASE_S
    ) -> CampaignInfo | None:
        """The campaign's facts from its open ledger; None when it is not a campaign's."""

    @abc.abstractmethod
    def open_reader(self, campaign: str) -> Ledger | None:
        """The campaign's ledger, read-only (another process may be sending it); None when
        it has none (an upload not validated yet). Close it."""

    @contextlib.contextmanager
    def reader(self, campaign: str) -> Iterator[Ledger | None]:
        ledger = self.open_reader(campaign)
        try:
            yield ledger
        finally:
            if ledger is not None:
                ledger.close()

    @abc.abstractmethod
    def in_use(self, campaign: str, lease_s: float = LEASE_S) -> bool:
        """SQLite: a process holds the campaign's lock; PostgreSQL: a worker holds a live
        lease on it."""

    @abc.abstractmethod
    def campaign_ids(self) -> list[str]:
        """Every campaign with a ledger."""

    @abc.abstractmethod
    def exists(self, campaign: str) -> bool: ...

    @abc.abstractmethod
    def check_unfinished(self, job_name: str, campaign: str, lease_s: float = LEASE_S) -> None:
        """The midnight guard: refuse a new campaign while the job's latest did not finish."""

    @abc.abstractmethod
    def job_lock(self, job_name: str) -> contextlib.AbstractContextManager[None]:
        """Held while a run of `job_name` decides which campaign it runs."""


@dataclass(frozen=True)
class SqliteStore(Store):
    """One SQLite ledger per campaign directory; one process per campaign (file locks)."""

    @property
    def where(self) -> str:
        return str(self.output_dir)

    @contextlib.contextmanager
    def open_campaign(
        self, campaign: str, job_name: str, origin: str = "cli"
    ) -> Iterator[OpenCampaign]:
        with open_campaign(self.output_dir, campaign, job_name, origin) as owned:
            yield owned

    def list_campaigns(self, lease_s: float = LEASE_S) -> list[CampaignInfo]:
        return list_campaigns(self.output_dir)

    def read_info(self, campaign: str, lease_s: float = LEASE_S) -> CampaignInfo | None:
        return read_info(self.output_dir / campaign)

    def info_of(
        self, campaign: str, ledger: Ledger, lease_s: float = LEASE_S
    ) -> CampaignInfo | None:
        return info_of(self.output_dir / campaign, ledger)

    def open_reader(self, campaign: str) -> Ledger | None:
        path = self.output_dir / campaign / LEDGER_FILE
        return Ledger.reader(path) if path.is_file() else None

    def in_use(self, campaign: str, lease_s: float = LEASE_S) -> bool:
        return is_locked(self.output_dir / campaign)

    def campaign_ids(self) -> list[str]:
        found = self.output_dir.glob(f"*/{LEDGER_FILE}") if self.output_dir.is_dir() else []
        return [path.parent.name for path in found]

    def exists(self, campaign: str) -> bool:
        return (self.output_dir / campaign / LEDGER_FILE).is_file()

    def check_unfinished(self, job_name: str, campaign: str, lease_s: float = LEASE_S) -> None:
        check_unfinished(self.output_dir, job_name, campaign)

    @contextlib.contextmanager
    def job_lock(self, job_name: str) -> Iterator[None]:
        with job_lock(self.output_dir, job_name):
            yield


@dataclass(frozen=True)
class PostgresStore(Store):
    """Every campaign a schema of one database; workers on any host share a campaign
    (advisory locks, leases)."""

    url: str | None = None

    def _url(self) -> str:
        assert self.url is not None
        return self.url

    @property
    def where(self) -> str:
        from campaign.store.postgres import safe_url

        return safe_url(self._url())

    @contextlib.contextmanager
    def open_campaign(
        self, campaign: str, job_name: str, origin: str = "cli"
    ) -> Iterator[OpenCampaign]:
        directory = self.output_dir / campaign
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(
                f"{directory}: cannot create the campaign directory ({exc.strerror})"
            ) from None
        found = frozenset(entry.name for entry in directory.iterdir())
        ledger = _open_shared(self._url(), campaign)
        try:
            # Held (shared) while this process has the campaign open, like SQLite's `.live`:
            # the midnight guard sees a run that has not registered yet (still loading).
            ledger.db.advisory_lock(_open_lock(campaign), shared=True)
            fresh = ledger.get_meta("campaign") is None
            if fresh:
                ledger.set_meta(
                    campaign=campaign, job=job_name, origin=origin, created_at=time.time()
                )
            yield OpenCampaign(directory, ledger, fresh, found, shared=True)
        finally:
            ledger.close()

    def list_campaigns(self, lease_s: float = LEASE_S) -> list[CampaignInfo]:
        found = []
        for campaign in _shared_campaigns(self._url()):
            info = self.read_info(campaign, lease_s)
            if info is not None:
                found.append(info)
        found.sort(key=lambda c: c.last_started_at or c.created_at or 0, reverse=True)
        return found

    def read_info(self, campaign: str, lease_s: float = LEASE_S) -> CampaignInfo | None:
        try:
            with self.reader(campaign) as ledger:
                return None if ledger is None else self.info_of(campaign, ledger, lease_s)
        except LedgerError:
            return None

    def info_of(
        self, campaign: str, ledger: Ledger, lease_s: float = LEASE_S
    ) -> CampaignInfo | None:
        """The campaign is running while a worker holds a live lease, whichever worker's
        run was the last to start (it may have finished its share first)."""
        meta = ledger.all_meta()
        if meta.get("campaign") is None:
            return None
        run = ledger.last_run()
        state, started = (run.state, run.started_at) if run else (None, None)
        if ledger.live_workers(lease_s):
            state = "running"
        elif state == "running":
            state = "crashed"
        return CampaignInfo(
            campaign, meta.get("job"), origin_of(meta), meta.get("created_at"), state, started
        )

    def open_reader(self, campaign: str) -> Ledger | None:
        return Ledger.postgres_reader(self._url(), campaign)

    def in_use(self, campaign: str, lease_s: float = LEASE_S) -> bool:
        with self.reader(campaign) as ledger:
            return ledger is not None and ledger.live_workers(lease_s) > 0

    def campaign_ids(self) -> list[str]:
        return _shared_campaigns(self._url())

    def exists(self, campaign: str) -> bool:
        with self.reader(campaign) as ledger:
            return ledger is not None and ledger.get_meta("campaign") is not None

    def check_unfinished(self, job_name: str, campaign: str, lease_s: float = LEASE_S) -> None:
        url = self._url()
        found = self.list_campaigns(lease_s)
        _refuse_unfinished(found, job_name, campaign, lambda c: _held_open(url, c))

    @contextlib.contextmanager
    def job_lock(self, job_name: str) -> Iterator[None]:
        db = Database.postgresql(self._url(), None)
        try:
            db.advisory_lock(f"job:{job_name}")
            yield
        finally:
            db.close()


def store_of(output_dir: str | Path, url: str | None) -> Store:
    """The job's store, chosen once: PostgreSQL when the job names a `ledger:` URL."""
    if url is None:
        return SqliteStore(Path(output_dir))
    return PostgresStore(Path(output_dir), url)


def _open_lock(campaign: str) -> str:
    return f"open:{campaign}"


def _held_open(url: str, campaign: str) -> bool:
    """Whether a process has the campaign open (`Store.open_campaign`). The question takes
    the lock for an instant only: an opener waits it out, it never fails for it."""
    db = Database.postgresql(url, None)
    try:
        if not db.advisory_lock(_open_lock(campaign), wait=False):
            return True
        db.advisory_unlock(_open_lock(campaign))
        return False
    finally:
        db.close()


def _open_shared(url: str, campaign: str) -> Ledger:
    return Ledger.on_postgres(url, campaign)


def _shared_campaigns(url: str) -> list[str]:
    """The campaigns of a PostgreSQL store: the schemas holding a ledger."""
    db = Database.postgresql(url, None)
    try:
        schemas = [
            name
            for (name,) in db.execute(
                "SELECT table_schema FROM information_schema.tables "
                "WHERE table_name = 'meta' AND table_schema LIKE 'c\\_%'"
            )
        ]
        campaigns = []
        for schema in schemas:
            found = db.execute(
                f"SELECT value FROM {quote(schema)}.meta WHERE key = 'campaign'"
            ).fetchone()
            if found is not None:
                campaigns.append(json.loads(found[0]))
        return campaigns
    finally:
        db.close()


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
