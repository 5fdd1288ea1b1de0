"""The tracing settings in force, whichever source they came from (config, ``OTEL_*``, defaults).

``telemetry.tracing`` wins over the standard environment variables, which win
over the defaults.  Shown by ``/config`` and in the startup log line, so that
an operator never has to work out the precedence by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from proxy.config import TelemetryConfig

__all__ = ["DEFAULT_SAMPLE_RATIO", "effective_service_name", "effective_tracing"]

DEFAULT_SAMPLE_RATIO = 1.0
_DEFAULT_ENDPOINTS = {"grpc": "http://localhost:4317", "http/protobuf": "http://localhost:4318/v1/traces"}
_RATIOS = {"always_on": 1.0, "always_off": 0.0, "parentbased_always_on": 1.0, "parentbased_always_off": 0.0}


def _ratio(sampler: str, arg: str | None) -> float:
    if sampler in _RATIOS:
        return _RATIOS[sampler]
    try:
        return min(1.0, max(0.0, float(arg))) if arg else DEFAULT_SAMPLE_RATIO
    except ValueError:
        return DEFAULT_SAMPLE_RATIO  # Tracing warns about it once, and samples everything


def _endpoint(protocol: str, configured: str | None, env: Mapping[str, str]) -> str:
    if configured:
        if protocol != "grpc" and not configured.rstrip("/").endswith("/v1/traces"):
            return configured.rstrip("/") + "/v1/traces"
        return configured
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"
    return _DEFAULT_ENDPOINTS["grpc" if protocol == "grpc" else "http/protobuf"]


def effective_tracing(config: TelemetryConfig, env: Mapping[str, str], propagators: Sequence[str]) -> dict[str, Any]:
    """``telemetry.tracing`` as in force: every field filled in, plus the sampler and the propagators."""
    tracing = config.tracing
    enabled = tracing.enabled and tracing.exporter != "none" \
        and env.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
    if tracing.sample_ratio is not None:
        sampler, ratio = "parentbased_traceidratio", tracing.sample_ratio
    else:
        sampler = env.get("OTEL_TRACES_SAMPLER", "parentbased_traceidratio").strip().lower()
        ratio = _ratio(sampler, env.get("OTEL_TRACES_SAMPLER_ARG"))
    protocol = tracing.protocol or env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") \
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if protocol == "http":
        protocol = "http/protobuf"
    settings: dict[str, Any] = {
        "enabled": enabled,
        "exporter": tracing.exporter,
        "protocol": protocol if tracing.exporter == "otlp" else None,
        "endpoint": _endpoint(protocol, tracing.endpoint, env) if tracing.exporter == "otlp" else None,
        "sampler": sampler,
        "sample_ratio": ratio,
        "redact_query_params": list(tracing.redact_query_params),
        "propagators": [name.strip().lower() for name in propagators if name.strip()],
    }
    return settings


def effective_service_name(config: TelemetryConfig, env: Mapping[str, str]) -> str:
    """``telemetry.service_name``, else ``OTEL_SERVICE_NAME``, else ``service.name`` in ``OTEL_RESOURCE_ATTRIBUTES``."""
    if config.service_name:
        return config.service_name
    if env.get("OTEL_SERVICE_NAME"):
        return env["OTEL_SERVICE_NAME"]
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "service.name" and value.strip():
            return value.strip()
    return "outrigger"
