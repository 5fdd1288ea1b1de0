"""Several ``outrigger run`` processes sharing one global limit on a real redis-server, under uneven load.

The default run uses 3 processes for a few seconds; the ``load`` pass runs
10 with a longer window.  Bounds are generous (a busy 2-core machine): the
fleet must admit about the limit, never N times it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.fleet import fleet_config, offer, start_fleet, stop_fleet
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)
from tests.support.upstream import ScriptedUpstream


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


async def run_fleet(upstream: ScriptedUpstream, redis: RedisServer, session: aiohttp.ClientSession, *,
                    processes: int, rps: float, burst: int, load: float, seconds: float) -> dict[str, Any]:
    # A generous Redis timeout: this checks the sharing, not the fallback (tests/integration covers that),
    # and on a busy machine a starved sidecar would otherwise time out and fall back to its local share.
    config = fleet_config(upstream.url, redis.url, rps=rps, burst=burst, redis_timeout="500ms")
    fleet = await start_fleet(config, processes)
    try:
        weights = [i + 1 for i in range(processes)]  # uneven: the busiest gets N times the lightest's load
        rates = [rps * load * w / sum(weights) for w in weights]
        start = time.monotonic() + 0.2
        loads = await asyncio.gather(*(offer(session, proc.url, rate, seconds, start_at=start)
                                       for proc, rate in zip(fleet, rates, strict=True)))
        elapsed = time.monotonic() - start
        metrics = [await proc.metrics_text() for proc in fleet]
    finally:
        await stop_fleet(fleet)
    admitted = [load.codes[200] for load in loads]
    return {"admitted": admitted, "refused": [load.codes[429] for load in loads], "elapsed": elapsed,
            "other": sum(sum(c for s, c in load.codes.items() if s not in (200, 429)) for load in loads),
            "upstream": len(upstream.requests), "metrics": metrics}


def check(result: dict[str, Any], *, rps: float, burst: int, seconds: float) -> None:
    total = sum(result["admitted"])
    assert result["other"] == 0, result
    assert result["upstream"] == total
    # Never more than what one shared bucket allows over the run (plus the time the last answers took).
    assert total <= burst + rps * (result["elapsed"] + 0.5), result
    # And not starved: the fleet admits most of the limit when offered twice it (loose: on a busy machine the
    # load generator itself can fall behind; tests/bench/global_limit.py measures the ratio properly).
    assert total >= 0.6 * rps * seconds, result
    assert all(admitted > 0 for admitted in result["admitted"]), result  # even the lightest gets its turn
    assert any("outrigger_rate_limit_lease_requests_total" in text for text in result["metrics"])


async def test_three_sidecars_with_uneven_load_share_one_global_limit(
        upstream: ScriptedUpstream, redis_server: RedisServer, session: aiohttp.ClientSession) -> None:  # noqa: F811
    rps, burst, seconds = 40.0, 10, 2.0
    result = await run_fleet(upstream, redis_server, session, processes=3, rps=rps, burst=burst, load=2.0,
                             seconds=seconds)
    check(result, rps=rps, burst=burst, seconds=seconds)
    # Three local limits would each have admitted up to the full rate.
    assert sum(result["admitted"]) < 2 * rps * seconds


@pytest.mark.load
async def test_ten_sidecars_with_uneven_load_share_one_global_limit(
        upstream: ScriptedUpstream, redis_server: RedisServer, session: aiohttp.ClientSession) -> None:  # noqa: F811
    rps, burst, seconds = 100.0, 20, 10.0
    result = await run_fleet(upstream, redis_server, session, processes=10, rps=rps, burst=burst, load=2.0,
                             seconds=seconds)
    check(result, rps=rps, burst=burst, seconds=seconds)
    assert sum(result["admitted"]) <= burst + rps * seconds * 1.05
