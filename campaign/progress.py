"""What a run reports while it sends (live counts for the CLI's bar and the web page) and
how the sending ended. Kept apart from `dispatch` so that readers need not import aiohttp."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Progress:
    """Counts for this run, updated as answers arrive."""

    total: int
    done: int = 0
    requests: int = 0
    by_state: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    waiting: int = 0  # people held for their send window (this round)
    opens_at: float | None = None  # Unix time the first of their windows opens

    def wait(self, until: float | None) -> None:
        self.waiting += 1
        if until is not None and (self.opens_at is None or until < self.opens_at):
            self.opens_at = until

    @property
    def rate(self) -> float:
        """Requests per second since sending started."""
        return self.requests / max(time.monotonic() - self.started, 1e-6)

    def add(self, state: str) -> None:
        self.by_state[state] = self.by_state.get(state, 0) + 1
        self.done += 1


@dataclass
class DispatchResult:
    aborted: str | None = None  # why the run stopped early
    # Stopped for this worker's ledger (unreachable, or its lease lost to other workers),
    # not for the API: the run is incomplete (exit 1), not aborted (exit 3).
    cut_off: bool = False
    interrupted: bool = False
    deadline: bool = False  # stopped because `limits.deadline` passed
