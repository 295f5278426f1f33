"""A real PostgreSQL server for the tests: one per session, in a temporary directory.

`initdb` and `pg_ctl` from the machine's Debian postgresql packages (the newest under
/usr/lib/postgresql/*/bin), run as the `postgres` user when the tests run as root (the
server refuses to run as root). It listens on 127.0.0.1 only, on a free port, with its
unix socket in the temporary directory, and keeps fsync on: surviving a crash
(`stop_immediate()`) is what the PostgreSQL store is for, so the tests must not cheat it.

Two login roles, both with passwords checked by scram-sha-256 over TCP:
- `campaign`, a superuser: every test database belongs to it;
- `campaign_ro`, which may connect but not create tables (nor schemas), so a test can
  check that the tool says so clearly.
The unix socket trusts whoever can reach it (only the owner of the temporary directory).

When PostgreSQL cannot be found or started, `start_server()` raises `Unavailable` with a
reason that the fixtures turn into a skip, and the session's summary repeats it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

SEARCH = "/usr/lib/postgresql"
SERVICE_USER = "postgres"
SUPERUSER = "campaign"
READ_ONLY = "campaign_ro"
START_TIMEOUT_S = 60
HINT = "make test installs it as root with apt-get"


class Unavailable(Exception):
    """No PostgreSQL for this session; the message says why."""


def find_bindir() -> Path | None:
    """The newest version's bin directory that has both initdb and pg_ctl."""

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name))

    found = [p for p in Path(SEARCH).glob("*/bin") if (p / "initdb").exists()]
    found = [p for p in found if (p / "pg_ctl").exists()]
    if found:
        return max(found, key=version)
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb and pg_ctl and Path(initdb).parent == Path(pg_ctl).parent:
        return Path(initdb).parent
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class PgServer:
    bindir: Path
    root: Path  # the temporary directory: data/, the socket, the log
    port: int
    passwords: dict[str, str]
    as_user: list[str] = field(default_factory=list)  # e.g. runuser -u postgres --
    running: bool = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def url(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        """postgresql://USER:PASSWORD@127.0.0.1:PORT/DBNAME (scram-sha-256 over TCP)."""
        password = quote(self.passwords[user], safe="")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """Start (again), returning once the server accepts connections (pg_ctl -w)."""
        done = self._pg_ctl("start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.log))
        if done.returncode != 0:
            raise Unavailable(f"pg_ctl start failed: {_last_lines(self.log, done)}")
        self.running = True

    def stop_immediate(self) -> None:
        """Stop at once, as a crash would: no checkpoint, clients cut (pg_ctl -m immediate).
        Committed data survives through the WAL; `start()` replays it."""
        self._stop("immediate")

    def stop(self) -> None:
        self._stop("fast")

    def _stop(self, mode: str) -> None:
        done = self._pg_ctl("stop", "-w", "-m", mode, "-t", str(START_TIMEOUT_S))
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop -m {mode} failed: {_last_lines(self.log, done)}")
        self.running = False

    def psql_admin(self, sql: str) -> None:
        """Run SQL as the superuser through the unix socket (no driver needed)."""
        done = self._run(
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.root),
            "-p",
            str(self.port),
            "-U",
            SUPERUSER,
            "-d",
            "postgres",
            "-c",
            sql,
        )
        if done.returncode != 0:
            raise Unavailable(f"psql failed: {done.stderr.strip()}")

    def _pg_ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args)

    def _run(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.as_user, *command],
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S + 10,
            cwd=self.root,
            check=False,
        )


def _last_lines(log: Path, done: subprocess.CompletedProcess[str]) -> str:
    text = done.stderr.strip() or done.stdout.strip()
    with contextlib.suppress(OSError):
        text += " | " + " / ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
    return text


def _service_user() -> list[str]:
    """The command prefix that runs the server's programs as a user who may run them."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        raise Unavailable("running as root and runuser is missing (needed to run as postgres)")
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise Unavailable(f"running as root and there is no `{SERVICE_USER}` user") from None
    return ["runuser", "-u", SERVICE_USER, "--"]


def start_server() -> PgServer:
    """initdb into a fresh temporary directory, configure, start; raises Unavailable."""
    bindir = find_bindir()
    if bindir is None:
        raise Unavailable(f"initdb not found ({HINT})")
    as_user = _service_user()
    root = Path(tempfile.mkdtemp(prefix="campaign-pg-"))
    try:
        return _initialise(bindir, root, as_user)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _initialise(bindir: Path, root: Path, as_user: list[str]) -> PgServer:
    if as_user:
        shutil.chown(root, user=SERVICE_USER, group=SERVICE_USER)
    passwords = {SUPERUSER: secrets.token_urlsafe(12), READ_ONLY: secrets.token_urlsafe(12)}
    server = PgServer(bindir, root, free_port(), passwords, as_user)
    pwfile = root / "pwfile"
    pwfile.write_text(passwords[SUPERUSER] + "\n")
    if as_user:
        shutil.chown(pwfile, user=SERVICE_USER, group=SERVICE_USER)
    done = server._run(
        str(bindir / "initdb"),
        "-D",
        str(server.data),
        "-U",
        SUPERUSER,
        f"--pwfile={pwfile}",
        "--auth-host=scram-sha-256",
        "--auth-local=trust",
        "--encoding=UTF8",
        "--locale=C",
    )
    pwfile.unlink()
    if done.returncode != 0:
        raise Unavailable(f"initdb failed: {done.stderr.strip()[-300:]}")
    settings = {
        "listen_addresses": "'127.0.0.1'",
        "port": str(server.port),
        "unix_socket_directories": f"'{root}'",
        "password_encryption": "'scram-sha-256'",
        "fsync": "on",
        "synchronous_commit": "on",
        "full_page_writes": "on",
        "max_connections": "200",
        "logging_collector": "off",
    }
    with (server.data / "postgresql.conf").open("a", encoding="utf-8") as conf:
        conf.write("\n# tests/helpers/pg_server.py\n")
        conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
    server.start()
    try:
        server.psql_admin(
            f"CREATE ROLE {READ_ONLY} LOGIN PASSWORD '{passwords[READ_ONLY]}' "
            "NOSUPERUSER NOCREATEDB NOCREATEROLE"
        )
    except BaseException:
        server.stop()
        raise
    return server


def remove_server(server: PgServer) -> None:
    with contextlib.suppress(Exception):
        if server.running:
            server.stop()
    shutil.rmtree(server.root, ignore_errors=True)
