"""The real command line, run in a fresh process forked from one that has already imported
the package: `python -m campaign ARGS` without paying ~0.5 s of imports each time.

Each call is still its own process (own pid, cwd, environment, stdin, stdout, stderr, exit
code): a server started once imports `campaign` and its libraries, then forks a child per
call that runs `campaign/__main__.py` as `python -m campaign` would, including the exit
handlers Python runs at shutdown. For checks of what a command says and does; tests of the
process itself (peak memory, signals) start a new interpreter (`spawn_cli`,
`cli_peak_memory`, `cli(..., fresh=True)` in tests/helpers).
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from tests.helpers import ROOT

SERVER = Path(__file__).with_name("forked_server.py")
MOST = 8  # servers at once: one per concurrent caller, each runs one command at a time


class _Server:
    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [sys.executable, str(SERVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=ROOT,
            text=True,
        )

    def run(self, request: dict[str, Any]) -> int:
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(request) + "\n")
        stdin.flush()
        answer = stdout.readline()
        if not answer:
            raise RuntimeError(f"the CLI fork server exited ({self.process.wait()})")
        return int(json.loads(answer)["code"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_idle: queue.LifoQueue[_Server] = queue.LifoQueue()
_all: list[_Server] = []
_lock = threading.Lock()


def _take() -> _Server:
    try:
        return _idle.get_nowait()
    except queue.Empty:
        pass
    with _lock:
        if len(_all) < MOST:
            server = _Server()
            _all.append(server)
            return server
    return _idle.get()


@atexit.register
def _close_all() -> None:
    for server in _all:
        server.close()


def run_forked(
    args: Sequence[str], cwd: Path | None, env: dict[str, str], timeout: float, stdin: str | None
) -> subprocess.CompletedProcess[str]:
    """`subprocess.run([python, -m, campaign, *args], ...)` with the output captured as
    text: the command's exit code, stdout and stderr (`tests.helpers.cli`)."""
    with tempfile.TemporaryDirectory() as scratch:
        streams = {name: Path(scratch) / name for name in ("in", "out", "err")}
        streams["in"].write_text(stdin or "", encoding="utf-8")
        request = {
            "argv": list(args),
            "cwd": str(cwd) if cwd is not None else os.getcwd(),
            "env": env,
            "timeout": timeout,
            **{name: str(path) for name, path in streams.items()},
        }
        server = _take()
        try:
            code = server.run(request)
        finally:
            _idle.put(server)
        out, err = (_read(streams[name]) for name in ("out", "err"))
    command = [sys.executable, "-m", "campaign", *args]
    if code == -_SIGALRM:
        raise subprocess.TimeoutExpired(command, timeout, out, err)
    return subprocess.CompletedProcess(command, code, out, err)


_SIGALRM = 14


def _read(path: Path) -> str:
    handle: IO[str]
    with path.open(encoding="utf-8", newline=None) as handle:  # as `subprocess.run(text=True)`
        return handle.read()
