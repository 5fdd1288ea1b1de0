"""Bodies stream through the sidecar: bounded memory, no buffering, broken bodies stay broken."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.lifecycle.sidecar import Sidecar
from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream, Stream

MiB = 1024 * 1024
Factory = Callable[..., Awaitable[Sidecar]]


def _peak_rss(pid: int) -> int:
    """The process's high-water resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


@pytest.fixture
async def sidecar_process(tmp_path: Path, upstream: ScriptedUpstream) -> AsyncIterator[tuple[int, int]]:
    """``outrigger run`` as a subprocess in front of the in-process upstream: (listener port, pid)."""
    data = base_config(upstream.url, timeout={"attempt": "30s", "total": "60s"})
    sidecar = await SidecarProcess(data, directory=tmp_path).start(within_s=10)
    try:
        yield sidecar.port, sidecar.pid
    finally:
        assert await sidecar.stop(within_s=10) == 0


async def test_100_mib_upload_and_download_stream_through_with_bounded_peak_memory(
        sidecar_process: tuple[int, int], upstream: ScriptedUpstream) -> None:
    port, pid = sidecar_process
    url = f"http://127.0.0.1:{port}/big"
    size, chunk = 100 * MiB, b"u" * (256 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    async with aiohttp.ClientSession() as session:
        # Warm up so that one-time allocations are part of the baseline, not the growth.
        async with session.get(url) as resp:
            assert resp.status == 200
        baseline = _peak_rss(pid)
        upstream.script(Reply(body=b"stored"))
        async with session.post(url, data=body()) as resp:
            assert resp.status == 200 and await resp.read() == b"stored"
        assert upstream.requests[-1].body_size == size
        upstream.script(Stream(chunks=size // (64 * 1024), chunk_size=64 * 1024))
        received = 0
        async with session.get(url) as resp:
            assert resp.status == 200
            async for piece in resp.content.iter_any():
                received += len(piece)
        assert received == size
    growth = _peak_rss(pid) - baseline
    assert growth < 40 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB while 2 x 100 MiB streamed through"


# --- no buffering: the upstream only finishes after the client saw the first piece ---


@contextlib.asynccontextmanager
async def _gated_upstream(content_type: str, first: bytes, rest: bytes,
                          gate: asyncio.Event) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        await response.prepare(request)
        await response.write(first)
        await asyncio.wait_for(gate.wait(), 5)  # only the client seeing ``first`` releases the rest
        await response.write(rest)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        gate.set()
        await server.close()


@pytest.mark.parametrize(("content_type", "first", "rest"), [
    ("text/event-stream", b"id: 1\ndata: first\n\n", b"id: 2\ndata: second\n\n"),
    ("application/octet-stream", b"chunk-one;", b"chunk-two"),
], ids=["sse", "chunked"])
async def test_first_piece_reaches_the_client_before_the_upstream_finishes(
        sidecar_factory: Factory, client: aiohttp.ClientSession, content_type: str, first: bytes,
        rest: bytes) -> None:
    gate = asyncio.Event()
    async with _gated_upstream(content_type, first, rest, gate) as url:
        sidecar = await sidecar_factory(base_config(url))
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/events") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == content_type
            assert "Content-Length" not in resp.headers
            seen = b""
            while len(seen) < len(first):
                seen += await asyncio.wait_for(resp.content.readany(), 3)
            assert seen == first
            gate.set()
            assert await resp.read() == rest


async def test_streamed_response_keeps_the_upstream_content_length(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    upstream.script(Stream(chunks=16, chunk_size=64 * 1024, content_length=True))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/") as resp:
        assert resp.headers["Content-Length"] == str(16 * 64 * 1024)
        assert "Transfer-Encoding" not in resp.headers
        assert len(await resp.read()) == 16 * 64 * 1024


@pytest.mark.parametrize("content_length", [False, True], ids=["chunked", "content-length"])
async def test_upstream_dying_mid_body_aborts_the_client_connection(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession,
        content_length: bool) -> None:
    upstream.script(Stream(chunks=4, chunk_size=1024, interval=0.02, then="abort", content_length=content_length))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    upstream.script(Reply(body=b"after"))
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/") as resp:
        assert await resp.read() == b"after"


async def test_upstream_stalling_mid_body_aborts_the_client_after_the_idle_timeout(
        upstream: ScriptedUpstream, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    upstream.script(Stream(chunks=2, chunk_size=1024, then="stall"))
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"idle": "300ms"}))
    started = time.monotonic()
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/") as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert time.monotonic() - started < 3


# --- bodiless responses ---


async def test_head_response_has_headers_and_no_body_and_the_connection_stays_usable(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    upstream.script(Reply(body=b"twelve bytes", headers={"ETag": '"v1"'}), Reply(body=b"next"))
    sidecar = await sidecar_factory(base_config(upstream.url))
    url = f"http://127.0.0.1:{sidecar.port('main')}/doc"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.head(url) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == "12"
            assert resp.headers["ETag"] == '"v1"'
            assert await resp.read() == b""
        async with session.get(url) as resp:  # same keep-alive connection: no stray body bytes before it
            assert await resp.read() == b"next"
    assert [r.method for r in upstream.requests] == ["HEAD", "GET"]


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_status_is_relayed_and_the_connection_stays_usable(
        upstream: ScriptedUpstream, sidecar_factory: Factory, status: int) -> None:
    upstream.script(Reply(status=status, body=b"", headers={"ETag": '"v2"'}), Reply(body=b"next"))
    sidecar = await sidecar_factory(base_config(upstream.url))
    url = f"http://127.0.0.1:{sidecar.port('main')}/doc"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.get(url) as resp:
            assert resp.status == status
            assert resp.headers["ETag"] == '"v2"'
            assert await resp.read() == b""
        async with session.get(url) as resp:
            assert await resp.read() == b"next"


async def test_bodiless_status_over_raw_socket_has_no_body_bytes(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    upstream.script(Reply(status=204, body=b""))
    sidecar = await sidecar_factory(base_config(upstream.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port("main"))
    writer.write(b"GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 3)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 204")
    assert b"transfer-encoding" not in head.lower()
    assert body == b""
