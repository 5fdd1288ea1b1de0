"""A body in flight between a socket and the one task that reads it.

Both ends of the request path have one: the app's request body at the edge
(``edge.bodies.IncomingBody``) and the upstream's response body
(``upstream.response.H1Response``).  A protocol's parser callbacks ``feed``
it, ``finish`` it or ``fail`` it; the reading task takes chunks with
``_next_chunk`` and waits on ``_waiter`` when there is none.  Crossing the
water marks calls the subclass's ``_pause``/``_resume``, which stop and restart
reading from its transport: a slow reader never makes the sidecar buffer more
than ``HIGH_WATER`` of one body.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final

__all__ = ["HIGH_WATER", "LOW_WATER", "BodyBuffer"]

HIGH_WATER: Final = 256 * 1024  # buffered body that pauses reading from the socket
LOW_WATER: Final = 64 * 1024  # ... and that resumes it


class BodyBuffer:
    __slots__ = ("_buffered", "_chunks", "_done", "_error", "_waiter")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._done = False  # the whole body arrived
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # --- fed by the protocol ---

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered > HIGH_WATER:
            self._pause()
        self._wake()

    def finish(self) -> None:
        self._done = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._done and self._error is None:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    @property
    def complete(self) -> bool:
        """Every byte of the body arrived (some may still be buffered here)."""
        return self._done and self._error is None

    # --- read by the one task ---

    def _next_chunk(self) -> bytes | None:
        """The next buffered piece, ``b""`` at the end, None when the reader must wait; raises the failure."""
        chunks = self._chunks
        if chunks:
            chunk = chunks.popleft()
            self._buffered -= len(chunk)
            if self._buffered < LOW_WATER:
                self._resume()
            return chunk
        if self._error is not None:
            raise self._error
        return b"" if self._done else None

    def _pause(self) -> None:
        """Stop reading from the socket (the buffer is past ``HIGH_WATER``)."""

    def _resume(self) -> None:
        """Read from the socket again (the buffer is under ``LOW_WATER``)."""
