"""Upgrades as a transparent byte tunnel (how Envoy and nginx do it).

Called by ``proxy.edge.exchange`` for a request llhttp flagged as an upgrade
(``Connection: upgrade`` plus ``Upgrade: <any token>``, WebSocket included).
The request goes to the route's upstream over a dedicated connection, with
its handshake headers.  The upstream's answer is relayed verbatim: a 101 with
all its headers, after which bytes are spliced both ways with backpressure
(no frame parsing, no size limit, no extension negotiation of our own); or
any other answer with its status, headers and body, after which the app's
connection carries HTTP again (an ``h2c`` upgrade the upstream ignores is an
ordinary request, RFC 9113 §3.1).  The policy chain does not apply: a tunnel
is one long call, bounded by the route's ``timeout.idle`` without traffic
either way, counted in ``outrigger_tunnels_active``/``outrigger_tunnels_total``;
the drain waits for it like for any request in flight.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from proxy import errors
from proxy.chain import ProxyResponse
from proxy.edge.bodies import read_request_body, send_response
from proxy.edge.headers import connection_listed, strip_sidecar_headers, upstream_headers
from proxy.edge.responses import head_bytes, header_lines, status_line
from proxy.upstream.connection import H1Connection, transport_error

if TYPE_CHECKING:
    from proxy.edge.protocol import EdgeProtocol
    from proxy.edge.request import EdgeRequest
    from proxy.edge.routing import Route
    from proxy.telemetry.propagation import TraceHeaders

__all__ = ["Splice", "Tunnelled", "open_tunnel"]


class Tunnelled(NamedTuple):
    status: int
    bytes_out: int
    head_sent_at: float
    keep_alive: bool


def _upgrade_head(proto: EdgeProtocol, req: EdgeRequest, route: Route, target: str, rid: str, body: bytes,
                  trace_headers: TraceHeaders | None) -> bytes:
    incoming = req.headers
    pool = route.pool
    headers = upstream_headers(incoming, client_ip=proto.client_ip, host=incoming.get("Host"), rid=rid)
    if trace_headers is not None:
        trace_headers.apply(headers)  # the upgrade carries the request's trace like any other
    # The handshake's own hop-by-hop fields travel with it: Upgrade, Connection and what it lists.
    listed = connection_listed(incoming)
    for name, value in incoming.items():
        lower = name.lower()
        if lower in listed and lower not in ("upgrade", "connection", "host", "transfer-encoding", "keep-alive"):
            headers.add(name, value)
    headers["Upgrade"] = ", ".join(incoming.getall("Upgrade", ()))
    headers["Connection"] = ", ".join(incoming.getall("Connection", ()))
    headers["Host"] = pool.host_header
    headers.popall("Content-Length", None)
    if body:
        headers["Content-Length"] = str(len(body))
    base = urlsplit(pool.base).path
    lines = [f"{req.method} {base}{route.upstream_path(target)} HTTP/1.1\r\n", *header_lines(headers.items())]
    return head_bytes(lines) + body


async def open_tunnel(proto: EdgeProtocol, req: EdgeRequest, route: Route, target: str, rid: str, *,
                      keep_alive: bool, trace_headers: TraceHeaders | None = None) -> Tunnelled:
    """Forward the upgrade; relay the answer; splice until either side closes or idles out."""
    body = b""
    if req.body is not None:  # rare on an upgrade; read whole, bounded as any body
        body = (await read_request_body(req.body, req.content_length, 1 << 62, proto.listener.limits.max_body)
                ).data or b""
    timeout = route.config.timeout
    pool = route.pool
    conn = await pool.h1.open_dedicated(timeout.connect)
    try:
        async with asyncio.timeout(timeout.attempt):
            response = await conn.request_upgrade(_upgrade_head(proto, req, route, target, rid, body, trace_headers),
                                                  None if req.http10 else proto.informational)
    except TimeoutError:
        conn.close()
        raise errors.UpstreamTimeout(f"upstream {pool.name} did not answer the upgrade within the attempt "
                                     f"timeout of {timeout.attempt:g}s") from None
    except OSError as exc:  # a transport error the connection did not type itself
        conn.close()
        raise transport_error(exc, pool.name) from exc
    except BaseException:
        conn.close()
        raise
    clock = proto.listener.ctx.clock
    if response.sidecar_headers:
        strip_sidecar_headers(response.headers)  # only the sidecar sets x-outrigger-* towards the app
    if response.status != 101:
        proxied = ProxyResponse(response.status, response.headers, upstream=response)
        sent = await send_response(proto, req, proxied, rid, 1, keep_alive=keep_alive,
                                   idle_timeouts=route.metrics.timeouts["idle"])
        return Tunnelled(response.status, sent.sent, sent.head_sent_at, sent.keep_alive)
    proto.write(head_bytes([status_line(101, response.reason), *header_lines(response.headers.items())]))
    head_at = clock.now()
    splice = Splice(proto, conn, timeout.idle, route)
    tunnels = proto.listener.ctx.tunnels
    proto.listener.tunnels += 1
    if tunnels is not None:
        tunnels.active.inc()  # type: ignore[attr-defined]
        tunnels.total.labels(route=route.name).inc()  # type: ignore[attr-defined]
    try:
        proto.switch_to(splice, req.leftover)
        await splice.done
    finally:
        splice.close()
        proto.listener.tunnels -= 1
        if tunnels is not None:
            tunnels.active.dec()  # type: ignore[attr-defined]
    return Tunnelled(101, splice.to_app, head_at, False)


class Splice:
    """Bytes both ways between the app's connection and the upstream's, with backpressure."""

    def __init__(self, proto: EdgeProtocol, conn: H1Connection, idle_s: float, route: Route) -> None:
        self._proto = proto
        self._conn = conn
        self._idle_s = idle_s
        self._route = route
        loop = proto.loop
        self._loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.to_app = 0
        self.to_upstream = 0
        self._last = loop.time()
        self._timer: asyncio.TimerHandle | None = loop.call_at(self._last + idle_s, self._idle_check)
        conn.on_pipe_closed = self.close
        conn.on_write_paused = self._upstream_write_paused
        conn.attach_pipe(self.from_upstream)

    def from_app(self, data: bytes) -> None:
        self._last = self._loop.time()
        self.to_upstream += len(data)
        self._conn.write_raw(data)

    def from_upstream(self, data: bytes) -> None:
        self._last = self._loop.time()
        self.to_app += len(data)
        self._proto.write(data)

    def app_write_paused(self, paused: bool) -> None:
        """The app reads slower than the upstream sends: stop reading from the upstream meanwhile."""
        if paused:
            self._conn.pause_reading()
        else:
            self._conn.resume_reading()

    def _upstream_write_paused(self, paused: bool) -> None:
        if paused:
            self._proto.pause_for_body()
        else:
            self._proto.resume_for_body()

    def app_eof(self) -> bool:
        self._conn.write_eof()  # half-close: the upstream may still answer
        return True

    def app_closed(self) -> None:
        self.close()

    def _idle_check(self) -> None:
        self._timer = None
        due = self._last + self._idle_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._idle_check)
            return
        self._route.metrics.timeouts["idle"].inc()
        self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._conn.on_pipe_closed = None
        self._conn.close()
        transport = self._proto.transport
        if transport is not None:
            transport.close()  # what was written still goes out first
        if not self.done.done():
            self.done.set_result(None)
