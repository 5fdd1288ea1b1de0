"""An upstream response as the chain and the edge see it, and the ways its body can fail.

``H1Response`` is the head (status, reason, headers) plus the body, streamed with
backpressure through ``proxy.streams.BodyBuffer``: its connection
(``proxy.upstream.connection``) feeds, finishes or fails it; the edge reads it.
It sees its connection only as a ``ResponseSource``.  Failures mid-body are the
``UpstreamBodyError`` subclasses, each carrying the public error code the edge
reports; failures before the head are typed ``ProxyError``s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from multidict import CIMultiDict

from proxy.chain import FieldList
from proxy.streams import BodyBuffer
from proxy.upstream.failures import (
    InvalidResponse,
    UploadFailed,
    UpstreamBodyError,
    UpstreamBodyProtocolError,
    UpstreamBodyTimeout,
)

__all__ = ["H1Response", "Informational", "InvalidResponse", "ResponseSource", "UploadFailed", "UpstreamBodyError",
           "UpstreamBodyProtocolError", "UpstreamBodyTimeout"]

# (status, reason, headers) of an interim 1xx response (103 Early Hints...), for the edge to forward.
Informational = Callable[[int, str, list[tuple[str, str]]], None]


class ResponseSource(Protocol):
    """What a response needs of the connection it came on."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    async def wait_idle(self, waiter: asyncio.Future[Any]) -> None: ...

    def response_released(self, body_read: bool) -> None: ...

    def close(self) -> None: ...


class H1Response(BodyBuffer):
    """Status, headers and a streamed body; ``release()`` or ``close()`` exactly once."""

    __slots__ = ("_conn", "fields", "reason", "sidecar_headers", "status")

    def __init__(self, conn: ResponseSource, status: int, reason: str, fields: FieldList) -> None:
        super().__init__()
        self._conn: ResponseSource | None = conn
        self.status = status
        self.reason = reason
        self.fields = fields  # as received; ``headers`` decodes them on first use
        # An x-outrigger-* field is among the headers (noted while parsing): only then does
        # strip_sidecar_headers need to walk them.
        self.sidecar_headers = False

    @property
    def headers(self) -> CIMultiDict[str]:
        return self.fields.decoded()

    @property
    def peer(self) -> tuple[str, int] | None:
        """(address, port) of the upstream this response came from, while its connection is held."""
        conn = self._conn
        transport = conn.transport if conn is not None else None
        peer = transport.get_extra_info("peername") if transport is not None else None
        return (str(peer[0]), int(peer[1])) if peer else None

    # --- flow control towards the upstream (the connection feeds, finishes or fails the body) ---

    def _pause(self) -> None:
        if self._conn is not None:
            self._conn.pause_reading()

    def _resume(self) -> None:
        if self._conn is not None:
            self._conn.resume_reading()

    # --- read by the edge ---

    def read_all_nowait(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        """The next piece of the body, ``b""`` at its end."""
        while (chunk := self._next_chunk()) is None:
            conn = self._conn
            if conn is None:
                raise UpstreamBodyError("response body read after the connection was closed")
            waiter = self._waiter = conn.loop.create_future()
            await conn.wait_idle(waiter)
        return chunk

    def release(self) -> None:
        """Done with the response: the connection goes back to the pool when the whole body arrived.

        Body bytes still buffered here are dropped (a retried response's body is never
        read): the connection itself is at a message boundary and stays reusable.
        """
        conn, self._conn = self._conn, None
        self._chunks.clear()
        if conn is not None:
            conn.response_released(self._done and self._error is None)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
