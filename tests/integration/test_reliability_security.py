"""Security defaults, each checked end to end on real sockets.

The container's non-root user is checked in tests/deploy/test_dockerfile.py
(``test_final_stage_is_slim_unprivileged_and_labelled``: a numeric, non-zero
``USER``); upstream TLS verification against real certificates is in
tests/integration/test_core_tls.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import yaml

from proxy.config import TlsConfig, load_config
from proxy.lifecycle.sidecar import Sidecar
from tests.integration.test_core_tls import certs, https_url  # noqa: F401 - fixtures
from tests.support.sidecar import base_config
from tests.support.upstream import ScriptedUpstream

Factory = Callable[..., Awaitable[Sidecar]]
SECRET = "s3cr3t-value-0123456789"


# --- admin ---


def test_admin_address_defaults_to_loopback_only() -> None:
    data = base_config("http://127.0.0.1:1")
    del data["admin"]
    config = load_config(yaml.safe_dump(data), env={})
    assert config.admin.address == "127.0.0.1:9901"


async def test_admin_server_is_bound_to_loopback(upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    runner = sidecar._admin_runner
    assert runner is not None
    hosts = {sock.getsockname()[0] for site in runner.sites for sock in site._server.sockets}  # type: ignore[union-attr]
    assert hosts == {"127.0.0.1"}


async def test_config_endpoint_redacts_tls_paths_matched_header_values_and_endpoint_credentials(
        upstream: ScriptedUpstream, sidecar_factory: Factory, certs: Path,  # noqa: F811 - fixture
        client: aiohttp.ClientSession) -> None:
    data = base_config(upstream.url, match={"path_prefix": "/", "headers": {"x-api-key": SECRET}})
    data["upstreams"]["svc"]["tls"] = {"ca_file": str(certs / "ca.pem"), "cert_file": str(certs / "client.pem"),
                                       "key_file": str(certs / "client.key")}
    data["telemetry"]["tracing"] = {"enabled": False, "endpoint": f"http://collector:{SECRET}@otel.example:4317"}
    sidecar = await sidecar_factory(data)
    async with client.get(f"http://127.0.0.1:{sidecar.admin_port}/config") as resp:
        text = await resp.text()
    assert SECRET not in text and str(certs) not in text
    config = json.loads(text)["config"]
    assert config["upstreams"]["svc"]["tls"]["key_file"] == "[redacted]"
    assert config["listeners"][0]["routes"][0]["match"]["headers"] == {"x-api-key": "[redacted]"}
    assert config["telemetry"]["tracing"]["endpoint"] == "http://otel.example:4317"  # scheme kept


# --- upstream TLS ---


def test_tls_verification_is_on_by_default() -> None:
    assert TlsConfig().verify is True


async def test_turning_verification_off_for_one_upstream_leaves_the_others_verified(
        https_url: str, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:  # noqa: F811
    data = base_config(https_url, retry={"max_attempts": 1})
    data["upstreams"]["lax"] = {"url": https_url, "tls": {"verify": False}}
    data["listeners"][0]["routes"].insert(0, {"name": "lax", "match": {"path_prefix": "/lax"}, "upstream": "lax",
                                              "retry": {"max_attempts": 1}})
    sidecar = await sidecar_factory(data)
    base = f"http://127.0.0.1:{sidecar.port('main')}"
    async with client.get(f"{base}/lax") as resp:
        assert resp.status == 200
    async with client.get(f"{base}/strict") as resp:
        assert (resp.status, resp.headers["x-outrigger-error"]) == (502, "upstream_tls_error")


# --- request ids and trace context ---


@pytest.mark.parametrize("bad", ["has spaces", "x" * 200, "semi;colon", "quote\"d", "ünïcode"])
async def test_malformed_request_id_is_replaced_upstream_and_in_the_response(
        upstream: ScriptedUpstream, sidecar_factory: Factory, bad: str) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    raw = (f"GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\nx-request-id: {bad}\r\n\r\n").encode()
    response = await _exchange(sidecar.port("main"), raw)
    sent = upstream.requests[-1].headers["x-request-id"]
    assert sent != bad and len(sent) == 32 and int(sent, 16) >= 0
    assert f"x-request-id: {sent}".encode() in response and bad.encode() not in response


@pytest.mark.parametrize("bad", [
    "00-zzzz", "00-00000000000000000000000000000000-1111111111111111-01",
    "ff-11111111111111111111111111111111-1111111111111111-01",
    "00-ABCDEF11111111111111111111111111-1111111111111111-01",
])
async def test_malformed_traceparent_is_not_forwarded(upstream: ScriptedUpstream, sidecar_factory: Factory,
                                                      client: aiohttp.ClientSession, bad: str) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    good = "00-11111111111111111111111111111111-2222222222222222-01"
    for value in (bad, good):
        async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/t", headers={"traceparent": value}) as resp:
            assert resp.status == 200
    assert "traceparent" not in upstream.requests[0].headers
    assert upstream.requests[1].headers["traceparent"] == good


# --- nothing echoed, nothing injected ---


async def _exchange(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


@pytest.mark.parametrize("header", [
    f"x-outrigger-timeout-ms: {SECRET}", f"x-outrigger-max-attempts: {SECRET}", "x-outrigger-timeout-ms: -1",
    "x-outrigger-timeout-ms: NaN", "x-outrigger-timeout-ms: 1e309", "x-outrigger-max-attempts: 99999999999",
])
async def test_garbage_override_is_400_without_echo_and_never_reaches_the_upstream(
        upstream: ScriptedUpstream, sidecar_factory: Factory, header: str) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    raw = f"GET /x HTTP/1.1\r\nHost: app\r\nConnection: close\r\nAuthorization: Bearer {SECRET}\r\n{header}\r\n\r\n"
    response = await _exchange(sidecar.port("main"), raw.encode())
    assert response.startswith(b"HTTP/1.1 400") and b"x-outrigger-error: bad_request" in response
    assert SECRET.encode() not in response and header.split(": ")[1].encode() not in response.split(b"\r\n\r\n")[1]
    assert upstream.requests == []


@pytest.mark.parametrize("status_case", ["no-route", "bad-override", "unparsable"])
async def test_error_bodies_never_echo_request_header_values(
        upstream: ScriptedUpstream, sidecar_factory: Factory, status_case: str) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url, match={"path_prefix": "/api"}))
    headers = f"Host: app\r\nConnection: close\r\nCookie: session={SECRET}\r\nX-Api-Key: {SECRET}\r\n"
    raw = {
        "no-route": f"GET /elsewhere HTTP/1.1\r\n{headers}\r\n",
        "bad-override": f"GET /api HTTP/1.1\r\n{headers}x-outrigger-max-attempts: 0\r\n\r\n",
        "unparsable": f"GET /api HTTP/1.1\r\n{headers}Bad Header: {SECRET}\r\n\r\n",
    }[status_case]
    response = await _exchange(sidecar.port("main"), raw.encode())
    assert response.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4"))
    assert SECRET.encode() not in response


@pytest.mark.parametrize("target", [
    "/x%0d%0aInjected:%20yes", "/x%0D%0ASet-Cookie:%20a=b", "/x?q=%0d%0aInjected:%20yes",
    "/x%E5%98%8A%E5%98%8DInjected:%20yes",
])
async def test_encoded_crlf_in_the_path_cannot_inject_a_response_header(
        upstream: ScriptedUpstream, sidecar_factory: Factory, target: str) -> None:
    """Percent-encoded CR/LF stays encoded: proxied as is (or refused), and absent from every response header."""
    for prefix in ("/", "/api"):  # proxied, and refused with 404 (whose message names the path)
        sidecar = await sidecar_factory(base_config(upstream.url, match={"path_prefix": prefix}))
        raw = f"GET {target} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n".encode()
        response = await _exchange(sidecar.port("main"), raw)
        head = response.split(b"\r\n\r\n")[0].lower()
        assert b"injected" not in head and b"set-cookie" not in head


async def test_raw_cr_or_lf_in_a_header_or_the_path_never_reaches_the_upstream(
        upstream: ScriptedUpstream, sidecar_factory: Factory) -> None:
    sidecar = await sidecar_factory(base_config(upstream.url))
    for raw in (b"GET /x\r\nInjected: yes HTTP/1.1\r\nHost: app\r\n\r\n",
                b"GET /x HTTP/1.1\r\nHost: app\r\nx-request-id: a\rInjected: yes\r\n\r\n",
                b"GET /x HTTP/1.1\r\nHost: app\r\nx-outrigger-timeout-ms: 5\nInjected: yes\r\n\r\n"):
        response = await _exchange(sidecar.port("main"), raw)
        assert b" 400 " in response.split(b"\r\n")[0]
        assert b"injected" not in response.split(b"\r\n\r\n")[0].lower()
    assert upstream.requests == []


