"""Fixtures shared by every test suite: real loopback servers only."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from proxy.lifecycle.sidecar import Sidecar
from tests.support.sidecar import start_sidecar
from tests.support.upstream import ScriptedUpstream


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
