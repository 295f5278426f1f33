"""The server behind `tests.helpers.forked`: imports the package once, then per request
(one JSON line on stdin) forks a child that runs `python -m campaign ARGV` and answers
its exit code (one JSON line on stdout). Not a test module: started as a script."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import pkgutil
import runpy
import signal
import sys
import threading
import time
import traceback
from typing import Any

import campaign


def preload() -> None:
    """Import what commands import lazily, so each child starts with it in memory. Not the
    page (`campaign.web`, which `serve` alone imports; a test starts `serve` afresh): its
    import registers a module to preload in the capped reader's processes, which a
    command would then start differently than a fresh one does."""
    for found in pkgutil.walk_packages(campaign.__path__, "campaign."):
        if found.name != "campaign.__main__" and not found.name.startswith("campaign.web"):
            importlib.import_module(found.name)
    for name in ("psycopg", "rich.progress"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def exit_code(stop: SystemExit) -> int:
    """The exit status Python gives a `raise SystemExit(value)` at the top."""
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def child(request: dict[str, Any], channels: tuple[int, int]) -> None:
    for fd in channels:
        os.close(fd)
    signal.alarm(max(1, int(request["timeout"] + 0.999)))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()  # a fresh interpreter reads TZ at start; this one read the server's
    for fd, name, flags in ((0, "in", os.O_RDONLY), (1, "out", WRITE), (2, "err", WRITE)):
        opened = os.open(request[name], flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["-m", *request["argv"]]
    sys.path.insert(0, os.getcwd())  # as `python -m` puts it, before PYTHONPATH
    try:
        runpy.run_module("campaign", run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:
        code = exit_code(stop)
    except BaseException:
        traceback.print_exc()
        code = 1
    # What the interpreter does on its way out: wait for threads, then the exit handlers.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code & 0xFF)


def main() -> None:
    del sys.path[0]  # this script's folder: tests/helpers' modules are not the package's
    preload()
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    quiet = os.open(os.devnull, os.O_RDWR)
    os.dup2(quiet, 0)
    os.dup2(quiet, 1)
    os.close(quiet)
    channels = (requests.fileno(), answers.fileno())
    for line in requests:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            try:
                child(request, channels)
            finally:
                os._exit(70)  # a child never returns into this loop
        _, status = os.waitpid(pid, 0)
        answers.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
