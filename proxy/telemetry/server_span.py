"""SERVER span attributes, per the stable OpenTelemetry HTTP semantic conventions.

Plain functions over plain values, called by the edge (the listener) for the
span of one app request: ``start_attributes`` at span creation (so samplers
see method, path, scheme and server address), ``name`` once the route is
known, and ``finish`` when the response is done.  They are only called for
a request whose span is sampled; an unsampled request builds none of this.
The exact attributes are listed in docs/observability-spans.md.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from proxy.telemetry.labels import method_label
from proxy.telemetry.query import redact_query

__all__ = ["finish", "method_attributes", "span_name", "start_attributes"]


def method_attributes(method: str) -> dict[str, Any]:
    """``http.request.method``; a non-standard method is ``_OTHER`` plus the original."""
    label = method_label(method)
    if label == method:
        return {"http.request.method": method}
    return {"http.request.method": "_OTHER", "http.request.method_original": method}


def span_name(method: str, route_template: str | None) -> str:
    """``{method} {http.route}``, ``{method}`` before routing; ``HTTP`` stands for a non-standard method."""
    label = method_label(method)
    name = "HTTP" if label == "_OTHER" else method
    return f"{name} {route_template}" if route_template else name


def _host_and_port(host_header: str | None, server_port: int) -> tuple[str | None, int]:
    """``server.address``/``server.port`` from the Host header (the listener's port when it has none)."""
    if not host_header:
        return None, server_port
    host, port = host_header, ""
    if host.startswith("["):  # [v6]:port
        end = host.find("]")
        host, port = host[1:end] if end > 0 else host, host[end + 2:] if end > 0 else ""
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
    return host or None, int(port) if port.isascii() and port.isdigit() else server_port


def start_attributes(*, method: str, raw_target: str, scheme: str, host_header: str | None, server_port: int,
                     client_address: str | None, client_port: int | None, user_agent: str | None,
                     http_version: str, redact: frozenset[str]) -> dict[str, Any]:
    """The attributes a SERVER span carries from its creation.

    ``raw_target`` is the request target as sent (origin form); ``redact`` the
    lower-cased query parameter names whose values become ``REDACTED``.
    """
    path, _, query = raw_target.partition("?")
    attributes = method_attributes(method)
    attributes["url.scheme"] = scheme
    attributes["url.path"] = path
    if query:
        attributes["url.query"] = redact_query(query, redact)
    address, port = _host_and_port(host_header, server_port)
    if address:
        attributes["server.address"] = address
    attributes["server.port"] = port
    if client_address:
        attributes["client.address"] = client_address
        attributes["network.peer.address"] = client_address
        if client_port is not None:
            attributes["network.peer.port"] = client_port
    attributes["network.protocol.version"] = http_version
    if user_agent:
        attributes["user_agent.original"] = user_agent
    return attributes


def finish(span: Span, *, method: str, route_template: str | None, route: str | None, upstream: str | None,
           status: int, outcome: str, attempts: int) -> None:
    """Name the span after its route, add the end attributes and status, and end it.

    Status follows the convention for SERVER spans: ERROR for a 5xx, or for a
    request that failed without a response (the app left); a 4xx, Outrigger's
    own included (``no_route``, ``rate_limited``, ``bad_request``), leaves it unset.
    """
    if route_template is not None:
        span.update_name(span_name(method, route_template))
    attributes: dict[str, Any] = {
        "http.response.status_code": status,
        "outrigger.attempt": attempts,
    }
    if route_template is not None:
        attributes["http.route"] = route_template
    if route is not None:
        attributes["outrigger.route"] = route
    if upstream is not None:
        attributes["outrigger.upstream"] = upstream
    if outcome != "upstream":
        attributes["outrigger.outcome"] = outcome  # why Outrigger answered itself, whatever the status
    failed_without_response = outcome == "client_closed"
    if status >= 500 or failed_without_response:
        attributes["error.type"] = outcome if outcome != "upstream" else str(status)
    span.set_attributes(attributes)
    if status >= 500 or failed_without_response:
        span.set_status(Status(StatusCode.ERROR, None if outcome == "upstream" else outcome))
    span.end()
