"""Endpoints chaos benchmark: five loopback endpoints behind one upstream, measured against issue 14's goals.

One command, not part of pytest::

    python -m tests.bench.endpoints                 # every scenario, about 2.5 minutes
    python -m tests.bench.endpoints --only bad503   # one scenario
    python -m tests.bench.endpoints --idle 60       # the preconnect scenario's idle gap (default 60 s)

The sidecar runs as its own process; the five endpoints and the open-loop
load generator (``chaos.offer``: latency from each request's due time, no
coordinated omission) share this one.  Every ratio is taken against a
baseline measured in the same run.  Prints one table (figure, goal,
PASS/FAIL) and writes ``tests/bench/results/endpoints.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import aiohttp
import yaml
from aiohttp import web

from tests.bench.chaos import Result, Row, SidecarProcess, offer, percentile, run_scenarios, write_report
from tests.support.ports import free_port

RPS = 200
SCENARIOS = ("bad503", "slow", "killed", "rolling", "reload", "preconnect", "cost")


class Endpoint:
    """One loopback endpoint: can answer 503, be slow, stop (connection refused) and come back on its port."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.port = free_port()
        self.status = 200
        self.delay = 0.0
        self.jitter = random.Random(index)
        self.arrivals: list[float] = []
        self.connections = 0
        self._runner: web.ServerRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.BaseRequest) -> web.Response:
        self.arrivals.append(time.monotonic())
        delay = self.delay or 0.002 + self.jitter.random() * 0.003  # 2-5 ms of "work"
        await asyncio.sleep(delay)
        return web.Response(status=self.status, body=b"ok" if self.status < 400 else b"unavailable")

    async def start(self) -> None:
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True, backlog=2048)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Fleet:
    def __init__(self, n: int = 5) -> None:
        self.endpoints = [Endpoint(i) for i in range(n)]

    async def start(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.start()

    async def stop(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.stop()

    def hits_between(self, start: float, end: float) -> int:
        return sum(1 for e in self.endpoints for t in e.arrivals if start <= t < end)


def upstream_config(fleet: Fleet, **extra: Any) -> dict[str, Any]:
    return {"endpoints": [e.address for e in fleet.endpoints], "slow_start": "2s", **extra}


async def with_sidecar(session: aiohttp.ClientSession, fleet: Fleet, upstream: dict[str, Any],
                       route: dict[str, Any] | None = None) -> SidecarProcess:
    sidecar = SidecarProcess(f"http://{fleet.endpoints[0].address}", route or {}, upstream)
    await sidecar.start(session)
    return sidecar


def success(load: Any) -> float:
    return float(sum(1 for s in load.samples if s.status == 200) / max(1, load.offered) * 100)


class Bench:
    def __init__(self, session: aiohttp.ClientSession, idle_s: float) -> None:
        self.session = session
        self.idle_s = idle_s

    async def bad503(self) -> Result:
        fleet = Fleet()
        await fleet.start()
        fleet.endpoints[0].status = 503
        sidecar = await with_sidecar(self.session, fleet, upstream_config(fleet))
        try:
            load = await offer(self.session, sidecar.url, RPS, 10.0)
            after = load.start + 2.0
            late = [s for s in load.samples if s.due >= after]
            amplification = fleet.hits_between(after, load.end + 1.0) / max(1, len(late))
            return Result([
                Row("one of five answers 503", "client success", success(load), 99.9, "%", higher_is_better=True),
                Row("one of five answers 503", "attempts / requests after 2 s", amplification, 1.05, "x"),
            ], {"offered": load.offered, "bad_endpoint_hits": len(fleet.endpoints[0].arrivals)})
        finally:
            await sidecar.stop()
            await fleet.stop()

    async def slow(self) -> Result:
        fleet = Fleet()
        await fleet.start()
        sidecar = await with_sidecar(self.session, fleet, upstream_config(fleet))
        try:
            healthy = await offer(self.session, sidecar.url, RPS, 8.0)
            fleet.endpoints[0].delay = 0.040  # 10x the others' 2-5 ms
            slow = await offer(self.session, sidecar.url, RPS, 18.0)
            settled = [s.latency for s in slow.samples if s.due >= slow.start + 10.0]
            base = percentile([s.latency for s in healthy.samples], 99)
            ratio = percentile(settled, 99) / base
            late_hits = sum(1 for t in fleet.endpoints[0].arrivals if t >= slow.start + 10.0)
            return Result([Row("one of five 10x slower", "p99 / all-healthy p99 (after 10 s)", ratio, 1.3, "x")],
                          {"healthy_p99_ms": base * 1000, "slow_p99_ms": percentile(settled, 99) * 1000,
                           "slow_endpoint_share_after_10s": late_hits / max(1, len(settled))})
        finally:
            await sidecar.stop()
            await fleet.stop()

    async def killed(self) -> Result:
        fleet = Fleet()
        await fleet.start()
        sidecar = await with_sidecar(self.session, fleet, upstream_config(fleet))
        try:
            async def kill_soon() -> None:
                await asyncio.sleep(2.0)
                await fleet.endpoints[0].stop()
            killer = asyncio.ensure_future(kill_soon())
            load = await offer(self.session, sidecar.url, RPS, 10.0)
            await killer
            return Result([Row("one endpoint killed", "client success", success(load), 99.9, "%",
                               higher_is_better=True)], {"offered": load.offered})
        finally:
            await sidecar.stop()
            await fleet.stop()

    async def rolling(self) -> Result:
        fleet = Fleet()
        await fleet.start()
        sidecar = await with_sidecar(self.session, fleet, upstream_config(fleet))
        ramped: list[bool] = []
        try:
            async def roll() -> None:
                for endpoint in fleet.endpoints:
                    await asyncio.sleep(1.0)
                    await endpoint.stop()
                    await asyncio.sleep(2.0)
                    await endpoint.start()
                    await asyncio.sleep(0.5)
                    status = await sidecar.status(self.session)
                    states = {e["address"]: e["state"] for e in status["upstreams"]["svc"]["endpoints"]}
                    ramped.append(states.get(endpoint.address) in ("slow_start", "ejected", "healthy"))
            roller = asyncio.ensure_future(roll())
            load = await offer(self.session, sidecar.url, RPS, 5 * 3.5 + 2.0)
            await roller
            errors = sum(1 for s in load.samples if s.status != 200)
            outcomes = Counter(f"{s.status} {s.error or ''} @{s.due - load.start:.0f}s".strip()
                               for s in load.samples if s.status != 200)
            return Result([Row("rolling restart", "errors reaching the app", errors, 0, "req")],
                          {"offered": load.offered, "states_seen": ramped, "errors": dict(outcomes)})
        finally:
            await sidecar.stop()
            await fleet.stop()

    async def reload(self) -> Result:
        fleet = Fleet()
        await fleet.start()
        sidecar = await with_sidecar(self.session, fleet, {"endpoints": [e.address for e in fleet.endpoints[:3]]})
        try:
            async def change() -> None:
                await asyncio.sleep(2.0)
                upstreams = cast(dict[str, dict[str, Any]], sidecar.config["upstreams"])
                upstreams["svc"]["endpoints"] = [e.address for e in fleet.endpoints[2:]]
                (Path(sidecar._dir.name) / "outrigger.yaml").write_text(yaml.safe_dump(sidecar.config))
                assert sidecar.proc is not None
                sidecar.proc.send_signal(signal.SIGHUP)
            changer = asyncio.ensure_future(change())
            for endpoint in fleet.endpoints:
                endpoint.delay = 0.050  # requests are in flight when the set changes
            load = await offer(self.session, sidecar.url, RPS, 6.0)
            await changer
            errors = sum(1 for s in load.samples if s.status != 200)
            moved = sum(1 for t in fleet.endpoints[4].arrivals)
            return Result([Row("endpoint set changes (reload)", "errors reaching the app", errors, 0, "req")],
                          {"offered": load.offered, "new_endpoint_hits": moved,
                           "removed_endpoint_hits_after_3s": sum(
                               1 for t in fleet.endpoints[0].arrivals if t >= load.start + 3.0)})
        finally:
            await sidecar.stop()
            await fleet.stop()

    async def preconnect(self) -> Result:
        fleet = Fleet(1)
        await fleet.start()
        sidecar = await with_sidecar(self.session, fleet, {"endpoints": [fleet.endpoints[0].address],
                                                           "preconnect": 1})
        try:
            async with self.session.get(sidecar.url) as resp:
                await resp.read()
            await asyncio.sleep(self.idle_s)  # the pool's idle timeout (4 s) passed many times over
            status = await sidecar.status(self.session)
            idle = status["upstreams"]["svc"]["endpoints"][0]["idle_connections"]
            started = time.monotonic()
            async with self.session.get(sidecar.url) as resp:
                await resp.read()
            first_ms = (time.monotonic() - started) * 1000
            return Result([Row(f"first request after {self.idle_s:g} s idle", "warm idle connections", idle, 1,
                               "conn", higher_is_better=True)], {"first_request_ms": first_ms})
        finally:
            await sidecar.stop()
            await fleet.stop()

    async def cost(self) -> Result:
        """Sidecar CPU per request: a one-URL upstream vs p2c_ewma over five endpoints, alternated 3 times."""
        fleet = Fleet()
        await fleet.start()
        for endpoint in fleet.endpoints:
            endpoint.delay = 1e-6
        cpu_us: dict[str, list[float]] = {"single": [], "five": []}
        try:
            for _ in range(3):
                for name, upstream in (("single", {}), ("five", upstream_config(fleet))):
                    sidecar = await with_sidecar(self.session, fleet, upstream)
                    try:
                        cpu_us[name].append(await cpu_per_request(self.session, sidecar, 3000))
                    finally:
                        await sidecar.stop()
            ratios = [f / s for f, s in zip(cpu_us["five"], cpu_us["single"], strict=True)]
            return Result([Row("p2c_ewma over five endpoints", "CPU per request vs one URL", sorted(ratios)[1],
                               1.25, "x")], {"cpu_us_per_request": cpu_us, "ratios": ratios})
        finally:
            await fleet.stop()


async def cpu_per_request(session: aiohttp.ClientSession, sidecar: SidecarProcess, requests: int,
                          concurrency: int = 8) -> float:
    """Microseconds of the sidecar process's CPU per proxied request (closed loop, after a warm-up)."""
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.get(sidecar.url) as resp:
                await resp.read()

    remaining = 300
    await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up: connections, caches
    before = sidecar.cpu_s()
    remaining = requests
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (sidecar.cpu_s() - before) / requests * 1e6


async def main(only: list[str], idle_s: float) -> int:
    load_before = os.getloadavg()

    async def run(session: aiohttp.ClientSession, name: str) -> Result:
        result: Result = await getattr(Bench(session, idle_s), name)()
        return result

    rows, details = await run_scenarios(only, run)
    return write_report("endpoints.json", rows, details, load_before, {"offered_rps": RPS})


def cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run just this scenario (repeatable)")
    parser.add_argument("--idle", type=float, default=60.0, help="idle gap before the preconnect scenario's request")
    args = parser.parse_args()
    with contextlib.suppress(ImportError):
        import uvloop
        uvloop.install()
    return asyncio.run(main(args.only or list(SCENARIOS), args.idle))


if __name__ == "__main__":
    sys.exit(cli())
