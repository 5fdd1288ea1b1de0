"""The Redis client of the shared-state features: one per sidecar, used off the request path where it can be.

``RedisStore`` wraps redis-py's asyncio client (hiredis parses replies) with
what a sidecar needs of a dependency it must survive:

- every call is bounded by ``redis.timeout`` and by the caller's time left,
  so Redis can never hold a request past its deadline;
- a circuit breaker (3 consecutive failures, then a jittered back-off of
  0.5 s doubling to 10 s, one probe at a time) keeps an outage from costing
  every request a timeout; redis-py retries only a broken pooled connection, once;
- scripts are run with ``EVALSHA`` and loaded with ``SCRIPT LOAD`` on
  ``NOSCRIPT`` (redis-py's ``Script``), so a Redis restarted empty is fine;
- a heartbeat per limit name (``ZADD`` into a sorted set with a member TTL)
  gives the live replica count that ``on_store_error: local`` divides by; the
  last count is kept through an outage.  A reload that removes every limit of a
  name stops its heartbeat (``retain``).

Any failure surfaces as ``StoreUnavailable``; callers decide what it means.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import uuid
from collections.abc import Collection, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.clock import Clock
from proxy.config.types import CircuitBreakerConfig, OpenDurationConfig, RedisConfig
from proxy.config.units import Duration
from proxy.policies.breaker_state import BreakerState, CircuitBreaker
from proxy.store.base import KEY_PREFIX, StoreUnavailable
from proxy.store.gcra import GCRA_LUA, HEARTBEAT_LUA

__all__ = ["KEY_PREFIX", "RedisStore", "ReplicaCount", "StoreUnavailable"]

log = logging.getLogger("outrigger.store")
_BREAKER = CircuitBreakerConfig(consecutive_failures=3,
                                open_duration=OpenDurationConfig(min=Duration(0.5), max=Duration(10.0)))
_HEARTBEAT_S = 1.0  # how often each replica says it is alive
_MEMBER_TTL_S = 3.0  # a replica not heard from for this long is not counted
_SOCKET_BACKSTOP_S = 5.0  # redis-py's own read timeout, behind the per-call timeout


class ReplicaCount:
    """The live replicas sharing one limit name, as last counted by this sidecar's heartbeat."""

    __slots__ = ("key", "live", "retired", "task")

    def __init__(self, key: str) -> None:
        self.key = key
        self.live = 1  # this replica, until the first heartbeat answers
        self.task: asyncio.Task[None] | None = None
        self.retired = False  # no limit of this name is in service: its heartbeat never starts again


class RedisStore:
    def __init__(self, config: RedisConfig, clock: Clock, rng: random.Random) -> None:
        self.config = config
        self.timeout_s = float(config.timeout)
        self._clock = clock
        self._rng = rng
        self.breaker = CircuitBreaker(_BREAKER, clock, rng, self._on_transition)
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._client: aioredis.Redis | None = None
        self._gcra: AsyncScript | None = None
        self._heartbeat: AsyncScript | None = None
        self._extra: dict[str, AsyncScript] = {}
        self._replicas: dict[str, ReplicaCount] = {}
        self._closed = False

    # --- calls ---

    def _connect(self) -> aioredis.Redis:
        client = aioredis.Redis.from_url(
            self.config.url, socket_connect_timeout=self.timeout_s, socket_timeout=_SOCKET_BACKSTOP_S,
            # One immediate retry on a broken connection (a pooled one Redis closed when it restarted);
            # none on timeouts: the breaker decides what a slow Redis costs.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)), retry_on_timeout=False,
            health_check_interval=0,
            client_name="outrigger")
        self._gcra = client.register_script(GCRA_LUA)
        self._heartbeat = client.register_script(HEARTBEAT_LUA)
        self._client = client
        return client

    def script(self, lua: str) -> AsyncScript:
        """A script run with EVALSHA on this store's client (registered once per text)."""
        found = self._extra.get(lua)
        if found is None:
            client = self._client or self._connect()
            found = self._extra[lua] = client.register_script(lua)
        return found

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *,
                  budget_s: float | None = None) -> Any:
        """Run ``script`` within ``min(redis.timeout, budget_s)``; ``StoreUnavailable`` on any failure."""
        if self._closed:
            raise StoreUnavailable("the store is closed")
        timeout = self.timeout_s if budget_s is None else min(self.timeout_s, budget_s)
        if timeout <= 0:
            raise StoreUnavailable("no time left for a Redis call")
        ticket = self.breaker.try_acquire()
        if ticket is None:
            raise StoreUnavailable(f"Redis calls paused by the breaker for {self.breaker.retry_after():.1f}s")
        client = self._client or self._connect()
        started = self._clock.now()
        try:
            async with asyncio.timeout(timeout):
                result = await script(keys=list(keys), args=list(args), client=client)
        except asyncio.CancelledError:
            self.breaker.record_cancelled(ticket)
            raise
        except (RedisError, OSError, TimeoutError) as exc:
            self.breaker.record_failure(self._clock.now() - started, ticket)
            reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {type(exc).__name__}: {exc}"
            raise StoreUnavailable(f"Redis call {reason}") from exc
        self.breaker.record_success(self._clock.now() - started, ticket)
        return result

    async def lease(self, key: str, interval_us: float, burst: int, asked: int, *,
                    budget_s: float | None = None) -> tuple[int, int, int]:
        """Ask the GCRA at ``key`` for ``asked`` tokens: (granted, µs to one more, µs to full)."""
        if self._gcra is None:
            self._connect()
        assert self._gcra is not None
        granted, retry_us, full_us = await self.run(self._gcra, [key], [f"{interval_us:.3f}", burst, asked],
                                                    budget_s=budget_s)
        return int(granted), int(retry_us), int(full_us)

    # --- replicas ---

    def replicas(self, name: str) -> ReplicaCount:
        """The live count for ``name``; its heartbeat starts now (or with the first request if no loop runs)."""
        count = self._replicas.get(name)
        if count is None:
            count = self._replicas[name] = ReplicaCount(f"{KEY_PREFIX}replicas:{name}")
        self.ensure_heartbeat(count)
        return count

    def ensure_heartbeat(self, count: ReplicaCount) -> None:
        if count.task is not None or self._closed or count.retired:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        count.task = loop.create_task(self._beat(count))

    def _beat_ends(self, count: ReplicaCount) -> bool:
        return count.retired or self._closed

    async def _beat(self, count: ReplicaCount) -> None:
        ttl_ms = int(_MEMBER_TTL_S * 1000)
        # The flags end the loop, not only the cancellation: redis-py's asyncio client can swallow a
        # CancelledError that arrives while it connects (the call then returns its result).
        while not self._beat_ends(count):
            if self._heartbeat is None:
                self._connect()
            assert self._heartbeat is not None
            try:
                count.live = max(1, int(await self.run(self._heartbeat, [count.key], [self.replica_id, ttl_ms])))
            except StoreUnavailable:
                pass  # the last count stands through the outage
            except Exception:  # a bug must not end the heartbeat for the life of the process
                log.exception("replica heartbeat failed")
            if self._beat_ends(count):  # (a method: the flags change while the call above waits)
                return
            await asyncio.sleep(_HEARTBEAT_S * (0.9 + 0.2 * self._rng.random()))

    async def retain(self, names: Collection[str]) -> None:
        """Keep the heartbeats of ``names`` (the limits in service) and stop the others.

        A reload that removes every limit of a name calls this: that name's heartbeat stops and
        this replica leaves its set (a fast recount for the others).  A request still in flight
        on a removed limit cannot start it again; a limit of that name added later starts anew.
        """
        dropped = [self._replicas.pop(name) for name in list(self._replicas) if name not in names]
        for count in dropped:
            count.retired = True
        await self._stop_heartbeats(dropped)

    async def _stop_heartbeats(self, counts: Sequence[ReplicaCount]) -> None:
        """Cancel the heartbeats of ``counts`` and leave their replica sets (best effort, bounded)."""
        tasks = [count.task for count in counts if count.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:  # asyncio.wait, not `await task`: a cancellation of this caller must not be swallowed
            await asyncio.wait(tasks)
        if self._client is not None and counts:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                async with asyncio.timeout(self.timeout_s * 5):
                    for count in counts:
                        if self.breaker.state is BreakerState.CLOSED:
                            await self._client.zrem(count.key, self.replica_id)

    # --- lifecycle ---

    def _on_transition(self, old: BreakerState, new: BreakerState) -> None:
        if new is BreakerState.OPEN and old is BreakerState.CLOSED:
            log.warning("Redis at %s is failing; shared-state calls paused (on_store_error applies)",
                        _safe_url(self.config.url))
        elif new is BreakerState.CLOSED:
            log.info("Redis at %s answers again", _safe_url(self.config.url))

    def snapshot(self) -> dict[str, object]:
        return {"breaker": self.breaker.state.value,
                "live_replicas": {name: count.live for name, count in self._replicas.items()}}

    def abandon(self) -> None:
        """Stop a store that never went into service (a runtime build failed after making it), synchronously.

        Its heartbeat tasks were made on the loop but have not run yet (the build never yielded), so they
        are cancelled before they connect; none of them joined a replica set.
        """
        self._closed = True
        for count in self._replicas.values():
            if count.task is not None:
                count.task.cancel()

    async def close(self) -> None:
        """Stop the heartbeats, leave the replica sets (a fast recount for the others) and disconnect."""
        self._closed = True
        await self._stop_heartbeats(list(self._replicas.values()))
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self._client.aclose()


def _safe_url(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"
