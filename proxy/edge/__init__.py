"""The listener edge: where an app's HTTP/1.1 connection enters the sidecar.

One ``asyncio.Protocol`` per app connection (``protocol``) parses requests with
llhttp (httptools) and owns keep-alive, pipelining and flow control; each
request then runs ``exchange.serve``: route (``routing``), header rules
(``headers``), body (``bodies``), the route's policy chain, the streamed
response and the request's telemetry.  Upgrades become byte tunnels
(``tunnel``).  ``listener`` holds what one listener's connections share.

Import from the modules themselves: this package's ``__init__`` imports
nothing, so the upstream side can use ``edge.headers`` without loading the edge.
"""
