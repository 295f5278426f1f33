"""A local stand-in for the Avaamo SMS Send API, for the demo and the tests.

    POST /sms/{channel_uuid}/send.json  {"to_phone": "+1...", ...}  ->  200 {"success": true}
    GET  /api/v1/agents/{agent_id}/sms/report.json   delivery reports (sandbox_reporting)
    GET  /api/v2/sms/opt-status.json                  who replied STOP (sandbox_reporting)

Faults on demand: a rate cap answered 429 + Retry-After, a share of 503s, latency, and
a share of requests accepted and recorded whose connection is then closed without an
answer (`--drop-after-accept`: the request arrived, the client sees `unknown`).
`--record FILE` appends every accepted request as a JSON line (flushed at once), with
the delivery report's outcome for it, so a test can count exactly what was "delivered".
It never forwards anything anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO

from aiohttp import web

from campaign.errors import UsageError
from campaign.sandbox_reporting import ReportConfig, Reports


@dataclass
class SandboxConfig:
    rate: float | None = None
    fail_rate: float = 0.0
    latency_ms: float = 0.0
    custom_auth: bool = False
    record: str | None = None
    drop_after_accept: float = 0.0
    reports: ReportConfig = field(default_factory=ReportConfig)


def create_app(config: SandboxConfig) -> web.Application:
    app = web.Application()
    recent: deque[float] = deque()
    record: IO[str] | None = None
    accepted = 0
    reports = Reports(config.reports)

    async def send(request: web.Request) -> web.Response:
        nonlocal accepted
        arrived = time.time()
        try:
            raw = await request.read()
        except ConnectionResetError:
            return _error(400, "connection lost before the body arrived")
        if config.rate is not None:
            now = time.monotonic()
            while recent and now - recent[0] >= 1.0:
                recent.popleft()
            if len(recent) >= config.rate:
                retry = max(1, int(recent[0] + 1.0 - now + 0.999))
                return _error(429, "rate limit exceeded", headers={"Retry-After": str(retry)})
            recent.append(now)
        try:
            body = json.loads(raw)
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        phone = body.get("to_phone")
        if not config.custom_auth and not (isinstance(phone, str) and phone.startswith("+")):
            return _error(400, "to_phone is required, with country code (+...)")
        # Like the real API, the work goes on when the client hangs up mid-request: the
        # SMS is sent (and recorded) even though nobody reads the answer.
        if config.latency_ms:
            await asyncio.sleep(config.latency_ms / 1000)
        if config.fail_rate and random.random() < config.fail_rate:
            return _error(503, "service busy, try again", headers={"Retry-After": "0"})
        dropped = bool(config.drop_after_accept) and random.random() < config.drop_after_accept
        line = {"t": arrived, "channel": request.match_info["channel"], "body": body}
        if isinstance(phone, str) and phone.startswith("+"):
            line["report"] = reports.accept(phone, arrived, body)
        if dropped:
            line["dropped"] = True
        if record is not None:
            record.write(json.dumps(line, ensure_ascii=False) + "\n")
            record.flush()
        accepted += 1
        if dropped and request.transport is not None:
            request.transport.abort()  # accepted, but the client never hears of it
        return web.json_response({"success": True})

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({"accepted": accepted})

    async def open_record(_app: web.Application) -> None:
        nonlocal record
        if config.record:
            record = open(config.record, "a", encoding="utf-8")  # noqa: SIM115 (app lifetime)

    async def close_record(_app: web.Application) -> None:
        if record is not None:
            record.close()

    app.router.add_post("/sms/{channel}/send.json", send)
    app.router.add_get("/stats", stats)
    app.router.add_get("/api/v1/agents/{agent}/sms/report.json", reports.handle)
    app.router.add_get("/api/v2/sms/opt-status.json", reports.opt_status)
    app.on_startup.append(open_record)
    app.on_cleanup.append(close_record)
    return app


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"success": False, "error": message}, status=status, headers=headers)


def serve_sandbox(args: argparse.Namespace) -> int:
    config = SandboxConfig(
        rate=args.rate,
        fail_rate=args.fail_rate,
        latency_ms=args.latency_ms,
        custom_auth=args.custom_auth,
        record=args.record,
        drop_after_accept=args.drop_after_accept,
        reports=ReportConfig(
            agent_id=args.agent_id,
            access_token=args.access_token,
            delivery_delay_s=args.delivery_delay_s,
            undelivered_rate=args.undelivered_rate,
            report_rate=args.report_rate,
            opt_out_rate=args.opt_out_rate,
            opt_in_after_s=args.opt_in_after_s,
            opted_out=args.opted_out,
        ),
    )

    async def main() -> None:
        runner = web.AppRunner(create_app(config), access_log=None)
        try:
            await runner.setup()  # opens the record file
        except OSError as exc:
            raise UsageError(f"cannot write the record {args.record} ({exc.strerror})") from None
        site = web.TCPSite(runner, args.host, args.port)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.host}:{args.port} ({exc.strerror})") from None
        port = runner.addresses[0][1]
        print(f"sandbox listening on http://{args.host}:{port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0


def spawn(
    command: list[str], *options: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start `COMMAND sandbox --port 0 OPTIONS` (tests, bench) and return the process and its
    URL once it listens. What it prints later is read and dropped: a full pipe would block it."""
    process = subprocess.Popen(
        [*command, "sandbox", "--port", "0", *options],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the sandbox says it listens
    if "listening on" not in line:
        process.kill()
        raise RuntimeError(f"sandbox did not start: {line}{process.stdout.read()}")
    threading.Thread(target=process.stdout.read, daemon=True).start()
    return process, line.split("listening on ")[1].strip()
