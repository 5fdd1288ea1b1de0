"""The hand-written OTLP encoder produces the same ExportTraceServiceRequest as the SDK's encoder."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from proxy.telemetry.otlp_wire import SpanEncoder, _Pairs, encode_spans

REMOTE_PARENT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                            trace_flags=TraceFlags(1), trace_state=TraceState([("vendor", "v1"), ("b", "2")]))


def finished_spans(provider: TracerProvider, exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ...]:
    tracer = provider.get_tracer("outrigger", "1.2.3")
    remote = trace.set_span_in_context(NonRecordingSpan(REMOTE_PARENT))
    server = tracer.start_span("GET orders", context=remote, kind=SpanKind.SERVER)
    client = tracer.start_span("GET", context=trace.set_span_in_context(server), kind=SpanKind.CLIENT,
                               attributes={"http.request.method": "GET", "outrigger.attempt": 1,
                                           "server.port": 8080, "negative": -5, "ratio": 0.25, "flag": True,
                                           "raw": b"\x00\xff", "tags": ("a", "b"), "ports": [1, 2],
                                           "empty": "", "unicode": "caf\u00e9"},
                               links=[Link(REMOTE_PARENT, {"link.kind": "follows"})])
    # The same pair on a span and on an event: each must keep its own field number.
    client.add_event("backoff", {"outrigger.attempt": 1, "outrigger.wait_s": 0.025})
    client.set_status(Status(StatusCode.ERROR, "upstream said 503"))
    client.end()
    server.set_attributes({"http.response.status_code": 503, "outrigger.attempt": 1, "flag": 1})
    server.set_status(Status(StatusCode.OK))
    server.end()
    other = provider.get_tracer("other-scope").start_span("internal")
    other.end()
    return exporter.get_finished_spans()


def make_provider(resource: dict[str, str], limits: SpanLimits | None = None
                  ) -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource), span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_encoding_parses_to_the_sdk_encoders_message_field_for_field() -> None:
    spans = finished_spans(*make_provider({"service.name": "outrigger", "k8s.pod.name": "pod-1"}))
    encoded = encode_spans(spans)
    assert ExportTraceServiceRequest.FromString(encoded) == sdk_encode_spans(spans)
    assert encoded == sdk_encode_spans(spans).SerializeToString()


def test_event_and_span_attributes_with_the_same_pair_stay_apart() -> None:
    spans = finished_spans(*make_provider({"service.name": "outrigger"}))
    request = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    client = next(s for s in request.resource_spans[0].scope_spans[0].spans if s.kind == 3)
    assert [kv.key for kv in client.events[0].attributes] == ["outrigger.attempt", "outrigger.wait_s"]
    assert "outrigger.attempt" in [kv.key for kv in client.attributes]


def test_one_encoder_reused_across_batches_gives_the_sdk_message_each_time() -> None:
    """The caches carry over between batches; the output must not."""
    encoder = SpanEncoder()
    for resource in ({"service.name": "a"}, {"service.name": "b"}):
        spans = finished_spans(*make_provider(resource))
        assert ExportTraceServiceRequest.FromString(encoder.encode(spans)) == sdk_encode_spans(spans)


def test_spans_of_two_resources_are_grouped_as_the_sdk_groups_them() -> None:
    first = finished_spans(*make_provider({"service.name": "a"}))
    second = finished_spans(*make_provider({"service.name": "b"}))
    mixed = (first[0], second[0], first[1], second[2])
    request = ExportTraceServiceRequest.FromString(encode_spans(mixed))
    assert request == sdk_encode_spans(mixed)
    assert len(request.resource_spans) == 2


def test_dropped_attribute_and_event_counts_are_encoded() -> None:
    spans = finished_spans(*make_provider({"service.name": "a"}, SpanLimits(max_span_attributes=2,
                                                                            max_events=0)))
    request = ExportTraceServiceRequest.FromString(encode_spans(spans))
    assert request == sdk_encode_spans(spans)
    client = next(s for s in request.resource_spans[0].scope_spans[0].spans if s.kind == 3)
    assert client.dropped_attributes_count == 9 and client.dropped_events_count == 1


def test_the_attribute_cache_stays_bounded_under_a_value_per_request() -> None:
    pairs = _Pairs(0x4A, max_size=8)
    for i in range(100):
        pairs.encode({"url.path": f"/items/{i}"})
        assert len(pairs._cache) <= 8
