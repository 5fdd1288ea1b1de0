"""OpenTelemetry tracing: provider setup, SERVER/CLIENT spans, propagation.

Settings come from ``telemetry.tracing`` first and the standard ``OTEL_*``
environment variables second.  The sampler is parent-based trace-id-ratio,
so an app's sampling decision is always respected and its trace continued.
Spans go through a batch processor to an exporter wrapped so that failures
are counted and logged at most once per interval; the proxy never waits on
the collector.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.config import TelemetryConfig

if TYPE_CHECKING:
    from proxy.chain import ProxyRequest
    from proxy.telemetry.metrics import Metrics
    from proxy.upstream import UpstreamPool

__all__ = ["Tracing"]

log = logging.getLogger("outrigger.tracing")
_K8S_ENV = {"k8s.pod.name": "K8S_POD_NAME", "k8s.namespace.name": "K8S_NAMESPACE_NAME",
            "k8s.node.name": "K8S_NODE_NAME"}


class _CountingExporter(SpanExporter):
    """Counts spans that failed to export; logs the failure once per interval."""

    def __init__(self, inner: SpanExporter, metrics: Metrics | None, interval_s: float = 30.0) -> None:
        self._inner = inner
        self._metrics = metrics
        self._interval = interval_s
        self._last_log = -interval_s

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # an exporter bug must not kill the export thread
            log.debug("span export raised", exc_info=exc)
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            if self._metrics is not None:
                self._metrics.spans_dropped.inc(len(spans))
            now = time.monotonic()
            if now - self._last_log >= self._interval:
                self._last_log = now
                log.warning("could not export %d spans to the trace collector; dropping them", len(spans))
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _propagators(names: Sequence[str]) -> TextMapPropagator:
    chosen: list[TextMapPropagator] = []
    for name in names:
        name = name.strip().lower()
        if name == "tracecontext":
            chosen.append(TraceContextTextMapPropagator())
        elif name == "baggage":
            chosen.append(W3CBaggagePropagator())
        elif name in ("b3", "b3multi"):
            from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
            chosen.append(B3SingleFormat() if name == "b3" else B3MultiFormat())
        elif name and name != "none":
            log.warning("unknown propagator %r ignored", name)
    return CompositePropagator(chosen)


def _exporter(config: TelemetryConfig, env: Mapping[str, str]) -> SpanExporter | None:
    tracing = config.tracing
    if tracing.exporter == "none":
        return None
    if tracing.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    protocol = tracing.protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") \
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
        return GrpcExporter(endpoint=tracing.endpoint) if tracing.endpoint else GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
    endpoint = tracing.endpoint
    if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
        endpoint = endpoint.rstrip("/") + "/v1/traces"
    return HttpExporter(endpoint=endpoint) if endpoint else HttpExporter()


class Tracing:
    """Owns the tracer provider for the process; ``tracer`` is None when disabled."""

    def __init__(self, config: TelemetryConfig, *, metrics: Metrics | None = None,
                 env: Mapping[str, str] | None = None, exporter: SpanExporter | None = None) -> None:
        """``exporter`` replaces the configured one (the demo keeps spans in memory)."""
        env = os.environ if env is None else env
        names = config.propagators or tuple(
            env.get("OTEL_PROPAGATORS", "tracecontext,baggage").split(","))
        self.propagator = _propagators(names)
        self.provider: TracerProvider | None = None
        self.tracer: trace.Tracer | None = None
        disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        if exporter is None and not disabled and config.tracing.enabled:
            exporter = _exporter(config, env)
        if exporter is None:
            return
        attributes: dict[str, Any] = {key: env[var] for key, var in _K8S_ENV.items() if env.get(var)}
        service = config.service_name or env.get("OTEL_SERVICE_NAME") or "outrigger"
        attributes["service.name"] = service
        resource = Resource.create(attributes)
        sampler = None  # let the SDK read OTEL_TRACES_SAMPLER(_ARG)
        if config.tracing.sample_ratio is not None or "OTEL_TRACES_SAMPLER" not in env:
            ratio = config.tracing.sample_ratio if config.tracing.sample_ratio is not None else 1.0
            sampler = ParentBased(TraceIdRatioBased(ratio))
        self.provider = TracerProvider(resource=resource, sampler=sampler)
        self.provider.add_span_processor(BatchSpanProcessor(_CountingExporter(exporter, metrics)))
        self.tracer = self.provider.get_tracer("outrigger")

    def start_server_span(self, name: str, headers: Mapping[str, str]) -> Span | None:
        """The SERVER span for one app request, or None when not recording."""
        if self.tracer is None:
            return None
        context = self.propagator.extract(headers)
        span = self.tracer.start_span(name, context=context, kind=SpanKind.SERVER)
        return span if span.is_recording() else None

    def start_client_span(self, request: ProxyRequest, route: str, pool: UpstreamPool) -> Span:
        assert self.tracer is not None and request.span is not None
        attempt = request.attempt or 1
        path = request.path.partition("?")[0]
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "url.full": pool.base + path,
            "url.path": path,
            "server.address": pool.host,
            "server.port": pool.port,
            "outrigger.route": route,
            "outrigger.upstream": pool.name,
            "outrigger.attempt": attempt,
        }
        if attempt > 1:
            attributes["http.request.resend_count"] = attempt - 1
        span = self.tracer.start_span(request.method, context=trace.set_span_in_context(request.span),
                                      kind=SpanKind.CLIENT, attributes=attributes)
        self.propagator.inject(request.headers, context=trace.set_span_in_context(span))  # type: ignore[arg-type]
        return span

    @staticmethod
    def end_client_span(span: Span, status: int | None, error: BaseException | None) -> None:
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_attribute("error.type", str(status))
                span.set_status(Status(StatusCode.ERROR))
        if error is not None:
            code = getattr(error, "code", None) or type(error).__name__
            span.set_attribute("error.type", code)
            span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
        span.end()

    def shutdown(self) -> None:
        """Flush and stop; blocking, so call it from a thread."""
        if self.provider is not None:
            self.provider.force_flush(5000)
            self.provider.shutdown()
