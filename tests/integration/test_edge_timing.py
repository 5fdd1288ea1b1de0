"""Timing that blames the right side: time spent waiting on the app is the app's.

A slow or stalled upload, broken body framing and an app that stops reading
are ended by the edge with errors of their own (``client_timeout``,
``bad_request``), never as ``upstream_timeout`` or a breaker failure, and
they free the bulkhead slot and the upstream connection.  Also: the
keep-alive idle timeout and the connection cap.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.lifecycle.sidecar import Sidecar
from tests.support.raw import RawUpstream, exchange, header
from tests.support.sidecar import base_config

Factory = Callable[..., Awaitable[Sidecar]]
GOOD = b"GET /good HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n"


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    server = RawUpstream()
    await server.start()
    yield server
    await server.stop()


def _config(url: str, *, attempts: int = 1, attempt: str = "5s", **limits: Any) -> dict[str, Any]:
    data = base_config(url, retry={"max_attempts": attempts, "buffer_limit": "64KiB"})
    data["defaults"]["timeout"].update(attempt=attempt)
    data["upstreams"]["svc"]["circuit_breaker"] = {"consecutive_failures": 2}
    data["limits"] = limits
    return data


def _breaker_state(sidecar: Sidecar) -> str:
    breaker = sidecar.runtime.upstreams["svc"].breaker
    assert breaker is not None
    return breaker.state.value


async def _answer(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 3)


async def test_slow_upload_is_client_timeout_never_upstream_timeout_nor_a_breaker_failure(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    """A steady 100 B/s upload against a 300 ms attempt timeout: the app is the slow side."""
    sidecar = await sidecar_factory(_config(raw_upstream.url, attempt="300ms"))

    async def slow_upload() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 400\r\n\r\n")
        sending = asyncio.ensure_future(_trickle(writer, 40))
        try:
            return await _answer(reader)
        finally:
            sending.cancel()
            writer.close()

    answers = await asyncio.gather(*(slow_upload() for _ in range(3)))
    for raw in answers:
        head = raw.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 408") and header(head, b"x-outrigger-error") == b"client_timeout"
    assert _breaker_state(sidecar) == "closed"
    assert (await exchange(sidecar.port("main"), GOOD)).startswith(b"HTTP/1.1 200")
    assert not sidecar.metrics.registry.get_sample_value(
        "outrigger_timeouts_total", {"route": "default", "upstream": "svc", "kind": "attempt"})


async def _trickle(writer: asyncio.StreamWriter, pieces: int) -> None:
    for _ in range(pieces):
        writer.write(b"x" * 10)
        await writer.drain()
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("attempts", [1, 3], ids=["streamed", "buffered-for-retry"])
async def test_stalled_upload_is_ended_by_client_idle_timeout(raw_upstream: RawUpstream, sidecar_factory: Factory,
                                                              attempts: int) -> None:
    sidecar = await sidecar_factory(_config(raw_upstream.url, attempts=attempts, client_idle_timeout="300ms"))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    started = time.monotonic()
    raw = await _answer(reader)
    writer.close()
    head = raw.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 408") and header(head, b"x-outrigger-error") == b"client_timeout"
    assert 0.25 <= time.monotonic() - started < 2.5
    assert _breaker_state(sidecar) == "closed"


@pytest.mark.parametrize("attempts", [1, 3], ids=["streamed", "buffered-for-retry"])
async def test_broken_chunked_framing_mid_body_is_an_immediate_400_and_the_connection_closes(
        raw_upstream: RawUpstream, sidecar_factory: Factory, attempts: int) -> None:
    async def answer_after_the_whole_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await raw_upstream.read_head(reader)
            if header(head, b"transfer-encoding") == b"chunked":
                await reader.readuntil(b"0\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    raw_upstream.behaviour = answer_after_the_whole_body
    sidecar = await sidecar_factory(_config(raw_upstream.url, attempts=attempts))

    async def broken_upload() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
        writer.write(b"POST /upload HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.1)
        started = time.monotonic()
        writer.write(b"zz\r\n")
        raw = await _answer(reader)  # read to EOF: the sidecar closed the connection
        writer.close()
        return raw, time.monotonic() - started

    for raw, took in await asyncio.gather(*(broken_upload() for _ in range(3))):
        head = raw.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 400") and header(head, b"x-outrigger-error") == b"bad_request"
        assert took < 2.0  # not held until a timeout (the attempt timeout here is 5s)
    assert _breaker_state(sidecar) == "closed"
    assert (await exchange(sidecar.port("main"), GOOD)).startswith(b"HTTP/1.1 200")


async def test_app_that_stops_reading_is_cut_by_client_idle_timeout_freeing_the_bulkhead_slot(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    size = 64 * 1024 * 1024

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await raw_upstream.read_head(reader)
        if head.startswith(b"GET /good "):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"b" * (1 << 20)
        for _ in range(size >> 20):
            writer.write(chunk)
            await writer.drain()

    raw_upstream.behaviour = behaviour
    config = _config(raw_upstream.url, client_idle_timeout="300ms")
    config["upstreams"]["svc"]["concurrency"] = {"max_active": 1, "max_pending": 0}
    sidecar = await sidecar_factory(config)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"GET /big HTTP/1.1\r\nHost: app\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)).startswith(b"HTTP/1.1 200")
    # ...and then the app reads nothing more.
    answer = b""
    for _ in range(40):
        await asyncio.sleep(0.1)
        answer = await exchange(sidecar.port("main"), GOOD)
        if answer.startswith(b"HTTP/1.1 200"):
            break
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]  # not 503 overflow: the slot was freed
    assert sidecar.metrics.registry.get_sample_value("outrigger_requests_total", {
        "route": "default", "upstream": "svc", "method": "GET", "code": "2xx", "outcome": "client_timeout"}) == 1


async def test_idle_keep_alive_connection_is_closed_after_keepalive_timeout(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(raw_upstream.url, keepalive_timeout="300ms"))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\nok"), 3)).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    assert 0.25 <= time.monotonic() - started < 2.0


async def test_connections_beyond_max_connections_are_closed_and_the_others_are_served(
        raw_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(raw_upstream.url, max_connections=2))
    port = sidecar.port("main")
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        got = await asyncio.wait_for(reader.read(), 2)
    except ConnectionResetError:
        got = b""  # reset: closed at once, before it could be read from
    assert got == b""
    writer.close()
    for held_reader, held_writer in held:
        held_writer.write(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n")
        assert (await asyncio.wait_for(held_reader.readuntil(b"\r\n\r\nok"), 3)).startswith(b"HTTP/1.1 200")
    held[0][1].close()
    await asyncio.sleep(0.1)
    assert (await exchange(port, GOOD)).startswith(b"HTTP/1.1 200")  # a freed place is taken again
    held[1][1].close()
