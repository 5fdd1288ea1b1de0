"""With the trace collector down the sidecar serves at full speed and says so once.

Two ``outrigger run`` subprocesses get the same load side by side: one with
tracing off, one exporting (sample everything) to a closed loopback port.
Runs alternate so that machine noise hits both alike; each side keeps its
best run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.otlp_receiver import SidecarProcess, free_port
from tests.support.sidecar import base_config
from tests.support.upstream import ScriptedUpstream

REQUESTS = 2000
CONCURRENCY = 16
MIN_RATIO = 0.90


async def drive(url: str) -> tuple[float, dict[int, int]]:
    """Send REQUESTS GETs with CONCURRENCY callers; return (requests per second, status counts)."""
    statuses: dict[int, int] = {}
    remaining = REQUESTS

    async def caller(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with session.get(url) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        await asyncio.gather(*(caller(session) for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - start
    return REQUESTS / elapsed, statuses


def config(upstream_url: str, tracing: dict[str, Any]) -> dict[str, Any]:
    data = base_config(upstream_url)
    data["defaults"]["concurrency"] = {"max_active": 64, "max_pending": 64}
    data["telemetry"] = {"tracing": tracing, "access_log": {"enabled": False}}
    return data


async def test_collector_down_costs_under_ten_percent_throughput_and_no_errors(
        upstream: ScriptedUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    off = SidecarProcess(config(upstream.url, {"enabled": False})).start()
    down = SidecarProcess(config(upstream.url, {"enabled": True, "sample_ratio": 1.0}), {
        "OTEL_EXPORTER_OTLP_ENDPOINT": dead, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1", "OTEL_BSP_EXPORT_TIMEOUT": "1000"}).start()
    rates: dict[str, list[float]] = {"off": [], "down": []}
    try:
        await drive(off.url + "/warmup")
        await drive(down.url + "/warmup")
        for _ in range(2):
            for name, sidecar in (("off", off), ("down", down)):
                rate, statuses = await drive(sidecar.url + "/x")
                assert statuses == {200: REQUESTS}, (name, statuses)
                rates[name].append(rate)
        metrics = {s.name: s.value for family in text_string_to_metric_families(down.metrics_text())
                   for s in family.samples if not s.labels}
    finally:
        off.stop()
        started = time.monotonic()
        assert down.stop() == 0
        stop_s = time.monotonic() - started
    ratio = max(rates["down"]) / max(rates["off"])
    print(f"\nthroughput req/s off={rates['off']} collector-down={rates['down']} ratio={ratio:.3f}")
    assert ratio >= MIN_RATIO, (ratio, rates)

    # 6 x 2000 requests x 2 spans cannot all fit the queue: drops are counted.
    assert metrics["outrigger_spans_dropped_total"] > 0
    assert stop_s < 4.0, f"drain took {stop_s:.1f}s with the collector down"

    logs = [json.loads(line) for line in down.stderr.splitlines() if line.startswith("{")]
    reports = [entry for entry in logs if entry["logger"] == "outrigger.tracing"]
    assert 1 <= len(reports) <= 2, reports  # once per 30s interval (plus at most one on shutdown)
    assert "dropped" in reports[0]["message"]
    assert not [entry for entry in logs if entry["logger"].startswith("opentelemetry")], logs
