"""What the operator reads on stderr at startup and on every reload.

Pure functions building the details of two log lines: the startup summary
(config path, listener and admin addresses, upstreams, tracing) and a reload's
summary of what changed (listeners, routes, upstreams, policies).  The
lifecycle logs them; nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

from proxy.compiled import COMPILED, running_compiled
from proxy.config import Config, RouteConfig

__all__ = ["config_changes", "describe_changes", "startup_details"]

# Route blocks that are policies (the rest, match/upstream/rewrite, is routing).
_POLICY_BLOCKS = ("timeout", "retry", "circuit_breaker", "rate_limit", "fallback")


def startup_details(config: Config, *, config_path: str | None, admin_port: int,
                    listener_ports: dict[str, int], tracing: dict[str, Any]) -> dict[str, Any]:
    """The startup line's details: enough to see at a glance what this sidecar serves and where."""
    admin_host = config.admin.address.rpartition(":")[0]
    return {
        "config_path": config_path,
        "admin": f"{admin_host}:{admin_port}",
        "listeners": {lst.name: {"address": f"{lst.address.rpartition(':')[0]}:{listener_ports.get(lst.name, 0)}",
                                 "routes": [route.name for route in lst.routes]} for lst in config.listeners},
        "upstreams": {name: up.url for name, up in config.upstreams.items()},
        "tracing": tracing,
        # The request path's modules running compiled (setup.py); 0 on a pure-Python install.
        "compiled": {"modules": running_compiled(), "of": len(COMPILED)},
    }


def _routes(config: Config) -> dict[str, RouteConfig]:
    return {route.name: route for lst in config.listeners for route in lst.routes}


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(name for name in set(old) & set(new) if old[name] != new[name])
    return {key: names for key, names in (("added", added), ("removed", removed), ("changed", changed)) if names}


def config_changes(old: Config, new: Config) -> dict[str, Any]:
    """Listeners, routes, upstreams and policies added, removed or changed between two configs."""
    changes: dict[str, Any] = {}
    listeners = _diff({lst.name: (lst.address, tuple(r.name for r in lst.routes)) for lst in old.listeners},
                      {lst.name: (lst.address, tuple(r.name for r in lst.routes)) for lst in new.listeners})
    old_routes, new_routes = _routes(old), _routes(new)
    routes = _diff({name: (r.match, r.upstream, r.rewrite_prefix) for name, r in old_routes.items()},
                   {name: (r.match, r.upstream, r.rewrite_prefix) for name, r in new_routes.items()})
    routes.pop("changed", None)
    routing_changed = sorted(name for name in set(old_routes) & set(new_routes)
                             if (old_routes[name].match, old_routes[name].upstream, old_routes[name].rewrite_prefix)
                             != (new_routes[name].match, new_routes[name].upstream, new_routes[name].rewrite_prefix))
    if routing_changed:
        routes["changed"] = routing_changed
    policies = {
        name: [block for block in _POLICY_BLOCKS
               if getattr(old_routes[name], block) != getattr(new_routes[name], block)]
        for name in sorted(set(old_routes) & set(new_routes))
    }
    upstreams = _diff(dict(old.upstreams), dict(new.upstreams))
    for section, value in (("listeners", listeners), ("routes", routes), ("upstreams", upstreams)):
        if value:
            changes[section] = value
    policies = {name: blocks for name, blocks in policies.items() if blocks}
    if policies:
        changes["policies"] = policies
    for section in ("defaults", "drain", "limits"):
        if getattr(old, section) != getattr(new, section):
            changes.setdefault("other", []).append(section)
    return changes


def describe_changes(changes: dict[str, Any]) -> str:
    """One short line, e.g. ``routes added: b; upstreams changed: svc; policies: a (retry, timeout)``."""
    if not changes:
        return "nothing changed"
    parts = []
    for section in ("listeners", "routes", "upstreams"):
        for kind, names in changes.get(section, {}).items():
            parts.append(f"{section} {kind}: {', '.join(names)}")
    if "policies" in changes:
        parts.append("policies: " + ", ".join(f"{name} ({', '.join(blocks)})"
                                              for name, blocks in changes["policies"].items()))
    if "other" in changes:
        parts.append("also changed: " + ", ".join(changes["other"]))
    return "; ".join(parts)
