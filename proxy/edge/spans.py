"""The SERVER span of one app request: started before routing, ended with plain values.

The one place the edge touches the span, so its attributes can be rewired
(``proxy.telemetry``) without reading the edge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opentelemetry.trace import Status, StatusCode

from proxy.telemetry.tracing import Tracing

__all__ = ["end_server_span", "start_server_span"]


def start_server_span(tracing: Tracing | None, method: str, headers: Mapping[str, str]) -> Any:
    """The span (named ``METHOD``, renamed once routed), or None when not recording."""
    if tracing is None or tracing.tracer is None:
        return None
    return tracing.start_server_span(method, headers)


def end_server_span(span: Any, *, method: str, path: str, scheme: str, host: str | None, port: int,
                    client: str | None, user_agent: str | None, version: str, route: str | None,
                    upstream: str | None, status: int, outcome: str, attempts: int) -> None:
    host_name = (host or "").rpartition(":")[0] if (host or "").count(":") == 1 else (host or "")
    span.set_attributes({
        "http.request.method": method,
        "url.path": path,
        "url.full": f"{scheme}://{host or ''}{path}",
        "server.address": host_name,
        "server.port": port,
        "http.response.status_code": status,
        "outrigger.route": route or "",
        "outrigger.upstream": upstream or "",
        "outrigger.attempt": attempts,
    })
    if outcome != "upstream":
        span.set_attribute("error.type", outcome)
        span.set_status(Status(StatusCode.ERROR, outcome))
    elif status >= 500:
        span.set_attribute("error.type", str(status))
        span.set_status(Status(StatusCode.ERROR))
    span.end()
