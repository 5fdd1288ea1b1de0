"""Routing: map an app request to the first matching route of its listener.

Routes match in the order written: the first whose path prefix, methods and
headers all match wins.  A ``Route`` is the runtime form of a route: its
matcher, its prebuilt policy chain and the handles the edge needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from multidict import MultiMapping

from proxy.chain import Handler
from proxy.config import RouteConfig
from proxy.policies.route_state import RouteState
from proxy.telemetry.metrics import RouteMetrics
from proxy.upstream.call import UpstreamPool

__all__ = ["Route", "Router"]


@dataclass(slots=True, eq=False)
class Route:
    name: str
    listener: str
    config: RouteConfig
    pool: UpstreamPool
    handler: Handler
    metrics: RouteMetrics
    buffer_limit: int
    state: RouteState = field(default_factory=RouteState)  # stateful parts: for /status and reload carry-over
    prefix: str = "/"
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    rewrite_to: str | None = None
    upstream: str = ""

    def __post_init__(self) -> None:
        match = self.config.match
        self.prefix = match.path_prefix
        self.methods = frozenset(match.methods) if match.methods else None
        self.headers = tuple((name.lower(), value) for name, value in (match.headers or {}).items())
        self.rewrite_to = self.config.rewrite_prefix
        self.upstream = self.pool.name

    def matches(self, method: str, path: str, headers: MultiMapping[str]) -> bool:
        if not path.startswith(self.prefix):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return all(headers.get(name) == value for name, value in self.headers)

    def upstream_path(self, raw_path: str) -> str:
        """Apply ``rewrite_prefix`` to the raw path (query string kept)."""
        if self.rewrite_to is None:
            return raw_path
        rest = raw_path[len(self.prefix):]
        if self.rewrite_to.endswith("/") and rest.startswith("/"):
            rest = rest[1:]
        path = self.rewrite_to + rest
        return path if path.startswith("/") else "/" + path


class Router:
    __slots__ = ("routes",)

    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)

    def match(self, method: str, path: str, headers: MultiMapping[str]) -> Route | None:
        for route in self.routes:
            if route.matches(method, path, headers):
                return route
        return None
