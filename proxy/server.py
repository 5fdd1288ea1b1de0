"""The edge: where an app request enters, is routed, runs its chain and streams back.

``EdgeHandler`` is the aiohttp low-level handler of every listener.  It is
the outermost layer of every request and the only place that turns a
``ProxyError`` (or an unexpected exception) into a response.  It owns the
per-request telemetry: the SERVER span, the request metrics and the access
log line.  Bodies (``proxy.bodies``) stream in both directions; only the bounded retry
buffer is ever held in memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy import errors
from proxy.bodies import NO_BODY, read_request_body, stream_response
from proxy.chain import ProxyRequest
from proxy.clock import Clock
from proxy.config import LimitsConfig
from proxy.headers import (
    ATTEMPTS_HEADER,
    REQUEST_ID_HEADER,
    connection_listed,
    new_request_id,
    parse_overrides,
    request_id,
    response_headers,
    upstream_headers,
)
from proxy.http_guard import GuardedServer
from proxy.logs import LogLimiter
from proxy.routing import Route, Router
from proxy.telemetry import server_span
from proxy.telemetry.access_log import AccessEntry, AccessLog
from proxy.telemetry.metrics import RouteMetrics
from proxy.telemetry.tracing import Tracing
from proxy.websocket import proxy_websocket

__all__ = ["EdgeContext", "EdgeHandler", "ListenerSlot"]

log = logging.getLogger("outrigger.server")
_limited = LogLimiter(log, interval_s=10.0)
# A '.' or '..' segment, with the dots or the separators percent-encoded or as backslashes
# (some upstreams decode %2F or treat '\' as '/', and would then walk up the tree).
_DOT_SEGMENT = re.compile(r"(?:^|/|\\|%2f|%5c)(?:\.|%2e){1,2}(?:$|/|\\|%2f|%5c)", re.IGNORECASE)


@dataclass(slots=True)
class ListenerSlot:
    """What a listener serves now; hot reload swaps ``router`` atomically."""

    name: str
    address: str
    router: Router
    limits: LimitsConfig


@dataclass(slots=True)
class EdgeContext:
    clock: Clock
    tracing: Tracing | None
    access_log: AccessLog | None
    unmatched: RouteMetrics
    # Set by the lifecycle when drain starts: every response then carries
    # ``Connection: close``, so that by the time the listeners close no app
    # connection sits idle in keep-alive, where a request racing the close
    # would be reset.
    draining: bool = False


class EdgeHandler:
    def __init__(self, slot: ListenerSlot, context: EdgeContext) -> None:
        self.slot = slot
        self._ctx = context
        self.inflight = 0

    def _resolve(self, request: web.BaseRequest) -> Route:
        method = request.method
        if method == "CONNECT":
            raise errors.MethodNotAllowed("CONNECT is not supported: Outrigger only forwards to configured upstreams")
        target = request.raw_path
        if not target.startswith("/"):
            raise errors.BadRequest("absolute-form or asterisk request targets are not accepted; "
                                    "send origin-form paths to the listener")
        path = target.partition("?")[0]
        if _DOT_SEGMENT.search(path):
            raise errors.BadRequest("request path must not contain '.' or '..' segments")
        route = self.slot.router.match(method, path, request.headers)
        if route is None:
            raise errors.NoRoute(f"no route of listener {self.slot.name} matches {method} {path[:200]}")
        return route

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        ctx = self._ctx
        start = ctx.clock.now()
        head_sent_at: float | None = None  # when the response head left; the duration metric ends there
        rid = request_id(request.headers)
        route: Route | None = None
        span = trace_headers = None
        status, outcome, attempts = 500, "internal", 0
        response: web.StreamResponse | None = None
        outgoing: ProxyRequest | None = None
        bytes_out = 0
        self.inflight += 1
        try:
            # Started before routing, so that requests refused here (no_route, bad_request) are
            # traced too and the app's trace goes on; named after the route once it is known.
            if ctx.tracing is not None:
                span, trace_headers = ctx.tracing.begin(request.headers, server_span.span_name(request.method, None),
                                                        functools.partial(self._span_start, request))
            route = self._resolve(request)
            route.metrics.inflight.inc()
            if request.headers.get("Upgrade", "").lower() == "websocket":
                status, outcome = 101, "upstream"
                return await proxy_websocket(request, route, rid)
            outgoing = await self._outgoing(request, route, rid, span)
            if trace_headers is not None:
                trace_headers.apply(outgoing.headers)  # the one traceparent (and tracestate) it sends
            proxied = await route.handler(outgoing)
            status, attempts = proxied.status, proxied.attempts
            outcome = proxied.error or "upstream"
            headers = response_headers(proxied.headers.items(), connection_listed(proxied.headers))
            headers[REQUEST_ID_HEADER] = rid
            headers[ATTEMPTS_HEADER] = str(proxied.attempts)
            streamed = await stream_response(
                request, proxied, headers, draining=ctx.draining, idle_timeouts=route.metrics.timeouts["idle"],
                rid=rid, clock=ctx.clock)
            response, bytes_out, head_sent_at = streamed.response, streamed.sent, streamed.head_sent_at
            if streamed.broken is not None:
                outcome = streamed.broken  # the status was already sent; the metric still shows the failure
            return response
        except errors.ProxyError as error:
            status, outcome, attempts = error.status, error.code, error.attempts
            if span is not None:
                span.add_event("proxy_error", {"outrigger.error": error.code})
            error_response = self._error_response(error, route, rid)
            bytes_out = len(error_response.body or b"")  # type: ignore[arg-type]
            return error_response
        except asyncio.CancelledError:
            status, outcome = 499, "client_closed"
            attempts = outgoing.attempt if outgoing is not None else 0  # the app left mid-attempt
            raise
        except Exception as exc:
            _limited.log(logging.ERROR, type(exc).__name__, f"internal error while proxying: {type(exc).__name__}",
                         exc_info=True, request_id=rid)  # a bug may hit every request: rate-limited per type
            internal = errors.Internal(f"internal error: {type(exc).__name__}")
            status, outcome = internal.status, internal.code
            return self._error_response(internal, route, rid)
        finally:
            self.inflight -= 1
            end = ctx.clock.now()
            elapsed = end - start
            metrics = route.metrics if route is not None else ctx.unmatched
            if route is not None:
                metrics.inflight.dec()
            exemplar = None
            path = request.raw_path.partition("?")[0]  # as sent: a decoded %3F must not pass for a query
            if span is not None:
                span_ctx = span.get_span_context()
                exemplar = {"trace_id": f"{span_ctx.trace_id:032x}"}
                server_span.finish(span, method=request.method, route_template=route.prefix if route else None,
                                   route=route.name if route else None, upstream=route.upstream if route else None,
                                   status=status, outcome=outcome, attempts=attempts)
            # From request received to response headers sent (a streamed body's time is not in it).
            metrics.request_done(request.method, status, outcome,
                                 (head_sent_at if head_sent_at is not None else end) - start, exemplar)
            if ctx.access_log is not None:
                ctx.access_log.record(AccessEntry(
                    request_id=rid,
                    trace_id=exemplar["trace_id"] if exemplar else None,
                    span_id=f"{span.get_span_context().span_id:016x}" if span is not None else None,
                    method=request.method,
                    path=path[:512],
                    route=route.name if route else None,
                    upstream=route.upstream if route else None,
                    status=status,
                    attempts=attempts,
                    duration_ms=round(elapsed * 1000, 3),
                    upstream_duration_ms=round(outgoing.upstream_s * 1000, 3) if outgoing is not None else None,
                    bytes_in=outgoing.body.received if outgoing is not None else request.content_length or 0,
                    bytes_out=bytes_out,
                    error=None if outcome == "upstream" else outcome,
                ))

    def refuse(self, error: errors.ProxyError) -> web.Response:
        """The response to a request refused before it could be parsed (see ``proxy.http_guard``)."""
        rid = new_request_id()  # the app's x-request-id, if any, was never parsed
        response = errors.to_response(error, route=None, upstream=None, request_id=rid)
        response.force_close()  # the connection's framing cannot be trusted after a parse error
        self.record_refusal(error.status, error.code, rid)
        return response

    def record_refusal(self, status: int, code: str, rid: str | None = None) -> None:
        """Metrics and access log for a request refused or cut off below the router."""
        ctx = self._ctx
        ctx.unmatched.request_done("_OTHER", status, code, 0.0)
        if ctx.access_log is not None:
            ctx.access_log.record(AccessEntry(request_id=rid, status=status, error=code))

    def _error_response(self, error: errors.ProxyError, route: Route | None, rid: str) -> web.Response:
        response = errors.to_response(error, route=route.name if route else None,
                                      upstream=route.upstream if route else None, request_id=rid)
        response.headers[ATTEMPTS_HEADER] = str(error.attempts)
        if self._ctx.draining:
            response.force_close()
        return response

    def _span_start(self, request: web.BaseRequest) -> dict[str, Any]:
        """The SERVER span's start attributes (called only for a sampled request)."""
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        sock = transport.get_extra_info("sockname") if transport is not None else None
        return server_span.start_attributes(
            method=request.method, raw_target=request.raw_path, scheme=request.scheme,
            host_header=request.headers.get("Host"), server_port=int(sock[1]) if sock else 0,
            client_address=str(peer[0]) if peer else None, client_port=int(peer[1]) if peer else None,
            user_agent=request.headers.get("User-Agent"), http_version=f"{request.version[0]}.{request.version[1]}",
            redact=self._ctx.tracing.redact if self._ctx.tracing is not None else frozenset())

    async def _outgoing(self, request: web.BaseRequest, route: Route, rid: str, span: Any) -> ProxyRequest:
        timeout_s, max_attempts = parse_overrides(request.headers)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        headers = upstream_headers(request.headers, client_ip=peer[0] if peer else None,
                                   host=request.headers.get("Host"), rid=rid)
        # The request's whole time budget: timeout.total, tightened by x-outrigger-timeout-ms.
        total = route.config.timeout.total if timeout_s is None else min(timeout_s, route.config.timeout.total)
        if request.body_exists:
            # Buffering the retry copy of the body is part of the request, so it spends the
            # same deadline; the chain's Deadline then gets only what is left.
            started = self._ctx.clock.now()
            try:
                async with asyncio.timeout(total):
                    body = await read_request_body(request, route.buffer_limit, self.slot.limits.max_body_bytes)
            except TimeoutError:
                route.metrics.timeouts["total"].inc()
                raise errors.DeadlineExceeded(
                    f"request body was not received within the total timeout of {total:g}s") from None
            total = max(0.0, total - (self._ctx.clock.now() - started))
        else:
            body = NO_BODY
        return ProxyRequest(request.method, route.upstream_path(request.raw_path), headers, body,
                            request_id=rid, max_attempts=max_attempts, timeout_override=total, span=span)


def build_server(handler: EdgeHandler, limits: LimitsConfig) -> web.Server:
    return GuardedServer(
        handler,
        limits,
        handler_cancellation=True,
        max_line_size=max(8190, int(limits.max_header_bytes)),
        max_field_size=int(limits.max_header_bytes),
        max_headers=limits.max_headers,
    )


