"""OpenTelemetry tracing: provider setup, SERVER/CLIENT spans, propagation.

Settings come from ``telemetry.tracing`` first and the standard ``OTEL_*``
environment variables second.  The sampler is parent-based trace-id-ratio,
so an app's sampling decision is always respected and its trace continued.

Spans go through ``export.SpanQueue``, whose queue never blocks the event loop:
when it is full the span is dropped and counted.  The exporter (``export``'s
lean OTLP/HTTP one, or the SDK's gRPC one fed by our encoder) runs on the
queue's own thread, wrapped by ``export_health.ExportGuard`` so that failures are
counted in ``outrigger_spans_dropped_total`` and reported once per interval
(the OTLP exporters' own per-retry log lines are folded into that report).
``Tracing.shutdown`` flushes what it can within a bound and then aborts the
exporter's retries, so a dead collector cannot stall a drain.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Span

from proxy import __version__
from proxy.config import TelemetryConfig
from proxy.telemetry import client_span, sdk_setup
from proxy.telemetry.export import SpanQueue
from proxy.telemetry.export_health import CollectorGate, ExportGuard, ExportState
from proxy.telemetry.lean_span import SpanFactory
from proxy.telemetry.propagation import Headers
from proxy.telemetry.query import redaction_set
from proxy.telemetry.request_trace import RequestTracing
from proxy.telemetry.settings import effective_service_name, effective_tracing

if TYPE_CHECKING:
    from proxy.chain import ProxyRequest
    from proxy.telemetry.metrics import Metrics
    from proxy.upstream.call import UpstreamPool

__all__ = ["Tracing"]

log = logging.getLogger("outrigger.tracing")


class _Provider(TracerProvider):
    """The SDK's provider, which also tells the span factory about each processor added to it."""

    def __init__(self, factory: SpanFactory, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.outrigger_spans = factory

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self.outrigger_spans.add_processor(span_processor)


class Tracing:
    """Owns the tracer provider for the process; ``tracer`` is None when disabled."""

    def __init__(self, config: TelemetryConfig, *, metrics: Metrics | None = None,
                 env: Mapping[str, str] | None = None, exporter: SpanExporter | None = None,
                 report_interval_s: float = 30.0) -> None:
        """``exporter`` replaces the configured one (the demo keeps spans in memory)."""
        env = os.environ if env is None else env
        names: Sequence[str] = config.propagators or \
            env.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(",")
        self.propagator, self.w3c = sdk_setup.propagators(names)
        self.settings = effective_tracing(config, env, names)  # what /config and the startup line show
        self.service_name = effective_service_name(config, env)
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        self.shutdown_timeout_s = sdk_setup.shutdown_timeout(env)
        self._guard: ExportGuard | None = None
        # Headers that carry a parent trace for the configured propagators (baggage alone does not).
        self._parent_fields = tuple(f for f in ("b3", "x-b3-traceid") if f in self.propagator.fields)
        self.redact = redaction_set(config.tracing.redact_query_params)
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if exporter is None and not disabled and config.tracing.enabled:
            exporter = sdk_setup.exporter(config, env)
        # begin(headers, name, attributes): the decision on one app request, compiled (see
        # proxy.telemetry.request_trace); with no exporter, headers pass through and nothing is recorded.
        if exporter is None:
            self.begin = RequestTracing(w3c=self.w3c, propagator=self.propagator,
                                        parent_fields=self._parent_fields).begin
            return
        self.export_state = ExportState(metrics, report_interval_s)
        self._guard = ExportGuard(exporter, self.export_state)
        sampler, root_ratio = sdk_setup.sampler(config.tracing.sample_ratio, env)
        resource = sdk_setup.resource(config, env)
        # sampler None: begin draws root decisions itself, and the provider's sampler only follows parents
        self._spans = SpanFactory(resource, InstrumentationScope("outrigger", __version__),
                                  None if root_ratio is not None else sampler)
        # shutdown_on_exit=False: the sidecar shuts down explicitly (and boundedly) on drain.
        self.provider = _Provider(self._spans, resource=resource, sampler=sampler, shutdown_on_exit=False)
        # OTEL_BSP_* come from the same env as every other setting (the sidecar's, in tests their own).
        self.span_queue = SpanQueue(self._guard, on_queue_full=self.export_state.queue_full, env=env)
        self.provider.add_span_processor(self.span_queue)
        self.tracer = self.provider.get_tracer("outrigger", __version__)
        self.begin = RequestTracing(w3c=self.w3c, propagator=self.propagator, parent_fields=self._parent_fields,
                                    spans=self._spans, root_ratio=root_ratio, random=random.random,
                                    gate=CollectorGate(self.export_state), sampler=sampler).begin

    def start_server_span(self, name: str, headers: Headers) -> Span | None:
        """The SERVER span for one app request, or None when not recording (see ``begin``)."""
        return self.begin(headers, name, dict)[0]

    def start_client_span(self, request: ProxyRequest, route: str, pool: UpstreamPool) -> Span:
        """A CLIENT span for one attempt, injected into that attempt's outgoing headers."""
        assert self.tracer is not None
        # (a method of this interpreted class, so that a test can plant a fault here; the work is compiled)
        return client_span.start(self._spans, request, route, pool, w3c=self.w3c,
                                 propagator=self.propagator if self._parent_fields else None, redact=self.redact)

    def shutdown(self, timeout_s: float | None = None) -> None:
        """Flush and stop, within ``timeout_s`` (``OTEL_BSP_EXPORT_TIMEOUT``, default 5s).

        Blocking, so call it from a thread.  The SDK's own shutdown waits for
        every queued batch and each export retries for up to the exporter
        timeout, so with the collector down it could take minutes; past the
        bound the exporter is aborted and what is left is dropped.
        """
        provider, self.provider = self.provider, None  # idempotent; the tracer stays usable
        if provider is None:
            return
        bound = self.shutdown_timeout_s if timeout_s is None else timeout_s
        finished = threading.Event()

        def run() -> None:
            try:
                provider.shutdown()
            except Exception as exc:
                log.debug("tracer provider shutdown failed", exc_info=exc)
            finally:
                finished.set()

        threading.Thread(target=run, name="outrigger-tracing-shutdown", daemon=True).start()
        guard = self._guard
        if not finished.wait(bound) and guard is not None:
            guard.abort()
            if not finished.wait(1.0):
                log.warning("tracing did not shut down within %.1fs; abandoning unexported spans",
                            bound + 1.0)
        if guard is not None and finished.is_set():
            guard.detach_logs()
        self.export_state.report_pending()
