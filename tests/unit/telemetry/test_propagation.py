"""W3C Trace Context: the suite's cases through ``Tracing.begin``, and the parsers on their own."""

from __future__ import annotations

import logging

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.config import TelemetryConfig, TracingConfig
from proxy.telemetry.propagation import parse_traceparent, parse_tracestate
from proxy.telemetry.tracing import Tracing
from tests.support.trace_context_cases import CASES, SAMPLED_TP, UNSAMPLED_TP, Case, T, check


def outgoing(tracing: Tracing, headers: tuple[tuple[str, str], ...]) -> CIMultiDict[str]:
    """The trace headers the upstream would get for an app request with ``headers``."""
    span, trace_headers = tracing.begin(CIMultiDictProxy(CIMultiDict(headers)), "GET", dict)
    out: CIMultiDict[str] = CIMultiDict(headers)
    assert trace_headers is not None
    trace_headers.apply(out)
    if span is not None:
        span.end()
    return out


@pytest.mark.parametrize("ratio", [0.0, 1.0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_suite_case_leaves_with_one_valid_traceparent_as_the_spec_says(case: Case, ratio: float) -> None:
    tracing = Tracing(TelemetryConfig(tracing=TracingConfig(sample_ratio=ratio)), env={},
                      exporter=InMemorySpanExporter())
    out = outgoing(tracing, case.headers)
    check(case, out.getall("traceparent", []), out.getall("tracestate", []), root_sampled=ratio == 1.0)
    tracing.shutdown()


def test_the_same_parent_gets_a_new_parent_id_on_every_request_even_unsampled() -> None:
    tracing = Tracing(TelemetryConfig(tracing=TracingConfig(sample_ratio=0.0)), env={},
                      exporter=InMemorySpanExporter())
    for parent in (SAMPLED_TP, UNSAMPLED_TP):
        ids = {outgoing(tracing, (("traceparent", parent),))["traceparent"].split("-")[2] for _ in range(3)}
        assert len(ids) == 3
    tracing.shutdown()


@pytest.mark.parametrize("config", [TracingConfig(enabled=False), TracingConfig(exporter="none")])
def test_with_tracing_off_outrigger_is_a_pass_through_that_drops_only_what_is_malformed(
        config: TracingConfig) -> None:
    tracing = Tracing(TelemetryConfig(tracing=config), env={})
    future = f"cc-{T}-1234567890123456-00-extra"
    out = outgoing(tracing, (("traceparent", future), ("tracestate", "foo=1"), ("tracestate", "1foo=2")))
    assert out.getall("traceparent") == [future]  # a higher version is passed on as received
    assert out.getall("tracestate") == ["foo=1,1foo=2"]  # combined
    out = outgoing(tracing, (("traceparent", SAMPLED_TP), ("traceparent", SAMPLED_TP), ("tracestate", "a=1")))
    assert "traceparent" not in out and "tracestate" not in out
    out = outgoing(tracing, (("tracestate", "a=1"),))
    assert "tracestate" not in out  # never without a traceparent
    out = outgoing(tracing, (("traceparent", UNSAMPLED_TP), ("tracestate", "")))
    assert out.getall("traceparent") == [UNSAMPLED_TP] and "tracestate" not in out


def test_higher_versions_are_read_by_the_version_00_prefix() -> None:
    parent = parse_traceparent([f"cc-{T}-1234567890123456-01-anything"])
    assert parent is not None and parent.trace_id == T and parent.sampled
    assert parse_traceparent([f"cc-{T}-1234567890123456-01"]) is not None
    assert parse_traceparent([f"cc-{T}-1234567890123456-01x"]) is None
    assert parse_traceparent([f"00-{T}-1234567890123456-01-x"]) is None


def test_tracestate_keys_follow_the_current_grammar_not_the_sdks() -> None:
    assert parse_tracestate(["foo@=1", "1foo=2", "a/b*c_d-e@f=3"]) == "foo@=1,1foo=2,a/b*c_d-e@f=3"
    assert parse_tracestate(["_foo=1"]) is None
    assert parse_tracestate([",".join(f"k{i}=v" for i in range(33))]) is None
    assert parse_tracestate(["", " "]) is None


def test_rejected_headers_are_never_logged_verbatim_and_at_most_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tracing = Tracing(TelemetryConfig(tracing=TracingConfig(sample_ratio=1.0)), env={},
                      exporter=InMemorySpanExporter())
    for index in range(20):
        outgoing(tracing, (("traceparent", UNSAMPLED_TP), ("tracestate", f"SECRET{index}=token-value")))
    tracing.shutdown()
    lines = [r for r in caplog.records if "tracestate" in r.getMessage()]
    assert len(lines) <= 1
    assert all(r.levelno <= logging.INFO for r in lines)
    assert not [r for r in caplog.records if "SECRET" in r.getMessage() or "token-value" in r.getMessage()]


def test_baggage_beside_a_b3_parent_is_neither_parsed_nor_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    config = TelemetryConfig(tracing=TracingConfig(sample_ratio=1.0), propagators=("tracecontext", "baggage", "b3"))
    tracing = Tracing(config, env={}, exporter=InMemorySpanExporter())
    headers = (("b3", f"{T}-1234567890123456-1"), ("baggage", "SECRET token-value;;=="))
    out = outgoing(tracing, headers)
    assert out["traceparent"].split("-")[1] == T and out.getall("baggage") == ["SECRET token-value;;=="]
    tracing.shutdown()
    assert not [r for r in caplog.records if "SECRET" in r.getMessage()]
