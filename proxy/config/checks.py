"""Semantic checks across fields and sections, made on converted blocks once each is valid.

What one block can check alone sits in its ``__post_init__`` (``types.py``); what
needs two sections or the world outside (a route naming an upstream, two listeners on
one port, a TLS file that must load, a spool directory that must be writable) is
checked here.  Each check appends ``ConfigIssue``s at the path of the key to change;
``loader.py`` decides when each runs.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator
from typing import Any

import msgspec

from proxy.config.addresses import parse_address, same_socket, upstream_url_problem
from proxy.config.issues import ConfigIssue, path_key
from proxy.config.types import AdminConfig, DeadLetterConfig, ListenerConfig, RouteConfig, UpstreamConfig
from proxy.config.validators import is_header_name
from proxy.upstream.tls import client_context

__all__ = ["UNROUTED", "check_addresses", "check_dead_letter", "check_route", "check_route_names",
           "check_shared_state", "check_upstream", "dead_letter_dir_problem"]

UNROUTED = "none"  # the route (and upstream) label of requests no route matched


def _routes(listeners: list[ListenerConfig]) -> Iterator[tuple[str, RouteConfig]]:
    """Every route of ``listeners`` with its path (``listeners[0].routes[1]``)."""
    for li, listener in enumerate(listeners):
        for ri, route in enumerate(listener.routes):
            yield f"listeners[{li}].routes[{ri}]", route


def _check_address(address: str, path: str, issues: list[ConfigIssue], *, endpoint: bool = False) -> bool:
    """Whether ``address`` is a ``host:port`` (an endpoint's with a real port); else an issue at ``path``."""
    try:
        if parse_address(address)[1] == 0 and endpoint:
            raise ValueError(f"port 0 in {address!r}: an endpoint needs the port it listens on")
    except ValueError as exc:
        issues.append(ConfigIssue(path, str(exc)))
        return False
    return True


# --- upstreams ---


def check_upstream(upstream: UpstreamConfig, path: str, issues: list[ConfigIssue]) -> None:
    """The url, the TLS files (present, then loadable) and the endpoints of one upstream."""
    problem = upstream_url_problem(upstream.url)
    if problem:
        issues.append(ConfigIssue(f"{path}.url", problem))
    missing = False
    for key in ("ca_file", "cert_file", "key_file"):
        file = getattr(upstream.tls, key)
        if file is not None and not os.path.isfile(file):
            issues.append(ConfigIssue(f"{path}.tls.{key}", f"file not found: {file}"))
            missing = True
    if not missing:
        _check_tls_files(upstream, path, issues)
    _check_endpoints(upstream, path, issues)


def _check_endpoints(upstream: UpstreamConfig, path: str, issues: list[ConfigIssue]) -> None:
    """Static endpoint addresses, discovery nameservers and preconnect, each error at its own key."""
    if upstream.endpoints is not None:
        if not upstream.endpoints:
            issues.append(ConfigIssue(f"{path}.endpoints", "empty list; list at least one host:port or leave "
                                                            "endpoints out to use the url's host"))
        if upstream.discovery is not None:
            issues.append(ConfigIssue(f"{path}.discovery", "endpoints and discovery exclude each other: a static "
                                                            "list is never re-resolved"))
        for index, address in enumerate(upstream.endpoints):
            _check_address(address, f"{path}.endpoints[{index}]", issues, endpoint=True)
        if len(set(upstream.endpoints)) != len(upstream.endpoints):
            issues.append(ConfigIssue(f"{path}.endpoints", "lists the same address twice"))
    if upstream.discovery is not None:
        for index, address in enumerate(upstream.discovery.nameservers or ()):
            _check_address(address, f"{path}.discovery.nameservers[{index}]", issues)
    if upstream.preconnect > upstream.max_connections:
        issues.append(ConfigIssue(f"{path}.preconnect", f"{upstream.preconnect} is larger than max_connections "
                                                         f"({upstream.max_connections})"))


def _check_tls_files(upstream: UpstreamConfig, path: str, issues: list[ConfigIssue]) -> None:
    """Build the upstream's TLS context as its pool will, so that a bad file is an error here, with its path."""
    tls = upstream.tls
    if tls.ca_file is None and tls.cert_file is None:
        return  # nothing of the user's to load (building a context costs ~15 ms of system roots)
    if tls.ca_file is not None and tls.verify:
        try:
            client_context(msgspec.structs.replace(tls, cert_file=None, key_file=None))
        except (ssl.SSLError, OSError, ValueError) as exc:
            issues.append(ConfigIssue(f"{path}.tls.ca_file", f"not a PEM CA certificate file ({exc})"))
            return
    if tls.cert_file is None:
        return
    try:
        client_context(tls)
    except (ssl.SSLError, OSError, ValueError) as exc:
        issues.append(ConfigIssue(f"{path}.tls.cert_file",
                                  f"cert_file and key_file are not a matching PEM certificate and key ({exc})"))


# --- routes and listeners ---


def check_route(route: RouteConfig, route_raw: dict[str, Any], path: str, upstream_known: bool,
                issues: list[ConfigIssue]) -> None:
    """One route: its upstream exists, a breaker of its own is route-scoped, its prefix and header names."""
    if not upstream_known:
        issues.append(ConfigIssue(f"{path}.upstream", f"unknown upstream '{route.upstream}'"))
    breaker_raw = route_raw.get("circuit_breaker")  # as written: an inherited breaker is upstream-scoped
    if isinstance(breaker_raw, dict) and breaker_raw and breaker_raw.get("scope") != "route":
        issues.append(ConfigIssue(
            f"{path}.circuit_breaker",
            "per-route breaker settings need 'scope: route'; the upstream-scoped breaker is configured "
            "under defaults or upstreams.<name>.circuit_breaker"))
    if route.rewrite_prefix is not None and any(seg in ("..", ".") for seg in route.rewrite_prefix.split("/")):
        issues.append(ConfigIssue(f"{path}.rewrite_prefix", "must not contain '.' or '..' segments"))
    for name in (route.match.headers or {}):
        if not is_header_name(name):
            issues.append(ConfigIssue(f"{path}.match.headers.{path_key(name)}", "invalid header name"))


def check_addresses(listeners: list[tuple[int, ListenerConfig]], admin: AdminConfig | None,
                    issues: list[ConfigIssue]) -> None:
    """Listener names are unique; every address parses, and no two take the same port (admin first)."""
    seen: dict[str, str] = {}
    entries = [("admin.address", admin.address)] if admin else []
    entries += [(f"listeners[{i}].address", lst.address) for i, lst in listeners]
    names: set[str] = set()
    for i, lst in listeners:
        if lst.name in names:
            issues.append(ConfigIssue(f"listeners[{i}].name", f"duplicate listener name '{lst.name}'"))
        names.add(lst.name)
    for path, address in entries:
        if not _check_address(address, path, issues):
            continue
        clash = next((other for other_address, other in seen.items() if same_socket(address, other_address)), None)
        if clash is not None:
            issues.append(ConfigIssue(path, f"address {address} is already used by {clash}"))
        seen.setdefault(address, path)


def check_route_names(raw_listeners: Any, issues: list[ConfigIssue]) -> None:
    """Route names are the `route` label of every metric and span: unique across listeners, and
    never "none", the label of requests no route matched.  Checked on the names as written, so a
    route with other errors still takes part."""
    seen: dict[str, str] = {}
    for li, listener in enumerate(raw_listeners if isinstance(raw_listeners, list) else []):
        routes = listener.get("routes") if isinstance(listener, dict) else None
        for ri, route in enumerate(routes if isinstance(routes, list) else []):
            name = route.get("name") if isinstance(route, dict) else None
            if not isinstance(name, str):
                continue
            path = f"listeners[{li}].routes[{ri}]"
            if name == UNROUTED:
                issues.append(ConfigIssue(f"{path}.name", f"route name '{UNROUTED}' is reserved for requests "
                                                          "no route matched"))
            elif name in seen:
                where = seen[name]
                issues.append(ConfigIssue(f"{path}.name", f"duplicate route name '{name}'" + (
                    "" if where.startswith(f"listeners[{li}].") else
                    f" (also {where}; route names label metrics, so they are unique across listeners)")))
            seen.setdefault(name, path)


# --- what routes need from top-level sections ---


def check_shared_state(listeners: list[ListenerConfig], has_redis: bool, issues: list[ConfigIssue]) -> None:
    """What needs the shared store must have one; global limits use what they support."""
    for path, route in _routes(listeners):
        limit = route.rate_limit
        if limit is not None and limit.scope == "global":
            if not has_redis:
                issues.append(ConfigIssue(f"{path}.rate_limit.scope", "scope: global needs a top-level redis.url"))
            if limit.mode == "queue":
                issues.append(ConfigIssue(f"{path}.rate_limit.mode",
                                          "mode: queue is not supported with scope: global; use reject"))
        if route.idempotency is not None and route.idempotency.store == "redis" and not has_redis:
            issues.append(ConfigIssue(f"{path}.idempotency.store", "store: redis needs a top-level redis.url"))


def check_dead_letter(spool: DeadLetterConfig | None, written: bool, listeners: list[ListenerConfig],
                      issues: list[ConfigIssue]) -> None:
    """The spool's directory, checked by really writing there; routes that spool need a spool.

    ``written``: the file has a top-level ``dead_letter`` key; routes are then not checked
    against it (a broken one is reported at its own path, not again at every route).
    """
    if spool is not None:
        problem = dead_letter_dir_problem(spool.dir)
        if problem:
            issues.append(ConfigIssue("dead_letter.dir", problem))
    elif not written:
        for path, route in _routes(listeners):
            if route.dead_letter is not None:
                issues.append(ConfigIssue(f"{path}.dead_letter",
                                          "needs the top-level dead_letter.dir (the spool) to be configured"))


def dead_letter_dir_problem(directory: str) -> str | None:
    """Why the spool cannot live in ``directory`` (missing, not a directory, not writable), or None."""
    if not os.path.isdir(directory):
        return f"directory not found: {directory}" if not os.path.exists(directory) else \
            f"not a directory: {directory}"
    probe = os.path.join(directory, f".outrigger-probe-{os.getpid()}")
    try:  # os.access would say yes to root on a read-only mount: write for real
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"not writable: {directory} ({exc.strerror or exc})"
    return None
