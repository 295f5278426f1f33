"""Reading a spreadsheet in a process of its own, so that no file can take the caller
down with it.

The checks in `campaign.load` keep every known hostile file away from the Excel reader,
but the reader is native code: an abort in it (an allocation it cannot make, or a bug
nobody has found yet) ends the process that called it, with every campaign it is
sending. So what must survive runs the reader in a child process with a memory cap
(RLIMIT_AS), a CPU cap (RLIMIT_CPU) and a wall-clock timeout; if the child dies, runs out
of memory or time, only that read fails, with one line for the operator. The page server
reads every upload so; the loader probes old .xls workbooks so (load.py says why).

Children come from a fork server started once with the loader imported, so a child
starts in milliseconds without being a fork of a threaded server.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import resource
import signal
from collections.abc import Callable
from typing import Any

from campaign.errors import InputError

_CONTEXT = multiprocessing.get_context("forkserver")
_PRELOAD = ["campaign.load"]
_CONTEXT.set_forkserver_preload(_PRELOAD)
_inside = False  # this process is such a child


def preload(module: str) -> None:
    """Import `module` in the fork server too (before its first child), so that
    children that run its functions do not import it each time."""
    _PRELOAD.append(module)
    _CONTEXT.set_forkserver_preload(_PRELOAD)


def inside_child() -> bool:
    """True in a child of `run_isolated`: already capped, and not allowed children."""
    return _inside


class Failed(Exception):
    """The child gave no answer (it died, or ran out of memory or time); `str()` is one
    line for the operator."""


class Refused(Exception):
    """The child's loader refused the file: `message` is its line, naming `path`."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def run_isolated(
    work: Callable[..., Any], args: tuple[Any, ...], *, memory_bytes: int, timeout_s: float
) -> Any:
    """`work(*args)` in a child process: its result; `Refused` when it raised an
    `InputError`; `Failed` when it died, ran out of memory or time, or raised anything
    else."""
    receive, send = _CONTEXT.Pipe(duplex=False)
    child = _CONTEXT.Process(
        target=_child, args=(send, work, args, memory_bytes, timeout_s), daemon=True
    )
    child.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise Failed(f"reading it took longer than {timeout_s:.0f} s")
        try:
            kind, *payload = receive.recv()
        except (EOFError, OSError):
            raise Failed(_death(child)) from None
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join(5)
    if kind == "ok":
        return payload[0]
    if kind == "input":
        raise Refused(payload[0], payload[1])
    if kind == "memory":
        raise Failed(f"reading it needs more than {memory_bytes // 2**20} MB of memory")
    raise Failed(f"it could not be read ({payload[0]})")


def _death(child: multiprocessing.process.BaseProcess) -> str:
    child.join(5)
    code = child.exitcode
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        if -code in (signal.SIGKILL, signal.SIGXCPU):
            return "reading it took more time or memory than an upload may take"
        return f"the spreadsheet reader stopped on it ({name}), as when it runs out of memory"
    return "the spreadsheet reader stopped on it"


def _child(
    send: multiprocessing.connection.Connection,
    work: Callable[..., Any],
    args: tuple[Any, ...],
    memory_bytes: int,
    timeout_s: float,
) -> None:
    global _inside
    _inside = True
    # A native abort prints its backtrace to stderr: the operator gets one line instead.
    quiet = os.open(os.devnull, os.O_WRONLY)
    os.dup2(quiet, 2)
    os.close(quiet)
    # The cap is on top of what the process already maps, so it measures the file's
    # cost, not the interpreter's.
    resource.setrlimit(resource.RLIMIT_AS, (_mapped() + memory_bytes,) * 2)
    cpu = int(timeout_s) + 5
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    try:
        answer: tuple[Any, ...] = ("ok", work(*args))
    except InputError as exc:
        answer = ("input", str(exc), exc.path)
    except MemoryError:
        answer = ("memory",)
    except Exception as exc:
        answer = ("crash", type(exc).__name__)
    send.send(answer)
    send.close()


def _mapped() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
