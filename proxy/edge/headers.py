"""Header rules at the edge: hop-by-hop removal, forwarding, ids, overrides.

Pure functions over multidicts, used by ``proxy.edge`` in both directions.
Nothing here does I/O, so the rules are unit-tested directly.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict, MultiMapping, istr

from proxy.errors import BadRequest

__all__ = [
    "ATTEMPTS_HEADER", "MAX_ATTEMPTS_HEADER", "REQUEST_ID_HEADER", "TIMEOUT_HEADER", "connection_listed",
    "connection_names", "parse_overrides", "request_id", "response_headers", "strip_sidecar_headers",
    "upstream_headers", "valid_traceparent",
]

REQUEST_ID_HEADER: Final = "x-request-id"
TIMEOUT_HEADER: Final = "x-outrigger-timeout-ms"
MAX_ATTEMPTS_HEADER: Final = "x-outrigger-max-attempts"
ATTEMPTS_HEADER: Final = "x-outrigger-attempts"
# Keys the request path looks up on every request, as istr: a multidict compares an istr key
# without lower-casing it first (about 30 ns less per lookup, some twenty lookups a request).
HOST: Final = istr("Host")
CONNECTION: Final = istr("Connection")
CONTENT_LENGTH: Final = istr("Content-Length")
TRANSFER_ENCODING: Final = istr("Transfer-Encoding")
EXPECT: Final = istr("Expect")
X_FORWARDED_FOR: Final = istr("X-Forwarded-For")
X_FORWARDED_PROTO: Final = istr("X-Forwarded-Proto")
X_FORWARDED_HOST: Final = istr("X-Forwarded-Host")
_REQUEST_ID_KEY: Final = istr(REQUEST_ID_HEADER)
_TIMEOUT_KEY: Final = istr(TIMEOUT_HEADER)
_MAX_ATTEMPTS_KEY: Final = istr(MAX_ATTEMPTS_HEADER)
# Response headers with this prefix are Outrigger's word to the app (x-outrigger-error, -fallback,
# -attempts): only the sidecar may set them, so an upstream's own are dropped.
SIDECAR_PREFIX: Final = "x-outrigger-"

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
# Headers meant for Outrigger itself; they never travel upstream.  The edge answers
# ``Expect: 100-continue`` and the upstream call sets its own Host.
_CONTROL: Final = frozenset({TIMEOUT_HEADER, MAX_ATTEMPTS_HEADER, "host", "expect"})
# fullmatch, not match: ``$`` would also accept a trailing newline.
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# ASCII only: str.isdigit() and float() also accept "²", "1_0" or "inf", which are not header syntax.
_MILLIS: Final = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,3})?")
_ATTEMPTS: Final = re.compile(r"[0-9]{1,3}")
_MAX_TIMEOUT_MS: Final = 24 * 3600 * 1000
_random_bits: Final = random.Random(os.urandom(32)).getrandbits


def connection_names(value: str) -> frozenset[str]:
    """The lower-cased names one ``Connection`` value lists."""
    return frozenset(token.strip().lower() for token in value.split(",") if token.strip())


def connection_listed(headers: MultiMapping[str]) -> frozenset[str]:
    """Lower-cased header names the ``Connection`` header lists (they are hop-by-hop too)."""
    values = headers.getall(CONNECTION, ())
    if len(values) == 1:  # the usual case, and the usual few values: parsed once each
        cached = _LISTED.get(values[0])
        if cached is not None:
            return cached
    listed = frozenset().union(*map(connection_names, values))
    if len(values) == 1 and len(_LISTED) < 256:  # bounded: made-up values cannot grow it without end
        _LISTED[values[0]] = listed
    return listed


_LISTED: Final[dict[str, frozenset[str]]] = {}  # one Connection value -> the names it lists


def _is_hop(name: str, listed: frozenset[str]) -> bool:
    lower = name.lower()
    return lower in HOP_BY_HOP or lower.startswith("proxy-") or lower in listed


def request_id(headers: MultiMapping[str]) -> str:
    """The caller's x-request-id when well-formed, else a fresh one (never echo garbage)."""
    value = headers.get(_REQUEST_ID_KEY)
    if value is not None and _REQUEST_ID.fullmatch(value):
        return value
    return new_request_id()


def new_request_id() -> str:
    """128 random bits as 32 hex digits, like ``uuid4().hex`` at a fraction of the cost.

    An id, not a secret: a PRNG seeded from the OS is enough, and spares a syscall per request.
    ``int.to_bytes(...).hex()`` is fixed-width and about half the cost of ``f"{n:032x}"``.
    """
    return _random_bits(128).to_bytes(16, "big").hex()


def valid_traceparent(value: str) -> bool:
    """W3C trace-context syntax, with the all-zero ids and version ff ruled out."""
    return bool(_TRACEPARENT.fullmatch(value)) and value[3:35] != "0" * 32 and value[36:52] != "0" * 16 \
        and not value.startswith("ff")


_FORWARD: Final = 0
_DROP: Final = 1
_TRACE: Final = 2
_REQUEST_KINDS: Final[dict[str, int]] = {}  # request header name as the app spells it -> what happens to it


def _request_kind(name: str) -> int:
    """Classify a request header name once (apps send the same few names on every request)."""
    lower = name.lower()
    kind = _DROP if lower in _CONTROL or lower in HOP_BY_HOP or lower.startswith("proxy-") else \
        _TRACE if lower == "traceparent" else _FORWARD
    if len(_REQUEST_KINDS) < 4096:  # bounded: an app inventing names cannot grow it without end
        _REQUEST_KINDS[name] = kind
    return kind


def upstream_headers(incoming: MultiMapping[str], *, client_ip: str | None, host: str | None,
                     rid: str, scheme: str = "http") -> CIMultiDict[str]:
    """The app's headers as the upstream should see them."""
    listed = connection_listed(incoming) if CONNECTION in incoming else None
    kept: list[tuple[str, str]] = []  # one CIMultiDict from a list: cheaper than an add() per field
    kinds = _REQUEST_KINDS
    for name, value in incoming.items():
        kind = kinds.get(name)
        if kind is None:
            kind = _request_kind(name)
        if kind == _DROP or (listed is not None and name.lower() in listed):
            continue
        if kind == _TRACE and not valid_traceparent(value):
            continue  # malformed trace context is dropped, not forwarded
        kept.append((name, value))
    out: CIMultiDict[str] = CIMultiDict(kept)
    if client_ip:
        prior = incoming.getall(X_FORWARDED_FOR, ())
        out[X_FORWARDED_FOR] = ", ".join((*prior, client_ip))
    out[X_FORWARDED_PROTO] = scheme
    if host:
        out[X_FORWARDED_HOST] = host
    out[_REQUEST_ID_KEY] = rid
    return out


def response_headers(upstream: Iterable[tuple[str, str]], listed: frozenset[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream:
        if not _is_hop(name, listed):
            out.add(name, value)
    return out


def strip_sidecar_headers(headers: CIMultiDict[str]) -> None:
    """Drop every ``x-outrigger-*`` header an upstream sent, so it cannot forge the sidecar's.

    Applied where an upstream's response enters the chain (``UpstreamCall``), not in
    ``response_headers``: the edge also passes the fallback policy's own response through
    that, and its ``x-outrigger-fallback`` must survive.
    """
    prefix = len(SIDECAR_PREFIX)
    forged = {name for name in headers if name[:1] in "xX" and name[:prefix].lower() == SIDECAR_PREFIX}
    for name in forged:
        del headers[name]


def parse_overrides(headers: MultiMapping[str]) -> tuple[float | None, int | None]:
    """(timeout seconds, max attempts) from the override headers; 400 on garbage."""
    timeout_s: float | None = None
    attempts: int | None = None
    raw = headers.get(_TIMEOUT_KEY)
    if raw is not None:
        text = raw.strip()
        value = float(text) if _MILLIS.fullmatch(text) else 0.0
        if not 0 < value <= _MAX_TIMEOUT_MS:
            raise BadRequest(f"header {TIMEOUT_HEADER} must be a positive number of milliseconds "
                             f"up to {_MAX_TIMEOUT_MS}")
        timeout_s = value / 1000.0
    raw = headers.get(_MAX_ATTEMPTS_KEY)
    if raw is not None:
        text = raw.strip()
        if not _ATTEMPTS.fullmatch(text) or not 1 <= int(text) <= 100:
            raise BadRequest(f"header {MAX_ATTEMPTS_HEADER} must be an integer from 1 to 100")
        attempts = int(text)
    return timeout_s, attempts
