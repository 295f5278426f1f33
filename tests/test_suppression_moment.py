"""The suppression list's moment: a number whose addition committed at T gets no request
that leaves after T + 2 s, from a run sending at T or starting later, whatever the order in
which writers commit. Counted at the sandbox's record (its arrival times) against the
moment each addition committed, with the real CLI in subprocesses and real stores."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path

import psycopg
import pytest

from campaign.store.db import Transaction
from campaign.store.suppression import SCHEMA_VERSION, SHARED_SCHEMA, SuppressionList
from tests.helpers import (
    FaultServer,
    Sandbox,
    cli,
    e164,
    kill_left,
    logged_events,
    phones,
    read_results,
    soak_trials,
    spawn_cli,
    write_job,
)
from tests.helpers.pg import in_campaign, lock_waiters
from tests.helpers.runs import people, wait_for
from tests.helpers.shared_sandbox import sandbox_since_start, since_now  # noqa: F401 (the `sandbox` here)

TRIALS = soak_trials()
MOMENT_S = 2.0  # the promise: nothing leaves later than this after the commit
HOLD_S = 4.0  # how long the slow writer keeps its number uncommitted


def sent_after(box: Sandbox, committed: dict[str, float]) -> list[str]:
    """The requests (number, seconds after its commit) that left more than `MOMENT_S`
    after their number's addition committed."""
    late = []
    for record in box.records():
        phone = record["body"].get("to_phone")
        if phone in committed and record["t"] > committed[phone] + MOMENT_S:
            late.append(f"{phone} {record['t'] - committed[phone]:.1f} s after")
    return late


def arrival(box: Sandbox, phone: str) -> float:
    """When the sandbox took the request to `phone` (it must have one)."""
    times = [r["t"] for r in box.records() if r["body"].get("to_phone") == phone]
    assert times, f"no request to {phone}: the run did not get that far"
    return times[0]


# --- PostgreSQL: a writer that holds its commit while another commits after it -------------

HELD_RATE = 20
HELD_ROWS, HELD_AT, QUICK_AT = 165, 150, 100  # X at 7.5 s of sending, Y at 5 s


@pytest.mark.soak
def test_a_number_whose_commit_was_held_is_respected_within_2_s(
    tmp_path: Path, pg_url: str, sandbox: Sandbox
) -> None:
    for trial in range(TRIALS):
        _held_commit_trial(tmp_path / f"trial-{trial}", sandbox, pg_url, trial)


def _held_commit_trial(directory: Path, box: Sandbox, pg_url: str, trial: int) -> None:
    """X is inserted first and committed HOLD_S later; Y is added and committed meanwhile.
    On PostgreSQL X's id is below Y's although Y commits first."""
    directory.mkdir()
    numbers = phones(HELD_ROWS, start=trial * 1000)
    held, quick = e164(numbers[HELD_AT]), e164(numbers[QUICK_AT])
    campaign = f"held-{trial}"
    job = write_job(
        directory,
        box.url,
        input=people(directory / "in.csv", numbers),
        campaign=campaign,
        limits={"rate_per_second": HELD_RATE, "concurrency": 2},
        ledger=pg_url,
    )
    before = len(box.records())
    run = spawn_cli("run", str(job), "--no-progress")
    try:
        wait_for(lambda: len(box.records()) > before, what="the run to start sending")
        committed: dict[str, float] = {}
        with psycopg.connect(pg_url) as slow:  # not autocommit: the insert waits for commit
            slow.execute(
                f"INSERT INTO {SHARED_SCHEMA}.numbers (phone, reason, source, added_at) "
                "VALUES (%s, 'STOP', 'manual', extract(epoch FROM now()))",
                (held,),
            )
            holding_since = time.time()
            with SuppressionList(directory / "runs", pg_url) as listing:
                listing.add([quick], "STOP", "manual")
            committed[quick] = time.time()
            # The run reads the list again (once a second) after Y's commit, before X's.
            sent = len(box.records())
            wait_for(
                lambda: len(box.records()) >= sent + 2 * HELD_RATE,
                what="the run to send on after the quick commit",
            )
            time.sleep(max(0.0, holding_since + HOLD_S - time.time()))
            assert len(box.records()) - before < HELD_AT, "the run reached X before its commit"
            slow.commit()
            committed[held] = time.time()
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    finally:
        kill_left(run)
    assert sent_after(box, committed) == []
    # The schedule was the one meant: the run reached X's row later than X's moment.
    assert arrival(box, e164(numbers[HELD_AT + 1])) > committed[held] + MOMENT_S
    rows = read_results(directory / "runs" / campaign / "results.csv")
    assert rows[HELD_AT]["_status"] == rows[QUICK_AT]["_status"] == "suppressed"


# --- both stores: numbers added while a run loads and checks its input ---------------------

LOAD_ROWS = 30_000
LOAD_RATE = 40
POOL = range(120, 200)  # added one by one while the run loads: reached 3 to 5 s in
BY_HAND = 210  # added with `campaign suppress add` the moment the run logs `input mapped`
ADD_EVERY_S = 0.1


@pytest.mark.soak
def test_numbers_added_while_a_run_loads_its_input_are_respected_within_2_s(
    tmp_path: Path, store: str | None, module_sandbox: Sandbox
) -> None:
    for trial in range(TRIALS):
        _load_trial(tmp_path / f"trial-{trial}", module_sandbox, store, trial)


def _load_trial(directory: Path, shared: Sandbox, store: str | None, trial: int) -> None:
    """Numbers near the start of a big input are added while the run loads it, checks it
    against the list, and starts sending; each is reached seconds after its commit."""
    directory.mkdir()
    numbers = phones(LOAD_ROWS, start=trial * LOAD_ROWS)
    campaign = f"load-{trial}"
    box = since_now(shared)
    job = write_job(
        directory,
        box.url,
        name=campaign,  # a trial stopped midway leaves its job unfinished, not the next's
        input=people(directory / "in.csv", numbers),
        campaign=campaign,
        limits={"rate_per_second": LOAD_RATE, "concurrency": 2},
        ledger=store,
    )
    log_file = directory / "runs" / campaign / "log.jsonl"
    committed: dict[str, float] = {}
    run = spawn_cli("run", str(job), "--no-progress")
    try:
        writer = _Writer(directory / "runs", store, [numbers[i] for i in POOL], log_file)
        writer.start()
        wait_for(
            lambda: "input mapped" in logged_events(log_file) or run.poll() is not None,
            what="`input mapped`",
        )
        assert run.poll() is None, run.communicate()[1]
        added = cli("suppress", "add", str(job), numbers[BY_HAND], "--reason", "STOP")
        assert added.returncode == 0, added.stderr
        committed[e164(numbers[BY_HAND])] = time.time()
        writer.join(60)
        assert writer.error is None, writer.error
        committed.update(writer.committed)
        wait_for(lambda: len(box.records()) > BY_HAND + 5, what="the run to pass the numbers")
        run.terminate()
        run.communicate(timeout=60)
    finally:
        kill_left(run)
    assert sent_after(box, committed) == []
    # The additions spanned the load and its check, and each came well before its row.
    assert writer.before_mapped >= 5 and writer.after_mapped >= 1
    assert arrival(box, e164(numbers[POOL[0] - 1])) > max(committed.values()) + MOMENT_S
    rows = read_results(directory / "runs" / campaign / "results.csv")
    reached = [rows[i] for i in (*POOL, BY_HAND) if e164(numbers[i]) in committed]
    assert {r["_status"] for r in reached} == {"suppressed"}


class _Writer(threading.Thread):
    """Another process's writer, as fast as one can be: adds the next number of `pool`
    every ADD_EVERY_S from the run's start, one the instant the run logs `input mapped`,
    and stops once it logs `sending`; notes when each addition committed."""

    def __init__(self, output_dir: Path, store: str | None, pool: list[str], log: Path):
        super().__init__(daemon=True)
        self.output_dir, self.store, self.pool, self.log = output_dir, store, pool, log
        self.committed: dict[str, float] = {}
        self.before_mapped = self.after_mapped = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._add_until_sending()
        except BaseException as exc:  # seen by the test, not lost in a thread
            self.error = exc

    def _add_until_sending(self) -> None:
        with SuppressionList(self.output_dir, self.store) as listed:
            events: list[str] = []
            for phone in self.pool:
                events = logged_events(self.log)
                if self.before_mapped >= len(self.pool) // 2 and "input mapped" not in events:
                    # A slow load (a busy machine): keep half the pool for its check and start.
                    wait_for(lambda: "input mapped" in logged_events(self.log), 120, "mapping")
                    events = logged_events(self.log)
                listed.add([e164(phone)], "STOP", "manual")
                self.committed[e164(phone)] = time.time()
                if "sending" in events:
                    return
                mapped = "input mapped" in events
                if mapped:
                    self.after_mapped += 1
                else:
                    self.before_mapped += 1
                deadline = time.monotonic() + ADD_EVERY_S
                while time.monotonic() < deadline:
                    if not mapped and "input mapped" in logged_events(self.log):
                        break  # the next one the instant the run logged it
                    time.sleep(0.005)
        raise AssertionError(
            f"the pool ran out before the run started sending: {self.before_mapped} added "
            f"before `input mapped`, {self.after_mapped} after; the run logged {events}"
        )


# --- the list's feed itself ----------------------------------------------------------------


def test_the_feed_returns_each_entry_once_in_commit_order_not_id_order(
    tmp_path: Path, pg_url: str
) -> None:
    slow_number, quick_number = "+14152000001", "+14152000002"
    with SuppressionList(tmp_path, pg_url) as listed:
        mark = listed.mark()
        with psycopg.connect(pg_url) as slow:
            slow.execute(
                f"INSERT INTO {SHARED_SCHEMA}.numbers (phone, reason, source, added_at) "
                "VALUES (%s, 'STOP', 'manual', 0) RETURNING id",
                (slow_number,),
            )
            listed.add([quick_number], "STOP", "manual")  # a later id, committed first
            mark, found = listed.added_since(mark)
            assert list(found) == [quick_number]
            slow.commit()
        mark, found = listed.added_since(mark)
        assert list(found) == [slow_number]
        assert listed.added_since(mark)[1] == {}


def test_a_list_of_the_first_schema_is_migrated_and_watched_in_commit_order(
    tmp_path: Path, pg_url: str
) -> None:
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {SHARED_SCHEMA}")
        admin.execute(
            f"CREATE TABLE {SHARED_SCHEMA}.numbers (id BIGINT GENERATED BY DEFAULT AS "
            "IDENTITY PRIMARY KEY, phone TEXT NOT NULL UNIQUE, reason TEXT NOT NULL, "
            "source TEXT NOT NULL, added_at DOUBLE PRECISION NOT NULL)"
        )
        admin.execute(f"CREATE TABLE {SHARED_SCHEMA}.schema_version (version INTEGER NOT NULL)")
        admin.execute(f"INSERT INTO {SHARED_SCHEMA}.schema_version VALUES (1)")
        admin.execute(
            f"INSERT INTO {SHARED_SCHEMA}.numbers (phone, reason, source, added_at) "
            "VALUES ('+14152000001', 'old', 'manual', 1)"
        )
    with SuppressionList(tmp_path, pg_url) as listed:
        assert listed.db.version() == SCHEMA_VERSION
        assert [e.phone for e in listed.entries()] == ["+14152000001"]
        mark = listed.mark()
        assert listed.added_since(mark)[1] == {}
        listed.add(["+14152000002"], "new", "manual")
        assert list(listed.added_since(mark)[1]) == ["+14152000002"]


# --- a person waiting to be retried ---------------------------------------------------------

RETRY_AFTER_S = 4


def test_a_number_added_while_its_person_waits_for_a_retry_gets_no_retry(
    tmp_path: Path, store: str | None
) -> None:
    numbers = phones(3)
    target = e164(numbers[1])

    tries: list[int] = []

    def reply(n: int, body: dict[str, object]) -> object:
        if body.get("to_phone") != target:
            return 200
        tries.append(n)
        return (503, {"Retry-After": str(RETRY_AFTER_S)}) if len(tries) == 1 else 200

    with FaultServer(reply) as server:
        job = write_job(
            tmp_path, server.url, input=people(tmp_path / "in.csv", numbers), ledger=store
        )
        run = spawn_cli("run", str(job), "--no-progress")
        try:
            wait_for(lambda: target in to_phones(server), what="the first attempt")
            with SuppressionList(tmp_path / "runs", store) as listing:
                listing.add([target], "STOP", "manual")
            committed = time.monotonic()
            _, err = run.communicate(timeout=60)
            assert run.returncode == 0, err
        finally:
            kill_left(run)
        retried = [a.at - committed for a in server.arrivals if a.body.get("to_phone") == target]
        assert [at for at in retried if at > MOMENT_S] == []
        assert len(retried) == 1  # its retry was due RETRY_AFTER_S after the first
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    assert [r["_status"] for r in rows] == ["sent", "suppressed", "sent"]


def to_phones(server: FaultServer) -> list[object]:
    return [body.get("to_phone") for body in server.bodies()]


# --- the feed under many writers -----------------------------------------------------------

WRITERS, WRITES = 6, 15


def test_the_feed_returns_every_committed_number_once_under_many_slow_writers(
    tmp_path: Path, store: str | None
) -> None:
    """Writers insert numbers and hold their commit for a random while (some roll back)
    as a watcher reads the feed over and over: every committed number is read exactly
    once, none that was rolled back is."""
    committed: set[str] = set()
    lock = threading.Lock()
    done = threading.Event()

    def write(writer: int) -> None:
        rng = random.Random(writer)
        with SuppressionList(tmp_path, store) as listed:
            for i in range(WRITES):
                phone = f"+1415300{writer:02d}{i:02d}"
                keep = rng.random() > 0.2
                with contextlib.suppress(_RolledBack), Transaction(listed.db):
                    listed.db.execute(
                        "INSERT INTO numbers (phone, reason, source, added_at) "
                        "VALUES (?, 'STOP', 'manual', 0)",
                        (phone,),
                    )
                    time.sleep(rng.uniform(0, 0.03 if store else 0.005))
                    if not keep:
                        raise _RolledBack
                if keep:
                    with lock:
                        committed.add(phone)

    seen: list[str] = []
    with SuppressionList(tmp_path, store) as watcher:
        mark = watcher.mark()
        writers = [threading.Thread(target=write, args=(w,)) for w in range(WRITERS)]
        for thread in writers:
            thread.start()

        def all_written() -> None:
            for thread in writers:
                thread.join()
            done.set()

        threading.Thread(target=all_written).start()
        while not done.is_set():
            mark, found = watcher.added_since(mark)
            seen.extend(found)
        seen.extend(watcher.added_since(mark)[1])
    assert len(seen) == len(set(seen))
    assert set(seen) == committed
    assert len(committed) > WRITERS * WRITES // 2


class _RolledBack(Exception):
    pass


# --- a request held up after its check: the in-flight commit waits on a lock ---------------

STALL_S = 3.0  # the in-flight commit is held this long: past the moment, not only past LATE_S


def test_a_request_held_up_after_its_check_looks_at_the_list_again(
    tmp_path: Path, pg_url: str, sandbox: Sandbox
) -> None:
    """The check before the in-flight record is the list's moment only while that record's
    commit is quick. Here the commit waits on a lock held by another session for 3 s, and
    every number of the campaign is added to the list meanwhile: the request that waited
    must not leave after its number's moment (it is recorded as not sent, `suppressed`)."""
    numbers = phones(40)
    box = sandbox
    job = write_job(
        tmp_path,
        box.url,
        input=people(tmp_path / "in.csv", numbers),
        limits={"rate_per_second": 10, "concurrency": 1},
        ledger=pg_url,
    )
    run = spawn_cli("run", str(job), "--no-progress")
    try:
        wait_for(lambda: len(box.records()) >= 3, what="the run to start sending")
        committed: dict[str, float] = {}
        with in_campaign(pg_url) as blocker:
            blocker.execute("BEGIN")
            blocker.execute("LOCK TABLE attempts IN EXCLUSIVE MODE")
            wait_for(lambda: bool(lock_waiters(pg_url, "%attempts%")), what="a blocked commit")
            with SuppressionList(tmp_path / "runs", pg_url) as listed:
                listed.add([e164(p) for p in numbers], "STOP", "manual")
            listed_at = time.time()
            committed.update(dict.fromkeys((e164(p) for p in numbers), listed_at))
            time.sleep(STALL_S)  # the length of the stall, not an ordering
            blocker.execute("COMMIT")
        _, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
    finally:
        kill_left(run)
    assert sent_after(box, committed) == []
    rows = read_results(tmp_path / "runs" / "test" / "results.csv")
    late = [r for r in rows if r["_status"] == "suppressed" and "not sent" in r["_error"]]
    assert len(late) == 1, [r["_error"] for r in rows if r["_status"] == "suppressed"][:3]
    assert len(box.records()) + sum(r["_status"] == "suppressed" for r in rows) == len(numbers)
