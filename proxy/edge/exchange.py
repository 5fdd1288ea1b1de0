"""One request's flow at the edge: route, body, the route's chain, the response, telemetry.

``serve`` is the outermost layer of every request and the only place that
turns a ``ProxyError`` (or an unexpected exception) into a response.  It owns
the per-request telemetry: the SERVER span (``proxy.telemetry.server_span``), the
request metrics and the access log line.  Upgrade requests go to
``proxy.edge.tunnel`` instead of the chain.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any, Final

from proxy import errors
from proxy.chain import ProxyRequest
from proxy.edge.bodies import NO_BODY, read_request_body, send_response
from proxy.edge.guard import origin_path
from proxy.edge.headers import HOST, parse_overrides, request_id, upstream_headers
from proxy.edge.responses import error_bytes
from proxy.edge.routing import Route
from proxy.edge.tunnel import open_tunnel
from proxy.logs import LogLimiter
from proxy.telemetry import server_span
from proxy.telemetry.access_log import AccessEntry
from proxy.telemetry.propagation import span_id_hex, trace_id_hex

if TYPE_CHECKING:
    from proxy.edge.protocol import EdgeProtocol
    from proxy.edge.request import EdgeRequest

__all__ = ["serve"]

log: Final = logging.getLogger("outrigger.server")
_limited: Final = LogLimiter(log, interval_s=10.0)


def _resolve(proto: EdgeProtocol, req: EdgeRequest) -> tuple[Route, str]:
    method = req.method
    if method == "CONNECT":
        raise errors.MethodNotAllowed("CONNECT is not supported: Outrigger only forwards to configured upstreams")
    target = origin_path(req.target)
    path = target.partition("?")[0]
    slot = proto.listener.slot
    route = slot.router.match(method, path, req.headers)
    if route is None:
        raise errors.NoRoute(f"no route of listener {slot.name} matches {method} {path[:200]}")
    return route, target


async def serve(proto: EdgeProtocol, req: EdgeRequest) -> bool:
    """Answer ``req``; whether the connection stays open for the next request."""
    listener = proto.listener
    ctx = listener.ctx
    clock = ctx.clock
    start = clock.now()
    head_sent_at: float | None = None  # when the response head left; the duration metric ends there
    rid = request_id(req.headers)
    route: Route | None = None
    status, outcome = 500, "internal"
    outgoing: ProxyRequest | None = None
    bytes_out = 0
    keep_alive = req.keep_alive and not ctx.draining
    listener.inflight += 1
    # Started before routing, so that requests refused here (no_route, bad_request) are
    # traced too and the app's trace goes on; named after the route once it is known.  The
    # trace headers the request sends upstream are decided here too, recorded or not.
    span = trace_headers = None
    if ctx.tracing is not None:
        span, trace_headers = ctx.tracing.begin(req.headers, server_span.span_name(req.method, None),
                                                functools.partial(_span_start, proto, req))
    try:
        route, target = _resolve(proto, req)
        route.metrics.inflight.inc()
        route.pool.users += 1  # a pool a reload retires closes only once this is back to 0
        if req.upgrade:
            tunnelled = await open_tunnel(proto, req, route, target, rid, keep_alive=keep_alive,
                                          trace_headers=trace_headers)
            status, bytes_out, head_sent_at, keep_alive = tunnelled
            outcome = "upstream"
            return keep_alive
        outgoing = await _outgoing(proto, req, route, target, rid, span)
        if trace_headers is not None:
            trace_headers.apply(outgoing.headers)  # the one traceparent (and tracestate) it sends
        proxied = await route.handler(outgoing)
        status = proxied.status
        outcome = proxied.error or "upstream"
        if req.body is not None and not req.body.complete:
            keep_alive = False  # answered before the app's body ended: its rest is not read
        sent = await send_response(proto, req, proxied, rid, outgoing.attempts_sent.count, keep_alive=keep_alive,
                                   idle_timeouts=route.metrics.timeouts["idle"])
        bytes_out, head_sent_at, keep_alive = sent.sent, sent.head_sent_at, sent.keep_alive
        if sent.broken is not None:
            outcome = sent.broken  # the status was already sent; the metric still shows the failure
        return keep_alive
    except errors.ProxyError as error:
        status, outcome = error.status, error.code
        if span is not None:
            span.add_event("proxy_error", {"outrigger.error": error.code})
        keep_alive = keep_alive and (req.body is None or req.body.complete) and not req.upgrade \
            and not isinstance(error, errors.BadRequest | errors.ClientTimeout)
        bytes_out = _send_error(proto, req, error, route, rid, keep_alive, outgoing)
        return keep_alive
    except asyncio.CancelledError:
        status, outcome = 499, "client_closed"
        raise
    except Exception as exc:
        _limited.log(logging.ERROR, type(exc).__name__, f"internal error while proxying: {type(exc).__name__}",
                     exc_info=True, request_id=rid)  # a bug may hit every request: rate-limited per type
        internal = errors.Internal(f"internal error: {type(exc).__name__}")
        status, outcome = internal.status, internal.code
        _send_error(proto, req, internal, route, rid, False, outgoing)
        return False
    finally:
        listener.inflight -= 1
        _record(proto, req, route, outgoing, span, start, head_sent_at, rid, status, outcome, bytes_out)


def _send_error(proto: EdgeProtocol, req: EdgeRequest, error: errors.ProxyError, route: Route | None, rid: str,
                keep_alive: bool, outgoing: ProxyRequest | None) -> int:
    reply = errors.to_response(error, route=route.name if route else None,
                               upstream=route.upstream if route else None, request_id=rid)
    attempts = outgoing.attempts_sent.count if outgoing is not None else 0
    proto.write(error_bytes(reply, attempts=attempts, keep_alive=keep_alive, http10=req.http10,
                            head_only=req.method == "HEAD"))
    return len(reply.body)


def _record(proto: EdgeProtocol, req: EdgeRequest, route: Route | None, outgoing: ProxyRequest | None, span: Any,
            start: float, head_sent_at: float | None, rid: str, status: int, outcome: str, bytes_out: int) -> None:
    """Metrics, span end and access log line of one request."""
    attempts = outgoing.attempts_sent.count if outgoing is not None else 0
    ctx = proto.listener.ctx
    end = ctx.clock.now()
    metrics = route.metrics if route is not None else ctx.unmatched
    if route is not None:
        metrics.inflight.dec()
        route.pool.users -= 1
    exemplar = None
    path = req.target.partition("?")[0]  # as sent: a decoded %3F must not pass for a query
    if span is not None:
        span_ctx = span.get_span_context()
        exemplar = {"trace_id": trace_id_hex(span_ctx.trace_id)}
        server_span.finish(span, method=req.method, route_template=route.prefix if route else None,
                           route=route.name if route else None, upstream=route.upstream if route else None,
                           status=status, outcome=outcome, attempts=attempts)
    # From request received to response headers sent (a streamed body's time is not in it).
    metrics.request_done(req.method, status, outcome, (head_sent_at if head_sent_at is not None else end) - start,
                         exemplar)
    if ctx.access_log is not None:
        ctx.access_log.record(AccessEntry(
            request_id=rid,
            trace_id=exemplar["trace_id"] if exemplar else None,
            span_id=span_id_hex(span.get_span_context().span_id) if span is not None else None,
            method=req.method,
            path=path[:512],
            route=route.name if route else None,
            upstream=route.upstream if route else None,
            endpoint=outgoing.endpoint.address if outgoing is not None and outgoing.endpoint is not None else None,
            status=status,
            attempts=attempts,
            duration_ms=round((end - start) * 1e6) / 1000,  # µs resolution; round(x, 3) costs 3x
            upstream_duration_ms=round(outgoing.upstream_s * 1e6) / 1000 if outgoing is not None else None,
            bytes_in=outgoing.body.received if outgoing is not None else (
                req.body.received if req.body is not None else 0),
            bytes_out=bytes_out,
            error=None if outcome == "upstream" else outcome,
        ))


def _span_start(proto: EdgeProtocol, req: EdgeRequest) -> dict[str, Any]:
    """The SERVER span's start attributes (called only for a sampled request)."""
    tracing = proto.listener.ctx.tracing
    return server_span.start_attributes(
        method=req.method, raw_target=origin_path(req.target), scheme="http", host_header=req.headers.get("Host"),
        server_port=proto.listener.port, client_address=proto.client_ip, client_port=proto.client_port,
        user_agent=req.headers.get("User-Agent"),
        http_version="1.0" if req.http10 else "1.1", redact=tracing.redact if tracing is not None else frozenset())


async def _outgoing(proto: EdgeProtocol, req: EdgeRequest, route: Route, target: str, rid: str,
                    span: Any) -> ProxyRequest:
    headers_in = req.headers
    timeout_s, max_attempts = parse_overrides(headers_in)
    headers = upstream_headers(headers_in, client_ip=proto.client_ip, host=headers_in.get(HOST), rid=rid)
    # The request's whole time budget: timeout.total, tightened by x-outrigger-timeout-ms.
    total = route.config.timeout.total if timeout_s is None else min(timeout_s, route.config.timeout.total)
    if req.body is not None:
        # Buffering the retry copy of the body is part of the request, so it spends the
        # same deadline; the chain's Deadline then gets only what is left.
        clock = proto.listener.ctx.clock
        started = clock.now()
        try:
            async with asyncio.timeout(total):
                body = await read_request_body(req.body, req.content_length, route.buffer_limit,
                                               proto.listener.limits.max_body)
        except TimeoutError:
            route.metrics.timeouts["total"].inc()
            raise errors.DeadlineExceeded(
                f"request body was not received within the total timeout of {total:g}s") from None
        total = max(0.0, total - (clock.now() - started))
    else:
        body = NO_BODY
    return ProxyRequest(req.method, route.upstream_path(target), headers, body, request_id=rid,
                        max_attempts=max_attempts, timeout_override=total, span=span,
                        informational=None if req.http10 else proto.informational)
