"""The shared limit's math: GCRA lease grants, as one Redis Lua script and its pure Python twin.

A global rate limit is one Redis key per limit (and per key value) holding
the GCRA's theoretical arrival time ``tat`` in microseconds of Redis
``TIME``, so replica clocks never matter.  With ``interval = 1 / rate`` a
lease request for ``n`` tokens at ``now`` gets::

    tat       = max(stored tat, now)
    available = floor((now + burst * interval - tat) / interval)
    granted   = min(n, available)            tat += granted * interval

The stored ``tat`` expires when the bucket would be full again, so an idle
limit costs no memory.  ``grant`` mirrors the script exactly; unit tests
check the math on fake time, integration tests check that the script
answers as ``grant`` does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

__all__ = ["GCRA_LUA", "HEARTBEAT_LUA", "Outcome", "grant"]

# KEYS[1]: the limit; ARGV: interval (µs per token), burst, tokens asked.
# Returns {granted, µs until one more token, µs until the bucket is full}.
# `tat` is written with %.3f: Lua would format a plain number with 14 significant digits,
# which is not enough for microseconds since the epoch.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local asked = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0) or 0
if tat < now then tat = now end
local span = burst * interval
local available = math.floor((now + span - tat) / interval + 1e-9)
if available < 0 then available = 0 end
local granted = math.min(asked, available)
tat = tat + granted * interval
if granted > 0 then
  redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
end
local retry = 0
if granted < asked then
  retry = tat + interval - span - now
  if retry < 0 then retry = 0 end
end
return {granted, math.ceil(retry), math.ceil(tat - now)}
"""

# KEYS[1]: the sorted set of a limit's live replicas; ARGV: this replica's id, member TTL (ms).
# Each heartbeat refreshes this replica's score (Redis TIME, ms), drops members not seen within
# the TTL and returns how many are left: the live replica count.
HEARTBEAT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
"""


class Outcome(NamedTuple):
    granted: int
    tat_us: float  # the new theoretical arrival time
    retry_after_us: int
    full_after_us: int


def grant(tat_us: float, now_us: float, interval_us: float, burst: int, asked: int) -> Outcome:
    """One lease request against the stored ``tat_us`` (0 when the key is absent), as ``GCRA_LUA``."""
    tat = max(tat_us, now_us)
    span = burst * interval_us
    available = max(0, math.floor((now_us + span - tat) / interval_us + 1e-9))
    granted = min(asked, available)
    tat += granted * interval_us
    retry = max(0.0, tat + interval_us - span - now_us) if granted < asked else 0.0
    return Outcome(granted, tat, math.ceil(retry), math.ceil(tat - now_us))
