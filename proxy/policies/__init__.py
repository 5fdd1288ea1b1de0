"""Resilience policies, one module each, composed into a chain by ``proxy.app``.

Stateful cores (breaker, budget, token bucket, backoff, rolling windows) are
I/O-free and run on an injected clock; the policy classes wrap them around
``call_next``.
"""
