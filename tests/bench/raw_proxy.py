"""The second Python reference: a pass-through on ``asyncio.Protocol`` + httptools (llhttp) + uvloop.

No policies, no telemetry, no streaming of big bodies: each app connection
gets one keep-alive connection to the one upstream, requests go over it one
at a time, and answers come back with their length.  It marks the ceiling of
what Python can do on this machine, the figure the issue compares Outrigger's
hot path against (goal: at least 0.55 of it).

    python -m tests.bench.raw_proxy --port 8002 --upstream 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from http import HTTPStatus

import httptools
import uvloop

REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade", b"proxy-connection"}


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; answers go back to the app connection in order."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.head: list[bytes] = []
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.head, self.body = [], []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP and name.lower() != b"content-length":
            self.head.append(name + b": " + value + b"\r\n")

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        body = b"".join(self.body)
        self.app.respond(b"HTTP/1.1 %d %s\r\n%scontent-length: %d\r\n\r\n%s"
                         % (status, REASONS.get(status, b"Unknown"), b"".join(self.head), len(body), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.upstream_lost()


class App(asyncio.Protocol):
    """One app connection: parse requests, forward each in turn over this connection's upstream."""

    transport: asyncio.Transport  # set in connection_made, before any callback that writes

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[bytes] = deque()  # requests parsed, not yet answered (pipelining)
        self.upstream: Upstream | None = None
        self.connecting = False
        self.url, self.head, self.body = b"", [b""], [b""]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.head, self.body = b"", [], []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP and name.lower() != b"content-length":
            self.head.append(name + b": " + value + b"\r\n")

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        method = self.parser.get_method()
        length = b"content-length: %d\r\n" % len(body) if body or method in (b"POST", b"PUT", b"PATCH") else b""
        self.pending.append(b"%s %s HTTP/1.1\r\n%s%s\r\n%s" % (method, self.url, b"".join(self.head), length, body))
        if len(self.pending) == 1:
            self.send_next()

    def send_next(self) -> None:
        if not self.pending:
            return
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.write(self.pending[0])
        elif not self.connecting:
            self.connecting = True
            asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, self.upstream = await loop.create_connection(lambda: Upstream(self), *self.target)
        except OSError:
            self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()
            return
        finally:
            self.connecting = False
        self.send_next()

    def respond(self, data: bytes) -> None:
        self.pending.popleft()
        self.transport.write(data)
        self.send_next()

    def upstream_lost(self) -> None:
        self.upstream = None
        if self.pending:  # closed under a request (keep-alive race): resend on a new one
            self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    target = (host or "127.0.0.1", int(port))

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: App(target), "127.0.0.1", args.port,
                                                                backlog=4096)
        await server.serve_forever()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
