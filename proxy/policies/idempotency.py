"""Idempotency-Key deduplication (route ``idempotency:``), after the IETF httpapi "Idempotency-Key" draft.

Sits just inside the fallback and outside the rate limit, so a replay costs
no token and no upstream call.  For a request carrying ``Idempotency-Key``
(unsafe methods only) and a fingerprint of method, path and body:

- first use: a lock is taken (TTL = the route's total timeout + 1 s, so a
  crashed holder frees the key), the request goes on, and its final
  response (not a 5xx, 408 or 429, not an Outrigger error, at most
  ``max_response_bytes``) is stored for ``ttl``;
- same key and fingerprint later: the stored response, without reaching the
  upstream, with ``x-outrigger-idempotent-replay: true``;
- same key, another fingerprint: 422 ``idempotency_key_reused``;
- same key while the first is in flight (any replica): 409
  ``idempotency_in_progress`` with ``Retry-After``;
- store unreachable or slow: the request goes through as without the block
  (``store_error``); never a 5xx because of the store.

Capturing the body: responses are streamed by the edge, so to store one the
policy reads it here first, but only up to ``max_response_bytes``.  A body
that already arrived with the head (``complete``) or a ``Content-Length`` within the
limit is read whole, the upstream response released, and a buffered
``ProxyResponse`` handed on.  A body that turns out larger (chunked), breaks
off or outlives the deadline is not stored: what was read is handed on in
front of the rest of the stream (``_Prefixed``), so the app gets it all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import math
from typing import Any

from multidict import CIMultiDict

from proxy.chain import Handler, ProxyRequest, ProxyResponse, ResponseStream
from proxy.clock import Clock
from proxy.config import IdempotencyConfig
from proxy.errors import IdempotencyInProgress, IdempotencyKeyReused
from proxy.store.base import KEY_PREFIX, StoreUnavailable, store_key
from proxy.store.records import IdempotencyStore, StoredResponse, new_token
from proxy.telemetry.shared_state import IdempotencyMetrics

__all__ = ["REPLAY_HEADER", "Idempotency"]

REPLAY_HEADER = "x-outrigger-idempotent-replay"
KEY_HEADER = "Idempotency-Key"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # nothing to deduplicate
_NOT_STORED = frozenset({408, 429})  # "try again later" answers: a retry must reach the upstream
_FRAMING = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class _Prefixed:
    """The part of a body read while trying to capture it, then the rest of the upstream's stream."""

    __slots__ = ("_chunks", "_upstream", "reason")

    def __init__(self, upstream: ResponseStream, chunks: list[bytes]) -> None:
        self._upstream = upstream
        self._chunks = collections.deque(chunks)
        self.reason = upstream.reason

    @property
    def peer(self) -> tuple[str, int] | None:
        return self._upstream.peer

    @property
    def complete(self) -> bool:
        return self._upstream.complete

    def read_all_nowait(self) -> bytes:
        data = b"".join([*self._chunks, self._upstream.read_all_nowait()])
        self._chunks.clear()
        return data

    async def read(self) -> bytes:
        if self._chunks:
            return self._chunks.popleft()
        return await self._upstream.read()

    def release(self) -> None:
        self._upstream.release()

    def close(self) -> None:
        self._upstream.close()


class Idempotency:
    def __init__(self, config: IdempotencyConfig, route: str, store: IdempotencyStore, clock: Clock,
                 metrics: IdempotencyMetrics, *, lock_ttl_s: float) -> None:
        self.store = store
        self._config = config
        self._clock = clock
        self._metrics = metrics
        self._lock_ttl_s = lock_ttl_s
        self._max_bytes = int(config.max_response_bytes)
        self._prefix = f"{KEY_PREFIX}idem:{route}"
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        value = request.headers.get(KEY_HEADER)
        if value is None or request.method in _SAFE:
            return await call_next(request)
        if request.body.stream is not None:  # larger than the buffer: no fingerprint without holding it all
            self._metrics.count("bypassed")
            return await call_next(request)
        digest = hashlib.sha256(f"{request.method}\n{request.path}\n".encode("utf-8", "surrogateescape"))
        digest.update(request.body.data or b"")
        fingerprint = digest.hexdigest()
        key = store_key(self._prefix, value)
        token = new_token()
        started = self._clock.now()
        try:
            begin = await self.store.begin(key, fingerprint, token, self._lock_ttl_s, self._budget(request))
        except StoreUnavailable:
            self._metrics.count("store_error")
            return await call_next(self._spent(request, started))
        if begin.state == "replay":
            assert begin.response is not None
            self._metrics.count("replayed")
            request.event("idempotent_replay")
            return self._replay(begin.response)
        if begin.state == "conflict":
            self._metrics.count("conflict")
            raise IdempotencyKeyReused("this Idempotency-Key was used for a request with another method, path or body")
        if begin.state == "in_progress":
            self._metrics.count("in_progress")
            raise IdempotencyInProgress("a request with this Idempotency-Key is still in flight",
                                        retry_after=min(1.0, begin.lock_left_s))
        return await self._first(request, call_next, key, fingerprint, token, started)

    async def _first(self, request: ProxyRequest, call_next: Handler, key: str, fingerprint: str, token: str,
                     started: float) -> ProxyResponse:
        try:
            response = await call_next(self._spent(request, started))
        except BaseException:
            self._release_later(key, fingerprint, token)  # an error or a cancellation: nothing to store
            raise
        if response.status >= 500 or response.status in _NOT_STORED or response.error is not None:
            self._release_later(key, fingerprint, token)
            self._metrics.count("bypassed")
            return response
        response, stored = await self._capture(response, request)
        if stored is None:
            self._release_later(key, fingerprint, token)
            self._metrics.count("bypassed")
            return response
        try:
            await self.store.complete(key, fingerprint, token, stored, self._config.ttl,
                                      max(self._budget(request), 0.05))
        except StoreUnavailable:
            self._metrics.count("store_error")  # the lock expires by itself
            return response
        self._metrics.count("stored")
        return response

    async def _capture(self, response: ProxyResponse, request: ProxyRequest) -> tuple[ProxyResponse,
                                                                                          StoredResponse | None]:
        """The response to hand on, and what to store of it (None: too large, broken or too slow)."""
        headers = [(str(k), str(v)) for k, v in response.headers.items() if k.lower() not in _FRAMING]
        upstream = response.upstream
        if upstream is None:  # made by a policy below, body in hand
            return response, _stored(response.status, headers, response.body, self._max_bytes)
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._max_bytes:
            return response, None  # streamed as it comes
        chunks: list[bytes] = []
        size = 0
        if upstream.complete:
            chunks.append(upstream.read_all_nowait())
        else:
            left = request.deadline - self._clock.now()
            try:
                async with asyncio.timeout(left if math.isfinite(left) else None):
                    while chunk := await upstream.read():
                        chunks.append(chunk)
                        size += len(chunk)
                        if size > self._max_bytes:
                            break
            except asyncio.CancelledError:
                response.close()
                raise
            except Exception:  # broken or late (TimeoutError): the edge meets the same end of the stream
                return self._handed_on(response, chunks), None
            if size > self._max_bytes:
                return self._handed_on(response, chunks), None
        body = b"".join(chunks)
        stored = _stored(response.status, headers, body, self._max_bytes)
        buffered = ProxyResponse(response.status, CIMultiDict(headers), body=body)
        response.release()  # the whole body is here: connection and bulkhead slot go back now
        return buffered, stored

    @staticmethod
    def _handed_on(response: ProxyResponse, chunks: list[bytes]) -> ProxyResponse:
        assert response.upstream is not None
        # A ResponseStream like the upstream response it wraps: the edge streams it the same way.
        response.upstream = _Prefixed(response.upstream, chunks)
        return response

    @staticmethod
    def _replay(stored: StoredResponse) -> ProxyResponse:
        headers: CIMultiDict[str] = CIMultiDict(stored.headers)
        headers[REPLAY_HEADER] = "true"
        replay = ProxyResponse(stored.status, headers, body=stored.body)
        return replay

    def _budget(self, request: ProxyRequest) -> float:
        return math.inf if request.timeout_override is None else request.timeout_override

    def _spent(self, request: ProxyRequest, started: float) -> ProxyRequest:
        """The deadline inside gets what the store call left."""
        if request.timeout_override is not None:
            request.timeout_override = max(0.0, request.timeout_override - (self._clock.now() - started))
        return request

    def _release_later(self, key: str, fingerprint: str, token: str) -> None:
        """Drop our lock without holding up the response (or a cancellation); a failure leaves it to its TTL."""
        async def release() -> None:
            with contextlib.suppress(StoreUnavailable):
                await self.store.release(key, fingerprint, token, 1.0)
        task = asyncio.get_running_loop().create_task(release())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def snapshot(self) -> dict[str, Any]:
        return {"store": self._config.store, "ttl_s": self._config.ttl, "max_response_bytes": self._max_bytes}


def _stored(status: int, headers: list[tuple[str, str]], body: bytes, max_bytes: int) -> StoredResponse | None:
    return StoredResponse(status, headers, body) if len(body) <= max_bytes else None
