"""WebSocket upgrades: one app connection spliced to one upstream connection.

Called by the edge (``proxy.server``) for ``Upgrade: websocket`` requests
once the route is known.  The upstream handshake happens first, so a refused
or unreachable upstream becomes an ordinary ``ProxyError`` response and the
app never sees a half-open socket.  After both handshakes, text, binary,
ping, pong and close frames are relayed both ways until either side closes.
The policy chain does not apply: a WebSocket is one long call, not a
request to retry or time out.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import WSMsgType, web

from proxy import errors
from proxy.headers import upstream_headers
from proxy.upstream import map_client_error

if TYPE_CHECKING:
    from proxy.routing import Route

__all__ = ["proxy_websocket"]

_SCHEMES = {"http": "ws", "https": "wss"}
# Close codes that may be reported locally but must never be sent in a close frame (RFC 6455 7.4.1).
_UNSENDABLE = frozenset({1005, 1006, 1015})
_AnyWS = web.WebSocketResponse | aiohttp.ClientWebSocketResponse
_CLOSE_GRACE_S = 1.0


async def proxy_websocket(request: web.BaseRequest, route: Route, rid: str) -> web.StreamResponse:
    downstream = web.WebSocketResponse(autoping=False, autoclose=True)
    if not downstream.can_prepare(request).ok:
        raise errors.BadRequest("invalid WebSocket upgrade request")
    pool = route.pool
    peer = request.transport.get_extra_info("peername") if request.transport else None
    headers = upstream_headers(request.headers, client_ip=peer[0] if peer else None,
                               host=request.headers.get("Host"), rid=rid)
    for name in [n for n in headers if n.lower().startswith("sec-websocket-")]:
        headers.popall(name, None)  # ws_connect negotiates its own key, version and extensions
    headers["Host"] = pool.host_header
    protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
    url = f"{_SCHEMES[pool.scheme]}{pool.base[len(pool.scheme):]}{route.upstream_path(request.raw_path)}"
    timeout = route.config.timeout
    try:
        upstream = await asyncio.wait_for(pool.session.ws_connect(
            url, headers=headers, protocols=protocols, autoping=False, autoclose=True, server_hostname=pool.server_name,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=timeout.attempt)), timeout.attempt)
    except asyncio.CancelledError:
        raise
    except aiohttp.WSServerHandshakeError as exc:
        raise errors.UpstreamProtocolError(
            f"upstream {pool.name} refused the WebSocket upgrade with status {exc.status}") from exc
    except (aiohttp.ClientError, OSError) as exc:  # before TimeoutError: aiohttp's timeouts subclass it
        raise map_client_error(exc, pool.name) from exc
    except TimeoutError as exc:
        raise errors.UpstreamTimeout(f"upstream {pool.name} did not complete the WebSocket handshake") from exc
    try:
        if upstream.protocol:
            downstream = web.WebSocketResponse(autoping=False, autoclose=True, protocols=(upstream.protocol,))
        await downstream.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    splice = asyncio.ensure_future(_splice(downstream, upstream))
    try:
        await asyncio.shield(splice)
    except asyncio.CancelledError:
        # The app dropped its connection, typically right after its close frame (or the
        # listener is shutting down): let the relays forward what already arrived, such
        # as that close frame and its code, for a moment before cutting the upstream.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(splice, _CLOSE_GRACE_S)
        raise
    return downstream


async def _splice(downstream: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    # Both relays always end: the one that sees a close forwards it, and its close()
    # wakes the other one's receive() with CLOSING.  Cancelling the slower one early
    # would cut that close handshake short and lose the close code.
    relays = [asyncio.ensure_future(_relay(downstream, upstream)),
              asyncio.ensure_future(_relay(upstream, downstream))]
    try:
        await asyncio.gather(*relays)
    finally:
        for relay in relays:
            relay.cancel()
        await upstream.close()
        with contextlib.suppress(ConnectionError):
            await downstream.close()


async def _relay(source: _AnyWS, sink: _AnyWS) -> None:
    """Copy frames from ``source`` to ``sink`` until ``source`` closes; then close ``sink`` alike."""
    try:
        while True:
            msg = await source.receive()
            kind = msg.type
            if kind is WSMsgType.TEXT:
                await sink.send_str(msg.data)
            elif kind is WSMsgType.BINARY:
                await sink.send_bytes(msg.data)
            elif kind is WSMsgType.PING:
                await sink.ping(msg.data)
            elif kind is WSMsgType.PONG:
                await sink.pong(msg.data)
            elif kind is WSMsgType.CLOSE:
                code = msg.data if isinstance(msg.data, int) and msg.data not in _UNSENDABLE else 1000
                await sink.close(code=code, message=(msg.extra or "").encode()[:123])
                return
            elif kind is WSMsgType.CLOSING:
                return  # the other relay is closing ``source`` on behalf of the far side
            else:  # CLOSED or ERROR: the source is gone without a clean close frame
                await sink.close(code=1011 if kind is WSMsgType.ERROR else 1000)
                return
    except ConnectionError:
        return  # the sink went away; the other relay sees its close
