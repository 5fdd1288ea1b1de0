"""Upstream connection pools and the innermost handler of every chain.

One ``UpstreamPool`` exists per configured upstream.  It holds a lean HTTP/1.1
keep-alive pool (``proxy.h1client``) for proxied requests; upgrades open a
dedicated connection from the same pool settings.  ``UpstreamCall`` sends one
attempt and returns as soon as the response headers arrive; the body is
streamed later by the edge.  Every OS error is mapped to a typed
``ProxyError`` before the response head, so no policy ever sees a transport
exception.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

from proxy import errors
from proxy.chain import ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.config import TimeoutConfig, UpstreamConfig
from proxy.h1client import StaleConnection
from proxy.h1pool import ConnectTimeout, H1Pool
from proxy.tls import client_context

__all__ = ["ConnectTimeout", "UpstreamCall", "UpstreamPool", "map_client_error"]

ATTEMPT_HEADER = "x-outrigger-attempt"
EXPECTED_TIMEOUT_HEADER = "x-outrigger-expected-timeout-ms"


class UpstreamPool:
    """A named upstream: its base URL, TLS settings and the keep-alive pool."""

    def __init__(self, name: str, config: UpstreamConfig) -> None:
        self.name = name
        self.config = config
        parts = urlsplit(config.url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        default_port = 443 if parts.scheme == "https" else 80
        self.port = parts.port or default_port
        self.host_header = parts.netloc.rpartition("@")[2] if parts.port not in (None, default_port) \
            else (f"[{self.host}]" if ":" in self.host else self.host)
        self.base = f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"
        # SNI and certificate name to expect when it differs from the URL's host (tls.server_name).
        self.server_name = config.tls.server_name if parts.scheme == "https" else None
        self._h1: H1Pool | None = None

    @property
    def h1(self) -> H1Pool:
        if self._h1 is None:
            raise RuntimeError(f"upstream {self.name} used before start()")
        return self._h1

    async def start(self) -> None:
        tls = client_context(self.config.tls) if self.scheme == "https" else None
        self._h1 = H1Pool(self.name, self.host, self.port, ssl_context=tls,
                          server_hostname=self.server_name or self.host,
                          max_connections=self.config.max_connections, idle_timeout_s=self.config.idle_timeout)

    async def close(self) -> None:
        if self._h1 is not None:
            await self._h1.close()


def map_client_error(exc: BaseException, upstream: str) -> errors.ProxyError:
    """Translate an OS error raised before response headers arrived."""
    where = f"upstream {upstream}"
    if isinstance(exc, OSError):
        return errors.UpstreamReset(f"connection to {where} was reset before response headers")
    return errors.UpstreamProtocolError(f"{where} failed: {type(exc).__name__}")


_GET_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no Content-Length: 0 when bodiless (as aiohttp)


class UpstreamCall:
    """Innermost handler: one attempt against the pool, returning at headers."""

    __slots__ = ("_clock", "_connect", "_idle", "_pool", "_target")

    def __init__(self, pool: UpstreamPool, timeout: TimeoutConfig, clock: Clock) -> None:
        self._pool = pool
        self._clock = clock
        # connect and idle (the gap between body reads) are enforced by the client; the attempt
        # timeout (until response headers) and the total are enforced by their policies, so idle
        # does not also bound the wait for the head (which would cap the attempt at idle).
        self._connect = timeout.connect
        self._idle = timeout.idle
        self._target = urlsplit(pool.base).path  # the URL's path prefix, before the request's path

    async def __call__(self, request: ProxyRequest) -> ProxyResponse:
        pool = self._pool
        headers = request.headers
        headers["Host"] = pool.host_header
        headers[ATTEMPT_HEADER] = str(request.attempt)
        remaining = request.deadline - self._clock.now()
        if remaining != float("inf"):
            headers[EXPECTED_TIMEOUT_HEADER] = str(max(0, int(remaining * 1000)))
        method = request.method
        payload = request.body.payload()
        chunked = False
        if payload is None:
            if method not in _GET_METHODS and "Content-Length" not in headers:
                headers["Content-Length"] = "0"
        elif isinstance(payload, bytes):
            if "Content-Length" not in headers:
                headers["Content-Length"] = str(len(payload))
        elif "Content-Length" not in headers:
            headers["Transfer-Encoding"] = "chunked"
            chunked = True
        head = "".join([f"{method} {self._target}{request.path} HTTP/1.1\r\n",
                        *[f"{name}: {value}\r\n" for name, value in headers.items()], "\r\n"]
                       ).encode("utf-8", "surrogateescape")
        fresh = False
        while True:
            try:
                conn = await pool.h1.acquire(self._connect, fresh=fresh)
                response = await conn.request(head, payload, chunked=chunked, head_request=method == "HEAD",
                                              idle_s=self._idle, informational=request.informational)
            except StaleConnection:
                # The upstream closed an idle pooled connection as this request went out (its
                # keep-alive timeout racing ours): an idempotent request is sent once more, on a new
                # connection, as Go's client does. Not a policy retry: a new connection cannot be
                # stale, so this at most doubles an attempt, and only after a reused one failed.
                if fresh or not (request.idempotent and request.body.replayable):
                    raise
                fresh = True
                if request.span is not None:
                    request.event("stale_connection_resent", {"outrigger.attempt": request.attempt})
                continue
            except (errors.ProxyError, asyncio.CancelledError):
                raise  # the client raises typed errors itself (and RequestTooLarge from the app's stream)
            except Exception as exc:  # anything else from the socket layer
                raise map_client_error(exc, pool.name) from exc
            return ProxyResponse(response.status, response.headers, upstream=response)
