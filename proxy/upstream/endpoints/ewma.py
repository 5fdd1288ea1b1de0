"""Peak-EWMA latency estimate of one endpoint, as linkerd2-proxy's balancer keeps it.

A sample slower than the estimate replaces it at once (the *peak*), faster
ones pull it down with an exponential decay over ``decay_s`` of real time,
so an endpoint that just turned slow is avoided immediately and earns its
way back gradually.  Between samples the estimate decays towards zero (as
tower's ``PeakEwma`` does), so an endpoint that got no traffic for a while,
a penalised one included, is tried again.  The balancer's cost is
``estimate x (pending + 1)``.
"""

from __future__ import annotations

import math

from proxy.clock import Clock

__all__ = ["DEFAULT_RTT_S", "FAILURE_PENALTY_S", "PeakEwma"]

DEFAULT_RTT_S = 0.030  # linkerd2-proxy's default before any sample
DECAY_S = 10.0  # linkerd2-proxy's default decay
# A fast failure (5xx, 429, connect error) is charged as this slow a response, so a failing
# endpoint does not attract traffic by answering quickly.
FAILURE_PENALTY_S = 1.0


class PeakEwma:
    __slots__ = ("_clock", "_decay_s", "_stamp", "estimate_s")

    def __init__(self, clock: Clock, *, default_s: float = DEFAULT_RTT_S, decay_s: float = DECAY_S) -> None:
        self._clock = clock
        self._decay_s = decay_s
        self.estimate_s = default_s
        self._stamp = clock.now()

    def observe(self, rtt_s: float) -> None:
        now = self._clock.now()
        if rtt_s >= self.estimate_s:
            self.estimate_s = rtt_s
        else:
            weight = math.exp(-max(0.0, now - self._stamp) / self._decay_s)
            self.estimate_s = self.estimate_s * weight + rtt_s * (1.0 - weight)
        self._stamp = now

    def penalise(self) -> None:
        self.observe(max(FAILURE_PENALTY_S, self.estimate_s))

    def current(self, now: float) -> float:
        """The estimate decayed towards zero for the time since the last sample."""
        return self.estimate_s * math.exp(-max(0.0, now - self._stamp) / self._decay_s)

    def cost(self, pending: int, now: float) -> float:
        return self.current(now) * (pending + 1)
