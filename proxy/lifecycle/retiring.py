"""What a reload replaced but requests still use: closed once their last request has ended.

A reload hands over listeners it moved or removed, upstream pools it replaced, the
previous Redis client and the dead-letter spool it replaced or removed; each finishes its
in-flight work under the config it started with and is closed in the background.  Drain
waits for them like for the active listeners, and stop closes whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from proxy.lifecycle.listeners import Listener

if TYPE_CHECKING:  # the spool is loaded only when the config has dead letters
    from proxy.deadletter.spool import Spool

__all__ = ["Closable", "Retiring", "Spawn", "close_quietly"]


class Closable(Protocol):
    async def close(self) -> None: ...


class _Pool(Closable, Protocol):
    @property
    def users(self) -> int: ...  # requests in flight that use the pool


async def close_quietly(resources: Iterable[Closable]) -> None:
    """Close each one; one that fails to close must not keep the others open."""
    for resource in resources:
        with contextlib.suppress(Exception):
            await resource.close()


Spawn = Callable[[Coroutine[Any, Any, Any]], None]  # runs a task the sidecar cancels at stop


class Retiring:
    def __init__(self, spawn: Spawn) -> None:
        self.listeners: set[Listener] = set()
        self.pools: set[_Pool] = set()
        self.spools: set[Spool] = set()
        self._spawn = spawn

    def listener(self, listener: Listener) -> None:
        """A listener that has stopped accepting: closed once its last request (or tunnel) has ended.

        Unbounded on purpose: in-flight requests finish under the config they started with;
        only shutdown (drain) bounds them by ``drain.timeout``.
        """
        self.listeners.add(listener)
        self._spawn(self._close_listener(listener))

    def retire_pools(self, pools: Iterable[_Pool]) -> None:
        """Pools a reload replaced: each closes when the last request that uses it has ended."""
        waiting = list(pools)
        self.pools.update(waiting)
        self._spawn(self._close_pools(waiting))

    def client(self, resource: Closable, after_s: float) -> None:
        """A shared-state client a reload replaced: closed after the requests that may use it had their time."""
        self._spawn(self._close_later(resource, after_s))

    def spool(self, spool: Spool, successor: Spool | None) -> None:
        """A dead-letter spool a reload replaced (by ``successor``) or removed: closed once no request
        that may spool into it is in flight; closing commits what it holds, then its thread ends.
        An entry that still comes its way after that goes to ``successor``."""
        spool.successor = successor
        self.spools.add(spool)
        self._spawn(self._close_spool_when_unused(spool))

    async def close_spools(self) -> None:
        """Close every retired spool now (at stop): what each holds is committed, its thread ends."""
        for spool in list(self.spools):
            await self._close_spool(spool)

    def pools_in_use(self) -> bool:
        return any(pool.users for pool in self.pools)

    async def _close_listener(self, listener: Listener) -> None:
        while listener.edge.inflight:  # noqa: ASYNC110 - polled only while a listener is leaving
            await asyncio.sleep(0.05)
        self.listeners.discard(listener)
        await listener.cleanup()

    async def _close_pools(self, waiting: list[_Pool]) -> None:
        while waiting:
            for pool in [pool for pool in waiting if not pool.users]:
                waiting.remove(pool)
                self.pools.discard(pool)
                await close_quietly([pool])
            if waiting:
                await asyncio.sleep(0.05)

    async def _close_spool_when_unused(self, spool: Spool) -> None:
        while spool.users:  # noqa: ASYNC110 - polled only while a spool is leaving
            await asyncio.sleep(0.05)
        await self._close_spool(spool)

    async def _close_spool(self, spool: Spool) -> None:
        spool.stop()  # on the loop, where entries are submitted: none can be queued behind the stop
        await asyncio.to_thread(spool.close)  # waits for the final commit and the thread's end
        self.spools.discard(spool)

    @staticmethod
    async def _close_later(resource: Closable, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await close_quietly([resource])
