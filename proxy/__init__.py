"""Outrigger: a resilience sidecar for outbound HTTP calls."""

__version__ = "0.1.0"
