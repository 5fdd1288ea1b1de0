"""The total timeout through a real sidecar: waiting, backing off and uploading all end at the deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.support.sidecar import SidecarFactory, base_config
from tests.support.upstream import Reply, ScriptedUpstream


def url(sidecar: Any, path: str = "/r") -> str:
    return f"http://127.0.0.1:{sidecar.port('main')}{path}"


async def slow_body(chunks: int, size: int, interval: float) -> AsyncIterator[bytes]:
    for _ in range(chunks):
        yield b"u" * size
        await asyncio.sleep(interval)


async def test_deadline_ends_a_request_waiting_on_a_slow_upstream(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(200, delay=1.5)
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "200ms", "total": "300ms"}))
    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        body = await resp.json()
        assert resp.status == 504
        assert resp.headers["x-outrigger-error"] == "deadline_exceeded"
        assert resp.headers["x-outrigger-attempts"] == "2"  # one attempt timed out, the retry was cut
        assert body["error"] == "deadline_exceeded"
    # Upper bounds here sit well before the wrong outcome (the slow upstream's answer), not at
    # what a quiet machine takes, so a busy machine cannot fail them.
    assert 0.3 <= time.monotonic() - start < 1.0  # the upstream would answer at 1.5 s
    labels = {"route": "default", "upstream": "svc", "kind": "total"}
    assert sidecar.metrics.registry.get_sample_value("outrigger_timeouts_total", labels) == 1


async def test_deadline_cuts_the_attempt_that_follows_a_backoff(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503, headers={"Retry-After": "0.25"}), Reply(200, delay=1.5))
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "400ms", "total": "400ms"}))
    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 504
        assert resp.headers["x-outrigger-error"] == "deadline_exceeded"
    elapsed = time.monotonic() - start
    assert 0.4 <= elapsed < 1.0  # the second attempt's answer would come at 1.75 s
    assert len(upstream.requests) == 2


async def test_backoff_longer_than_the_deadline_is_never_slept(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(502), Reply(200))
    config = base_config(upstream.url, timeout={"attempt": "1s", "total": "1s"},
                         retry={"backoff": {"base": "1200ms", "max": "1200ms", "jitter": "none"}})
    sidecar = await sidecar_factory(config)
    start = time.monotonic()
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 502  # the last upstream answer, as it came
    assert time.monotonic() - start < 0.7  # sleeping would last until the 1 s deadline at least
    assert len(upstream.requests) == 1


async def test_deadline_ends_a_slow_streamed_upload(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                    client: aiohttp.ClientSession) -> None:
    """A body over buffer_limit streams through the chain, so the deadline covers its upload."""
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "400ms", "total": "400ms"},
                                                retry={"buffer_limit": "1KiB"}))
    start = time.monotonic()
    async with client.put(url(sidecar), data=slow_body(20, 4096, 0.1)) as resp:
        assert resp.status == 504
        assert resp.headers["x-outrigger-error"] == "deadline_exceeded"
    assert 0.4 <= time.monotonic() - start < 1.5  # the upload alone takes 2 s


async def test_deadline_ends_a_slow_buffered_upload(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                    client: aiohttp.ClientSession) -> None:
    """A small body is buffered for retries at the edge; reading it slowly must still hit the deadline."""
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "400ms", "total": "400ms"}))
    start = time.monotonic()
    async with client.put(url(sidecar), data=slow_body(10, 16, 0.2)) as resp:
        status, error = resp.status, resp.headers.get("x-outrigger-error")
    elapsed = time.monotonic() - start
    assert (status, error) == (504, "deadline_exceeded")
    assert elapsed < 1.5  # the upload alone takes 2 s


async def test_remaining_deadline_is_sent_upstream(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                   client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(503), Reply(200))
    config = base_config(upstream.url, timeout={"attempt": "1s", "total": "2s"},
                         retry={"backoff": {"base": "50ms", "max": "50ms", "jitter": "none"}})
    sidecar = await sidecar_factory(config)
    async with client.get(url(sidecar)) as resp:
        assert resp.status == 200
    first, second = (int(r.headers["x-outrigger-expected-timeout-ms"]) for r in upstream.requests)
    assert 1800 < first <= 2000
    assert second <= first - 50  # what is left after the first attempt and the backoff


async def test_timeout_override_tightens_the_deadline(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                      client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(200, delay=1.5)
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "1s", "total": "1s"}))
    start = time.monotonic()
    async with client.get(url(sidecar), headers={"x-outrigger-timeout-ms": "150"}) as resp:
        assert resp.status == 504
        assert resp.headers["x-outrigger-error"] == "deadline_exceeded"
    assert 0.15 <= time.monotonic() - start < 0.8  # the route's own deadline is 1 s
    assert int(upstream.requests[0].headers["x-outrigger-expected-timeout-ms"]) <= 150
    assert "x-outrigger-timeout-ms" not in upstream.requests[0].headers


async def test_timeout_override_never_loosens_the_deadline(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                           client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(200, delay=1.5)
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "250ms", "total": "250ms"}))
    start = time.monotonic()
    async with client.get(url(sidecar), headers={"x-outrigger-timeout-ms": "60000"}) as resp:
        assert resp.status == 504
    assert 0.25 <= time.monotonic() - start < 1.0  # loosened, it would wait for the 1.5 s answer
    assert int(upstream.requests[0].headers["x-outrigger-expected-timeout-ms"]) <= 250
    assert "x-outrigger-timeout-ms" not in upstream.requests[0].headers


async def test_max_attempts_override_tightens(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                              client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503)
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"max_attempts": 3}))
    async with client.get(url(sidecar), headers={"x-outrigger-max-attempts": "1"}) as resp:
        assert resp.status == 503
        assert resp.headers["x-outrigger-attempts"] == "1"
    assert len(upstream.requests) == 1
    assert "x-outrigger-max-attempts" not in upstream.requests[0].headers


async def test_max_attempts_override_never_loosens(upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
                                                   client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503)
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"max_attempts": 2}))
    async with client.get(url(sidecar), headers={"x-outrigger-max-attempts": "10"}) as resp:
        assert resp.headers["x-outrigger-attempts"] == "2"
    assert len(upstream.requests) == 2
    assert all("x-outrigger-max-attempts" not in r.headers for r in upstream.requests)


async def test_override_headers_cannot_enable_retries_on_a_route_without_them(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    upstream.default = Reply(503)
    sidecar = await sidecar_factory(base_config(upstream.url, retry={"max_attempts": 1}))
    async with client.get(url(sidecar), headers={"x-outrigger-max-attempts": "5"}) as resp:
        assert resp.status == 503
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(("header", "value"), [("x-outrigger-timeout-ms", "soon"),
                                               ("x-outrigger-max-attempts", "0")])
async def test_garbage_override_is_a_400(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory, client: aiohttp.ClientSession,
        header: str, value: str) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(url(sidecar), headers={header: value}) as resp:
        assert resp.status == 400
    assert upstream.requests == []


async def test_a_promised_body_that_never_arrives_ends_with_504_at_the_total_timeout(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory) -> None:
    """Found by the raw-request fuzzer: Content-Length: 5 and then silence must not hold the request open."""
    import asyncio
    import time

    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "300ms", "total": "500ms"}))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    elapsed = time.monotonic() - started
    writer.close()
    assert head.startswith(b"HTTP/1.1 504")
    assert b"x-outrigger-error: deadline_exceeded" in head.lower()
    assert 0.4 <= elapsed < 2.0
    assert upstream.requests == []
