"""The listener edge: where an app's HTTP/1.1 connection enters the sidecar.

One ``asyncio.Protocol`` per app connection (``protocol``) parses requests with
llhttp (httptools) and owns keep-alive, pipelining and flow control; each
request then runs ``exchange.serve``: route, body, the route's policy chain,
the streamed response and the request's telemetry.  Upgrades become byte
tunnels (``tunnel``).  ``listener`` holds what one listener's connections share.
"""

from proxy.edge.listener import EdgeContext, ListenerEdge, ListenerSlot

__all__ = ["EdgeContext", "ListenerEdge", "ListenerSlot"]
