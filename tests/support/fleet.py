"""A fleet of ``outrigger run`` processes sharing one global limit, and open-loop load to drive it.

Used by the multi-process tests (tests/e2e/test_shared_fleet.py) and the
benchmark (tests/bench/global_limit.py): every sidecar gets the same config,
one route with ``scope: global`` in front of one upstream, and each gets its
own offered rate, so load can be as uneven as a real deployment's.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.support.process import SidecarProcess


def fleet_config(upstream_url: str, redis_url: str, *, rps: float, burst: int, redis_timeout: str = "20ms",
                 **limit: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "drain": {"grace": "0s", "timeout": "2s"},
        "redis": {"url": redis_url, "timeout": redis_timeout},
        "upstreams": {"partner": {"url": upstream_url}},
        "defaults": {"retry": {"max_attempts": 1}},
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "routes": [{
            "name": "partner", "upstream": "partner",
            "rate_limit": {"requests_per_second": rps, "burst": burst, "scope": "global", "name": "partner-api",
                           **limit}}]}],
        "telemetry": {"tracing": {"enabled": False}, "access_log": {"enabled": False}},
    }


async def start_fleet(config: dict[str, Any], count: int) -> list[SidecarProcess]:
    fleet = [SidecarProcess(config) for _ in range(count)]
    try:
        # A few at a time: on a small shared machine, all at once can take longer than the ready timeout.
        for start in range(0, count, 4):
            await asyncio.gather(*(proc.start(within_s=60) for proc in fleet[start:start + 4]))
    except BaseException:
        await stop_fleet(fleet)
        raise
    return fleet


async def stop_fleet(fleet: list[SidecarProcess]) -> None:
    await asyncio.gather(*(proc.stop() for proc in fleet if proc.proc is not None), return_exceptions=True)


@dataclass
class Load:
    """What one sidecar's offered load got back: status counts and latencies (s) of the admitted requests."""

    codes: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # from the request's due time (no coordinated omission)
    admitted_at: list[float] = field(default_factory=list)  # due times of the 200s
    refused_latencies: list[float] = field(default_factory=list)
    late: int = 0  # requests sent more than 50 ms behind schedule (the load generator itself fell behind)


async def offer(session: aiohttp.ClientSession, url: str, rate: float, duration_s: float, *,
                start_at: float | None = None, max_inflight: int = 64) -> Load:
    """Open-loop load: ``rate`` requests per second for ``duration_s``, each on schedule, however slow the answers."""
    load = Load()
    start = start_at if start_at is not None else time.monotonic()
    inflight = asyncio.Semaphore(max_inflight)
    tasks: list[asyncio.Task[None]] = []

    async def one(due: float) -> None:
        async with inflight:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    load.codes[resp.status] += 1
                    if resp.status == 200:
                        load.latencies.append(time.monotonic() - due)
                        load.admitted_at.append(due)
                    else:
                        load.refused_latencies.append(time.monotonic() - due)
            except aiohttp.ClientError:
                load.codes[0] += 1

    total = int(rate * duration_s)
    for k in range(total):
        due = start + k / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.05:
            load.late += 1
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    return load
