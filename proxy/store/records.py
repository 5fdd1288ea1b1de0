"""Idempotency records: what the ``idempotency`` policy keeps per key, and the in-process store of them.

A record is either a *lock* (the first request with the key is in flight:
its fingerprint and an owner token, with a TTL so that a crashed holder
cannot block the key for ever) or a *response* (its fingerprint and the
stored response, kept for ``ttl``).  ``begin`` looks a key up and takes the
lock in one step; ``complete`` turns the owner's lock into the response;
``release`` drops the owner's lock when there is nothing to store.

``LocalRecords`` keeps them in this process (``store: local``, for one pod),
bounded in bytes; ``proxy.store.redis_records`` keeps them in Redis.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from typing import Literal, NamedTuple, Protocol

import msgspec

from proxy.clock import Clock

__all__ = ["Begin", "IdempotencyStore", "LocalRecords", "StoredResponse", "new_token"]


class StoredResponse(msgspec.Struct, array_like=True, frozen=True):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 64


class Begin(NamedTuple):
    state: Literal["acquired", "replay", "conflict", "in_progress"]
    response: StoredResponse | None = None  # for "replay"
    lock_left_s: float = 0.0  # for "in_progress": until the holder's lock expires


class IdempotencyStore(Protocol):
    async def begin(self, key: str, fingerprint: str, token: str, lock_ttl_s: float, budget_s: float) -> Begin: ...

    async def complete(self, key: str, fingerprint: str, token: str, response: StoredResponse, ttl_s: float,
                       budget_s: float) -> bool: ...

    async def release(self, key: str, fingerprint: str, token: str, budget_s: float) -> None: ...


def new_token() -> str:
    return uuid.uuid4().hex


class _Record:
    __slots__ = ("expires_at", "fingerprint", "response", "token")

    def __init__(self, fingerprint: str, token: str | None, response: StoredResponse | None,
                 expires_at: float) -> None:
        self.fingerprint = fingerprint
        self.token = token
        self.response = response
        self.expires_at = expires_at


class LocalRecords:
    """Records in this process: at most ``max_bytes`` of stored responses, the oldest dropped first."""

    def __init__(self, clock: Clock, *, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._clock = clock
        self._max_bytes = max_bytes
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._records)

    def _get(self, key: str) -> _Record | None:
        record = self._records.get(key)
        if record is not None and record.expires_at <= self._clock.now():
            self._drop(key)
            return None
        return record

    def _drop(self, key: str) -> None:
        record = self._records.pop(key, None)
        if record is not None and record.response is not None:
            self._bytes -= record.response.size()

    async def begin(self, key: str, fingerprint: str, token: str, lock_ttl_s: float, budget_s: float) -> Begin:
        record = self._get(key)
        now = self._clock.now()
        if record is None:
            self._records[key] = _Record(fingerprint, token, None, now + lock_ttl_s)
            return Begin("acquired")
        if record.fingerprint != fingerprint:
            return Begin("conflict")
        if record.response is not None:
            return Begin("replay", record.response)
        return Begin("in_progress", lock_left_s=record.expires_at - now)

    async def complete(self, key: str, fingerprint: str, token: str, response: StoredResponse, ttl_s: float,
                       budget_s: float) -> bool:
        record = self._get(key)
        if record is None or record.token != token:
            return False  # the lock expired (and may have been taken again): not ours to fill
        self._drop(key)
        self._records[key] = _Record(fingerprint, None, response, self._clock.now() + ttl_s)
        self._bytes += response.size()
        while self._bytes > self._max_bytes and self._records:
            self._drop(next(iter(self._records)))
        return True

    async def release(self, key: str, fingerprint: str, token: str, budget_s: float) -> None:
        record = self._get(key)
        if record is not None and record.token == token:
            self._drop(key)
