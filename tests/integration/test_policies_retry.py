"""Retries through a real sidecar: each retry_on kind, and where a retry must not happen."""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from tests.support.ports import free_port
from tests.support.sidecar import SidecarFactory, base_config
from tests.support.upstream import Reply, Reset, ScriptedUpstream


def url(sidecar: Any, path: str = "/r") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


def retries(sidecar: Any, reason: str) -> float:
    labels = {"route": "default", "upstream": "svc", "reason": reason}
    return sidecar.metrics.registry.get_sample_value("outrigger_retries_total", labels) or 0.0


def closed_port() -> int:
    return free_port()  # nothing listens there


async def test_connect_failure_is_retried_even_for_post(
        sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    config = base_config(f"http://127.0.0.1:{closed_port()}")
    config["upstreams"]["svc"]["circuit_breaker"] = {"enabled": False}
    sidecar = await sidecar_factory(config)
    async with client.post(url(sidecar), data=b"body") as resp:
        assert resp.status == 503
        assert resp.headers["x-outrigger-error"] == "upstream_connect_failure"
        assert resp.headers["x-outrigger-attempts"] == "3"
    assert retries(sidecar, "connect_failure") == 2


async def test_reset_is_retried(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reset(), Reply(200, b"second"))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(url(sidecar)) as resp:
        assert (resp.status, await resp.read()) == (200, b"second")
        assert resp.headers["x-outrigger-attempts"] == "2"
    assert len(upstream.requests) == 2
    assert retries(sidecar, "reset") == 1


async def test_attempt_timeout_is_retried(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                          client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(200, b"late", delay=1.0), Reply(200, b"fast"))
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "100ms", "total": "1s"}))
    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        assert (resp.status, await resp.read()) == (200, b"fast")
        assert resp.headers["x-outrigger-attempts"] == "2"
    assert 0.1 <= time.monotonic() - start < 0.8  # waiting for the late answer would take 1 s
    assert retries(sidecar, "timeout") == 1


async def test_gateway_errors_are_retried(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                          client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(502), Reply(504), Reply(200, b"ok"))
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"retry_on": ["gateway-error"]}))
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 200
        assert resp.headers["x-outrigger-attempts"] == "3"
    assert [r.headers["x-outrigger-attempt"] for r in upstream.requests] == ["1", "2", "3"]
    assert (retries(sidecar, "http_502"), retries(sidecar, "http_504")) == (1, 1)


async def test_retriable_status_codes_are_retried(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                  client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(409), Reply(200))
    config = base_config(upstream.url, retry={"retry_on": ["retriable-status-codes"],
                                              "retriable_status_codes": [409]})
    sidecar = await sidecar_factory(config)
    async with client.put(url(sidecar), data=b"x") as resp:
        assert resp.status == 200
    assert len(upstream.requests) == 2
    assert retries(sidecar, "http_409") == 1


async def test_last_attempt_response_is_passed_through_as_sent(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503, b"still down", headers={"x-upstream": "yes"})
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(url(sidecar)) as resp:
        assert (resp.status, await resp.read()) == (503, b"still down")
        assert resp.headers["x-upstream"] == "yes"
        assert "x-outrigger-error" not in resp.headers
        assert resp.headers["x-outrigger-attempts"] == "3"


async def test_4xx_is_not_retried(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(404), Reply(200))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 404
        assert resp.headers["x-outrigger-attempts"] == "1"
    assert len(upstream.requests) == 1


async def test_post_without_idempotency_key_is_not_retried_after_send(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503), Reply(200), Reset(), Reply(200))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.post(url(sidecar), data=b"order") as resp:
        assert resp.status == 503
    async with client.patch(url(sidecar), data=b"order") as resp:
        assert resp.status == 200  # a fresh request, not a retry
    async with client.post(url(sidecar), data=b"order") as resp:
        assert resp.status == 502
        assert resp.headers["x-outrigger-error"] == "upstream_reset"
    assert len(upstream.requests) == 3


async def test_post_with_idempotency_key_is_retried(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                    client: aiohttp.ClientSession) -> None:
    # The 503's connection is kept; the reset on it (reused at once, so no keep-alive race) is
    # attempt 2 and retried by the policy; every hit on the upstream is an attempt.
    upstream.script(Reply(503), Reset(), Reply(201))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.post(url(sidecar), data=b"order", headers={"Idempotency-Key": "abc"}) as resp:
        assert resp.status == 201
        assert resp.headers["x-outrigger-attempts"] == "3"
    assert [r.body_size for r in upstream.requests] == [5, 5, 5]
    assert upstream.requests[2].headers["idempotency-key"] == "abc"


async def test_post_is_retried_when_the_route_opts_in(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                      client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503), Reply(200))
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"retry_non_idempotent": True}))
    async with client.post(url(sidecar), data=b"x") as resp:
        assert resp.status == 200
    assert len(upstream.requests) == 2


async def test_body_over_buffer_limit_is_not_retried(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                     client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503), Reply(200))
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"buffer_limit": "1KiB"}))
    async with client.put(url(sidecar), data=b"b" * 8192) as resp:
        assert resp.status == 503
        assert resp.headers["x-outrigger-attempts"] == "1"
    assert [r.body_size for r in upstream.requests] == [8192]


async def test_body_within_buffer_limit_is_resent_whole(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                        client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503), Reply(200))
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"buffer_limit": "16KiB"}))
    async with client.put(url(sidecar), data=b"b" * 8192) as resp:
        assert resp.status == 200
    assert [r.body_size for r in upstream.requests] == [8192, 8192]


async def test_budget_exhaustion_returns_the_upstream_response(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503)
    config = base_config(upstream.url, retry={"max_attempts": 5, "budget": {"ratio": 0, "min_per_second": 0.1,
                                                                            "window": "10s"}})
    config["upstreams"]["svc"]["circuit_breaker"] = {"enabled": False}
    sidecar = await sidecar_factory(config)
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 503
        assert resp.headers["x-outrigger-attempts"] == "2"  # one retry fits in the budget
    async with client.get(url(sidecar)) as resp:
        assert resp.headers["x-outrigger-attempts"] == "1"
    assert len(upstream.requests) == 3
    labels = {"route": "default", "upstream": "svc"}
    assert sidecar.metrics.registry.get_sample_value("outrigger_retry_budget_exhausted_total", labels) == 2


async def test_retry_after_is_honoured(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                       client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(429, headers={"Retry-After": "1"}), Reply(200))
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"total": "3s"}))
    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 1.0
    assert len(upstream.requests) == 2


async def test_retry_after_beyond_the_deadline_returns_the_response_at_once(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503, b"busy", headers={"Retry-After": "5"}), Reply(200))
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "1s", "total": "1s"}))
    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        assert (resp.status, await resp.read()) == (503, b"busy")
        assert resp.headers["Retry-After"] == "5"
        assert resp.headers["x-outrigger-attempts"] == "1"
    assert time.monotonic() - start < 0.8  # never waits for a retry that could not fit (the deadline is 1 s)
    assert len(upstream.requests) == 1
