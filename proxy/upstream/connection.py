"""A lean HTTP/1.1 client connection for the upstream path (the innermost handler's transport).

aiohttp's ``ClientSession`` was a third of the sidecar's CPU per request
(request object, cookie/redirect/auto-header machinery, a timer rescheduled on
every read).  The upstream path needs far less: one keep-alive pool per
upstream, a request written in one ``transport.write``, a response head
parsed by ``httptools`` (llhttp, the C parser uvicorn uses) and a body handed
over chunk by chunk with backpressure.

Failures before the response head are raised as typed ``ProxyError``s;
failures mid-body are raised as ``UpstreamBodyError`` subclasses carrying the
public error code the edge reports.  Connections are pooled by
``proxy.upstream.pool``; an upgrade (``request_upgrade``) runs on a dedicated
connection that, once the upstream answers 101, becomes a raw byte pipe for
the edge's tunnel (``proxy.edge.tunnel``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final

import httptools

from proxy import errors
from proxy.chain import FieldList, decode_fields
from proxy.edge.headers import CONTENT_LENGTH, SIDECAR_PREFIX, TRANSFER_ENCODING
from proxy.upstream.response import (
    H1Response,
    Informational,
    InvalidResponse,
    UploadFailed,
    UpstreamBodyError,
    UpstreamBodyProtocolError,
    UpstreamBodyTimeout,
)

log: Final = logging.getLogger("outrigger.upstream")

if TYPE_CHECKING:
    from proxy.upstream.pool import H1Pool

__all__ = ["STALE_IDLE_S", "H1Connection", "StaleConnection", "transport_error"]


# Response head limits, as aiohttp's client has them: a field or line over 8190 bytes or
# more than 128 header fields is a protocol error.  llhttp hands a header over only once
# it is complete, so a head that never ends is cut off at the most such a head can be
# (plus one read of body bytes that may share its packet).
_MAX_FIELD: Final = 8190
_MAX_HEADERS: Final = 128
_SIDECAR_PREFIX: Final = SIDECAR_PREFIX.encode()
_MAX_HEAD_READ: Final = _MAX_HEADERS * (2 * _MAX_FIELD + 4) + _MAX_FIELD + 256 * 1024
_NO_BODY_STATUS: Final = frozenset({204, 304})

# What the client itself needs to know of a response field, by its name as the upstream spells it.
_OTHER: Final = 0
_SIDECAR_FIELD: Final = 1
_LENGTH_FIELD: Final = 2
_CODING_FIELD: Final = 3
_FIELD_KINDS: Final[dict[bytes, int]] = {}
_LENGTH_NAME: Final = CONTENT_LENGTH.lower().encode()
_CODING_NAME: Final = TRANSFER_ENCODING.lower().encode()


def _field_kind(name: bytes) -> int:
    """Classify a field name once (the same few names come back on every response)."""
    lower = name.lower()
    kind = _SIDECAR_FIELD if lower.startswith(_SIDECAR_PREFIX) else _LENGTH_FIELD if lower == _LENGTH_NAME \
        else _CODING_FIELD if lower == _CODING_NAME else _OTHER
    if len(_FIELD_KINDS) < 4096:  # bounded: an upstream inventing names cannot grow it without end
        _FIELD_KINDS[name] = kind
    return kind


# A reused connection counts as possibly closed by the upstream's keep-alive timeout only when it
# sat idle in the pool at least this long before the request: servers' idle timeouts are seconds
# (nginx 75 s, Node 5 s, gunicorn 2 s), so a connection busy moments ago was not closed by one.
STALE_IDLE_S = 1.0


class StaleConnection(errors.UpstreamReset):
    """The keep-alive race: a pooled connection the upstream closed while it was idle.

    Raised only when all hold: the connection had served a request before, it sat
    idle in the pool for at least ``STALE_IDLE_S``, and it closed (FIN or RST)
    before a single byte of the response came back.  The upstream's keep-alive
    timeout then most likely fired just as this request went out, so the upstream
    never processed it.  ``StaleResend`` resends an idempotent request once, as a
    counted attempt.  Any other close before the head is a plain ``UpstreamReset``.
    """


def transport_error(exc: BaseException | None, upstream: str) -> errors.ProxyError:
    """The one mapping of a transport failure before the response head to what the app is told.

    A reset or a close (an ``OSError``, or no exception) is ``upstream_reset``; anything
    else the transport raises is ``upstream_protocol_error``.  The keep-alive race has its
    own type (``StaleConnection``), decided in ``H1Connection.connection_lost``.
    """
    if exc is None or isinstance(exc, OSError):
        return errors.UpstreamReset(f"connection to upstream {upstream} was reset before response headers")
    return errors.UpstreamProtocolError(f"upstream {upstream} failed: {type(exc).__name__}")


class _UnsupportedCoding(Exception):
    """Raised from the parser callback for a Transfer-Encoding other than chunked."""


class _Excess(Exception):
    """Raised from the parser callback when bytes follow a complete response."""


class _HeadDone(Exception):
    """Raised from the parser callback to stop parsing after a HEAD response's headers."""


class _HeadTooLarge(Exception):
    """Raised from the parser callback when the response head exceeds aiohttp's limits."""


class H1Connection(asyncio.Protocol):
    """One upstream connection; serves one request at a time."""

    def __init__(self, pool: H1Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[tuple[bytes, bytes]] = []  # as received (chain.FieldList)
        self._sidecar = False  # the head has an x-outrigger-* field (H1Response.sidecar_headers)
        self._has_length = False  # the head has a Content-Length field
        self._coding: bytes | None = None  # the head's (first) Transfer-Encoding value
        self._reason = ""
        self._head: asyncio.Future[H1Response] | None = None
        self._response: H1Response | None = None
        self._head_request = False
        self._informational = False
        self._keep_alive = True
        self._length_known = True  # Content-Length or chunked: the body does not end at EOF
        self._received = False  # any byte of the current response arrived
        self._head_bytes = 0  # bytes received before the current response's head was complete
        self._message_done = False
        self._stopped: Exception | None = None  # the stop a parser callback raised (see data_received)
        self._closed = False
        self._paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._last_data = 0.0
        self._idle_handle: asyncio.TimerHandle | None = None
        self._idle_target: asyncio.Future[Any] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._idle_s: float | None = None  # the route's idle (read gap) timeout for the current request
        self._fd = -1
        self._idled_s = 0.0  # how long the connection sat in the pool before the current request
        self._informational_cb: Informational | None = None  # forwards 1xx (not 101) to the app
        self._upgrading = False  # the current request asks for a protocol switch (request_upgrade)
        self._switched = False  # the upstream answered 101: bytes now flow raw to ``_pipe``
        self._pipe: Callable[[bytes], None] | None = None
        self._pipe_buffer: list[bytes] = []  # raw bytes that arrived before the pipe was attached
        self.on_pipe_closed: Callable[[], None] | None = None
        self.on_write_paused: Callable[[bool], None] | None = None  # tunnel backpressure towards the app
        self.idle_since = 0.0
        self.requests = 0  # requests sent on this connection, the current one included

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # The raw socket's descriptor, to read an early answer that a failed write left unread
        # (see _salvage); not for TLS, whose bytes the transport would have to decrypt.
        sock = transport.get_extra_info("socket")
        self._fd = sock.fileno() if sock is not None and transport.get_extra_info("sslcontext") is None else -1

    def switched(self) -> bool:
        """Whether a 101 switched this connection to a tunnel.

        A method, so that mypy does not carry a narrowing of ``_switched`` across a parser call
        that sets it: mypyc compiles what mypy infers (warn_unreachable guards against it).
        """
        return self._switched

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        if self._switched:  # after a 101 the bytes are the tunnel's, not HTTP
            self._to_pipe(data)
            return
        if self._message_done:  # the response was complete: whatever follows is not ours to parse
            self._excess()
            return
        self._received = True
        if self._response is None:
            self._head_bytes += len(data)
            if self._head_bytes > _MAX_HEAD_READ:
                self._broken(InvalidResponse("response head too large"))
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            # Which stop a callback asked for, as it recorded it: the error's __context__ is not
            # reliable (raising it while another exception is being handled replaces it).
            stopped, self._stopped = self._stopped, None
            if isinstance(stopped, _Excess):
                self._excess()
            elif isinstance(stopped, _HeadDone):
                self._parser = httptools.HttpResponseParser(self)  # a HEAD response ends at its headers
            elif isinstance(stopped, _HeadTooLarge):
                self._broken(InvalidResponse("response head too large"))
            else:
                self._broken(exc)
        except httptools.HttpParserUpgrade as exc:
            if self.switched():  # (on_headers_complete may have set it during feed_data)
                rest = data[exc.args[0]:] if exc.args else b""
                if rest:
                    self._to_pipe(rest)
            else:
                self._broken(InvalidResponse("unexpected protocol upgrade"))
        except httptools.HttpParserError as exc:
            self._broken(InvalidResponse(str(exc)))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles what was in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.transport = None
        if exc is not None and self._head is not None and not self._head.done():
            self._salvage()
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        head = self._head
        if head is not None and not head.done():
            where = f"upstream {self.pool.name}"
            if self._received:
                head.set_exception(transport_error(exc, self.pool.name))
            elif self.requests > 1 and self._idled_s >= STALE_IDLE_S:
                head.set_exception(StaleConnection(
                    f"{where} closed a reused keep-alive connection before sending response headers"))
            else:
                head.set_exception(errors.UpstreamReset(
                    f"{where} closed the connection before sending response headers"))
        response = self._response
        if response is not None and not self._message_done:
            if not self._length_known and exc is None:
                self._message_done = True  # a close-delimited body ends here
                response.finish()
            else:
                response.fail(UpstreamBodyError("upstream closed the connection before the response body ended"))
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("upstream connection lost"))
        if self._switched and self.on_pipe_closed is not None:
            callback, self.on_pipe_closed = self.on_pipe_closed, None
            callback()
        self.pool.connection_closed(self)

    def _salvage(self) -> None:
        """Read what the upstream sent before the connection broke under a write.

        An upstream may answer early (413 and ``Connection: close`` after the head alone)
        and then close with the body unread, which resets the connection.  When our next
        write fails first, the transport gives up before reading, yet the answer is in the
        socket's receive queue, ahead of the reset: that answer wins over the failed write,
        as it does for curl.  Both asyncio and uvloop close the socket only after
        ``connection_lost`` returns, so the descriptor is still this connection's.
        """
        fd, self._fd = self._fd, -1
        while fd >= 0 and not self._message_done:
            try:
                data = os.read(fd, 256 * 1024)
            except OSError:  # nothing more queued (BlockingIOError), or the reset itself
                return
            if not data:
                return
            self.data_received(data)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.on_write_paused is not None:
            self.on_write_paused(True)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.on_write_paused is not None:
            self.on_write_paused(False)
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # --- httptools callbacks ---

    def _stop(self, reason: Exception) -> Exception:
        """Record why a callback stops the parser, and return the exception to raise."""
        self._stopped = reason
        return reason

    def on_message_begin(self) -> None:
        if self._message_done:  # bytes past the end of the response in the same read
            raise self._stop(_Excess())
        self._headers = []
        self._sidecar = False
        self._has_length = False
        self._coding = None

    # Decoded as aiohttp does (UTF-8, undecodable bytes kept as surrogates), so values reach
    # the app byte for byte.
    def on_status(self, status: bytes) -> None:
        if len(status) > _MAX_FIELD:
            raise self._stop(_HeadTooLarge())
        self._reason = status.decode("utf-8", "surrogateescape")

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) > _MAX_FIELD or len(value) > _MAX_FIELD or len(self._headers) >= _MAX_HEADERS:
            raise self._stop(_HeadTooLarge())
        kind = _FIELD_KINDS.get(name)
        if kind is None:
            kind = _field_kind(name)
        if kind != _OTHER:
            if kind == _SIDECAR_FIELD:
                self._sidecar = True
            elif kind == _LENGTH_FIELD:
                self._has_length = True
            elif self._coding is None:
                self._coding = value
        # Kept as bytes: decoded (UTF-8, undecodable bytes as surrogates) only if something reads them.
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        if status == 101 and self._upgrading:
            self._switched = True  # from the end of this head on, bytes belong to the tunnel
            response = self._response = H1Response(self, status, self._reason, FieldList(self._headers))
            response.sidecar_headers = self._sidecar
            if self._head is not None and not self._head.done():
                self._head.set_result(response)
            return
        if 100 <= status < 200:
            self._informational = True  # 100 Continue and friends: wait for the real response
            if self._informational_cb is not None and status != 101:
                self._informational_cb(status, self._reason, decode_fields(self._headers))
            self._reason = ""
            return
        coding = self._coding
        if coding is not None and coding.strip().lower() != b"chunked":
            # gzip, deflate...: the app could not tell it gets a coded body once the header is gone.
            raise self._stop(_UnsupportedCoding())
        self._keep_alive = parser.should_keep_alive()
        no_body = self._head_request or status in _NO_BODY_STATUS
        self._length_known = no_body or self._has_length or coding is not None  # chunked
        response = self._response = H1Response(self, status, self._reason, FieldList(self._headers))
        response.sidecar_headers = self._sidecar
        head = self._head
        if head is not None and not head.done():
            head.set_result(response)
        if self._head_request:
            self._message_done = True
            response.finish()
            raise self._stop(_HeadDone())

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response.feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._message_done = True
        if self._response is not None:
            self._response.finish()

    # --- flow control and timers ---

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    async def wait_idle(self, waiter: asyncio.Future[Any]) -> None:
        """Await ``waiter``; fail it when nothing arrives for the pool's idle timeout."""
        idle = self._idle_s
        if idle is None:
            await waiter
            return
        self._idle_target = waiter
        self._idle_handle = self.loop.call_at(self._last_data + idle, self._idle_check)
        try:
            await waiter
        finally:
            self._idle_target = None
            if self._idle_handle is not None:
                self._idle_handle.cancel()
                self._idle_handle = None

    def _idle_check(self) -> None:
        self._idle_handle = None
        target = self._idle_target
        if target is None or target.done():
            return
        idle = self._idle_s
        assert idle is not None
        due = self._last_data + idle
        if self.loop.time() < due:  # data came meanwhile: wait for the rest of the gap
            self._idle_handle = self.loop.call_at(due, self._idle_check)
            return
        if self._response is not None:  # reading the body: the head is bounded by the attempt timeout
            self._response.fail(UpstreamBodyTimeout("upstream sent nothing within the idle timeout"))
            self._response._wake()
        self.close()

    def _excess(self) -> None:
        """More bytes than the response's framing said: this connection can never be trusted again.

        The excess may look like the next response, which would then be taken as the
        answer to a request it never saw; nginx discards the connection, and so do we.
        The response already read is whole and stays good.
        """
        if self._closed:
            pass
        elif self._head is None and self._response is None:  # idle in the pool (a 408 before its close...)
            log.info("upstream sent unsolicited data on an idle keep-alive connection; closing it",
                     extra={"upstream": self.pool.name})
        else:
            log.warning("upstream sent more data than specified in Content-Length; closing the connection",
                        extra={"upstream": self.pool.name})
        self._keep_alive = False
        self.close()

    def _broken(self, error: BaseException) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(errors.UpstreamProtocolError(
                f"upstream {self.pool.name} sent an invalid HTTP response"))
        elif self._response is not None:
            broken = UpstreamBodyProtocolError(f"response body broke off: {type(error).__name__}")
            broken.__cause__ = error
            self._response.fail(broken)
        self.close()

    # --- one request ---

    async def request(self, head: bytes, body: bytes | AsyncIterator[bytes] | None, *,
                      chunked: bool, head_request: bool, idle_s: float | None,
                      informational: Informational | None = None) -> H1Response:
        """Send one request; its response once the head is parsed.

        ``idle_s`` bounds every gap between reads of the body; the wait for the head is
        bounded by the caller (the attempt timeout), as ``timeout.idle`` is documented.
        """
        transport = self.transport
        if transport is None or self._closed:
            raise transport_error(None, self.pool.name)
        now = self.loop.time()
        self._idled_s = now - self.idle_since if self.requests else 0.0
        self.requests += 1
        self._headers = []
        self._sidecar = False
        self._has_length = False
        self._coding = None
        self._response = None
        self._message_done = False
        self._received = False
        self._head_bytes = 0
        self._head_request = head_request
        self._idle_s = idle_s
        self._informational = False
        self._informational_cb = informational
        self._last_data = now
        future: asyncio.Future[H1Response] = self.loop.create_future()
        self._head = future
        if body is None or isinstance(body, bytes):
            transport.write(head + body if body else head)
        else:
            transport.write(head)
            self._sender = self.loop.create_task(self._send(body, chunked, future))
        try:
            return await future
        except BaseException:
            self.close()
            raise
        finally:
            self._head = None

    async def _send(self, body: AsyncIterator[bytes], chunked: bool, head: asyncio.Future[H1Response]) -> None:
        try:
            async for chunk in body:  # the app's stream: what it raises is the app side's failure
                if self.transport is None:
                    return  # connection_lost settled the head (a reset, or an early answer that wins)
                if not chunk:
                    continue
                if chunked:
                    self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    self.transport.write(chunk)
                if self._write_paused:
                    self._drain = self.loop.create_future()
                    try:
                        await self._drain
                    except ConnectionError:
                        return  # the socket broke: connection_lost already settled the head
            if chunked and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        except asyncio.CancelledError:
            raise
        except errors.ProxyError as exc:  # e.g. the app's body grew past limits.max_body_bytes
            if not head.done():
                head.set_exception(exc)
            self.close()
        except Exception as exc:
            # Not the upstream's doing (socket failures end in connection_lost, never here): the
            # request fails as an internal error, never as upstream_reset, and is not retried.
            if not head.done():
                failed = UploadFailed(f"reading the request body to send upstream failed: {type(exc).__name__}")
                failed.__cause__ = exc
                head.set_exception(failed)
            self.close()
        finally:
            self._sender = None

    # --- one upgrade (a dedicated connection, never pooled) ---

    async def request_upgrade(self, head: bytes, informational: Informational | None = None) -> H1Response:
        """Send an upgrade request; its response once the head is parsed.

        A 101 turns this connection into a raw pipe (``attach_pipe``); any other
        answer is an ordinary response whose body is read as usual.
        """
        self._upgrading = True
        return await self.request(head, None, chunked=False, head_request=False, idle_s=None,
                                  informational=informational)

    def attach_pipe(self, sink: Callable[[bytes], None]) -> None:
        """After a 101: every byte from the upstream goes to ``sink`` (those already here first)."""
        self._pipe = sink
        buffered, self._pipe_buffer = self._pipe_buffer, []
        for chunk in buffered:
            sink(chunk)

    def _to_pipe(self, data: bytes) -> None:
        if self._pipe is not None:
            self._pipe(data)
        else:
            self._pipe_buffer.append(data)

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_eof(self) -> None:
        if self.transport is not None and self.transport.can_write_eof():
            self.transport.write_eof()

    def response_released(self, body_read: bool) -> None:
        if self._upgrading:  # an upgrade's dedicated connection is never pooled
            self.close()
            return
        if body_read and self._message_done and self._keep_alive and self._sender is None and not self._closed:
            self._response = None
            self.resume_reading()  # a body that outgrew the buffer in its last read paused the transport
            self.pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if not self._closed:
            self._closed = True
            # connection_lost follows from the loop; the pool forgets this connection now
            self.pool.connection_closed(self)

    @property
    def alive(self) -> bool:
        return not self._closed and self.transport is not None and not self.transport.is_closing()
