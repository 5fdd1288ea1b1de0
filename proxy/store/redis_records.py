"""Idempotency records in Redis (``store: redis``): one key per route and Idempotency-Key, shared by every replica.

The value is one string: ``L`` + fingerprint + owner token for a lock
(``PX`` = the lock TTL), or ``R`` + fingerprint + the msgpack'd response
(``PX`` = ``ttl``).  Each operation is one Lua script, so look-up-and-lock
and lock-to-response are atomic across replicas.  Failures surface as
``StoreUnavailable`` from ``RedisStore.run``; the policy then bypasses.
"""

from __future__ import annotations

import math

import msgspec

from proxy.store.base import StoreUnavailable
from proxy.store.records import Begin, StoredResponse
from proxy.store.redis import RedisStore

__all__ = ["RedisRecords"]

_FP = 64  # hex digits of a sha256 fingerprint

# KEYS[1]; ARGV: fingerprint, token, lock TTL (ms). -> {0} acquired, {1, response} replay,
# {2} conflict (another fingerprint), {3, lock ms left} in progress.
_BEGIN = """
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('SET', KEYS[1], 'L' .. ARGV[1] .. ARGV[2], 'PX', ARGV[3])
  return {0}
end
if string.sub(v, 2, 65) ~= ARGV[1] then return {2} end
if string.sub(v, 1, 1) == 'R' then return {1, string.sub(v, 66)} end
return {3, redis.call('PTTL', KEYS[1])}
"""

# KEYS[1]; ARGV: fingerprint .. token, response, TTL (ms). Only the lock's owner may fill it.
_COMPLETE = """
if redis.call('GET', KEYS[1]) ~= 'L' .. ARGV[1] then return 0 end
redis.call('SET', KEYS[1], 'R' .. string.sub(ARGV[1], 1, 64) .. ARGV[2], 'PX', ARGV[3])
return 1
"""

# KEYS[1]; ARGV: fingerprint .. token. Only the lock's owner may drop it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == 'L' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""

_decode = msgspec.msgpack.Decoder(StoredResponse).decode
_encode = msgspec.msgpack.Encoder().encode


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisRecords:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._begin = store.script(_BEGIN)
        self._complete = store.script(_COMPLETE)
        self._release = store.script(_RELEASE)

    async def begin(self, key: str, fingerprint: str, token: str, lock_ttl_s: float, budget_s: float) -> Begin:
        assert len(fingerprint) == _FP
        reply = await self.store.run(self._begin, [key], [fingerprint, token, _ms(lock_ttl_s)], budget_s=budget_s)
        state = int(reply[0])
        if state == 0:
            return Begin("acquired")
        if state == 1:
            try:
                return Begin("replay", _decode(reply[1]))
            except msgspec.DecodeError as exc:  # not written by this version: as good as unreachable
                raise StoreUnavailable(f"unreadable idempotency record: {exc}") from exc
        if state == 2:
            return Begin("conflict")
        return Begin("in_progress", lock_left_s=max(0.0, int(reply[1]) / 1000))

    async def complete(self, key: str, fingerprint: str, token: str, response: StoredResponse, ttl_s: float,
                       budget_s: float) -> bool:
        reply = await self.store.run(self._complete, [key], [fingerprint + token, _encode(response), _ms(ttl_s)],
                                     budget_s=budget_s)
        return bool(int(reply))

    async def release(self, key: str, fingerprint: str, token: str, budget_s: float) -> None:
        await self.store.run(self._release, [key], [fingerprint + token], budget_s=budget_s)
