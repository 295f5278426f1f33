"""One sandbox for a module's tests instead of one each (a sandbox is a subprocess), each
test seeing its own share of the record: the requests sent to a channel of its own
(`ChannelView`: a worker a failed test left running cannot count in the next test), or,
for tests that send on the job's usual channel, those recorded since the test began
(`since_now`: tests in one process run one after another and wait for their runs)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.helpers import Sandbox, start_sandbox


class ChannelView(Sandbox):
    """The requests `channel` received at a sandbox others share; stopping it is the
    module's business. The record is read on from where the last look ended: a record
    that thousands of other requests fill is not parsed again at every poll."""

    def __init__(self, shared: Sandbox, channel: str) -> None:
        super().__init__(shared.process, shared.url, shared.record)
        self.channel = channel
        self._offset = shared.record.stat().st_size if shared.record.exists() else 0
        self._mine: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            if self.record.exists():
                with self.record.open("rb") as handle:
                    handle.seek(self._offset)
                    data = handle.read()
                # Only whole lines: one still being written is read next time.
                complete = data[: data.rfind(b"\n") + 1]
                self._offset += len(complete)
                for line in complete.split(b"\n"):
                    if line.strip():
                        found = json.loads(line)
                        if found.get("channel") == self.channel:
                            self._mine.append(found)
            return list(self._mine)

    def api(self, **more: Any) -> dict[str, Any]:
        """A job's `api` section sending to this view's channel (`more` on top)."""
        return {"channel_uuid": self.channel, **more}

    def stop(self) -> None:
        pass


def channel_of(box: Sandbox) -> ChannelView:
    """`box` seen through a fresh channel; a job sends to it with `api=view.api()`."""
    return ChannelView(box, str(uuid.uuid4()))


class SandboxSince(Sandbox):
    """`Sandbox` whose records begin at the `start`-th line of the shared record."""

    def __init__(self, shared: Sandbox, start: int) -> None:
        super().__init__(shared.process, shared.url, shared.record)
        self.start = start

    def records(self) -> list[dict[str, Any]]:
        return super().records()[self.start :]

    def stop(self) -> None:
        raise AssertionError("a shared sandbox is stopped by its module's fixture")


def since_now(box: Sandbox) -> SandboxSince:
    """A view of `box` that holds only what is recorded from now on."""
    return SandboxSince(box, len(box.records()))


@pytest.fixture(name="sandbox")
def sandbox_since_start(module_sandbox: Sandbox) -> Sandbox:
    """For a module whose tests share its sandbox: the module's sandbox, showing only what
    the test sent (import it into the module)."""
    return since_now(module_sandbox)


def module_sandboxes(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[int], ChannelView]]:
    """For a module-scoped fixture: `sandboxes(latency_ms)` gives a fresh channel of the
    module's sandbox answering after `latency_ms` (started on first use, stopped with the
    module)."""
    directory = tmp_path_factory.mktemp("sandboxes")
    started: dict[int, Sandbox] = {}

    def at(latency_ms: int = 0) -> ChannelView:
        if latency_ms not in started:
            started[latency_ms] = start_sandbox(directory, "--latency-ms", str(latency_ms))
        return ChannelView(started[latency_ms], str(uuid.uuid4()))

    try:
        yield at
    finally:
        for box in started.values():
            box.stop()
