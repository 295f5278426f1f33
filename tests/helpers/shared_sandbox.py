"""One sandbox per module and latency, each test on a channel of its own: a test's view of
the sandbox's record holds only the requests sent to its channel (a worker a failed test
left running cannot count in the next test)."""

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
