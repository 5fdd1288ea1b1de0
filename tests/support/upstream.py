"""A real loopback aiohttp upstream that misbehaves on cue.

Tests queue actions (``Reply``, ``Reset``, ``Echo``, ``Stream``, ``Garbage``
...); each incoming request takes the next one, or ``default`` when the
queue is empty.  Every request is recorded with its headers and body size.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    status: int = 200
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # before response headers


@dataclass
class Reset:
    """Abort the connection before sending response headers."""

    delay: float = 0.0


@dataclass
class Echo:
    """200 with the request body streamed back."""


@dataclass
class Stream:
    """Stream ``chunks`` x ``chunk_size`` bytes, pausing ``interval`` between chunks, then end as ``then``."""

    chunks: int = 4
    chunk_size: int = 1024
    interval: float = 0.0
    then: str = "eof"  # eof | abort | stall
    status: int = 200
    content_length: bool = False


@dataclass
class Stall:
    """Never send response headers (until the test ends)."""


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body_size: int
    raw_headers: list[tuple[str, str]]


class ScriptedUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.actions: deque[Any] = deque()
        self.default: Any = Reply()
        self.requests: list[RecordedRequest] = []
        self.port = port
        self._runner: web.AppRunner | None = None
        self._stall = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def script(self, *actions: Any) -> None:
        self.actions.extend(actions)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        action = self.actions.popleft() if self.actions else self.default
        size = 0
        if isinstance(action, Echo):
            response = web.StreamResponse(status=200)
            if request.content_length is not None:
                response.content_length = request.content_length
            await response.prepare(request)
            async for chunk in request.content.iter_chunked(256 * 1024):
                size += len(chunk)
                await response.write(chunk)
            self._record(request, size)
            await response.write_eof()
            return response
        async for chunk in request.content.iter_chunked(256 * 1024):
            size += len(chunk)
        self._record(request, size)
        if isinstance(action, Reply):
            if action.delay:
                await asyncio.sleep(action.delay)
            return web.Response(status=action.status, body=action.body, headers=action.headers)
        if isinstance(action, Reset):
            if action.delay:
                await asyncio.sleep(action.delay)
            assert request.transport is not None
            sock = request.transport.get_extra_info("socket")
            if sock is not None:  # RST rather than FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            request.transport.abort()
            raise ConnectionResetError("scripted reset")
        if isinstance(action, Stall):
            await self._stall.wait()
            return web.Response(status=200)
        if isinstance(action, Stream):
            response = web.StreamResponse(status=action.status)
            if action.content_length:
                response.content_length = action.chunks * action.chunk_size + (1 if action.then != "eof" else 0)
            await response.prepare(request)
            chunk = b"x" * action.chunk_size
            for _ in range(action.chunks):
                await response.write(chunk)
                if action.interval:
                    await asyncio.sleep(action.interval)
            if action.then == "abort":
                assert request.transport is not None
                request.transport.abort()
                raise ConnectionResetError("scripted mid-body abort")
            if action.then == "stall":
                await self._stall.wait()
            await response.write_eof()
            return response
        raise AssertionError(f"unknown action {action!r}")

    def _record(self, request: web.Request, size: int) -> None:
        self.requests.append(RecordedRequest(
            request.method, request.path_qs, {k.lower(): v for k, v in request.headers.items()}, size,
            list(request.headers.items())))

    async def start(self) -> None:
        app = web.Application(client_max_size=2**40)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                    shutdown_timeout=0.05)  # a handler still sleeping at the end is cut
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self._stall.set()
        if self._runner is not None:
            await self._runner.cleanup()
