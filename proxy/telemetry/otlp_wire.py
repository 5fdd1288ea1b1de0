"""OTLP trace encoding straight to protobuf wire bytes, for the span export thread.

Where it sits: ``export.OtlpHttpExporter`` calls ``encode_spans`` on each
batch the export thread takes off the span queue; the bytes are the body of
``POST /v1/traces`` (an ``ExportTraceServiceRequest``).

Why not the SDK's encoder: it builds a protobuf object per span, per
attribute and per value (``_encode_span``, ``_encode_key_value``, ...), and
then serialises the tree.  That was a third of the sidecar's CPU at 100%
sampling, all of it holding the GIL the event loop needs.  Here each field is
written once as bytes, and the attribute pairs that repeat from span to span
(method, route, upstream, host, port, status) are encoded once and reused
from a small cache.  The output parses to the same message as the SDK's
(``tests/unit/telemetry/test_otlp_wire.py`` checks that field for field).

Field numbers are those of ``opentelemetry/proto/trace/v1/trace.proto``,
``common/v1/common.proto`` and ``resource/v1/resource.proto``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind, StatusCode

__all__ = ["encode_spans"]

_DOUBLE: Final = struct.Struct("<d")
_FIXED64: Final = struct.Struct("<Q")
_FIXED32: Final = struct.Struct("<I")
# OTLP's SpanKind is the API's enum shifted by one (0 is UNSPECIFIED there).
# Enum members hash in Python code; the caches below key them by identity (members are singletons).
_KIND_BY_ID: Final = {id(kind): kind.value + 1 for kind in SpanKind}
_CODE_BY_ID: Final = {id(code): code.value for code in StatusCode}
# SpanFlags: the "has is_remote" bit is always set (as the SDK does), "is remote" when the parent is.
_FLAGS_LOCAL: Final = b"\x85\x01" + _FIXED32.pack(0x100)
_FLAGS_REMOTE: Final = b"\x85\x01" + _FIXED32.pack(0x300)
_PAIR_CACHE_MAX: Final = 4096


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (``tag`` is ``number << 3 | 2``, given pre-shifted)."""
    return _varint(tag) + _varint(len(payload)) + payload


def _string(tag: int, text: str) -> bytes:
    return _field(tag, text.encode("utf-8", "surrogatepass")) if text else b""


def _any_value(value: Any) -> bytes:
    """An ``AnyValue`` message body."""
    if isinstance(value, str):
        return _field(0x0A, value.encode("utf-8", "surrogatepass"))
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement in 10 bytes if negative
    if isinstance(value, float):
        return b"\x21" + _DOUBLE.pack(value)
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, Sequence):
        return _field(0x2A, b"".join(_field(0x0A, _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(0x32, b"".join(_field(0x0A, _key_value(str(k), v)) for k, v in value.items()))
    if value is None:
        return b""
    raise TypeError(f"cannot encode attribute value of type {type(value).__name__}")


def _key_value(key: str, value: Any) -> bytes:
    return _string(0x0A, key) + _field(0x12, _any_value(value))


class _Pairs:
    """``KeyValue`` fields numbered ``tag``, cached by (key, type, value); bounded, cleared when full.

    One instance per field number, since the tag is part of the cached bytes.
    The type is part of the key because ``True == 1`` and ``1 == 1.0`` in Python
    while their encodings differ.  Sequences and mappings are not cached.
    """

    def __init__(self, tag: int, max_size: int = _PAIR_CACHE_MAX) -> None:
        self._tag = tag
        self._cache: dict[tuple[str, type, Any], bytes] = {}
        self._max = max_size

    def encode(self, attributes: Mapping[str, Any] | None) -> bytes:
        """Every pair of ``attributes`` as a repeated KeyValue field."""
        if not attributes:
            return b""
        cache, tag = self._cache, self._tag
        parts = []
        for key, value in attributes.items():
            cls = value.__class__
            if cls is tuple or cls is list or cls is dict:
                parts.append(_field(tag, _key_value(key, value)))
                continue
            ident = (key, cls, value)
            encoded = cache.get(ident)
            if encoded is None:
                if len(cache) >= self._max:
                    cache.clear()  # a path-per-request workload would otherwise grow it without bound
                encoded = cache[ident] = _field(tag, _key_value(key, value))
            parts.append(encoded)
        return b"".join(parts)


class SpanEncoder:
    """Encodes batches of finished SDK spans to an ``ExportTraceServiceRequest``; one per exporter.

    Not thread-safe: only the export thread calls it.
    """

    def __init__(self) -> None:
        # Attribute fields by where they sit: Resource.attributes (1), InstrumentationScope (3),
        # Span (9), Span.Event (3), Span.Link (4).
        self._resource_attrs, self._scope_attrs = _Pairs(0x0A), _Pairs(0x1A)
        self._span_attrs, self._event_attrs, self._link_attrs = _Pairs(0x4A), _Pairs(0x1A), _Pairs(0x22)
        # Per-span fields that take few values: (name, kind) and (status code, description).
        self._names: dict[tuple[str, int], bytes] = {}
        self._statuses: dict[tuple[int, str | None], bytes] = {}

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        # Group by resource, then instrumentation scope, in first-seen order as the SDK does.  Keyed
        # by identity: a Resource hashes by JSON-dumping its attributes, far dearer than the span.
        groups: dict[int, tuple[Resource, dict[int, tuple[InstrumentationScope | None, list[bytes]]]]] = {}
        span_field = self._span
        for span in spans:
            resource = span.resource
            group = groups.get(id(resource))
            if group is None:
                group = groups[id(resource)] = (resource, {})
            scope = span.instrumentation_scope or None
            by_scope = group[1].get(id(scope))
            if by_scope is None:
                by_scope = group[1][id(scope)] = (scope, [])
            by_scope[1].append(span_field(span))
        out = []
        for resource, scopes in groups.values():
            body = [_field(0x0A, self._resource_attrs.encode(resource.attributes))]
            for scope, encoded in scopes.values():
                scope_body = _field(0x0A, self._scope(scope)) + b"".join(encoded)
                if scope is not None and scope.schema_url:
                    scope_body += _string(0x1A, scope.schema_url)
                body.append(_field(0x12, scope_body))
            if resource.schema_url:
                body.append(_string(0x1A, resource.schema_url))
            out.append(_field(0x0A, b"".join(body)))
        return b"".join(out)

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        if scope is None:
            return b""
        return _string(0x0A, scope.name) + _string(0x12, scope.version or "") + \
            self._scope_attrs.encode(scope.attributes)

    def _span(self, span: ReadableSpan) -> bytes:
        """One ``Span`` field (number 2 of ScopeSpans), tag and length included."""
        context = span.context
        assert context is not None and span.start_time is not None and span.end_time is not None
        parent = span.parent
        parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
        state = context.trace_state
        if state:
            parts.append(_string(0x1A, ",".join(f"{key}={value}" for key, value in state.items())))
        if parent is not None:
            parts.append(b"\x22\x08")
            parts.append(parent.span_id.to_bytes(8, "big"))
        name_kind = (span.name, id(span.kind))
        head = self._names.get(name_kind)
        if head is None:
            if len(self._names) >= _PAIR_CACHE_MAX:
                self._names.clear()
            head = self._names[name_kind] = _string(0x2A, span.name) + b"\x30" + _varint(_KIND_BY_ID[id(span.kind)])
        parts.append(head)
        parts.append(b"\x39" + _FIXED64.pack(span.start_time) + b"\x41" + _FIXED64.pack(span.end_time))
        parts.append(self._span_attrs.encode(span.attributes))
        if span.dropped_attributes:
            parts.append(b"\x50" + _varint(span.dropped_attributes))
        for event in span.events:
            body = b"\x09" + _FIXED64.pack(event.timestamp) + _string(0x12, event.name) + \
                self._event_attrs.encode(event.attributes)
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(0x5A, body))
        if span.dropped_events:
            parts.append(b"\x60" + _varint(span.dropped_events))
        for link in span.links:
            link_ctx = link.context
            body = b"\x0a\x10" + link_ctx.trace_id.to_bytes(16, "big") + b"\x12\x08" + \
                link_ctx.span_id.to_bytes(8, "big") + self._link_attrs.encode(link.attributes)
            if link.dropped_attributes:
                body += b"\x28" + _varint(link.dropped_attributes)
            body += b"\x35" + _FIXED32.pack(0x300 if link_ctx.is_remote else 0x100)
            parts.append(_field(0x6A, body))
        if span.dropped_links:
            parts.append(b"\x70" + _varint(span.dropped_links))
        status = span.status
        key = (id(status.status_code), status.description)
        encoded_status = self._statuses.get(key)
        if encoded_status is None:
            if len(self._statuses) >= _PAIR_CACHE_MAX:
                self._statuses.clear()
            code = _CODE_BY_ID[key[0]]
            encoded_status = self._statuses[key] = _field(
                0x7A, _string(0x12, status.description or "") + (b"\x18" + _varint(code) if code else b""))
        parts.append(encoded_status)
        parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
        return _field(0x12, b"".join(parts))


def encode_spans(spans: Sequence[ReadableSpan], encoder: SpanEncoder | None = None) -> bytes:
    """``spans`` as a serialised ``ExportTraceServiceRequest`` (the body of an OTLP/HTTP export)."""
    return (encoder or SpanEncoder()).encode(spans)
