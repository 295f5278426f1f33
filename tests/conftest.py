from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import Sandbox, sparse_xlsx, start_sandbox, write_job, zip_bomb_xlsx
from tests.helpers.pg_server import PgServer, Unavailable, remove_server, start_server
from tests.helpers.shared_sandbox import ChannelView, module_sandboxes
from tests.helpers.web import Served, start_serve

# Why the PostgreSQL tests skipped this session, for the summary (empty: they did not).
_pg_skipped: list[str] = []


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    box = start_sandbox(tmp_path)
    yield box
    box.stop()


@pytest.fixture(scope="module")
def module_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """One sandbox for a module's tests (each sandbox is a subprocess). A test sees its own
    share through a channel of its own or the records since it began
    (tests/helpers/shared_sandbox.py)."""
    box = start_sandbox(tmp_path_factory.mktemp("sandbox"))
    yield box
    box.stop()


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[int], ChannelView]]:
    """A channel of one of the module's sandboxes for each test (one sandbox per latency)."""
    yield from module_sandboxes(tmp_path_factory)


@pytest.fixture(scope="session")
def sparse_workbook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.5 KB of .xlsx with a cell at XFD1048576: a grid of 17 billion cells to a reader."""
    return sparse_xlsx(tmp_path_factory.mktemp("hostile") / "sparse.xlsx")


@pytest.fixture(scope="session")
def bomb_workbook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1.5 MB of .xlsx holding one 1.5 GB cell (made once a session: it takes seconds)."""
    return zip_bomb_xlsx(tmp_path_factory.mktemp("hostile") / "bomb.xlsx")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session (tests/helpers/pg_server.py); skips without one."""
    try:
        server = start_server()
    except Unavailable as error:
        _pg_skipped.append(str(error))
        pytest.skip(f"PostgreSQL tests skipped: {error}")
    try:
        yield server
    finally:
        remove_server(server)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database for this test, owned by the superuser `campaign`: its URL."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    yield pg_server.url(name)
    if not pg_server.running:  # a test that stopped the server and failed before starting it
        pg_server.start()
    with psycopg.connect(pg_server.url(), autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"], ids=["on-sqlite", "on-postgresql"])
def store(request: pytest.FixtureRequest) -> str | None:
    """The store a test runs on: the job's `ledger:` value (None: SQLite files under
    output_dir; a fresh PostgreSQL database's URL). The PostgreSQL case skips, saying why,
    when this machine has no PostgreSQL."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("pg_url")
    return url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long tests first: started last, one of them would keep a process busy after
    the others are done (the order is the same in every process of pytest-xdist)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _pg_skipped:
        terminalreporter.write_line(f"PostgreSQL tests skipped: {_pg_skipped[0]}")


@pytest.fixture
def reports_sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """A sandbox whose delivery reports settle within a fifth of a second."""
    box = start_sandbox(tmp_path, "--delivery-delay-s", "0.2")
    yield box
    box.stop()


@pytest.fixture
def reports_server(tmp_path: Path, reports_sandbox: Sandbox) -> Iterator[Served]:
    """`campaign serve` for a job whose delivery reports are read (the test sends)."""
    job = write_job(
        tmp_path,
        reports_sandbox.url,
        mapping={"params": {"first_name": "First Name", "emp_id": "Employee ID"}},
        reporting={"agent_id": "1", "access_token": "sandbox-token"},
    )
    server = start_serve(tmp_path, job)
    yield server
    server.stop()
