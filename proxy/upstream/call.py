"""Upstream connection pools and the innermost handler of every chain.

One ``UpstreamPool`` exists per configured upstream.  It holds a lean HTTP/1.1
keep-alive pool (``proxy.upstream.connection``) for proxied requests; upgrades open a
dedicated connection from the same pool settings.  ``UpstreamCall`` sends one
attempt and returns as soon as the response headers arrive; the body is
streamed later by the edge.  Every OS error is mapped to a typed
``ProxyError`` before the response head, so no policy ever sees a transport
exception; any other exception is a bug (or the app's upload failing) and
passes through untyped, so that it is never retried or counted against the
upstream.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from typing import Final
from urllib.parse import urlsplit

from multidict import istr

from proxy.chain import AttemptTarget, ProxyRequest, ProxyResponse
from proxy.clock import Clock
from proxy.config import TimeoutConfig, UpstreamConfig, parse_address
from proxy.edge.headers import CONTENT_LENGTH, HOST, strip_sidecar_headers
from proxy.tasks import cancel_and_wait
from proxy.telemetry.metrics import EndpointMetrics
from proxy.upstream.connection import transport_error
from proxy.upstream.endpoints.discovery import Discovery
from proxy.upstream.endpoints.endpoint_set import Endpoint, EndpointSet, keep_warm
from proxy.upstream.pool import ConnectTimeout, H1Pool
from proxy.upstream.tls import client_context

__all__ = ["ConnectTimeout", "UpstreamCall", "UpstreamPool"]

ATTEMPT_HEADER: Final = istr("x-outrigger-attempt")  # istr: see proxy.edge.headers.HOST
EXPECTED_TIMEOUT_HEADER: Final = istr("x-outrigger-expected-timeout-ms")


class UpstreamPool:
    """A named upstream: its base URL, TLS settings and the keep-alive pool."""

    def __init__(self, name: str, config: UpstreamConfig, *, clock: Clock | None = None,
                 rng: random.Random | None = None, endpoint_metrics: EndpointMetrics | None = None,
                 connect_timeout_s: float = 1.0) -> None:
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
        self.users = 0  # requests in flight on routes to this upstream (kept by the edge): a retired pool waits
        self._tls: ssl.SSLContext | None = None
        self._rng = rng or random.Random()
        self._connect_timeout_s = connect_timeout_s
        self._warm: asyncio.Task[None] | None = None
        # Several endpoints (a static list or discovery): one pool each, picked per attempt.
        self.endpoints: EndpointSet | None = None
        self.discovery: Discovery | None = None
        if config.multi_endpoint:
            if clock is None or endpoint_metrics is None:
                raise ValueError(f"upstream {name}: a balanced upstream needs a clock and endpoint metrics")
            self.endpoints = EndpointSet(name, config, clock=clock, rng=self._rng, metrics=endpoint_metrics,
                                         pool_factory=self._endpoint_pool, connect_timeout_s=connect_timeout_s)

    @property
    def h1(self) -> H1Pool:
        """The pool of a one-address upstream (of a balanced one: the first endpoint in rotation)."""
        if self.endpoints is not None:
            live = [e for e in self.endpoints.endpoints if not e.removed]
            if live:
                return live[0].pool
        if self._h1 is None:
            raise RuntimeError(f"upstream {self.name} used before start()")
        return self._h1

    def connections(self, target: AttemptTarget | None) -> H1Pool:
        """The pool for one attempt: its endpoint's (balanced upstreams), else the upstream's one pool."""
        if target is None:
            return self.h1
        assert isinstance(target, Endpoint)
        return target.pool

    def _endpoint_pool(self, host: str, port: int) -> H1Pool:
        # Host header, SNI and certificate name stay the url's: an endpoint is only where to connect.
        return H1Pool(self.name, host, port, ssl_context=self._tls, server_hostname=self.server_name or self.host,
                      max_connections=self.config.max_connections, idle_timeout_s=self.config.idle_timeout)

    def static_endpoints(self) -> list[tuple[str, int]]:
        return [parse_address(address) for address in self.config.endpoints or ()]

    def reconfigure(self, config: UpstreamConfig) -> None:
        """A reload changed only the static endpoint list: diff it into the running set."""
        self.config = config
        if self.endpoints is not None:
            self.endpoints.config = config
            self.endpoints.update(self.static_endpoints())

    async def start(self) -> None:
        tls = self._tls = client_context(self.config.tls) if self.scheme == "https" else None
        if self.endpoints is None:
            self._h1 = H1Pool(self.name, self.host, self.port, ssl_context=tls,
                              server_hostname=self.server_name or self.host,
                              max_connections=self.config.max_connections, idle_timeout_s=self.config.idle_timeout)
            if self.config.preconnect > 0:
                pools = [self._h1]
                self._warm = asyncio.get_running_loop().create_task(keep_warm(
                    self.name, lambda: pools, self.config.preconnect, self._connect_timeout_s, self._rng))
        else:
            initial = self.static_endpoints()
            if self.config.discovery is not None:
                self.discovery = Discovery(self.name, self.host, self.port, self.config.discovery,
                                           on_update=self.endpoints.update, rng=self._rng)
                await self.discovery.resolve_once()  # a failure here leaves the set empty until a refresh works
                initial = self.discovery.resolved
                self.discovery.start()
            await self.endpoints.start(initial)

    async def close(self) -> None:
        await cancel_and_wait(self._warm)
        if self.discovery is not None:
            await self.discovery.close()
        if self.endpoints is not None:
            await self.endpoints.close()
        if self._h1 is not None:
            await self._h1.close()


_GET_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # no Content-Length: 0 when bodiless (as aiohttp)


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
        request.attempts_sent.count += 1  # the one writer of this count (see chain.AttemptsSent)
        pool = self._pool
        headers = request.headers
        headers[HOST] = pool.host_header
        headers[ATTEMPT_HEADER] = str(request.attempt)
        remaining = request.deadline - self._clock.now()
        if remaining != float("inf"):
            headers[EXPECTED_TIMEOUT_HEADER] = str(max(0, int(remaining * 1000)))
        method = request.method
        payload = request.body.payload()
        chunked = False
        if payload is None:
            if method not in _GET_METHODS and CONTENT_LENGTH not in headers:
                headers["Content-Length"] = "0"
        elif isinstance(payload, bytes):
            if CONTENT_LENGTH not in headers:
                headers["Content-Length"] = str(len(payload))
        elif CONTENT_LENGTH not in headers:
            headers["Transfer-Encoding"] = "chunked"
            chunked = True
        # map(": ".join) runs in C, about half the cost of a formatted line per field. Never empty:
        # Host is set above.
        head = (f"{method} {self._target}{request.path} HTTP/1.1\r\n" + "\r\n".join(map(": ".join, headers.items()))
                + "\r\n\r\n").encode("utf-8", "surrogateescape")
        fresh, request.fresh_connection = request.fresh_connection, False
        try:
            conn = await pool.connections(request.endpoint).acquire(self._connect, fresh=fresh)
            reused = conn.requests > 0
            response = await conn.request(head, payload, chunked=chunked, head_request=method == "HEAD",
                                          idle_s=self._idle, informational=request.informational)
        except OSError as exc:  # a transport error the client did not type itself
            raise transport_error(exc, pool.name) from exc
        # Typed ProxyErrors (StaleConnection among them, for StaleResend) and cancellation pass
        # through; anything else (a bug, or the app's upload stream failing: UploadFailed) is no
        # upstream fault either: it reaches the edge, which logs its traceback and answers 500
        # internal, with no retry and no breaker failure.
        if response.sidecar_headers:
            strip_sidecar_headers(response.headers)  # x-outrigger-* on a response comes from the sidecar only
        proxied = ProxyResponse(response.status, upstream=response, fields=response.fields)
        proxied.reused = reused
        return proxied
