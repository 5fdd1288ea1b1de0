"""A deliberately flaky HTTP upstream for ``outrigger demo`` and ``demo-upstream``.

Each request independently draws its fate: a connection reset, a 503, a slow
answer or a quick 200.  Used by the demo, the docker-compose stack and as a
stand-in for a real service while trying Outrigger out.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["FlakyBehaviour", "build_app", "serve_forever", "start"]


@dataclass
class FlakyBehaviour:
    failure_rate: float = 0.2
    reset_rate: float = 0.02
    latency_s: float = 0.005
    slow_rate: float = 0.02
    slow_latency_s: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    outcomes: dict[str, int] = field(default_factory=lambda: {"ok": 0, "503": 0, "reset": 0, "slow": 0})


UPSTREAM: web.AppKey[FlakyBehaviour] = web.AppKey("behaviour")


async def handle(request: web.Request) -> web.StreamResponse:
    behaviour = request.app[UPSTREAM]
    await request.read()
    roll = behaviour.rng.random()
    if roll < behaviour.reset_rate:
        behaviour.outcomes["reset"] += 1
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError("demo reset")
    roll -= behaviour.reset_rate
    if roll < behaviour.failure_rate:
        behaviour.outcomes["503"] += 1
        await asyncio.sleep(behaviour.latency_s)
        return web.json_response({"error": "flaky upstream says no"}, status=503)
    roll -= behaviour.failure_rate
    if roll < behaviour.slow_rate:
        behaviour.outcomes["slow"] += 1
        await asyncio.sleep(behaviour.slow_latency_s)
    else:
        behaviour.outcomes["ok"] += 1
        await asyncio.sleep(behaviour.latency_s * (0.5 + behaviour.rng.random()))
    body = {"ok": True, "path": request.path, "attempt": request.headers.get("x-outrigger-attempt")}
    return web.Response(text=json.dumps(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def build_app(behaviour: FlakyBehaviour) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = behaviour
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start(host: str, port: int, behaviour: FlakyBehaviour) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(build_app(behaviour), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port


async def serve_forever(host: str, port: int, behaviour: FlakyBehaviour) -> None:
    runner, bound = await start(host, port, behaviour)
    print(json.dumps({"level": "info", "message": f"demo upstream listening on {host}:{bound}"}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
