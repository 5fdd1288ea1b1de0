"""Balanced upstreams through a real sidecar: several loopback endpoints, outlier ejection, reload, discovery."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.config import ConfigError
from proxy.lifecycle.sidecar import Sidecar
from tests.support.ports import free_port
from tests.support.sidecar import base_config, to_config
from tests.support.upstream import Reply, ScriptedUpstream

SidecarFactory = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
async def fleet() -> AsyncIterator[list[ScriptedUpstream]]:
    servers = [ScriptedUpstream() for _ in range(5)]
    for server in servers:
        await server.start()
    yield servers
    for server in servers:
        await server.stop()


def balanced(servers: list[ScriptedUpstream], **upstream: Any) -> dict[str, Any]:
    config = base_config(servers[0].url)
    config["upstreams"]["svc"].update({"url": "http://svc.internal:8080",
                                       "endpoints": [s.address for s in servers], **upstream})
    return config


async def send(client: aiohttp.ClientSession, sidecar: Sidecar, n: int, path: str = "/x") -> Counter[int]:
    statuses: Counter[int] = Counter()
    for _ in range(n):
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}{path}") as response:
            await response.read()
            statuses[response.status] += 1
    return statuses


async def test_requests_are_spread_over_every_static_endpoint(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(balanced(fleet))
    assert await send(client, sidecar, 200) == {200: 200}
    served = [len(server.requests) for server in fleet]
    assert sum(served) == 200
    # P2C favours the faster endpoints, so the split is not even, but every endpoint serves
    # and none takes the lion's share.
    assert all(count >= 1 for count in served) and max(served) <= 100, served
    # The Host header stays the url's: an endpoint is only where to connect.
    assert {r.headers["host"] for s in fleet for r in s.requests} == {"svc.internal:8080"}


async def test_round_robin_gives_each_endpoint_an_equal_share(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(balanced(fleet, load_balancer="round_robin"))
    await send(client, sidecar, 100)
    assert [len(server.requests) for server in fleet] == [20] * 5


async def test_an_endpoint_answering_503_is_ejected_and_requests_still_succeed(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    fleet[0].default = Reply(status=503, body=b"down")
    sidecar = await sidecar_factory(balanced(fleet, load_balancer="round_robin"))
    statuses = await send(client, sidecar, 200)
    assert statuses == {200: 200}  # each 503 was retried on another endpoint
    bad_hits = len(fleet[0].requests)
    assert bad_hits == 5  # consecutive_failures: 5, then ejected for 30 s
    await send(client, sidecar, 50)
    assert len(fleet[0].requests) == bad_hits
    status = sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]
    states = {e["address"]: e["state"] for e in status["endpoints"]}
    assert states[fleet[0].address] == "ejected"
    metrics = sidecar.metrics.registry
    assert metrics.get_sample_value("outrigger_upstream_endpoints", {"upstream": "svc", "state": "ejected"}) == 1
    assert metrics.get_sample_value("outrigger_upstream_endpoints", {"upstream": "svc", "state": "healthy"}) == 4
    assert metrics.get_sample_value("outrigger_outlier_ejections_total",
                                    {"upstream": "svc", "reason": "consecutive_failures"}) == 1
    assert metrics.get_sample_value("outrigger_endpoint_attempts_total",
                                    {"upstream": "svc", "endpoint": fleet[0].address, "result": "http_5xx"}) == 5


async def test_a_retry_prefers_an_endpoint_the_request_has_not_tried(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    servers = fleet[:2]
    servers[0].default = Reply(status=503)
    servers[1].default = Reply(status=503)
    config = balanced(servers, outlier_detection=None, circuit_breaker={"enabled": False})
    config["listeners"][0]["routes"][0]["retry"] = {"max_attempts": 2, "budget": {"min_per_second": 1000}}
    sidecar = await sidecar_factory(config)
    await send(client, sidecar, 20)
    # Every request tried both endpoints once: 20 each, never the same one twice.
    assert [len(s.requests) for s in servers] == [20, 20]


async def test_retries_may_return_to_the_same_endpoint_when_other_endpoint_is_off(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    servers = fleet[:2]
    for server in servers:
        server.default = Reply(status=503)
    config = balanced(servers, outlier_detection=None, load_balancer="round_robin", circuit_breaker={"enabled": False})
    config["listeners"][0]["routes"][0]["retry"] = {"max_attempts": 3, "other_endpoint": False,
                                                    "budget": {"min_per_second": 1000}}
    sidecar = await sidecar_factory(config)
    await send(client, sidecar, 1)
    # round robin over two endpoints with three attempts: one of them was used twice
    assert sorted(len(s.requests) for s in servers) == [1, 2]


async def test_a_killed_endpoint_costs_the_app_nothing(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: connection refused
    config = balanced(fleet[:3], load_balancer="round_robin")
    config["upstreams"]["svc"]["endpoints"].append(dead)
    sidecar = await sidecar_factory(config)
    assert await send(client, sidecar, 100) == {200: 100}
    states = {e["address"]: e["state"] for e in sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]["endpoints"]}
    assert states[dead] == "ejected"


async def test_a_single_endpoint_is_never_ejected(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    fleet[0].default = Reply(status=503)
    config = balanced(fleet[:1], circuit_breaker={"enabled": False})
    sidecar = await sidecar_factory(config)
    await send(client, sidecar, 20)
    status = sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]
    assert [e["state"] for e in status["endpoints"]] == ["healthy"]
    assert len(fleet[0].requests) >= 20  # still sent to: the breaker, not ejection, guards a lone endpoint


async def test_reload_diffs_the_static_list_and_lets_a_removed_endpoints_request_finish(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    config = balanced(fleet[:2], load_balancer="round_robin")
    sidecar = await sidecar_factory(config)
    port = sidecar.port("main")
    fleet[0].script(Reply(body=b"slow", delay=0.5))
    fleet[1].script(Reply(body=b"slow", delay=0.5))
    pending = [asyncio.ensure_future(client.get(f"http://127.0.0.1:{port}/slow")) for _ in range(2)]
    await asyncio.sleep(0.15)  # both are in flight, one on each endpoint
    pool = sidecar.runtime.upstreams["svc"].pool
    new = balanced([fleet[1], fleet[2], fleet[3]], load_balancer="round_robin")
    assert await sidecar.apply(to_config(new))
    assert sidecar.runtime.upstreams["svc"].pool is pool  # carried over: only the list changed
    for task in pending:
        response = await task
        assert response.status == 200
        assert await response.read() == b"slow"
    before = [len(s.requests) for s in fleet]
    await send(client, sidecar, 30)
    after = [len(s.requests) for s in fleet]
    assert after[0] == before[0]  # removed: no more traffic
    assert all(after[i] > before[i] for i in (1, 2, 3))
    addresses = [e["address"] for e in sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]["endpoints"]]
    assert sorted(addresses) == sorted(s.address for s in fleet[1:4])
    labels = {s.labels["endpoint"] for s in next(iter(sidecar.metrics.endpoint_attempts.collect())).samples}
    assert fleet[0].address not in labels  # the removed endpoint's series are gone


async def test_new_endpoints_ramp_up_through_slow_start(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(balanced(fleet[:2], slow_start="60s", load_balancer="round_robin"))
    assert await sidecar.apply(to_config(balanced(fleet[:3], slow_start="60s", load_balancer="round_robin")))
    status = sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]["endpoints"]
    assert {e["address"]: e["state"] for e in status}[fleet[2].address] == "slow_start"
    await send(client, sidecar, 200)
    served = [len(s.requests) for s in fleet[:3]]
    assert served[2] < 0.1 * 200  # at about 10% weight it gets a trickle, not a third


class _WarmServer:
    """A keep-alive HTTP server that records when each connection was accepted."""

    def __init__(self) -> None:
        self.accepted: list[float] = []
        self.requests_at: list[float] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(asyncio.get_running_loop().time())
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests_at.append(asyncio.get_running_loop().time())
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()


async def test_preconnect_keeps_a_connection_warm_for_the_first_request(
        sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    warm = _WarmServer()
    warm.server = await asyncio.start_server(warm.handle, "127.0.0.1", 0)
    port = warm.server.sockets[0].getsockname()[1]
    try:
        config = base_config(f"http://127.0.0.1:{port}")
        config["upstreams"]["svc"].update({"endpoints": [f"127.0.0.1:{port}"], "preconnect": 1, "idle_timeout": "30s"})
        sidecar = await sidecar_factory(config)
        for _ in range(100):
            if warm.accepted:
                break
            await asyncio.sleep(0.02)
        assert len(warm.accepted) == 1  # opened before any request
        status = sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]["endpoints"]
        assert status[0]["idle_connections"] == 1
        assert await send(client, sidecar, 1) == {200: 1}
        assert len(warm.accepted) == 1  # the request used the warm connection: no connect on its path
        assert warm.requests_at[0] > warm.accepted[0]
    finally:
        warm.server.close()


async def test_preconnect_works_for_a_plain_one_url_upstream(
        sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    warm = _WarmServer()
    warm.server = await asyncio.start_server(warm.handle, "127.0.0.1", 0)
    port = warm.server.sockets[0].getsockname()[1]
    try:
        config = base_config(f"http://127.0.0.1:{port}")
        config["upstreams"]["svc"].update({"preconnect": 2, "idle_timeout": "30s"})
        await sidecar_factory(config)
        for _ in range(100):
            if len(warm.accepted) >= 2:
                break
            await asyncio.sleep(0.02)
        assert len(warm.accepted) == 2
    finally:
        warm.server.close()


# --- discovery against a DNS server we control ---


class _DnsServer(asyncio.DatagramProtocol):
    """Answers A queries for one name with ``self.addresses`` (an authoritative toy, enough for dnspython)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: list[str] = []
        self.transport: asyncio.DatagramTransport | None = None
        self.queries = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        import dns.message
        import dns.rrset

        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        self.queries += 1
        if question.rdtype == 1 and str(question.name).rstrip(".") == self.name and self.addresses:
            response.answer.append(dns.rrset.from_text(question.name, 1, "IN", "A", *self.addresses))
        assert self.transport is not None
        self.transport.sendto(response.to_wire(), addr)


async def test_discovery_follows_the_dns_answer_and_keeps_the_last_set_when_it_fails(
        sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    port = free_port()
    servers = [ScriptedUpstream(host=f"127.0.0.{i}", port=port) for i in (1, 2, 3)]
    for server in servers:
        await server.start()
    dns_server = _DnsServer("orders.test")
    dns_server.addresses = ["127.0.0.1", "127.0.0.2"]
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: dns_server, local_addr=("127.0.0.1", 0))
    dns_port = transport.get_extra_info("sockname")[1]
    try:
        config = base_config(f"http://orders.test:{port}")
        config["upstreams"]["svc"].update({"discovery": {"refresh": "0.1s", "nameservers": [f"127.0.0.1:{dns_port}"]},
                                           "slow_start": "0s"})
        sidecar = await sidecar_factory(config)
        await send(client, sidecar, 40)
        assert len(servers[0].requests) > 0 and len(servers[1].requests) > 0
        assert servers[2].requests == []
        dns_server.addresses = ["127.0.0.3"]  # a rollout: the set moves
        for _ in range(100):
            addresses = [e["address"] for e in sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]["endpoints"]]
            if addresses == [f"127.0.0.3:{port}"]:
                break
            await asyncio.sleep(0.05)
        assert addresses == [f"127.0.0.3:{port}"]
        await send(client, sidecar, 10)
        assert len(servers[2].requests) == 10
        dns_server.addresses = []  # the name vanishes: the last good set stays
        queries = dns_server.queries
        for _ in range(200):
            if dns_server.queries >= queries + 4:
                break
            await asyncio.sleep(0.05)
        assert await send(client, sidecar, 5) == {200: 5}
        status = sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]
        assert [e["address"] for e in status["endpoints"]] == [f"127.0.0.3:{port}"]
        assert status["discovery"]["last_error"] == "no addresses"
    finally:
        transport.close()
        for server in servers:
            await server.stop()


async def test_discovery_with_the_system_resolver_finds_localhost(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    config = base_config(f"http://localhost:{fleet[0].port}")
    config["upstreams"]["svc"]["discovery"] = {"refresh": "5s"}
    sidecar = await sidecar_factory(config)
    assert await send(client, sidecar, 3) == {200: 3}
    addresses = [e["address"] for e in sidecar.runtime.status(sidecar.clock)["upstreams"]["svc"]["endpoints"]]
    assert f"127.0.0.1:{fleet[0].port}" in addresses


# --- config checks ---


@pytest.mark.parametrize(("upstream", "path", "fragment"), [
    ({"endpoints": []}, "upstreams.svc.endpoints", "empty list"),
    ({"endpoints": ["10.0.0.1:80", "10.0.0.2"]}, "upstreams.svc.endpoints[1]", "host:port"),
    ({"endpoints": ["10.0.0.1:0"]}, "upstreams.svc.endpoints[0]", "port 0"),
    ({"endpoints": ["10.0.0.1:80", "10.0.0.1:80"]}, "upstreams.svc.endpoints", "twice"),
    ({"outlier_detection": {"max_ejected_percent": 101}}, "upstreams.svc.outlier_detection.max_ejected_percent",
     "<= 100"),
    ({"preconnect": 5, "max_connections": 2}, "upstreams.svc.preconnect", "max_connections"),
    ({"load_balancer": "random"}, "upstreams.svc.load_balancer", "random"),
    ({"endpoints": ["10.0.0.1:80"], "discovery": {}}, "upstreams.svc.discovery", "exclude"),
    ({"discovery": {"nameservers": ["nope"]}}, "upstreams.svc.discovery.nameservers[0]", "host:port"),
])
def test_bad_endpoint_config_is_reported_at_its_path(upstream: dict[str, Any], path: str, fragment: str) -> None:
    config = base_config("http://svc:80")
    config["upstreams"]["svc"].update(upstream)
    with pytest.raises(ConfigError) as info:
        to_config(config)
    messages = [f"{issue.path}: {issue.message}" for issue in info.value.issues]
    assert any(m.startswith(path + ":") and fragment in m for m in messages), messages




async def test_the_access_log_and_client_span_name_the_endpoint(
        fleet: list[ScriptedUpstream], sidecar_factory: SidecarFactory, client: aiohttp.ClientSession) -> None:
    import io

    from proxy.telemetry.access_log import AccessLog
    from tests.support.otlp_receiver import GrpcOtlpReceiver

    receiver = GrpcOtlpReceiver().start()
    try:
        config = balanced(fleet[:1])
        config["telemetry"]["tracing"] = {"enabled": True, "endpoint": receiver.endpoint, "sample_ratio": 1.0}
        sidecar = await sidecar_factory(config, env={})
        stream = io.StringIO()
        sidecar.access_log = sidecar._edge.access_log = AccessLog(stream)
        sidecar.access_log.start()
        await send(client, sidecar, 2)
        await sidecar.access_log.close()
        await sidecar.stop()
        lines = [line for line in stream.getvalue().splitlines() if line]
        assert [__import__("json").loads(line)["endpoint"] for line in lines] == [fleet[0].address] * 2
        spans = receiver.wait_for(lambda s: sum(x.kind == "CLIENT" for x in s) >= 2, timeout=5)
        clients = [s for s in spans if s.kind == "CLIENT"]
        assert {s.attributes["network.peer.address"] for s in clients} == {"127.0.0.1"}
        assert {s.attributes["network.peer.port"] for s in clients} == {fleet[0].port}
        assert sorted(s.attributes["outrigger.connection_reused"] for s in clients) == [False, True]
    finally:
        receiver.stop()
