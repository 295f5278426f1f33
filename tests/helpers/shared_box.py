"""One sandbox for a module's tests instead of one each (a sandbox is a subprocess): each
test sees only the requests recorded since it began. Tests in one process run one after
another and wait for their runs to end, so nothing recorded later belongs to another."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.helpers import Sandbox


@dataclass
class SandboxSince(Sandbox):
    """`Sandbox` whose records begin at the `start`-th line of the shared record."""

    start: int = 0

    def records(self) -> list[dict[str, Any]]:
        return super().records()[self.start :]

    def stop(self) -> None:
        raise AssertionError("a shared sandbox is stopped by its module's fixture")


def since_now(box: Sandbox) -> SandboxSince:
    """A view of `box` that holds only what is recorded from now on."""
    return SandboxSince(box.process, box.url, box.record, len(box.records()))
