"""Circuit breaker transitions for operators: one log line each, and the recent ones for /status.

``proxy.app`` wires every breaker's transition callback here (beside its
metrics).  An opening is logged at WARNING with the reason and the counts
that tripped it; half-open and close at INFO.  The last ``MAX_RECENT``
transitions are kept (a small ring buffer) for ``/status`` and the status page.
"""

from __future__ import annotations

import collections
import logging
import time
from datetime import UTC, datetime
from typing import Any

from proxy.policies.breaker_state import BreakerState, CircuitBreaker

__all__ = ["MAX_RECENT", "BreakerEvents", "iso_time"]

log = logging.getLogger("outrigger.breaker")
MAX_RECENT = 50


def iso_time(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _open_reason(breaker: CircuitBreaker, old: BreakerState) -> tuple[str, dict[str, Any]]:
    """Why the breaker opened, and the counts behind it."""
    cfg = breaker.cfg
    snapshot = breaker.snapshot()
    counts: dict[str, Any] = {"consecutive_failures": breaker.consecutive_failures, "openings": snapshot["openings"]}
    if old is BreakerState.HALF_OPEN:
        return "a half-open probe failed", counts
    if breaker.consecutive_failures >= cfg.consecutive_failures:
        return f"{breaker.consecutive_failures} consecutive failures (threshold {cfg.consecutive_failures})", counts
    for key, label, threshold in (("failure_rate", "failures", cfg.failure_rate and cfg.failure_rate.threshold),
                                  ("slow_call", "slow", cfg.slow_call and cfg.slow_call.rate_threshold)):
        window = snapshot.get(key)
        if isinstance(window, dict) and threshold is not None and window["total"] and \
                window["rate"] >= threshold:
            counts[key] = {label: int(window[label]), "total": int(window["total"]), "rate": round(window["rate"], 3)}
            name = "failure rate" if key == "failure_rate" else "slow-call rate"
            return (f"{name} {window['rate']:.0%} over {int(window['total'])} calls "
                    f"(threshold {threshold:.0%})"), counts
    return "tripped", counts


class BreakerEvents:
    """Logs breaker transitions and remembers the last ``MAX_RECENT`` of them."""

    def __init__(self, max_recent: int = MAX_RECENT) -> None:
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_recent)

    def transition(self, label: str, breaker: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
        """Called by the breaker as it changes state; ``label`` is its metric label (upstream[/route])."""
        event: dict[str, Any] = {"time": iso_time(time.time()), "breaker": label, "from": old.value, "to": new.value}
        if new is BreakerState.OPEN:
            reason, counts = _open_reason(breaker, old)
            event["reason"] = reason
            event["open_for_s"] = round(breaker.retry_after(), 3)
            event.update(counts)
            log.warning("circuit breaker %s opened: %s; calls fail fast for %.1fs", label, reason,
                        event["open_for_s"], extra={"upstream": label, "details": event})
        elif new is BreakerState.HALF_OPEN:
            event["reason"] = "the open period ended; probes are let through"
            log.info("circuit breaker %s half-open: letting %d probe(s) through", label,
                     breaker.cfg.half_open_requests, extra={"upstream": label, "details": event})
        else:
            event["reason"] = f"{breaker.cfg.half_open_requests} probe(s) succeeded"
            log.info("circuit breaker %s closed: %s", label, event["reason"],
                     extra={"upstream": label, "details": event})
        self.recent.append(event)
