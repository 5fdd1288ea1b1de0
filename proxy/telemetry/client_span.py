"""CLIENT span attributes and ending, per the stable OpenTelemetry HTTP semantic conventions.

Plain functions, compiled with the request path: ``tracing.Tracing.start_client_span``
starts each attempt's span with ``start`` (attributes from ``start_attributes``), and
``attempts.AttemptTelemetry`` ends it with ``end``.  Only called for a sampled request.  The attributes are
listed in docs/observability-spans.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from proxy.telemetry.lean_span import SpanFactory
from proxy.telemetry.propagation import TRACEPARENT, traceparent_of, with_parent_id
from proxy.telemetry.query import redact_query
from proxy.telemetry.server_span import method_attributes, span_name

if TYPE_CHECKING:
    from proxy.chain import ProxyRequest
    from proxy.upstream.call import UpstreamPool

__all__ = ["end", "start", "start_attributes"]


def start(spans: SpanFactory, request: ProxyRequest, route: str, pool: UpstreamPool, *, w3c: bool,
          propagator: TextMapPropagator | None, redact: frozenset[str]) -> Span:
    """A CLIENT span for one attempt of a sampled request, injected into that attempt's outgoing headers.

    ``propagator``: the SDK propagator that writes b3 headers too, None when b3 is not configured.
    """
    parent = request.span
    assert parent is not None
    endpoint = request.endpoint
    attributes = start_attributes(
        method=request.method, path=request.path, route=route, base=pool.base, host=pool.host, port=pool.port,
        upstream=pool.name, attempt=request.attempt, endpoint=endpoint.address if endpoint is not None else None,
        redact=redact)
    span = spans.start(span_name(request.method, None), parent.get_span_context(), SpanKind.CLIENT, attributes)
    headers = request.headers
    if w3c:  # the edge wrote the request's traceparent; each attempt names its own span as parent
        own = span.get_span_context()
        current = headers.get(TRACEPARENT)
        headers[TRACEPARENT] = with_parent_id(current, own.span_id) if current is not None else traceparent_of(own)
    if propagator is not None:
        propagator.inject(headers, context=trace.set_span_in_context(span))
    return span


def start_attributes(*, method: str, path: str, route: str, base: str, host: str, port: int, upstream: str,
                     attempt: int, endpoint: str | None, redact: frozenset[str]) -> dict[str, Any]:
    """One attempt's attributes at its start; ``path`` is the upstream target, ``base`` the upstream's URL base.

    ``endpoint`` is the ``host:port`` the attempt went to on a balanced upstream.
    """
    path, _, query = path.partition("?")
    attributes = method_attributes(method)
    # the query is kept with sensitive values redacted (telemetry.tracing.redact_query_params)
    attributes["url.full"] = base + path + ("?" + redact_query(query, redact) if query else "")
    attributes["server.address"] = host
    attributes["server.port"] = port
    attributes["network.protocol.version"] = "1.1"
    attributes["outrigger.route"] = route
    attributes["outrigger.upstream"] = upstream
    attributes["outrigger.attempt"] = attempt
    if attempt > 1:
        attributes["http.request.resend_count"] = attempt - 1
    if endpoint is not None:
        address, _, endpoint_port = endpoint.rpartition(":")
        attributes["network.peer.address"] = address.strip("[]")
        attributes["network.peer.port"] = int(endpoint_port)
        attributes["outrigger.endpoint"] = endpoint
    return attributes


def end(span: Span, status: int | None, error: BaseException | None, error_type: str | None = None,
        peer: tuple[str, int] | None = None, reused: bool | None = None) -> None:
    """End an attempt's span; ``error_type`` names an attempt cancelled without an error of its own.

    ``peer`` is the address the attempt's connection went to (``network.peer.*``), when it had one;
    ``reused`` whether that connection was kept alive from an earlier request.
    """
    attributes: dict[str, Any] = {}  # set at once
    if reused is not None:
        attributes["outrigger.connection_reused"] = reused
    if peer is not None:
        attributes["network.peer.address"] = peer[0]
        attributes["network.peer.port"] = peer[1]
    if error_type is not None:
        attributes["error.type"] = error_type
        span.set_status(Status(StatusCode.ERROR, error_type))
    if status is not None:
        attributes["http.response.status_code"] = status
        if status >= 400:  # semconv: 4xx and 5xx are errors on CLIENT spans
            attributes["error.type"] = str(status)
            span.set_status(Status(StatusCode.ERROR))
    if error is not None:
        code = getattr(error, "code", None)
        attributes["error.type"] = code if isinstance(code, str) and code else type(error).__name__
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.set_attributes(attributes)
    span.end()
