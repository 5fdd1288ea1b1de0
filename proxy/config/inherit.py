"""Inheritance of policy blocks: each upstream's and each route's effective blocks, as raw YAML.

Merged before conversion, so that a route's own keys keep their true paths in errors
and an inherited key is checked where it is written (``defaults...``).  The rules
(Envoy-style per-route overrides, stated once):

- upstream ``circuit_breaker`` and ``concurrency``: ``defaults`` < the upstream's block;
- route ``timeout``, ``retry``, ``circuit_breaker``, ``rate_limit``, ``fallback``:
  ``defaults`` < (``circuit_breaker`` only) the upstream's block < the route's keys;
- merged key by key, a mapping into a mapping; anything else (a list, a scalar) replaces;
- a route's ``null`` switches an inherited block off (meaningful for the optional
  ``rate_limit`` and ``fallback``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ROUTE_BLOCKS", "UPSTREAM_BLOCKS", "merge", "route_blocks", "upstream_blocks"]

ROUTE_BLOCKS = ("timeout", "retry", "circuit_breaker", "rate_limit", "fallback")
UPSTREAM_BLOCKS = ("circuit_breaker", "concurrency")


def merge(base: Any, override: Any) -> Any:
    """Key-by-key merge of raw YAML mappings; ``override`` wins on leaves."""
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base.get(key), value) if key in base else value
        return merged
    return override


def upstream_blocks(defaults_raw: dict[str, Any], upstream_raw: dict[str, Any]) -> dict[str, Any]:
    """The upstream's effective ``circuit_breaker`` and ``concurrency``: defaults < upstream."""
    return {block: merge(defaults_raw.get(block, {}), upstream_raw.get(block) or {}) for block in UPSTREAM_BLOCKS}


def route_blocks(route_raw: dict[str, Any], defaults_raw: dict[str, Any], upstream_raw: Any) -> dict[str, Any]:
    """The route as written, with its policy blocks replaced by their effective (merged) form.

    ``upstream_raw`` is the raw block of the upstream the route names (None when it
    names none); a block neither inherited nor written is left out, for its default.
    """
    merged = dict(route_raw)
    for block in ROUTE_BLOCKS:
        inherited = defaults_raw.get(block)
        if block == "circuit_breaker" and isinstance(upstream_raw, dict) and upstream_raw.get(block) is not None:
            inherited = merge(inherited or {}, upstream_raw[block])
        if block in route_raw:
            merged[block] = None if route_raw[block] is None else merge(inherited or {}, route_raw[block])
        elif inherited is not None:
            merged[block] = inherited
    return merged
