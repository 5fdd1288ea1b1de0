"""W3C Trace Context (Level 2): parsing ``traceparent``/``tracestate`` and what goes upstream.

Sits at the edge, before the SERVER span: ``extract`` reads the app's
headers once per request, ``Tracing.begin`` (``proxy.telemetry.tracing``)
decides on recording, and ``TraceHeaders.apply`` writes the outgoing pair into
the upstream request's headers.  The CLIENT span of each attempt then swaps in
its own span id (``with_parent_id``).

Outrigger parses both headers itself instead of using the OpenTelemetry SDK's
propagator, whose ``tracestate`` key grammar predates the current spec (it
rejects keys such as ``1foo`` and ``foo@``) and which keeps only the first of
several ``tracestate`` header lines.  The rules, from the spec:

- exactly one ``traceparent`` line, else the trace restarts;
- versions other than ``00`` (and not ``ff``) are read by the ``00`` prefix
  rules; anything after the flags must start with ``-``;
- ``tracestate`` is read only beside a valid ``traceparent``; several lines
  are combined in order; empty members are skipped; a list with an invalid
  member or more than 32 members is discarded whole (a restart drops it too);
- rejected input is never logged verbatim: at most one line per interval
  names the reason.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, TypeAlias

from multidict import MultiMapping, MutableMultiMapping, istr

from proxy.logs import LogLimiter

if TYPE_CHECKING:
    from opentelemetry.trace import SpanContext

__all__ = [
    "MAX_MEMBERS", "RANDOM", "SAMPLED", "Headers", "MutableHeaders", "TraceHeaders", "TraceParent", "extract",
    "format_traceparent", "new_trace_id", "parse_traceparent", "parse_tracestate", "pass_through", "span_id_hex",
    "trace_id_hex", "traceparent_of", "unrecorded_traceparent", "with_parent_id",
]

log: Final = logging.getLogger("outrigger.tracing")

TRACEPARENT: Final = istr("traceparent")  # istr: looked up on every request (see proxy.edge.headers.HOST)
TRACESTATE: Final = istr("tracestate")
MAX_MEMBERS: Final = 32
SAMPLED: Final = 0x01
RANDOM: Final = 0x02  # Level 2: the trace id's right-most 7 bytes are random
_OWS: Final = " \t"
_HEX: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_MEMBER: Final = re.compile(
    r"[a-z0-9][a-z0-9_\-*/@]{0,255}"  # key = ( lcalpha / DIGIT ) 0*255 ( keychar )
    r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]"  # value = 0*255(chr) nblk-chr
)
_random_bits: Final = random.Random(os.urandom(32)).getrandbits
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_FLAG_TEXT: Final = tuple(f"{flags:02x}" for flags in range(256))
_rejections: Final = LogLimiter(log, interval_s=60.0)
Headers: TypeAlias = MultiMapping[str]
MutableHeaders: TypeAlias = MutableMultiMapping[str]


class TraceParent:
    """A parsed ``traceparent``: the app's trace id, its span id and flags."""

    __slots__ = ("flags", "raw", "span_id", "trace_id")

    def __init__(self, raw: str, trace_id: str, span_id: str, flags: int) -> None:
        self.raw = raw  # as received, OWS stripped: what a pass-through forwards
        self.trace_id = trace_id
        self.span_id = span_id
        self.flags = flags

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)


def parse_traceparent(values: Sequence[str]) -> TraceParent | None:
    """The one ``traceparent`` line, or None (missing, duplicated or malformed: restart)."""
    if len(values) != 1:
        if len(values) > 1:
            _rejections.info("duplicated", "a request carried several traceparent headers; "
                                           "the trace was restarted as the spec requires")
        return None
    value = values[0].strip(_OWS)
    head = value[:55]
    if len(value) < 55 or not _HEX.fullmatch(head):
        _rejections.info("traceparent", "a malformed traceparent header was replaced by a new trace")
        return None
    version, trace_id, span_id = head[:2], head[3:35], head[36:52]
    if version == "ff" or (version == "00" and len(value) != 55) or (len(value) > 55 and value[55] != "-") \
            or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        _rejections.info("traceparent", "a malformed traceparent header was replaced by a new trace")
        return None
    return TraceParent(value, trace_id, span_id, int(head[53:55], 16))


def parse_tracestate(values: Sequence[str]) -> str | None:
    """The combined ``tracestate`` lines as one value, or None when empty or discarded."""
    if not values:
        return None
    members: list[str] = []
    keys: set[str] = set()
    for line in values:
        for member in line.split(","):
            member = member.strip(_OWS)
            if not member:
                continue  # empty and whitespace-only members are allowed, and not sent on
            if not _MEMBER.fullmatch(member):
                _rejections.info("tracestate", "a tracestate list with an invalid member was discarded")
                return None
            key = member.partition("=")[0]
            if key in keys:
                continue  # a duplicated key: the first (left-most) one stands
            keys.add(key)
            members.append(member)
            if len(members) > MAX_MEMBERS:
                _rejections.info("tracestate_size", f"a tracestate list of more than {MAX_MEMBERS} members "
                                                    "was discarded")
                return None
    return ",".join(members) or None


def extract(headers: Headers) -> tuple[TraceParent | None, str | None]:
    """(parent, tracestate) from the app's headers; tracestate only beside a valid parent."""
    parent = parse_traceparent(headers.getall(TRACEPARENT, ()))
    if parent is None:
        return None, None
    return parent, parse_tracestate(headers.getall(TRACESTATE, ()))


def format_traceparent(trace_id: str, span_id: str, flags: int) -> str:
    """A version-00 ``traceparent``: the highest version this implementation knows."""
    return f"00-{trace_id}-{span_id}-{_FLAG_TEXT[flags & 0xff]}"


# Ids as hex: int.to_bytes().hex() is fixed-width and about half the cost of a format spec.
def trace_id_hex(trace_id: int) -> str:
    return trace_id.to_bytes(16, "big").hex()


def span_id_hex(span_id: int) -> str:
    return span_id.to_bytes(8, "big").hex()


def traceparent_of(context: SpanContext) -> str:
    """The ``traceparent`` that names the span of ``context`` as the parent."""
    return format_traceparent(trace_id_hex(context.trace_id), span_id_hex(context.span_id), int(context.trace_flags))


def unrecorded_traceparent(trace_id: str | None, flags: int) -> str:
    """A ``traceparent`` for a request that is not recorded: the trace (a new one for None), a fresh span id.

    This runs for every unsampled request: one draw from a PRNG seeded by the OS for both
    ids (ids, not secrets; the OTel SDK's id generator does the same), no syscall.
    """
    while True:
        # to_bytes().hex(): fixed width, and about half the cost of a format spec
        raw = _random_bits(64).to_bytes(8, "big").hex() if trace_id is not None \
            else _random_bits(192).to_bytes(24, "big").hex()
        span_id, new_trace = raw[:16], raw[16:]
        if span_id != _ZERO_SPAN and new_trace != _ZERO_TRACE:
            return f"00-{trace_id or new_trace}-{span_id}-{_FLAG_TEXT[flags & 0xff]}"


def with_parent_id(traceparent: str, span_id: int) -> str:
    """``traceparent`` (version 00) with its parent id replaced by ``span_id``."""
    return f"{traceparent[:36]}{span_id_hex(span_id)}{traceparent[52:]}"


def new_trace_id() -> str:
    """32 random hex digits, never all zero: a trace id whose random flag may be set."""
    while True:
        value = trace_id_hex(_random_bits(128))
        if value != _ZERO_TRACE:
            return value


class TraceHeaders:
    """The ``traceparent``/``tracestate`` pair one request sends upstream (None: send none)."""

    __slots__ = ("traceparent", "tracestate")

    def __init__(self, traceparent: str | None, tracestate: str | None) -> None:
        self.traceparent = traceparent
        self.tracestate = tracestate if traceparent is not None else None

    def apply(self, headers: MutableHeaders) -> None:
        """Replace whatever the app sent with exactly this pair."""
        headers.popall(TRACEPARENT, ())
        headers.popall(TRACESTATE, ())
        if self.traceparent is not None:
            headers.add(TRACEPARENT, self.traceparent)
            if self.tracestate:
                headers.add(TRACESTATE, self.tracestate)


def pass_through(headers: Headers) -> TraceHeaders:
    """What a pass-through (tracing off) forwards: a valid parent as received, else nothing."""
    parent, tracestate = extract(headers)
    return TraceHeaders(parent.raw if parent is not None else None, tracestate)
