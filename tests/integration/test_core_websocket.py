"""WebSocket upgrades are proxied both ways: text, binary, ping/pong and close, with subprotocols."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from proxy.lifecycle.sidecar import Sidecar
from tests.support.ports import free_port
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream

Factory = Callable[..., Awaitable[Sidecar]]


@dataclass
class WsUpstream:
    url: str = ""
    received: list[tuple[WSMsgType, object]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    closed_with: list[int | None] = field(default_factory=list)


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    """Echoes text as ``echo:<text>`` and binary reversed; ``ping-me`` makes it ping, ``close-me`` close 4001."""
    state = WsUpstream()

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(status=404, text="not a websocket endpoint")
        state.headers.append(dict(request.headers))
        state.paths.append(request.path_qs)
        ws = web.WebSocketResponse(protocols=("chat.v2",), autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            state.received.append((msg.type, msg.data))
            if msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
            elif msg.type is WSMsgType.TEXT and msg.data == "ping-me":
                await ws.ping(b"from-upstream")
            elif msg.type is WSMsgType.TEXT and msg.data == "close-me":
                await ws.close(code=4001, message=b"bye")
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        state.closed_with.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    state.url = f"http://127.0.0.1:{server.port}"
    yield state
    await server.close()


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await asyncio.wait_for(ws.receive(), 3)


async def test_text_and_binary_frames_flow_both_ways(ws_upstream: WsUpstream, sidecar_factory: Factory,
                                                     client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(ws_upstream.url))
    async with client.ws_connect(f"ws://127.0.0.1:{sidecar.port('main')}/chat?room=1") as ws:
        await ws.send_str("hello")
        assert (await _receive(ws)).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01\x02")
        msg = await _receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x02\x01\x00")
    assert ws_upstream.paths == ["/chat?room=1"]
    assert ws_upstream.headers[0]["Host"] == ws_upstream.url.removeprefix("http://")
    assert "x-request-id" in {k.lower() for k in ws_upstream.headers[0]}


async def test_pings_and_pongs_are_relayed_in_both_directions(ws_upstream: WsUpstream, sidecar_factory: Factory,
                                                              client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(ws_upstream.url))
    async with client.ws_connect(f"ws://127.0.0.1:{sidecar.port('main')}/", autoping=False) as ws:
        await ws.ping(b"from-app")
        msg = await _receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"from-app")  # the upstream's answer, relayed back
        await ws.send_str("ping-me")
        msg = await _receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.PING, b"from-upstream")
        await ws.pong(msg.data)
        await ws.send_str("sync")
        assert (await _receive(ws)).data == "echo:sync"
    assert (WSMsgType.PING, b"from-app") in ws_upstream.received
    assert (WSMsgType.PONG, b"from-upstream") in ws_upstream.received


async def test_close_from_the_app_reaches_the_upstream_with_its_code(
        ws_upstream: WsUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(ws_upstream.url))
    ws = await client.ws_connect(f"ws://127.0.0.1:{sidecar.port('main')}/")
    await ws.send_str("x")
    await _receive(ws)
    await ws.close(code=4000, message=b"app done")
    for _ in range(50):
        if ws_upstream.closed_with:
            break
        await asyncio.sleep(0.02)
    assert ws_upstream.closed_with == [4000]


async def test_close_from_the_upstream_reaches_the_app_with_its_code_and_reason(
        ws_upstream: WsUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(ws_upstream.url))
    async with client.ws_connect(f"ws://127.0.0.1:{sidecar.port('main')}/") as ws:
        await ws.send_str("close-me")
        msg = await _receive(ws)
        assert msg.type is WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "bye")
        assert ws.closed or (await _receive(ws)).type is WSMsgType.CLOSED


async def test_subprotocol_chosen_by_the_upstream_is_returned_to_the_app(
        ws_upstream: WsUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(base_config(ws_upstream.url))
    async with client.ws_connect(f"ws://127.0.0.1:{sidecar.port('main')}/",
                                 protocols=("chat.v1", "chat.v2")) as ws:
        assert ws.protocol == "chat.v2"
    assert ws_upstream.headers[0]["Sec-WebSocket-Protocol"] == "chat.v1,chat.v2"


async def test_upgrade_to_an_unreachable_upstream_is_503_upstream_connect_failure(
        sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    port = free_port()  # nothing listens there
    sidecar = await sidecar_factory(base_config(f"http://127.0.0.1:{port}"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"ws://127.0.0.1:{sidecar.port('main')}/")
    assert info.value.status == 503
    assert info.value.headers is not None and info.value.headers["x-outrigger-error"] == "upstream_connect_failure"


async def test_upgrade_refused_by_the_upstream_is_relayed_with_its_status_headers_and_body(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    upstream.default = Reply(status=404, body=b"no websockets here", headers={"X-Why": "nope"})
    sidecar = await sidecar_factory(base_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    body = await reader.readexactly(len(b"no websockets here"))
    writer.close()
    assert head.startswith(b"HTTP/1.1 404 ")
    assert b"\r\nX-Why: nope\r\n" in head and b"x-outrigger-error" not in head.lower()
    assert body == b"no websockets here"
    assert len(upstream.requests) == 1


async def test_invalid_upgrade_from_the_app_gets_the_upstreams_own_refusal(
        ws_upstream: WsUpstream, sidecar_factory: Factory) -> None:
    """The edge does not judge the handshake: the upstream does, and its answer comes back as sent."""
    sidecar = await sidecar_factory(base_config(ws_upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"GET / HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 99\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert b"x-outrigger-error" not in head.lower()
    assert ws_upstream.headers[0]["Sec-WebSocket-Version"] == "99"
