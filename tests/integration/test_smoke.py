"""A first end-to-end check through an in-process sidecar."""

from __future__ import annotations

import aiohttp

from tests.support.sidecar import SidecarFactory, base_config
from tests.support.upstream import Reply, ScriptedUpstream


async def test_get_is_proxied_with_request_id_and_attempt_headers(
        upstream: ScriptedUpstream, sidecar_factory: SidecarFactory,
        client: aiohttp.ClientSession) -> None:
    upstream.script(Reply(status=503), Reply(status=200, body=b"hello"))
    sidecar = await sidecar_factory(base_config(upstream.url))
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/a/b?x=1") as resp:
        assert resp.status == 200
        assert await resp.read() == b"hello"
        assert resp.headers["x-outrigger-attempts"] == "2"
        rid = resp.headers["x-request-id"]
    assert [r.path for r in upstream.requests] == ["/a/b?x=1", "/a/b?x=1"]
    assert upstream.requests[1].headers["x-outrigger-attempt"] == "2"
    assert upstream.requests[0].headers["x-request-id"] == rid
