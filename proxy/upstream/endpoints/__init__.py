"""Endpoints of an upstream: discovery, per-request load balancing, outlier ejection, warm connections.

Used only by upstreams that list ``endpoints`` or turn ``discovery`` on; a
plain one-URL upstream keeps its single pool and pays for none of this.

- ``ewma``: Linkerd's peak-EWMA latency estimate (pure, on an injected clock).
- ``outlier``: per-endpoint failure tracking and the ejection rule (pure).
- ``balancer``: the pickers (p2c_ewma, least_request, round_robin) with slow start.
- ``endpoint_set``: the live set: one ``H1Pool`` per endpoint, diffing, draining, preconnect.
- ``discovery``: the resolver loop that feeds the set.
- ``policy``: ``Balance``, the chain step that picks an attempt's endpoint and reports its outcome.
"""
