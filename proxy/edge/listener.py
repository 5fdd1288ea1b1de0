"""What the connections of one listener share: its routes, limits, counters and the idle sweep.

``ListenerEdge`` is the protocol factory handed to ``loop.create_server``
(``proxy.lifecycle.sidecar``).  It keeps the set of open app connections (for the
connection cap, the keep-alive idle sweep and shutdown), the in-flight
request and tunnel counts the lifecycle waits on while draining, and the
metrics/access-log record of requests refused below the router.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.clock import Clock
from proxy.config import LimitsConfig
from proxy.edge.routing import Router
from proxy.telemetry.access_log import AccessEntry, AccessLog
from proxy.telemetry.metrics import RouteMetrics
from proxy.telemetry.tracing import Tracing

if TYPE_CHECKING:
    from proxy.edge.protocol import EdgeProtocol

__all__ = ["EdgeContext", "ListenerEdge", "ListenerSlot"]


@dataclass(slots=True)
class ListenerSlot:
    """What a listener serves now; hot reload swaps ``router`` (and ``limits``) atomically."""

    name: str
    address: str
    router: Router
    limits: LimitsConfig


@dataclass(slots=True)
class EdgeContext:
    clock: Clock
    tracing: Tracing | None
    access_log: AccessLog | None
    unmatched: RouteMetrics
    tunnels: TunnelMetrics | None = None
    # Set by the lifecycle when drain starts: every response then carries
    # ``Connection: close``, so that by the time the listeners close no app
    # connection sits idle in keep-alive, where a request racing the close
    # would be reset.
    draining: bool = False


class TunnelMetrics:
    """``outrigger_tunnels_active`` and ``outrigger_tunnels_total{route}`` (upgrades spliced)."""

    __slots__ = ("active", "total")

    def __init__(self, active: object, total: object) -> None:
        self.active = active
        self.total = total


class Limits:
    """``limits`` as plain numbers, recomputed when a reload swaps the block."""

    __slots__ = ("client_idle_s", "header_timeout_s", "keepalive_s", "max_body", "max_connections", "max_head",
                 "max_headers", "max_pipelined", "source")

    def __init__(self, limits: LimitsConfig) -> None:
        self.source = limits
        self.max_head = int(limits.max_header_bytes)
        self.max_headers = limits.max_headers
        self.max_body = int(limits.max_body_bytes) if limits.max_body_bytes is not None else None
        self.header_timeout_s = float(limits.header_read_timeout)
        self.keepalive_s = float(limits.keepalive_timeout)
        self.max_connections = limits.max_connections
        self.max_pipelined = limits.max_pipelined
        self.client_idle_s = float(limits.client_idle_timeout)


class ListenerEdge:
    """The protocol factory of one listener and the state its connections share."""

    def __init__(self, slot: ListenerSlot, context: EdgeContext) -> None:
        self.slot = slot
        self.ctx = context
        self.loop = asyncio.get_running_loop()
        self.connections: set[EdgeProtocol] = set()
        self.inflight = 0  # requests being served (read by /status and the drain)
        self.tunnels = 0  # upgrade tunnels open (the drain waits for them too)
        self.port = 0  # the bound port, set once bound (lifecycle.listeners; the SERVER span's server.port)
        self._limits = Limits(slot.limits)
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def limits(self) -> Limits:
        limits = self._limits
        if limits.source is not self.slot.limits:  # a reload swapped the block
            limits = self._limits = Limits(self.slot.limits)
        return limits

    def __call__(self) -> EdgeProtocol:
        from proxy.edge.protocol import EdgeProtocol
        return EdgeProtocol(self)

    # --- connections ---

    def opened(self, conn: EdgeProtocol) -> bool:
        """Admit a new connection (False: over ``limits.max_connections``, the caller closes it)."""
        if len(self.connections) >= self.limits.max_connections:
            return False
        self.connections.add(conn)
        if self._sweeper is None:
            self._arm_sweep()
        return True

    def closed(self, conn: EdgeProtocol) -> None:
        self.connections.discard(conn)

    def _arm_sweep(self) -> None:
        # One timer per listener closes idle keep-alive connections: nothing is armed per request.
        interval = min(1.0, max(0.05, self.limits.keepalive_s / 4))
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.limits.keepalive_s
        for conn in list(self.connections):
            conn.close_if_idle(deadline)
        if self.connections:
            self._arm_sweep()

    # --- refusals below the router ---

    def record_refusal(self, status: int, code: str, rid: str | None = None) -> None:
        """Metrics and access log for a request refused or cut off before it had a route."""
        ctx = self.ctx
        ctx.unmatched.request_done("_OTHER", status, code, 0.0)
        if ctx.access_log is not None:
            ctx.access_log.record(AccessEntry(request_id=rid, status=status, error=code))

    # --- shutdown ---

    async def shutdown(self, cancel_wait_s: float) -> None:
        """Cancel what is still in flight, give it ``cancel_wait_s`` to finish, close every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        tasks = [task for conn in list(self.connections) if (task := conn.cancel()) is not None]
        if tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), cancel_wait_s)
        for conn in list(self.connections):
            conn.abort()
        self.connections.clear()
