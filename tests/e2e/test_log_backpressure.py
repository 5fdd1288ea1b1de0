"""A stalled log reader must not freeze the sidecar (issue 12 item 6).

The sidecar runs as users run it, with stdout (access log) and stderr (JSON
logs) connected to pipes that nobody reads, as under a blocking container log
driver or a stuck collector.  Once the pipes and the bounded buffers are full,
lines are dropped and counted; requests and ``/healthz`` keep answering.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support.ports import free_port
from tests.support.sidecar import base_config

REQUESTS = 600  # a 64 KiB pipe and a 4 KiB buffer hold ~250-350 lines per stream: the rest must be dropped


async def _overlong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Every response carries bytes past its Content-Length: one warning line on stderr per request."""
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    server = await asyncio.start_server(_overlong, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


async def _status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def test_a_stalled_log_reader_drops_and_counts_lines_while_requests_and_healthz_keep_answering(
        upstream_url: str, tmp_path: Path) -> None:
    admin, port = free_port(), free_port()
    data = base_config(upstream_url, retry={"max_attempts": 1})
    data["admin"]["address"] = f"127.0.0.1:{admin}"
    data["listeners"][0]["address"] = f"127.0.0.1:{port}"
    data["telemetry"]["access_log"] = {"enabled": True}
    config = tmp_path / "outrigger.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "OUTRIGGER_"))}
    env["OUTRIGGER_LOG_BUFFER_BYTES"] = "4096"  # small, so that a few hundred requests fill it
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "proxy", "run", "--config", str(config),
                                                stdout=out_write, stderr=err_write, env=env)
    os.close(out_write)
    os.close(err_write)
    try:  # the read ends are held open and never read
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 15
            while await _status(session, f"http://127.0.0.1:{admin}/readyz") != 200:
                assert proc.returncode is None and time.monotonic() < deadline, "the sidecar never became ready"
                await asyncio.sleep(0.05)
            statuses: list[int | None] = []

            async def caller(count: int) -> None:
                for _ in range(count):
                    statuses.append(await _status(session, f"http://127.0.0.1:{port}/x"))
                    if statuses[-1] != 200:
                        return  # frozen: no point waiting out every other request

            await asyncio.gather(*(caller(REQUESTS // 8) for _ in range(8)))
            assert statuses.count(200) == REQUESTS, {s: statuses.count(s) for s in set(statuses)}
            assert await _status(session, f"http://127.0.0.1:{admin}/healthz") == 200
            async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                text = await resp.text()
        dropped = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^outrigger_log_lines_dropped_total\{stream="(\w+)"\} (\S+)$', text, re.M)}
        assert dropped["access"] > 0 and dropped["log"] > 0, dropped
    finally:
        proc.kill()
        await proc.wait()
        os.close(out_read)
        os.close(err_read)

