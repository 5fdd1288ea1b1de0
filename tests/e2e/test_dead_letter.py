"""Dead letters end to end: `outrigger run` spools, `outrigger dlq` lists, shows and replays (real processes).

The upstream is a keyed counter in this process: while failing it answers
503; once healed it records every delivery by Idempotency-Key and checks the
body is the one that key was sent with, so a duplicate or a torn record
replayed would show.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.process import SidecarProcess

HEADER = "x-outrigger-dead-letter"


class KeyedUpstream:
    def __init__(self) -> None:
        self.healthy = False
        self.deliveries: Counter[str] = Counter()
        self.bad_bodies: list[str] = []
        self.replay_headers: list[str] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self.healthy:
            return web.Response(status=503, text="down")
        key = request.headers.get("Idempotency-Key", "")
        if body != f"payload-{key}".encode():
            self.bad_bodies.append(key)
        self.deliveries[key] += 1
        self.replay_headers.append(request.headers.get("x-outrigger-replay", ""))
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def keyed() -> Any:
    upstream = KeyedUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def _config(upstream_port: int, spool: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "drain": {"grace": "0s", "timeout": "2s"},
        "dead_letter": {"dir": str(spool), "max_bytes": "64MiB", "max_age": "1d"},
        "defaults": {"retry": {"max_attempts": 2, "backoff": {"base": "1ms", "max": "2ms"}},
                     "circuit_breaker": {"enabled": False}},
        "upstreams": {"hooks": {"url": f"http://127.0.0.1:{upstream_port}"}},
        "listeners": [{"name": "main", "address": "127.0.0.1:0", "routes": [{
            "name": "webhooks", "upstream": "hooks", "match": {"path_prefix": "/hooks"},
            "rewrite_prefix": "/in",
            "dead_letter": {"on": ["http_5xx", "upstream_connect_failure", "overflow"],
                            "omit_headers": ["authorization"]},
        }]}],
        "telemetry": {"tracing": {"enabled": False}, "access_log": {"enabled": False}},
    }


async def _dlq(sidecar: SidecarProcess, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "dlq", *args, "--config", str(sidecar.config_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=sidecar.env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _listed(sidecar: SidecarProcess) -> list[dict[str, Any]]:
    code, out, err = await _dlq(sidecar, "list", "--json")
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


async def _post(session: aiohttp.ClientSession, sidecar: SidecarProcess, key: str) -> str | None:
    async with session.post(f"{sidecar.url}/hooks/event", data=f"payload-{key}",
                            headers={"Idempotency-Key": key, "Authorization": "Bearer secret"}) as resp:
        await resp.read()
        assert resp.status == 503
        return resp.headers.get(HEADER)


async def test_a_finally_failed_request_carries_its_id_and_dlq_list_and_show_have_it(
        keyed: KeyedUpstream, tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    sidecar = await SidecarProcess(_config(keyed.port, tmp_path / "spool"), directory=tmp_path).start()
    try:
        async with aiohttp.ClientSession() as session:
            entry_id = await _post(session, sidecar, "k-1")
            async with session.post(f"{sidecar.url}/hooks/event", data=b"no key") as resp:
                assert resp.status == 503 and HEADER not in resp.headers  # un-keyed POST: not eligible
        assert entry_id
        [row] = await _listed(sidecar)
        assert row["id"] == entry_id and row["route"] == "webhooks" and row["error"] == "http_503"
        assert row["target"] == "/hooks/event" and row["attempts"] == 2 and row["idempotency_key"] == "k-1"
        code, out, _ = await _dlq(sidecar, "show", entry_id)
        shown = json.loads(out)
        assert code == 0 and shown["body"] == {"text": "payload-k-1"} and shown["state"] == "waiting"
        assert shown["omitted_headers"] == ["authorization"]
        assert all(name.lower() != "authorization" for name, _ in shown["headers"])
        metrics = await sidecar.metrics_text()
        assert 'outrigger_dead_letters_total{result="spooled",route="webhooks"} 1.0' in metrics
        assert 'outrigger_dead_letters_total{result="not_eligible",route="webhooks"} 1.0' in metrics
        async with aiohttp.ClientSession() as session, session.get(sidecar.admin_url + "/status") as resp:
            status = await resp.json()
        assert status["dead_letter"]["records"] == 1
    finally:
        await sidecar.stop()


def test_dlq_bad_input_names_what_was_wrong(tmp_path: Path) -> None:
    """No spool configured, a missing --dir, a bad --rate: each a clear error, never a traceback."""
    config = tmp_path / "outrigger.yaml"
    config.write_text(json.dumps({"version": 1, "upstreams": {"u": {"url": "http://127.0.0.1:1"}},
                                  "listeners": [{"name": "main", "address": "127.0.0.1:0",
                                                 "routes": [{"name": "r", "upstream": "u"}]}]}))
    cases = [
        (["list", "--config", str(config)], "dead_letter is not configured in"),
        (["list", "--config", str(config), "--dir", str(tmp_path / "absent")], "--dir"),
        (["replay", "--config", str(config), "--rate", "0"], "argument --rate: expected a positive number"),
        (["show", "nope", "--config", str(config), "--dir", str(tmp_path)], "no entry nope"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "proxy", "dlq", *args], capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


async def _spool_failures(sidecar: SidecarProcess, keys: list[str]) -> list[str]:
    async with aiohttp.ClientSession() as session:
        ids = await asyncio.gather(*(_post(session, sidecar, key) for key in keys))
    assert all(ids)
    return [i for i in ids if i]


async def test_replay_after_the_upstream_heals_delivers_each_entry_exactly_once(
        keyed: KeyedUpstream, tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    sidecar = await SidecarProcess(_config(keyed.port, tmp_path / "spool"), directory=tmp_path).start()
    try:
        keys = [f"k-{i}" for i in range(8)]
        ids = await _spool_failures(sidecar, keys)
        code, _, err = await _dlq(sidecar, "replay", "--rate", "200")  # still failing: all kept
        assert code == 1 and "0 done, 8 failed" in err
        assert {row["replays"] for row in await _listed(sidecar)} == {1}
        keyed.healthy = True
        code, _, err = await _dlq(sidecar, "replay", "--rate", "200")
        assert code == 0 and "8 done" in err, err
        assert keyed.deliveries == dict.fromkeys(keys, 1) and not keyed.bad_bodies
        assert sorted(keyed.replay_headers) == sorted(ids)
        assert await _listed(sidecar) == []
        code, _, err = await _dlq(sidecar, "replay")  # nothing left: nothing sent again
        assert code == 0 and sum(keyed.deliveries.values()) == 8
        metrics = await sidecar.metrics_text()
        assert 'outrigger_dead_letter_replays_total{result="done",route="webhooks"} 8.0' in metrics
        assert 'outrigger_dead_letter_replays_total{result="failed",route="webhooks"} 8.0' in metrics
    finally:
        await sidecar.stop()


async def test_two_concurrent_replays_never_send_an_entry_twice(keyed: KeyedUpstream, tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    sidecar = await SidecarProcess(_config(keyed.port, tmp_path / "spool"), directory=tmp_path).start()
    try:
        keys = [f"k-{i}" for i in range(30)]
        await _spool_failures(sidecar, keys)
        keyed.healthy = True
        # Paced so that the two runs overlap: each alone would take 1.5 s.
        results = await asyncio.gather(_dlq(sidecar, "replay", "--rate", "20"),
                                       _dlq(sidecar, "replay", "--rate", "20"))
        assert [code for code, _, _ in results] == [0, 0], results
        done = [int(err.split("replayed: ")[1].split(" done")[0]) for _, _, err in results]
        assert sum(done) == 30, results
        assert keyed.deliveries == dict.fromkeys(keys, 1)
        assert await _listed(sidecar) == []
    finally:
        await sidecar.stop()


async def _kill_during_burst(keyed: KeyedUpstream, tmp_path: Path, *, rps: int, seconds: float) -> None:
    """Failing spooled writes at ``rps``; SIGKILL midway; every id the app saw is listed and replays whole."""
    spool = tmp_path / "spool"
    spool.mkdir()
    config = _config(keyed.port, spool)
    sidecar = await SidecarProcess(config, directory=tmp_path).start()
    seen: list[str] = []
    sent = 0
    async with aiohttp.ClientSession() as session:
        async def one(key: str) -> None:
            try:
                entry_id = await _post(session, sidecar, key)
            except (aiohttp.ClientError, AssertionError):
                return  # cut off by the kill: the app got no answer
            if entry_id:
                seen.append(entry_id)

        tasks = []
        start = time.monotonic()
        killed_at = None
        # The kill comes midway, once some answers have come back (a slow start on a busy box must
        # not leave the test with nothing to check), and the burst goes on a little past it.
        while killed_at is None or time.monotonic() < killed_at + 0.3:
            now = time.monotonic()
            if killed_at is None and ((now >= start + seconds / 2 and len(seen) >= 10) or now >= start + 3 * seconds):
                os.kill(sidecar.pid, signal.SIGKILL)
                killed_at = now
            tasks.append(asyncio.create_task(one(f"k-{sent}")))
            sent += 1
            await asyncio.sleep(1 / rps)
        await asyncio.gather(*tasks)
    await sidecar.wait(10)
    assert seen, "no spooled answer before the kill"
    restarted = await SidecarProcess(config, directory=tmp_path).start()
    try:
        listed = {row["id"] for row in await _listed(restarted)}
        assert set(seen) <= listed  # every header the app saw is a durable entry
        deadline = time.monotonic() + 10  # the restarted sidecar counts what its predecessor left
        while f"outrigger_dead_letter_entries {float(len(listed))}" not in await restarted.metrics_text():
            assert time.monotonic() < deadline, "the entries gauge never showed the spooled entries"
            await asyncio.sleep(0.1)
        keyed.healthy = True
        code, _, err = await _dlq(restarted, "replay", "--rate", "1000")
        assert code == 0, err
        assert not keyed.bad_bodies  # no torn or mixed-up record was replayed
        assert all(count == 1 for count in keyed.deliveries.values())
        assert sum(keyed.deliveries.values()) == len(listed)
    finally:
        await restarted.stop()


async def test_kill_9_during_a_burst_of_spooled_failures_loses_no_acknowledged_entry(
        keyed: KeyedUpstream, tmp_path: Path) -> None:
    await _kill_during_burst(keyed, tmp_path, rps=150, seconds=1.2)


@pytest.mark.load
async def test_kill_9_at_500_rps_of_spooled_failures_loses_no_acknowledged_entry(
        keyed: KeyedUpstream, tmp_path: Path) -> None:
    await _kill_during_burst(keyed, tmp_path, rps=500, seconds=6.0)
