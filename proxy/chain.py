"""The policy chain: request/response types, the Handler and Policy protocols.

A route's chain is a nest of policies around the upstream handler, built once
at startup by ``proxy.app``.  A policy is any object with
``async __call__(request, call_next) -> ProxyResponse``; it may raise a
``ProxyError`` and must let ``asyncio.CancelledError`` through.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.body_stream import PrefixedStream

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from proxy.timers import Expiry
    from proxy.upstream.response import Informational

__all__ = [
    "AttemptTarget",
    "AttemptsSent",
    "FieldList",
    "Handler",
    "Layer",
    "Policy",
    "ProxyRequest",
    "ProxyResponse",
    "RequestBody",
    "ResponseStream",
    "build_chain",
    "decode_fields",
]

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class RequestBody:
    """The request body as the upstream will receive it.

    Bodies up to the retry ``buffer_limit`` are read whole (``data``) and can be
    sent any number of times.  Larger ones are a buffered ``prefix`` plus the
    rest of the client's stream; once a single attempt has started sending one,
    it can never be replayed.
    """

    __slots__ = ("data", "prefix", "received", "started", "stream", "waiting_on_app")

    def __init__(self, data: bytes | None = None, *, prefix: bytes = b"",
                 stream: AsyncIterator[bytes] | None = None) -> None:
        self.data = data
        self.prefix = prefix
        self.stream = stream
        self.started = False
        self.received = len(data) if data is not None else len(prefix)  # body bytes read from the app
        # True while the stream waits for the app's next bytes (written by the edge): a timeout that
        # fires then is the app's doing, not the upstream's.
        self.waiting_on_app = False

    @property
    def replayable(self) -> bool:
        return self.stream is None or not self.started

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self.stream is None:
            return self.data
        self.started = True
        return PrefixedStream(self, self.stream)


class AttemptsSent:
    """How many attempts went to the upstream for one request: the single owner of that count.

    Written only by ``proxy.upstream.call.UpstreamCall`` (each call is one attempt sent: a
    connect, then the request); shared by a request and its hedged forks.  The
    ``x-outrigger-attempts`` header, the access log, the SERVER span and the dead-letter
    entry all read it.  Refusals above the upstream (rate limit, breaker, bulkhead) never
    reach the upstream call, so they are no attempt.
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class AttemptTarget(Protocol):
    """Where one attempt goes: an endpoint of a balanced upstream (``proxy.upstream.endpoints``)."""

    @property
    def address(self) -> str: ...


class ProxyRequest:
    """One request from the app, as it moves through a route's chain.

    Fields one layer writes for another (so the chain order in ``proxy.app`` is
    load-bearing; ``tests/unit/test_app_chain.py`` pins it).  Writer -> readers:

    ``timeout_override``  edge (x-outrigger-timeout-ms, less the body read); tightened by the
                          waits of ``RateLimit``/``GlobalRateLimit``/``Idempotency`` -> ``Deadline``
    ``deadline``, ``deadline_timer``  ``Deadline`` -> ``Retry``, ``Hedge``, ``Idempotency``,
                          ``AttemptTimeout``, ``UpstreamCall`` (x-outrigger-expected-timeout-ms)
    ``attempt``           ``Retry`` per attempt, +1 by ``StaleResend`` -> ``UpstreamCall``
                          (x-outrigger-attempt), ``AttemptTimeout`` (adaptive), CLIENT spans
    ``attempts_sent``     ``UpstreamCall`` only -> edge (header, access log, SERVER span), dead letter
    ``endpoint``, ``tried``  ``Balance`` -> ``UpstreamCall``, ``AttemptTelemetry``, access log
    ``upstream_s``        ``AttemptTelemetry`` (``Hedge`` adds its forks') -> ``CircuitBreakerPolicy``
                          (slow calls), access log
    ``attempt_timeout_s`` ``AttemptTimeout`` (adaptive) -> ``AttemptTelemetry`` (span attribute)
    ``stale_resent``, ``fresh_connection``  ``StaleResend`` -> itself, ``UpstreamCall``
    ``hedge``             ``Hedge`` (on its fork) -> ``AttemptTelemetry``
    """

    __slots__ = (
        "attempt", "attempt_timeout_s", "attempts_sent", "body", "deadline", "deadline_timer", "endpoint",
        "fresh_connection",
        "headers", "hedge", "idempotency_key", "informational", "max_attempts", "method", "path", "request_id",
        "span", "stale_resent", "timeout_override", "tried", "upstream_s",
    )

    def __init__(self, method: str, path: str, headers: CIMultiDict[str], body: RequestBody, *,
                 request_id: str, max_attempts: int | None = None, timeout_override: float | None = None,
                 span: Span | None = None, informational: Informational | None = None) -> None:
        self.method = method
        self.path = path  # path + query as sent upstream (after rewrite)
        self.headers = headers  # headers to send upstream, hop-by-hop already removed
        self.body = body
        self.request_id = request_id
        self.max_attempts = max_attempts  # tightened by x-outrigger-max-attempts
        # Seconds the request has left, as the edge hands it over: timeout.total, tightened by
        # x-outrigger-timeout-ms, less the time spent reading the body (None: the route's total).
        self.timeout_override = timeout_override
        self.span = span  # the SERVER span while it is recording, else None
        self.deadline = math.inf  # monotonic; set by the deadline policy
        self.deadline_timer: Expiry | None = None  # the deadline policy's timer
        # The number of the attempt under way (1-based; sent upstream as x-outrigger-attempt): set by
        # the retry policy; the stale-connection resend adds one.  The count of attempts sent is
        # ``attempts_sent``.
        self.attempt = 1
        self.attempts_sent = AttemptsSent()
        self.stale_resent = False  # the one keep-alive-race resend was spent (StaleResend)
        self.fresh_connection = False  # the next attempt skips idle pooled connections (set by StaleResend)
        self.idempotency_key = "idempotency-key" in headers
        self.upstream_s = 0.0  # seconds spent in upstream attempts; summed by AttemptTelemetry
        # The current attempt's endpoint and every endpoint tried so far, on balanced upstreams only;
        # written by the Balance policy, read by the upstream call, attempt telemetry and the access log.
        self.endpoint: AttemptTarget | None = None
        self.tried: list[AttemptTarget] | None = None
        # Set by the edge for HTTP/1.1 apps; the upstream client calls it with each interim 1xx response.
        self.informational = informational
        self.attempt_timeout_s: float | None = None  # the adaptive timeout in force; set by AttemptTimeout
        self.hedge = False  # this copy is a hedged attempt (set by the hedge policy on its fork)

    def fork(self) -> ProxyRequest:
        """A copy for a concurrent (hedged) attempt: own headers and per-attempt fields, shared body and deadline.

        Only for fully buffered bodies (``body.stream is None``): the copies send the same bytes.
        """
        copy = ProxyRequest(self.method, self.path, self.headers.copy(), self.body, request_id=self.request_id,
                            max_attempts=self.max_attempts, timeout_override=self.timeout_override, span=self.span)
        copy.deadline = self.deadline
        copy.deadline_timer = self.deadline_timer
        copy.attempt = self.attempt
        copy.attempts_sent = self.attempts_sent  # a hedge is an attempt of the same request
        copy.idempotency_key = self.idempotency_key
        # Shared, so a hedge prefers an endpoint the request has not tried (the Balance policy's rule).
        if self.tried is None:
            self.tried = []
        copy.tried = self.tried
        return copy

    @property
    def deadline_expired(self) -> bool:
        """The total timeout fired: a cancellation seen below the deadline policy is its doing."""
        return self.deadline_timer is not None and self.deadline_timer.expired

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS or self.idempotency_key

    def event(self, name: str, attributes: dict[str, Any] | None = None) -> None:
        """Record a policy decision on the request's span (free when unsampled)."""
        if self.span is not None:
            self.span.add_event(name, attributes or {})


class ResponseStream(Protocol):
    """The upstream's response body as the edge streams it to the app.

    ``proxy.upstream.response.H1Response``, or a policy's wrapper around one
    (the idempotency policy puts what it read back in front of the rest).
    """

    @property
    def reason(self) -> str: ...

    @property
    def complete(self) -> bool: ...

    @property
    def peer(self) -> tuple[str, int] | None: ...

    def read_all_nowait(self) -> bytes: ...

    async def read(self) -> bytes: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


def decode_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """Header fields as text: UTF-8, undecodable bytes kept as surrogates, so they leave byte for byte."""
    return [(name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            for name, value in fields]


class FieldList:
    """An upstream's header fields as received, decoded into a ``CIMultiDict`` only when read.

    Most responses reach the app without any policy reading a header: the edge then
    writes ``fields`` as they came (``untouched``), skipping the decode, the mapping and
    the re-encoding.  The first read of ``decoded()`` (a policy, the tunnel, stripping
    forged ``x-outrigger-*`` fields) makes the mapping the one truth from then on.
    """

    __slots__ = ("_decoded", "fields")

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        self.fields = fields
        self._decoded: CIMultiDict[str] | None = None

    def decoded(self) -> CIMultiDict[str]:
        """The fields as a mapping (``decode_fields``), built on the first call."""
        decoded = self._decoded
        if decoded is None:
            decoded = self._decoded = CIMultiDict(decode_fields(self.fields))
        return decoded

    def untouched(self) -> list[tuple[bytes, bytes]] | None:
        """The fields as received while nobody has read them as a mapping, else None."""
        return self.fields if self._decoded is None else None


class ProxyResponse:
    """Response headers from the upstream (or a policy), body not yet streamed.

    The edge streams ``upstream``'s body to the app and then calls
    ``release()``; a policy that discards a response (to retry) releases it.
    Callbacks added with ``on_release`` run exactly once either way.  An upstream's
    response carries its ``FieldList``; ``headers`` decodes it on first use.
    """

    __slots__ = ("_callbacks", "_fields", "_headers", "body", "error", "reused", "status", "upstream")

    def __init__(self, status: int, headers: CIMultiDictProxy[str] | CIMultiDict[str] | None = None, *,
                 upstream: ResponseStream | None = None, body: bytes = b"", fields: FieldList | None = None) -> None:
        self.status = status
        self._headers = headers
        self._fields = fields
        self.upstream = upstream
        self.body = body
        self.error: str | None = None  # the error code this response stands in for (fallback)
        self.reused = False  # came on a kept-alive (or preconnected) connection: no connect on its path
        self._callbacks: list[Callable[[], None]] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]:
        headers = self._headers
        if headers is None:
            fields = self._fields
            headers = self._headers = fields.decoded() if fields is not None else CIMultiDict()
        return headers

    @headers.setter
    def headers(self, headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> None:
        self._headers = headers

    def untouched_fields(self) -> list[tuple[bytes, bytes]] | None:
        """The upstream's header fields as received, while no one has read or replaced ``headers``."""
        fields = self._fields
        if self._headers is None and fields is not None:
            return fields.untouched()
        return None

    def on_release(self, callback: Callable[[], None]) -> None:
        if self._callbacks is None:
            self._callbacks = [callback]
        else:
            self._callbacks.append(callback)

    def release(self) -> None:
        if self.upstream is not None:
            self.upstream.release()
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for callback in callbacks:
                callback()

    def close(self) -> None:
        """Drop the upstream connection (the body was not fully read)."""
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        self.release()


Handler = Callable[[ProxyRequest], Awaitable[ProxyResponse]]


class Policy(Protocol):
    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse: ...


class Layer:
    """One policy bound to the handler below it: a handler that calls ``policy(request, call_next)``.

    It returns the policy's coroutine rather than awaiting it, so a layer adds a call,
    not a coroutine; and it passes both arguments positionally (a ``functools.partial``
    with ``call_next=`` built and parsed a keyword dict per layer per request).
    """

    __slots__ = ("call_next", "policy")

    def __init__(self, policy: Policy, call_next: Handler) -> None:
        self.policy = policy
        self.call_next = call_next

    def __call__(self, request: ProxyRequest) -> Awaitable[ProxyResponse]:
        return self.policy(request, self.call_next)


def build_chain(policies: Sequence[Policy], innermost: Handler) -> Handler:
    """Nest ``policies`` (outermost first) around ``innermost`` into one handler."""
    handler = innermost
    for policy in reversed(policies):
        handler = Layer(policy, handler)
    return handler
