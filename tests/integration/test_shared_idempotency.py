"""Idempotency-Key deduplication through real sidecars, on the local store and on a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import aiohttp
import pytest

from proxy.lifecycle.sidecar import Sidecar
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401  (fixture)
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream, Stream

REPLAY = "x-outrigger-idempotent-replay"


def config(upstream: ScriptedUpstream, redis: RedisServer | None = None, **idempotency: Any) -> dict[str, Any]:
    block = {"store": "redis" if redis is not None else "local", **idempotency}
    data = base_config(upstream.url, idempotency=block)
    if redis is not None:
        data["redis"] = {"url": redis.url, "timeout": "100ms"}
    return data


def url(sidecar: Sidecar, path: str = "/pay") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


async def post(client: aiohttp.ClientSession, target: str, key: str | None, body: bytes = b"{}"
               ) -> tuple[int, dict[str, str], bytes]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    async with client.post(target, data=body, headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def count(sidecar: Sidecar, result: str) -> float:
    return sidecar.metrics.registry.get_sample_value(
        "outrigger_idempotency_total", {"route": "default", "result": result}) or 0.0


@pytest.mark.parametrize("store", ["local", "redis"])
async def test_second_request_with_the_same_key_is_replayed_without_reaching_the_upstream(
        store: str, upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(201, b'{"charged": 1}', headers={"x-charge": "c1"}))
    sidecar = await sidecar_factory(config(upstream, redis_server if store == "redis" else None))
    first = await post(client, url(sidecar), "k-1", b'{"amount": 5}')
    second = await post(client, url(sidecar), "k-1", b'{"amount": 5}')
    assert len(upstream.requests) == 1
    assert first[0] == second[0] == 201 and first[2] == second[2] == b'{"charged": 1}'
    assert second[1]["x-charge"] == "c1" and second[1][REPLAY] == "true" and REPLAY not in first[1]
    assert count(sidecar, "stored") == 1 and count(sidecar, "replayed") == 1


async def test_duplicates_across_two_sidecars_reach_the_upstream_once(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(200, b"done", delay=0.2)
    one = await sidecar_factory(config(upstream, redis_server))
    two = await sidecar_factory(config(upstream, redis_server))
    first, concurrent = await asyncio.gather(post(client, url(one), "pay-7"), post(client, url(two), "pay-7"))
    late = await post(client, url(two), "pay-7")
    assert len(upstream.requests) == 1
    assert sorted([first[0], concurrent[0]]) == [200, 409]
    in_progress = first if first[0] == 409 else concurrent
    assert in_progress[1]["x-outrigger-error"] == "idempotency_in_progress" and in_progress[1]["Retry-After"] == "1"
    assert late[0] == 200 and late[1][REPLAY] == "true" and late[2] == b"done"


async def test_same_key_with_another_body_is_422(upstream: ScriptedUpstream, sidecar_factory: Any,
                                                 client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(config(upstream))
    assert (await post(client, url(sidecar), "k", b"a"))[0] == 200
    status, headers, _ = await post(client, url(sidecar), "k", b"b")
    assert status == 422 and headers["x-outrigger-error"] == "idempotency_key_reused"
    assert (await post(client, url(sidecar, "/other"), "k", b"a"))[0] == 422  # the path is in the fingerprint
    assert len(upstream.requests) == 1 and count(sidecar, "conflict") == 2


async def test_5xx_and_429_are_not_stored_so_a_retry_reaches_the_upstream(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503), Reply(429), Reply(200, b"third"))
    data = config(upstream)
    data["defaults"]["retry"]["max_attempts"] = 1
    sidecar = await sidecar_factory(data)
    assert [(await post(client, url(sidecar), "k"))[0] for _ in range(4)] == [503, 429, 200, 200]
    assert len(upstream.requests) == 3


async def test_response_larger_than_max_response_bytes_is_passed_on_whole_and_not_stored(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    upstream.script(Stream(chunks=8, chunk_size=1024, interval=0.01), Stream(chunks=8, chunk_size=1024))
    sidecar = await sidecar_factory(config(upstream, max_response_bytes="4KiB"))
    first = await post(client, url(sidecar), "big")
    second = await post(client, url(sidecar), "big")
    assert first[0] == second[0] == 200 and len(first[2]) == len(second[2]) == 8 * 1024
    assert len(upstream.requests) == 2 and count(sidecar, "bypassed") == 2


async def test_chunked_response_within_the_limit_is_stored(upstream: ScriptedUpstream, sidecar_factory: Any,
                                                           client: aiohttp.ClientSession) -> None:
    upstream.script(Stream(chunks=4, chunk_size=1000, interval=0.01))
    sidecar = await sidecar_factory(config(upstream, max_response_bytes="8KiB"))
    first = await post(client, url(sidecar), "chunked")
    second = await post(client, url(sidecar), "chunked")
    assert first[2] == second[2] == b"x" * 4000 and second[1][REPLAY] == "true"
    assert len(upstream.requests) == 1


async def test_store_unreachable_bypasses_and_never_answers_5xx(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(config(upstream, redis_server))
    redis_server.kill()
    assert [(await post(client, url(sidecar), "k"))[0] for _ in range(2)] == [200, 200]
    assert len(upstream.requests) == 2  # as without the block
    assert count(sidecar, "store_error") == 2


async def test_sigstopped_store_bypasses_within_the_redis_timeout(
        upstream: ScriptedUpstream, redis_server: RedisServer, sidecar_factory: Any,  # noqa: F811
        client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(config(upstream, redis_server))
    redis_server.pause()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert (await post(client, url(sidecar), "k"))[0] == 200
        assert loop.time() - started < 1.5  # the 100 ms Redis timeout, not a hang
        assert count(sidecar, "store_error") == 1
    finally:
        redis_server.resume()


async def test_lock_of_a_crashed_holder_expires(upstream: ScriptedUpstream, redis_server: RedisServer,  # noqa: F811
                                                sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    data = config(upstream, redis_server)
    data["defaults"]["timeout"] = {"connect": "1s", "attempt": "300ms", "total": "300ms", "idle": "1s"}
    sidecar = await sidecar_factory(data)
    # A lock as a holder that died mid-request leaves it (the fingerprint is the request's below).
    fingerprint = hashlib.sha256(b"POST\n/pay\n{}").hexdigest()
    assert redis_server.command("SET", "outrigger:idem:default:k", f"L{fingerprint}deadbeef", "PX", "1300") == "+OK"
    assert (await post(client, url(sidecar), "k"))[0] == 409
    await asyncio.sleep(1.4)
    assert (await post(client, url(sidecar), "k"))[0] == 200
    assert len(upstream.requests) == 1


async def test_requests_without_a_key_and_safe_methods_are_untouched(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(config(upstream))
    await post(client, url(sidecar), None)
    await post(client, url(sidecar), None)
    async with client.get(url(sidecar), headers={"Idempotency-Key": "g"}) as resp:
        assert resp.status == 200
    async with client.get(url(sidecar), headers={"Idempotency-Key": "g"}) as resp:
        assert REPLAY not in resp.headers
    assert len(upstream.requests) == 4
    assert sum(count(sidecar, r) for r in ("stored", "replayed", "bypassed", "store_error")) == 0
