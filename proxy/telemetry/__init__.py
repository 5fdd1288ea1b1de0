"""Telemetry: OpenTelemetry tracing, Prometheus metrics and the access log."""
