"""``/metrics`` against real traffic: exact counters, promtool, OpenMetrics exemplars.

Every test drives a real in-process sidecar over loopback against the
scripted upstream, scrapes the admin port over HTTP, and parses the text
with prometheus_client's own parsers, so the exposition format is checked
along with the numbers.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from typing import Any

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from proxy.telemetry.metrics import Metrics
from tests.support.otlp_receiver import GrpcOtlpReceiver
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream, Stream

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
PROMTOOL = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)


class Scrape:
    """One parsed scrape: ``value(name, **labels)`` sums the samples whose labels match."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: list[Any] = [
            s for family in text_string_to_metric_families(text) for s in family.samples
        ]

    def value(self, name: str, **labels: str) -> float:
        matches = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert matches, f"no sample {name}{labels}"
        return float(sum(matches))

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


async def scrape(client: aiohttp.ClientSession, sidecar: Any, accept: str | None = None) -> Scrape:
    headers = {"Accept": accept} if accept else {}
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics", headers=headers) as resp:
        assert resp.status == 200
        return Scrape(await resp.text())


async def get(client: aiohttp.ClientSession, sidecar: Any, path: str = "/x", **kwargs: Any) -> int:
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}{path}", **kwargs) as resp:
        await resp.read()
        return resp.status


async def test_ten_requests_failing_twice_give_exact_retry_and_attempt_counts(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    """10 requests, each 503, 503, 200 with max_attempts 3: 20 retries, 20 http_5xx, 10 successes."""
    for _ in range(10):
        upstream.script(Reply(status=503), Reply(status=503), Reply(status=200))
    sidecar = await sidecar_factory(base_config(upstream.url))
    assert [await get(client, sidecar) for _ in range(10)] == [200] * 10

    m = await scrape(client, sidecar)
    route = {"route": "default", "upstream": "svc"}
    assert m.value("outrigger_retries_total", **route) == 20
    assert m.value("outrigger_retries_total", reason="http_503", **route) == 20
    assert m.value("outrigger_upstream_attempts_total", result="http_5xx", **route) == 20
    assert m.value("outrigger_upstream_attempts_total", result="success", **route) == 10
    for result in ("http_4xx", "timeout", "reset", "connect_failure"):
        assert m.value("outrigger_upstream_attempts_total", result=result, **route) == 0
    assert m.value("outrigger_requests_total", code="2xx", outcome="upstream", method="GET", **route) == 10
    assert m.value("outrigger_requests_total") == 10
    assert m.value("outrigger_request_duration_seconds_count", code="2xx", method="GET", **route) == 10
    assert m.value("outrigger_upstream_attempt_duration_seconds_count", **route) == 30
    assert m.value("outrigger_retry_budget_exhausted_total", **route) == 0
    assert m.value("outrigger_inflight_requests", route="default") == 0
    assert m.value("outrigger_circuit_breaker_state", upstream="svc", state="closed") == 1
    assert m.value("outrigger_build_info") == 1
    assert m.value("outrigger_config_reloads_total", result="success") == 0
    assert m.value("outrigger_config_reloads_total", result="failure") == 0
    assert m.value("outrigger_spans_dropped_total") == 0


async def test_breaker_state_gauge_and_transitions_follow_the_breaker(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    upstream.script(Reply(status=500), Reply(status=500))
    config = base_config(upstream.url, retry={"max_attempts": 1})
    config["upstreams"]["svc"]["circuit_breaker"] = {
        "consecutive_failures": 2,
        "open_duration": {"min": "100ms", "max": "150ms"},
    }
    sidecar = await sidecar_factory(config)
    assert [await get(client, sidecar) for _ in range(3)] == [500, 500, 503]

    m = await scrape(client, sidecar)
    assert m.value("outrigger_circuit_breaker_state", upstream="svc", state="open") == 1
    assert m.value("outrigger_circuit_breaker_state", upstream="svc", state="closed") == 0
    assert m.value("outrigger_circuit_breaker_state", upstream="svc", state="half_open") == 0
    assert (
        m.value(
            "outrigger_circuit_breaker_transitions_total",
            upstream="svc",
            from_state="closed",
            to_state="open",
        )
        == 1
    )
    assert m.value("outrigger_requests_total", code="5xx", outcome="circuit_open") == 1
    assert m.value("outrigger_upstream_attempts_total", result="http_5xx") == 2  # the rejected one never went

    await asyncio.sleep(0.2)  # past open_duration.max: the next call is the half-open probe
    assert await get(client, sidecar) == 200
    m = await scrape(client, sidecar)
    assert m.value("outrigger_circuit_breaker_state", upstream="svc", state="closed") == 1
    assert m.value("outrigger_circuit_breaker_state", upstream="svc", state="open") == 0
    for old, new in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
        assert (
            m.value(
                "outrigger_circuit_breaker_transitions_total", upstream="svc", from_state=old, to_state=new
            )
            == 1
        )


async def test_rate_limited_requests_are_counted_per_route(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    config = base_config(upstream.url, rate_limit={"requests_per_second": 0.001, "burst": 2})
    sidecar = await sidecar_factory(config)
    assert sorted([await get(client, sidecar) for _ in range(5)]) == [200, 200, 429, 429, 429]
    m = await scrape(client, sidecar)
    assert m.value("outrigger_rate_limited_total", route="default") == 3
    assert m.value("outrigger_requests_total", code="4xx", outcome="rate_limited") == 3
    assert m.value("outrigger_upstream_attempts_total") == 2


async def test_bulkhead_rejections_are_counted_per_upstream(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    upstream.default = Reply(delay=0.3)
    config = base_config(upstream.url)
    config["upstreams"]["svc"]["concurrency"] = {"max_active": 1, "max_pending": 0}
    sidecar = await sidecar_factory(config)
    statuses = await asyncio.gather(*(get(client, sidecar) for _ in range(3)))
    assert sorted(statuses) == [200, 503, 503]
    m = await scrape(client, sidecar)
    assert m.value("outrigger_bulkhead_rejected_total", upstream="svc") == 2
    assert m.value("outrigger_requests_total", code="5xx", outcome="overflow") == 2
    assert m.value("outrigger_inflight_requests", route="default") == 0


async def test_attempt_and_total_timeouts_are_counted_by_kind(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    """Attempt 1 hits the 100ms attempt timeout; attempt 2 is cut by the 150ms total."""
    upstream.default = Reply(delay=0.5)
    sidecar = await sidecar_factory(base_config(upstream.url, timeout={"attempt": "100ms", "total": "150ms"}))
    assert await get(client, sidecar) == 504
    m = await scrape(client, sidecar)
    route = {"route": "default", "upstream": "svc"}
    assert m.value("outrigger_timeouts_total", kind="attempt", **route) == 1
    assert m.value("outrigger_timeouts_total", kind="total", **route) == 1
    assert m.value("outrigger_timeouts_total", kind="connect", **route) == 0
    assert m.value("outrigger_upstream_attempts_total", result="timeout", **route) == 2
    assert m.value("outrigger_requests_total", code="5xx", outcome="deadline_exceeded", **route) == 1


async def test_idle_does_not_bound_the_wait_for_response_headers_the_attempt_timeout_does(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    """`idle` is the gap between body chunks; before the headers only `attempt` counts."""
    upstream.default = Reply(delay=0.5)
    config = base_config(upstream.url, timeout={"idle": "100ms", "attempt": "2s"}, retry={"max_attempts": 1})
    sidecar = await sidecar_factory(config)
    assert await get(client, sidecar) == 200
    m = await scrape(client, sidecar)
    assert m.value("outrigger_timeouts_total", kind="idle") == 0
    assert m.value("outrigger_upstream_attempts_total", result="success") == 1


async def test_inflight_gauge_counts_a_held_request_and_returns_to_zero(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    upstream.script(Reply(delay=0.4))
    sidecar = await sidecar_factory(base_config(upstream.url))
    held = asyncio.ensure_future(get(client, sidecar))
    await asyncio.sleep(0.15)
    assert (await scrape(client, sidecar)).value("outrigger_inflight_requests", route="default") == 1
    assert await held == 200
    assert (await scrape(client, sidecar)).value("outrigger_inflight_requests", route="default") == 0


async def test_made_up_methods_share_one_label_value(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    for method in ("PROPFIND", "MKCOL", "GET"):  # valid HTTP tokens, but not in the standard set
        async with client.request(method, f"http://127.0.0.1:{sidecar.port('main')}/x") as resp:
            await resp.read()
    m = await scrape(client, sidecar)
    methods = {s.labels["method"] for s in m.samples if s.name == "outrigger_requests_total"}
    assert methods == {"_OTHER", "GET"}
    assert m.value("outrigger_requests_total", method="_OTHER") == 2


async def test_process_and_python_collectors_are_exposed(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url), metrics=Metrics(version="9.9.9"))
    m = await scrape(client, sidecar)
    assert {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "python_info",
        "python_gc_objects_collected_total",
    } <= m.names()
    assert m.value("outrigger_build_info", version="9.9.9") == 1


async def test_promtool_check_metrics_passes_on_the_exposition(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    promtool = PROMTOOL
    assert promtool, "promtool is required (Debian package `prometheus`)"
    upstream.script(Reply(status=503))
    config = base_config(upstream.url, rate_limit={"requests_per_second": 0.001, "burst": 3})
    sidecar = await sidecar_factory(config, metrics=Metrics(version="1.0.0"))
    for _ in range(4):
        await get(client, sidecar)
    text = (await scrape(client, sidecar)).text
    process = await asyncio.create_subprocess_exec(
        promtool, "check", "metrics", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(text.encode()), 30)
    assert process.returncode is not None
    result = subprocess.CompletedProcess([promtool], process.returncode, out.decode(), err.decode())
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stdout + result.stderr


async def test_openmetrics_scrape_carries_trace_id_exemplars_and_text_scrape_does_not(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    receiver = GrpcOtlpReceiver().start()
    try:
        config = base_config(upstream.url)
        config["telemetry"]["tracing"] = {
            "enabled": True,
            "endpoint": receiver.endpoint,
            "protocol": "grpc",
            "sample_ratio": 1.0,
        }
        sidecar = await sidecar_factory(config, env={})
        assert await get(client, sidecar) == 200

        async with client.get(
            f"http://127.0.0.1:{sidecar.admin_port}/metrics", headers={"Accept": OPENMETRICS}
        ) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            body = await resp.text()
        assert body.rstrip().endswith("# EOF")
        exemplars = [
            s.exemplar
            for family in parse_openmetrics(body)
            for s in family.samples
            if s.name == "outrigger_request_duration_seconds_bucket" and s.exemplar is not None
        ]
        assert len(exemplars) == 1
        trace_id = exemplars[0].labels["trace_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
        attempt_exemplars = [
            s.exemplar
            for family in parse_openmetrics(body)
            for s in family.samples
            if s.name == "outrigger_upstream_attempt_duration_seconds_bucket" and s.exemplar
        ]
        assert [e.labels["trace_id"] for e in attempt_exemplars] == [trace_id]

        async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/metrics") as resp:
            assert resp.headers["Content-Type"].startswith("text/plain")
            plain = await resp.text()
        assert "# {" not in plain and "# EOF" not in plain
        Scrape(plain)  # parses as the text format

        await sidecar.stop()
        spans = receiver.wait_for(lambda s: any(x.kind == "SERVER" for x in s))
        assert {s.trace_id for s in spans if s.kind == "SERVER"} == {trace_id}
    finally:
        receiver.stop()


async def test_unsampled_requests_leave_no_exemplars(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    receiver = GrpcOtlpReceiver().start()
    try:
        config = base_config(upstream.url)
        config["telemetry"]["tracing"] = {"enabled": True, "endpoint": receiver.endpoint, "sample_ratio": 0.0}
        sidecar = await sidecar_factory(config, env={})
        assert await get(client, sidecar) == 200
        async with client.get(
            f"http://127.0.0.1:{sidecar.admin_port}/metrics", headers={"Accept": OPENMETRICS}
        ) as resp:
            body = await resp.text()
        assert not [s for family in parse_openmetrics(body) for s in family.samples if s.exemplar is not None]
    finally:
        receiver.stop()


@pytest.mark.parametrize("accept", ["text/plain", "*/*", "application/json", ""])
async def test_non_openmetrics_accept_headers_get_the_text_format(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, accept: str
) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(
        f"http://127.0.0.1:{sidecar.admin_port}/metrics", headers={"Accept": accept}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")


async def test_request_duration_ends_when_the_response_head_is_sent_not_when_a_slow_body_ends(
    upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession
) -> None:
    upstream.script(Stream(chunks=4, chunk_size=10, interval=0.25))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/stream") as resp:
        assert resp.status == 200
        assert len(await resp.read()) == 40  # about 0.75s of body after the head
    m = await scrape(client, sidecar)
    route = {"route": "default", "upstream": "svc", "method": "GET", "code": "2xx"}
    assert m.value("outrigger_request_duration_seconds_count", **route) == 1
    assert m.value("outrigger_request_duration_seconds_sum", **route) < 0.5
