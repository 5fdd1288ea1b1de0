"""Global rate limits through real sidecars sharing a real redis-server: limits, headers, every failure mode."""

from __future__ import annotations

import asyncio
import copy
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy import app
from proxy.clock import SystemClock
from proxy.lifecycle.sidecar import Sidecar
from proxy.store.redis import RedisStore
from tests.support.otlp_receiver import GrpcOtlpReceiver
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)
from tests.support.sidecar import base_config, to_config
from tests.support.upstream import ScriptedUpstream


def global_config(upstream: ScriptedUpstream, redis: RedisServer, *, timeout: str = "50ms",
                  **limit: Any) -> dict[str, Any]:
    rate_limit = {"requests_per_second": 2, "burst": 4, "scope": "global", "name": "partner", **limit}
    data = base_config(upstream.url, rate_limit=rate_limit)
    data["redis"] = {"url": redis.url, "timeout": timeout}
    return data


def url(sidecar: Sidecar, path: str = "/r") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


async def get(client: aiohttp.ClientSession, target: str, **kwargs: Any) -> tuple[int, dict[str, str]]:
    async with client.get(target, **kwargs) as resp:
        await resp.read()
        return resp.status, dict(resp.headers)


async def limit_status(client: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/status") as resp:
        data: dict[str, Any] = await resp.json()
    return data["routes"]["default"]["rate_limit"]  # type: ignore[no-any-return]


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.metrics.registry.get_sample_value(name, {"route": "default", **labels}) or 0.0


async def test_two_sidecars_share_one_limit(upstream: ScriptedUpstream, redis_server: RedisServer,  # noqa: F811
                                            sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    config = global_config(upstream, redis_server, requests_per_second=1, burst=6)
    one, two = await sidecar_factory(config), await sidecar_factory(config)
    started = time.monotonic()
    codes = [(await get(client, url(sidecar)))[0] for sidecar in (one, two) * 8]
    elapsed = time.monotonic() - started
    # Alone each would admit 6 + elapsed; together they admit what one shared bucket allows.
    assert 6 <= codes.count(200) <= 6 + int(elapsed) + 1, (codes, elapsed)
    assert codes.count(429) >= 16 - 7 - int(elapsed)
    assert sample(one, "outrigger_rate_limit_mode", mode="global") == 1.0
    assert sample(one, "outrigger_rate_limit_lease_requests_total", result="granted") >= 1


async def test_refusal_has_retry_after_and_ratelimit_headers_of_the_shared_limit(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=0.5, burst=2))
    results = [await get(client, url(sidecar)) for _ in range(4)]
    assert [status for status, _ in results][:2] == [200, 200]
    status, headers = results[-1]
    assert status == 429 and headers["x-outrigger-error"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 2  # one token per 2 s
    assert headers["RateLimit-Limit"] == "2" and headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(headers["RateLimit-Reset"]) <= 4  # the shared bucket is full again within 2 tokens' time


async def test_status_shows_mode_live_replicas_and_balance(upstream: ScriptedUpstream,
                                                           redis_server: RedisServer,  # noqa: F811
                                                           sidecar_factory: Any,
                                                           client: aiohttp.ClientSession) -> None:
    config = global_config(upstream, redis_server, requests_per_second=100, burst=100)
    one = await sidecar_factory(config)
    await sidecar_factory(config)
    assert (await get(client, url(one)))[0] == 200
    deadline = time.monotonic() + 5
    while (status := await limit_status(client, one))["live_replicas"] < 2:
        assert time.monotonic() < deadline, status
        await asyncio.sleep(0.1)
    assert status["mode"] == "global" and status["scope"] == "global" and status["name"] == "partner"
    assert status["live_replicas"] == 2
    assert status["balance"] >= 0


async def test_redis_killed_falls_back_to_this_replicas_share_and_readyz_stays_up(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=1, burst=3))
    assert (await get(client, url(sidecar)))[0] == 200
    redis_server.kill()
    await asyncio.sleep(0.6)  # the lease's tokens expire
    codes = [(await get(client, url(sidecar)))[0] for _ in range(6)]
    assert codes.count(200) <= 4 and codes.count(429) >= 2, codes  # still limited: the local share
    assert sample(sidecar, "outrigger_rate_limit_mode", mode="local_fallback") == 1.0
    assert sample(sidecar, "outrigger_rate_limit_mode", mode="global") == 0.0
    assert sample(sidecar, "outrigger_rate_limit_store_errors_total") >= 1
    assert (await limit_status(client, sidecar))["mode"] == "local_fallback"
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/readyz") as resp:
        assert resp.status == 200


async def test_redis_restarted_empty_returns_to_global_mode(upstream: ScriptedUpstream,
                                                            redis_server: RedisServer,  # noqa: F811
                                                            sidecar_factory: Any,
                                                            client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=50, burst=50))
    assert (await get(client, url(sidecar)))[0] == 200
    redis_server.kill()
    await asyncio.sleep(0.6)
    for _ in range(5):
        await get(client, url(sidecar))
    assert (await limit_status(client, sidecar))["mode"] == "local_fallback"
    granted_before = sample(sidecar, "outrigger_rate_limit_lease_requests_total", result="granted")
    await asyncio.to_thread(redis_server.start)  # same port, empty: the script must be loaded again
    deadline = time.monotonic() + 15
    while (await limit_status(client, sidecar))["mode"] != "global":
        assert time.monotonic() < deadline, "never went back to global"
        await get(client, url(sidecar))
        await asyncio.sleep(0.1)
    # Leases come from the new, empty Redis (its script cache too was empty: EVALSHA, NOSCRIPT, SCRIPT LOAD).
    assert sample(sidecar, "outrigger_rate_limit_lease_requests_total", result="granted") > granted_before


async def test_sigstopped_redis_costs_requests_at_most_the_redis_timeout(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=200, burst=200,
                                                  timeout="100ms"))
    assert (await get(client, url(sidecar)))[0] == 200
    redis_server.pause()
    try:
        await asyncio.sleep(0.6)
        durations = []
        for _ in range(20):
            started = time.monotonic()
            status, _ = await get(client, url(sidecar))
            durations.append(time.monotonic() - started)
            assert status == 200  # 200 rps / 1 replica: the fallback share admits these
        # At most the first few wait the 100 ms timeout; once the breaker opens no request waits on Redis.
        assert sum(d > 0.09 for d in durations) <= 3, durations
        assert max(durations) < 2.0
        assert (await limit_status(client, sidecar))["mode"] == "local_fallback"
    finally:
        redis_server.resume()


async def test_slow_redis_is_abandoned_at_the_timeout(upstream: ScriptedUpstream,
                                                      redis_server: RedisServer,  # noqa: F811
                                                      sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=100, burst=100,
                                                  timeout="50ms"))
    redis_server.slow(1.0)  # DEBUG SLEEP: busy for a second, the cold sidecar needs a lease now
    await asyncio.sleep(0.05)
    started = time.monotonic()
    status, _ = await get(client, url(sidecar))
    assert status == 200  # decided by the local share instead
    assert time.monotonic() - started < 0.5
    assert sample(sidecar, "outrigger_rate_limit_store_errors_total") >= 1


async def test_on_store_error_closed_refuses_and_open_admits(upstream: ScriptedUpstream,
                                                            redis_server: RedisServer,  # noqa: F811
                                                            sidecar_factory: Any,
                                                            client: aiohttp.ClientSession) -> None:
    closed = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=100, burst=100,
                                                 on_store_error="closed"))
    opened = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=1, burst=1,
                                                 on_store_error="open", name="other"))
    redis_server.kill()
    for _ in range(4):  # the mode changes once the Redis breaker opens (3 failures in a row)
        status, headers = await get(client, url(closed))
        assert status == 429 and int(headers["Retry-After"]) >= 1 and headers["RateLimit-Remaining"] == "0"
    assert [(await get(client, url(opened)))[0] for _ in range(5)] == [200] * 5
    assert sample(closed, "outrigger_rate_limit_mode", mode="closed") == 1.0
    assert sample(opened, "outrigger_rate_limit_mode", mode="open") == 1.0


async def test_shadow_limit_counts_would_be_refusals_but_never_refuses(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(global_config(upstream, redis_server, requests_per_second=0.5, burst=2,
                                                  shadow=True))
    assert [(await get(client, url(sidecar)))[0] for _ in range(6)] == [200] * 6
    assert sample(sidecar, "outrigger_rate_limit_shadowed_total") >= 3
    assert sample(sidecar, "outrigger_rate_limited_total") == 0


async def test_keyed_global_limit_is_one_shared_limit_per_header_value(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    config = global_config(upstream, redis_server, requests_per_second=0.5, burst=1, key={"header": "x-tenant"})
    one, two = await sidecar_factory(config), await sidecar_factory(config)
    assert (await get(client, url(one), headers={"x-tenant": "a"}))[0] == 200
    assert (await get(client, url(two), headers={"x-tenant": "a"}))[0] == 429  # shared across sidecars
    assert (await get(client, url(two), headers={"x-tenant": "b"}))[0] == 200  # another tenant, its own limit
    assert redis_server.command("EXISTS", "outrigger:rl:partner:k:a") == ":1"


async def test_local_shadow_limit_lets_would_be_refusals_through(upstream: ScriptedUpstream, sidecar_factory: Any,
                                                                 client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url, rate_limit={"requests_per_second": 0.5, "burst": 1,
                                                                          "shadow": True}))
    assert [(await get(client, url(sidecar)))[0] for _ in range(3)] == [200] * 3
    assert sample(sidecar, "outrigger_rate_limit_shadowed_total") == 2


async def test_config_view_hides_the_redis_password(upstream: ScriptedUpstream, sidecar_factory: Any,
                                                    client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    data["redis"] = {"url": "redis://app:s3cret@127.0.0.1:1/0"}
    sidecar = await sidecar_factory(data)
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/config") as resp:
        text = await resp.text()
    assert "s3cret" not in text and "127.0.0.1:1/0" in text


async def test_mode_change_is_a_span_event(upstream: ScriptedUpstream, redis_server: RedisServer,  # noqa: F811
                                           sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    receiver = GrpcOtlpReceiver().start()
    try:
        data = global_config(upstream, redis_server, requests_per_second=100, burst=100)
        data["telemetry"]["tracing"] = {"enabled": True, "endpoint": receiver.endpoint, "sample_ratio": 1.0}
        sidecar = await sidecar_factory(data, env={})
        await get(client, url(sidecar))
        redis_server.kill()
        await asyncio.sleep(0.6)
        for _ in range(6):
            await get(client, url(sidecar))
        await sidecar.stop()  # flushes
        spans = receiver.wait_for(lambda s: sum(x.kind == "SERVER" for x in s) >= 7, timeout=5)
        changed = [s for s in spans if "rate_limit_mode_changed" in s.event_names()]
        assert len(changed) == 1
    finally:
        receiver.stop()


async def test_a_sidecar_whose_redis_never_answers_starts_ready_and_serves_its_share(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url, rate_limit={"requests_per_second": 100, "burst": 10, "scope": "global"})
    data["redis"] = {"url": f"redis://127.0.0.1:{free_port()}/0", "timeout": "20ms"}  # nothing listens there
    sidecar = await sidecar_factory(data)
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/readyz") as resp:
        assert resp.status == 200
    codes = [(await get(client, url(sidecar)))[0] for _ in range(8)]
    assert codes.count(200) >= 6  # decided by the local share (100 rps, burst 10) while Redis is down
    assert (await limit_status(client, sidecar))["mode"] == "local_fallback"


async def test_reload_keeps_the_global_limit_and_its_store_while_their_config_is_unchanged(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    data = global_config(upstream, redis_server, requests_per_second=50, burst=50)
    sidecar = await sidecar_factory(data)
    await get(client, url(sidecar))
    store, limiter = sidecar.runtime.redis, sidecar.runtime.routes[0].state.rate_limit
    data["defaults"]["timeout"]["total"] = "4s"  # another block changes
    assert await sidecar.apply(to_config(data))
    assert sidecar.runtime.redis is store and sidecar.runtime.routes[0].state.rate_limit is limiter
    data["redis"]["timeout"] = "30ms"  # the store changes: a new client, and limits that use it
    assert await sidecar.apply(to_config(data))
    assert sidecar.runtime.redis is not store and sidecar.runtime.redis is not None
    assert sidecar.runtime.routes[0].state.rate_limit.store is sidecar.runtime.redis
    assert (await get(client, url(sidecar)))[0] == 200


def _replica_count(redis: RedisServer, name: str) -> str | None:
    return redis.command("ZCARD", f"outrigger:replicas:{name}")


def _limited_route(name: str, prefix: str) -> dict[str, Any]:
    return {"name": name, "match": {"path_prefix": prefix}, "upstream": "svc",
            "rate_limit": {"requests_per_second": 50, "burst": 50, "scope": "global", "name": name}}


async def test_a_reload_that_removes_a_global_limit_stops_its_heartbeat(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    data = global_config(upstream, redis_server, requests_per_second=50, burst=50)
    data["listeners"][0]["routes"].insert(0, _limited_route("billing", "/billing"))
    sidecar = await sidecar_factory(data)
    assert (await get(client, url(sidecar)))[0] == 200
    assert (await get(client, url(sidecar, "/billing")))[0] == 200
    store = sidecar.runtime.redis
    assert store is not None
    await asyncio.sleep(0.3)  # the first heartbeats answer
    assert _replica_count(redis_server, "partner") == ":1" and _replica_count(redis_server, "billing") == ":1"
    del data["listeners"][0]["routes"][1]["rate_limit"]  # "partner" is gone; "billing" stays
    assert await sidecar.apply(to_config(data))
    assert sidecar.runtime.redis is store
    assert set(store.snapshot()["live_replicas"]) == {"billing"}
    assert (await get(client, url(sidecar)))[0] == 200
    await asyncio.sleep(1.5)  # longer than a heartbeat interval: a live one would have added this replica again
    assert _replica_count(redis_server, "partner") == ":0"
    assert _replica_count(redis_server, "billing") == ":1"  # a limit still in service keeps its heartbeat
    data["listeners"][0]["routes"][1]["rate_limit"] = {"requests_per_second": 50, "burst": 50, "scope": "global",
                                                       "name": "partner"}
    assert await sidecar.apply(to_config(data))  # added again: it beats again
    assert (await get(client, url(sidecar)))[0] == 200
    await asyncio.sleep(0.3)
    assert _replica_count(redis_server, "partner") == ":1"


async def test_a_rejected_reload_leaves_no_heartbeat_for_the_limit_it_would_have_added(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    data = global_config(upstream, redis_server, requests_per_second=50, burst=50)
    sidecar = await sidecar_factory(data)
    assert (await get(client, url(sidecar)))[0] == 200
    store = sidecar.runtime.redis
    assert store is not None
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        rejected = copy.deepcopy(data)
        rejected["listeners"][0]["routes"].insert(0, _limited_route("extra", "/extra"))
        rejected["listeners"][0]["address"] = f"127.0.0.1:{blocker.getsockname()[1]}"  # busy: the reload fails
        assert not await asyncio.wait_for(sidecar.apply(to_config(rejected)), 10)
    assert sidecar.runtime.redis is store
    assert set(store.snapshot()["live_replicas"]) == {"partner"}
    await asyncio.sleep(1.5)
    assert _replica_count(redis_server, "extra") == ":0"
    assert _replica_count(redis_server, "partner") == ":1"


async def test_a_heartbeat_stopped_while_its_first_call_connects_ends(redis_server: RedisServer) -> None:  # noqa: F811
    """redis-py can swallow a cancellation that arrives while it connects: stopping must not hang on that."""
    config = to_config({**base_config("http://127.0.0.1:1"), "redis": {"url": redis_server.url, "timeout": "50ms"}})
    assert config.redis is not None
    for step in range(30):  # stopped 0 to 3 ms into the first call: some land while it connects
        store = RedisStore(config.redis, SystemClock(), random.Random(step))
        beat = store.replicas("partner").task
        assert beat is not None
        await asyncio.sleep(step / 10_000)
        await asyncio.wait_for(store.retain([]), 3)  # the limit went away
        assert beat.done() and store.snapshot()["live_replicas"] == {}
        other = RedisStore(config.redis, SystemClock(), random.Random(step))
        beat = other.replicas("partner").task
        assert beat is not None
        await asyncio.sleep(step / 10_000)
        await asyncio.wait_for(other.close(), 3)  # the store went away
        assert beat.done()
        await store.close()


async def test_a_runtime_build_that_fails_partway_leaves_no_spool_thread_and_no_heartbeat(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload whose runtime build raises after it made a spool, a Redis store and a global limit's
    heartbeat (on the new store and on the active one) leaves none of them running."""
    data = global_config(upstream, redis_server, requests_per_second=50, burst=50)
    sidecar = await sidecar_factory(data)
    assert (await get(client, url(sidecar)))[0] == 200
    active = sidecar.runtime.redis
    assert active is not None
    before = {t for t in threading.enumerate() if t.name == "outrigger-dead-letter"}
    real = app._build_route
    built: list[str] = []

    def fails_on_the_last_route(listener: Any, route: Any, *args: Any, **kwargs: Any) -> Any:
        built.append(route.name)
        if route.name == "last":
            raise RuntimeError("planted: the build fails here")
        return real(listener, route, *args, **kwargs)

    monkeypatch.setattr(app, "_build_route", fails_on_the_last_route)
    on_new_store = copy.deepcopy(data)
    on_new_store["redis"]["timeout"] = "60ms"  # a changed `redis:` block: the build makes a new store
    on_new_store["dead_letter"] = {"dir": str(tmp_path), "max_bytes": "64KiB"}  # and a new spool
    on_new_store["listeners"][0]["routes"][0:0] = [_limited_route("fresh", "/fresh"),
                                                   _limited_route("last", "/last")]
    assert not await asyncio.wait_for(sidecar.apply(to_config(on_new_store)), 10)
    assert built[-1] == "last" and "fresh" in built  # the failure came after a limit was built
    on_active_store = copy.deepcopy(data)  # the same `redis:`: the build's limits beat on the active store
    on_active_store["listeners"][0]["routes"][0:0] = [_limited_route("extra", "/extra"),
                                                      _limited_route("last", "/last")]
    assert not await asyncio.wait_for(sidecar.apply(to_config(on_active_store)), 10)
    assert sidecar.runtime.redis is active
    assert set(active.snapshot()["live_replicas"]) == {"partner"}
    assert {t for t in threading.enumerate() if t.name == "outrigger-dead-letter" and t.is_alive()} <= before
    await asyncio.sleep(1.5)  # longer than a heartbeat interval
    assert _replica_count(redis_server, "fresh") == ":0"
    assert _replica_count(redis_server, "extra") == ":0"
    assert _replica_count(redis_server, "partner") == ":1"
    monkeypatch.undo()
    assert (await get(client, url(sidecar)))[0] == 200  # still serving on the active config
