"""Dead letter: keep a route's finally failed requests in the spool for a later replay.

A route's outermost policy (see ``proxy.app``): it sees only final outcomes,
after every retry, breaker refusal, bulkhead overflow and fallback.  When the
outcome is one the route lists in ``dead_letter.on`` and the request is
eligible (its body is whole and within ``max_body``; POST/PATCH carry an
Idempotency-Key unless ``unsafe_methods``), the request is encoded and handed
to the spool, and the failure goes back to the app carrying
``x-outrigger-dead-letter: <id>`` -- only once the entry is durable.  The
request path waits for that fsync (group-committed), at most ``_WAIT_S``.

Replays (``outrigger dlq replay``) come back through this same policy marked
``x-outrigger-replay``: they are counted, never spooled again, and the
original trace is attached to the SERVER span as a span link.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from multidict import CIMultiDict
from opentelemetry.trace import SpanContext, TraceFlags

from proxy.chain import Handler, ProxyRequest, ProxyResponse
from proxy.config import RouteDeadLetterConfig
from proxy.deadletter import HEADER, REPLAY_HEADER, REPLAY_OF_HEADER
from proxy.deadletter.record import Entry, encode_entry, new_id
from proxy.deadletter.spool import Spool
from proxy.edge.headers import valid_traceparent
from proxy.errors import ProxyError
from proxy.telemetry.metrics import Metrics

__all__ = ["DeadLetter"]

_UNSAFE = frozenset({"POST", "PATCH"})
# Added by the sidecar on the way out; a replay passes the sidecar again and gets them anew.
_NOT_STORED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
_WAIT_S = 1.0  # a stalled disk may delay a failure this much, no more; the header is then left off


class DeadLetter:
    __slots__ = ("_http_5xx", "_listener", "_max_body", "_omit", "_on", "_prefix", "_replays", "_results",
                 "_rewrite", "_route", "_spool", "_unsafe", "_wall")

    def __init__(self, config: RouteDeadLetterConfig, spool: Spool, *, route: str, listener: str, prefix: str,
                 rewrite_prefix: str | None, metrics: Metrics, wall: Callable[[], float] = time.time) -> None:
        self._on = frozenset(config.on)
        self._http_5xx = "http_5xx" in self._on
        self._unsafe = config.unsafe_methods
        self._max_body = int(config.max_body)
        self._omit = frozenset(name.lower() for name in config.omit_headers)
        self._spool = spool
        self._route, self._listener = route, listener
        self._prefix, self._rewrite = prefix, rewrite_prefix
        self._wall = wall
        self._results = {result: metrics.dead_letters.labels(route=route, result=result)
                         for result in ("spooled", "refused_full", "refused_closed", "not_eligible")}
        self._replays = {result: metrics.dead_letter_replays.labels(route=route, result=result)
                         for result in ("done", "failed")}

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        replay_id = request.headers.get(REPLAY_HEADER)
        if replay_id is not None:
            return await self._replay(request, call_next, replay_id)
        spool = self._spool
        spool.users += 1  # a spool a reload retires is closed only once no request may still spool into it
        try:
            return await self._serve(request, call_next)
        finally:
            spool.users -= 1

    async def _serve(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        """The request, and its failure spooled when it is one ``dead_letter.on`` lists."""
        try:
            response = await call_next(request)
        except ProxyError as error:
            if error.code in self._on:
                entry_id = await self._spool_request(request, error.code, request.attempts_sent.count, error.message)
                if entry_id is not None:
                    error.headers = {**(error.headers or {}), HEADER: entry_id}
            raise
        if response.error is not None:  # a fallback stood in for this error: the work still failed
            code = response.error if response.error in self._on else None
        else:
            code = f"http_{response.status}" if self._http_5xx and response.status >= 500 else None
        if code is not None:
            entry_id = await self._spool_request(request, code, request.attempts_sent.count,
                                                 f"the upstream answered {response.status}")
            if entry_id is not None:
                headers = CIMultiDict(response.headers)
                headers[HEADER] = entry_id
                response.headers = headers
        return response

    def _body(self, request: ProxyRequest) -> bytes | None:
        """The body to store, or None when the request is not eligible."""
        if not self._unsafe and request.method in _UNSAFE and not request.idempotency_key:
            return None  # a replay could duplicate its effect
        body = request.body
        if body.stream is not None:
            return None  # streamed past the buffer: never held whole
        data = body.data or b""
        return data if len(data) <= self._max_body else None

    async def _spool_request(self, request: ProxyRequest, code: str, attempts: int, message: str) -> str | None:
        """The entry's id once durable; None when not spooled.  Never raises but CancelledError: spooling
        must not turn the app's failure into another one."""
        try:
            return await self._spool_or_raise(request, code, attempts, message)
        except Exception as exc:  # the outermost policy: a spooling bug costs the header, not the response
            self._spool.warn("bug", f"dead-letter spooling failed: {type(exc).__name__}: {exc}")
            return None

    async def _spool_or_raise(self, request: ProxyRequest, code: str, attempts: int, message: str) -> str | None:
        body = self._body(request)
        if body is None:
            self._not_spooled(request, "not_eligible")
            return None
        wall = self._wall()
        entry_id = new_id(wall)
        headers = request.headers
        span = request.span
        if span is not None:
            ctx = span.get_span_context()
            traceparent: str | None = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        else:
            traceparent = headers.get("traceparent")
        record = encode_entry(Entry(
            id=entry_id, ts=wall, route=self._route, listener=self._listener, method=request.method,
            target=self._listener_target(request.path),
            headers=[(str(name), value) for name, value in headers.items()
                     if name.lower() not in self._omit and name.lower() not in _NOT_STORED],
            body=body, idempotency_key=headers.get("idempotency-key"), traceparent=traceparent,
            attempts=attempts, error=code, message=message[:500],
            omitted=sorted({name.lower() for name in headers if name.lower() in self._omit}),
        ))
        future = self._spool.submit(record, self._results["spooled"])
        if future is None:  # full, or closed by a reload that removed dead_letter after this request was routed
            self._not_spooled(request, "refused_full" if self._spool.accepting else "refused_closed")
            return None
        timer = asyncio.get_running_loop().call_later(_WAIT_S, _give_up, future)
        try:
            durable = await future
        finally:
            timer.cancel()
        request.event("dead_letter", {"outrigger.dead_letter.result": "spooled" if durable else "write_failed",
                                      "outrigger.dead_letter.id": entry_id})
        return entry_id if durable else None

    def _not_spooled(self, request: ProxyRequest, result: str) -> None:
        """Refused before any write: the result's counter and the span event say why."""
        self._results[result].inc()
        request.event("dead_letter", {"outrigger.dead_letter.result": result})

    def _listener_target(self, path: str) -> str:
        """The path to send to the listener so the route's rewrite yields ``path`` again."""
        if self._rewrite is None or not path.startswith(self._rewrite):
            return path
        rest = path[len(self._rewrite):]
        if self._rewrite.endswith("/") and not self._prefix.endswith("/"):
            rest = "/" + rest  # upstream_path dropped this slash
        return self._prefix + rest

    async def _replay(self, request: ProxyRequest, call_next: Handler, replay_id: str) -> ProxyResponse:
        linked = request.headers.popall(REPLAY_OF_HEADER, ())
        if request.span is not None:
            request.span.set_attribute("outrigger.dead_letter.replay_of", replay_id[:64])
            if linked and valid_traceparent(linked[0]):
                value = linked[0]
                request.span.add_link(SpanContext(int(value[3:35], 16), int(value[36:52], 16), is_remote=True,
                                                  trace_flags=TraceFlags(int(value[53:55], 16))),
                                      {"outrigger.dead_letter.id": replay_id[:64]})
        try:
            response = await call_next(request)
        except ProxyError:
            self._replays["failed"].inc()
            raise
        self._replays["done" if response.status < 500 else "failed"].inc()
        return response


def _give_up(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)
