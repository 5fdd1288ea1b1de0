"""One app connection: llhttp parser callbacks, limits, keep-alive, pipelining and flow control.

In the shape of uvicorn's ``httptools_impl``: the parser turns bytes into
``EdgeRequest``s; each is served in order by one task running
``proxy.edge.exchange.serve`` (further parsed requests wait in a queue of at
most ``limits.max_pipelined``).  A request that does not parse is answered
with 400 (431 for an oversized head, 501 for an unsupported transfer coding)
after every valid request before it, and the connection is closed.
``limits.header_read_timeout`` closes a connection whose head does not
complete in time; ``limits.keepalive_timeout`` one with no request in flight
(swept by ``proxy.edge.listener``).  An upgrade hands the connection to
``proxy.edge.tunnel``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import TYPE_CHECKING, Any, Final

import httptools
from multidict import CIMultiDict

from proxy import errors
from proxy.edge.bodies import IncomingBody
from proxy.edge.exchange import serve
from proxy.edge.guard import describe_parse_error, extension_method
from proxy.edge.headers import EXPECT, TRANSFER_ENCODING, new_request_id
from proxy.edge.request import EdgeRequest, Refused, check_head
from proxy.edge.responses import error_bytes, head_bytes, header_lines, status_line

if TYPE_CHECKING:
    from proxy.edge.listener import ListenerEdge

__all__ = ["EdgeProtocol"]

log: Final = logging.getLogger("outrigger.server")
# reasons reading from the app is paused (Final: compiled to constants, not module-dict lookups)
_BODY: Final = 1
_QUEUE: Final = 2
_UPGRADE: Final = 4
# After an answer that leaves request bytes unread (an error mid-upload, a refused head), the
# connection is half-closed and what the app still sends is read and dropped for up to this
# long before the socket closes.  Closing with unread bytes queued sends a RST, which can
# destroy the answer before the app reads it (nginx's lingering_close exists for this).
_LINGER_S: Final = 2.0


class EdgeProtocol(asyncio.Protocol):
    def __init__(self, listener: ListenerEdge) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.transport: asyncio.Transport | None = None
        self.client_ip: str | None = None
        self.client_port: int | None = None
        self._parser = self._new_parser()
        self._url = b""
        self._headers: list[tuple[str, str]] = []
        self._head_size = 0
        self._limits = listener.limits
        self._method: str | None = None  # an extension method llhttp does not know, for the next head
        self._in_message = False
        self._in_head = False
        self._head_read = -1  # bytes of a head that spans reads (-1: the head began in this read)
        self._parsing: EdgeRequest | None = None  # the request whose body the parser is reading
        self._lengths: list[int] = []  # body lengths of the requests completed in the current read
        self._queue: collections.deque[EdgeRequest] = collections.deque()
        self._active: EdgeRequest | None = None
        self._task: asyncio.Task[None] | None = None  # the connection's task (_serve), from its first request
        self._waiter: asyncio.Future[EdgeRequest] | None = None  # what that task waits on between requests
        self._refusal: errors.ProxyError | None = None  # a parse error, answered once the queue is served
        self._refused: Refused | None = None  # the refusal a parser callback raised (see data_received)
        self._closing = False  # nothing more is read; close once the queue is served
        self._paused = 0
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self.last_active = self.loop.time()
        self.tunnel: Any = None  # the splice an upgrade switched this connection to
        self.informational = self._informational  # bound once: the upstream client calls it for 1xx

    def _new_parser(self) -> httptools.HttpRequestParser:
        parser = httptools.HttpRequestParser(self)
        parser.set_dangerous_leniencies(lenient_version=True)  # HTTP/1.2 is 1.1 (RFC 9110 §2.5); checked below
        return parser

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.listener.opened(self):
            log.debug("closing a new app connection: limits.max_connections reached")
            transport.abort()  # type: ignore[attr-defined]
            self.transport = None
            return
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip, self.client_port = peer[0], int(peer[1])
        self._arm_head_timer()  # a connection that never sends a complete head is closed too

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.listener.closed(self)
        self._closing = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        if self.tunnel is not None:
            self.tunnel.app_closed()  # a tunnel ends when either side closes: its request completes (101)
        elif self._task is not None:
            self._task.cancel()  # the app went away: its request is cancelled (499 client_closed)
        gone = ConnectionResetError("the app closed the connection")
        for req in (self._parsing, *self._queue):
            if req is not None and req.body is not None:
                req.body.fail(gone)
        self._queue.clear()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(gone)

    def eof_received(self) -> bool:
        if self.tunnel is not None:
            return bool(self.tunnel.app_eof())
        # The app closed its side: as nginx does, take it as gone (connection_lost cancels
        # what is in flight, which frees its bulkhead slot and upstream connection).
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel is not None:
            self.tunnel.app_write_paused(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel is not None:
            self.tunnel.app_write_paused(False)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.from_app(data)
            return
        if self._closing:
            return
        self.last_active = self.loop.time()
        fresh = not self._in_message
        self._lengths.clear()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_pause(data[exc.args[0]:] if exc.args else b"")
        except httptools.HttpParserCallbackError:
            # The refusal as the callback recorded it: the error's __context__ is not reliable
            # (raising it while another exception is being handled replaces it).
            refused, self._refused = self._refused, None
            self._refuse(refused.error if refused is not None else errors.BadRequest(
                "malformed HTTP request: unparsable request"))
        except httptools.HttpParserInvalidMethodError:
            if not self._extension_method(data, fresh):
                reason = describe_parse_error("invalid method", data[:2] if fresh else b"")
                self._refuse(errors.BadRequest(f"malformed HTTP request: {reason}"))
        except httptools.HttpParserError as exc:
            reason = describe_parse_error(str(exc), data[:2] if fresh else b"")
            self._refuse(errors.BadRequest(f"malformed HTTP request: {reason}"))
        else:
            if self._in_head:
                self._head_spans_reads(len(data))

    # --- parser callbacks ---

    def on_message_begin(self) -> None:
        self._in_message = self._in_head = True
        self._limits = self.listener.limits  # read once per request: a reload applies from the next one
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._head_read = -1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        limits = self._limits
        if len(headers) >= limits.max_headers:
            raise self._refusing(Refused(errors.HeadersTooLarge(
                f"request has more than limits.max_headers ({limits.max_headers}) header fields")))
        self._head_size += len(name) + len(value) + 4
        # Undecodable bytes are kept as surrogates, so they reach the upstream byte for byte.
        headers.append((name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parser = self._parser
        method = self._method or parser.get_method().decode("ascii")
        self._method = None
        limits = self._limits
        headers = CIMultiDict(self._headers)
        try:
            http10, length = check_head(parser.get_http_version(), headers,
                                        len(method) + len(self._url) + self._head_size + 14, limits.max_head)
        except Refused as refused:
            raise self._refusing(refused) from None
        has_body = (length is None and TRANSFER_ENCODING in headers) or bool(length)
        body = None
        if has_body:
            expect = not http10 and headers.get(EXPECT, "").lower() == "100-continue"
            body = IncomingBody(self, expect)
        req = EdgeRequest(method, self._url.decode("utf-8", "surrogateescape"), http10, headers,
                          parser.should_keep_alive(), parser.should_upgrade(), length, body)
        self._parsing = req if has_body else None
        if self._active is None and not self._queue:
            self._start(req)
        else:
            self._queue.append(req)
            if len(self._queue) >= limits.max_pipelined:
                self._pause(_QUEUE)

    def on_body(self, chunk: bytes) -> None:
        req = self._parsing
        if req is not None and req.body is not None:
            req.body.feed(chunk)

    def on_message_complete(self) -> None:
        self._in_message = False
        req, self._parsing = self._parsing, None
        if req is not None and req.body is not None:
            req.body.finish()
            self._lengths.append(req.content_length if req.content_length is not None else -1)
        else:
            self._lengths.append(0)

    # --- parse problems ---

    def _refusing(self, refused: Refused) -> Refused:
        """Record a callback's refusal for ``data_received``, and return it to raise."""
        self._refused = refused
        return refused

    def _head_spans_reads(self, size: int) -> None:
        limits = self.listener.limits
        if self._head_read < 0:  # the head began in this read: count what of it is parsed
            self._head_read = len(self._url) + self._head_size
            if self._head_timer is None:
                self._arm_head_timer()
        else:
            self._head_read += size
        if self._head_read > limits.max_head:  # refuse now rather than buffer the rest of an endless head
            self._refuse(errors.HeadersTooLarge(
                f"request head exceeds limits.max_header_bytes ({limits.max_head} bytes)"))

    def _extension_method(self, data: bytes, fresh: bool) -> bool:
        """A method llhttp does not know (``FROBNICATE``) is any token: parse it as GET, forward it as sent."""
        found = extension_method(data, self._lengths) if fresh else None
        if found is None:
            return False  # (a request that began in an earlier read is too rare to re-frame)
        self._parser = self._new_parser()
        self._in_message = False
        self._method, rest = found
        self.data_received(b"GET" + rest)
        return True

    def _refuse(self, error: errors.ProxyError) -> None:
        """Stop reading; answer ``error`` once every valid request before it is answered, then close."""
        self._closing = True
        self._pause(_QUEUE)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        req = self._parsing
        if req is not None and req.body is not None and not self._in_head:
            # The body's framing broke mid-way: the request being served ends with this error.
            req.body.fail(error)
            return
        self._refusal = error
        if self._active is None and not self._queue:
            self._send_refusal()

    def _send_refusal(self) -> None:
        error, self._refusal = self._refusal, None
        if error is None or self.transport is None:
            return
        log.debug("refused an unparsable request: %s", error.message)
        rid = new_request_id()  # the app's x-request-id, if any, was never parsed
        self.listener.record_refusal(error.status, error.code, rid)
        self.write(error_bytes(errors.to_response(error, route=None, upstream=None, request_id=rid),
                               attempts=0, keep_alive=False, http10=False))
        self._close_lingering()

    def _close_lingering(self) -> None:
        """Close once the answer is out, reading and dropping what the app still sends meanwhile."""
        transport = self.transport
        if transport is None:
            return
        self._closing = True
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()  # after what is buffered: the answer leaves first, then our FIN
        self._paused = 0
        transport.resume_reading()  # data_received drops it while closing
        self._linger_timer = self.loop.call_later(_LINGER_S, transport.close)

    # --- timers ---

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self.listener.limits.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._closing or not (self._in_head or self._fresh_connection):
            return
        log.debug("closing a connection whose request head did not arrive within limits.header_read_timeout")
        self.listener.record_refusal(408, "header_timeout")
        self._closing = True
        if self._active is None and not self._queue:
            self.transport.close()  # otherwise the requests in flight finish first

    @property
    def _fresh_connection(self) -> bool:
        return not self._in_message and self._active is None and not self._queue and self.tunnel is None

    def close_if_idle(self, deadline: float) -> None:
        """Called by the listener's sweep: close when no request came for ``limits.keepalive_timeout``."""
        if self.last_active < deadline and self._fresh_connection and self.transport is not None:
            self._closing = True
            self.transport.close()

    # --- serving, in order ---

    def _start(self, req: EdgeRequest) -> None:
        """Serve ``req`` now: on the connection's task, started here for its first request."""
        self._active = req
        waiter = self._waiter
        if waiter is not None:  # the task is idle between requests: wake it
            self._waiter = None
            waiter.set_result(req)
        elif self._task is None:
            self._task = self.loop.create_task(self._serve(req))
        # else: the task is finishing the previous request (_next) and takes this one next

    async def _serve(self, req: EdgeRequest) -> None:
        """The connection's task: its requests, one after the other, in order.

        One task per connection rather than per request: a task costs a WeakSet entry
        (Python code) and a name to format on creation, about 4% of a request's CPU.
        Between requests it waits on a future that ``_start`` completes; it ends when
        the connection closes, is closing or became a tunnel.
        """
        try:
            while True:
                keep_alive = False
                try:
                    keep_alive = await serve(self, req)
                finally:
                    self._active = None
                    self.last_active = self.loop.time()
                    self._next(req, keep_alive)  # may start the next request
                # (Read through a method: mypy narrows self._active to None after the assignment
                # above, and mypyc would compile that into a check that raises when it is set.)
                following = self._started()
                if following is None:
                    if self.transport is None or self._closing or self.tunnel is not None:
                        return
                    waiter = self._waiter = self.loop.create_future()
                    following = await waiter  # the request _start hands over
                req = following
        finally:
            self._task = self._waiter = None

    def _started(self) -> EdgeRequest | None:
        """The request ``_next`` started (on this task) after the one just served, if any."""
        return self._active

    def _next(self, req: EdgeRequest, keep_alive: bool) -> None:
        if self.transport is None or self.tunnel is not None:
            return
        if req.body is not None and not req.body.complete:
            self._close_lingering()  # (an unread rest of a body would be parsed as the next request)
            return
        if not keep_alive:
            self._closing = True
            self.transport.close()
            return
        if req.upgrade:  # answered without switching: what followed it is HTTP again
            self._parser = self._new_parser()
            self._resume(_UPGRADE)
            if req.leftover:
                self.data_received(req.leftover)
            if self._active is not None or self.transport is None:
                return
        if self._queue:
            self._start(self._queue.popleft())
            if len(self._queue) < self.listener.limits.max_pipelined:
                self._resume(_QUEUE)
        elif self._refusal is not None:
            self._send_refusal()
        elif self._closing:
            self.transport.close()

    def _upgrade_pause(self, leftover: bytes) -> None:
        """llhttp stopped after an upgrade request: what follows waits until the upstream has answered it."""
        req = self._active if self._active is not None and self._active.upgrade else (
            self._queue[-1] if self._queue else None)
        if req is None:
            return
        req.leftover = leftover
        self._pause(_UPGRADE)

    def switch_to(self, tunnel: Any, leftover: bytes) -> None:
        """The upstream answered 101: from now on every byte goes to ``tunnel``."""
        self.tunnel = tunnel
        if leftover:
            tunnel.from_app(leftover)
        self._resume(_UPGRADE)

    # --- flow control and writing ---

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        was = self._paused
        self._paused &= ~reason
        if was and not self._paused and self.transport is not None and not self._closing:
            self.transport.resume_reading()

    def pause_for_body(self) -> None:
        self._pause(_BODY)

    def resume_for_body(self) -> None:
        if self._paused & _BODY:
            self._resume(_BODY)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait until the app reads what was written; ``client_timeout`` when it stops reading."""
        if not self.write_paused:
            return
        if self.transport is None:
            raise ConnectionResetError("the app closed the connection")
        drain = self._drain = self.loop.create_future()
        idle = self.listener.limits.client_idle_s
        try:
            async with asyncio.timeout(idle):
                await drain
        except TimeoutError:
            raise errors.ClientTimeout(f"the app read no response bytes for limits.client_idle_timeout "
                                       f"({idle:g}s)") from None

    def _informational(self, status: int, reason: str, headers: list[tuple[str, str]]) -> None:
        """Forward an interim 1xx (103 Early Hints...) from the upstream to this HTTP/1.1 app."""
        if status == 100:
            return  # the edge answers Expect: 100-continue itself
        self.write(head_bytes([status_line(status, reason), *header_lines(headers)]))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def cancel(self) -> asyncio.Task[Any] | None:
        """Shutdown: cancel the request in flight (its task, to await) and stop reading."""
        self._closing = True
        task = self._task
        if task is not None:
            task.cancel()
        if self.tunnel is not None:
            self.tunnel.close()
        return task
