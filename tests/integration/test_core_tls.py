"""HTTPS upstreams: verified by default, custom CA, tls.server_name, client certificates (mTLS).

Certificates are minted per test session with the ``openssl`` command line.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.lifecycle.sidecar import Sidecar
from tests.support.sidecar import base_config

Factory = Callable[..., Awaitable[Sidecar]]
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _leaf(cwd: Path, name: str, san: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=cwd)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; server.pem for DNS:payments.internal only; client.pem for mTLS."""
    cwd = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=outrigger-test-ca", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign", cwd=cwd)
    _leaf(cwd, "server", "DNS:payments.internal")
    _leaf(cwd, "client", "DNS:app.internal")
    return cwd


async def _https_upstream(certs: Path, *, require_client_cert: bool) -> AsyncIterator[str]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.pem", certs / "server.key")
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(certs / "ca.pem")

    async def handler(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        return web.Response(text="client-cert" if peer else "secure")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=context)
    yield f"https://127.0.0.1:{server.port}"
    await server.close()


@pytest.fixture
async def https_url(certs: Path) -> AsyncIterator[str]:
    async for url in _https_upstream(certs, require_client_cert=False):
        yield url


@pytest.fixture
async def mtls_url(certs: Path) -> AsyncIterator[str]:
    async for url in _https_upstream(certs, require_client_cert=True):
        yield url


def _config(url: str, **tls: Any) -> dict[str, Any]:
    data = base_config(url, retry={"max_attempts": 1})
    data["upstreams"]["svc"]["tls"] = tls
    return data


async def _get(sidecar: Sidecar, client: aiohttp.ClientSession) -> tuple[int, str, str | None]:
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/") as resp:
        return resp.status, await resp.text(), resp.headers.get("x-outrigger-error")


async def test_certificate_from_an_unknown_ca_is_refused_by_default(
        https_url: str, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(_config(https_url))
    status, _, code = await _get(sidecar, client)
    assert (status, code) == (502, "upstream_tls_error")


async def test_custom_ca_with_server_name_verifies_and_proxies(
        https_url: str, certs: Path, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(_config(https_url, ca_file=str(certs / "ca.pem"), server_name="payments.internal"))
    assert await _get(sidecar, client) == (200, "secure", None)


async def test_certificate_for_another_name_is_refused_even_with_the_right_ca(
        https_url: str, certs: Path, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    """The certificate names payments.internal, the URL names 127.0.0.1 and no server_name is set."""
    sidecar = await sidecar_factory(_config(https_url, ca_file=str(certs / "ca.pem")))
    status, _, code = await _get(sidecar, client)
    assert (status, code) == (502, "upstream_tls_error")


async def test_verify_false_accepts_any_certificate(https_url: str, sidecar_factory: Factory,
                                                    client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(_config(https_url, verify=False))
    assert await _get(sidecar, client) == (200, "secure", None)


async def test_client_certificate_is_presented_for_mtls(
        mtls_url: str, certs: Path, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(_config(mtls_url, ca_file=str(certs / "ca.pem"), server_name="payments.internal",
                                            cert_file=str(certs / "client.pem"), key_file=str(certs / "client.key")))
    assert await _get(sidecar, client) == (200, "client-cert", None)


async def test_client_certificate_is_presented_with_verify_false_too(
        mtls_url: str, certs: Path, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(_config(mtls_url, verify=False, cert_file=str(certs / "client.pem"),
                                            key_file=str(certs / "client.key")))
    async with client.get(f"http://127.0.0.1:{sidecar.port('main')}/x") as resp:
        assert resp.status == 200


async def test_mtls_upstream_without_a_client_certificate_fails_cleanly(
        mtls_url: str, certs: Path, sidecar_factory: Factory, client: aiohttp.ClientSession) -> None:
    sidecar = await sidecar_factory(_config(mtls_url, ca_file=str(certs / "ca.pem"), server_name="payments.internal"))
    status, _, code = await _get(sidecar, client)
    assert status in (502, 503) and code is not None
