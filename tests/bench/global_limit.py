"""Shared-state benchmark: global rate limits and Idempotency-Key deduplication against issue 15's goals.

One command, not part of pytest::

    python -m tests.bench.global_limit                       # 10 sidecars, 20 s phases (about 3 min)
    python -m tests.bench.global_limit --processes 12 --seconds 8

What runs: a real ``redis-server`` on a loopback port, N ``outrigger run``
processes sharing one ``scope: global`` limit (``--rps``, burst 20, Redis
timeout 20 ms), a loopback upstream and an open-loop load generator in this
process.  Offered load is uneven: sidecar *i* gets a share proportional to
*i* (the busiest gets N times the lightest's).  Phases, on one fleet:

1. 1.1x the limit, then 2x: admitted / limit over each phase after its
   first second, and the share of requests that waited on a Redis round
   trip (from each sidecar's ``/status``);
2. 2x with Redis SIGSTOPped: admitted / limit in fallback, and the p99 of
   admitted requests after the first second (the first 3 failures per
   sidecar), against the p99 of the 2x phase with Redis up;
3. idempotency: two sidecars, 1,000 keys each POSTed to both at once;
   duplicates reaching the upstream are counted;
4. CPU: the global limit's per-request cost in steady state, measured
   in-process on the policy itself (local limit and no limit as baselines).

Writes ``tests/bench/results/global_limit.json`` and ``global_limit.md``.
Figures from a shared machine are noisy; the load average is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDict

from proxy.chain import ProxyRequest, ProxyResponse, RequestBody
from proxy.clock import SystemClock
from proxy.config import RateLimitConfig, RedisConfig
from proxy.config.units import Duration
from proxy.policies.global_rate_limit import GlobalRateLimit
from proxy.policies.rate_limit import RateLimit
from proxy.store.redis import RedisStore
from proxy.telemetry.metrics import Metrics
from proxy.telemetry.shared_state import LimitMetrics
from tests.support.fleet import Load, fleet_config, offer, start_fleet, stop_fleet
from tests.support.process import SidecarProcess
from tests.support.redis_server import RedisServer
from tests.support.upstream import Reply, ScriptedUpstream

RESULTS = Path(__file__).parent / "results"


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))] if values else math.nan


def admitted_ratio(loads: list[Load], start: float, end: float, rps: float) -> float:
    admitted = sum(1 for load in loads for due in load.admitted_at if start <= due < end)
    return admitted / (rps * (end - start))


async def statuses(session: aiohttp.ClientSession, fleet: list[SidecarProcess]) -> list[dict[str, Any]]:
    out = []
    for proc in fleet:
        async with session.get(proc.admin_url + "/status") as resp:
            out.append((await resp.json())["routes"]["partner"]["rate_limit"])
    return out


async def metric_sum(fleet: list[SidecarProcess], name: str) -> dict[str, float]:
    """``name``'s samples summed over the fleet, by their full label text."""
    totals: dict[str, float] = {}
    for proc in fleet:
        for line in (await proc.metrics_text()).splitlines():
            if line.startswith(name):
                series, _, value = line.rpartition(" ")
                key = series[len(name):]
                totals[key] = totals.get(key, 0.0) + float(value)
    return dict(totals)


async def phase(session: aiohttp.ClientSession, fleet: list[SidecarProcess], rps: float, load: float,
                seconds: float) -> tuple[list[Load], float]:
    weights = range(1, len(fleet) + 1)
    rates = [rps * load * w / sum(weights) for w in weights]
    start = time.monotonic() + 0.1
    loads = await asyncio.gather(*(offer(session, proc.url, rate, seconds, start_at=start, max_inflight=256)
                                   for proc, rate in zip(fleet, rates, strict=True)))
    return list(loads), start


async def fleet_figures(args: argparse.Namespace, redis: RedisServer, upstream: ScriptedUpstream,
                        session: aiohttp.ClientSession) -> dict[str, Any]:
    rps, seconds = args.rps, args.seconds
    fleet = await start_fleet(fleet_config(upstream.url, redis.url, rps=rps, burst=20,
                                           redis_timeout=args.redis_timeout), args.processes)
    figures: dict[str, Any] = {"processes": args.processes, "rps": rps, "seconds": seconds,
                               "redis_timeout": args.redis_timeout}
    try:
        await phase(session, fleet, rps, 1.1, 2.0)  # warm-up: leases sized, heartbeats counted
        for load in (1.1, 2.0):
            before = await statuses(session, fleet)
            errors_before = sum((await metric_sum(fleet, "outrigger_rate_limit_store_errors_total")).values())
            loads, start = await phase(session, fleet, rps, load, seconds)
            after = await statuses(session, fleet)
            errors = sum((await metric_sum(fleet, "outrigger_rate_limit_store_errors_total")).values())
            figures[f"store_errors_{load}x"] = errors - errors_before
            decided = sum(a["decisions"] - b["decisions"] for a, b in zip(after, before, strict=True))
            waited = sum(a["waited_on_store"] - b["waited_on_store"] for a, b in zip(after, before, strict=True))
            figures[f"admitted_ratio_{load}x"] = admitted_ratio(loads, start + 1.0, start + seconds, rps)
            figures[f"waited_share_{load}x"] = waited / max(1, decided)
            figures[f"p99_ms_{load}x"] = 1000 * p99([lat for ld in loads for lat in ld.latencies])
            figures[f"late_{load}x"] = sum(ld.late for ld in loads)
            figures[f"codes_{load}x"] = dict(sum((ld.codes for ld in loads), Counter()))
        figures["live_replicas_seen"] = [s["live_replicas"] for s in after]
        redis.pause()
        try:
            loads, start = await phase(session, fleet, rps, 2.0, seconds)
            modes = [s["mode"] for s in await statuses(session, fleet)]
        finally:
            redis.resume()
        after_first = [lat for ld in loads for lat, due in zip(ld.latencies, ld.admitted_at, strict=True)
                       if due >= start + 1.0]
        figures["fallback_admitted_ratio"] = admitted_ratio(loads, start + 1.0, start + seconds, rps)
        figures["fallback_p99_ms"] = 1000 * p99(after_first)
        figures["fallback_added_p99_ms"] = figures["fallback_p99_ms"] - figures["p99_ms_2.0x"]
        figures["first_second_max_ms"] = 1000 * max(
            [lat for ld in loads for lat, due in zip(ld.latencies, ld.admitted_at, strict=True) if due < start + 1],
            default=0.0)
        figures["fallback_modes"] = dict(Counter(modes))
        # Traffic lets each sidecar probe Redis again once its breaker's back-off (up to 10 s) is over.
        resumed = time.monotonic()
        while time.monotonic() - resumed < 20:
            await phase(session, fleet, rps, 0.5, 1.0)
            modes_after = Counter(s["mode"] for s in await statuses(session, fleet))
            if modes_after == Counter({"global": len(fleet)}):
                break
        figures["modes_after_resume"] = dict(modes_after)
        figures["recovered_after_s"] = time.monotonic() - resumed
    finally:
        await stop_fleet(fleet)
    return figures


async def idempotency_figures(redis: RedisServer, upstream: ScriptedUpstream,
                              session: aiohttp.ClientSession, keys: int) -> dict[str, Any]:
    config = fleet_config(upstream.url, redis.url, rps=1e6, burst=1000)
    route = config["listeners"][0]["routes"][0]
    route.pop("rate_limit")
    route["idempotency"] = {"store": "redis", "ttl": "10m"}
    config["redis"]["timeout"] = "200ms"
    fleet = await start_fleet(config, 2)
    upstream.requests.clear()
    upstream.default = Reply(200, b'{"charged": true}', delay=0.01)
    codes: Counter[str] = Counter()
    limit = asyncio.Semaphore(64)

    async def send(proc: SidecarProcess, key: str) -> None:
        async with limit, session.post(proc.url + "/pay", data=b'{"amount": 1}',
                                       headers={"Idempotency-Key": key}) as resp:
            await resp.read()
            replay = resp.headers.get("x-outrigger-idempotent-replay") == "true"
            codes[f"{resp.status}{' replay' if replay else ''}"] += 1

    try:
        await asyncio.gather(*(send(proc, f"key-{i}") for i in range(keys) for proc in fleet))
        results = await metric_sum(fleet, "outrigger_idempotency_total")
    finally:
        await stop_fleet(fleet)
    per_key = Counter(r.headers.get("idempotency-key") for r in upstream.requests)
    return {"keys": keys, "sent": 2 * keys, "upstream_requests": len(upstream.requests),
            "duplicates_reaching_upstream": sum(n - 1 for n in per_key.values() if n > 1),
            "answers": dict(codes), "results": results}


async def cpu_figures(redis: RedisServer, iterations: int) -> dict[str, Any]:
    """µs of CPU per request for each policy's path around a no-op handler (the Redis client included)."""
    clock = SystemClock()
    metrics = Metrics(process_collectors=False)
    route_metrics = metrics.for_route("bench", "up")
    big = RateLimitConfig(requests_per_second=1e7, burst=100_000, scope="global", name="cpu-bench")
    store = RedisStore(RedisConfig(url=redis.url, timeout=Duration(0.05)), clock, random.Random(1))
    policies: dict[str, Any] = {
        "none": None,
        "local": RateLimit(RateLimitConfig(requests_per_second=1e7, burst=100_000), clock, route_metrics),
        "global": GlobalRateLimit(big, "bench", store, clock, route_metrics, LimitMetrics(metrics, "bench")),
    }
    response = ProxyResponse(200, CIMultiDict())

    async def handler(request: ProxyRequest) -> ProxyResponse:
        return response

    out: dict[str, Any] = {}
    for name, policy in policies.items():
        samples = []
        for _ in range(5):
            request = ProxyRequest("GET", "/", CIMultiDict(), RequestBody(None), request_id="r")
            started = time.process_time()
            for _ in range(iterations):
                if policy is None:
                    await handler(request)
                else:
                    await policy(request, handler)
                if _ % 1000 == 0:
                    await asyncio.sleep(0)  # let refills run, as the event loop would between requests
            samples.append((time.process_time() - started) / iterations * 1e6)
        out[f"{name}_us"] = statistics.median(samples)
    out["global_added_us"] = out["global_us"] - out["none_us"]
    out["local_added_us"] = out["local_us"] - out["none_us"]
    out["global_snapshot"] = policies["global"].snapshot()
    await store.close()
    return out


def report(results: dict[str, Any]) -> str:
    f, i, c = results["fleet"], results["idempotency"], results["cpu"]
    rows = [
        ("admitted ÷ limit, 1.1x offered", f"{f['admitted_ratio_1.1x']:.3f}", "within ±2%"),
        ("admitted ÷ limit, 2x offered", f"{f['admitted_ratio_2.0x']:.3f}", "within ±2%"),
        ("requests that waited on Redis (1.1x / 2x)",
         f"{f['waited_share_1.1x']:.2%} / {f['waited_share_2.0x']:.2%}", "≤ 5%"),
        ("Redis SIGSTOPped: added p99 after the first second",
         f"{f['fallback_added_p99_ms']:+.2f} ms ({f['fallback_p99_ms']:.2f} vs {f['p99_ms_2.0x']:.2f})", "≤ 5 ms"),
        ("Redis SIGSTOPped: admitted ÷ limit in fallback", f"{f['fallback_admitted_ratio']:.3f}", "≤ 1.2"),
        ("duplicate keyed POSTs reaching the upstream", str(i["duplicates_reaching_upstream"]), "0"),
        ("CPU per request added by a global limit", f"{c['global_added_us']:.2f} µs", "≤ 10 µs"),
    ]
    lines = ["| figure | measured | goal |", "|---|---|---|", *[f"| {a} | {b} | {g} |" for a, b, g in rows]]
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=10)
    parser.add_argument("--rps", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--redis-timeout", default="20ms")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--iterations", type=int, default=200_000)
    args = parser.parse_args()
    load_before = os.getloadavg()
    redis = RedisServer().start()
    upstream = ScriptedUpstream()
    await upstream.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            results = {"fleet": await fleet_figures(args, redis, upstream, session),
                       "idempotency": await idempotency_figures(redis, upstream, session, args.keys),
                       "cpu": await cpu_figures(redis, args.iterations)}
    finally:
        await upstream.stop()
        redis.close()
    results["machine"] = {"cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    table = report(results)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "global_limit.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (RESULTS / "global_limit.md").write_text(
        f"# Shared state benchmark (`python -m tests.bench.global_limit --processes {args.processes} "
        f"--rps {args.rps:g} --seconds {args.seconds:g} --redis-timeout {args.redis_timeout}`)\n\n{table}\n\n"
        f"Load average before/after: {load_before} / "
        f"{results['machine']['loadavg_after']} on {os.cpu_count()} CPUs (shared machine: figures are noisy).\n")


if __name__ == "__main__":
    asyncio.run(main())
