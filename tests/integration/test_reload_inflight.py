"""Requests in flight across a reload finish under the config they started with, also when drain follows."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from typing import Any

import aiohttp

from tests.support.ports import free_port
from tests.support.sidecar import base_config, start_sidecar, to_config
from tests.support.upstream import ScriptedUpstream, Stream

# 20 chunks 0.1 s apart: a download that outlives a drain.timeout of 0.5 s several times over.
_LONG = Stream(chunks=20, chunk_size=1024, interval=0.1, content_length=True)
_SIZE = 20 * 1024


async def _download(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as resp:
        assert resp.status == 200
        return len(await resp.read())


async def test_drain_waits_for_a_download_on_a_listener_a_reload_moved(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    data["drain"] = {"grace": "0s", "timeout": "10s"}
    sidecar = await start_sidecar(data)
    upstream.script(_LONG)
    download = asyncio.ensure_future(_download(client, f"http://127.0.0.1:{sidecar.port('main')}/big"))
    await asyncio.sleep(0.3)  # under way on the old address
    moved = copy.deepcopy(data)
    moved["listeners"][0]["address"] = f"127.0.0.1:{free_port()}"
    assert await sidecar.apply(to_config(moved))
    await sidecar.drain()  # SIGTERM right after the move
    assert await download == _SIZE  # it was not cut when drain closed the current listeners


async def test_a_reload_that_replaces_an_upstream_pool_lets_its_long_stream_finish(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    data["drain"] = {"grace": "0s", "timeout": "0.5s"}
    sidecar = await start_sidecar(data)
    try:
        upstream.script(_LONG)
        download = asyncio.ensure_future(_download(client, f"http://127.0.0.1:{sidecar.port('main')}/big"))
        await asyncio.sleep(0.2)
        old_pool = sidecar.runtime.upstreams["svc"].pool
        changed = copy.deepcopy(data)
        changed["upstreams"]["svc"]["max_connections"] = 7  # a new pool; the old one is retired
        assert await sidecar.apply(to_config(changed))
        assert sidecar.runtime.upstreams["svc"].pool is not old_pool
        assert await download == _SIZE  # 2 s of streaming, well past drain.timeout
        for _ in range(50):  # and the retired pool closes once that request has ended
            if old_pool.h1._closed:
                break
            await asyncio.sleep(0.02)
        assert old_pool.h1._closed
    finally:
        await sidecar.stop()


async def test_shutdown_bounds_a_retired_pools_requests_by_drain_timeout(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    data["drain"] = {"grace": "0s", "timeout": "0.3s"}
    sidecar = await start_sidecar(data)
    upstream.script(Stream(chunks=100, chunk_size=1024, interval=0.1, content_length=True))
    download = asyncio.ensure_future(_download(client, f"http://127.0.0.1:{sidecar.port('main')}/big"))
    await asyncio.sleep(0.2)
    changed: dict[str, Any] = copy.deepcopy(data)
    changed["upstreams"]["svc"]["max_connections"] = 7
    assert await sidecar.apply(to_config(changed))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await sidecar.drain()
    assert loop.time() - started < 3.0  # bounded by drain.timeout, not by the 10 s stream
    with contextlib.suppress(aiohttp.ClientError, AssertionError):
        await download  # cut, as shutdown must
