"""Real parts for tests: the sandbox and scriptable fault servers on 127.0.0.1, the CLI in a
subprocess, job files and results CSVs in tmp dirs."""

from __future__ import annotations

import asyncio
import collections
import csv
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web as aioweb  # not `web`: importing tests.helpers.web rebinds it here

from campaign.errors import InputError
from campaign.load import Row, open_sheet
from campaign.sandbox import spawn
from campaign.store.ledger import LEDGER_FILE, Ledger

ROOT = Path(__file__).resolve().parent.parent.parent
CHANNEL = "11111111-2222-4333-8444-555555555555"


def soak_trials(default: int = 1) -> int:
    """How many times a hostile schedule runs: `default` under `make test`; under
    `make soak`, the CAMPAIGN_SOAK_TRIALS it sets (20), never fewer than `default`."""
    value = os.environ.get("CAMPAIGN_SOAK_TRIALS")
    return max(default, int(value)) if value else default


def _command(args: Iterable[str]) -> list[str]:
    return [sys.executable, "-m", "campaign", *args]


def _environment(env: dict[str, str] | None) -> dict[str, str]:
    """This process's environment, with this checkout importable and `env` on top."""
    while True:
        try:
            current = dict(os.environ)
            break
        except (KeyError, RuntimeError):  # pytest set PYTEST_CURRENT_TEST in another thread
            continue
    return {**current, "PYTHONPATH": str(ROOT), **(env or {})}


def _popen(
    args: Iterable[str], cwd: Path | None, env: dict[str, str] | None, **streams: Any
) -> subprocess.Popen[str]:
    return subprocess.Popen(_command(args), cwd=cwd, env=_environment(env), text=True, **streams)


def cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    input: str | None = None,
    fresh: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run the command line, `python -m campaign ARGS`, in a process of its own, and wait
    for it. The process is forked from one that has imported the package already
    (tests/helpers/forked.py): the same code from `campaign/__main__.py` on, without the
    half second of imports. `fresh`: a new interpreter, start-up included. Tests of the
    process itself (signals, kill -9, memory) use `spawn_cli`/`cli_peak_memory`."""
    if not fresh:
        from tests.helpers.forked import run_forked

        return run_forked(args, cwd, _environment(env), timeout, input)
    return subprocess.run(
        _command(args),
        cwd=cwd,
        env=_environment(env),
        text=True,
        capture_output=True,
        timeout=timeout,
        input=input,
    )


def cli_peak_memory(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the real command line like `cli`; also its peak resident memory in bytes: the
    high-water mark of its own memory since it started (`VmHWM`, read while it runs). Not
    ru_maxrss: a process forked from a big test worker starts with that worker's maximum
    (Linux keeps it across exec), so every child of a worker that once held 350 MB would
    seem to have used 350 MB."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = _popen(args, cwd, env, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        peak = 0
        while True:
            peak = max(peak, _high_water(process.pid))
            pid, status, _ = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"campaign {' '.join(args)} ran over {timeout} s")
            time.sleep(0.01)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        done = subprocess.CompletedProcess(process.args, process.returncode, out.read(), err.read())
    assert peak > 0, "the command's memory could not be read"
    return done, peak


def _high_water(pid: int) -> int:
    """The peak resident memory of a running process, in bytes (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def spawn_cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return _popen(args, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def write_job(
    directory: Path,
    base_url: str,
    *,
    name: str = "job",
    input: str | Path | None = None,
    **sections: Any,
) -> Path:
    """A job file for `base_url`; `sections` update the defaults (api, mapping, limits, ...)."""
    job: dict[str, Any] = {
        "campaign": "test",
        "output_dir": str(directory / "runs"),
        "api": {"base_url": base_url, "channel_uuid": CHANNEL, "timeout_s": 2},
        "mapping": {
            "to_phone": "Phone",
            "default_region": "US",
            "params": {"first_name": "First Name"},
        },
        "limits": {"rate_per_second": 1000, "concurrency": 4, "max_attempts": 3},
    }
    if input is not None:
        job["input"] = str(input)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job, allow_unicode=True), encoding="utf-8")
    return path


def by_employee_id(params: dict[str, str]) -> dict[str, Any]:
    """A mapping with no phone column: people are told apart by their employee id."""
    return {"to_phone": None, "require_phone": False, "params": params, "recipient_key": ["emp_id"]}


def loaded_or_refused(path: Path) -> list[Row]:
    """Every row the loader gives for `path`, each as wide as the header; none when it
    refuses the file, with one line that names it."""
    try:
        sheet = open_sheet(path)
        rows = [row for chunk in sheet.chunks for row in chunk]
    except InputError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)
        return []
    assert rows and all(len(row.cells) == len(sheet.columns) for row in rows)
    return rows


def open_ledger(
    output_dir: Path, store: str | None, campaign: str = "test", *, readonly: bool = True
) -> Ledger:
    """A campaign's ledger on a test's store (`store`: the job's `ledger:`, None for the
    SQLite file under output_dir), read through the class the tool uses."""
    if store is None:
        if not readonly:
            (output_dir / campaign).mkdir(parents=True, exist_ok=True)
        return Ledger(output_dir / campaign / LEDGER_FILE, readonly=readonly)
    return Ledger.on_postgres(store, campaign, readonly=readonly)


def write_csv(path: Path, header: list[str], rows: list[list[str]], **kwargs: Any) -> Path:
    with path.open("w", encoding=kwargs.pop("encoding", "utf-8"), newline="") as out:
        writer = csv.writer(out, **kwargs)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def phones(n: int, start: int = 0) -> list[str]:
    """n distinct valid US numbers (area code 415, the 555-01xx style extended)."""
    return [f"+1 415 2{(start + i) // 10000 % 100:02d} {(start + i) % 10000:04d}" for i in range(n)]


def read_results(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def statuses(rows: list[dict[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["_status"]] = counts.get(row["_status"], 0) + 1
    return counts


# --- the sandbox, as the real CLI in a subprocess --------------------------------------------


@dataclass
class Sandbox:
    process: subprocess.Popen[str]
    url: str
    record: Path

    def records(self) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        # Read once, then split: a line still being written ends the text without its
        # newline. (Iterating the file instead read on past such a line, after the sandbox
        # had written the rest of it, and took that rest for a line of its own.)
        *complete, _being_written = self.record.read_bytes().split(b"\n")
        return [json.loads(line) for line in complete if line.strip()]

    def phones(self) -> list[str]:
        return [r["body"].get("to_phone") for r in self.records()]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def assert_no_duplicates(sandbox: Sandbox) -> list[str]:
    """Every number the sandbox accepted, each once; a failure names those sent twice."""
    phones = sandbox.phones()
    twice = sorted(p for p, n in collections.Counter(phones).items() if n > 1)
    assert twice == [], f"a recipient was sent twice: {twice}"
    return phones


def start_sandbox(directory: Path, *options: str) -> Sandbox:
    record = directory / f"record-{time.monotonic_ns()}.jsonl"
    process, url = spawn(
        [sys.executable, "-m", "campaign"],
        "--record",
        str(record),
        *options,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return Sandbox(process, url, record)


# --- scriptable fault servers, in a thread of their own ---------------------------------------

Reply = Callable[[int, dict[str, Any]], Any]


@asynccontextmanager
async def on_loopback(app: aioweb.Application) -> AsyncIterator[str]:
    """`app` served on 127.0.0.1 at a free port, for the block: its URL."""
    runner = aioweb.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    await aioweb.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@dataclass
class Arrival:
    n: int  # 0-based, in arrival order
    at: float  # time.monotonic()
    body: dict[str, Any]


@dataclass
class FaultServer:
    """An aiohttp app whose answer to the n-th request is `reply(n, body)` (for the
    Reporting API's GET, `body` is the query):
    an int status, a (status, headers) or (status, headers, json) tuple, an aiohttp Response,
    "reset" (close the connection without an answer), or "hang" (never answer)."""

    reply: Reply
    arrivals: list[Arrival] = field(default_factory=list)
    url: str = ""
    # reply names -> handlers for answers that need a stream (e.g. a trickle)
    streams: dict[str, Callable[[aioweb.Request], Any]] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _release: asyncio.Event | None = None
    _released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> FaultServer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self.release()
        assert self._thread is not None
        self._thread.join(10)

    def release(self) -> None:
        """Stop the server; requests that "hang" are answered 503 (or cut) as it goes."""
        assert self._loop is not None and self._release is not None
        if not self._released:
            self._released = True
            self._loop.call_soon_threadsafe(self._release.set)

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [a.body for a in self.arrivals]

    def _serve(self, ready: threading.Event) -> None:
        asyncio.run(self._main(ready))

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._release = asyncio.Event()
        app = aioweb.Application()
        app.router.add_post("/sms/{channel}/send.json", self._handle)
        app.router.add_get("/api/v1/agents/{agent}/sms/report.json", self._handle)
        app.router.add_get("/api/v2/sms/opt-status.json", self._handle)
        async with on_loopback(app) as self.url:
            ready.set()
            await self._release.wait()

    async def _handle(self, request: aioweb.Request) -> aioweb.StreamResponse:
        body = dict(request.query) if request.method == "GET" else await request.json()
        with self._lock:
            n = len(self.arrivals)
            self.arrivals.append(Arrival(n, time.monotonic(), body))
        answer = self.reply(n, body)
        if answer == "hang":
            assert self._release is not None
            await self._release.wait()
            return aioweb.Response(status=503)
        if answer == "reset":
            assert request.transport is not None
            request.transport.abort()
            return aioweb.Response(status=500)
        if isinstance(answer, aioweb.StreamResponse):
            return answer
        if isinstance(answer, str) and answer in self.streams:
            result: aioweb.StreamResponse = await self.streams[answer](request)
            return result
        if isinstance(answer, int):
            answer = (answer,)
        status, headers, payload = (*answer, None, None)[:3]
        if payload is None:
            payload = {"success": 200 <= status < 300}
        return aioweb.json_response(payload, status=status, headers=headers)


# --- waiting on conditions, and a run's own log ----------------------------------------------


def logged_events(log_file: Path) -> list[str]:
    """The events a run has written to its campaign's `log.jsonl` so far (a line still
    being written is left out)."""
    if not log_file.exists():
        return []
    *complete, _being_written = log_file.read_bytes().split(b"\n")
    return [json.loads(line)["event"] for line in complete if line.strip()]


def e164(text: str) -> str:
    """A number as the sandbox records it (`+1 415 200 0001` -> `+14152000001`)."""
    return "+" + "".join(ch for ch in text if ch.isdigit())


# --- a gateway in front of the sandbox: requests that never arrive, answers that are lost ---

BLOCK, LOSE, PASS = "block", "lose", "pass"
Route = Callable[[dict[str, Any]], str]


@dataclass
class Gateway:
    """An aiohttp proxy on 127.0.0.1 in front of `upstream` (the sandbox) for the Send API:
    `route(body)` says per request BLOCK (answer 504, forward nothing: it never arrived),
    LOSE (forward, then answer 504 whatever came back: it arrived, its answer was lost) or
    PASS (forward, answer what came back)."""

    upstream: str
    route: Route
    url: str = ""
    routed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    def __enter__(self) -> Gateway:
        ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(ready),), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("gateway did not start")
        return self

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _main(self, ready: threading.Event) -> None:
        import aiohttp

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            app = aioweb.Application()

            async def handle(request: aioweb.Request) -> aioweb.Response:
                return await self._handle(request, session)

            app.router.add_post("/sms/{channel}/send.json", handle)
            async with on_loopback(app) as self.url:
                ready.set()
                await self._stop.wait()

    async def _handle(self, request: aioweb.Request, session: Any) -> aioweb.Response:
        raw = await request.read()
        body = json.loads(raw)
        how = self.route(body)
        self.routed.append((how, body))
        if how == BLOCK:
            return aioweb.json_response({"success": False, "error": "gateway timeout"}, status=504)
        async with session.post(
            self.upstream + request.path,
            data=raw,
            headers={"Content-Type": "application/json"},
        ) as answer:
            status, text = answer.status, await answer.text()
        if how == LOSE:
            return aioweb.json_response({"success": False, "error": "gateway timeout"}, status=504)
        return aioweb.Response(status=status, text=text, content_type="application/json")


def first_time(chosen: Callable[[dict[str, Any]], bool], how: str = BLOCK) -> Route:
    """A route: `how` for the first request of each chosen person (by their whole body),
    PASS for every other request."""
    seen: set[str] = set()

    def route(body: dict[str, Any]) -> str:
        key = json.dumps(body, sort_keys=True)
        if not chosen(body) or key in seen:
            return PASS
        seen.add(key)
        return how

    return route


def reached(sandbox: Sandbox, *keys: str) -> collections.Counter[tuple[Any, ...]]:
    """How many SMS the sandbox accepted per person (the body's `keys`)."""
    return collections.Counter(tuple(r["body"].get(k) for k in keys) for r in sandbox.records())


def reconcile_until(
    job: Path, campaign: str, done: Callable[[list[dict[str, str]]], bool], deadline_s: float = 60
) -> list[dict[str, str]]:
    """Reconcile `campaign` again until `done(rows)`: entries appear and settle on the
    sandbox's clock (a bounded wait on the condition, not a sleep)."""
    deadline = time.monotonic() + deadline_s
    while True:
        result = cli("reconcile", str(job), "--campaign", campaign)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        rows = read_results(job.parent / "runs" / campaign / "results.csv")
        if done(rows) or time.monotonic() > deadline:
            return rows


# --- the upload page's server, as the real CLI in a subprocess ---------------------------------


@dataclass
class Served:
    process: subprocess.Popen[str]
    url: str
    log: Path

    def stop(self, signum: int = signal.SIGINT) -> int:
        """Ctrl-C (or `signum`): the server drains, then exits; its exit code."""
        self.process.send_signal(signum)
        return self.process.wait(timeout=30)


def serve(directory: Path, job: Path, token: str, *options: str) -> Served:
    """`campaign serve JOB --port 0` with CAMPAIGN_TOKEN=token, once it says where it
    listens; its log (stderr) goes to a file of `directory`."""
    log = directory / f"serve-{time.monotonic_ns()}.log"
    with log.open("w") as err:
        process = subprocess.Popen(
            _command(["serve", str(job), "--port", "0", *options]),
            env=_environment({"CAMPAIGN_TOKEN": token}),
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on " not in line:
        process.kill()
        raise RuntimeError(f"serve did not start: {line}{log.read_text()}")
    return Served(process, line.split("listening on ")[1].strip().rstrip("/"), log)


def raw_http(url: str, head: bytes, body: bytes = b"") -> int:
    """Send one request written byte for byte (headers no client library would send) to
    the server at `url`; its answer's status."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port is not None
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as conn:
        conn.sendall(head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n")
        conn.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = b""
        while b"\r\n" not in answer and (chunk := conn.recv(4096)):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


# --- workbooks written part by part, for the loader's limits ------------------------------------

_XLSX_PARTS = {
    "[Content_Types].xml": (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" '
        'ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" ContentType="application/'
        'vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" ContentType="application/'
        'vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/></Types>'
    ),
    "_rels/.rels": (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        'relationships/officeDocument" Target="xl/workbook.xml"/></Relationships>'
    ),
    "xl/workbook.xml": (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<workbook xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main" '
        'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships">'
        '<sheets><sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>'
    ),
    "xl/_rels/workbook.xml.rels": (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
        'relationships/worksheet" Target="worksheets/sheet1.xml"/></Relationships>'
    ),
}
SHEET_HEAD = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<worksheet xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main">'
)


def write_xlsx(path: Path, sheet_data: Iterable[bytes], *, head: bytes = SHEET_HEAD) -> Path:
    """A one-sheet .xlsx whose sheet XML is `head`, then `<sheetData>` + the pieces of
    `sheet_data` + `</sheetData></worksheet>`, deflated as it is written (so a huge sheet
    never sits in the test's memory)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as book:
        for name, text in _XLSX_PARTS.items():
            book.writestr(name, text)
        with book.open("xl/worksheets/sheet1.xml", "w", force_zip64=True) as sheet:
            sheet.write(head + b"<sheetData>")
            for piece in sheet_data:
                sheet.write(piece)
            sheet.write(b"</sheetData></worksheet>")
    return path


def xlsx_cell(ref: str, text: str) -> bytes:
    return f'<c r="{ref}" t="inlineStr"><is><t>{text}</t></is></c>'.encode()


def sparse_xlsx(path: Path) -> Path:
    """Two people in A1:A3 and one more cell at XFD1048576, Excel's last: 1.5 KB that asks
    a reader building the grid for 17 billion cells."""
    rows = [
        b'<row r="1">' + xlsx_cell("A1", "Phone") + b"</row>",
        b'<row r="2">' + xlsx_cell("A2", "+14155550101") + b"</row>",
        b'<row r="3">' + xlsx_cell("A3", "+14155550102") + b"</row>",
        b'<row r="1048576">' + xlsx_cell("XFD1048576", "x") + b"</row>",
    ]
    return write_xlsx(path, rows)


def zip_bomb_xlsx(path: Path, size: int = 1_500_000_000) -> Path:
    """A header, then one cell of `size` times "A": about 1.5 MB on disk for 1.5 GB."""

    def pieces() -> Iterator[bytes]:
        yield b'<row r="1">' + xlsx_cell("A1", "Phone") + b"</row>"
        yield b'<row r="2"><c r="A2" t="inlineStr"><is><t>'
        block = b"A" * (1 << 20)
        for _ in range(size // len(block)):
            yield block
        yield b"</t></is></c></row>"

    return write_xlsx(path, pieces())


def xls_with_cell_at(path: Path, row: int, column: int) -> Path:
    """tests/data/legacy.xls with its last text cell moved to (row, column), 0-based: the
    old format's cell records may name any of 65,536 rows and 65,536 columns."""
    data = bytearray((ROOT / "tests" / "data" / "legacy.xls").read_bytes())
    at = data.rfind(b"\xfd\x00\x0a\x00")  # a LABELSST record: row, column, style, string
    assert at > 0, "legacy.xls has no text cell record"
    data[at + 4 : at + 8] = row.to_bytes(2, "little") + column.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path


def kill_left(*processes: subprocess.Popen[str] | None) -> None:
    """Kill the commands a test left running (a stopped one is continued first)."""
    for process in processes:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()
