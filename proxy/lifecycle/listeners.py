"""One bound listener: its listening socket and the ``ListenerEdge`` that serves its connections.

The sidecar binds them at start and a reload binds, moves and closes them (which ones is
``proxy.lifecycle.plan``'s call).  Closing happens in two steps: ``stop_accepting`` takes the
connections already queued in the kernel and serves them, then ``cleanup`` ends what is still
in flight once the drain (or the listener's last request) is over.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxy.config import LimitsConfig, parse_address
from proxy.edge.listener import EdgeContext, ListenerEdge, ListenerSlot
from proxy.edge.routing import Router

__all__ = ["CANCEL_WAIT_S", "Listener", "accept_queued", "bind_listener"]

# After drain.timeout, requests still in flight are cancelled and get this long to finish.
CANCEL_WAIT_S = 0.25


@dataclass(slots=True, eq=False)  # compared by identity: kept in a set while a reload retires it
class Listener:
    slot: ListenerSlot
    edge: ListenerEdge  # the protocol factory and what its connections share
    server: asyncio.Server

    @property
    def port(self) -> int:
        """The port it is bound to (the configured one, or the kernel's choice for port 0)."""
        return self.edge.port

    async def stop_accepting(self) -> None:
        """Close the listening socket without resetting the connections already queued on it."""
        queued = accept_queued(self.server.sockets)
        self.server.close()  # connections already open keep being served
        loop = asyncio.get_running_loop()
        for conn in queued:
            conn.setblocking(False)
            try:
                await loop.connect_accepted_socket(self.edge, conn)
            except OSError:  # the client already went away
                conn.close()

    async def cleanup(self) -> None:
        """Cancel what is still in flight (``CANCEL_WAIT_S`` to finish) and close every connection."""
        self.server.close()
        await self.edge.shutdown(CANCEL_WAIT_S)


async def bind_listener(name: str, address: str, limits: LimitsConfig, router: Router,
                        context: EdgeContext) -> Listener:
    """Bind one listener (OSError when the address cannot be bound; nothing is left open then)."""
    host, port = parse_address(address)
    slot = ListenerSlot(name, address, router, limits)
    edge = ListenerEdge(slot, context)
    server = await asyncio.get_running_loop().create_server(edge, host, port, reuse_address=True, backlog=1024)
    edge.port = _bound_port(server)
    return Listener(slot, edge, server)


def _bound_port(server: Any) -> int:
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else 0


def accept_queued(listening: Iterable[Any]) -> list[socket.socket]:
    """Take, without blocking, every connection waiting in these listening sockets' accept queues.

    The kernel completes handshakes on its own, so connections (their requests often
    already sent) wait in the accept queue until the loop next polls the socket; on a
    busy machine one loop turn can take hundreds of milliseconds, and closing the
    socket resets everything queued.  Called just before the close, so those
    connections can be served like any other.
    """
    queued: list[socket.socket] = []
    for sock in listening:
        # A duplicate of the descriptor: uvloop hands out sockets that cannot accept.
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:
            dup.setblocking(False)
            while True:
                try:
                    queued.append(dup.accept()[0])
                except OSError:  # BlockingIOError: the queue is empty
                    break
    return queued
