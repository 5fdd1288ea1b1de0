"""W3C Trace Context through a real sidecar to a real upstream, whatever the collector and the ratio.

The suite's cases (``tests/support/trace_context_cases.py``) are sent by a
real client; the upstream records the header lines it got.  What it gets must
not depend on the collector (up, down, absent) nor on the sample ratio, beyond
the sampled flag of a new root trace, which is the ratio's decision.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from proxy.lifecycle.sidecar import Sidecar
from tests.support.otlp_receiver import GrpcOtlpReceiver
from tests.support.ports import free_port
from tests.support.sidecar import base_config
from tests.support.trace_context_cases import CASES, SAMPLED_TP, check
from tests.support.upstream import ScriptedUpstream


@pytest.fixture
def receiver() -> Iterator[GrpcOtlpReceiver]:
    server = GrpcOtlpReceiver().start()
    yield server
    server.stop()


async def send(client: aiohttp.ClientSession, sidecar: Sidecar, headers: tuple[tuple[str, str], ...]) -> None:
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/tc", headers=CIMultiDict(headers)) as resp:
        assert resp.status == 200


def sent(upstream: ScriptedUpstream, index: int, name: str) -> list[str]:
    return [value for key, value in upstream.requests[index].raw_headers if key.lower() == name]


@pytest.mark.parametrize("ratio", [0.0, 0.01, 1.0])
@pytest.mark.parametrize("collector", ["up", "down", "absent"])
async def test_trace_context_is_the_same_with_the_collector_up_down_or_absent_at_any_ratio(
    collector: str, ratio: float, upstream: ScriptedUpstream, sidecar_factory: Any,
    client: aiohttp.ClientSession, receiver: GrpcOtlpReceiver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = base_config(upstream.url)
    tracing: dict[str, Any] = {"enabled": True, "sample_ratio": ratio}
    env: dict[str, str] = {}
    if collector == "up":
        tracing["endpoint"] = receiver.endpoint
    else:  # nothing listens there; exports fail fast, and a bounded flush at stop drops what is left
        env.update(OTEL_EXPORTER_OTLP_TRACES_TIMEOUT="1", OTEL_BSP_SCHEDULE_DELAY="20", OTEL_BSP_EXPORT_TIMEOUT="100")
        tracing.update(protocol="http/protobuf", endpoint=f"http://127.0.0.1:{free_port()}")
    # The exporter reads the sidecar's `env`, the span queue (OTEL_BSP_SCHEDULE_DELAY) reads os.environ.
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config["telemetry"]["tracing"] = tracing
    sidecar = await sidecar_factory(config, env=env)
    first = 0
    if collector == "down":  # a first traced request fails to export: the collector gate closes
        await send(client, sidecar, (("traceparent", SAMPLED_TP),))
        deadline = time.monotonic() + 10
        while sidecar.tracing.export_state.healthy and time.monotonic() < deadline:  # noqa: ASYNC110 (set on the export thread)
            await asyncio.sleep(0.02)
        assert not sidecar.tracing.export_state.healthy
        first = 1
    for case in CASES:
        await send(client, sidecar, case.headers)
    root_sampled = {0.0: False, 1.0: True}.get(ratio)
    for index, case in enumerate(CASES, start=first):
        check(case, sent(upstream, index, "traceparent"), sent(upstream, index, "tracestate"), root_sampled)
    await sidecar.stop()  # before the receiver goes: the exporter's channel would hold up its stop
    if collector == "up" and ratio == 1.0:  # recorded: each upstream call's parent is its CLIENT span
        recorded = [i for i, case in enumerate(CASES) if case.sampled or not case.continued]
        spans = receiver.wait_for(lambda s: sum(x.kind == "CLIENT" for x in s) >= len(recorded), timeout=5)
        client_ids = {s.span_id for s in spans if s.kind == "CLIENT"}
        assert {sent(upstream, i, "traceparent")[0].split("-")[2] for i in recorded} <= client_ids
