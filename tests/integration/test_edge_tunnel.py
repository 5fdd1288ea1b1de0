"""Upgrades are a transparent byte tunnel: the upstream's answer verbatim, then bytes both ways.

The upstream here switches protocols itself and echoes raw bytes, so what
the app receives is exactly what crossed the tunnel.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.lifecycle.sidecar import Sidecar
from tests.support.raw import RawUpstream, header
from tests.support.sidecar import base_config

Factory = Callable[..., Awaitable[Sidecar]]
SWITCH = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSet-Cookie: session=abc; Path=/\r\n"
          b"X-Custom: kept\r\n\r\n")
UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")


@pytest.fixture
async def echo_upstream() -> AsyncIterator[RawUpstream]:
    """Answers an upgrade with ``SWITCH``, then echoes every byte back."""
    server = RawUpstream()

    async def behaviour(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_head(reader)
        writer.write(SWITCH)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    server.behaviour = behaviour
    await server.start()
    yield server
    await server.stop()


def _config(url: str, **timeout: Any) -> dict[str, Any]:
    data = base_config(url)
    data["defaults"]["timeout"].update(timeout)
    return data


async def _open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(UPGRADE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    return reader, writer, head


async def test_the_upstreams_101_is_relayed_with_every_header(echo_upstream: RawUpstream,
                                                              sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(echo_upstream.url))
    _, writer, head = await _open(sidecar.port("main"))
    writer.close()
    assert head == SWITCH


async def test_the_handshake_reaches_the_upstream_as_sent_with_no_extension_negotiated_by_the_sidecar(
        echo_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(echo_upstream.url))
    _, writer, _ = await _open(sidecar.port("main"))
    writer.close()
    sent = echo_upstream.heads[0]
    assert sent.startswith(b"GET /chat HTTP/1.1\r\n")
    for name, value in ((b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                        (b"sec-websocket-extensions", b"permessage-deflate; client_max_window_bits")):
        assert header(sent, name) == value
    assert header(sent, b"x-request-id") is not None


async def test_bytes_of_any_size_flow_both_ways_with_backpressure(echo_upstream: RawUpstream,
                                                                  sidecar_factory: Factory) -> None:
    """8 MiB each way: no message size limit (aiohttp's relay closed at 4 MiB with 1009)."""
    sidecar = await sidecar_factory(_config(echo_upstream.url))
    reader, writer, _ = await _open(sidecar.port("main"))
    payload = bytes(range(256)) * (8 * 4096)

    async def send() -> None:
        for i in range(0, len(payload), 1 << 16):
            writer.write(payload[i:i + (1 << 16)])
            await writer.drain()

    sender = asyncio.ensure_future(send())
    echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 20)
    await sender
    writer.close()
    assert echoed == payload


async def test_tunnels_are_counted_and_a_silent_one_is_closed_after_timeout_idle(
        echo_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(_config(echo_upstream.url, idle="300ms"))
    reader, writer, _ = await _open(sidecar.port("main"))
    registry = sidecar.metrics.registry
    assert registry.get_sample_value("outrigger_tunnels_active") == 1
    assert registry.get_sample_value("outrigger_tunnels_total", {"route": "default"}) == 1
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 3) == b"ping"
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the idle timeout, not by the app
    writer.close()
    await asyncio.sleep(0.05)
    assert registry.get_sample_value("outrigger_tunnels_active") == 0
    assert registry.get_sample_value("outrigger_timeouts_total",
                                     {"route": "default", "upstream": "svc", "kind": "idle"}) == 1


async def test_drain_waits_for_an_open_tunnel(echo_upstream: RawUpstream, sidecar_factory: Factory) -> None:
    config = _config(echo_upstream.url)
    config["drain"] = {"grace": "0s", "timeout": "2s"}
    sidecar = await sidecar_factory(config)
    reader, writer, _ = await _open(sidecar.port("main"))
    drain = asyncio.ensure_future(sidecar.drain())
    await asyncio.sleep(0.3)
    writer.write(b"still here")  # the tunnel keeps working while the drain waits
    assert await asyncio.wait_for(reader.readexactly(10), 3) == b"still here"
    assert not drain.done()
    writer.close()  # the app ends its tunnel: the drain completes well before drain.timeout
    await asyncio.wait_for(drain, 1.5)
    # A tunnel the app closed is a completed request (101), not a cancelled one (499).
    assert sidecar.metrics.registry.get_sample_value("outrigger_requests_total", {
        "route": "default", "upstream": "svc", "method": "GET", "code": "1xx", "outcome": "upstream"}) == 1
