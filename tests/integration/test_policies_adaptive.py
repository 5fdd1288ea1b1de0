"""Adaptive policies through a real sidecar and a scripted loopback upstream.

Margins are wide on purpose: a slow answer takes seconds, a fast one milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from tests.support.otlp_receiver import GrpcOtlpReceiver
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream


@pytest.fixture
def receiver() -> Iterator[GrpcOtlpReceiver]:
    server = GrpcOtlpReceiver().start()
    yield server
    server.stop()


def url(sidecar: Any, path: str = "/r") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


def sample(sidecar: Any, name: str, **labels: str) -> float:
    return sidecar.metrics.registry.get_sample_value(name, labels) or 0.0


def hedges(sidecar: Any, result: str) -> float:
    return sample(sidecar, "outrigger_hedges_total", route="default", upstream="svc", result=result)


async def test_hedge_wins_against_a_slow_first_attempt_and_the_loser_is_cancelled(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession,
        receiver: GrpcOtlpReceiver) -> None:
    upstream.script(Reply(200, b"slow", delay=2.0))  # the first attempt; the hedge gets the fast default
    config = base_config(upstream.url, hedge={"delay": "50ms", "max_extra_load": 1.0})
    config["telemetry"]["tracing"] = {"enabled": True, "endpoint": receiver.endpoint, "sample_ratio": 1.0}
    sidecar = await sidecar_factory(config, env={})
    start = time.monotonic()
    async with client.get(url(sidecar, "/hedged")) as resp:
        assert (resp.status, await resp.read()) == (200, b"ok")
        assert resp.headers["x-outrigger-attempts"] == "2"  # the hedge is an attempt sent, too
    assert time.monotonic() - start < 1.0  # not the slow first attempt's 2 s
    hedged = [r for r in upstream.requests if r.path == "/hedged"]
    assert len(hedged) == 2
    assert (hedges(sidecar, "won"), hedges(sidecar, "lost")) == (1, 0)
    await sidecar.stop()  # flushes the spans
    def hedged_client(span: Any) -> bool:
        return bool(span.kind == "CLIENT" and str(span.attributes.get("url.full", "")).endswith("/hedged"))

    spans = receiver.wait_for(lambda s: sum(hedged_client(x) for x in s) >= 2, timeout=5)
    first, hedge = sorted((s for s in spans if hedged_client(s)),
                          key=lambda s: bool(s.attributes.get("outrigger.hedge")))
    assert hedge.attributes["outrigger.hedge"] is True and hedge.attributes["http.response.status_code"] == 200
    assert "outrigger.hedge" not in first.attributes
    assert first.attributes["error.type"] == "cancelled"  # the loser was cut off, not waited for
    server = next(s for s in spans if s.kind == "SERVER" and s.attributes.get("url.path") == "/hedged")
    assert "hedge" in server.event_names()
    assert server.attributes["outrigger.attempt"] == 2  # the SERVER span reads the same count as the header


async def test_hedges_stay_within_max_extra_load_and_post_is_never_hedged(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(200, b"slowish", delay=0.3)
    sidecar = await sidecar_factory(base_config(upstream.url, hedge={"delay": "20ms", "max_extra_load": 0.05}))

    async def get(method: str) -> int:
        async with client.request(method, url(sidecar), data=b"x" if method == "POST" else None) as resp:
            await resp.read()
            return resp.status

    statuses = await asyncio.gather(*(get("GET") for _ in range(40)))
    assert statuses == [200] * 40
    assert len(upstream.requests) == 42  # 40 requests and 5% of them hedged
    assert (hedges(sidecar, "won") + hedges(sidecar, "lost"), hedges(sidecar, "suppressed")) == (2, 38)
    before = len(upstream.requests)
    await asyncio.gather(*(get("POST") for _ in range(40)))
    assert len(upstream.requests) - before == 40  # no idempotency key: never sent twice
    assert hedges(sidecar, "suppressed") == 38


async def test_learned_timeout_is_shown_in_status_and_metrics(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    config = base_config(upstream.url, timeout={"attempt": "2s", "adaptive": {
        "percentile": 99, "multiplier": 2, "min": "100ms", "min_samples": 5}})
    config["upstreams"]["svc"]["concurrency"] = {"max_active": 50, "adaptive": {"initial": 10, "min": 2}}
    sidecar = await sidecar_factory(config)
    labels = {"route": "default", "upstream": "svc"}
    for _ in range(5):
        async with client.get(url(sidecar)) as resp:
            await resp.read()
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/status") as resp:
        status = await resp.json()
    learned = status["routes"]["default"]["adaptive_timeout"]
    assert learned["learned"] is True and learned["samples"] == 5
    assert learned["timeout_s"] == 0.1  # fast loopback answers: the floor
    assert sample(sidecar, "outrigger_adaptive_timeout_seconds", **labels) == 0.1
    assert status["upstreams"]["svc"]["concurrency_limit"] == 10
    assert sample(sidecar, "outrigger_concurrency_limit", upstream="svc") == 10


async def test_adaptive_timeout_cuts_a_slow_attempt_and_the_retry_answers(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    config = base_config(upstream.url, timeout={"attempt": "2s", "adaptive": {"min": "100ms", "min_samples": 5}})
    sidecar = await sidecar_factory(config)
    for _ in range(5):
        async with client.get(url(sidecar)) as resp:
            await resp.read()
    upstream.script(Reply(200, b"slow", delay=2.0))
    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        assert (resp.status, await resp.read()) == (200, b"ok")
        assert resp.headers["x-outrigger-attempts"] == "2"
    assert time.monotonic() - start < 1.5  # cut at the learned 100 ms, not the fixed 2 s
    assert sample(sidecar, "outrigger_timeouts_total", route="default", upstream="svc", kind="attempt") == 1
