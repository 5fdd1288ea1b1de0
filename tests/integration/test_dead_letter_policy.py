"""The dead-letter policy in an in-process sidecar: what is spooled, what is not, and how replays are marked."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from proxy.deadletter.index import SpoolIndex
from tests.support.ports import free_port
from tests.support.sidecar import base_config, to_config
from tests.support.upstream import Reply, ScriptedUpstream

HEADER = "x-outrigger-dead-letter"
ORIGINAL = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _config(url: str, spool: Path, dead_letter: dict[str, Any], **route: Any) -> dict[str, Any]:
    config = base_config(url, dead_letter=dead_letter, **route)
    config["dead_letter"] = {"dir": str(spool), "max_bytes": "64KiB"}
    config["defaults"]["retry"]["max_attempts"] = 1
    return config


def _entries(spool: Path) -> list[Any]:
    index = SpoolIndex(str(spool))
    index.refresh()
    return [index.read(ref) for ref in index.live(0.0)]


def _count(sidecar: Any, result: str, name: str = "outrigger_dead_letters_total") -> float:
    value = sidecar.metrics.registry.get_sample_value(name, {"route": "default", "result": result})
    return 0.0 if value is None else float(value)


async def test_a_fallback_response_carries_the_dead_letter_id_of_the_error_it_stands_in_for(
        sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: upstream_connect_failure
    sidecar = await sidecar_factory(_config(closed, tmp_path, {"on": ["upstream_connect_failure"]},
                                            fallback={"on": ["upstream_connect_failure"], "status": 202}))
    async with client.put(f"http://127.0.0.1:{sidecar.port('main')}/orders/1", data=b"{}") as resp:
        assert resp.status == 202 and resp.headers["x-outrigger-fallback"] == "true"
        entry_id = resp.headers[HEADER]
    [entry] = _entries(tmp_path)
    assert entry.id == entry_id and entry.error == "upstream_connect_failure" and entry.method == "PUT"


async def test_bodies_up_to_max_body_are_spooled_whole_and_bigger_ones_are_not_eligible(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    upstream.default = Reply(status=500)
    sidecar = await sidecar_factory(_config(upstream.url, tmp_path, {"on": ["http_5xx"], "max_body": "20KiB"}))
    url = f"http://127.0.0.1:{sidecar.port('main')}/audit"
    body = bytes(range(256)) * 60  # 15 KiB: beyond the retry buffer of a one-attempt route
    async with client.put(url, data=body) as resp:
        assert resp.status == 500 and HEADER in resp.headers
    async with client.put(url, data=b"y" * 30_000) as resp:
        assert resp.status == 500 and HEADER not in resp.headers
    [entry] = _entries(tmp_path)
    assert entry.body == body and entry.error == "http_500"
    assert _count(sidecar, "spooled") == 1 and _count(sidecar, "not_eligible") == 1


async def test_a_full_spool_refuses_the_entry_and_the_app_still_gets_its_failure(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    upstream.default = Reply(status=503)
    sidecar = await sidecar_factory(_config(upstream.url, tmp_path, {"on": ["http_5xx"], "max_body": "1MiB"}))
    url = f"http://127.0.0.1:{sidecar.port('main')}/big"
    statuses = []
    for _ in range(3):
        async with client.put(url, data=b"z" * 25_000) as resp:
            statuses.append((resp.status, HEADER in resp.headers))
    assert statuses == [(503, True), (503, True), (503, False)]  # 64KiB holds two
    assert _count(sidecar, "refused_full") == 1 and len(_entries(tmp_path)) == 2


async def test_omitted_headers_are_not_stored_but_named(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    upstream.default = Reply(status=502)
    sidecar = await sidecar_factory(_config(upstream.url, tmp_path, {"on": ["http_5xx"]}))
    async with client.post(f"http://127.0.0.1:{sidecar.port('main')}/hook", data=b"{}",
                           headers={"Idempotency-Key": "abc", "Cookie": "s=1", "Authorization": "x",
                                    "X-Tenant": "t1"}) as resp:
        assert HEADER in resp.headers
    [entry] = _entries(tmp_path)
    names = {name.lower() for name, _ in entry.headers}
    assert "x-tenant" in names and "idempotency-key" in names
    assert not names & {"cookie", "authorization", "x-forwarded-for"}
    assert entry.omitted == ["authorization", "cookie"] and entry.idempotency_key == "abc"


async def test_a_replay_is_linked_to_the_original_trace_counted_and_never_spooled_again(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    upstream.default = Reply(status=503)
    config = _config(upstream.url, tmp_path, {"on": ["http_5xx"]})
    config["telemetry"]["tracing"] = {"enabled": True, "sample_ratio": 1.0}
    exporter = InMemorySpanExporter()
    sidecar = await sidecar_factory(config, env={}, span_exporter=exporter)
    async with client.put(f"http://127.0.0.1:{sidecar.port('main')}/again", data=b"{}",
                          headers={"x-outrigger-replay": "0123abc",
                                   "x-outrigger-replay-of-traceparent": ORIGINAL}) as resp:
        assert resp.status == 503 and HEADER not in resp.headers
    assert _entries(tmp_path) == []
    assert _count(sidecar, "failed", "outrigger_dead_letter_replays_total") == 1
    assert "x-outrigger-replay-of-traceparent" not in upstream.requests[-1].headers
    assert upstream.requests[-1].headers["x-outrigger-replay"] == "0123abc"
    await sidecar.stop()
    [server] = [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]
    [link] = server.links
    assert f"{link.context.trace_id:032x}" == ORIGINAL[3:35] and f"{link.context.span_id:016x}" == ORIGINAL[36:52]
    assert server.context.trace_id != link.context.trace_id  # a new trace, linked to the old one
    assert server.attributes is not None and server.attributes["outrigger.dead_letter.replay_of"] == "0123abc"


async def test_a_reload_keeps_the_spool_unless_its_block_changes_and_entries_stay_listed(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    upstream.default = Reply(status=503)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    config = _config(upstream.url, first, {"on": ["http_5xx"]})
    sidecar = await sidecar_factory(config)
    spool = sidecar.runtime.spool
    config["listeners"][0]["routes"][0]["dead_letter"]["max_body"] = "2KiB"  # a route change only
    assert await sidecar.apply(to_config(config))
    assert sidecar.runtime.spool is spool
    async with client.put(f"http://127.0.0.1:{sidecar.port('main')}/x", data=b"{}") as resp:
        assert HEADER in resp.headers
    config["dead_letter"]["dir"] = str(second)
    assert await sidecar.apply(to_config(config))
    assert sidecar.runtime.spool is not spool
    assert sidecar.runtime.status(sidecar.clock)["dead_letter"]["dir"] == str(second)
    async with client.put(f"http://127.0.0.1:{sidecar.port('main')}/y", data=b"{}") as resp:
        assert HEADER in resp.headers
    assert [e.target for e in _entries(first)] == ["/x"] and [e.target for e in _entries(second)] == ["/y"]


def _spool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "outrigger-dead-letter" and t.is_alive()}


async def _within(predicate: Callable[[], bool], within_s: float = 5.0) -> bool:
    """Whether ``predicate`` turns true within ``within_s`` (polled: a thread's end sets no event)."""
    deadline = time.monotonic() + within_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def _ended(threads: set[threading.Thread]) -> bool:
    return await _within(lambda: not any(t.is_alive() for t in threads))


def _spool_dirs(tmp_path: Path) -> tuple[Path, Path]:
    """The first spool's directory and the one a reload moves it to."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    return first, second


async def _spooling_sidecar(upstream: ScriptedUpstream, sidecar_factory: Any, spool: Path,
                            ) -> tuple[Any, dict[str, Any], set[threading.Thread], set[threading.Thread]]:
    """A sidecar spooling 5xx into ``spool``: its config, the spool threads before it started,
    and its spool's writer thread."""
    before = _spool_threads()
    config = _config(upstream.url, spool, {"on": ["http_5xx"]})
    sidecar = await sidecar_factory(config)
    return sidecar, config, before, _spool_threads() - before


async def test_a_reload_that_replaces_or_removes_the_spool_ends_the_old_spools_thread(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    upstream.default = Reply(status=503)
    first, second = _spool_dirs(tmp_path)
    sidecar, config, before, first_thread = await _spooling_sidecar(upstream, sidecar_factory, first)
    assert len(first_thread) == 1
    async with client.put(f"http://127.0.0.1:{sidecar.port('main')}/x", data=b"{}") as resp:
        assert HEADER in resp.headers
    config["dead_letter"]["dir"] = str(second)
    assert await sidecar.apply(to_config(config))
    assert await _ended(first_thread), "the replaced spool's writer thread is still running"
    second_thread = _spool_threads() - before
    assert len(second_thread) == 1 and not second_thread & first_thread
    async with client.put(f"http://127.0.0.1:{sidecar.port('main')}/y", data=b"{}") as resp:
        assert HEADER in resp.headers
    del config["dead_letter"]
    del config["listeners"][0]["routes"][0]["dead_letter"]
    assert await sidecar.apply(to_config(config))
    assert sidecar.runtime.spool is None
    assert await _ended(second_thread), "the removed spool's writer thread is still running"
    assert _spool_threads() - before == set()
    assert [e.target for e in _entries(first)] == ["/x"] and [e.target for e in _entries(second)] == ["/y"]


async def test_a_request_in_flight_across_the_reload_is_spooled_before_the_old_spool_closes(
        upstream: ScriptedUpstream, sidecar_factory: Any, client: aiohttp.ClientSession, tmp_path: Path) -> None:
    """The old spool waits for the requests that may still spool into it: nothing is lost by the swap."""
    first, second = _spool_dirs(tmp_path)
    sidecar, config, _, first_thread = await _spooling_sidecar(upstream, sidecar_factory, first)
    upstream.script(Reply(status=503, delay=0.5))

    async def slow() -> str | None:
        async with client.put(f"http://127.0.0.1:{sidecar.port('main')}/slow", data=b"{}") as resp:
            return resp.headers.get(HEADER)

    task = asyncio.create_task(slow())
    assert await _within(lambda: bool(upstream.requests)), "the slow request never reached the upstream"
    config["dead_letter"]["dir"] = str(second)
    assert await sidecar.apply(to_config(config))
    await asyncio.sleep(0.1)
    assert all(t.is_alive() for t in first_thread)  # still in use by the request in flight
    entry_id = await task
    assert entry_id is not None
    assert await _ended(first_thread)
    assert [(e.id, e.target) for e in _entries(first)] == [(entry_id, "/slow")] and _entries(second) == []


async def test_a_rejected_reload_leaves_no_spool_thread_behind(
        upstream: ScriptedUpstream, sidecar_factory: Any, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    config = _config(upstream.url, first, {"on": ["http_5xx"]})
    sidecar = await sidecar_factory(config)
    before = _spool_threads()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        config["dead_letter"]["dir"] = str(second)  # a new spool is built ...
        config["listeners"][0]["address"] = f"127.0.0.1:{blocker.getsockname()[1]}"  # ... but binding fails
        assert not await sidecar.apply(to_config(config))
    assert sidecar.runtime.spool is not None and sidecar.runtime.spool.config.dir == str(first)
    assert await _ended(_spool_threads() - before), "the rejected reload's spool thread is still running"
