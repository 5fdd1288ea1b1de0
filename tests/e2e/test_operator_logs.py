"""What an operator sees on stderr (JSON lines) and in /config, from a real ``outrigger run`` process."""

from __future__ import annotations

import asyncio
import copy
import signal
from typing import Any

import aiohttp

from tests.support.ports import free_port
from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream


def entries(sidecar: SidecarProcess, start: str) -> list[dict[str, Any]]:
    return [e for e in sidecar.logs() if e.get("message", "").startswith(start)]


async def get(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def test_startup_breaker_transitions_and_reloads_are_logged_and_config_shows_effective_tracing(
        upstream: ScriptedUpstream) -> None:
    config = base_config(upstream.url, retry={"max_attempts": 1})
    config["upstreams"]["svc"]["circuit_breaker"] = {
        "consecutive_failures": 2, "open_duration": {"min": "200ms", "max": "300ms"}}
    config["telemetry"] = {"tracing": {"enabled": True}, "access_log": {"enabled": True}}
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: the line must still say where spans go
    sidecar = await SidecarProcess(config, env={"OTEL_TRACES_SAMPLER_ARG": "0.25",
                                                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                                "OTEL_BSP_EXPORT_TIMEOUT": "200"}).start()
    try:
        await sidecar.wait_log("outrigger ready")
        (ready,) = entries(sidecar, "outrigger ready")
        details = ready["details"]
        assert details["config_path"] == str(sidecar.config_path)
        assert details["admin"] == f"127.0.0.1:{sidecar.admin_port}"
        assert details["listeners"]["main"] == {"address": f"127.0.0.1:{sidecar.port}", "routes": ["default"]}
        assert details["upstreams"] == {"svc": upstream.url}
        assert (details["tracing"]["exporter"], details["tracing"]["endpoint"]) == ("otlp", endpoint)
        assert details["tracing"]["sample_ratio"] == 0.25

        async with aiohttp.ClientSession() as session:
            async with session.get(sidecar.admin_url + "/config") as resp:
                tracing = (await resp.json())["config"]["telemetry"]["tracing"]
            assert (tracing["sample_ratio"], tracing["endpoint"], tracing["protocol"]) == (0.25, endpoint, "grpc")

            upstream.default = Reply(503)
            assert [await get(session, sidecar.url + "/x") for _ in range(3)] == [503, 503, 503]
            await sidecar.wait_log("circuit breaker svc opened")  # log lines leave through a writer thread
            (opened,) = entries(sidecar, "circuit breaker svc opened")
            assert opened["level"] == "warning" and "2 consecutive failures" in opened["message"]
            assert opened["details"]["consecutive_failures"] == 2 and opened["details"]["from"] == "closed"
            upstream.default = Reply(200)
            await asyncio.sleep(0.35)
            assert await get(session, sidecar.url + "/x") == 200
            await sidecar.wait_log("circuit breaker svc closed")
            assert [e["level"] for e in entries(sidecar, "circuit breaker svc half-open")] == ["info"]
            assert [e["level"] for e in entries(sidecar, "circuit breaker svc closed")] == ["info"]

            changed = copy.deepcopy(config)
            changed["listeners"][0]["routes"].insert(0, {"name": "extra", "match": {"path_prefix": "/extra"},
                                                         "upstream": "svc"})
            changed["listeners"][0]["routes"][1]["retry"] = {"max_attempts": 2}
            sidecar.write_config(changed)
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGHUP)
            await sidecar.wait_log("config reloaded (sighup)")
            (reloaded,) = entries(sidecar, "config reloaded")
            assert reloaded["trigger"] == "sighup" and reloaded["details"]["result"] == "success"
            assert reloaded["details"]["routes"] == {"added": ["extra"]}
            assert reloaded["details"]["policies"] == {"default": ["retry"]}
            assert "routes added: extra" in reloaded["message"]
    finally:
        assert await sidecar.stop() == 0
