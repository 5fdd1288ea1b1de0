"""Hot reload: validated atomically, state carried over, listeners re-bound, symlink swaps seen."""

from __future__ import annotations

import asyncio
import copy
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from proxy.lifecycle.sidecar import Sidecar
from tests.support.ports import free_port
from tests.support.sidecar import base_config, start_sidecar
from tests.support.upstream import Reply, ScriptedUpstream


def _reloads(sidecar: Sidecar, result: str) -> float:
    value = sidecar.metrics.registry.get_sample_value("outrigger_config_reloads_total", {"result": result})
    return value or 0.0


async def _wait_for(predicate: Any, within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _write(path: Path, data: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(data))


async def _watched(tmp_path: Path, data: dict[str, Any]) -> tuple[Path, Sidecar]:
    """A sidecar started from a config file it polls every 50 ms."""
    path = tmp_path / "outrigger.yaml"
    _write(path, data)
    return path, await start_sidecar(data, config_path=str(path), watch_interval_s=0.05)


async def _admin_json(client: aiohttp.ClientSession, sidecar: Sidecar, path: str) -> Any:
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}{path}") as resp:
        return await resp.json()


async def test_valid_file_change_takes_effect_and_changes_config_version(
        tmp_path: Path, upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    path, sidecar = await _watched(tmp_path, data)
    try:
        before = (await _admin_json(client, sidecar, "/config"))["version"]
        changed = copy.deepcopy(data)
        changed["listeners"][0]["routes"][0]["rewrite_prefix"] = "/v2"
        _write(path, changed)
        await _wait_for(lambda: _reloads(sidecar, "success") == 1)
        after = await _admin_json(client, sidecar, "/config")
        assert after["version"] != before
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/orders") as resp:
            assert resp.status == 200
        assert upstream.requests[-1].path == "/v2orders"
    finally:
        await sidecar.stop()


async def test_invalid_config_keeps_old_one_and_counts_failure(
        tmp_path: Path, upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    path, sidecar = await _watched(tmp_path, data)
    try:
        version = sidecar.runtime.version
        broken = copy.deepcopy(data)
        broken["listeners"][0]["routes"][0]["upstream"] = "nope"
        _write(path, broken)
        await _wait_for(lambda: _reloads(sidecar, "failure") == 1)
        assert sidecar.runtime.version == version
        assert _reloads(sidecar, "success") == 0
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/still-served") as resp:
            assert resp.status == 200
    finally:
        await sidecar.stop()


async def test_breaker_state_carries_over_when_its_policy_is_unchanged(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url, retry={"max_attempts": 1})
    data["defaults"]["circuit_breaker"] = {"consecutive_failures": 2, "open_duration": {"min": "30s", "max": "60s"}}
    sidecar = await start_sidecar(data)
    try:
        upstream.script(Reply(status=503), Reply(status=503))
        url = f"http://127.0.0.1:{sidecar.port('main')}/x"
        for _ in range(2):
            async with client.get(url) as resp:
                assert resp.status == 503
        async with client.get(url) as resp:
            assert resp.headers["x-outrigger-error"] == "circuit_open"
        changed = copy.deepcopy(data)
        changed["listeners"][0]["routes"][0]["timeout"] = {"total": "4s"}  # unrelated change
        assert await sidecar.apply(_config(changed))
        async with client.get(url) as resp:
            assert resp.headers["x-outrigger-error"] == "circuit_open"
        assert len(upstream.requests) == 2
        tightened = copy.deepcopy(changed)
        tightened["defaults"]["circuit_breaker"]["consecutive_failures"] = 3  # breaker policy changed: fresh state
        assert await sidecar.apply(_config(tightened))
        async with client.get(url) as resp:
            assert resp.status == 200
    finally:
        await sidecar.stop()


def _config(data: dict[str, Any]) -> Any:
    from tests.support.sidecar import to_config
    return to_config(data)


async def test_unchanged_listener_keeps_its_socket_and_new_listener_is_bound(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    sidecar = await start_sidecar(data)
    try:
        port = sidecar.port("main")
        async with client.get(f"http://127.0.0.1:{port}/a") as resp:  # keep-alive connection stays open
            assert resp.status == 200
        changed = copy.deepcopy(data)
        changed["listeners"].append({"name": "second", "address": "127.0.0.1:0",
                                     "routes": [{"name": "all", "upstream": "svc"}]})
        assert await sidecar.apply(_config(changed))
        assert sidecar.port("main") == port
        async with client.get(f"http://127.0.0.1:{port}/b") as resp:
            assert resp.status == 200
        async with client.get(f"http://127.0.0.1:{sidecar.port('second')}/c") as resp:
            assert resp.status == 200
        removed = copy.deepcopy(changed)
        removed["listeners"] = removed["listeners"][1:]
        second_port = sidecar.port("second")
        assert await sidecar.apply(_config(removed))
        assert "main" not in sidecar.listeners
        await asyncio.sleep(0.2)
        try:
            async with aiohttp.ClientSession() as fresh, fresh.get(f"http://127.0.0.1:{port}/gone") as resp:
                raise AssertionError(f"removed listener still answered {resp.status}")
        except aiohttp.ClientConnectorError:
            pass
        async with client.get(f"http://127.0.0.1:{second_port}/d") as resp:
            assert resp.status == 200
    finally:
        await sidecar.stop()


async def test_in_flight_request_finishes_under_the_config_it_started_with(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    other = ScriptedUpstream()
    await other.start()
    data = base_config(upstream.url)
    sidecar = await start_sidecar(data)
    try:
        upstream.script(Reply(body=b"old", delay=0.5))
        slow = asyncio.create_task(client.get(f"http://127.0.0.1:{sidecar.port('main')}/slow"))
        await _wait_for(lambda: len(upstream.requests) == 1)
        changed = copy.deepcopy(data)
        changed["upstreams"]["svc"]["url"] = other.url
        assert await sidecar.apply(_config(changed))
        async with await slow as resp:
            assert await resp.read() == b"old"
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/next") as resp:
            assert resp.status == 200
        assert [r.path for r in other.requests] == ["/next"]
    finally:
        await sidecar.stop()
        await other.stop()


async def test_configmap_style_symlink_swap_is_detected(
        tmp_path: Path, upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    """Kubernetes updates ConfigMap volumes by re-pointing the ..data symlink."""
    data = base_config(upstream.url)
    first, second = tmp_path / "..2026_a", tmp_path / "..2026_b"
    first.mkdir()
    second.mkdir()
    _write(first / "outrigger.yaml", data)
    (tmp_path / "..data").symlink_to(first.name)
    (tmp_path / "outrigger.yaml").symlink_to("..data/outrigger.yaml")
    sidecar = await start_sidecar(data, config_path=str(tmp_path / "outrigger.yaml"), watch_interval_s=0.05)
    try:
        changed = copy.deepcopy(data)
        changed["listeners"][0]["routes"][0]["rewrite_prefix"] = "/swapped"
        _write(second / "outrigger.yaml", changed)
        tmp_link = tmp_path / "..data_tmp"
        tmp_link.symlink_to(second.name)
        os.replace(tmp_link, tmp_path / "..data")  # atomic swap, as the kubelet does
        await _wait_for(lambda: _reloads(sidecar, "success") == 1)
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/x") as resp:
            assert resp.status == 200
        assert upstream.requests[-1].path == "/swappedx"
    finally:
        await sidecar.stop()


async def test_fifty_reloads_alternating_valid_and_invalid_under_load_fail_no_request(
        tmp_path: Path, upstream: ScriptedUpstream) -> None:
    data = base_config(upstream.url)
    path = tmp_path / "outrigger.yaml"
    _write(path, data)
    # No watcher: this test triggers every reload itself (a watcher could read an edit half-written).
    sidecar = await start_sidecar(data, config_path=str(path), watch_interval_s=0)
    failures: list[str] = []
    done = 0
    stop = asyncio.Event()

    async def load(session: aiohttp.ClientSession) -> None:
        nonlocal done
        url = f"http://127.0.0.1:{sidecar.port('main')}/load"
        while not stop.is_set():
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    if resp.status != 200:
                        failures.append(f"status {resp.status}")
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))
            done += 1

    try:
        async with aiohttp.ClientSession() as session:
            workers = [asyncio.create_task(load(session)) for _ in range(8)]
            for i in range(50):
                if i % 2 == 0:
                    changed = copy.deepcopy(data)
                    changed["listeners"][0]["routes"][0]["timeout"] = {"total": f"{4 + i % 3}s"}
                    _write(path, changed)
                else:
                    path.write_text("version: 1\nlisteners: [}\n")
                await sidecar.reload_from_file()
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.gather(*workers)
        assert failures == []
        assert done > 100
        assert _reloads(sidecar, "success") == 25
        assert _reloads(sidecar, "failure") == 25
    finally:
        await sidecar.stop()


async def test_listener_moved_to_a_busy_address_rejects_the_reload_and_the_old_listener_keeps_serving(
        tmp_path: Path, upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url)
    path, sidecar = await _watched(tmp_path, data)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        try:
            port, version = sidecar.port("main"), sidecar.runtime.version
            moved = copy.deepcopy(data)
            moved["listeners"][0]["address"] = f"127.0.0.1:{busy}"
            _write(path, moved)
            await _wait_for(lambda: _reloads(sidecar, "failure") == 1)
            assert _reloads(sidecar, "success") == 0
            assert sidecar.runtime.version == version and sidecar.port("main") == port
            async with client.get(f"http://127.0.0.1:{port}/still-served") as resp:
                assert resp.status == 200
            async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/readyz") as resp:
                assert resp.status == 200
            assert (await _admin_json(client, sidecar, "/config"))["version"] == version
            # The watcher lives on: the next edit is picked up.
            fixed = copy.deepcopy(data)
            fixed["listeners"][0]["routes"][0]["rewrite_prefix"] = "/v2"
            _write(path, fixed)
            await _wait_for(lambda: _reloads(sidecar, "success") == 1)
            async with client.get(f"http://127.0.0.1:{port}/x") as resp:
                assert resp.status == 200
            assert upstream.requests[-1].path == "/v2x"
        finally:
            await sidecar.stop()


async def test_two_listeners_can_swap_addresses_in_one_reload(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    first, second = free_port(), free_port()
    data = base_config(upstream.url)
    data["listeners"][0]["address"] = f"127.0.0.1:{first}"
    data["listeners"].append({"name": "second", "address": f"127.0.0.1:{second}",
                              "routes": [{"name": "all", "upstream": "svc", "rewrite_prefix": "/second"}]})
    sidecar = await start_sidecar(data)
    try:
        swapped = copy.deepcopy(data)
        swapped["listeners"][0]["address"], swapped["listeners"][1]["address"] = \
            swapped["listeners"][1]["address"], swapped["listeners"][0]["address"]
        assert await sidecar.apply(_config(swapped))
        assert (sidecar.port("main"), sidecar.port("second")) == (second, first)
        async with client.get(f"http://127.0.0.1:{first}/x") as resp:
            assert resp.status == 200
        assert upstream.requests[-1].path == "/secondx"
        async with client.get(f"http://127.0.0.1:{second}/y") as resp:
            assert resp.status == 200
        assert upstream.requests[-1].path == "/y"
    finally:
        await sidecar.stop()


async def test_admin_telemetry_and_parser_limits_stay_as_started_and_config_shows_what_is_in_effect(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession, caplog: Any) -> None:
    data = base_config(upstream.url)
    sidecar = await start_sidecar(data)
    try:
        before = (await _admin_json(client, sidecar, "/config"))["config"]
        changed = copy.deepcopy(data)
        changed["admin"] = {"address": f"127.0.0.1:{free_port()}"}
        logging_on = before["telemetry"]["access_log"]["enabled"]
        changed.setdefault("telemetry", {})["access_log"] = {"enabled": not logging_on}
        changed["limits"] = {"max_header_bytes": "2KiB", "max_body_bytes": 10}
        with caplog.at_level("WARNING", logger="outrigger"):
            assert await sidecar.apply(_config(changed))
        assert "take effect on restart only" in caplog.text
        after = (await _admin_json(client, sidecar, "/config"))["config"]
        assert after["admin"] == before["admin"]
        assert after["telemetry"] == before["telemetry"]
        assert after["limits"]["max_header_bytes"] == before["limits"]["max_header_bytes"]
        assert after["limits"]["max_body_bytes"] == 10  # not a parser limit: applied at once
        async with client.post(f"http://127.0.0.1:{sidecar.port('main')}/upload", data=b"x" * 100) as resp:
            assert resp.status == 413
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/big-header",
                              headers={"x-big": "v" * 4000}) as resp:
            assert resp.status == 200  # the 64KiB header limit of the running parser still holds
    finally:
        await sidecar.stop()


async def test_a_rejected_reload_leaves_the_running_breakers_state_series_alone(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url, retry={"max_attempts": 1})
    data["upstreams"]["svc"]["circuit_breaker"] = {"consecutive_failures": 1}
    sidecar = await start_sidecar(data)

    def state(name: str) -> float | None:
        return sidecar.metrics.registry.get_sample_value("outrigger_circuit_breaker_state",
                                                         {"upstream": "svc", "state": name})
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        try:
            upstream.script(Reply(status=503))
            async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/trip") as resp:
                assert resp.status == 503
            assert (state("open"), state("closed")) == (1, 0)
            changed = copy.deepcopy(data)
            changed["upstreams"]["svc"]["circuit_breaker"] = {"consecutive_failures": 5}  # a new breaker
            changed["listeners"][0]["address"] = f"127.0.0.1:{blocker.getsockname()[1]}"  # busy: rejected
            assert not await sidecar.apply(_config(changed))
            assert (state("open"), state("closed")) == (1, 0)
        finally:
            await sidecar.stop()


async def test_a_listener_may_take_over_the_port_another_leaves_under_another_spelling(
        upstream: ScriptedUpstream, client: aiohttp.ClientSession) -> None:
    port = free_port()
    data = base_config(upstream.url)
    data["listeners"][0]["address"] = f"0.0.0.0:{port}"
    sidecar = await start_sidecar(data)
    try:
        changed = copy.deepcopy(data)
        changed["listeners"][0]["name"] = "renamed"
        changed["listeners"][0]["address"] = f"127.0.0.1:{port}"  # the same port: bound after the old one closes
        assert await sidecar.apply(_config(changed))
        async with client.get(f"http://127.0.0.1:{port}/x") as resp:
            assert resp.status == 200
    finally:
        await sidecar.stop()


# --- the reload count follows the file's content, never the race between watcher and SIGHUP ---


def _replace(path: Path, text: str) -> None:
    """Write as editors and ConfigMaps do, whole at once: a reader never sees half of it."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


async def test_each_invalid_edit_followed_by_sighup_counts_one_failure_with_a_fast_watcher(
        tmp_path: Path, upstream: ScriptedUpstream, caplog: Any) -> None:
    data = base_config(upstream.url)
    path = tmp_path / "outrigger.yaml"
    _write(path, data)
    sidecar = await start_sidecar(data, config_path=str(path), watch_interval_s=0.01)
    try:
        caplog.set_level("INFO")
        for i in range(10):
            _replace(path, f"version: 1\nlisteners: [}}  # edit {i}\n")
            await asyncio.sleep(0.015 * (i % 3))  # sometimes the watcher reads it first, sometimes SIGHUP
            await sidecar.reload_from_file(trigger="sighup")
        await asyncio.sleep(0.1)  # the watcher has seen the last edit too
        assert _reloads(sidecar, "failure") == 10
        assert _reloads(sidecar, "success") == 0
        errors = [r for r in caplog.records if r.levelname == "ERROR" and "config reload" in r.getMessage()]
        assert len(errors) == 10
    finally:
        await sidecar.stop()


async def test_sighup_on_the_version_last_attempted_is_no_new_attempt_and_says_so(
        tmp_path: Path, upstream: ScriptedUpstream, caplog: Any) -> None:
    data = base_config(upstream.url)
    path = tmp_path / "outrigger.yaml"
    _write(path, data)
    sidecar = await start_sidecar(data, config_path=str(path), watch_interval_s=0)
    try:
        caplog.set_level("INFO")
        _replace(path, "version: 1\nlisteners: [}\n")
        assert await sidecar.reload_from_file() is False
        assert await sidecar.reload_from_file() is False  # the same broken file: not attempted again
        assert _reloads(sidecar, "failure") == 1
        assert any("unchanged since its last reload attempt, which failed" in r.getMessage()
                   for r in caplog.records)
        _write(path, data)  # back to the running version: a new version, applied
        assert await sidecar.reload_from_file() is True
        assert await sidecar.reload_from_file() is True  # unchanged since applied: nothing to do
        assert _reloads(sidecar, "success") == 1
    finally:
        await sidecar.stop()


async def test_sighup_retries_a_version_that_failed_for_a_busy_port_and_counts_each_attempt(
        tmp_path: Path, upstream: ScriptedUpstream) -> None:
    data = base_config(upstream.url)
    path = tmp_path / "outrigger.yaml"
    _write(path, data)
    sidecar = await start_sidecar(data, config_path=str(path), watch_interval_s=0)
    try:
        with socket.socket() as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
            moved = copy.deepcopy(data)
            moved["listeners"][0]["address"] = f"127.0.0.1:{blocker.getsockname()[1]}"
            _write(path, moved)
            assert await sidecar.reload_from_file() is False
            assert await sidecar.reload_from_file() is False  # the port is still busy: a second attempt
            assert _reloads(sidecar, "failure") == 2
        assert await sidecar.reload_from_file() is True  # freed: the same file now applies
        assert _reloads(sidecar, "success") == 1
    finally:
        await sidecar.stop()
