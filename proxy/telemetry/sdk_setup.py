"""The OpenTelemetry objects ``Tracing`` is built from, each from ``telemetry.tracing`` first and
the standard ``OTEL_*`` environment variables second: propagators, sampler, resource,
exporter and the shutdown timeout.  (``settings`` shows the values in force.)
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, Sampler, TraceIdRatioBased

from proxy import __version__
from proxy.config import TelemetryConfig
from proxy.telemetry.export import grpc_exporter, otlp_http_exporter

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT_S", "exporter", "propagators", "resource", "sampler", "shutdown_timeout"]

log = logging.getLogger("outrigger.tracing")
DEFAULT_SHUTDOWN_TIMEOUT_S = 5.0
_K8S_ENV = {"k8s.pod.name": "K8S_POD_NAME", "k8s.namespace.name": "K8S_NAMESPACE_NAME",
            "k8s.node.name": "K8S_NODE_NAME"}


def propagators(names: Sequence[str]) -> tuple[TextMapPropagator, bool]:
    """The SDK propagators (b3) for everything but W3C trace context and baggage, and whether W3C is wanted.

    ``traceparent``/``tracestate`` are handled by ``proxy.telemetry.propagation``
    (the SDK's propagator follows an older ``tracestate`` grammar).
    """
    chosen: list[TextMapPropagator] = []
    w3c = False
    for name in names:
        name = name.strip().lower()
        if name == "tracecontext":
            w3c = True
        elif name == "baggage":
            # The app's baggage header passes through as sent; Outrigger adds none, so the SDK
            # propagator would only parse it (and log rejected entries verbatim).
            continue
        elif name in ("b3", "b3multi"):
            from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
            chosen.append(B3SingleFormat() if name == "b3" else B3MultiFormat())
        elif name and name != "none":
            log.warning("unknown propagator %r ignored", name)
    return CompositePropagator(chosen), w3c


def _ratio(value: str | None) -> float:
    try:
        ratio = float(value) if value else 1.0
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG %r is not a number; sampling everything", value)
        return 1.0
    return min(1.0, max(0.0, ratio))


def sampler(ratio: float | None, env: Mapping[str, str]) -> tuple[Sampler, float | None]:
    """``sample_ratio`` wins; else ``OTEL_TRACES_SAMPLER(_ARG)``; else parent-based ratio 1.0.

    For the parent-based ratio sampler the root decision is returned separately
    (second item): ``Tracing.begin`` draws it before doing any trace work,
    so an unsampled root request costs one random draw.  The provider's sampler
    then only has to follow parents (``ParentBased(ALWAYS_ON)``).
    """
    if ratio is not None:
        return ParentBased(ALWAYS_ON), ratio
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON, "always_off": ALWAYS_OFF,
        "parentbased_always_on": ParentBased(ALWAYS_ON), "parentbased_always_off": ParentBased(ALWAYS_OFF),
    }
    if name == "traceidratio":
        return TraceIdRatioBased(_ratio(arg)), None
    if name in samplers:
        return samplers[name], None
    if name != "parentbased_traceidratio":
        log.warning("unsupported OTEL_TRACES_SAMPLER %r; using parentbased_traceidratio", name)
    return ParentBased(ALWAYS_ON), _ratio(arg)


def resource(config: TelemetryConfig, env: Mapping[str, str]) -> Resource:
    attributes: dict[str, Any] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = urllib.parse.unquote(value.strip())
    attributes.update({key: env[var] for key, var in _K8S_ENV.items() if env.get(var)})
    attributes.setdefault("service.version", __version__)
    attributes["service.name"] = config.service_name or env.get("OTEL_SERVICE_NAME") \
        or attributes.get("service.name") or "outrigger"
    return Resource.create(attributes)


def exporter(config: TelemetryConfig, env: Mapping[str, str]) -> SpanExporter | None:
    tracing = config.tracing
    if tracing.exporter == "none":
        return None
    if tracing.exporter == "console":
        import sys

        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        # stderr, one JSON object per line: stdout is the access log's
        return ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
    protocol = tracing.protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") \
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol == "grpc":
        return grpc_exporter(tracing.endpoint)
    return otlp_http_exporter(tracing.endpoint, env)


def shutdown_timeout(env: Mapping[str, str]) -> float:
    raw = env.get("OTEL_BSP_EXPORT_TIMEOUT")
    try:
        return float(raw) / 1000.0 if raw else DEFAULT_SHUTDOWN_TIMEOUT_S
    except ValueError:
        return DEFAULT_SHUTDOWN_TIMEOUT_S
