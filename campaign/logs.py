"""Structured logs with structlog: console lines on a terminal, JSON lines otherwise.

Every event also goes to `log.jsonl` in the campaign's directory. Masking is a processor,
so no call site can leak a phone number, the channel uuid or a param value by mistake.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import IO, Any

import structlog
from structlog.typing import EventDict, WrappedLogger

from campaign.times import compact_stamp

# Seven or more digits with at most two separators between them, but not an ISO date.
_DIGIT_RUN = re.compile(r"(?<![\w-])(?!\d{4}-\d\d-\d\d)\+?\d(?:[\s().-]{0,2}\d){6,}")
# Keys whose values are person data: never logged, whatever they hold.
_PRIVATE_KEYS = frozenset({"payload", "params", "body", "cells", "to_phone", "phone"})


def mask_phone(text: str) -> str:
    """`+14155550123` -> `********0123`: all but the last four digits hidden."""
    digits = re.sub(r"\D", "", text)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]


class Masker:
    """A processor that hides phone numbers, secrets (the channel uuid) and param values."""

    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}

    def hide(self, secret: str, keep: int = 8) -> None:
        if len(secret) > keep:  # a secret no longer than what may be shown needs no hiding
            self.secrets[secret] = secret[:keep] + "…"

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        for key, value in list(event.items()):
            if key in _PRIVATE_KEYS:
                event[key] = mask_phone(str(value)) if "phone" in key else "[hidden]"
            elif isinstance(value, str):
                event[key] = self.clean(value)
        return event

    def clean(self, text: str) -> str:
        for secret, shown in self.secrets.items():
            text = text.replace(secret, shown)
        return _DIGIT_RUN.sub(lambda m: mask_phone(m.group()), text)


masker = Masker()


class _Tee:
    """Writes each event of a campaign (bound with `bind_contextvars(campaign=...)`) as a
    JSON line to that campaign's log file, then passes it on. Several campaigns may run in
    one process (the web app), each in its own task and context."""

    def __init__(self) -> None:
        self.files: dict[str, IO[str]] = {}

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        file = self.files.get(event.get("campaign", ""))
        if file is not None:
            file.write(json.dumps(event, default=str, ensure_ascii=False) + "\n")
            file.flush()
        return event


_tee = _Tee()


class _StderrLogger:
    """Resolves sys.stderr at each call, so a progress bar's redirection is honoured."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warning = warn = error = critical = exception = msg


def configure(log_format: str = "console") -> None:
    """Configure once per process; `log_format` is `console` or `json`."""
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer(ensure_ascii=False)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            masker,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _tee,
            renderer,
        ],
        logger_factory=lambda *_: _StderrLogger(),
        cache_logger_on_first_use=False,
    )


def log_to_file(campaign: str, path: Path | None) -> None:
    """Start (or, with None, stop) copying the campaign's events to `path` as JSON lines."""
    old = _tee.files.pop(campaign, None)
    if old is not None:
        old.close()
    if path is not None:
        _tee.files[campaign] = path.open("a", encoding="utf-8")


def save_traceback(*folders: Path | None) -> Path | None:
    """Write the current exception's traceback, masked like every log line, to a crash log
    in the first folder that takes it; return its path."""
    import traceback

    text = masker.clean(traceback.format_exc())
    name = f"crash-{compact_stamp()}-{os.getpid()}.log"
    for folder in folders:
        if folder is None:
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return folder / name
        except OSError:
            continue
    return None
