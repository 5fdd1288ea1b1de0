"""What a route keeps between requests: the stateful policy objects a reload may carry over.

One typed field per stateful part of a route's chain.  ``proxy.app`` is the only
writer (it fills one ``RouteState`` as it builds the route); the readers are
``Runtime.status`` (``/status``) and the next reload's carry-over, which reuses
a part when its config block and the route's upstream did not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from proxy.policies.adaptive_timeout import AdaptiveTimeout
    from proxy.policies.breaker_state import CircuitBreaker
    from proxy.policies.global_rate_limit import GlobalRateLimit
    from proxy.policies.hedge import Hedge
    from proxy.policies.idempotency import Idempotency
    from proxy.policies.latency import LatencySketch
    from proxy.policies.rate_limit import RateLimit
    from proxy.policies.retry import Retry

__all__ = ["RouteState"]


@dataclass(slots=True)
class RouteState:
    rate_limit: RateLimit | GlobalRateLimit | None = None  # its tokens (and, global, its leases)
    retry: Retry | None = None  # its retry budget
    circuit_breaker: CircuitBreaker | None = None  # the breaker in the chain: the upstream's, or the route's own
    idempotency: Idempotency | None = None  # its local records or Redis store
    hedge: Hedge | None = None  # its extra-load allowance
    latency: LatencySketch | None = None  # what the adaptive timeout and hedge.delay: auto have learned
    adaptive_timeout: AdaptiveTimeout | None = None
