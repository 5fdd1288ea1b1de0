"""SIGHUP makes a running `outrigger run` process re-read its config file."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.process import SidecarProcess
from tests.support.sidecar import base_config


async def _get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session, \
            session.get(url, raise_for_status=True) as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def test_sighup_reloads_config_and_bumps_version(tmp_path: Path) -> None:
    data = base_config("http://127.0.0.1:9")
    path = tmp_path / "outrigger.yaml"
    sidecar = await SidecarProcess(data, config_path=path, args=["--config", str(path), "--watch-interval", "0"],
                                   directory=tmp_path).start(within_s=20)
    try:
        version = (await _get_json(f"{sidecar.admin_url}/readyz"))["version"]
        assert version is not None, "sidecar never became ready"
        data["listeners"][0]["routes"][0]["rewrite_prefix"] = "/hup"
        sidecar.write_config(data)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        new_version = version
        while time.monotonic() < deadline and new_version == version:
            await asyncio.sleep(0.1)
            new_version = (await _get_json(f"{sidecar.admin_url}/config"))["version"]
        assert new_version != version
        config = (await _get_json(f"{sidecar.admin_url}/config"))["config"]
        assert config["listeners"][0]["routes"][0]["rewrite_prefix"] == "/hup"
    finally:
        assert await sidecar.stop(within_s=15) == 0


async def test_sighup_and_the_file_watcher_reload_one_edit_once(tmp_path: Path) -> None:
    data = base_config("http://127.0.0.1:9")
    path = tmp_path / "outrigger.yaml"
    sidecar = await SidecarProcess(data, config_path=path, args=["--config", str(path), "--watch-interval", "0.2"],
                                   directory=tmp_path).start(within_s=20)
    try:
        data["listeners"][0]["routes"][0]["rewrite_prefix"] = "/hup"
        sidecar.write_config(data)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.5)  # several watcher intervals after the edit and the signal
        metrics = await sidecar.metrics_text()
        assert 'outrigger_config_reloads_total{result="success"} 1.0' in metrics, \
            [line for line in metrics.splitlines() if "reloads" in line]
    finally:
        assert await sidecar.stop(within_s=15) == 0
