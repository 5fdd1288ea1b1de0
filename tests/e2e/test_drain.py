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

from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config
from tests.support.upstream import Reply, ScriptedUpstream

_CONNECT_SLACK_S = 0.02


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
            assert time.monotonic() - signalled < 0.5, "/readyz did not turn 503 at once"
            await asyncio.sleep(0.01)
        assert await sidecar.admin_status(session, "/healthz") == 200

        # Within the grace period the app's outbound calls are still served...
        async with session.get(url) as resp:
            assert resp.status == 200
        # ...including a slow one that is still in flight when the listeners close.
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - signalled)))
        upstream.script(Reply(body=b"slow but complete", delay=1.0))
        slow = asyncio.ensure_future(session.get(url))
        closing = await sidecar.wait_log("closing listeners")
        assert 1.4 <= closing - signalled_wall <= 2.5  # the listeners close after the 1.5s grace
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
    """200 rps for 3 s, SIGTERM at 1 s, grace 1 s: the listener closes at about 2 s while load goes on."""
    data = base_config(upstream.url)
    data["drain"] = {"grace": "1s", "timeout": "5s"}
    upstream.default = Reply(body=b"ok", delay=0.005)
    sidecar: SidecarProcess = await make_process(data)
    url = f"{sidecar.url}/load"
    results: list[tuple[float, str]] = []  # (wall-clock start, outcome)

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.time()
        try:
            # POST, because clients never silently resend it: every lost request shows.
            async with session.post(url, data=b"payload") as resp:
                await resp.read()
                outcome = "ok" if resp.status == 200 else f"status {resp.status}"
        except aiohttp.ClientConnectorError:
            outcome = "refused"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        results.append((started, outcome))

    rate, seconds = 200, 3.0
    connector = aiohttp.TCPConnector(force_close=not keep_alive)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), connector=connector) as session:
        loop = asyncio.get_running_loop()
        begin = loop.time()
        tasks = []
        assert sidecar.proc is not None
        signalled = 0.0
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + i / rate - loop.time()))
            if i == rate:  # one second in
                sidecar.proc.send_signal(signal.SIGTERM)
                signalled = time.time()
            tasks.append(asyncio.ensure_future(one(session)))
        await asyncio.gather(*tasks)  # nothing hangs, before or after the close
    assert await sidecar.wait(within_s=15) == 0
    closed = sidecar.log_time("closing listeners")  # logged just before the listening sockets close
    assert closed is not None
    before = [(started, outcome) for started, outcome in results if started < closed]
    # The client stamps ``started`` a little before its SYN reaches the socket, so a connection
    # refused within a few ms of the close never reached the open listener: it started after.
    failed = [(round(started - signalled, 3), outcome) for started, outcome in before
              if outcome != "ok" and not (outcome == "refused" and started > closed - _CONNECT_SLACK_S)]
    assert failed == [], f"{len(failed)} of {len(before)} requests started before the listener closed failed"
    served_in_grace = [o for s, o in results if signalled <= s < closed and o == "ok"]
    assert len(served_in_grace) >= rate * 0.9  # the 1 s grace kept serving at full rate
    after = [outcome for started, outcome in results if started >= closed]
    assert after, "the load did not outlast the listener"
    # Later requests may be refused or cut at connect time, but never answered with an error status.
    assert not [o for o in after if o.startswith("status")]


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
        # 2s for the stuck request, then at most 2 x 0.25s while it is cancelled, plus the telemetry flush.
        assert 1.9 <= stopped - closing <= 3.2, stopped - closing
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
