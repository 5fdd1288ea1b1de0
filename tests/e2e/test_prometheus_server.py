"""A real Prometheus server scrapes ``outrigger run``'s admin port and sees the exact counts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.support.process import SidecarProcess
from tests.support.prometheus_server import PrometheusServer
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream


async def poll(prometheus: PrometheusServer, expr: str, want: float) -> list[Any]:
    deadline = time.monotonic() + 12.0
    result: list[Any] = []
    while time.monotonic() < deadline:
        result = await asyncio.to_thread(prometheus.query, expr)
        if result and float(result[0]["value"][1]) == want:
            return result
        await asyncio.sleep(0.25)
    raise AssertionError(f"{expr} never became {want}: {result}")


async def test_prometheus_scrapes_exact_request_and_retry_counts(upstream: ScriptedUpstream) -> None:
    for _ in range(7):
        upstream.script(Reply(status=503), Reply(status=200))
    config = base_config(upstream.url, name="orders")
    config["telemetry"] = {"tracing": {"enabled": True, "exporter": "none"}, "access_log": {"enabled": False}}
    sidecar = SidecarProcess(config)  # its admin port is chosen here, so Prometheus can start first:
    # Prometheus 2.x hands discovered targets to its scrape loop only after ~5 s, so that wait
    # overlaps the sidecar's start and the traffic below (scrapes before the start just fail).
    prometheus = PrometheusServer(f"127.0.0.1:{sidecar.admin_port}").start()
    try:
        await sidecar.start(within_s=10)
        async with aiohttp.ClientSession() as client:
            for _ in range(7):
                async with client.get(sidecar.url + "/v1/x") as resp:
                    assert resp.status == 200
            for _ in range(3):
                async with client.post(sidecar.url + "/v1/x", data=b"{}") as resp:
                    assert resp.status == 200

        get = (
            'outrigger_requests_total{route="orders",upstream="svc",method="GET",code="2xx",outcome="upstream"}'
        )
        (series,) = await poll(prometheus, get, 7)
        assert series["metric"]["job"] == "outrigger"
        await poll(prometheus, 'sum(outrigger_requests_total{route="orders"})', 10)
        await poll(prometheus, 'outrigger_retries_total{route="orders",reason="http_503"}', 7)
        await poll(prometheus, 'outrigger_upstream_attempts_total{route="orders",result="http_5xx"}', 7)
        await poll(prometheus, 'outrigger_upstream_attempts_total{route="orders",result="success"}', 10)
        await poll(prometheus, 'outrigger_inflight_requests{route="orders"}', 0)
        await poll(prometheus, 'outrigger_circuit_breaker_state{upstream="svc",state="closed"}', 1)
        await poll(prometheus, 'up{job="outrigger"}', 1)
        (build,) = await asyncio.to_thread(prometheus.query, "outrigger_build_info")
        assert build["metric"]["version"]
    finally:
        prometheus.stop()
        if sidecar.proc is not None:
            await sidecar.stop(within_s=15)
