"""The listener's HTTP/1 connection handler, hardened against bad input from the app side.

It sits below ``proxy.server.EdgeHandler``: aiohttp's parser turns bytes into
request heads here, before any route or policy runs, and this module decides
what happens when that goes wrong.

- A request that does not parse becomes an Outrigger error (400
  ``bad_request``; 431 ``headers_too_large`` for an over-long line, too many
  fields or an oversized head) whose message never quotes the request: aiohttp's
  default error body echoes the offending line, header values included.
- ``limits.max_header_bytes`` bounds the whole head (request line and every
  field), as Go's ``MaxHeaderBytes`` does; aiohttp itself bounds only each line.
- ``limits.header_read_timeout`` closes a connection whose request head is not
  complete that long after its first byte (slowloris), or that sends nothing
  at all that long after it was accepted.  aiohttp has no such timeout.

Cost on well-formed traffic: a few attribute reads per socket read.  The timer
is armed only when a head spans several reads, the head-size sum is computed
only then or when one read is larger than the limit.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from proxy import errors
from proxy.config import LimitsConfig

if TYPE_CHECKING:
    from aiohttp.http_parser import RawRequestMessage

    from proxy.server import EdgeHandler

__all__ = ["GuardedServer", "describe_parse_error"]

log = logging.getLogger("outrigger.server")

_VERSIONS = frozenset({HttpVersion10, HttpVersion11})
_TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's message when max_headers is exceeded
# aiohttp messages that name only a fixed header, never request bytes.
_STATIC_MESSAGE = re.compile(r"Duplicate '[A-Za-z-]+' header found\.|Missing 'Host' header in request\.")


class HeadTooLarge(BadHttpMessage):
    """The request line and header fields together exceed ``limits.max_header_bytes``."""


class UnsupportedVersion(BadHttpMessage):
    def __init__(self) -> None:
        super().__init__("HTTP version not supported; send HTTP/1.0 or HTTP/1.1")


def describe_parse_error(exc: BaseException | None) -> str:
    """Why a request did not parse, in words that never quote the request itself."""
    if isinstance(exc, BadHttpMethod) and exc.message.startswith("Received HTTPS"):
        return "TLS handshake received on a plain-HTTP listener"
    if isinstance(exc, InvalidHeader):
        return "invalid header field"
    if isinstance(exc, UnsupportedVersion):
        return exc.message
    message = exc.message if isinstance(exc, HttpProcessingError) else ""
    reason, excerpt, _ = message.partition(":\n\n")
    if excerpt:
        # llhttp: "<fixed reason>:\n\n  <excerpt of the request bytes>\n  ^" — keep only the reason.
        return " ".join(reason.split())
    if isinstance(exc, InvalidURLError):
        return "invalid request target"
    if _STATIC_MESSAGE.fullmatch(message):
        return message.rstrip(".")
    if isinstance(exc, BadStatusLine):
        return "invalid request line"
    return "unparsable request"


def _unsupported_version() -> tuple[_ErrInfo, StreamReader]:
    """llhttp also parses HTTP/0.9 (no headers) and 2.0 over HTTP/1 framing; only 1.0 and 1.1 are served."""
    return _ErrInfo(status=400, exc=UnsupportedVersion(), message=""), EMPTY_PAYLOAD


def _head_size(message: RawRequestMessage) -> int:
    """Bytes of a parsed head, as sent: request line, fields with ': ' and CRLFs, the blank line."""
    size = len(message.method) + len(message.path) + 13
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4
    return size


class _Guard:
    """What every connection of one listener shares: the edge and the limits."""

    __slots__ = ("edge", "header_timeout_s", "max_head", "max_headers")

    def __init__(self, edge: EdgeHandler, limits: LimitsConfig) -> None:
        self.edge = edge
        self.header_timeout_s = float(limits.header_read_timeout)
        self.max_head = int(limits.max_header_bytes)
        self.max_headers = limits.max_headers

    def to_error(self, status: int, exc: BaseException | None) -> errors.ProxyError:
        if isinstance(exc, HeadTooLarge | LineTooLong):
            return errors.HeadersTooLarge(f"request head exceeds limits.max_header_bytes ({self.max_head} bytes)")
        if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
            return errors.HeadersTooLarge(f"request has more than limits.max_headers ({self.max_headers}) "
                                          "header fields")
        if isinstance(exc, HttpProcessingError) or status == 400:
            return errors.BadRequest(f"malformed HTTP request: {describe_parse_error(exc)}")
        if status == 504:
            return errors.DeadlineExceeded("request handler timed out")
        return errors.Internal("internal error")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with Outrigger's parse-error responses and head limits."""

    __slots__ = ("_body", "_guard", "_head_bytes", "_head_timer", "_rejected")

    def __init__(self, manager: web.Server, *, guard: _Guard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes of the head being read, counted while it spans reads
        self._body: StreamReader | None = None  # payload of the last parsed head
        self._rejected = False

    # --- header read timeout (slowloris) ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm()  # a connection that never sends a complete head is closed too

    def _arm(self) -> None:
        loop = self._loop
        self._head_timer = loop.call_at(loop.time() + self._guard.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close or self._close:
            return
        log.debug("closing a connection whose request head did not arrive within limits.header_read_timeout "
                 "(%gs)", self._guard.header_timeout_s)
        self._guard.edge.record_refusal(408, "header_timeout")
        if self._request_in_progress:
            self.close()  # a pipelined request still in flight finishes first
        else:
            self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body = None
        super().connection_lost(exc)

    # --- parsing ---

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close or self._rejected:
            return
        pending = self._head_timer is not None
        body = self._body
        fresh = not pending and self._payload_parser is None and not self._upgraded \
            and (body is None or body.is_eof())
        count = self._request_count
        super().data_received(data)
        done = self._request_count - count
        if done:
            if pending:
                self._head_timer.cancel()  # type: ignore[union-attr]
                self._head_timer = None
            messages = self._messages
            if messages:
                last, self._body = messages[-1]
                if done > 1 or self._head_bytes or len(data) > self._guard.max_head:
                    self._check_heads(done)  # rare: pipelined, split over reads, or a large read
                elif last.__class__ is not _ErrInfo and last.version not in _VERSIONS:  # type: ignore[union-attr]
                    messages[-1] = _unsupported_version()
            else:
                self._body = None
            self._head_bytes = 0
        elif pending:
            self._head_bytes += len(data)
            if self._head_bytes > self._guard.max_head:
                self._reject_head()
        elif fresh and data and self._payload_parser is None and not self._upgraded:
            # The first bytes of a head that did not complete in this read: time the rest.
            self._head_bytes = len(data)
            self._arm()

    def _check_heads(self, done: int) -> None:
        """Head size (request line and fields together) and HTTP version of the heads just parsed."""
        messages = self._messages
        limit = self._guard.max_head
        for index in range(max(0, len(messages) - done), len(messages)):
            message = messages[index][0]
            if isinstance(message, _ErrInfo):
                continue
            if _head_size(message) > limit:
                messages[index] = (_ErrInfo(status=431, exc=HeadTooLarge("request head too large"), message=""),
                                   EMPTY_PAYLOAD)
                return
            if message.version not in _VERSIONS:
                messages[index] = _unsupported_version()
                return

    def _reject_head(self) -> None:
        """Answer 431 now rather than buffer the rest of an oversized head."""
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._rejected = True  # whatever else arrives is not parsed
        self._messages.append((_ErrInfo(status=431, exc=HeadTooLarge("request head too large"), message=""),
                               EMPTY_PAYLOAD))
        self._request_count += 1
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- error responses ---

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A parse error (or, defensively, an error escaping the edge) as an Outrigger JSON error."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error response")
        if isinstance(exc, HttpProcessingError):
            # Bad input from a client is not an Outrigger fault: no traceback in the logs
            # (a misbehaving app could flood them); the metric and access log record it.
            log.debug("refused an unparsable request: %s", describe_parse_error(exc))
        else:
            self.log_exception("error handling request", exc_info=exc)
        error = self._guard.to_error(status, exc)
        return self._guard.edge.refuse(error)


class GuardedServer(web.Server):
    """``web.Server`` whose connections are ``GuardedRequestHandler``s."""

    def __init__(self, handler: EdgeHandler, limits: LimitsConfig, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._guard = _Guard(handler, limits)

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, guard=self._guard, loop=self._loop, **self._kwargs)
