"""Drain of a real `outrigger run` process: probes, grace, in-flight requests, steady load, exit code."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.drain_load import lost_at_close, post_load
from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream


@pytest.fixture
async def make_process(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[SidecarProcess] = []

    async def make(data: dict[str, Any]) -> SidecarProcess:
        process = SidecarProcess(data, directory=tmp_path)
        started.append(process)
        return await process.start(within_s=10)

    yield make
    for process in started:
        await process.kill()


async def test_probes_and_traffic_before_during_and_after_drain(upstream: ScriptedUpstream, make_process: Any) -> None:
    data = base_config(upstream.url)
    data["drain"] = {"grace": "1.5s", "timeout": "5s"}
    data["defaults"]["timeout"] = {"attempt": "4s", "total": "4s"}  # room for the slow call below
    sidecar: SidecarProcess = await make_process(data)
    url = f"{sidecar.url}/work"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        assert await sidecar.admin_status(session, "/readyz") == 200
        assert await sidecar.admin_status(session, "/healthz") == 200
        async with session.get(url) as resp:
            assert resp.status == 200

        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGTERM)
        signalled, signalled_wall = time.monotonic(), time.time()
        while await sidecar.admin_status(session, "/readyz") != 503:
            # At once: well inside the 1.5 s grace (a busy machine may take a few hundred ms to say so).
            assert time.monotonic() - signalled < 1.0, "/readyz did not turn 503 at once"
            await asyncio.sleep(0.01)
        assert await sidecar.admin_status(session, "/healthz") == 200

        # Within the grace period the app's outbound calls are still served...
        async with session.get(url) as resp:
            assert resp.status == 200
        # ...including a slow one that is still in flight when the listeners close.
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - signalled)))
        # 2.5 s: still in flight at the close even when a busy machine logs it late.
        upstream.script(Reply(body=b"slow but complete", delay=2.5))
        slow = asyncio.ensure_future(session.get(url))
        closing = await sidecar.wait_log("closing listeners")
        # The listeners close after the 1.5 s grace: not before it, and not at the 5 s drain.timeout.
        assert 1.4 <= closing - signalled_wall <= 4.0
        assert not slow.done()  # still in flight while the listeners close
        await asyncio.sleep(0.1)
        with pytest.raises(aiohttp.ClientConnectorError):  # connection refused
            async with session.get(url):
                pass
        async with await slow as resp:
            assert resp.status == 200
            assert await resp.read() == b"slow but complete"
    assert await sidecar.wait(within_s=15) == 0
    assert sidecar.log_time("outrigger stopped") is not None


async def _steady_load_through_drain(upstream: ScriptedUpstream, make_process: Any, *,
                                     keep_alive: bool) -> None:
    """200 rps for 2.5 s, SIGTERM at 0.5 s, grace 1 s: the listener closes at about 1.5 s while load goes on.

    Which failures count as lost is decided by ``tests.support.drain_load``.
    """
    data = base_config(upstream.url)
    data["drain"] = {"grace": "1s", "timeout": "5s"}
    upstream.default = Reply(body=b"ok", delay=0.005)
    sidecar: SidecarProcess = await make_process(data)
    rate, seconds, grace_s = 200, 2.5, 1.0
    signalled = 0.0

    def sigterm_at(index: int) -> None:
        nonlocal signalled
        if index == rate // 2:  # half a second in
            assert sidecar.proc is not None
            sidecar.proc.send_signal(signal.SIGTERM)
            signalled = time.time()

    results, _, lag = await post_load(f"{sidecar.url}/load", rate, seconds, keep_alive=keep_alive,
                                      at_index=sigterm_at)
    assert await sidecar.wait(within_s=15) == 0
    closed = sidecar.log_time("closing listeners")  # logged just before the listening sockets close
    assert closed is not None
    lost, _ = lost_at_close(results, closed, lag)
    assert lost == [], f"{len(lost)} requests the open listener took failed: {lost[:10]}"
    # The grace kept the listener open and serving: no earlier close, and every request of the
    # grace period served (at least half the nominal rate arrived, however busy the machine).
    assert closed - signalled >= 0.95 * grace_s
    in_grace = [r for r in results if signalled <= r.started < closed - 0.1]
    assert len(in_grace) >= rate * grace_s / 2
    assert [r.outcome for r in in_grace if r.outcome != "ok"] == []
    after = [r for r in results if r.started >= closed]
    assert after, "the load did not outlast the listener"


async def test_no_request_started_before_the_listener_closed_fails_under_steady_load(
        upstream: ScriptedUpstream, make_process: Any) -> None:
    await _steady_load_through_drain(upstream, make_process, keep_alive=False)


async def test_no_request_over_keep_alive_connections_started_before_the_listener_closed_fails(
        upstream: ScriptedUpstream, make_process: Any) -> None:
    await _steady_load_through_drain(upstream, make_process, keep_alive=True)


async def test_a_request_stuck_past_drain_timeout_is_cut_off_and_the_process_exits_soon_after(
        upstream: ScriptedUpstream, make_process: Any) -> None:
    """drain.timeout bounds the wait for in-flight requests once (aiohttp's own shutdown would wait it twice)."""
    data = base_config(upstream.url)
    data["drain"] = {"grace": "0s", "timeout": "2s"}
    data["defaults"]["timeout"] = {"attempt": "30s", "total": "60s"}
    sidecar: SidecarProcess = await make_process(data)
    upstream.script(Reply(body=b"too late", delay=20.0))
    async with aiohttp.ClientSession() as session:
        stuck = asyncio.ensure_future(session.get(f"{sidecar.url}/stuck"))
        await asyncio.sleep(0.3)
        assert not stuck.done()
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGTERM)
        closing = await sidecar.wait_log("closing listeners")
        assert await sidecar.wait(within_s=15) == 0
        stopped = sidecar.log_time("outrigger stopped")
        assert stopped is not None
        # 2s for the stuck request, then at most 2 x 0.25s while it is cancelled, plus the telemetry flush;
        # waiting drain.timeout twice (the bug this guards against) would take 4 s or more.
        assert 1.9 <= stopped - closing < 3.9, stopped - closing
        with pytest.raises(aiohttp.ClientError):  # the app sees its connection end, not a hang
            async with await stuck as resp:
                await resp.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_second_stop_signal_ends_the_drain_at_once(upstream: ScriptedUpstream, make_process: Any,
                                                           sig: signal.Signals) -> None:
    """The habit of dev servers and docker compose: the first signal drains, the second one quits now."""
    data = base_config(upstream.url)
    data["drain"] = {"grace": "10s", "timeout": "10s"}
    sidecar: SidecarProcess = await make_process(data)
    upstream.script(Reply(body=b"too slow", delay=8.0))
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(f"{sidecar.url}/slow"))
        for _ in range(200):
            if upstream.requests:
                break
            await asyncio.sleep(0.01)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(sig)
        await sidecar.wait_log("draining")
        started = time.monotonic()
        sidecar.proc.send_signal(sig)
        assert await sidecar.wait(within_s=5.0) == 0
        assert time.monotonic() - started < 3.0  # not the 10 s grace, nor the 8 s request
        with contextlib.suppress(aiohttp.ClientError):
            async with await slow as resp:
                await resp.read()
    assert "second stop signal" in sidecar.stderr()
