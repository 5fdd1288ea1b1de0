"""SIGTERM during steady 500 rps through ``outrigger run``: nothing lost, exit 0, every span delivered.

Shortened from the issue's 10 s of load to 5 s (SIGTERM at 2 s, 1 s grace, so
the listener closes at about 3 s and load continues 2 s past it) to keep the
default run fast; the rate is the full 500 rps.  Each request carries its own
``traceparent``, so the spans at the real OTLP/gRPC receiver can be matched to
the requests that were served, the last ones included.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.otlp_receiver import GrpcOtlpReceiver
from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream

RATE = 500
SECONDS = 5.0
SIGTERM_AT = 2.0
_CONNECT_SLACK_S = 0.02  # see tests/e2e/test_drain.py


@pytest.fixture
def receiver() -> Iterator[GrpcOtlpReceiver]:
    server = GrpcOtlpReceiver().start()
    yield server
    server.stop()


async def test_sigterm_at_500_rps_loses_no_request_exits_0_and_flushes_every_span(
        upstream: ScriptedUpstream, receiver: GrpcOtlpReceiver, tmp_path: Path) -> None:
    upstream.default = Reply(body=b"ok", delay=0.005)
    data = base_config(upstream.url)
    data["drain"] = {"grace": "1s", "timeout": "5s"}
    data["telemetry"] = {"tracing": {"enabled": True}, "access_log": {"enabled": False}}
    sidecar = await SidecarProcess(data, directory=tmp_path, env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).start()
    url = f"{sidecar.url}/load"
    results: list[tuple[float, str, str]] = []  # (wall-clock start, trace id, outcome)

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        trace_id = f"{index + 1:032x}"
        started = time.time()
        try:
            # POST, because clients never silently resend it: every lost request shows.
            async with session.post(url, data=b"payload",
                                    headers={"traceparent": f"00-{trace_id}-{'1' * 16}-01"}) as resp:
                await resp.read()
                outcome = "ok" if resp.status == 200 else f"status {resp.status}"
        except aiohttp.ClientConnectorError:
            outcome = "refused"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        results.append((started, trace_id, outcome))

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                         connector=aiohttp.TCPConnector(limit=0)) as session:
            loop = asyncio.get_running_loop()
            begin = loop.time()
            tasks = []
            for i in range(int(RATE * SECONDS)):
                await asyncio.sleep(max(0.0, begin + i / RATE - loop.time()))
                if i == int(RATE * SIGTERM_AT):
                    assert sidecar.proc is not None
                    sidecar.proc.send_signal(signal.SIGTERM)
                tasks.append(asyncio.ensure_future(one(session, i)))
            achieved = len(tasks) / (loop.time() - begin)
            await asyncio.gather(*tasks)
        code = await sidecar.stop()
    finally:
        await sidecar.kill()
    assert code == 0
    closed = sidecar.log_time("closing listeners")
    assert closed is not None, sidecar.stderr()[-2000:]

    assert achieved > 0.9 * RATE, f"the load generator only reached {achieved:.0f} rps"
    before = [(s, t, o) for s, t, o in results if s < closed]
    failed = [o for s, _, o in before if o != "ok" and not (o == "refused" and s > closed - _CONNECT_SLACK_S)]
    assert failed == [], f"{len(failed)} of {len(before)} requests started before the listener closed failed"
    after = [o for s, _, o in results if s >= closed]
    assert after and not [o for o in after if o.startswith("status")]

    served = {t for _, t, o in results if o == "ok"}
    spans = receiver.wait_for(lambda got: len({s.trace_id for s in got if s.kind == "SERVER"} & served)
                              >= len(served), timeout=2)
    delivered = {s.trace_id for s in spans if s.kind == "SERVER"}
    missing = served - delivered
    last = sorted(served)[-20:]  # the last requests served, during the drain
    print(f"\ndrain: {achieved:.0f} rps, {len(before)} requests before the close, 0 failed, {len(served)} served, "
          f"{len(served & delivered)} SERVER spans delivered")
    assert not missing, f"{len(missing)} of {len(served)} served requests have no SERVER span"
    assert set(last) <= delivered
