"""Fixtures shared by every test suite: real loopback servers only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.compiled import stale

# An in-place build (./dev) leaves compiled request-path modules beside their sources, and Python
# imports those, not a .py edited since: the suite would test old code.  Say so before importing it.
_stale = stale(Path(__file__).resolve().parents[1])
if _stale:
    pytest.exit(f"compiled modules are older than their sources: {', '.join(_stale)}; rebuild with ./dev test, "
                "or `python setup.py build_ext --inplace` in the venv (ARCHITECTURE.md, Compiled modules)",
                returncode=4)

from proxy.lifecycle.sidecar import Sidecar  # noqa: E402
from tests.support.sidecar import start_sidecar  # noqa: E402
from tests.support.upstream import ScriptedUpstream  # noqa: E402


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    server = ScriptedUpstream()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def sidecar_factory() -> AsyncIterator[Callable[..., Awaitable[Sidecar]]]:
    started: list[Sidecar] = []

    async def make(data: dict[str, Any], **kwargs: Any) -> Sidecar:
        sidecar = await start_sidecar(data, **kwargs)
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        if not sidecar.draining:
            await sidecar.stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session
