"""Rate limit, bulkhead and /status through a real sidecar."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from tests.support.sidecar import SidecarFactory, base_config
from tests.support.upstream import Reply, ScriptedUpstream


def url(sidecar: Any, path: str = "/r") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


async def status(client: aiohttp.ClientSession, sidecar: Any) -> dict[str, Any]:
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/status") as resp:
        assert resp.status == 200
        data: dict[str, Any] = await resp.json()
        return data


async def get(client: aiohttp.ClientSession, target: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with client.get(target, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# --- rate limit ---


async def test_over_the_limit_is_429_with_retry_after_and_ratelimit_headers(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url, rate_limit={"requests_per_second": 0.5, "burst": 2}))
    assert [(await get(client, url(sidecar)))[0] for _ in range(2)] == [200, 200]
    status_code, headers, body = await get(client, url(sidecar))
    assert status_code == 429
    assert headers["x-outrigger-error"] == "rate_limited"
    assert headers["Retry-After"] == "2"  # one token at 0.5/s
    assert headers["RateLimit-Limit"] == "2"
    assert headers["RateLimit-Remaining"] == "0"
    assert 3 <= int(headers["RateLimit-Reset"]) <= 4  # two tokens to refill at 0.5/s
    assert b"rate_limited" in body
    assert len(upstream.requests) == 2
    rejected = sidecar.metrics.registry.get_sample_value("outrigger_rate_limited_total", {"route": "default"})
    assert rejected == 1


async def test_queue_mode_never_sends_a_request_after_its_deadline(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    """Tokens every 200 ms, total 250 ms: the second request waits 200 ms, the later ones are refused at once."""
    sidecar = await sidecar_factory(base_config(
        upstream.url, rate_limit={"requests_per_second": 5, "burst": 1, "mode": "queue", "max_wait": "1s"},
        timeout={"attempt": "100ms", "total": "250ms"}))
    started = time.monotonic()
    results = await asyncio.gather(*(get(client, url(sidecar)) for _ in range(5)))
    elapsed = time.monotonic() - started
    statuses = sorted(code for code, _, _ in results)
    assert statuses == [200, 200, 429, 429, 429], statuses
    assert len(upstream.requests) == 2
    assert elapsed < 1.0  # nobody waited out max_wait (1 s) to be sent after its 250 ms deadline


async def test_rate_limit_keys_get_their_own_buckets(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                     client: aiohttp.ClientSession) -> None:
    rate_limit = {"requests_per_second": 0.5, "burst": 1, "key": {"header": "x-tenant"}}
    sidecar = await sidecar_factory(base_config(upstream.url, rate_limit=rate_limit))
    codes = [(await get(client, url(sidecar), headers={"x-tenant": tenant}))[0] for tenant in "aabba"]
    assert codes == [200, 429, 200, 429, 429]
    assert len(upstream.requests) == 2


async def test_queue_mode_delays_instead_of_rejecting(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                      client: aiohttp.ClientSession) -> None:
    rate_limit = {"requests_per_second": 10, "burst": 1, "mode": "queue", "max_wait": "250ms"}
    sidecar = await sidecar_factory(base_config(upstream.url, rate_limit=rate_limit))
    start = time.monotonic()
    results = await asyncio.gather(*(get(client, url(sidecar)) for _ in range(5)))
    elapsed = time.monotonic() - start
    codes = sorted(code for code, _, _ in results)
    assert codes == [200, 200, 200, 429, 429]  # now, +100 ms, +200 ms; +300 ms is past max_wait
    assert 0.18 <= elapsed < 1.0


# --- bulkhead ---


async def test_bulkhead_overflow_sheds_concurrent_slow_requests(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
        client: aiohttp.ClientSession) -> None:
    # Long enough (1.5 s calls, 1 s pending timeout) that a busy machine still finds the queue
    # full when the fourth request arrives.
    upstream.default = Reply(200, delay=1.5)
    config = base_config(upstream.url)
    config["upstreams"]["svc"]["concurrency"] = {"max_active": 2, "max_pending": 1, "pending_timeout": "1s"}
    sidecar = await sidecar_factory(config)
    tasks = [asyncio.ensure_future(get(client, url(sidecar))) for _ in range(3)]
    for _ in range(50):  # until all three are in (at most 0.5 s)
        snapshot = (await status(client, sidecar))["upstreams"]["svc"]
        if (snapshot["active"], snapshot["pending"]) == (2, 1):
            break
        await asyncio.sleep(0.01)
    assert (snapshot["active"], snapshot["pending"]) == (2, 1)

    start = time.monotonic()
    code, headers, body = await get(client, url(sidecar))
    assert (code, headers["x-outrigger-error"]) == (503, "overflow")
    assert b"queue full" in body  # shed on arrival, not after waiting in the queue...
    assert time.monotonic() - start < 0.5  # ...so well before the 1 s pending timeout

    results = await asyncio.gather(*tasks)
    assert sorted(code for code, _, _ in results) == [200, 200, 503]  # the queued one hit pending_timeout
    assert [h.get("x-outrigger-error") for c, h, _ in results if c == 503] == ["overflow"]
    assert len(upstream.requests) == 2
    labels = {"upstream": "svc"}
    assert sidecar.metrics.registry.get_sample_value("outrigger_bulkhead_rejected_total", labels) == 2
    snapshot = (await status(client, sidecar))["upstreams"]["svc"]
    assert (snapshot["active"], snapshot["pending"]) == (0, 0)


async def test_bulkhead_slot_is_freed_when_the_client_goes_away(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(200, delay=0.3)
    config = base_config(upstream.url)
    config["upstreams"]["svc"]["concurrency"] = {"max_active": 1, "max_pending": 0}
    sidecar = await sidecar_factory(config)
    with pytest.raises(asyncio.TimeoutError):
        await get(client, url(sidecar), timeout=aiohttp.ClientTimeout(total=0.1))
    await asyncio.sleep(0.05)
    snapshot = (await status(client, sidecar))["upstreams"]["svc"]
    assert (snapshot["active"], snapshot["pending"]) == (0, 0)
    upstream.default = Reply(200)
    assert (await get(client, url(sidecar)))[0] == 200


# --- /status ---


async def test_status_shows_breaker_limiter_budget_and_bulkhead(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
        client: aiohttp.ClientSession) -> None:
    config = base_config(upstream.url, rate_limit={"requests_per_second": 1, "burst": 5},
                         retry={"budget": {"ratio": 0.2, "min_per_second": 1, "window": "10s"}})
    sidecar = await sidecar_factory(config)
    before = time.time()
    upstream.script(Reply(503), Reply(200))
    assert (await get(client, url(sidecar)))[0] == 200
    data = await status(client, sidecar)

    breaker = data["upstreams"]["svc"]["circuit_breaker"]
    assert breaker["state"] == "closed"
    entered = datetime.fromisoformat(breaker["entered_at"]).timestamp()  # wall-clock ISO 8601
    assert entered <= before + 0.01
    assert breaker["seconds_in_state"] >= 0
    assert (data["upstreams"]["svc"]["active"], data["upstreams"]["svc"]["pending"]) == (0, 0)

    route = data["routes"]["default"]
    assert route["upstream"] == "svc"
    assert 3.9 <= route["rate_limit"]["tokens"] <= 4.2
    assert route["retry_budget_remaining"] == 9  # 0.2 * 1 request + 1/s * 10 s, minus the one retry


async def test_status_shows_active_and_pending_per_route(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                         client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    route = (await status(client, sidecar))["routes"]["default"]
    assert (route["active"], route["pending"]) == (0, 0)


async def test_status_counts_are_integers_seconds_rounded_and_routes_keyed_like_the_metrics(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"max_attempts": 1}))
    upstream.script(Reply(200), Reply(503))
    for _ in range(2):
        await get(client, url(sidecar))
    data = await status(client, sidecar)
    metrics = sidecar.metrics.registry
    assert metrics.get_sample_value("outrigger_requests_total", {
        "route": "default", "upstream": "svc", "method": "GET", "code": "5xx", "outcome": "upstream"}) == 1
    route = data["routes"]["default"]  # the metrics' `route` label, not listener/route
    assert route["listener"] == "main" and route["http_route"] == "/"
    for key in ("inflight", "requests", "errors", "active", "pending", "retry_budget_remaining"):
        assert type(route[key]) is int, (key, route[key])
    assert (route["inflight"], route["requests"], route["errors"]) == (0, 2, 1)
    assert route["p99_s"] is not None and route["p99_s"] == round(route["p99_s"], 4)
    breaker = data["upstreams"]["svc"]["circuit_breaker"]
    assert breaker["seconds_in_state"] == round(breaker["seconds_in_state"], 1)
    assert breaker["entered_at"].endswith("Z") and type(breaker["consecutive_failures"]) is int
