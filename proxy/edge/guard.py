"""Request-target and request-line rules applied before any route or policy runs.

Pure functions used by ``proxy.edge.protocol`` (parse errors, extension
methods) and ``proxy.edge.exchange`` (targets).  Nothing here does I/O.
"""

from __future__ import annotations

import re
from typing import Final

from proxy import errors

__all__ = ["describe_parse_error", "extension_method", "origin_path"]

# A '.' or '..' segment, with the dots or the separators percent-encoded or as backslashes
# (some upstreams decode %2F or treat '\' as '/', and would then walk up the tree), and with
# a ';' path parameter after it (Tomcat, Jetty and Spring resolve '..;' as '..').
_DOT_SEGMENT: Final = re.compile(r"(?:^|/|\\|%2f|%5c)(?:\.|%2e){1,2}(?:(?:;|%3b)[^/\\]*)?(?:$|/|\\|%2f|%5c)",
                          re.IGNORECASE)
# An absolute-form target: scheme "://" authority, then the path (RFC 9112 §3.2.2).
_ABSOLUTE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token: a method name


def origin_path(target: str) -> str:
    """The origin-form target (path and query) a request is routed and forwarded by.

    An absolute-form target is accepted by its path alone: its authority never
    selects a destination, only the configured upstream is ever contacted.
    """
    if not target.startswith("/"):
        match = _ABSOLUTE.match(target)
        if match is None:
            raise errors.BadRequest("asterisk-form and authority-form request targets are not accepted; "
                                    "send origin-form paths to the listener")
        rest = target[match.end():]
        target = rest if rest.startswith("/") else "/" + rest
    path = target.partition("?")[0]
    if ("." in path or "%" in path or "\\" in path) and _DOT_SEGMENT.search(path):  # most paths skip the regex
        raise errors.BadRequest("request path must not contain '.' or '..' segments")
    return target


_TLS_RECORD: Final = (b"\x16\x03",)


def describe_parse_error(reason: str, data_start: bytes) -> str:
    """Why a request did not parse, in llhttp's fixed words (which never quote the request)."""
    if data_start.startswith(_TLS_RECORD):
        return "TLS handshake received on a plain-HTTP listener"
    return reason.rstrip(".") or "unparsable request"


def extension_method(data: bytes, completed: list[int]) -> tuple[str, bytes] | None:
    """(method, the rest from its request line's first space) of a request llhttp refused for its method.

    ``completed`` holds the body lengths of the requests that completed earlier
    in ``data`` (-1: chunked, whose end is not known here, so nothing is found).
    """
    start = 0
    for length in completed:
        end = data.find(b"\r\n\r\n", start)
        if length < 0 or end < 0:
            return None
        start = end + 4 + length
    while data.startswith(b"\r\n", start):
        start += 2
    space = data.find(b" ", start)
    token = data[start:space]
    if space < 0 or not TOKEN.fullmatch(token):
        return None
    return token.decode("ascii"), data[space:]
