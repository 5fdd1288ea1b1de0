"""Policy decisions as span events, exported by an in-process sidecar to a real OTLP/gRPC receiver."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import yarl

from tests.support.otlp_receiver import GrpcOtlpReceiver, ReceivedSpan
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream


@pytest.fixture
def receiver() -> Iterator[GrpcOtlpReceiver]:
    server = GrpcOtlpReceiver().start()
    yield server
    server.stop()


def traced(upstream_url: str, receiver: GrpcOtlpReceiver, **route: Any) -> dict[str, Any]:
    config = base_config(upstream_url, **route)
    config["telemetry"]["tracing"] = {"enabled": True, "endpoint": receiver.endpoint, "sample_ratio": 1.0}
    return config


async def servers(sidecar: Any, receiver: GrpcOtlpReceiver, count: int) -> list[ReceivedSpan]:
    await sidecar.stop()  # flushes
    spans = receiver.wait_for(lambda s: sum(x.kind == "SERVER" for x in s) >= count, timeout=5)
    return [s for s in spans if s.kind == "SERVER"]


async def test_rate_limited_request_has_an_event_and_leaves_the_server_status_unset(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    receiver: GrpcOtlpReceiver,
) -> None:
    config = traced(upstream.url, receiver, rate_limit={"requests_per_second": 0.001, "burst": 1})
    sidecar = await sidecar_factory(config, env={})
    for _ in range(2):
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/r") as resp:
            await resp.read()
    ok, limited = sorted(
        await servers(sidecar, receiver, 2), key=lambda s: s.attributes["http.response.status_code"]
    )
    assert ok.status == "UNSET" and ok.event_names() == []
    assert limited.attributes["http.response.status_code"] == 429
    # semconv: a SERVER span with a 4xx, Outrigger's own included, leaves the status unset
    assert limited.attributes["outrigger.outcome"] == "rate_limited" and limited.status == "UNSET"
    assert "error.type" not in limited.attributes
    assert "rate_limited" in limited.event_names()
    assert limited.attributes["outrigger.attempt"] == 0


async def test_deadline_and_budget_decisions_are_events(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    receiver: GrpcOtlpReceiver,
) -> None:
    upstream.default = Reply(delay=0.5)
    config = traced(upstream.url, receiver, timeout={"attempt": "100ms", "total": "150ms"})
    sidecar = await sidecar_factory(config, env={})
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/slow") as resp:
        assert resp.status == 504
    (server,) = await servers(sidecar, receiver, 1)
    assert server.event_names()[:1] == ["backoff"]
    assert "deadline_exceeded" in server.event_names()
    assert server.attributes["error.type"] == "deadline_exceeded" and server.status == "ERROR"
    clients = [s for s in receiver.wait_for(lambda s: True, 0) if s.kind == "CLIENT"]
    assert sorted(c.attributes["outrigger.attempt"] for c in clients) == [1, 2]
    assert all(c.status == "ERROR" for c in clients)


async def test_server_span_names_the_listener_port(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    receiver: GrpcOtlpReceiver,
) -> None:
    sidecar = await sidecar_factory(traced(upstream.url, receiver), env={})
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/p") as resp:
        await resp.read()
    port = sidecar.port("main")
    (server,) = await servers(sidecar, receiver, 1)
    assert server.attributes["server.port"] == port


async def test_requests_refused_before_routing_get_a_server_span_continuing_the_apps_trace(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    receiver: GrpcOtlpReceiver,
) -> None:
    config = traced(upstream.url, receiver, match={"path_prefix": "/api"})
    sidecar = await sidecar_factory(config, env={})
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/elsewhere",
                          headers={"traceparent": parent}) as resp:
        assert resp.status == 404
    [span] = await servers(sidecar, receiver, 1)
    assert span.name == "GET"  # no route: named by the method alone
    assert span.trace_id == "0af7651916cd43dd8448eb211c80319c" and span.parent_span_id == "b7ad6b7169203331"
    assert span.attributes["outrigger.outcome"] == "no_route" and span.status == "UNSET"  # a 4xx: unset
    assert span.attributes["http.response.status_code"] == 404
    assert upstream.requests == []


async def test_a_percent_encoded_question_mark_is_recorded_as_sent_not_as_a_query(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    receiver: GrpcOtlpReceiver,
) -> None:
    sidecar = await sidecar_factory(traced(upstream.url, receiver), env={})
    url = yarl.URL(f"http://127.0.0.1:{sidecar.port('main')}/ok%3Fapi_key%3Dsecret", encoded=True)
    async with client.get(url) as resp:
        assert resp.status == 200
    [span] = await servers(sidecar, receiver, 1)
    assert span.attributes["url.path"] == "/ok%3Fapi_key%3Dsecret"
    assert "url.query" not in span.attributes


async def test_an_attempt_cut_off_by_the_deadline_names_it_on_the_client_span(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    receiver: GrpcOtlpReceiver,
) -> None:
    upstream.default = Reply(delay=2.0)
    sidecar = await sidecar_factory(traced(upstream.url, receiver, retry={"max_attempts": 1}), env={})
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/slow",
                          headers={"x-outrigger-timeout-ms": "200"}) as resp:
        assert resp.status == 504
        assert resp.headers["x-outrigger-attempts"] == "1"
    await sidecar.stop()
    spans = receiver.wait_for(lambda s: any(x.kind == "CLIENT" for x in s), timeout=5)
    [attempt] = [s for s in spans if s.kind == "CLIENT"]
    assert attempt.attributes["error.type"] == "deadline_exceeded" and attempt.status == "ERROR"
