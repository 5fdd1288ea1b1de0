"""The access log: one JSON line per request on stdout, never a query string or header value."""

from __future__ import annotations

import json
import re
from typing import Any

import aiohttp
import pytest
import yarl

from tests.support.otlp_receiver import GrpcOtlpReceiver
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream

FIELDS = {
    "time",
    "request_id",
    "trace_id",
    "span_id",
    "method",
    "path",
    "route",
    "upstream",
    "endpoint",
    "status",
    "attempts",
    "duration_ms",
    "upstream_duration_ms",
    "bytes_in",
    "bytes_out",
    "error",
}
SECRET_QUERY = "q-secret-7f3a9"
SECRET_HEADER = "h-secret-b81c2"


def access_config(upstream_url: str, **route: Any) -> dict[str, Any]:
    config = base_config(upstream_url, **route)
    config["telemetry"]["access_log"] = {"enabled": True}
    return config


def lines(sidecar: Any, capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    sidecar.access_log.flush()
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


async def test_each_request_writes_one_line_with_every_field_and_no_secrets(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream.script(Reply(status=201, body=b"created!"))
    sidecar = await sidecar_factory(access_config(upstream.url))
    url = f"http://127.0.0.1:{sidecar.port('main')}/v1/orders?token={SECRET_QUERY}&page=2"
    async with client.post(
        url,
        data=b"hello",
        headers={
            "Authorization": f"Bearer {SECRET_HEADER}",
            "X-Api-Key": SECRET_HEADER,
            "x-request-id": "req-42",
        },
    ) as resp:
        assert resp.status == 201
        await resp.read()
    sidecar.access_log.flush()
    out = capsys.readouterr().out
    assert SECRET_QUERY not in out and SECRET_HEADER not in out and "token" not in out
    (entry,) = [json.loads(line) for line in out.splitlines()]
    assert set(entry) == FIELDS
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["request_id"] == "req-42"
    assert entry["method"] == "POST" and entry["path"] == "/v1/orders"
    assert (entry["route"], entry["upstream"]) == ("default", "svc")
    assert entry["status"] == 201 and entry["attempts"] == 1 and entry["error"] is None
    assert entry["bytes_in"] == 5
    assert entry["trace_id"] is None and entry["span_id"] is None  # tracing is off
    assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] > 0


async def test_proxy_errors_are_logged_with_their_code(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sidecar = await sidecar_factory(
        access_config(upstream.url, rate_limit={"requests_per_second": 0.001, "burst": 1})
    )
    for _ in range(2):
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/a?k={SECRET_QUERY}") as resp:
            await resp.read()
    first, second = lines(sidecar, capsys)
    assert (first["status"], first["error"], first["attempts"]) == (200, None, 1)
    assert (second["status"], second["error"], second["attempts"]) == (429, "rate_limited", 0)
    assert second["path"] == "/a"


async def test_unrouted_requests_are_logged_without_route(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = access_config(upstream.url, match={"path_prefix": "/only"})
    sidecar = await sidecar_factory(config)
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/elsewhere") as resp:
        assert resp.status == 404
    (entry,) = lines(sidecar, capsys)
    assert entry["route"] is None and entry["upstream"] is None
    assert (entry["status"], entry["error"]) == (404, "no_route")


async def test_sampled_requests_log_the_server_span_ids(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    receiver = GrpcOtlpReceiver().start()
    try:
        config = access_config(upstream.url)
        config["telemetry"]["tracing"] = {"enabled": True, "endpoint": receiver.endpoint}
        sidecar = await sidecar_factory(config, env={})
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/t") as resp:
            await resp.read()
        (entry,) = lines(sidecar, capsys)
        await sidecar.stop()
        spans = receiver.wait_for(lambda s: any(x.kind == "SERVER" for x in s))
        server = next(s for s in spans if s.kind == "SERVER")
        assert (entry["trace_id"], entry["span_id"]) == (server.trace_id, server.span_id)
    finally:
        receiver.stop()


async def test_upstream_duration_and_bytes_out_describe_the_upstream_exchange(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream.script(Reply(status=503, delay=0.05), Reply(status=200, body=b"0123456789", delay=0.05))
    sidecar = await sidecar_factory(access_config(upstream.url))
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/d") as resp:
        assert await resp.read() == b"0123456789"
    (entry,) = lines(sidecar, capsys)
    assert entry["bytes_out"] == 10
    assert isinstance(entry["upstream_duration_ms"], float)
    assert 100 <= entry["upstream_duration_ms"] <= entry["duration_ms"]


async def test_bytes_in_counts_a_chunked_request_body(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sidecar = await sidecar_factory(access_config(upstream.url))

    async def body() -> Any:
        for _ in range(4):
            yield b"x" * 500

    async with client.post(f"http://127.0.0.1:{sidecar.port('main')}/upload", data=body()) as resp:
        assert resp.status == 200
    [line] = lines(sidecar, capsys)
    assert line["bytes_in"] == 2000
    assert upstream.requests[-1].body_size == 2000


async def test_the_path_is_logged_as_sent_so_an_encoded_question_mark_is_no_query(
    upstream: ScriptedUpstream,
    sidecar_factory: Any,
    client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sidecar = await sidecar_factory(access_config(upstream.url))
    url = yarl.URL(f"http://127.0.0.1:{sidecar.port('main')}/ok%3Fapi_key%3D{SECRET_QUERY}?real=1", encoded=True)
    async with client.get(url) as resp:
        assert resp.status == 200
    [line] = lines(sidecar, capsys)
    assert line["path"] == f"/ok%3Fapi_key%3D{SECRET_QUERY}"
