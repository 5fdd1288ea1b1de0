"""The request path's spans: the OTel API's ``Span``, recorded without the SDK's per-span machinery.

Where it sits: ``tracing.Tracing`` starts the SERVER span of a sampled app
request and the CLIENT span of each attempt through ``SpanFactory.start``.
Ending a span hands it to the span processors added to the provider as the
SDK ``ReadableSpan`` it also is (as the SDK's own ``Span`` is both), so the
span queue, the OTLP encoder, the SDK's exporters and any processor a test
adds see what the SDK's own spans gave them, with no copy made at ``end``.

Why not the SDK's ``Tracer.start_span``: for one request's SERVER and CLIENT
span it cost about 65 µs of the event loop's time (a context object per
parent lookup, per-attribute validation into ``BoundedAttributes``, a lock,
bounded lists and a copy of everything at ``end``), the largest share of
the request path at 100% sampling.  These spans keep what the SDK's record
(ids, parent, kind, attributes, events, status, times, resource, scope) in
plain slots.  What they leave out, all unused by Outrigger:

- attribute limits and value checks: every attribute comes from Outrigger's
  own code with str, bool, int or float values (a ``None`` value is dropped,
  as the SDK drops it);
- the SDK's tracer self-metrics.

The sampler is the SDK's, called as its ``Tracer`` calls it.  The factory
is given ``sampler=None`` when ``Tracing`` has already drawn the root
decision (parent-based sampling, see ``sdk_setup.sampler``): a span then
follows its parent's sampled flag, and a root span is sampled.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types

__all__ = ["LeanSpan", "SpanFactory", "parent_context"]

_SAMPLED = TraceFlags.SAMPLED
_RANDOM = TraceFlags.RANDOM_TRACE_ID
_UNSET = Status(StatusCode.UNSET)
_FLAGS = tuple(TraceFlags(value) for value in range(4))  # sampled and random, made once


def parent_context(parent: SpanContext | None) -> Context | None:
    """The SDK context holding a parent span context, as an SDK sampler takes it (None for a root)."""
    return trace.set_span_in_context(NonRecordingSpan(parent)) if parent is not None else None


class SpanFactory:
    """Starts spans for one tracer provider; ``add_processor`` mirrors the provider's processors.

    ``clock`` gives nanoseconds since the epoch (span times); ``random_bits``
    draws ids, as the SDK's ``RandomIdGenerator`` does.
    """

    def __init__(self, resource: Resource, scope: InstrumentationScope, sampler: Sampler | None, *,
                 clock: Callable[[], int] = time.time_ns,
                 random_bits: Callable[[int], int] = random.getrandbits) -> None:
        self.resource = resource
        self.scope = scope
        self._sampler = sampler
        self.clock = clock
        self._random_bits = random_bits
        self._processors: tuple[SpanProcessor, ...] = ()
        self._lock = threading.Lock()  # processors are added from any thread (tests add theirs)

    def add_processor(self, processor: SpanProcessor) -> None:
        with self._lock:
            self._processors = (*self._processors, processor)

    def _id(self, bits: int) -> int:
        value = 0
        while value == 0:  # 0 is the invalid id
            value = self._random_bits(bits)
        return value

    def start(self, name: str, parent: SpanContext | None, kind: SpanKind,
              attributes: dict[str, Any]) -> trace.Span:
        """A recording span, or a ``NonRecordingSpan`` when the sampler drops it.

        ``parent`` is None (or invalid) for a root span; ``attributes`` becomes the span's own dict.
        """
        if parent is not None and not parent.is_valid:
            parent = None
        trace_id = parent.trace_id if parent is not None else self._id(128)
        sampler = self._sampler
        if sampler is None:  # the root decision was drawn already; follow the parent
            sampled = parent is None or parent.trace_flags.sampled
            recording = sampled
            trace_state = parent.trace_state if parent is not None else None
        else:
            result = sampler.should_sample(parent_context(parent), trace_id, name, kind, attributes, ())
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            recording = sampled or result.decision is Decision.RECORD_ONLY
            trace_state = result.trace_state
            attributes = dict(result.attributes) if result.attributes else {}
        flags = _SAMPLED if sampled else 0
        if parent is None or parent.trace_flags.random_trace_id:
            flags |= _RANDOM  # our root ids are random; a child keeps its parent's flag
        context = SpanContext(trace_id, self._id(64), is_remote=False, trace_flags=_FLAGS[flags],
                              trace_state=trace_state)
        if not recording:
            return NonRecordingSpan(context)
        span = LeanSpan(self, name, context, parent, kind, attributes, self.clock())
        for processor in self._processors:
            processor.on_start(span)  # type: ignore[arg-type]  # the SDK types it as its own Span
        return span

    def finish(self, span: ReadableSpan) -> None:
        for processor in self._processors:
            processor.on_end(span)


class LeanSpan(trace.Span, ReadableSpan):
    """One recording span, and the ``ReadableSpan`` that ``end`` hands to the factory's processors.

    Its fields are the ones ``ReadableSpan``'s properties and ``to_json`` read (set here,
    not by ``ReadableSpan.__init__``, which would cost as much as the rest of the span);
    ``test_lean_span`` checks that it encodes to the same OTLP message as the SDK's span.
    """

    # Interpreted, not in proxy/compiled.py: mypyc compiled this subclass of library classes into
    # code that raised SystemError on attribute reads in a fresh build (ARCHITECTURE.md).
    __slots__ = ("_attributes", "_context", "_end_time", "_events", "_factory", "_instrumentation_info",
                 "_instrumentation_scope", "_kind", "_links", "_name", "_parent", "_resource", "_start_time",
                 "_status")

    def __init__(self, factory: SpanFactory, name: str, context: SpanContext, parent: SpanContext | None,
                 kind: SpanKind, attributes: dict[str, Any], start_time: int) -> None:
        self._factory = factory
        self._name = name
        self._context: SpanContext = context
        self._parent = parent
        self._kind = kind
        self._attributes: dict[str, Any] = attributes
        self._events: list[Event] = []
        self._links: list[Link] = []
        self._status = _UNSET
        self._start_time: int = start_time
        self._end_time: int | None = None
        self._resource = factory.resource
        self._instrumentation_scope = factory.scope
        self._instrumentation_info = None

    # What a processor's on_start may read (the SDK's span offers the same).
    @property
    def name(self) -> str:
        return self._name

    @property
    def attributes(self) -> Mapping[str, Any]:
        return self._attributes

    @property
    def kind(self) -> SpanKind:
        return self._kind

    @property
    def parent(self) -> SpanContext | None:
        return self._parent

    @property
    def context(self) -> SpanContext:
        return self._context

    @property
    def start_time(self) -> int:
        return self._start_time

    # ReadableSpan's, again: the same values, read by the OTLP encoder on the export thread
    # (plain reads, without ReadableSpan's copies and isinstance checks).
    @property
    def end_time(self) -> int | None:
        return self._end_time

    @property
    def status(self) -> Status:
        return self._status

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    @property
    def links(self) -> tuple[Link, ...]:
        return tuple(self._links)

    @property
    def dropped_attributes(self) -> int:
        return 0  # no limits are applied (see the module docstring)

    @property
    def dropped_events(self) -> int:
        return 0

    @property
    def dropped_links(self) -> int:
        return 0

    @property
    def resource(self) -> Resource:
        return self._resource

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is None and value is not None:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is None:
            own = self._attributes
            for key, value in attributes.items():
                if value is not None:
                    own[key] = value

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events.append(Event(name, dict(attributes) if attributes else None,
                                      timestamp if timestamp is not None else self._factory.clock()))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """As the SDK's: a link to an invalid context with no attributes is ignored."""
        if self._end_time is None and (context.is_valid or attributes):
            self._links.append(Link(context, dict(attributes) if attributes else None))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK's: OK is final, UNSET changes nothing."""
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes: types.Attributes = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        """The ``exception`` event of the semantic conventions."""
        event: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            event.update(attributes)
        self.add_event("exception", event, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return  # the first end counts, as the API asks
        factory = self._factory
        self._end_time = end_time if end_time is not None else factory.clock()
        factory.finish(self)  # ended: every setter is a no-op from here on, so processors see it final
