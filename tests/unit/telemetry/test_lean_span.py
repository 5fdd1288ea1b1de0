"""The request path's lean spans record what the SDK's spans record, on a fake clock and a fake id source."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, Sampler, SamplingResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from proxy.telemetry.lean_span import LeanSpan, SpanFactory

RESOURCE = Resource.create({"service.name": "checkout"})
SCOPE = InstrumentationScope("outrigger", "1.2.3")
PARENT = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID),
                     trace_state=TraceState([("vendor", "v1")]))


class Ticks:
    """A fake nanosecond clock: each reading is 1 ms after the last."""

    def __init__(self) -> None:
        self.now = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        self.now += 1_000_000
        return self.now


def counting_bits() -> Callable[[int], int]:
    counter = itertools.count(1)
    return lambda bits: next(counter) % (1 << bits)


class Collect(SpanProcessor):
    def __init__(self) -> None:
        self.started: list[Any] = []
        self.ended: list[ReadableSpan] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append((span.name, dict(span.attributes)))

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.append(span)


def factory(sampler: Sampler | None = None, bits: Callable[[int], int] | None = None) -> tuple[SpanFactory, Collect]:
    spans = SpanFactory(RESOURCE, SCOPE, sampler, clock=Ticks(), random_bits=bits or counting_bits())
    collect = Collect()
    spans.add_processor(collect)
    return spans, collect


def test_a_root_span_gets_fresh_random_ids_and_hands_a_readable_span_to_each_processor() -> None:
    spans, collect = factory()
    span = spans.start("GET", None, SpanKind.SERVER, {"http.request.method": "GET"})
    assert isinstance(span, LeanSpan) and isinstance(span, trace.Span) and span.is_recording()
    context = span.get_span_context()
    assert (context.trace_id, context.span_id, context.is_remote) == (1, 2, False)
    assert context.trace_flags == TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID
    assert collect.started == [("GET", {"http.request.method": "GET"})]
    span.set_attribute("http.response.status_code", 200)
    span.end()
    [done] = collect.ended
    assert isinstance(done, ReadableSpan) and not span.is_recording()
    assert (done.name, done.kind, done.parent, done.resource, done.instrumentation_scope) == \
        ("GET", SpanKind.SERVER, None, RESOURCE, SCOPE)
    assert dict(done.attributes or {}) == {"http.request.method": "GET", "http.response.status_code": 200}
    assert done.end_time is not None and done.start_time is not None
    assert done.end_time - done.start_time == 1_000_000  # one tick of the fake clock


def test_a_child_keeps_its_parents_trace_id_random_flag_and_trace_state() -> None:
    spans, _ = factory()
    span = spans.start("GET", PARENT, SpanKind.CLIENT, {})
    context = span.get_span_context()
    assert context.trace_id == PARENT.trace_id and context.span_id == 1
    assert context.trace_flags == PARENT.trace_flags and context.trace_state == PARENT.trace_state
    no_random = SpanContext(PARENT.trace_id, PARENT.span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    assert spans.start("GET", no_random, SpanKind.CLIENT, {}).get_span_context().trace_flags == TraceFlags.SAMPLED


def test_an_unsampled_parent_gives_a_span_that_records_nothing() -> None:
    spans, collect = factory()
    unsampled = SpanContext(PARENT.trace_id, PARENT.span_id, is_remote=True, trace_flags=TraceFlags(0))
    span = spans.start("GET", unsampled, SpanKind.SERVER, {"a": 1})
    assert isinstance(span, NonRecordingSpan) and not span.is_recording()
    assert span.get_span_context().trace_id == PARENT.trace_id and not span.get_span_context().trace_flags.sampled
    span.end()
    assert collect.started == [] and collect.ended == []


def test_an_invalid_parent_starts_a_new_trace() -> None:
    spans, _ = factory()
    span = spans.start("GET", trace.INVALID_SPAN_CONTEXT, SpanKind.SERVER, {})
    assert span.get_span_context().trace_id == 1 and span.get_span_context().is_valid


def test_a_zero_id_is_drawn_again() -> None:
    draws = iter([0, 7, 0, 9])
    spans, _ = factory(bits=lambda bits: next(draws))
    context = spans.start("GET", None, SpanKind.SERVER, {}).get_span_context()
    assert (context.trace_id, context.span_id) == (7, 9)


class RecordOnly(Sampler):
    """Records every span, samples none, and adds an attribute and a trace state of its own."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> SamplingResult:
        return SamplingResult(Decision.RECORD_ONLY, {**(attributes or {}), "sampler": "mine"},
                              TraceState([("s", "1")]))

    def get_description(self) -> str:
        return "RecordOnly"


def test_an_sdk_sampler_decides_as_under_the_sdks_tracer() -> None:
    spans, collect = factory(ALWAYS_OFF)
    dropped = spans.start("GET", None, SpanKind.SERVER, {"a": 1})
    assert not dropped.is_recording() and not dropped.get_span_context().trace_flags.sampled
    spans, collect = factory(RecordOnly())
    span = spans.start("GET", PARENT, SpanKind.SERVER, {"a": 1})
    context = span.get_span_context()
    assert span.is_recording() and not context.trace_flags.sampled and context.trace_state == TraceState([("s", "1")])
    span.end()
    assert dict(collect.ended[0].attributes or {}) == {"a": 1, "sampler": "mine"}


def test_status_follows_the_sdk_rules() -> None:
    spans, collect = factory()
    span = spans.start("GET", None, SpanKind.CLIENT, {})
    span.set_status(StatusCode.UNSET)
    span.set_status(StatusCode.ERROR, "upstream said 503")
    span.set_status(Status(StatusCode.OK))
    span.set_status(Status(StatusCode.ERROR, "too late"))  # OK is final
    span.end()
    assert collect.ended[0].status.status_code is StatusCode.OK
    span = spans.start("GET", None, SpanKind.CLIENT, {})
    span.set_status(StatusCode.ERROR, "upstream said 503")
    span.set_status(Status(StatusCode.UNSET))
    span.end()
    status = collect.ended[1].status
    assert (status.status_code, status.description) == (StatusCode.ERROR, "upstream said 503")


def test_an_ended_span_changes_no_more_and_ends_once() -> None:
    spans, collect = factory()
    span = spans.start("GET", None, SpanKind.CLIENT, {"a": 1})
    span.set_attributes({"b": 2, "none": None})
    span.end()
    span.set_attribute("c", 3)
    span.set_attributes({"d": 4})
    span.add_event("late")
    span.update_name("renamed")
    span.set_status(StatusCode.ERROR)
    span.end()
    [done] = collect.ended
    assert (done.name, dict(done.attributes or {}), done.events, done.status.status_code) == \
        ("GET", {"a": 1, "b": 2}, (), StatusCode.UNSET)


def test_events_links_and_exceptions_reach_the_readable_span() -> None:
    spans, collect = factory()
    span = spans.start("GET", None, SpanKind.SERVER, {})
    span.add_event("proxy_error", {"outrigger.error": "circuit_open"}, timestamp=5)
    span.add_link(PARENT, {"outrigger.dead_letter.id": "abc"})
    span.add_link(trace.INVALID_SPAN_CONTEXT)  # nothing to link to: ignored, as the SDK does
    try:
        raise ValueError("boom")
    except ValueError as exc:
        span.record_exception(exc)
    span.end()
    [done] = collect.ended
    first, second = done.events
    assert isinstance(first, Event) and (first.name, dict(first.attributes or {}), first.timestamp) == \
        ("proxy_error", {"outrigger.error": "circuit_open"}, 5)
    assert second.name == "exception" and (second.attributes or {})["exception.type"] == "ValueError"
    assert "boom" in str((second.attributes or {})["exception.stacktrace"])
    [link] = done.links
    assert link.context == PARENT and dict(link.attributes or {}) == {"outrigger.dead_letter.id": "abc"}


def test_a_lean_span_is_the_current_span_of_a_context_so_the_b3_propagator_injects_it() -> None:
    spans, _ = factory()
    span = spans.start("GET", PARENT, SpanKind.CLIENT, {})
    carrier: dict[str, str] = {}
    B3MultiFormat().inject(carrier, context=trace.set_span_in_context(span))
    assert carrier["x-b3-traceid"] == f"{PARENT.trace_id:032x}" and carrier["x-b3-spanid"] == f"{1:016x}"


class Counting(IdGenerator):
    def __init__(self) -> None:
        self._next = itertools.count(1)

    def generate_span_id(self) -> int:
        return next(self._next)

    def generate_trace_id(self) -> int:
        return next(self._next)

    def is_trace_id_random(self) -> bool:
        return True


@pytest.fixture
def sdk() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    provider = TracerProvider(resource=RESOURCE, id_generator=Counting(), shutdown_on_exit=False)
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    yield provider, memory
    provider.shutdown()


def test_the_same_calls_give_the_same_otlp_message_as_the_sdks_spans(
        sdk: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    """A SERVER span under a remote parent and its CLIENT span, made both ways, encode to identical OTLP."""
    provider, memory = sdk
    tracer = provider.get_tracer(SCOPE.name, SCOPE.version)
    remote = trace.set_span_in_context(NonRecordingSpan(PARENT))
    start, end = 1_700_000_000_000_000_000, 1_700_000_000_005_000_000
    attributes: dict[str, Any] = {"http.request.method": "GET", "url.path": "/orders", "server.port": 8080}

    def exercise(server: trace.Span, client: trace.Span) -> None:
        client.set_attributes({"http.response.status_code": 503, "error.type": "503"})
        client.add_event("backoff", {"outrigger.wait_s": 0.025}, timestamp=start + 1)
        client.set_status(Status(StatusCode.ERROR))
        client.end(end_time=end)
        server.update_name("GET /orders")
        server.set_attributes({"http.response.status_code": 503, "outrigger.attempt": 1, "flag": True})
        server.set_status(StatusCode.ERROR, "upstream")
        server.end(end_time=end)

    server = tracer.start_span("GET", context=remote, kind=SpanKind.SERVER, attributes=dict(attributes),
                               start_time=start)
    client = tracer.start_span("GET", context=trace.set_span_in_context(server), kind=SpanKind.CLIENT,
                               attributes=dict(attributes), start_time=start)
    exercise(server, client)
    lean, collect = SpanFactory(RESOURCE, SCOPE, None, clock=lambda: start, random_bits=counting_bits()), Collect()
    lean.add_processor(collect)
    lean_server = lean.start("GET", PARENT, SpanKind.SERVER, dict(attributes))
    lean_client = lean.start("GET", lean_server.get_span_context(), SpanKind.CLIENT, dict(attributes))
    exercise(lean_server, lean_client)
    theirs = sdk_encode_spans(memory.get_finished_spans())
    ours = sdk_encode_spans(collect.ended)
    assert ours == theirs
    assert len(ours.resource_spans[0].scope_spans[0].spans) == 2
