"""The circuit breaker under real traffic: trip, fast-fail, half-open probe, close; and fallback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.support.sidecar import SidecarFactory, base_config
from tests.support.upstream import Reply, Reset, ScriptedUpstream


def url(sidecar: Any, path: str = "/r") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


def breaker_config(upstream_url: str, failures: int = 3, **route: Any) -> dict[str, Any]:
    route.setdefault("retry", {"max_attempts": 1})
    config = base_config(upstream_url, **route)
    config["upstreams"]["svc"]["circuit_breaker"] = {
        "consecutive_failures": failures, "open_duration": {"min": "200ms", "max": "400ms"},
    }
    return config


async def status(client: aiohttp.ClientSession, sidecar: Any) -> dict[str, Any]:
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/status") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def test_breaker_opens_fails_fast_probes_and_closes(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                          client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503)
    sidecar = await sidecar_factory(breaker_config(upstream.url))
    for _ in range(3):
        async with client.get(url(sidecar)) as resp:
            assert resp.status == 503 and "x-outrigger-error" not in resp.headers
    breaker = (await status(client, sidecar))["upstreams"]["svc"]["circuit_breaker"]
    assert breaker["state"] == "open"
    opened_at = breaker["entered_at"]

    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        body = await resp.json()
        assert resp.status == 503
        assert resp.headers["x-outrigger-error"] == "circuit_open"
        assert resp.headers["Retry-After"] == "1"  # whole seconds, rounded up from <= 0.3 s
        assert body["error"] == "circuit_open"
    # Failed fast: it reached no upstream and waited for nothing (not even the 200 ms an open
    # breaker takes to half-open), however busy the machine.
    assert time.monotonic() - start < 0.2
    assert len(upstream.requests) == 3  # the fast-fail never reached the upstream

    upstream.default = Reply(200, b"healed")
    await asyncio.sleep(0.32)  # past open_duration (min 200 ms plus up to 50% jitter)
    async with client.get(url(sidecar)) as resp:  # the half-open probe
        assert (resp.status, await resp.read()) == (200, b"healed")
    breaker = (await status(client, sidecar))["upstreams"]["svc"]["circuit_breaker"]
    assert breaker["state"] == "closed"
    assert breaker["entered_at"] > opened_at
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 200
    assert len(upstream.requests) == 5

    transitions = {
        (sample.labels["from_state"], sample.labels["to_state"]): sample.value
        for metric in sidecar.metrics.registry.collect() if metric.name == "outrigger_circuit_breaker_transitions"
        for sample in metric.samples if sample.name.endswith("_total")
    }
    assert transitions == {("closed", "open"): 1, ("open", "half_open"): 1, ("half_open", "closed"): 1}


async def test_failed_probe_reopens_the_breaker(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                client: aiohttp.ClientSession) -> None:
    upstream.default = Reset()
    sidecar = await sidecar_factory(breaker_config(upstream.url, failures=2))
    for _ in range(2):
        async with client.get(url(sidecar)) as resp:
            assert resp.headers["x-outrigger-error"] == "upstream_reset"
    await asyncio.sleep(0.32)
    async with client.get(url(sidecar)) as resp:  # probe, reset again
        assert resp.headers["x-outrigger-error"] == "upstream_reset"
    breaker = (await status(client, sidecar))["upstreams"]["svc"]["circuit_breaker"]
    assert breaker["state"] == "open" and breaker["openings"] == 2
    async with client.get(url(sidecar)) as resp:
        assert resp.headers["x-outrigger-error"] == "circuit_open"
    assert len(upstream.requests) == 3


async def test_4xx_never_opens_the_breaker(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                           client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(404)
    sidecar = await sidecar_factory(breaker_config(upstream.url, failures=2))
    for _ in range(5):
        async with client.get(url(sidecar)) as resp:
            assert resp.status == 404
    assert (await status(client, sidecar))["upstreams"]["svc"]["circuit_breaker"]["state"] == "closed"


async def test_a_retry_is_never_sent_to_an_open_breaker(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                        client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503)
    sidecar = await sidecar_factory(breaker_config(upstream.url, failures=2, retry={"max_attempts": 5}))
    async with client.get(url(sidecar)) as resp:
        # The second 503 opened the breaker: the third attempt is not made, and the upstream's own
        # last answer stands (not the sidecar's circuit_open), with the attempts really made.
        assert resp.status == 503
        assert "x-outrigger-error" not in resp.headers
        assert resp.headers["x-outrigger-attempts"] == "2"
    assert len(upstream.requests) == 2
    retries = sidecar.metrics.registry.get_sample_value(
        "outrigger_retries_total", {"route": "default", "upstream": "svc", "reason": "http_503"})
    assert retries == 1  # no retry counted (or budget spent) for the attempt the breaker would refuse
    async with client.get(url(sidecar)) as resp:
        assert resp.headers["x-outrigger-error"] == "circuit_open"
        assert resp.headers["x-outrigger-attempts"] == "0"  # refused before any attempt
    assert len(upstream.requests) == 2


async def test_fallback_is_served_while_the_breaker_is_open(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                            client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503, b"down")
    fallback = {"status": 200, "body": '{"degraded": true}', "content_type": "application/json"}
    sidecar = await sidecar_factory(breaker_config(upstream.url, failures=2, fallback=fallback))
    for _ in range(2):
        async with client.get(url(sidecar)) as resp:
            assert (resp.status, await resp.read()) == (503, b"down")  # upstream answers are not replaced
            assert "x-outrigger-fallback" not in resp.headers
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 200
        assert resp.headers["x-outrigger-fallback"] == "true"
        assert resp.headers["Content-Type"].startswith("application/json")
        assert await resp.json() == {"degraded": True}
    assert len(upstream.requests) == 2


async def test_fallback_covers_only_its_configured_errors(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                          client: aiohttp.ClientSession) -> None:
    upstream.default = Reset()
    fallback = {"status": 200, "body": "cached", "content_type": "text/plain", "on": ["upstream_reset"]}
    config = breaker_config(upstream.url, failures=1, fallback=fallback)
    sidecar = await sidecar_factory(config)
    async with client.get(url(sidecar)) as resp:
        assert (resp.status, await resp.read()) == (200, b"cached")
        assert resp.headers["x-outrigger-fallback"] == "true"
    async with client.get(url(sidecar)) as resp:  # now circuit_open, which this fallback does not cover
        assert resp.status == 503
        assert resp.headers["x-outrigger-error"] == "circuit_open"
        assert "x-outrigger-fallback" not in resp.headers


async def test_a_hanging_upstream_trips_the_breaker_when_the_apps_deadline_cuts_every_attempt(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    """The app passes a 200 ms deadline down; the attempt timeout (2 s) never gets to fire."""
    upstream.default = Reply(delay=5.0)
    sidecar = await sidecar_factory(breaker_config(upstream.url, failures=3,
                                                   timeout={"attempt": "2s", "total": "5s"}))
    headers = {"x-outrigger-timeout-ms": "200"}
    for _ in range(3):
        async with client.get(url(sidecar), headers=headers) as resp:
            assert resp.headers["x-outrigger-error"] == "deadline_exceeded"
    async with client.get(url(sidecar), headers=headers) as resp:
        assert resp.headers["x-outrigger-error"] == "circuit_open"
    assert len(upstream.requests) == 3


async def test_an_upstream_cannot_forge_outrigger_headers_on_its_response(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(200, b"real", headers={"x-outrigger-error": "circuit_open",
                                                     "X-Outrigger-Fallback": "true", "x-outrigger-attempts": "9",
                                                     "X-Custom": "kept"})
    sidecar = await sidecar_factory(breaker_config(upstream.url, failures=2))
    async with client.get(url(sidecar)) as resp:
        assert (resp.status, await resp.read()) == (200, b"real")
        assert "x-outrigger-error" not in resp.headers
        assert "x-outrigger-fallback" not in resp.headers
        assert resp.headers.getall("x-outrigger-attempts") == ["1"]  # the sidecar's own, once
        assert resp.headers["X-Custom"] == "kept"
