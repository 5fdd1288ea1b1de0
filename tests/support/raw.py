"""Raw-socket helpers for edge tests: an upstream scripted in bytes, and an app client in bytes.

HTTP clients and servers normalise away exactly what the edge tests check
(framing, versions, odd methods, header bytes), so both sides are written as bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Behaviour = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    """An upstream whose connection handler is ``behaviour``; records every request head it reads."""

    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or self.answer_ok
        self.heads: list[bytes] = []
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.behaviour(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def answer_ok(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Every request (bodies by Content-Length) gets 200 ``ok``."""
        while True:
            head = await self.read_head(reader)
            length = header(head, b"content-length")
            if length:
                await reader.readexactly(int(length))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()


def header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


async def exchange(port: int, request: bytes, within_s: float = 5) -> bytes:
    """Write ``request`` and read until the sidecar closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within_s)
    finally:
        writer.close()


def responses(raw: bytes) -> list[tuple[bytes, bytes]]:
    """Split a stream of Content-Length-framed responses into (head, body) pairs."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        length = header(head + b"\r\n", b"content-length")
        interim = head.split(b" ", 2)[1].startswith(b"1")  # 1xx: a head only
        size = 0 if interim else int(length) if length else len(rest)
        out.append((head, rest[:size]))
        raw = rest[size:]
    return out
