"""A streamed request body as one attempt sends it: the buffered prefix, then the rest of the app's stream.

Made by ``proxy.chain.RequestBody.payload`` for bodies larger than the retry
buffer.  It runs once per chunk of a large upload, not per request, so it is
left interpreted (not in ``setup.py``'s ``COMPILED``); that also keeps it a
seam where the tests plant a broken upload.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.chain import RequestBody

__all__ = ["PrefixedStream"]


class PrefixedStream:
    """An iterator class: it began as an async generator in ``proxy.chain``, which mypyc cannot compile."""

    __slots__ = ("_body", "_prefix", "_stream")

    def __init__(self, body: RequestBody, stream: AsyncIterator[bytes]) -> None:
        self._body = body
        self._prefix = body.prefix
        self._stream = stream

    def __aiter__(self) -> PrefixedStream:
        return self

    async def __anext__(self) -> bytes:
        prefix = self._prefix
        if prefix:
            self._prefix = b""
            return prefix
        chunk = await self._stream.__anext__()  # StopAsyncIteration ends this stream too
        self._body.received += len(chunk)  # body bytes read from the app
        return chunk
